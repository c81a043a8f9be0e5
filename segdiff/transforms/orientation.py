"""A guard in the inference pipelines: loaded images must lie in the voxel orientation the weights were trained on.

The configs' ``initialize`` checks every input file before sampling (:meth:`segdiff.engine.ModelRecord.
check_orientation`); MONAI Label's ``/infer`` and the ``evaluate.yaml`` configs skip ``initialize`` but run the
``preprocessing`` chain, so this transform repeats the check there, on each loaded image's affine."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from segdiff.data.checks import voxel_orientation


class RequireOrientationd(MapTransform):
    """Refuse an image under ``keys`` whose affine gives another voxel orientation than the training images of the
    weights at ``weights_path`` (their record's ``data.orientation``, read at each call, so weights written after the
    pipeline was built are checked too). Images without an affine (plain arrays, PNG), and weights that are missing
    or have no such record entry, pass unchanged."""

    def __init__(self, keys: KeysCollection, weights_path: str | os.PathLike, allow_missing_keys: bool = False) -> None:
        from segdiff.engine.provenance import ModelRecord

        super().__init__(keys, allow_missing_keys)
        self.record = ModelRecord({}, weights_path=weights_path)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        trained = self.record.trained_orientation()
        if not trained:
            return d
        for key in self.key_iterator(d):
            affine = getattr(d[key], "affine", None)
            codes = None if affine is None else voxel_orientation(affine)
            if codes is not None and codes != trained:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", "the loaded image")
                raise self.record.orientation_error([f"{name} ({codes})"], str(key))
        return d
