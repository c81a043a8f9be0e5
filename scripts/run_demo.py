#!/usr/bin/env python
"""The main job end to end on the built-in demo data (MNI152 template + 4-class tissue map):

mask_to_image (default): demo data -> train mask_to_image -> generate an image for every test mask -> faithfulness
evaluation -> a PNG figure (mask | generated | real) and the Dice table.

image_to_mask (``--direction image_to_mask`` or ``both``): train the diffusion segmenter -> train its condition
encoder alone for the same wall time (train_baseline.yaml, the fair baseline) -> segment the test images with both ->
evaluate.yaml on both -> a PNG figure (image | fused segmentation | uncertainty | truth) and the table of both side
by side (Dice per class, ECE, uncertainty AUROC).

Each stage is the documented ``python -m monai.bundle run`` command of the bundle, so this script is also an example
of how to run them. On CUDA it uses configs/demo_gpu.yaml (full settings), otherwise configs/demo_cpu.yaml (on 2 CPU
cores about 13 minutes for mask_to_image, 25 for image_to_mask with its baseline). Re-running continues an interrupted training run and regenerates the
outputs.

    python scripts/run_demo.py [--output demo_output] [--preset cpu|gpu] [--max-epochs N]
    python scripts/run_demo.py --direction image_to_mask
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundles" / "mask_to_image"
IMAGE_TO_MASK = REPO / "bundles" / "image_to_mask"


def bundle_command(config_files: list[str], overrides: dict, run_id: str | None = None) -> list[str]:
    """``python -m monai.bundle run [run_id] --config_file [...] --key value ...``, with this interpreter; values are
    passed as written (Python literals)."""
    command = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    command += ["--config_file", json.dumps(config_files)]  # a Python literal with double quotes: pastes cleanly
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def shell_line(command: list[str], cwd: Path = BUNDLE) -> str:
    """``command`` as a line to paste into a POSIX shell: ``cd <cwd> && <command>``, every word quoted as needed."""
    return f"cd {shlex.quote(str(cwd))} && {shlex.join(command)}"


def bundle_run(config_files: list[str], overrides: dict, run_id: str | None = None, bundle: Path = BUNDLE) -> None:
    """Run :func:`bundle_command` in the bundle folder, printing it first as a line that reruns the stage."""
    command = bundle_command(config_files, overrides, run_id)
    print("\n$ " + shell_line(command, bundle), flush=True)
    subprocess.run(command, cwd=bundle, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def write_figure(datalist_path: Path, dataset_dir: Path, generated_dir: Path, path: Path, rows: int = 4) -> None:
    """Axial slices of the test slabs: the conditioning mask, the generated image and the real image."""
    import torch
    from monai.transforms import LoadImage, ScaleIntensityRangePercentiles

    from segdiff.data.datalist import resolve_datalist
    from segdiff.transforms import sample_output_paths
    from segdiff.visualize import make_panel, save_png

    load = LoadImage(image_only=True, ensure_channel_first=True)
    scale = ScaleIntensityRangePercentiles(0.5, 99.5, -1.0, 1.0, clip=True, channel_wise=True)
    masks, generated, real = [], [], []
    entries = resolve_datalist(str(datalist_path), str(dataset_dir), "test")
    per_case = max(1, rows // len(entries))
    for entry in entries:
        label = load(entry["label"])
        image = scale(load(entry["image"]).float())
        fake = load(sample_output_paths(entry["label"], str(generated_dir), 1, "image")[0])
        depth = label.shape[-1]
        for z in [int(depth * (k + 1) / (per_case + 1)) for k in range(per_case)]:
            masks.append(label[..., z])
            generated.append(fake[..., z])
            real.append(image[..., z])
    panel = make_panel([torch.stack(masks), torch.stack(generated), torch.stack(real)], ["label", "image", "image"])
    save_png(panel, str(path), scale=2)


def write_segmentation_figure(datalist_path: Path, dataset_dir: Path, output_dir: Path, path: Path, rows: int = 4) -> None:
    """Axial slices of the test slabs: the image, the fused segmentation, its uncertainty (black: certain, white: the
    largest value of the slab) and the true label map."""
    import torch
    from monai.transforms import LoadImage, ScaleIntensityRangePercentiles

    from segdiff.data.datalist import resolve_datalist
    from segdiff.evaluation.ensemble_report import output_entries
    from segdiff.visualize import make_panel, save_png

    load = LoadImage(image_only=True, ensure_channel_first=True)
    scale = ScaleIntensityRangePercentiles(0.5, 99.5, -1.0, 1.0, clip=True, channel_wise=True)
    columns: list[list] = [[], [], [], []]
    entries = resolve_datalist(str(datalist_path), str(dataset_dir), "test")
    per_case = max(1, rows // len(entries))
    for entry, outputs in zip(entries, output_entries(entries, str(output_dir))):
        image = scale(load(entry["image"]).float())
        seg, truth = load(outputs["seg"]), load(entry["label"])
        uncertainty = load(outputs["uncertainty"]).float()
        uncertainty = uncertainty / uncertainty.max().clamp_min(1e-8) * 2.0 - 1.0  # [0, max] -> [-1, 1] for grey
        depth = truth.shape[-1]
        for z in [int(depth * (k + 1) / (per_case + 1)) for k in range(per_case)]:
            for column, volume in zip(columns, (image, seg, uncertainty, truth)):
                column.append(volume[..., z])
    panel = make_panel([torch.stack(c) for c in columns], ["image", "label", "image", "label"])
    save_png(panel, str(path), scale=2)


def comparison_table(ensemble: dict, baseline: dict, train_seconds: dict) -> str:
    """Markdown: the diffusion ensemble and its condition encoder trained alone, side by side, from the two
    ensemble_evaluation.json reports of evaluate.yaml (Dice per class, mean Dice, ECE, uncertainty AUROC)."""
    names = ensemble["classes"]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    def row(label: str, pick) -> str:
        return f"| {label} | {cell(pick(ensemble))} | {cell(pick(baseline))} |"

    lines = ["| | diffusion ensemble | condition encoder alone |", "|---|---|---|"]
    lines += [row(f"Dice {name}", lambda r, i=i: r["fused"]["dice"]["per_class"][i]) for i, name in enumerate(names)]
    lines.append(row("mean Dice", lambda r: r["fused"]["dice"]["mean"]))
    lines.append(row("ECE (lower is better)", lambda r: r["fused"].get("ece", {}).get("mean")))
    lines.append(row("uncertainty AUROC for errors", lambda r: r["fused"].get("auroc", {}).get("mean")))
    lines.append(f"| training (min) | {train_seconds['ensemble'] / 60:.1f} | {train_seconds['baseline'] / 60:.1f} |")
    return "\n".join(lines)


def run_mask_to_image(output: Path, data_dir: Path, preset: str, max_epochs: int | None, timings: dict) -> list[str]:
    """train -> sample from the test masks -> faithfulness evaluation -> figure; returns the summary lines."""
    bundle_root = output / "mask_to_image"
    generated_dir, report_dir = bundle_root / "outputs" / "generated", bundle_root / "outputs" / "evaluation"
    common = {"bundle_root": bundle_root, "dataset_dir": data_dir}
    configs = lambda name: [f"configs/{name}.yaml", str(REPO / "configs" / f"demo_{preset}.yaml")]  # noqa: E731

    t = time.time()
    train = dict(common, resume=(bundle_root / "models" / "checkpoint.pt").exists())
    if max_epochs:
        train["max_epochs"] = max_epochs
    bundle_run(configs("train"), train, run_id="training")
    timings["training"] = time.time() - t

    t = time.time()
    bundle_run(configs("inference"), dict(common, overwrite=True))
    timings["sampling"] = time.time() - t

    t = time.time()
    bundle_run(configs("evaluate"), common)  # the preset's image_size and segmenter settings; its network keys unused
    timings["evaluation"] = time.time() - t

    figure = output / "figure.png"
    write_figure(data_dir / "datalist.json", data_dir, generated_dir, figure)
    report = json.loads((report_dir / "faithfulness.json").read_text())
    # the evaluation stage printed the table above; the summary lines only
    return [
        f"  trained weights:  {bundle_root / 'models' / 'model.pt'} (EMA), resumable checkpoint beside it",
        f"  TensorBoard:      tensorboard --logdir {shlex.quote(str(bundle_root / 'outputs' / 'tensorboard'))}",
        f"  generated images: {generated_dir}",
        f"  evaluation:       {report_dir / 'faithfulness.json'}, {report_dir / 'faithfulness.md'}",
        f"  figure:           {figure}  (mask | generated | real)",
        "",
        f"faithfulness (Dice of a reference UNet segmenter trained on real images; table in faithfulness.md): "
        f"mean Dice generated {report['generated']['mean_dice']} vs real-image ceiling {report['real']['mean_dice']}",
    ]


def run_image_to_mask(output: Path, data_dir: Path, preset: str, max_epochs: int | None, timings: dict) -> list[str]:
    """train the diffusion segmenter -> its condition encoder alone for the same wall time -> segment the test split
    with both -> evaluate both -> figure and table; returns the summary lines."""
    bundle_root = output / "image_to_mask"
    common = {"bundle_root": bundle_root, "dataset_dir": data_dir}
    configs = lambda *names: [f"configs/{n}.yaml" for n in names] + [str(REPO / "configs" / f"demo_{preset}.yaml")]  # noqa: E731
    run = lambda files, overrides, run_id=None: bundle_run(files, overrides, run_id, bundle=IMAGE_TO_MASK)  # noqa: E731
    seconds_path = bundle_root / "models" / "demo_training_seconds.json"  # the budget the baseline gets, across reruns

    t = time.time()
    checkpoint = bundle_root / "models" / "checkpoint.pt"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {"ensemble": 0.0}
    train = dict(common, resume=checkpoint.exists())
    if max_epochs:
        train["max_epochs"] = max_epochs
    run(configs("train"), train, "training")
    timings["image_to_mask training"] = time.time() - t
    seconds["ensemble"] += timings["image_to_mask training"]
    seconds_path.write_text(json.dumps(seconds))

    # the fair baseline: the same network as the condition encoder, same data and loss, the same wall time
    t = time.time()
    run(configs("train", "train_baseline"),
        dict(common, overwrite=True, max_wall_time=max(1, round(seconds["ensemble"])), max_epochs=100000), "training")
    seconds["baseline"] = timings["baseline training"] = time.time() - t

    t = time.time()
    # the bundle's sampler (DPM-Solver++, 10 steps) and ensemble size; probabilities and members for the evaluation
    run(configs("inference"), dict(common, save_probabilities=True, save_members=True, overwrite=True))
    run(configs("evaluate"), common)
    run(configs("inference", "inference_baseline"), dict(common, overwrite=True))
    reports = {"ensemble": bundle_root / "outputs" / "evaluation", "baseline": bundle_root / "outputs" / "evaluation_baseline"}
    run(configs("evaluate"), dict(common, output_dir=bundle_root / "outputs" / "segmentations_baseline",
                                  report_dir=reports["baseline"]))
    timings["segmentation and evaluation"] = time.time() - t

    figure = output / "figure_image_to_mask.png"
    write_segmentation_figure(data_dir / "datalist.json", data_dir, bundle_root / "outputs" / "segmentations", figure)
    loaded = {k: json.loads((v / "ensemble_evaluation.json").read_text()) for k, v in reports.items()}
    table = comparison_table(loaded["ensemble"], loaded["baseline"], seconds)
    table_path = output / "image_to_mask_comparison.md"
    table_path.write_text(table + "\n")
    return [
        f"  trained weights:  {bundle_root / 'models' / 'model.pt'} (EMA); baseline {bundle_root / 'models' / 'baseline.pt'}",
        f"  segmentations:    {bundle_root / 'outputs' / 'segmentations'} (_seg, _uncertainty, _prob, _members)",
        f"  evaluation:       {reports['ensemble']}, {reports['baseline']} (ensemble_evaluation.json/.md)",
        f"  figure:           {figure}  (image | fused segmentation | uncertainty | truth)",
        f"  table:            {table_path}",
        "",
        "image_to_mask: the diffusion ensemble (inference.yaml's sampler and members) against its condition encoder "
        "trained alone for the same wall time (evaluate.yaml on the test split):",
        table,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for data, models and results")
    parser.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu if CUDA is available, else cpu")
    parser.add_argument("--max-epochs", type=int, help="override the preset's training epochs")
    parser.add_argument("--direction", choices=["mask_to_image", "image_to_mask", "both"], default="mask_to_image",
                        help="which bundle(s) to train and run (image_to_mask adds its baseline: about twice the time)")
    args = parser.parse_args(argv)

    import torch

    from segdiff.data.demo import write_demo_data

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    output = Path(args.output).resolve()
    data_dir = output / "data"
    started = time.time()
    timings: dict[str, float] = {}

    if not (data_dir / "datalist.json").exists():
        write_demo_data(data_dir)
    print(f"demo data: {data_dir / 'datalist.json'}\npreset: configs/demo_{preset}.yaml", flush=True)
    summary = []
    if args.direction in ("mask_to_image", "both"):
        summary += run_mask_to_image(output, data_dir, preset, args.max_epochs, timings)
    if args.direction in ("image_to_mask", "both"):
        summary += ([""] if summary else []) + run_image_to_mask(output, data_dir, preset, args.max_epochs, timings)

    print("\n" + "=" * 100)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ")")
    print(f"  data:             {data_dir}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
