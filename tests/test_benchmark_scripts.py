"""The benchmark scripts run and print their tables (tiny networks, few steps: this checks them, it measures nothing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = """image_size: [16, 16]
num_classes: 3
network_def#channels: [8, 16]
network_def#attention_levels: [false, false]
network_def#num_res_blocks: 1
network_def#num_head_channels: 8
network_def#norm_num_groups: 8
"""


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_preset(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def test_sampling_benchmark_prints_one_row_per_sampler(tiny_preset, capsys):
    load_script("benchmark_sampling").main(["--preset", tiny_preset, "--samplers", "ddim:3", "ddpm:4", "--batch-size", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ddim") or line.startswith("| ddpm")]
    assert [r.split("|")[1].strip() for r in rows] == ["ddim", "ddpm"]
    assert all(float(r.split("|")[4]) > 0 for r in rows)  # seconds per image


def test_ensemble_benchmark_compares_one_batch_with_sequential_chains(tiny_preset, capsys):
    load_script("benchmark_ensemble").main(
        ["--preset", tiny_preset, "--slices", "2", "--num-members", "2", "--ddpm-steps", "6", "--ddim-steps", "1", "2",
         "--batched-ddpm", "--clock", "process"]  # CPU time of this process: other jobs on the machine do not count
    )
    out = capsys.readouterr().out
    batched = [line.split("|")[1].strip() for line in out.splitlines() if "one batch" in line]
    assert batched == ["2 members as one batch, DDIM-1", "2 members as one batch, DDIM-2", "2 members as one batch, DDPM-6"]
    assert "sequential chains (published)" in out
    fast = [line for line in out.splitlines() if "one batch" in line][0]
    assert float(fast.split("|")[3].strip().rstrip("x")) > 1.0  # fewer, batched steps are faster


def test_ensemble_benchmark_times_the_published_protocol_on_fewer_slices(tiny_preset, capsys):
    load_script("benchmark_ensemble").main(
        ["--preset", tiny_preset, "--slices", "3", "--published-slices", "1", "--num-members", "2", "--ddpm-steps", "4",
         "--ddim-steps", "2", "--clock", "process"]
    )
    out = capsys.readouterr().out
    assert "process time" in out.splitlines()[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in out.splitlines() if "DDPM-4" in line or "DDIM-2" in line}
    published = rows["2 x DDPM-4, sequential chains (published)"]
    assert float(published[0]) > 0 and published[1].strip() == "1.0x"
    assert float(rows["2 members as one batch, DDIM-2"][1].strip().rstrip("x")) > 0


def test_ensemble_benchmark_can_skip_the_published_protocol(tiny_preset, capsys):
    load_script("benchmark_ensemble").main(
        ["--preset", tiny_preset, "--slices", "2", "--published-slices", "0", "--num-members", "2", "--ddim-steps", "2"]
    )
    out = capsys.readouterr().out
    assert "sequential chains" not in out
    assert [line.split("|")[3].strip() for line in out.splitlines() if "DDIM-2" in line] == ["n/a"]
