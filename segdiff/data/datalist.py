"""Datalists: build, split, save, load and resolve MONAI decathlon-style JSON files.

A datalist is the one written data contract of monai-segdiff (like nnU-Net's ``dataset.json``)::

    {
        "labels": {"0": "background", "1": "liver"},      # optional extra keys are kept
        "channel_names": {"0": "CT"},
        "training": [{"image": "imagesTr/case_a.nii.gz", "label": "labelsTr/case_a.nii.gz"}, ...],
        "validation": [...],
        "test": [...]
    }

Paths are RELATIVE to the dataset folder, so a data set can be moved or mounted elsewhere. An ``"image"``
is one path or a list of paths, one file per channel (MONAI's ``LoadImaged`` stacks a list as channels).

Three folder layouts are recognised by :func:`build_datalist`:

- ``"nnunet"``: ``imagesTr/`` + ``labelsTr/`` (nnU-Net raw / Medical Segmentation Decathlon). Channel files
  ``case_0000.nii.gz``, ``case_0001.nii.gz`` are grouped into one case; ``dataset.json`` next to them
  supplies ``"labels"`` and ``"channel_names"``.
- ``"segguided"``: seg-guided-diffusion's ``DATA/{train,val,test}/`` images with masks of the same name in
  ``MASK/all/{train,val,test}/``; the splits are given by the folders.
- ``"folders"``: any image folder + label folder whose files match by case name.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from segdiff.errors import SegdiffError

__all__ = [
    "DatalistError",
    "InputNotFoundError",
    "SPLITS",
    "LAYOUTS",
    "IMAGE_EXTENSIONS",
    "build_datalist",
    "split_cases",
    "load_datalist",
    "save_datalist",
    "resolve_datalist",
    "as_datalist",
    "case_name",
]

#: the split keys of a datalist, in the order they are written
SPLITS = ("training", "validation", "test")
#: the folder layouts that :func:`build_datalist` understands
LAYOUTS = ("auto", "nnunet", "segguided", "folders")
#: file endings recognised as images or labels (longest first so ``.nii.gz`` wins over ``.gz``)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".png", ".mha", ".nrrd")

# seg-guided-diffusion's split folder names -> datalist split keys
_SEGGUIDED_SPLITS = (("train", "training"), ("val", "validation"), ("test", "test"))
# nnU-Net's channel suffix: case_0000 -> ("case", 0)
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatalistError(SegdiffError, ValueError):
    """A data set folder or datalist does not follow the expected layout (the message says where)."""


class InputNotFoundError(SegdiffError, FileNotFoundError):
    """A file or folder the run reads (datalist, data set folder, input folder, weights) does not exist."""


def case_name(filename: str) -> str | None:
    """Return the file name without its image extension, or None when the extension is not recognised.

    Args:
        filename: a file name or path, e.g. ``"imagesTr/case_0000.nii.gz"``.
    """
    base = os.path.basename(filename)
    lower = base.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return None


def _list_image_files(folder: str, what: str) -> dict[str, str]:
    """Map case name -> file name for the image files in ``folder`` (hidden files are skipped)."""
    if not os.path.isdir(folder):
        raise DatalistError(f"{what} folder not found: {folder}")
    files: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not os.path.isfile(os.path.join(folder, name)):
            continue  # macOS "._x.nii.gz" companions, sub-folders
        stem = case_name(name)
        if stem is None:
            continue
        if stem in files:
            raise DatalistError(
                f"two files in {folder} have the same case name {stem!r}: {files[stem]} and {name}"
            )
        files[stem] = name
    return files


def _posix_join(*parts: str) -> str:
    """Join path parts with '/', so datalists written on Windows read everywhere."""
    return "/".join(p.replace(os.sep, "/").strip("/") for p in parts if p not in ("", "."))


def _match_cases(dataset_dir: str, images: str, labels: str) -> list[dict[str, Any]]:
    """Pair the image files in ``images`` with the label files in ``labels`` by case name.

    An image file ``X`` belongs to case ``X`` when a label ``X`` exists, else, when ``X`` ends in a 4-digit
    channel suffix ``C_0001``, to case ``C`` as channel 1. Looking the label up first keeps case names that
    happen to end in four digits (``patient_0001.nii.gz`` without channel suffix) intact.
    """
    image_dir = os.path.join(dataset_dir, images)
    label_dir = os.path.join(dataset_dir, labels)
    image_files = _list_image_files(image_dir, "image")
    label_files = _list_image_files(label_dir, "label")
    if not image_files:
        raise DatalistError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {image_dir}")

    channels: dict[str, dict[int, str]] = {}
    for stem, name in image_files.items():
        match = _CHANNEL_SUFFIX.match(stem)
        if stem in label_files:
            case, channel = stem, None
        elif match is not None and match.group("case") in label_files:
            case, channel = match.group("case"), int(match.group("channel"))
        else:
            raise DatalistError(
                f"image {os.path.join(image_dir, name)} has no label: expected a file named "
                f"{stem if match is None else match.group('case')}<ext> in {label_dir}"
            )
        per_case = channels.setdefault(case, {})
        key = -1 if channel is None else channel
        if key in per_case or (per_case and (key == -1) != (-1 in per_case)):
            raise DatalistError(
                f"case {case!r} in {image_dir} mixes files with and without a channel suffix or repeats "
                f"a channel: {sorted(per_case.values()) + [name]}"
            )
        per_case[key] = name

    for stem, name in label_files.items():
        if stem not in channels:
            raise DatalistError(
                f"label {os.path.join(label_dir, name)} has no image: expected {stem}<ext> or "
                f"{stem}_0000<ext> in {image_dir}"
            )

    cases = []
    num_channels = None
    for case in sorted(channels):
        per_case = channels[case]
        if -1 in per_case:
            image: str | list[str] = _posix_join(images, per_case[-1])
            found = [0]
        else:
            found = sorted(per_case)
            if found != list(range(len(found))):
                raise DatalistError(
                    f"case {case!r} in {image_dir} has channel files {found}: expected consecutive channels "
                    f"_0000.._{len(found) - 1:04d}"
                )
            files = [_posix_join(images, per_case[c]) for c in found]
            image = files[0] if len(files) == 1 else files
        if num_channels is None:
            num_channels = (len(found), case)
        elif num_channels[0] != len(found):
            raise DatalistError(
                f"case {case!r} in {image_dir} has {len(found)} channel file(s) but case {num_channels[1]!r} "
                f"has {num_channels[0]}: every case needs the same channels"
            )
        cases.append({"image": image, "label": _posix_join(labels, label_files[case])})
    return cases


def _read_nnunet_metadata(dataset_dir: str) -> dict[str, Any]:
    """Return ``labels`` and ``channel_names`` from ``dataset.json``, in the datalist's index -> name form.

    nnU-Net v2 writes ``{"labels": {"background": 0, ...}, "channel_names": {"0": "CT"}}``; nnU-Net v1 and
    the Medical Segmentation Decathlon write ``{"labels": {"0": "background"}, "modality": {"0": "CT"}}``.
    Both become ``{"labels": {"0": "background"}, "channel_names": {"0": "CT"}}``. nnU-Net v2 region labels
    (lists of indices) are copied unchanged.
    """
    path = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatalistError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, Mapping):
        raise DatalistError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    out: dict[str, Any] = {}
    labels = meta.get("labels")
    if isinstance(labels, Mapping):
        if labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
            out["labels"] = {str(v): k for k, v in sorted(labels.items(), key=lambda kv: kv[1])}
        else:
            out["labels"] = dict(labels)
    channel_names = meta.get("channel_names", meta.get("modality"))
    if isinstance(channel_names, Mapping):
        out["channel_names"] = dict(channel_names)
    return out


def _build_segguided(dataset_dir: str) -> dict[str, Any]:
    """Datalist for seg-guided-diffusion's ``DATA/{train,val,test}`` + ``MASK/all/{train,val,test}``."""
    datalist: dict[str, Any] = {}
    for folder, split in _SEGGUIDED_SPLITS:
        image_dir = os.path.join("DATA", folder)
        if not os.path.isdir(os.path.join(dataset_dir, image_dir)):
            continue
        datalist[split] = _match_cases(dataset_dir, image_dir, os.path.join("MASK", "all", folder))
    if "training" not in datalist:
        raise DatalistError(
            f"segguided layout needs {os.path.join(dataset_dir, 'DATA', 'train')} (with masks in "
            f"{os.path.join(dataset_dir, 'MASK', 'all', 'train')}); it was not found"
        )
    return datalist


def build_datalist(
    dataset_dir: str | os.PathLike,
    layout: str = "auto",
    images: str = "imagesTr",
    labels: str = "labelsTr",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Scan a data set folder and return a decathlon-style datalist with paths relative to it.

    Cases are sorted by name and, unless the layout gives the splits (``"segguided"``), split by case with
    :func:`split_cases`, so a seed always gives the same split of the same files.

    Args:
        dataset_dir: the data set folder; the datalist's paths are relative to it.
        layout: ``"nnunet"`` (``imagesTr/`` + ``labelsTr/`` + optional ``dataset.json``), ``"segguided"``
            (``DATA/{train,val,test}`` + ``MASK/all/{train,val,test}``, splits from the folders),
            ``"folders"`` (``images`` + ``labels`` folders) or ``"auto"`` (default): ``"segguided"`` when
            ``DATA/`` and ``MASK/`` exist, ``"nnunet"`` when ``imagesTr/`` and ``labelsTr/`` exist, else
            ``"folders"``.
        images: image folder relative to ``dataset_dir`` for ``"nnunet"`` and ``"folders"`` (default
            ``"imagesTr"``).
        labels: label folder relative to ``dataset_dir`` for ``"nnunet"`` and ``"folders"`` (default
            ``"labelsTr"``).
        val_fraction: fraction of cases for ``"validation"`` (default 0.1); ignored for ``"segguided"``.
        test_fraction: fraction of cases for ``"test"`` (default 0.1); ignored for ``"segguided"``.
        seed: seed of the case shuffle (default 0).

    Raises:
        DatalistError: unknown layout, missing folder, no cases, an image without label or vice versa.
    """
    dataset_dir = os.fspath(dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise DatalistError(f"data set folder not found: {dataset_dir}")
    if layout not in LAYOUTS:
        raise DatalistError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        if all(os.path.isdir(os.path.join(dataset_dir, d)) for d in ("DATA", "MASK")):
            layout = "segguided"
        elif all(os.path.isdir(os.path.join(dataset_dir, d)) for d in ("imagesTr", "labelsTr")):
            layout = "nnunet"
        else:
            layout = "folders"
            if not os.path.isdir(os.path.join(dataset_dir, images)):
                raise DatalistError(
                    f"cannot detect the layout of {dataset_dir}: it has neither DATA/ + MASK/ (segguided) nor "
                    f"imagesTr/ + labelsTr/ (nnunet), and the image folder {images!r} does not exist; "
                    "name the folders with images= / labels= (--images / --labels)"
                )

    if layout == "segguided":
        return _build_segguided(dataset_dir)

    datalist: dict[str, Any] = _read_nnunet_metadata(dataset_dir) if layout == "nnunet" else {}
    cases = _match_cases(dataset_dir, images, labels)
    channel_names = datalist.get("channel_names")
    if channel_names:
        first = cases[0]["image"]
        found = len(first) if isinstance(first, list) else 1
        if found != len(channel_names):
            raise DatalistError(
                f"{os.path.join(dataset_dir, 'dataset.json')} names {len(channel_names)} channel(s) "
                f"{dict(channel_names)}, but the cases in {os.path.join(dataset_dir, images)} have {found}"
            )
    datalist.update(split_cases(cases, val_fraction, test_fraction, seed))
    return datalist


def split_cases(
    cases: Sequence[Any], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[Any]]:
    """Split cases into training / validation / test with a seeded shuffle (``random.Random(seed)``).

    Split by CASE (a patient, a volume), never by slice: slices of one volume are correlated. Each held-out
    split gets ``round(n * fraction)`` cases, and at least one when its fraction is non-zero and there are
    at least 3 cases; training always keeps at least one case. Within each split the input order is kept.

    Args:
        cases: the cases (any items: datalist entries, case names); the same order and seed give the same
            split.
        val_fraction: fraction of cases for ``"validation"``, in [0, 1).
        test_fraction: fraction of cases for ``"test"``, in [0, 1); ``val_fraction + test_fraction < 1``.
        seed: seed of the shuffle.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise DatalistError(f"{name} must be in [0, 1), found {fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise DatalistError(
            f"val_fraction + test_fraction must be < 1 to leave training cases, found "
            f"{val_fraction} + {test_fraction}"
        )
    cases = list(cases)
    n = len(cases)

    def count(fraction: float) -> int:
        k = math.floor(n * fraction + 0.5)
        return max(k, 1) if fraction > 0 and n >= 3 else k

    num_val, num_test = count(val_fraction), count(test_fraction)
    while num_val + num_test > n - 1 and num_val + num_test > 0:  # keep >= 1 training case
        if num_val >= num_test:
            num_val -= 1
        else:
            num_test -= 1
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:num_val])
    test_idx = set(order[num_val : num_val + num_test])
    return {
        "training": [c for i, c in enumerate(cases) if i not in val_idx and i not in test_idx],
        "validation": [c for i, c in enumerate(cases) if i in val_idx],
        "test": [c for i, c in enumerate(cases) if i in test_idx],
    }


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read a datalist JSON file.

    Args:
        path: the JSON file.

    Raises:
        InputNotFoundError: the file does not exist (a ``FileNotFoundError``).
        DatalistError: the file is not valid JSON or not a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"datalist not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            datalist = json.load(f)
    except json.JSONDecodeError as e:
        raise DatalistError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(datalist, dict):
        raise DatalistError(f"{path}: expected a JSON object with split keys, found {type(datalist).__name__}")
    return datalist


def save_datalist(datalist: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write a datalist as JSON, atomically (a temporary file renamed over the target).

    Args:
        datalist: the datalist.
        path: the JSON file to write; missing parent folders are created.
        overwrite: replace an existing file (default False: refuse).

    Returns:
        the path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".datalist-", suffix=".json.tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); a datalist is shared data
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(datalist, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def as_datalist(
    datalist: Mapping[str, Any] | str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    datalist_name: str | None = None,
) -> tuple[Mapping[str, Any], str, str]:
    """Accept a datalist JSON file or an already-loaded datalist: the one place that tells the two apart.

    Args:
        datalist: the datalist, or the path of its JSON file (read with :func:`load_datalist`).
        dataset_dir: the folder the datalist's paths are relative to; None: the datalist file's folder (only when
            ``datalist`` is a path).
        datalist_name: name for messages; None: the file path, or ``"datalist"`` for a mapping.

    Returns:
        ``(datalist, dataset_dir, datalist_name)``: the mapping, the folder its paths start from, its name.

    Raises:
        FileNotFoundError: the JSON file does not exist.
        DatalistError: the file is not a JSON object, ``datalist`` is neither a path nor a mapping, or
            ``dataset_dir`` is missing for a mapping.
    """
    if isinstance(datalist, (str, os.PathLike)):
        path = os.fspath(datalist)
        datalist_name = datalist_name or path
        if dataset_dir is None:
            dataset_dir = os.path.dirname(os.path.abspath(path))
        datalist = load_datalist(path)
    elif not isinstance(datalist, Mapping):
        raise DatalistError(
            f"{datalist_name or 'datalist'}: expected a datalist JSON path or a mapping of splits, "
            f"found {type(datalist).__name__}"
        )
    datalist_name = datalist_name or "datalist"
    if dataset_dir is None:
        raise DatalistError(f"{datalist_name}: dataset_dir is required when the datalist is not a file")
    return datalist, os.fspath(dataset_dir), datalist_name


def _resolve_path(value: Any, dataset_dir: str) -> Any:
    """Make one datalist path (or list of paths) absolute against ``dataset_dir``."""
    if isinstance(value, str):
        return os.path.abspath(os.path.join(dataset_dir, os.path.expanduser(value)))
    if isinstance(value, (list, tuple)):
        return [_resolve_path(v, dataset_dir) for v in value]
    return value


def resolve_datalist(
    datalist: Mapping[str, Any] | str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    split: str,
    keys: Sequence[str] = ("image", "label"),
    datalist_name: str | None = None,
) -> list[dict[str, Any]]:
    """Return the entries of one split with absolute paths, ready for a MONAI ``Dataset``.

    Args:
        datalist: the datalist, or the path of its JSON file.
        dataset_dir: the folder the datalist's paths are relative to; None: the datalist file's folder
            (only when ``datalist`` is a path).
        split: the split key, e.g. ``"training"``.
        keys: entry keys holding paths (default ``("image", "label")``); a list value is resolved
            element-wise, other keys are copied unchanged.
        datalist_name: name used in error messages (default: the file path, or ``"datalist"``).

    Raises:
        DatalistError: the split is missing, not a list, or empty.
    """
    datalist, dataset_dir, datalist_name = as_datalist(datalist, dataset_dir, datalist_name)
    entries = datalist.get(split)
    if entries is None:
        splits = [k for k in datalist if isinstance(datalist[k], list)]
        raise DatalistError(f"{datalist_name} has no split {split!r}; its splits are {splits}")
    if not isinstance(entries, list):
        raise DatalistError(
            f"{datalist_name}: split {split!r} must be a list of entries, found {type(entries).__name__}"
        )
    if not entries:
        raise DatalistError(f"{datalist_name}: split {split!r} is empty")
    resolved = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DatalistError(
                f"{datalist_name}: {split}[{index}] must be an object like {{\"image\": ...}}, found {entry!r}"
            )
        resolved.append({k: (_resolve_path(v, dataset_dir) if k in keys else v) for k, v in entry.items()})
    return resolved
