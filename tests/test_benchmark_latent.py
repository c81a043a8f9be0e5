"""scripts/benchmark_latent.py with tiny networks on 16^3 volumes: the rows, the table and the JSON it writes, and how
a size that passes the time cap, runs out of memory or whose child is killed is reported (this checks the script, it
measures nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--tiny", "--device", "cpu", "--steps", "2"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark_latent():
    return load_script("benchmark_latent")


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def table_rows(out):
    return [line for line in out.splitlines() if line.startswith("| 16x16x16")]


def test_a_size_run_in_its_child_process_reports_shapes_times_memory_and_hardware(benchmark_latent, tmp_path, capsys):
    output = tmp_path / "latent.json"
    assert benchmark_latent.main([*TINY, "--sizes", "16", "--output", str(output)]) == 0
    report = json.loads(output.read_text())

    assert report["schema"] == benchmark_latent.SCHEMA and report["bundle"] == "latent_mask_to_image"
    assert "randomly initialised" in report["weights"] and "random" in report["data"]
    hardware = report["hardware"]
    assert hardware["cpu_model"] and positive(hardware["cpu_cores"]) and hardware["torch"] and hardware["monai"]
    assert report["settings"]["isolation"] == "process" and report["settings"]["config"]["sampler"] == "dpm_solver"
    (row,) = report["rows"]
    assert row["status"] == "ok", row
    assert row["size"] == [16, 16, 16] and row["latent_shape"] == [2, 8, 8, 8]  # tiny autoencoder: 2 channels, /2
    assert row["output_shape"] == [1, 1, 16, 16, 16] and row["output_finite"]
    assert (row["sampler"], row["steps"], row["steps_done"]) == ("dpm_solver", 2, 2)
    assert positive(row["sampling_s"]) and positive(row["decoding_s"]) and positive(row["seconds_per_step"])
    assert row["total_s"] >= row["sampling_s"] + row["decoding_s"] and positive(row["process_cpu_s"])
    assert row["decode_sliding_window"] is False and row["decode_roi_size"] is None and row["decoder_calls"] == 1
    assert positive(row["peak_memory_mb"]) and row["peak_memory_growth_mb"] >= 0
    assert "ru_maxrss" in row["memory_kind"] and "whole process" not in row["memory_kind"]  # the child's own peak

    out = capsys.readouterr().out
    (line,) = table_rows(out)
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[1:4] == ["[2, 8, 8, 8]", "dpm_solver", "2"] and cells[-1] == "ok"
    assert all(float(cells[i]) >= 0 for i in (4, 5, 6, 7, 8))  # sampling, decoding, total, CPU seconds, memory
    assert "peak RSS growth (MB)" in out and hardware["cpu_model"] in out


def test_sliding_window_decoding_is_reported_with_its_latent_roi(benchmark_latent, tmp_path):
    args = benchmark_latent.parse_args([*TINY, "--sizes", "16", "--isolation", "none", "--decode-roi-size", "4"])
    (row,) = benchmark_latent.benchmark(args)["rows"]
    assert row["status"] == "ok", row
    assert row["decode_sliding_window"] is True and row["decode_roi_size"] == [4, 4, 4]
    assert row["decode"].startswith("sliding window, roi [4, 4, 4] latent ([8, 8, 8] image)")
    assert row["decoder_calls"] > 1  # one decoder call per window
    assert "whole process" in row["memory_kind"]  # in this process: its peak is not the size's own


def test_sizes_over_the_time_cap_are_reported_as_such_and_the_run_goes_on(benchmark_latent, tmp_path, capsys):
    output = tmp_path / "cap.json"
    argv = [*TINY, "--sizes", "16", "16", "--isolation", "none", "--max-seconds-per-size", "0", "--output", str(output)]
    assert benchmark_latent.main(argv) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [row["status"] for row in rows] == ["over time cap", "over time cap"]
    assert all(row["steps_done"] == 0 and "total_s" not in row for row in rows)
    assert "before denoising step 1" in rows[0]["reason"]
    assert [line.split("|")[-2].strip() for line in table_rows(capsys.readouterr().out)] == [
        "over the 0 s cap (0/2 steps done)"] * 2


def test_a_size_out_of_memory_is_reported_and_the_next_size_still_runs(benchmark_latent, monkeypatch):
    from segdiff.engine.latent_inference import LatentGridSampler

    calls = []

    def out_of_memory(self, inputs, network):
        calls.append(inputs.shape)
        if len(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes.")
        return original(self, inputs, network)

    original = LatentGridSampler.__call__
    monkeypatch.setattr(LatentGridSampler, "__call__", out_of_memory)
    args = benchmark_latent.parse_args([*TINY, "--sizes", "16", "16", "--isolation", "none"])
    rows = benchmark_latent.benchmark(args)["rows"]
    assert [row["status"] for row in rows] == ["out of memory", "ok"]
    assert "can't allocate memory" in rows[0]["error"]
    assert benchmark_latent.status_text(rows[0]) == "out of memory: tried to allocate 16.0 GiB"


def test_a_child_still_running_past_the_hard_cap_is_killed_and_reported_with_its_progress(benchmark_latent, tmp_path):
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps({"steps_done": 3, "step_seconds": [2.0, 2.0, 2.0], "decoder_calls": 0,
                                    "sampling_s": None, "elapsed_s": 6.5}))
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    row = benchmark_latent.run_child(command, tmp_path / "result.json", progress, timeout=0.5)
    assert row["status"] == "over time cap" and "killed" in row["reason"]
    assert row["steps_done"] == 3 and row["seconds_per_step"] == 2.0 and row["wall_s_with_startup"] < 30


def test_a_child_killed_by_sigkill_is_reported_as_out_of_memory(benchmark_latent, tmp_path):
    command = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    row = benchmark_latent.run_child(command, tmp_path / "result.json", tmp_path / "none.json", timeout=30)
    assert row["status"] == "out of memory" and "SIGKILL" in row["error"] and "OOM killer" in row["error"]
