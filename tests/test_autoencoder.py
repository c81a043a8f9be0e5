"""Stage 1 of latent_mask_to_image: the autoencoder's loss (L1 + KL, the adversarial term after its warm-up, the
perceptual switch that never downloads), the latent scale factor, and train_autoencoder.yaml end to end on a tiny
two-modality 2D data set."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import raises_with, run_bundle

from segdiff.engine.autoencoder import (
    AutoencoderLoss,
    AutoencoderTrainingStep,
    ReconstructionPrepareBatch,
    check_perceptual_weights,
    image_entries,
    kl_divergence,
    latent_scale_factor,
    read_latent_scale_factor,
    reconstruction_metrics,
    write_latent_scale_factor,
)
from segdiff.errors import ConfigKeyError

BUNDLE = "latent_mask_to_image"
CONFIG = "train_autoencoder.yaml"

#: a tiny autoencoder and discriminator for 16 x 16 images (train_autoencoder.yaml's keys)
TINY = {
    "image_size": [16, 16],
    "network_channels": [8, 16],
    "attention_levels": [False, False],
    "norm_num_groups": 8,
    "latent_channels": 2,
    "discriminator_channels": 8,
    "discriminator_layers": 2,
    "batch_size": 2,
    "slices_per_volume": 1,
    "val_interval": 1,
    "num_workers": 0,
    "scale_factor_batches": 2,
    "adversarial_warmup_steps": 2,
    "adversarial_weight": 0.1,
}


def tiny_autoencoder(seed: int = 0):
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
        num_res_blocks=1, latent_channels=2, norm_num_groups=8, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


# -- the loss -----------------------------------------------------------------------------------------------------


def test_kl_divergence_matches_the_hand_computed_value():
    # item 0: mu (1, 0), sigma (1, 1) -> 0.5 * (1 + 0) = 0.5
    # item 1: mu (0, 2), sigma (2, 1) -> 0.5 * ((0 + 4 - ln 4 - 1) + (4 + 1 - 0 - 1)) = 0.5 * (7 - ln 4)
    z_mu = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])
    z_sigma = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 1.0]]]])
    expected = (0.5 + 0.5 * (7.0 - math.log(4.0))) / 2  # mean over the batch
    assert kl_divergence(z_mu, z_sigma).item() == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4)).item() == 0.0


def test_autoencoder_loss_is_l1_plus_weighted_kl():
    target = torch.full((2, 1, 4, 4), 0.5)
    reconstruction = torch.zeros(2, 1, 4, 4)
    reconstruction[:, :, 0, 0] = 0.5 + 1.6  # one pixel off by 1.6, the others by 0.5
    z_mu, z_sigma = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]]), torch.tensor([[[[1.0, 1.0]]], [[[2.0, 1.0]]]])
    l1 = (15 * 0.5 + 1.6) / 16
    kl = (0.5 + 0.5 * (7.0 - math.log(4.0))) / 2
    terms = AutoencoderLoss(kl_weight=0.01).terms((reconstruction, z_mu, z_sigma), target)
    assert terms["recon_loss"].item() == pytest.approx(l1, rel=1e-6)
    assert terms["kl_loss"].item() == pytest.approx(kl, rel=1e-6)
    assert terms["perceptual_loss"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(l1 + 0.01 * kl, rel=1e-6)


def test_perceptual_term_refuses_to_run_without_local_weights(tmp_path):
    with pytest.raises(ConfigKeyError, match="perceptual_weights is not set.*never downloads"):
        AutoencoderLoss(perceptual_weight=0.1)
    with pytest.raises(ConfigKeyError, match="no file at"):
        check_perceptual_weights(0.1, tmp_path / "resnet50.pth")
    with pytest.raises(ConfigKeyError, match="cannot load local weights"):
        check_perceptual_weights(0.1, tmp_path / "alex.pth", perceptual_network="alex")
    check_perceptual_weights(0.0, None)  # off: nothing needed
    assert AutoencoderLoss(perceptual_weight=0.0).perceptual is None


def test_perceptual_term_is_added_with_its_weight():
    class Stub(torch.nn.Module):  # stands in for a perceptual network loaded from a local file
        def forward(self, x, y):
            assert x.min() >= 0 and x.max() <= 1  # [-1, 1] images are given to it in [0, 1]
            return (x - y).abs().mean()

    target, reconstruction = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    z = (torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1))
    terms = AutoencoderLoss(kl_weight=0.0, perceptual_weight=2.0, perceptual=Stub()).terms((reconstruction, *z), target)
    assert terms["perceptual_loss"].item() == pytest.approx(0.25)
    assert terms["loss"].item() == pytest.approx(0.5 + 2.0 * 0.25)


def test_perceptual_term_loads_a_local_resnet50_file_without_network(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)  # stands in for pretrained weights
    loss = AutoencoderLoss(perceptual_weight=0.1, perceptual_weights=str(path))
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    terms = loss.terms((target + 0.1 * torch.randn_like(target), torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)), target)
    assert math.isfinite(terms["perceptual_loss"].item()) and terms["perceptual_loss"].item() > 0


# -- the adversarial term -----------------------------------------------------------------------------------------


def test_adversarial_term_and_discriminator_steps_start_after_the_warm_up():
    from monai.engines import SupervisedTrainer
    from monai.networks.nets import PatchDiscriminator

    autoencoder = tiny_autoencoder()
    torch.manual_seed(1)
    discriminator = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=1, num_layers_d=2)
    step = AutoencoderTrainingStep(
        discriminator, torch.optim.Adam(discriminator.parameters(), 1e-3), adversarial_weight=0.5,
        adversarial_warmup_steps=2,
    )
    data = [{"image": torch.rand(2, 1, 16, 16) * 2 - 1} for _ in range(4)]
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=data, network=autoencoder,
        optimizer=torch.optim.Adam(autoencoder.parameters(), 1e-3), loss_function=AutoencoderLoss(),
        prepare_batch=ReconstructionPrepareBatch(), iteration_update=step, decollate=False,
    )
    initial_encoder = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    seen = []

    def record(engine):
        weights = [p.detach().clone() for p in discriminator.parameters()]
        seen.append((dict(engine.state.output["losses"]), weights))

    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    initial = [p.detach().clone() for p in discriminator.parameters()]
    trainer.run()

    assert len(seen) == 4
    for losses, weights in seen[:2]:  # warm-up: no adversarial term, the discriminator neither runs nor changes
        assert losses["generator_loss"] == 0.0 and losses["discriminator_loss"] == 0.0
        assert all(torch.equal(a, b) for a, b in zip(weights, initial))
    for losses, _ in seen[2:]:
        assert losses["generator_loss"] > 0.0 and losses["discriminator_loss"] > 0.0
    assert not all(torch.equal(a, b) for a, b in zip(seen[2][1], initial))  # its first step is iteration 3
    assert any(not torch.equal(initial_encoder[k], v) for k, v in autoencoder.state_dict().items())
    assert all(losses["recon_loss"] > 0 and losses["kl_loss"] > 0 for losses, _ in seen)


def test_adversarial_weight_without_a_discriminator_is_refused():
    with pytest.raises(ConfigKeyError, match="no discriminator"):
        AutoencoderTrainingStep(None, None, adversarial_weight=0.1)


# -- latent scale factor, metrics, data ---------------------------------------------------------------------------


class ShiftScaleEncoder(torch.nn.Module):
    """``encode(x) = (5 + 2 x, 1)``: latents of std 2 when x is a +-1 pattern."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return 5.0 + 2.0 * x, torch.ones_like(x)


def test_latent_scale_factor_of_a_known_constant_std_case():
    pattern = torch.tensor([1.0, -1.0]).repeat(2 * 3 * 4 * 2).reshape(2, 3, 4, 4)  # mean 0, population std 1
    batches = [{"image": pattern} for _ in range(3)] + [{"image": 100 * pattern}]  # the last one is left out
    scale, details = latent_scale_factor(ShiftScaleEncoder(), batches, num_batches=3, return_details=True)
    n = 3 * pattern.numel()
    assert details["num_batches"] == 3 and details["num_values"] == n
    assert details["latent_mean"] == pytest.approx(5.0)
    assert scale == pytest.approx(1.0 / (2.0 * math.sqrt(n / (n - 1))), rel=1e-9)  # unbiased std of +-2 around 5
    assert latent_scale_factor(ShiftScaleEncoder(), [pattern]) == pytest.approx(1 / torch.std(2 * pattern).item())


def test_scale_factor_is_stored_beside_the_weights(tmp_path):
    from segdiff.engine.provenance import save_weights

    path = tmp_path / "models" / "autoencoder.pt"
    save_weights(tiny_autoencoder().state_dict(), path, {"format": "segdiff-model-record/1", "settings": {"a": 1}})
    write_latent_scale_factor(path, 0.25, latent_std=4.0)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["settings"] == {"a": 1} and record["latent"] == {"scale_factor": 0.25, "latent_std": 4.0}
    assert read_latent_scale_factor(path) == 0.25
    save_weights(tiny_autoencoder().state_dict(), path, {"format": "segdiff-model-record/1"})  # a later save
    with pytest.raises(ConfigKeyError, match="holds no latent scale factor"):
        read_latent_scale_factor(path)


def test_reconstruction_metrics_are_reported_per_modality():
    batches = [{"image": torch.rand(3, 1, 16, 16) * 2 - 1, "modality": ["ct", "mr", "ct"]} for _ in range(2)]
    results = reconstruction_metrics(tiny_autoencoder(), batches, spatial_dims=2)
    assert set(results) == {"ct", "mr"}
    for values in results.values():
        assert set(values) == {"psnr", "ssim"} and all(math.isfinite(v) for v in values.values())


def test_entries_without_a_modality_are_refused():
    entries = [{"image": "a.nii.gz", "label": "la.nii.gz", "modality": "ct"}, {"image": "b.nii.gz"}]
    raises_with("missing in training[1]", image_entries, entries, datalist_name="datalist.json")
    assert image_entries(entries[:1]) == [{"image": "a.nii.gz", "modality": "ct"}]  # labels are not read


# -- the bundle config --------------------------------------------------------------------------------------------


def write_two_modality_set(root):
    """2D NIfTI images 16 x 16 of two modalities: bright disks (ct) and dark disks on a gradient (mr)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[:16, :16]
    datalist = {"training": [], "validation": []}
    for split, count in (("training", 2), ("validation", 1)):
        for modality in ("ct", "mr"):
            for k in range(count):
                disk = ((yy - 8 - k) ** 2 + (xx - 7) ** 2 < 20).astype(np.float32)
                image = 300 * disk if modality == "ct" else xx * 10.0 - 80 * disk
                image = (image + rng.normal(0, 5, image.shape)).astype(np.float32)
                name = f"images/{modality}_{split}_{k}.nii.gz"
                nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / name))
                datalist[split].append({"image": name, "modality": modality})
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_autoencoder.yaml for one epoch (2 iterations), then resumed to two: the adversarial term starts at
    iteration 3, in the resumed run."""
    root = tmp_path_factory.mktemp("autoencoder")
    data = write_two_modality_set(root / "data")
    bundle = root / "bundle"
    settings = dict(dataset_dir=str(data), bundle_root=str(bundle), **TINY)
    run_bundle(BUNDLE, [CONFIG], run_id="training", max_epochs=1, **settings)
    first = torch.load(bundle / "models" / "autoencoder_checkpoint.pt", weights_only=False)
    run_bundle(BUNDLE, [CONFIG], run_id="training", max_epochs=2, resume=True, **settings)
    return root, settings, first


def test_training_writes_weights_record_scale_factor_and_scores_per_modality(trained):
    root, _, _ = trained
    models = root / "bundle" / "models"
    weights = torch.load(models / "autoencoder.pt", weights_only=True)
    assert set(weights) == set(tiny_autoencoder().state_dict())  # a plain state dict of network_def
    record = json.loads((models / "autoencoder.json").read_text())
    assert record["settings"]["stage"] == "autoencoder" and record["objective"]["modalities"] == ["ct", "mr"]
    assert record["latent"]["scale_factor"] > 0 and read_latent_scale_factor(models / "autoencoder.pt") > 0
    assert not list(models.glob(".*tmp*"))
    scores = json.loads((root / "bundle" / "outputs" / "reconstruction_metrics.json").read_text())
    assert scores["epoch"] == 2 and set(scores["metrics"]) == {"ct", "mr"}
    assert all(set(v) == {"psnr", "ssim"} for v in scores["metrics"].values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (root / "bundle" / "outputs" / "tensorboard").glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train_loss", "recon_loss", "kl_loss", "generator_loss", "discriminator_loss", "val_psnr"} <= tags
    assert {"psnr/ct", "psnr/mr", "ssim/ct", "ssim/mr"} <= tags


def test_resume_continues_and_trains_the_discriminator_after_the_warm_up(trained):
    root, _, first = trained
    checkpoint = torch.load(root / "bundle" / "models" / "autoencoder_checkpoint.pt", weights_only=False)
    assert first["trainer"]["iteration"] == 2 and checkpoint["trainer"]["iteration"] == 4
    for name in ("network", "discriminator"):  # the discriminator's first steps are iterations 3 and 4
        assert any(not torch.equal(checkpoint[name][k], first[name][k]) for k in first[name] if "weight" in k)


def test_training_refuses_to_overwrite_an_earlier_run(trained):
    root, settings, _ = trained
    raises_with("exist(s) from an earlier run", run_bundle, BUNDLE, [CONFIG], run_id="training", max_epochs=3,
                **settings)


def test_training_with_perceptual_weight_but_no_local_weights_stops_before_any_work(tmp_path, trained):
    root, settings, _ = trained
    settings = {**settings, "bundle_root": str(tmp_path / "bundle")}
    raises_with("perceptual_weights is not set", run_bundle, BUNDLE, [CONFIG], run_id="training", perceptual_weight=0.1,
                **settings)
    assert not (tmp_path / "bundle").exists()
