#!/usr/bin/env python
"""MRGen's protocol, end to end, on TotalSegmentator's reference CT (labelled) and MR (labels hidden from training).

A segmenter for MR is wanted, but only the CT has masks. The latent_mask_to_image bundle learns MR appearance from
unlabelled MR images and CT masks; its synthetic MR images (from the CT masks) train an MR segmenter. Every segmenter
is scored by Dice on the real MR test slabs, whose labels no training step reads:

    (a) CT only            the CT training slabs with their masks (the segmenter meets MR only at test time)
    (b) synthetic MR       MR images generated from the CT training masks, filtered by a judge
        (b0) unfiltered    the same generator, every image kept (round 0)
        (a+b) CT + syn. MR both in one pool
    (c) real MR            the MR training slabs WITH their labels: the ceiling, never available in MRGen's setting

Steps (each reuses its outputs when they exist, so a rerun continues; ``--fresh`` starts over):

1. data: ``segdiff.data.totalsegmentator.write_reference_data`` for CT and MR (6 slabs each; training slabs 0, 2, 5,
   validation 3, test 1 and 4) and the datalists of the steps below. The generator's datalist lists the MR slabs of
   the training and validation splits WITHOUT labels; the MR test slabs are not in it at all.
2. the bundle's three training stages from the command line (autoencoder, latent UNet conditioned on the modality,
   mask ControlNet with empty masks for MR), with the overrides below.
3. round 0: ``inference.yaml`` on the CT training masks with ``modality mr``, ``--round0-seeds`` images per mask.
4. the judge: MONAI UNet (the judge architecture of synthesize.yaml) trained on the round-0 pairs (MRGen's
   re-segmentation filter needs a target-modality segmenter; none exists without MR labels, so it is trained on the
   synthetic MR itself: images whose mask it does not reproduce are the outliers).
5. round 1: ``synthesize.yaml`` (judge filter, up to ``max_tries_per_mask`` tries, ``keep_k`` pairs per mask).
6. the segmenter arms through mask_to_image's ``evaluate.yaml`` + ``configs/downstream.yaml``: the same UNet, initial
   weights, seed and iterations in every arm, scored on the real MR test slabs.
7. FID (features of the real-MR segmenter's encoder) and MMD (pixels) of each image set against the real MR test
   slabs, the figure (CT mask | synthetic MR | real MR) and the report (``--report-dir``: JSON, Markdown, PNG).

    python scripts/benchmark_mrgen.py --work-dir /tmp/mrgen --report-dir docs/benchmarks/mrgen_ct_to_mr
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LATENT_BUNDLE = REPO / "bundles" / "latent_mask_to_image"
PIXEL_BUNDLE = REPO / "bundles" / "mask_to_image"
NUM_CLASSES = 8  # background + the 7 organs TotalSegmentator's CT and MR tasks share
STAGES = (
    ("autoencoder", "train_autoencoder.yaml"),
    ("diffusion", "train_diffusion.yaml"),
    ("controlnet", "train_controlnet.yaml"),
)


class StepError(RuntimeError):
    """A step's command failed; the message names the command's log and ends with its last lines."""


def run_bundle(bundle: Path, configs: list[str], overrides: dict, log: Path, training: bool = False) -> float:
    """``python -m monai.bundle run [training]`` in ``bundle`` with ``--key value`` overrides; returns its seconds."""
    command = [sys.executable, "-m", "monai.bundle", "run"] + (["training"] if training else [])
    files = configs[0] if len(configs) == 1 else repr(configs)
    command += ["--config_file", files]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]  # fire reads Python literals
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[step] {' '.join(command[3:5] + configs)} -> log {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        code = subprocess.call(command, cwd=bundle, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise StepError(f"{' '.join(command)} failed (exit {code}); its log is {log}; last lines:\n{tail}")
    return seconds


# ---- step 1: data -----------------------------------------------------------------------------------------------
def write_data(data: Path, sdist: str | None = None) -> dict[str, Path]:
    """The CT and MR slabs and every datalist of the protocol, under ``data`` (``sdist``: TotalSegmentator's sdist,
    else the cached or downloaded one)."""
    from segdiff.data.totalsegmentator import write_reference_data

    lists = {}
    for modality in ("ct", "mr"):
        if not (data / modality / "datalist.json").exists():
            write_reference_data(data / modality, modality=modality, sdist=sdist)
        lists[modality] = json.loads((data / modality / "datalist.json").read_text())
    labels = lists["ct"]["labels"]

    def entries(modality: str, split: str, label: bool = True) -> list[dict]:
        out = []
        for e in lists[modality][split]:
            entry = {"image": f"{modality}/{e['image']}", "modality": modality}
            if label:
                entry["label"] = f"{modality}/{e['label']}"
            out.append(entry)
        return out

    datalists = {
        # the generator: CT with masks, MR WITHOUT labels; the MR test slabs are not listed
        "generator": {"modalities": {"ct": 0, "mr": 1}, "labels": labels,
                      "training": entries("ct", "training") + entries("mr", "training", label=False),
                      "validation": entries("ct", "validation") + entries("mr", "validation", label=False)},
        # round 0: inference.yaml reads the masks of the test split: here the CT TRAINING masks
        "ct_training_masks": {"labels": labels, "test": entries("ct", "training")},
        # segmenter arms: trained on CT (or synthetic MR), scored on the real MR test slabs
        "ct_to_mr": {"labels": labels, "training": entries("ct", "training"), "test": entries("mr", "test")},
        # the ceiling: real MR labels
        "mr_ceiling": {"labels": labels, "training": entries("mr", "training"), "test": entries("mr", "test")},
    }
    paths = {}
    for name, datalist in datalists.items():
        paths[name] = data / f"{name}.json"
        paths[name].write_text(json.dumps(datalist, indent=1))
    return paths


# ---- step 3: round 0 ----------------------------------------------------------------------------------------------
def round0_datalist(folder: Path, seeds: int, masks: list[dict], data: Path) -> Path:
    """Datalist of the unfiltered pairs: every generated image with the CT mask it came from."""
    training = []
    for seed in range(seeds):
        for entry in masks:
            case = Path(entry["label"]).name.replace(".nii.gz", "")
            image = folder / f"seed{seed}" / f"{case}_image.nii.gz"
            if not image.exists():
                raise StepError(f"round 0: {image} was not written by inference.yaml")
            training.append({"image": str(image), "label": str(data / entry["label"]), "case": f"{case}_s{seed}"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": training}, indent=1))
    return path


# ---- step 7: image quality and figure ----------------------------------------------------------------------------
def evaluation_parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(PIXEL_BUNDLE / "configs" / "evaluate.yaml"))
    parser.update(overrides)
    return parser


def num_slices(path: str, root: Path) -> int:
    """Axial slices of a NIfTI volume (the 2D models' units)."""
    import nibabel as nib

    shape = nib.load(path if os.path.isabs(path) else str(root / path)).shape
    return int(shape[2]) if len(shape) > 2 else 1


def absolute(entries: list[dict], root: Path) -> list[dict]:
    return [{k: (str(root / v) if k in ("image", "label") and not os.path.isabs(v) else v) for k, v in e.items()}
            for e in entries]


def image_quality(sets: dict[str, list[dict]], reference: list[dict], segmenter_path: Path, overrides: dict) -> dict:
    """FID / MMD of every image set against ``reference`` (features: the real-MR segmenter's encoder)."""
    import torch

    from segdiff.evaluation.image_quality import image_quality_report

    parser = evaluation_parser(overrides)
    load = parser.get_parsed_content("load_real")
    network = parser.get_parsed_content("segmenter_def")
    network.load_state_dict(torch.load(segmenter_path, map_location="cpu", weights_only=True))
    network.eval()
    report = {}
    for name, entries in sets.items():
        # MS-SSIM diversity groups the images of one mask ('case'); a real image is its own group
        entries = [e if "case" in e else {**e, "case": e["image"]} for e in entries]
        q = image_quality_report(reference, entries, load, network, 2, overrides["image_size"], 2, group_key="case")
        report[name] = {k: q[k] for k in ("fid", "mmd", "ms_ssim_diversity", "num_real_images", "num_synthetic_images")}
        print(f"[mrgen] image quality {name}: {report[name]}", flush=True)
    return report


def save_figure(rows: list[tuple[str, str, str, str]], path: Path) -> None:
    """Rows of (CT image, CT mask, synthetic MR, real MR): middle axial slices."""
    from segdiff.visualize import save_file_panel

    save_file_panel(rows, ["image", "label", "image", "image"], str(path))


def hardware() -> str:
    import monai
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores, {device}; torch {torch.__version__}, MONAI {monai.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def markdown(report: dict) -> str:
    classes = report["classes"]
    lines = [
        "# MRGen protocol: TotalSegmentator CT (labelled) -> MR (labels hidden)",
        "",
        f"Written by `scripts/benchmark_mrgen.py` ({report['command']}). Hardware: {report['hardware']}.",
        "",
        "Data: TotalSegmentator 2.18.0's reference abdominal CT (122 x 101 x 30, 3 mm) and MR (117 x 91 x 20, 3 mm) "
        "with its own segmentations mapped to 7 shared organs, 6 axial slabs each (training 0, 2, 5; validation 3; "
        "test 1, 4). The generator sees the CT training/validation slabs with masks and the MR training/validation "
        "slabs WITHOUT labels; the MR test slabs (8 slices) are read only for scoring. Two small volumes of two "
        "different subjects: the figures test the pipeline, not a clinical claim.",
        "",
        "## Segmenters scored on the real MR test slabs",
        "",
        f"Same MONAI UNet (mask_to_image's reference segmenter), initial weights, seed and "
        f"{report['settings']['downstream_iterations']} iterations in every row; 2D slices at "
        f"{report['settings']['image_size']}.",
        "",
        "| arm | training data | slices | mean Dice | " + " | ".join(classes) + " |",
        "|---|---|---|---|" + "---|" * len(classes),
    ]
    for row in report["arms"]:
        dice = " | ".join("n/a" if row["dice"].get(c) is None else f"{row['dice'][c]:.3f}" for c in classes)
        mean = "n/a" if row["mean_dice"] is None else f"{row['mean_dice']:.3f}"
        lines.append(f"| {row['arm']} | {row['data']} | {row['slices']} | **{mean}** | {dice} |")
    margin = report.get("margin_synthetic_over_ct")
    if margin is not None:
        lines += ["", f"(b) synthetic MR minus (a) CT only: **{margin:+.3f}** mean Dice."]
    lines += ["", "## Image quality against the real MR test slabs", "",
              f"FID on the features of the real-MR segmenter's encoder ({report['image_quality_features']}); MMD on "
              "the pixels (64 x 64 slices in [-1, 1]); MS-SSIM diversity among the images of one mask (lower: more "
              "varied). Few images: FID's covariances are rank deficient, read the column as a ranking.", "",
              "| image set | images | FID | MMD | MS-SSIM diversity |", "|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    for name, q in report["image_quality"].items():
        lines.append(f"| {name} | {q['num_synthetic_images']} | {fmt(q['fid'])} | {fmt(q['mmd'])} | "
                     f"{fmt(q['ms_ssim_diversity'])} |")
    rec = report["reconstruction"]
    lines += ["", "## Generator", "",
              "Autoencoder reconstruction on the validation slabs: "
              + ", ".join(f"{m} PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}" for m, v in rec.items()) + ".", "",
              "| step | settings | wall time |", "|---|---|---|"]
    for step in report["steps"]:
        lines.append(f"| {step['step']} | {step['settings']} | {step['seconds'] / 60:.1f} min |")
    s = report["synthesis"]
    lines += ["", f"Round 1 synthesis: {s['masks']} CT masks, {s['tries']} images judged, {s['kept']} pairs kept "
              f"({s['kept_slices']} slices); {s['seconds_per_slice']:.3f} s per generated slice including the judge.",
              "", "![CT image | CT mask | synthetic MR from that mask | a real MR slice](mrgen_ct_to_mr.png)", "",
              "Figure: rows are the three CT training slabs (middle slice): CT image | its mask | the synthetic MR "
              "the generator made from that mask (round 1, first kept pair) | the real MR training slab at the "
              "same position in the list (another subject, for appearance).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="data, models and intermediate outputs")
    parser.add_argument("--report-dir", type=Path, required=True, help="mrgen_ct_to_mr.{json,md,png} go here")
    parser.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    parser.add_argument("--sdist", help="TotalSegmentator's sdist (default: the cached copy, downloaded once)")
    parser.add_argument("--autoencoder-epochs", type=int, default=300)
    parser.add_argument("--adversarial-warmup-steps", type=int, default=450)
    parser.add_argument("--diffusion-epochs", type=int, default=400)
    parser.add_argument("--controlnet-epochs", type=int, default=300)
    parser.add_argument("--target-mix-ratio", type=float, default=0.5)
    parser.add_argument("--ema-momentum", type=float, default=2.0e-2,
                        help="EMA of stages 2 and 3: the bundles' 1e-3 averages over ~1000 steps, longer than these "
                             "runs, so the saved EMA weights would still be mostly the initial ones")
    parser.add_argument("--round0-seeds", type=int, default=4, help="unfiltered images per CT mask")
    parser.add_argument("--judge-iterations", type=int, default=400)
    parser.add_argument("--max-tries-per-mask", type=int, default=20)
    parser.add_argument("--keep-k", type=int, default=2)
    parser.add_argument("--min-class-dice", type=float, default=0.82)
    parser.add_argument("--min-mean-dice", type=float, default=0.89)
    parser.add_argument("--downstream-iterations", type=int, default=400)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = args.work_dir.resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    data, generator, logs = work / "data", work / "generator", work / "logs"
    paths = write_data(data, args.sdist)
    image_size = [64, 64]
    common = {"dataset_dir": str(data), "datalist": str(paths["generator"]), "bundle_root": str(generator),
              "seed": args.seed}
    stage_settings = {
        "autoencoder": {"max_epochs": args.autoencoder_epochs, "adversarial_warmup_steps": args.adversarial_warmup_steps,
                        "val_interval": 50},
        "diffusion": {"max_epochs": args.diffusion_epochs, "warmup_steps": 100, "val_interval": 100,
                      "ema_momentum": args.ema_momentum},
        "controlnet": {"max_epochs": args.controlnet_epochs, "warmup_steps": 100, "val_interval": 100,
                       "ema_momentum": args.ema_momentum,
                       "num_classes": NUM_CLASSES, "target_modality": "mr", "target_mix_ratio": args.target_mix_ratio},
    }
    steps = []
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def timed(name: str, settings: str, run) -> None:
        if name not in timings:
            timings[name] = run()
            timings_file.write_text(json.dumps(timings, indent=1))
        steps.append({"step": name, "settings": settings, "seconds": timings[name]})

    # ---- step 2: the three stages -----------------------------------------------------------------------------
    for name, config in STAGES:
        models = generator / "models"
        settings = stage_settings[name]
        if (models / f"{name}.pt").exists() and (models / f"{name}.json").exists():
            print(f"[mrgen] stage {name}: reusing {models / f'{name}.pt'}", flush=True)
            timings.setdefault(name, float("nan"))
        resume = {"resume": True} if (models / f"{name}_checkpoint.pt").exists() else {}
        timed(name, ", ".join(f"{k} {v}" for k, v in settings.items()),
              lambda: run_bundle(LATENT_BUNDLE, [f"configs/{config}"], {**common, **settings, **resume},
                                 logs / f"stage_{name}.log", training=True))

    sampling = {**common, "num_classes": NUM_CLASSES, "modality": "mr", "guidance_scale": args.guidance_scale,
                "progress": False}
    # ---- step 3: round 0, unfiltered ----------------------------------------------------------------------------
    round0 = work / "round0"
    masks = json.loads(paths["ct_training_masks"].read_text())["test"]

    def round0_run() -> float:
        seconds = 0.0
        for seed in range(args.round0_seeds):
            out = round0 / f"seed{seed}"
            if not out.exists():
                seconds += run_bundle(LATENT_BUNDLE, ["configs/inference.yaml"],
                                      {**sampling, "datalist": str(paths["ct_training_masks"]), "seed": seed,
                                       "output_dir": str(out)}, logs / f"round0_seed{seed}.log")
        return seconds

    timed("round 0 (unfiltered)", f"{args.round0_seeds} images per CT mask, dpm_solver 10 steps", round0_run)
    round0_list = round0_datalist(round0, args.round0_seeds, masks, data)

    # ---- steps 4 and 6: segmenters through downstream.yaml -------------------------------------------------------
    evaluation = {"image_size": image_size, "num_classes": NUM_CLASSES, "seed": args.seed,
                  "downstream_iterations": args.downstream_iterations, "image_quality": False, "real_fraction": 1.0}
    downstream_configs = ["configs/evaluate.yaml", "../../configs/downstream.yaml"]

    def downstream(name: str, datalist: Path, arms: list[str], iterations: int, **extra) -> dict:
        folder = work / f"downstream_{name}"
        if not (folder / "downstream.json").exists():
            timed(f"segmenters: {name}", f"arms {', '.join(arms)}; {iterations} iterations each",
                  lambda: run_bundle(PIXEL_BUNDLE, downstream_configs,
                                     {**evaluation, "dataset_dir": str(data), "datalist": str(datalist),
                                      "bundle_root": str(folder), "downstream_dir": str(folder),
                                      "downstream_arms": arms, "downstream_iterations": iterations, **extra},
                                     logs / f"downstream_{name}.log"))
        else:
            timed(f"segmenters: {name}", f"arms {', '.join(arms)}; {iterations} iterations each", lambda: float("nan"))
        return json.loads((folder / "downstream.json").read_text())

    judge_list = work / "judge_datalist.json"
    judge_list.write_text(json.dumps({"labels": json.loads(paths["ct_to_mr"].read_text())["labels"],
                                      "training": json.loads(round0_list.read_text())["training"],
                                      "test": absolute(json.loads(paths["ct_to_mr"].read_text())["test"], data)},
                                     indent=1))
    downstream("judge", judge_list, ["real"], args.judge_iterations)
    judge_path = work / "downstream_judge" / "segmenter_real.pt"

    # ---- step 5: round 1, judged ----------------------------------------------------------------------------------
    round1 = work / "round1"
    synthesis = {**sampling, "mask_split": "training", "mask_modality": "ct", "judge": "unet",
                 "judge_path": str(judge_path), "output_dir": str(round1), "max_tries_per_mask": args.max_tries_per_mask,
                 "keep_k": args.keep_k, "min_class_dice": args.min_class_dice, "min_mean_dice": args.min_mean_dice}
    timed("round 1 (judged)", f"judge UNet on round 0; thresholds class {args.min_class_dice} / mean "
          f"{args.min_mean_dice}, up to {args.max_tries_per_mask} tries, keep {args.keep_k}",
          lambda: run_bundle(LATENT_BUNDLE, ["configs/inference.yaml", "configs/synthesize.yaml"], synthesis,
                             logs / "round1.log"))
    round1_list = round1 / "datalist.json"
    kept = json.loads(round1_list.read_text())["training"]
    if not kept:
        raise StepError(f"round 1 kept no pair ({round1 / 'tries.csv'} lists every try and why it was rejected): "
                        "lower --min-class-dice / --min-mean-dice, or train the generator longer, and run with a new "
                        f"--work-dir or after deleting {round1}")

    # ---- step 6: the arms ---------------------------------------------------------------------------------------
    ct_report = downstream("ct_to_mr", paths["ct_to_mr"], ["real", "synthetic", "mixed", "synthetic_unfiltered"],
                           args.downstream_iterations, synthetic_datalist=str(round1_list),
                           synthetic_sources={"unfiltered": str(round0_list)})
    mr_report = downstream("mr_ceiling", paths["mr_ceiling"], ["real"], args.downstream_iterations)

    classes = ct_report["classes"]
    slices = lambda entries: sum(num_slices(e["image"], data) for e in entries)  # noqa: E731
    ct_training = absolute(json.loads(paths["ct_to_mr"].read_text())["training"], data)
    mr_training = absolute(json.loads(paths["mr_ceiling"].read_text())["training"], data)
    kept_abs = [{**e, "image": str(round1 / e["image"]), "label": str(round1 / e["label"])} for e in kept]
    round0_entries = json.loads(round0_list.read_text())["training"]
    rows = [
        ("(a) CT only", "CT training slabs + masks", slices(ct_training), ct_report["arms"]["real"]),
        ("(b) synthetic MR, judged", "round 1 pairs (CT masks)", slices(kept_abs), ct_report["arms"]["synthetic"]),
        ("(b0) synthetic MR, unfiltered", "round 0 pairs (CT masks)", slices(round0_entries),
         ct_report["arms"]["synthetic_unfiltered"]),
        ("(a+b) CT + synthetic MR", "CT slabs + round 1 pairs", slices(ct_training) + slices(kept_abs),
         ct_report["arms"]["mixed"]),
        ("(c) real MR (ceiling)", "MR training slabs + their labels", slices(mr_training), mr_report["arms"]["real"]),
    ]
    arms = [{"arm": a, "data": d, "slices": n, "mean_dice": r["mean_dice"], "dice": r["dice"]} for a, d, n, r in rows]

    # ---- step 7: image quality, figure, report -------------------------------------------------------------------
    mr_test = absolute(json.loads(paths["mr_ceiling"].read_text())["test"], data)
    quality_sets = {"synthetic MR, judged (round 1)": kept_abs, "synthetic MR, unfiltered (round 0)": round0_entries,
                    "real CT (training slabs)": ct_training, "real MR (training slabs): floor": mr_training}
    overrides = {"image_size": image_size, "num_classes": NUM_CLASSES, "dataset_dir": str(data),
                 "datalist": str(paths["mr_ceiling"])}
    quality = image_quality(quality_sets, mr_test, work / "downstream_mr_ceiling" / "segmenter_real.pt", overrides)

    args.report_dir.mkdir(parents=True, exist_ok=True)
    figure_rows = []
    for index, entry in enumerate(ct_training):
        case = Path(entry["label"]).name.replace(".nii.gz", "")
        mine = [e for e in kept_abs if e.get("case") == case] or [e for e in round0_entries if e["case"].startswith(case)]
        figure_rows.append((entry["image"], entry["label"], mine[0]["image"], mr_training[index % len(mr_training)]["image"]))
    save_figure(figure_rows, args.report_dir / "mrgen_ct_to_mr.png")

    reconstruction = json.loads((generator / "outputs" / "reconstruction_metrics.json").read_text())["metrics"]
    # every row of tries.csv is one judged image of one mask (a slab: as many slices as its mask)
    mask_slices = {Path(e["label"]).name.replace(".nii.gz", ""): num_slices(e["label"], data) for e in masks}
    judged = [row.split(",")[0] for row in (round1 / "tries.csv").read_text().splitlines()[1:] if row]
    judged_slices = sum(mask_slices.get(case, 0) for case in judged)
    report = {
        "command": "python scripts/benchmark_mrgen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware(),
        "classes": classes,
        "settings": {**vars(args), "work_dir": str(args.work_dir), "report_dir": str(args.report_dir),
                     "image_size": image_size},
        "arms": arms,
        "margin_synthetic_over_ct": (None if arms[1]["mean_dice"] is None or arms[0]["mean_dice"] is None
                                     else round(arms[1]["mean_dice"] - arms[0]["mean_dice"], 4)),
        "image_quality": quality,
        "image_quality_features": "UNetEncoder of the (c) segmenter; reference: the 8 real MR test slices",
        "reconstruction": reconstruction,
        "steps": steps,
        "synthesis": {"masks": len(masks), "tries": len(judged), "judged_slices": judged_slices, "kept": len(kept),
                      "kept_slices": slices(kept_abs),
                      "seconds_per_slice": timings["round 1 (judged)"] / max(1, judged_slices)},
    }
    report["settings"].pop("fresh", None)
    (args.report_dir / "mrgen_ct_to_mr.json").write_text(json.dumps(report, indent=1, default=str))
    (args.report_dir / "mrgen_ct_to_mr.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepError as error:
        print(f"benchmark_mrgen: {error}", file=sys.stderr)
        sys.exit(1)
