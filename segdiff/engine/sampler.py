"""Conditional sampling: reverse diffusion with the condition concatenated at every step, in batched ensembles.

The sampler is a callable ``sampler(inputs, network)``, the signature MONAI evaluators and MONAI Label expect of an
inferer. ``inputs`` is the encoded condition on the case's own grid; the sampler resizes it to the model's
``image_size`` (slice by slice for a 2D model over a 3D volume), draws ``num_samples`` samples per case as one batch,
and resizes the samples back, so that outputs lie on the input grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from tqdm.auto import tqdm

from segdiff.engine.dpm_solver import TIMESTEP_SPACINGS, DPMSolverScheduler
from segdiff.engine.grid import from_network_units, resize, to_network_units

__all__ = ["CONDITION_KINDS", "DDPM_SAMPLERS", "SAMPLERS", "ConditionalDiffusionSampler", "EncoderMemberInferer", "build_scheduler"]

#: ``euler`` is MONAI's RFlowScheduler, for networks trained as rectified flows; the others for DDPM-trained networks
#: the samplers of a model trained with the discrete DDPM forward process (the bundles' ``noise_schedule``);
#: ``euler`` samples rectified-flow models only
DDPM_SAMPLERS = ("ddpm", "ddim", "dpm_solver")
SAMPLERS = ("ddpm", "ddim", "dpm_solver", "euler")
#: what the condition of a model is, which decides how it is resized to the model size (see ``grid.resize``)
CONDITION_KINDS = ("mask", "image")


def build_scheduler(
    sampler: str,
    *,
    num_train_timesteps: int,
    schedule: str,
    beta_start: float,
    beta_end: float,
    prediction_type: str,
    clip_sample: bool = True,
    timestep_spacing: str | None = None,
    diffusion: str = "ddpm",
) -> Scheduler:
    """A scheduler by name for the network's noise schedule and ``prediction_type`` (``"epsilon"``,
    ``"v_prediction"`` or ``"sample"``): MONAI's ``"ddpm"`` or ``"ddim"``, ``"dpm_solver"``
    (:class:`segdiff.engine.DPMSolverScheduler`, DPM-Solver++ 2M, 10-20 steps) or ``"euler"`` (MONAI's
    ``RFlowScheduler``, Euler steps of a rectified flow).

    The schedule has no defaults on purpose: bundle configs pass their one ``noise_schedule`` mapping
    (``**@noise_schedule``), the same that training's ``noise_scheduler`` is built from. A rectified flow has no beta
    schedule and its network predicts a velocity whatever ``prediction_type`` says: for ``"euler"`` only
    ``num_train_timesteps`` is used.

    Args:
        timestep_spacing: for ``"dpm_solver"``: ``"logsnr"`` (None, the default: uniform in log-SNR) or
            ``"time_uniform"``; checked for every sampler, used by ``"dpm_solver"`` only.
        diffusion: the forward process the network was trained with (the bundles' ``diffusion`` key): ``"ddpm"``
            networks are sampled by ddpm, ddim or dpm_solver; ``"rflow"`` networks by euler only.
    """
    from segdiff.config import choice
    from segdiff.engine.objective import DIFFUSIONS, PREDICTION_TYPES
    from segdiff.errors import ConfigKeyError

    choice("sampler", sampler, SAMPLERS)
    choice("diffusion", diffusion, DIFFUSIONS)
    choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if diffusion == "rflow" and sampler != "euler":
        raise ConfigKeyError(
            f"'sampler' {sampler!r} samples DDPM-trained models, but 'diffusion' is rflow (a rectified flow): use "
            "sampler euler, or diffusion ddpm for a model trained so."
        )
    if diffusion == "ddpm" and sampler == "euler":
        raise ConfigKeyError(
            f"'sampler' euler samples rectified-flow models, but 'diffusion' is ddpm: use one of "
            f"{', '.join(DDPM_SAMPLERS)}, or diffusion rflow for a model trained so."
        )
    if timestep_spacing is not None:
        choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if sampler == "euler":
        # integer timesteps, as a DiffusionModelUNet trained with RFlowScheduler.sample_timesteps saw them
        flow = RFlowScheduler(num_train_timesteps=num_train_timesteps, use_discrete_timesteps=True)
        flow.clip_sample = clip_sample  # MONAI's RFlow step has no clipping: the sampler clips the result to [-1, 1]
        return flow
    schedule_args = dict(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=clip_sample,
        prediction_type=prediction_type,
    )
    if sampler == "dpm_solver":
        return DPMSolverScheduler(**schedule_args, timestep_spacing=timestep_spacing or "logsnr")
    return (DDIMScheduler if sampler == "ddim" else DDPMScheduler)(**schedule_args)


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


class ConditionalDiffusionSampler:
    """Draw samples of a target (image or mask) given a condition (mask or image), on the condition's grid.

    MONAI's ``DiffusionInferer.sample`` denoises one batch from pure noise; this adds what volumes and ensembles
    need: slice-wise 2D sampling of 3D volumes, resizing to and from the model size, ensembles as one batch split
    into chunks of ``batch_size``, a start from a partially noised real image (``strength``), a seeded generator,
    autocast on CUDA and one progress bar across all chunks.

    Args:
        scheduler: a MONAI DDPM, DDIM or RFlow scheduler or a :class:`DPMSolverScheduler` (see :func:`build_scheduler`).
        num_inference_steps: denoising steps (1000 for full DDPM; 25-100 for DDIM; 10-20 for DPM-Solver; 10-30 for
            Euler on a rectified flow).
        target_channels: channels of the generated tensor (image channels, or encoded mask channels).
        spatial_dims: 2 or 3, the network's spatial dimensions.
        image_size: spatial size the network was trained on; the condition is resized to it and samples back.
            None runs the network on the case's own size (for models trained on random crops at native
            resolution), zero-padded up to a multiple of ``size_divisor`` and cropped back.
        num_samples: samples drawn per case (ensemble members), generated together.
        slice_axis: for a 2D network and 3D input, the spatial axis the volume is cut along.
        batch_size: network inputs per forward pass (slices x samples are split into chunks of this size).
        strength: 1.0 starts from pure noise; below 1, sampling starts from ``initial`` noised (by the scheduler's
            own ``add_noise``) to the first of its timesteps at or below ``strength * (num_train_timesteps - 1)``
            (SDEdit): lower keeps more of the real image.
        conditional: False for an unconditional model (``inputs`` then only gives the output grid).
        amp: autocast (bf16 where supported, else fp16) when running on CUDA.
        seed: seed of the sampling noise; every call restarts from it, so a case's samples do not depend on the order
            of the cases. None draws from torch's global generator.
        progress: show a progress bar.
        size_divisor: with ``image_size=None``, pad inputs to a multiple of this (2 ** (levels - 1) of the network).
        condition_kind: ``"mask"`` (an encoded mask: resized nearest) or ``"image"`` (resized like training images:
            linear with anti-aliasing). Samples go back to the case's grid by linear interpolation.
        model_record: a :class:`segdiff.engine.ModelRecord` with the weights' path: checked against the weights once
            before the first sample (MONAI Label loads the weights itself and skips the config's ``initialize``).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        num_inference_steps: int = 50,
        target_channels: int = 1,
        spatial_dims: int = 2,
        image_size: Sequence[int] | None = None,
        num_samples: int = 1,
        slice_axis: int = 2,
        batch_size: int = 16,
        strength: float = 1.0,
        conditional: bool = True,
        amp: bool = False,
        seed: int | None = 0,
        progress: bool = True,
        size_divisor: int = 1,
        condition_kind: str = "mask",
        model_record: Any = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if image_size is not None and len(image_size) != spatial_dims:
            raise ValueError(f"image_size {list(image_size)} must have {spatial_dims} entries for spatial_dims={spatial_dims}.")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}.")
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.target_channels = target_channels
        self.spatial_dims = spatial_dims
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.num_samples = int(num_samples)
        self.slice_axis = slice_axis
        self.batch_size = int(batch_size)
        self.strength = float(strength)
        self.conditional = conditional
        self.amp = amp
        self.seed = seed
        self.progress = progress
        self.size_divisor = max(int(size_divisor), 1)
        if condition_kind not in CONDITION_KINDS:
            raise ValueError(f"condition_kind must be one of {CONDITION_KINDS}, got {condition_kind!r}.")
        self.condition_kind = condition_kind
        self.model_record = model_record

    # -- grids ---------------------------------------------------------------------------------------------------
    def _model_size(self, case_size: Sequence[int]) -> tuple[int, ...]:
        if self.image_size is not None:
            return self.image_size
        return tuple(math.ceil(s / self.size_divisor) * self.size_divisor for s in case_size)

    def _to_model(self, x: torch.Tensor, model_size: Sequence[int], role: str) -> torch.Tensor:
        if self.image_size is not None:
            return resize(x, model_size, role)
        pad = []
        for have, want in zip(reversed(x.shape[2:]), reversed(model_size)):
            pad += [0, want - have]
        return F.pad(x, pad)  # zeros: an "unspecified" condition, a mid-grey start

    def _to_case(self, x: torch.Tensor, case_size: Sequence[int]) -> torch.Tensor:
        if self.image_size is not None:
            return resize(x, case_size, "probabilities")
        return x[(slice(None), slice(None), *[slice(0, s) for s in case_size])]

    # -- sampling ------------------------------------------------------------------------------------------------
    def _timesteps(self, device: torch.device) -> torch.Tensor:
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        if isinstance(self.scheduler, DDIMScheduler):
            # MONAI's DDIM spaces timesteps by linspace (999, 979, 958, ...) but steps from t to t - T // n; use the
            # timesteps that step rule agrees with: (n - 1) * T // n, ..., T // n, 0 (980, 960, ..., 0 for 50 steps,
            # the spacing of diffusers' and Konz et al.'s DDIM).
            stride = self.scheduler.num_train_timesteps // self.num_inference_steps
            self.scheduler.timesteps = torch.arange(self.num_inference_steps - 1, -1, -1, device=device) * stride
        # DPM-Solver and RFlow keep the timesteps of their own set_timesteps
        timesteps = self.scheduler.timesteps
        if self.strength < 1.0:
            start = int(round(self.strength * (self.scheduler.num_train_timesteps - 1)))
            kept = timesteps[timesteps <= start]
            if len(kept) == 0:
                raise ValueError(
                    f"strength {self.strength} starts at timestep {start}, below the lowest of the sampler's "
                    f"{self.num_inference_steps} timesteps ({int(timesteps.min())}): raise strength or "
                    "num_inference_steps."
                )
            timesteps = kept
        return timesteps

    @torch.no_grad()
    def denoise(
        self,
        condition: torch.Tensor | None,
        network: torch.nn.Module,
        noise: torch.Tensor,
        initial: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress_bar: tqdm | None = None,
    ) -> torch.Tensor:
        """Run the reverse process for one chunk, from ``noise`` (N, target_channels, *spatial)."""
        device = next(network.parameters()).device
        timesteps = self._timesteps(device)
        x = noise.to(device)
        if self.strength < 1.0:
            if initial is None:
                raise ValueError("strength < 1 needs a real image to start from (the 'initial' input).")
            x = self.scheduler.add_noise(initial.to(device, torch.float32), x, timesteps[:1].repeat(x.shape[0]))
        flow = isinstance(self.scheduler, RFlowScheduler)
        for i, t in enumerate(timesteps):
            model_input = x if condition is None else torch.cat([x, condition], dim=1)
            # integer timesteps stay integers (DDPM, DDIM, DPM-Solver, discrete RFlow); a continuous-time RFlow's go
            # to the network as float32, as DiffusionInferer passes them
            dtype = torch.float32 if t.is_floating_point() else t.dtype
            t_batch = torch.full((x.shape[0],), t.item(), dtype=dtype, device=device)
            with _autocast(device, self.amp):
                output = network(model_input, timesteps=t_batch)
            if flow:
                # Euler steps from t to the next timestep, the last one to 0 (the data), as DiffusionInferer does
                next_t = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)
                x, _ = self.scheduler.step(output.float(), t, x, next_t)
            else:
                x, _ = self.scheduler.step(output.float(), int(t), x, generator=generator)
            if progress_bar is not None:
                progress_bar.update(1)
        if flow and getattr(self.scheduler, "clip_sample", False):
            x = x.clamp(-1.0, 1.0)  # the data range, as the DDPM-family schedulers' clip_sample keeps x0
        return x

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, initial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sample ``num_samples`` targets for every case of a batch.

        Args:
            inputs: (B, C_condition, *spatial), the encoded condition on each case's grid.
            network: the diffusion network (its first ``target_channels`` input channels are the noisy target).
            initial: (B, target_channels, *spatial) real targets to start from when ``strength < 1``.

        Returns:
            (B, num_samples * target_channels, *spatial) with the input's metadata (affine, file name), samples
            ordered sample-major: channels ``[k * target_channels, (k + 1) * target_channels)`` hold sample ``k``.
        """
        if self.model_record is not None:
            self.model_record.verify_once(network)
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        generator = None if self.seed is None else torch.Generator(device=device)
        cases = [to_network_units(torch.as_tensor(c), self.spatial_dims, self.slice_axis) for c in inputs]
        units_total = sum(c.shape[0] for c in cases) * self.num_samples
        num_steps = len(self._timesteps(device))
        bar = tqdm(
            total=math.ceil(units_total / self.batch_size) * num_steps,
            desc=f"sampling {len(cases)} case(s) x {self.num_samples} sample(s)",
            disable=not self.progress,
            leave=False,
        )
        outputs = []
        try:
            for index, units in enumerate(cases):
                case_size = units.shape[2:]
                model_size = self._model_size(case_size)
                num_units = units.shape[0] * self.num_samples
                condition = None
                if self.conditional:
                    condition = self._to_model(units.float(), model_size, self.condition_kind).to(device)
                    condition = condition.repeat_interleave(self.num_samples, dim=0)
                start = None
                if initial is not None:
                    start = to_network_units(torch.as_tensor(initial[index]).float(), self.spatial_dims, self.slice_axis)
                    start = self._to_model(start, model_size, "image").repeat_interleave(self.num_samples, dim=0)
                if generator is not None:
                    generator.manual_seed(int(self.seed))  # each case from the seed: independent of the others
                # all of a case's noise at once, so that chunking (a memory setting) cannot change the samples
                noise = torch.randn((num_units, self.target_channels, *model_size), generator=generator, device=device)
                samples = []
                for lo in range(0, num_units, self.batch_size):
                    hi = min(lo + self.batch_size, num_units)
                    samples.append(
                        self.denoise(
                            None if condition is None else condition[lo:hi],
                            network,
                            noise[lo:hi],
                            None if start is None else start[lo:hi],
                            generator,
                            bar,
                        )
                    )
                out = self._to_case(torch.cat(samples).float(), case_size)
                # (N * S, C, ...) -> S x (N, C, ...) -> S x (C, *case) -> (S * C, *case)
                out = out.reshape(units.shape[0], self.num_samples, *out.shape[1:]).transpose(0, 1)
                out = torch.cat(
                    [from_network_units(m, inputs[index].ndim, self.spatial_dims, self.slice_axis) for m in out], dim=0
                )
                outputs.append(out)
        finally:
            bar.close()
            network.train(was_training)
        result = torch.stack(outputs).to(inputs.device)
        if isinstance(inputs, MetaTensor):
            result = MetaTensor(result, meta=inputs.meta, applied_operations=inputs.applied_operations)
            result.is_batch = inputs.is_batch
        return result


class EncoderMemberInferer:
    """``inferer(inputs, network)``: the diffusion members of ``ensemble`` followed by one more member, the condition
    encoder's softmax (``encoder``, a :class:`segdiff.evaluation.SegmenterInferer` with ``as_target_encoding``), as
    ``(B, (K + 1) * C, *spatial)``, so the ensemble post-transforms fuse and measure all ``K + 1`` together.

    Fu et al. (REFERENCE.md 6a) ensemble the diffusion segmenter with the plain segmenter it contains. The encoder's
    soft probabilities also temper the near-binary diffusion members where they agree on a wrong class (calibration).
    """

    def __init__(self, ensemble: Any, encoder: Any) -> None:
        self.ensemble = ensemble
        self.encoder = encoder

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        members = self.ensemble(inputs, network)
        encoder = torch.as_tensor(self.encoder(inputs, network)).to(device=members.device, dtype=members.dtype)
        if encoder.shape[0] != members.shape[0] or encoder.shape[2:] != members.shape[2:]:
            raise ValueError(f"the encoder's output {tuple(encoder.shape)} does not match the ensemble's "
                             f"{tuple(members.shape)} (batch and spatial sizes must agree)")
        out = torch.cat([torch.as_tensor(members), encoder], dim=1)
        if isinstance(members, MetaTensor):
            out = MetaTensor(out, meta=members.meta, applied_operations=members.applied_operations)
            out.is_batch = members.is_batch
        return out
