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
from segdiff.engine.objective import LOSS_WEIGHTINGS, check_segmentation_objective, min_snr_weights, predicted_x0

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
        network: the network being trained; needed for ``recycling`` only.
        recycling: Fu et al.'s recycling training (needs ``prediction_type`` sample and a DDPM scheduler): without
            gradient, the truth is noised to the last timestep T - 1, the network (given the condition as the
            inferer gives it) predicts the mask there, and that prediction, clamped to [-1, 1], is what the inferer
            noises at the batch's drawn timesteps; the loss target stays the truth. Training then sees inputs like
            those of sampling, which starts from pure noise, rather than noised truths only.

    After each call, ``last_batch`` holds the batch's ``timesteps``, ``noise``, ``loss_weights`` (None without
    weighting), the clean truth ``target`` and the noisy input ``noisy`` the inferer makes from them (None without a
    scheduler), for the losses.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        target_key: str = "image",
        condition_key: str | None = "label",
        scheduler: Scheduler | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        network: torch.nn.Module | None = None,
        recycling: bool = False,
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
        self.recycling = bool(recycling)
        if self.recycling:
            check_segmentation_objective(
                recycling=True, prediction_type=self.prediction_type, diffusion="rflow" if self.flow else "ddpm"
            )
            if scheduler is None or network is None:
                raise ValueError("recycling needs the training scheduler and the network (scheduler, network).")
        self.network = network
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
        noised = self.recycle(target, infer_kwargs.get("condition")) if self.recycling else target
        noisy = None if self.scheduler is None else self.scheduler.add_noise(noised, noise, timesteps)
        self.last_batch = {"timesteps": timesteps, "noise": noise, "loss_weights": weights, "target": target, "noisy": noisy}
        return noised, self.get_target(target, noise, timesteps), (), infer_kwargs

    @torch.no_grad()
    def recycle(self, target: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The network's mask prediction from the truth noised to the last timestep, without gradient: what the
        inferer noises instead of the truth under ``recycling`` (the loss target stays the truth)."""
        network = self.network.module if isinstance(self.network, torch.nn.parallel.DistributedDataParallel) else self.network
        last = torch.full((target.shape[0],), self.num_train_timesteps - 1, dtype=torch.long, device=target.device)
        noisy = self.scheduler.add_noise(target, self.get_noise(target), last)  # type: ignore[union-attr]
        model_input = noisy if condition is None else torch.cat([noisy, condition], dim=1)
        output = network(x=model_input, timesteps=last, context=None)  # type: ignore[misc]
        x0 = predicted_x0(self.scheduler, output, noisy, last, self.prediction_type)  # type: ignore[arg-type]
        return x0.clamp(-1.0, 1.0).to(target.dtype)


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
