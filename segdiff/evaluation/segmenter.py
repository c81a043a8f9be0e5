"""Running a segmentation network over whole cases, and scoring label maps by per-class Dice.

A reference segmenter trained on real images is the judge of mask -> image models (faithfulness: does the generated
image show the anatomy of its mask?). It sees cases the way the diffusion model does: 2D models slice by slice,
every slice resized to the model's ``image_size`` as training resized it (``segdiff.engine.grid.resize``, role
``"image"``) and the logits resized back to the case's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from segdiff.engine.grid import from_network_units, resize, to_network_units
from segdiff.transforms.mask import encode_probabilities

__all__ = ["SegmenterInferer", "per_class_dice", "per_class_iou", "segment_case"]


class SegmenterInferer:
    """``inferer(inputs, network)`` for a plain segmentation network over whole cases: class probabilities (softmax)
    on each case's own grid, ``(B, num_classes, *spatial)``; 2D networks run slice by slice over volumes, every slice
    resized to ``image_size`` and the logits back.

    Args:
        spatial_dims: 2 or 3, the network's spatial dimensions.
        image_size: the size the network was trained on (None: the case's own size).
        slice_axis: for a 2D network and 3D input, the spatial axis the volume is cut along.
        batch_size: network inputs per forward pass.
        as_target_encoding: map the probabilities to the value range of a diffusion segmentation member
            (``segdiff.transforms.encode_probabilities``), so the ensemble post-transforms (``num_members=1``) apply.
        model_record: a :class:`segdiff.engine.ModelRecord` with the weights' path, checked once before the first
            case (MONAI Label loads the weights itself and skips the config's ``initialize``).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int] | None,
        slice_axis: int = 2,
        batch_size: int = 32,
        as_target_encoding: bool = False,
        model_record: Any = None,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.image_size = image_size
        self.slice_axis = slice_axis
        self.batch_size = batch_size
        self.as_target_encoding = as_target_encoding
        self.model_record = model_record

    @torch.no_grad()
    def probabilities(self, network: torch.nn.Module, case: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(num_classes, *spatial)`` of one case ``(C, *spatial)``."""
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        units = to_network_units(torch.as_tensor(case).float(), self.spatial_dims, self.slice_axis)
        case_size = units.shape[2:]
        logits = []
        for lo in range(0, units.shape[0], self.batch_size):
            chunk = resize(units[lo : lo + self.batch_size], self.image_size, "image").to(device)
            logits.append(resize(network(chunk).float(), case_size, "probabilities").cpu())
        network.train(was_training)
        return from_network_units(torch.cat(logits), case.ndim, self.spatial_dims, self.slice_axis).softmax(dim=0)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        if self.model_record is not None:
            self.model_record.verify_once(network)
        out = torch.stack([self.probabilities(network, case) for case in inputs]).to(inputs.device)
        if self.as_target_encoding:
            out = encode_probabilities(out, "target")
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out


def segment_case(
    segmenter: torch.nn.Module,
    image: torch.Tensor,
    spatial_dims: int,
    image_size: Sequence[int] | None,
    slice_axis: int = 2,
    batch_size: int = 32,
) -> torch.Tensor:
    """Label map ``(*spatial)`` (int64) of one case ``image (C, *spatial)`` on the case's own grid."""
    inferer = SegmenterInferer(spatial_dims, image_size, slice_axis, batch_size)
    return inferer.probabilities(segmenter, torch.as_tensor(image)).argmax(dim=0)


def _per_class_overlap(metric, prediction, truth, num_classes: int) -> np.ndarray:
    prediction, truth = torch.as_tensor(prediction).long().cpu(), torch.as_tensor(truth).long().cpu()
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from truth shape {tuple(truth.shape)}.")
    as_onehot = lambda x: one_hot(x[None, None], num_classes, dim=1)  # noqa: E731
    return metric(as_onehot(prediction), as_onehot(truth), include_background=False, ignore_empty=True)[0].numpy()


def per_class_dice(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of every foreground class ``1..num_classes-1`` between two label maps of one case (MONAI's
    ``compute_dice``); NaN where the class is absent from the truth."""
    return _per_class_overlap(compute_dice, prediction, truth, num_classes)


def per_class_iou(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """IoU of every foreground class ``1..num_classes-1`` between two label maps of one case (MONAI's
    ``compute_iou``); NaN where the class is absent from the truth. The twin of :func:`per_class_dice`."""
    return _per_class_overlap(compute_iou, prediction, truth, num_classes)
