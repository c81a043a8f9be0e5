"""Training objectives: the forward process (discrete DDPM or rectified flow), the loss weighting over timesteps
(none or min-SNR-gamma) and the loss that applies it.

A bundle config chooses them with three keys (``diffusion``, ``loss_weighting``, ``timestep_sampling``) and builds
``noise_scheduler = training_scheduler(...)``; :class:`segdiff.engine.ConditionalDiffusionPrepareBatch` draws the
timesteps and the per-sample loss weights, and :class:`DiffusionLoss` applies them.

Min-SNR-gamma (Hang et al., ICCV 2023) weights the loss of timestep t so that the implied loss on the clean sample is
``min(SNR(t), gamma)``: the easy, low-noise timesteps no longer dominate training. With ``SNR = alpha_bar / (1 -
alpha_bar)`` the weight on the network's own loss is ``min(SNR, gamma) / SNR`` for an epsilon network,
``min(SNR, gamma) / (SNR + 1)`` for a v network and ``min(SNR, gamma)`` for a sample (x0) network.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler, Scheduler

from segdiff.config import choice
from segdiff.errors import ConfigKeyError

__all__ = [
    "DIFFUSIONS",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "TIMESTEP_SAMPLINGS",
    "DiffusionLoss",
    "check_objective",
    "min_snr_weights",
    "training_scheduler",
]

#: the forward processes: ``ddpm`` (discrete, beta schedule) or ``rflow`` (rectified flow, MONAI's RFlowScheduler)
DIFFUSIONS = ("ddpm", "rflow")
LOSS_WEIGHTINGS = ("none", "min_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: how training timesteps are drawn: uniform, or (rectified flow only) logit-normal, denser at mid noise levels
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_objective(diffusion: str, prediction_type: str, loss_weighting: str = "none", timestep_sampling: str = "uniform") -> str:
    """Refuse (``ConfigKeyError``) unknown values and combinations that do not exist; returns ``diffusion``.

    A rectified flow trains the network on the flow velocity (target - noise) whatever else is set, so it needs
    ``prediction_type: v_prediction``; its timestep density (``timestep_sampling``) takes the role that min-SNR
    weighting plays for DDPM, so ``loss_weighting`` must stay ``none``; logit-normal timesteps are for rflow only.
    """
    choice("diffusion", diffusion, DIFFUSIONS)
    choice("prediction_type", prediction_type, PREDICTION_TYPES)
    choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
    if diffusion == "rflow":
        if prediction_type != "v_prediction":
            raise ConfigKeyError(
                "'diffusion' rflow trains the network to predict the flow velocity (target - noise): 'prediction_type' "
                f"must be v_prediction, got {prediction_type!r}."
            )
        if loss_weighting != "none":
            raise ConfigKeyError(
                f"'loss_weighting' {loss_weighting!r} is defined for diffusion ddpm only; for rflow choose the timestep "
                "density instead ('timestep_sampling' uniform or logit_normal) and keep loss_weighting none."
            )
    elif timestep_sampling != "uniform":
        raise ConfigKeyError(
            f"'timestep_sampling' {timestep_sampling!r} is for diffusion rflow; diffusion ddpm draws timesteps uniformly."
        )
    return diffusion


def training_scheduler(
    diffusion: str,
    *,
    prediction_type: str,
    num_train_timesteps: int,
    schedule: str,
    beta_start: float,
    beta_end: float,
    loss_weighting: str = "none",
    timestep_sampling: str = "uniform",
) -> Scheduler:
    """The training noise scheduler of a bundle: MONAI's ``DDPMScheduler`` with the beta schedule, or for ``rflow``
    MONAI's ``RFlowScheduler`` with integer timesteps (as the ``euler`` sampler steps them) drawn uniformly or
    logit-normally. Takes the bundle's ``noise_schedule`` mapping (``**@noise_schedule``)."""
    check_objective(diffusion, prediction_type, loss_weighting, timestep_sampling)
    if diffusion == "rflow":
        sample_method = "logit-normal" if timestep_sampling == "logit_normal" else "uniform"
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, use_discrete_timesteps=True, sample_method=sample_method)
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
    )


def min_snr_weights(scheduler: Scheduler, timesteps: torch.Tensor, prediction_type: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weights (shape of ``timesteps``) for a DDPM-style scheduler's ``alphas_cumprod``."""
    choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if gamma <= 0:
        raise ConfigKeyError(f"'min_snr_gamma' must be > 0, got {gamma}.")
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float64)[timesteps.long()]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1.0)
    else:
        weights = clipped
    return weights.float()


class DiffusionLoss(torch.nn.Module):
    """Mean squared error between the network output and the loss target, weighted per sample by the weights the
    prepare-batch drew with the batch's timesteps (``prepare_batch.last_batch["loss_weights"]``; none: plain MSE).

    The trainer and the validation metric call it right after ``prepare_batch`` made the batch, so the weights
    belong to that batch; the loss refuses a batch whose size does not match them.
    """

    def __init__(self, prepare_batch: Any = None) -> None:
        super().__init__()
        self.prepare_batch = prepare_batch

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        last = getattr(self.prepare_batch, "last_batch", None) or {}
        weights = last.get("loss_weights")
        if weights is None:
            return per_sample.mean()
        if weights.shape[0] != per_sample.shape[0]:
            raise RuntimeError(
                f"DiffusionLoss: {weights.shape[0]} loss weights for a batch of {per_sample.shape[0]}: the loss must be "
                "called on the batch its prepare_batch made last."
            )
        return (weights.to(per_sample.device) * per_sample).mean()
