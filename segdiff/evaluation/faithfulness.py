"""Faithfulness of generated images to their masks (Konz et al.): segment each generated image with a segmenter
trained on real images and score the result against the mask it was generated from. The same segmenter on the real
test images gives the ceiling a perfect generator could reach."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImage

from segdiff.evaluation.segmenter import per_class_dice, segment_case
from segdiff.transforms.io import sample_output_paths

__all__ = ["check_generated_exist", "evaluate_faithfulness", "markdown_table"]

logger = logging.getLogger(__name__)


def check_generated_exist(entries: Sequence[Mapping[str, Any]], generated_dir: str, num_samples: int = 1) -> int:
    """Stop before any training if a mask's generated image is missing; returns the number of images found."""
    missing, found = [], 0
    for entry in entries:
        for path in sample_output_paths(entry["label"], generated_dir, num_samples, "image"):
            if os.path.exists(path):
                found += 1
            else:
                missing.append(path)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} generated image(s) missing in {generated_dir}, e.g. {missing[0]}: run inference.yaml "
            "first with the same output_dir and num_samples."
        )
    return found


def _summary(rows: list[np.ndarray], class_names: Sequence[str]) -> dict[str, Any]:
    if not rows:
        return {"per_class_dice": {name: None for name in class_names}, "mean_dice": None, "num_images": 0}
    table = np.stack(rows)
    with np.errstate(all="ignore"):
        per_class = np.nanmean(table, axis=0)
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else None
    return {
        "per_class_dice": {name: (None if np.isnan(v) else round(float(v), 4)) for name, v in zip(class_names, per_class)},
        "mean_dice": None if mean is None else round(mean, 4),
        "num_images": len(rows),
    }


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report's Dice figures as a markdown table: one row per image source, one column per class."""
    names = list(report["generated"]["per_class_dice"])
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| images | " + " | ".join(names) + " | mean | n |", "|---" * (len(names) + 3) + "|"]
    for label, key in (("generated (faithfulness)", "generated"), ("real test images (ceiling)", "real")):
        entry = report[key]
        cells = [fmt(entry["per_class_dice"][n]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(entry['mean_dice'])} | {entry['num_images']} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def evaluate_faithfulness(
    entries: Sequence[Mapping[str, Any]],
    generated_dir: str,
    segmenter: torch.nn.Module,
    num_classes: int,
    spatial_dims: int,
    image_size: Sequence[int] | None,
    load_real: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    report_dir: str,
    num_samples: int = 1,
    slice_axis: int = 2,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score generated images against their conditioning masks, next to the real-image ceiling.

    Args:
        entries: test entries with absolute ``"label"`` (the conditioning mask) and ``"image"`` (the real image).
        generated_dir: the inference ``output_dir`` holding ``<case>_image.nii.gz`` (or ``_sample<k>_``) files.
        segmenter: reference segmentation network trained on real images (outputs ``num_classes`` logits).
        num_classes: classes including background.
        spatial_dims, image_size, slice_axis: how the segmenter sees a case (as in training).
        load_real: transform loading an entry's real ``"image"`` (scaled as in training) and ``"label"``.
        report_dir: where ``faithfulness.json`` and ``faithfulness.md`` are written.
        num_samples: generated images per mask.
        class_names: names of classes ``1..num_classes-1`` (default ``class_1``...).

    Returns:
        the report: per-class and mean Dice for generated and for real images, and per-case figures.
    """
    names = list(class_names or [f"class_{c}" for c in range(1, num_classes)])
    if len(names) != num_classes - 1:
        raise ValueError(f"class_names has {len(names)} names; {num_classes - 1} foreground classes expected.")
    device = next(segmenter.parameters()).device
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    generated_rows, real_rows, cases = [], [], []
    check_generated_exist(entries, generated_dir, num_samples)
    for entry in entries:
        paths = sample_output_paths(entry["label"], generated_dir, num_samples, "image")
        real = load_real(dict(entry))
        mask = torch.as_tensor(real["label"])[0]
        case = {"label": str(entry["label"]), "generated_dice": [], "real_dice": None}
        for path in paths:
            generated = loader(path)
            if tuple(generated.shape[1:]) != tuple(mask.shape):
                raise ValueError(f"{path} has shape {tuple(generated.shape[1:])}, its mask {tuple(mask.shape)}.")
            prediction = segment_case(segmenter.to(device), generated, spatial_dims, image_size, slice_axis)
            dice = per_class_dice(prediction, mask, num_classes)
            generated_rows.append(dice)
            case["generated_dice"].append([None if np.isnan(v) else round(float(v), 4) for v in dice])
        prediction = segment_case(segmenter, torch.as_tensor(real["image"]), spatial_dims, image_size, slice_axis)
        dice = per_class_dice(prediction, mask, num_classes)
        real_rows.append(dice)
        case["real_dice"] = [None if np.isnan(v) else round(float(v), 4) for v in dice]
        cases.append(case)
    report = {
        "classes": names,
        "generated": _summary(generated_rows, names),
        "real": _summary(real_rows, names),
        "cases": cases,
    }
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "faithfulness.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    with open(os.path.join(report_dir, "faithfulness.md"), "w") as f:
        f.write("# Faithfulness: Dice between each mask and the segmentation of the image generated from it\n\n")
        f.write(table)
    logger.info("faithfulness (Dice of the reference segmenter):\n" + table)
    print(table)
    return report
