"""latent_mask_to_image's synthesize.yaml (inference.yaml + synthesize.yaml) on the tiny trained models of
tests/test_bundle_latent.py: CT masks -> judged MR pairs on each mask's grid, resumable, shared by torchrun ranks; and
its generator and mask list (segdiff.synthesis.latent_generator)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, TINY_NETWORK, raises_with, run_bundle
from monai.networks.nets import UNet
from test_bundle_latent import BUNDLE, INFERENCE, LATENT, NUM_CLASSES, grid_sampler, tiny_models, train_stages

from segdiff.data.datalist import DatalistError
from segdiff.synthesis import LatentGenerator, source_mask_entries

CONFIGS = ["inference.yaml", "synthesize.yaml"]
#: a tiny judge UNet (synthesize.yaml's judge_* keys)
JUDGE = {"judge_channels": [4, 8], "judge_strides": [2], "judge_num_res_units": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The three stages trained once, and an untrained (seeded) judge UNet in the bundle's models/judge.pt."""
    root = tmp_path_factory.mktemp("latent_synthesis")
    paths, _, _ = train_stages(root)
    torch.manual_seed(0)
    judge = UNet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, channels=JUDGE["judge_channels"],
                 strides=JUDGE["judge_strides"], num_res_units=JUDGE["judge_num_res_units"])
    torch.save(judge.state_dict(), root / "bundle" / "models" / "judge.pt")
    return root, paths


def synthesis_settings(paths, output_dir, **extra):
    """Two CT training masks (16 x 16 x 4), two MR images per round, every pair passing (thresholds 0)."""
    return {**paths, "output_dir": str(output_dir), "spatial_dims": 2, "image_size": [16, 16],
            "conditioning_channels": 8, **LATENT, **INFERENCE, **JUDGE, "samples_per_mask": 2,
            "max_tries_per_mask": 4, "keep_k": 2, "min_class_dice": 0.0, "min_mean_dice": 0.0, "judge_batch_size": 4,
            **extra}


def test_synthesis_writes_judged_mr_pairs_on_each_ct_masks_grid(trained, tmp_path):
    root, paths = trained
    out = tmp_path / "syn"
    run_bundle(BUNDLE, CONFIGS, **synthesis_settings(paths, out))
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) == 4  # two masks x keep_k
    assert datalist["labels"] == {"0": "background", "1": "liver", "2": "lesion"}
    by_mask = {}
    for entry in datalist["training"]:
        image, label = nib.load(str(out / entry["image"])), nib.load(str(out / entry["label"]))
        mask = nib.load(entry["mask"])
        assert entry["mask"].endswith(("labels/ct0.nii.gz", "labels/ct1.nii.gz"))  # CT masks only, no MR entry
        assert image.shape == label.shape == mask.shape == (16, 16, 4)
        np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(mask.dataobj))  # no deformation asked
        assert np.isfinite(image.get_fdata()).all()
        by_mask.setdefault(entry["mask"], []).append(image.get_fdata())
    for first, second in by_mask.values():  # the two samples of one round: their own noise
        assert not np.allclose(first, second)
    tries = json.loads((out / "tries.json").read_text())
    settings = tries["settings"]
    assert settings["modality"] == "mr" and settings["judge"]["kind"] == "unet"
    assert set(settings["generator"]["sha256"]) == {"autoencoder", "diffusion", "controlnet"}
    assert len(tries["tries"]) == 4  # stop_early: both samples of the first round passed


def test_pairs_the_judge_disagrees_with_are_not_kept(trained, tmp_path):
    _, paths = trained
    out = tmp_path / "syn"  # an untrained judge cannot reach Dice 0.99 on every class, even relaxed once
    run_bundle(BUNDLE, CONFIGS, **synthesis_settings(paths, out, min_class_dice=0.99, min_mean_dice=0.99,
                                                     max_relax_steps=1, max_tries_per_mask=2))
    assert json.loads((out / "datalist.json").read_text())["training"] == []
    tries = json.loads((out / "tries.json").read_text())["tries"]
    assert len(tries) == 4 and not any(t["kept"] for t in tries) and all(t["reason"] for t in tries)
    assert not list((out / "images").glob("*.nii.gz"))


def test_a_rerun_resumes_and_other_settings_are_refused(trained, tmp_path):
    _, paths = trained
    out = tmp_path / "syn"
    settings = synthesis_settings(paths, out, max_tries_per_mask=2, keep_k=1)
    run_bundle(BUNDLE, CONFIGS, **settings)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    tries = json.loads((out / "tries.json").read_text())
    run_bundle(BUNDLE, CONFIGS, **settings)  # every mask finished: nothing generated or rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == written
    assert json.loads((out / "tries.json").read_text()) == tries
    other = {**settings, "guidance_scale": 2.0}
    raises_with("guidance_scale: 1.0 there, 2.0 now", run_bundle, BUNDLE, CONFIGS, **other)


def test_torchrun_ranks_write_what_one_process_writes(trained, tmp_path, monkeypatch):
    _, paths = trained
    single = tmp_path / "single"
    run_bundle(BUNDLE, CONFIGS, **synthesis_settings(paths, single, keep_k=1))
    shared = tmp_path / "shared"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # the two processes of torchrun --nproc_per_node=2, one after the other
        monkeypatch.setenv("RANK", rank)
        run_bundle(BUNDLE, CONFIGS, **synthesis_settings(paths, shared, keep_k=1))
    records = [json.loads((folder / "datalist.json").read_text()) for folder in (single, shared)]
    assert records[0] == records[1] and len(records[0]["training"]) == 2
    for entry in records[0]["training"]:
        one, two = (nib.load(str(folder / entry["image"])).get_fdata() for folder in (single, shared))
        np.testing.assert_array_equal(one, two)


def test_synthesis_without_judge_weights_says_how_to_get_them(trained, tmp_path):
    _, paths = trained
    settings = synthesis_settings(paths, tmp_path / "syn", judge_path=str(tmp_path / "missing.pt"))
    raises_with("train a MONAI UNet segmenter of the target modality", run_bundle, BUNDLE, CONFIGS, **settings)
    assert not (tmp_path / "syn" / "images").exists()


def test_synthesis_with_an_image_to_mask_judge(trained, tmp_path):
    from monai.networks.nets import DiffusionModelUNet

    _, paths = trained
    torch.manual_seed(1)
    tiny = {k.split("#")[1]: v for k, v in TINY_NETWORK.items()}
    segmenter = DiffusionModelUNet(spatial_dims=2, in_channels=NUM_CLASSES + 1, out_channels=NUM_CLASSES, **tiny)
    (tmp_path / "i2m" / "models").mkdir(parents=True)
    torch.save(segmenter.state_dict(), tmp_path / "i2m" / "models" / "model.pt")
    judge_overrides = {"bundle_root": str(tmp_path / "i2m"), "num_members": 2, "num_inference_steps": 2,
                       **TINY_NETWORK, "condition_encoder": False, "prediction_type": "v_prediction"}
    out = tmp_path / "syn"
    run_bundle(BUNDLE, CONFIGS, **synthesis_settings(paths, out, judge="image_to_mask", keep_k=1,
                                                     judge_bundle=str(BUNDLES / "image_to_mask"),
                                                     judge_overrides=judge_overrides))
    tries = json.loads((out / "tries.json").read_text())
    assert len(tries["masks"]) == 2 and tries["settings"]["judge"]["kind"] == "image_to_mask"


# ---- the generator and the mask list -------------------------------------------------------------------------------
def test_generator_draws_num_samples_seeded_images_on_the_masks_grid(tmp_path):
    autoencoder, unet = tiny_models()
    weights = {"unet": str(tmp_path / "unet.pt")}
    torch.save(unet.state_dict(), weights["unet"])
    generator = LatentGenerator(unet, grid_sampler(autoencoder, image_size=(16, 16)), weights)
    mask = torch.zeros(NUM_CLASSES, 12, 10, 3)
    mask[0] = 1.0
    images = generator(mask, 3, seed=5)
    assert images.shape == (3, 1, 12, 10, 3) and not torch.allclose(images[0], images[1])
    torch.testing.assert_close(generator(mask, 3, seed=5), images)
    assert not torch.allclose(generator(mask, 3, seed=6), images)
    assert set(generator.describe()["sha256"]) == {"unet"}
    with pytest.raises(ValueError, match="starts from noise only"):
        generator(mask, 1, seed=5, initial=torch.zeros(1, 12, 10, 3))


def test_source_masks_are_the_labelled_entries_of_the_other_modalities(tmp_path):
    datalist = {"modalities": {"ct": 0, "mr": 1, "pet": 2}, "training": [
        {"image": "a.nii.gz", "label": "a_label.nii.gz", "modality": "ct"},
        {"image": "b.nii.gz", "modality": "mr"},
        {"image": "c.nii.gz", "label": "c_label.nii.gz", "modality": "mr"},  # MR labels for scoring: not masks
        {"image": "d.nii.gz", "label": "d_label.nii.gz", "modality": "pet"},
    ]}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    path = str(tmp_path / "datalist.json")
    names = [e["label"].rsplit("/", 1)[1] for e in source_mask_entries(path, str(tmp_path), "training",
                                                                       exclude_modality="mr")]
    assert names == ["a_label.nii.gz", "d_label.nii.gz"]
    only_ct = source_mask_entries(path, str(tmp_path), "training", modality="ct")
    assert only_ct == [{"label": str(tmp_path / "a_label.nii.gz")}]
    with pytest.raises(DatalistError, match="no entry of split 'training' has a 'label' and modality 'xr'"):
        source_mask_entries(path, str(tmp_path), "training", modality="xr")
