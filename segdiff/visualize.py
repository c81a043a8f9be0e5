"""Side-by-side panels (condition | generated | real) for TensorBoard and the PNG figures of the docs and demo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["LABEL_COLOURS", "make_panel", "render", "save_png"]

#: RGB colours of label values 0..9 (0 black); classes beyond repeat the palette.
LABEL_COLOURS = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
    ],
    dtype=np.uint8,
)
UNSPECIFIED_COLOUR = np.array([96, 96, 96], dtype=np.uint8)


def _middle_slice(x: np.ndarray, axis: int) -> np.ndarray:
    """(C, *spatial) -> (C, H, W): the middle slice of a 3D volume along ``axis`` (spatial axis)."""
    if x.ndim == 4:
        return np.take(x, x.shape[axis + 1] // 2, axis=axis + 1)
    return x


def render(x: torch.Tensor | np.ndarray, kind: str = "image", slice_axis: int = 2) -> np.ndarray:
    """One case ``(C, *spatial)`` as an RGB uint8 picture ``(H, W, 3)``.

    Args:
        x: the tensor to draw; for 3D, its middle slice along ``slice_axis`` is drawn.
        kind: ``"image"``: first channel, values in [-1, 1] mapped to grey; ``"onehot"``: a one-hot (or soft) mask,
            drawn as label colours, voxels with no class set ("unspecified") in grey; ``"label"``: an integer
            label map.
        slice_axis: spatial axis for 3D inputs.
    """
    a = _middle_slice(np.asarray(torch.as_tensor(x).detach().float().cpu()), slice_axis)
    # array rows run along the first in-plane axis; rotate so that RAS data shows anterior (or superior) up
    a = np.ascontiguousarray(np.rot90(a, axes=(1, 2)))
    if kind == "image":
        grey = np.clip((a[0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if kind == "onehot":
        labels = a.argmax(axis=0)
        rgb = LABEL_COLOURS[labels % len(LABEL_COLOURS)]
        rgb[a.max(axis=0) <= 0.5] = UNSPECIFIED_COLOUR
        return rgb
    if kind == "label":
        return LABEL_COLOURS[np.rint(a[0]).astype(np.int64) % len(LABEL_COLOURS)]
    raise ValueError(f"kind must be 'image', 'onehot' or 'label', got {kind!r}.")


def make_panel(
    columns: Sequence[torch.Tensor | np.ndarray], kinds: Sequence[str], slice_axis: int = 2, gap: int = 2
) -> np.ndarray:
    """A grid with one row per case and one column per entry of ``columns`` (each ``(B, C, *spatial)``).

    Returns an RGB uint8 array ``(H, W, 3)``; pictures of one row are padded to a common size.
    """
    if len(columns) != len(kinds):
        raise ValueError(f"got {len(columns)} columns but {len(kinds)} kinds.")
    rows = []
    for b in range(len(columns[0])):
        pictures = [render(col[b], kind, slice_axis) for col, kind in zip(columns, kinds)]
        height = max(p.shape[0] for p in pictures)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0)), constant_values=255) for p in pictures]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def save_png(panel: np.ndarray, path: str, scale: int = 1) -> None:
    """Write an RGB panel as PNG, nearest-neighbour upscaled by ``scale``."""
    from PIL import Image

    picture = Image.fromarray(panel)
    if scale > 1:
        picture = picture.resize((panel.shape[1] * scale, panel.shape[0] * scale), Image.NEAREST)
    picture.save(path)


def load_for_panel(path: str, kind: str) -> np.ndarray:
    """A NIfTI file as ``(1, *spatial)`` for :func:`render`: an ``"image"`` scaled to [-1, 1] between its 0.5th and
    99.5th percentiles, a ``"label"`` map as stored."""
    import nibabel as nib

    a = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    if kind == "label":
        return a[None]
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-6) * 2 - 1, -1, 1)[None]


def save_file_panel(rows: Sequence[Sequence[str]], kinds: Sequence[str], path: str, slice_axis: int = 2,
                    scale: int = 2) -> None:
    """A PNG of NIfTI files: one row per case, one column per kind (``"image"`` or ``"label"``), middle slices."""
    columns = [[load_for_panel(row[k], kind) for row in rows] for k, kind in enumerate(kinds)]
    save_png(make_panel(columns, kinds, slice_axis), path, scale=scale)
