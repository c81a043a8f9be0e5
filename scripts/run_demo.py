#!/usr/bin/env python
"""The main job end to end on the built-in demo data (MNI152 template + 4-class tissue map):

demo data -> train mask_to_image -> generate an image for every test mask -> faithfulness evaluation ->
a PNG figure (mask | generated | real) and the Dice table.

Each stage is the documented ``python -m monai.bundle run`` command of the bundle, so this script is also an example
of how to run them. On CUDA it uses configs/demo_gpu.yaml (full settings), otherwise configs/demo_cpu.yaml (about
15 minutes on 2 CPU cores). Re-running continues an interrupted training run and regenerates the outputs.

    python scripts/run_demo.py [--output demo_output] [--preset cpu|gpu] [--max-epochs N]
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


def bundle_run(config_files: list[str], overrides: dict, run_id: str | None = None) -> None:
    """Run :func:`bundle_command` in the bundle folder, printing it first as a line that reruns the stage."""
    command = bundle_command(config_files, overrides, run_id)
    print("\n$ " + shell_line(command), flush=True)
    subprocess.run(command, cwd=BUNDLE, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="folder for data, models and results")
    parser.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu if CUDA is available, else cpu")
    parser.add_argument("--max-epochs", type=int, help="override the preset's training epochs")
    args = parser.parse_args(argv)

    import torch

    from segdiff.data.demo import write_demo_data

    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    output = Path(args.output).resolve()
    data_dir, bundle_root = output / "data", output / "mask_to_image"
    generated_dir, report_dir = bundle_root / "outputs" / "generated", bundle_root / "outputs" / "evaluation"
    started = time.time()
    timings = {}

    if not (data_dir / "datalist.json").exists():
        write_demo_data(data_dir)
    datalist = data_dir / "datalist.json"
    common = {"bundle_root": bundle_root, "dataset_dir": data_dir}
    configs = lambda name: [f"configs/{name}.yaml", str(REPO / "configs" / f"demo_{preset}.yaml")]  # noqa: E731
    print(f"demo data: {datalist}\npreset: configs/demo_{preset}.yaml", flush=True)

    t = time.time()
    train = dict(common, resume=(bundle_root / "models" / "checkpoint.pt").exists())
    if args.max_epochs:
        train["max_epochs"] = args.max_epochs
    bundle_run(configs("train"), train, run_id="training")
    timings["training"] = time.time() - t

    t = time.time()
    bundle_run(configs("inference"), dict(common, overwrite=True))
    timings["sampling"] = time.time() - t

    t = time.time()
    bundle_run(configs("evaluate"), common)  # the preset's image_size and segmenter settings; its network keys unused
    timings["evaluation"] = time.time() - t

    figure = output / "figure.png"
    write_figure(datalist, data_dir, generated_dir, figure)
    report = json.loads((report_dir / "faithfulness.json").read_text())

    print("\n" + "=" * 100)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ")")
    print(f"  data:             {data_dir}")
    print(f"  trained weights:  {bundle_root / 'models' / 'model.pt'} (EMA), resumable checkpoint beside it")
    print(f"  TensorBoard:      tensorboard --logdir {shlex.quote(str(bundle_root / 'outputs' / 'tensorboard'))}")
    print(f"  generated images: {generated_dir}")
    print(f"  evaluation:       {report_dir / 'faithfulness.json'}, {report_dir / 'faithfulness.md'}")
    print(f"  figure:           {figure}  (mask | generated | real)")
    # the evaluation stage printed the table above; the summary line only
    print(f"\nfaithfulness (Dice of a reference UNet segmenter trained on real images; table in faithfulness.md): "
          f"mean Dice generated {report['generated']['mean_dice']} vs real-image ceiling {report['real']['mean_dice']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
