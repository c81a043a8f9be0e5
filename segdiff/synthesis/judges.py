"""Judges: segmenters that re-segment generated images for the quality filter.

A judge is a callable ``judge(image) -> label map``: ``image`` is one generated case ``(C, *spatial)`` on its mask's
grid, scaled as the models were trained ([-1, 1]); the result is an integer label map ``(*spatial)`` on the same grid.
``describe()`` names what decides its output (kind, the weights' digest, overrides), stored with the run's settings;
the weights' path is left out, so that a moved bundle folder still resumes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from segdiff.data.inputs import require_file
from segdiff.errors import ModelMismatchError
from segdiff.evaluation.segmenter import SegmenterInferer
from segdiff.synthesis.records import file_digest
from segdiff.transforms.ensemble import FuseEnsemble

__all__ = ["JUDGES", "DiffusionEnsembleJudge", "SegmenterJudge", "build_judge", "load_weights"]

#: ``unet``: a plain segmentation network (evaluate.yaml's reference segmenter). ``image_to_mask``: the diffusion
#: segmentation ensemble of this repository's image_to_mask bundle.
JUDGES = ("unet", "image_to_mask")


def load_weights(network: torch.nn.Module, path: str, device: torch.device | str | None = None) -> torch.nn.Module:
    """Load a state dict saved by the bundles (a plain state dict, or one wrapped as ``{"model": ...}``)."""
    state = torch.load(path, map_location=device or "cpu", weights_only=True)
    if isinstance(state, Mapping) and set(state) == {"model"}:
        state = state["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelMismatchError(f"{path}: the weights do not fit the network defined in the config: {error}") from error
    return network


class SegmenterJudge:
    """A segmentation network trained on real images as judge: 2D networks run slice by slice over volumes, every
    slice resized to ``image_size`` and the logits back (as in evaluate.yaml's faithfulness report).

    Args:
        network: the network (e.g. evaluate.yaml's ``segmenter_def``: a MONAI UNet with ``num_classes`` outputs).
        weights: its trained state dict, e.g. ``models/segmenter.pt`` written by evaluate.yaml.
        spatial_dims: 2 or 3, the network's spatial dimensions.
        image_size: the size it was trained on (None: each case's own size).
        slice_axis: for a 2D network and 3D cases, the axis cases are sliced along.
        batch_size: network inputs per forward pass.
        device: where it runs.
        record: the :class:`segdiff.engine.ModelRecord` the weights must match (evaluate.yaml writes
            ``models/segmenter.json`` beside them); checked before any work.
        missing_hint: what the error says to do when ``weights`` is missing (None: mask_to_image's evaluate.yaml).
    """

    kind = "unet"

    def __init__(
        self,
        network: torch.nn.Module,
        weights: str,
        spatial_dims: int,
        image_size: Sequence[int] | None,
        slice_axis: int = 2,
        batch_size: int = 32,
        device: torch.device | str | None = None,
        record: Any = None,
        missing_hint: str | None = None,
    ) -> None:
        require_file(
            weights,
            "judge weights",
            missing_hint
            or "run configs/evaluate.yaml once (it trains models/segmenter.pt on the real training split) or set "
            "judge_path",
        )
        self.weights = str(weights)
        if record is not None:
            record.verify(network, self.weights)
        self.network = load_weights(network, self.weights, device).to(device or "cpu").eval()
        self.inferer = SegmenterInferer(spatial_dims, image_size, slice_axis, batch_size)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": file_digest(self.weights)}

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.inferer.probabilities(self.network, torch.as_tensor(image)).argmax(dim=0)


class DiffusionEnsembleJudge:
    """A trained image_to_mask bundle as judge: its ensemble of diffusion samples, fused into one label map.

    The bundle's ``configs/inference.yaml`` is read with ``overrides`` (any of its keys, e.g. ``num_members``,
    ``num_inference_steps``, ``fusion``, ``bundle_root``, network sizes); its ``network_def`` is loaded from its
    ``model_path`` and its ``inferer`` (the sampler) and ``fusion`` are used as in its own inference.

    Args:
        bundle_dir: the image_to_mask bundle folder (its ``bundle_root`` unless overridden).
        overrides: config keys to set, as on its command line.
        device: where it runs.
        config: the config file inside the bundle.
    """

    kind = "image_to_mask"

    def __init__(
        self,
        bundle_dir: str,
        overrides: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        config: str = "configs/inference.yaml",
    ) -> None:
        from monai.bundle import ConfigParser

        config_path = require_file(
            os.path.join(bundle_dir, config),
            "image_to_mask config",
            "set judge_bundle to the image_to_mask bundle folder",
        )
        parser = ConfigParser()
        parser.read_config(config_path)
        parser["bundle_root"] = str(bundle_dir)
        for key, value in dict(overrides or {}).items():
            parser[key] = value
        parser["device"] = torch.device(device or "cpu")
        self.overrides = dict(overrides or {})
        self.weights = require_file(
            str(parser.get_parsed_content("model_path")),
            "judge weights",
            "train the image_to_mask bundle first, or set judge_overrides' bundle_root or model_path",
        )
        network = parser.get_parsed_content("network")
        parser.get_parsed_content("model_record").verify(network)  # trained as this config says, before any work
        self.network = load_weights(network, self.weights, device).eval()
        self.sampler = parser.get_parsed_content("inferer")
        self.sampler.progress = False
        # the members the sampler draws (its num_samples), fused as the bundle's own inference does
        self.fuse = FuseEnsemble(self.sampler.num_samples, parser.get_parsed_content("fusion"))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": file_digest(self.weights), "overrides": self.overrides}

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        device = next(self.network.parameters()).device
        members = self.sampler(torch.as_tensor(image).float()[None].to(device), self.network)[0]
        return self.fuse(members)[0].long().cpu()


def build_judge(
    judge: str,
    network: torch.nn.Module,
    weights: str,
    bundle_dir: str,
    overrides: Mapping[str, Any] | None,
    num_classes: int,
    image_channels: int,
    spatial_dims: int,
    image_size: Sequence[int] | None,
    slice_axis: int = 2,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    record: Any = None,
    missing_hint: str | None = None,
) -> SegmenterJudge | DiffusionEnsembleJudge:
    """The judge named by ``judge`` (one of :data:`JUDGES`).

    ``unet`` uses ``network`` with ``weights`` (checked against ``record``); ``image_to_mask`` reads the bundle at ``bundle_dir`` with
    ``overrides``, defaulting its ``num_classes``, ``image_channels``, ``spatial_dims``, ``image_size`` and
    ``slice_axis`` to the generator's (the same data), so only what differs needs overriding. ``missing_hint``: for
    ``unet``, what to do when ``weights`` is missing (see :class:`SegmenterJudge`).
    """
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {JUDGES}, got {judge!r}.")
    if judge == "unet":
        return SegmenterJudge(network, weights, spatial_dims, image_size, slice_axis, batch_size, device, record,
                              missing_hint)
    shared = {
        "num_classes": num_classes,
        "image_channels": image_channels,
        "spatial_dims": spatial_dims,
        "image_size": None if image_size is None else list(image_size),
        "slice_axis": slice_axis,
    }
    return DiffusionEnsembleJudge(bundle_dir, {**shared, **dict(overrides or {})}, device)
