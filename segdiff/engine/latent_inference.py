"""Latent mask -> image sampling on each mask's own grid: what :class:`segdiff.engine.LatentDiffusionSampler` lacks for
a bundle's inference (the latent_mask_to_image bundle's ``inference.yaml``).

:class:`segdiff.engine.LatentDiffusionSampler` samples one batch of masks that already lie on the model's grid (a
multiple of the autoencoder's downsampling, of the network's spatial dimensions). :class:`LatentGridSampler` wraps it
the way :class:`segdiff.engine.ConditionalDiffusionSampler` treats cases: a 2D model over a 3D mask samples the slices
along ``slice_axis`` (with :func:`segdiff.engine.grid.to_network_units` / ``from_network_units``); each slice or volume
is resized to the model's ``image_size`` (the mask nearest, the image back linearly) or, for a model trained on crops
at native resolution (``image_size`` None), padded with background up to ``size_divisor`` and cropped back; network
inputs go through the sampler in chunks of ``batch_size``; the output carries the mask's metadata (affine, file
name), so ``SaveSamplesd`` writes it on the mask's grid.

Seeding: each case restarts from ``seed`` (a case's image does not depend on the other cases) and its slices get
DIFFERENT noise: the noise of all of a case's slices is drawn at once from a generator seeded so, and each chunk of
``batch_size`` is given its part (the wrapped sampler, built with ``seed`` None, takes ``noise`` and ``generator``);
torch's global random state is not touched. For the deterministic samplers (ddim, dpm_solver, euler) the images do not
depend on ``batch_size``; ddpm draws its step noise from the same generator in chunk order.

Weights: :class:`LatentStages` holds the three trained stages (autoencoder, latent UNet, ControlNet) with their files and
records; its :meth:`~LatentStages.load` checks every file against its record, then loads them. Given to
:class:`LatentGridSampler` as ``stages``, they are loaded before sampling unless already loaded from the same files, so
a caller that skips the config's ``initialize`` (MONAI Label's ``/infer``: it loads one ``models/model.pt`` into
``network_def`` itself) still samples with checked weights; such a caller may hand over an empty module in place of the
network (the MONAI Label copy's ``network_def``, scripts/setup_monailabel.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.utils import convert_to_tensor

from segdiff.engine.grid import from_network_units, resize, to_network_units
from segdiff.errors import ConfigKeyError, ModelMismatchError

__all__ = ["STAGES", "LatentGridSampler", "LatentStages", "check_model_grid", "chosen", "model_grid_divisor",
           "trained_modalities"]

#: the latent bundle's trained stages, in training order: each has its weight file ``<stage>.pt`` and record
STAGES = ("autoencoder", "diffusion", "controlnet")


def trained_modalities(weights_path: Any) -> dict[str, int]:
    """The modality name -> class id mapping the latent UNet at ``weights_path`` was trained with (its record's
    ``settings.modalities``, written by train_diffusion.yaml): the class ids only mean what training's datalist said.

    Raises:
        InputNotFoundError: no weights there.
        ModelMismatchError: no record beside them, or one without ``modalities``.
    """
    from segdiff.data.inputs import require_file
    from segdiff.engine.latent import modality_ids
    from segdiff.engine.provenance import read_record, record_path

    require_file(str(weights_path), hint="train the bundle first (train_diffusion.yaml) or set diffusion_path")
    record = read_record(weights_path)
    modalities = None if record is None else record.get("settings", {}).get("modalities")
    if not isinstance(modalities, Mapping):
        raise ModelMismatchError(
            f"{record_path(weights_path)} is missing or names no 'modalities' (settings.modalities): the latent UNet's "
            "class ids cannot be mapped to modality names. Use weights written by train_diffusion.yaml with their "
            "record."
        )
    return modality_ids(dict(modalities))


def model_grid_divisor(autoencoder_channels: Sequence[int], network_channels: Sequence[int] | None = None) -> int:
    """What every axis of the image grid must be a multiple of: the autoencoder halves it once per level after the
    first, and the latent UNet (and the ControlNet) halve the latent once per level after the first (None: the
    autoencoder alone, stage 1)."""
    return 2 ** (len(autoencoder_channels) - 1) * 2 ** (len(network_channels or [0]) - 1)


def check_model_grid(
    size: Sequence[int] | None,
    autoencoder_channels: Sequence[int],
    network_channels: Sequence[int] | None = None,
    key: str = "image_size",
) -> None:
    """Refuse an image grid (``image_size`` or ``roi_size``) the autoencoder (and the latent UNet, when
    ``network_channels`` is given) cannot run on, before any data is cached: each axis must be a multiple of
    :func:`model_grid_divisor`. None (no fixed grid) passes."""
    if size is None:
        return
    factor = model_grid_divisor(autoencoder_channels, network_channels)
    bad = [int(s) for s in size if int(s) % factor]
    if bad:
        why = f"the autoencoder halves it {len(autoencoder_channels) - 1} time(s) for autoencoder_channels " \
              f"{list(autoencoder_channels)}"
        if network_channels is not None:
            why += f", the latent UNet {len(network_channels) - 1} more for network_channels {list(network_channels)}"
        raise ConfigKeyError(f"{key} {list(size)}: every axis must be a multiple of {factor} ({why}); found {bad}.")


def chosen(value: Any) -> Any:
    """A per-request setting that MONAI Label may hand over as its list of choices: the first entry of a list or tuple
    (the chosen one: the default when the request names none), else the value itself. MONAI Label shows a list in
    ``displayable_configs`` as a choice (3D Slicer: a drop-down) and sends the chosen entry, or the whole list when a
    REST request leaves the setting out."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigKeyError("a setting given as a list of choices must have at least one entry (the chosen one).")
        return value[0]
    return value


def _file_state(path: Path) -> tuple[str, int | None]:
    try:
        return str(path), path.stat().st_mtime_ns
    except FileNotFoundError:
        return str(path), None


class LatentStages:
    """The latent generator's three trained stages as modules with their weight files: every file is checked against
    its record, then loaded into its module.

    Args:
        autoencoder: the ``AutoencoderKL`` (stage ``autoencoder``).
        network: the :class:`segdiff.engine.ControlNetDiffusion`: its ``unet`` takes stage ``diffusion``, its
            ``controlnet`` stage ``controlnet``.
        records: stage name -> :class:`segdiff.engine.ModelRecord` with the stage's ``weights_path``, for each of
            :data:`STAGES`.
    """

    def __init__(self, autoencoder: torch.nn.Module, network: torch.nn.Module, records: Mapping[str, Any]) -> None:
        missing = [name for name in STAGES if name not in records]
        unknown = [name for name in records if name not in STAGES]
        if missing or unknown:
            raise ConfigKeyError(f"'records' must name the stages {list(STAGES)}; missing {missing}, unknown {unknown}.")
        for name in STAGES:
            if getattr(records[name], "weights_path", None) is None:
                raise ConfigKeyError(f"records[{name!r}] has no weights_path: the stage's file cannot be loaded.")
        if not all(hasattr(network, part) for part in ("unet", "controlnet")):
            raise ConfigKeyError(
                f"'network' must be a ControlNetDiffusion (with unet and controlnet), got {type(network).__name__}."
            )
        self.autoencoder = autoencoder
        self.network = network
        self.records = {name: records[name] for name in STAGES}
        self._loaded: tuple | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        """Stage name -> the module its weights go into."""
        return {"autoencoder": self.autoencoder, "diffusion": self.network.unet, "controlnet": self.network.controlnet}

    def weights_paths(self) -> dict[str, Path]:
        return {name: Path(record.weights_path) for name, record in self.records.items()}

    def _files(self) -> tuple:
        return tuple(_file_state(path) for path in self.weights_paths().values())

    def load(self) -> dict[str, dict | None]:
        """Check every stage's file against its record (all of them before any is loaded), then load each into its
        module on the module's device. Returns stage name -> record (None for a file without one: a warning).

        Raises:
            InputNotFoundError: a stage's file is missing.
            ModelMismatchError: a record differs from the configured settings, or a file does not fit its module.
        """
        modules = self.modules()
        found = {name: self.records[name].verify(modules[name]) for name in STAGES}
        for name, path in self.weights_paths().items():
            module = modules[name]
            device = next(module.parameters()).device
            module.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        self._loaded = self._files()
        return found

    def load_once(self) -> None:
        """:meth:`load` unless these modules already hold the same files (same paths, unchanged since)."""
        if self._loaded != self._files():
            self.load()

    def network_for(self, network: torch.nn.Module) -> torch.nn.Module:
        """The network to sample with when a caller hands over ``network``: this ``network``, its stages loaded
        (:meth:`load_once`). ``network`` must be it, or a module without parameters (MONAI Label's ``network_def`` in
        the bundle's copy for it); another network is refused rather than silently replaced."""
        raw = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
        if raw is not self.network and any(True for _ in raw.parameters()):
            raise ConfigKeyError(
                f"the sampler was handed a {type(raw).__name__} with parameters that is not its stages' network: give "
                "it the config's 'network' (its stages load the weights), or an empty module."
            )
        self.load_once()
        return self.network


def _background_pad(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pad one-hot masks ``(N, C, *spatial)`` at the end of each axis up to ``size`` with background (channel 0 on,
    the others off): training pads label maps with 0 before encoding them, so padding is background there too."""
    pad: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, int(want) - int(have)]
    if not any(pad):
        return x
    out = F.pad(x, pad)
    out[:, :1] += F.pad(torch.zeros_like(x[:, :1]), pad, value=1.0)
    return out


class LatentGridSampler:
    """Images for one-hot masks on their own grids: slices of volumes for 2D models, resizing or padding to the
    model's grid, chunks of ``batch_size``, per-case seeds (see the module docstring).

    A callable ``sampler(inputs, network)`` (a MONAI inferer for ``SupervisedEvaluator``).

    Args:
        sampler: a :class:`segdiff.engine.LatentDiffusionSampler` built with ``seed`` None (this wrapper seeds).
        spatial_dims: the networks' spatial dimensions (2: slices of 3D masks, or 2D masks; 3: volumes).
        image_size: the image size the models were trained on (masks are resized to it, images back); None: sample
            at the mask's own size, padded with background to a multiple of ``size_divisor`` (``roi_size`` training).
        slice_axis: for a 2D model and 3D masks, the spatial axis the volume is cut along.
        batch_size: network inputs (slices or volumes) per call of the latent sampler.
        size_divisor: with ``image_size`` None, the multiple the grid is padded to: the autoencoder's downsampling
            times the latent UNet's (``2 ** (levels - 1)`` each).
        seed: seed of every case's noise; None: torch's global generator, not reseeded.
        class_labels: the modality per call (a name or id) instead of the latent sampler's ``modality``; None: its own.
        num_samples: images per mask, each from its own noise (all of a case's noise, every sample's slices, is drawn
            at once); the output's channels are sample-major, as :class:`segdiff.engine.ConditionalDiffusionSampler`
            orders them: ``[k * C, (k + 1) * C)`` hold sample ``k``.
        stages: a :class:`LatentStages` whose network samples (:meth:`LatentStages.network_for`: loaded, each file
            checked against its record, unless already loaded from the same files); its autoencoder must be the one
            ``sampler`` decodes with. None: the caller's network, its weights loaded by the caller.
    """

    def __init__(
        self,
        sampler: Any,
        spatial_dims: int = 2,
        image_size: Sequence[int] | None = None,
        slice_axis: int = 2,
        batch_size: int = 16,
        size_divisor: int = 1,
        seed: int | None = 0,
        class_labels: Any = None,
        num_samples: int = 1,
        stages: LatentStages | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigKeyError(f"'spatial_dims' must be 2 or 3, got {spatial_dims}.")
        if getattr(sampler, "seed", None) is not None:
            raise ConfigKeyError(
                "LatentGridSampler seeds every case itself: build its LatentDiffusionSampler with seed None and give "
                "the seed to LatentGridSampler (one seed, in one place)."
            )
        if getattr(sampler, "spatial_dims", spatial_dims) != spatial_dims:
            raise ConfigKeyError(
                f"'spatial_dims' is {spatial_dims} but the autoencoder is {sampler.spatial_dims}D: use the autoencoder "
                "trained for this bundle's spatial_dims."
            )
        if image_size is not None and len(image_size) != spatial_dims:
            raise ConfigKeyError(f"'image_size' {list(image_size)} must have {spatial_dims} entries.")
        if int(batch_size) < 1:
            raise ConfigKeyError(f"'batch_size' must be >= 1, got {batch_size}.")
        if int(num_samples) < 1:
            raise ConfigKeyError(f"'num_samples' must be >= 1, got {num_samples}.")
        if stages is not None and getattr(sampler, "autoencoder", None) is not stages.autoencoder:
            raise ConfigKeyError(
                "the latent sampler decodes with another autoencoder than the stages' (whose weights are loaded): "
                "give both the config's 'autoencoder'."
            )
        self.sampler = sampler
        self.spatial_dims = int(spatial_dims)
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.slice_axis = int(slice_axis)
        self.batch_size = int(batch_size)
        self.size_divisor = max(int(size_divisor), 1)
        self.seed = seed
        self.class_labels = class_labels
        self.num_samples = int(num_samples)
        self.stages = stages

    def model_size(self, case_size: Sequence[int]) -> tuple[int, ...]:
        """The grid the networks run on for a slice or volume of ``case_size``."""
        if self.image_size is not None:
            return self.image_size
        return tuple(math.ceil(int(s) / self.size_divisor) * self.size_divisor for s in case_size)

    def _to_model(self, units: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.image_size is not None:
            return resize(units, size, "mask")
        return _background_pad(units, size)

    def _to_case(self, images: torch.Tensor, case_size: Sequence[int]) -> torch.Tensor:
        if self.image_size is not None:
            return resize(images, case_size, "probabilities")
        return images[(slice(None), slice(None), *[slice(0, int(s)) for s in case_size])]

    def _sample_case(self, units: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        case_size = units.shape[2:]
        masks = self._to_model(units.float(), self.model_size(case_size))
        device = next(network.parameters()).device
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(self.seed))  # each case from the seed
        # all of a case's noise at once, so that chunking (a memory setting) cannot change the images
        shape = (masks.shape[0], *self.sampler.latent_shape(masks.shape[2:]))
        noise = torch.randn(shape, generator=generator, device=device)
        images = []
        for lo in range(0, masks.shape[0], self.batch_size):
            hi = lo + self.batch_size
            images.append(self.sampler(masks[lo:hi], network, class_labels=self.class_labels, noise=noise[lo:hi],
                                       generator=generator))
        return self._to_case(torch.cat([convert_to_tensor(i, track_meta=False) for i in images]).float(), case_size)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """Images ``(B, num_samples * image_channels, *spatial)`` for one-hot masks ``inputs``
        ``(B, num_classes, *spatial)``, with the inputs' metadata."""
        if self.stages is not None:
            network = self.stages.network_for(network)
        outputs = []
        for case in inputs:
            case = convert_to_tensor(case, track_meta=False)
            units = to_network_units(case, self.spatial_dims, self.slice_axis)
            count = units.shape[0]
            # sample-major: sample k's slices (or volume) are units [k * count, (k + 1) * count)
            images = self._sample_case(units.repeat(self.num_samples, *[1] * (units.ndim - 1)), network)
            samples = [images[k * count : (k + 1) * count] for k in range(self.num_samples)]
            outputs.append(torch.cat(
                [from_network_units(sample, case.ndim, self.spatial_dims, self.slice_axis) for sample in samples]
            ))
        result = torch.stack(outputs).to(inputs.device)
        if isinstance(inputs, MetaTensor):
            result = MetaTensor(result, meta=inputs.meta, applied_operations=inputs.applied_operations)
            result.is_batch = inputs.is_batch
        return result
