"""Mask encodings and class ablation: how a label map becomes the condition (or the target) of a diffusion model.

A label map holds integer class indices in ``[0, num_classes)``, 0 being background. The default encoding is one
channel per class (one-hot). Ablation zeroes a class's channel, so its voxels carry no class at all: they are
"unspecified", which the model learns to tell apart from "background" (whose channel stays on).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_tensor

__all__ = [
    "MASK_ENCODINGS",
    "MASK_VALUE_RANGES",
    "EncodeMask",
    "EncodeMaskd",
    "MaskAblation",
    "MaskAblationd",
    "RandMaskAblation",
    "RandMaskAblationd",
    "encode_probabilities",
    "encoded_mask_channels",
    "mask_probabilities",
]

#: ``onehot``: one channel per class, values in {0, 1} (our default).
#: ``legacy``: one channel holding ``class_index / 255`` (Konz et al.'s released models).
MASK_ENCODINGS = ("onehot", "legacy")

#: the values an encoded mask takes in each role: as a CONDITION (concatenated to the noisy image) in [0, 1]; as the
#: diffusion TARGET (image_to_mask: the mask is noised and denoised) in [-1, 1], the range images are scaled to and
#: the noise schedule expects. :func:`mask_probabilities` / :func:`encode_probabilities` are each other's inverse.
MASK_VALUE_RANGES = {"condition": (0.0, 1.0), "target": (-1.0, 1.0)}


def _value_range(role: str) -> tuple[float, float]:
    if role not in MASK_VALUE_RANGES:
        raise ValueError(f"mask role must be one of {tuple(MASK_VALUE_RANGES)}, got {role!r}.")
    return MASK_VALUE_RANGES[role]


def mask_probabilities(encoded: torch.Tensor, role: str = "target") -> torch.Tensor:
    """Per-class probabilities in [0, 1] from one-hot-encoded values in the ``role``'s range (a sampled target,
    clamped: samples overshoot), e.g. ``(x + 1) / 2`` for a target."""
    low, high = _value_range(role)
    return ((torch.as_tensor(encoded).float() - low) / (high - low)).clamp(0.0, 1.0)


def encode_probabilities(probabilities: torch.Tensor, role: str = "target") -> torch.Tensor:
    """Inverse of :func:`mask_probabilities`: probabilities in [0, 1] -> the ``role``'s value range (a plain
    segmenter's softmax written as a one-member "ensemble", so the ensemble post-transforms read it unchanged)."""
    low, high = _value_range(role)
    return torch.as_tensor(probabilities) * (high - low) + low


def encoded_mask_channels(num_classes: int, encoding: str = "onehot") -> int:
    """Number of channels a mask occupies once encoded (0 for an unconditional model, ``num_classes == 0``)."""
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"mask_encoding must be one of {MASK_ENCODINGS}, got {encoding!r}.")
    if num_classes == 0:
        return 0
    return num_classes if encoding == "onehot" else 1


class EncodeMask(Transform):
    """Encode a channel-first integer label map ``(1, *spatial)`` as the tensor a diffusion network sees.

    Args:
        num_classes: number of classes including background; labels must lie in ``[0, num_classes)``.
            0 (an unconditional model) encodes to a tensor with no channels.
        encoding: ``"onehot"`` (``num_classes`` channels) or ``"legacy"`` (one channel, ``class_index / 255``).
        role: ``"condition"`` (values in [0, 1]) or ``"target"`` (values in [-1, 1], when the mask is what the
            diffusion generates); see :data:`MASK_VALUE_RANGES`.
    """

    backend = [torch.Tensor]

    def __init__(self, num_classes: int, encoding: str = "onehot", role: str = "condition") -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}.")
        encoded_mask_channels(num_classes, encoding)  # validates the name
        self.num_classes = num_classes
        self.encoding = encoding
        self.role = role
        self.low, self.high = _value_range(role)

    def __call__(self, label: Any) -> torch.Tensor:
        label_t = convert_to_tensor(label, track_meta=True)
        if label_t.shape[0] != 1:
            raise ValueError(f"EncodeMask expects a single-channel label map, got shape {tuple(label_t.shape)}.")
        index = torch.as_tensor(label_t).round().long()
        if self.num_classes == 0:
            encoded = torch.zeros((0, *index.shape[1:]), dtype=torch.float32, device=index.device)
        elif index.numel() and (index.min() < 0 or index.max() >= self.num_classes):
            bad = torch.unique(index[(index < 0) | (index >= self.num_classes)])[:5].tolist()
            raise ValueError(f"label values {bad} lie outside [0, {self.num_classes}) (num_classes={self.num_classes}).")
        elif self.encoding == "onehot":
            encoded = torch.zeros((self.num_classes, *index.shape[1:]), dtype=torch.float32, device=index.device)
            encoded.scatter_(0, index, 1.0)
        else:
            encoded = index.float() / 255.0
        if self.num_classes:
            encoded = encoded * (self.high - self.low) + self.low
        if isinstance(label_t, MetaTensor):
            return MetaTensor(encoded, meta=label_t.meta, applied_operations=label_t.applied_operations)
        return encoded


class EncodeMaskd(MapTransform):
    """Dictionary version of :class:`EncodeMask`."""

    backend = EncodeMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        encoding: str = "onehot",
        role: str = "condition",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.encoder = EncodeMask(num_classes, encoding, role)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.encoder(d[key])
        return d


def _zero_channels(mask: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    out = mask.clone()
    for c in channels:
        out[c] = 0
    return out


class MaskAblation(Transform):
    """Remove named classes from an encoded mask, so that they no longer constrain the generated image.

    Used at inference, where the user says which classes should constrain the generated image. With the one-hot
    encoding a removed class's channel becomes zero ("unspecified", not background). The legacy encoding has no
    "unspecified" value, so there, as in Konz et al.'s code, the removed class's voxels become background (0).

    Args:
        drop_classes: class indices to remove (background, 0, cannot be removed).
        keep_classes: alternatively, the only non-background classes to keep; all others are removed.
            Give one of the two, or neither (no-op).
        encoding: the mask's encoding, ``"onehot"`` (default; the class count is the channel count) or ``"legacy"``
            (one channel of ``class_index / 255``; needs ``num_classes``).
        num_classes: number of classes including background; only needed for the legacy encoding.
    """

    backend = [torch.Tensor]

    def __init__(
        self,
        drop_classes: Sequence[int] | None = None,
        keep_classes: Sequence[int] | None = None,
        encoding: str = "onehot",
        num_classes: int | None = None,
    ) -> None:
        if drop_classes and keep_classes is not None:
            raise ValueError("give either drop_classes or keep_classes, not both.")
        if drop_classes and 0 in drop_classes:
            raise ValueError("drop_classes may not contain 0: background is always specified.")
        encoded_mask_channels(1, encoding)  # validates the name
        if encoding == "legacy" and num_classes is None:
            raise ValueError("MaskAblation of a legacy-encoded mask needs num_classes (its one channel does not tell).")
        self.drop_classes = list(drop_classes or [])
        self.keep_classes = None if keep_classes is None else [int(c) for c in keep_classes]
        self.encoding = encoding
        self.num_classes = num_classes

    def classes_to_drop(self, num_classes: int) -> list[int]:
        """Foreground classes to remove from a ``num_classes``-class mask."""
        name, classes = ("keep_classes", self.keep_classes) if self.keep_classes is not None else ("drop_classes", self.drop_classes)
        bad = [c for c in classes if not 0 < c < num_classes]
        if bad:
            raise ValueError(f"{name} {bad} are not foreground classes of a {num_classes}-class mask (1..{num_classes - 1}).")
        if self.keep_classes is not None:
            return [c for c in range(1, num_classes) if c not in self.keep_classes]
        return [int(c) for c in self.drop_classes]

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        if self.encoding == "onehot":
            return _zero_channels(mask, self.classes_to_drop(mask.shape[0]))
        drop = self.classes_to_drop(int(self.num_classes))
        if not drop:
            return mask
        index = torch.round(torch.as_tensor(mask) * 255.0)
        out = mask.clone()
        out[torch.isin(index, torch.tensor(drop, dtype=index.dtype, device=index.device))] = 0.0
        return out


class MaskAblationd(MapTransform):
    """Dictionary version of :class:`MaskAblation`."""

    backend = MaskAblation.backend

    def __init__(
        self,
        keys: KeysCollection,
        drop_classes: Sequence[int] | None = None,
        keep_classes: Sequence[int] | None = None,
        encoding: str = "onehot",
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ablation = MaskAblation(drop_classes, keep_classes, encoding, num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.ablation(d[key])
        return d


class RandMaskAblation(RandomizableTransform):
    """Mask-ablated training (Konz et al., 2024): drop each foreground class independently with ``ablation_prob``.

    Operates on a one-hot mask ``(num_classes, *spatial)``; channel 0 (background) is never dropped. A dropped class's
    channel is zeroed, so its voxels become "unspecified" rather than background. Drawn per sample, training only.

    Args:
        ablation_prob: probability that any one foreground class is dropped (default 0.5; 0 switches ablation off).
    """

    backend = [torch.Tensor]

    def __init__(self, ablation_prob: float = 0.5) -> None:
        if not 0.0 <= ablation_prob <= 1.0:
            raise ValueError(f"ablation_prob must lie in [0, 1], got {ablation_prob}.")
        RandomizableTransform.__init__(self, prob=1.0)
        self.ablation_prob = ablation_prob
        self._dropped: list[int] = []

    def randomize(self, num_classes: int) -> None:  # type: ignore[override]
        draws = self.R.random_sample(max(num_classes - 1, 0))
        self._dropped = [c + 1 for c in np.flatnonzero(draws < self.ablation_prob).tolist()]

    def __call__(self, mask: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if self.ablation_prob == 0.0:
            return mask
        if randomize:
            self.randomize(mask.shape[0])
        return _zero_channels(mask, self._dropped)


class RandMaskAblationd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandMaskAblation`; every key of one sample loses the same classes."""

    backend = RandMaskAblation.backend

    def __init__(self, keys: KeysCollection, ablation_prob: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.ablation = RandMaskAblation(ablation_prob)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.ablation.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            d[key] = self.ablation(d[key], randomize=first)
            first = False
        return d
