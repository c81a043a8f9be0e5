"""A second real data set with two modalities, offline: TotalSegmentator's example CT and MR with shared organ labels.

TotalSegmentator's source distribution (``totalsegmentator-2.18.0.tar.gz``, 38 MB, Apache-2.0) ships, for its own
tests, one small abdominal CT and one small abdominal MR with the segmentations TotalSegmentator computed for them::

    tests/reference_files/example_ct_sm.nii.gz + example_seg.nii.gz     CT, 122 x 101 x 30, 3 mm, RAS, task "total"
    tests/reference_files/example_mr_sm.nii.gz + example_seg_mr.nii.gz  MR, 117 x 91 x 20, 3 mm, LPS, task "total_mr"

The two tasks number their classes differently (aorta is 52 in "total", 23 in "total_mr"). The class names come
from the sdist's ``totalsegmentator/map_to_binary.py`` (its ``class_map`` dict, read with ``ast.literal_eval``:
the package is never imported), and the organs both example segmentations hold are mapped to ONE label space,
the same for CT and MR::

    0 background, 1 liver, 2 spleen, 3 kidney (left + right), 4 stomach, 5 pancreas, 6 gallbladder, 7 aorta

Every other class becomes background. Both volumes are first reoriented to RAS voxel order
(``nibabel.as_closest_canonical``: axes permuted and flipped, no resampling, world positions kept), because the
bundles work on voxel arrays: left as shipped, the MR's arrays are the CT's turned by 180 degrees in-plane, so a
network trained on CT slices sees every MR slice with the liver on the wrong side. Each volume is then cut along its
third voxel axis (axial, inferior to superior) into
``num_slabs`` contiguous slabs written as their own NIfTI pairs, each with the source affine whose origin is moved
to the slab's first slice (world coordinates of every voxel are kept). The slab -> split assignment is the demo
data's (:func:`segdiff.data.demo.demo_slab_splits`): for the default 6 slabs, validation = slab 3, test = slabs 1
and 4, training = slabs 0, 2, 5. Files are named ``<modality>_slab_XX`` so that a CT and an MR set can share one
folder, and every datalist entry carries ``"modality": "ct"`` or ``"mr"``.

The labels are TotalSegmentator's outputs, not manual annotations; two small volumes are for trying the pipeline
(CT masks -> MR images, MRGen's setting) and for checking grids and commands, not for results.

Getting the sdist: pass its path, or let :func:`find_sdist` use the cached copy under ``~/.cache/segdiff`` (or
``$XDG_CACHE_HOME/segdiff``), downloading it once with
``python -m pip download --no-deps --no-binary :all: totalsegmentator==2.18.0 -d <cache>`` when it is missing.
Nothing is downloaded at import time.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from segdiff.data.datalist import InputNotFoundError, save_datalist
from segdiff.data.demo import demo_slab_splits, slab_affine
from segdiff.errors import SegdiffError

__all__ = [
    "MODALITIES",
    "SHARED_CLASSES",
    "TOTALSEGMENTATOR_VERSION",
    "SdistDownloadError",
    "SdistError",
    "default_cache_dir",
    "download_command",
    "find_sdist",
    "label_names",
    "map_labels",
    "read_class_map",
    "shared_class_ids",
    "slab_bounds",
    "write_reference_data",
]

#: the TotalSegmentator release whose sdist is read (its class ids and example files are pinned with it)
TOTALSEGMENTATOR_VERSION = "2.18.0"
#: the shared label space: class index k (1-based, 0 = background) -> (name, TotalSegmentator class names merged
#: into it). The names are the same in the "total" and "total_mr" tasks; only their ids differ.
SHARED_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("liver", ("liver",)),
    ("spleen", ("spleen",)),
    ("kidney", ("kidney_left", "kidney_right")),
    ("stomach", ("stomach",)),
    ("pancreas", ("pancreas",)),
    ("gallbladder", ("gallbladder",)),
    ("aorta", ("aorta",)),
)
#: where the class names live inside the sdist
MAP_TO_BINARY = "totalsegmentator/map_to_binary.py"


class Source(NamedTuple):
    """One modality's files inside the sdist and the TotalSegmentator task that numbered its classes."""

    task: str
    image: str
    label: str
    channel_name: str
    reference: str


#: modality -> its example image, segmentation and task inside the sdist
MODALITIES: dict[str, Source] = {
    "ct": Source(
        task="total",
        image="tests/reference_files/example_ct_sm.nii.gz",
        label="tests/reference_files/example_seg.nii.gz",
        channel_name="CT",
        reference="Wasserthal J, Breit HC, Meyer MT, et al. TotalSegmentator: robust segmentation of 104 anatomic "
        "structures in CT images. Radiology: Artificial Intelligence 5(5):e230024, 2023. doi:10.1148/ryai.230024",
    ),
    "mr": Source(
        task="total_mr",
        image="tests/reference_files/example_mr_sm.nii.gz",
        label="tests/reference_files/example_seg_mr.nii.gz",
        channel_name="MR",
        reference="Akinci D'Antonoli T, Berger LK, Indrakanti AK, et al. TotalSegmentator MRI: robust sequence-"
        "independent segmentation of multiple anatomic structures in MRI. Radiology 314(2):e241613, 2025. "
        "doi:10.1148/radiol.241613",
    ),
}

_LICENCE = (
    "TotalSegmentator (code, example images and their segmentations as shipped in its sdist) is licensed under the "
    "Apache License 2.0, Copyright Jakob Wasserthal and contributors; LICENSE.txt is its licence text. The data here "
    "is derived: cropped into slabs and relabelled."
)


class SdistError(SegdiffError, ValueError):
    """The TotalSegmentator sdist lacks a file, class or grid the data set is built from (the message says which)."""


class SdistDownloadError(SegdiffError, OSError):
    """The sdist is not cached and could not be downloaded (no pip, no network); the message names the command."""


# ------------------------------------------------------------------------------------------------ the sdist
def default_cache_dir() -> str:
    """The folder the downloaded sdist is kept in: ``$XDG_CACHE_HOME/segdiff``, else ``~/.cache/segdiff``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "segdiff")


def sdist_filename(version: str = TOTALSEGMENTATOR_VERSION) -> str:
    """The sdist's file name as pip saves it, e.g. ``totalsegmentator-2.18.0.tar.gz``."""
    return f"totalsegmentator-{version}.tar.gz"


def download_command(cache_dir: str, version: str = TOTALSEGMENTATOR_VERSION) -> list[str]:
    """The pip command that downloads the sdist (source only, without dependencies) into ``cache_dir``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"totalsegmentator=={version}", "-d", cache_dir]


def find_sdist(
    sdist: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> str:
    """Return the path of TotalSegmentator's sdist: the one given, else the cached one, downloading it when missing.

    Args:
        sdist: the ``.tar.gz`` to read; None: ``<cache_dir>/totalsegmentator-2.18.0.tar.gz``.
        cache_dir: where the download is kept (default :func:`default_cache_dir`).
        download: fetch a missing cached copy with pip (default True); False: refuse instead.

    Raises:
        InputNotFoundError: ``sdist`` was given and does not exist, or it is not cached and ``download`` is False.
        SdistDownloadError: pip failed (not installed, no network, no such version); the message has the command.
    """
    if sdist is not None:
        path = os.path.expanduser(os.fspath(sdist))
        if not os.path.isfile(path):
            raise InputNotFoundError(f"TotalSegmentator sdist not found: {path}")
        return path
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    path = os.path.join(cache_dir, sdist_filename())
    if os.path.isfile(path):
        return path
    command = download_command(cache_dir)
    shown = " ".join(["python"] + command[1:])
    if not download:
        raise InputNotFoundError(f"TotalSegmentator sdist not cached at {path}; download it with: {shown}")
    os.makedirs(cache_dir, exist_ok=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SdistDownloadError(f"could not run `{shown}`: {e}; download the sdist elsewhere and pass its path "
                                 "(sdist=..., --sdist FILE)") from e
    if done.returncode != 0 or not os.path.isfile(path):
        tail = " ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:])
        raise SdistDownloadError(
            f"downloading TotalSegmentator's sdist failed: `{shown}` exited with {done.returncode}"
            f"{' and did not write ' + path if done.returncode == 0 else ''} ({tail or 'no output'}); run it where "
            "there is network, or pass the .tar.gz you have (sdist=..., --sdist FILE)"
        )
    return path


class _Archive:
    """Members of the sdist read straight from the tar.gz, by their path below the archive's top folder."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:gz")
            names = self._tar.getnames()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SdistError(f"{path} is not a readable .tar.gz (TotalSegmentator's sdist): {e}") from e
        tops = {n.split("/", 1)[0] for n in names}
        # an sdist holds one folder, totalsegmentator-<version>/; members are looked up below it
        self.top = tops.pop() if len(tops) == 1 else ""
        self._names = set(names)

    def read(self, member: str) -> bytes:
        name = f"{self.top}/{member}" if self.top else member
        if name not in self._names:
            raise SdistError(f"{self.path} has no {name} (expected in TotalSegmentator {TOTALSEGMENTATOR_VERSION}'s "
                             "sdist); is it the right archive and version?")
        handle = self._tar.extractfile(name)
        if handle is None:
            raise SdistError(f"{self.path}: {name} is not a regular file")
        return handle.read()

    def has(self, member: str) -> bool:
        return (f"{self.top}/{member}" if self.top else member) in self._names

    def nifti(self, member: str) -> Any:
        import nibabel as nib

        data = self.read(member)
        try:
            return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        except Exception as e:  # nibabel raises several kinds for a corrupt header
            raise SdistError(f"{self.path}: {self.top}/{member} is not a readable NIfTI file: {e}") from e

    def close(self) -> None:
        self._tar.close()


# ------------------------------------------------------------------------------------------- class names
def read_class_map(source: str, tasks: Sequence[str] = ("total", "total_mr"), where: str = MAP_TO_BINARY) -> dict:
    """Parse the class names of ``tasks`` from the text of TotalSegmentator's ``map_to_binary.py``, without running it.

    The file starts with ``class_map = {"total": {1: "spleen", ...}, "total_mr": {...}, ...}``; the entries of the
    requested tasks are read with ``ast.literal_eval``.

    Args:
        source: the file's text.
        tasks: the tasks to read (default "total" and "total_mr").
        where: the file's name for messages.

    Returns:
        ``{task: {class id: class name}}``.

    Raises:
        SdistError: no top-level ``class_map = {...}`` dict, a task missing from it, or an entry that is not a
            literal ``{int: str}`` dict.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise SdistError(f"{where} is not valid Python: {e}") from e
    node = next(
        (
            n.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "class_map" for t in n.targets)
            and isinstance(n.value, ast.Dict)
        ),
        None,
    )
    if node is None:
        raise SdistError(f"{where}: expected a top-level `class_map = {{...}}` dict, found none")
    entries = {}
    for key, value in zip(node.keys, node.values):
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            entries[key.value] = value
    found = {}
    for task in tasks:
        if task not in entries:
            raise SdistError(f"{where}: class_map has no task {task!r}; its tasks are {sorted(entries)}")
        try:
            classes = ast.literal_eval(entries[task])
        except ValueError as e:
            raise SdistError(f"{where}: class_map[{task!r}] is not a literal dict: {e}") from e
        if not isinstance(classes, dict) or not all(
            isinstance(k, int) and isinstance(v, str) for k, v in classes.items()
        ):
            raise SdistError(f"{where}: class_map[{task!r}] must map class ids (int) to names (str)")
        found[task] = classes
    return found


def shared_class_ids(
    classes: Mapping[int, str], task: str, shared: Sequence[tuple[str, Sequence[str]]] = SHARED_CLASSES
) -> dict[str, list[int]]:
    """The TotalSegmentator class ids that make up each shared class, for one task.

    Args:
        classes: the task's ``{id: name}`` (from :func:`read_class_map`).
        task: its name, for messages.
        shared: the shared label space (default :data:`SHARED_CLASSES`).

    Returns:
        ``{shared name: [ids]}`` in the order of ``shared``.

    Raises:
        SdistError: a TotalSegmentator class name of ``shared`` is not in the task.
    """
    by_name = {name: cid for cid, name in classes.items()}
    ids = {}
    for name, members in shared:
        missing = [m for m in members if m not in by_name]
        if missing:
            raise SdistError(
                f"{MAP_TO_BINARY}: class {missing[0]!r} (for shared class {name!r}) is not in class_map[{task!r}]"
            )
        ids[name] = sorted(by_name[m] for m in members)
    return ids


def label_names(shared: Sequence[tuple[str, Sequence[str]]] = SHARED_CLASSES) -> dict[str, str]:
    """The datalist's ``labels``: ``{"0": "background", "1": "liver", ...}``."""
    return {"0": "background", **{str(k): name for k, (name, _) in enumerate(shared, start=1)}}


def map_labels(segmentation: np.ndarray, class_ids: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Map a TotalSegmentator segmentation to the shared label space (uint8; classes not listed -> 0).

    Args:
        segmentation: integer class ids of one task.
        class_ids: ``{shared name: [task ids]}`` in class order (from :func:`shared_class_ids`); the k-th name
            becomes class k (1-based).
    """
    segmentation = np.asarray(segmentation)
    if not np.issubdtype(segmentation.dtype, np.integer):
        rounded = np.rint(segmentation)
        if not np.array_equal(rounded, segmentation):
            raise SdistError("expected integer class ids in the segmentation, found fractional values")
        segmentation = rounded.astype(np.int64)
    if segmentation.min(initial=0) < 0:
        raise SdistError(f"expected class ids >= 0 in the segmentation, found {segmentation.min()}")
    lookup = np.zeros(int(segmentation.max(initial=0)) + 1, dtype=np.uint8)  # task id -> shared class
    for k, ids in enumerate(class_ids.values(), start=1):
        for cid in ids:
            if cid < len(lookup):
                lookup[cid] = k
    return lookup[segmentation]


# ----------------------------------------------------------------------------------------------- the slabs
def slab_bounds(depth: int, num_slabs: int) -> list[tuple[int, int]]:
    """Cut ``depth`` slices into ``num_slabs`` contiguous slabs of (almost) equal thickness: ``[(first, stop)]``."""
    if num_slabs > depth:
        raise ValueError(f"cannot cut {depth} slices into {num_slabs} slabs; use at most {depth} slabs")
    edges = np.linspace(0, depth, num_slabs + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _nifti(data: np.ndarray, affine: np.ndarray, source: Any) -> Any:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    code = int(source.header["sform_code"]) or int(source.header["qform_code"]) or 2  # 2 = aligned to a scanner
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    img.header.set_xyzt_units("mm")
    return img


def _image_array(img: Any) -> np.ndarray:
    """The stored intensities (CT in HU as int16) when the file has no scaling, else float32 scaled values."""
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    if slope == 1.0 and inter == 0.0:
        return np.asanyarray(img.dataobj)
    return img.get_fdata(dtype=np.float32)


def write_reference_data(
    folder: str | os.PathLike,
    modality: str = "ct",
    sdist: str | os.PathLike | None = None,
    num_slabs: int = 6,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> str:
    """Write TotalSegmentator's example CT or MR as slab NIfTI pairs with shared organ labels, and a datalist.

    Writes ``images/<modality>_slab_XX.nii.gz`` (the source intensities and dtype: CT in HU), ``labels/<modality>_
    slab_XX.nii.gz`` (uint8, classes of :data:`SHARED_CLASSES`: 0 background, 1 liver, 2 spleen, 3 kidney, 4 stomach,
    5 pancreas, 6 gallbladder, 7 aorta), ``datalist.json`` (relative paths, entries with ``"modality"``, ``labels``,
    ``channel_names``, ``description``, ``licence``, ``reference``, ``source``: archive, files, task and the class
    ids merged into each class, and ``slabs``: first slice, thickness, split and voxels per class of each slab),
    ``LICENSE.txt`` (TotalSegmentator's Apache-2.0 licence, from the sdist) and ``NOTICE.txt``. Every file is in RAS
    voxel order (datalist ``"orientation"``; the source's own is ``source.orientation``): slab ``i``'s voxel
    (x, y, 0) is voxel (x, y, first_slice) of the source reoriented to RAS, at the same world position. See the
    module docstring for the slab -> split assignment.

    Args:
        folder: folder to write into.
        modality: ``"ct"`` (example_ct_sm + example_seg, task "total") or ``"mr"`` (example_mr_sm + example_seg_mr,
            task "total_mr").
        sdist: TotalSegmentator 2.18.0's ``.tar.gz``; None: the cached copy, downloaded when missing
            (:func:`find_sdist`).
        num_slabs: number of axial slabs, 4 to the number of slices (default 6).
        overwrite: write into a non-empty ``folder`` (default False: refuse); old ``<modality>_slab_*.nii.gz``
            files in ``images/`` and ``labels/`` are removed, nothing else is deleted.
        cache_dir: where a download is kept (default :func:`default_cache_dir`).
        download: allow the download of a missing cached sdist (default True).

    Returns:
        the path of ``datalist.json``.

    Raises:
        ValueError: unknown ``modality`` or a bad ``num_slabs``.
        FileExistsError: ``folder`` is not empty and ``overwrite`` is False.
        InputNotFoundError, SdistDownloadError: no sdist (see :func:`find_sdist`).
        SdistError: the archive lacks a file or a class, a shared class has no voxel in the segmentation, or
            image and segmentation are not on one grid.
    """
    import nibabel as nib

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, found {modality!r}")
    source = MODALITIES[modality]
    folder = os.fspath(folder)
    num_slabs = int(num_slabs)
    splits = demo_slab_splits(num_slabs)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; pass overwrite=True (--overwrite) to write into it")

    path = find_sdist(sdist, cache_dir=cache_dir, download=download)
    archive = _Archive(path)
    try:
        classes = read_class_map(archive.read(MAP_TO_BINARY).decode("utf-8"), tasks=(source.task,))[source.task]
        class_ids = shared_class_ids(classes, source.task)
        image = archive.nifti(source.image)
        segmentation = archive.nifti(source.label)
        licence_text = archive.read("LICENSE").decode("utf-8", errors="replace") if archive.has("LICENSE") else None
    finally:
        archive.close()
    where = f"{path}: {archive.top + '/' if archive.top else ''}"
    if image.shape != segmentation.shape or not np.allclose(image.affine, segmentation.affine, atol=1e-3):
        raise SdistError(
            f"{where}{source.image} ({image.shape}) and {source.label} ({segmentation.shape}) are not on one grid"
        )
    if len(image.shape) != 3:
        raise SdistError(f"{where}{source.image}: expected a 3D volume, found shape {image.shape}")
    axes = nib.aff2axcodes(image.affine)
    if axes[2] not in ("S", "I"):
        raise SdistError(f"{where}{source.image}: expected an axial third voxel axis (S or I), found {''.join(axes)}")

    # one voxel order for every modality (see the module docstring); source_axes stays in the datalist
    source_axes = axes
    image, segmentation = nib.as_closest_canonical(image), nib.as_closest_canonical(segmentation)
    axes = nib.aff2axcodes(image.affine)
    raw = np.asanyarray(segmentation.dataobj)
    label = map_labels(raw, class_ids)
    for k, (name, ids) in enumerate(class_ids.items(), start=1):
        if not np.any(label == k):
            raise SdistError(
                f"{where}{source.label}: shared class {name!r} (task {source.task!r} ids {ids}) has no voxel; every "
                f"class of the shared label space must be present"
            )
    intensities = _image_array(image)
    depth = image.shape[2]
    bounds = slab_bounds(depth, num_slabs)

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    for old in glob.glob(os.path.join(folder, "images", f"{modality}_slab_*.nii.gz")) + glob.glob(
        os.path.join(folder, "labels", f"{modality}_slab_*.nii.gz")
    ):
        os.remove(old)

    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    names = label_names()
    split_of = {i: s for s, indices in splits.items() for i in indices}
    datalist: dict[str, Any] = {
        "name": f"segdiff-totalsegmentator-{modality}",
        "description": (
            f"TotalSegmentator {TOTALSEGMENTATOR_VERSION}'s example {source.channel_name} ({source.image} of its "
            f"sdist) with TotalSegmentator's own segmentation ({source.label}, task {source.task!r}) mapped to the "
            f"organs shared by its CT and MR tasks ({', '.join(n for n, _ in SHARED_CLASSES)}; other classes -> "
            f"background), cut into {num_slabs} axial slabs; splits by slab. The labels are model outputs, not manual; "
            "one small volume, for trying the pipeline, not for results."
        ),
        "licence": _LICENCE,
        "reference": source.reference,
        "tensorImageSize": "3D",
        "labels": names,
        "channel_names": {"0": source.channel_name},
        "source": {
            "archive": os.path.basename(path),
            "sha256": sha256,
            "image": source.image,
            "label": source.label,
            "task": source.task,
            "class_ids": class_ids,
            "shape": [int(s) for s in image.shape],
            "orientation": "".join(source_axes),
        },
        "orientation": "".join(axes),
        "slabs": {},
        "training": [],
        "validation": [],
        "test": [],
    }
    width = max(2, len(str(num_slabs - 1)))
    for index, (first, stop) in enumerate(bounds):
        case = f"{modality}_slab_{index:0{width}d}"
        affine = slab_affine(image.affine, first)
        slab_label = np.ascontiguousarray(label[:, :, first:stop])
        _nifti(np.ascontiguousarray(intensities[:, :, first:stop]), affine, image).to_filename(
            os.path.join(folder, "images", f"{case}.nii.gz")
        )
        _nifti(slab_label, affine, segmentation).to_filename(os.path.join(folder, "labels", f"{case}.nii.gz"))
        datalist["slabs"][case] = {
            "first_slice": first,
            "num_slices": stop - first,
            "split": split_of[index],
            "voxels": {names[str(k)]: int(np.count_nonzero(slab_label == k)) for k in range(len(names))},
        }
        datalist[split_of[index]].append(
            {"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz", "modality": modality}
        )

    if licence_text is not None:
        with open(os.path.join(folder, "LICENSE.txt"), "w", encoding="utf-8") as f:
            f.write(licence_text)
    with open(os.path.join(folder, "NOTICE.txt"), "w", encoding="utf-8") as f:
        f.write(
            f"Data written by monai-segdiff (segdiff totalseg-data --modality {modality}).\n\n"
            f"Derived from {source.image} and {source.label} of TotalSegmentator {TOTALSEGMENTATOR_VERSION}'s "
            f"sdist ({os.path.basename(path)}, sha256 {sha256}).\n{_LICENCE}\n\nPlease cite:\n{source.reference}\n"
        )
    return save_datalist(datalist, os.path.join(folder, "datalist.json"), overwrite=True)
