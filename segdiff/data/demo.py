"""A small real data set that installs offline: the MNI ICBM152 2009a template and its tissue classes.

nilearn's wheel ships the symmetric MNI ICBM152 2009a template (T1, grey- and white-matter probability
maps, 197 x 233 x 189 voxels at 1 mm, RAS). From it we derive a 4-class tissue map

    brain = T1 > 0;  CSF = clip(1 - GM - WM, 0, 1) inside the brain
    label = argmax([not brain, CSF, GM, WM])  ->  0 background, 1 CSF, 2 grey matter, 3 white matter

(mean T1 rises CSF < GM < WM, as in real T1-weighted MRI) and cut it into axial slabs, each written as its
own NIfTI pair. Slices of one volume are correlated, so the splits are made by SLAB, never by slice.

Slab assignment for ``num_slabs = n`` (slab 0 is the most inferior): validation = slab ``n // 2``,
test = slabs ``n // 4`` and ``3 * n // 4`` (never adjacent to each other), training = the rest. For the
default ``n = 10``: validation = slab 5, test = slabs 2 and 7, training = slabs 0, 1, 3, 4, 6, 8, 9.

The template is a smooth average brain: use noise / bias-field augmentation for realism.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any

import numpy as np

from segdiff.data.datalist import save_datalist

__all__ = ["write_demo_data", "demo_slab_splits", "slab_affine", "tissue_labels", "LABEL_NAMES", "MIN_SLAB_SLICES"]

#: class index -> name of the demo tissue map
LABEL_NAMES = {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
#: slabs are made at least this thick where the volume allows it (3D models take 16-slice crops)
MIN_SLAB_SLICES = 16

_TEMPLATE = "MNI ICBM152 2009a nonlinear symmetric template (1 mm), as shipped with nilearn"
_DESCRIPTION = (
    "Demo data of monai-segdiff: axial slabs of the " + _TEMPLATE + ", with a 4-class tissue map "
    "(0 background, 1 CSF, 2 grey matter, 3 white matter) derived from the template's grey- and white-matter "
    "probability maps (CSF = 1 - GM - WM inside the brain, label = argmax). Splits are by slab (validation = "
    "middle slab, test = slabs at 1/4 and 3/4 of the brain's axial extent). It is one smooth average brain, "
    "for trying the pipeline, not for results."
)
_LICENCE = (
    "MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University. Use, copying, modification and distribution are "
    "permitted without fee provided that the copyright notice appears in all copies; no warranty. Keep "
    "NOTICE.txt with the data and cite the references."
)
_REFERENCE = (
    "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate "
    "atlases for pediatric studies. NeuroImage 54(1):313-327, 2011. doi:10.1016/j.neuroimage.2010.07.033; "
    "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate brain "
    "templates from birth to adulthood. NeuroImage 47(S1):S102, 2009; "
    "Collins DL, Zijdenbos AP, Baare WFC, Evans AC. ANIMAL+INSECT: improved cortical structure segmentation. "
    "IPMI 1999, LNCS 1613:210-223. Source: https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009"
)
_NOTICE = f"""Demo data written by monai-segdiff (segdiff demo-data).

Derived from the {_TEMPLATE}.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. Permission to use, copy, modify, and distribute this software and its documentation
for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all
copies. The authors and McGill University make no representations about the suitability of this software
for any purpose. It is provided "as is" without express or implied warranty.
(Check the current terms at https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009)

Please cite:
{_REFERENCE.replace('; ', chr(10))}
"""


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Return the 4-class tissue map (uint8: 0 background, 1 CSF, 2 grey matter, 3 white matter).

    Args:
        t1: T1 intensities; voxels > 0 are brain (the template is skull-stripped).
        gm: grey-matter probability map in [0, 1].
        wm: white-matter probability map in [0, 1].
    """
    brain = t1 > 0
    gm = np.where(brain, gm, 0.0)
    wm = np.where(brain, wm, 0.0)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)
    not_brain = (~brain).astype(gm.dtype)
    return np.argmax(np.stack([not_brain, csf, gm, wm]), axis=0).astype(np.uint8)


def demo_slab_splits(num_slabs: int) -> dict[str, list[int]]:
    """Return which slab indices (0 = most inferior) go to training, validation and test.

    Validation is the middle slab ``num_slabs // 2``; test is slabs ``num_slabs // 4`` and
    ``3 * num_slabs // 4``, never adjacent to each other; training is the rest (at least one slab).

    Args:
        num_slabs: number of slabs, at least 4.
    """
    if num_slabs < 4:
        raise ValueError(f"num_slabs must be >= 4 (1 validation, 2 test, >= 1 training slab), found {num_slabs}")
    validation = [num_slabs // 2]
    test = [num_slabs // 4, 3 * num_slabs // 4]
    training = [i for i in range(num_slabs) if i not in validation + test]
    return {"training": training, "validation": validation, "test": test}


def slab_affine(affine: np.ndarray, first: int) -> np.ndarray:
    """The affine of a slab cut from a volume at its third-axis voxel ``first``: the slab's voxel (0, 0, 0) is the
    volume's voxel (0, 0, first), at the same world position; orientation and spacing are kept."""
    slab = np.array(affine, dtype=np.float64, copy=True)
    slab[:3, 3] = (np.asarray(affine) @ np.array([0.0, 0.0, first, 1.0]))[:3]
    return slab


def _slab_bounds(first: int, stop: int, depth: int, num_slabs: int) -> list[tuple[int, int]]:
    """Cut slices [first, stop) into ``num_slabs`` contiguous slabs, at least MIN_SLAB_SLICES thick if possible.

    When the range is too short for ``num_slabs`` slabs of MIN_SLAB_SLICES slices it is widened evenly on
    both sides (within the volume's ``depth`` slices) with slices that hold fewer tissue classes.
    """
    needed = MIN_SLAB_SLICES * num_slabs
    if stop - first < needed:
        if depth < needed:
            warnings.warn(
                f"{num_slabs} slabs of a {depth}-slice volume are thinner than {MIN_SLAB_SLICES} slices; 3D "
                f"models taking {MIN_SLAB_SLICES}-slice crops need fewer slabs",
                stacklevel=3,
            )
        target = min(needed, depth)
        first = first - (target - (stop - first)) // 2
        first = min(max(first, 0), depth - target)  # shift the widened range back inside the volume
        stop = first + target
    edges = np.linspace(first, stop, num_slabs + 1).round().astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    if any(b <= a for a, b in bounds):
        raise ValueError(f"cannot cut {stop - first} slices into {num_slabs} slabs")
    return bounds


def _load_template() -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Load the template T1, GM and WM maps from nilearn, reoriented to RAS (last axis = superior)."""
    try:
        from nilearn import datasets
    except ImportError as e:
        raise ImportError(
            'the demo data needs nilearn: pip install "monai-segdiff[demo]" (or: pip install nilearn)'
        ) from e
    import nibabel as nib

    images = [
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
    ]
    # canonical = RAS+: the last array axis then runs inferior -> superior, whatever nilearn ships
    images = [nib.as_closest_canonical(img) for img in images]
    if nib.aff2axcodes(images[0].affine) != ("R", "A", "S"):
        raise RuntimeError(f"expected an RAS template, found {nib.aff2axcodes(images[0].affine)}")
    for img in images[1:]:
        if img.shape != images[0].shape or not np.allclose(img.affine, images[0].affine, atol=1e-3):
            raise RuntimeError("nilearn's T1, grey- and white-matter templates are not on one grid")
    t1, gm, wm = (np.asarray(img.get_fdata(dtype=np.float32)) for img in images)
    return images[0], t1, gm, wm


def _nifti(data: np.ndarray, affine: np.ndarray) -> Any:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=4)  # 4 = MNI_152 coordinates
    img.set_qform(affine, code=4)
    img.header.set_xyzt_units("mm")
    return img


def write_demo_data(output_dir: str | os.PathLike, num_slabs: int = 10, overwrite: bool = False) -> str:
    """Write the MNI152 tissue demo data set: slab NIfTI pairs and a datalist, all offline.

    Writes ``images/slab_XX.nii.gz`` (float32 T1 in [0, 1], one channel), ``labels/slab_XX.nii.gz``
    (uint8 classes 0-3), ``datalist.json`` (relative paths, ``labels``, ``channel_names``, ``description``,
    ``licence``, ``reference`` and a ``slabs`` table: first slice and split of each slab) and
    ``NOTICE.txt`` (the template's copyright notice). Slabs cover the axial range where at least two tissue
    classes are present (widened to 16 slices per slab where the volume allows it); each keeps the
    template's world coordinates (origin moved to its first slice). See the module docstring for the
    slab -> split assignment.

    Args:
        output_dir: folder to write into.
        num_slabs: number of axial slabs (default 10, at least 4).
        overwrite: write into a non-empty ``output_dir`` (default False: refuse). Old ``slab_*.nii.gz``
            files in ``images/`` and ``labels/`` are removed; nothing else is deleted.

    Returns:
        the path of ``datalist.json``.

    Raises:
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        ImportError: nilearn is not installed.
    """
    output_dir = os.fspath(output_dir)
    num_slabs = int(num_slabs)
    splits = demo_slab_splits(num_slabs)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (--overwrite) to write into it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not a folder")

    template, t1, gm, wm = _load_template()
    label = tissue_labels(t1, gm, wm)
    depth = label.shape[2]
    classes_per_slice = np.array([len(np.unique(label[:, :, z])) for z in range(depth)])
    slices = np.flatnonzero(classes_per_slice >= 2)
    if len(slices) == 0:
        raise RuntimeError("no axial slice of the template has two tissue classes")
    bounds = _slab_bounds(int(slices[0]), int(slices[-1]) + 1, depth, num_slabs)

    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "labels"), exist_ok=True)
    for old in glob.glob(os.path.join(output_dir, "images", "slab_*.nii.gz")) + glob.glob(
        os.path.join(output_dir, "labels", "slab_*.nii.gz")
    ):
        os.remove(old)

    split_of = {i: s for s, indices in splits.items() for i in indices}
    datalist: dict[str, Any] = {
        "name": "segdiff-demo-mni152-tissue",
        "description": _DESCRIPTION,
        "licence": _LICENCE,
        "reference": _REFERENCE,
        "tensorImageSize": "3D",
        "labels": dict(LABEL_NAMES),
        "channel_names": {"0": "T1"},
        "slabs": {},
        "training": [],
        "validation": [],
        "test": [],
    }
    width = max(2, len(str(num_slabs - 1)))
    for index, (first, stop) in enumerate(bounds):
        name = f"slab_{index:0{width}d}.nii.gz"
        affine = slab_affine(template.affine, first)
        _nifti(np.ascontiguousarray(t1[:, :, first:stop], dtype=np.float32), affine).to_filename(
            os.path.join(output_dir, "images", name)
        )
        _nifti(np.ascontiguousarray(label[:, :, first:stop]), affine).to_filename(
            os.path.join(output_dir, "labels", name)
        )
        datalist["slabs"][f"slab_{index:0{width}d}"] = {
            "first_slice": first,
            "num_slices": stop - first,
            "split": split_of[index],
        }
        datalist[split_of[index]].append({"image": f"images/{name}", "label": f"labels/{name}"})

    with open(os.path.join(output_dir, "NOTICE.txt"), "w", encoding="utf-8") as f:
        f.write(_NOTICE)
    return save_datalist(datalist, os.path.join(output_dir, "datalist.json"), overwrite=True)
