"""Downstream value of synthetic data (Saragih et al.; MRGen): train one segmenter three times, on (a) a small real
training subset, (b) synthetic pairs only, (c) both, and score each on the real test split by Dice and IoU per class.

The three arms differ only in their training data: the same network (evaluate.yaml's ``segmenter_def``) starts from
the same initial weights, sees the same number of iterations with the same seed, batch size, optimizer, loss and
augmentation (evaluate.yaml's ``segmenter_train#preprocessing``: 2D slices of volumes, resized, noised). Run it as an
overlay on evaluate.yaml (configs/downstream.yaml); the report is ``downstream.{json,md,png}``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segdiff.data.datalist import DatalistError, case_name, resolve_datalist
from segdiff.evaluation.segmenter import per_class_dice, per_class_iou, segment_case

__all__ = [
    "ARMS",
    "ARM_COLOURS",
    "arm_data",
    "downstream_markdown",
    "per_class_iou",
    "real_subset",
    "run_downstream",
    "save_bar_plot",
    "score_segmenter",
    "source_case",
    "synthetic_entries",
    "train_segmenter",
]


#: the training-data arms, in report order
ARMS = ("real", "synthetic", "mixed")
#: bar colours of the arms in the plot
ARM_COLOURS = {"real": (55, 110, 190), "synthetic": (230, 140, 40), "mixed": (70, 160, 80)}
_ARM_TITLES = {"real": "real only", "synthetic": "synthetic only", "mixed": "real + synthetic"}


def real_subset(
    entries: Sequence[Mapping[str, Any]],
    real_fraction: float | None = 0.1,
    num_cases: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A seeded random subset of the real training cases (the low-data regime), in the datalist's order.

    Args:
        entries: the real training entries (cases, not slices: slices of one volume stay together).
        real_fraction: fraction of the cases to keep, in (0, 1]; ``round(n * fraction)``, at least 1.
        num_cases: the number of cases to keep instead (overrides ``real_fraction``).
        seed: seed of the choice; one seed gives one subset of one datalist.
    """
    entries = list(entries)
    if not entries:
        raise DatalistError("the real training split is empty: nothing to choose a subset from")
    if num_cases is not None:
        count = int(num_cases)
        if not 1 <= count <= len(entries):
            raise ValueError(f"real_cases must be in [1, {len(entries)}] (the real training cases), found {num_cases}")
    else:
        if real_fraction is None or not 0.0 < float(real_fraction) <= 1.0:
            raise ValueError(f"real_fraction must be in (0, 1], found {real_fraction}")
        count = max(1, math.floor(len(entries) * float(real_fraction) + 0.5))
    chosen = sorted(random.Random(seed).sample(range(len(entries)), count))
    return [dict(entries[i]) for i in chosen]


def source_case(entry: Mapping[str, Any], source_key: str | None = None) -> str:
    """The real case a synthetic entry was generated from: ``entry[source_key]`` (a case name or a mask path), else
    the entry's ``"case"`` (synthesize.yaml records it), else ``<case>`` of an image named ``<case>_syn<k>``
    (synthesize.yaml's naming), else the label file's case name."""
    from segdiff.evaluation.image_quality import _SAMPLE_SUFFIX

    if source_key is None and "case" in entry:
        source_key = "case"
    if source_key is not None:
        if source_key not in entry:
            raise KeyError(f"synthetic entry has no {source_key!r} naming its source mask; its keys: {sorted(entry)}")
        value = str(entry[source_key])
        return case_name(value) or value
    image = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
    match = _SAMPLE_SUFFIX.match(case_name(image) or os.path.basename(image))
    if match:
        return match.group("case")
    return case_name(entry["label"]) or os.path.basename(entry["label"])


def synthetic_entries(
    datalist: str | os.PathLike | None,
    dataset_dir: str | os.PathLike | None = None,
    split: str = "training",
    only_from: Sequence[Mapping[str, Any]] | None = None,
    source_key: str | None = None,
) -> list[dict[str, Any]]:
    """The synthetic pairs with absolute paths, optionally only those generated from the masks of ``only_from``.

    Args:
        datalist: the synthetic datalist (synthesize.yaml writes ``<out>/datalist.json``).
        dataset_dir: folder its paths are relative to (default: the datalist's folder).
        split: the split holding the pairs.
        only_from: real entries (the real subset): keep the synthetic pairs whose source case (:func:`source_case`)
            is one of theirs, so the low-data arms never see anatomy of other real cases. None keeps all.
        source_key: entry key naming the source mask, if the datalist has one.
    """
    if datalist is None:
        raise ValueError(
            "synthetic_datalist is not set: pass the datalist of the synthetic pairs (synthesize.yaml writes "
            "<output>/datalist.json), e.g. --synthetic_datalist /data/synthetic/datalist.json"
        )
    entries = resolve_datalist(datalist, dataset_dir, split)
    if only_from is None:
        return entries
    real_cases = {case_name(e["label"]) or os.path.basename(e["label"]) for e in only_from}
    kept = [e for e in entries if source_case(e, source_key) in real_cases]
    if not kept:
        found = sorted({source_case(e, source_key) for e in entries})
        raise DatalistError(
            f"{datalist}: none of the {len(entries)} synthetic pairs was generated from the real subset's masks "
            f"{sorted(real_cases)} (their sources: {found[:5]}{' ...' if len(found) > 5 else ''}); generate from the "
            "subset's masks or set synthetic_from_subset to false"
        )
    return kept


def arm_data(
    arms: Sequence[str], real: Sequence[Mapping[str, Any]], synthetic: Sequence[Mapping[str, Any]] | None
) -> dict[str, list[dict[str, Any]]]:
    """Training entries of each arm: ``real``, ``synthetic`` or ``mixed`` (both, in one shuffled pool).

    Only ``image`` and ``label`` are kept: synthetic entries carry their scores (nested, with nulls), which a data
    loader cannot collate beside real entries that have none."""
    data = {}
    for arm in arms:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}: expected some of {list(ARMS)}")
        if arm != "real" and synthetic is None:
            raise ValueError(f"arm {arm!r} needs synthetic pairs: set synthetic_datalist")
        chosen = real if arm == "real" else synthetic if arm == "synthetic" else [*real, *synthetic]
        data[arm] = [{"image": e["image"], "label": e["label"]} for e in chosen]
        if not data[arm]:
            raise DatalistError(f"arm {arm!r} has no training entries")
    return data


def train_segmenter(
    network: torch.nn.Module,
    entries: Sequence[Mapping[str, Any]],
    transform: Callable,
    num_iterations: int,
    batch_size: int,
    optimizer: Callable[..., torch.optim.Optimizer],
    loss_function: Callable,
    device: torch.device | str,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.nn.Module:
    """Train ``network`` for exactly ``num_iterations`` steps on ``entries`` (the data loader restarts as often as
    needed), with the seed fixing the shuffling and the random transforms.

    Args:
        network: the network to train (in place).
        entries: training entries with absolute paths.
        transform: the training preprocessing (load, scale, slice, resize, augment).
        num_iterations: optimizer steps.
        batch_size: entries per batch (each entry may give several slices).
        optimizer: ``optimizer(parameters)`` builds the optimizer, e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``.
        loss_function: ``loss(logits, label)``.
        device: where to train.
        seed: seed of the shuffling and of the random transforms.
        num_workers: data loader workers.
        progress: show a progress bar with the loss.
    """
    from ignite.handlers import ProgressBar
    from monai.data import CacheDataset, DataLoader
    from monai.engines import SupervisedTrainer
    from monai.handlers import from_engine
    from monai.utils import set_determinism

    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, found {num_iterations}")
    set_determinism(seed=seed)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)
    dataset = CacheDataset(list(entries), transform=transform, num_workers=num_workers or None, progress=False)
    loader = DataLoader(
        dataset, batch_size=max(1, int(batch_size)), shuffle=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=1,
        epoch_length=int(num_iterations),
        train_data_loader=loader,
        network=network.to(device),
        optimizer=optimizer(network.parameters()),
        loss_function=loss_function,
    )
    if progress:
        loss = from_engine(["loss"], first=True)
        ProgressBar(persist=True).attach(trainer, output_transform=lambda output: {"loss": loss(output)})
    trainer.run()
    return network


def _clean(values: Sequence[float]) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else round(float(v), 4) for v in values]


def score_segmenter(
    network: torch.nn.Module,
    test_entries: Sequence[Mapping[str, Any]],
    load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    num_classes: int,
    spatial_dims: int,
    image_size: Sequence[int] | None,
    slice_axis: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-case, per-class Dice and IoU ``(cases, num_classes - 1)`` of a segmenter on the test cases (each whole
    case on its own grid, 2D networks slice by slice: :func:`segment_case`)."""
    dice_rows, iou_rows = [], []
    iterator: Any = test_entries
    if progress:
        from tqdm import tqdm

        iterator = tqdm(test_entries, desc="scoring on the real test split", unit="case")
    for entry in iterator:
        data = load(dict(entry))
        truth = torch.as_tensor(data["label"])[0]
        prediction = segment_case(network, torch.as_tensor(data["image"]), spatial_dims, image_size, slice_axis)
        dice_rows.append(per_class_dice(prediction, truth, num_classes))
        iou_rows.append(per_class_iou(prediction, truth, num_classes))
    return np.stack(dice_rows), np.stack(iou_rows)


def _summary(table: np.ndarray, names: Sequence[str]) -> tuple[dict[str, float | None], float | None]:
    with np.errstate(all="ignore"):
        per_class = np.nanmean(table, axis=0) if len(table) else np.full(len(names), np.nan)
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else None
    return dict(zip(names, _clean(per_class))), (None if mean is None else round(mean, 4))


def downstream_markdown(report: Mapping[str, Any]) -> str:
    """One row per arm: training cases, Dice per class and mean, IoU per class and mean."""
    names = report["classes"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    header = (
        "| training data | real cases | synthetic pairs | "
        + " | ".join(f"Dice {n}" for n in names) + " | mean Dice | "
        + " | ".join(f"IoU {n}" for n in names) + " | mean IoU |"
    )
    lines = [header, "|---" * (2 * len(names) + 5) + "|"]
    for arm, entry in report["arms"].items():
        cells = [fmt(entry["dice"][n]) for n in names] + [fmt(entry["mean_dice"])]
        cells += [fmt(entry["iou"][n]) for n in names] + [fmt(entry["mean_iou"])]
        lines.append(
            f"| {_ARM_TITLES.get(arm, arm)} | {entry['real_cases']} | {entry['synthetic_pairs']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def save_bar_plot(report: Mapping[str, Any], path: str) -> str:
    """A PNG bar plot (PIL only): Dice (top) and IoU (bottom) per class and their mean, one bar per arm."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(report["classes"]) + ["mean"]
    arms = list(report["arms"])
    bar, gap, left, top, plot_h = 18, 26, 54, 34, 200
    group_w = bar * len(arms) + gap
    width = left + group_w * len(names) + 20
    panel_h = top + plot_h + 46
    legend_h = 28
    picture = Image.new("RGB", (max(width, 420), 2 * panel_h + legend_h), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for p, metric in enumerate(("dice", "iou")):
        y0 = p * panel_h + top
        draw.text((left, y0 - 26), f"{'Dice' if metric == 'dice' else 'IoU'} on the real test split", fill="black", font=font)
        for tick in range(0, 11, 2):
            y = y0 + plot_h - tick / 10 * plot_h
            draw.line([(left - 4, y), (left + group_w * len(names), y)], fill=(225, 225, 225) if tick else "black")
            draw.text((left - 34, y - 6), f"{tick / 10:.1f}", fill="black", font=font)
        for g, name in enumerate(names):
            x0 = left + g * group_w + gap // 2
            for a, arm in enumerate(arms):
                entry = report["arms"][arm]
                value = entry[f"mean_{metric}"] if name == "mean" else entry[metric][name]
                if value is None:
                    continue
                x = x0 + a * bar
                draw.rectangle([x, y0 + plot_h - value * plot_h, x + bar - 3, y0 + plot_h], fill=ARM_COLOURS.get(arm, (120, 120, 120)))
            draw.text((x0, y0 + plot_h + 6), name[: max(4, group_w // 6)], fill="black", font=font)
    x = left
    for arm in arms:
        y = 2 * panel_h + 6
        draw.rectangle([x, y, x + 12, y + 12], fill=ARM_COLOURS.get(arm, (120, 120, 120)))
        label = _ARM_TITLES.get(arm, arm)
        draw.text((x + 18, y), label, fill="black", font=font)
        x += 30 + int(draw.textlength(label, font=font))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
    return path


def run_downstream(
    real_entries: Sequence[Mapping[str, Any]],
    synthetic_entries: Sequence[Mapping[str, Any]] | None,
    test_entries: Sequence[Mapping[str, Any]],
    network: torch.nn.Module,
    transform: Callable,
    load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    num_classes: int,
    num_iterations: int,
    batch_size: int,
    optimizer: Callable[..., torch.optim.Optimizer],
    loss_function: Callable,
    device: torch.device | str,
    report_dir: str,
    arms: Sequence[str] = ARMS,
    spatial_dims: int = 2,
    image_size: Sequence[int] | None = None,
    slice_axis: int = 2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    num_workers: int = 0,
    settings: Mapping[str, Any] | None = None,
    image_quality: bool = False,
    feature_network: str | torch.nn.Module | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one copy of ``network`` per arm and score each on the real test split; write the report.

    Args:
        real_entries: the real training subset (:func:`real_subset`), absolute paths.
        synthetic_entries: the synthetic pairs (:func:`synthetic_entries`); None when only the ``real`` arm runs.
        test_entries: the real test split, absolute paths.
        network: the untrained segmenter; every arm starts from a copy of its weights.
        transform: the training preprocessing, shared by all arms.
        load: loads a test entry's ``"image"`` (scaled as in training) and ``"label"``.
        num_classes: classes including background.
        num_iterations: optimizer steps of every arm.
        batch_size, optimizer, loss_function, device, seed, num_workers: as :func:`train_segmenter`.
        report_dir: where ``downstream.{json,md,png}`` and each arm's weights ``segmenter_<arm>.pt`` go.
        arms: which of ``real``, ``synthetic``, ``mixed`` to train (default all three).
        spatial_dims, image_size, slice_axis: how the segmenter sees a case.
        class_names: names of classes ``1..num_classes-1`` (default ``class_<k>``).
        settings: extra facts recorded in the report (fractions, seeds, datalists).
        image_quality: also compute FID, MMD and MS-SSIM diversity of the synthetic images against the real
            training images (:func:`segdiff.evaluation.image_quality.image_quality_report`).
        feature_network: FID's feature network: None = the encoder of the ``real`` arm's trained segmenter (else of
            the first arm's), or a dotted path / module (see ``feature_network`` there).
        progress: progress bars.
    """
    from segdiff.engine.handlers import atomic_torch_save

    names = list(class_names or [f"class_{c}" for c in range(1, num_classes)])
    if len(names) != num_classes - 1:
        raise ValueError(f"class_names has {len(names)} names; {num_classes - 1} foreground classes expected.")
    if not arms:
        raise ValueError("no arm to train: give at least one of " + ", ".join(ARMS))
    if not test_entries:
        raise DatalistError("the real test split is empty: nothing to score the segmenters on")
    data = arm_data(arms, real_entries, synthetic_entries)
    initial = copy.deepcopy(network).cpu()
    os.makedirs(report_dir, exist_ok=True)
    report: dict[str, Any] = {"classes": names, "settings": dict(settings or {}), "arms": {}, "cases": []}
    report["settings"].update({"num_iterations": int(num_iterations), "batch_size": int(batch_size), "seed": seed})
    trained: dict[str, torch.nn.Module] = {}
    per_case: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for arm, entries in data.items():
        num_real = len(real_entries) if arm in ("real", "mixed") else 0
        num_synthetic = len(entries) - num_real
        print(f"\n[downstream] arm '{arm}': {num_real} real case(s) + {num_synthetic} synthetic pair(s), "
              f"{num_iterations} iterations", flush=True)
        model = copy.deepcopy(initial)
        train_segmenter(model, entries, transform, num_iterations, batch_size, optimizer, loss_function, device,
                        seed=seed, num_workers=num_workers, progress=progress)
        atomic_torch_save(model.state_dict(), os.path.join(report_dir, f"segmenter_{arm}.pt"))
        dice, iou = score_segmenter(model, test_entries, load, num_classes, spatial_dims, image_size, slice_axis, progress)
        per_case[arm] = (dice, iou)
        trained[arm] = model
        dice_per_class, mean_dice = _summary(dice, names)
        iou_per_class, mean_iou = _summary(iou, names)
        report["arms"][arm] = {
            "real_cases": num_real,
            "synthetic_pairs": num_synthetic,
            "dice": dice_per_class,
            "mean_dice": mean_dice,
            "iou": iou_per_class,
            "mean_iou": mean_iou,
        }
    for index, entry in enumerate(test_entries):
        case = {"image": str(entry["image"]), "label": str(entry["label"])}
        for arm, (dice, iou) in per_case.items():
            case[arm] = {"dice": _clean(dice[index]), "iou": _clean(iou[index])}
        report["cases"].append(case)

    if image_quality and synthetic_entries:
        from segdiff.evaluation.image_quality import image_quality_report

        judge = feature_network if feature_network is not None else trained.get("real", next(iter(trained.values())))
        report["image_quality"] = image_quality_report(
            real_entries, synthetic_entries, load, judge, spatial_dims, image_size, slice_axis, seed=seed
        )
        if feature_network is None:
            arm = "real" if "real" in trained else next(iter(trained))
            report["image_quality"]["feature_network"] = f"encoder of the {arm}-arm segmenter (UNetEncoder)"

    with open(os.path.join(report_dir, "downstream.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = downstream_markdown(report)
    settings_line = ", ".join(f"{k} {v}" for k, v in report["settings"].items() if not isinstance(v, (list, dict)))
    with open(os.path.join(report_dir, "downstream.md"), "w") as f:
        f.write("# Downstream segmentation on the real test split, by training data\n\n")
        f.write(f"Same network, initial weights, seed and iterations in every row ({settings_line}).\n\n" + table)
        if "image_quality" in report:
            q = report["image_quality"]
            fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
            f.write(
                f"\nImage quality of the synthetic images: FID {fmt(q['fid'])} ({q['feature_network']}), "
                f"MMD {fmt(q['mmd'])}, MS-SSIM diversity {fmt(q['ms_ssim_diversity'])} "
                f"({q['num_masks_with_several_samples']} masks with several samples).\n"
            )
        f.write("\n![Dice and IoU per class](downstream.png)\n")
    save_bar_plot(report, os.path.join(report_dir, "downstream.png"))
    print(table)
    return report
