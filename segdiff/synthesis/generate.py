"""New anatomies: image/mask pairs from a joint model, or masks from a mask generator, drawn from noise and checked.

A joint model (``configs/train_joint.yaml``) generates the image channels followed by the one-hot mask channels
(in [-1, 1]); a mask generator (``configs/train_mask_generator.yaml``) only the mask channels. Either way the mask is
the argmax of its channels. :class:`NoiseGenerator` draws such samples on a reference grid; :class:`SampleSynthesizer`
draws one accepted sample per generated case (up to ``max_tries_per_case`` draws), where a draw is accepted when its
mask passes the plausibility filter (:mod:`segdiff.synthesis.plausibility`) and, for pairs with a judge, when the
judge's segmentation of the image agrees with the mask (the unrelaxed thresholds of
:class:`segdiff.synthesis.FilterCriteria`). Output folder, records, resuming and sharding across processes are those
of mask -> image synthesis (:mod:`segdiff.synthesis.records`, :mod:`segdiff.synthesis.shard`); case ``k`` is named
``gen<k>`` (five digits) and its files ``images/gen<k>_syn0.nii.gz`` and ``labels/gen<k>_syn0.nii.gz``.

Every draw is seeded from ``(seed, case, try)`` (:func:`segdiff.synthesis.derive_seed`), so a case's sample depends
neither on the number of processes nor on which other cases a run makes.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, Resize, SpatialCrop
from tqdm.auto import tqdm

from segdiff.data.inputs import require_file
from segdiff.evaluation.report import foreground_names
from segdiff.synthesis.filter import FilterCriteria, pair_scores
from segdiff.synthesis.judges import load_weights
from segdiff.synthesis.records import SynthesisRecords, file_digest, pair_names
from segdiff.synthesis.shard import process_shard, shard_of
from segdiff.synthesis.synthesize import derive_seed, nifti_writer

__all__ = [
    "NoiseGenerator",
    "SampleSynthesizer",
    "generated_case_names",
    "masks_on_grid",
    "reference_grid",
    "split_joint_sample",
]

logger = logging.getLogger(__name__)


def split_joint_sample(
    sample: torch.Tensor, image_channels: int, num_classes: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(image_channels + num_classes, *spatial)`` -> the image ``(image_channels, *spatial)`` (None without image
    channels) and the mask ``(1, *spatial)``: the argmax of the mask channels, classes in ``[0, num_classes)``."""
    sample = torch.as_tensor(sample)
    expected = int(image_channels) + int(num_classes)
    if sample.shape[0] != expected:
        raise ValueError(
            f"a sample has {sample.shape[0]} channels; image_channels ({image_channels}) + num_classes ({num_classes}) "
            f"= {expected} expected: the model was trained with other settings."
        )
    image = sample[:image_channels] if image_channels else None
    mask = sample[image_channels:].argmax(dim=0, keepdim=True)
    return image, mask


def reference_grid(path: str, spatial_dims: int, slice_axis: int = 2) -> MetaTensor:
    """The grid generated samples are written on: the file's first channel ``(1, *spatial)`` with its affine.

    A 2D model and a 3D file: the middle slice along ``slice_axis``, kept as an axis of size 1 (affine updated), so
    the pairs are one-slice volumes in the file's space that any NIfTI viewer places correctly.
    """
    grid = LoadImage(image_only=True, ensure_channel_first=True)(require_file(path))[:1]
    if spatial_dims == 2 and grid.ndim == 4:
        middle = grid.shape[1 + slice_axis] // 2
        start = [0, 0, 0]
        end = list(grid.shape[1:])
        start[slice_axis], end[slice_axis] = middle, middle + 1
        grid = SpatialCrop(roi_start=start, roi_end=end)(grid)
    elif grid.ndim - 1 != spatial_dims:
        raise ValueError(f"{path}: a {grid.ndim - 1}D file cannot be the reference grid of a {spatial_dims}D model.")
    return MetaTensor(torch.zeros(grid.shape), meta=copy.deepcopy(grid.meta))


def masks_on_grid(
    entries: Sequence[Mapping[str, Any]], reference: MetaTensor, spatial_dims: int, slice_axis: int = 2
) -> Iterator[torch.Tensor]:
    """The training masks as the generator sees them, on the reference grid's shape (nearest-neighbour resizing):
    what the plausibility statistics are computed from.

    A 2D model: every slice along ``slice_axis`` with a labelled voxel (the slices it was trained on), shaped like
    the reference (one slice); a 3D model: every volume.
    """
    load = LoadImage(image_only=True, ensure_channel_first=True)
    shape = tuple(reference.shape[1:])
    for entry in entries:
        label = torch.as_tensor(load(require_file(entry["label"])))[:1].float()
        if spatial_dims == 2 and label.ndim == 4:
            axis = 1 + slice_axis
            in_plane = tuple(n for d, n in enumerate(shape) if d != slice_axis)
            for k in range(label.shape[axis]):
                piece = label.select(axis, k)
                if piece.any():
                    resized = Resize(in_plane, mode="nearest")(piece)
                    yield torch.as_tensor(resized).long().unsqueeze(axis)
        else:
            yield torch.as_tensor(Resize(shape, mode="nearest")(label)).long()


def generated_case_names(num_cases: int) -> list[str]:
    """``gen00000, gen00001, ...``: the case names of generated samples."""
    if int(num_cases) < 1:
        raise ValueError(f"the number of samples to generate must be >= 1, got {num_cases}.")
    return [f"gen{k:05d}" for k in range(int(num_cases))]


class NoiseGenerator:
    """``generator(num_samples, seed) -> [(image or None, mask), ...]``: samples of an unconditional joint model or
    mask generator, drawn by the bundle's sampler on the reference grid.

    Args:
        network: the diffusion network (``image_channels + num_classes`` channels in and out).
        sampler: a :class:`segdiff.engine.ConditionalDiffusionSampler` with ``conditional=False`` and
            ``target_channels = image_channels + num_classes``; each call uses a copy with the call's seed.
        reference: the grid, from :func:`reference_grid`.
        image_channels: image channels of a sample (0: a mask generator).
        num_classes: mask classes including background.
        weights: the trained weights to load; None: ``network`` is used as it is.
        device: where the network runs.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        sampler: Any,
        reference: MetaTensor,
        image_channels: int,
        num_classes: int,
        weights: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if getattr(sampler, "conditional", False):
            raise ValueError("the sampler of a joint model or mask generator must be unconditional (conditional=False).")
        channels = int(image_channels) + int(num_classes)
        if getattr(sampler, "target_channels", channels) != channels:
            raise ValueError(
                f"the sampler draws {sampler.target_channels} channels; image_channels + num_classes = {channels}."
            )
        self.weights = None if weights is None else require_file(weights)
        self.network = network if weights is None else load_weights(network, weights, device)
        self.sampler, self.reference = sampler, reference
        self.image_channels, self.num_classes = int(image_channels), int(num_classes)

    def describe(self) -> dict[str, Any]:
        return {"sha256": None if self.weights is None else file_digest(self.weights),
                "grid": list(self.reference.shape[1:]),
                "affine": np.round(np.asarray(self.reference.affine), 6).tolist()}

    def __call__(self, num_samples: int, seed: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        sampler = copy.copy(self.sampler)
        sampler.num_samples, sampler.seed = int(num_samples), int(seed)
        device = next(self.network.parameters()).device
        out = sampler(self.reference[None].to(device), self.network)[0]
        out = torch.as_tensor(out).cpu().float().reshape(int(num_samples), -1, *self.reference.shape[1:])
        return [split_joint_sample(s, self.image_channels, self.num_classes) for s in out]


class SampleSynthesizer:
    """Draw, check and write ``num_cases`` generated samples (pairs or masks); resumable and shardable.

    Args:
        generator: ``generator(num_samples, seed) -> [(image or None, mask)]`` (:class:`NoiseGenerator`).
        output_dir: the output folder (layout of :mod:`segdiff.synthesis.records`; masks only: no ``images/``
            files, datalist entries with a ``label`` alone).
        num_cases: samples to keep at most (one per case ``gen<k>``).
        reference: the grid (its metadata goes into the written files).
        num_classes: mask classes including background.
        mask_filter: ``mask_filter(mask) -> (passed, reasons)``
            (:class:`segdiff.synthesis.PlausibilityFilter`); None: every mask passes.
        judge: ``judge(image) -> label map``, for pairs: the image's segmentation must agree with the mask; None: no
            judge.
        criteria: the judge's thresholds (the unrelaxed ``min_class_dice`` / ``min_mean_dice``).
        max_tries_per_case: draws per case at most; a case with no accepted draw keeps nothing (recorded).
        seed: the run's seed; draw ``t`` of case ``c`` is seeded by ``derive_seed(seed, c, t)``.
        settings: what decides the outputs (with ``seed`` and ``max_tries_per_case``, added here); stored with the
            records, a rerun into the folder must match. ``num_cases`` may grow: a rerun with more cases adds them.
        class_names: names of classes ``1..num_classes-1``.
        labels: the datalist's ``"labels"``, copied into the output datalist.
        progress: show a progress bar.
        rank, world_size: this process's share of the cases (see :func:`segdiff.synthesis.process_shard`).
    """

    def __init__(
        self,
        generator: Callable[[int, int], Sequence[tuple[torch.Tensor | None, torch.Tensor]]],
        output_dir: str,
        num_cases: int,
        reference: MetaTensor,
        num_classes: int,
        mask_filter: Callable[[torch.Tensor], tuple[bool, list[str]]] | None = None,
        judge: Callable[[torch.Tensor], torch.Tensor] | None = None,
        criteria: FilterCriteria | None = None,
        max_tries_per_case: int = 5,
        seed: int = 0,
        settings: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        progress: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if int(max_tries_per_case) < 1:
            raise ValueError(f"max_tries_per_case must be >= 1, got {max_tries_per_case}.")
        if judge is not None and criteria is None:
            raise ValueError("a judge needs its thresholds (criteria).")
        self.generator, self.mask_filter, self.judge, self.criteria = generator, mask_filter, judge, criteria
        self.cases = generated_case_names(num_cases)
        self.reference, self.num_classes = reference, int(num_classes)
        self.max_tries, self.seed, self.progress = int(max_tries_per_case), int(seed), progress
        self.class_names = foreground_names(class_names, self.num_classes)
        full = {**dict(settings or {}), "seed": self.seed, "max_tries_per_case": self.max_tries}
        for name, part in (("generator", generator), ("judge", judge), ("mask_filter", mask_filter)):
            if hasattr(part, "describe"):
                full[name] = part.describe()
        self.rank, self.world_size = process_shard(rank, world_size)
        self.records = SynthesisRecords(output_dir, full, self.class_names, labels, self.rank, self.world_size)

    def prepare(self) -> int:
        """Open the output folder (refusing other settings and files in the way); returns this process's cases
        still to do."""
        mine = shard_of(self.cases, self.rank, self.world_size)
        self.records.open(order=self.cases, cases=mine)
        todo = [c for c in mine if not self.records.is_finished(c)]
        for case in todo:
            existing = self.records.existing_outputs(case, 1)
            if existing:
                raise FileExistsError(
                    f"{existing[0]} exists but {case} is not recorded as finished in {self.records.path}; it is not "
                    "overwritten. Move it away or choose another output_dir."
                )
        return len(todo)

    def run(self) -> dict[str, Any]:
        """Generate every case not finished yet; returns a summary (cases, draws, kept, rejection reasons)."""
        todo = self.prepare()
        mine = shard_of(self.cases, self.rank, self.world_size)
        share = "" if self.world_size == 1 else f" (rank {self.rank} of {self.world_size})"
        bar = tqdm(total=len(mine), initial=len(mine) - todo, desc=f"generating{share}", unit="case",
                   disable=not self.progress, position=self.rank)
        try:
            for case in mine:
                if not self.records.is_finished(case):
                    self.generate_case(case)
                    bar.update(1)
                    bar.set_postfix(kept=sum(m["kept"] for m in self.records.masks.values()))
        finally:
            bar.close()
        tries = self.records.tries
        # why draws were rejected, numbers left out so that alike reasons count together
        reasons = Counter(re.sub(r"\d+(\.\d+)?", "#", piece.split(" (")[0])
                          for r in tries if not r["passed"] for piece in r["reason"][len("rejected: "):].split("; "))
        summary = {
            "cases": len(self.records.masks),
            "tries": len(tries),
            "kept": sum(m["kept"] for m in self.records.masks.values()),
            "cases_without_sample": sorted(c for c, m in self.records.masks.items() if m["kept"] == 0),
            "rejections": dict(reasons.most_common(10)),
            "output_dir": str(self.records.root),
        }
        logger.info(f"generation{share}: {summary}")
        print(f"generation{share}: {summary['kept']} kept from {summary['tries']} draws over {summary['cases']} cases "
              f"-> {self.records.root / 'datalist.json'}")
        return summary

    def _judge_scores(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, list[str]]:
        """Per-class Dice of the judge's map against the mask, and the unrelaxed thresholds it misses."""
        dice = np.round(pair_scores(self.judge(image), mask[0], self.num_classes), 4)
        per_class, mean_min = self.criteria.thresholds(0)
        misses = [f"{n} Dice {d:.3f} < {t:.2f}" for n, d, t in zip(self.class_names, dice, per_class)
                  if np.isfinite(d) and d < t]
        mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
        if np.isfinite(mean) and mean < mean_min:
            misses.append(f"mean Dice {mean:.3f} < {mean_min:.2f}")
        return dice, misses

    def generate_case(self, case: str) -> list[dict[str, Any]]:
        """Draws of one case until one is accepted (or ``max_tries_per_case``); records them, writes the kept one."""
        rows: list[dict[str, Any]] = []
        kept: tuple[torch.Tensor | None, torch.Tensor] | None = None
        use_judge = self.judge is not None
        per_class, mean_min = self.criteria.thresholds(0) if use_judge else ([None] * len(self.class_names), None)
        for t in range(self.max_tries):
            seed = derive_seed(self.seed, case, t)
            image, mask = self.generator(1, seed)[0]
            passed, reasons = (True, []) if self.mask_filter is None else self.mask_filter(mask)
            dice = np.full(len(self.class_names), np.nan)
            if use_judge and image is not None:
                dice, misses = self._judge_scores(image, mask)
                reasons = list(reasons) + misses
                passed = passed and not misses
            passed = passed and not reasons
            row = {
                "case": case, "mask": "generated", "try": t, "round": t, "sample": 0, "seed": seed,
                "unspecified_classes": [], "mask_changed": None,
                "dice": {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.class_names, dice)},
                "mean_dice": None if not np.isfinite(dice).any() else round(float(np.nanmean(dice)), 4),
                "classes": sorted(int(c) for c in torch.unique(mask).tolist()),
                "relax_level": 0, "min_class_dice": [None if v is None else float(v) for v in per_class],
                "min_mean_dice": mean_min, "passed": passed, "kept": passed,
                "reason": "kept: passed" if passed else "rejected: " + "; ".join(reasons),
                "image": None, "label": None,
            }
            rows.append(row)
            if passed:
                kept = (image, mask)
                break
        outputs = []
        if kept is not None:
            image_name, label_name = pair_names(case, 0)
            rows[-1]["label"] = label_name
            outputs.append((label_name, nifti_writer(kept[1].float(), self.reference, label=True,
                                                     num_classes=self.num_classes)))
            if kept[0] is not None:
                rows[-1]["image"] = image_name
                outputs.append((image_name, nifti_writer(kept[0], self.reference)))
        self.records.finish_mask(case, "generated", rows, outputs)
        return rows
