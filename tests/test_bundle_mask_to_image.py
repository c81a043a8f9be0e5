"""End-to-end runs of the mask_to_image bundle with tiny networks: train, resume, infer, evaluate, in 2D, 3D and 2D over
3D, plus the runs that must stop with a clear message before any work starts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import (
    TINY_NETWORK,
    TINY_TRAINING,
    TORCHRUN_TWO_PROCESSES,
    missing_properties,
    raises_with,
    run_bundle,
    run_bundle_cli,
    write_dataset,
)

BUNDLE = "mask_to_image"
pytestmark = pytest.mark.slow


def settings(data_root, bundle_root, network=True, **extra):
    """Overrides shared by the runs; ``network=False`` for evaluate.yaml, which has no diffusion network."""
    return dict(
        dataset_dir=str(data_root),
        bundle_root=str(bundle_root),
        num_classes=3,
        image_size=[16, 16],
        **(TINY_NETWORK if network else {}),
        **extra,
    )


def train(data_root, bundle_root, **extra):
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **settings(data_root, bundle_root, **TINY_TRAINING, **extra))


def assert_on_mask_grid(output_path, mask_path):
    out, mask = nib.load(str(output_path)), nib.load(str(mask_path))
    assert out.shape == mask.shape
    np.testing.assert_allclose(out.affine, mask.affine, atol=1e-5)
    assert np.isfinite(out.get_fdata()).all()


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """A 2D model trained for 1 epoch on slices of 3D volumes, then resumed to 2 epochs."""
    root = tmp_path_factory.mktemp("m2i_2d")
    write_dataset(root / "data")
    train(root / "data", root / "bundle", max_epochs=1)
    first = torch.load(root / "bundle" / "models" / "checkpoint.pt", weights_only=False)
    train(root / "data", root / "bundle", max_epochs=2, resume=True)
    return root, first


def test_training_writes_ema_weights_checkpoint_and_tensorboard(trained_2d):
    root, first = trained_2d
    models = root / "bundle" / "models"
    weights = torch.load(models / "model.pt", weights_only=True)
    network_keys = set(torch.load(models / "checkpoint.pt", weights_only=False)["network"])
    assert set(weights) == network_keys  # model.pt is a plain state dict of network_def
    assert first["trainer"]["iteration"] == first["trainer"]["epoch_length"]  # saved after epoch 1
    assert not list(models.glob(".*tmp*")), "no temporary files may remain after an atomic save"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    for events in (root / "bundle" / "outputs" / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert {"train_loss", "lr", "val_loss"} <= tags["scalars"]
    assert any(tag.startswith("samples") for tag in tags["images"])  # the mask | generated | real grid


def test_resume_continues_from_the_saved_epoch(trained_2d):
    root, first = trained_2d
    checkpoint = torch.load(root / "bundle" / "models" / "checkpoint.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"]
    # the resumed run trained on: the weights moved on from the first epoch's
    changed = [not torch.equal(checkpoint["network"][k], first["network"][k]) for k in first["network"]]
    assert any(changed)


def test_training_refuses_to_overwrite_an_earlier_run(trained_2d):
    root, _ = trained_2d
    raises_with("checkpoint.pt exist(s) from an earlier run", train, root / "data", root / "bundle", max_epochs=3)


def test_inference_2d_model_over_3d_volumes_writes_images_on_the_mask_grid(trained_2d):
    root, _ = trained_2d
    out = root / "bundle" / "generated"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(root / "data", root / "bundle", output_dir=str(out), num_inference_steps=3, num_samples=2))
    datalist = json.loads((root / "data" / "datalist.json").read_text())
    for entry in datalist["test"]:
        name = entry["label"].split("/")[-1][: -len(".nii.gz")]
        for k in range(2):
            assert_on_mask_grid(out / f"{name}_sample{k}_image.nii.gz", root / "data" / entry["label"])
        a = nib.load(str(out / f"{name}_sample0_image.nii.gz")).get_fdata()
        b = nib.load(str(out / f"{name}_sample1_image.nii.gz")).get_fdata()
        assert np.abs(a - b).mean() > 1e-3, "the samples of one mask must differ"


def test_inference_is_reproducible_for_a_seed_and_refuses_to_overwrite(trained_2d):
    root, _ = trained_2d
    outs = []
    for name in ("seeded_a", "seeded_b"):
        out = root / "bundle" / name
        run_bundle(BUNDLE, ["inference.yaml"], **settings(root / "data", root / "bundle", output_dir=str(out), num_inference_steps=3, sampler="ddpm", seed=7))
        outs.append(sorted(out.glob("*.nii.gz")))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(nib.load(str(a)).get_fdata(), nib.load(str(b)).get_fdata())
    raises_with("already exist", run_bundle, BUNDLE, ["inference.yaml"], **settings(root / "data", root / "bundle", output_dir=str(root / "bundle" / "seeded_a")))


def test_inference_options_drop_classes_and_strength_from_a_mask_folder(trained_2d):
    root, _ = trained_2d
    out = root / "bundle" / "strength"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(root / "data", root / "bundle", output_dir=str(out), num_inference_steps=10, strength=0.3, drop_classes=[2]))
    assert len(list(out.glob("*_image.nii.gz"))) == 2
    folder_out = root / "bundle" / "from_folder"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(root / "data", root / "bundle", output_dir=str(folder_out), num_inference_steps=2, mask_dir=str(root / "data" / "labels")))
    assert len(list(folder_out.glob("*_image.nii.gz"))) == 6  # every mask of the folder


def test_evaluate_reports_faithfulness_and_ceiling(trained_2d):
    root, _ = trained_2d
    out = root / "bundle" / "for_eval"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(root / "data", root / "bundle", output_dir=str(out), num_inference_steps=2))
    report_dir = root / "bundle" / "report"
    run_bundle(BUNDLE, ["evaluate.yaml"], **settings(root / "data", root / "bundle", network=False, output_dir=str(out), report_dir=str(report_dir), segmenter_epochs=2, num_workers=0))
    report = json.loads((report_dir / "faithfulness.json").read_text())
    assert report["generated"]["num_images"] == 2 and report["real"]["num_images"] == 2
    for source in ("generated", "real"):
        values = [v for v in report[source]["per_class_dice"].values() if v is not None]
        assert values and all(0.0 <= v <= 1.0 for v in values)
    assert "| generated (faithfulness) |" in (report_dir / "faithfulness.md").read_text()
    assert (root / "bundle" / "models" / "segmenter.pt").exists()


def test_3d_model_trains_and_generates_volumes_on_the_mask_grid(tmp_path):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    extra = {"spatial_dims": 3, "image_size": [8, 16, 16]}
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **{**settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING), **extra})
    run_bundle(BUNDLE, ["inference.yaml"], **{**settings(tmp_path / "data", tmp_path / "b", num_inference_steps=2), **extra})
    outputs = sorted((tmp_path / "b" / "outputs" / "generated").glob("*_image.nii.gz"))
    assert len(outputs) == 2
    assert_on_mask_grid(outputs[0], tmp_path / "data" / "labels" / "case4.nii.gz")


def test_3d_model_trained_on_random_crops_generates_at_native_size(tmp_path):
    """roi_size: training on random crops at native resolution, sampling on the whole volume (padded to a size
    the network can halve, then cropped back)."""
    write_dataset(tmp_path / "data", shape=(13, 16, 10))
    extra = {"spatial_dims": 3, "image_size": [8, 8, 8], "roi_size": [8, 8, 8]}
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **{**settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING), **extra})
    run_bundle(BUNDLE, ["inference.yaml"], **{**settings(tmp_path / "data", tmp_path / "b", num_inference_steps=2), **extra})
    outputs = sorted((tmp_path / "b" / "outputs" / "generated").glob("*_image.nii.gz"))
    assert len(outputs) == 2
    assert_on_mask_grid(outputs[0], tmp_path / "data" / "labels" / "case4.nii.gz")


def test_2d_files_and_multichannel_images(tmp_path):
    """2D NIfTI image/label pairs as they are, with 2 image channels (e.g. two MRI sequences)."""
    write_dataset(tmp_path / "data", shape=(20, 24), image_channels=2)
    extra = dict(image_channels=2, slices_per_volume=2)
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **{**settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING), **extra})
    run_bundle(BUNDLE, ["inference.yaml"], **settings(tmp_path / "data", tmp_path / "b", num_inference_steps=2, image_channels=2))
    output = tmp_path / "b" / "outputs" / "generated" / "case4_image.nii.gz"
    image = nib.load(str(output))
    assert image.shape[:2] == (20, 24) and image.shape[-1] == 2 and image.ndim in (3, 4)  # channels last
    np.testing.assert_allclose(image.affine, nib.load(str(tmp_path / "data" / "labels" / "case4.nii.gz")).affine, atol=1e-5)


def test_png_data_in_the_seg_guided_diffusion_layout(tmp_path):
    """DATA/{train,val,test}/*.png with masks in MASK/all/{train,val,test}: datalist, training and inference."""
    from PIL import Image

    from segdiff.data.datalist import build_datalist, save_datalist

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1), ("test", 1)):
        (tmp_path / "DATA" / split).mkdir(parents=True)
        (tmp_path / "MASK" / "all" / split).mkdir(parents=True)
        for k in range(count):
            mask = np.zeros((24, 20), np.uint8)
            mask[4 + k : 18, 3:15] = 1
            mask[8:12, 6 + k : 12] = 2
            image = np.clip(mask * 90 + rng.normal(40, 8, mask.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "DATA" / split / f"{split}{k}.png")
            Image.fromarray(mask).save(tmp_path / "MASK" / "all" / split / f"{split}{k}.png")
    save_datalist(build_datalist(str(tmp_path)), str(tmp_path / "datalist.json"))
    common = settings(tmp_path, tmp_path / "b")
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **common, max_epochs=1, **{**TINY_TRAINING, "slices_per_volume": 1})
    run_bundle(BUNDLE, ["inference.yaml"], **common, num_inference_steps=2)
    from monai.transforms import LoadImage

    output = nib.load(str(tmp_path / "b" / "outputs" / "generated" / "test0_image.nii.gz"))
    mask = LoadImage(image_only=True)(str(tmp_path / "MASK" / "all" / "test" / "test0.png"))
    assert output.shape == tuple(mask.shape)  # the mask's grid as MONAI's PNG reader sees it


def test_unconditional_model_num_classes_0(tmp_path):
    write_dataset(tmp_path / "data")
    common = settings(tmp_path / "data", tmp_path / "b")
    common["num_classes"] = 0
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **common, max_epochs=1, **TINY_TRAINING)
    run_bundle(BUNDLE, ["inference.yaml"], **{**common, "num_inference_steps": 2, "mask_dir": str(tmp_path / "data" / "labels")})
    assert len(list((tmp_path / "b" / "outputs" / "generated").glob("*_image.nii.gz"))) == 6


def test_mni_demo_data_end_to_end(tmp_path):
    pytest.importorskip("nilearn", reason="the demo extra (nilearn) is part of the test extra")
    from segdiff.data.demo import write_demo_data

    write_demo_data(tmp_path / "demo")
    common = dict(dataset_dir=str(tmp_path / "demo"), bundle_root=str(tmp_path / "b"), num_classes=4, image_size=[32, 32])
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **common, **TINY_NETWORK, max_epochs=1, **TINY_TRAINING)
    run_bundle(BUNDLE, ["inference.yaml"], **common, **TINY_NETWORK, num_inference_steps=2)
    run_bundle(BUNDLE, ["evaluate.yaml"], **common, segmenter_epochs=1, num_workers=0)
    report = json.loads((tmp_path / "b" / "outputs" / "evaluation" / "faithfulness.json").read_text())
    assert report["classes"] == ["CSF", "grey matter", "white matter"]
    for entry in json.loads((tmp_path / "demo" / "datalist.json").read_text())["test"]:
        name = entry["label"].split("/")[-1][: -len(".nii.gz")]
        assert_on_mask_grid(tmp_path / "b" / "outputs" / "generated" / f"{name}_image.nii.gz", tmp_path / "demo" / entry["label"])


def test_check_properties_empty_for_train_and_inference(trained_2d):
    root, _ = trained_2d
    overrides = settings(root / "data", root / "bundle", output_dir=str(root / "bundle" / "properties"), resume=True)
    assert missing_properties(BUNDLE, **overrides) == {"train.yaml": [], "inference.yaml": []}


def test_multi_gpu_config_runs_with_two_gloo_processes_on_cpu(tmp_path):
    write_dataset(tmp_path / "data")
    done = run_bundle_cli(
        BUNDLE,
        ["train.yaml", "multi_gpu_train.yaml"],
        run_id="training",
        launcher=TORCHRUN_TWO_PROCESSES,
        **settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "b" / "models" / "model.pt").exists()
    trainer_state = torch.load(tmp_path / "b" / "models" / "checkpoint.pt", weights_only=False)["trainer"]
    assert trainer_state["iteration"] == trainer_state["epoch_length"]


@pytest.mark.parametrize(
    "break_data, message",
    [
        ("label_out_of_range", "expected class indices in [0, 3)"),
        ("shape_mismatch", "shape"),
        ("missing_file", "case1.nii.gz"),
        ("nan_image", "NaN"),
    ],
)
def test_bad_training_data_stops_before_training_with_the_file_named(tmp_path, break_data, message):
    write_dataset(tmp_path / "data")
    broken = tmp_path / "data" / "images" / "case1.nii.gz"
    label = tmp_path / "data" / "labels" / "case1.nii.gz"
    reference = nib.load(str(label))
    if break_data == "label_out_of_range":
        data = np.asarray(reference.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, reference.affine), str(label))
    elif break_data == "shape_mismatch":
        nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), reference.affine), str(broken))
    elif break_data == "missing_file":
        broken.unlink()
    else:
        data = np.asarray(nib.load(str(broken)).dataobj).copy()
        data[1, 1, 1] = np.nan
        nib.save(nib.Nifti1Image(data, reference.affine), str(broken))
    done = run_bundle_cli(BUNDLE, ["train.yaml"], run_id="training", **settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_TRAINING))
    assert done.returncode != 0
    assert "case1.nii.gz" in done.stderr and message in done.stderr
    assert not (tmp_path / "b" / "models" / "checkpoint.pt").exists()


def test_inference_without_weights_says_so(tmp_path):
    write_dataset(tmp_path / "data")
    done = run_bundle_cli(BUNDLE, ["inference.yaml"], **settings(tmp_path / "data", tmp_path / "b"))
    assert done.returncode != 0 and "no trained weights" in done.stderr
