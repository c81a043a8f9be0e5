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


def comparison_table(ensemble: dict, baselines: dict[str, dict], training: dict[str, dict]) -> str:
    """Markdown: the diffusion ensemble and its condition encoder trained alone (one column per budget, e.g. equal
    wall time and equal steps), side by side, from the ensemble_evaluation.json reports of evaluate.yaml (Dice per
    class, mean Dice, ECE, uncertainty AUROC) and the training budgets (``{"seconds": s, "steps": n}`` per column,
    ``"ensemble"`` and each baseline's name)."""
    names = ensemble["classes"]
    reports = {"ensemble": ensemble, **baselines}

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    def row(label: str, pick) -> str:
        return f"| {label} | " + " | ".join(cell(pick(r)) for r in reports.values()) + " |"

    lines = ["| | diffusion ensemble | " + " | ".join(f"condition encoder alone, {name}" for name in baselines) + " |",
             "|---|" + "---|" * len(reports)]
    lines += [row(f"Dice {name}", lambda r, i=i: r["fused"]["dice"]["per_class"][i]) for i, name in enumerate(names)]
    lines.append(row("mean Dice", lambda r: r["fused"]["dice"]["mean"]))
    lines.append(row("ECE (lower is better)", lambda r: r["fused"].get("ece", {}).get("mean")))
    lines.append(row("uncertainty AUROC for errors", lambda r: r["fused"].get("auroc", {}).get("mean")))
    lines.append("| training (min) | " + " | ".join(f"{training[k]['seconds'] / 60:.1f}" for k in reports) + " |")
    lines.append("| training steps | " + " | ".join(str(training[k].get("steps", "-")) for k in reports) + " |")
    return "\n".join(lines)


def trained_steps(checkpoint: Path) -> tuple[int, int]:
    """(iterations, epochs) a training checkpoint of the shared engine has completed (Ignite saves the iteration and
    the epoch length)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["trainer"]
    return int(state["iteration"]), int(state["iteration"]) // int(state["epoch_length"])


def run_mask_to_image(output: Path, data_dir: Path, preset: str, max_epochs: int | None, timings: dict,
                      overrides: dict | None = None) -> list[str]:
    """train -> sample from the test masks -> faithfulness evaluation -> figure; returns the summary lines."""
    bundle_root = output / "mask_to_image"
    generated_dir, report_dir = bundle_root / "outputs" / "generated", bundle_root / "outputs" / "evaluation"
    common = {"bundle_root": bundle_root, "dataset_dir": data_dir, **(overrides or {})}
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


def run_image_to_mask(output: Path, data_dir: Path, preset: str, max_epochs: int | None, timings: dict,
                      overrides: dict | None = None) -> list[str]:
    """train the diffusion segmenter -> its condition encoder alone for the same wall time and for the same steps ->
    segment the test split with all three -> evaluate them -> figure and table; returns the summary lines."""
    bundle_root = output / "image_to_mask"
    models = bundle_root / "models"
    common = {"bundle_root": bundle_root, "dataset_dir": data_dir, **(overrides or {})}
    configs = lambda *names: [f"configs/{n}.yaml" for n in names] + [str(REPO / "configs" / f"demo_{preset}.yaml")]  # noqa: E731
    run = lambda files, overrides, run_id=None: bundle_run(files, overrides, run_id, bundle=IMAGE_TO_MASK)  # noqa: E731
    budget_path = models / "demo_training_budget.json"  # the ensemble's seconds, kept across reruns (resume)

    t = time.time()
    checkpoint = models / "checkpoint.pt"
    ensemble_seconds = json.loads(budget_path.read_text())["seconds"] if budget_path.exists() else 0.0
    train = dict(common, resume=checkpoint.exists())
    if max_epochs:
        train["max_epochs"] = max_epochs
    run(configs("train"), train, "training")
    timings["image_to_mask training"] = time.time() - t
    steps, epochs = trained_steps(checkpoint)
    training = {"ensemble": {"seconds": ensemble_seconds + timings["image_to_mask training"], "steps": steps}}
    budget_path.write_text(json.dumps(training["ensemble"]))

    # the fair baselines: the condition encoder's network, same data and loss, (1) the same wall time, its cosine
    # decay fitted to that time, (2) the same epochs, so the same steps
    arms = {"equal wall time": models / "baseline.pt", "equal steps": models / "equal_steps" / "baseline.pt"}
    for name, budget in (("equal wall time", dict(max_wall_time=max(1, round(training["ensemble"]["seconds"])),
                                                  max_epochs=100000)),
                         ("equal steps", dict(max_wall_time=0, max_epochs=epochs))):
        t = time.time()
        run(configs("train", "train_baseline"), dict(common, overwrite=True, baseline_path=arms[name], **budget), "training")
        training[name] = {"seconds": time.time() - t, "steps": trained_steps(arms[name].parent / "baseline_checkpoint.pt")[0]}
        timings[f"baseline training, {name}"] = training[name]["seconds"]

    t = time.time()
    # the bundle's sampler (DPM-Solver++, 10 steps) and ensemble size; probabilities and members for the evaluation
    outputs = bundle_root / "outputs"
    run(configs("inference"), dict(common, save_probabilities=True, save_members=True, overwrite=True))
    run(configs("evaluate"), common)
    reports = {"ensemble": outputs / "evaluation"}
    for name, model in arms.items():
        suffix = name.replace(" ", "_")
        segmentations, reports[name] = outputs / f"segmentations_baseline_{suffix}", outputs / f"evaluation_baseline_{suffix}"
        run(configs("inference", "inference_baseline"), dict(common, overwrite=True, model_path=model, output_dir=segmentations))
        run(configs("evaluate"), dict(common, output_dir=segmentations, report_dir=reports[name]))
    timings["segmentation and evaluation"] = time.time() - t

    figure = output / "figure_image_to_mask.png"
    write_segmentation_figure(data_dir / "datalist.json", data_dir, outputs / "segmentations", figure)
    loaded = {k: json.loads((v / "ensemble_evaluation.json").read_text()) for k, v in reports.items()}
    table = comparison_table(loaded.pop("ensemble"), loaded, training)
    table_path = output / "image_to_mask_comparison.md"
    table_path.write_text(table + "\n")
    return [
        f"  trained weights:  {models / 'model.pt'} (EMA); baselines " + ", ".join(str(m) for m in arms.values()),
        f"  segmentations:    {outputs / 'segmentations'} (_seg, _uncertainty, _prob, _members), segmentations_baseline_*",
        f"  evaluation:       " + ", ".join(str(r) for r in reports.values()) + " (ensemble_evaluation.json/.md)",
        f"  figure:           {figure}  (image | fused segmentation | uncertainty | truth)",
        f"  table:            {table_path}",
        "",
        "image_to_mask: the diffusion ensemble (inference.yaml's sampler and members) against its condition encoder "
        "trained alone for the same wall time and for the same steps (evaluate.yaml on the test split):",
        table,
    ]


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value), the value as a Python literal when it is one (``8``, ``[64,52]``), else text."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected KEY=VALUE, e.g. num_classes=8")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for data, models and results")
    parser.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu if CUDA is available, else cpu")
    parser.add_argument("--max-epochs", type=int, help="override the preset's training epochs")
    parser.add_argument("--direction", choices=["mask_to_image", "image_to_mask", "both"], default="mask_to_image",
                        help="which bundle(s) to train and run (image_to_mask adds its baselines: about twice the time)")
    parser.add_argument("--data", help="a data set folder with datalist.json (e.g. from `segdiff totalseg-data`) "
                                       "instead of the demo data")
    parser.add_argument("--override", action="append", type=parse_override, default=[], metavar="KEY=VALUE",
                        help="a config key for every stage, after the preset (repeatable), e.g. num_classes=8")
    args = parser.parse_args(argv)
    overrides = dict(args.override)

    import torch

    from segdiff.data.demo import write_demo_data

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    output = Path(args.output).resolve()
    data_dir = Path(args.data).resolve() if args.data else output / "data"
    started = time.time()
    timings: dict[str, float] = {}

    if args.data and not (data_dir / "datalist.json").exists():
        parser.error(f"--data {args.data}: no datalist.json in that folder")
    if not (data_dir / "datalist.json").exists():
        write_demo_data(data_dir)
    print(f"demo data: {data_dir / 'datalist.json'}\npreset: configs/demo_{preset}.yaml", flush=True)
    summary = []
    if args.direction in ("mask_to_image", "both"):
        summary += run_mask_to_image(output, data_dir, preset, args.max_epochs, timings, overrides)
    if args.direction in ("image_to_mask", "both"):
        summary += ([""] if summary else []) + run_image_to_mask(output, data_dir, preset, args.max_epochs, timings, overrides)

    print("\n" + "=" * 100)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ")")
    print(f"  data:             {data_dir}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
