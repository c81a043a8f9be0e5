"""End-to-end runs of the image_to_mask bundle with tiny networks: train (with ensemble-Dice validation), resume,
segment with uncertainty, in 2D over 3D and in 3D, plus inputs that must be refused."""

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

BUNDLE = "image_to_mask"
pytestmark = pytest.mark.slow
TINY_ENSEMBLE = {**TINY_TRAINING, "num_members": 2, "num_inference_steps": 2, "num_val_cases": 1}


def settings(data_root, bundle_root, **extra):
    return dict(dataset_dir=str(data_root), bundle_root=str(bundle_root), num_classes=3, image_size=[16, 16], **TINY_NETWORK, **extra)


def train(data_root, bundle_root, **extra):
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **settings(data_root, bundle_root, **{**TINY_ENSEMBLE, **extra}))


def check_outputs(out_dir, data_root, name, num_classes=3, num_members=None):
    image = nib.load(str(data_root / "labels" / f"{name}.nii.gz"))
    seg = nib.load(str(out_dir / f"{name}_seg.nii.gz"))
    uncertainty = nib.load(str(out_dir / f"{name}_uncertainty.nii.gz"))
    for output in (seg, uncertainty):
        assert output.shape == image.shape
        np.testing.assert_allclose(output.affine, image.affine, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.min() >= 0 and labels.max() < num_classes
    values = uncertainty.get_fdata()
    assert np.isfinite(values).all() and values.min() >= 0
    if num_members:
        members = nib.load(str(out_dir / f"{name}_members.nii.gz"))
        assert members.shape == (*image.shape, num_members)
        prob = nib.load(str(out_dir / f"{name}_prob.nii.gz")).get_fdata()
        assert prob.shape == (*image.shape, num_classes)
        np.testing.assert_allclose(prob.sum(axis=-1), 1.0, atol=1e-4)
        return labels, values, np.asarray(members.dataobj)
    return labels, values, None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2m")
    write_dataset(root / "data")
    train(root / "data", root / "bundle", max_epochs=1)
    train(root / "data", root / "bundle", max_epochs=2, resume=True)
    return root


def test_training_keeps_the_best_validation_model_and_a_resumable_checkpoint(trained):
    models = trained / "bundle" / "models"
    weights = torch.load(models / "model.pt", weights_only=True)
    checkpoint = torch.load(models / "checkpoint.pt", weights_only=False)
    assert set(weights) == set(checkpoint["ema_network"])  # model.pt: the EMA network's weights
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"]  # resumed to epoch 2


def test_segmentation_with_uncertainty_members_and_probabilities_on_the_image_grid(trained):
    out = trained / "bundle" / "segs"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(trained / "data", trained / "bundle", output_dir=str(out), num_members=3, num_inference_steps=3, save_members=True, save_probabilities=True))
    datalist = json.loads((trained / "data" / "datalist.json").read_text())
    for entry in datalist["test"]:
        name = entry["label"].split("/")[-1][: -len(".nii.gz")]
        labels, uncertainty, members = check_outputs(out, trained / "data", name, num_members=3)
        disagree = (members != members[..., :1]).any(axis=-1)
        assert disagree.any() and (~disagree).any(), "a barely trained ensemble agrees on some voxels, not all"
        # where members differ the uncertainty is higher than where they agree
        assert uncertainty[disagree].mean() > uncertainty[~disagree].mean()


def test_evaluate_scores_fused_and_single_member_with_uncertainty_auroc_and_calibration(trained):
    out = trained / "bundle" / "for_eval"
    common = settings(trained / "data", trained / "bundle", output_dir=str(out))
    raises_with("inference output(s) missing", run_bundle, BUNDLE, ["evaluate.yaml"], **{k: v for k, v in common.items() if not k.startswith("network_def")})
    run_bundle(BUNDLE, ["inference.yaml"], **common, num_members=3, num_inference_steps=2, save_probabilities=True, save_members=True)
    report_dir = trained / "bundle" / "report"
    evaluate = {k: v for k, v in common.items() if not k.startswith("network_def") and k != "image_size"}
    run_bundle(BUNDLE, ["evaluate.yaml"], **evaluate, report_dir=str(report_dir))
    report = json.loads((report_dir / "ensemble_evaluation.json").read_text())
    assert report["fused"]["num_cases"] == 2 and report["single_member"]["num_cases"] == 2
    dice = report["fused"]["dice"]["per_class"]
    assert len(dice) == 2 and all(v is None or 0.0 <= v <= 1.0 for v in dice)
    assert report["fused"]["ece"]["mean"] is not None and 0.0 <= report["fused"]["ece"]["mean"] <= 1.0
    auroc = report["fused"]["auroc"]["mean"]
    assert auroc is None or 0.0 <= auroc <= 1.0
    table = (report_dir / "ensemble_evaluation.md").read_text()
    assert "| fused ensemble |" in table and "| single member |" in table


def test_unet_baseline_trains_for_a_wall_time_and_is_scored_by_the_same_evaluation(tmp_path):
    write_dataset(tmp_path / "data", shape=(20, 16, 16))
    common = dict(dataset_dir=str(tmp_path / "data"), bundle_root=str(tmp_path / "b"), num_classes=3, image_size=[16, 16])
    run_bundle(BUNDLE, ["train.yaml", "train_baseline.yaml"], run_id="training", **common, max_wall_time=3, batch_size=8, slices_per_volume=4, num_workers=0, warmup_steps=2)
    assert (tmp_path / "b" / "models" / "baseline.pt").exists() and not (tmp_path / "b" / "models" / "model.pt").exists()
    run_bundle(BUNDLE, ["inference.yaml", "inference_baseline.yaml"], **common)
    out = tmp_path / "b" / "outputs" / "segmentations_baseline"
    check_outputs(out, tmp_path / "data", "case4")
    run_bundle(BUNDLE, ["evaluate.yaml"], dataset_dir=common["dataset_dir"], bundle_root=common["bundle_root"], num_classes=3, output_dir=str(out), report_dir=str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "ensemble_evaluation.json").read_text())
    assert report["fused"]["num_cases"] == 2 and "single_member" not in report  # a UNet has no members


@pytest.mark.parametrize("fusion, uncertainty", [("vote", "disagreement"), ("staple", "mutual_information"), ("mean", "variance")])
def test_every_fusion_and_uncertainty_runs_through_the_bundle(trained, fusion, uncertainty):
    out = trained / "bundle" / f"{fusion}_{uncertainty}"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(trained / "data", trained / "bundle", output_dir=str(out), fusion=fusion, uncertainty=uncertainty, num_members=3, num_inference_steps=2))
    check_outputs(out, trained / "data", "case4")


def test_inference_refuses_to_overwrite(trained):
    out = trained / "bundle" / "twice"
    common = settings(trained / "data", trained / "bundle", output_dir=str(out), num_inference_steps=2, num_members=2)
    run_bundle(BUNDLE, ["inference.yaml"], **common)
    raises_with("already exist", run_bundle, BUNDLE, ["inference.yaml"], **common)


def test_3d_model_segments_volumes(tmp_path):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    extra = {"spatial_dims": 3, "image_size": [8, 16, 16]}
    run_bundle(BUNDLE, ["train.yaml"], run_id="training", **{**settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_ENSEMBLE), **extra})
    run_bundle(BUNDLE, ["inference.yaml"], **{**settings(tmp_path / "data", tmp_path / "b", num_inference_steps=2, num_members=2), **extra})
    check_outputs(tmp_path / "b" / "outputs" / "segmentations", tmp_path / "data", "case4")


def test_check_properties_empty_for_train_and_inference(trained):
    overrides = settings(trained / "data", trained / "bundle", output_dir=str(trained / "bundle" / "properties"), resume=True)
    assert missing_properties(BUNDLE, **overrides) == {"train.yaml": [], "inference.yaml": []}


def test_multi_gpu_config_runs_with_two_gloo_processes_on_cpu(tmp_path):
    write_dataset(tmp_path / "data")
    done = run_bundle_cli(BUNDLE, ["train.yaml", "multi_gpu_train.yaml"], run_id="training", launcher=TORCHRUN_TWO_PROCESSES,
                          **settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_ENSEMBLE))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "b" / "models" / "model.pt").exists() and (tmp_path / "b" / "models" / "checkpoint.pt").exists()


def test_wrong_channel_count_stops_before_training(tmp_path):
    write_dataset(tmp_path / "data")
    done = run_bundle_cli(BUNDLE, ["train.yaml"], run_id="training", **settings(tmp_path / "data", tmp_path / "b", image_channels=2, max_epochs=1, **TINY_TRAINING))
    assert done.returncode != 0
    assert "expected 2 image channel(s), found 1" in done.stderr and "case0.nii.gz" in done.stderr
