"""Scoring the files an image -> mask inference run wrote: fused segmentation vs a single member (Dice, HD95), whether
the uncertainty map flags the errors (AUROC) and how well the mean probabilities are calibrated (ECE)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.transforms import LoadImage

from segdiff.evaluation.ensemble_metrics import (
    expected_calibration_error,
    segmentation_scores,
    summarize,
    uncertainty_error_auroc,
)
from segdiff.transforms.io import sample_output_paths

__all__ = ["REQUIRED_OUTPUTS", "check_segmentation_outputs", "evaluate_ensemble", "ensemble_markdown"]

logger = logging.getLogger(__name__)

#: files an inference run must have written for a full evaluation (members are optional: a UNet has none)
REQUIRED_OUTPUTS = ("seg", "uncertainty", "prob")


def _output(entry: Mapping[str, Any], output_dir: str, name: str) -> str:
    return sample_output_paths(entry["image"], output_dir, 1, name)[0]


def check_segmentation_outputs(entries: Sequence[Mapping[str, Any]], output_dir: str) -> int:
    """Stop before scoring if a case's segmentation, uncertainty or probability file is missing."""
    missing = [_output(e, output_dir, n) for e in entries for n in REQUIRED_OUTPUTS if not os.path.exists(_output(e, output_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} inference output(s) missing, e.g. {missing[0]}: run inference.yaml with the same "
            "output_dir and --save_probabilities True (and --save_members True to score a single member)."
        )
    return len(entries)


def _clean(values: Sequence[float]) -> list[float | None]:
    return [None if v is None or not math.isfinite(v) else round(float(v), 4) for v in values]


def evaluate_ensemble(
    entries: Sequence[Mapping[str, Any]],
    output_dir: str,
    num_classes: int,
    report_dir: str,
    class_names: Sequence[str] | None = None,
    num_bins: int = 15,
) -> dict[str, Any]:
    """Score every test case's outputs against its label and write ``ensemble_evaluation.{json,md}``.

    Args:
        entries: test entries with absolute ``"image"`` (names the outputs) and ``"label"`` (the truth).
        output_dir: where inference wrote ``<case>_seg``, ``_uncertainty``, ``_prob`` (and ``_members``).
        num_classes: classes including background.
        report_dir: folder of the report.
        class_names: names of classes ``1..num_classes-1``.
        num_bins: confidence bins of the calibration error.
    """
    names = list(class_names or [f"class_{c}" for c in range(1, num_classes)])
    check_segmentation_outputs(entries, output_dir)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    fused_cases, member_cases, cases = [], [], []
    for entry in entries:
        truth = load(entry["label"])
        spacing = [float(s) for s in truth.pixdim]
        truth = torch.as_tensor(truth)[0].long()
        seg = torch.as_tensor(load(_output(entry, output_dir, "seg")))[0].long()
        uncertainty = torch.as_tensor(load(_output(entry, output_dir, "uncertainty")))[0]
        prob = torch.as_tensor(load(_output(entry, output_dir, "prob"))).float()
        fused = segmentation_scores(seg, truth, num_classes, spacing=spacing)
        fused["auroc"] = uncertainty_error_auroc(uncertainty, seg, truth)
        fused["ece"] = expected_calibration_error(prob / prob.sum(0, keepdim=True).clamp_min(1e-8), truth, num_bins)
        fused_cases.append(fused)
        case = {"image": str(entry["image"]), "fused": {k: _clean(v) if isinstance(v, list) else _clean([v])[0] for k, v in fused.items()}}
        members_path = _output(entry, output_dir, "members")
        if os.path.exists(members_path):
            member = torch.as_tensor(load(members_path))[0].long()
            single = segmentation_scores(member, truth, num_classes, spacing=spacing)
            member_cases.append(single)
            case["single_member"] = {k: _clean(v) for k, v in single.items()}
        cases.append(case)
    report = {"classes": names, "fused": summarize(fused_cases), "cases": cases}
    if member_cases:
        report["single_member"] = summarize(member_cases)
    report = json.loads(json.dumps(report, default=float).replace("NaN", "null"))
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "ensemble_evaluation.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = ensemble_markdown(report)
    with open(os.path.join(report_dir, "ensemble_evaluation.md"), "w") as f:
        f.write("# Segmentation and uncertainty on the test split\n\n" + table)
    logger.info("\n" + table)
    print(table)
    return report


def ensemble_markdown(report: Mapping[str, Any]) -> str:
    """Dice per class, mean Dice and mean HD95 of the fused segmentation (and of one member), with the AUROC of the
    uncertainty for misclassified voxels and the calibration error of the mean probabilities."""
    names = report["classes"]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"  # noqa: E731
    header = "| segmentation | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice | mean HD95 (mm) | uncertainty AUROC | ECE |"
    lines = [header, "|---" * (len(names) + 5) + "|"]
    for label, key in (("fused ensemble", "fused"), ("single member", "single_member")):
        if key not in report:
            continue
        entry = report[key]
        dice = entry["dice"]["per_class"]
        extra = [fmt(entry.get(k, {}).get("mean")) for k in ("auroc", "ece")] if key == "fused" else ["", ""]
        lines.append(
            f"| {label} | " + " | ".join(fmt(v) for v in dice) + f" | {fmt(entry['dice']['mean'])} | {fmt(entry['hd95']['mean'])} | "
            + " | ".join(extra) + " |"
        )
    return "\n".join(lines) + "\n"
