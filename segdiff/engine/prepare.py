"""Batch preparation for conditional diffusion: which key is noised (the target) and which is concatenated (the condition).

Mask -> image uses ``target_key="image", condition_key="label"``; image -> mask swaps them. Everything else in the
engine is shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, PrepareBatch
from monai.networks.schedulers import RFlowScheduler, Scheduler
from monai.utils import convert_to_tensor

from segdiff.config import choice
from segdiff.engine.objective import LOSS_WEIGHTINGS, min_snr_weights

__all__ = ["ConditionalDiffusionPrepareBatch", "SamplingPrepareBatch"]


class ConditionalDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Training batches for :class:`monai.inferers.DiffusionInferer` in ``"concat"`` mode.

    Returns ``(target, loss_target, (), {"noise", "timesteps", "condition", "mode"})``: the inferer noises the target
    at random timesteps, concatenates the condition along channels and predicts the loss target (by default the
    noise).

    Args:
        num_train_timesteps: number of timesteps of the training noise schedule.
        target_key: batch key of the tensor being generated.
        condition_key: batch key of the conditioning tensor, or None for an unconditional model.
        scheduler: the training noise scheduler; its ``prediction_type`` decides the loss target: the noise
            (``"epsilon"``, default and Konz et al.'s), the velocity (``"v_prediction"``) or the clean target
            (``"sample"``). None means epsilon. A MONAI ``RFlowScheduler`` (``diffusion: rflow``) draws the timesteps
            itself (uniform or logit-normal) and the loss target is the flow velocity, target - noise.
        loss_weighting: ``"none"`` or ``"min_snr"``: per-sample loss weights ``min(SNR, min_snr_gamma)`` expressed for
            the prediction type (:func:`segdiff.engine.objective.min_snr_weights`), applied by
            :class:`segdiff.engine.DiffusionLoss`.
        min_snr_gamma: the clip of the signal-to-noise ratio (Hang et al.'s 5).

    After each call, ``last_batch`` holds the batch's ``timesteps``, ``noise`` and ``loss_weights`` (None without
    weighting) for the loss.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        target_key: str = "image",
        condition_key: str | None = "label",
        scheduler: Scheduler | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_key)
        self.target_key = target_key
        self.flow = isinstance(scheduler, RFlowScheduler)
        self.prediction_type = "v_prediction" if self.flow else getattr(scheduler, "prediction_type", "epsilon")
        self.scheduler = scheduler
        self.loss_weighting = choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if loss_weighting != "none" and (scheduler is None or self.flow):
            raise ValueError("loss_weighting 'min_snr' needs the DDPM training scheduler (its alphas_cumprod).")
        self.min_snr_gamma = float(min_snr_gamma)
        self.last_batch: dict[str, Any] = {}

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return self.scheduler.sample_timesteps(images)  # type: ignore[union-attr]
        return super().get_timesteps(images)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return images - noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)  # type: ignore[union-attr]
        if self.prediction_type == "sample":
            return images
        return noise

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        # plain tensors: MetaTensor's per-operation bookkeeping costs ~9% of a CPU training step and is not needed here
        target = convert_to_tensor(batchdata[self.target_key], track_meta=False).to(device, non_blocking=non_blocking, **kwargs)
        noise = self.get_noise(target)
        timesteps = self.get_timesteps(target)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        if self.condition_name is not None:
            condition = convert_to_tensor(batchdata[self.condition_name], track_meta=False).to(device, non_blocking=non_blocking, **kwargs)
            infer_kwargs.update(condition=condition, mode="concat")
        weights = None
        if self.loss_weighting == "min_snr":
            weights = min_snr_weights(self.scheduler, timesteps, self.prediction_type, self.min_snr_gamma)
        self.last_batch = {"timesteps": timesteps, "noise": noise, "loss_weights": weights}
        return target, self.get_target(target, noise, timesteps), (), infer_kwargs


class SamplingPrepareBatch(PrepareBatch):
    """Inference batches for :class:`segdiff.engine.ConditionalDiffusionSampler`.

    The condition (which also fixes the output grid) is the input; an optional real ``initial_key`` image is passed on
    for partial-noise sampling (``strength < 1``); an optional ``label_key`` becomes the evaluator's ``label`` (the
    reference that validation metrics compare the samples with).
    """

    def __init__(self, condition_key: str = "label", initial_key: str | None = None, label_key: str | None = None) -> None:
        self.condition_key = condition_key
        self.initial_key = initial_key
        self.label_key = label_key

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        condition = batchdata[self.condition_key].to(device, non_blocking=non_blocking, **kwargs)
        extra = {}
        if self.initial_key is not None:
            extra["initial"] = batchdata[self.initial_key].to(device, non_blocking=non_blocking, **kwargs)
        label = None if self.label_key is None else batchdata[self.label_key].to(device, non_blocking=non_blocking)
        return condition, label, (), extra
