"""scripts/benchmark_training.py runs the bundle's training path and the diffusers-style loop side by side and reports
both rates (a tiny network and a few steps: this checks the script, it measures nothing)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from bundle_utils import REPO, write_dataset

pytest.importorskip("diffusers", reason="the diffusers-style loop needs diffusers (the test extra)")

TINY = """image_size: [16, 16]
num_classes: 3
batch_size: 8
slices_per_volume: 4
num_workers: 0
warmup_steps: 2
network_channels: [8, 16]
attention_levels: [false, true]
num_res_blocks: 1
num_head_channels: 8
norm_num_groups: 8
"""


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_benchmark_reports_both_loops_and_their_ratio(tmp_path, capsys):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY)
    write_dataset(tmp_path / "data")
    report_path = tmp_path / "throughput.json"
    load_script("benchmark_training").main(
        ["--preset", str(preset), "--dataset-dir", str(tmp_path / "data"), "--steps", "4", "--warmup-steps", "1",
         "--block-steps", "2", "--json", str(report_path)]
    )
    report = json.loads(report_path.read_text())
    ours, theirs = report["loops"]["ours"], report["loops"]["diffusers_style"]
    assert ours["steps"] == theirs["steps"] == 4
    assert ours["samples_per_second"] > 0 and theirs["samples_per_second"] > 0
    assert ours["batch_size"] == theirs["batch_size"] == 8
    assert ours["parameters"] == theirs["parameters"]  # the same architecture on both sides
    assert report["ratio"] == pytest.approx(ours["samples_per_second"] / theirs["samples_per_second"])
    assert f"ratio ours/diffusers-style: {report['ratio']:.2f}" in capsys.readouterr().out


def test_process_clock_refuses_data_loader_workers_it_cannot_count(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY.replace("num_workers: 0", "num_workers: 2"))
    write_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="num_workers = 2"):
        load_script("benchmark_training").main(
            ["--preset", str(preset), "--dataset-dir", str(tmp_path / "data"), "--steps", "1", "--clock", "process"]
        )
