"""mask_to_image's training overlays that generate the mask too, with tiny networks on tiny data: train_joint.yaml (the
image and its one-hot mask together, unconditionally; Saragih et al.) and train_mask_generator.yaml (one-hot masks
alone). What they write and where, the records, the channel layout of the network and of the training target, and the
plain inference.yaml refusing their weights."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, REPO, TINY_NETWORK, TINY_TRAINING, raises_with, run_bundle, write_dataset

from segdiff.errors import ConfigKeyError

BUNDLE = "mask_to_image"
CONFIGS = BUNDLES / BUNDLE / "configs"
JOINT = ["train.yaml", "train_joint.yaml"]
MASK_GENERATOR = ["train.yaml", "train_mask_generator.yaml"]
NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def settings(data_root, bundle_root, **extra) -> dict:
    return {
        "dataset_dir": str(data_root),
        "bundle_root": str(bundle_root),
        "num_classes": NUM_CLASSES,
        "image_size": [16, 16],
        **TINY_NETWORK,
        **TINY_TRAINING,
        "max_epochs": 1,
        **extra,
    }


def train(configs, data_root, bundle_root, **extra) -> None:
    run_bundle(BUNDLE, configs, run_id="training", **settings(data_root, bundle_root, **extra))


def parsed(configs, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser.update(overrides)
    return parser


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both overlays trained for one epoch (with validation and a sample grid) into one bundle folder."""
    root = tmp_path_factory.mktemp("joint")
    write_dataset(root / "data")
    train(JOINT, root / "data", root / "bundle")
    train(MASK_GENERATOR, root / "data", root / "bundle")
    return root


def record(root, folder) -> dict:
    return json.loads((root / "bundle" / "models" / folder / "model.json").read_text())


def image_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in folder.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["images"])
    return tags


def test_overlays_write_their_own_model_folders_and_leave_models_alone(trained):
    models = trained / "bundle" / "models"
    for folder in ("joint", "mask_generator"):
        assert {"model.pt", "model.json", "checkpoint.pt"} <= {p.name for p in (models / folder).iterdir()}
    assert not [p.name for p in models.iterdir() if p.is_file()]  # no mask -> image model.pt / model.json written
    outputs = trained / "bundle" / "outputs"
    assert "samples (generated image | generated mask | real image | real mask)" in image_tags(outputs / "joint" / "tensorboard")
    assert "samples (generated mask | real mask)" in image_tags(outputs / "mask_generator" / "tensorboard")


@pytest.mark.parametrize(
    "folder, target, image_channels", [("joint", "image+mask", 1), ("mask_generator", "mask", 0)]
)
def test_record_says_what_the_weights_generate_from_no_condition(trained, folder, target, image_channels):
    settings_ = record(trained, folder)["settings"]
    assert settings_["target"] == target and settings_["condition"] is None
    assert settings_["mask_values"] == [-1.0, 1.0]  # the mask as a diffusion target, not as a [0, 1] condition
    assert settings_["num_classes"] == NUM_CLASSES and settings_["image_channels"] == image_channels


@pytest.mark.parametrize("folder, channels", [("joint", 1 + NUM_CLASSES), ("mask_generator", NUM_CLASSES)])
def test_network_takes_and_predicts_the_target_channels_only(trained, folder, channels):
    arguments = record(trained, folder)["network"]["arguments"]
    assert arguments["in_channels"] == arguments["out_channels"] == channels
    weights = torch.load(trained / "bundle" / "models" / folder / "model.pt", weights_only=True)
    assert weights["conv_in.conv.weight"].shape[1] == channels
    assert weights["out.2.conv.weight"].shape[0] == channels


def test_joint_target_is_the_image_then_the_onehot_mask_in_minus_one_to_one(tmp_path):
    """2D files at the model size (no resampling): the target's mask channels give back the label file exactly."""
    write_dataset(tmp_path / "data", shape=(20, 16))
    parser = parsed(JOINT, **settings(tmp_path / "data", tmp_path / "b", image_size=[20, 16]))
    entry = parser.get_parsed_content("train#dataset#data")[0]
    sample = parser.get_parsed_content("train#preprocessing")(entry)[0]
    target = torch.as_tensor(sample["image"])
    assert target.shape == (1 + NUM_CLASSES, 20, 16)
    label = torch.as_tensor(nib.load(entry["label"]).get_fdata())
    mask = target[1:]
    assert set(mask.unique().tolist()) == {-1.0, 1.0} and ((mask == 1).sum(0) == 1).all()
    assert torch.equal(mask.argmax(0), label.long())
    image = torch.as_tensor(nib.load(entry["image"]).get_fdata(), dtype=torch.float32)
    scaled = parser.get_parsed_content("scale_intensity")({"image": image[None]})["image"][0]
    torch.testing.assert_close(target[0], torch.as_tensor(scaled), atol=1e-4, rtol=0)
    # what training feeds the inferer: the whole target noised, no condition concatenated
    batch = {"image": target[None]}
    noised, _, _, kwargs = parser.get_parsed_content("train#prepare_batch")(batch)
    assert noised.shape[1] == 1 + NUM_CLASSES and "condition" not in kwargs


def test_mask_generator_target_is_the_onehot_mask_and_no_image_is_read(tmp_path):
    datalist = write_dataset(tmp_path / "data", shape=(20, 16))
    for image in (tmp_path / "data" / "images").iterdir():
        image.unlink()  # entries name images that do not exist: neither the checks nor the loading may open them
    parser = parsed(MASK_GENERATOR, **settings(tmp_path / "data", tmp_path / "b", image_size=[20, 16]))
    parser.get_parsed_content("check_data")
    entry = parser.get_parsed_content("train#dataset#data")[0]
    assert "image" not in entry
    sample = parser.get_parsed_content("train#preprocessing")(entry)[0]
    mask = torch.as_tensor(sample["label"])
    assert mask.shape == (NUM_CLASSES, 20, 16) and set(mask.unique().tolist()) == {-1.0, 1.0}
    label_file = tmp_path / "data" / json.loads(datalist.read_text())["training"][0]["label"]
    assert torch.equal(mask.argmax(0), torch.as_tensor(nib.load(str(label_file)).get_fdata()).long())


@pytest.mark.parametrize("folder, target", [("joint", "image+mask"), ("mask_generator", "mask")])
def test_plain_inference_refuses_the_weights_naming_the_target(trained, folder, target):
    model_path = str(trained / "bundle" / "models" / folder / "model.pt")
    overrides = {k: v for k, v in settings(trained / "data", trained / "bundle").items() if k not in TINY_TRAINING}
    error = raises_with(
        f'target: trained "{target}", configured "image"', run_bundle, BUNDLE, ["inference.yaml"],
        model_path=model_path, output_dir=str(trained / "bundle" / "refused"), **overrides,
    )
    assert "model.json" in str(error) and 'condition: trained null, configured "label"' in str(error)
    assert f"These weights generate {target} from no condition; this config generates image from label" in str(error)
    assert "--target" not in str(error)  # no override could make these weights a mask -> image model
    assert not (trained / "bundle" / "refused").exists()


def test_a_second_run_refuses_to_replace_the_joint_weights_unless_told(trained):
    raises_with("models/joint/model.pt", train, JOINT, trained / "data", trained / "bundle")


@pytest.mark.parametrize("configs", [JOINT, MASK_GENERATOR], ids=["joint", "mask_generator"])
@pytest.mark.parametrize("override, message", [
    ({"mask_encoding": "legacy"}, "'mask_encoding' must be one of 'onehot'"),
    ({"num_classes": 1}, "'num_classes' must be at least 2"),
])
def test_overlays_refuse_a_mask_they_cannot_generate(tmp_path, configs, override, message):
    parser = parsed(configs, **{**settings(tmp_path / "data", tmp_path / "b"), **override})
    error = raises_with(message, parser.get_parsed_content, "check_target")
    assert isinstance(error, ConfigKeyError)


def test_3d_joint_model_trains_and_validates(tmp_path):
    write_dataset(tmp_path / "data", shape=(12, 16, 16))
    train(JOINT, tmp_path / "data", tmp_path / "b", spatial_dims=3, image_size=[8, 16, 16])
    checkpoint = torch.load(tmp_path / "b" / "models" / "joint" / "checkpoint.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 1  # 3 volumes, batch_size 8: one step
    weights = checkpoint["ema_network"]["conv_in.conv.weight"]
    assert weights.ndim == 5 and weights.shape[1] == 1 + NUM_CLASSES
    assert np.isfinite(weights.numpy()).all()
    assert image_tags(tmp_path / "b" / "outputs" / "joint" / "tensorboard")  # validation drew a 3D sample grid


@pytest.mark.parametrize("configs, channels", [(JOINT, 1 + 4), (MASK_GENERATOR, 4)], ids=["joint", "mask_generator"])
def test_the_cpu_preset_can_follow_the_overlays(tmp_path, configs, channels):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs] + [str(REPO / "configs" / "demo_cpu.yaml")])
    parser.update({"dataset_dir": str(tmp_path)})
    network = parser.get_parsed_content("network_def")
    assert network.block_out_channels == [32, 32, 64]  # the preset's network, with the overlay's channels
    assert network.in_channels == network.out_channels == channels  # num_classes 4 (train.yaml's default)
