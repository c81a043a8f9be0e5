"""Anatomical plausibility of generated masks: compare a label map drawn by an unconditional mask generator with what
the generator's training masks looked like, before the mask feeds mask -> image synthesis.

:class:`MaskStatistics` records, from the training masks (all on the model grid), per foreground class the range of
volumes, the most connected components seen and how many masks contain the class, plus the *body support*: every voxel
that is foreground in at least one training mask. It is saved next to a trained mask generator
(:meth:`MaskStatistics.to_json`) and reloaded at synthesis time (:meth:`MaskStatistics.from_json`).

:class:`PlausibilityFilter` rejects a generated mask, with one human-readable reason per failed rule, when

1. a class it contains has a volume outside ``[min * (1 - tol), max * (1 + tol)]`` of the training volumes of that
   class (a class no training mask contains has no range: any voxel of it is a rejection);
2. a class that every training mask contains is absent;
3. a class has more connected components than allowed (default: the most seen for that class in training);
4. foreground voxels lie outside the body support dilated by ``body_margin`` voxels.

Conventions shared by both classes:

- A mask is ``(*spatial)`` or ``(1, *spatial)`` with 2 or 3 spatial axes; a leading axis of length 1 is taken as the
  channel when the mask has 3 or 4 axes (so a ``(1, H, W)`` array is a 2D mask, not a volume of depth 1).
- Connected components use full connectivity: 8 neighbours in 2D, 26 in 3D (diagonal contact joins two parts).
- The body margin is a dilation with the same full-connectivity structure, so a voxel is inside the margin when it
  is at most ``body_margin`` voxels away from the support along every axis (a square or cube around it).
- Volumes are voxel counts; in mm^3 they are the counts times the voxel volume of the statistics' spacing (see
  :meth:`MaskStatistics.from_masks` for where the spacing comes from). Generated masks lie on the statistics' grid,
  so both units reach the same decisions; ``volume_unit`` chooses the unit of the reported numbers.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from scipy import ndimage

__all__ = ["ClassStatistics", "MaskStatistics", "PlausibilityFilter"]

#: the ``format`` entry of a statistics file, checked when reading one
STATISTICS_FORMAT = "segdiff.mask_statistics"
STATISTICS_VERSION = 1
#: how the body support is stored in the json: ``np.packbits`` of the C-order flattened support, zlib-compressed,
#: base64-encoded (the support is mostly large solid regions, so it compresses to a few kB)
SUPPORT_ENCODING = "packbits+zlib+base64"


def _spatial(mask: Any, where: str) -> tuple[np.ndarray, MetaTensor | None]:
    """The mask as a ``(*spatial)`` integer numpy array (and the MetaTensor it came from, for its affine)."""
    meta = mask if isinstance(mask, MetaTensor) else None
    if isinstance(mask, torch.Tensor):
        array = mask.detach().cpu().numpy()
    else:
        array = np.asarray(mask)
    if array.ndim in (3, 4) and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{where}: expected a label map (*spatial) or (1, *spatial) with 2 or 3 spatial axes, "
            f"got shape {tuple(np.shape(mask))}."
        )
    if array.dtype == bool:
        array = array.astype(np.int64)
    elif not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{where}: expected integer class ids, got dtype {array.dtype}.")
        fractional = np.unique(array[array != np.round(array)])
        if fractional.size:
            raise ValueError(f"{where}: expected integer class ids, found values {_listed(fractional)}.")
    return array.astype(np.int64, copy=False), meta


def _listed(values: np.ndarray, at_most: int = 10) -> str:
    shown = [v.item() for v in values[:at_most]]
    return str(shown)[:-1] + (f", ... ({values.size} values)]" if values.size > at_most else "]")


def _check_values(array: np.ndarray, num_classes: int, where: str) -> None:
    outside = np.unique(array[(array < 0) | (array >= num_classes)])
    if outside.size:
        raise ValueError(
            f"{where} holds values {_listed(outside)} outside [0, {num_classes}) (num_classes={num_classes})."
        )


def _voxels(count: int) -> str:
    return f"{count} voxel" + ("" if count == 1 else "s")


def _structure(ndim: int) -> np.ndarray:
    """Full connectivity: every voxel of the 3x3(x3) neighbourhood touches the centre."""
    return ndimage.generate_binary_structure(ndim, ndim)


def _components(array: np.ndarray, cls: int) -> int:
    return int(ndimage.label(array == cls, structure=_structure(array.ndim))[1])


def _spacing_of(meta: MetaTensor, ndim: int) -> tuple[float, ...]:
    return tuple(float(s) for s in affine_to_spacing(meta.affine, r=ndim))


@dataclass
class ClassStatistics:
    """What one foreground class looked like in the training masks.

    Args:
        masks_with_class: how many training masks contain at least one voxel of the class.
        min_voxels: the smallest volume (voxels) among the masks that contain the class; None when none does.
        max_voxels: the largest volume (voxels); None when no mask contains the class.
        max_components: the most connected components of the class in one training mask (0 when never present).
    """

    masks_with_class: int = 0
    min_voxels: int | None = None
    max_voxels: int | None = None
    max_components: int = 0


@dataclass(eq=False)
class MaskStatistics:
    """What the training masks of a mask generator look like; build it with :meth:`from_masks`.

    Args:
        num_classes: classes including background (class ids ``0..num_classes-1``).
        shape: the spatial shape of the grid all masks lie on.
        spacing: voxel size in mm per spatial axis, or None when unknown (volumes then only in voxels).
        num_masks: how many training masks were counted.
        classes: per foreground class ``1..num_classes-1``, its :class:`ClassStatistics`.
        support: boolean array of ``shape``: True where at least one training mask has foreground.
    """

    num_classes: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    num_masks: int
    classes: dict[int, ClassStatistics]
    support: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.spacing = None if self.spacing is None else tuple(float(s) for s in self.spacing)
        self.support = np.asarray(self.support, dtype=bool)
        if self.support.shape != self.shape:
            raise ValueError(f"support has shape {self.support.shape}, the grid is {self.shape}.")
        if self.spacing is not None and len(self.spacing) != len(self.shape):
            raise ValueError(
                f"spacing {self.spacing} has {len(self.spacing)} values, the grid {self.shape} has "
                f"{len(self.shape)} axes."
            )
        expected = list(range(1, self.num_classes))
        if sorted(self.classes) != expected:
            raise ValueError(f"classes must hold the foreground classes {expected}, got {sorted(self.classes)}.")

    @property
    def voxel_volume_mm3(self) -> float | None:
        """Volume of one voxel in mm^3 (None without a spacing)."""
        return None if self.spacing is None else float(math.prod(self.spacing))

    def always_present(self) -> list[int]:
        """Foreground classes that every training mask contains."""
        return [c for c, s in self.classes.items() if s.masks_with_class == self.num_masks]

    @classmethod
    def from_masks(
        cls,
        masks: Iterable[Any],
        num_classes: int,
        spacing: float | Sequence[float] | None = None,
    ) -> MaskStatistics:
        """Count the statistics of training masks, one mask at a time (a generator over a data set is fine).

        Args:
            masks: label maps ``(*spatial)`` or ``(1, *spatial)`` (torch tensors, MetaTensors or numpy arrays), 2D or
                3D, integer class ids in ``[0, num_classes)``, all on the same grid.
            num_classes: classes including background.
            spacing: voxel size in mm, one number for every axis or one per spatial axis. When it is None, the
                spacing is read from the affine of the masks that are MetaTensors (they must all agree); when
                neither is there, the statistics carry no spacing and volumes are in voxels only. An explicit
                ``spacing`` wins over the affines (for masks whose affine is not to be trusted).

        Raises:
            ValueError: no masks; a mask of another spatial shape or another MetaTensor spacing than the first; a
                value outside ``[0, num_classes)``; ``num_classes`` < 2; a spacing that is not positive.
        """
        num_classes = int(num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and a class), got {num_classes}.")
        if spacing is not None and not all(float(v) > 0 for v in np.atleast_1d(np.asarray(spacing, dtype=float))):
            raise ValueError(f"spacing must be positive (mm per voxel), got {spacing}.")
        shape: tuple[int, ...] | None = None
        support: np.ndarray | None = None
        meta_spacing: tuple[float, ...] | None = None
        meta_index = -1
        final_spacing: tuple[float, ...] | None = None
        present = np.zeros(num_classes, dtype=np.int64)
        smallest = np.full(num_classes, np.iinfo(np.int64).max, dtype=np.int64)
        largest = np.zeros(num_classes, dtype=np.int64)
        components = np.zeros(num_classes, dtype=np.int64)
        count = 0
        for index, mask in enumerate(masks):
            where = f"training mask {index}"
            array, meta = _spatial(mask, where)
            if shape is None:
                shape, support = array.shape, np.zeros(array.shape, dtype=bool)
                if spacing is not None:
                    given = np.atleast_1d(np.asarray(spacing, dtype=float))
                    if given.size not in (1, len(shape)):
                        raise ValueError(
                            f"spacing must be one number or {len(shape)} (one per spatial axis of the grid {shape}), "
                            f"got {spacing}."
                        )
                    final_spacing = tuple(float(v) for v in np.broadcast_to(given, (len(shape),)))
            elif array.shape != shape:
                raise ValueError(
                    f"{where} has spatial shape {array.shape}, mask 0 has {shape}: all training masks must lie on "
                    "one grid (resample them to the model grid first)."
                )
            _check_values(array, num_classes, where)
            if meta is not None and spacing is None:
                this = _spacing_of(meta, array.ndim)
                if meta_spacing is None:
                    meta_spacing, meta_index = this, index
                elif not np.allclose(this, meta_spacing, rtol=1e-4, atol=0.0):
                    raise ValueError(
                        f"{where} has spacing {this} (from its affine), mask {meta_index} has {meta_spacing}: all "
                        "training masks must lie on one grid (or pass spacing= explicitly)."
                    )
            volumes = np.bincount(array.ravel(), minlength=num_classes)
            for c in np.flatnonzero(volumes[1:]) + 1:
                present[c] += 1
                smallest[c] = min(smallest[c], volumes[c])
                largest[c] = max(largest[c], volumes[c])
                components[c] = max(components[c], _components(array, int(c)))
            support |= array > 0
            count += 1
        if shape is None or support is None:
            raise ValueError("no training masks were given: the statistics need at least one mask.")
        if spacing is None:
            final_spacing = meta_spacing
        classes = {
            c: ClassStatistics(
                masks_with_class=int(present[c]),
                min_voxels=int(smallest[c]) if present[c] else None,
                max_voxels=int(largest[c]) if present[c] else None,
                max_components=int(components[c]),
            )
            for c in range(1, num_classes)
        }
        return cls(num_classes, shape, final_spacing, count, classes, support)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskStatistics):
            return NotImplemented
        return (
            (self.num_classes, self.shape, self.spacing, self.num_masks, self.classes)
            == (other.num_classes, other.shape, other.spacing, other.num_masks, other.classes)
            and np.array_equal(self.support, other.support)
        )

    def to_dict(self) -> dict[str, Any]:
        """A json-ready form; the support is packed as described by :data:`SUPPORT_ENCODING`."""
        packed = zlib.compress(np.packbits(self.support.ravel()).tobytes(), level=9)
        volume = self.voxel_volume_mm3
        classes = {}
        for c, s in self.classes.items():
            entry: dict[str, Any] = {
                "masks_with_class": s.masks_with_class,
                "min_voxels": s.min_voxels,
                "max_voxels": s.max_voxels,
                "max_components": s.max_components,
            }
            if volume is not None:  # for readers of the file; reloading recomputes them from the spacing
                entry["min_mm3"] = None if s.min_voxels is None else s.min_voxels * volume
                entry["max_mm3"] = None if s.max_voxels is None else s.max_voxels * volume
            classes[str(c)] = entry
        return {
            "format": STATISTICS_FORMAT,
            "version": STATISTICS_VERSION,
            "num_classes": self.num_classes,
            "shape": list(self.shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "num_masks": self.num_masks,
            "classes": classes,
            "support": {"encoding": SUPPORT_ENCODING, "data": base64.b64encode(packed).decode("ascii")},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "statistics") -> MaskStatistics:
        """Inverse of :meth:`to_dict`; ``where`` names the source in error messages."""
        if data.get("format") != STATISTICS_FORMAT or data.get("version") != STATISTICS_VERSION:
            raise ValueError(
                f"{where}: expected format {STATISTICS_FORMAT!r} version {STATISTICS_VERSION}, got format "
                f"{data.get('format')!r} version {data.get('version')!r}."
            )
        try:
            shape = tuple(int(s) for s in data["shape"])
            encoded = data["support"]
            if encoded.get("encoding") != SUPPORT_ENCODING:
                raise ValueError(
                    f"{where}: support encoding {encoded.get('encoding')!r}, expected {SUPPORT_ENCODING!r}."
                )
            bits = np.frombuffer(zlib.decompress(base64.b64decode(encoded["data"])), dtype=np.uint8)
            size = math.prod(shape)
            if bits.size != (size + 7) // 8:
                raise ValueError(f"{where}: the support holds {bits.size * 8} bits, the grid {shape} needs {size}.")
            support = np.unpackbits(bits, count=size).astype(bool).reshape(shape)
            keys = ("masks_with_class", "min_voxels", "max_voxels", "max_components")
            classes = {int(c): ClassStatistics(**{k: entry[k] for k in keys}) for c, entry in data["classes"].items()}
            return cls(int(data["num_classes"]), shape, data["spacing"], int(data["num_masks"]), classes, support)
        except KeyError as error:
            raise ValueError(f"{where}: missing entry {error}.") from error

    def to_json(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` (one json file, support included); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> MaskStatistics:
        """Read statistics written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()), where=str(path))


class PlausibilityFilter:
    """Decide whether a generated mask looks like the training masks; see the module docstring for the rules.

    Args:
        statistics: the training masks' :class:`MaskStatistics`.
        volume_tolerance: relative slack around the training volume range of each class (default 0.2: 20% below the
            smallest and 20% above the largest training volume).
        volume_unit: ``"voxels"`` (default) or ``"mm3"`` (needs statistics with a spacing): the unit of the
            reported volumes.
        max_components: connected components allowed per class: None (default) for the most seen in training for
            that class, one number for every class, or a mapping ``{class: number}`` overriding some classes.
        body: ``"training_support"`` (default) rejects foreground outside the training support dilated by
            ``body_margin``; ``"none"`` switches the check off.
        body_margin: voxels of slack around the training support (default 2).
        class_names: names of classes ``1..num_classes-1`` for the reasons (default: the class ids only).

    Calling the filter on a mask returns ``(passed, reasons)``: reasons lists every failed rule, empty when passed.
    """

    def __init__(
        self,
        statistics: MaskStatistics,
        volume_tolerance: float = 0.2,
        volume_unit: str = "voxels",
        max_components: int | Mapping[int, int] | None = None,
        body: str = "training_support",
        body_margin: int = 2,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(statistics, MaskStatistics):
            raise TypeError(f"statistics must be a MaskStatistics, got {type(statistics).__name__}.")
        foreground = list(range(1, statistics.num_classes))
        if not float(volume_tolerance) >= 0.0:
            raise ValueError(f"volume_tolerance must be >= 0, got {volume_tolerance}.")
        if volume_unit not in ("voxels", "mm3"):
            raise ValueError(f"volume_unit must be 'voxels' or 'mm3', got {volume_unit!r}.")
        if volume_unit == "mm3" and statistics.spacing is None:
            raise ValueError(
                "volume_unit='mm3' needs statistics with a spacing; these have none (pass spacing= to "
                "MaskStatistics.from_masks, or masks that are MetaTensors with an affine)."
            )
        if body not in ("training_support", "none"):
            raise ValueError(f"body must be 'training_support' or 'none', got {body!r}.")
        if int(body_margin) != body_margin or int(body_margin) < 0:
            raise ValueError(f"body_margin must be a whole number of voxels >= 0, got {body_margin}.")
        if class_names is not None and len(class_names) != len(foreground):
            raise ValueError(
                f"class_names must name the {len(foreground)} foreground classes {foreground}, got {list(class_names)}."
            )
        self.statistics = statistics
        self.volume_tolerance = float(volume_tolerance)
        self.volume_unit = volume_unit
        self.max_components = max_components
        self.body = body
        self.body_margin = int(body_margin)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.allowed_components, self._overridden = self._allowed_components(max_components, foreground)
        self.body_region: np.ndarray | None = None
        if body == "training_support":
            self.body_region = statistics.support
            if self.body_margin > 0:
                self.body_region = ndimage.binary_dilation(
                    statistics.support, structure=_structure(statistics.support.ndim), iterations=self.body_margin
                )

    def _allowed_components(
        self, max_components: int | Mapping[int, int] | None, foreground: list[int]
    ) -> tuple[dict[int, int], set[int]]:
        """Components allowed per class, and the classes whose limit comes from ``max_components``."""
        allowed = {c: self.statistics.classes[c].max_components for c in foreground}
        if max_components is None:
            return allowed, set()
        overrides = (
            dict(max_components)
            if isinstance(max_components, Mapping)
            else {c: max_components for c in foreground}
        )
        for c, limit in overrides.items():
            if int(c) not in allowed:
                raise ValueError(f"max_components names class {c}, the foreground classes are {foreground}.")
            if int(limit) != limit or int(limit) < 1:
                raise ValueError(f"max_components of class {c} must be a whole number >= 1, got {limit}.")
            allowed[int(c)] = int(limit)
        return allowed, {int(c) for c in overrides}

    def _label(self, c: int) -> str:
        return f"class {c}" + (f" ({self.class_names[c - 1]})" if self.class_names else "")

    def _number(self, voxels: float) -> str:
        """A volume given in voxels, in the filter's unit, without the unit."""
        if self.volume_unit == "mm3":
            voxels *= self.statistics.voxel_volume_mm3
        return f"{voxels:.6g}"

    def _volume(self, voxels: int) -> str:
        return _voxels(voxels) if self.volume_unit == "voxels" else f"{self._number(voxels)} mm3"

    def __call__(self, mask: Any) -> tuple[bool, list[str]]:
        """Check one generated mask ``(*spatial)`` or ``(1, *spatial)`` on the statistics' grid.

        Returns:
            ``(passed, reasons)``: reasons holds one sentence per failed rule (empty when passed).

        Raises:
            ValueError: the mask's spatial shape differs from the statistics' grid, or it holds values outside
                ``[0, num_classes)``.
        """
        stats = self.statistics
        array, _ = _spatial(mask, "generated mask")
        if array.shape != stats.shape:
            raise ValueError(
                f"generated mask has spatial shape {array.shape}, the statistics' grid is {stats.shape}: the filter "
                "checks masks on the grid of the training masks."
            )
        _check_values(array, stats.num_classes, "generated mask")
        volumes = np.bincount(array.ravel(), minlength=stats.num_classes)
        outside = (
            np.zeros(stats.num_classes, dtype=np.int64)
            if self.body_region is None
            else np.bincount(array[~self.body_region], minlength=stats.num_classes)
        )
        tol = self.volume_tolerance
        reasons = []
        for c in range(1, stats.num_classes):
            seen, voxels, name = stats.classes[c], int(volumes[c]), self._label(c)
            if voxels == 0:
                if seen.masks_with_class == stats.num_masks:
                    reasons.append(f"{name}: absent, but present in all {stats.num_masks} training masks")
                continue
            if seen.masks_with_class == 0:
                reasons.append(f"{name}: volume {self._volume(voxels)}, but the class is in none of the training masks")
            else:
                # rounded so that a volume exactly at a bound passes (10 * (1 - 0.7) is 3.0000000000000004 in floats)
                low, high = round(seen.min_voxels * (1 - tol), 9), round(seen.max_voxels * (1 + tol), 9)
                if not low <= voxels <= high:
                    reasons.append(
                        f"{name}: volume {self._volume(voxels)} outside the training range "
                        f"[{self._number(seen.min_voxels)}, {self._number(seen.max_voxels)}] +- {tol * 100:g}% "
                        f"= [{self._number(max(low, 0.0))}, {self._number(high)}]"
                    )
            allowed = self.allowed_components[c]
            if seen.masks_with_class:  # a class never seen in training was rejected above
                found = _components(array, c)
                if found > allowed:
                    source = "allowed (max_components)" if c in self._overridden else "in training"
                    reasons.append(f"{name}: {found} connected components, at most {allowed} {source}")
            if outside[c]:
                reasons.append(
                    f"{name}: {_voxels(int(outside[c]))} outside the body "
                    f"(training support dilated by {_voxels(self.body_margin)})"
                )
        return not reasons, reasons

    def describe(self) -> dict[str, Any]:
        """The filter's settings, json-ready, for run records."""
        limits = self.max_components
        if isinstance(limits, Mapping):
            limits = {str(c): int(v) for c, v in limits.items()}
        return {
            "volume_tolerance": self.volume_tolerance,
            "volume_unit": self.volume_unit,
            "max_components": limits,
            "allowed_components": {str(c): v for c, v in self.allowed_components.items()},
            "body": self.body,
            "body_margin": self.body_margin,
            "class_names": self.class_names,
            "num_classes": self.statistics.num_classes,
            "grid": list(self.statistics.shape),
            "spacing": None if self.statistics.spacing is None else list(self.statistics.spacing),
            "num_training_masks": self.statistics.num_masks,
        }
