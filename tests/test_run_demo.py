"""scripts/run_demo.py's image_to_mask stage: the side-by-side table and the figure, on hand-made reports and files
(the stage itself runs the documented bundle commands, which the bundle tests cover)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", REPO / "scripts" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(dice: list[float | None], ece: float, auroc: float) -> dict:
    finite = [d for d in dice if d is not None]
    return {"classes": ["csf", "grey", "white"],
            "fused": {"num_cases": 2, "dice": {"mean": sum(finite) / len(finite), "per_class": dice},
                      "ece": {"mean": ece}, "auroc": {"mean": auroc}}}


def test_comparison_table_puts_the_ensemble_and_each_baseline_budget_side_by_side(run_demo):
    table = run_demo.comparison_table(
        report([0.5, 0.7, 0.9], 0.04, 0.91),
        {"equal wall time": report([None, 0.6, 0.8], 0.06, 0.88), "equal steps": report([0.1, 0.2, 0.3], 0.2, 0.5)},
        {"ensemble": {"seconds": 300.0, "steps": 600}, "equal wall time": {"seconds": 312.0, "steps": 2300},
         "equal steps": {"seconds": 60.0, "steps": 600}})
    lines = table.splitlines()
    assert lines[0] == ("| | diffusion ensemble | condition encoder alone, equal wall time | "
                        "condition encoder alone, equal steps |")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in lines[2:]}
    assert rows["Dice csf"] == ["0.500", "-", "0.100"]  # a class without a Dice is shown as such, not as 0
    assert rows["Dice white"] == ["0.900", "0.800", "0.300"]
    assert rows["mean Dice"] == ["0.700", "0.700", "0.200"]
    assert rows["ECE (lower is better)"] == ["0.040", "0.060", "0.200"]
    assert rows["uncertainty AUROC for errors"] == ["0.910", "0.880", "0.500"]
    assert rows["training (min)"] == ["5.0", "5.2", "1.0"]
    assert rows["training steps"] == ["600", "2300", "600"]


def test_overrides_parse_as_python_literals_or_text_and_a_bad_one_is_named(run_demo):
    import argparse

    assert run_demo.parse_override("num_classes=8") == ("num_classes", 8)
    assert run_demo.parse_override("image_size=[64,52]") == ("image_size", [64, 52])
    assert run_demo.parse_override("sampler=ddim") == ("sampler", "ddim")
    with pytest.raises(argparse.ArgumentTypeError, match="--override 'num_classes': expected KEY=VALUE"):
        run_demo.parse_override("num_classes")


def test_trained_steps_reads_iterations_and_epochs_from_a_checkpoint(run_demo, tmp_path):
    import torch

    torch.save({"trainer": {"iteration": 600, "epoch_length": 4, "max_epochs": 150}}, tmp_path / "checkpoint.pt")
    assert run_demo.trained_steps(tmp_path / "checkpoint.pt") == (600, 150)


def test_segmentation_figure_has_one_row_per_slice_and_four_columns(run_demo, tmp_path):
    from PIL import Image

    data, outputs = tmp_path / "data", tmp_path / "segmentations"
    data.mkdir()
    outputs.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[3:9, 2:8] = 2
    nib.save(nib.Nifti1Image(rng.normal(size=label.shape).astype(np.float32), affine), data / "case.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), data / "case_label.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), outputs / "case_seg.nii.gz")
    nib.save(nib.Nifti1Image(rng.random(label.shape).astype(np.float32), affine), outputs / "case_uncertainty.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([label == k for k in range(4)], -1).astype(np.float32), affine),
             outputs / "case_prob.nii.gz")
    (data / "datalist.json").write_text(json.dumps({"test": [{"image": "case.nii.gz", "label": "case_label.nii.gz"}]}))
    figure = tmp_path / "figure.png"
    run_demo.write_segmentation_figure(data / "datalist.json", data, outputs, figure, rows=2)
    width, height = Image.open(figure).size
    # 2 slices of 12 x 10 (rotated: 10 rows x 12 columns), 4 columns, a 2-pixel gap after each, upscaled 2x
    assert (width, height) == (2 * 4 * (12 + 2), 2 * 2 * (10 + 2))
