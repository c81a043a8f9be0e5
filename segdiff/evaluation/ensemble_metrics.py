"""Per-case scores of an image -> mask diffusion ensemble: overlap and boundary error of the fused label map, and how
well the ensemble's uncertainty and probabilities describe its own mistakes.

Every function takes one case already on the case's grid, as numpy arrays or torch tensors with 2 or 3 spatial
dimensions and no channel dimension (except ``probabilities``, which is ``(K, *spatial)``). Dice and HD95 come from
MONAI (``compute_dice``, ``compute_hausdorff_distance``); the ranking AUROC and the calibration error are written
here because MONAI has no voxel-wise form of either. ``summarize`` averages the per-case dictionaries over a test set.

:class:`UncertaintyErrorAUROC` and :class:`TopLabelCalibrationError` wrap the two in MONAI's metric interface
(``CumulativeIterationMetric``: call it per batch, ``aggregate()`` at the end, ``get_buffer()`` per case), so an
evaluation uses them beside MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, compute_dice, compute_hausdorff_distance
from monai.metrics.utils import do_metric_reduction
from monai.networks.utils import one_hot
from monai.utils import MetricReduction

__all__ = [
    "TopLabelCalibrationError",
    "UncertaintyErrorAUROC",
    "expected_calibration_error",
    "paired_pooled_dice_bootstrap",
    "segmentation_scores",
    "summarize",
    "uncertainty_error_auroc",
]

#: how far the class probabilities of a voxel may sum away from 1 before they are refused
PROBABILITY_SUM_TOLERANCE = 1e-3

Array = np.ndarray | torch.Tensor


def _as_numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_same_shape(**arrays: np.ndarray) -> None:
    (first_name, first), *rest = arrays.items()
    for name, array in rest:
        if array.shape != first.shape:
            raise ValueError(f"{name} shape {tuple(array.shape)} differs from {first_name} shape {tuple(first.shape)}.")


def _check_spatial(name: str, array: np.ndarray) -> None:
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must have 2 or 3 spatial dimensions and no channel, got shape {tuple(array.shape)}.")


def _check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), "
            f"found values {int(labels.min())}..{int(labels.max())}."
        )


def segmentation_scores(
    prediction: Array, truth: Array, num_classes: int, spacing: float | Sequence[float] | None = None
) -> dict[str, list[float]]:
    """Dice and HD95 of every foreground class ``1..num_classes-1`` between two label maps of one case.

    Args:
        prediction: label map ``(*spatial)`` of the ensemble (e.g. the fused mask), integers in ``0..num_classes-1``.
        truth: reference label map of the same shape.
        num_classes: number of classes including background (class 0, which is not scored).
        spacing: voxel size, one number or one per spatial axis (e.g. the image's pixdim); HD95 is then in those
            units (mm). Defaults to ``None``: unit spacing, HD95 in voxels.

    Returns:
        ``{"dice": [...], "hd95": [...]}``, one float per foreground class, class 1 first. HD95 is MONAI's
        symmetric 95th-percentile Hausdorff distance between the two boundaries (the larger of the two directed
        95th percentiles). Absent classes are scored so that ``summarize``'s nanmean leaves them out:

        - class absent from the truth: dice NaN and hd95 NaN, whatever the prediction;
        - class present in the truth, absent from the prediction: dice 0 and hd95 NaN (the distance to an empty
          boundary is undefined; MONAI's inf is replaced so that one missed class cannot make a mean infinite).
          A miss is therefore visible in Dice only.
    """
    prediction, truth = _as_numpy(prediction), _as_numpy(truth)
    _check_same_shape(prediction=prediction, truth=truth)
    _check_spatial("prediction", prediction)
    if num_classes < 2:
        raise ValueError(f"num_classes must count background and at least one foreground class, got {num_classes}.")
    _check_labels("prediction", prediction, num_classes)
    _check_labels("truth", truth, num_classes)
    if spacing is not None:
        spacing = [float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float))]
        if len(spacing) == 1:
            spacing = spacing * prediction.ndim
        if len(spacing) != prediction.ndim:
            raise ValueError(
                f"spacing has {len(spacing)} values but the label maps have {prediction.ndim} spatial dimensions "
                f"(shape {tuple(prediction.shape)})."
            )

    as_onehot = lambda x: one_hot(torch.as_tensor(x, dtype=torch.long)[None, None], num_classes, dim=1)
    pred_onehot, truth_onehot = as_onehot(prediction), as_onehot(truth)
    dice = compute_dice(pred_onehot, truth_onehot, include_background=False, ignore_empty=True)[0]

    hd95 = torch.full((num_classes - 1,), float("nan"))
    # only classes present in both maps have a distance; skipping the others also keeps MONAI's empty-mask warnings out
    both = [c for c in range(1, num_classes) if pred_onehot[0, c].any() and truth_onehot[0, c].any()]
    if both:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # MONAI-internal deprecation
            distances = compute_hausdorff_distance(
                pred_onehot[:, both], truth_onehot[:, both], include_background=True, percentile=95, spacing=spacing
            )[0]
        hd95[[c - 1 for c in both]] = distances.float()
    return {"dice": [float(v) for v in dice], "hd95": [float(v) for v in hd95]}


def _average_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of ``values`` and, in that order, the 1-based rank of each value with ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    return order, np.repeat(group_rank, ends - starts)


def uncertainty_error_auroc(uncertainty: Array, prediction: Array, truth: Array, mask: Array | None = None) -> float:
    """AUROC of the uncertainty map as a detector of the ensemble's misclassified voxels.

    A voxel is an error where ``prediction != truth``. The AUROC is the probability that a randomly drawn error voxel
    has a higher uncertainty than a randomly drawn correct voxel, counting ties as one half. It is computed exactly
    from the Mann-Whitney U statistic with average ranks: ``(R_err - n_err (n_err + 1) / 2) / (n_err n_ok)``, where
    ``R_err`` is the rank sum of the error voxels. So 1 means the uncertainty separates errors perfectly, 0.5 that it
    carries no information (e.g. a constant map), below 0.5 that it is highest where the ensemble is right.

    Args:
        uncertainty: per-voxel uncertainty ``(*spatial)`` (e.g. ensemble variance or entropy); higher = less sure.
        prediction: label map ``(*spatial)`` of the ensemble.
        truth: reference label map of the same shape.
        mask: optional boolean map of the same shape; only voxels where it is true are scored (e.g. the body or a
            box around the foreground, so that easy background does not dominate). Defaults to ``None``: all voxels.

    Returns:
        the AUROC, or NaN when the scored voxels are all correct or all wrong (one of the two groups is empty).
    """
    uncertainty, prediction, truth = _as_numpy(uncertainty), _as_numpy(prediction), _as_numpy(truth)
    _check_same_shape(uncertainty=uncertainty, prediction=prediction, truth=truth)
    _check_spatial("uncertainty", uncertainty)
    error = prediction != truth
    values = uncertainty.astype(np.float64)
    if mask is not None:
        mask = _as_numpy(mask)
        _check_same_shape(uncertainty=uncertainty, mask=mask)
        if mask.dtype != bool:
            raise ValueError(f"mask must be boolean, got dtype {mask.dtype}.")
        error, values = error[mask], values[mask]
    values, error = values.ravel(), error.ravel()
    if not np.isfinite(values).all():
        raise ValueError(
            f"uncertainty has {int((~np.isfinite(values)).sum())} non-finite value(s) among scored voxels."
        )
    num_errors = int(error.sum())
    num_correct = error.size - num_errors
    if num_errors == 0 or num_correct == 0:
        return float("nan")
    order, ranks = _average_ranks(values)
    rank_sum = float(ranks[error[order]].sum())
    u_statistic = rank_sum - num_errors * (num_errors + 1) / 2.0
    return u_statistic / (float(num_errors) * float(num_correct))


def expected_calibration_error(probabilities: Array, truth: Array, num_bins: int = 15) -> float:
    """Top-label expected calibration error of per-voxel class probabilities against the reference labels.

    Each voxel's confidence is its largest class probability and its prediction that class (the first on ties).
    Voxels are grouped into ``num_bins`` equal-width confidence bins ``[0, 1/B), [1/B, 2/B), ..., [(B-1)/B, 1]`` (the
    last bin closed, so confidence 1 counts) and ``ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|``, empty
    bins contributing nothing. 0 means the confidences are the observed accuracies.

    Args:
        probabilities: ``(K, *spatial)`` class probabilities of one case (e.g. the ensemble's mean one-hot or
            softmax), non-negative and summing to 1 over ``K`` at every voxel (within 1e-3).
        truth: reference label map ``(*spatial)``, integers in ``0..K-1``.
        num_bins: number of confidence bins. Defaults to 15.

    Returns:
        the ECE, in ``[0, 1]``.
    """
    probabilities, truth = _as_numpy(probabilities).astype(np.float64), _as_numpy(truth)
    if probabilities.ndim != truth.ndim + 1 or probabilities.shape[1:] != truth.shape:
        raise ValueError(
            f"probabilities shape {tuple(probabilities.shape)} must be (K, *spatial) with spatial equal to truth "
            f"shape {tuple(truth.shape)}."
        )
    _check_spatial("truth", truth)
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
    if not np.isfinite(probabilities).all() or probabilities.min() < 0:
        raise ValueError("probabilities must be finite and non-negative.")
    sums = probabilities.sum(axis=0)
    worst = float(np.abs(sums - 1.0).max())
    if worst > PROBABILITY_SUM_TOLERANCE:
        where = np.unravel_index(int(np.abs(sums - 1.0).argmax()), sums.shape)
        raise ValueError(
            f"probabilities must sum to 1 over the class axis (tolerance {PROBABILITY_SUM_TOLERANCE}), "
            f"found a sum of {float(sums[where]):.6f} at voxel {tuple(int(i) for i in where)}."
        )
    _check_labels("truth", truth, probabilities.shape[0])

    confidence = probabilities.max(axis=0).ravel()
    correct = (probabilities.argmax(axis=0) == truth).ravel()
    bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    confidence_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=num_bins)
    # sum_b (n_b/N) |acc_b - conf_b| = sum_b |correct_b - confidence_b| / N, which needs no division by empty bins
    return float(np.abs(correct_sum - confidence_sum).sum() / confidence.size)


def _pooled_counts(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice overlap and size sums ``(N, num_classes - 1)`` of each foreground class."""
    n = prediction.shape[0]
    p, t = prediction.reshape(n, -1), truth.reshape(n, -1)
    overlap = np.stack([((p == c) & (t == c)).sum(axis=1) for c in range(1, num_classes)], axis=1)
    size = np.stack([(p == c).sum(axis=1) + (t == c).sum(axis=1) for c in range(1, num_classes)], axis=1)
    return overlap.astype(np.float64), size.astype(np.float64)


def paired_pooled_dice_bootstrap(
    prediction: Array, reference: Array, truth: Array, num_classes: int, draws: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """How much higher ``prediction`` scores than ``reference`` on the same slices, with a paired bootstrap interval.

    The score is the mean over foreground classes of the Dice pooled over all slices (each class's overlap and sizes
    summed over slices first; a class absent from both prediction and truth is left out), as the benchmarks report
    it. The interval resamples the slices with replacement, the same draw for both predictions, so slice-to-slice
    variation that affects both alike cancels.

    Args:
        prediction, reference, truth: label maps ``(N, *spatial)`` of the same shape, ``N`` slices or cases.
        num_classes: classes including background (0).
        draws: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``{"difference": d, "ci95": [low, high], "slices": N}``: ``d`` is prediction's score minus reference's on the
        slices as given; the interval holds the 2.5th and 97.5th percentiles of the resampled differences.
    """
    prediction, reference, truth = _as_numpy(prediction), _as_numpy(reference), _as_numpy(truth)
    _check_same_shape(prediction=prediction, reference=reference, truth=truth)
    if prediction.ndim < 2:
        raise ValueError(f"expected label maps (N, *spatial), got shape {prediction.shape}.")
    if int(draws) < 1:
        raise ValueError(f"draws must be at least 1, got {draws!r}.")
    for name, labels in (("prediction", prediction), ("reference", reference), ("truth", truth)):
        _check_labels(name, labels, num_classes)
    counts = [_pooled_counts(x, truth, num_classes) for x in (prediction, reference)]

    def score(weights: np.ndarray, overlap: np.ndarray, size: np.ndarray) -> np.ndarray:
        pooled_overlap, pooled_size = weights @ overlap, weights @ size
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(pooled_size > 0, 2.0 * pooled_overlap / pooled_size, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            return np.nanmean(dice, axis=-1)

    n = prediction.shape[0]
    ones = np.ones((1, n))
    difference = float((score(ones, *counts[0]) - score(ones, *counts[1]))[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=int(draws)).astype(np.float64)
    resampled = score(weights, *counts[0]) - score(weights, *counts[1])
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    return {"difference": difference, "ci95": [float(low), float(high)], "slices": n}


def summarize(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of every score over cases, skipping NaN (absent classes, undefined AUROC).

    Args:
        cases: one dictionary per case with the same keys, e.g. ``segmentation_scores(...)`` merged with
            ``{"auroc": ..., "ece": ...}``. A value is either one number or a list with one number per foreground
            class (the same length in every case). String values (case identifiers, paths) are ignored.

    Returns:
        ``{"num_cases": n, score: {"mean": ..., "per_class": [...]}}`` for per-class scores, where ``per_class`` is
        the nanmean over cases of each class and ``mean`` the nanmean of ``per_class`` (every class weighs the same),
        and ``{score: {"mean": ...}}`` for one-number scores. A mean with no finite input is NaN.
    """
    if not cases:
        raise ValueError("summarize needs at least one case, got none.")
    keys = [key for key, value in cases[0].items() if not isinstance(value, str)]
    summary: dict[str, Any] = {"num_cases": len(cases)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # "mean of empty slice" on all-NaN columns
        for key in keys:
            rows = []
            for index, case in enumerate(cases):
                if key not in case:
                    raise KeyError(f"case {index} has no score {key!r}; case 0 has {sorted(keys)}.")
                rows.append(np.asarray(case[key], dtype=np.float64))
            shapes = {row.shape for row in rows}
            if len(shapes) > 1 or rows[0].ndim > 1:
                found = [tuple(row.shape) for row in rows]
                raise ValueError(
                    f"score {key!r} must be one number or one list of equal length per case, found {found}."
                )
            table = np.stack(rows)
            if table.ndim == 1:
                summary[key] = {"mean": float(np.nanmean(table))}
            else:
                per_class = np.nanmean(table, axis=0)
                summary[key] = {"mean": float(np.nanmean(per_class)), "per_class": [float(v) for v in per_class]}
    return summary


class _PerCaseMetric(CumulativeIterationMetric):
    """One number per case (``(B, 1)``, float64) buffered over calls; ``aggregate()`` reduces them, skipping NaN,
    with MONAI's ``do_metric_reduction`` (float32, and 0 when no case has a value, as MONAI's metrics do). Reports
    read the float64 per-case buffer (``get_buffer()``) instead."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    @staticmethod
    def _check_batch(name: str, tensor: torch.Tensor | None, channels: int | None = 1) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim < 4 or (channels is not None and tensor.shape[1] != channels):
            shape = None if not isinstance(tensor, torch.Tensor) else tuple(tensor.shape)
            expected = f"(B, {channels}, *spatial)" if channels is not None else "(B, K, *spatial)"
            raise ValueError(f"{name} must be a batch-first tensor {expected} with 2 or 3 spatial dimensions, got {shape}.")
        return tensor

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class UncertaintyErrorAUROC(_PerCaseMetric):
    """:func:`uncertainty_error_auroc` per case as a MONAI metric: how well the uncertainty map ranks the misclassified
    voxels above the correct ones (1 perfect, 0.5 uninformative; NaN if a case is all right or all wrong).

    Call it with batch-first label maps ``y_pred`` (the fused segmentation) and ``y`` (the truth), ``(B, 1, *spatial)``,
    and the uncertainty map of the same shape as ``uncertainty=``; ``aggregate()`` gives the mean over cases
    (``reduction``, NaN skipped), ``get_buffer()`` the ``(cases, 1)`` values.

    Args:
        reduction: MONAI's metric reduction over the buffered cases. Defaults to ``"mean"``.
        get_not_nans: ``aggregate()`` also returns the number of cases that had a value.
    """

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor, uncertainty: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        y_pred, y = self._check_batch("y_pred", y_pred), self._check_batch("y", y)
        uncertainty = self._check_batch("uncertainty", uncertainty)
        values = [
            uncertainty_error_auroc(uncertainty[b, 0], y_pred[b, 0], y[b, 0], None if mask is None else mask[b, 0])
            for b in range(y_pred.shape[0])
        ]
        return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)


class TopLabelCalibrationError(_PerCaseMetric):
    """:func:`expected_calibration_error` per case as a MONAI metric: top-label ECE of class probabilities.

    Call it with batch-first probabilities ``y_pred`` ``(B, K, *spatial)`` (summing to 1 over ``K``) and the truth
    label map ``y`` ``(B, 1, *spatial)``; ``aggregate()`` gives the mean over cases, ``get_buffer()`` the
    ``(cases, 1)`` values. (MONAI's ``CalibrationErrorMetric`` bins every class channel on its own; this is the
    top-label form of the image -> mask literature.)

    Args:
        num_bins: equal-width confidence bins. Defaults to 15.
        reduction: MONAI's metric reduction over the buffered cases. Defaults to ``"mean"``.
        get_not_nans: ``aggregate()`` also returns the number of cases that had a value.
    """

    def __init__(self, num_bins: int = 15, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(reduction, get_not_nans)
        self.num_bins = num_bins

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y_pred, y = self._check_batch("y_pred", y_pred, channels=None), self._check_batch("y", y)
        values = [expected_calibration_error(y_pred[b], y[b, 0], self.num_bins) for b in range(y_pred.shape[0])]
        return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)
