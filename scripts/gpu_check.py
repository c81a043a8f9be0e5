#!/usr/bin/env python
"""One prepared check of the mask_to_image bundle on a GPU: training speed, memory and model-FLOPs utilisation,
sampling speed of every sampler, and a 3D network row, all written to one JSON file.

Phases (each in its own try/except: a failure is recorded in the JSON and the next phase still runs; the JSON is
rewritten after every phase, so a run stopped from outside keeps what it had measured):

1. ``environment``: device name, torch / MONAI / CUDA versions, the device's peak bf16 dense FLOP/s (from a table by
   name) and a measured 8192^3 bf16 matrix product on CUDA.
2. ``data``: the built-in demo data (:func:`segdiff.data.demo.write_demo_data`), as ``scripts/run_demo.py`` uses it.
3. ``training``: ``--steps`` steps of ``bundles/mask_to_image/configs/train.yaml`` + the preset, built and run as
   ``python -m monai.bundle run training`` does (ConfigParser, overrides, ``initialize``, then ``training``), with
   bf16 autocast on CUDA. An Ignite handler times every step after ``--untimed-steps`` (CUDA-synchronised), counts
   samples per second and peak GPU memory; the network's forward FLOPs are counted once on one batch with
   ``torch.utils.flop_counter.FlopCounterMode`` (training ~ 3 x forward) to estimate the MFU.
4. ``sampling``: seconds per slice and images per second of ddpm / ddim / dpm_solver with the trained EMA network
   (cheapest first; a sampler whose estimated time would overrun the time budget is skipped).
5. ``rflow``: a second short run with ``diffusion: rflow``, sampled with ``euler``, if train.yaml has that key;
   otherwise recorded as not available in this checkout.
6. ``volume_3d``: forward + backward time and peak memory of a small 3D DiffusionModelUNet at 64^3.
7. ``latent_3d``: 3D mask -> image generation with the latent_mask_to_image bundle's default 3D networks at 64^3 and
   128^3 (``scripts/benchmark_latent.py`` in this process: dpm_solver, 10 steps, sampling and decoding seconds, peak
   memory), each size capped at an equal share of the time budget left.

    python scripts/gpu_check.py --output-dir gpu_check_output            # on the GPU (about 3-5 minutes)
    python scripts/gpu_check.py --device cpu --tiny --output-dir /tmp/gc  # the same code path on a CPU, in seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUNDLE = "mask_to_image"
TRAIN_CONFIG = REPO / "bundles" / BUNDLE / "configs" / "train.yaml"

#: peak dense bf16 tensor-core FLOP/s from NVIDIA's data sheets (without sparsity); matched in this order on the
#: upper-cased device name
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12, "H200 NVL"),
    ("H100 NVL", 835e12, "H100 NVL"),
    ("H200", 989e12, "H200 SXM"),
    ("H100 PCIE", 756e12, "H100 PCIe"),
    ("H100", 989e12, "H100 SXM"),
    ("A100", 312e12, "A100"),
)

#: --tiny: a network and images small enough for a CPU test run (on top of configs/demo_cpu.yaml)
TINY_OVERRIDES = {
    "image_size": [32, 32],
    "network_channels": [8, 8, 8],
    "attention_levels": [False, False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "batch_size": 4,
    "slices_per_volume": 2,
    "num_workers": 0,
    "warmup_steps": 2,  # the bundle's learning-rate warm-up (not --untimed-steps)
}
#: defaults that --tiny changes (a flag given on the command line wins)
FULL_DEFAULTS = {
    "steps": 300,
    "untimed_steps": 20,
    "samplers": ["dpm_solver:10", "dpm_solver:20", "ddim:50", "ddpm:1000"],
    "sample_batch": 32,
    "rflow_steps": 100,
    "rflow_sampler": "euler:30",
    "volume_size": 64,
    "latent_sizes": [64, 128],
}
TINY_DEFAULTS = {
    "steps": 8,
    "untimed_steps": 2,
    "samplers": ["dpm_solver:2", "ddim:3", "ddpm:4"],
    "sample_batch": 4,
    "rflow_steps": 4,
    "rflow_sampler": "euler:3",
    "volume_size": 16,
    "latent_sizes": [16],
}


# ---- small helpers ------------------------------------------------------------------------------------------------
def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_report(report: dict, path: Path) -> None:
    """Write the report atomically (a temporary file, then rename), so a run killed mid-write keeps the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(finite_or_none(report), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load_script(name: str):
    """A sibling script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """Peak GPU memory allocated by tensors since the last reset; on a CPU the process's peak resident memory (which
    never resets: it is the peak of the whole run so far)."""
    import torch

    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory_kind": "torch.cuda.max_memory_allocated",
        }
    return {
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory_kind": "process peak RSS (whole run)",
    }


def peak_bf16_flops(device_name: str) -> tuple[float | None, str]:
    """The device's peak dense bf16 FLOP/s from :data:`PEAK_BF16_FLOPS`, and which row (or why none) matched."""
    upper = device_name.upper()
    for key, flops, label in PEAK_BF16_FLOPS:
        if key in upper:
            return flops, f"{label} data-sheet peak, dense bf16"
    return None, f"no peak bf16 figure for {device_name!r} in gpu_check.PEAK_BF16_FLOPS: MFU not computed"


class TimeGuard:
    """The global time budget: phases start only while it lasts; long phases ask how much is left."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = float(budget_s)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def deadline(self, fraction: float) -> float:
        """perf_counter() time at which ``fraction`` of the budget is used."""
        return self.start + fraction * self.budget_s


def describe_error(error: BaseException) -> str:
    """``Type: message`` of an exception and of what caused it (MONAI's config errors wrap the real one)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {str(error).strip()}")
        error = error.__cause__ or error.__context__
    return " <- caused by: ".join(parts)


def run_phase(report: dict, name: str, fn: Callable[[], dict], guard: TimeGuard, path: Path) -> dict:
    """Run one phase: its dict (status ``ok`` unless it says otherwise), or ``error`` with the exception, or
    ``skipped`` once the time budget is spent. Written to the report at once."""
    if guard.left() <= 0:
        entry = {
            "status": "skipped",
            "reason": f"time budget of {guard.budget_s:.0f} s used up ({guard.elapsed():.0f} s elapsed)",
        }
    else:
        print(f"\n== {name} ({guard.elapsed():.0f} s elapsed)", flush=True)
        started = time.perf_counter()
        try:
            entry = {"status": "ok", **fn()}
        except Exception as error:  # noqa: BLE001 - recorded; the other phases still run
            entry = {
                "status": "error",
                "error": describe_error(error),
                "traceback": traceback.format_exc().splitlines()[-12:],
            }
            print(f"   {name} failed: {entry['error']}", flush=True)
            import torch

            if torch.cuda.is_available():  # what the failed phase held is garbage now
                torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - started
    report["phases"][name] = entry
    report["total_wall_s"] = guard.elapsed()
    write_report(report, path)
    return entry


# ---- the Ignite handler that measures training --------------------------------------------------------------------
class StepTimer:
    """Time every training step of an Ignite engine, after ``untimed_steps``.

    A step runs from the end of its batch fetch (GET_BATCH_COMPLETED) to the end of the last ITERATION_COMPLETED
    handler: prepare-batch, forward, backward, optimizer, EMA, lr schedule and loggers, without data loading. The
    completion handler is registered when the engine starts, so it runs after every handler attached before
    ``engine.run`` (the bundle's EMA too). Both ends wait for the GPU (``torch.cuda.synchronize``). Step-time
    statistics are over full batches (an epoch's last batch can be smaller); samples per second are all timed samples
    over all timed step time. The end-to-end rate also counts data loading and epoch boundaries: from the end of the
    last untimed step to the end of the last step. A ``deadline`` (``time.perf_counter()`` value) stops training
    early, recorded as ``stopped_early``.
    """

    def __init__(self, device, untimed_steps: int, deadline: float | None = None) -> None:
        self.device = device
        self.untimed_steps = int(untimed_steps)
        self.deadline = deadline
        self.step_times: list[float] = []
        self.batch_sizes: list[int] = []
        self.losses: list[float] = []
        self.first_timed_start: float | None = None
        self.last_end: float | None = None
        self.stopped_early = False
        self._start: float | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._on_batch)

    def _on_started(self, engine) -> None:
        from ignite.engine import Events

        reset_peak_memory(self.device)
        if not engine.has_event_handler(self._on_iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)

    def _on_batch(self, engine) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()
        if engine.state.iteration == 0 and self.untimed_steps == 0:  # not advanced yet: this is the first step
            self.first_timed_start = self._start

    def _on_iteration_completed(self, engine) -> None:
        synchronize(self.device)
        end = time.perf_counter()
        if self._start is not None and engine.state.iteration > self.untimed_steps:
            self.step_times.append(end - self._start)
            self.batch_sizes.append(batch_size_of(engine.state.batch))
        if engine.state.iteration == self.untimed_steps:
            self.first_timed_start = end
        self.last_end = end
        loss = engine.state.output
        loss = loss[0] if isinstance(loss, (list, tuple)) and loss else loss
        loss = loss.get("loss") if isinstance(loss, dict) else loss
        if loss is not None:
            self.losses.append(float(loss))
        if self.deadline is not None and end > self.deadline:
            self.stopped_early = True
            engine.terminate()

    def summary(self) -> dict:
        if not self.step_times:
            raise RuntimeError(
                f"no timed step: the run stopped within its {self.untimed_steps} untimed steps "
                f"(stopped_early={self.stopped_early}); lower --untimed-steps or raise --steps"
            )
        batch = max(self.batch_sizes)
        full = [t for t, b in zip(self.step_times, self.batch_sizes) if b == batch]
        samples = sum(self.batch_sizes)
        window = self.last_end - self.first_timed_start if self.first_timed_start is not None else None
        return {
            "timed_steps": len(self.step_times),
            "batch_size": batch,
            "partial_batches": len(self.step_times) - len(full),
            "step_time_s": {
                "median": statistics.median(full),
                "mean": statistics.fmean(full),
                "min": min(full),
                "max": max(full),
            },
            "samples_per_s": samples / sum(self.step_times),
            "end_to_end_step_time_s": window / len(self.step_times) if window else None,
            "end_to_end_samples_per_s": samples / window if window else None,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "stopped_early": self.stopped_early,
        }


def batch_size_of(batch: Any) -> int:
    """Network inputs in a batch (the first tensor's first dimension; a list of per-slice dicts counts its items)."""
    import torch

    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch) if isinstance(batch[0], dict) else batch_size_of(batch[0])
    return 0


# ---- phases -------------------------------------------------------------------------------------------------------
def environment(device) -> dict:
    import monai
    import torch

    import segdiff

    info = {
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "segdiff": segdiff.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            gpu_memory_total_mb=props.total_memory / 2**20,
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        info["peak_bf16_flops"], info["peak_flops_source"] = peak_bf16_flops(props.name)
        info["measured_matmul_bf16_flops"] = measure_matmul(device)
    else:
        info.update(
            device_name=platform.processor() or platform.machine(),
            peak_bf16_flops=None,
            peak_flops_source="CPU: no peak table, MFU not computed",
            measured_matmul_bf16_flops=None,
        )
    return info


def measure_matmul(device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of an n x n x n matrix product (mean of ``repeats`` after 3 warm-ups): what the card reaches here."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds


def demo_data(data_dir: Path | None, work: Path) -> dict:
    from segdiff.data.demo import write_demo_data

    if data_dir is not None and (data_dir / "datalist.json").exists():
        datalist = data_dir / "datalist.json"
        source = "given with --data-dir"
    else:
        datalist = Path(write_demo_data(data_dir or work / "data"))
        source = "written by segdiff.data.demo.write_demo_data"
    entries = json.loads(datalist.read_text())
    return {
        "datalist": str(datalist),
        "source": source,
        "cases": {split: len(entries.get(split, [])) for split in ("training", "validation", "test")},
    }


def bundle_parser(preset: Path, overrides: dict):
    """train.yaml + preset + overrides, as ``python -m monai.bundle run`` reads them (nothing parsed yet)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(TRAIN_CONFIG), str(preset)])
    parser.update(overrides)
    return parser


def train_bundle(
    preset: Path, overrides: dict, steps: int, untimed_steps: int, device, deadline: float | None
) -> tuple[dict, Any]:
    """Train ``steps`` steps of the bundle; returns the measurements and the parser (its ``ema_network`` trained)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # steps per epoch: the training cases over the cases per batch (the DataLoader keeps the last, smaller batch)
    probe = bundle_parser(preset, overrides)
    cases_per_batch = probe.get_parsed_content("cases_per_batch")
    num_cases = len(json.loads(Path(probe.get_parsed_content("datalist")).read_text())["training"])
    steps_per_epoch = math.ceil(num_cases / cases_per_batch)
    epochs = max(1, math.ceil(steps / steps_per_epoch))

    run = dict(overrides, max_epochs=epochs, val_interval=epochs + 1)  # no validation or sample grids in the timed run
    parser = bundle_parser(preset, run)
    # the bundle checkpoints every epoch (hundreds of MB with the GPU preset); here only at the end, so that the
    # end-to-end rate measures training, not the disk
    for index, handler in enumerate(parser.get("train#handlers") or []):
        if isinstance(handler, dict) and str(handler.get("_target_", "")).endswith("TrainingCheckpoint"):
            parser[f"train#handlers#{index}#save_interval"] = epochs
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    timer = StepTimer(device, untimed_steps, deadline)
    timer.attach(trainer)
    started = time.perf_counter()
    parser.get_parsed_content("training")  # the bundle's run section: EMA attached, trainer.run()
    wall = time.perf_counter() - started
    memory = peak_memory(device)
    parser.get_parsed_content("finalize")
    amp = bool(parser.get_parsed_content("amp"))
    result = {
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "steps": trainer.state.iteration,
        "amp": amp,
        "amp_dtype": str(parser.get_parsed_content("amp_dtype")) if amp else None,
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "training_wall_s": wall,
        **timer.summary(),
        **memory,
    }

    # forward FLOPs of one training batch (the input the network sees: noisy image + encoded mask)
    network = parser.get_parsed_content("network")
    image_size = parser.get_parsed_content("image_size")
    in_channels = parser.get_parsed_content("image_channels") + parser.get_parsed_content("condition_channels")
    batch = int(result["batch_size"])
    x = torch.randn((batch, in_channels, *image_size), device=device)
    t = torch.randint(0, parser.get_parsed_content("num_train_timesteps"), (batch,), device=device)
    was_training = network.training
    network.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=result["amp"] and device.type == "cuda")
    with torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
        network(x, timesteps=t)
    network.train(was_training)
    forward = counter.get_total_flops()
    result.update(
        parameters_m=sum(p.numel() for p in network.parameters()) / 1e6,
        image_size=list(image_size),
        forward_flops_per_batch=forward,
        train_flops_per_step=3 * forward,
        train_flops_note="training ~ 3 x forward FLOPs (FlopCounterMode, one batch)",
        achieved_flops=3 * forward / result["step_time_s"]["median"],
    )
    return result, parser


def add_mfu(result: dict, env: dict) -> None:
    peak = env.get("peak_bf16_flops")
    result["mfu"] = result["achieved_flops"] / peak if peak else None
    result["mfu_note"] = env.get("peak_flops_source", "no device peak: MFU not computed")
    measured = env.get("measured_matmul_bf16_flops")
    result["fraction_of_measured_matmul"] = result["achieved_flops"] / measured if measured else None


def add_sampling_flops(rows: list[dict], training: dict, env: dict) -> None:
    """FLOP/s and MFU of each timed sampler row, from the training phase's forward FLOPs (linear in the batch)."""
    if not training.get("forward_flops_per_batch"):
        return
    per_slice = training["forward_flops_per_batch"] / training["batch_size"]
    peak = env.get("peak_bf16_flops")
    for row in rows:
        if row.get("status") == "ok":
            row["achieved_flops"] = per_slice * row["batch_slices"] * row["steps"] / row["seconds_per_batch"]
            row["mfu"] = row["achieved_flops"] / peak if peak else None


def nested_boxes(num_classes: int, size: tuple[int, int]):
    """A (1, H, W) label map of nested boxes, classes 0..num_classes-1: a stand-in mask (timing ignores content)."""
    import torch

    label = torch.zeros((1, *size))
    for c in range(1, num_classes):
        margins = [max(1, int(s * 0.12 * c)) for s in size]
        label[:, margins[0] : size[0] - margins[0], margins[1] : size[1] - margins[1]] = c
    return label


def time_samplers(
    parser, network, entries: list[str], batch: int, device, guard: TimeGuard, amp: bool, sampler_names: tuple[str, ...]
) -> list[dict]:
    """Seconds per batch of ``batch`` slices for each ``sampler:steps`` entry (one warm-up step first); an entry whose
    time, estimated from the previous entry's seconds per step, would overrun the budget is skipped."""
    import torch

    from segdiff.engine import ConditionalDiffusionSampler, build_scheduler
    from segdiff.transforms import EncodeMask

    size = tuple(parser.get_parsed_content("image_size"))
    settings = {
        k: parser.get_parsed_content(k)
        for k in (
            "prediction_type",
            "noise_schedule",
            "timestep_spacing",
            "image_channels",
            "num_classes",
            "mask_encoding",
        )
    }
    mask = EncodeMask(settings["num_classes"], settings["mask_encoding"])(nested_boxes(settings["num_classes"], size))
    condition = torch.as_tensor(mask).unsqueeze(-1).repeat(1, 1, 1, batch)[None]  # one case: a "volume" of batch slices

    # the forward process the network was trained with, where this checkout's bundle has the key
    diffusion = {"diffusion": parser.get_parsed_content("diffusion")} if "diffusion" in parser else {}

    def sampler(name: str, steps: int):
        scheduler = build_scheduler(
            name,
            prediction_type=settings["prediction_type"],
            timestep_spacing=settings["timestep_spacing"],
            **diffusion,
            **settings["noise_schedule"],
        )
        return ConditionalDiffusionSampler(
            scheduler,
            num_inference_steps=steps,
            target_channels=settings["image_channels"],
            spatial_dims=2,
            image_size=size,
            slice_axis=2,
            batch_size=batch,
            conditional=settings["num_classes"] > 0,
            amp=amp,
            seed=0,
            progress=False,
        )

    rows, seconds_per_step = [], None
    for entry in entries:
        name, steps = entry.split(":")
        steps = int(steps)
        row = {"sampler": name, "steps": steps, "batch_slices": batch}
        if name not in sampler_names:
            rows.append(dict(row, status="error", error=f"sampler {name!r} is not one of {list(sampler_names)}"))
            continue
        estimate = seconds_per_step * steps if seconds_per_step else None
        if estimate is not None and estimate > guard.left():
            rows.append(
                dict(
                    row, status="skipped", reason=f"estimated {estimate:.0f} s, {guard.left():.0f} s of the budget left"
                )
            )
            continue
        try:
            sampler(name, 1)(condition, network)  # one step: allocations, kernel selection
            reset_peak_memory(device)
            start = time.perf_counter()
            output = sampler(name, steps)(condition, network)
            synchronize(device)
            seconds = time.perf_counter() - start
            seconds_per_step = seconds / steps
            rows.append(
                dict(
                    row,
                    status="ok",
                    seconds_per_batch=seconds,
                    seconds_per_slice=seconds / batch,
                    images_per_s=batch / seconds,
                    output_finite=bool(torch.isfinite(torch.as_tensor(output)).all()),
                    **peak_memory(device),
                )
            )
        except Exception as error:  # noqa: BLE001 - one sampler failing leaves the others
            rows.append(dict(row, status="error", error=describe_error(error)))
        print(
            f"   {entry}: {rows[-1].get('seconds_per_slice', rows[-1].get('reason', rows[-1].get('error')))}",
            flush=True,
        )
    return rows


def sampling_network(context: dict, preset: Path, overrides: dict, device):
    """The trained EMA network if training finished; otherwise the same network untrained (timing does not depend on
    the weights), from scripts/benchmark_sampling.py's build_network."""
    if context.get("parser") is not None:
        return context["parser"], context["parser"].get_parsed_content("ema_network"), "EMA of the training phase"
    parser = bundle_parser(preset, overrides)
    network, _ = load_script("benchmark_sampling").build_network(BUNDLE, [str(preset)], overrides)
    return parser, network.to(device), "untrained (the training phase did not finish)"


def rflow_available(preset: Path) -> bool:
    """Whether this checkout's bundle has the ``diffusion`` key (ddpm | rflow) that a rectified-flow run sets."""
    return "diffusion" in bundle_parser(preset, {})


#: the bundle's rectified-flow run: diffusion rflow, and euler for its TensorBoard sampler (not run here)
RFLOW_OVERRIDES = {"diffusion": "rflow", "sampler": "euler"}


def rflow_run(
    preset: Path,
    overrides: dict,
    args: argparse.Namespace,
    bundle_root: Path,
    device,
    guard: TimeGuard,
    env: dict,
    amp: bool,
) -> dict:
    """A short ``diffusion: rflow`` training run sampled with euler, or "not available" if the key is missing."""
    if not rflow_available(preset):
        return {
            "status": "not available",
            "note": f"rflow: not available in this checkout ({TRAIN_CONFIG.name} has no 'diffusion' key)",
        }
    untimed = min(args.untimed_steps, max(args.rflow_steps // 4, 1))
    result, parser = train_bundle(
        preset,
        dict(overrides, **RFLOW_OVERRIDES, bundle_root=str(bundle_root)),
        args.rflow_steps,
        untimed,
        device,
        guard.deadline(0.75),
    )
    add_mfu(result, env)
    rows = time_samplers(
        parser,
        parser.get_parsed_content("ema_network"),
        [args.rflow_sampler],
        args.sample_batch,
        device,
        guard,
        amp,
        ("euler",),
    )
    add_sampling_flops(rows, result, env)
    return {"overrides": RFLOW_OVERRIDES, "training": result, "sampling_rows": rows}


def volume_3d(size: int, tiny: bool, device, amp: bool, repeats: int = 5) -> dict:
    """Forward + backward of a small 3D DiffusionModelUNet (the bundle's network_def with spatial_dims 3)."""
    import torch

    overrides = {
        "spatial_dims": 3,
        "image_size": [size] * 3,
        "num_res_blocks": 1,
        "network_channels": [8, 8] if tiny else [32, 64, 64],
        "attention_levels": [False, False] if tiny else [False, False, False],
        "num_head_channels": 8 if tiny else 32,
        "norm_num_groups": 4 if tiny else 16,
    }
    network, settings = load_script("benchmark_sampling").build_network(BUNDLE, [], overrides)
    network = network.to(device).train()
    batch = 1 if tiny else 2
    in_channels = settings["image_channels"] + settings["condition_channels"]
    x = torch.randn((batch, in_channels, *[size] * 3), device=device)
    target = torch.randn((batch, settings["image_channels"], *[size] * 3), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = torch.nn.functional.mse_loss(network(x, timesteps=t).float(), target)
        loss.backward()
        network.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "network": {
            k: overrides[k] for k in ("network_channels", "attention_levels", "num_res_blocks", "norm_num_groups")
        },
        "volume": [size] * 3,
        "batch_size": batch,
        "amp": amp and device.type == "cuda",
        "parameters_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "forward_backward_s": statistics.median(times),
        "volumes_per_s": batch / statistics.median(times),
        **peak_memory(device),
    }


def latent_3d(sizes: list[int], tiny: bool, device, guard: TimeGuard) -> dict:
    """3D generation of the latent bundle (scripts/benchmark_latent.py), each size capped at an equal share of the
    time budget left; a size over its cap or out of memory is a row saying so, not a failed phase."""
    benchmark = load_script("benchmark_latent")
    cap = max(guard.left() / max(len(sizes), 1), 1.0)
    argv = ["--device", str(device), "--sizes", *map(str, sizes), "--isolation", "none",
            "--max-seconds-per-size", f"{cap:.0f}"]
    if tiny:
        argv += ["--tiny", "--steps", "2"]
    report = benchmark.benchmark(benchmark.parse_args(argv), ["benchmark_latent.py", *argv])
    return {"weights": report["weights"], "data": report["data"], "settings": report["settings"],
            "rows": report["rows"]}


# ---- the table ----------------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def print_table(report: dict) -> None:
    env = report["phases"].get("environment", {})
    print("\n" + "=" * 100)
    print(
        f"GPU check: {env.get('device_name', '?')} ({env.get('device_type', '?')}), torch {env.get('torch', '?')}, "
        f"MONAI {env.get('monai', '?')}, CUDA {env.get('cuda')}, preset {report['settings']['preset']}, "
        f"total {report['total_wall_s']:.0f} s"
    )
    for name, phase in report["phases"].items():
        status = phase["status"]
        extra = phase.get("error") or phase.get("reason") or phase.get("note") or ""
        print(f"  {name:12s} {status:14s} {fmt(phase.get('seconds'), '.1f'):>6s} s  {extra}")
    for key in ("training", "rflow"):
        phase = report["phases"].get(key, {})
        train = phase if key == "training" else phase.get("training", {})
        if "step_time_s" in train:
            print(
                f"\n{key}: {train['steps']} steps of {fmt(train['batch_size'])} slices {train.get('image_size')}, "
                f"{fmt(train['parameters_m'])} M parameters, amp {train['amp']} ({train['amp_dtype']})"
            )
            print("| step time (median) | samples / s | end-to-end samples / s | peak memory (MB) | TFLOP/s | MFU |")
            print("|---|---|---|---|---|---|")
            print(
                f"| {train['step_time_s']['median'] * 1e3:.1f} ms | {fmt(train['samples_per_s'], '.1f')} | "
                f"{fmt(train['end_to_end_samples_per_s'], '.1f')} | {fmt(train['peak_memory_mb'], '.0f')} | "
                f"{fmt(train['achieved_flops'] / 1e12, '.1f')} | {fmt(train.get('mfu'), '.1%')} |"
            )
    phases = report["phases"]
    rows = phases.get("sampling", {}).get("rows", []) + phases.get("rflow", {}).get("sampling_rows", [])
    if rows:
        print(
            "\n| sampler | steps | slices / batch | s / batch | s / slice | images / s | peak memory (MB) | MFU "
            "| status |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['sampler']} | {r['steps']} | {r['batch_slices']} | {fmt(r.get('seconds_per_batch'))} | "
                f"{fmt(r.get('seconds_per_slice'))} | {fmt(r.get('images_per_s'))} | "
                f"{fmt(r.get('peak_memory_mb'), '.0f')} | {fmt(r.get('mfu'), '.1%')} | {r['status']} |"
            )
    vol = report["phases"].get("volume_3d", {})
    if "forward_backward_s" in vol:
        print(
            f"\n3D: {vol['volume']} x batch {vol['batch_size']}, channels {vol['network']['network_channels']}: "
            f"forward+backward {vol['forward_backward_s'] * 1e3:.1f} ms, peak memory {vol['peak_memory_mb']:.0f} MB"
        )
    latent = report["phases"].get("latent_3d", {})
    if latent.get("rows"):
        print("\nlatent 3D generation (latent_mask_to_image, random weights):")
        print(
            "| size | latent | sampler | steps | sampling (s) | decoding (s) | total (s) | peak memory (MB) | status |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in latent["rows"]:
            print(
                f"| {r['size'][0]}^3 | {r.get('latent_shape', '-')} | {r['sampler']} | {r['steps']} | "
                f"{fmt(r.get('sampling_s'))} | {fmt(r.get('decoding_s'))} | {fmt(r.get('total_s'))} | "
                f"{fmt(r.get('peak_memory_mb'), '.0f')} | {r['status']} |"
            )


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda (default when available) or cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny network and images, few steps: a CPU test of the script"
    )
    parser.add_argument(
        "--preset",
        help="preset config after train.yaml (default configs/demo_gpu.yaml on CUDA, configs/demo_cpu.yaml otherwise)",
    )
    parser.add_argument("--steps", type=int, help=f"training steps (default {FULL_DEFAULTS['steps']})")
    parser.add_argument(
        "--untimed-steps",
        type=int,
        help=f"first training steps left out of the timing (default {FULL_DEFAULTS['untimed_steps']})",
    )
    parser.add_argument(
        "--samplers", nargs="+", help=f"sampler:steps entries (default {' '.join(FULL_DEFAULTS['samplers'])})"
    )
    parser.add_argument(
        "--sample-batch", type=int, help=f"slices sampled together (default {FULL_DEFAULTS['sample_batch']})"
    )
    parser.add_argument(
        "--rflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train a short diffusion: rflow run and sample it with euler (if train.yaml has the key)",
    )
    parser.add_argument(
        "--rflow-steps", type=int, help=f"training steps of the rflow run (default {FULL_DEFAULTS['rflow_steps']})"
    )
    parser.add_argument(
        "--rflow-sampler", help=f"sampler:steps for the rflow model (default {FULL_DEFAULTS['rflow_sampler']})"
    )
    parser.add_argument("--volume-3d", action=argparse.BooleanOptionalAction, default=True, help="the 3D network row")
    parser.add_argument("--volume-size", type=int, help=f"3D edge length (default {FULL_DEFAULTS['volume_size']})")
    parser.add_argument(
        "--latent-3d", action=argparse.BooleanOptionalAction, default=True, help="the latent bundle's 3D generation row"
    )
    parser.add_argument(
        "--latent-sizes", type=int, nargs="+", help=f"its volume edges (default {FULL_DEFAULTS['latent_sizes']})"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="demo data folder to reuse (written there if it has no datalist.json)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("gpu_check_output"), help="folder of the JSON report")
    parser.add_argument("--output", default="gpu_check.json", help="report file name (relative to --output-dir)")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=420.0,
        help="phases not started by then are skipped; training stops at half of it (default 420)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary bundle_root folders")
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    guard = TimeGuard(args.time_budget_s)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda:0")
    preset = Path(args.preset or ("configs/demo_gpu.yaml" if device.type == "cuda" else "configs/demo_cpu.yaml"))
    preset = preset if preset.is_absolute() else REPO / preset
    amp = device.type == "cuda"  # MONAI's trainer autocasts on CUDA only; amp_dtype picks bf16 there
    overrides = {
        "device": f"$torch.device('{device}')",
        "amp": amp,
        "overwrite": True,
        "resume": False,
        **(TINY_OVERRIDES if args.tiny else {}),
    }
    output = Path(args.output)
    output = output if output.is_absolute() else args.output_dir / output
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    report: dict = {
        "schema": "segdiff gpu_check 1",
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["gpu_check.py", *argv],
        "settings": {
            "bundle": BUNDLE,
            "preset": str(preset.relative_to(REPO) if preset.is_relative_to(REPO) else preset),
            "tiny": args.tiny,
            "overrides": {k: v for k, v in overrides.items()},
            "steps": args.steps,
            "untimed_steps": args.untimed_steps,
            "samplers": args.samplers,
            "sample_batch": args.sample_batch,
            "rflow": args.rflow,
            "rflow_steps": args.rflow_steps,
            "rflow_sampler": args.rflow_sampler,
            "volume_3d": args.volume_3d,
            "volume_size": args.volume_size,
            "latent_3d": args.latent_3d,
            "latent_sizes": args.latent_sizes,
            "time_budget_s": args.time_budget_s,
        },
        "phases": {},
        "total_wall_s": 0.0,
    }
    context: dict = {}
    print(f"gpu_check: device {device}, preset {report['settings']['preset']}, report {output}", flush=True)
    try:
        env = run_phase(report, "environment", lambda: environment(device), guard, output)
        data = run_phase(report, "data", lambda: demo_data(args.data_dir, work), guard, output)
        overrides["dataset_dir"] = str(
            Path(data["datalist"]).parent if "datalist" in data else args.data_dir or work / "data"
        )

        def training() -> dict:
            result, context["parser"] = train_bundle(
                preset,
                dict(overrides, bundle_root=str(work / "ddpm")),
                args.steps,
                args.untimed_steps,
                device,
                guard.deadline(0.5),
            )
            add_mfu(result, env)
            return result

        run_phase(report, "training", training, guard, output)

        def sampling() -> dict:
            from segdiff.engine import DDPM_SAMPLERS

            parser, network, weights = sampling_network(context, preset, overrides, device)
            rows = time_samplers(parser, network, args.samplers, args.sample_batch, device, guard, amp, DDPM_SAMPLERS)
            add_sampling_flops(rows, report["phases"].get("training", {}), env)
            return {
                "weights": weights,
                "condition": "synthetic nested-box masks (timing does not depend on content)",
                "rows": rows,
            }

        run_phase(report, "sampling", sampling, guard, output)
        context.pop("parser", None)  # the DDPM run's networks, optimizer and caches: free before the next run
        if device.type == "cuda":
            torch.cuda.empty_cache()

        if args.rflow:
            run_phase(
                report,
                "rflow",
                lambda: rflow_run(preset, overrides, args, work / "rflow", device, guard, env, amp),
                guard,
                output,
            )
        if args.volume_3d:
            run_phase(report, "volume_3d", lambda: volume_3d(args.volume_size, args.tiny, device, amp), guard, output)
        if args.latent_3d:
            run_phase(
                report, "latent_3d", lambda: latent_3d(args.latent_sizes, args.tiny, device, guard), guard, output
            )
    finally:
        report["total_wall_s"] = guard.elapsed()
        write_report(report, output)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    print(f"\nreport: {output}")
    failed = [name for name, phase in report["phases"].items() if phase["status"] == "error"]
    if failed:
        print(f"failed phases: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
