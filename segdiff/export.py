"""Export a bundle's ``network_def`` for deployment with ``torch.export``.

MONAI's ``ckpt_export`` writes TorchScript, which cannot script ``DiffusionModelUNet``, and tracing loses its
``timesteps`` input. ``torch.export`` captures the whole forward pass ``network(image, timesteps)`` as an
``ExportedProgram`` that loads without the bundle, MONAI or segdiff (``torch.export.load(path).module()``), with a
dynamic batch dimension and, on request, dynamic spatial sizes (multiples of the network's down-sampling factor).

Every export is loaded back from disk and compared with the eager network before it is given its final name, so a
file at ``output`` always holds a program that matched. The bundle's merged config and its metadata travel inside
the file as extra files (``config.json``, ``metadata.json``), as MONAI's ``ckpt_export`` stores them. The weights'
model record (``models/model.json``, see :mod:`segdiff.engine.provenance`) is checked against the config before the
export and written beside the program (``network.pt2`` -> ``network.json``) and inside it (``model_record.json``),
with what the export checked, so a deployed program still says how it must be used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "EXTRA_FILES",
    "ExportReport",
    "export_bundle_network",
    "export_network",
    "example_inputs",
    "load_bundle_network",
    "load_exported",
    "max_abs_difference",
]

#: the extra files stored in every export: the merged bundle config and the bundle's metadata (JSON text)
EXTRA_FILES = ("config.json", "metadata.json", "model_record.json")


class ExportReport(NamedTuple):
    """What :func:`export_bundle_network` wrote and how closely the reloaded program matched the eager network."""

    path: str
    input_shape: tuple[int, ...]
    max_abs_diff: float
    checked_shapes: tuple[tuple[int, ...], ...]


def load_bundle_network(
    config_files: str | Sequence[str],
    weights: str | None = None,
    net_id: str = "network_def",
    overrides: Mapping[str, Any] | None = None,
    key: str | None = None,
):
    """Parse ``net_id`` from a bundle's config(s) and load its trained weights strictly.

    Args:
        config_files: one config file or a list merged in order (as ``--config_file`` of ``monai.bundle``).
        weights: a state dict saved with ``torch.save`` (the bundle's ``models/model.pt``); None keeps the initial
            weights.
        net_id: the config key of the network.
        overrides: config id -> value, applied after the files (e.g. ``{"num_classes": 3}``).
        key: for a checkpoint that nests several state dicts (``models/checkpoint.pt``), the entry to load, e.g.
            ``"ema_network"``.

    Returns:
        ``(network, parser)``: the network in eval mode on the CPU and the ``ConfigParser`` it came from.
    """
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"bundle config not found: {file}")
    parser = ConfigParser()
    parser.read_config(f=[str(f) for f in files])
    for name, value in (overrides or {}).items():
        parser[name] = value
    if net_id not in parser:
        raise ValueError(f"{', '.join(map(str, files))}: no key {net_id!r} to export")
    network = parser.get_parsed_content(net_id, instantiate=True)
    if not isinstance(network, torch.nn.Module):
        where = ", ".join(map(str, files))
        raise ValueError(f"{net_id!r} of {where} is a {type(network).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(network, weights, key)
    return network.eval(), parser


def _load_weights(network: torch.nn.Module, weights: str, key: str | None) -> None:
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights not found: {weights}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if key is not None:
        if not isinstance(state, Mapping) or key not in state:
            found = list(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{weights}: no entry {key!r} (found: {found})")
        state = state[key]
    elif isinstance(state, Mapping) and state and all(isinstance(v, Mapping) for v in state.values()):
        raise ValueError(
            f"{weights} is a checkpoint of several state dicts ({', '.join(state)}); name the one to export with "
            "key (the command line's --key), e.g. ema_network"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches: the config does not fit the weights
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ValueError(
            f"{weights} does not fit the network of the config (same overrides as in training?): {detail}"
        ) from error


def example_inputs(
    network: torch.nn.Module,
    spatial_shape: Sequence[int],
    batch_size: int = 2,
    num_train_timesteps: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(image, timesteps)`` for ``network(image, timesteps)``: a standard-normal image of shape
    ``(batch_size, network.in_channels, *spatial_shape)`` (a noised input is unbounded) and one random step per item."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((batch_size, network.in_channels, *spatial_shape), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return image.to(device), timesteps.to(device)


def export_network(
    network: torch.nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor],
    dynamic_batch: bool = True,
    spatial_multiple: int | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``network(image, timesteps)``.

    Args:
        network: the network, in eval mode.
        inputs: example ``(image, timesteps)``; with ``dynamic_batch`` their batch size must be at least 2 (torch.export
            specialises a size-1 dimension).
        dynamic_batch: let the program take any batch size.
        spatial_multiple: if set, let every spatial size be any multiple of it (the network's down-sampling factor,
            ``2 ** (levels - 1)``); None fixes the spatial sizes of ``inputs``.
    """
    image, timesteps = inputs
    if dynamic_batch and image.shape[0] < 2:
        raise ValueError(f"a dynamic batch needs an example batch of at least 2, got {image.shape[0]}")
    image_dims: dict[int, Any] = {}
    timestep_dims: dict[int, Any] = {}
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        image_dims[0] = timestep_dims[0] = batch
    if spatial_multiple:
        for axis, size in enumerate(image.shape[2:], start=2):
            if size % spatial_multiple:
                raise ValueError(
                    f"example spatial size {tuple(image.shape[2:])} is not a multiple of {spatial_multiple}"
                )
            image_dims[axis] = spatial_multiple * torch.export.Dim(f"blocks{axis - 2}", min=1)
    with torch.no_grad():
        return torch.export.export(
            network.eval(), (image, timesteps), dynamic_shapes=(image_dims or None, timestep_dims or None)
        )


def load_exported(path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load an export: the callable ``module(image, timesteps)`` and the JSON extra files stored with it."""
    extra = dict.fromkeys(EXTRA_FILES, "")
    program = torch.export.load(path, extra_files=extra)
    return program.module(), {name: json.loads(text) for name, text in extra.items() if text}


def max_abs_difference(exported: torch.nn.Module, network: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between the exported program's output and the eager network's on ``inputs``."""
    with torch.no_grad():
        return float((exported(*inputs) - network(*inputs)).abs().max())


def export_bundle_network(
    config_files: str | Sequence[str],
    weights: str | None,
    output: str,
    meta_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    net_id: str = "network_def",
    key: str | None = None,
    spatial_shape: Sequence[int] | None = None,
    dynamic_spatial: bool = False,
    device: str = "cpu",
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> ExportReport:
    """Export a bundle's trained network to ``output`` (``.pt2``) and check the file against the eager network.

    Args:
        config_files: the bundle config(s) the weights were trained or are served with, e.g. ``configs/inference.yaml``.
        weights: the state dict to load (``models/model.pt``); None exports the initial weights.
        output: the ``.pt2`` file to write; its folder is created.
        meta_file: metadata stored with the export; default: ``metadata.json`` beside the first config, if any.
        overrides: config id -> value, the same as in training (e.g. ``{"num_classes": 3}``).
        net_id: the config key of the network.
        key: the entry of a nested checkpoint to load (``"ema_network"`` for ``models/checkpoint.pt``).
        spatial_shape: example spatial size; default: the config's ``roi_size`` if set, else its ``image_size``.
        dynamic_spatial: accept any spatial size that is a multiple of ``2 ** (levels - 1)``, not only
            ``spatial_shape`` (for models trained on crops, sampled at each case's own size).
        device: where to export; the program runs on that device.
        tolerance: the largest absolute difference to the eager output that passes the check.
        overwrite: replace an existing ``output``.

    Returns:
        an :class:`ExportReport`. Raises ``RuntimeError`` (and writes nothing) if the reloaded program differs from
        the eager network by more than ``tolerance``.
    """
    if not str(output).endswith(".pt2"):
        raise ValueError(f"{output}: an exported program is saved as a .pt2 file; name it so")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite (--overwrite) to replace it")
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    network, parser = load_bundle_network(files, None, net_id=net_id, overrides=overrides)
    record = None
    if weights is not None:
        if key is None and "model_record" in parser:  # trained with the settings this config gives? (before any work)
            record = parser.get_parsed_content("model_record").verify(network, weights)
        _load_weights(network, weights, key)
    if not hasattr(network, "in_channels"):
        raise ValueError(f"{net_id!r} has no in_channels: export-network exports a diffusion network(image, timesteps)")
    network = network.to(device)
    if spatial_shape is None:
        spatial_shape = _config_spatial_shape(parser, files)
    spatial_shape = tuple(int(s) for s in spatial_shape)
    num_train_timesteps = 1000
    if "num_train_timesteps" in parser:
        num_train_timesteps = int(parser.get_parsed_content("num_train_timesteps"))
    # each level of a DiffusionModelUNet halves the size: sizes must divide by 2 ** (levels - 1)
    multiple = 2 ** (len(network.block_out_channels) - 1) if hasattr(network, "block_out_channels") else 1
    if any(s % multiple for s in spatial_shape):
        raise ValueError(f"spatial shape {spatial_shape} must be a multiple of {multiple} in every dimension")

    inputs = example_inputs(network, spatial_shape, 2, num_train_timesteps, device=device)
    program = export_network(network, inputs, spatial_multiple=multiple if dynamic_spatial else None)

    if meta_file is None:
        candidate = os.path.join(os.path.dirname(os.path.abspath(files[0])), "metadata.json")
        meta_file = candidate if os.path.isfile(candidate) else None
    extra = {"config.json": json.dumps(parser.get(), default=str)}
    if record is not None:
        extra["model_record.json"] = json.dumps(record)
    if meta_file is not None:
        with open(meta_file) as f:
            extra["metadata.json"] = json.dumps(json.load(f))

    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".partial-{os.path.basename(output)}")  # torch.export wants the .pt2 suffix
    torch.export.save(program, partial, extra_files=extra)
    try:
        # the round trip a user makes: load from disk, run a batch size and (if dynamic) a spatial size not exported
        exported, _ = load_exported(partial)
        shapes = [(3, *spatial_shape)]
        if dynamic_spatial:
            shapes.append((1, *(s + multiple for s in spatial_shape)))
        worst = 0.0
        for seed, (batch, *spatial) in enumerate(shapes, start=1):
            check = example_inputs(network, spatial, batch, num_train_timesteps, seed=seed, device=device)
            worst = max(worst, max_abs_difference(exported, network, check))
        if not worst <= tolerance:
            raise RuntimeError(
                f"the exported program differs from the eager network by {worst:.3g} (> tolerance {tolerance:g}); "
                f"{output} was not written"
            )
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    checked = tuple((b, network.in_channels, *s) for b, *s in shapes)
    _write_export_record(record, weights, output, inputs, checked, worst, dynamic_spatial)
    return ExportReport(str(output), tuple(inputs[0].shape), worst, checked)


def _write_export_record(record, weights, output, inputs, checked, worst, dynamic_spatial) -> None:
    """``<output>.json``: the weights' model record (if any) and what the export checked."""
    from segdiff.engine.provenance import RECORD_FORMAT, record_path, write_json_atomic

    exported = dict(record) if record is not None else {"format": RECORD_FORMAT, "settings": {}, "note": "no record"}
    exported["export"] = {
        "weights": None if weights is None else os.path.abspath(weights),
        "program": os.path.basename(output),
        "example_input_shape": list(inputs[0].shape),
        "checked_input_shapes": [list(c) for c in checked],
        "max_abs_diff": worst,
        "dynamic_batch": True,
        "dynamic_spatial": bool(dynamic_spatial),
    }
    write_json_atomic(exported, record_path(output))


def _config_spatial_shape(parser, files: Sequence[str]) -> tuple[int, ...]:
    for name in ("roi_size", "image_size"):
        if name in parser:
            value = parser.get_parsed_content(name)
            if value:
                return tuple(value)
    raise ValueError(f"{', '.join(map(str, files))}: neither roi_size nor image_size is set; give spatial_shape")
