"""Scoring the files an image -> mask inference run wrote: fused segmentation vs a single member (Dice, HD95), whether
the uncertainty map flags the errors (AUROC) and how well the mean probabilities are calibrated (ECE).

No network runs here: the files are loaded by a MONAI dataset (image_to_mask's evaluate.yaml composes it) and scored
by MONAI metric objects, MONAI's own ``DiceMetric`` and ``HausdorffDistanceMetric`` for the label maps and
:class:`~segdiff.evaluation.ensemble_metrics.UncertaintyErrorAUROC` /
:class:`~segdiff.evaluation.ensemble_metrics.TopLabelCalibrationError` for what MONAI lacks. Each metric keeps its
per-case values; the report (``ensemble_evaluation.{json,md}``) is written from them by
:func:`segdiff.evaluation.report.write_report`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.metrics import Cumulative
from monai.networks.utils import one_hot

from segdiff.evaluation.ensemble_metrics import summarize
from segdiff.evaluation.report import (
    EvaluationInputError,
    MissingOutputsError,
    foreground_names,
    markdown_table,
    metric_rows,
    rounded,
    write_report,
)
from segdiff.transforms.io import sample_output_paths

__all__ = [
    "OPTIONAL_OUTPUTS",
    "REQUIRED_OUTPUTS",
    "check_segmentation_outputs",
    "ensemble_markdown",
    "evaluate_ensemble",
    "output_entries",
]

#: files an inference run must have written for a full evaluation
REQUIRED_OUTPUTS = ("seg", "uncertainty", "prob")
#: files scored when present (a UNet baseline writes no members)
OPTIONAL_OUTPUTS = ("members",)


def _output(entry: Mapping[str, Any], output_dir: str, name: str) -> str:
    return sample_output_paths(entry["image"], output_dir, 1, name)[0]


def output_entries(entries: Sequence[Mapping[str, Any]], output_dir: str) -> list[dict[str, Any]]:
    """One item per test case for the evaluation's dataset: ``case`` (the image path, which names the outputs),
    ``label`` (the truth) and the paths of its outputs under their names (``seg``, ``uncertainty``, ``prob``, and
    ``members`` where it was written).

    Raises:
        MissingOutputsError: a required output is missing (all of them are listed in the count, the first named).
    """
    items, missing = [], []
    for entry in entries:
        item = {"case": str(entry["image"]), "label": entry["label"]}
        for name in REQUIRED_OUTPUTS + OPTIONAL_OUTPUTS:
            path = _output(entry, output_dir, name)
            if os.path.exists(path):
                item[name] = path
            elif name in REQUIRED_OUTPUTS:
                missing.append(path)
        items.append(item)
    if missing:
        raise MissingOutputsError(
            f"{len(missing)} inference output(s) missing, e.g. {missing[0]}: run inference.yaml with the same "
            "output_dir and --save_probabilities True (and --save_members True to score a single member)."
        )
    return items


def check_segmentation_outputs(entries: Sequence[Mapping[str, Any]], output_dir: str) -> int:
    """Stop before scoring if a case's segmentation, uncertainty or probability file is missing; returns the number
    of cases."""
    return len(output_entries(entries, output_dir))


def _source(item: Mapping[str, Any], key: str) -> str:
    """The file an item's ``key`` was loaded from (LoadImaged keeps it in the tensor's metadata), else the key."""
    meta = getattr(item[key], "meta", None) or {}
    return str(meta.get("filename_or_obj", key))


def _label_map(item: Mapping[str, Any], key: str, num_classes: int, channel: int = 0) -> torch.Tensor:
    labels = torch.as_tensor(item[key])[channel]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes or not torch.equal(labels, labels.round())):
        raise EvaluationInputError(
            f"{_source(item, key)}: labels must be integers in 0..{num_classes - 1} (num_classes={num_classes}), "
            f"found values {float(labels.min()):g}..{float(labels.max()):g}; check num_classes."
        )
    return labels.long()


def _takes_keywords(metric: Any) -> bool:
    """Whether a metric's per-batch computation takes keyword arguments (MONAI's distance metrics take ``spacing``)."""
    compute = getattr(metric, "_compute_tensor", None)
    if compute is None:
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(compute).parameters.values())


def _score_label_map(metrics: Mapping[str, Cumulative], prediction: torch.Tensor, truth: torch.Tensor, num_classes: int, spacing) -> None:
    y_pred = one_hot(prediction[None, None], num_classes, dim=1)
    y = one_hot(truth[None, None], num_classes, dim=1)
    for metric in metrics.values():
        metric(y_pred=y_pred, y=y, **({"spacing": spacing} if _takes_keywords(metric) else {}))


def evaluate_ensemble(
    data: Iterable[Mapping[str, Any]],
    num_classes: int,
    report_dir: str,
    metrics: Mapping[str, Cumulative],
    member_metrics: Mapping[str, Cumulative] | None = None,
    uncertainty_metric: Cumulative | None = None,
    calibration_metric: Cumulative | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score every test case's outputs against its label and write ``ensemble_evaluation.{json,md}``.

    Args:
        data: the loaded items of :func:`output_entries` (a MONAI ``Dataset`` with ``LoadImaged``, channel first):
            ``label``, ``seg``, ``uncertainty``, ``prob`` and optionally ``members`` (the first member is scored).
        num_classes: classes including background.
        report_dir: folder of the report.
        metrics: the fused segmentation's metrics by report name, each called per case with one-hot
            ``(1, num_classes, *spatial)`` prediction and truth (and the truth's voxel spacing, for metrics whose
            computation takes keywords such as MONAI's ``HausdorffDistanceMetric``), one value per foreground class
            kept per case (e.g. ``{"dice": DiceMetric(include_background=False), "hd95": ...}``).
        member_metrics: the same for the first member, on the cases that have ``members`` (other metric objects:
            each keeps its own cases).
        uncertainty_metric: per-case score of the uncertainty map (``auroc`` in the report), called with the fused
            and the true label maps ``(1, 1, *spatial)`` and ``uncertainty=``.
        calibration_metric: per-case score of the probabilities (``ece``), called with the probabilities
            ``(1, K, *spatial)`` normalised to sum 1 and the true label map.
        class_names: names of classes ``1..num_classes-1``.

    Returns:
        the report: ``classes``, the summary of ``fused`` (and ``single_member``) per score (``mean``, and
        ``per_class`` for per-class scores), and ``cases``.
    """
    names = foreground_names(class_names, num_classes)
    member_metrics = dict(member_metrics or {})
    case_names, has_members, spacings = [], [], []
    for metric in [*metrics.values(), *member_metrics.values(), uncertainty_metric, calibration_metric]:
        if metric is not None:
            metric.reset()
    with warnings.catch_warnings():
        # a class missing from one map has no boundary distance: MONAI warns and gives inf, reported as null
        warnings.filterwarnings("ignore", message=".*is all 0, this may result in nan/inf distance.*")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # MONAI-internal deprecation
        for item in data:
            case_names.append(str(item["case"]))
            truth = _label_map(item, "label", num_classes)
            spacing = [float(s) for s in item["label"].pixdim] if hasattr(item["label"], "pixdim") else None
            spacings.append(spacing)
            seg = _label_map(item, "seg", num_classes)
            for key, value in (("seg", seg), ("uncertainty", torch.as_tensor(item["uncertainty"])[0])):
                if tuple(value.shape) != tuple(truth.shape):
                    raise EvaluationInputError(
                        f"{_source(item, key)} of case {case_names[-1]} has shape {tuple(value.shape)}, its "
                        f"label {tuple(truth.shape)}: the outputs must be on the image's grid (rerun inference.yaml)."
                    )
            _score_label_map(metrics, seg, truth, num_classes, spacing)
            if uncertainty_metric is not None:
                uncertainty = torch.as_tensor(item["uncertainty"])[0]
                uncertainty_metric(y_pred=seg[None, None], y=truth[None, None], uncertainty=uncertainty[None, None])
            if calibration_metric is not None:
                prob = torch.as_tensor(item["prob"]).float()
                calibration_metric(y_pred=(prob / prob.sum(0, keepdim=True).clamp_min(1e-8))[None], y=truth[None, None])
            has_members.append("members" in item and item["members"] is not None)
            if has_members[-1] and member_metrics:
                _score_label_map(member_metrics, _label_map(item, "members", num_classes), truth, num_classes, spacing)
    if not case_names:
        raise EvaluationInputError("no test case to score: the test split of the datalist is empty.")

    def per_case(scores: Mapping[str, Cumulative]) -> dict[str, list]:
        return {key: metric_rows(metric.get_buffer()).tolist() for key, metric in scores.items()}

    fused = per_case(metrics)
    if uncertainty_metric is not None:
        fused["auroc"] = [row[0] for row in metric_rows(uncertainty_metric.get_buffer()).tolist()]
    if calibration_metric is not None:
        fused["ece"] = [row[0] for row in metric_rows(calibration_metric.get_buffer()).tolist()]
    fused_cases = [{key: values[i] for key, values in fused.items()} for i in range(len(case_names))]
    member_index = [i for i, has in enumerate(has_members) if has] if member_metrics else []
    member = per_case(member_metrics) if member_index else {}
    member_cases = [{key: values[j] for key, values in member.items()} for j in range(len(member_index))]

    def clean(case: Mapping[str, Any]) -> dict[str, Any]:
        return {k: rounded(v) if isinstance(v, list) else rounded([v])[0] for k, v in case.items()}

    cases = [{"image": name, "fused": clean(scores)} for name, scores in zip(case_names, fused_cases)]
    for j, i in enumerate(member_index):
        cases[i]["single_member"] = clean(member_cases[j])
    report: dict[str, Any] = {"classes": names, "fused": summarize(fused_cases), "cases": cases}
    if member_cases:
        report["single_member"] = summarize(member_cases)
    return write_report(report_dir, "ensemble_evaluation", report, "Segmentation and uncertainty on the test split",
                        ensemble_markdown(report))


def ensemble_markdown(report: Mapping[str, Any]) -> str:
    """Dice per class, mean Dice and mean HD95 of the fused segmentation (and of one member), with the AUROC of the
    uncertainty for misclassified voxels and the calibration error of the mean probabilities."""
    names = report["classes"]
    header = ["segmentation", *(f"Dice {n}" for n in names), "mean Dice", "mean HD95 (mm)", "uncertainty AUROC", "ECE"]
    rows = []
    for label, key in (("fused ensemble", "fused"), ("single member", "single_member")):
        if key not in report:
            continue
        entry = report[key]
        extra = [entry.get(k, {}).get("mean") for k in ("auroc", "ece")] if key == "fused" else ["", ""]
        rows.append([label, *entry["dice"]["per_class"], entry["dice"]["mean"], entry["hd95"]["mean"], *extra])
    return markdown_table(header, rows)
