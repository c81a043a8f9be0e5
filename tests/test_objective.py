"""Training objectives: min-SNR-gamma weights, the weighted loss, rectified-flow batches, the refusals of unknown or
impossible key values, and rectified-flow / min-SNR runs of both bundles end to end on tiny networks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from bundle_utils import TINY_NETWORK, TINY_TRAINING, raises_with, run_bundle, write_dataset
from segdiff.engine import (
    ConditionalDiffusionPrepareBatch,
    DiffusionLoss,
    build_scheduler,
    check_objective,
    min_snr_weights,
    training_scheduler,
)
from segdiff.errors import ConfigKeyError, ModelMismatchError

LINEAR = dict(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)


# ---- min-SNR weights against hand-computed values ----------------------------------------------------------------
#: alphas_cumprod 0.9, 0.5, 0.1 -> SNR 9, 1, 1/9; with gamma 5: min(SNR, 5) = 5, 1, 1/9
TOY = SimpleNamespace(alphas_cumprod=torch.tensor([0.9, 0.5, 0.1]))
EXPECTED = {
    "epsilon": [5 / 9, 1.0, 1.0],  # min(SNR, 5) / SNR
    "v_prediction": [5 / 10, 1 / 2, (1 / 9) / (1 / 9 + 1)],  # min(SNR, 5) / (SNR + 1)
    "sample": [5.0, 1.0, 1 / 9],  # min(SNR, 5)
}


@pytest.mark.parametrize("prediction_type", sorted(EXPECTED))
def test_min_snr_weights_match_hand_computed_values(prediction_type):
    weights = min_snr_weights(TOY, torch.tensor([0, 1, 2]), prediction_type, gamma=5.0)
    np.testing.assert_allclose(weights.numpy(), EXPECTED[prediction_type], rtol=1e-6)


def test_min_snr_weights_follow_the_timesteps_and_the_gamma():
    weights = min_snr_weights(TOY, torch.tensor([2, 0, 0]), "epsilon", gamma=1.0)
    np.testing.assert_allclose(weights.numpy(), [1.0, 1 / 9, 1 / 9], rtol=1e-6)  # SNR 9 clipped to 1 -> 1/9
    with pytest.raises(ConfigKeyError, match="'min_snr_gamma' must be > 0, got 0"):
        min_snr_weights(TOY, torch.tensor([0]), "epsilon", gamma=0)


def test_min_snr_weights_on_the_bundles_linear_schedule():
    scheduler = DDPMScheduler(**LINEAR)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t = np.array([0, 50, 300, 999])
    snr = abar[t] / (1 - abar[t])
    weights = min_snr_weights(scheduler, torch.tensor(t), "v_prediction", gamma=5.0).numpy()
    np.testing.assert_allclose(weights, np.minimum(snr, 5) / (snr + 1), rtol=1e-3)  # MONAI keeps alphas_cumprod in float32
    assert weights[0] < 0.01 and weights[2] > 0.3  # clipped where the SNR is high, SNR / (SNR + 1) where it is low


# ---- the loss ---------------------------------------------------------------------------------------------------
def test_diffusion_loss_is_plain_mse_without_weights_and_weighted_per_sample_with_them():
    prediction = torch.zeros(2, 1, 4, 4)
    target = torch.cat([torch.ones(1, 1, 4, 4), 2 * torch.ones(1, 1, 4, 4)])  # per-sample MSE 1 and 4
    holder = SimpleNamespace(last_batch={"loss_weights": None})
    loss = DiffusionLoss(holder)
    assert loss(prediction, target).item() == pytest.approx(torch.nn.functional.mse_loss(prediction, target).item())
    holder.last_batch = {"loss_weights": torch.tensor([1.0, 3.0])}
    assert loss(prediction, target).item() == pytest.approx((1 * 1 + 3 * 4) / 2)
    holder.last_batch = {"loss_weights": torch.tensor([1.0, 3.0, 1.0])}
    with pytest.raises(RuntimeError, match="3 loss weights for a batch of 2"):
        loss(prediction, target)


def batch(n=4):
    return {"image": torch.randn(n, 1, 8, 8), "label": torch.rand(n, 3, 8, 8)}


def test_prepare_batch_draws_min_snr_weights_for_its_own_timesteps():
    scheduler = training_scheduler("ddpm", prediction_type="epsilon", loss_weighting="min_snr", **LINEAR)
    prepare = ConditionalDiffusionPrepareBatch(1000, scheduler=scheduler, loss_weighting="min_snr", min_snr_gamma=5.0)
    _, _, _, kwargs = prepare(batch(16))
    last = prepare.last_batch
    assert torch.equal(last["timesteps"], kwargs["timesteps"]) and torch.equal(last["noise"], kwargs["noise"])
    np.testing.assert_allclose(last["loss_weights"], min_snr_weights(scheduler, kwargs["timesteps"], "epsilon", 5.0))
    plain = ConditionalDiffusionPrepareBatch(1000, scheduler=scheduler)
    plain(batch())
    assert plain.last_batch["loss_weights"] is None


def test_rectified_flow_batches_target_the_velocity_at_integer_timesteps():
    scheduler = training_scheduler("rflow", prediction_type="v_prediction", timestep_sampling="logit_normal", **LINEAR)
    assert isinstance(scheduler, RFlowScheduler) and scheduler.sample_method == "logit-normal"
    prepare = ConditionalDiffusionPrepareBatch(1000, scheduler=scheduler)
    data = batch(64)
    target, loss_target, _, kwargs = prepare(data)
    torch.testing.assert_close(loss_target, data["image"] - kwargs["noise"])
    t = kwargs["timesteps"]
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < 1000
    # logit-normal(0, 1) puts most timesteps mid-way: far fewer in the outer tenths than uniform's 20%
    outer = ((t < 100) | (t >= 900)).float().mean().item()
    assert outer < 0.15
    # the inferer noises on the straight line x_t = (1 - t/T) x0 + (t/T) noise
    noisy = scheduler.add_noise(target, kwargs["noise"], t)
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * target + s * kwargs["noise"])


# ---- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arguments, message",
    [
        (("ddim", "v_prediction"), "'diffusion' must be one of 'ddpm', 'rflow'; got 'ddim'"),
        (("ddpm", "v_prediction", "snr"), "'loss_weighting' must be one of 'none', 'min_snr'; got 'snr'"),
        (("rflow", "v_prediction", "none", "cosine"), "'timestep_sampling' must be one of 'uniform', 'logit_normal'; got 'cosine'"),
        (("rflow", "epsilon"), "'prediction_type' must be v_prediction, got 'epsilon'"),
        (("rflow", "v_prediction", "min_snr"), "'loss_weighting' 'min_snr' is defined for diffusion ddpm only"),
        (("ddpm", "epsilon", "none", "logit_normal"), "'timestep_sampling' 'logit_normal' is for diffusion rflow"),
    ],
)
def test_unknown_or_impossible_objectives_are_refused(arguments, message):
    with pytest.raises(ConfigKeyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_objective(*arguments)


def test_samplers_are_refused_for_the_other_forward_process():
    with pytest.raises(ConfigKeyError, match="'sampler' 'ddim' samples DDPM-trained models, but 'diffusion' is rflow"):
        build_scheduler("ddim", diffusion="rflow", prediction_type="v_prediction", **LINEAR)
    with pytest.raises(ConfigKeyError, match="'sampler' euler samples rectified-flow models, but 'diffusion' is ddpm"):
        build_scheduler("euler", diffusion="ddpm", prediction_type="v_prediction", **LINEAR)
    assert isinstance(build_scheduler("euler", diffusion="rflow", prediction_type="v_prediction", **LINEAR), RFlowScheduler)


# ---- both bundles, end to end -------------------------------------------------------------------------------------
def tiny(data, root, **extra):
    return dict(dataset_dir=str(data), bundle_root=str(root), num_classes=3, image_size=[16, 16], **TINY_NETWORK, **extra)


def assert_on_grid(output, reference):
    out, ref = nib.load(str(output)), nib.load(str(reference))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    assert np.isfinite(out.get_fdata()).all()


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rectified_flow_mask_to_image_trains_and_samples_with_euler_on_the_mask_grid(tmp_path, spatial_dims):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    extra = {"diffusion": "rflow", "timestep_sampling": "logit_normal"}
    if spatial_dims == 3:
        extra.update(spatial_dims=3, image_size=[8, 16, 16])
    run_bundle("mask_to_image", ["train.yaml"], run_id="training",
               **{**tiny(tmp_path / "data", tmp_path / "b", max_epochs=1, sampler="euler", **TINY_TRAINING), **extra})
    record = json.loads((tmp_path / "b" / "models" / "model.json").read_text())
    assert record["settings"]["diffusion"] == "rflow"
    assert record["objective"] == {"loss_weighting": "none", "min_snr_gamma": None, "timestep_sampling": "logit_normal"}

    infer = {**tiny(tmp_path / "data", tmp_path / "b", num_inference_steps=3), **extra, "sampler": "euler"}
    infer.pop("timestep_sampling")  # a training key: inference neither needs nor checks it
    run_bundle("mask_to_image", ["inference.yaml"], **infer)
    outputs = sorted((tmp_path / "b" / "outputs" / "generated").glob("*_image.nii.gz"))
    assert len(outputs) == 2
    assert_on_grid(outputs[0], tmp_path / "data" / "labels" / "case4.nii.gz")

    # the rflow model under a DDPM config is refused naming the key, not sampled with the wrong process
    error = raises_with("diffusion: trained \"rflow\", configured \"ddpm\"", run_bundle, "mask_to_image",
                        ["inference.yaml"], **{**infer, "diffusion": "ddpm", "sampler": "ddim",
                                               "output_dir": str(tmp_path / "b" / "ddpm")})
    assert isinstance(error, ModelMismatchError) and "--diffusion rflow" in str(error)
    raises_with("'sampler' 'dpm_solver' samples DDPM-trained models, but 'diffusion' is rflow", run_bundle,
                "mask_to_image", ["inference.yaml"], **{**infer, "sampler": "dpm_solver", "output_dir": str(tmp_path / "b" / "dpm")})


@pytest.mark.slow
def test_rectified_flow_image_to_mask_segments_on_the_image_grid(tmp_path):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    extra = {"diffusion": "rflow", "sampler": "euler", "num_members": 2, "num_val_cases": 1, "prediction_type": "v_prediction",
             "recycling": False}  # a flow predicts its velocity; recycling is for mask-predicting ddpm models
    run_bundle("image_to_mask", ["train.yaml"], run_id="training",
               **{**tiny(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING), **extra})
    out = tmp_path / "b" / "segs"
    run_bundle("image_to_mask", ["inference.yaml"], **tiny(tmp_path / "data", tmp_path / "b", output_dir=str(out),
                                                            num_inference_steps=3, diffusion="rflow", sampler="euler", num_members=2,
                                                            prediction_type="v_prediction"))
    segmentations = sorted(out.glob("*_seg.nii.gz"))
    assert len(segmentations) == 2
    image = tmp_path / "data" / "images" / "case4.nii.gz"
    assert_on_grid(segmentations[0], image)
    assert_on_grid(sorted(out.glob("*_uncertainty.nii.gz"))[0], image)
    labels = np.unique(nib.load(str(segmentations[0])).get_fdata())
    assert set(labels.tolist()) <= {0.0, 1.0, 2.0}


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_training_for_every_prediction_type_logs_a_finite_weighted_loss(tmp_path, prediction_type):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    extra = {"loss_weighting": "min_snr", "min_snr_gamma": 2.0, "prediction_type": prediction_type}
    run_bundle("mask_to_image", ["train.yaml"], run_id="training",
               **{**tiny(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING), **extra})
    record = json.loads((tmp_path / "b" / "models" / "model.json").read_text())
    assert record["settings"]["prediction_type"] == prediction_type
    assert record["objective"]["loss_weighting"] == "min_snr" and record["objective"]["min_snr_gamma"] == 2.0
    weights = torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())
    # the samples of the weighted model come out on the mask grid, with the loss weighting not needed at inference
    run_bundle("mask_to_image", ["inference.yaml"],
               **tiny(tmp_path / "data", tmp_path / "b", num_inference_steps=2, prediction_type=prediction_type))
    outputs = sorted((tmp_path / "b" / "outputs" / "generated").glob("*_image.nii.gz"))
    assert_on_grid(outputs[0], tmp_path / "data" / "labels" / "case4.nii.gz")


@pytest.mark.slow
def test_a_bad_objective_key_stops_the_bundle_with_its_name(tmp_path):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    for key, value, message in [
        ("loss_weighting", "snr", "'loss_weighting' must be one of 'none', 'min_snr'; got 'snr'"),
        ("diffusion", "flow", "'diffusion' must be one of 'ddpm', 'rflow'; got 'flow'"),
    ]:
        raises_with(message, run_bundle, "image_to_mask", ["train.yaml"], run_id="training",
                    **tiny(tmp_path / "data", tmp_path / f"b_{key}", max_epochs=1, recycling=False, **{key: value}, **TINY_TRAINING))


class ConstantVelocity(torch.nn.Module):
    """A 'network' whose flow velocity carries every sample to 3.0, outside the data range."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, context=None):
        return 3.0 - x  # v = x0 - noise points from the noise to x0 = 3 when x starts as pure noise


@pytest.mark.parametrize("clip_sample, inside", [(True, True), (False, False)])
def test_euler_samples_are_clipped_to_the_data_range_like_the_ddpm_samplers(clip_sample, inside):
    from segdiff.engine import ConditionalDiffusionSampler

    scheduler = build_scheduler("euler", diffusion="rflow", prediction_type="v_prediction", clip_sample=clip_sample, **LINEAR)
    sampler = ConditionalDiffusionSampler(scheduler, num_inference_steps=5, conditional=False, progress=False, seed=0)
    out = sampler(torch.zeros(1, 0, 8, 8), ConstantVelocity())
    assert (out.abs().max() <= 1.0) == inside
    if not inside:
        assert float(out.max()) > 2.0
