"""Synthetic labelled pairs: for every mask, generate images in rounds, judge each, keep the pairs that pass.

Per mask (see :class:`Synthesizer`): load the mask once; then, round by round, draw a variant of it (deformation,
class ablation) and ``samples_per_mask`` images from that variant as one sampler batch, have the judge segment every
image and score it against the variant (per-class Dice); stop after ``max_tries_per_mask`` images, or earlier once
``keep_k`` of them pass the unrelaxed thresholds; decide with :func:`segdiff.synthesis.filter.select_tries`; write the
kept pairs and the record of every try (:class:`segdiff.synthesis.records.SynthesisRecords`).

Every random draw of a round (the mask variant, the sampling noise) is seeded from ``(seed, case name, round)``, so a
mask's pairs do not depend on which other masks a run processes or in which order, and a resumed run produces what an
uninterrupted one would have. The same holds across processes: under ``torchrun --nproc_per_node=N`` each rank
synthesizes every N-th mask (:mod:`segdiff.synthesis.shard`) and the records of all ranks are merged into one
datalist, equal to a single process's.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Randomizable, SaveImage
from tqdm.auto import tqdm

from segdiff.data.checks import check_output_names
from segdiff.data.inputs import require_file
from segdiff.evaluation.report import foreground_names
from segdiff.synthesis.filter import (
    FilterCriteria,
    candidates_to_keep,
    enough_passed,
    pair_scores,
    select_tries,
)
from segdiff.synthesis.judges import load_weights
from segdiff.synthesis.records import SynthesisRecords, file_digest, pair_names
from segdiff.synthesis.shard import process_shard, shard_of
from segdiff.transforms.io import output_case_name as case_name

__all__ = ["DiffusionGenerator", "Synthesizer", "case_name", "derive_seed", "nifti_writer"]

logger = logging.getLogger(__name__)


def derive_seed(seed: int, case: str, round_index: int) -> int:
    """The seed of one round of one mask: a hash of the run's seed, the case name and the round (a 31-bit integer)."""
    digest = hashlib.sha256(f"{int(seed)}/{case}/{int(round_index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class DiffusionGenerator:
    """``generator(condition, num_samples, seed, initial=None) -> (num_samples, C, *spatial)``: images drawn by the
    bundle's sampler (inference.yaml's ``inferer``) from one encoded mask, on the mask's grid.

    Args:
        network: the mask_to_image diffusion network.
        sampler: a :class:`segdiff.engine.ConditionalDiffusionSampler`; each call uses a copy with the call's
            ``num_samples`` and ``seed``, so one call is one batch of the same noise as inference would draw.
        weights: the trained weights to load (``models/model.pt``); None: ``network`` is used as it is.
        device: where the network runs.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        sampler: Any,
        weights: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.weights = None if weights is None else require_file(weights)
        self.network = network if weights is None else load_weights(network, weights, device)
        self.sampler = sampler

    def describe(self) -> dict[str, Any]:
        return {"sha256": None if self.weights is None else file_digest(self.weights)}

    def __call__(
        self, condition: torch.Tensor, num_samples: int, seed: int, initial: torch.Tensor | None = None
    ) -> torch.Tensor:
        sampler = copy.copy(self.sampler)
        sampler.num_samples, sampler.seed = int(num_samples), int(seed)
        if sampler.strength >= 1.0:
            initial = None
        elif initial is None:
            raise ValueError("strength < 1 starts from the real image: the entries need an 'image' (a datalist split).")
        device = next(self.network.parameters()).device
        start = None if initial is None else torch.as_tensor(initial)[None].to(device)
        out = sampler(torch.as_tensor(condition)[None].to(device), self.network, start)[0]
        out = torch.as_tensor(out).cpu()
        return out.reshape(int(num_samples), out.shape[0] // int(num_samples), *out.shape[1:])


def nifti_writer(
    tensor: torch.Tensor, grid: Any, label: bool = False, num_classes: int = 256
) -> Callable[[str], None]:
    """A callable writing ``tensor`` (channel first) as NIfTI on the grid of ``grid`` (a MetaTensor: its affine and
    metadata) to a given ``.nii.gz`` path: float32 for images, rounded uint8 (int16 above 256 classes) for labels."""
    meta = copy.deepcopy(grid.meta) if isinstance(grid, MetaTensor) else {}
    data = MetaTensor(torch.as_tensor(tensor).detach().cpu().float(), meta=meta)
    if label:
        data = data.round()
    dtype = (np.uint8 if num_classes <= 256 else np.int16) if label else np.float32
    saver = SaveImage(output_ext=".nii.gz", output_postfix="", separate_folder=False, resample=False,
                      output_dtype=dtype, print_log=False)

    def write(path: str) -> None:
        saver(data, meta_data=meta, filename=path[: -len(".nii.gz")])

    return write


def _unspecified(label: torch.Tensor, condition: torch.Tensor, num_classes: int) -> list[int]:
    """Classes present in the label whose one-hot condition channel is empty: left to the model (ablated)."""
    if condition.shape[0] != num_classes:  # legacy one-channel encoding: no ablation
        return []
    present = [int(c) for c in torch.unique(label).tolist() if 0 < c < num_classes]
    return [c for c in present if not bool(condition[c].any())]


class Synthesizer:
    """Generate, judge, filter and write synthetic image/label pairs for a list of masks; resumable.

    Args:
        generator: ``generator(condition, num_samples, seed, initial) -> (num_samples, C, *spatial)`` images on the
            condition's grid (:class:`DiffusionGenerator`); tests pass toy generators.
        judge: ``judge(image (C, *spatial)) -> label map (*spatial)`` (see :mod:`segdiff.synthesis.judges`).
        criteria: the filter's thresholds and counts.
        output_dir: where the pairs and records go (see :mod:`segdiff.synthesis.records`).
        load: dictionary transform run once per mask on ``{"label": path}`` (plus ``"image"`` for ``strength < 1``):
            loads the label map ``(1, *spatial)`` (and the scaled real image).
        variety: dictionary transform run every round on the loaded data, seeded with the round's seed: may deform
            ``"label"`` (and ``"image"``) and must put the encoded, possibly ablated condition in ``"condition"``.
            The deformed ``"label"`` is the label of the round's pairs.
        settings: what decides the outputs besides the generator's and judge's weights (sampling, variety,
            thresholds, seed...); stored with the records, and a rerun into the same folder must match.
        samples_per_mask: images generated per round (one sampler batch from one mask variant).
        max_tries_per_mask: images generated per mask at most.
        seed: the run's seed; a round's seed is :func:`derive_seed` ``(seed, case, round)``.
        stop_early: stop a mask's rounds once ``keep_k`` tries pass the unrelaxed thresholds (later tries could
            not be kept); False: always generate ``max_tries_per_mask`` images and keep the best.
        class_names: names of classes ``1..num_classes-1`` (records, tables, reasons).
        labels: the input datalist's ``"labels"``, copied into the output datalist.
        progress: show a progress bar over the masks.
        rank, world_size: this process's share of the masks (every ``world_size``-th, from ``rank``); None: from
            ``torch.distributed`` or torchrun's environment (:func:`segdiff.synthesis.shard.process_shard`), a
            single process otherwise.
    """

    def __init__(
        self,
        generator: Callable[..., torch.Tensor],
        judge: Callable[[torch.Tensor], torch.Tensor],
        criteria: FilterCriteria,
        output_dir: str,
        load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        variety: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        settings: Mapping[str, Any] | None = None,
        samples_per_mask: int = 4,
        max_tries_per_mask: int = 20,
        seed: int = 0,
        stop_early: bool = True,
        class_names: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        progress: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if int(samples_per_mask) < 1:
            raise ValueError(f"samples_per_mask must be >= 1, got {samples_per_mask}.")
        if int(max_tries_per_mask) < int(criteria.min_kept_per_mask):
            raise ValueError(
                f"max_tries_per_mask ({max_tries_per_mask}) must be >= "
                f"min_kept_per_mask ({criteria.min_kept_per_mask})."
            )
        self.generator, self.judge, self.criteria = generator, judge, criteria
        self.load, self.variety = load, variety
        self.samples_per_mask, self.max_tries = int(samples_per_mask), int(max_tries_per_mask)
        self.seed, self.stop_early, self.progress = int(seed), bool(stop_early), progress
        num_classes = criteria.num_classes
        self.class_names = foreground_names(class_names, num_classes)
        full_settings = dict(settings or {})
        for name, part in (("generator", generator), ("judge", judge)):
            if hasattr(part, "describe"):
                full_settings[name] = part.describe()
        self.rank, self.world_size = process_shard(rank, world_size)
        self.records = SynthesisRecords(output_dir, full_settings, self.class_names, labels, self.rank,
                                        self.world_size)

    # -- before any work -------------------------------------------------------------------------------------------
    def prepare(self, entries: Sequence[Mapping[str, Any]]) -> int:
        """Check the inputs against the output folder and open it; returns the number of this process's masks
        still to do.

        Stops if two masks share a case name, if the folder was written with other settings, or if a pair file
        exists for a mask that is not finished (it would be overwritten).
        """
        check_output_names(entries, "label", "the masks")  # their outputs are named after them
        names = [case_name(e["label"]) for e in entries]
        mine = shard_of(names, self.rank, self.world_size)
        self.records.open(order=names, cases=mine)
        todo = [n for n in mine if not self.records.is_finished(n)]
        for name in todo:
            existing = self.records.existing_outputs(name, self.criteria.keep_k)
            if existing:
                raise FileExistsError(
                    f"{existing[0]} exists but {name} is not recorded as finished in {self.records.path}; it is not "
                    "overwritten. Move it away or choose another output_dir."
                )
        return len(todo)

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Synthesize pairs for every mask not finished yet; returns a summary (masks, tries, pairs kept)."""
        todo = self.prepare(entries)
        mine = shard_of(entries, self.rank, self.world_size)
        done_before = len(mine) - todo
        share = "" if self.world_size == 1 else f" (rank {self.rank} of {self.world_size})"
        if done_before:
            logger.info(f"resuming{share}: {done_before} of {len(mine)} masks already finished in {self.records.root}")
        bar = tqdm(total=len(mine), initial=done_before, desc=f"synthesizing{share}", unit="mask",
                   disable=not self.progress, position=self.rank)
        try:
            for entry in mine:
                case = case_name(entry["label"])
                if self.records.is_finished(case):
                    continue
                rows = self.synthesize_mask(entry, case)
                kept = sum(r["kept"] for r in rows)
                logger.info(f"{case}: {len(rows)} tries, {kept} kept (relaxation level {rows[0]['relax_level']})")
                bar.update(1)
                bar.set_postfix(pairs=sum(m["kept"] for m in self.records.masks.values()))
        finally:
            bar.close()
        masks = self.records.masks
        summary = {
            "masks": len(masks),
            "tries": sum(m["tries"] for m in masks.values()),
            "pairs": sum(m["kept"] for m in masks.values()),
            "masks_without_pairs": sorted(c for c, m in masks.items() if m["kept"] == 0),
            "relax_levels": dict(Counter(str(m["relax_level"]) for m in masks.values() if m["kept"])),
            "output_dir": str(self.records.root),
        }
        logger.info(f"synthesis{share}: {summary}")
        print(
            f"synthesis{share}: {summary['pairs']} pairs kept from {summary['tries']} tries over {summary['masks']} masks "
            f"({len(summary['masks_without_pairs'])} without a pair) -> {self.records.root / 'datalist.json'}"
        )
        return summary

    def synthesize_mask(self, entry: Mapping[str, Any], case: str) -> list[dict[str, Any]]:
        """All rounds of one mask, the decision, and the records and files of its kept pairs."""
        loaded = self.load(dict(entry))
        original = loaded["label"]
        scores: list[np.ndarray] = []
        rows: list[dict[str, Any]] = []
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # try -> (image, label) of possible keepers
        num_rounds = math.ceil(self.max_tries / self.samples_per_mask)
        for round_index in range(num_rounds):
            round_seed = derive_seed(self.seed, case, round_index)
            data = self._variant(loaded, round_seed)
            label = torch.as_tensor(data["label"])
            num = min(self.samples_per_mask, self.max_tries - len(rows))
            images = self.generator(data["condition"], num, round_seed, data.get("image"))
            unspecified = _unspecified(label[0], torch.as_tensor(data["condition"]), self.criteria.num_classes)
            changed = float((label != torch.as_tensor(original)).float().mean())
            for k in range(num):
                prediction = self.judge(images[k])
                # decided on the recorded precision, so that the records show exactly what was compared
                dice = np.round(pair_scores(prediction, label[0], self.criteria.num_classes), 4)
                held[len(rows)] = (images[k], label)
                scores.append(dice)
                rows.append(
                    {
                        "case": case,
                        "mask": str(entry["label"]),
                        "try": len(rows),
                        "round": round_index,
                        "sample": k,
                        "seed": round_seed,
                        "unspecified_classes": unspecified,
                        "mask_changed": round(changed, 6),
                        "dice": {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.class_names, dice)},
                        "mean_dice": None if not np.isfinite(dice).any() else round(float(np.nanmean(dice)), 4),
                    }
                )
            needed = candidates_to_keep(scores, self.criteria)
            held = {t: v for t, v in held.items() if t in needed}
            if self.stop_early and enough_passed(scores, self.criteria):
                break
        decisions = select_tries(scores, self.criteria, self.class_names)
        outputs = []
        for row, decision in zip(rows, decisions):
            row.update(
                passed=decision.passed,
                kept=decision.kept,
                relax_level=decision.relax_level,
                min_class_dice=decision.min_class_dice,
                min_mean_dice=decision.min_mean_dice,
                reason=decision.reason,
                image=None,
                label=None,
            )
            if decision.kept:
                row["image"], row["label"] = pair_names(case, decision.rank)
                image, label = held[row["try"]]
                outputs += [(row["image"], nifti_writer(image, original))]
                outputs += [(row["label"], nifti_writer(label, original, label=True,
                                                        num_classes=self.criteria.num_classes))]
        self.records.finish_mask(case, entry["label"], rows, outputs)
        return rows

    def _variant(self, loaded: Mapping[str, Any], round_seed: int) -> dict[str, Any]:
        """The round's variant of the loaded mask (and image): the variety transform seeded with the round's seed."""
        data = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in loaded.items()}
        if isinstance(self.variety, Randomizable):
            self.variety.set_random_state(seed=round_seed)
        data = dict(self.variety(data))
        if "condition" not in data:
            raise KeyError("the variety transform must write the encoded mask to 'condition'.")
        return data
