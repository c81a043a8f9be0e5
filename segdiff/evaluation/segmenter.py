"""Running a segmentation network over whole cases, and scoring label maps by per-class Dice.

A reference segmenter trained on real images is the judge of mask -> image models (faithfulness: does the generated
image show the anatomy of its mask?). It sees cases the way the diffusion model does: 2D models slice by slice,
every slice resized to the model's ``image_size`` and the logits resized back to the case's grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from segdiff.engine.grid import from_network_units, resize, to_network_units

__all__ = ["per_class_dice", "segment_case"]


@torch.no_grad()
def segment_case(
    segmenter: torch.nn.Module,
    image: torch.Tensor,
    spatial_dims: int,
    image_size: Sequence[int] | None,
    slice_axis: int = 2,
    batch_size: int = 32,
) -> torch.Tensor:
    """Label map ``(*spatial)`` (int64) of one case ``image (C, *spatial)`` on the case's own grid."""
    device = next(segmenter.parameters()).device
    was_training = segmenter.training
    segmenter.eval()
    units = to_network_units(torch.as_tensor(image).float(), spatial_dims, slice_axis)
    case_size = units.shape[2:]
    logits = []
    for lo in range(0, units.shape[0], batch_size):
        chunk = resize(units[lo : lo + batch_size], image_size, "linear").to(device)
        logits.append(resize(segmenter(chunk).float(), case_size, "linear").cpu())
    segmenter.train(was_training)
    probabilities = from_network_units(torch.cat(logits), image.ndim, spatial_dims, slice_axis)
    return probabilities.argmax(dim=0)


def per_class_dice(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of every foreground class ``1..num_classes-1`` between two label maps of one case (MONAI's
    ``compute_dice``); NaN where the class is absent from the truth."""
    prediction, truth = torch.as_tensor(prediction).long().cpu(), torch.as_tensor(truth).long().cpu()
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from truth shape {tuple(truth.shape)}.")
    as_onehot = lambda x: one_hot(x[None, None], num_classes, dim=1)  # noqa: E731
    dice = compute_dice(as_onehot(prediction), as_onehot(truth), include_background=False, ignore_empty=True)
    return dice[0].numpy()
