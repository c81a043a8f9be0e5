"""A model knows how it was made (issue 10): the record written beside the weights, the refusals that read it, and the
runs that must stop before any work instead of losing or misusing what was written."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, REPO, TINY_NETWORK, TINY_TRAINING, raises_with, run_bundle, run_bundle_cli, write_dataset

from segdiff.engine import ModelRecord, describe_network
from segdiff.engine.provenance import read_record, record_path, save_weights, state_dict_sha256
from segdiff.errors import ModelMismatchError, OutputCollisionError, RunFolderError

pytestmark = pytest.mark.slow


def settings(data_root, bundle_root, **extra):
    return dict(dataset_dir=str(data_root), bundle_root=str(bundle_root), num_classes=3, image_size=[16, 16],
                **TINY_NETWORK, **extra)


def train(bundle, data_root, bundle_root, **extra):
    run_bundle(bundle, ["train.yaml"], run_id="training",
               **settings(data_root, bundle_root, **{**TINY_TRAINING, "max_epochs": 1, **extra}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny mask_to_image model (v-prediction, the default) and one image_to_mask model, trained for an epoch."""
    root = tmp_path_factory.mktemp("provenance")
    datalist = write_dataset(root / "data")
    meta = json.loads(datalist.read_text())
    meta["labels"] = {"0": "background", "1": "inner", "2": "outer"}
    datalist.write_text(json.dumps(meta))
    train("mask_to_image", root / "data", root / "m2i")
    train("image_to_mask", root / "data", root / "i2m")
    return root


# ---- the record ---------------------------------------------------------------------------------------------------
def test_training_writes_a_record_of_everything_that_decides_how_the_weights_are_used(trained):
    models = trained / "m2i" / "models"
    record = json.loads((models / "model.json").read_text())
    s = record["settings"]
    assert s["bundle"] == "mask_to_image"
    assert (s["spatial_dims"], s["image_size"], s["roi_size"], s["num_classes"], s["image_channels"]) == (2, [16, 16], None, 3, 1)
    assert (s["mask_encoding"], s["mask_values"], s["prediction_type"]) == ("onehot", [0.0, 1.0], "v_prediction")
    assert s["diffusion"] == "ddpm"
    assert s["noise_schedule"] == {"num_train_timesteps": 1000, "schedule": "linear_beta",
                                   "beta_start": 1e-4, "beta_end": 0.02}
    assert (s["target"], s["condition"], s["slice_axis"]) == ("image", "label", 2)
    assert s["intensity_scaling"] == {"transform": "ScaleIntensityRangePercentilesd", "lower": 0.5, "upper": 99.5,
                                      "b_min": -1.0, "b_max": 1.0, "clip": True, "relative": False, "channel_wise": True}
    assert record["label_names"] == {"0": "background", "1": "inner", "2": "outer"}
    network = record["network"]
    assert network["class"] == "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet"
    assert network["arguments"]["channels"] == [8, 16] and network["arguments"]["norm_num_groups"] == 8
    assert network["arguments"]["in_channels"] == 1 + 3 and network["arguments"]["attention_levels"] == [False, True]
    weights = torch.load(models / "model.pt", weights_only=True)
    assert network["num_parameters"] == sum(t.numel() for t in weights.values())
    assert record["weights"] == "model.pt" and record["weights_sha256"] == state_dict_sha256(weights)
    assert set(record["versions"]) == {"segdiff", "monai", "torch", "python"}
    checkpoint = torch.load(models / "checkpoint.pt", weights_only=False)
    assert checkpoint["record"]["settings"] == s  # the same record travels inside checkpoint.pt


def test_image_to_mask_records_its_roles_and_target_encoding(trained):
    s = read_record(trained / "i2m" / "models" / "model.pt")["settings"]
    assert (s["bundle"], s["target"], s["condition"], s["mask_values"]) == ("image_to_mask", "label", "image", [-1.0, 1.0])


@pytest.mark.parametrize("bundle", ["mask_to_image", "image_to_mask"])
def test_train_and_inference_configs_imply_the_same_record(bundle, tmp_path):
    from monai.bundle import ConfigParser

    records = []
    for config in ("train.yaml", "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / config))
        parser.update({"dataset_dir": str(tmp_path), "num_classes": 5, "image_size": [32, 24], "prediction_type": "epsilon"})
        records.append(parser.get_parsed_content("model_record").settings)
    assert records[0] == records[1]


# ---- refusals of weights used with other settings ------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key, trained_value, configured_value, fix",
    [
        ({"prediction_type": "epsilon"}, "prediction_type", '"v_prediction"', '"epsilon"', "--prediction_type v_prediction"),
        ({"image_size": [32, 32]}, "image_size", "[16, 16]", "[32, 32]", '--image_size "[16, 16]"'),
        ({"mask_encoding": "legacy"}, "mask_encoding", '"onehot"', '"legacy"', "--mask_encoding onehot"),
        ({"noise_schedule#beta_end": 0.012}, "noise_schedule#beta_end", "0.02", "0.012", "--noise_schedule#beta_end 0.02"),
        ({"num_classes": 4}, "num_classes", "3", "4", "--num_classes 3"),
    ],
)
def test_inference_with_other_settings_stops_before_sampling_naming_the_key(trained, override, key, trained_value, configured_value, fix):
    out = trained / "m2i" / f"refused_{key.replace('#', '_')}"
    error = raises_with(f"{key}: trained {trained_value}, configured {configured_value}", run_bundle, "mask_to_image",
                        ["inference.yaml"], **{**settings(trained / "data", trained / "m2i", output_dir=str(out)), **override})
    assert isinstance(error, ModelMismatchError)
    assert str(trained / "m2i" / "models" / "model.json") in str(error) and fix in str(error)
    assert not out.exists()  # nothing sampled, nothing written


def test_keys_a_user_may_change_are_not_checked(trained):
    out = trained / "m2i" / "free_keys"
    run_bundle("mask_to_image", ["inference.yaml"], **settings(trained / "data", trained / "m2i", output_dir=str(out),
                                                               sampler="ddpm", num_inference_steps=2, seed=3, samples_per_mask=2))
    assert len(list(out.glob("*_sample1_image.nii.gz"))) == 2


def test_the_refusal_is_the_last_line_a_user_sees(trained):
    done = run_bundle_cli("image_to_mask", ["inference.yaml"], **settings(trained / "data", trained / "i2m", prediction_type="epsilon",
                                                                          output_dir=str(trained / "i2m" / "never")))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "--prediction_type sample" in lines[-1]  # the fix, last (image_to_mask predicts the mask by default)
    assert lines[-2] == '  prediction_type: trained "sample", configured "epsilon"'
    assert lines[-3].startswith("ERROR: ") and "model.json says these weights were trained with other settings" in lines[-3]
    tail = "\n".join(lines[-8:])
    assert "Failed to evaluate ConfigExpression" not in tail
    assert len(done.stderr.splitlines()) < 20  # a refusal, not a 60-line traceback


def test_a_network_that_does_not_fit_names_the_keys_and_the_overrides_that_fit(trained, tmp_path):
    # trained with the tiny network; the docs' inference command without the preset/overrides builds the default one
    error = raises_with("network_def#channels: trained [8, 16], configured [16, 32]", run_bundle, "mask_to_image",
                        ["inference.yaml"], **{**settings(trained / "data", trained / "m2i"), "network_def#channels": [16, 32]})
    assert '--network_def#channels "[8, 16]"' in str(error)


def test_mismatch_refused_by_the_sampler_itself_as_monai_label_calls_it(trained):
    # MONAI Label loads model.pt itself and calls inferer(inputs, network) without running the config's initialize
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "image_to_mask" / "configs" / "inference.yaml"))
    parser.update({**settings(trained / "data", trained / "i2m"), "num_inference_steps": 1, "num_members": 1,
                   "prediction_type": "epsilon", "device": "$torch.device('cpu')"})
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("inferer")
    network.load_state_dict(torch.load(trained / "i2m" / "models" / "model.pt", weights_only=True), strict=False)
    with pytest.raises(ModelMismatchError, match='prediction_type: trained "sample", configured "epsilon"'):
        inferer(torch.rand(1, 1, 16, 16), network)
    parser["prediction_type"] = "sample"
    parser.parse(reset=True)
    inferer = parser.get_parsed_content("inferer")
    assert inferer(torch.rand(1, 1, 16, 16), parser.get_parsed_content("network")).shape == (1, 3, 16, 16)


def test_weights_without_a_record_load_with_a_warning(trained, tmp_path):
    bundle_root = tmp_path / "released"
    (bundle_root / "models").mkdir(parents=True)
    shutil.copy(trained / "m2i" / "models" / "model.pt", bundle_root / "models" / "model.pt")
    with pytest.warns(UserWarning, match="has no model record"):
        run_bundle("mask_to_image", ["inference.yaml"], **settings(trained / "data", bundle_root, num_inference_steps=2))
    assert len(list((bundle_root / "outputs" / "generated").glob("*_image.nii.gz"))) == 2


def test_a_record_written_for_other_weights_is_flagged(tmp_path):
    network = torch.nn.Linear(3, 1)
    record = ModelRecord({"num_classes": 2}, weights_path=tmp_path / "model.pt")
    save_weights(network.state_dict(), tmp_path / "model.pt", record.build(network))
    torch.save(torch.nn.Linear(3, 1).state_dict(), tmp_path / "model.pt")  # replaced, record kept
    with pytest.warns(UserWarning, match="written for other weights"):
        record.verify(network)


def test_record_of_another_bundle_is_refused(trained):
    record = ModelRecord(read_record(trained / "m2i" / "models" / "model.pt")["settings"] | {"bundle": "image_to_mask"})
    with pytest.raises(ModelMismatchError, match='bundle: trained "mask_to_image", configured "image_to_mask"'):
        record.check(read_record(trained / "m2i" / "models" / "model.pt"), "model.json")



def test_weights_of_another_kind_of_model_are_refused_without_override_hints():
    """Joint image+mask weights given to a mask -> image config: no override can fix that, so none is suggested."""
    joint = ModelRecord({"num_classes": 3, "target": "image+mask", "condition": None}, bundle="mask_to_image")
    plain = ModelRecord({"num_classes": 3, "target": "image", "condition": "label"}, bundle="mask_to_image")
    with pytest.raises(ModelMismatchError) as error:
        plain.check(joint.build(torch.nn.Linear(2, 2)), "model.json")
    message = str(error.value)
    assert 'target: trained "image+mask", configured "image"' in message
    assert "These weights generate image+mask from no condition; this config generates image from label" in message
    assert "--target" not in message and "--condition" not in message

def test_describe_network_reads_monai_constructor_arguments():
    from monai.networks.nets import DiffusionModelUNet, UNet

    unet = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                              num_res_blocks=1, num_head_channels=8, norm_num_groups=4)
    described = describe_network(unet)
    assert described["arguments"]["channels"] == [8, 16] and described["arguments"]["norm_num_groups"] == 4
    assert described["arguments"]["num_head_channels"] == [8, 8]
    other = describe_network(DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(8, 16),
                                                attention_levels=(False, False), num_res_blocks=1, num_head_channels=8,
                                                norm_num_groups=8))
    assert other["layers_sha256"] == described["layers_sha256"]  # same shapes: only the arguments tell them apart
    assert other["arguments"]["norm_num_groups"] == 8
    segmenter = describe_network(UNet(2, 1, 3, channels=(4, 8), strides=(2,)))
    assert segmenter["arguments"]["channels"] == [4, 8] and segmenter["arguments"]["strides"] == [2]


# ---- nothing is lost silently -------------------------------------------------------------------------------------
def test_training_over_a_lone_model_pt_stops_before_caching_or_writing(trained, tmp_path):
    bundle_root = tmp_path / "released"
    (bundle_root / "models").mkdir(parents=True)
    shutil.copy(trained / "m2i" / "models" / "model.pt", bundle_root / "models" / "model.pt")
    before = (bundle_root / "models" / "model.pt").read_bytes()
    error = raises_with("model.pt exist(s) from an earlier run or release", train, "mask_to_image", trained / "data", bundle_root)
    assert isinstance(error, RunFolderError) and "'overwrite' to true" in str(error)
    assert (bundle_root / "models" / "model.pt").read_bytes() == before
    assert sorted(p.name for p in bundle_root.rglob("*")) == ["model.pt", "models"]  # no TensorBoard file, nothing else


def test_resume_without_a_checkpoint_is_refused_naming_the_path(trained, tmp_path):
    error = raises_with("resume is true but there is no checkpoint at", train, "image_to_mask", trained / "data",
                        tmp_path / "typo", resume=True)
    assert str(tmp_path / "typo" / "models" / "checkpoint.pt") in str(error)
    assert not (tmp_path / "typo").exists()


def test_overwrite_lets_a_new_run_replace_the_earlier_files(trained, tmp_path):
    bundle_root = tmp_path / "again"
    shutil.copytree(trained / "m2i" / "models", bundle_root / "models")
    train("mask_to_image", trained / "data", bundle_root, overwrite=True, seed=5)
    new = torch.load(bundle_root / "models" / "model.pt", weights_only=True)
    old = torch.load(trained / "m2i" / "models" / "model.pt", weights_only=True)
    assert any(not torch.equal(new[k], old[k]) for k in old)
    assert read_record(bundle_root / "models" / "model.pt")["weights_sha256"] == state_dict_sha256(new)


@pytest.mark.parametrize("bundle, key", [("mask_to_image", "label"), ("image_to_mask", "image")])
def test_same_file_names_in_different_folders_stop_inference_before_sampling(trained, tmp_path, bundle, key):
    data = json.loads((trained / "data" / "datalist.json").read_text())
    for site, entry in zip(("siteA", "siteB"), data["test"]):
        for field in ("image", "label"):
            source = trained / "data" / entry[field]
            target = tmp_path / site / field / "patient1.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
            entry[field] = str(target)
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    error = raises_with("patient1", run_bundle, bundle, ["inference.yaml"],
                        **settings(tmp_path, trained / ("m2i" if bundle == "mask_to_image" else "i2m"), output_dir=str(out)))
    assert isinstance(error, OutputCollisionError)
    assert str(tmp_path / "siteA" / key / "patient1.nii.gz") in str(error)
    assert str(tmp_path / "siteB" / key / "patient1.nii.gz") in str(error)
    assert not out.exists()


def test_the_old_name_num_samples_still_works_with_a_deprecation_warning(trained):
    out = trained / "m2i" / "old_name"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_bundle("mask_to_image", ["inference.yaml"], **settings(trained / "data", trained / "m2i", output_dir=str(out),
                                                                   num_inference_steps=2, num_samples=2))
    assert any("'num_samples' is deprecated" in str(w.message) and "samples_per_mask" in str(w.message) for w in caught)
    assert len(list(out.glob("*_sample1_image.nii.gz"))) == 2


# ---- the export and the converter carry the record --------------------------------------------------------------
def test_export_checks_the_record_and_writes_it_beside_the_program(trained, tmp_path):
    from segdiff.export import export_bundle_network, load_exported

    config = str(BUNDLES / "mask_to_image" / "configs" / "inference.yaml")
    overrides = {k: v for k, v in settings(trained / "data", trained / "m2i").items()}
    weights = str(trained / "m2i" / "models" / "model.pt")
    with pytest.raises(ModelMismatchError, match="prediction_type"):
        export_bundle_network(config, weights, str(tmp_path / "bad.pt2"), overrides={**overrides, "prediction_type": "sample"})
    assert not (tmp_path / "bad.pt2").exists()
    report = export_bundle_network(config, weights, str(tmp_path / "network.pt2"), overrides=overrides)
    stored = json.loads(record_path(report.path).read_text())
    assert stored["settings"] == read_record(weights)["settings"]
    assert stored["export"]["program"] == "network.pt2" and stored["export"]["max_abs_diff"] <= 1e-4
    _, extra = load_exported(report.path)
    assert extra["model_record.json"]["weights_sha256"] == read_record(weights)["weights_sha256"]


# ---- presets apply to every config of a bundle ------------------------------------------------------------------
@pytest.mark.parametrize("configs", [["evaluate.yaml"], ["train.yaml", "train_baseline.yaml"],
                                     ["inference.yaml", "inference_baseline.yaml"], ["train.yaml"]])
def test_the_cpu_preset_can_follow_every_config(configs, tmp_path):
    from monai.bundle import ConfigParser

    bundle = "image_to_mask"
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs] + [str(REPO / "configs" / "demo_cpu.yaml")])
    parser.update({"dataset_dir": str(tmp_path)})
    if "network_def" in parser:
        network = parser.get_parsed_content("network_def")
        if "baseline" not in configs[-1]:
            assert network.diffusion.block_out_channels == [32, 32, 64]  # the preset's network (the encoder beside it)
        else:
            assert type(network).__name__ == "UNet"
    assert parser.get_parsed_content("image_size") == [64, 76]


# ---- the fast sampler from the command line (issue 11's DPM-Solver++, wired into the bundles) ---------------------
@pytest.mark.parametrize("bundle, folder, suffix", [("mask_to_image", "m2i", "_image.nii.gz"), ("image_to_mask", "i2m", "_seg.nii.gz")])
def test_dpm_solver_samples_from_the_command_line_on_the_input_grid(trained, bundle, folder, suffix):
    out = trained / folder / "dpm_solver"
    run_bundle(bundle, ["inference.yaml"], **settings(trained / "data", trained / folder, output_dir=str(out),
                                                      sampler="dpm_solver", num_inference_steps=4))
    data = json.loads((trained / "data" / "datalist.json").read_text())
    for entry in data["test"]:
        name = entry["label"].split("/")[-1][: -len(".nii.gz")]
        written, source = nib.load(str(out / f"{name}{suffix}")), nib.load(str(trained / "data" / entry["label"]))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-5)
        assert np.isfinite(written.get_fdata()).all()


def test_euler_is_refused_for_a_ddpm_model_naming_the_samplers_that_fit(trained):
    raises_with("'sampler' euler samples rectified-flow models, but 'diffusion' is ddpm: use one of ddpm, ddim, dpm_solver", run_bundle, "mask_to_image",
                ["inference.yaml"], **settings(trained / "data", trained / "m2i", sampler="euler",
                                               output_dir=str(trained / "m2i" / "euler")))


@pytest.mark.parametrize("bundle, folder, key", [("mask_to_image", "m2i", "label"), ("image_to_mask", "i2m", "image")])
def test_inputs_in_another_voxel_orientation_than_training_are_refused_before_sampling(trained, tmp_path, bundle,
                                                                                        folder, key):
    # the network sees voxel arrays: a case stored with its first axis flipped would reach it mirrored
    from segdiff.data.checks import file_orientation

    codes = read_record(trained / folder / "models" / "model.pt")["data"]["orientation"]
    assert codes == file_orientation(trained / "data" / "images" / "case0.nii.gz") and len(codes) == 3
    data = json.loads((trained / "data" / "datalist.json").read_text())
    entry = data["test"][0]
    for field in ("image", "label"):
        flipped = nib.load(str(trained / "data" / entry[field])).as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
        entry[field] = str(tmp_path / field / "flipped.nii.gz")
        (tmp_path / field).mkdir()
        flipped.to_filename(entry[field])
    assert file_orientation(entry[key]) not in (None, codes)
    data["test"] = [entry]
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    error = raises_with(f"trained on images in {codes} voxel orientation", run_bundle, bundle, ["inference.yaml"],
                        **settings(tmp_path, trained / folder, output_dir=str(out)))
    assert isinstance(error, ModelMismatchError)
    assert f"{entry[key]} ({file_orientation(entry[key])})" in str(error) and "nib.as_closest_canonical" in str(error)
    assert not out.exists()  # nothing sampled, nothing written
    # MONAI Label's /infer skips initialize and runs the config's preprocessing: the guard there refuses it too
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.yaml"))
    parser.update(settings(tmp_path, trained / folder, output_dir=str(out)))
    preprocessing = parser.get_parsed_content("preprocessing")
    raises_with(f"under {key!r} are in another: {entry[key]} ({file_orientation(entry[key])})", preprocessing,
                {key: entry[key]})
    original = trained / "data" / json.loads((trained / "data" / "datalist.json").read_text())["test"][0][key]
    assert preprocessing({key: str(original)})[key].shape[1:] == nib.load(str(original)).shape  # as trained: passes


def test_weights_without_a_recorded_orientation_are_not_checked(tmp_path):
    weights = tmp_path / "model.pt"
    save_weights({"w": torch.zeros(1)}, weights, ModelRecord({"a": 1}).build(torch.nn.Linear(1, 1)))
    image = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), str(image))
    ModelRecord({"a": 1}, weights_path=weights).check_orientation([{"image": str(image)}], "image")  # no error
    save_weights({"w": torch.zeros(1)}, weights, ModelRecord({"a": 1}, data_orientation="RAS").build(torch.nn.Linear(1, 1)))
    with pytest.raises(ModelMismatchError, match=r"1 input\(s\) under 'image' are in another: .*lps.nii.gz \(LPS\)"):
        ModelRecord({"a": 1}, weights_path=weights).check_orientation([{"image": str(image)}], "image")


def test_the_orientation_guard_transform_refuses_loaded_images_in_another_orientation(tmp_path):
    from monai.data import MetaTensor

    from segdiff.transforms import RequireOrientationd

    weights = tmp_path / "model.pt"
    guard = RequireOrientationd("image", weights)
    lps = MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0])),
                     meta={"filename_or_obj": "/data/lps.nii.gz"})
    assert guard({"image": lps})["image"] is lps  # no weights yet: nothing to check against
    save_weights({"w": torch.zeros(1)}, weights, ModelRecord({"a": 1}, data_orientation="RAS").build(torch.nn.Linear(1, 1)))
    with pytest.raises(ModelMismatchError, match=r"trained on images in RAS .* under 'image' are in another: /data/lps.nii.gz \(LPS\)"):
        guard({"image": lps})
    ras = MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.diag(torch.tensor([2.0, 1.0, 3.0, 1.0])))
    assert guard({"image": ras})["image"] is ras  # spacing does not matter, only the axis order and direction
    assert guard({"image": torch.zeros(1, 2, 2)})["image"].shape == (1, 2, 2)  # no affine (PNG): unchecked
