"""Writing generated samples as NIfTI on the grid of the case they were generated for."""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SaveImage

from segdiff.data.naming import output_case_name  # the naming lives in data; re-exported here

__all__ = ["SaveSamplesd", "check_outputs_free", "existing_outputs", "output_case_name", "sample_output_paths"]


def sample_output_paths(source: str | os.PathLike, output_dir: str, num_samples: int, postfix: str) -> list[str]:
    """Where the samples of one case go: ``<output_dir>/<case>_<postfix>.nii.gz`` for one sample, else
    ``<case>_sample<k>_<postfix>.nii.gz`` for k = 0..num_samples-1. ``<case>`` is the source file's name."""
    case = output_case_name(source)
    if num_samples == 1:
        return [os.path.join(output_dir, f"{case}_{postfix}.nii.gz")]
    return [os.path.join(output_dir, f"{case}_sample{k}_{postfix}.nii.gz") for k in range(num_samples)]


def existing_outputs(
    entries: Iterable[Mapping[str, Any]], key: str, output_dir: str, num_samples: int, postfix: str
) -> list[str]:
    """The output files of ``entries`` (source file under ``key``) that already exist."""
    found = []
    for entry in entries:
        found += [p for p in sample_output_paths(entry[key], output_dir, num_samples, postfix) if os.path.exists(p)]
    return found


def check_outputs_free(
    entries: Iterable[Mapping[str, Any]], key: str, output_dir: str, num_samples: int, postfix: str, overwrite: bool
) -> None:
    """Stop before sampling if outputs of an earlier run would be replaced and ``overwrite`` is not set."""
    if overwrite:
        return
    found = existing_outputs(entries, key, output_dir, num_samples, postfix)
    if found:
        raise FileExistsError(
            f"{len(found)} output file(s) already exist, e.g. {found[0]}. Set 'overwrite' to true to replace them, "
            "or choose another 'output_dir'."
        )


class SaveSamplesd(MapTransform):
    """Save the ``num_samples`` samples stacked in ``key`` (sample-major channels) as one NIfTI file each.

    The tensor's metadata (the source case's affine and file name) decides the grid and the name; see
    :func:`sample_output_paths`. A sample with one channel is written as a 3D (or 2D) image, with several channels
    as a 4D image with channels last.

    Args:
        keys: keys of the stacked samples (``(num_samples * C, *spatial)`` MetaTensors).
        output_dir: folder of the outputs.
        num_samples: samples stacked per case.
        output_postfix: the name's suffix, e.g. ``"image"`` -> ``<case>_image.nii.gz``.
        output_dtype: data type written.
        overwrite: replace existing files; otherwise an existing file stops the run with an error naming it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        num_samples: int = 1,
        output_postfix: str = "image",
        output_dtype: Any = "float32",
        overwrite: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = str(output_dir)
        self.num_samples = int(num_samples)
        self.output_postfix = output_postfix
        self.overwrite = overwrite
        self.writer = SaveImage(
            output_dir=self.output_dir,
            output_postfix="",
            output_ext=".nii.gz",
            separate_folder=False,
            resample=False,
            output_dtype=output_dtype,
            print_log=False,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            stacked = d[key]
            if not isinstance(stacked, MetaTensor):
                raise TypeError(f"SaveSamplesd needs a MetaTensor under {key!r} (it carries the case's affine).")
            source = stacked.meta.get("filename_or_obj", "case")
            paths = sample_output_paths(source, self.output_dir, self.num_samples, self.output_postfix)
            if stacked.shape[0] % self.num_samples:
                raise ValueError(f"{key!r} has {stacked.shape[0]} channels, not a multiple of num_samples={self.num_samples}.")
            channels = stacked.shape[0] // self.num_samples
            existing = [p for p in paths if os.path.exists(p)]
            if existing and not self.overwrite:  # checked for all samples before any is written
                raise FileExistsError(f"{existing[0]} exists; set 'overwrite' to true to replace it.")
            os.makedirs(self.output_dir, exist_ok=True)
            for k, path in enumerate(paths):
                sample = stacked[k * channels : (k + 1) * channels]
                self.writer(sample, meta_data=stacked.meta, filename=path[: -len(".nii.gz")])
        return d
