"""Stage 1 of latent diffusion: training MONAI's ``AutoencoderKL`` (a KL-regularised VAE) on images of every modality.

The pieces a bundle config composes (``bundles/latent_mask_to_image/configs/train_autoencoder.yaml``):

- :class:`AutoencoderLoss`: L1 reconstruction + ``kl_weight`` x KL divergence (:func:`kl_divergence`), plus an optional
  perceptual term that only runs on weights read from a local file (:func:`build_perceptual_loss`: nothing is ever
  downloaded at run time);
- :class:`AutoencoderTrainingStep`: one training iteration for MONAI's ``SupervisedTrainer`` (its ``iteration_update``):
  the autoencoder's step, and, once ``adversarial_warmup_steps`` iterations are done, a least-squares patch-GAN term
  (MONAI's ``PatchDiscriminator`` and ``PatchAdversarialLoss``) with the discriminator's own optimizer step;
- :class:`ReconstructionMetricsHandler` / :func:`reconstruction_metrics`: PSNR and SSIM of the reconstructions per
  modality (the datalist entries' ``"modality"``), as ``{modality: {"psnr": ..., "ssim": ...}}``;
- :func:`latent_scale_factor` and :class:`LatentScaleFactor`: ``1 / std`` of the latent means over training batches
  (the latent diffusion convention: the diffusion model then sees latents of unit variance), written into the
  autoencoder's record (``models/autoencoder.json``, key ``latent``) where the later stages read it
  (:func:`read_latent_scale_factor`).

Why not ``monai.engines.AdversarialTrainer``: it hands the generator's whole output to the discriminator (AutoencoderKL
returns a tuple: reconstruction, z_mu, z_sigma, and the KL term needs the latter two), passes only the reconstruction
to the reconstruction loss, and trains the discriminator from the first iteration, with no warm-up. A step function for
``SupervisedTrainer`` keeps MONAI's trainer, events and handlers and adds exactly the warm-up and the second optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys

from segdiff.errors import ConfigKeyError

__all__ = [
    "LOSS_TERMS",
    "AutoencoderLoss",
    "AutoencoderTrainingStep",
    "LatentScaleFactor",
    "ModalityReconstructionMetrics",
    "ReconstructionInferer",
    "ReconstructionMetricsHandler",
    "ReconstructionPrepareBatch",
    "build_perceptual_loss",
    "check_perceptual_weights",
    "image_entries",
    "kl_divergence",
    "latent_scale_factor",
    "loss_terms",
    "modalities_of",
    "read_latent_scale_factor",
    "reconstruction_metrics",
    "write_latent_scale_factor",
]

logger = logging.getLogger(__name__)

#: the per-term losses a training iteration reports (``engine.state.output["losses"]``, TensorBoard tags)
LOSS_TERMS = ("recon_loss", "kl_loss", "perceptual_loss", "generator_loss", "discriminator_loss")

#: the only PerceptualLoss network MONAI 1.6.1 loads from a local file (``pretrained_path``); the others fetch
#: their weights: alex/vgg/squeeze through the lpips package, radimagenet/medicalnet through torch.hub
LOCAL_PERCEPTUAL_NETWORKS = ("resnet50",)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


# -- losses -------------------------------------------------------------------------------------------------------


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(z_mu, z_sigma^2)`` from ``N(0, 1)``: summed over the latent dimensions (channels and
    space), averaged over the batch: ``mean_b 0.5 * sum(mu^2 + sigma^2 - log(sigma^2) - 1)``. Computed in float32."""
    mu, sigma = z_mu.float(), z_sigma.float()
    per_element = mu.pow(2) + sigma.pow(2) - 2.0 * torch.log(sigma) - 1.0
    return 0.5 * per_element.flatten(start_dim=1).sum(dim=1).mean()


def check_perceptual_weights(
    perceptual_weight: float, perceptual_weights: str | os.PathLike | None, perceptual_network: str = "resnet50"
) -> None:
    """Refuse a perceptual term whose network weights are not in a local file, before any data is cached.

    MONAI's ``PerceptualLoss`` downloads its weights when built without a local file; training never downloads
    anything, so ``perceptual_weight > 0`` needs ``perceptual_weights``: a torchvision ResNet-50 state dict on disk (the
    only network MONAI 1.6.1 loads from a file). ``perceptual_weight`` 0 (the default) needs nothing.
    """
    if perceptual_weight is None or float(perceptual_weight) == 0.0:
        return
    if float(perceptual_weight) < 0:
        raise ConfigKeyError(f"perceptual_weight must be >= 0 (0 = no perceptual term), found {perceptual_weight}")
    if perceptual_network not in LOCAL_PERCEPTUAL_NETWORKS:
        raise ConfigKeyError(
            f"perceptual_network {perceptual_network!r} cannot load local weights in MONAI's PerceptualLoss (its "
            "weights are downloaded at run time, which training never does); use one of "
            f"{list(LOCAL_PERCEPTUAL_NETWORKS)} with perceptual_weights, or set perceptual_weight: 0."
        )
    if not perceptual_weights:
        raise ConfigKeyError(
            f"perceptual_weight is {perceptual_weight} but perceptual_weights is not set: the perceptual loss needs "
            "its network's pretrained weights in a local file (training never downloads them). Set perceptual_weights "
            f"to a torchvision {perceptual_network} state dict on disk (e.g. --perceptual_weights "
            "/models/resnet50.pth), or set perceptual_weight: 0 to train without the perceptual term."
        )
    if not Path(perceptual_weights).is_file():
        raise ConfigKeyError(
            f"perceptual_weights: no file at {perceptual_weights} (looked for {Path(perceptual_weights).resolve()}); "
            "give the local weights file of the perceptual network, or set perceptual_weight: 0."
        )
    try:
        import torchvision  # noqa: F401  (MONAI's ResNet-50 perceptual network is torchvision's)
    except ImportError as e:
        raise ConfigKeyError(
            "perceptual_weight > 0 with perceptual_network resnet50 needs torchvision (pip install torchvision "
            "matching your torch), or set perceptual_weight: 0."
        ) from e


def build_perceptual_loss(
    spatial_dims: int,
    perceptual_weights: str | os.PathLike | None,
    perceptual_network: str = "resnet50",
    state_dict_key: str | None = None,
    fake_3d_ratio: float = 0.5,
) -> torch.nn.Module:
    """MONAI's ``PerceptualLoss`` on a ResNet-50 whose weights are read from ``perceptual_weights`` (a local file);
    refuses (:func:`check_perceptual_weights`) anything that would download. 3D images use MONAI's 2.5D form (2D
    features of ``fake_3d_ratio`` of the slices along each axis)."""
    check_perceptual_weights(1.0, perceptual_weights, perceptual_network)
    from monai.losses import PerceptualLoss

    return PerceptualLoss(
        spatial_dims=spatial_dims,
        network_type=perceptual_network,
        is_fake_3d=spatial_dims == 3,
        fake_3d_ratio=fake_3d_ratio,
        pretrained=True,
        pretrained_path=str(perceptual_weights),
        pretrained_state_dict_key=state_dict_key,
    )


class AutoencoderLoss(torch.nn.Module):
    """The autoencoder's loss without the adversarial term: ``L1 + kl_weight * KL (+ perceptual_weight * perceptual)``.

    Called as ``loss(output, target)`` with ``output`` what ``AutoencoderKL.forward`` returns (reconstruction, z_mu,
    z_sigma), so it also serves as a plain ``SupervisedTrainer`` loss; :meth:`terms` gives each term.

    Args:
        kl_weight: weight of the KL divergence (:func:`kl_divergence`); small (1e-6 in the MONAI LDM tutorials' range)
            so the latents stay informative.
        spatial_dims: 2 or 3 (the perceptual network's form).
        perceptual_weight: weight of the perceptual term; 0 (default) = none.
        perceptual_weights: local file of the perceptual network's weights (needed when ``perceptual_weight`` > 0;
            see :func:`check_perceptual_weights`).
        perceptual_network: MONAI ``PerceptualLoss`` network type; only ``"resnet50"`` loads local weights.
        perceptual_state_dict_key: the entry of ``perceptual_weights`` holding the state dict, if it is nested.
        image_range: the images' intensity range (the bundle scales to [-1, 1]); the perceptual network sees them
            mapped to [0, 1], one channel at a time.
        perceptual: an already built perceptual loss ``(input, target) -> scalar`` used instead of building one.
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        spatial_dims: int = 2,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | os.PathLike | None = None,
        perceptual_network: str = "resnet50",
        perceptual_state_dict_key: str | None = None,
        image_range: Sequence[float] = (-1.0, 1.0),
        perceptual: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ConfigKeyError(f"kl_weight must be >= 0, found {kl_weight}")
        self.kl_weight = float(kl_weight)
        self.perceptual_weight = float(perceptual_weight or 0.0)
        self.image_range = (float(image_range[0]), float(image_range[1]))
        if self.perceptual_weight > 0 and perceptual is None:
            perceptual = build_perceptual_loss(
                spatial_dims, perceptual_weights, perceptual_network, state_dict_key=perceptual_state_dict_key
            )
        elif self.perceptual_weight < 0:
            raise ConfigKeyError(f"perceptual_weight must be >= 0 (0 = no perceptual term), found {perceptual_weight}")
        self.perceptual = perceptual if self.perceptual_weight > 0 else None

    def _perceptual(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        low, high = self.image_range
        x, y = (reconstruction.float() - low) / (high - low), (target.float() - low) / (high - low)
        # the ImageNet networks take 1 channel (repeated to RGB) or 3: score multi-channel images channel by channel
        return torch.stack([self.perceptual(x[:, c : c + 1], y[:, c : c + 1]) for c in range(x.shape[1])]).mean()

    def terms(self, output: Sequence[torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"recon_loss", "kl_loss", "perceptual_loss", "loss"}``: the unweighted terms and their weighted sum."""
        reconstruction, z_mu, z_sigma = output[0], output[1], output[2]
        recon = torch.nn.functional.l1_loss(reconstruction.float(), target.float())
        kl = kl_divergence(z_mu, z_sigma)
        perceptual = self._perceptual(reconstruction, target) if self.perceptual is not None else recon.new_zeros(())
        total = recon + self.kl_weight * kl + self.perceptual_weight * perceptual
        return {"recon_loss": recon, "kl_loss": kl, "perceptual_loss": perceptual, "loss": total}

    def forward(self, output: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return self.terms(output, target)["loss"]


# -- training -----------------------------------------------------------------------------------------------------


class ReconstructionPrepareBatch:
    """``prepare_batch`` for autoencoders: the image is both input and target (other keys, e.g. masks or file names,
    stay in the batch and are not moved)."""

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(self, batchdata: Mapping[str, Any], device: Any = None, non_blocking: bool = False, **kwargs):
        image = batchdata[self.image_key] if isinstance(batchdata, Mapping) else batchdata
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        return image, image


class ReconstructionInferer(Inferer):
    """Deterministic reconstruction for validation: decode the latent mean (``AutoencoderKL.reconstruct``), not a
    sample of the posterior."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _unwrap(network).reconstruct(inputs)


def loss_terms(output: Any, loss_tag: str | None = "train_loss") -> dict[str, float] | None:
    """The per-term losses of a training iteration's output (:data:`LOSS_TERMS`) and, under ``loss_tag``, the total:
    ``TensorBoardStatsHandler``'s ``output_transform`` for :class:`AutoencoderTrainingStep`'s trainer."""
    if isinstance(output, Sequence) and not isinstance(output, str) and output:
        output = output[0]
    if not isinstance(output, Mapping) or "losses" not in output:
        return None
    terms = dict(output["losses"])
    if loss_tag and Keys.LOSS in output:
        terms[loss_tag] = float(torch.as_tensor(output[Keys.LOSS]).detach())
    return terms


class AutoencoderTrainingStep:
    """One training iteration of an autoencoder, optionally with a patch-GAN discriminator: pass it as
    ``iteration_update`` of MONAI's ``SupervisedTrainer`` (network = the ``AutoencoderKL``, optimizer = its optimizer,
    loss_function = :class:`AutoencoderLoss`, prepare_batch = :class:`ReconstructionPrepareBatch`).

    Each iteration: the autoencoder reconstructs the batch (a posterior sample is decoded); its loss is the
    :class:`AutoencoderLoss` plus, once more than ``adversarial_warmup_steps`` iterations are done,
    ``adversarial_weight`` x the generator's least-squares adversarial loss; the autoencoder's optimizer steps. Then,
    from the same iteration on, the discriminator gets its own step on real images and the (detached) reconstructions.
    Before that the discriminator is neither run nor changed: the autoencoder first learns to reconstruct, so the
    discriminator does not win from the start. Iterations count across a resumed run (``engine.state.iteration``).

    The output (``engine.state.output``) holds MONAI's ``image``, ``label``, ``pred`` (the reconstruction) and ``loss``
    (the autoencoder's total), and ``losses``: :data:`LOSS_TERMS` as floats (unweighted; 0 where a term is off).

    Args:
        discriminator: e.g. ``monai.networks.nets.PatchDiscriminator``; None: no adversarial term.
        discriminator_optimizer: the discriminator's optimizer (needed with a discriminator).
        adversarial_weight: weight of the generator's adversarial loss; 0 = no adversarial term.
        adversarial_warmup_steps: iterations trained without the adversarial term (and without discriminator steps).
        adversarial_loss: default ``PatchAdversarialLoss(criterion="least_squares")``; the discriminator minimises
            ``0.5 * (loss(real, real) + loss(fake, fake))``.
    """

    def __init__(
        self,
        discriminator: torch.nn.Module | None = None,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        adversarial_weight: float = 0.0,
        adversarial_warmup_steps: int = 0,
        adversarial_loss: torch.nn.Module | None = None,
    ) -> None:
        from monai.losses import PatchAdversarialLoss

        if adversarial_weight is None or adversarial_weight < 0:
            raise ConfigKeyError(
                f"adversarial_weight must be >= 0 (0 = no adversarial term), found {adversarial_weight}"
            )
        if adversarial_warmup_steps is None or int(adversarial_warmup_steps) < 0:
            raise ConfigKeyError(f"adversarial_warmup_steps must be an integer >= 0, found {adversarial_warmup_steps}")
        if adversarial_weight > 0 and (discriminator is None or discriminator_optimizer is None):
            raise ConfigKeyError(
                f"adversarial_weight is {adversarial_weight} but no discriminator (and its optimizer) is given; "
                "set adversarial_weight: 0 to train without the adversarial term."
            )
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_warmup_steps = int(adversarial_warmup_steps)
        self.adversarial_loss = adversarial_loss or PatchAdversarialLoss(criterion="least_squares")
        self._discriminator_scaler: Any = None

    def adversarial_active(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (1-based, as Ignite counts) trains with the adversarial term."""
        enabled = self.adversarial_weight > 0 and self.discriminator is not None
        return enabled and iteration > self.adversarial_warmup_steps

    @staticmethod
    def _autocast(engine: Engine):
        return torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext()

    @staticmethod
    def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.discriminator(images.float().contiguous())[-1]  # PatchDiscriminator: features..., logits

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        active = self.adversarial_active(engine.state.iteration)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        scaler = engine.scaler if engine.amp else None

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with self._autocast(engine):
            output = engine.inferer(inputs, engine.network)
            reconstruction = output[0]
            engine.state.output[Keys.PRED] = reconstruction
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function.terms(output, targets)
            generator = reconstruction.new_zeros((), dtype=torch.float32)
            if active:
                logits = self._logits(reconstruction)
                generator = self.adversarial_loss(logits, target_is_real=True, for_discriminator=False)
            loss = terms["loss"] + self.adversarial_weight * generator
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self._step(loss, engine.optimizer, scaler)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        discriminator = torch.zeros(())
        if active:
            if scaler is not None and self._discriminator_scaler is None:
                self._discriminator_scaler = torch.amp.GradScaler("cuda")
            self.discriminator.train()
            self.discriminator_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with self._autocast(engine):
                fake_logits, real_logits = self._logits(reconstruction.detach()), self._logits(inputs.detach())
                fake = self.adversarial_loss(fake_logits, target_is_real=False, for_discriminator=True)
                real = self.adversarial_loss(real_logits, target_is_real=True, for_discriminator=True)
                discriminator = 0.5 * (fake + real)
            self._step(discriminator, self.discriminator_optimizer, self._discriminator_scaler)
        engine.state.output[Keys.PRED] = reconstruction.detach()
        values = {**terms, "generator_loss": generator, "discriminator_loss": discriminator}
        engine.state.output["losses"] = {k: float(values[k].detach()) for k in LOSS_TERMS}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


# -- data ---------------------------------------------------------------------------------------------------------


def image_entries(
    entries: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    modality_key: str = "modality",
    split: str = "training",
    datalist_name: str = "datalist",
) -> list[dict[str, Any]]:
    """The entries an autoencoder trains on: the image and its modality only (labels are not read: the autoencoder
    learns the images of every modality, annotated or not). Every entry needs a non-empty string ``modality_key``:
    validation scores each modality apart. Raises ``DatalistError`` naming each entry without one."""
    from segdiff.data.datalist import DatalistError

    missing = [
        index
        for index, entry in enumerate(entries)
        if not isinstance(entry.get(modality_key), str) or not entry.get(modality_key).strip()
    ]
    if missing:
        shown = ", ".join(f"{split}[{i}]" for i in missing[:5])
        shown += f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatalistError(
            f"{datalist_name}: expected a {modality_key!r} name (e.g. \"ct\", \"t1\") in every entry, missing in "
            f"{shown}; add it to those entries (the autoencoder is scored per modality)."
        )
    return [{image_key: entry[image_key], modality_key: entry[modality_key].strip()} for entry in entries]


def modalities_of(entries: Sequence[Mapping[str, Any]], modality_key: str = "modality") -> list[str]:
    """The sorted distinct modality names of ``entries``."""
    return sorted({str(entry[modality_key]) for entry in entries if modality_key in entry})


# -- validation: reconstruction quality per modality --------------------------------------------------------------


class ModalityReconstructionMetrics:
    """PSNR and SSIM (MONAI's ``PSNRMetric`` and ``SSIMMetric``) of reconstructions, accumulated per modality.

    Args:
        spatial_dims: 2 or 3.
        data_range: the images' intensity range (2.0 for images scaled to [-1, 1]); PSNR's peak and SSIM's range.
        ssim_window_size: SSIM's Gaussian window (MONAI's default 11); every image axis must be at least this long.
    """

    def __init__(self, spatial_dims: int, data_range: float = 2.0, ssim_window_size: int = 11) -> None:
        self.spatial_dims = spatial_dims
        self.data_range = float(data_range)
        self.ssim_window_size = int(ssim_window_size)
        self._metrics: dict[str, tuple[Any, Any]] = {}

    def reset(self) -> None:
        self._metrics = {}

    def update(self, reconstruction: torch.Tensor, image: torch.Tensor, modalities: Sequence[str]) -> None:
        """Add a batch: ``modalities[i]`` names the modality of item ``i``."""
        from monai.metrics import PSNRMetric, SSIMMetric

        if len(modalities) != reconstruction.shape[0]:
            raise ValueError(f"{len(modalities)} modality names for a batch of {reconstruction.shape[0]} images")
        reconstruction, image = reconstruction.detach().float(), image.detach().float()
        for name in sorted(set(modalities)):
            index = torch.tensor([i for i, m in enumerate(modalities) if m == name], device=image.device)
            if name not in self._metrics:
                self._metrics[name] = (
                    PSNRMetric(max_val=self.data_range),
                    SSIMMetric(self.spatial_dims, data_range=self.data_range, win_size=self.ssim_window_size),
                )
            for metric in self._metrics[name]:
                metric(y_pred=reconstruction[index], y=image[index])

    def results(self) -> dict[str, dict[str, float]]:
        """``{modality: {"psnr": mean dB, "ssim": mean}}`` over every image added since the last reset."""
        return {
            name: {"psnr": float(psnr.aggregate().item()), "ssim": float(ssim.aggregate().item())}
            for name, (psnr, ssim) in sorted(self._metrics.items())
        }


def _batch_modalities(batch: Any, modality_key: str) -> list[str]:
    if isinstance(batch, Mapping):
        value = batch[modality_key]
        return [value] if isinstance(value, str) else [str(v) for v in value]
    return [str(item[modality_key]) for item in batch]  # a decollated batch: one dict per item


def _stack(output: Any, key: str) -> torch.Tensor:
    if isinstance(output, Mapping):
        return output[key]
    return torch.stack([item[key] for item in output])


def reconstruction_metrics(
    autoencoder: torch.nn.Module,
    data_loader: Any,
    spatial_dims: int,
    data_range: float = 2.0,
    device: Any = None,
    image_key: str = "image",
    modality_key: str = "modality",
    ssim_window_size: int = 11,
) -> dict[str, dict[str, float]]:
    """PSNR and SSIM of the autoencoder's reconstructions (decoded latent means) over ``data_loader``, per modality:
    ``{modality: {"psnr": ..., "ssim": ...}}``."""
    network = _unwrap(autoencoder)
    device = device if device is not None else next(network.parameters()).device
    metrics = ModalityReconstructionMetrics(spatial_dims, data_range, ssim_window_size)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for batch in data_loader:
                image = batch[image_key].to(device)
                metrics.update(network.reconstruct(image), image, _batch_modalities(batch, modality_key))
    finally:
        network.train(was_training)
    return metrics.results()


class ReconstructionMetricsHandler:
    """Attach to a validation ``SupervisedEvaluator`` (whose ``pred`` is the reconstruction and ``label`` the image, see
    :class:`ReconstructionInferer`): after each validation run, the per-modality PSNR and SSIM are in
    ``engine.state.metrics`` as ``psnr/<modality>`` and ``ssim/<modality>`` (so MONAI's ``StatsHandler`` and
    ``TensorBoardStatsHandler`` listed after this handler log them), in :attr:`results` as
    ``{modality: {"psnr", "ssim"}}``, and, with ``output_file``, in that JSON file with the epoch.

    Args:
        spatial_dims, data_range, ssim_window_size: see :class:`ModalityReconstructionMetrics`.
        modality_key: the batch key naming each item's modality.
        output_file: where to write the latest results (atomically); None: nowhere.
    """

    def __init__(
        self,
        spatial_dims: int,
        data_range: float = 2.0,
        modality_key: str = "modality",
        ssim_window_size: int = 11,
        output_file: str | os.PathLike | None = None,
    ) -> None:
        self.metrics = ModalityReconstructionMetrics(spatial_dims, data_range, ssim_window_size)
        self.modality_key = modality_key
        self.output_file = None if output_file is None else Path(output_file)
        self.results: dict[str, dict[str, float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.metrics.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _update(self, engine: Engine) -> None:
        output = engine.state.output
        modalities = _batch_modalities(engine.state.batch, self.modality_key)
        self.metrics.update(_stack(output, Keys.PRED), _stack(output, Keys.LABEL), modalities)

    def _complete(self, engine: Engine) -> None:
        from segdiff.engine.provenance import write_json_atomic

        self.results = self.metrics.results()
        for name, values in self.results.items():
            for metric, value in values.items():
                engine.state.metrics[f"{metric}/{name}"] = value
        if self.output_file is not None:
            write_json_atomic({"epoch": engine.state.epoch, "metrics": self.results}, self.output_file)


# -- the latent scale factor --------------------------------------------------------------------------------------


def latent_scale_factor(
    autoencoder: torch.nn.Module,
    batches: Any,
    num_batches: int | None = None,
    image_key: str = "image",
    device: Any = None,
    return_details: bool = False,
) -> float | tuple[float, dict[str, Any]]:
    """``1 / std`` of the latent means ``z_mu`` over the first ``num_batches`` of ``batches`` (all when None).

    The latent diffusion convention (Rombach et al.; MONAI's LDM tutorials and bundles): the diffusion stage multiplies
    the latents by this factor so that they have unit variance, as its noise schedule assumes. The standard deviation
    is over every element (batch, channels, space) of all batches together, unbiased, accumulated in float64 without
    holding the latents. The means, not posterior samples, are used: with a small ``kl_weight`` ``z_sigma`` is tiny and
    the two differ little.

    Args:
        autoencoder: has ``encode(x) -> (z_mu, z_sigma)`` (``AutoencoderKL``); evaluated in eval mode, no gradients.
        batches: an iterable of dicts (``image_key`` -> images) or of image tensors, e.g. the training data loader.
        num_batches: how many batches to use; None = all.
        device: where to encode; default the autoencoder's.
        return_details: also return ``{"latent_std", "latent_mean", "num_batches", "num_values", "latent_shape"}``.
    """
    network = _unwrap(autoencoder)
    device = device if device is not None else next(network.parameters()).device
    count, total, squares, used, shape = 0, 0.0, 0.0, 0, None
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                images = batch[image_key] if isinstance(batch, Mapping) else batch
                z_mu = network.encode(images.to(device))[0].double()
                count += z_mu.numel()
                total += float(z_mu.sum())
                squares += float(z_mu.pow(2).sum())
                used += 1
                shape = list(z_mu.shape[1:])
    finally:
        network.train(was_training)
    if count < 2:
        raise ValueError(f"latent_scale_factor needs at least 2 latent values; the batches gave {count}")
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / (count - 1)
    std = math.sqrt(variance)
    if not math.isfinite(std) or std == 0.0:
        raise ValueError(f"the latent means have standard deviation {std} over {used} batches: no scale factor exists")
    details = {"latent_std": std, "latent_mean": mean, "num_batches": used, "num_values": count, "latent_shape": shape}
    return (1.0 / std, details) if return_details else 1.0 / std


def write_latent_scale_factor(weights_path: str | os.PathLike, scale_factor: float, **details: Any) -> Path:
    """Store the scale factor in the record beside the autoencoder's weights (``autoencoder.pt`` ->
    ``autoencoder.json``, key ``latent``: ``{"scale_factor": ..., **details}``), atomically. The record is the one
    :class:`segdiff.engine.TrainingCheckpoint` wrote with the weights; without one, a minimal record (format, weights'
    name and hash) is started. Returns the record's path."""
    from segdiff.engine.provenance import RECORD_FORMAT, read_record, record_path, state_dict_sha256, write_json_atomic

    weights_path = Path(weights_path)
    record = read_record(weights_path)
    if record is None:
        if not weights_path.is_file():
            raise FileNotFoundError(f"no autoencoder weights at {weights_path}: the scale factor belongs beside them")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        record = {"format": RECORD_FORMAT, "weights": weights_path.name, "weights_sha256": state_dict_sha256(state)}
    record["latent"] = {"scale_factor": float(scale_factor), **details}
    path = record_path(weights_path)
    write_json_atomic(record, path)
    return path


def read_latent_scale_factor(weights_path: str | os.PathLike) -> float:
    """The scale factor stored by :func:`write_latent_scale_factor` beside ``weights_path``; a clear error when the
    record or its ``latent`` entry is missing (a run that stopped before its end writes none)."""
    from segdiff.engine.provenance import read_record, record_path

    record = read_record(weights_path)
    latent = None if record is None else record.get("latent")
    if not isinstance(latent, Mapping) or "scale_factor" not in latent:
        raise ConfigKeyError(
            f"{record_path(weights_path)} holds no latent scale factor (key 'latent'): train the autoencoder to the "
            "end (train_autoencoder.yaml writes it when training completes), or give the scale factor explicitly."
        )
    return float(latent["scale_factor"])


class LatentScaleFactor:
    """When training completes, compute :func:`latent_scale_factor` of the trained autoencoder over ``num_batches``
    batches of ``data_loader`` and write it beside the weights (:func:`write_latent_scale_factor`). List it after
    :class:`segdiff.engine.TrainingCheckpoint`, whose final save writes the weights and record it completes. In
    data-parallel training rank 0 alone writes.

    Args:
        autoencoder: the trained network (the one written as ``weights_path``).
        data_loader: e.g. the training data loader.
        weights_path: the autoencoder's weights file (``models/autoencoder.pt``).
        num_batches: batches to estimate the standard deviation from.
        image_key: the batch key of the images.
        device: where to encode; default the autoencoder's.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        data_loader: Any,
        weights_path: str | os.PathLike,
        num_batches: int = 16,
        image_key: str = "image",
        device: Any = None,
    ) -> None:
        if int(num_batches) < 1:
            raise ConfigKeyError(f"scale_factor_batches must be >= 1, found {num_batches}")
        self.autoencoder = autoencoder
        self.data_loader = data_loader
        self.weights_path = Path(weights_path)
        self.num_batches = int(num_batches)
        self.image_key = image_key
        self.device = device
        self.scale_factor: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() != 0:
            return
        scale, details = latent_scale_factor(
            self.autoencoder, self.data_loader, self.num_batches, self.image_key, self.device, return_details=True
        )
        details["iteration"] = engine.state.iteration
        path = write_latent_scale_factor(self.weights_path, scale, **details)
        self.scale_factor = scale
        logger.info(
            f"latent scale factor {scale:.5g} (latent std {details['latent_std']:.5g} over {details['num_batches']} "
            f"batches) written to {path}"
        )
