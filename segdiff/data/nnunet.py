"""Export datalist pairs (real, synthetic or both) as an nnU-Net v2 raw data set, checked before anything is written.

nnU-Net v2's raw format (its ``documentation/dataset_format.md``)::

    <raw>/Dataset042_Brain/
        dataset.json                    # channel_names, labels (name -> index), numTraining, file_ending
        imagesTr/<case>_0000.nii.gz     # one file per image channel, 4-digit channel index
        labelsTr/<case>.nii.gz          # integer class indices 0..K-1 on the image's grid
        segdiff_export.json             # ours, ignored by nnU-Net: which datalist entry each case came from

Command line::

    segdiff export-nnunet --datalist data/datalist.json synthetic/datalist.json --output $nnUNet_raw \\
        --id 42 --name Brain

Decisions:

- The case identifier is the IMAGE file's name without extension (``images/slab_02_syn1.nii.gz`` ->
  ``slab_02_syn1``), or the label's name when the image is ``<label>_0000``-style; several generated images may
  share one mask file, their image names still differ. ``case_prefix`` (``--case-prefix``, one per datalist) is put
  in front of every case of a datalist, e.g. ``real_`` / ``syn_`` when a real and a synthetic datalist use the same
  file names. Identifiers that still collide are an error naming both entries: nothing is renamed silently.
- Images: a single-channel ``.nii.gz`` is copied byte for byte; a file holding several channels (4D NIfTI,
  channel-last PNG, ...; channels as MONAI's ``LoadImage(ensure_channel_first=True)`` reads them, the way the
  bundles see them) is split into one file per channel with the source's NIfTI header; per-channel file lists are
  copied as they are; other formats are converted to NIfTI.
- Labels are written as integers (uint8, int16 beyond 256 classes) with the IMAGE's NIfTI header, so image and
  label share spacing, origin and direction exactly (nnU-Net compares them with ``np.allclose``, stricter than the
  datalist check's 1e-3 tolerance).
- Class 0 is named ``"background"`` in ``dataset.json`` whatever the datalist calls it: nnU-Net requires that name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from segdiff.data.checks import DataCheckError, find_problems
from segdiff.data.datalist import DatalistError, InputNotFoundError, as_datalist, case_name
from segdiff.errors import OutputCollisionError, SegdiffError

__all__ = [
    "EXPORT_RECORD",
    "FILE_ENDING",
    "ExportError",
    "ExportFolderError",
    "dataset_folder_name",
    "export_nnunet",
    "parse_names",
    "plan_cases",
]

#: the file ending of every exported image and label
FILE_ENDING = ".nii.gz"
#: the file in the data set folder that maps each nnU-Net case back to its datalist entry
EXPORT_RECORD = "segdiff_export.json"



class ExportError(SegdiffError, ValueError):
    """The export's settings or names cannot give a valid nnU-Net data set (the message says which and why)."""


class ExportFolderError(SegdiffError, FileExistsError):
    """The nnU-Net data set folder exists (and overwrite is off), or another folder there uses the dataset id."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_\d{4}$")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset042_Name`` for id 42: nnU-Net's folder name, 3-digit zero-padded id.

    Args:
        dataset_id: 1..999.
        name: letters, digits, ``_``, ``-`` and ``.``; no spaces (nnU-Net's commands take it as an argument).
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise ExportError(f"nnU-Net dataset id must be an integer in [1, 999], found {dataset_id!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExportError(
            f"nnU-Net dataset name must start with a letter or digit and hold only letters, digits, '_', '-' "
            f"and '.', found {name!r}"
        )
    return f"Dataset{int(dataset_id):03d}_{name}"


def parse_names(value: Any, what: str, source: str = "") -> dict[int, str] | None:
    """Index -> name from a datalist-style ``{"0": "background"}``, an nnU-Net-style ``{"background": 0}``, a list
    ``["background", ...]``, a JSON text of any of these or the path of a JSON file holding one; None stays None.

    Indices must be 0..K-1, each once; names must be unique.

    Args:
        value: the names, in any of the forms above.
        what: ``"labels"`` or ``"channel_names"``, for messages.
        source: where the value came from, for messages.
    """
    if value is None:
        return None
    where = f"{what}{f' ({source})' if source else ''}"
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if os.path.isfile(text):
            where = f"{what} ({text})"
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"{where}: expected a JSON object or list or a JSON file, found {value!r} ({e})") from e
        if isinstance(value, Mapping) and what in value and isinstance(value[what], (Mapping, list)):
            value = value[what]  # a whole dataset.json or datalist
    names: dict[int, str] = {}
    if isinstance(value, (list, tuple)):
        names = {i: str(v) for i, v in enumerate(value)}
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                index, label = int(item), str(key)  # nnU-Net v2: name -> index
            elif isinstance(item, (list, tuple)):
                raise ExportError(f"{where}: region labels ({key!r}: {list(item)}) cannot be exported, only classes")
            else:
                try:
                    index, label = int(key), str(item)
                except (TypeError, ValueError) as e:
                    raise ExportError(
                        f"{where}: expected {{\"0\": \"name\", ...}} or {{\"name\": 0, ...}}, found {key!r}: {item!r}"
                    ) from e
            if index in names:
                raise ExportError(f"{where}: index {index} is named twice ({names[index]!r} and {label!r})")
            names[index] = label
    else:
        raise ExportError(f"{where}: expected an object or a list, found {type(value).__name__}")
    if not names:
        raise ExportError(f"{where}: no names given")
    if sorted(names) != list(range(len(names))):
        raise ExportError(f"{where}: expected indices 0..{len(names) - 1} each once, found {sorted(names)}")
    if len(set(names.values())) != len(names):
        raise ExportError(f"{where}: names must be unique, found {[names[i] for i in sorted(names)]}")
    return {i: names[i] for i in sorted(names)}


def _file_paths(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _case_id(entry: Mapping[str, Any]) -> str:
    """The nnU-Net case identifier of one datalist entry (see the module docstring)."""
    image = _file_paths(entry["image"])[0]
    image_stem = case_name(image) or os.path.basename(image)
    label_stem = case_name(entry["label"]) or os.path.basename(entry["label"])
    match = _CHANNEL_SUFFIX.match(image_stem)
    if match is not None and (match.group("case") == label_stem or not isinstance(entry["image"], str)):
        return match.group("case")
    return image_stem


def plan_cases(
    datalists: Sequence[tuple[str, Mapping[str, Any], str]],
    splits: Sequence[str],
    case_prefix: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The cases to export with their nnU-Net identifiers, and the notes on skipped splits.

    Args:
        datalists: ``(name, datalist, dataset_dir)`` per datalist.
        splits: the splits to export; a split a datalist lacks (or has empty) is skipped with a note.
        case_prefix: one prefix per datalist (default none).

    Raises:
        DatalistError: an entry without image or label.
        OutputCollisionError: two entries with one identifier.
        ExportError: case_prefix of the wrong length or with characters nnU-Net does not accept.
    """
    prefixes = list(case_prefix) if case_prefix else [""] * len(datalists)
    if len(prefixes) != len(datalists):
        raise ExportError(f"case_prefix has {len(prefixes)} value(s) for {len(datalists)} datalist(s): give one each")
    cases, notes, seen = [], [], {}
    for (name, datalist, dataset_dir), prefix in zip(datalists, prefixes):
        if prefix and not _NAME.match(prefix):
            raise ExportError(f"case prefix {prefix!r} may hold only letters, digits, '_', '-' and '.'")
        for split in splits:
            entries = datalist.get(split)
            if not entries:
                notes.append(f"{name}: split {split!r} {'is empty' if entries == [] else 'not found'}, skipped")
                continue
            for index, entry in enumerate(entries):
                where = f"{name}: {split}[{index}]"
                if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
                    raise DatalistError(f"{where}: expected an entry with 'image' and 'label', found {entry!r}")
                case = prefix + _case_id(entry)
                if case in seen:
                    raise OutputCollisionError(
                        f"{where} and {seen[case]} both become nnU-Net case {case!r}: give each datalist its own "
                        "case_prefix (--case-prefix, e.g. real_ syn_) or rename the files"
                    )
                seen[case] = where
                cases.append(
                    {"case": case, "datalist": name, "split": split, "index": index, "dataset_dir": dataset_dir,
                     "image": entry["image"], "label": entry["label"]}
                )
    return cases, notes


def _read_channels(path: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(channels (C, *spatial), affine, NIfTI header or None)`` of one image file, channels as the bundles read
    them (MONAI ``LoadImage(ensure_channel_first=True)``)."""
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    array = np.asarray(img)
    while array.ndim > 4 and array.shape[-1] == 1:  # 5D NIfTI (x, y, z, 1, c) leaves a trailing singleton axis
        array = array[..., 0]
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        source = nib.load(path)
        return array, source.affine, source.header
    return array, np.asarray(img.affine, dtype=float), None


def _write_nifti(array: np.ndarray, affine: np.ndarray, header: Any, path: str, dtype: Any = None) -> None:
    import nibabel as nib

    header = header.copy() if header is not None else None
    if dtype is not None:
        array = array.astype(dtype)
        if header is not None:
            header.set_data_dtype(dtype)
    elif header is not None:
        header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine, header=header)
    if header is None:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    nib.save(image, path)


def _label_dtype(num_classes: int) -> Any:
    return np.uint8 if num_classes <= 256 else np.int16


def _export_case(case: Mapping[str, Any], images_dir: str, labels_dir: str, num_classes: int) -> None:
    """Write one case's channel files and its label."""
    import nibabel as nib

    def full(p: str) -> str:
        return os.path.join(case["dataset_dir"], os.path.expanduser(p))

    image_paths = [full(p) for p in _file_paths(case["image"])]
    target = lambda k: os.path.join(images_dir, f"{case['case']}_{k:04d}{FILE_ENDING}")  # noqa: E731
    geometry = None  # (affine, header) of the first channel: the label is written on it
    if len(image_paths) == 1:
        path = image_paths[0]
        channels, affine, header = _read_channels(path)
        geometry = (affine, header)
        if channels.shape[0] == 1 and path.lower().endswith(FILE_ENDING):
            shutil.copyfile(path, target(0))
        else:
            for k in range(channels.shape[0]):
                _write_nifti(channels[k], affine, header, target(k))
    else:  # one file per channel: copied as they are (converted when not .nii.gz)
        for k, path in enumerate(image_paths):
            if path.lower().endswith(FILE_ENDING):
                shutil.copyfile(path, target(k))
                if geometry is None:
                    source = nib.load(path)
                    geometry = (source.affine, source.header)
            else:
                channels, affine, header = _read_channels(path)
                geometry = geometry or (affine, header)
                _write_nifti(channels[0], affine, header, target(k))
    label, _, _ = _read_channels(full(case["label"]))
    _write_nifti(np.rint(label[0]), geometry[0], geometry[1], os.path.join(labels_dir, case["case"] + FILE_ENDING),
                 dtype=_label_dtype(num_classes))


def _find_label_count(cases: Sequence[Mapping[str, Any]]) -> int:
    """Number of classes when no names are given: the largest label value found + 1."""
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=True)
    largest = 0
    for case in cases:
        path = os.path.join(case["dataset_dir"], os.path.expanduser(case["label"]))
        try:
            values = np.asarray(loader(path))
        except Exception:  # unreadable files are reported by the checks that follow
            continue
        finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
        if finite.size:
            largest = max(largest, int(np.floor(finite.max())))
    return largest + 1


def _merged_names(
    given: Any, datalists: Sequence[tuple[str, Mapping[str, Any], str]], key: str
) -> tuple[dict[int, str] | None, str]:
    """Names given explicitly, else the first datalist's ``key`` (every datalist that has one must agree)."""
    if given is not None:
        return parse_names(given, key), "given"
    found, source = None, ""
    for name, datalist, _ in datalists:
        if not datalist.get(key):
            continue  # absent or empty: no names from this datalist
        names = parse_names(datalist[key], key, name)
        if found is None:
            found, source = names, name
        elif names != found:
            raise ExportError(f"{key} of {name} {names} differ from those of {source} {found}: pass {key} explicitly")
    return found, source


def _gather_sources(
    datalist: Mapping[str, Any] | str | os.PathLike | Sequence[Mapping[str, Any] | str | os.PathLike],
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike] | None,
) -> tuple[list[tuple[str, Mapping[str, Any], str]], list[str | None]]:
    """``(name, datalist, dataset_dir)`` per datalist given, and each one's absolute JSON path (None: a mapping)."""
    items = [datalist] if isinstance(datalist, (str, os.PathLike, Mapping)) else list(datalist)
    if not items:
        raise ExportError("no datalist given")
    if dataset_dir is None:
        dirs: list[Any] = [None] * len(items)
    else:
        dirs = [dataset_dir] if isinstance(dataset_dir, (str, os.PathLike)) else list(dataset_dir)
        if len(dirs) != len(items):
            raise ExportError(f"{len(dirs)} dataset folder(s) for {len(items)} datalist(s): give one each, or none")
    sources, files = [], []
    for index, (item, directory) in enumerate(zip(items, dirs)):
        is_file = isinstance(item, (str, os.PathLike))
        unnamed = None if is_file or len(items) == 1 else f"datalist[{index}]"
        data, directory, source_name = as_datalist(item, directory, unnamed)
        if not os.path.isdir(directory):
            raise InputNotFoundError(f"data set folder not found: {directory}")
        sources.append((source_name, data, directory))
        files.append(os.path.abspath(os.fspath(item)) if is_file else None)
    return sources, files


def _check_target(output_dir: str, folder_name: str, dataset_id: int, overwrite: bool) -> str:
    """The data set folder to write; refuse an existing one (unless ``overwrite``) and another folder with the id."""
    target = os.path.join(output_dir, folder_name)
    if os.path.exists(target) and not overwrite:
        raise ExportFolderError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.isdir(output_dir):
        prefix = f"Dataset{int(dataset_id):03d}_"
        others = sorted(d for d in os.listdir(output_dir) if d.startswith(prefix) and d != folder_name)
        if others:
            raise ExportFolderError(
                f"{output_dir} already has {others[0]} with dataset id {int(dataset_id)}: nnU-Net needs one folder per "
                "id; choose another id (--id) or remove it"
            )
    return target


def _class_names(
    given: Any, sources: Sequence[tuple[str, Mapping[str, Any], str]], cases: Sequence[Mapping[str, Any]]
) -> tuple[dict[int, str], str, int]:
    """``(index -> class name, where the names came from, number of classes)``; class 0 is called background."""
    label_names, label_source = _merged_names(given, sources, "labels")
    num_classes = len(label_names) if label_names else _find_label_count(cases)
    if label_names is None:
        label_names = {k: f"class_{k}" for k in range(num_classes)}
        label_source = "class_<k>: no names given"
    label_names = dict(label_names)
    label_names[0] = "background"  # nnU-Net requires this name for class 0
    return label_names, label_source, num_classes


def _count_channels(case: Mapping[str, Any]) -> int | None:
    """The image channels of one case as the bundles read them; None when unreadable (the checks report it)."""
    from monai.transforms import LoadImage

    paths = [os.path.join(case["dataset_dir"], os.path.expanduser(p)) for p in _file_paths(case["image"])]
    try:
        image = LoadImage(image_only=True, ensure_channel_first=True)(paths if len(paths) > 1 else paths[0])
    except Exception:  # reported with every other problem by the datalist checks
        return None
    return int(image.shape[0])


def _channel_names(
    given: Any, sources: Sequence[tuple[str, Mapping[str, Any], str]], first: Mapping[str, Any]
) -> tuple[dict[int, str] | None, int | None]:
    """``(index -> channel name or None when none are given, channel count of the first case)``."""
    num_channels = _count_channels(first)
    channels, _ = _merged_names(given, sources, "channel_names")
    if channels is not None and num_channels is not None and len(channels) != num_channels:
        raise ExportError(
            f"channel_names {channels} name {len(channels)} channel(s), but {first['datalist']}: "
            f"{first['split']}[{first['index']}] has {num_channels}"
        )
    return channels, num_channels


def _check_sources(
    sources: Sequence[tuple[str, Mapping[str, Any], str]], splits: Sequence[str], num_classes: int,
    num_channels: int | None,
) -> None:
    """Run the datalist checks on the exported splits of every datalist; raise with every problem found."""
    problems = []
    for source_name, data, directory in sources:
        present = [s for s in splits if data.get(s)]
        if present:
            problems += [
                f"{source_name}: {p}"
                for p in find_problems(data, directory, num_classes, num_channels, splits=present,
                                       datalist_name=source_name)
            ]
    if problems:
        raise DataCheckError(problems, ", ".join(s[0] for s in sources))


def _dataset_json(
    name: str, description: str | None, sources: Sequence[tuple[str, Mapping[str, Any], str]],
    channels: Mapping[int, str], label_names: Mapping[int, str], num_training: int,
) -> dict[str, Any]:
    """nnU-Net's ``dataset.json``; reference and licence are copied when the datalists agree on one."""
    if description is None:
        description = sources[0][1].get("description") if len(sources) == 1 else None
        description = description or "exported by segdiff export-nnunet from " + ", ".join(s[0] for s in sources)
    dataset_json: dict[str, Any] = {
        "name": name,
        "description": description,
        "channel_names": {str(k): v for k, v in channels.items()},
        "labels": {label_names[k]: k for k in sorted(label_names)},
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
    }
    for key, nnunet_key in (("reference", "reference"), ("licence", "licence"), ("license", "licence")):
        values = {d.get(key) for _, d, _ in sources if d.get(key)}
        if len(values) == 1:
            dataset_json[nnunet_key] = values.pop()
    return dataset_json


def _export_record(
    sources: Sequence[tuple[str, Mapping[str, Any], str]], files: Sequence[str | None], splits: Sequence[str],
    case_prefix: Sequence[str] | None, label_source: str, notes: Sequence[str], cases: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """:data:`EXPORT_RECORD`: the sources, the settings and the datalist entry of every nnU-Net case."""
    return {
        "sources": [
            {"datalist": file or source_name, "dataset_dir": os.path.abspath(directory)}
            for (source_name, _, directory), file in zip(sources, files)
        ],
        "splits": list(splits),
        "case_prefix": list(case_prefix) if case_prefix else None,
        "labels_from": label_source,
        "notes": list(notes),
        "cases": {c["case"]: {k: c[k] for k in ("datalist", "split", "index", "image", "label")} for c in cases},
    }


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _write_staging(
    staging: str, cases: Sequence[Mapping[str, Any]], num_classes: int, dataset_json: Mapping[str, Any],
    record: Mapping[str, Any], progress: bool, what: str,
) -> None:
    """Write the whole data set (cases, ``dataset.json``, export record) into the fresh folder ``staging``."""
    if os.path.exists(staging):
        shutil.rmtree(staging)
    images_dir, labels_dir = os.path.join(staging, "imagesTr"), os.path.join(staging, "labelsTr")
    os.makedirs(images_dir)
    os.makedirs(labels_dir)
    iterator: Any = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc=f"writing {what}", unit="case")
    for case in iterator:
        _export_case(case, images_dir, labels_dir, num_classes)
    _write_json(os.path.join(staging, "dataset.json"), dataset_json)
    _write_json(os.path.join(staging, EXPORT_RECORD), record)


def _move_into_place(staging: str, target: str) -> None:
    """Replace ``target`` by the finished ``staging`` folder; an existing target keeps files an export does not
    write (``imagesTs``, ...)."""
    if not os.path.exists(target):
        os.replace(staging, target)
        return
    for item in ("imagesTr", "labelsTr", "dataset.json", EXPORT_RECORD):
        old = os.path.join(target, item)
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
    for item in os.listdir(staging):
        os.replace(os.path.join(staging, item), os.path.join(target, item))
    shutil.rmtree(staging)


def export_nnunet(
    datalist: Mapping[str, Any] | str | os.PathLike | Sequence[Mapping[str, Any] | str | os.PathLike],
    output_dir: str | os.PathLike,
    dataset_id: int,
    name: str,
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    splits: Sequence[str] = ("training", "validation"),
    labels: Any = None,
    channel_names: Any = None,
    case_prefix: Sequence[str] | None = None,
    description: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write the pairs of one or more datalists as the nnU-Net v2 raw data set ``<output_dir>/DatasetXXX_<name>``.

    Everything is checked before the first file is written (the datalist checks: readable files, image and label
    of one spatial shape and affine, integer labels in ``[0, num_classes)``, finite intensities, one channel count
    for all cases; plus unique case identifiers and a free dataset id). The data set is built in a hidden folder
    beside the target and moved into place at the end, so a crash leaves no half-written data set.

    Args:
        datalist: a datalist JSON file or a loaded datalist, or several (e.g. the real data's and a synthetic set's).
        output_dir: nnU-Net's raw folder (``$nnUNet_raw``); created if missing.
        dataset_id: the nnU-Net dataset id, 1..999 (no other ``DatasetXXX_*`` folder there may use it).
        name: the dataset name: ``Dataset042_<name>``.
        dataset_dir: folder(s) the datalists' paths are relative to, one per datalist (default: each datalist's
            own folder; required for a loaded datalist).
        splits: the splits whose pairs are exported (default training and validation; nnU-Net makes its own
            cross-validation folds); a datalist without one of them is skipped for it.
        labels: class names, index -> name (any form :func:`parse_names` reads); default: the datalists'
            ``"labels"``, else ``class_<k>`` up to the largest label value found.
        channel_names: image channel names (nnU-Net picks its intensity normalisation by them: ``"CT"`` gets CT
            normalisation, any other name z-scoring); default: the datalists' ``"channel_names"``, else ``"image"``
            for one channel and ``"channel_<k>"`` for several.
        case_prefix: one prefix per datalist for its case identifiers (default none).
        description: ``dataset.json``'s description (default: the first datalist's, or one naming the sources).
        overwrite: replace an existing ``DatasetXXX_<name>`` (its ``imagesTr``, ``labelsTr``, ``dataset.json`` and
            export record; other files there are kept). Default False: refuse.
        progress: show a progress bar while writing.

    Returns:
        the path of the data set folder.

    Raises:
        DataCheckError: the checks found problems (all are listed).
        ExportFolderError: the data set folder exists and ``overwrite`` is False, or another folder uses the id (a
            ``FileExistsError``).
        InputNotFoundError: a datalist or data set folder does not exist.
        OutputCollisionError: two entries would become one nnU-Net case.
        ExportError: bad arguments, inconsistent names (a ``ValueError``).
    """
    sources, files = _gather_sources(datalist, dataset_dir)
    splits = [splits] if isinstance(splits, str) else list(splits)
    folder_name = dataset_folder_name(dataset_id, name)
    output_dir = os.fspath(output_dir)
    target = _check_target(output_dir, folder_name, dataset_id, overwrite)

    cases, notes = plan_cases(sources, splits, case_prefix)
    if not cases:
        raise DatalistError(f"nothing to export: no entries in splits {splits} of {', '.join(s[0] for s in sources)}")
    label_names, label_source, num_classes = _class_names(labels, sources, cases)
    channels, num_channels = _channel_names(channel_names, sources, cases[0])
    _check_sources(sources, splits, num_classes, num_channels)
    if channels is None:
        channels = {0: "image"} if num_channels == 1 else {k: f"channel_{k}" for k in range(num_channels)}

    dataset_json = _dataset_json(name, description, sources, channels, label_names, len(cases))
    record = _export_record(sources, files, splits, case_prefix, label_source, notes, cases)
    os.makedirs(output_dir, exist_ok=True)
    staging = os.path.join(output_dir, f".{folder_name}.partial-{os.getpid()}")
    try:
        _write_staging(staging, cases, num_classes, dataset_json, record, progress, folder_name)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
