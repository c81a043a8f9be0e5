"""Moving between a case's own grid and the network's input grid (2D slices of volumes, resized to the model size).

Shared by the diffusion sampler and the reference segmenters, so every model sees cases the way it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["from_network_units", "resize", "to_network_units"]


def to_network_units(case: torch.Tensor, spatial_dims: int, slice_axis: int = 2) -> torch.Tensor:
    """One case ``(C, *spatial)`` -> network inputs ``(N, C, *spatial_net)``.

    A 2D network over a 3D volume gets its slices along ``slice_axis`` (N = number of slices); otherwise N = 1.
    """
    if spatial_dims == 2 and case.ndim == 4:
        return case.movedim(slice_axis + 1, 0)
    if case.ndim != spatial_dims + 1:
        hint = " (or a 3D volume, which is sliced)" if spatial_dims == 2 else ""
        raise ValueError(
            f"a {spatial_dims}D model needs channel-first inputs with {spatial_dims} spatial dims{hint}; "
            f"got shape {tuple(case.shape)}."
        )
    return case[None]


def from_network_units(units: torch.Tensor, case_ndim: int, spatial_dims: int, slice_axis: int = 2) -> torch.Tensor:
    """Inverse of :func:`to_network_units`: ``(N, C, *spatial_net)`` -> ``(C, *spatial)`` of one case."""
    if spatial_dims == 2 and case_ndim == 4:
        return units.movedim(0, slice_axis + 1)
    return units[0]


def resize(x: torch.Tensor, size: Sequence[int] | None, mode: str = "linear") -> torch.Tensor:
    """Resize a batch ``(N, C, *spatial)`` to ``size``; ``mode`` is ``"nearest"`` (label maps, one-hot masks) or
    ``"linear"`` (bi/trilinear; antialiased in 2D, as MONAI's ``Resized(anti_aliasing=True)`` does for training)."""
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    linear = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=linear, align_corners=False, antialias=x.ndim == 4)
