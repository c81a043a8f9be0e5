"""The latent_mask_to_image bundle end to end on a tiny two-modality set (CT volumes with masks, MR volumes without):
train_autoencoder.yaml -> train_diffusion.yaml -> train_controlnet.yaml -> inference.yaml (CT masks -> MR images), and
the grid sampler inference wraps around the latent sampler (segdiff.engine.latent_inference)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, anisotropic_affine, raises_with, run_bundle, workflow_missing_properties
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from segdiff.engine import LatentDiffusionSampler, build_scheduler, null_class
from segdiff.engine.latent_inference import LatentGridSampler, check_model_grid, trained_modalities
from segdiff.engine.provenance import state_dict_sha256
from segdiff.errors import ConfigKeyError, ModelMismatchError

BUNDLE = "latent_mask_to_image"
NUM_CLASSES = 3
MODALITIES = {"ct": 0, "mr": 1}
MASK_SHAPE = (20, 12, 3)  # test masks: another in-plane size than the model's 16 x 16, three axial slices

#: every stage: 2D model on 16 x 16 slices of 16 x 16 x 4 volumes, tiny batches, no workers
COMMON = {"spatial_dims": 2, "image_size": [16, 16], "num_workers": 0, "slices_per_volume": 2, "batch_size": 4,
          "val_interval": 1}
#: stage 1 (train_autoencoder.yaml's names): 2x downsampling, 3 latent channels, adversarial term off
AUTOENCODER = {"network_channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 4,
               "latent_channels": 3, "discriminator_channels": 8, "discriminator_layers": 2,
               "scale_factor_batches": 2, "adversarial_warmup_steps": 1000}
#: stages 2, 3 and inference: the same autoencoder under their names, and a tiny latent UNet
LATENT = {"latent_channels": 3, "autoencoder_channels": [8, 8], "autoencoder_attention_levels": [False, False],
          "autoencoder_num_res_blocks": 1, "autoencoder_norm_num_groups": 4,
          "network_channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1,
          "num_head_channels": 8, "norm_num_groups": 4, "num_train_timesteps": 100}
TRAINING = {"num_inference_steps": 2, "warmup_steps": 2}
CONTROLNET = {"num_classes": NUM_CLASSES, "conditioning_channels": 8, "target_modality": "mr", "target_mix_ratio": 0.25}
INFERENCE = {"num_classes": NUM_CLASSES, "num_inference_steps": 3, "sampler": "ddim", "batch_size": 2,
             "progress": False, "modality": "mr"}


def write_ct_mr_set(root):
    """16 x 16 x 4 volumes: CT (bright organs, labelled) and MR (dark organs on a gradient, no labels); test split: CT
    masks of MASK_SHAPE with an anisotropic, rotated affine."""
    rng = np.random.default_rng(0)
    for folder in ("images", "labels", "masks"):
        (root / folder).mkdir(parents=True)
    datalist = {"modalities": MODALITIES, "labels": {"0": "background", "1": "liver", "2": "lesion"},
                "training": [], "validation": [], "test": []}

    def label_map(shape, k):
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        cy, cx = shape[0] / 2 + k, shape[1] / 2
        organ = ((yy - cy) ** 2 + (xx - cx) ** 2 < (min(shape[:2]) / 3) ** 2).astype(np.uint8)
        organ[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(shape[:2]) / 8) ** 2] = 2
        return np.repeat(organ[..., None], shape[2], axis=2)

    case = 0
    for split, count in (("training", 2), ("validation", 1)):
        for modality in ("ct", "mr"):
            for k in range(count):
                label = label_map((16, 16, 4), k)
                xx = np.mgrid[:16, :16, :4][1]
                image = label * 150.0 if modality == "ct" else xx * 10.0 - 60.0 * label
                image = (image + rng.normal(0, 5, image.shape)).astype(np.float32)
                entry = {"image": f"images/{modality}{case}.nii.gz", "modality": modality}
                nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / entry["image"]))
                if modality == "ct":
                    entry["label"] = f"labels/{modality}{case}.nii.gz"
                    nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / entry["label"]))
                datalist[split].append(entry)
                case += 1
    for k in range(2):
        name = f"masks/ct_mask{k}.nii.gz"
        nib.save(nib.Nifti1Image(label_map(MASK_SHAPE, k), anisotropic_affine(shift=k)), str(root / name))
        datalist["test"].append({"label": name, "modality": "ct"})
    (root / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return root


def workflow(config, **overrides):
    from monai.bundle import ConfigWorkflow

    folder = BUNDLES / BUNDLE / "configs"
    return ConfigWorkflow(config_file=str(folder / config), meta_file=str(folder / "metadata.json"),
                          logging_file=str(folder / "logging.conf"), workflow_type="train", **overrides)


def train_stages(root):
    """The three training stages in order (1, 2 and 1 epochs) on :func:`write_ct_mr_set`'s data under ``root``, the
    bundle under ``root / "bundle"``; returns ``(paths, before, stage3)``: the ``dataset_dir`` and ``bundle_root``
    overrides, stages 1 and 2's weights as written, and stage 3's finalised workflow (its networks kept to inspect)."""
    data = write_ct_mr_set(root / "data")
    paths = {"dataset_dir": str(data), "bundle_root": str(root / "bundle")}
    run_bundle(BUNDLE, ["train_autoencoder.yaml"], run_id="training", max_epochs=1, **paths, **COMMON, **AUTOENCODER)
    run_bundle(BUNDLE, ["train_diffusion.yaml"], run_id="training", max_epochs=2, **paths, **COMMON, **LATENT,
               **TRAINING)
    models = root / "bundle" / "models"
    before = {name: torch.load(models / f"{name}.pt", weights_only=True) for name in ("autoencoder", "diffusion")}
    stage3 = workflow("train_controlnet.yaml", max_epochs=1, **paths, **COMMON, **LATENT, **TRAINING, **CONTROLNET)
    stage3.initialize()
    stage3.run()
    stage3.finalize()
    return paths, before, stage3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """:func:`train_stages` once for the module: ``(root, paths, before, stage3)``."""
    root = tmp_path_factory.mktemp("latent")
    return (root, *train_stages(root))


def test_each_stage_writes_its_weights_and_record(trained):
    root, _, _, _ = trained
    models = root / "bundle" / "models"
    for stage in ("autoencoder", "diffusion", "controlnet"):
        weights = torch.load(models / f"{stage}.pt", weights_only=True)
        record = json.loads((models / f"{stage}.json").read_text())
        assert record["settings"]["stage"] == stage and record["settings"]["bundle"] == BUNDLE
        assert record["weights_sha256"] == state_dict_sha256(weights)
        assert (models / f"{stage}_checkpoint.pt").is_file()
    diffusion = json.loads((models / "diffusion.json").read_text())
    assert diffusion["settings"]["modalities"] == MODALITIES and diffusion["objective"]["modality_dropout"] == 0.1
    assert diffusion["network"]["arguments"]["num_class_embeds"] == len(MODALITIES) + 1  # + the null class
    autoencoder = json.loads((models / "autoencoder.json").read_text())
    assert diffusion["settings"]["scale_factor"] == autoencoder["latent"]["scale_factor"]
    assert diffusion["settings"]["autoencoder_sha256"] == autoencoder["weights_sha256"]
    controlnet = json.loads((models / "controlnet.json").read_text())
    assert controlnet["settings"]["diffusion_sha256"] == diffusion["weights_sha256"]
    assert controlnet["objective"]["target_modality"] == "mr" and controlnet["objective"]["target_mix_ratio"] == 0.25
    assert trained_modalities(models / "diffusion.pt") == MODALITIES


def test_controlnet_stage_trains_the_controlnet_and_leaves_unet_and_autoencoder_unchanged(trained):
    root, _, before, stage3 = trained
    models = root / "bundle" / "models"
    for name, key in (("autoencoder", "autoencoder"), ("diffusion", "unet")):
        in_memory = stage3.parser.get_parsed_content(key).state_dict()
        assert all(torch.equal(v.cpu(), before[name][k]) for k, v in in_memory.items()), name
        on_disk = torch.load(models / f"{name}.pt", weights_only=True)
        assert state_dict_sha256(on_disk) == state_dict_sha256(before[name])
    # the ControlNet started from the UNet's encoder, and training moved it
    controlnet = torch.load(models / "controlnet.pt", weights_only=True)
    shared = [k for k in controlnet if k in before["diffusion"] and k.startswith("down_blocks")]
    assert shared and any(not torch.equal(controlnet[k], before["diffusion"][k]) for k in shared)
    optimizer = stage3.parser.get_parsed_content("optimizer")
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trainable == {id(p) for p in stage3.parser.get_parsed_content("controlnet").parameters()}


def test_target_mix_ratio_sets_the_sampling_weights_of_target_and_masked_entries(trained):
    _, _, _, stage3 = trained
    entries = stage3.parser.get_parsed_content("train#dataset#data")
    weights = stage3.parser.get_parsed_content("train#sampler").weights.tolist()
    target = [w for e, w in zip(entries, weights) if e["modality"] == "mr"]
    masked = [w for e, w in zip(entries, weights) if e["modality"] == "ct"]
    assert len(target) == len(masked) == 2
    assert sum(target) == pytest.approx(0.25) and sum(masked) == pytest.approx(0.75)
    assert all("label" not in e for e in entries if e["modality"] == "mr")  # target entries: empty masks


def run_inference(paths, output_dir, **overrides):
    settings = {"spatial_dims": 2, "image_size": [16, 16], "conditioning_channels": 8, **LATENT, **INFERENCE}
    run_bundle(BUNDLE, ["inference.yaml"], **paths, output_dir=str(output_dir), **{**settings, **overrides})


def test_inference_writes_one_seeded_mr_image_per_ct_mask_on_its_grid(trained, tmp_path):
    root, paths, _, _ = trained
    run_inference(paths, tmp_path / "a")
    run_inference(paths, tmp_path / "b")
    for k in range(2):
        mask = nib.load(str(root / "data" / "masks" / f"ct_mask{k}.nii.gz"))
        first = nib.load(str(tmp_path / "a" / f"ct_mask{k}_image.nii.gz"))
        again = nib.load(str(tmp_path / "b" / f"ct_mask{k}_image.nii.gz"))
        assert first.shape == MASK_SHAPE
        np.testing.assert_allclose(first.affine, mask.affine, atol=1e-5)
        assert np.isfinite(first.get_fdata()).all()
        np.testing.assert_array_equal(first.get_fdata(), again.get_fdata())  # same seed, same image
    assert len(list((tmp_path / "a").iterdir())) == 2


def test_inference_refuses_an_unknown_modality_before_sampling(trained, tmp_path):
    _, paths, _, _ = trained
    raises_with("'modality' must be one of 'ct', 'mr'; got 'pet'", run_inference, paths, tmp_path, modality="pet")
    assert not tmp_path.joinpath("ct_mask0_image.nii.gz").exists()


def test_inference_refuses_a_mask_in_another_voxel_orientation_than_the_training_images(trained, tmp_path):
    root, paths, _, _ = trained
    assert json.loads((root / "bundle" / "models" / "controlnet.json").read_text())["data"] == {"orientation": "RAS"}
    mask = nib.load(str(root / "data" / "masks" / "ct_mask0.nii.gz")).as_reoriented(np.array([[0, 1], [1, -1], [2, 1]]))
    folder = tmp_path / "masks"
    folder.mkdir()
    mask.to_filename(str(folder / "flipped.nii.gz"))  # the same mask, its second axis stored P -> A
    out = tmp_path / "out"
    raises_with(f"{folder / 'flipped.nii.gz'} (RPS)", run_inference, paths, out, mask_dir=str(folder))
    assert not out.exists()


def test_inference_refuses_weights_trained_with_other_settings(trained, tmp_path):
    _, paths, _, _ = trained
    error = raises_with("prediction_type: trained \"v_prediction\", configured \"epsilon\"", run_inference, paths,
                        tmp_path, prediction_type="epsilon")
    assert "diffusion.json" in str(error) and "--prediction_type v_prediction" in str(error)
    raises_with("conditioning_channels: trained 8, configured 4", run_inference, paths, tmp_path,
                conditioning_channels=4)  # not in the ControlNet's network record: a setting of its own


def test_stages_refuse_to_overwrite_and_resume_and_inference_refuses_a_controlnet_of_another_unet(trained, tmp_path):
    root, paths, _, _ = trained
    copy = tmp_path / "bundle"
    shutil.copytree(root / "bundle" / "models", copy / "models")
    paths = {**paths, "bundle_root": str(copy)}
    settings = {**paths, **COMMON, **LATENT, **TRAINING}
    raises_with("exist(s) from an earlier run", run_bundle, BUNDLE, ["train_diffusion.yaml"], run_id="training",
                max_epochs=3, **settings)
    raises_with("exist(s) from an earlier run", run_bundle, BUNDLE, ["train_controlnet.yaml"], run_id="training",
                max_epochs=2, **settings, **CONTROLNET)
    first = torch.load(copy / "models" / "diffusion_checkpoint.pt", weights_only=False)["trainer"]["iteration"]
    run_bundle(BUNDLE, ["train_diffusion.yaml"], run_id="training", max_epochs=3, resume=True, **settings)
    checkpoint = torch.load(copy / "models" / "diffusion_checkpoint.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] > first and checkpoint["record"]["training"]["epoch"] == 3
    # the UNet changed: the ControlNet trained on the earlier one is refused
    raises_with("diffusion_sha256: trained", run_inference, paths, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_refuses_an_image_grid_the_networks_cannot_halve_before_any_work(trained, tmp_path):
    _, paths, _, _ = trained
    paths = {**paths, "bundle_root": str(tmp_path / "bundle")}
    raises_with("every axis must be a multiple of 4", run_bundle, BUNDLE, ["train_diffusion.yaml"],
                run_id="training", max_epochs=1, **paths, **{**COMMON, "image_size": [18, 16]}, **LATENT)
    assert not (tmp_path / "bundle").exists()
    check_model_grid([16, 8], [8, 8], [8, 8])
    with pytest.raises(ConfigKeyError, match="found \\[18\\]"):
        check_model_grid([18, 16], [8, 8], [8, 8])


def stage_overrides(config, paths, output_dir):
    """The tiny settings of ``config`` (a stage or inference.yaml) for :func:`train_stages`'s ``paths``, writing
    under ``output_dir`` and allowed to replace an earlier run's files."""
    settings = {**paths, "output_dir": str(output_dir), **COMMON, "overwrite": True}
    if config == "train_autoencoder.yaml":
        return {**settings, **AUTOENCODER}
    settings = {**settings, **LATENT, **CONTROLNET}
    if config == "inference.yaml":
        settings = {**settings, **INFERENCE}
        for key in ("slices_per_volume", "val_interval", "target_modality", "target_mix_ratio"):
            settings.pop(key)
    return settings


@pytest.mark.parametrize("config, workflow_type", [("train_diffusion.yaml", "train"),
                                                    ("train_controlnet.yaml", "train"), ("inference.yaml", "infer")])
def test_check_properties_empty_for_each_stage(trained, tmp_path, config, workflow_type):
    _, paths, _, _ = trained
    settings = stage_overrides(config, paths, tmp_path)
    assert workflow_missing_properties(BUNDLE, [config], workflow_type, **settings) == []


# ---- the grid sampler (segdiff.engine.latent_inference) -----------------------------------------------------------
def tiny_models():
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                                num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False),
                                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 8),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
                              num_class_embeds=null_class(MODALITIES) + 1)
    with torch.no_grad():  # MONAI zero-initialises the output convolution: draw it, so the UNet's output matters
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return autoencoder, unet


def grid_sampler(autoencoder, seed=0, sampler="ddim", **kwargs):
    schedule = build_scheduler(sampler, num_train_timesteps=100, schedule="linear_beta", beta_start=1e-4,
                               beta_end=2e-2, prediction_type="epsilon", clip_sample=False)
    inner = LatentDiffusionSampler(autoencoder, 0.8, schedule, MODALITIES, modality="mr", num_inference_steps=2,
                                   seed=None)
    return LatentGridSampler(inner, spatial_dims=2, seed=seed, size_divisor=4, **kwargs)


def volume_masks(shape=(1, NUM_CLASSES, 12, 10, 3)):
    masks = torch.zeros(shape)
    masks[:, 0] = 1.0  # background everywhere: every slice gets the same mask
    return masks


def test_grid_sampler_gives_every_slice_its_own_noise_and_every_case_the_seed():
    autoencoder, unet = tiny_models()
    images = grid_sampler(autoencoder, image_size=(16, 16))(volume_masks((2, NUM_CLASSES, 12, 10, 3)), unet)
    assert images.shape == (2, 1, 12, 10, 3) and torch.isfinite(images).all()
    assert not torch.allclose(images[0, ..., 0], images[0, ..., 1])  # same mask, other noise
    torch.testing.assert_close(images[0], images[1])  # each case from the seed
    torch.testing.assert_close(grid_sampler(autoencoder, image_size=(16, 16))(volume_masks(), unet), images[:1])
    other = grid_sampler(autoencoder, seed=1, image_size=(16, 16))(volume_masks(), unet)
    assert not torch.allclose(other, images[:1])


def test_grid_sampler_samples_do_not_depend_on_batch_size():
    autoencoder, unet = tiny_models()
    one = grid_sampler(autoencoder, image_size=(16, 16), batch_size=1)(volume_masks(), unet)
    torch.testing.assert_close(grid_sampler(autoencoder, image_size=(16, 16), batch_size=3)(volume_masks(), unet), one)


def test_grid_sampler_draws_num_samples_different_images_per_mask():
    autoencoder, unet = tiny_models()
    three = grid_sampler(autoencoder, image_size=(16, 16), num_samples=3, batch_size=4)(volume_masks(), unet)
    assert three.shape == (1, 3, 12, 10, 3)
    assert not torch.allclose(three[:, 0], three[:, 1]) and not torch.allclose(three[:, 1], three[:, 2])
    again = grid_sampler(autoencoder, image_size=(16, 16), num_samples=3, batch_size=2)(volume_masks(), unet)
    torch.testing.assert_close(again, three)  # chunking does not change the samples


def test_grid_sampler_seeds_ddpm_step_noise_and_leaves_the_global_random_state_alone():
    autoencoder, unet = tiny_models()
    state = torch.random.get_rng_state()
    first = grid_sampler(autoencoder, sampler="ddpm", image_size=(16, 16), batch_size=2)(volume_masks(), unet)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = grid_sampler(autoencoder, sampler="ddpm", image_size=(16, 16), batch_size=2)(volume_masks(), unet)
    torch.testing.assert_close(again, first)
    assert not torch.allclose(first[..., 0], first[..., 1])


def test_grid_sampler_pads_to_the_size_divisor_without_image_size_and_crops_back():
    autoencoder, unet = tiny_models()
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    images = grid_sampler(autoencoder)(volume_masks((1, NUM_CLASSES, 13, 10)), unet)  # one 2D mask
    assert images.shape == (1, 1, 13, 10) and set(seen) == {(8, 6)}  # 16 x 12 image grid -> 8 x 6 latents


def test_grid_sampler_refuses_a_seeded_latent_sampler():
    autoencoder, _ = tiny_models()
    schedule = build_scheduler("ddim", num_train_timesteps=100, schedule="linear_beta", beta_start=1e-4,
                               beta_end=2e-2, prediction_type="epsilon", clip_sample=False)
    inner = LatentDiffusionSampler(autoencoder, 0.8, schedule, MODALITIES, seed=0)
    with pytest.raises(ConfigKeyError, match="seed None"):
        LatentGridSampler(inner)


def test_trained_modalities_need_the_unet_record(tmp_path):
    torch.save({}, tmp_path / "diffusion.pt")
    with pytest.raises(ModelMismatchError, match="modalities"):
        trained_modalities(tmp_path / "diffusion.pt")


def test_grid_sampler_runs_a_3d_model_on_whole_volumes_resized_or_padded():
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4), latent_channels=2,
                                num_res_blocks=1, norm_num_groups=2, attention_levels=(False, False),
                                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 4),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=2,
                              num_head_channels=4, num_class_embeds=null_class(MODALITIES) + 1)
    masks = volume_masks((1, NUM_CLASSES, 6, 8, 7))
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    schedule = build_scheduler("dpm_solver", num_train_timesteps=100, schedule="linear_beta", beta_start=1e-4,
                               beta_end=2e-2, prediction_type="v_prediction", clip_sample=False)
    inner = LatentDiffusionSampler(autoencoder, 0.8, schedule, MODALITIES, modality="ct", num_inference_steps=2,
                                   seed=None)
    padded = LatentGridSampler(inner, spatial_dims=3, size_divisor=4)(masks, unet)
    resized = LatentGridSampler(inner, spatial_dims=3, image_size=(8, 8, 8))(masks, unet)
    assert padded.shape == resized.shape == (1, 1, 6, 8, 7)
    assert set(seen) == {(4, 4, 4)} and torch.isfinite(padded).all() and torch.isfinite(resized).all()


def test_the_autoencoder_stage_checks_its_grid_alone():
    check_model_grid([12, 8], [8, 8, 8])  # two halvings: multiples of 4
    with pytest.raises(ConfigKeyError, match=r"multiple of 4 \(the autoencoder halves it 2 time\(s\).*found \[6\]"):
        check_model_grid([6, 8], [8, 8, 8], None, "roi_size")


def test_a_target_mix_ratio_outside_zero_to_one_is_refused_naming_the_key(trained, tmp_path):
    _, paths, _, _ = trained
    paths = {**paths, "bundle_root": str(tmp_path / "bundle")}
    raises_with("'target_mix_ratio' must be a number in [0.0, 1.0]; got 1.5", run_bundle, BUNDLE,
                ["train_controlnet.yaml"], run_id="training", max_epochs=1, **paths, **COMMON, **LATENT,
                target_mix_ratio=1.5)


def test_target_modality_null_trains_the_controlnet_on_masked_entries_only(trained, tmp_path):
    root, paths, _, _ = trained
    datalist = json.loads((root / "data" / "datalist.json").read_text())
    for split in ("training", "validation"):  # a one-source set: CT entries only, every one with its mask
        datalist[split] = [e for e in datalist[split] if e["modality"] == "ct"]
    ct_only = tmp_path / "ct_only.json"
    ct_only.write_text(json.dumps(datalist))
    copy = tmp_path / "bundle"
    (copy / "models").mkdir(parents=True)
    for name in ("autoencoder", "diffusion"):
        for suffix in (".pt", ".json"):
            shutil.copy(root / "bundle" / "models" / f"{name}{suffix}", copy / "models")
    settings = {**paths, "bundle_root": str(copy), "datalist": str(ct_only), **COMMON, **LATENT, **TRAINING,
                **CONTROLNET, "target_modality": "none"}  # the command line's null (monai.bundle drops a None)
    raises_with("'training entries of target_modality 'none'' must be at least 1 (target_mix_ratio > 0 draws them; "
                "with target_modality null or none set target_mix_ratio 0); got 0", run_bundle, BUNDLE,
                ["train_controlnet.yaml"], run_id="training", max_epochs=1, **settings)
    assert not (copy / "models" / "controlnet.pt").exists()
    stage = workflow("train_controlnet.yaml", max_epochs=1, **{**settings, "target_modality": None,
                                                               "target_mix_ratio": 0.0})
    stage.initialize()
    entries = stage.parser.get_parsed_content("train#dataset#data")
    assert len(entries) == 2 and all("label" in e for e in entries)  # every mask kept
    assert stage.parser.get_parsed_content("train#sampler").weights.tolist() == pytest.approx([0.5, 0.5])
    assert stage.parser.get_parsed_content("grid_modality") == "ct"  # the sample grids: the first modality
    stage.run()
    stage.finalize()
    record = json.loads((copy / "models" / "controlnet.json").read_text())
    assert record["objective"]["target_modality"] is None and record["objective"]["target_mix_ratio"] == 0.0
