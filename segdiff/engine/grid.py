"""Moving between a case's own grid and the network's input grid (2D slices of volumes, resized to the model size).

Shared by the diffusion sampler and the reference segmenters, so every model sees cases the way it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Resize

__all__ = ["RESIZE_ROLES", "from_network_units", "resize", "to_network_units"]


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


#: how each kind of tensor is resized: images as in training (MONAI ``Resized``: linear, Gaussian anti-aliasing when
#: shrinking), label maps and encoded masks nearest (classes stay classes), probabilities/logits/samples linear
RESIZE_ROLES = ("image", "mask", "probabilities")
_ROLE_ALIASES = {"linear": "image", "nearest": "mask"}


def resize(x: torch.Tensor, size: Sequence[int] | None, role: str = "image") -> torch.Tensor:
    """Resize a batch ``(N, C, *spatial)`` to ``size`` the way its role asks (see :data:`RESIZE_ROLES`).

    ``"image"`` uses MONAI's ``Resize(mode="bilinear"/"trilinear", anti_aliasing=True)``, exactly what the bundles'
    training pipelines apply (``Resized``), so a model sees an image condition at inference as it saw it in training;
    ``"mask"`` is nearest-neighbour; ``"probabilities"`` is plain linear interpolation (outputs back to a case's grid).
    """
    role = _ROLE_ALIASES.get(role, role)
    if role not in RESIZE_ROLES:
        raise ValueError(f"resize role must be one of {RESIZE_ROLES}, got {role!r}.")
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    if role == "mask":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    linear = "bilinear" if x.ndim == 4 else "trilinear"
    if role == "probabilities":
        return F.interpolate(x, size=tuple(size), mode=linear, align_corners=False)
    n, c = x.shape[:2]
    resizer = Resize(spatial_size=tuple(size), mode=linear, anti_aliasing=True)
    out = resizer(x.reshape(n * c, *x.shape[2:]))  # MONAI transforms are per case: channels of all cases at once
    out = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
    return out.reshape(n, c, *size).to(x.dtype)
