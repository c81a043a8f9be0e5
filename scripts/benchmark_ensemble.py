#!/usr/bin/env python
"""Wall time per slice of an image_to_mask ensemble drawn the fast way (num_members samples as ONE batch, DDIM) against
the published protocol (num_members sequential DDPM-1000 chains, one sample at a time) on the same network and
hardware; with --weights and --datalist also the Dice of both fused segmentations on test slices.

    python scripts/benchmark_ensemble.py --preset configs/demo_cpu.yaml --slices 2
    python scripts/benchmark_ensemble.py --preset configs/demo_cpu.yaml --weights bundles/image_to_mask/models/model.pt \
        --datalist demo_output/data/datalist.json --slices 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def build(presets: list[str], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / "image_to_mask" / "configs" / "train.yaml")] + [str(REPO / p) for p in presets])
    parser.update(overrides)
    keys = ("spatial_dims", "image_size", "num_classes", "image_channels", "prediction_type", "slice_axis", "noise_schedule",
            "model_record", "scale_intensity")
    return parser.get_parsed_content("network_def"), {k: parser.get_parsed_content(k) for k in keys}


def test_slices(datalist: str, count: int, settings: dict):
    """``count`` slices with foreground, evenly spread over the first test case, scaled as in training."""
    from monai.transforms import LoadImage

    from segdiff.data.datalist import resolve_datalist

    entry = resolve_datalist(datalist, None, "test")[0]
    load = LoadImage(image_only=True, ensure_channel_first=True)
    image = settings["scale_intensity"]({"image": load(entry["image"]).float()})["image"]  # as the bundle trains
    label = load(entry["label"])
    axis = settings["slice_axis"] + 1
    with_foreground = [i for i in range(label.shape[axis]) if label.select(axis, i).any()]
    keep = [with_foreground[j] for j in torch.linspace(0, len(with_foreground) - 1, min(count, len(with_foreground))).round().long()]
    return image.as_tensor().index_select(axis, torch.tensor(keep)), label.as_tensor().index_select(axis, torch.tensor(keep))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", default=[], help="preset config(s) relative to the repo root")
    parser.add_argument("--num-members", type=int, default=5)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[50], help="one row per value, e.g. 10 25 50")
    parser.add_argument("--batched-ddpm", action="store_true",
                        help="also a row for the members as one batch with DDPM (the quality ceiling of the steps table)")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the published protocol's chains")
    parser.add_argument("--slices", type=int, default=2, help="slices segmented (each with every protocol)")
    parser.add_argument("--published-slices", type=int, default=None, metavar="K",
                        help="time the published protocol on the first K slices only (default: all; 0: skip it). "
                        "Its chains are independent DDPM samples, so the batched DDPM row gives the same Dice")
    parser.add_argument("--weights", help="trained models/model.pt (timing does not need one)")
    parser.add_argument("--datalist", help="datalist whose first test case gives the slices (for Dice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall time (default), or this process's CPU time: with OMP_NUM_THREADS=1 on a shared "
                        "CPU machine it is the compute time of one core, which other jobs do not inflate")
    args = parser.parse_args(argv)

    from segdiff.engine import ConditionalDiffusionSampler, build_scheduler
    from segdiff.evaluation import per_class_dice
    from segdiff.transforms import FuseEnsemble

    network, settings = build(args.preset, {})
    if args.weights:  # refused if they were trained with other settings than the bundle config and presets give
        settings["model_record"].verify(network, args.weights)
        network.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    network = network.to(args.device).eval()
    k, c = settings["num_classes"], settings["image_channels"]
    if args.datalist:
        image, label = test_slices(args.datalist, args.slices, settings)
    else:
        size = settings["image_size"]
        image, label = torch.randn(c, *size, args.slices), torch.zeros(1, *size, args.slices)
    image = image[None].to(args.device)

    def sampler(name: str, steps: int, members: int) -> ConditionalDiffusionSampler:
        return ConditionalDiffusionSampler(
            build_scheduler(name, prediction_type=settings["prediction_type"], **settings["noise_schedule"]), steps, target_channels=k,
            spatial_dims=settings["spatial_dims"], image_size=settings["image_size"], num_samples=members,
            slice_axis=settings["slice_axis"], batch_size=max(members * args.slices, 1), seed=0, progress=False,
            condition_kind="image",
        )

    clock = time.process_time if args.clock == "process" else time.perf_counter

    def timed(run):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = clock()
        out = run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, clock() - start

    fuse = FuseEnsemble(num_members=args.num_members, fusion="mean")
    fast_rows = []
    for steps in args.ddim_steps:
        out, seconds = timed(lambda: sampler("ddim", steps, args.num_members)(image, network)[0])
        fast_rows.append((f"{args.num_members} members as one batch, DDIM-{steps}", out, seconds))
    if args.batched_ddpm:
        out, seconds = timed(lambda: sampler("ddpm", args.ddpm_steps, args.num_members)(image, network)[0])
        fast_rows.append((f"{args.num_members} members as one batch, DDPM-{args.ddpm_steps}", out, seconds))
    # the published protocol: members one after another, each a full DDPM chain of one sample per slice
    published_slices = args.slices if args.published_slices is None else min(args.published_slices, args.slices)
    published_image = image.narrow(settings["slice_axis"] + 2, 0, published_slices)  # (batch, channel, *spatial)
    chains = []
    published_s = 0.0
    for member in range(args.num_members if published_slices else 0):
        one = sampler("ddpm", args.ddpm_steps, 1)
        one.seed = member
        one.batch_size = 1
        out, seconds = timed(lambda: one(published_image, network)[0])
        chains.append(out)
        published_s += seconds
    published_per_slice = published_s / published_slices if published_slices else float("nan")

    print(f"# image_to_mask {'+'.join(args.preset) or '(train.yaml defaults)'}, {args.slices} slice(s), "
          f"{args.num_members} members, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.clock} time")
    print("| protocol | s / slice | speed-up | mean Dice |")
    print("|---|---|---|---|")
    rows = [(name, stacked, seconds / args.slices) for name, stacked, seconds in fast_rows]
    if published_slices:
        name = f"{args.num_members} x DDPM-{args.ddpm_steps}, sequential chains (published)"
        # Dice only where the chains covered every slice
        rows.insert(0, (name, torch.cat(chains, dim=0) if published_slices == args.slices else None, published_per_slice))
    for name, stacked, per_slice in rows:
        dice = "n/a"
        if args.datalist and stacked is not None:
            fused = fuse(stacked.cpu())[0]
            dice = f"{float(torch.tensor(per_class_dice(fused, label[0], k)).nanmean()):.3f}"
        speed_up = f"{published_per_slice / per_slice:.1f}x" if published_slices else "n/a"
        print(f"| {name} | {per_slice:.2f} | {speed_up} | {dice} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
