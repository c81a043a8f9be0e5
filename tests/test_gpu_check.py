"""scripts/gpu_check.py on a CPU with --tiny: the same phases and report as on a GPU, in seconds (this checks the
script, it measures nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PHASES = ["environment", "data", "training", "sampling", "rflow", "volume_3d", "latent_3d"]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The built-in demo data, written once for the module (the script would write it itself otherwise)."""
    from segdiff.data.demo import write_demo_data

    folder = tmp_path_factory.mktemp("demo")
    write_demo_data(folder)
    return folder


#: a tiny CPU run: one epoch of 4 steps (7 training slabs, 2 per batch), 1 of them untimed
TINY_RUN = ("--device cpu --tiny --steps 4 --untimed-steps 1 --samplers dpm_solver:2 ddim:2 --sample-batch 2 "
            "--rflow-steps 4 --rflow-sampler euler:2 --volume-size 16").split()


def tiny_args(demo_dir, out, *extra):
    return [*TINY_RUN, "--data-dir", str(demo_dir), "--output-dir", str(out), *extra]


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_cpu_run_writes_every_phase_with_positive_measurements(demo_dir, tmp_path, capsys):
    gpu_check = load_gpu_check()
    assert gpu_check.main(tiny_args(demo_dir, tmp_path)) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())

    assert list(report["phases"]) == PHASES
    assert report["settings"]["tiny"] is True and report["settings"]["steps"] == 4
    assert positive(report["total_wall_s"])
    env = report["phases"]["environment"]
    assert env["status"] == "ok" and env["device_type"] == "cpu" and env["torch"] and env["monai"]
    assert env["peak_bf16_flops"] is None  # no peak table for a CPU: MFU stays null, with a note

    train = report["phases"]["training"]
    assert train["status"] == "ok", train
    assert train["steps"] == 4 and train["timed_steps"] == 3
    for key in (
        "samples_per_s",
        "end_to_end_samples_per_s",
        "peak_memory_mb",
        "forward_flops_per_batch",
        "achieved_flops",
    ):
        assert positive(train[key]), key
    assert all(positive(v) for v in train["step_time_s"].values())
    assert train["train_flops_per_step"] == 3 * train["forward_flops_per_batch"]
    assert train["mfu"] is None and train["mfu_note"]

    rows = report["phases"]["sampling"]["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("dpm_solver", 2), ("ddim", 2)]
    for row in rows:
        assert row["status"] == "ok" and row["output_finite"], row
        assert positive(row["seconds_per_slice"]) and positive(row["images_per_s"])

    rflow = report["phases"]["rflow"]
    if gpu_check.rflow_available(gpu_check.REPO / "configs" / "demo_cpu.yaml"):
        assert rflow["status"] == "ok", rflow
        assert [r["sampler"] for r in rflow["sampling_rows"]] == ["euler"]
        assert rflow["sampling_rows"][0]["status"] == "ok" and positive(rflow["training"]["samples_per_s"])
    else:
        assert rflow["status"] == "not available"

    volume = report["phases"]["volume_3d"]
    assert volume["status"] == "ok" and volume["volume"] == [16, 16, 16]
    assert positive(volume["forward_backward_s"]) and positive(volume["peak_memory_mb"])
    latent = report["phases"]["latent_3d"]
    assert latent["status"] == "ok" and "randomly initialised" in latent["weights"]
    (row,) = latent["rows"]
    assert row["status"] == "ok" and row["size"] == [16, 16, 16] and row["latent_shape"] == [2, 8, 8, 8]
    assert positive(row["sampling_s"]) and positive(row["decoding_s"]) and positive(row["total_s"])
    assert "| sampler | steps |" in capsys.readouterr().out  # the readable table


def test_a_failing_phase_is_recorded_and_the_later_phases_still_run(demo_dir, tmp_path, monkeypatch):
    gpu_check = load_gpu_check()

    def broken_training(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "train_bundle", broken_training)
    assert gpu_check.main(tiny_args(demo_dir, tmp_path, "--no-rflow")) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())

    training = report["phases"]["training"]
    assert training["status"] == "error" and "planted failure" in training["error"] and training["traceback"]
    sampling = report["phases"]["sampling"]  # times the same network untrained
    assert sampling["status"] == "ok" and sampling["weights"].startswith("untrained")
    assert all(row["status"] == "ok" for row in sampling["rows"])
    assert report["phases"]["volume_3d"]["status"] == "ok"
    assert "rflow" not in report["phases"]


def test_rflow_is_recorded_as_not_available_when_train_yaml_has_no_diffusion_key(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    config = tmp_path / "train.yaml"
    config.write_text("image_size: [8, 8]\n")
    monkeypatch.setattr(gpu_check, "TRAIN_CONFIG", config)
    preset = gpu_check.REPO / "configs" / "demo_cpu.yaml"
    assert not gpu_check.rflow_available(preset)
    entry = gpu_check.rflow_run(preset, {}, None, tmp_path, None, None, {}, False)
    assert entry == {
        "status": "not available",
        "note": "rflow: not available in this checkout (train.yaml has no 'diffusion' key)",
    }
    config.write_text("diffusion: ddpm\n")
    assert gpu_check.rflow_available(preset)


def test_phases_after_the_time_budget_are_skipped_and_the_report_still_written(tmp_path):
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--device", "cpu", "--tiny", "--time-budget-s", "0", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["phases"]) == PHASES
    assert all(p["status"] == "skipped" and "time budget" in p["reason"] for p in report["phases"].values())
