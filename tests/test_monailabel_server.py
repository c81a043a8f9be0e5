"""A real MONAI Label 0.8.5 server, set up and started as scripts/setup_monailabel.py does, serving the three bundles
with tiny weights on a free loopback port: /info, /infer (segmentation, uncertainty, a generated image, a latent image
of a requested modality) and /train of the two pixel-space bundles answer 200, training writes new weights with their
record, the latent bundle's stage records are checked at every /infer, and the returned volumes lie on the study's grid.

The server runs in its own venv, built by the script on first use (about 8 minutes, then cached under
~/.cache/segdiff; CI builds it in .ci/run before the tests). If it cannot be built, these tests fail with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, TINY_NETWORK, TINY_TRAINING, write_dataset
from test_bundle_latent import INFERENCE as LATENT_INFERENCE
from test_bundle_latent import LATENT
from test_bundle_latent import train_stages as train_latent_stages

from segdiff.errors import SegdiffError

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 4  # the bundles' default, so that MONAI Label's label names (from metadata.json) fit the data
SERVER_START_TIMEOUT = 180
REQUEST_TIMEOUT = 300


def load_setup_script():
    spec = importlib.util.spec_from_file_location("setup_monailabel", REPO / "scripts" / "setup_monailabel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = load_setup_script()


def tiny_weights(in_channels: int, out_channels: int, seed: int = 1234) -> dict:
    """A state dict of the tiny network_def, from a seed the bundles never use (seed 0), so that weights that came
    from a fresh initialisation cannot pass for these."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    network = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=TINY_NETWORK["network_def#channels"],
        attention_levels=TINY_NETWORK["network_def#attention_levels"],
        num_res_blocks=TINY_NETWORK["network_def#num_res_blocks"],
        num_head_channels=TINY_NETWORK["network_def#num_head_channels"],
        norm_num_groups=TINY_NETWORK["network_def#norm_num_groups"],
    )
    return network.state_dict()


#: image_to_mask is served with its default model, the condition encoder inside (a tiny one)
TINY_ENCODER = {"encoder_def#channels": [8, 8], "encoder_def#strides": [2], "encoder_def#num_res_units": 0}


def tiny_encoder_weights(seed: int = 1234) -> dict:
    """A state dict of image_to_mask's default network_def (diffusion UNet + condition encoder, one module) at the tiny
    sizes, built by the bundle's own inference.yaml, from a seed the bundles never use."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "image_to_mask" / "configs" / "inference.yaml"))
    parser.update({**TINY_NETWORK, **TINY_ENCODER, "num_classes": NUM_CLASSES, "image_size": [16, 16]})
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    assert hasattr(network, "encoder"), "image_to_mask's default network_def has no condition encoder"
    return network.state_dict()


#: the latent bundle served with the tiny stages test_bundle_latent trains (3 classes, modalities ct and mr)
LATENT_SERVED = {"spatial_dims": 2, "image_size": [16, 16], "conditioning_channels": 8, **LATENT,
                 **{k: v for k, v in LATENT_INFERENCE.items() if k != "num_inference_steps"}}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base: str, method: str, path: str, form: dict | None = None, body: dict | None = None) -> tuple[int, bytes]:
    """One HTTP request to the server; returns (status, body) also for error statuses."""
    data, headers = None, {}
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def infer(server: dict, model: str, study: str, **params) -> nib.Nifti1Image:
    """``POST /infer/<model>?image=<study>&output=image``; checks 200 and returns the returned volume."""
    query = urllib.parse.urlencode({"image": study, "output": "image"})
    status, content = call(server["url"], "POST", f"/infer/{model}?{query}", form={"params": json.dumps(params)})
    assert status == 200, f"/infer/{model} answered {status}: {content[:2000]!r}\n{server['log_tail']()}"
    path = server["root"] / f"{model}_{study}_{len(list(server['root'].glob('*.nii.gz')))}.nii.gz"
    path.write_bytes(content)
    return nib.load(str(path))


def logged(server: dict, text: str, timeout: float = 15.0) -> bool:
    """Whether ``text`` appears in the server log within ``timeout`` seconds (an error's traceback is written after
    the answer went out)."""
    deadline = time.monotonic() + timeout
    while text not in server["log"].read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_on_study_grid(volume: nib.Nifti1Image, study: Path) -> None:
    reference = nib.load(str(study))
    assert volume.shape == reference.shape
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)


@pytest.fixture(scope="module")
def venv():
    try:
        setup.ensure_venv(setup.DEFAULT_VENV)
        setup.install_segdiff(setup.DEFAULT_VENV)
    except setup.VenvBuildError as error:
        pytest.fail(f"MONAI Label's venv could not be built, so the server cannot be tested: {error}", pytrace=False)
    return setup.DEFAULT_VENV


@pytest.fixture(scope="module")
def server(venv, tmp_path_factory):
    """The server on a free port, with studies case0..2 (labelled), case3 (not labelled), mask4 (a label map as the
    study, for mask_to_image) and ctmask0 (a 3-class CT mask, for latent_mask_to_image, whose three stages are trained
    first as test_bundle_latent trains them); stopped (its whole process group) when the module's tests are done."""
    root = tmp_path_factory.mktemp("monailabel")
    data = root / "data"
    write_dataset(data, num_classes=NUM_CLASSES, splits={"training": 4, "test": 1})
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in range(4):
        shutil.copy(data / "images" / f"case{case}.nii.gz", studies / f"case{case}.nii.gz")
        if case < 3:
            shutil.copy(data / "labels" / f"case{case}.nii.gz", studies / "labels" / "final" / f"case{case}.nii.gz")
    shutil.copy(data / "labels" / "case4.nii.gz", studies / "mask4.nii.gz")
    train_latent_stages(root / "latent")
    shutil.copy(root / "latent" / "data" / "masks" / "ct_mask0.nii.gz", studies / "ctmask0.nii.gz")

    weights = {"image_to_mask": root / "image_to_mask.pt", "mask_to_image": root / "mask_to_image.pt",
               "latent_mask_to_image": root / "latent" / "bundle" / "models"}  # the folder of the three stages
    torch.save(tiny_encoder_weights(), weights["image_to_mask"])  # noisy one-hot mask + image (+ the encoder inside)
    torch.save(tiny_weights(1 + NUM_CLASSES, 1), weights["mask_to_image"])  # noisy image + one-hot mask
    small = {**TINY_NETWORK, "image_size": [16, 16]}
    # disagreement: a fraction of the members, so the map shows how many members the request asked for; validation
    # every 5 epochs (the default) does not run in a 1-epoch /train, which must still write model.pt
    training = {k: v for k, v in TINY_TRAINING.items() if k != "val_interval"}
    # v-prediction: untrained, a mask-predicting network returns its zero output layer's constant for every member
    bundles = {"image_to_mask": {**small, **TINY_ENCODER, "prediction_type": "v_prediction", "recycling": False, **training,
                                 "uncertainty": "disagreement"},
               "mask_to_image": {**small, **training},
               "latent_mask_to_image": LATENT_SERVED}
    app = setup.prepare_app(venv, root / "app", bundles, weights)

    port = free_port()
    command = setup.server_command(venv, app, studies, list(bundles), port=port)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the server uses the monai-segdiff installed in its venv
    log = root / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(lines: int = 60) -> str:
        return "server log (last lines):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"the MONAI Label server exited with {process.returncode} at start\n{log_tail()}", pytrace=False)
            try:
                if call(url, "GET", "/info/")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the MONAI Label server did not answer within {SERVER_START_TIMEOUT} s\n{log_tail()}", pytrace=False)
            time.sleep(1)
        yield {"url": url, "root": root, "app": app, "studies": studies, "weights": weights, "log": log, "log_tail": log_tail}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and any training it started
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


pytestmark = pytest.mark.slow


def test_info_lists_both_bundles_their_labels_and_per_request_settings(server):
    status, content = call(server["url"], "GET", "/info/")
    assert status == 200
    info = json.loads(content)
    segmenter = info["models"]["image_to_mask"]
    assert segmenter["labels"] == {"csf": 1, "grey matter": 2, "white matter": 3}
    assert segmenter["config"]["num_members"] == 5 and segmenter["config"]["output"] == "seg"
    assert "num_inference_steps" in segmenter["config"]
    assert {"num_inference_steps", "seed"} <= set(info["models"]["mask_to_image"]["config"])
    latent = info["models"]["latent_mask_to_image"]["config"]
    assert latent["modality"] == ["mr", "ct"]  # a choice: the bundle's default first, then the record's other names
    assert latent["guidance_scale"] == 1.0 and {"num_inference_steps", "seed"} <= set(latent)
    assert latent["model_filename"][0] == "model.pt"  # the empty placeholder MONAI Label loads; the stages: below
    assert sorted(info["trainers"]) == ["image_to_mask", "mask_to_image"]  # the latent bundle has no train.yaml
    # MONAI Label offers models/*.pt as model files: a record (models/model.json) is never among them
    for name, trainer in info["trainers"].items():
        assert trainer["config"]["model_filename"][0] == "model.pt", name
        assert not [f for f in trainer["config"]["model_filename"] if not f.endswith(".pt")], name


def test_infer_returns_a_label_volume_on_the_study_grid(server):
    seg = infer(server, "image_to_mask", "case3", num_members=2, num_inference_steps=2)
    assert_on_study_grid(seg, server["studies"] / "case3.nii.gz")
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.min() >= 0 and labels.max() < NUM_CLASSES


def test_infer_output_uncertainty_returns_the_map_of_the_requested_ensemble(server):
    maps = {}
    for members in (2, 3):
        volume = infer(server, "image_to_mask", "case3", num_members=members, num_inference_steps=2, output="uncertainty")
        assert_on_study_grid(volume, server["studies"] / "case3.nii.gz")
        maps[members] = np.asarray(volume.dataobj)
        assert maps[members].dtype == np.float32
    # disagreement is a fraction of the members that differ from the vote: multiples of 1/num_members, and a tiny
    # random network's members differ somewhere
    for members, values in maps.items():
        np.testing.assert_allclose(values * members, np.round(values * members), atol=1e-5)
        assert 0 < values.max() < 1
    assert not np.allclose(maps[3] * 2, np.round(maps[3] * 2))  # thirds, which 2 members cannot give
    assert "'num_inference_steps': 2" in server["log"].read_text()  # the request's steps reached the sampler


def test_mask_to_image_answers_a_label_map_study_with_a_generated_image(server):
    image = infer(server, "mask_to_image", "mask4", num_inference_steps=2, seed=3)
    assert_on_study_grid(image, server["studies"] / "mask4.nii.gz")
    values = np.asarray(image.dataobj)
    assert values.dtype == np.float32 and values.std() > 0
    assert values.min() >= -1.0 - 1e-5 and values.max() <= 1.0 + 1e-5  # intensities of the training scale
    assert not (server["app"] / "model" / "mask_to_image" / "outputs").exists()  # MONAI Label returns it; nothing written


def test_latent_mask_to_image_answers_a_mask_study_with_a_seeded_image_of_the_requested_modality(server):
    study = server["studies"] / "ctmask0.nii.gz"
    settings = {"num_inference_steps": 2, "seed": 3}
    images = {"mr": infer(server, "latent_mask_to_image", "ctmask0", **settings, modality="mr")}
    assert_on_study_grid(images["mr"], study)
    values = np.asarray(images["mr"].dataobj)
    assert values.dtype == np.float32 and np.isfinite(values).all() and values.std() > 0
    again = infer(server, "latent_mask_to_image", "ctmask0", **settings, modality="mr")
    np.testing.assert_array_equal(np.asarray(again.dataobj), values)  # same settings, same image
    default = infer(server, "latent_mask_to_image", "ctmask0", **settings)  # no modality: the default, mr
    np.testing.assert_array_equal(np.asarray(default.dataobj), values)
    for other in ({"seed": 4}, {"num_inference_steps": 3}):  # another seed or step count: another image
        image = infer(server, "latent_mask_to_image", "ctmask0", **{**settings, **other})
        assert not np.allclose(np.asarray(image.dataobj), values), other
    # the other trained modality answers; a name the UNet was not trained with is refused, naming the trained ones
    assert_on_study_grid(infer(server, "latent_mask_to_image", "ctmask0", **settings, modality="ct"), study)
    query = urllib.parse.urlencode({"image": "ctmask0", "output": "image"})
    status, _ = call(server["url"], "POST", f"/infer/latent_mask_to_image?{query}",
                     form={"params": json.dumps({**settings, "modality": "pet"})})
    assert status != 200 and logged(server, "modality 'pet', not one of: ct, mr"), server["log_tail"]()
    assert not (server["app"] / "model" / "latent_mask_to_image" / "outputs").exists()  # nothing written


def test_the_served_latent_config_hands_each_per_request_setting_to_the_sampler(server):
    """As MONAI Label does per request: the request's values replace displayable_configs, the config is parsed again.
    (The tiny UNet's output barely depends on the modality and the guidance, so the images cannot show these two.)"""
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(str(server["app"] / "model" / "latent_mask_to_image" / "configs" / "inference.yaml"))
    config["bundle_root"] = str(server["app"] / "model" / "latent_mask_to_image")
    for request, modality in (({"modality": ["mr", "ct"]}, 1), ({"modality": "ct"}, 0)):  # the list: the default
        config["displayable_configs"].update({"guidance_scale": 3.0, "num_inference_steps": 4, "seed": 7, **request})
        config.parse()
        sampler = config.get_parsed_content("inferer")
        assert sampler.sampler.modality == modality and sampler.sampler.guidance_scale == 3.0
        assert sampler.sampler.loop.num_inference_steps == 4 and sampler.seed == 7


def test_latent_mask_to_image_checks_the_stage_records_at_every_infer(server):
    models = server["app"] / "model" / "latent_mask_to_image" / "models"
    record = models / "controlnet.json"
    original = record.read_text()
    changed = json.loads(original)
    changed["settings"]["conditioning_channels"] = 4
    record.write_text(json.dumps(changed))
    query = urllib.parse.urlencode({"image": "ctmask0", "output": "image"})
    try:
        status, _ = call(server["url"], "POST", f"/infer/latent_mask_to_image?{query}",
                         form={"params": json.dumps({"num_inference_steps": 2})})
        assert status != 200
        assert logged(server, "conditioning_channels: trained 4, configured 8"), server["log_tail"]()
    finally:
        record.write_text(original)
    image = infer(server, "latent_mask_to_image", "ctmask0", num_inference_steps=2)  # the true record passes again
    assert_on_study_grid(image, server["studies"] / "ctmask0.nii.gz")


def test_train_writes_a_new_model_that_starts_from_the_served_weights_again_and_again(server):
    models = server["app"] / "model" / "image_to_mask" / "models"
    served = torch.load(server["weights"]["image_to_mask"], weights_only=True)
    for run in (1, 2):  # the second run starts over the first one's checkpoint.pt
        before = (models / "model.pt").stat()
        status, content = call(server["url"], "POST", "/train/image_to_mask?run_sync=true",
                               body={"max_epochs": 1, "device": "cpu", "multi_gpu": False})
        assert status == 200, f"/train run {run} answered {status}: {content[:2000]!r}\n{server['log_tail']()}"
        after = (models / "model.pt").stat()
        assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns), "no new models/model.pt"
        trained = torch.load(models / "model.pt", weights_only=True)
        assert set(trained) == set(served)
        # the EMA weights began at the served model (MONAI Label's CheckpointLoader), not at a fresh initialisation
        assert max((trained[k].float() - served[k].float()).abs().max().item() for k in served) < 1e-2
        trainer = torch.load(models / "checkpoint.pt", weights_only=False)["trainer"]
        assert trainer["max_epochs"] == 1 and trainer["iteration"] == trainer["epoch_length"]  # one epoch, this run's
    seg = infer(server, "image_to_mask", "case3", num_members=2, num_inference_steps=2)  # serves the new model
    assert_on_study_grid(seg, server["studies"] / "case3.nii.gz")


def test_train_mask_to_image_writes_a_new_model_and_its_record_and_both_models_still_answer(server):
    from monai.bundle import ConfigParser

    from segdiff.engine.provenance import state_dict_sha256

    models = server["app"] / "model" / "mask_to_image" / "models"
    served = torch.load(server["weights"]["mask_to_image"], weights_only=True)
    before = (models / "model.pt").stat()
    status, content = call(server["url"], "POST", "/train/mask_to_image?run_sync=true",
                           body={"max_epochs": 1, "device": "cpu", "multi_gpu": False})
    assert status == 200, f"/train/mask_to_image answered {status}: {content[:2000]!r}\n{server['log_tail']()}"
    after = (models / "model.pt").stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns), "no new models/model.pt"
    trained = torch.load(models / "model.pt", weights_only=True)
    assert set(trained) == set(served)
    assert max((trained[k].float() - served[k].float()).abs().max().item() for k in served) < 1e-2  # from served
    record = json.loads((models / "model.json").read_text())
    assert record["weights_sha256"] == state_dict_sha256(trained)
    assert record["settings"]["bundle"] == "mask_to_image" and record["settings"]["target"] == "image"
    trainer = torch.load(models / "checkpoint.pt", weights_only=False)["trainer"]
    assert trainer["max_epochs"] == 1 and trainer["iteration"] == trainer["epoch_length"]
    # the record passes the check the served inference config makes before sampling (it raises on a difference)
    config = ConfigParser()
    config.read_config(str(models.parent / "configs" / "inference.yaml"))
    config["bundle_root"] = str(models.parent)
    assert config.get_parsed_content("model_record").verify(config.get_parsed_content("network_def")) is not None

    # the new model (checked against its record) and image_to_mask's still answer
    image = infer(server, "mask_to_image", "mask4", num_inference_steps=2, seed=3)
    assert_on_study_grid(image, server["studies"] / "mask4.nii.gz")
    assert np.asarray(image.dataobj).std() > 0
    seg = infer(server, "image_to_mask", "case3", num_members=2, num_inference_steps=2)
    assert_on_study_grid(seg, server["studies"] / "case3.nii.gz")


def test_prepare_app_copies_the_weights_record_and_drops_a_stale_one(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("")  # an app laid out before: the sample app is not copied again
    weights = tmp_path / "run" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, weights)
    (weights.with_suffix(".json")).write_text('{"format": "record"}')
    models = app / "model" / "mask_to_image" / "models"

    setup.prepare_app(tmp_path / "no-venv", app, {"mask_to_image": {}}, {"mask_to_image": weights})
    assert (models / "model.json").read_text() == '{"format": "record"}'

    other = tmp_path / "other.pt"  # weights without a record: the old record described other weights
    torch.save({"w": torch.ones(1)}, other)
    setup.prepare_app(tmp_path / "no-venv", app, {"mask_to_image": {}}, {"mask_to_image": other})
    assert (models / "model.pt").read_bytes() == other.read_bytes()
    assert not (models / "model.json").exists()


def test_the_app_copies_get_train_configs_with_the_monailabel_training_settings(tmp_path):
    import yaml

    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("")
    setup.prepare_app(tmp_path / "no-venv", app, {"image_to_mask": {}, "mask_to_image": {}})
    for name in ("image_to_mask", "mask_to_image"):
        config = yaml.safe_load((app / "model" / name / "configs" / "train.yaml").read_text())
        assert config["overwrite"] is True and config["datalist"] == "MONAI Label datastore", name
        assert config["lr_scheduler"]["t_total"].startswith("$@train#trainer#max_epochs"), name
        assert (app / "model" / name / "configs" / "multi_gpu_train.yaml").exists(), name


def test_a_venv_that_cannot_be_built_raises_with_the_failing_step(tmp_path):
    assert issubclass(setup.VenvBuildError, SegdiffError)
    with pytest.raises(setup.VenvBuildError, match="creating the venv failed"):
        setup.ensure_venv(tmp_path / "venv", python=str(tmp_path / "no-such-python"), quiet=True)
    assert not setup.venv_ready(tmp_path / "venv")


def test_set_overrides_go_to_one_bundle_or_to_all(tmp_path):
    names = ["image_to_mask", "mask_to_image"]
    overrides = setup._overrides(["image_to_mask:num_members=3", "image_size=[16, 16]", "sampler=ddpm"], names)
    assert overrides == {
        "image_to_mask": {"num_members": 3, "image_size": [16, 16], "sampler": "ddpm"},
        "mask_to_image": {"image_size": [16, 16], "sampler": "ddpm"},
    }
    config = {"network_def": {"channels": [64, 128]}, "handlers": [{"a": 1}]}
    setup.set_config_item(config, "network_def#channels", [8, 16])
    setup.set_config_item(config, "handlers#0#a", 2)
    assert config == {"network_def": {"channels": [8, 16]}, "handlers": [{"a": 2}]}


def test_an_override_or_a_bundle_that_cannot_be_used_is_a_segdiff_refusal(tmp_path):
    with pytest.raises(SegdiffError, match="'channels' is int, neither a dict nor a list"):
        setup.set_config_item({"channels": 3}, "channels#0", 8)
    with pytest.raises(SegdiffError, match="'handlers' is a list of 1, and '2' is not an index into it"):
        setup.set_config_item({"handlers": [{}]}, "handlers#2#a", 8)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("")
    with pytest.raises(SegdiffError, match="no such bundle"):
        setup.prepare_app(tmp_path / "no-venv", tmp_path / "app", {"no_such_bundle": {}})


def test_setup_script_refuses_a_missing_studies_folder_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_setup_script().main(["--studies", str(tmp_path / "missing"), "--venv", str(tmp_path / "venv"), "--no-start"])
    assert exit_info.value.code == 2
    assert f"--studies {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "venv").exists()


def write_stage_folder(folder: Path, stages=("autoencoder.pt", "diffusion.pt", "controlnet.pt")) -> Path:
    """A folder of weight files, each with a record, as the latent bundle's training writes them (tiny stand-ins)."""
    folder.mkdir(parents=True)
    for index, name in enumerate(stages):
        torch.save({"w": torch.full((1,), float(index))}, folder / name)
        (folder / name).with_suffix(".json").write_text(json.dumps({"format": "record", "stage": name}))
    return folder


def test_prepare_app_serves_the_latent_stages_with_an_empty_model_pt_for_monailabel(tmp_path):
    import yaml

    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("")
    stages = write_stage_folder(tmp_path / "run" / "models")
    setup.prepare_app(tmp_path / "no-venv", app, {"latent_mask_to_image": {}}, {"latent_mask_to_image": stages})
    target = app / "model" / "latent_mask_to_image"
    for name in setup.STAGE_WEIGHTS["latent_mask_to_image"]:  # each stage under its own name, with its record
        assert (target / "models" / name).read_bytes() == (stages / name).read_bytes()
        assert json.loads((target / "models" / name).with_suffix(".json").read_text())["stage"] == name
    assert torch.load(target / "models" / "model.pt", weights_only=True) == {}  # MONAI Label's load: a no-op
    config = yaml.safe_load((target / "configs" / "inference.yaml").read_text())
    assert config["mask_key"] == "image" and config["network_def"] == "$torch.nn.Module()"
    assert not (target / "configs" / "train.yaml").exists()  # inference only: MONAI Label offers no trainer


def test_prepare_app_offers_no_latent_model_while_a_stage_file_is_missing(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("")
    models = write_stage_folder(app / "model" / "latent_mask_to_image" / "models", ("autoencoder.pt", "diffusion.pt"))
    torch.save({}, models / "model.pt")  # an earlier copy's placeholder, but no controlnet.pt now
    setup.prepare_app(tmp_path / "no-venv", app, {"latent_mask_to_image": {}})
    assert not (models / "model.pt").exists()  # MONAI Label skips the bundle instead of failing at start
    assert "lacks controlnet.pt" in capsys.readouterr().out


def test_setup_script_refuses_latent_weights_that_are_not_the_stage_folder_before_any_work(tmp_path, capsys):
    (tmp_path / "studies").mkdir()
    stages = write_stage_folder(tmp_path / "models", stages=("autoencoder.pt", "diffusion.pt"))
    for path in (stages, stages / "diffusion.pt"):
        with pytest.raises(SystemExit) as exit_info:
            load_setup_script().main(["--studies", str(tmp_path / "studies"), "--venv", str(tmp_path / "venv"),
                                      "--bundles", "latent_mask_to_image", "--weights", f"latent_mask_to_image={path}"])
        assert exit_info.value.code == 2
        assert "latent_mask_to_image takes the folder of its weights" in capsys.readouterr().err
    assert not (tmp_path / "venv").exists()


# ---- the latent bundle's stages, as the served sampler loads them (tiny stand-in modules, real records) -----------
class TinyDenoiser(torch.nn.Module):
    """Stands in for ControlNetDiffusion: what LatentStages needs of it is a unet and a controlnet."""

    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Linear(2, 2)
        self.controlnet = torch.nn.Linear(2, 2)


def tiny_stages(folder: Path, controlnet_settings: dict | None = None):
    """LatentStages over tiny modules whose weight files (seeded, with records) are written to ``folder``; the
    ControlNet's file is recorded with ``controlnet_settings`` (default: the settings the stages check)."""
    from segdiff.engine import ModelRecord
    from segdiff.engine.latent_inference import LatentStages
    from segdiff.engine.provenance import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    autoencoder, network = torch.nn.Linear(2, 2), TinyDenoiser()
    modules = {"autoencoder": autoencoder, "diffusion": network.unet, "controlnet": network.controlnet}
    records = {}
    for index, (name, module) in enumerate(modules.items()):
        checked = {"stage": name, **({"conditioning_channels": 8} if name == "controlnet" else {})}
        records[name] = ModelRecord(checked, weights_path=folder / f"{name}.pt", bundle="latent_mask_to_image")
        trained = copy.deepcopy(module)
        torch.nn.init.constant_(trained.weight, float(index + 1))
        settings = controlnet_settings if name == "controlnet" and controlnet_settings else checked
        written = ModelRecord(settings, bundle="latent_mask_to_image").build(trained)
        save_weights(trained.state_dict(), folder / f"{name}.pt", written)
    return LatentStages(autoencoder, network, records)


def test_latent_stages_check_every_record_before_loading_any(tmp_path):
    stages = tiny_stages(tmp_path, controlnet_settings={"stage": "controlnet", "conditioning_channels": 4})
    before = stages.autoencoder.weight.detach().clone()
    with pytest.raises(SegdiffError, match="conditioning_channels"):
        stages.load()
    assert torch.equal(stages.autoencoder.weight, before)  # the autoencoder's file was fine, and is not loaded either


def test_latent_stages_load_into_their_modules_once_until_a_file_changes(tmp_path):
    stages = tiny_stages(tmp_path)
    stages.load_once()
    assert [float(m.weight[0, 0]) for m in stages.modules().values()] == [1.0, 2.0, 3.0]
    with torch.no_grad():
        stages.network.controlnet.weight.zero_()
    stages.load_once()  # the same files, unchanged: not loaded again
    assert float(stages.network.controlnet.weight[0, 0]) == 0.0
    path = tmp_path / "controlnet.pt"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a new file there
    stages.load_once()
    assert float(stages.network.controlnet.weight[0, 0]) == 3.0


def test_latent_stages_serve_their_network_for_an_empty_module_and_refuse_another(tmp_path):
    stages = tiny_stages(tmp_path)
    assert stages.network_for(torch.nn.Module()) is stages.network  # MONAI Label's network_def in the copy
    assert float(stages.network.unet.weight[0, 0]) == 2.0  # loaded on the way
    assert stages.network_for(stages.network) is stages.network
    with pytest.raises(SegdiffError, match="not its stages' network"):
        stages.network_for(torch.nn.Linear(2, 2))


def test_a_setting_monailabel_sends_as_its_list_of_choices_is_the_first_entry():
    from segdiff.engine.latent_inference import chosen

    assert chosen(["mr", "ct"]) == "mr" and chosen("ct") == "ct" and chosen(2.0) == 2.0
    with pytest.raises(SegdiffError, match="at least one entry"):
        chosen([])
