"""Draw 2D training slices from 3D volumes on the fly, so a 2D model trains directly on NIfTI volumes."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor

__all__ = ["RandSliced"]


class RandSliced(Randomizable, MapTransform):
    """Pick ``num_samples`` random slices along ``axis`` from channel-first 3D volumes and return them as 2D samples.

    All keys of one sample get the same slice. Inputs that are already 2D (``(C, H, W)``) are returned ``num_samples``
    times (each copy later gets its own noise, timestep and ablation), so one pipeline trains on 3D volumes and 2D
    images alike and a batch always holds ``cases x num_samples`` network inputs. Returns a list of dictionaries (like MONAI's ``RandCrop*Samples``
    transforms), which MONAI's data loaders flatten into the batch. Slices are returned as plain tensors: a 2D slice of a
    3D affine has no meaningful 2D affine, and training does not need one.

    Args:
        keys: keys of the volumes to slice.
        axis: spatial axis to slice along (0, 1 or 2; for RAS NIfTI volumes 2 is axial).
        num_samples: slices drawn per volume.
        foreground_key: if given, only slices where this key (a label map) holds a non-zero voxel are drawn,
            e.g. ``"label"`` to skip empty slices; if a volume has no foreground, any slice may be drawn.
        spatial_dims: spatial dims of the model being trained: 2 slices volumes, 3 passes them through unchanged
            (so one pipeline serves both; a 2D input for a 3D model is an error).
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = 2,
        num_samples: int = 1,
        foreground_key: str | None = None,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.axis = axis
        self.spatial_dims = spatial_dims
        self.num_samples = num_samples
        self.foreground_key = foreground_key
        self._indices: list[int] = []

    def candidate_slices(self, data: Mapping[Hashable, Any], num_slices: int) -> np.ndarray:
        """Indices of the slices eligible for drawing."""
        if self.foreground_key is None:
            return np.arange(num_slices)
        label = convert_to_tensor(data[self.foreground_key], track_meta=False)
        reduce_dims = [d for d in range(label.ndim) if d != self.axis + 1]
        has_foreground = (label != 0).sum(dim=reduce_dims) > 0
        indices = np.flatnonzero(has_foreground.cpu().numpy())
        return indices if indices.size else np.arange(num_slices)

    def randomize(self, candidates: np.ndarray) -> None:  # type: ignore[override]
        self._indices = self.R.choice(candidates, size=self.num_samples, replace=True).tolist()

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]] | dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ndim = d[keys[0]].ndim
        if self.spatial_dims == 3:
            if ndim != 4:
                raise ValueError(f"a 3D model needs (C, D, H, W) volumes, got shape {tuple(d[keys[0]].shape)}.")
            return d
        if ndim == 3:  # (C, H, W): already 2D
            return [dict(d) for _ in range(self.num_samples)]
        if ndim != 4:
            raise ValueError(f"RandSliced expects (C, H, W) or (C, D, H, W) inputs, got shape {tuple(d[keys[0]].shape)}.")
        num_slices = d[keys[0]].shape[self.axis + 1]
        self.randomize(self.candidate_slices(d, num_slices))
        samples = []
        for index in self._indices:
            sample = dict(d)
            for key in keys:
                sample[key] = convert_to_tensor(d[key], track_meta=False).select(self.axis + 1, index).clone()
            sample["slice_index"] = index
            samples.append(sample)
        return samples
