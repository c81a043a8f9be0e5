"""End-to-end runs of the image_to_mask bundle with tiny networks: train (with ensemble-Dice validation), resume,
segment with uncertainty, in 2D over 3D and in 3D, plus inputs that must be refused."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import (
    BUNDLES,
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
BUNDLES_DIR = BUNDLES / BUNDLE / "configs"
pytestmark = pytest.mark.slow
#: a tiny condition encoder (encoder_def, also the baseline UNet)
TINY_ENCODER = {"encoder_def#channels": [8, 8], "encoder_def#strides": [2], "encoder_def#num_res_units": 0}
TINY_ENSEMBLE = {**TINY_TRAINING, "num_members": 2, "num_inference_steps": 2, "num_val_cases": 1}
#: the model of earlier releases: plain diffusion (no condition encoder), v-prediction, MSE only
PLAIN_DIFFUSION = {"condition_encoder": False, "x0_loss_weight": 0.0, "recycling": False, "prediction_type": "v_prediction"}


def settings(data_root, bundle_root, **extra):
    """The bundle's defaults (condition encoder, x0 loss) at tiny sizes, but v-prediction without recycling: a tiny model
    trained for 2 epochs to predict the mask still returns its zero-initialised output layer's constant, so its
    members would not differ (the recycling test and the encoder test train the default objective); plus ``extra``."""
    return dict(dataset_dir=str(data_root), bundle_root=str(bundle_root), num_classes=3, image_size=[16, 16],
                **{**TINY_NETWORK, **TINY_ENCODER, "prediction_type": "v_prediction", "recycling": False, **extra})


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
    raises_with("inference output(s) missing", run_bundle, BUNDLE, ["evaluate.yaml"],
                **{k: v for k, v in common.items() if not k.startswith(("network_def", "encoder_def"))})
    run_bundle(BUNDLE, ["inference.yaml"], **common, num_members=3, num_inference_steps=2, save_probabilities=True, save_members=True)
    report_dir = trained / "bundle" / "report"
    evaluate = {k: v for k, v in common.items() if not k.startswith(("network_def", "encoder_def")) and k != "image_size"}
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
    # the learning rate decays over the wall time (WallTimeCosineSchedule over max_wall_time), not over max_epochs'
    # 100000 epochs, and the wall-time limit stopped the run. The schedule's clock starts at the first step, after the
    # data are loaded and the first step has run, so how much of the 3 s it saw depends on the machine's load (CI saw
    # 1.25 s): the checks below hold for any load (exact values: the fake-clock unit tests)
    schedule = torch.load(tmp_path / "b" / "models" / "baseline_checkpoint.pt", weights_only=False)["lr_scheduler"]
    elapsed, base, last_lr = schedule["elapsed_before"], schedule["base_lrs"][0], schedule["_last_lr"][0]
    assert schedule["seconds"] == 3 and 0.0 < elapsed <= 3.5
    assert schedule["last_epoch"] > schedule["warmup_steps"]  # past the warm-up: the cosine part ran
    # the last step's rate is the cosine at a time no later than the checkpoint's (a step cosine over 100000 epochs
    # would stay within 1e-6 of the base rate, this one is below it by the time spent)
    assert base * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / 3))) - 1e-12 <= last_lr < base * (1 - 1e-6)
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


@pytest.mark.parametrize("model", [PLAIN_DIFFUSION, {}], ids=["plain", "encoder"])
def test_multi_gpu_config_runs_with_two_gloo_processes_on_cpu(tmp_path, model):
    write_dataset(tmp_path / "data")
    done = run_bundle_cli(BUNDLE, ["train.yaml", "multi_gpu_train.yaml"], run_id="training", launcher=TORCHRUN_TWO_PROCESSES,
                          **settings(tmp_path / "data", tmp_path / "b", max_epochs=1, **TINY_ENSEMBLE, **model))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "b" / "models" / "model.pt").exists() and (tmp_path / "b" / "models" / "checkpoint.pt").exists()


def test_wrong_channel_count_stops_before_training(tmp_path):
    write_dataset(tmp_path / "data")
    done = run_bundle_cli(BUNDLE, ["train.yaml"], run_id="training", **settings(tmp_path / "data", tmp_path / "b", image_channels=2, max_epochs=1, **TINY_TRAINING))
    assert done.returncode != 0
    assert "expected 2 image channel(s), found 1" in done.stderr and "case0.nii.gz" in done.stderr


# ---- condition encoder (MedSegDiff), x0 loss and recycling (Fu et al.) ------------------------------------------------
def test_condition_encoder_with_x0_loss_trains_segments_as_ensemble_and_as_encoder_and_exports(tmp_path):
    from segdiff.cli import main

    write_dataset(tmp_path / "data")
    data, root = tmp_path / "data", tmp_path / "b"
    model = {"condition_encoder": True, "prediction_type": "sample", **TINY_ENCODER}  # the default objective
    train(data, root, max_epochs=1, x0_loss_weight=1.0, recycling=True, **model)
    record = json.loads((root / "models" / "model.json").read_text())
    assert record["settings"]["condition_encoder"] is True
    assert record["settings"]["encoder_def"]["_target_"].endswith("UNet") and record["settings"]["encoder_def"]["channels"] == [8, 8]
    assert record["network"]["class"].endswith("ConditionEncoderDiffusion")
    objective = record["objective"]
    assert (objective["x0_loss_weight"], objective["mse_loss_weight"], objective["anchor_loss_weight"]) == (1.0, 1.0, 1.0)
    assert objective["recycling"] is True and objective["encoder_stop_gradient"] is False  # the defaults
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in weights} == {"diffusion", "encoder"}  # one state dict of one network_def

    # the fused ensemble, and the condition encoder's own segmentation as a one-member ensemble, both on the image grid
    run_bundle(BUNDLE, ["inference.yaml"], **settings(data, root, num_members=2, num_inference_steps=2, **model))
    check_outputs(root / "outputs" / "segmentations", data, "case4")
    encoder_out = root / "segs_encoder"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(data, root, output_dir=str(encoder_out), segmenter="encoder",
                                                      save_probabilities=True, **model))
    labels, _, _ = check_outputs(encoder_out, data, "case4")
    prob = nib.load(str(encoder_out / "case4_prob.nii.gz")).get_fdata()  # the encoder's softmax
    np.testing.assert_allclose(prob.sum(axis=-1), 1.0, atol=1e-4)
    assert np.array_equal(prob.argmax(axis=-1), labels)  # one member: the segmentation is its most probable class
    evaluate = dict(dataset_dir=str(data), bundle_root=str(root), num_classes=3)
    run_bundle(BUNDLE, ["evaluate.yaml"], **evaluate, output_dir=str(encoder_out), report_dir=str(tmp_path / "report"))
    assert json.loads((tmp_path / "report" / "ensemble_evaluation.json").read_text())["fused"]["num_cases"] == 2

    # segmenter both: the 2 diffusion members, then the encoder's softmax as a third member, fused together
    both_out = root / "segs_both"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(data, root, output_dir=str(both_out), segmenter="both", num_members=2,
                                                      num_inference_steps=2, save_probabilities=True, save_members=True,
                                                      **model))
    _, _, members = check_outputs(both_out, data, "case4", num_members=3)
    assert np.array_equal(members[..., 2], labels)  # the last member is the encoder's own segmentation
    both_prob = nib.load(str(both_out / "case4_prob.nii.gz")).get_fdata()
    ensemble_only = root / "segs_members"
    run_bundle(BUNDLE, ["inference.yaml"], **settings(data, root, output_dir=str(ensemble_only), num_members=2,
                                                      num_inference_steps=2, save_probabilities=True, **model))
    ensemble_prob = nib.load(str(ensemble_only / "case4_prob.nii.gz")).get_fdata()
    # the mean over 3 members = (2 * the mean of the 2 diffusion members + the encoder's softmax) / 3 (same seed)
    np.testing.assert_allclose(both_prob, (2 * ensemble_prob + prob) / 3, atol=1e-4)
    run_bundle(BUNDLE, ["evaluate.yaml"], **evaluate, output_dir=str(both_out), report_dir=str(tmp_path / "report_both"))
    assert json.loads((tmp_path / "report_both" / "ensemble_evaluation.json").read_text())["fused"]["num_cases"] == 2

    # a config without the encoder is refused naming the key; segmenter encoder needs one
    error = raises_with('condition_encoder: trained true, configured false', run_bundle, BUNDLE, ["inference.yaml"],
                        **settings(data, root, output_dir=str(root / "plain"), num_inference_steps=2, condition_encoder=False))
    assert "--condition_encoder True" in str(error)
    raises_with("'segmenter' encoder writes the condition encoder's own segmentation, but 'condition_encoder' is false",
                run_bundle, BUNDLE, ["inference.yaml"], **settings(data, root, output_dir=str(root / "x"), segmenter="encoder",
                                                                   condition_encoder=False))
    raises_with("'segmenter' both fuses the condition encoder's softmax with the diffusion members, but 'condition_encoder' "
                "is false", run_bundle, BUNDLE, ["inference.yaml"],
                **settings(data, root, output_dir=str(root / "y"), segmenter="both", condition_encoder=False))

    # MONAI Label's monaibundle path: network_def, model.pt loaded strictly, then inferer(inputs, network)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "inference.yaml"))
    parser.update({**settings(data, root, num_members=2, num_inference_steps=2), **model})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(weights, strict=True)
    assert parser.get_parsed_content("inferer")(torch.rand(1, 1, 20, 16), network).shape == (1, 2 * 3, 20, 16)

    # segdiff export-network: the wrapper as one program network(x, timesteps)
    command = ["export-network", str(BUNDLES_DIR / "inference.yaml"), "--weights", str(root / "models" / "model.pt"),
               "--output", str(root / "network.pt2")]
    for name, value in {**settings(data, root), **model}.items():
        command += ["--set", f"{name}={value!r}"]
    assert main(command) == 0 and (root / "network.pt2").exists()


def test_encoder_features_train_segment_and_are_refused_by_a_config_without_them(tmp_path):
    write_dataset(tmp_path / "data")
    data, root = tmp_path / "data", tmp_path / "b"
    model = {"condition_encoder": True, "encoder_features": True, **TINY_ENCODER}
    train(data, root, max_epochs=3, **model)  # the UNet's zeroed output layer passes no gradient in the first step
    record = json.loads((root / "models" / "model.json").read_text())
    assert record["settings"]["encoder_features"] is True
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in weights} == {"diffusion", "encoder", "feature_projections"}
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.startswith("feature_projections."))  # trained
    run_bundle(BUNDLE, ["inference.yaml"], **settings(data, root, num_members=2, num_inference_steps=2, **model))
    check_outputs(root / "outputs" / "segmentations", data, "case4")
    error = raises_with("encoder_features: trained true, configured false", run_bundle, BUNDLE, ["inference.yaml"],
                        **settings(data, root, output_dir=str(root / "plain"), num_inference_steps=2,
                                   **{**model, "encoder_features": False}))
    assert "--encoder_features True" in str(error)


def test_recycling_with_sample_prediction_trains_and_segments_on_the_image_grid(tmp_path):
    write_dataset(tmp_path / "data")
    data, root = tmp_path / "data", tmp_path / "b"
    train(data, root, max_epochs=1, prediction_type="sample", recycling=True, x0_loss_weight=1.0, condition_encoder=False)
    record = json.loads((root / "models" / "model.json").read_text())
    assert record["objective"]["recycling"] is True and record["settings"]["condition_encoder"] is False
    assert record["objective"]["anchor_loss_weight"] is None  # no encoder: the weight is not used
    run_bundle(BUNDLE, ["inference.yaml"], **settings(data, root, num_members=2, num_inference_steps=2, prediction_type="sample",
                                                      condition_encoder=False))
    check_outputs(root / "outputs" / "segmentations", data, "case4")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"x0_loss_weight": -1.0}, "'x0_loss_weight' must be a number >= 0, got -1.0"),
        ({"mse_loss_weight": 0.0, "x0_loss_weight": 0.0}, "'mse_loss_weight' and 'x0_loss_weight' are both 0"),
        ({"recycling": True}, "needs 'prediction_type' sample with 'diffusion' ddpm; got prediction_type 'v_prediction'"),
        ({"encoder_stop_gradient": True, "condition_encoder": False}, "'encoder_stop_gradient' true needs 'condition_encoder' true"),
        ({"condition_encoder": "false"}, "'condition_encoder' must be True or False, got 'false'"),
        ({"encoder_features": True, "condition_encoder": False}, "'encoder_features' true needs 'condition_encoder' true"),
    ],
)
def test_bad_condition_encoder_and_loss_keys_stop_training_with_their_names(tmp_path, extra, message):
    write_dataset(tmp_path / "data", splits={"training": 1, "validation": 1})
    raises_with(message, train, tmp_path / "data", tmp_path / "b", max_epochs=1, **extra)
    assert not (tmp_path / "b" / "models").exists()  # refused before anything was written


def test_unet_baseline_is_the_condition_encoders_network_and_trains_for_max_epochs_without_a_wall_time(tmp_path):
    write_dataset(tmp_path / "data", shape=(20, 16, 16))
    common = dict(dataset_dir=str(tmp_path / "data"), bundle_root=str(tmp_path / "b"), num_classes=3, image_size=[16, 16],
                  **TINY_ENCODER)
    run_bundle(BUNDLE, ["train.yaml", "train_baseline.yaml"], run_id="training", **common, max_wall_time=0, max_epochs=2,
               batch_size=8, slices_per_volume=4, num_workers=0, warmup_steps=2)
    models = tmp_path / "b" / "models"
    checkpoint = torch.load(models / "baseline_checkpoint.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"]  # the epochs decided
    record = json.loads((models / "baseline.json").read_text())
    assert record["network"]["class"] == "monai.networks.nets.unet.UNet"
    assert record["network"]["arguments"]["channels"] == [8, 8] and record["network"]["arguments"]["strides"] == [2]
    assert record["data"] == {"orientation": "RAS"}  # inference_baseline.yaml refuses images stored otherwise
    # the same state dict layout as the condition encoder inside the diffusion model
    weights = torch.load(models / "baseline.pt", weights_only=True)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "train.yaml"))
    parser.update({"num_classes": 3, "condition_encoder": True, **TINY_ENCODER, **TINY_NETWORK})
    encoder = parser.get_parsed_content("network_def").encoder
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {k: tuple(v.shape) for k, v in weights.items()}
    run_bundle(BUNDLE, ["inference.yaml", "inference_baseline.yaml"], **common)
    check_outputs(tmp_path / "b" / "outputs" / "segmentations_baseline", tmp_path / "data", "case4")
