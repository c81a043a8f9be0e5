"""Batch preparation for conditional diffusion: which key is noised (the target) and which is concatenated (the condition).

Mask -> image uses ``target_key="image", condition_key="label"``; image -> mask swaps them. Everything else in the
engine is shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, PrepareBatch
from monai.networks.schedulers import Scheduler

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
            (``"sample"``). None means epsilon.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        target_key: str = "image",
        condition_key: str | None = "label",
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_key)
        self.target_key = target_key
        self.prediction_type = getattr(scheduler, "prediction_type", "epsilon")
        self.scheduler = scheduler

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
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
        target = torch.as_tensor(batchdata[self.target_key]).to(device, non_blocking=non_blocking, **kwargs)
        noise = self.get_noise(target)
        timesteps = self.get_timesteps(target)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        if self.condition_name is not None:
            condition = torch.as_tensor(batchdata[self.condition_name]).to(device, non_blocking=non_blocking, **kwargs)
            infer_kwargs.update(condition=condition, mode="concat")
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
