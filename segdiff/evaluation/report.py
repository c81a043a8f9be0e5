"""The one report writer of the evaluations (faithfulness, ensemble evaluation, downstream): per-case rows and their
summary as JSON, the summary as a markdown table, logged once.

Every evaluation scores cases with MONAI's metrics (per case and per foreground class, NaN where a class is absent
from the truth) and hands the rows here. :func:`class_means` is the one summary of a table of such rows, and
:func:`write_report` the one place that writes ``<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segdiff.errors import ConfigKeyError, SegdiffError

__all__ = [
    "EvaluationInputError",
    "MissingOutputsError",
    "case_meta",
    "class_means",
    "foreground_names",
    "markdown_table",
    "metric_rows",
    "rounded",
    "to_json",
    "write_report",
]

logger = logging.getLogger("segdiff.evaluation")

#: decimals of the figures in the reports
DIGITS = 4


class MissingOutputsError(SegdiffError, FileNotFoundError):
    """Files an evaluation scores (generated images, inference outputs) are not where the config says."""


class EvaluationInputError(SegdiffError, ValueError):
    """A file an evaluation scores does not fit its reference (another grid, labels outside the classes)."""


def foreground_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The names of classes ``1..num_classes-1``: ``class_names`` (the datalist's labels) or ``class_<k>``."""
    names = list(class_names or [f"class_{c}" for c in range(1, num_classes)])
    if len(names) != num_classes - 1:
        raise ConfigKeyError(
            f"class_names has {len(names)} names ({names}); num_classes={num_classes} needs {num_classes - 1}, one per "
            "foreground class: fix the datalist's 'labels' or num_classes."
        )
    return names


def rounded(values: Iterable[Any], digits: int = DIGITS) -> list[float | None]:
    """Report figures: each value rounded to ``digits`` decimals, None where it is NaN or infinite."""
    out = []
    for v in values:
        v = None if v is None else float(v)
        out.append(None if v is None or not math.isfinite(v) else round(v, digits))
    return out


def class_means(table: np.ndarray | Sequence[np.ndarray], num_classes: int | None = None) -> tuple[np.ndarray, float | None]:
    """Summary of a ``(cases, foreground classes)`` table: each class's mean over the cases where it is defined
    (NaN if none), and the mean of those class means (every class weighs the same; None if no class is defined).

    Args:
        table: one row per case (e.g. MONAI's per-case Dice with ``ignore_empty``), NaN where a class is absent.
        num_classes: foreground classes, for an empty table.
    """
    table = np.asarray(table) if len(table) else np.full((0, num_classes or 0), np.nan)
    with np.errstate(all="ignore"):
        per_class = np.nanmean(table, axis=0) if len(table) else np.full(table.shape[1], np.nan)
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else None
    return per_class, mean


def metric_rows(buffer: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    """A metric's per-case buffer (``metric.get_buffer()``, ``engine.state.metric_details[name]``) as a numpy
    ``(cases, values)`` table, keeping the metric's own dtype; non-finite distances (MONAI's inf for a class missing
    from one map) become NaN, so that they drop out of :func:`class_means` as absent classes do."""
    rows = buffer.detach().cpu().numpy() if isinstance(buffer, torch.Tensor) else np.asarray(buffer)
    rows = rows.reshape(len(rows), -1)
    if np.issubdtype(rows.dtype, np.floating):
        rows = np.where(np.isfinite(rows), rows, np.nan).astype(rows.dtype)
    return rows


def case_meta(key: str = "case") -> Callable[[Sequence[Mapping[str, Any]]], list[dict[str, str]]]:
    """``batch_transform`` of MONAI's ``MetricsSaver``: the name of each case of a decollated batch, from the string
    kept under ``key`` (the loaded tensors carry no metadata once ``EnsureTyped(track_meta=False)`` ran)."""

    def meta(batch: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
        return [{"filename_or_obj": str(item[key])} for item in batch]

    return meta


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: numbers with 3 decimals, None and NaN as ``n/a``, strings as they are."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_json(value: Any) -> Any:
    """``value`` with numpy and torch numbers as Python numbers and NaN / inf as None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return to_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_report(
    report_dir: str | os.PathLike,
    name: str,
    report: Mapping[str, Any],
    title: str,
    table: str,
    before: str = "",
    after: str = "",
) -> dict[str, Any]:
    """Write ``<report_dir>/<name>.json`` (the report) and ``<name>.md`` (``# title``, ``before``, the table,
    ``after``), and log the table once. Returns the report as written (JSON types)."""
    report = to_json(report)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(report_dir, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{before}{table}{after}")
    logger.info("%s (%s):\n%s", title, os.path.join(report_dir, f"{name}.md"), table)
    return report
