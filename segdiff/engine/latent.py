"""Latent diffusion conditioned on the modality, and a mask ControlNet on top of it (MRGen's recipe).

A researcher has masks for one modality (say CT) and only unlabelled images of another (MR). Three stages:

1. an autoencoder (MONAI ``AutoencoderKL``, frozen afterwards) and its latent ``scale_factor``;
2. a latent ``DiffusionModelUNet`` learning ALL images, the modality passed as ``class_labels`` (``num_class_embeds =
   num_modalities + 1``: the last class, :func:`null_class`, is "no modality", for classifier-free guidance);
3. a mask ControlNet (:class:`ControlNetDiffusion`, the UNet frozen) trained on source-modality images with their
   masks AND target-modality images with an EMPTY (all-background) mask.

At inference source masks with the target modality's class give synthetic target-modality images
(:class:`LatentDiffusionSampler`).

MONAI's ``DiffusionInferer`` passes no ``class_labels`` to the network, so the prepare-batch here noises the latents
itself and the trainer's inferer is a plain ``monai.inferers.SimpleInferer``: ``network(noisy, timesteps=...,
class_labels=..., controlnet_cond=...)``; the loss is :class:`segdiff.engine.DiffusionLoss` as for the pixel-space
engine. A YAML sketch::

    modalities: "$segdiff.engine.latent.modality_ids(@datalist_file)"     # {"ct": 0, "mr": 1}
    network_def: {_target_: DiffusionModelUNet, num_class_embeds: "$segdiff.engine.latent.null_class(@modalities) + 1",
                  ...}
    prepare_batch: {_target_: segdiff.engine.latent.LatentDiffusionPrepareBatch, autoencoder: "@autoencoder",
                    scale_factor: "@scale_factor", scheduler: "@noise_scheduler", modalities: "@modalities",
                    modality_dropout: 0.1}
    inferer: {_target_: SimpleInferer}
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.schedulers import Scheduler
from monai.networks.utils import copy_model_state
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor
from tqdm.auto import tqdm

from segdiff.data.datalist import SPLITS, DatalistError, load_datalist
from segdiff.engine.objective import min_snr_weights
from segdiff.engine.prepare import ConditionalDiffusionPrepareBatch
from segdiff.engine.sampler import ConditionalDiffusionSampler
from segdiff.errors import ConfigKeyError, ModelMismatchError
from segdiff.transforms.mask import MASK_VALUE_RANGES

__all__ = [
    "ControlNetDiffusion",
    "EmptyLabeld",
    "LatentDiffusionPrepareBatch",
    "LatentDiffusionSampler",
    "controlnet_from_unet",
    "empty_mask",
    "latent_geometry",
    "modality_ids",
    "null_class",
]


# ---- modalities -> class ids -----------------------------------------------------------------------------------
def _check_mapping(mapping: Any, where: str) -> dict[str, int]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigKeyError(f"{where}: expected a non-empty mapping of modality name -> class id, got {mapping!r}.")
    ids: dict[str, int] = {}
    for name, value in mapping.items():
        if not isinstance(name, str) or not name:
            raise ConfigKeyError(f"{where}: modality names must be non-empty strings, got {name!r}.")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigKeyError(f"{where}: the id of modality {name!r} must be an integer, got {value!r}.")
        ids[name] = value
    if sorted(ids.values()) != list(range(len(ids))):
        raise ConfigKeyError(
            f"{where}: modality ids must be 0..{len(ids) - 1}, each once (id {len(ids)} is the 'no modality' class "
            f"of classifier-free guidance); got {ids}."
        )
    return ids


def modality_ids(datalist_or_mapping: Any, modality_key: str = "modality") -> dict[str, int]:
    """The modality name -> class id mapping, checked.

    Args:
        datalist_or_mapping: a datalist (a dict, or the path of its JSON file) with a ``"modalities"`` mapping such as
            ``{"ct": 0, "mr": 1}``, whose every entry of every split then must name one of them under
            ``modality_key``; or the mapping itself (from a config).
        modality_key: the entry key holding the modality name.

    Raises:
        ConfigKeyError: not a mapping of names to the ids 0..n-1, each once.
        DatalistError: a datalist without ``"modalities"``, or an entry without a modality or with one not in it
            (the message names the split, the entry index, the value and the known names).
    """
    if isinstance(datalist_or_mapping, (str, os.PathLike)):
        datalist_or_mapping = load_datalist(datalist_or_mapping)
    if not isinstance(datalist_or_mapping, Mapping):
        kind = type(datalist_or_mapping).__name__
        raise ConfigKeyError(f"modality_ids: expected a datalist, its path or a mapping, got {kind}.")
    is_datalist = "modalities" in datalist_or_mapping or any(split in datalist_or_mapping for split in SPLITS)
    if not is_datalist:
        return _check_mapping(datalist_or_mapping, "the modalities mapping")
    if "modalities" not in datalist_or_mapping:
        raise DatalistError(
            "the datalist has no 'modalities' mapping (e.g. \"modalities\": {\"ct\": 0, \"mr\": 1}); a latent bundle "
            "needs it to give each entry's modality a class id."
        )
    ids = _check_mapping(datalist_or_mapping["modalities"], "the datalist's 'modalities'")
    known = ", ".join(ids)
    for split in SPLITS:
        for index, entry in enumerate(datalist_or_mapping.get(split) or []):
            if not isinstance(entry, Mapping) or modality_key not in entry:
                raise DatalistError(f"datalist {split}[{index}] has no {modality_key!r} (one of: {known}).")
            if entry[modality_key] not in ids:
                raise DatalistError(
                    f"datalist {split}[{index}] has {modality_key} {entry[modality_key]!r}, which is not in the "
                    f"'modalities' mapping (known: {known})."
                )
    return ids


def null_class(modalities: Mapping[str, int]) -> int:
    """The "no modality" class id of classifier-free guidance: the number of modalities (so a UNet or ControlNet is
    built with ``num_class_embeds = null_class(modalities) + 1``)."""
    return len(_check_mapping(modalities, "the modalities mapping"))


def _class_ids(values: Any, modalities: Mapping[str, int], where: str) -> torch.Tensor:
    """Class ids (N,) from a collated batch's modalities: names (a list of strings) or integer ids."""
    if isinstance(values, str) or (isinstance(values, int) and not isinstance(values, bool)):
        values = [values]
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    ids = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            if value not in modalities:
                raise ValueError(f"{where}[{index}] is modality {value!r}, not one of: {', '.join(modalities)}.")
            value = modalities[value]
        value = int(value)
        if not 0 <= value < len(modalities):
            raise ValueError(
                f"{where}[{index}] is class id {value}, outside 0..{len(modalities) - 1} ({dict(modalities)})."
            )
        ids.append(value)
    return torch.tensor(ids, dtype=torch.long)


# ---- empty masks -----------------------------------------------------------------------------------------------
def empty_mask(
    num_classes: int, spatial_shape: Sequence[int], batch: int | None = None, device: Any = None
) -> torch.Tensor:
    """The one-hot encoding (condition role, as :class:`segdiff.transforms.EncodeMaskd` writes it) of an all-background
    mask: channel 0 at 1, the other channels at 0. MRGen pairs target-modality images (which have no masks) with it.
    ``batch``: a leading batch dimension of that size (None: none)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}.")
    low, high = MASK_VALUE_RANGES["condition"]
    mask = torch.full((num_classes, *[int(s) for s in spatial_shape]), low, dtype=torch.float32, device=device)
    mask[0] = high
    return mask if batch is None else mask.unsqueeze(0).repeat(batch, *[1] * mask.dim())


class EmptyLabeld(MapTransform):
    """Give entries without a label (the target modality's images) an all-background label map, so that labelled and
    unlabelled entries share one pipeline and one batch; write whether the entry had a label under ``flag_key``.

    Put it after loading (``LoadImaged(keys=["image", "label"], allow_missing_keys=True)`` and the channel-first
    transform) and before the spatial transforms and ``EncodeMaskd``: the filled map is zeros of the reference image's
    spatial shape with its metadata, so it is cropped and resampled like a real label and encodes to
    :func:`empty_mask`. :class:`LatentDiffusionPrepareBatch` reads the flag and also empties the mask of any entry
    flagged unlabelled.

    Args:
        keys: the label key(s).
        reference_key: the image whose spatial shape and metadata the filled label takes.
        flag_key: where ``True`` (the entry has a label) or ``False`` (it was filled) is written.
    """

    backend = [torch.Tensor]

    def __init__(
        self, keys: KeysCollection = "label", reference_key: str = "image", flag_key: str = "has_label"
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.reference_key = reference_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = d[self.reference_key]
        has_label = True
        for key in self.keys:
            if d.get(key) is not None:
                continue
            has_label = False
            zeros = torch.zeros((1, *reference.shape[1:]), dtype=torch.float32)
            if isinstance(reference, MetaTensor):
                operations = list(reference.applied_operations)
                zeros = MetaTensor(zeros, meta=dict(reference.meta), applied_operations=operations)
            d[key] = zeros
        d[self.flag_key] = has_label
        return d


# ---- training batches ------------------------------------------------------------------------------------------
class LatentDiffusionPrepareBatch(ConditionalDiffusionPrepareBatch):
    """Training batches of a latent diffusion UNet (or :class:`ControlNetDiffusion`) for MONAI's ``SupervisedTrainer``
    with a ``SimpleInferer``.

    The image is encoded by the frozen autoencoder (the posterior mean ``z_mu``, or a draw from it with
    ``sample_posterior``), times ``scale_factor``; noise and timesteps are drawn as by
    :class:`segdiff.engine.ConditionalDiffusionPrepareBatch` (same training scheduler, prediction types, min-SNR
    weights, rectified flow), and the noisy latent is made here. Returns ``(noisy_latent, loss_target, (),
    {"timesteps", "class_labels"[, "controlnet_cond"]})``; ``last_batch`` holds ``timesteps``, ``noise``,
    ``loss_weights``, ``target`` (the clean scaled latent), ``noisy``, ``class_labels`` and ``controlnet_cond`` (None
    without ``mask_key``), for :class:`segdiff.engine.DiffusionLoss` and inspection.

    Args:
        autoencoder: the trained MONAI ``AutoencoderKL`` (frozen here: no gradient, eval mode), on the batch's device.
        scale_factor: the latent scale factor (latents are multiplied by it, so that they have about unit variance).
        scheduler: the training noise scheduler (``segdiff.engine.training_scheduler``); required.
        modalities: the modality name -> class id mapping (:func:`modality_ids`); ``null_class`` is its size.
        image_key: batch key of the image.
        modality_key: batch key of each entry's modality (names or class ids).
        modality_dropout: probability that an entry's modality is replaced by the null class (classifier-free
            training; 0 never, 1 always).
        mask_key: batch key of the one-hot mask at image resolution for a ControlNet (None: no ``controlnet_cond``,
            the latent UNet stage). A batch without this key is all unlabelled: every entry gets an empty mask.
        num_classes: channels of the one-hot mask (background included); needed with ``mask_key``.
        has_label_key: batch key of :class:`EmptyLabeld`'s flag; entries flagged False get :func:`empty_mask`
            whatever the pipeline put under ``mask_key``. A batch without this key counts as all labelled.
        sample_posterior: encode with ``encode_stage_2_inputs`` (a draw z_mu + sigma * eps) instead of ``z_mu``.
        num_train_timesteps: None: the scheduler's.
        loss_weighting, min_snr_gamma: as for :class:`segdiff.engine.ConditionalDiffusionPrepareBatch`.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        scale_factor: float,
        scheduler: Scheduler,
        modalities: Mapping[str, int],
        image_key: str = "image",
        modality_key: str = "modality",
        modality_dropout: float = 0.0,
        mask_key: str | None = None,
        num_classes: int | None = None,
        has_label_key: str = "has_label",
        sample_posterior: bool = False,
        num_train_timesteps: int | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        if scheduler is None:
            raise ValueError("LatentDiffusionPrepareBatch needs the training scheduler (it noises the latents itself).")
        super().__init__(
            num_train_timesteps=int(num_train_timesteps or scheduler.num_train_timesteps),
            target_key=image_key,
            condition_key=None,
            scheduler=scheduler,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
        )
        if not 0.0 <= float(modality_dropout) <= 1.0:
            raise ConfigKeyError(f"'modality_dropout' must lie in [0, 1], got {modality_dropout}.")
        if mask_key is not None and (num_classes is None or int(num_classes) < 1):
            raise ConfigKeyError(f"'num_classes' (>= 1, background included) is needed with mask_key {mask_key!r}.")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.modalities = _check_mapping(modalities, "the modalities mapping")
        self.null_class = len(self.modalities)
        self.modality_key = modality_key
        self.modality_dropout = float(modality_dropout)
        self.mask_key = mask_key
        self.num_classes = None if num_classes is None else int(num_classes)
        self.has_label_key = has_label_key
        self.sample_posterior = bool(sample_posterior)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The scaled latent of ``image`` (without gradient, the autoencoder in eval mode)."""
        self.autoencoder.eval()
        weights = next(self.autoencoder.parameters())
        if weights.device != image.device:
            raise RuntimeError(
                f"the autoencoder is on {weights.device} but the batch on {image.device}: move it to the training "
                "device in the config (autoencoder: ...to(@device))."
            )
        if self.sample_posterior:
            z = self.autoencoder.encode_stage_2_inputs(image)
        else:
            z = self.autoencoder.encode(image)[0]
        return z * self.scale_factor

    def class_labels(self, batchdata: Mapping[str, Any], batch: int, device: Any) -> torch.Tensor:
        """Each entry's modality id, replaced by the null class with probability ``modality_dropout``."""
        if self.modality_key not in batchdata:
            raise KeyError(
                f"the batch has no {self.modality_key!r} (each entry's modality); keys: {sorted(map(str, batchdata))}."
            )
        labels = _class_ids(batchdata[self.modality_key], self.modalities, f"batch {self.modality_key!r}").to(device)
        if labels.shape[0] != batch:
            raise ValueError(f"{labels.shape[0]} modalities for a batch of {batch} images.")
        if self.modality_dropout > 0:
            dropped = torch.rand(batch, device=device) < self.modality_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return labels

    def controlnet_cond(self, batchdata: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
        """The one-hot mask at image resolution; unlabelled entries (no mask key, or flagged False) get an empty one."""
        batch, spatial = image.shape[0], image.shape[2:]
        empty = empty_mask(self.num_classes, spatial, batch, image.device)  # type: ignore[arg-type]
        if self.mask_key not in batchdata:
            return empty
        mask = convert_to_tensor(batchdata[self.mask_key], track_meta=False).to(image.device).float()
        if mask.shape[0] != batch or mask.shape[1] != self.num_classes or mask.shape[2:] != spatial:
            raise ValueError(
                f"batch {self.mask_key!r} has shape {tuple(mask.shape)}; expected the one-hot mask (B={batch}, "
                f"num_classes={self.num_classes}, *image spatial {tuple(spatial)}) (EncodeMaskd after EmptyLabeld)."
            )
        flags = batchdata.get(self.has_label_key)
        if flags is None:
            return mask
        has_label = torch.as_tensor(flags if not isinstance(flags, torch.Tensor) else flags.reshape(-1)).bool()
        has_label = has_label.to(image.device).reshape(batch, *[1] * (mask.dim() - 1))
        return torch.where(has_label, mask, empty)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        image = convert_to_tensor(batchdata[self.target_key], track_meta=False)
        image = image.to(device, non_blocking=non_blocking, **kwargs)
        latent = self.encode(image.float())
        noise = self.get_noise(latent)
        timesteps = self.get_timesteps(latent)
        labels = self.class_labels(batchdata, latent.shape[0], latent.device)
        network_kwargs: dict[str, Any] = {"timesteps": timesteps, "class_labels": labels}
        if self.mask_key is not None:
            network_kwargs["controlnet_cond"] = self.controlnet_cond(batchdata, image)
        weights = None
        if self.loss_weighting == "min_snr":
            weights = min_snr_weights(self.scheduler, timesteps, self.prediction_type, self.min_snr_gamma)
        noisy = self.scheduler.add_noise(latent, noise, timesteps)  # type: ignore[union-attr]
        self.last_batch = {
            "timesteps": timesteps, "noise": noise, "loss_weights": weights, "target": latent, "noisy": noisy,
            "class_labels": labels, "controlnet_cond": network_kwargs.get("controlnet_cond"),
        }
        return noisy, self.get_target(latent, noise, timesteps), (), network_kwargs


# ---- ControlNet ------------------------------------------------------------------------------------------------
#: ControlNet parameters that have no counterpart in the UNet (MONAI zero-initialises their outputs)
_CONTROLNET_OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def controlnet_from_unet(unet: torch.nn.Module, controlnet: ControlNet) -> ControlNet:
    """Copy the trained UNet's weights into the ControlNet's matching encoder (``conv_in``, time and class embeddings,
    down and middle blocks) with MONAI's ``copy_model_state``; returns the ControlNet. Its own parts (the mask
    embedding and the zero convolutions) keep their initialisation.

    Raises:
        ModelMismatchError: some shared part did not match the UNet (different ``in_channels``, ``channels``,
            ``attention_levels``, ``num_res_blocks``, ``num_class_embeds``...): the message lists the parameters.
    """
    unet = unet.module if isinstance(unet, torch.nn.parallel.DistributedDataParallel) else unet
    _, updated, unchanged = copy_model_state(controlnet, unet, inplace=True)
    missed = [key for key in unchanged if not key.startswith(_CONTROLNET_OWN)]
    if missed:
        source = unet.state_dict()
        target = controlnet.state_dict()
        shown = [
            f"{k} {tuple(target[k].shape)} vs UNet {tuple(source[k].shape) if k in source else 'absent'}"
            for k in missed[:5]
        ]
        raise ModelMismatchError(
            f"{len(missed)} ControlNet parameters have no equal-shaped UNet parameter ({'; '.join(shown)}): build the "
            "ControlNet with the UNet's in_channels, channels, attention_levels, num_res_blocks, norm_num_groups and "
            "num_class_embeds."
        )
    return controlnet


class ControlNetDiffusion(torch.nn.Module):
    """A frozen latent diffusion UNet steered by a trainable MONAI ``ControlNet``.

    ``forward(x, timesteps, class_labels, controlnet_cond)`` runs the ControlNet on the noisy latent and the mask (at
    image resolution: its conditioning embedding downsamples to the latent grid) and adds its residuals to the UNet's
    skip connections and middle block. The UNet's parameters have ``requires_grad`` False and it stays in eval mode
    whatever ``train()`` says; give the optimizer :meth:`trainable_parameters`.

    Args:
        unet: the trained ``DiffusionModelUNet`` (of the latent stage).
        controlnet: a ``ControlNet`` of the same architecture, usually from :func:`controlnet_from_unet`.
        conditioning_scale: factor on the ControlNet's residuals (1: as trained; 0: the plain UNet).
    """

    def __init__(self, unet: DiffusionModelUNet, controlnet: ControlNet, conditioning_scale: float = 1.0) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.controlnet = controlnet
        self.conditioning_scale = float(conditioning_scale)
        # the conditioning embedding halves the mask's grid once per pair of its blocks
        self.cond_downsample = 2 ** (len(controlnet.controlnet_cond_embedding.blocks) // 2)

    def train(self, mode: bool = True) -> ControlNetDiffusion:
        super().train(mode)
        self.unet.eval()  # frozen: its dropout and normalisation stay as at the end of its training
        return self

    def trainable_parameters(self):
        """The ControlNet's parameters only (for the optimizer)."""
        return self.controlnet.parameters()

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        controlnet_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if controlnet_cond is None:
            raise ValueError("ControlNetDiffusion needs controlnet_cond (the one-hot mask at image resolution).")
        expected = tuple(s * self.cond_downsample for s in x.shape[2:])
        if tuple(controlnet_cond.shape[2:]) != expected:
            raise ValueError(
                f"controlnet_cond has spatial shape {tuple(controlnet_cond.shape[2:])}, expected {expected} (the "
                f"latent {tuple(x.shape[2:])} times {self.cond_downsample}, the downsampling of the ControlNet's "
                "conditioning_embedding_num_channels): the mask must be at image resolution and the ControlNet's "
                "downsampling that of the autoencoder."
            )
        labels = class_labels if self.controlnet.num_class_embeds is not None else None
        down, mid = self.controlnet(
            x=x, timesteps=timesteps, controlnet_cond=controlnet_cond.to(x.dtype),
            conditioning_scale=self.conditioning_scale, class_labels=labels,
        )
        return self.unet(
            x=x, timesteps=timesteps, class_labels=class_labels,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        )


# ---- sampling --------------------------------------------------------------------------------------------------
def latent_geometry(autoencoder: torch.nn.Module) -> tuple[int, int, int]:
    """``(spatial_dims, latent_channels, downsample_factor)`` of a MONAI ``AutoencoderKL``: the latent grid is the
    image grid divided by ``2 ** (len(channels) - 1)``."""
    encoder = getattr(autoencoder, "encoder", None)
    if encoder is None or not hasattr(encoder, "channels") or not hasattr(autoencoder, "latent_channels"):
        kind = type(autoencoder).__name__
        raise TypeError(f"expected a MONAI AutoencoderKL (encoder.channels, latent_channels), got {kind}.")
    return int(encoder.spatial_dims), int(autoencoder.latent_channels), 2 ** (len(encoder.channels) - 1)


class _Guided(torch.nn.Module):
    """``network(x, timesteps)`` for the shared denoising loop: the modality and the mask bound, and classifier-free
    guidance ``uncond + s * (cond - uncond)`` (uncond: the null class, same mask) in one doubled batch."""

    def __init__(self, network: torch.nn.Module, class_labels: torch.Tensor, controlnet_cond: torch.Tensor | None,
                 guidance_scale: float, null_class: int) -> None:
        super().__init__()
        self.network = network
        self.class_labels = class_labels
        self.controlnet_cond = controlnet_cond
        self.guidance_scale = float(guidance_scale)
        self.null_class = int(null_class)

    def _run(
        self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        extra = {} if cond is None else {"controlnet_cond": cond}
        return self.network(x, timesteps=timesteps, class_labels=labels, **extra)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale == 1.0:
            return self._run(x, timesteps, self.class_labels, self.controlnet_cond)
        cond = None if self.controlnet_cond is None else torch.cat([self.controlnet_cond] * 2)
        labels = torch.cat([self.class_labels, torch.full_like(self.class_labels, self.null_class)])
        out = self._run(torch.cat([x, x]), torch.cat([timesteps, timesteps]), labels, cond)
        conditional, unconditional = out.float().chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)


class LatentDiffusionSampler:
    """Synthetic images from masks and a modality: seeded latent noise, reverse diffusion with classifier-free
    guidance over the modality, decoding by the autoencoder (optionally in sliding windows over the latent).

    A callable ``sampler(inputs, network)`` like :class:`segdiff.engine.ConditionalDiffusionSampler`. The reverse loop
    IS that sampler's :meth:`~segdiff.engine.ConditionalDiffusionSampler.denoise` (so DDPM, DDIM with its timestep
    fix, :class:`segdiff.engine.DPMSolverScheduler` and rectified-flow Euler steps behave the same in both engines):
    the modality, the mask and the guidance are bound into a ``network(x, timesteps)`` wrapper, because that loop
    only concatenates a condition to the input and passes no class labels.

    Args:
        autoencoder: the trained ``AutoencoderKL``; gives the latent grid (:func:`latent_geometry`) and decodes.
        scale_factor: the latent scale factor of training (latents are divided by it before decoding).
        scheduler: from :func:`segdiff.engine.build_scheduler` with ``clip_sample`` False: latents do not lie in
            [-1, 1], so clipping them (the pixel-space default) would be wrong and is refused.
        modalities: name -> class id (:func:`modality_ids`); gives the null class.
        modality: the modality generated (a name of ``modalities`` or its id), e.g. ``"mr"``.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance ``s``: ``uncond + s * (cond - uncond)``; 1 runs the conditional pass
            only (no extra pass), 0 ignores the modality.
        seed: seed of the latent noise: every call restarts from it and draws the noise of all its batch elements at
            once (so the elements differ, and the same call gives the same images); None: torch's global generator.
            A caller that splits one case into several calls (``LatentGridSampler`` of
            :mod:`segdiff.engine.latent_inference`) draws the case's noise itself and passes ``noise`` and
            ``generator``.
        decode_roi_size: window of ``monai.inferers.SlidingWindowInferer`` over the LATENT grid for decoding big
            volumes in patches (None: decode the whole latent at once).
        decode_overlap, decode_mode: the sliding window's overlap and blending (``"gaussian"`` or ``"constant"``).
        amp: autocast on CUDA during denoising.
        progress: show a progress bar over the steps.

    ``inputs`` (B, num_classes, *image spatial) is the one-hot mask at image resolution; it is the ControlNet's
    condition when ``network`` is a :class:`ControlNetDiffusion`, and gives only the output grid for a plain
    ``DiffusionModelUNet`` (the latent stage). The image grid must be a multiple of the autoencoder's downsampling.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        scale_factor: float,
        scheduler: Scheduler,
        modalities: Mapping[str, int],
        modality: str | int = 0,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int | None = 0,
        decode_roi_size: Sequence[int] | None = None,
        decode_overlap: float = 0.25,
        decode_mode: str = "gaussian",
        amp: bool = False,
        progress: bool = False,
    ) -> None:
        if getattr(scheduler, "clip_sample", False):
            raise ConfigKeyError(
                "the latent sampler's scheduler clips x0 to [-1, 1], which latents do not respect: build it with "
                "clip_sample false (segdiff.engine.build_scheduler(..., clip_sample=False))."
            )
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.spatial_dims, self.latent_channels, self.downsample = latent_geometry(autoencoder)
        self.scale_factor = float(scale_factor)
        self.modalities = _check_mapping(modalities, "the modalities mapping")
        self.null_class = len(self.modalities)
        self.modality = int(_class_ids(modality, self.modalities, "modality")[0])
        self.guidance_scale = float(guidance_scale)
        self.seed = seed
        self.progress = progress
        self.loop = ConditionalDiffusionSampler(
            scheduler, num_inference_steps=num_inference_steps, target_channels=self.latent_channels,
            spatial_dims=self.spatial_dims, conditional=False, amp=amp, seed=seed, progress=False,
        )
        self.decoder_inferer = None
        if decode_roi_size is not None:
            if len(decode_roi_size) != self.spatial_dims:
                raise ConfigKeyError(f"'decode_roi_size' {list(decode_roi_size)} needs {self.spatial_dims} entries.")
            self.decoder_inferer = SlidingWindowInferer(
                roi_size=[int(s) for s in decode_roi_size], sw_batch_size=1, overlap=decode_overlap, mode=decode_mode,
                progress=False,
            )

    def latent_shape(self, image_spatial: Sequence[int]) -> tuple[int, ...]:
        """``(latent_channels, *image_spatial / downsample)``; refuses a grid that does not divide."""
        if len(image_spatial) != self.spatial_dims or any(int(s) % self.downsample for s in image_spatial):
            raise ValueError(
                f"image grid {list(image_spatial)} must have {self.spatial_dims} sizes, each a multiple of the "
                f"autoencoder's downsampling {self.downsample} (pad or crop the masks to it)."
            )
        return (self.latent_channels, *[int(s) // self.downsample for s in image_spatial])

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The image of a scaled latent: ``decode_stage_2_outputs(latent / scale_factor)``, whole or windowed."""
        z = latent / self.scale_factor
        if self.decoder_inferer is None:
            return self.autoencoder.decode_stage_2_outputs(z)
        return self.decoder_inferer(z, self.autoencoder.decode_stage_2_outputs)

    @torch.no_grad()
    def sample_latents(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        class_labels: Any = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The denoised scaled latents (B, latent_channels, *latent spatial) for ``inputs`` (see the class).

        Args:
            noise: the starting latent noise (B, latent_channels, *latent spatial); None: drawn here, all B elements
                at once from ``generator``.
            generator: for the starting noise (when drawn here) and ddpm's step noise; None: a generator seeded with
                the sampler's ``seed`` for this call, or torch's global generator when ``seed`` is None.
        """
        device = next(network.parameters()).device
        raw = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
        batch = inputs.shape[0]
        shape = self.latent_shape(inputs.shape[2:])
        if class_labels is None:
            labels = torch.full((batch,), self.modality, dtype=torch.long, device=device)
        else:
            labels = _class_ids(class_labels, self.modalities, "class_labels").to(device)
            labels = labels.expand(batch) if labels.numel() == 1 else labels
        mask = None
        if isinstance(raw, ControlNetDiffusion):
            mask = convert_to_tensor(inputs, track_meta=False).float().to(device)
        if generator is None and self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(self.seed))  # once per call, not per element
        if noise is None:
            noise = torch.randn((batch, *shape), generator=generator, device=device)
        elif tuple(noise.shape) != (batch, *shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, *shape)} (batch, latent).")
        guided = _Guided(network, labels, mask, self.guidance_scale, self.null_class)
        steps = self.loop.num_inference_steps
        with tqdm(total=steps, desc="latent sampling", disable=not self.progress, leave=False) as bar:
            return self.loop.denoise(None, guided, noise.to(device), generator=generator, progress_bar=bar)

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        class_labels: Any = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (B, image channels, *inputs spatial) for the masks ``inputs`` and the modality (``class_labels``:
        names or ids per case, or None for the sampler's ``modality``); with the inputs' metadata. ``noise`` and
        ``generator``: as for :meth:`sample_latents`."""
        was_training = network.training
        network.eval()
        try:
            images = self.decode(self.sample_latents(inputs, network, class_labels, noise, generator)).float()
        finally:
            network.train(was_training)
        images = images.to(inputs.device)
        if isinstance(inputs, MetaTensor):
            images = MetaTensor(images, meta=inputs.meta, applied_operations=inputs.applied_operations)
            images.is_batch = inputs.is_batch
        return images
