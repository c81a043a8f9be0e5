#!/usr/bin/env python
"""Training throughput of a bundle against a minimal diffusers-style loop: samples (network inputs) per second of
each, and their ratio, measured in one process on this machine.

Ours is the bundle's real training path: train.yaml plus the presets, run as ``python -m monai.bundle run training``
runs it (a ``monai.bundle.ConfigWorkflow``: initialize, then the ``training`` list, which attaches the EMA and runs
the MONAI ``SupervisedTrainer`` with the bundle's data pipeline and every train handler). An Ignite handler times it.

The diffusers-style loop is how the seed repositories (Konz et al.'s seg-guided-diffusion) write training: a
``diffusers.UNet2DModel`` of the same architecture, diffusers' ``DDPMScheduler`` with the same schedule, AdamW with
the same learning rate and weight decay, a cosine schedule with warm-up, MSE on the same target (velocity, noise or
sample), gradient clipping, an EMA update per step, and a plain ``torch.utils.data.DataLoader`` over the same
training slices, extracted to tensors beforehand (the seeds train from pre-extracted PNG slices). It has no mask
ablation, no checkpoints and no logging beyond reading the loss.

Both run with the same ``torch.set_num_threads``, interleaved in blocks of ``--block-steps`` steps, so that other
load on a shared machine slows both alike. Each loop first runs ``--warmup-steps`` untimed steps; a block's time
runs from the end of one step to the end of the step ``--block-steps`` later (data loading, epoch boundaries and
handlers included). Samples are counted as the network inputs actually seen (a last, smaller batch of an epoch
counts what it holds).

    python scripts/benchmark_training.py --preset configs/demo_cpu.yaml --steps 48 --json throughput.json

On a CPU machine shared with other jobs, wall time with several threads mostly measures the other jobs: every small
multi-threaded op waits for a descheduled thread. There ``OMP_NUM_THREADS=1 ... --threads 1 --clock process`` times
this process's CPU time on one core instead (as scripts/benchmark_ensemble.py does).

Without ``--dataset-dir`` the built-in demo data (``segdiff.data.demo.write_demo_data``) is written to a temporary
folder first (needs nilearn, the ``demo`` extra); models and logs of the timed run go to a temporary folder too.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

#: MONAI noise schedule name -> diffusers ``beta_schedule`` (the same betas)
DIFFUSERS_BETA_SCHEDULES = {"linear_beta": "linear", "scaled_linear_beta": "scaled_linear", "sigmoid_beta": "sigmoid"}


def config_files(bundle: str, presets: list[str]) -> list[str]:
    """train.yaml of ``bundle`` followed by the presets (paths relative to the repo root, or absolute)."""
    return [str(REPO / "bundles" / bundle / "configs" / "train.yaml")] + [str(REPO / p) for p in presets]


def network_inputs(output: Any) -> int:
    """Network inputs of one trainer iteration: the batch size of its output (MONAI decollates it into a list)."""
    if isinstance(output, (list, tuple)):
        return len(output)
    return int(output["image"].shape[0])


class BlockTimer:
    """Ignite handler: after ``warmup_steps`` iterations, times ``steps`` iterations in blocks of ``block_steps``,
    calls ``between_blocks`` (with the clock stopped) after each block, and stops the trainer after the last one.

    A block runs from the end of one iteration's ITERATION_COMPLETED call of this handler to the same call
    ``block_steps`` iterations later, so it holds every part of exactly ``block_steps`` iterations (data loading,
    the step, all handlers, epoch boundaries) wherever this handler sits among the others.
    """

    def __init__(self, warmup_steps: int, steps: int, block_steps: int, between_blocks: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.warmup_steps, self.steps, self.block_steps = warmup_steps, steps, block_steps
        self.between_blocks = between_blocks
        self.clock = clock
        self.seconds = self.data_seconds = 0.0
        self.samples = self.timed = 0
        self._count = 0
        self._start: float | None = None
        self._batch_start = 0.0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_batch_completed)

    def _get_batch_started(self, engine) -> None:
        self._batch_start = self.clock()

    def _get_batch_completed(self, engine) -> None:
        if self._start is not None:
            self.data_seconds += self.clock() - self._batch_start

    def __call__(self, engine) -> None:
        now = self.clock()
        self._count += 1
        if self._start is not None:
            self.timed += 1
            self.samples += network_inputs(engine.state.output)
        if self._count == self.warmup_steps or (self._start is not None and (self.timed % self.block_steps == 0 or self.timed == self.steps)):
            if self._start is not None:
                self.seconds += now - self._start
            if self.timed >= self.steps:
                self._start = None
                engine.terminate()
                return
            if self.between_blocks is not None:
                self.between_blocks()
            self._start = self.clock()


def diffusers_unet(network_def: dict, image_size: list[int]):
    """A ``diffusers.UNet2DModel`` with the architecture of a bundle's ``DiffusionModelUNet`` arguments."""
    import diffusers

    def single(name: str) -> int:
        value = network_def[name]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"network_def#{name} = {value}: UNet2DModel takes one value for all levels")
            value = value[0]
        return int(value)

    if network_def["spatial_dims"] != 2:
        raise ValueError(f"network_def#spatial_dims = {network_def['spatial_dims']}: the diffusers-style loop is 2D only")
    attention = [bool(a) for a in network_def["attention_levels"]]
    return diffusers.UNet2DModel(
        sample_size=tuple(image_size),
        in_channels=network_def["in_channels"],
        out_channels=network_def["out_channels"],
        block_out_channels=tuple(network_def["channels"]),
        layers_per_block=single("num_res_blocks"),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=single("num_head_channels"),
        norm_num_groups=network_def["norm_num_groups"],
        norm_eps=network_def.get("norm_eps", 1e-6),  # DiffusionModelUNet's default
    )


def read_settings(files: list[str], overrides: dict) -> dict:
    """What the diffusers-style loop copies from the bundle config: network, schedule, optimiser and sizes."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    net_keys = ("spatial_dims", "in_channels", "out_channels", "channels", "attention_levels", "num_res_blocks",
                "num_head_channels", "norm_num_groups", "norm_eps")
    network_def = {k: parser.get_parsed_content(f"network_def#{k}") for k in net_keys if f"network_def#{k}" in parser}
    keys = ("image_size", "batch_size", "num_workers", "prediction_type", "noise_schedule", "max_grad_norm", "ema_momentum",
            "warmup_steps", "num_train_timesteps")
    settings = {k: parser.get_parsed_content(k) for k in keys}
    # the loop below is the seeds' objective: DDPM with an MSE, unweighted or min-SNR-weighted as diffusers' training
    # examples write it (snr_gamma); configs without these keys train DDPM with the plain MSE
    diffusion = parser.get_parsed_content("diffusion") if "diffusion" in parser else "ddpm"
    if diffusion != "ddpm":
        raise ValueError(f"diffusion = {diffusion!r} in {files}: the diffusers-style loop mirrors only diffusion 'ddpm'")
    weighting = parser.get_parsed_content("loss_weighting") if "loss_weighting" in parser else "none"
    if weighting not in ("none", "min_snr"):
        raise ValueError(f"loss_weighting = {weighting!r} in {files}: the diffusers-style loop mirrors none or min_snr")
    settings["min_snr_gamma"] = parser.get_parsed_content("min_snr_gamma") if weighting == "min_snr" else None
    settings.update(
        network_def=network_def,
        learning_rate=parser.get_parsed_content("optimizer#lr"),
        weight_decay=parser.get_parsed_content("optimizer#weight_decay"),
        target_key=parser.get_parsed_content("train#prepare_batch#target_key"),
        condition_key=parser.get_parsed_content("train#prepare_batch#condition_key"),
    )
    settings["parser"] = parser
    return settings


def extract_slices(settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training slice the bundle draws from (foreground slices along ``slice_axis``), through the bundle's own
    load and resize / encode transforms, stacked as (target, condition) tensors: what the seeds' PNG slices hold."""
    from monai.transforms import Compose

    parser = settings["parser"]
    load = Compose(parser.get_parsed_content("load_transforms"))
    slicer, *per_slice = parser.get_parsed_content("sample_transforms")
    per_slice = Compose(per_slice)
    keys = [k for k in (settings["target_key"], settings["condition_key"]) if k]
    targets, conditions = [], []
    for entry in parser.get_parsed_content("train#dataset#data"):
        volume = load(entry)
        for index in slicer.candidate_slices(volume, volume[keys[0]].shape[slicer.axis + 1]):
            item = per_slice({k: torch.as_tensor(volume[k]).select(slicer.axis + 1, int(index)).clone() for k in keys})
            targets.append(torch.as_tensor(item[keys[0]]).float())
            conditions.append(torch.as_tensor(item[keys[1]]).float() if len(keys) > 1 else targets[-1][:0])
    return torch.stack(targets), torch.stack(conditions)


class DiffusersStyleLoop:
    """The seeds' training loop, run ``steps`` at a time by :meth:`run` (it keeps its place in the data)."""

    def __init__(self, settings: dict, targets: torch.Tensor, conditions: torch.Tensor, total_steps: int, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        import diffusers
        from diffusers.optimization import get_cosine_schedule_with_warmup

        schedule = dict(settings["noise_schedule"])
        name = schedule.pop("schedule", "linear_beta")
        if name not in DIFFUSERS_BETA_SCHEDULES:
            raise ValueError(f"noise_schedule#schedule = {name}: no diffusers equivalent (expected one of {sorted(DIFFUSERS_BETA_SCHEDULES)})")
        self.generator = torch.Generator().manual_seed(seed)  # its own random stream: the bundle's stays as it was
        torch.manual_seed(seed)
        self.model = diffusers_unet(settings["network_def"], settings["image_size"]).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        self.scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=schedule.pop("num_train_timesteps", settings["num_train_timesteps"]),
            beta_schedule=DIFFUSERS_BETA_SCHEDULES[name], prediction_type=settings["prediction_type"], **schedule,
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
        self.lr_scheduler = get_cosine_schedule_with_warmup(self.optimizer, settings["warmup_steps"], total_steps)
        self.max_grad_norm = settings["max_grad_norm"]
        self.momentum = settings["ema_momentum"]
        self.loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(targets, conditions), batch_size=settings["batch_size"], shuffle=True,
            generator=self.generator,
        )
        self._batches = iter(self.loader)
        self.batch_size = settings["batch_size"]
        self.clock = clock
        self.min_snr_gamma = settings.get("min_snr_gamma")
        alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self.snr = alphas_cumprod / (1 - alphas_cumprod)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._batches)
        except StopIteration:  # next epoch
            self._batches = iter(self.loader)
            return next(self._batches)

    def run(self, steps: int) -> tuple[float, float, int]:
        """``steps`` training steps: (seconds, of which data loading, network inputs)."""
        samples, data_seconds = 0, 0.0
        start = self.clock()
        for _ in range(steps):
            t0 = self.clock()
            clean, condition = self._next_batch()
            data_seconds += self.clock() - t0
            noise = torch.randn(clean.shape, generator=self.generator)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],), generator=self.generator)
            noisy = self.scheduler.add_noise(clean, noise, timesteps)
            if self.scheduler.config.prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(clean, noise, timesteps)
            else:
                target = clean if self.scheduler.config.prediction_type == "sample" else noise
            pred = self.model(torch.cat([noisy, condition], dim=1), timesteps).sample
            if self.min_snr_gamma is None:
                loss = torch.nn.functional.mse_loss(pred, target)
            else:  # min(SNR, gamma) on the x0 loss, expressed for the network's target
                snr = self.snr[timesteps]
                weights = torch.clamp(snr, max=self.min_snr_gamma)
                kind = self.scheduler.config.prediction_type
                weights = weights / (snr + 1) if kind == "v_prediction" else weights / snr if kind == "epsilon" else weights
                loss = (weights * (pred - target).pow(2).flatten(1).mean(dim=1)).mean()
            loss.backward()
            if self.max_grad_norm and self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, self.momentum)
            loss.item()  # the seeds log the loss every step
            samples += clean.shape[0]
        return self.clock() - start, data_seconds, samples


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="mask_to_image", choices=["mask_to_image", "image_to_mask"])
    parser.add_argument("--preset", action="append", help="preset config(s) after train.yaml (default configs/demo_cpu.yaml)")
    parser.add_argument("--steps", type=int, default=48, help="timed training steps of each loop")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps of each loop first (allocations, first epoch)")
    parser.add_argument("--block-steps", type=int, default=4, help="steps of one loop before the other takes over; 0: one after the other")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads for both loops")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall time (default), or this process's CPU time: with --threads 1 on a shared CPU machine "
                        "it is one core's compute time, which other jobs do not inflate (needs num_workers 0)")
    parser.add_argument("--dataset-dir", help="a folder with datalist.json (default: the demo data, written to a temporary folder)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override (value as a Python literal), e.g. network_def#num_res_blocks=1")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1:
        parser.error("--steps and --warmup-steps must be at least 1")
    presets = args.preset if args.preset is not None else ["configs/demo_cpu.yaml"]
    block = args.block_steps if args.block_steps > 0 else args.steps

    import monai
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    extra = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--override {item!r}: expected KEY=VALUE")
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value

    with tempfile.TemporaryDirectory(prefix="benchmark_training_") as tmp:
        dataset_dir = args.dataset_dir
        if dataset_dir is None:
            from segdiff.data.demo import write_demo_data

            dataset_dir = os.path.join(tmp, "data")
            write_demo_data(dataset_dir)
        overrides = dict(extra, dataset_dir=str(dataset_dir), bundle_root=os.path.join(tmp, "bundle"))
        files = config_files(args.bundle, presets)

        # the diffusers-style loop: settings and slices from the same config, extracted before anything is timed
        settings = read_settings(files, overrides)
        if args.clock == "process" and settings["num_workers"]:
            raise ValueError(f"--clock process counts this process only, but num_workers = {settings['num_workers']}: "
                             "its data loader workers would not be counted (set num_workers 0)")
        targets, conditions = extract_slices(settings)
        cases = len(settings["parser"].get_parsed_content("train#dataset#data"))
        cases_per_batch = settings["parser"].get_parsed_content("cases_per_batch")
        epoch_length = math.ceil(cases / cases_per_batch)
        # enough epochs for warm-up and timed steps (the lr schedule spans them, as in a run of that length)
        overrides["max_epochs"] = math.ceil((args.warmup_steps + args.steps) / epoch_length) + 1
        theirs = DiffusersStyleLoop(settings, targets, conditions, total_steps=overrides["max_epochs"] * epoch_length, clock=clock)
        theirs_total = {"seconds": 0.0, "data_seconds": 0.0, "samples": 0, "steps": 0}

        def theirs_turn() -> None:  # ours' clock is stopped meanwhile
            if theirs_total["steps"] == 0:
                theirs.run(args.warmup_steps)
            steps = min(block, args.steps - theirs_total["steps"])
            seconds, data_seconds, samples = theirs.run(steps)
            theirs_total.update(seconds=theirs_total["seconds"] + seconds, samples=theirs_total["samples"] + samples,
                                data_seconds=theirs_total["data_seconds"] + data_seconds, steps=theirs_total["steps"] + steps)

        # ours: what `python -m monai.bundle run training --config_file [...] --key value ...` does
        workflow = ConfigWorkflow(config_file=files, run_id="training", **overrides)
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        timer = BlockTimer(args.warmup_steps, args.steps, block, theirs_turn if block < args.steps else None, clock)
        timer.attach(trainer)
        workflow.run()
        workflow.finalize()
        if timer.timed < args.steps:
            raise RuntimeError(f"the bundle's trainer stopped after {timer.timed} of {args.steps} timed steps")
        while theirs_total["steps"] < args.steps:  # its last block (or, one after the other, all of it)
            theirs_turn()
        ours_params = parameters(workflow.parser.get_parsed_content("network"))

    theirs_params = parameters(theirs.model)
    rows = {
        "ours": {
            "loop": f"{args.bundle} bundle (MONAI SupervisedTrainer, handlers, EMA)",
            "parameters": ours_params, "steps": timer.timed, "samples": timer.samples, "seconds": timer.seconds,
            "data_seconds": timer.data_seconds, "batch_size": settings["batch_size"],
        },
        "diffusers_style": {
            "loop": "diffusers-style loop (UNet2DModel, tensors in a DataLoader)",
            "parameters": theirs_params, "steps": theirs_total["steps"], "samples": theirs_total["samples"],
            "seconds": theirs_total["seconds"], "data_seconds": theirs_total["data_seconds"], "batch_size": theirs.batch_size,
        },
    }
    for row in rows.values():
        row["samples_per_second"] = row["samples"] / row["seconds"]
    ratio = rows["ours"]["samples_per_second"] / rows["diffusers_style"]["samples_per_second"]
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"

    print(f"# {args.bundle} {'+'.join(presets) or '(train.yaml defaults)'}: batch {settings['batch_size']}, "
          f"image_size {list(settings['image_size'])}, {len(targets)} training slices; warm-up {args.warmup_steps} steps, "
          f"blocks of {block} steps, {args.clock} time; {hardware}; torch {torch.__version__}, monai {monai.__version__}")
    print("| loop | parameters | steps timed | seconds | of which data (s) | samples/s |")
    print("|---|---|---|---|---|---|")
    for row in rows.values():
        print(f"| {row['loop']} | {row['parameters'] / 1e6:.3f} M | {row['steps']} | {row['seconds']:.2f} | "
              f"{row['data_seconds']:.2f} | {row['samples_per_second']:.2f} |")
    if abs(ours_params - theirs_params) > 0.03 * theirs_params:
        print(f"note: the networks' parameter counts differ by more than 3% ({ours_params} vs {theirs_params})")
    print(f"ratio ours/diffusers-style: {ratio:.2f}", flush=True)

    if args.json:
        import diffusers

        report = {
            "bundle": args.bundle, "presets": presets, "overrides": extra, "hardware": hardware,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "monai": monai.__version__,
            "diffusers": diffusers.__version__, "warmup_steps": args.warmup_steps, "block_steps": block, "clock": args.clock,
            "training_slices": len(targets), "loops": rows, "ratio": ratio,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
