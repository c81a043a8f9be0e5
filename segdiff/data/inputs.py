"""Which files an inference run reads: a datalist split or a folder of files, checked before any sampling starts."""

from __future__ import annotations

import os
from pathlib import Path

from segdiff.data.checks import check_datalist
from segdiff.data.datalist import IMAGE_EXTENSIONS, DatalistError, InputNotFoundError, resolve_datalist

__all__ = ["check_inference_entries", "inference_entries", "require_file"]


def inference_entries(
    datalist: str | None,
    dataset_dir: str,
    split: str = "test",
    folder: str | None = None,
    key: str = "label",
    with_image: bool = False,
) -> list[dict]:
    """Entries ``{key: path}`` (plus ``"image"`` when ``with_image``) with absolute paths.

    Args:
        datalist: datalist JSON; its ``split`` is used unless ``folder`` is given.
        dataset_dir: folder the datalist's relative paths start from.
        split: datalist split to read.
        folder: a folder whose image files (NIfTI, PNG, MHA, NRRD) are the inputs, in sorted order.
        key: the key the inputs are put under (``"label"`` for masks, ``"image"`` for images).
        with_image: entries must also name their real image (for ``strength < 1``); not possible with ``folder``.
    """
    if folder:
        if with_image and key != "image":
            raise DatalistError("a folder of masks has no real images: use a datalist split to sample with strength < 1.")
        if not os.path.isdir(folder):
            raise InputNotFoundError(f"input folder {folder} does not exist.")
        files = sorted(str(p) for p in Path(folder).iterdir() if p.name.endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DatalistError(f"input folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        return [{key: f} for f in files]
    entries = resolve_datalist(datalist, dataset_dir, split)
    keys = [key] + (["image"] if with_image and key != "image" else [])
    for index, entry in enumerate(entries):
        for k in keys:
            if k not in entry:
                raise DatalistError(f"{datalist}: entry {index} of split '{split}' has no '{k}'.")
    return [{k: entry[k] for k in keys} for entry in entries]


def check_inference_entries(
    entries: list[dict], num_classes: int, image_channels: int | None, name: str, require_image: bool = False
) -> int:
    """Run the datalist checks on resolved inference entries (split ``"test"``); raises with every problem found."""
    has_label = any("label" in e for e in entries)
    return check_datalist(
        {"test": entries},
        "/",
        num_classes,
        image_channels if require_image else None,
        splits=["test"],
        require_label=has_label,
        require_image=require_image,
        datalist_name=str(name),
    )


def require_file(path: str, what: str = "trained weights", hint: str = "train the bundle first or set model_path") -> str:
    """Stop early with a clear message if a file the run needs is missing."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: no {what} there; {hint}.")
    return path
