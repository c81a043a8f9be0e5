#!/usr/bin/env python
"""Pixel-space mask_to_image versus latent_mask_to_image on the MNI demo data: faithfulness and seconds per slice.

Both generate an image for every test mask of the demo data (MNI152 + its 4-class tissue map, 7 training slabs), and
mask_to_image's ``evaluate.yaml`` scores both with ONE reference segmenter (trained once on the real training images,
reused for the second model): the Dice of its segmentation of each generated image against the mask it came from
(Konz et al.'s faithfulness), beside its Dice on the real test images (the ceiling).

- pixel: mask_to_image with the CPU demo preset (``configs/demo_cpu.yaml``: 64 x 76 slices, 600 steps), as the README
  demo trains it;
- latent: the three stages of latent_mask_to_image on the same slices (one modality, ``t1``; the ControlNet trained on
  masked entries only: ``target_modality none``, ``target_mix_ratio 0``), at ``--latent-image-size`` (each axis a multiple of 16) and the
  iterations given.

Seconds per slice: the wall time of each bundle's ``inference.yaml`` command (model loading and file writing included)
over the number of test slices, with the bundles' default samplers (DPM-Solver++, 10 steps).

    python scripts/benchmark_pixel_vs_latent.py --work-dir /tmp/pvl --report-dir docs/benchmarks/pixel_vs_latent_demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmark_mrgen import LATENT_BUNDLE, PIXEL_BUNDLE, REPO, StepError, hardware, num_slices, run_bundle


def latent_datalist(data: Path) -> Path:
    """The demo datalist with every entry of modality ``t1`` (the latent bundle's stages need one)."""
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["modalities"] = {"t1": 0}
    for split in ("training", "validation", "test"):
        datalist[split] = [{**e, "modality": "t1"} for e in datalist.get(split, [])]
    path = data / "datalist_latent.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def markdown(report: dict) -> str:
    classes = report["classes"]
    lines = [
        "# Pixel-space mask_to_image vs latent_mask_to_image on the MNI demo data",
        "",
        f"Written by `scripts/benchmark_pixel_vs_latent.py` ({report['command']}). Hardware: {report['hardware']}.",
        "",
        *([report["note"], ""] if report.get("note") else []),
        "Faithfulness: Dice of one reference UNet segmenter (mask_to_image's `evaluate.yaml`, trained once on the "
        "real training slabs) on each generated image against its mask; the real test images give the ceiling. "
        "Seconds per slice: wall time of the `inference.yaml` command over the test slices (model loading and "
        "file writing included), DPM-Solver++ 10 steps.",
        "",
        "| model | training | mean Dice | " + " | ".join(classes) + " | s / slice |",
        "|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for row in report["rows"]:
        dice = " | ".join(f"{row['dice'][c]:.3f}" if row["dice"].get(c) is not None else "n/a" for c in classes)
        speed = "" if row.get("seconds_per_slice") is None else f"{row['seconds_per_slice']:.3f}"
        lines.append(f"| {row['model']} | {row['training']} | **{row['mean_dice']:.3f}** | {dice} | {speed} |")
    lines += ["", "![mask | pixel-space sample | latent sample | real image (middle slice of each test slab)]"
              "(pixel_vs_latent_demo.png)"]
    return "\n".join(lines) + "\n"


def faithfulness(report_dir: Path) -> dict:
    return json.loads((report_dir / "faithfulness.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("--pixel-epochs", type=int, default=150, help="the CPU preset's 150 epochs = 600 steps")
    parser.add_argument("--autoencoder-epochs", type=int, default=150)
    parser.add_argument("--diffusion-epochs", type=int, default=150)
    parser.add_argument("--controlnet-epochs", type=int, default=150)
    parser.add_argument("--ema-momentum", type=float, default=2.0e-2,
                        help="EMA of the latent UNet and ControlNet (the bundle's 1e-3 is too slow for 600 steps)")
    parser.add_argument("--note", default="", help="a sentence for the report, e.g. what else ran on the machine")
    parser.add_argument("--latent-image-size", type=int, nargs=2, default=[64, 80])
    args = parser.parse_args(argv)

    from segdiff.data.demo import write_demo_data
    from segdiff.visualize import save_file_panel

    work = args.work_dir.resolve()
    data, logs = work / "data", work / "logs"
    if not (data / "datalist.json").exists():
        write_demo_data(data)
    preset = str(REPO / "configs" / "demo_cpu.yaml")
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def timed(name: str, run) -> float:
        if name not in timings:
            timings[name] = run()
            timings_file.write_text(json.dumps(timings, indent=1))
        return timings[name]

    test_slices = sum(num_slices(e["label"], data) for e in json.loads((data / "datalist.json").read_text())["test"])

    # ---- pixel space: the README demo's training, sampling and evaluation --------------------------------------------
    pixel = work / "pixel"
    common = {"bundle_root": str(pixel), "dataset_dir": str(data)}
    timed("pixel training", lambda: run_bundle(PIXEL_BUNDLE, ["configs/train.yaml", preset],
                                                {**common, "max_epochs": args.pixel_epochs}, logs / "pixel_train.log",
                                                training=True))
    timed("pixel sampling", lambda: run_bundle(PIXEL_BUNDLE, ["configs/inference.yaml", preset],
                                                {**common, "overwrite": True}, logs / "pixel_inference.log"))
    timed("pixel evaluation", lambda: run_bundle(PIXEL_BUNDLE, ["configs/evaluate.yaml", preset], common,
                                                  logs / "pixel_evaluate.log"))
    segmenter = pixel / "models" / "segmenter.pt"

    # ---- latent: three stages, then sampling, scored by the same segmenter ------------------------------------------
    latent = work / "latent"
    datalist = latent_datalist(data)
    base = {"bundle_root": str(latent), "dataset_dir": str(data), "datalist": str(datalist),
            "image_size": list(args.latent_image_size)}
    num_classes = len(json.loads((data / "datalist.json").read_text())["labels"])
    stages = (
        ("autoencoder", "train_autoencoder.yaml", {"max_epochs": args.autoencoder_epochs,
                                                   "adversarial_warmup_steps": args.autoencoder_epochs * 2,
                                                   "val_interval": 50}),
        ("diffusion", "train_diffusion.yaml", {"max_epochs": args.diffusion_epochs, "warmup_steps": 50,
                                               "val_interval": 50, "ema_momentum": args.ema_momentum}),
        ("controlnet", "train_controlnet.yaml", {"max_epochs": args.controlnet_epochs, "warmup_steps": 50,
                                                 "val_interval": 50, "num_classes": num_classes,
                                                 "ema_momentum": args.ema_momentum,
                                                 "target_modality": "none", "target_mix_ratio": 0.0}),
    )
    for name, config, settings in stages:
        if not (latent / "models" / f"{name}.pt").exists():
            timed(f"latent {name}", lambda: run_bundle(LATENT_BUNDLE, [f"configs/{config}"], {**base, **settings},
                                                       logs / f"latent_{name}.log", training=True))
    generated = latent / "outputs" / "generated"
    timed("latent sampling", lambda: run_bundle(LATENT_BUNDLE, ["configs/inference.yaml"],
                                                 {**base, "num_classes": num_classes, "modality": "t1",
                                                  "output_dir": str(generated), "overwrite": True, "progress": False},
                                                 logs / "latent_inference.log"))
    latent_report = latent / "outputs" / "evaluation"
    timed("latent evaluation", lambda: run_bundle(PIXEL_BUNDLE, ["configs/evaluate.yaml", preset],
                                                   {**common, "output_dir": str(generated), "report_dir": str(latent_report),
                                                    "segmenter_path": str(segmenter)}, logs / "latent_evaluate.log"))

    pixel_scores = faithfulness(pixel / "outputs" / "evaluation")
    latent_scores = faithfulness(latent_report)
    classes = list(pixel_scores["generated"]["per_class_dice"].keys())
    minutes = lambda *names: sum(timings.get(n, 0.0) for n in names) / 60  # noqa: E731
    rows = [
        {"model": "mask_to_image (pixel, CPU preset)", "training": f"{args.pixel_epochs * 4} steps, "
         f"{minutes('pixel training'):.1f} min", "mean_dice": pixel_scores["generated"]["mean_dice"],
         "dice": pixel_scores["generated"]["per_class_dice"], "seconds_per_slice": timings["pixel sampling"] / test_slices},
        {"model": f"latent_mask_to_image ({args.latent_image_size[0]} x {args.latent_image_size[1]})",
         "training": f"autoencoder {args.autoencoder_epochs * 4} + UNet {args.diffusion_epochs * 4} + ControlNet "
         f"{args.controlnet_epochs * 4} steps, {minutes('latent autoencoder', 'latent diffusion', 'latent controlnet'):.1f} min",
         "mean_dice": latent_scores["generated"]["mean_dice"], "dice": latent_scores["generated"]["per_class_dice"],
         "seconds_per_slice": timings["latent sampling"] / test_slices},
        {"model": "real test images (ceiling)", "training": "", "mean_dice": pixel_scores["real"]["mean_dice"],
         "dice": pixel_scores["real"]["per_class_dice"], "seconds_per_slice": None},
    ]
    report = {"command": "python scripts/benchmark_pixel_vs_latent.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "hardware": hardware(), "classes": classes, "rows": rows, "timings_seconds": timings,
              "test_slices": test_slices, "note": args.note, "settings": {k: str(v) for k, v in vars(args).items()}}
    args.report_dir.mkdir(parents=True, exist_ok=True)
    figure_rows = []
    for entry in json.loads((data / "datalist.json").read_text())["test"]:
        name = Path(entry["label"]).name[: -len(".nii.gz")]
        figure_rows.append((str(data / entry["label"]), str(pixel / "outputs" / "generated" / f"{name}_image.nii.gz"),
                            str(generated / f"{name}_image.nii.gz"), str(data / entry["image"])))
    save_file_panel(figure_rows, ["label", "image", "image", "image"], str(args.report_dir / "pixel_vs_latent_demo.png"))
    (args.report_dir / "pixel_vs_latent_demo.json").write_text(json.dumps(report, indent=1))
    (args.report_dir / "pixel_vs_latent_demo.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    started = time.time()
    try:
        sys.exit(main())
    except StepError as error:
        print(f"benchmark_pixel_vs_latent: {error}", file=sys.stderr)
        sys.exit(1)
