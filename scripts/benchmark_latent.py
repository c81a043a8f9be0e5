#!/usr/bin/env python
"""Time and peak memory of 3D mask -> image generation with the latent_mask_to_image bundle, per volume size.

The networks and the sampler are the bundle's own: ``bundles/latent_mask_to_image/configs/inference.yaml`` with
``spatial_dims: 3`` and ``image_size: [S, S, S]`` is parsed by MONAI's ``ConfigParser`` and its ``network``
(``segdiff.engine.ControlNetDiffusion``: the latent ``DiffusionModelUNet`` steered by the mask ``ControlNet``),
``inferer`` (``segdiff.engine.latent_inference.LatentGridSampler`` around ``segdiff.engine.LatentDiffusionSampler``
with the config's scheduler, AutoencoderKL and ``decode_roi_size``) and mask encoding (``EncodeMaskd``) are used as
``python -m monai.bundle run --config_file configs/inference.yaml`` uses them: one call of the inferer per volume
generates it (seeded latent noise, ControlNet + UNet denoising in the latent, then decoding, whole or in MONAI
``SlidingWindowInferer`` windows). The weights are randomly initialised (time and memory do not depend on them), the
mask is random labels, the latent ``scale_factor`` is 1 and the modality mapping ``{"ct": 0, "mr": 1}``: nothing
needs a trained bundle. The split into sampling and decoding seconds comes from timing the sampler's own
``sample_latents`` and ``decode`` calls inside that one inferer call.

Each size runs in a child process of its own (``--isolation process``, the default), so that its peak memory is its
own and a size that runs out of memory cannot take the others down. A size stops when it passes
``--max-seconds-per-size`` (checked before every network and decoder call; the child is killed
``--grace-seconds`` after the cap if one call runs on) and is reported as over the cap, with the steps it finished.
On a CPU the child's address space is limited (``--cpu-memory-limit-gb``, default 80 % of the memory available at the
start) so that a size too big for the machine fails as "out of memory" instead of waking the kernel's OOM killer.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the generation (weights included) and its growth over
what was allocated before; on a CPU the growth of the child's peak resident set (``resource.getrusage`` ``ru_maxrss``
after the generation minus the resident set before it, from /proc/self/statm; psutil and tracemalloc are not used:
tracemalloc does not see torch's allocations). Besides wall seconds each row has the CPU seconds of the process
during the generation (``time.process_time``, all threads): on a machine shared with other jobs the wall time grows
with their load, the CPU time much less.

    python scripts/benchmark_latent.py --sizes 64 128 256 --output latent_3d.json            # CUDA when present
    nice -n 10 env OMP_NUM_THREADS=1 python scripts/benchmark_latent.py --device cpu --sizes 64 128
    python scripts/benchmark_latent.py --tiny --sizes 16 --steps 2 --device cpu              # a check in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUNDLE = "latent_mask_to_image"
INFERENCE_CONFIG = REPO / "bundles" / BUNDLE / "configs" / "inference.yaml"
SCHEMA = "segdiff benchmark_latent 1"
#: the modality mapping the networks are built for (the bundle reads it from the trained UNet's record)
MODALITIES = {"ct": 0, "mr": 1}
#: the inference.yaml keys that give the architecture (reported with every run)
ARCHITECTURE_KEYS = (
    "num_classes", "image_channels", "latent_channels", "autoencoder_channels", "autoencoder_attention_levels",
    "autoencoder_num_res_blocks", "autoencoder_norm_num_groups", "network_channels", "attention_levels",
    "num_res_blocks", "num_head_channels", "norm_num_groups", "conditioning_channels",
)
#: --tiny: networks small enough for a CPU test in seconds (every grid a multiple of 4)
TINY = {
    "latent_channels": 2,
    "autoencoder_channels": [8, 8],
    "autoencoder_attention_levels": [False, False],
    "autoencoder_num_res_blocks": 1,
    "autoencoder_norm_num_groups": 4,
    "network_channels": [8, 8],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "conditioning_channels": 4,
}
WEIGHTS_NOTE = "randomly initialised (time and memory do not depend on the weights)"
DATA_NOTE = "random mask: uniform random labels 0..num_classes-1 per voxel (seeded), one-hot by the bundle's " \
            "EncodeMaskd"


class OverTimeCap(Exception):
    """Raised inside a network or decoder call once the size's time cap has passed."""


# ---- settings -----------------------------------------------------------------------------------------------------
def parse_set(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs (VALUE read as YAML: ``network_channels=[32,64,64]``) -> overrides of inference.yaml."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (an inference.yaml key), got {item!r}.")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def config_parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(INFERENCE_CONFIG))
    parser.update(overrides)
    return parser


def size_overrides(settings: dict, size: int) -> dict:
    """inference.yaml overrides for one volume size: 3D, the device, no trained records, then the user's."""
    device = settings["device"]
    return {
        "spatial_dims": 3,
        "image_size": [size] * 3,
        "device": f"$torch.device('{device}')",
        "modalities": dict(MODALITIES),
        "scale_factor": 1.0,
        "stages": None,  # the inferer samples with the network handed to it; no weight files are read
        "progress": False,
        "seed": settings["seed"],
        "amp": settings["amp"],
        **settings["config_overrides"],
    }


def resolved_settings(args: argparse.Namespace) -> dict:
    """Everything a size's run needs, as plain JSON (it travels to the child process)."""
    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = "cuda:0"
    config_overrides = {**(TINY if args.tiny else {}), **parse_set(args.set)}
    for key, value in (("sampler", args.sampler), ("num_inference_steps", args.steps),
                       ("guidance_scale", args.guidance_scale), ("decode_overlap", args.decode_overlap)):
        if value is not None:
            config_overrides[key] = value
    if args.decode_roi_size is not None:
        roi = [int(s) for s in args.decode_roi_size]
        config_overrides["decode_roi_size"] = roi * 3 if len(roi) == 1 else roi
    amp = torch.device(device).type == "cuda" if args.amp is None else bool(args.amp)
    parser = config_parser({"amp": amp, **config_overrides})
    keys = ("sampler", "num_inference_steps", "guidance_scale", "timestep_spacing", "prediction_type", "diffusion",
            "decode_roi_size", "decode_overlap", "modality", *ARCHITECTURE_KEYS)
    config = {key: parser[key] for key in keys}
    memory_limit = args.cpu_memory_limit_gb
    if memory_limit is None and torch.device(device).type == "cpu":
        memory_limit = round(0.8 * meminfo_mb().get("MemAvailable", 0) / 1024, 1) or None
    return {
        "device": device,
        "amp": amp,
        "seed": args.seed,
        "threads": args.threads,
        "warmup": torch.device(device).type == "cuda" if args.warmup is None else bool(args.warmup),
        "max_seconds_per_size": args.max_seconds_per_size,
        "grace_seconds": args.grace_seconds,
        "isolation": args.isolation,
        "cpu_memory_limit_gb": memory_limit if torch.device(device).type == "cpu" else None,
        "tiny": args.tiny,
        "config_overrides": config_overrides,
        "config": config,
    }


# ---- hardware and memory ------------------------------------------------------------------------------------------
def meminfo_mb() -> dict[str, float]:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                info[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict:
    import monai
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_total_mb": meminfo_mb().get("MemTotal"),
        "memory_available_mb": meminfo_mb().get("MemAvailable"),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu_name=props.name, gpu_memory_total_mb=props.total_memory / 2**20)
    return info


def resident_mb() -> float:
    """The current resident set of this process (/proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def describe_error(error: BaseException) -> str:
    """``Type: message`` of an exception and of what caused it (MONAI's config errors wrap the real one)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {str(error).strip()[:500]}")
        error = error.__cause__ or error.__context__
    return " <- caused by: ".join(parts)


def write_json(data: dict, path: Path) -> None:
    """Atomically (a temporary file, then rename): a run stopped from outside keeps the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---- one size -----------------------------------------------------------------------------------------------------
def decode_description(roi: list[int] | None, latent_spatial: list[int], downsample: int, overlap: float) -> str:
    if roi is None:
        return "whole latent at once"
    text = f"sliding window, roi {list(roi)} latent ({[r * downsample for r in roi]} image), overlap {overlap}"
    if any(r > s for r, s in zip(roi, latent_spatial)):
        text += " (the latent is smaller than the roi: SlidingWindowInferer pads it up to the roi)"
    return text


def measure_size(settings: dict, size: int, progress_path: Path | None = None) -> dict:
    """Generate one random mask of ``size``^3 with the bundle's inference path and measure it (see the module)."""
    import monai
    import torch

    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    device = torch.device(settings["device"])
    cap = float(settings["max_seconds_per_size"])
    config = settings["config"]
    row: dict[str, Any] = {
        "size": [size] * 3,
        "sampler": config["sampler"],
        "steps": config["num_inference_steps"],
        "guidance_scale": config["guidance_scale"],
        "amp": settings["amp"],
        "torch_threads": torch.get_num_threads(),
    }
    state: dict[str, Any] = {"active": False, "deadline": None, "steps_done": 0, "step_seconds": [],
                             "decoder_calls": 0, "sampling_s": None, "decoding_s": None, "start": None}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def progress() -> None:
        if progress_path is not None:
            write_json({k: state[k] for k in ("steps_done", "step_seconds", "decoder_calls", "sampling_s")} |
                       {"elapsed_s": time.perf_counter() - state["start"]}, progress_path)

    def check_deadline(what: str) -> None:
        if state["active"] and time.perf_counter() > state["deadline"]:
            raise OverTimeCap(f"the {cap:g} s cap passed before {what}")

    try:
        monai.utils.set_determinism(seed=settings["seed"])
        parser = config_parser(size_overrides(settings, size))
        from segdiff.engine.latent_inference import check_model_grid

        check_model_grid(parser.get_parsed_content("image_size"), config["autoencoder_channels"],
                         config["network_channels"])
        network = parser.get_parsed_content("network")
        inferer = parser.get_parsed_content("inferer")
        encode = parser.get_parsed_content("encode_mask")  # the bundle's EncodeMaskd
        sampler = inferer.sampler
        latent_shape = list(sampler.latent_shape([size] * 3))
        roi = None if sampler.decoder_inferer is None else list(sampler.decoder_inferer.roi_size)
        row.update(
            latent_shape=latent_shape,
            decode=decode_description(roi, latent_shape[1:], sampler.downsample, config["decode_overlap"]),
            decode_sliding_window=roi is not None,
            decode_roi_size=roi,
            parameters_m={
                "unet": sum(p.numel() for p in network.unet.parameters()) / 1e6,
                "controlnet": sum(p.numel() for p in network.controlnet.parameters()) / 1e6,
                "autoencoder": sum(p.numel() for p in sampler.autoencoder.parameters()) / 1e6,
            },
        )
        generator = torch.Generator().manual_seed(int(settings["seed"]))
        labels = torch.randint(0, int(config["num_classes"]), (1, size, size, size), generator=generator)
        mask = encode({"label": labels.float()})["label"]
        mask = monai.utils.convert_to_tensor(mask, track_meta=False)[None].to(device)  # as SamplingPrepareBatch

        # time the sampler's own two stages inside the one inferer call
        def timed(name: str, stage: str, fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                state["stage"] = stage
                result = fn(*args, **kwargs)  # a stage that fails or passes the cap has no seconds of its own
                sync()
                state[name] = time.perf_counter() - start
                return result
            return wrapper

        sampler.sample_latents = timed("sampling_s", "sampling", sampler.sample_latents)
        sampler.decode = timed("decoding_s", "decoding", sampler.decode)

        def before_network(module, args, kwargs):
            check_deadline(f"denoising step {state['steps_done'] + 1}")
            state["step_start"] = time.perf_counter()

        def after_network(module, args, kwargs, output):
            if state["active"]:
                sync()
                state["step_seconds"].append(time.perf_counter() - state["step_start"])
                state["steps_done"] += 1
                progress()

        def before_decoder(module, args):
            check_deadline(f"decoder call {state['decoder_calls'] + 1}")
            if state["active"]:
                state["decoder_calls"] += 1
                progress()

        network.register_forward_pre_hook(before_network, with_kwargs=True)
        network.register_forward_hook(after_network, with_kwargs=True)
        sampler.autoencoder.decoder.register_forward_pre_hook(before_decoder)

        if settings["warmup"]:  # one network call and one decode, untimed: CUDA kernels, cuDNN choices, allocator
            with torch.no_grad():
                noise = torch.randn((1, *latent_shape), device=device)
                t = torch.full((1,), 500, device=device, dtype=torch.long)
                labels_t = torch.full((1,), sampler.modality, device=device, dtype=torch.long)
                with torch.autocast(device.type, enabled=settings["amp"] and device.type == "cuda"):
                    network(noise, timesteps=t, class_labels=labels_t, controlnet_cond=mask)
                sampler.decode(noise)
            del noise
            state["sampling_s"] = state["decoding_s"] = None
        row["warmup"] = bool(settings["warmup"])

        if device.type == "cuda":
            sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            allocated_before = torch.cuda.memory_allocated(device)
        rss_before, peak_before = resident_mb(), peak_resident_mb()
        state.update(active=True, start=time.perf_counter(), cpu_start=time.process_time())
        state["deadline"] = state["start"] + cap
        image = inferer(mask, network)
        sync()
        total = time.perf_counter() - state["start"]
        state["active"] = False
        row.update(
            status="ok",
            output_shape=list(image.shape),
            output_finite=bool(torch.isfinite(image).all()),
            sampling_s=state["sampling_s"],
            decoding_s=state["decoding_s"],
            total_s=total,
            steps_done=state["steps_done"],
            decoder_calls=state["decoder_calls"],
        )
    except OverTimeCap as error:
        row.update(status="over time cap", reason=str(error))
    except Exception as error:  # noqa: BLE001 - recorded; the other sizes still run
        row.update(status="out of memory" if is_out_of_memory(error) else "error", error=describe_error(error))
        row["traceback"] = traceback.format_exc().splitlines()[-8:]
    if row["status"] != "ok":
        if state["active"]:
            row["stopped_in"] = state.get("stage")
        state["active"] = False
        row.update(steps_done=state["steps_done"], decoder_calls=state["decoder_calls"],
                   sampling_s=state["sampling_s"], decoding_s=state["decoding_s"])
        if state["start"] is not None:
            row["elapsed_s"] = time.perf_counter() - state["start"]
    if state["start"] is not None:  # this process's CPU seconds (all threads): what other load cannot inflate much
        row["process_cpu_s"] = time.process_time() - state["cpu_start"]
    if state["step_seconds"]:
        row["seconds_per_step"] = sum(state["step_seconds"]) / len(state["step_seconds"])
    if state["start"] is not None:  # memory of the generation (also of a failed one, up to where it stopped)
        if device.type == "cuda":
            row.update(peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                       peak_memory_growth_mb=(torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20,
                       peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20,
                       memory_kind="torch.cuda.max_memory_allocated (weights included; growth: minus what was "
                                   "allocated before)")
        else:
            peak = peak_resident_mb()
            row.update(peak_memory_mb=peak, peak_memory_growth_mb=peak - rss_before, rss_before_mb=rss_before,
                       memory_kind="peak RSS growth: resource.getrusage ru_maxrss after minus /proc/self/statm RSS "
                                   "before the generation" + (" (whole process)" if progress_path is None else ""))
            if peak <= peak_before:  # the peak was reached before the generation (import, build): an upper bound
                row["peak_memory_growth_upper_bound"] = True
    return row


def limit_address_space(limit_gb: float | None) -> None:
    if limit_gb:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(job_path: Path) -> int:
    """The child process of one size: read the job, measure, write the row."""
    job = json.loads(job_path.read_text())
    settings = job["settings"]
    limit_address_space(settings.get("cpu_memory_limit_gb"))
    row = measure_size(settings, int(job["size"]), Path(job["progress"]))
    write_json(row, Path(job["result"]))
    return 0


def run_child(command: list[str], result: Path, progress: Path, timeout: float) -> dict | None:
    """Run one size's child: its row, or a row saying why none came (killed at the hard cap, by a signal, crashed).
    Returns None fields the caller fills (size, settings)."""
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row = {"status": "over time cap", "reason": f"killed {timeout:.0f} s after the child started (the cap plus "
                                                    "--grace-seconds): one network or decoder call ran on past the cap"}
        completed = None
    else:
        row = json.loads(result.read_text()) if completed.returncode == 0 and result.exists() else None
        if row is None:
            tail = (completed.stderr or completed.stdout or "").strip().splitlines()[-6:]
            if completed.returncode < 0:
                name = signal.Signals(-completed.returncode).name
                status = "out of memory" if -completed.returncode == signal.SIGKILL else "error"
                row = {"status": status, "error": f"child killed by {name}" + (
                    " (most likely the kernel's OOM killer)" if status == "out of memory" else ""), "stderr_tail": tail}
            else:
                row = {"status": "error", "error": f"child exited with {completed.returncode}", "stderr_tail": tail}
    if row.get("status") != "ok" and progress.exists() and "steps_done" not in row:
        done = json.loads(progress.read_text())
        row.update(steps_done=done["steps_done"], decoder_calls=done["decoder_calls"], elapsed_s=done["elapsed_s"],
                   sampling_s=done.get("sampling_s"))
        if done["decoder_calls"]:
            row["stopped_in"] = "decoding"
        if done["step_seconds"]:
            row["seconds_per_step"] = sum(done["step_seconds"]) / len(done["step_seconds"])
    row.setdefault("wall_s_with_startup", time.perf_counter() - started)
    return row


def run_size(settings: dict, size: int, work: Path) -> dict:
    if settings["isolation"] == "none":
        return measure_size(settings, size)
    job = {"settings": settings, "size": size, "result": str(work / f"{size}.json"),
           "progress": str(work / f"{size}.progress.json")}
    job_path = work / f"{size}.job.json"
    write_json(job, job_path)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)]
    timeout = float(settings["max_seconds_per_size"]) + float(settings["grace_seconds"])
    row = run_child(command, Path(job["result"]), Path(job["progress"]), timeout)
    config = settings["config"]
    for key, value in (("size", [size] * 3), ("sampler", config["sampler"]), ("steps", config["num_inference_steps"]),
                       ("amp", settings["amp"])):
        row.setdefault(key, value)
    return row


# ---- the table ----------------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str | None = None) -> str:
    """A table cell: ``-`` for None; seconds with 2 decimals below 100, none above (or ``spec``)."""
    if value is None:
        return "-"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    return format(value, spec or (".2f" if abs(value) < 100 else ".0f"))


def status_text(row: dict) -> str:
    status = row["status"]
    if status == "over time cap":
        done = row.get("steps_done")
        text = f"over the {row.get('cap_s', 0):g} s cap"
        if done is not None:
            text += f" ({done}/{row['steps']} steps done"
            if row.get("seconds_per_step"):
                text += f", {row['seconds_per_step']:.1f} s/step"
            text += ")"
        if row.get("stopped_in") == "decoding":
            text += ", in decoding"
        return text
    if status == "out of memory":
        size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ ?[KMGT]iB)", row.get("error", ""))
        text = status
        if size:
            amount = f"{int(size[1]) / 2**30:.1f} GiB" if size[1] else size[2]
            text += f": tried to allocate {amount}"
        if row.get("stopped_in"):
            text += f" in {row['stopped_in']}" + (
                f" (step {row['steps_done'] + 1})" if row["stopped_in"] == "sampling" else "")
        return text
    if status == "error":
        return f"{status}: {row.get('error', '')[:120]}"
    return status


def table(report: dict) -> str:
    hw, settings = report["hardware"], report["settings"]
    cuda = report["hardware"].get("gpu_name")
    where = f"{hw['gpu_name']} ({hw['gpu_memory_total_mb']:.0f} MB)" if cuda else (
        f"{hw['cpu_model']}, {hw['cpu_cores']} cores, {hw['torch_threads']} torch threads")
    config = settings["config"]
    memory = "peak memory (MB, max_memory_allocated)" if cuda else "peak RSS growth (MB)"
    lines = [
        f"# {BUNDLE} 3D mask -> image on {settings['device']}: {where}; torch {hw['torch']}, MONAI {hw['monai']}, "
        f"amp {settings['amp']}",
        f"# networks: autoencoder {config['autoencoder_channels']}, UNet/ControlNet {config['network_channels']} "
        f"(attention {config['attention_levels']}), latent_channels {config['latent_channels']}, num_classes "
        f"{config['num_classes']}{' (--tiny)' if settings['tiny'] else ''}; weights {WEIGHTS_NOTE}",
        f"# data: {DATA_NOTE}; cap {settings['max_seconds_per_size']:g} s per size",
        f"| size | latent shape | sampler | steps | sampling (s) | decoding (s) | total s / volume | process CPU (s) "
        f"| {memory} | decoding | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        growth = row.get("peak_memory_mb") if cuda else row.get("peak_memory_growth_mb")
        lines.append(
            f"| {'x'.join(map(str, row['size']))} | {row.get('latent_shape', '-')} | {row['sampler']} | "
            f"{row['steps']} | "
            f"{fmt(row.get('sampling_s'))} | {fmt(row.get('decoding_s'))} | {fmt(row.get('total_s'))} | "
            f"{fmt(row.get('process_cpu_s'))} | {fmt(growth, '.0f')} | {row.get('decode', '-')} | {status_text(row)} |"
        )
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="volume edge lengths (S^3)")
    parser.add_argument("--device", help="cuda (default when available) or cpu")
    parser.add_argument("--sampler", help="ddpm | ddim | dpm_solver | euler (default: inference.yaml's, dpm_solver)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: inference.yaml's, 10)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: inference.yaml's, 1)")
    parser.add_argument("--decode-roi-size", type=int, nargs="+",
                        help="decode in sliding windows of this LATENT size (one edge or three; default: "
                             "inference.yaml's, null: the whole latent at once)")
    parser.add_argument("--decode-overlap", type=float, help="sliding-window overlap (default: inference.yaml's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast during denoising (default: on CUDA, as inference.yaml)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="one untimed network call and decode first (default: on CUDA only)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a test of the script, not a measurement)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an inference.yaml key (YAML value), e.g. network_channels=[32,64,64]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, OMP_NUM_THREADS)")
    parser.add_argument("--max-seconds-per-size", type=float, default=600.0,
                        help="a size still generating after this many seconds is reported as over the cap")
    parser.add_argument("--grace-seconds", type=float, default=180.0,
                        help="with --isolation process: the child is killed this long after the cap (imports, "
                             "building the networks, a call that runs on past the cap)")
    parser.add_argument("--isolation", choices=("process", "none"), default="process",
                        help="process: each size in a child process (own peak memory, survives running out of "
                             "memory); none: in this process")
    parser.add_argument("--cpu-memory-limit-gb", type=float,
                        help="address-space limit of each CPU child (default 80%% of MemAvailable at the start)")
    parser.add_argument("--output", type=Path, help="write the report as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def benchmark(args: argparse.Namespace, command: list[str] | None = None) -> dict:
    """Run every size and return the report (also written to ``--output`` after every size)."""
    settings = resolved_settings(args)
    report = {
        "schema": SCHEMA,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or [sys.executable, *sys.argv],
        "bundle": BUNDLE,
        "config": str(INFERENCE_CONFIG.relative_to(REPO)),
        "weights": WEIGHTS_NOTE,
        "data": DATA_NOTE,
        "hardware": hardware(settings["device"]),
        "settings": settings,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="benchmark_latent_") as work:
        for size in args.sizes:
            print(f"== {size}^3 on {settings['device']} ...", flush=True)
            row = run_size(settings, size, Path(work))
            row["cap_s"] = settings["max_seconds_per_size"]
            report["rows"].append(row)
            print(f"   {status_text(row)}: total {fmt(row.get('total_s'))} s", flush=True)
            if args.output:
                write_json(report, args.output)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    report = benchmark(args, None if argv is None else ["benchmark_latent.py", *argv])
    print(table(report))
    if args.output:
        write_json(report, args.output)
        print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
