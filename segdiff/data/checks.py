"""Check a datalist's files before any training or inference starts.

Every file is read with MONAI's ``LoadImage(image_only=True, ensure_channel_first=True)``, the loader the
bundles use, so the checks see what training will see (NIfTI, a list of per-channel files, PNG, ...).
All problems are collected, not just the first, so one run lists everything to fix::

    segdiff check datalist.json --num-classes 4

or, from a bundle config::

    "$segdiff.data.checks.check_datalist(segdiff.data.datalist.load_datalist(@datalist), @dataset_dir,
      @num_classes, @image_channels)"
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from segdiff.data.datalist import as_datalist
from segdiff.data.naming import output_case_name
from segdiff.errors import OutputCollisionError, SegdiffError

__all__ = [
    "voxel_orientation",
    "file_orientation",
    "data_orientation",
    "AFFINE_TOLERANCE",
    "MAX_REPORTED_VALUES",
    "OUTPUT_KEYS",
    "DataCheckError",
    "OutputCollision",
    "check_datalist",
    "check_output_names",
    "find_problems",
    "output_name_collisions",
]

#: largest allowed absolute difference between the image's and the label's 4x4 affine entries
AFFINE_TOLERANCE = 1e-3
#: how many offending label values a message lists
MAX_REPORTED_VALUES = 5
#: the entry keys the bundles' inference names its outputs after, and which bundle does
OUTPUT_KEYS = {"label": "mask -> image", "image": "image -> mask"}


class DataCheckError(SegdiffError, ValueError):
    """Problems found in a datalist's files: a header line, then one bullet line per problem."""

    def __init__(self, problems: Sequence[str], datalist_name: str = "datalist"):
        self.problems = list(problems)
        self.datalist_name = datalist_name
        lines = [f"{datalist_name}: {len(self.problems)} problem(s) found:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def voxel_orientation(affine: Any) -> str | None:
    """Axis codes of a voxel-to-world affine (e.g. ``"RAS"``: the first voxel axis points to the subject's right,
    ...); None for a degenerate affine."""
    import nibabel as nib

    try:
        return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine, dtype=float)))
    except Exception:  # a degenerate affine: the affine checks report what they can
        return None


def file_orientation(path: str | os.PathLike) -> str | None:
    """:func:`voxel_orientation` of an image file's header; None for a file nibabel cannot read or that has no
    affine (PNG)."""
    import nibabel as nib

    try:
        affine = nib.load(os.fspath(path)).affine
    except Exception:  # unreadable: the data check reports what matters
        return None
    return None if affine is None else voxel_orientation(affine)


def _first_path(value: Any) -> str | None:
    value = value[0] if isinstance(value, (list, tuple)) and value else value
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None


def data_orientation(entries: Iterable[Any], key: str = "image") -> str | None:
    """The voxel orientation of the files under ``key`` of ``entries`` (paths as the run reads them; the first file
    of a per-channel list), recorded with trained weights so that inference can refuse inputs in another one. The
    data check refuses entries that mix orientations; should they mix anyway, the most common one is returned.
    None when no file has an affine (PNG) or ``entries`` is empty."""
    counts: dict[str, int] = {}
    for entry in entries:
        path = _first_path(entry.get(key) if isinstance(entry, Mapping) else entry)
        codes = None if path is None else file_orientation(path)
        if codes is not None:
            counts[codes] = counts.get(codes, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _one_line(text: str, limit: int = 300) -> str:
    """Squeeze a (loader's) exception message onto one bounded line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_affine(affine: np.ndarray) -> str:
    rows = ["[" + ", ".join(f"{v:.4g}" for v in row) + "]" for row in np.asarray(affine, dtype=float)]
    return "[" + ", ".join(rows) + "]"


def _format_values(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:MAX_REPORTED_VALUES])
    more = len(values) - MAX_REPORTED_VALUES
    return shown + (f" (and {more} more)" if more > 0 else "")


def _paths(value: Any) -> list[str] | None:
    """The file paths of one entry value, or None when it is neither a path nor a list of paths."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    return None


class OutputCollision(NamedTuple):
    """Inputs whose outputs would get one name: the shared ``output_name`` and, per input, its entry index and the
    file the name comes from (the first file of a per-channel list)."""

    output_name: str
    indices: tuple[int, ...]
    files: tuple[str, ...]

    def describe(self) -> str:
        """``output 'p1': entry 0 siteA/p1.nii.gz, entry 3 siteB/p1.nii.gz``, on one line."""
        inputs = ", ".join(f"entry {i} {f}" for i, f in zip(self.indices, self.files))
        duplicate = " (the same file listed more than once: remove the duplicates)" if len(set(self.files)) == 1 else ""
        return f"output {self.output_name!r}: {inputs}{duplicate}"


def output_name_collisions(entries: Iterable[Any], key: str) -> list[OutputCollision]:
    """The groups of entries whose ``key`` file gives one output case name (outputs are named after the input
    file's name without folder and extension: :func:`segdiff.data.naming.output_case_name`), e.g.
    ``siteA/patient1.nii.gz`` and ``siteB/patient1.nii.gz`` both give ``patient1``.

    Args:
        entries: datalist entries (one split, or inference inputs); entries without ``key`` or whose value is not a
            path or a list of paths are skipped (the datalist checks report those).
        key: the entry key the outputs are named after (``"label"`` for mask -> image, ``"image"`` for
            image -> mask).

    Returns:
        one :class:`OutputCollision` per shared name, in the order the names first occur; empty when every name
        is unique.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or key not in entry:
            continue
        paths = _paths(entry[key])
        if paths is None:
            continue
        groups.setdefault(output_case_name(paths), []).append((index, paths[0]))
    return [
        OutputCollision(name, tuple(i for i, _ in members), tuple(f for _, f in members))
        for name, members in groups.items()
        if len(members) > 1
    ]


def check_output_names(entries: Iterable[Any], key: str, name: str | None = None) -> list[Any]:
    """Refuse inputs that would be written to one output file, before any sampling starts.

    Args:
        entries: the inputs of an inference run (datalist entries, e.g. from ``segdiff.data.inputs.inference_entries``).
        key: the entry key the outputs are named after (``"label"`` for mask -> image, ``"image"`` for
            image -> mask).
        name: where the inputs came from (datalist path or input folder), for the message; default ``"inputs"``.

    Returns:
        the entries, as a list (so a config can check and use them in one expression).

    Raises:
        OutputCollisionError: naming every colliding input file and the output name they share.
    """
    entries = list(entries)
    collisions = output_name_collisions(entries, key)
    if collisions:
        lines = [
            f"{name or 'inputs'}: {len(collisions)} output name(s) would be shared by several inputs under {key!r} "
            "(outputs are named after the input file, without folder and extension), so later outputs would "
            "overwrite earlier ones:"
        ]
        lines += [f"  - {c.describe()}" for c in collisions]
        lines.append(
            "Rename the files so that their names differ, or run each folder separately with its own output_dir."
        )
        raise OutputCollisionError("\n".join(lines))
    return entries


class _Checker:
    """Collects the problems of one datalist; one method per kind of check."""

    def __init__(self, dataset_dir: str, num_classes: int, image_channels: int | None):
        from monai.transforms import LoadImage  # imported here: monai takes seconds to import

        self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.dataset_dir = dataset_dir
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.problems: list[str] = []
        self.orientations: dict[str, list[str]] = {}  # voxel axis codes ("RAS", "LPS", ...) -> entries

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def load(self, where: str, value: Any, paths: list[str]) -> Any:
        """Load one entry value (path or list of paths); report missing or unreadable files, return None."""
        missing = False
        for p in paths:
            full = os.path.join(self.dataset_dir, os.path.expanduser(p))
            if not os.path.isfile(full):
                self.add(where, f"file not found: {p} (looked for {os.path.abspath(full)})")
                missing = True
        if missing:
            return None
        full_paths = [os.path.join(self.dataset_dir, os.path.expanduser(p)) for p in paths]
        try:
            return self.loader(full_paths if isinstance(value, (list, tuple)) else full_paths[0])
        except Exception as e:  # any reader error is a problem to report, not a crash
            files = paths[0] if len(paths) == 1 else paths
            self.add(where, f"cannot read {files}: {type(e).__name__}: {_one_line(e)}")
            return None

    def check_image(self, where: str, img: Any, paths: list[str]) -> None:
        """Channel count and NaN/Inf intensities of an image."""
        array = np.asarray(img)
        channels = array.shape[0]
        if self.image_channels is not None and channels != self.image_channels:
            self.add(
                where,
                f"{paths[0] if len(paths) == 1 else paths}: expected {self.image_channels} image channel(s), "
                f"found {channels} (shape {tuple(array.shape)}, channels first)",
            )
        if not np.issubdtype(array.dtype, np.floating):
            return
        for c in range(channels):
            bad_nan = int(np.isnan(array[c]).sum())
            bad_inf = int(np.isinf(array[c]).sum())
            if bad_nan or bad_inf:
                file = paths[c] if len(paths) == channels else (paths[0] if len(paths) == 1 else paths)
                self.add(
                    where,
                    f"{file}: expected finite intensities, found {bad_nan} NaN and {bad_inf} Inf voxel(s) "
                    f"in channel {c}",
                )

    def note_orientation(self, where: str, img: Any) -> None:
        """Record the voxel axis codes of an image (from its affine) for :meth:`check_orientations`."""
        codes = voxel_orientation(getattr(img, "affine", np.eye(4)))
        if codes is not None:  # a degenerate affine: the affine checks elsewhere report what they can
            self.orientations.setdefault(codes, []).append(where)

    def check_orientations(self) -> None:
        """One voxel order for every image: the networks see arrays, so other orders arrive mirrored or turned."""
        if len(self.orientations) < 2:
            return
        groups = sorted(self.orientations.items(), key=lambda kv: -len(kv[1]))

        def listed(wheres: list[str]) -> str:
            return ", ".join(wheres[:4]) + (f" and {len(wheres) - 4} more" if len(wheres) > 4 else "")

        found = "; ".join(f"{codes} ({len(w)}: {listed(w)})" for codes, w in groups)
        self.add(
            "orientation",
            f"expected every image in one voxel orientation, found {found}. The networks work on voxel arrays, so "
            f"an image in another orientation reaches them mirrored or turned (a liver on the wrong side). Reorient "
            f"the files to one orientation first, e.g. RAS with nibabel: nib.as_closest_canonical(nib.load(path))"
            f".to_filename(path) for each image and its label (axes permuted and flipped, no resampling)",
        )

    def check_label(self, where: str, lbl: Any, path: str) -> None:
        """Channel count and label values (integers in [0, num_classes)) of a label."""
        array = np.asarray(lbl)
        if array.shape[0] != 1:
            self.add(
                where,
                f"{path}: expected a label with 1 channel (class indices), found {array.shape[0]} channels "
                f"(shape {tuple(array.shape)}, channels first)",
            )
        values = np.unique(array)
        finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
        if len(finite) != len(values):
            self.add(where, f"{path}: expected integer class indices, found NaN or Inf values")
        non_integer = finite[finite != np.round(finite)]
        if len(non_integer):
            self.add(
                where,
                f"{path}: expected integer class indices, found non-integer values {_format_values(non_integer)}",
            )
        if self.num_classes > 0:
            integers = finite[finite == np.round(finite)]
            out_of_range = integers[(integers < 0) | (integers >= self.num_classes)]
            if len(out_of_range):
                self.add(
                    where,
                    f"{path}: expected class indices in [0, {self.num_classes}) for num_classes="
                    f"{self.num_classes}, found {_format_values(out_of_range)}",
                )

    def check_pair(self, where: str, img: Any, lbl: Any, image_value: Any, label_path: str) -> None:
        """Spatial shape and affine of a label against its image."""
        image_shape = tuple(img.shape[1:])
        label_shape = tuple(lbl.shape[1:])
        if image_shape != label_shape:
            self.add(
                where,
                f"{label_path}: expected the image's spatial shape {image_shape} (image {image_value}), "
                f"found {label_shape}",
            )
            return
        image_affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=float)
        label_affine = np.asarray(getattr(lbl, "affine", np.eye(4)), dtype=float)
        if image_affine.shape != label_affine.shape:
            self.add(where, f"{label_path}: affine is {label_affine.shape}, the image's is {image_affine.shape}")
            return
        diff = float(np.max(np.abs(image_affine - label_affine)))
        if diff > AFFINE_TOLERANCE:
            self.add(
                where,
                f"{label_path}: expected the image's affine {_format_affine(image_affine)} (image {image_value}), "
                f"found {_format_affine(label_affine)} (max difference {diff:.4g} > {AFFINE_TOLERANCE:g})",
            )


def _modalities(
    datalist: Mapping[str, Any], modality_key: str | None, unlabelled: Sequence[str], checker: _Checker
) -> dict[str, int] | None:
    """The datalist's checked ``"modalities"`` mapping, or None when modalities are not checked."""
    if modality_key is None and "modalities" not in datalist:
        if unlabelled:
            checker.add("modalities", f"unlabelled modalities {list(unlabelled)} given, but the datalist has no "
                                      "'modalities' mapping (e.g. \"modalities\": {\"ct\": 0, \"mr\": 1})")
        return None
    if "modalities" not in datalist:
        checker.add("modalities", "expected a 'modalities' mapping of names to class ids 0..n-1, e.g. "
                                  "\"modalities\": {\"ct\": 0, \"mr\": 1}")
        return None
    from segdiff.engine.latent import modality_ids  # the bundles' own reading of the mapping

    try:
        ids = modality_ids(dict(datalist["modalities"]) if isinstance(datalist["modalities"], Mapping)
                           else datalist["modalities"])
    except SegdiffError as error:
        checker.add("modalities", str(error))
        mapping = datalist["modalities"]  # the entries are still checked against its names
        return {str(k): -1 for k in mapping} if isinstance(mapping, Mapping) else None
    for name in unlabelled:
        if name not in ids:
            checker.add("modalities", f"unlabelled modality {name!r} is not one of {sorted(ids)}")
    return ids


def find_problems(
    datalist: Mapping[str, Any] | str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    num_classes: int,
    image_channels: int | None = None,
    splits: Sequence[str] = ("training", "validation"),
    image_key: str = "image",
    label_key: str = "label",
    require_label: bool = True,
    require_image: bool = True,
    datalist_name: str | None = None,
    output_keys: Sequence[str] = (),
    modality_key: str | None = None,
    unlabelled_modalities: Sequence[str] = (),
) -> list[str]:
    """Check every entry of the given splits and return every problem found (an empty list: all good).

    Each message names the split, the entry index, the key and the file, and says what was expected and
    what was found. Detected: a split missing or empty; an entry that is not an object or lacks a required
    key; a missing or unreadable file; NaN/Inf image intensities; a wrong image channel count; a label with
    more than one channel, non-integer values or values outside ``[0, num_classes)``; image/label spatial
    shapes or affines (tolerance :data:`AFFINE_TOLERANCE`) that differ; images in more than one voxel orientation
    (axis codes from their affines, e.g. RAS next to LPS: the networks would see some of them mirrored); with
    ``output_keys``, entries of one split
    whose files under one of those keys would give one output name (:func:`output_name_collisions`).

    Args:
        datalist: the datalist, or the path of its JSON file.
        dataset_dir: folder the datalist's paths are relative to; None: the datalist file's folder (only
            when ``datalist`` is a path).
        num_classes: number of label classes including background; 0 skips the range check (unconditional
            models do not read labels as classes).
        image_channels: expected image channels; None: not checked.
        splits: the splits to check (default training and validation).
        image_key: entry key of the image (default ``"image"``).
        label_key: entry key of the label (default ``"label"``).
        require_label: report entries without a label (default True); False for image-only datalists.
        require_image: report entries without an image (default True); False for mask-only datalists, e.g.
            masks to generate images from.
        datalist_name: name in messages (default: the file path when ``datalist`` is a path, else ``"datalist"``).
        output_keys: entry keys that inference names outputs after, checked for shared output names within each
            split (default none: training writes no per-case outputs; ``segdiff check`` checks ``image`` and
            ``label``, see :data:`OUTPUT_KEYS`).
        modality_key: entry key naming each image's modality (latent_mask_to_image); None: ``"modality"`` when the
            datalist has a ``"modalities"`` mapping (name -> class id 0..n-1), else not checked. Then the mapping must
            be valid and every entry must name one of its modalities.
        unlabelled_modalities: modalities whose entries need no label (MRGen's target modality); their labels, if
            present, are still checked.
    """
    datalist, dataset_dir, datalist_name = as_datalist(datalist, dataset_dir, datalist_name)
    if isinstance(splits, str):
        splits = [splits]
    if num_classes is None or int(num_classes) < 0:
        raise ValueError(f"num_classes must be an integer >= 0, found {num_classes!r}")
    channels = None if image_channels is None else int(image_channels)
    checker = _Checker(dataset_dir, int(num_classes), channels)
    modalities = _modalities(datalist, modality_key, unlabelled_modalities, checker)
    if modalities is not None and modality_key is None:
        modality_key = "modality"

    for split in splits:
        entries = datalist.get(split)
        if entries is None:
            checker.add(split, f"split missing from {datalist_name} (its keys: {sorted(datalist)})")
            continue
        if not isinstance(entries, list):
            checker.add(split, f"expected a list of entries, found {type(entries).__name__}")
            continue
        if not entries:
            checker.add(split, "split is empty: expected at least one entry")
            continue
        for index, entry in enumerate(entries):
            where = f"{split}[{index}]"
            if not isinstance(entry, Mapping):
                expected = f"{{{image_key!r}: ..., {label_key!r}: ...}}"
                checker.add(where, f"expected an object like {expected}, found {entry!r}")
                continue
            label_required = require_label
            if modalities is not None:
                modality = entry.get(modality_key)
                if modality is None:
                    checker.add(f"{where} {modality_key!r}",
                                f"expected a {modality_key!r} key naming one of {sorted(modalities)}, found keys "
                                f"{sorted(entry)}")
                elif modality not in modalities:
                    checker.add(f"{where} {modality_key!r}",
                                f"{modality!r} is not in the datalist's 'modalities' {sorted(modalities)}")
                label_required = require_label and modality not in set(unlabelled_modalities)
            loaded = {}
            for key, required in ((image_key, require_image), (label_key, label_required)):
                if key not in entry:
                    if required:
                        checker.add(f"{where} {key!r}", f"expected a {key!r} key, found keys {sorted(entry)}")
                    continue
                paths = _paths(entry[key])
                if paths is None:
                    checker.add(f"{where} {key!r}", f"expected a file path or a list of paths, found {entry[key]!r}")
                    continue
                if key == label_key and len(paths) != 1:
                    checker.add(f"{where} {key!r}", f"expected one label file, found {len(paths)}: {paths}")
                    continue
                data = checker.load(f"{where} {key!r}", entry[key], paths)
                if data is None:
                    continue
                if key == image_key:
                    checker.check_image(f"{where} {key!r}", data, paths)
                else:
                    checker.check_label(f"{where} {key!r}", data, paths[0])
                loaded[key] = (data, paths)
            oriented = loaded.get(image_key, loaded.get(label_key))  # a mask-only entry: its mask
            if oriented is not None:
                checker.note_orientation(f"{where} {oriented[1][0]}", oriented[0])
            if image_key in loaded and label_key in loaded:
                img, image_paths = loaded[image_key]
                lbl, label_paths = loaded[label_key]
                image_value = image_paths[0] if len(image_paths) == 1 else image_paths
                checker.check_pair(f"{where} {label_key!r}", img, lbl, image_value, label_paths[0])
        for key in [output_keys] if isinstance(output_keys, str) else output_keys:
            bundle = f" ({OUTPUT_KEYS[key]})" if key in OUTPUT_KEYS else ""
            for collision in output_name_collisions(entries, key):
                checker.add(
                    f"{split} {key!r}",
                    f"{collision.describe()}: an inference run naming its outputs after {key!r}{bundle} would write "
                    "these inputs to one output file; rename the files, or run them separately with different "
                    "output_dir",
                )
    checker.check_orientations()
    return checker.problems


def check_datalist(
    datalist: Mapping[str, Any] | str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    num_classes: int,
    image_channels: int | None = None,
    splits: Sequence[str] = ("training", "validation"),
    image_key: str = "image",
    label_key: str = "label",
    require_label: bool = True,
    require_image: bool = True,
    datalist_name: str | None = None,
    output_keys: Sequence[str] = (),
    modality_key: str | None = None,
    unlabelled_modalities: Sequence[str] = (),
) -> int:
    """Check a datalist like :func:`find_problems` and raise if anything is wrong.

    Meant as the first step of a bundle (``initialize``) so a bad file fails in seconds, not hours in.
    Arguments are those of :func:`find_problems`.

    Returns:
        the number of entries checked.

    Raises:
        DataCheckError: with every problem, one per line.
    """
    datalist, dataset_dir, datalist_name = as_datalist(datalist, dataset_dir, datalist_name)
    if isinstance(splits, str):
        splits = [splits]
    problems = find_problems(
        datalist,
        dataset_dir,
        num_classes,
        image_channels=image_channels,
        splits=splits,
        image_key=image_key,
        label_key=label_key,
        require_label=require_label,
        require_image=require_image,
        datalist_name=datalist_name,
        output_keys=output_keys,
        modality_key=modality_key,
        unlabelled_modalities=unlabelled_modalities,
    )
    if problems:
        raise DataCheckError(problems, datalist_name)
    return sum(len(datalist[s]) for s in splits)
