"""The quality filter of synthetic pairs (MRGen-style): score each generated image by how well a judge segmenter's
label map of it agrees with the mask it was generated from, and decide which tries of a mask are kept.

Everything here is pure and deterministic: the decisions depend only on the scores, in try order, so a rerun (or a
resumed run) decides exactly as the first one did, and tests drive it with scripted scores.

The rule, for the tries of one mask (see :class:`FilterCriteria` for the numbers):

1. A try *passes* at relaxation level ``L`` when every scored class has Dice >= ``min_class_dice - L * relax_step``
   and the mean Dice of the scored classes is >= ``min_mean_dice - L * relax_step`` (thresholds never below 0).
2. The level starts at 0. While fewer than ``min_kept_per_mask`` tries pass and ``L < max_relax_steps``, ``L`` rises
   by one.
3. Of the tries that pass at the final level, the ``keep_k`` of highest mean Dice are kept (ties: the earlier try).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

__all__ = ["FilterCriteria", "TryDecision", "candidates_to_keep", "enough_passed", "pair_scores", "select_tries"]


@dataclass
class FilterCriteria:
    """Thresholds of the quality filter and how many pairs a mask yields.

    Args:
        num_classes: classes including background; Dice is scored for classes ``1..num_classes-1``.
        min_class_dice: Dice every scored class must reach: one number for all classes, or one per foreground class
            (a class the judge segments poorly even on real images deserves a lower bar). Default 0.82, MRGen's
            IoU 0.7 as Dice (``Dice = 2 IoU / (1 + IoU)``).
        min_mean_dice: the mean Dice over the scored classes must reach this (default 0.89, MRGen's mean IoU 0.8).
        relax_step: how much every threshold drops per relaxation level (default 0.1, as MRGen).
        max_relax_steps: relaxation levels at most (default 2); a mask whose tries all fail at the last level
            yields no pair.
        keep_k: pairs kept per mask at most, the best by mean Dice (default 2, as MRGen).
        min_kept_per_mask: relax while fewer tries than this pass (default 1: only a mask that would yield nothing
            lowers the bar; ``keep_k`` asks for a full ``keep_k`` pairs per mask).
    """

    num_classes: int
    min_class_dice: float | Sequence[float] = 0.82
    min_mean_dice: float = 0.89
    relax_step: float = 0.1
    max_relax_steps: int = 2
    keep_k: int = 2
    min_kept_per_mask: int = 1
    class_thresholds: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if int(self.num_classes) < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background and a class) to filter pairs, got {self.num_classes}."
            )
        self.num_classes = int(self.num_classes)
        foreground = self.num_classes - 1
        if isinstance(self.min_class_dice, (int, float)):
            thresholds = np.full(foreground, float(self.min_class_dice))
        else:
            thresholds = np.asarray([float(v) for v in self.min_class_dice])
            if thresholds.shape != (foreground,):
                raise ValueError(
                    f"min_class_dice must be one number or {foreground} numbers (classes 1..{foreground}), "
                    f"got {list(self.min_class_dice)}."
                )
        for name, values in (("min_class_dice", thresholds), ("min_mean_dice", [self.min_mean_dice])):
            if not all(0.0 <= float(v) <= 1.0 for v in values):
                raise ValueError(f"{name} must lie in [0, 1], got {list(np.asarray(values, float))}.")
        if not 0.0 <= float(self.relax_step) <= 1.0:
            raise ValueError(f"relax_step must lie in [0, 1], got {self.relax_step}.")
        if int(self.max_relax_steps) < 0:
            raise ValueError(f"max_relax_steps must be >= 0, got {self.max_relax_steps}.")
        if int(self.keep_k) < 1:
            raise ValueError(f"keep_k must be >= 1, got {self.keep_k}.")
        if not 1 <= int(self.min_kept_per_mask) <= int(self.keep_k):
            raise ValueError(f"min_kept_per_mask must lie in [1, keep_k={self.keep_k}], got {self.min_kept_per_mask}.")
        self.class_thresholds = thresholds
        self.min_mean_dice = float(self.min_mean_dice)
        self.relax_step = float(self.relax_step)
        self.max_relax_steps = int(self.max_relax_steps)
        self.keep_k = int(self.keep_k)
        self.min_kept_per_mask = int(self.min_kept_per_mask)

    def thresholds(self, level: int) -> tuple[np.ndarray, float]:
        """Per-class and mean Dice thresholds at relaxation ``level`` (rounded to 6 decimals, never below 0)."""
        drop = level * self.relax_step
        per_class = np.round(np.clip(self.class_thresholds - drop, 0.0, None), 6)
        return per_class, round(max(self.min_mean_dice - drop, 0.0), 6)


@dataclass
class TryDecision:
    """What the filter decided for one try: whether it passed and was kept, at which level, and why."""

    passed: bool
    kept: bool
    relax_level: int
    min_class_dice: list[float]
    min_mean_dice: float
    reason: str
    rank: int | None = None  # 0-based rank among the kept tries of the mask


def pair_scores(
    prediction: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, num_classes: int
) -> np.ndarray:
    """Dice of every foreground class ``1..num_classes-1`` between the judge's label map of a generated image and the
    pair's label.

    A class in the label is scored as usual. A class the label lacks but the judge finds scores 0: the label would not
    describe the image (this is stricter than the faithfulness report, which ignores such classes). A class absent
    from both is not scored (NaN).
    """
    prediction, label = torch.as_tensor(prediction).long().cpu(), torch.as_tensor(label).long().cpu()
    if prediction.shape != label.shape:
        raise ValueError(
            f"judge prediction shape {tuple(prediction.shape)} differs from the label's {tuple(label.shape)}."
        )
    as_onehot = lambda x: one_hot(x.reshape(1, 1, *x.shape), num_classes, dim=1)  # noqa: E731
    pred, truth = as_onehot(prediction), as_onehot(label)
    dice = compute_dice(pred, truth, include_background=False, ignore_empty=False)[0].numpy().astype(np.float64)
    flat = tuple(range(1, truth.ndim - 1))
    absent = (truth[0, 1:].sum(dim=flat) == 0) & (pred[0, 1:].sum(dim=flat) == 0)
    dice[absent.numpy()] = np.nan
    return dice


def _mean(dice: np.ndarray) -> float:
    return float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan


def _failures(dice: np.ndarray, per_class: np.ndarray, mean_threshold: float, class_names: Sequence[str]) -> list[str]:
    problems = [
        f"{class_names[c]} Dice {dice[c]:.3f} < {per_class[c]:.2f}"
        for c in range(len(dice))
        if np.isfinite(dice[c]) and dice[c] < per_class[c]
    ]
    mean = _mean(dice)
    if math.isfinite(mean) and mean < mean_threshold:
        problems.append(f"mean Dice {mean:.3f} < {mean_threshold:.2f}")
    return problems


def _passing(scores: Sequence[np.ndarray], criteria: FilterCriteria, level: int) -> list[int]:
    per_class, mean = criteria.thresholds(level)
    names = [str(c) for c in range(1, criteria.num_classes)]
    return [i for i, dice in enumerate(scores) if not _failures(np.asarray(dice, float), per_class, mean, names)]


def _best(scores: Sequence[np.ndarray], indices: Sequence[int], k: int) -> list[int]:
    """The ``k`` tries of highest mean Dice among ``indices`` (unscored tries rank last; ties: the earlier try)."""

    def order(i: int) -> tuple[float, int]:
        mean = _mean(np.asarray(scores[i], float))
        return (-mean if math.isfinite(mean) else 1.0, i)

    return sorted(indices, key=order)[:k]


def enough_passed(scores: Sequence[np.ndarray], criteria: FilterCriteria) -> bool:
    """True once ``keep_k`` tries pass the unrelaxed thresholds: more tries cannot improve on them (used to stop
    generating early)."""
    return len(_passing(scores, criteria, 0)) >= criteria.keep_k


def candidates_to_keep(scores: Sequence[np.ndarray], criteria: FilterCriteria) -> set[int]:
    """Tries that the final decision can still keep, whatever later tries score: at every relaxation level, the best
    ``keep_k`` of those passing. The images of all other tries can be dropped from memory."""
    needed: set[int] = set()
    for level in range(criteria.max_relax_steps + 1):
        needed.update(_best(scores, _passing(scores, criteria, level), criteria.keep_k))
    return needed


def select_tries(
    scores: Sequence[np.ndarray], criteria: FilterCriteria, class_names: Sequence[str] | None = None
) -> list[TryDecision]:
    """Decide, for every try of one mask (in try order), whether it is kept; see the module docstring for the rule.

    Args:
        scores: per try, the per-class Dice array of :func:`pair_scores` (NaN: class not scored).
        criteria: the thresholds and counts.
        class_names: names of classes ``1..num_classes-1`` used in the reasons (default ``class_1``...).

    Returns:
        one :class:`TryDecision` per try; all carry the thresholds in force at the mask's final level.
    """
    names = list(class_names or [f"class_{c}" for c in range(1, criteria.num_classes)])
    rows = [np.asarray(s, dtype=float) for s in scores]
    for index, row in enumerate(rows):
        if row.shape != (criteria.num_classes - 1,):
            raise ValueError(
                f"try {index}: expected {criteria.num_classes - 1} per-class Dice values, got shape {row.shape}."
            )
    level = 0
    passing = _passing(rows, criteria, level)
    while len(passing) < criteria.min_kept_per_mask and level < criteria.max_relax_steps:
        level += 1
        passing = _passing(rows, criteria, level)
    kept = _best(rows, passing, criteria.keep_k)
    per_class, mean_threshold = criteria.thresholds(level)
    relaxed = f" (relaxed {level} step{'s' if level > 1 else ''})" if level else ""
    decisions = []
    for index, row in enumerate(rows):
        problems = _failures(row, per_class, mean_threshold, names)
        if index in kept:
            rank = kept.index(index)
            scored = f"passed{relaxed}"
            if not np.isfinite(row).any():
                scored = "nothing to score: no foreground in the mask nor the judge's map"
            reason = f"kept: {scored}, rank {rank + 1} of {len(passing)} passing"
        elif not problems:
            rank = None
            better = "the kept try" if len(kept) == 1 else f"the {len(kept)} kept tries"
            reason = f"rejected: passed{relaxed}, but {better} scored a higher mean Dice (keep_k={criteria.keep_k})"
        else:
            rank = None
            reason = "rejected: " + "; ".join(problems) + relaxed
        decisions.append(
            TryDecision(
                passed=not problems,
                kept=index in kept,
                relax_level=level,
                min_class_dice=[float(v) for v in per_class],
                min_mean_dice=mean_threshold,
                reason=reason,
                rank=rank,
            )
        )
    return decisions
