"""Downstream value of synthetic data (Saragih et al.; MRGen): train one segmenter three times, on (a) a small real
training subset, (b) synthetic pairs only, (c) both, and score each on the real test split by Dice and IoU per class.

The three arms differ only in their training data: the same network (evaluate.yaml's ``segmenter_def``) starts from
the same initial weights, sees the same number of iterations with the same seed, batch size, optimizer, loss and
augmentation (evaluate.yaml's ``segmenter_train#preprocessing``: 2D slices of volumes, resized, noised). Run it as an
overlay on evaluate.yaml (configs/downstream.yaml); the report is ``downstream.{json,md,png}``.

The stages, each one job and each called from the config: :func:`arm_data` chooses every arm's training entries
(from :func:`real_subset` and :func:`synthetic_entries`), :func:`run_arms` trains each arm (:func:`train_arm`, a
MONAI ``SupervisedTrainer`` through :func:`train_segmenter`) and scores it on the real test split (:func:`score_arm`:
MONAI's ``SupervisedEvaluator`` with ``MeanDice`` / ``MeanIoUHandler`` and a ``MetricsSaver``),
:func:`synthetic_image_quality` adds FID / MMD / MS-SSIM, and :func:`write_downstream_report` writes the report and
the plot through :func:`segdiff.evaluation.report.write_report`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segdiff.data.datalist import DatalistError, case_name, resolve_datalist
from segdiff.errors import ConfigKeyError
from segdiff.evaluation.report import class_means, foreground_names, markdown_table, metric_rows, rounded, write_report
from segdiff.evaluation.segmenter import per_class_iou

__all__ = [
    "ARMS",
    "ARM_COLOURS",
    "arm_data",
    "downstream_markdown",
    "per_class_iou",
    "real_subset",
    "run_arms",
    "save_bar_plot",
    "score_arm",
    "source_case",
    "synthetic_entries",
    "synthetic_image_quality",
    "train_arm",
    "train_segmenter",
    "write_downstream_report",
    "arm_title",
    "arm_colours",
    "source_sets",
]

logger = logging.getLogger("segdiff.evaluation")


#: the training-data arms, in report order; a further synthetic source ``<name>`` (``synthetic_sources``) adds the
#: arms ``synthetic_<name>`` and ``mixed_<name>``
ARMS = ("real", "synthetic", "mixed")
#: bar colours of the arms in the plot (further arms take _EXTRA_COLOURS in turn)
ARM_COLOURS = {"real": (55, 110, 190), "synthetic": (230, 140, 40), "mixed": (70, 160, 80)}
_EXTRA_COLOURS = ((200, 60, 60), (150, 90, 190), (120, 80, 40), (220, 120, 180), (110, 110, 110), (30, 170, 170))
_ARM_TITLES = {"real": "real only", "synthetic": "synthetic only", "mixed": "real + synthetic"}


def _arm_source(arm: str, sources: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(kind, source)`` of an arm: ``("real", None)``, ``("synthetic"|"mixed", None)`` for the pairs of
    ``synthetic_datalist``, ``("synthetic"|"mixed", name)`` for ``synthetic_<name>`` / ``mixed_<name>``."""
    if arm in ARMS:
        return arm, None
    for kind in ("synthetic", "mixed"):
        name = arm[len(kind) + 1:] if arm.startswith(kind + "_") else None
        if name and name in sources:
            return kind, name
    known = list(ARMS) + [f"{k}_{n}" for n in sources for k in ("synthetic", "mixed")]
    raise ConfigKeyError(f"downstream_arms: unknown arm {arm!r}: expected some of {known}")


def arm_title(arm: str) -> str:
    """How the report names an arm: ``real only``, ``synthetic only``, ``joint only``, ``real + joint``..."""
    if arm in _ARM_TITLES:
        return _ARM_TITLES[arm]
    for kind, title in (("synthetic_", "{} only"), ("mixed_", "real + {}")):
        if arm.startswith(kind):
            return title.format(arm[len(kind):].replace("_", " "))
    return arm


def arm_colours(arms: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct bar colour per arm."""
    extra = iter(_EXTRA_COLOURS * (1 + len(arms) // len(_EXTRA_COLOURS)))
    return {arm: ARM_COLOURS[arm] if arm in ARM_COLOURS else next(extra) for arm in arms}


def source_sets(
    sources: Mapping[str, str | os.PathLike] | None, split: str = "training"
) -> dict[str, list[dict[str, Any]]]:
    """The pairs of every further synthetic source, ``name -> datalist`` (each datalist's paths relative to its own
    folder): e.g. ``{"joint": ".../joint_synthetic/datalist.json", "generated_masks": ...}``. Their pairs are not
    filtered by the real subset: they come from generative models, whose training data the report states."""
    out = {}
    for name, datalist in dict(sources or {}).items():
        if not str(name).replace("_", "").isalnum() or name in ARMS:
            raise ConfigKeyError(f"synthetic_sources: {name!r} is not a usable source name (letters, digits, _)")
        out[str(name)] = resolve_datalist(datalist, None, split)
        if not out[str(name)]:
            raise DatalistError(f"synthetic_sources[{name!r}]: {datalist} has no {split!r} entries")
    return out


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
    from segdiff.data.naming import source_of_synthetic_case

    if source_key is None and "case" in entry:
        source_key = "case"
    if source_key is not None:
        if source_key not in entry:
            raise KeyError(f"synthetic entry has no {source_key!r} naming its source mask; its keys: {sorted(entry)}")
        value = str(entry[source_key])
        return case_name(value) or value
    image = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
    source = source_of_synthetic_case(image)
    if source:
        return source
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
        raise ConfigKeyError(
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
    arms: Sequence[str],
    real: Sequence[Mapping[str, Any]],
    synthetic: Sequence[Mapping[str, Any]] | None,
    sources: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Training entries of each arm: ``real``, ``synthetic`` or ``mixed`` (both, in one shuffled pool), and
    ``synthetic_<name>`` / ``mixed_<name>`` for every further source of :func:`source_sets`.

    Only ``image`` and ``label`` are kept: synthetic entries carry their scores (nested, with nulls), which a data
    loader cannot collate beside real entries that have none."""
    if not arms:
        raise ConfigKeyError("downstream_arms is empty: give at least one of " + ", ".join(ARMS))
    sources = dict(sources or {})
    data = {}
    for arm in arms:
        kind, name = _arm_source(arm, sources)
        pairs = synthetic if name is None else sources[name]
        if kind != "real" and pairs is None:
            raise ConfigKeyError(f"arm {arm!r} needs synthetic pairs: set synthetic_datalist")
        chosen = real if kind == "real" else pairs if kind == "synthetic" else [*real, *pairs]
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


def train_arm(
    arm: str,
    entries: Sequence[Mapping[str, Any]],
    network: torch.nn.Module,
    train: Callable[[torch.nn.Module, Sequence[Mapping[str, Any]]], Any],
    report_dir: str | None = None,
) -> torch.nn.Module:
    """Train one arm: a copy of ``network`` (the initial weights every arm starts from, left untouched) trained by
    ``train(copy, entries)`` (e.g. :func:`train_segmenter` with everything but the network and the data bound),
    its weights written to ``<report_dir>/segmenter_<arm>.pt``."""
    from segdiff.engine.handlers import atomic_torch_save

    model = copy.deepcopy(network).cpu()
    train(model, entries)
    if report_dir is not None:
        os.makedirs(report_dir, exist_ok=True)
        atomic_torch_save(model.state_dict(), os.path.join(report_dir, f"segmenter_{arm}.pt"))
    return model


def score_arm(
    network: torch.nn.Module,
    arm: str,
    data_loader: Any,
    inferer: Callable,
    postprocessing: Callable,
    device: torch.device | str,
    metrics_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Score one arm's segmenter on the real test split with MONAI's ``SupervisedEvaluator``: Dice and IoU of every
    foreground class of every case (``MeanDice`` and ``MeanIoUHandler``, background excluded, NaN where a class is
    absent from the truth).

    Args:
        network: the arm's trained segmenter.
        arm: the arm's name; the metrics are ``<arm>_dice`` and ``<arm>_iou``.
        data_loader: the real test cases (image scaled as in training, label), one case per batch.
        inferer: runs the network over a whole case (:class:`~segdiff.evaluation.SegmenterInferer`).
        postprocessing: ``pred`` and ``label`` to one-hot (argmax for ``pred``), as evaluate.yaml's.
        device: where the network runs.
        metrics_dir: MetricsSaver writes ``<arm>_{dice,iou}_raw.csv`` and ``_summary.csv`` here (None: nothing).

    Returns:
        ``{"dice": (cases, classes), "iou": (cases, classes)}``.
    """
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, MeanIoUHandler, MetricsSaver, from_engine

    from segdiff.evaluation.report import case_meta

    pair = from_engine(["pred", "label"])
    names = {"dice": f"{arm}_dice", "iou": f"{arm}_iou"}
    handlers = []
    if metrics_dir is not None:
        handlers.append(MetricsSaver(save_dir=metrics_dir, metrics=None, metric_details=list(names.values()),
                                     batch_transform=case_meta("case"), summary_ops="*"))
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=data_loader,
        network=network.to(device),
        inferer=inferer,
        postprocessing=postprocessing,
        key_val_metric={names["dice"]: MeanDice(include_background=False, output_transform=pair)},
        additional_metrics={names["iou"]: MeanIoUHandler(include_background=False, output_transform=pair)},
        val_handlers=handlers,
    )
    evaluator.run()
    return {key: metric_rows(evaluator.state.metric_details[name]) for key, name in names.items()}


def run_arms(
    data: Mapping[str, Sequence[Mapping[str, Any]]],
    network: torch.nn.Module,
    train: Callable[[torch.nn.Module, Sequence[Mapping[str, Any]]], Any],
    score: Callable[[torch.nn.Module, str], Mapping[str, np.ndarray]],
    real_cases: int,
    report_dir: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train (:func:`train_arm`) and score (``score(network, arm)``, e.g. :func:`score_arm` with the test split
    bound) every arm of :func:`arm_data`, in its order, all from ``network``'s initial weights.

    Args:
        data: the training entries of each arm.
        network: the untrained segmenter.
        train: ``train(network, entries)``.
        score: ``score(network, arm)`` -> ``{"dice": ..., "iou": ...}`` per case and class.
        real_cases: size of the real subset (the ``real`` and ``mixed`` arms hold it, the rest are synthetic pairs).
        report_dir: where each arm's weights ``segmenter_<arm>.pt`` go.

    Returns:
        per arm: ``network`` (trained), ``real_cases``, ``synthetic_pairs``, ``dice``, ``iou``.
    """
    results = {}
    for arm, entries in data.items():
        num_real = real_cases if arm == "real" or arm.startswith("mixed") else 0
        logger.info("[downstream] arm '%s': %d real case(s) + %d synthetic pair(s)", arm, num_real, len(entries) - num_real)
        model = train_arm(arm, entries, network, train, report_dir)
        results[arm] = {"network": model, "real_cases": num_real, "synthetic_pairs": len(entries) - num_real,
                        **score(model, arm)}
    return results


def synthetic_image_quality(
    arms: Mapping[str, Mapping[str, Any]],
    real_entries: Sequence[Mapping[str, Any]],
    synthetic_entries: Sequence[Mapping[str, Any]] | None,
    load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    inferer: Any,
    feature_network: str | torch.nn.Module | None = None,
    seed: int = 0,
    enabled: bool = True,
) -> dict[str, Any] | None:
    """FID, MMD and MS-SSIM diversity of the synthetic images against the real training images
    (:func:`segdiff.evaluation.image_quality.image_quality_report`), or None when disabled or without synthetic pairs.

    Args:
        arms: :func:`run_arms`'s results; FID's default feature network is the encoder of the ``real`` arm's
            segmenter (else of the first arm's).
        real_entries, synthetic_entries: the real subset and the synthetic pairs.
        load: loads an entry's image scaled as in training.
        inferer: the :class:`~segdiff.evaluation.SegmenterInferer` of the scoring (how the network sees a case).
        feature_network: a dotted path or module instead of the segmenter's encoder.
        seed: MMD's subsampling seed.
        enabled: the ``image_quality`` switch.
    """
    if not enabled or not synthetic_entries:
        return None
    from segdiff.evaluation.image_quality import image_quality_report

    arm = "real" if "real" in arms else next(iter(arms))
    judge = feature_network if feature_network is not None else arms[arm]["network"]
    quality = image_quality_report(real_entries, synthetic_entries, load, judge, inferer.spatial_dims,
                                   inferer.image_size, inferer.slice_axis, seed=seed)
    if feature_network is None:
        quality["feature_network"] = f"encoder of the {arm}-arm segmenter (UNetEncoder)"
    return quality


def downstream_markdown(report: Mapping[str, Any]) -> str:
    """One row per arm: training cases, Dice per class and mean, IoU per class and mean."""
    names = report["classes"]
    header = ["training data", "real cases", "synthetic pairs", *(f"Dice {n}" for n in names), "mean Dice",
              *(f"IoU {n}" for n in names), "mean IoU"]
    rows = []
    for arm, entry in report["arms"].items():
        rows.append([arm_title(arm), str(entry["real_cases"]), str(entry["synthetic_pairs"]),
                     *(entry["dice"][n] for n in names), entry["mean_dice"], *(entry["iou"][n] for n in names),
                     entry["mean_iou"]])
    return markdown_table(header, rows)


def save_bar_plot(report: Mapping[str, Any], path: str) -> str:
    """A PNG bar plot (PIL only): Dice (top) and IoU (bottom) per class and their mean, one bar per arm."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(report["classes"]) + ["mean"]
    arms = list(report["arms"])
    colours = arm_colours(arms)
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
                draw.rectangle([x, y0 + plot_h - value * plot_h, x + bar - 3, y0 + plot_h], fill=colours[arm])
            draw.text((x0, y0 + plot_h + 6), name[: max(4, group_w // 6)], fill="black", font=font)
    x = left
    for arm in arms:
        y = 2 * panel_h + 6
        draw.rectangle([x, y, x + 12, y + 12], fill=colours[arm])
        label = arm_title(arm)
        draw.text((x + 18, y), label, fill="black", font=font)
        x += 30 + int(draw.textlength(label, font=font))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
    return path


def write_downstream_report(
    arms: Mapping[str, Mapping[str, Any]],
    test_entries: Sequence[Mapping[str, Any]],
    report_dir: str,
    class_names: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    image_quality: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``downstream.{json,md,png}`` from :func:`run_arms`'s results.

    Args:
        arms: per arm ``real_cases``, ``synthetic_pairs`` and the per-case ``dice`` and ``iou`` tables.
        test_entries: the real test split, in the order the arms were scored.
        report_dir: folder of the report.
        class_names: names of classes ``1..num_classes-1`` (default ``class_<k>``).
        settings: facts recorded in the report and in the table's caption (fractions, seeds, iterations...).
        image_quality: :func:`synthetic_image_quality`'s figures, if computed.
    """
    if not arms:
        raise ConfigKeyError("no arm was trained: give at least one of " + ", ".join(ARMS))
    if not test_entries:
        raise DatalistError("the real test split is empty: nothing to score the segmenters on")
    num_classes = next(iter(arms.values()))["dice"].shape[1] + 1
    names = foreground_names(class_names, num_classes)
    report: dict[str, Any] = {"classes": names, "settings": dict(settings or {}), "arms": {}, "cases": []}
    for arm, result in arms.items():
        summary = {"real_cases": int(result["real_cases"]), "synthetic_pairs": int(result["synthetic_pairs"])}
        for metric in ("dice", "iou"):
            per_class, mean = class_means(result[metric], len(names))
            summary[metric] = dict(zip(names, rounded(per_class)))
            summary[f"mean_{metric}"] = None if mean is None else round(mean, 4)
        report["arms"][arm] = {k: summary[k] for k in ("real_cases", "synthetic_pairs", "dice", "mean_dice", "iou", "mean_iou")}
    for index, entry in enumerate(test_entries):
        case = {"image": str(entry["image"]), "label": str(entry["label"])}
        for arm, result in arms.items():
            case[arm] = {"dice": rounded(result["dice"][index]), "iou": rounded(result["iou"][index])}
        report["cases"].append(case)
    if image_quality is not None:
        report["image_quality"] = dict(image_quality)

    settings_line = ", ".join(f"{k} {v}" for k, v in report["settings"].items() if not isinstance(v, (list, dict)))
    before = f"Same network, initial weights, seed and iterations in every row ({settings_line}).\n\n"
    after = ""
    if "image_quality" in report:
        q = report["image_quality"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        after += (
            f"\nImage quality of the synthetic images: FID {fmt(q['fid'])} ({q['feature_network']}), "
            f"MMD {fmt(q['mmd'])}, MS-SSIM diversity {fmt(q['ms_ssim_diversity'])} "
            f"({q['num_masks_with_several_samples']} masks with several samples).\n"
        )
    after += "\n![Dice and IoU per class](downstream.png)\n"
    report = write_report(report_dir, "downstream", report, "Downstream segmentation on the real test split, by training data",
                          downstream_markdown(report), before=before, after=after)
    save_bar_plot(report, os.path.join(report_dir, "downstream.png"))
    return report
