"""Training objectives: the forward process (discrete DDPM or rectified flow), the loss weighting over timesteps
(none or min-SNR-gamma) and the losses that apply it.

A bundle config chooses them with three keys (``diffusion``, ``loss_weighting``, ``timestep_sampling``) and builds
``noise_scheduler = training_scheduler(...)``; :class:`segdiff.engine.ConditionalDiffusionPrepareBatch` draws the
timesteps and the per-sample loss weights, and :class:`DiffusionLoss` applies them.

Min-SNR-gamma (Hang et al., ICCV 2023) weights the loss of timestep t so that the implied loss on the clean sample is
``min(SNR(t), gamma)``: the easy, low-noise timesteps no longer dominate training. With ``SNR = alpha_bar / (1 -
alpha_bar)`` the weight on the network's own loss is ``min(SNR, gamma) / SNR`` for an epsilon network,
``min(SNR, gamma) / (SNR + 1)`` for a v network and ``min(SNR, gamma)`` for a sample (x0) network.

Segmentation (image_to_mask) adds :class:`SegmentationDiffusionLoss`: the same MSE plus, optionally, a Dice +
cross-entropy loss on the mask the network's output implies (its x0 prediction, Fu et al. 2023) and the condition
encoder's own segmentation loss (the anchor loss, MedSegDiff). :func:`check_segmentation_objective` refuses their
impossible settings with the key's name.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler, Scheduler

from segdiff.config import choice
from segdiff.errors import ConfigKeyError
from segdiff.transforms.mask import mask_probabilities

__all__ = [
    "DIFFUSIONS",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SEGMENTERS",
    "TIMESTEP_SAMPLINGS",
    "DiffusionLoss",
    "SegmentationDiffusionLoss",
    "check_objective",
    "check_segmentation_objective",
    "check_segmenter",
    "min_snr_weights",
    "predicted_x0",
    "training_scheduler",
    "x0_from_output",
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


# ---- the clean sample a network output implies ----------------------------------------------------------------
def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_output(
    output: torch.Tensor, noisy: torch.Tensor, alpha: Any, sigma: Any, prediction_type: str
) -> torch.Tensor:
    """The clean sample implied by a DDPM network's output at ``x_t = alpha x0 + sigma noise``: ``epsilon`` ->
    ``(x_t - sigma eps) / alpha``; ``v_prediction`` -> ``alpha x_t - sigma v``; ``sample`` -> the output itself.
    ``alpha`` and ``sigma`` are numbers or tensors that broadcast against ``output`` (one value per sample)."""
    choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return (noisy - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * noisy - sigma * output
    return output


def predicted_x0(
    scheduler: Scheduler, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean sample x0 implied by the network ``output`` at the noisy input ``noisy`` (x_t) and ``timesteps``.

    For a DDPM-style scheduler (``alphas_cumprod``): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and
    :func:`x0_from_output`. For MONAI's ``RFlowScheduler`` (x_t = (1 - s) x0 + s noise, s = t / T, the network
    predicting v = x0 - noise): x0 = x_t + s v, whatever ``prediction_type`` says. No clamping: the caller decides.
    """
    output, noisy = output.float(), noisy.float()
    if isinstance(scheduler, RFlowScheduler):
        s = _per_sample(timesteps.float() / scheduler.num_train_timesteps, output)
        return noisy + s * output
    abar = _per_sample(scheduler.alphas_cumprod.to(timesteps.device)[timesteps.long()], output)
    return x0_from_output(output, noisy, abar.sqrt(), (1.0 - abar).sqrt(), prediction_type)


# ---- image_to_mask: MSE, a segmentation loss on x0, the condition encoder's anchor loss -----------------------------
def _non_negative(key: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0:  # also NaN
        raise ConfigKeyError(f"'{key}' must be a number >= 0, got {value}.")
    return value


def _flag(key: str, value: Any) -> bool:
    # a command line's "--recycling false" arrives as the string 'false', which Python reads as true
    if not isinstance(value, bool):
        raise ConfigKeyError(f"'{key}' must be True or False, got {value!r} (on the command line: --{key} True).")
    return value


def check_segmentation_objective(
    mse_loss_weight: float = 1.0,
    x0_loss_weight: float = 0.0,
    anchor_loss_weight: float = 0.0,
    condition_encoder: bool = False,
    encoder_stop_gradient: bool = False,
    recycling: bool = False,
    prediction_type: str = "v_prediction",
    diffusion: str = "ddpm",
    encoder_features: bool = False,
) -> None:
    """Refuse (``ConfigKeyError``, naming the keys) loss settings of image_to_mask that train nothing or do not exist.

    - the flags are booleans (a command line's ``false`` would arrive as a string);
    - every weight is a number >= 0, and ``mse_loss_weight`` or ``x0_loss_weight`` is > 0 (something trains the
      diffusion network); ``anchor_loss_weight`` counts only with ``condition_encoder``;
    - ``encoder_stop_gradient`` needs the condition encoder and an ``anchor_loss_weight`` > 0 (otherwise nothing
      trains the encoder); ``encoder_features`` needs the condition encoder (they are its features);
    - ``recycling`` (Fu et al.) needs ``prediction_type: sample`` with ``diffusion: ddpm``: the model predicts the
      mask, whose re-noised prediction it is trained on against the truth. For epsilon or v the target implied by
      the truth at the recycled input carries 1 / sigma_t factors that blow up at low noise.
    """
    for key, flag in (("condition_encoder", condition_encoder), ("encoder_stop_gradient", encoder_stop_gradient),
                      ("recycling", recycling), ("encoder_features", encoder_features)):
        _flag(key, flag)
    mse = _non_negative("mse_loss_weight", mse_loss_weight)
    x0 = _non_negative("x0_loss_weight", x0_loss_weight)
    anchor = _non_negative("anchor_loss_weight", anchor_loss_weight)
    if mse == 0.0 and x0 == 0.0:
        raise ConfigKeyError(
            "'mse_loss_weight' and 'x0_loss_weight' are both 0: nothing trains the diffusion network; set one > 0."
        )
    if encoder_stop_gradient and not condition_encoder:
        raise ConfigKeyError("'encoder_stop_gradient' true needs 'condition_encoder' true (there is no encoder to stop).")
    if encoder_features and not condition_encoder:
        raise ConfigKeyError("'encoder_features' true needs 'condition_encoder' true (the features are the encoder's).")
    if condition_encoder and encoder_stop_gradient and anchor == 0.0:
        raise ConfigKeyError(
            "'encoder_stop_gradient' true with 'anchor_loss_weight' 0: nothing trains the condition encoder; set "
            "anchor_loss_weight > 0 or encoder_stop_gradient false."
        )
    if recycling and (prediction_type != "sample" or diffusion != "ddpm"):
        raise ConfigKeyError(
            "'recycling' true trains on the model's own re-noised mask prediction against the truth (Fu et al.) and "
            f"needs 'prediction_type' sample with 'diffusion' ddpm; got prediction_type {prediction_type!r}, "
            f"diffusion {diffusion!r}."
        )


def _unwrap(network: torch.nn.Module | None) -> torch.nn.Module | None:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


class SegmentationDiffusionLoss(torch.nn.Module):
    """image_to_mask's training loss: ``mse_loss_weight * MSE + x0_loss_weight * (Dice + CE)(x0) +
    anchor_loss_weight * DiceCE(encoder)``.

    - MSE: :class:`DiffusionLoss` on the loss target (noise, velocity or mask), with the prepare-batch's min-SNR
      weights.
    - x0 loss (Fu et al. 2023): the mask the output implies (:func:`predicted_x0` from the prepare-batch's noisy input
      and timesteps), read as probabilities ``p = clamp((x0 + 1) / 2, 0, 1)`` (the [-1, 1] one-hot encoding undone;
      no softmax, whose value at a perfect +-1 prediction is not one-hot and would pull against the MSE), scored
      against the truth ``y`` by MONAI's ``DiceLoss`` (background included, per sample) plus the cross-entropy
      ``-mean_voxels(sum_c y_c log(max(p_c, eps)))``. Not weighted by min-SNR: every timestep's predicted mask should
      be right. Where a prediction leaves [-1, 1] the clamp passes no gradient; the MSE still does.
    - anchor loss (MedSegDiff): MONAI's ``DiceCELoss(softmax=True)`` of the condition encoder's logits
      (``network.last_encoder_logits``, from the same forward pass) against the truth; needs ``network``, a
      :class:`segdiff.engine.ConditionEncoderDiffusion` (or DDP around one).

    With ``x0_loss_weight`` and ``anchor_loss_weight`` 0 (the defaults) it is exactly :class:`DiffusionLoss`.

    Args:
        prepare_batch: the :class:`segdiff.engine.ConditionalDiffusionPrepareBatch` that made the batch; its
            ``last_batch`` gives the loss weights, the noisy input, the timesteps and the truth.
        network: the trained network, for the anchor loss's encoder logits (None: no anchor loss).
        mse_loss_weight: weight of the MSE on the loss target.
        x0_loss_weight: weight of the Dice + CE loss on the predicted mask.
        anchor_loss_weight: weight of the condition encoder's DiceCE loss (ignored without a condition encoder).
        eps: the floor of the probabilities inside the logarithm.
    """

    def __init__(
        self,
        prepare_batch: Any = None,
        network: torch.nn.Module | None = None,
        mse_loss_weight: float = 1.0,
        x0_loss_weight: float = 0.0,
        anchor_loss_weight: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        has_encoder = hasattr(_unwrap(network), "last_encoder_logits")
        check_segmentation_objective(mse_loss_weight, x0_loss_weight, anchor_loss_weight, condition_encoder=has_encoder)
        self.prepare_batch = prepare_batch
        self.network = network
        self.mse_loss_weight = float(mse_loss_weight)
        self.x0_loss_weight = float(x0_loss_weight)
        self.anchor_loss_weight = float(anchor_loss_weight) if has_encoder else 0.0
        self.eps = float(eps)
        self.mse = DiffusionLoss(prepare_batch)
        self.dice = DiceLoss(include_background=True)
        self.anchor = DiceCELoss(softmax=True)
        self.last_terms: dict[str, torch.Tensor] = {}

    def _truth(self) -> torch.Tensor:
        last = getattr(self.prepare_batch, "last_batch", None) or {}
        if last.get("target") is None:
            raise RuntimeError(
                "SegmentationDiffusionLoss: the prepare-batch kept no 'target' in last_batch; use "
                "segdiff.engine.ConditionalDiffusionPrepareBatch, whose batch the loss must be called on."
            )
        return mask_probabilities(last["target"], "target")

    def x0_loss(self, prediction: torch.Tensor) -> torch.Tensor:
        """Dice + CE of the mask implied by ``prediction`` (the network output of the prepare-batch's last batch)."""
        last = self.prepare_batch.last_batch
        x0 = predicted_x0(self.prepare_batch.scheduler, prediction, last["noisy"], last["timesteps"],
                          self.prepare_batch.prediction_type)
        return self.segmentation_loss(x0, self._truth())

    def segmentation_loss(self, x0: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Dice + CE of a predicted one-hot mask ``x0`` in [-1, 1] against probabilities ``truth`` in [0, 1]."""
        p = ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        truth = truth.to(p.device, p.dtype)
        ce = -(truth * torch.log(p.clamp(min=self.eps))).sum(dim=1).mean()
        return self.dice(p, truth) + ce

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        if self.mse_loss_weight > 0:
            terms["mse"] = self.mse_loss_weight * self.mse(prediction, target)
        if self.x0_loss_weight > 0:
            terms["x0"] = self.x0_loss_weight * self.x0_loss(prediction)
        if self.anchor_loss_weight > 0:
            logits = _unwrap(self.network).last_encoder_logits
            if logits is None:
                raise RuntimeError("SegmentationDiffusionLoss: the network has not run yet (no encoder logits).")
            terms["anchor"] = self.anchor_loss_weight * self.anchor(logits.float(), self._truth().to(logits.device))
        self.last_terms = {k: v.detach() for k, v in terms.items()}  # each weighted term, for inspection
        return sum(terms.values())  # type: ignore[return-value]


#: what image_to_mask's inference writes as the segmentation: the diffusion ensemble, its condition encoder alone, or
#: both fused (the diffusion members plus the encoder's softmax as one more member)
SEGMENTERS = ("ensemble", "encoder", "both")


def check_segmenter(segmenter: str, condition_encoder: bool) -> str:
    """``segmenter`` if it is one of :data:`SEGMENTERS` and possible: ``encoder`` needs a model with a condition
    encoder (``condition_encoder`` true), and so does ``both``. Returns it."""
    choice("segmenter", segmenter, SEGMENTERS)
    _flag("condition_encoder", condition_encoder)
    if segmenter in ("encoder", "both") and not condition_encoder:
        what = "writes the condition encoder's own segmentation" if segmenter == "encoder" else (
            "fuses the condition encoder's softmax with the diffusion members")
        raise ConfigKeyError(
            f"'segmenter' {segmenter} {what}, but 'condition_encoder' is false "
            "(this model has none): use segmenter ensemble, or a model trained with --condition_encoder True."
        )
    return segmenter
