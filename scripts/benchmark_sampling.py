#!/usr/bin/env python
"""Sampling speed of a bundle's diffusion network: seconds per generated image (2D slice or 3D volume), images per
second and peak memory, for each sampler and step count, on this machine.

The network is built from the bundle's train.yaml plus any presets, exactly as training builds it; weights do not
change the timing, so none are needed (pass --weights to time a trained model anyway).

    python scripts/benchmark_sampling.py --preset configs/demo_cpu.yaml --samplers ddim:50 ddpm:1000 --batch-size 16
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def build_network(bundle: str, presets: list[str], overrides: dict) -> tuple[torch.nn.Module, dict]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / "train.yaml")] + [str(REPO / p) for p in presets])
    parser.update(overrides)
    keys = ("spatial_dims", "image_size", "num_classes", "image_channels", "condition_channels", "prediction_type", "noise_schedule")
    settings = {k: parser.get_parsed_content(k) for k in keys}
    settings["model_record"] = parser.get_parsed_content("model_record")
    return parser.get_parsed_content("network_def"), settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="mask_to_image")
    parser.add_argument("--preset", action="append", default=[], help="preset config(s) relative to the repo root")
    parser.add_argument("--samplers", nargs="+", default=["ddim:50", "ddpm:1000"], help="sampler:steps entries")
    parser.add_argument("--batch-size", type=int, default=16, help="images generated together")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per entry (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast on CUDA (bf16 where supported)")
    parser.add_argument("--weights", help="optional model.pt to load")
    args = parser.parse_args(argv)

    from segdiff.engine import ConditionalDiffusionSampler, build_scheduler

    network, settings = build_network(args.bundle, args.preset, {})

    def schedule(name: str):
        return build_scheduler(name, prediction_type=settings["prediction_type"], **settings["noise_schedule"])

    if args.weights:  # refused if they were trained with other settings than the bundle config and presets give
        settings["model_record"].verify(network, args.weights)
        network.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    device = torch.device(args.device)
    network = network.to(device).eval()
    size = tuple(settings["image_size"])
    condition = torch.zeros((args.batch_size, settings["condition_channels"], *size), device=device)
    if settings["condition_channels"]:
        condition[:, 0] = 1.0
    params = sum(p.numel() for p in network.parameters()) / 1e6
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {args.bundle} {'+'.join(args.preset) or '(train.yaml defaults)'}: {params:.2f} M parameters, "
          f"image_size {list(size)}, batch {args.batch_size}, {device.type} ({hardware}), torch {torch.__version__}, amp {args.amp}")
    print("| sampler | steps | s / batch | s / image | images / s | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for entry in args.samplers:
        name, steps = entry.split(":")
        sampler = ConditionalDiffusionSampler(
            schedule(name), num_inference_steps=int(steps), target_channels=settings["image_channels"],
            spatial_dims=settings["spatial_dims"], image_size=size, batch_size=args.batch_size,
            conditional=settings["condition_channels"] > 0, amp=args.amp, seed=0, progress=False,
        )
        warm = ConditionalDiffusionSampler(schedule("ddim"), num_inference_steps=1, target_channels=settings["image_channels"],
                                           spatial_dims=settings["spatial_dims"], image_size=size, batch_size=args.batch_size,
                                           conditional=settings["condition_channels"] > 0, amp=args.amp, progress=False)
        warm(condition, network)  # one step: allocations, kernel selection
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sampler(condition, network)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = min(times)
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
        print(f"| {name} | {steps} | {seconds:.2f} | {seconds / args.batch_size:.3f} | {args.batch_size / seconds:.2f} | {memory:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
