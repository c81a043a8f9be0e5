"""Every bundle passes the MONAI model-zoo checks: metadata valid against configs/metadata_schema.json (offline, with
``python -m monai.bundle verify_metadata``) and true to ``network_def``; ``check_properties()`` empty for every train
and inference workflow; ``verify_net_in_out`` with ``timesteps``; the directory conventions; and an export of
``network_def`` (torch.export) that loads and matches the eager network. The latent bundle's network takes more than
``(image, timesteps)`` on latents: its metadata is checked against its own networks (the latent section)."""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from configparser import ConfigParser as IniParser

import pytest
import torch
from bundle_utils import BUNDLES, REPO, TINY_NETWORK, missing_properties, workflow_missing_properties, write_dataset
from packaging.requirements import Requirement

import segdiff
from segdiff.cli import main
from segdiff.engine import ControlNetDiffusion, empty_mask
from segdiff.engine.latent import latent_geometry
from segdiff.export import load_bundle_network, load_exported
from segdiff.transforms import MASK_VALUE_RANGES

BUNDLE_NAMES = ("mask_to_image", "image_to_mask", "latent_mask_to_image")
#: the bundles whose network_def is network(image, timesteps) on the image grid (the latent bundle's is checked in its
#: own section: ControlNetDiffusion on latents, also given class_labels and controlnet_cond)
PIXEL_BUNDLES = ("mask_to_image", "image_to_mask")
LATENT_BUNDLE = "latent_mask_to_image"
SCHEMA = REPO / "configs" / "metadata_schema.json"
#: the documented command, run from a bundle folder
VERIFY_METADATA = ["-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
                   "--filepath", "../../configs/metadata_schema.json"]
MODEL_ZOO_SECTIONS = (
    "Overview", "Data", "Training configuration", "Performance", "Commands", "Limitations", "References"
)
MAX_FILE_BYTES = 25 * 1024 * 1024

#: every bundle's base configs -> workflow type (the pixel bundles' are checked with ``missing_properties``, the
#: latent bundle's stages on its trained tiny models)
BASE_WORKFLOWS = {
    "mask_to_image": {"train.yaml": "train", "inference.yaml": "infer"},
    "image_to_mask": {"train.yaml": "train", "inference.yaml": "infer"},
    "latent_mask_to_image": {"train_autoencoder.yaml": "train", "train_diffusion.yaml": "train",
                             "train_controlnet.yaml": "train", "inference.yaml": "infer"},
}
#: the weight files a bundle's workflows write into models/ (which git must ignore)
WEIGHT_FILES = {
    "mask_to_image": ("model.pt",),
    "image_to_mask": ("model.pt",),
    "latent_mask_to_image": ("autoencoder.pt", "diffusion.pt", "controlnet.pt"),
}
#: every further workflow a bundle's configs make: configs merged in order -> workflow type
OVERLAY_WORKFLOWS = {
    "mask_to_image": {
        ("train.yaml", "multi_gpu_train.yaml"): "train",
        ("train.yaml", "train_joint.yaml"): "train",
        ("train.yaml", "train_mask_generator.yaml"): "train",
    },
    "image_to_mask": {
        ("train.yaml", "multi_gpu_train.yaml"): "train",
        ("train.yaml", "train_baseline.yaml"): "train",
        ("inference.yaml", "inference_baseline.yaml"): "infer",
    },
    "latent_mask_to_image": {},
}
#: workflow overlays whose properties another test file checks (they need latent-bundle data, not the pixel data above)
CHECKED_ELSEWHERE = {
    "latent_mask_to_image": {
        f"multi_gpu_train_{stage}.yaml": "tests/test_latent_multi_gpu.py::test_check_properties_empty_for_each_overlay_in_a_one_process_group"
        for stage in ("autoencoder", "diffusion", "controlnet")
    },
}
#: configs that are not train or inference workflows, and why
NOT_WORKFLOWS = {
    "evaluate.yaml": "scores the files inference wrote: no network_def, evaluator or inferer to check",
    "synthesize.yaml": "an overlay of inference.yaml whose run is the synthesizer, not the evaluator; it only inherits "
    "inference.yaml's properties, checked there",
    "synthesize_joint.yaml": "an overlay of inference.yaml and synthesize.yaml whose run is the synthesizer of "
    "unconditional samples, not the evaluator; it only inherits inference.yaml's properties, checked there",
}


def metadata(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# ------------------------------------------------------------------------------------------------------ metadata
@pytest.fixture(scope="module")
def verify_metadata_runs(tmp_path_factory):
    """The documented ``verify_metadata`` command, run as a user runs it from each bundle folder, plus once on a copy
    of mask_to_image's metadata without ``inputs#image#num_channels``; started together (each process spends seconds
    importing MONAI). Returns name -> (exit status, stdout + stderr)."""
    broken = metadata("mask_to_image")
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    broken_file = tmp_path_factory.mktemp("broken") / "metadata.json"
    broken_file.write_text(json.dumps(broken))
    runs = {bundle: (BUNDLES / bundle, VERIFY_METADATA) for bundle in BUNDLE_NAMES}
    broken_args = [str(broken_file) if a == "configs/metadata.json" else a for a in VERIFY_METADATA]
    runs["broken"] = (BUNDLES / "mask_to_image", broken_args)
    processes = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, (cwd, args) in runs.items()
    }
    outputs = {name: process.communicate(timeout=300)[0] for name, process in processes.items()}
    return {name: (processes[name].returncode, output) for name, output in outputs.items()}


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_passes_verify_metadata_offline_against_the_shipped_schema(verify_metadata_runs, bundle):
    returncode, output = verify_metadata_runs[bundle]
    assert returncode == 0, output[-2000:]
    assert "skipped downloading" in output  # the shipped file was used, nothing fetched
    assert "metadata is verified with no error" in output


def test_verify_metadata_fails_on_a_copy_with_a_field_removed(verify_metadata_runs):
    returncode, output = verify_metadata_runs["broken"]
    assert returncode != 0
    assert "'num_channels' is a required property" in output


def _drop(path):
    def edit(meta):
        *parents, last = path.split("#")
        node = meta
        for key in parents:
            node = node[key]
        del node[last]

    return edit


def _set(path, value):
    def edit(meta):
        *parents, last = path.split("#")
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("version"), "'version' is a required property"),
        (_drop("changelog"), "'changelog' is a required property"),
        (_drop("numpy_version"), "'numpy_version' is a required property"),
        (_drop("required_packages_version"), "'required_packages_version' is a required property"),
        (_drop("copyright"), "'copyright' is a required property"),
        (_drop("network_data_format#outputs#pred"), "'pred' is a required property"),
        (_drop("network_data_format#inputs#image#value_range"), "'value_range' is a required property"),
        (_set("version", "0.2"), "does not match"),
        (_set("task", "  "), "does not match"),
        (_set("optional_packages_version", {"nilearn": "0.14.1"}), "should not be valid"),
        (_set("network_data_format#inputs#image#dtype", "float"), "is not one of"),
        (_set("network_data_format#outputs#pred#value_range", [0]), "[0] is not valid under any of the given schemas"),
        (_set("network_data_format#outputs#pred#channel_def", {"first": "x"}), "does not match"),
        (_set("network_data_format#inputs#image#spatial_shape", [128, "wide"]), "wide"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_rejects_broken_metadata(tmp_path, edit, message):
    from monai.bundle import verify_metadata

    broken = copy.deepcopy(metadata("image_to_mask"))
    edit(broken)
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError) as error:
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))
    assert message in str(error.value)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_schema_field_points_at_the_shipped_schema_from_the_bundle_folder(bundle):
    assert (BUNDLES / bundle / metadata(bundle)["schema"]).resolve() == SCHEMA.resolve()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_version_is_the_newest_changelog_entry(bundle):
    meta = metadata(bundle)
    versions = list(meta["changelog"])
    assert meta["version"] == versions[0]  # newest first
    assert versions == sorted(versions, key=version_tuple, reverse=True)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_version_fields_name_installed_packages_the_package_supports(bundle):
    meta = metadata(bundle)
    requirements = {}
    setup = IniParser()
    setup.read(REPO / "setup.cfg")
    for line in setup["options"]["install_requires"].split("\n"):
        if line.strip():
            requirement = Requirement(line.strip())
            requirements[requirement.name.lower()] = requirement
    declared = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    declared.update(meta["required_packages_version"])
    assert meta["required_packages_version"]["monai-segdiff"] == segdiff.__version__
    for name, version in declared.items():
        importlib.metadata.version(name)  # installed: raises PackageNotFoundError otherwise
        requirement = requirements.get(name.lower())
        if requirement is not None:
            assert requirement.specifier.contains(version), (name, version, str(requirement))


@pytest.mark.parametrize("config", ["train.yaml", "inference.yaml"])
@pytest.mark.parametrize("bundle", PIXEL_BUNDLES)  # network(image, timesteps); the latent bundle: its own section
def test_network_data_format_describes_the_default_network_def(bundle, config):
    network, parser = load_bundle_network(str(BUNDLES / bundle / "configs" / config))
    data_format = metadata(bundle)["network_data_format"]
    inputs, outputs = data_format["inputs"], data_format["outputs"]
    image, pred, timesteps = inputs["image"], outputs["pred"], inputs["timesteps"]
    assert list(inputs)[0] == "image" and list(outputs)[0] == "pred"  # MONAI Label reads the first keys
    assert image["num_channels"] == network.in_channels
    assert pred["num_channels"] == network.out_channels
    image_size = parser.get_parsed_content("image_size")
    assert image["spatial_shape"] == pred["spatial_shape"] == image_size
    assert len(image_size) == parser.get_parsed_content("spatial_dims")
    for tensor in (image, pred):
        assert sorted(tensor["channel_def"], key=int) == [str(c) for c in range(tensor["num_channels"])]
    # timesteps: one integer per batch item, in [0, num_train_timesteps)
    assert timesteps["num_channels"] == 0 and timesteps["spatial_shape"] == [] and timesteps["dtype"] == "int64"
    assert timesteps["value_range"] == [0, parser.get_parsed_content("num_train_timesteps") - 1]


@pytest.mark.parametrize("bundle", PIXEL_BUNDLES)  # network(image, timesteps); the latent bundle: its own section
def test_verify_net_in_out_passes_for_the_default_network_def_with_timesteps(bundle):
    from monai.bundle import verify_net_in_out

    configs = BUNDLES / bundle / "configs"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.yaml"),
        device="cpu",
        extra_forward_args={"timesteps": torch.tensor([999])},
    )


def test_verify_net_in_out_catches_metadata_that_misstates_the_output_channels():
    from monai.bundle import verify_net_in_out

    configs = BUNDLES / "image_to_mask" / "configs"
    with pytest.raises(ValueError, match="output channel number `4` doesn't match: `3`"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(configs / "metadata.json"),
            config_file=str(configs / "inference.yaml"),
            device="cpu",
            extra_forward_args={"timesteps": torch.tensor([0])},
            **{"_meta_#network_data_format#outputs#pred#num_channels": 3, **TINY_NETWORK},
        )


@pytest.mark.parametrize("bundle", PIXEL_BUNDLES)  # network(image, timesteps); the latent bundle: its own section
def test_default_network_output_has_the_declared_shape_and_dtype(bundle):
    network, _ = load_bundle_network(str(BUNDLES / bundle / "configs" / "inference.yaml"))
    image, pred = (metadata(bundle)["network_data_format"][k][n] for k, n in (("inputs", "image"), ("outputs", "pred")))
    x = torch.randn(1, image["num_channels"], *image["spatial_shape"], dtype=getattr(torch, image["dtype"]))
    with torch.no_grad():
        y = network(x, timesteps=torch.tensor([500]))
    assert tuple(y.shape) == (1, pred["num_channels"], *pred["spatial_shape"])
    assert y.dtype == getattr(torch, pred["dtype"])


# ---------------------------------------------------------------------------------------- the latent bundle's network
#: inference.yaml reads the modalities from the trained UNet's record and the stages from the datalist; a two-modality
#: stand-in (it sizes the class embeddings) lets the networks be built without either
LATENT_MODALITIES = {"modalities": {"ct": 0, "mr": 1}}
#: the settings every latent config that has them must default to alike (the records refuse weights trained otherwise)
LATENT_SHARED_SETTINGS = ("spatial_dims", "image_size", "roi_size", "image_channels", "latent_channels", "num_classes",
                          "num_train_timesteps", "prediction_type", "diffusion", "noise_schedule",
                          "conditioning_channels")
#: network_data_format's output format for each prediction_type
PREDICTION_FORMATS = {"v_prediction": "velocity", "epsilon": "noise", "sample": "sample"}


def latent_config(name: str) -> str:
    return str(BUNDLES / LATENT_BUNDLE / "configs" / name)


def latent_tensors() -> tuple[dict, dict]:
    data_format = metadata(LATENT_BUNDLE)["network_data_format"]
    return data_format["inputs"], data_format["outputs"]


def test_latent_network_data_format_describes_the_inference_network():
    """inference.yaml's network_def is ControlNetDiffusion (UNet + ControlNet) on latents: the metadata's 'image' is the
    noisy latent x, then timesteps, the modality (class_labels) and the one-hot mask at image resolution."""
    network, parser = load_bundle_network(latent_config("inference.yaml"), overrides=LATENT_MODALITIES)
    assert isinstance(network, ControlNetDiffusion)
    inputs, outputs = latent_tensors()
    arguments = list(inspect.signature(network.forward).parameters)
    assert list(inputs) == ["image", *arguments[1:]] and list(outputs)[0] == "pred"  # forward's order, image = x
    latent, timesteps, modality, mask = (inputs[k] for k in ("image", "timesteps", "class_labels", "controlnet_cond"))
    pred = outputs["pred"]
    spatial_dims, latent_channels, downsample = latent_geometry(parser.get_parsed_content("autoencoder_def"))
    assert latent["num_channels"] == network.unet.in_channels == latent_channels
    assert pred["num_channels"] == network.unet.out_channels == latent_channels
    image_size = parser.get_parsed_content("image_size")
    assert len(image_size) == spatial_dims == parser.get_parsed_content("spatial_dims")
    assert latent["spatial_shape"] == pred["spatial_shape"] == [s // downsample for s in image_size]
    # the mask: num_classes one-hot channels on the image grid, brought to the latent grid by the ControlNet's embedding
    embedding = network.controlnet.controlnet_cond_embedding.conv_in
    assert mask["num_channels"] == parser.get_parsed_content("num_classes") == embedding.in_channels
    assert mask["spatial_shape"] == image_size and network.cond_downsample == downsample
    assert mask["value_range"] == list(MASK_VALUE_RANGES["condition"])
    for tensor in (latent, pred, mask):
        assert sorted(tensor["channel_def"], key=int) == [str(c) for c in range(tensor["num_channels"])]
    for per_item in (timesteps, modality):  # one integer per batch item
        assert per_item["num_channels"] == 0 and per_item["spatial_shape"] == [] and per_item["dtype"] == "int64"
    assert timesteps["value_range"] == [0, parser.get_parsed_content("num_train_timesteps") - 1]
    assert pred["format"] == PREDICTION_FORMATS[parser.get_parsed_content("prediction_type")]


@pytest.mark.parametrize(
    "config, net_id, inference_id",
    [("train_autoencoder.yaml", "network_def", "autoencoder_def"), ("train_diffusion.yaml", "network_def", "unet_def"),
     ("train_controlnet.yaml", "unet_def", "unet_def"), ("train_controlnet.yaml", "network_def", "controlnet_def")],
)
def test_latent_stages_default_to_the_networks_and_settings_inference_describes(config, net_id, inference_id):
    trained, stage = load_bundle_network(latent_config(config), net_id=net_id, overrides=LATENT_MODALITIES)
    used, inference = load_bundle_network(latent_config("inference.yaml"), net_id=inference_id,
                                          overrides=LATENT_MODALITIES)
    shapes = [{k: tuple(v.shape) for k, v in n.state_dict().items()} for n in (trained, used)]
    assert shapes[0] == shapes[1]
    for key in LATENT_SHARED_SETTINGS:
        if key in stage:
            assert stage.get_parsed_content(key) == inference.get_parsed_content(key), (config, key)


def latent_forward_args(batch: int = 1) -> dict:
    """timesteps, class_labels and an empty mask of the declared shape (controlnet_cond), for ``batch`` items."""
    inputs, _ = latent_tensors()
    mask = inputs["controlnet_cond"]
    return {"timesteps": torch.full((batch,), 999), "class_labels": torch.ones(batch, dtype=torch.long),
            "controlnet_cond": empty_mask(mask["num_channels"], mask["spatial_shape"], batch=batch)}


def test_verify_net_in_out_passes_for_the_latent_inference_network():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=latent_config("metadata.json"),
        config_file=latent_config("inference.yaml"),
        device="cpu",
        extra_forward_args=latent_forward_args(),
        **LATENT_MODALITIES,
    )


def test_latent_inference_network_output_has_the_declared_shape_and_dtype():
    network, _ = load_bundle_network(latent_config("inference.yaml"), overrides=LATENT_MODALITIES)
    inputs, outputs = latent_tensors()
    image, pred = inputs["image"], outputs["pred"]
    x = torch.randn(2, image["num_channels"], *image["spatial_shape"], dtype=getattr(torch, image["dtype"]))
    with torch.no_grad():
        y = network(x, **latent_forward_args(batch=2))
    assert tuple(y.shape) == (2, pred["num_channels"], *pred["spatial_shape"])
    assert y.dtype == getattr(torch, pred["dtype"])


def test_latent_inference_turns_a_mask_of_the_declared_shape_into_an_image_on_its_grid():
    """What inference.yaml does with the network: a one-hot mask as controlnet_cond describes it -> an image with
    image_channels channels on the mask's grid (one denoising step of the default, untrained models)."""
    overrides = {**LATENT_MODALITIES, "scale_factor": 1.0, "num_inference_steps": 1, "progress": False,
                 "device": "$torch.device('cpu')"}
    network, parser = load_bundle_network(latent_config("inference.yaml"), overrides=overrides)
    mask = latent_tensors()[0]["controlnet_cond"]
    masks = empty_mask(mask["num_channels"], mask["spatial_shape"], batch=1)
    images = parser.get_parsed_content("latent_sampler")(masks, network)
    assert tuple(images.shape) == (1, parser.get_parsed_content("image_channels"), *mask["spatial_shape"])
    assert torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------------ properties
def tiny_overrides(tmp_path, diffusion_network: bool = True) -> dict:
    write_dataset(tmp_path / "data")
    overrides = dict(
        dataset_dir=str(tmp_path / "data"),
        bundle_root=str(tmp_path / "bundle"),
        output_dir=str(tmp_path / "outputs"),
        num_classes=3,
        image_size=[16, 16],
        num_workers=0,
    )
    return {**overrides, **(TINY_NETWORK if diffusion_network else {})}


def write_weights(bundle: str, configs, overrides: dict) -> str:
    """Save the state dict of the workflow's own network_def where its model_path points."""
    network, parser = load_bundle_network([str(BUNDLES / bundle / "configs" / c) for c in configs], overrides=overrides)
    path = parser.get_parsed_content("model_path")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


@pytest.mark.parametrize("bundle", PIXEL_BUNDLES)  # train.yaml + inference.yaml; the latent stages: see below
def test_check_properties_empty_for_train_and_inference(tmp_path, bundle):
    overrides = tiny_overrides(tmp_path)
    write_weights(bundle, ["inference.yaml"], overrides)
    # overwrite: training's run-folder check would (rightly) refuse the weights written for inference in the same folder
    assert missing_properties(bundle, overwrite=True, **overrides) == {"train.yaml": [], "inference.yaml": []}


@pytest.fixture(scope="module")
def latent_trained(tmp_path_factory):
    """The latent bundle's three stages trained on tiny models and its two-modality set (tests/test_bundle_latent.py):
    ``(root, paths)``; a later stage and inference need the earlier stages' weights and records."""
    from test_bundle_latent import train_stages

    root = tmp_path_factory.mktemp("latent")
    paths, _, _ = train_stages(root)
    return root, paths


@pytest.mark.parametrize("config, workflow_type", list(BASE_WORKFLOWS[LATENT_BUNDLE].items()))
def test_check_properties_empty_for_latent_workflows(latent_trained, tmp_path, config, workflow_type):
    from test_bundle_latent import stage_overrides

    root, paths = latent_trained
    shutil.copytree(root / "bundle" / "models", tmp_path / "bundle" / "models")  # overwrite may not touch the others'
    paths = {**paths, "bundle_root": str(tmp_path / "bundle")}
    overrides = stage_overrides(config, paths, tmp_path / "outputs")
    assert workflow_missing_properties(LATENT_BUNDLE, [config], workflow_type, **overrides) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "bundle, configs, workflow_type",
    [(b, list(c), t) for b, workflows in OVERLAY_WORKFLOWS.items() for c, t in workflows.items()],
    ids=lambda v: "+".join(v) if isinstance(v, list) else v,
)
def test_check_properties_empty_for_overlay_workflows(tmp_path, monkeypatch, bundle, configs, workflow_type):
    overrides = tiny_overrides(tmp_path, diffusion_network=not any("baseline" in c for c in configs))
    if workflow_type == "infer":
        write_weights(bundle, configs, overrides)
    if "multi_gpu_train.yaml" in configs:  # one process of a torchrun launch, gloo on the CPU
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                                LOCAL_RANK="0").items():
            monkeypatch.setenv(name, value)
    try:
        assert workflow_missing_properties(bundle, configs, workflow_type, **overrides) == []
    finally:
        import ignite.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        ignite.distributed.sync()  # Ignite caches the process group; later tests run without one


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_every_config_is_a_checked_workflow_or_named_as_none(bundle):
    checked = set(BASE_WORKFLOWS[bundle]) | {c for configs in OVERLAY_WORKFLOWS[bundle] for c in configs}
    checked |= set(CHECKED_ELSEWHERE.get(bundle, {}))
    configs = {p.name for p in (BUNDLES / bundle / "configs").glob("*.yaml")}
    assert configs - checked - set(NOT_WORKFLOWS) == set()


# ------------------------------------------------------------------------------------------ folder conventions
def committable_files(folder):
    """Files git would commit under ``folder``: tracked or untracked, minus what .gitignore excludes."""
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", str(folder)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    return [REPO / line for line in done.stdout.splitlines() if (REPO / line).is_file()]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_has_the_model_zoo_files(bundle):
    root = BUNDLES / bundle
    configs = [f"configs/{c}" for c in BASE_WORKFLOWS[bundle]]
    for name in ("LICENSE", "docs/README.md", "configs/metadata.json", *configs, "configs/logging.conf"):
        assert (root / name).is_file(), name
    assert "Apache License" in (root / "LICENSE").read_text()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_docs_have_the_model_zoo_sections(bundle):
    headings = re.findall(r"^## (.+?)\s*$", (BUNDLES / bundle / "docs" / "README.md").read_text(), flags=re.M)
    missing = [s for s in MODEL_ZOO_SECTIONS if s.lower() not in {h.lower() for h in headings}]
    assert missing == [], f"docs/README.md of {bundle} lacks ## {missing}; has {headings}"


def docs_section(bundle: str, heading: str) -> str:
    text = (BUNDLES / bundle / "docs" / "README.md").read_text()
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_docs_commands_show_how_to_verify_the_metadata(bundle):
    assert " ".join(VERIFY_METADATA[1:]) in docs_section(bundle, "Commands")


@pytest.mark.parametrize("bundle", PIXEL_BUNDLES)  # export-network exports network(image, timesteps) only
def test_docs_commands_show_how_to_export(bundle):
    commands = docs_section(bundle, "Commands")
    assert "segdiff export-network" in commands and "torch.export.load(" in commands


def test_latent_docs_say_export_network_does_not_cover_its_network():
    limitations = docs_section(LATENT_BUNDLE, "Limitations")
    assert "export-network" in limitations and "controlnet_cond" in limitations and "class_labels" in limitations


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_no_committed_file_is_over_25_mb(bundle):
    files = committable_files(BUNDLES / bundle)
    assert BUNDLES / bundle / "configs" / "metadata.json" in files
    too_big = [str(f.relative_to(REPO)) for f in files if f.stat().st_size > MAX_FILE_BYTES]
    assert too_big == []


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_no_weights_are_committed_in_models(bundle):
    models = BUNDLES / bundle / "models"
    assert [f.name for f in committable_files(models)] == [".gitkeep"]
    for name in WEIGHT_FILES[bundle]:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(models / name)], cwd=REPO)
        assert ignored.returncode == 0, name  # trained weights stay out of git


# ----------------------------------------------------------------------------------------------------- export
EXPORT_OVERRIDES = {**TINY_NETWORK, "num_classes": 3, "image_size": [16, 16]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mask_to_image's tiny network_def with seeded weights, exported through the command line with dynamic sizes."""
    root = tmp_path_factory.mktemp("export")
    config = str(BUNDLES / "mask_to_image" / "configs" / "inference.yaml")
    torch.manual_seed(3)
    network, _ = load_bundle_network(config, overrides=EXPORT_OVERRIDES)
    with torch.no_grad():  # DiffusionModelUNet starts with a zeroed output layer: trained-like weights give outputs
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save(network.state_dict(), root / "model.pt")
    command = ["export-network", config, "--weights", str(root / "model.pt"), "--output", str(root / "network.pt2"),
               "--dynamic-spatial"]
    for name, value in EXPORT_OVERRIDES.items():
        command += ["--set", f"{name}={value!r}"]
    assert main(command) == 0
    return root, config, network.eval()


@pytest.fixture(scope="module")
def program(exported):
    """The export loaded as a user loads it: with plain PyTorch."""
    root, _, _ = exported
    return torch.export.load(str(root / "network.pt2")).module()


def test_export_loads_with_plain_torch_and_matches_the_eager_network(exported, program):
    _, _, network = exported
    generator = torch.Generator().manual_seed(7)
    for batch, size in ((1, (16, 16)), (4, (16, 16)), (2, (24, 32))):  # batch and spatial sizes not exported
        image = torch.randn((batch, 4, *size), generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        with torch.no_grad():
            expected = network(image, timesteps)
        assert (program(image, timesteps) - expected).abs().max() < 1e-5
        assert expected.abs().max() > 1e-3  # a real output, not zeros on both sides


def test_export_holds_the_weights_file_not_the_initial_ones(exported, program):
    _, config, network = exported
    fresh, _ = load_bundle_network(config, overrides=EXPORT_OVERRIDES)  # other initial weights
    torch.manual_seed(0)
    image, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert (program(image, timesteps) - network(image, timesteps)).abs().max() < 1e-5
        assert (program(image, timesteps) - fresh(image, timesteps)).abs().max() > 1e-3


def test_export_carries_the_bundle_config_and_metadata(exported):
    root, _, _ = exported
    _, extra = load_exported(str(root / "network.pt2"))
    assert extra["metadata.json"]["version"] == metadata("mask_to_image")["version"]
    assert extra["config.json"]["network_def"]["_target_"] == "monai.networks.nets.DiffusionModelUNet"
    assert extra["config.json"]["network_def"]["channels"] == [8, 16]  # with the overrides it was exported with
    assert extra["config.json"]["num_classes"] == 3


def test_export_refuses_a_spatial_size_the_network_cannot_take(program):
    with pytest.raises(AssertionError, match="Guard failed"):  # 15 is not a multiple of the 2 of two levels
        program(torch.randn(1, 4, 15, 16), torch.tensor([3]))


def test_export_network_refuses_weights_that_do_not_fit_the_config(exported, tmp_path, capsys):
    root, config, _ = exported
    output = tmp_path / "network.pt2"
    command = ["export-network", config, "--weights", str(root / "model.pt"), "--output", str(output),
               *[f"--set={k}={v!r}" for k, v in EXPORT_OVERRIDES.items()], "--set", "num_classes=5"]
    assert main(command) == 2
    err = capsys.readouterr().err
    # translated before any work: the file, what differs (shapes), and which keys decide them
    assert f"{root / 'model.pt'} does not fit the configured network_def" in err and "tensor(s) of another shape" in err
    assert "num_classes, image_channels, mask_encoding, network_def" in err
    assert not output.exists()


def test_export_network_refuses_to_overwrite(exported, capsys):
    root, config, _ = exported
    before = (root / "network.pt2").stat().st_mtime_ns
    command = ["export-network", config, "--weights", str(root / "model.pt"), "--output", str(root / "network.pt2")]
    assert main(command) == 2
    assert "exists; pass overwrite (--overwrite)" in capsys.readouterr().err
    assert (root / "network.pt2").stat().st_mtime_ns == before


def test_export_network_names_the_entry_of_a_training_checkpoint(exported, tmp_path, capsys):
    root, config, _ = exported
    state = torch.load(root / "model.pt", weights_only=True)
    torch.save({"network": state, "ema_network": state}, tmp_path / "checkpoint.pt")
    command = ["export-network", config, "--weights", str(tmp_path / "checkpoint.pt"), "--output",
               str(tmp_path / "network.pt2"), *[f"--set={k}={v!r}" for k, v in EXPORT_OVERRIDES.items()]]
    assert main(command) == 2
    assert "checkpoint of several state dicts (network, ema_network)" in capsys.readouterr().err
    assert not (tmp_path / "network.pt2").exists()


def test_export_loads_the_named_entry_of_a_training_checkpoint(exported, tmp_path):
    root, config, _ = exported
    state = torch.load(root / "model.pt", weights_only=True)
    other = {name: torch.zeros_like(value) for name, value in state.items()}
    torch.save({"network": other, "ema_network": state}, tmp_path / "checkpoint.pt")
    loaded, _ = load_bundle_network(config, tmp_path / "checkpoint.pt", overrides=EXPORT_OVERRIDES, key="ema_network")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
