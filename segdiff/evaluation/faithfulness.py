"""Faithfulness of generated images to their masks (Konz et al.): segment each generated image with a segmenter
trained on real images and score the result against the mask it was generated from. The same segmenter on the real
test images gives the ceiling a perfect generator could reach.

mask_to_image's evaluate.yaml composes the two runs from MONAI's pieces: a ``SupervisedEvaluator`` each (the
segmenter over whole cases through :class:`~segdiff.evaluation.SegmenterInferer`, argmax and one-hot
post-processing, a ``MeanDice`` handler keeping every case's per-class Dice, a ``MetricsSaver``); this module gives
them their data (:func:`generated_entries`), refuses what cannot be scored, and writes the report from the two
evaluators' per-case Dice (:func:`write_faithfulness_report`: ``faithfulness.{json,md}``), with how the segmenter
was trained (its best validation Dice, epochs, what stopped it: :func:`segdiff.evaluation.segmenter_training`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segdiff.evaluation.report import (
    EvaluationInputError,
    MissingOutputsError,
    class_means,
    foreground_names,
    markdown_table,
    metric_rows,
    rounded,
    write_report,
)
from segdiff.transforms.io import sample_output_paths

__all__ = [
    "check_generated_exist",
    "check_same_grid",
    "faithfulness_markdown",
    "generated_entries",
    "per_case_metric",
    "real_entries",
    "segmenter_markdown",
    "write_faithfulness_report",
]

#: title of faithfulness.md
TITLE = "Faithfulness: Dice between each mask and the segmentation of the image generated from it"
#: the segmenter paragraph's words for what stopped its training (``TrainingStopReport``'s ``stopped_by``)
_STOPPED_BY = {
    "patience": "patience (segmenter_patience validations without a better Dice)",
    "epochs": "the epoch bound (segmenter_epochs)",
    "wall_time": "the wall-time bound (segmenter_max_minutes)",
}


def generated_entries(entries: Sequence[Mapping[str, Any]], generated_dir: str, samples_per_mask: int = 1) -> list[dict[str, Any]]:
    """The generated images to score, one item per image, masks in datalist order and the samples of a mask together:
    ``image`` (the generated file), ``label`` (the mask it was generated from) and ``case`` (the generated file's
    path, naming the row in MetricsSaver's files).

    Args:
        entries: test entries with absolute ``"label"`` paths (the conditioning masks).
        generated_dir: the inference ``output_dir`` holding ``<case>_image.nii.gz`` (``<case>_sample<k>_image.nii.gz``
            when several images were generated per mask).
        samples_per_mask: images generated per mask (inference.yaml's ``samples_per_mask``).

    Raises:
        MissingOutputsError: a generated image is missing (the count and the first are named).
    """
    items, missing = [], []
    for entry in entries:
        for path in sample_output_paths(entry["label"], generated_dir, samples_per_mask, "image"):
            items.append({"image": path, "label": entry["label"], "case": path})
            if not os.path.exists(path):
                missing.append(path)
    if missing:
        raise MissingOutputsError(
            f"{len(missing)} generated image(s) missing in {generated_dir}, e.g. {missing[0]}: run inference.yaml "
            f"first with the same output_dir and num_samples {samples_per_mask} (evaluate.yaml's samples_per_mask)."
        )
    return items


def check_generated_exist(entries: Sequence[Mapping[str, Any]], generated_dir: str, samples_per_mask: int = 1) -> int:
    """Stop before any training if a mask's generated image is missing; returns the number of images found."""
    return len(generated_entries(entries, generated_dir, samples_per_mask))


def real_entries(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The real test entries with ``case`` (the label's path) naming their rows in MetricsSaver's files."""
    return [{**entry, "case": str(entry["label"])} for entry in entries]


def check_same_grid(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Transform refusing a generated ``image`` whose grid is not its mask's (``label``), both channel first."""
    image, mask = data["image"], data["label"]
    if tuple(image.shape[1:]) != tuple(mask.shape[1:]):
        raise EvaluationInputError(
            f"{data.get('case', 'generated image')} has shape {tuple(image.shape[1:])}, its mask "
            f"{tuple(mask.shape[1:])}: generated images must be on their mask's grid (rerun inference.yaml)."
        )
    return data


def per_case_metric(evaluator: Any, name: str | None = None) -> np.ndarray:
    """The per-case values ``(cases, classes)`` a metric handler kept on an evaluator that ran
    (``engine.state.metric_details``); ``name`` defaults to the evaluator's key metric."""
    details = getattr(evaluator.state, "metric_details", {})
    name = name or evaluator.state.key_metric_name
    if name not in details:
        raise EvaluationInputError(
            f"the evaluator has no per-case values of {name!r} (found {sorted(details)}): run it first, with the metric "
            "handler's save_details true."
        )
    return metric_rows(details[name])


def _summary(table: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    if not len(table):
        return {"per_class_dice": {name: None for name in names}, "mean_dice": None, "num_images": 0}
    per_class, mean = class_means(table)
    return {
        "per_class_dice": dict(zip(names, rounded(per_class))),
        "mean_dice": None if mean is None else round(mean, 4),
        "num_images": len(table),
    }


def faithfulness_markdown(report: Mapping[str, Any]) -> str:
    """The report's Dice figures as a markdown table: one row per image source, one column per class."""
    names = list(report["generated"]["per_class_dice"])
    rows = []
    for label, key in (("generated (faithfulness)", "generated"), ("real test images (ceiling)", "real")):
        entry = report[key]
        rows.append([label, *(entry["per_class_dice"][n] for n in names), entry["mean_dice"], str(entry["num_images"])])
    return markdown_table(["images", *names, "mean", "n"], rows)


def segmenter_markdown(segmenter: Mapping[str, Any] | None) -> str:
    """One paragraph on the reference segmenter behind the ceiling: how long it trained, what stopped it, its best
    validation Dice (empty without ``segmenter``)."""
    if not segmenter:
        return ""
    dice, epoch = segmenter.get("best_val_mean_dice"), segmenter.get("best_epoch")
    if dice is not None:
        best = f"best validation mean Dice {dice:.3f}" + ("" if epoch is None else f" at epoch {epoch}")
    elif not segmenter.get("trained_in_this_run"):
        best = "no validation Dice in its record"
    elif segmenter.get("validation_cases"):
        best = "no validation ran before it stopped, the last weights"
    else:
        best = "no validation split, the last weights"
    if segmenter.get("trained_in_this_run"):
        how = (f"trained in this run for {segmenter['epochs']} of at most {segmenter['max_epochs']} epochs "
               f"({segmenter.get('minutes', float('nan')):.1f} min), stopped by "
               f"{_STOPPED_BY.get(segmenter['stopped_by'], segmenter['stopped_by'])}")
    else:
        how = f"reused from {segmenter.get('weights')}" + (
            "" if segmenter.get("epochs") is None else f", trained for {segmenter['epochs']} epochs")
    return f"\nReference segmenter: {how}; {best}.\n"


def write_faithfulness_report(
    generated: Any,
    real: Any,
    test_data: Sequence[Mapping[str, Any]],
    report_dir: str,
    samples_per_mask: int = 1,
    class_names: Sequence[str] | None = None,
    segmenter: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``faithfulness.{json,md}`` from the per-case Dice of the two evaluations.

    Args:
        generated: the evaluator that scored the generated images (:func:`generated_entries` order), or its
            per-case Dice ``(masks x samples_per_mask, classes)``.
        real: the evaluator that scored the real test images (``test_data`` order), or its per-case Dice.
        test_data: the test entries (``label`` names each case in the report).
        report_dir: folder of the report.
        samples_per_mask: images generated per mask.
        class_names: names of classes ``1..num_classes-1`` (default ``class_<k>``).
        segmenter: how the reference segmenter was trained (:func:`segdiff.evaluation.segmenter_training`:
            ``best_val_mean_dice``, ``epochs``, ``stopped_by``, ...), reported as ``segmenter``; None leaves it out.

    Returns:
        the report: per-class and mean Dice for generated and for real images, the segmenter's training, and per-case
        figures.
    """
    generated_dice = generated if isinstance(generated, np.ndarray) else per_case_metric(generated)
    real_dice = real if isinstance(real, np.ndarray) else per_case_metric(real)
    if len(generated_dice) != len(test_data) * samples_per_mask or len(real_dice) != len(test_data):
        raise EvaluationInputError(
            f"{len(generated_dice)} generated and {len(real_dice)} real images were scored for {len(test_data)} test "
            f"masks with samples_per_mask {samples_per_mask}: the evaluators did not run over the test split."
        )
    names = foreground_names(class_names, real_dice.shape[1] + 1)
    cases = []
    for index, entry in enumerate(test_data):
        samples = generated_dice[index * samples_per_mask : (index + 1) * samples_per_mask]
        cases.append({
            "label": str(entry["label"]),
            "generated_dice": [rounded(row) for row in samples],
            "real_dice": rounded(real_dice[index]),
        })
    report = {"classes": names, "generated": _summary(generated_dice, names), "real": _summary(real_dice, names)}
    if segmenter is not None:
        report["segmenter"] = dict(segmenter)
    report["cases"] = cases
    return write_report(report_dir, "faithfulness", report, TITLE, faithfulness_markdown(report),
                        after=segmenter_markdown(segmenter))
