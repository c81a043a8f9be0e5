"""Mask-level variety: random affine and elastic deformation of label maps, so that one mask yields varied pairs.

MONAI's ``RandAffine`` works in 2D and 3D, its elastic deformations come as two transforms with different parameters
(``Rand2DElastic``: a control-point grid; ``Rand3DElastic``: a smoothed random field). The transforms here pick the
one that fits each input, so a single config serves 2D masks and 3D volumes. Label maps are resampled with nearest
interpolation and zero padding (background), so the output holds only the input's class values.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAffined,
    Randomizable,
    Transform,
)
from monai.utils import MAX_SEED, ensure_tuple_rep

__all__ = ["DEFAULT_ELASTIC_2D", "DEFAULT_ELASTIC_3D", "RandMaskDeform", "RandMaskDeformd"]

#: ``Rand2DElastic`` arguments: control points every 16 pixels, moved by N(0, 1..2 pixels)
DEFAULT_ELASTIC_2D = {"spacing": 16, "magnitude_range": (1.0, 2.0)}
#: ``Rand3DElastic`` arguments: a uniform random field smoothed with sigma 5..7 voxels and scaled by 100..250, which
#: moves voxels by about 1 voxel (standard deviation)
DEFAULT_ELASTIC_3D = {"sigma_range": (5.0, 7.0), "magnitude_range": (100.0, 250.0)}


def _per_axis(value: float | Sequence | None) -> Sequence | None:
    """A number means the same range on every axis (MONAI's transforms would apply it to the first axis only)."""
    if value is None or isinstance(value, (int, float)) and value == 0:
        return None
    return ensure_tuple_rep(value, 3) if isinstance(value, (int, float)) else value


class RandMaskDeformd(Randomizable, MapTransform):
    """Randomly deform label maps (and images on the same grid) with one affine and one elastic deformation.

    All keys of a sample get the same deformation of their content, on their own grid: the output has the input's
    shape and affine (MONAI's spatial transforms would move the affine along; here the anatomy moves). A 2D input
    ``(C, H, W)`` uses ``Rand2DElastic``, a 3D input ``(C, D, H, W)`` ``Rand3DElastic``.

    Args:
        keys: keys to deform, e.g. ``["label", "image"]``.
        affine_prob: probability of the affine part (0 switches it off).
        rotate_range: largest rotation in radians; a number applies to every rotation axis (one in 2D, three in 3D),
            a sequence is MONAI's per-axis form.
        scale_range: largest relative scaling (0.1: 0.9..1.1), a number for every axis or one per axis.
        translate_range: largest shift in voxels, a number for every axis or one per axis.
        elastic_prob: probability of the elastic part (0 switches it off).
        elastic_2d: ``Rand2DElastic`` arguments for 2D inputs (``spacing``, ``magnitude_range``); default
            :data:`DEFAULT_ELASTIC_2D`.
        elastic_3d: ``Rand3DElastic`` arguments for 3D inputs (``sigma_range``, ``magnitude_range``); default
            :data:`DEFAULT_ELASTIC_3D`.
        mode: interpolation per key: ``"nearest"`` for label maps (default), ``"bilinear"`` for images.
        padding_mode: padding per key: ``"zeros"`` (background) for label maps (default), ``"border"`` for images.
    """

    def __init__(
        self,
        keys: KeysCollection,
        affine_prob: float = 0.0,
        rotate_range: float | Sequence | None = 0.1,
        scale_range: float | Sequence | None = 0.1,
        translate_range: float | Sequence | None = 0.0,
        elastic_prob: float = 0.0,
        elastic_2d: Mapping[str, Any] | None = None,
        elastic_3d: Mapping[str, Any] | None = None,
        mode: str | Sequence[str] = "nearest",
        padding_mode: str | Sequence[str] = "zeros",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        for name, prob in (("affine_prob", affine_prob), ("elastic_prob", elastic_prob)):
            if not 0.0 <= float(prob) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {prob}.")
        common = {"keys": keys, "mode": mode, "padding_mode": padding_mode, "allow_missing_keys": allow_missing_keys}
        self.affine = RandAffined(
            prob=float(affine_prob),
            rotate_range=_per_axis(rotate_range),
            scale_range=_per_axis(scale_range),
            translate_range=_per_axis(translate_range),
            **common,
        )
        self.elastic = {
            3: Rand2DElasticd(prob=float(elastic_prob), **{**DEFAULT_ELASTIC_2D, **dict(elastic_2d or {})}, **common),
            4: Rand3DElasticd(prob=float(elastic_prob), **{**DEFAULT_ELASTIC_3D, **dict(elastic_3d or {})}, **common),
        }

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for child in (self.affine, *self.elastic.values()):
            child.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """The child transforms draw their own parameters (seeded from this transform's state)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ndim = d[keys[0]].ndim
        if ndim not in self.elastic:
            shape = tuple(d[keys[0]].shape)
            raise ValueError(f"RandMaskDeformd expects (C, H, W) or (C, D, H, W) inputs, got shape {shape}.")
        grids = {k: d[k].meta for k in keys if isinstance(d[k], MetaTensor)}
        d = self.elastic[ndim](self.affine(d))
        for key, meta in grids.items():  # MONAI moves the affine with the content; the content moves on its grid
            d[key] = MetaTensor(d[key].as_tensor(), meta=deepcopy(meta))
        return d


class RandMaskDeform(Randomizable, Transform):
    """Array version of :class:`RandMaskDeformd` for one label map ``(1, *spatial)`` (nearest, zero padding); the
    arguments are those of :class:`RandMaskDeformd` without ``keys``, ``mode`` and ``padding_mode``."""

    backend = [torch.Tensor]

    def __init__(self, **kwargs: Any) -> None:
        self.deform = RandMaskDeformd(keys="mask", **kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.deform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Drawn by the dictionary version."""

    def __call__(self, mask: Any) -> Any:
        return self.deform({"mask": mask})["mask"]
