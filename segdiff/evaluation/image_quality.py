"""Image quality of generated images with MONAI's metrics: diversity among the samples of one mask (MS-SSIM) and
distance between real and generated images (FID on network features, MMD on the images).

- ``ms_ssim_diversity(samples)``: mean MS-SSIM over all pairs of samples generated from ONE mask (MONAI's
  ``MultiScaleSSIMMetric``); 1 = identical, lower = more diverse. Images are scaled jointly to [0, 1] first (SSIM's
  luminance term is not shift invariant). MS-SSIM needs images of at least ``kernel_size * 2 ** (levels - 1)``
  pixels per axis (and MONAI checks ``> (kernel_size - 1) * (levels - 1) ** 2``); :func:`ms_ssim_weights` keeps the
  standard 11-pixel Gaussian window (sigma 1.5) and uses as many of Wang et al.'s five scales as the image allows
  (their first weights, renormalised): 64 x 76 slices get 3 scales, 128 x 152 get 4, 256 x 256 all 5, and images
  under 22 pixels plain SSIM.
- ``fid(real_features, synthetic_features)``: Frechet distance of two feature sets (MONAI's ``FIDMetric``). The
  features come from :func:`extract_features` with a network of your choice; the default is the encoder of our own
  MONAI UNet segmenter (:class:`UNetEncoder`: down path to the bottom layer, global-average-pooled), since
  pretrained Inception weights cannot be downloaded here. Values from different feature networks are not comparable
  with each other, nor with published Inception FIDs. FID needs clearly more images than feature dimensions.
- ``mmd(real_images, synthetic_images)``: MONAI's ``MMDMetric`` works on IMAGES (``(B, C, *spatial)``, both sets of
  one shape, at least 2 each): the unbiased squared MMD with a linear kernel on the flattened images (after an
  optional ``y_mapping``), i.e. about ``||mean(real) - mean(synthetic)||^2`` in pixel space, summed over pixels.
  MONAI requires equally many images in both sets: the larger set is subsampled with a seed.
"""

from __future__ import annotations

import itertools
import pydoc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

# transitional: downstream.source_case still imports this name; naming lives in segdiff.data.naming
from segdiff.engine.grid import resize, to_network_units

__all__ = [
    "MS_SSIM_WEIGHTS",
    "UNetEncoder",
    "as_network_inputs",
    "extract_features",
    "feature_network",
    "fid",
    "image_quality_report",
    "mask_groups",
    "mmd",
    "ms_ssim_diversity",
    "ms_ssim_weights",
]

#: Wang et al.'s MS-SSIM scale weights (finest first), MONAI's default
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

def ms_ssim_weights(
    spatial_shape: Sequence[int], kernel_size: int = 11, weights: Sequence[float] = MS_SSIM_WEIGHTS
) -> tuple[float, ...]:
    """The MS-SSIM weights for images of ``spatial_shape``: the first ``L`` of ``weights``, renormalised to sum 1, for
    the largest ``L`` that works on every axis: the coarsest scale ``size // 2 ** (L - 1)`` still holds a window, and
    MONAI's ``compute_ms_ssim`` check ``size // (L - 1) ** 2 > kernel_size - 1`` passes. 64 x 76 -> 3 scales.

    Args:
        spatial_shape: the images' spatial size, e.g. ``(64, 76)``.
        kernel_size: the SSIM window (default 11, the standard).
        weights: the weights of all scales, finest first (default Wang et al.'s five).

    Raises:
        ValueError: the image is smaller than one window.
    """
    for levels in range(len(weights), 0, -1):
        monai_bound = max(1, levels - 1) ** 2  # MONAI's size check
        coarsest = 2 ** (levels - 1)  # the coarsest scale must still hold one window
        if all(int(s) // monai_bound > kernel_size - 1 and int(s) // coarsest >= kernel_size for s in spatial_shape):
            chosen = np.asarray(weights[:levels], dtype=float)
            return tuple(float(w) for w in chosen / chosen.sum())
    raise ValueError(f"images of size {tuple(spatial_shape)} are too small for an SSIM window of {kernel_size} pixels")


def _stack(images: torch.Tensor | np.ndarray | Sequence[Any], what: str) -> torch.Tensor:
    """``(N, C, *spatial)`` float tensor from a batch or a sequence of ``(C, *spatial)`` images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    else:
        items = [torch.as_tensor(np.asarray(i)) for i in images]
        if not items:
            raise ValueError(f"{what}: no images given")
        shapes = {tuple(i.shape) for i in items}
        if len(shapes) > 1:
            raise ValueError(f"{what}: all images need one shape, found {sorted(shapes)}")
        x = torch.stack(items)
    return x.detach().float().cpu()


def ms_ssim_diversity(
    samples: torch.Tensor | Sequence[Any],
    spatial_dims: int = 2,
    slice_axis: int = 2,
    kernel_size: int = 11,
    kernel_sigma: float = 1.5,
    weights: Sequence[float] | None = None,
) -> float:
    """Mean MS-SSIM over all pairs of samples generated from one mask: 1 for identical samples, lower = more diverse.

    Args:
        samples: ``(N, C, *spatial)`` or a sequence of ``(C, *spatial)`` images on one grid, N >= 2.
        spatial_dims: 2 compares 2D images; 3D volumes are then compared slice by slice along ``slice_axis`` (as a
            2D model generates them); 3 compares whole volumes.
        slice_axis: spatial axis the volumes are cut along for ``spatial_dims=2``.
        kernel_size: SSIM window (default 11).
        kernel_sigma: its Gaussian sigma (default 1.5).
        weights: scale weights; default :func:`ms_ssim_weights` for the image size.
    """
    from monai.metrics import MultiScaleSSIMMetric

    x = _stack(samples, "ms_ssim_diversity")
    if x.shape[0] < 2:
        raise ValueError(f"ms_ssim_diversity needs at least 2 samples of one mask, found {x.shape[0]}")
    if spatial_dims == 2 and x.ndim == 5:
        x = x.movedim(slice_axis + 2, 1)  # (N, slices, C, H, W): slice k of one sample meets slice k of another
    elif x.ndim == spatial_dims + 2:
        x = x[:, None]  # (N, 1, C, *spatial)
    else:
        raise ValueError(f"ms_ssim_diversity: expected (N, C, *spatial) samples for spatial_dims={spatial_dims}, found {tuple(x.shape)}")
    low, high = x.min(), x.max()
    x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    weights = tuple(weights) if weights is not None else ms_ssim_weights(x.shape[3:], kernel_size)
    metric = MultiScaleSSIMMetric(
        spatial_dims=x.ndim - 3, data_range=1.0, kernel_size=kernel_size, kernel_sigma=kernel_sigma, weights=weights
    )
    for i, j in itertools.combinations(range(x.shape[0]), 2):
        metric(y_pred=x[i], y=x[j])
    return float(metric.aggregate().item())


class UNetEncoder(torch.nn.Module):
    """The encoder of a MONAI ``UNet``: its down path to the bottom layer, global-average-pooled to one feature vector
    per image, ``(N, channels[-1])``. The UNet's weights are shared, not copied.

    Args:
        unet: a ``monai.networks.nets.UNet`` (e.g. the trained segmenter of evaluate.yaml).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        from monai.networks.layers import SkipConnection

        block = getattr(unet, "model", None)
        if not (isinstance(block, torch.nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection)):
            raise TypeError(f"UNetEncoder needs a monai.networks.nets.UNet, found {type(unet).__name__}")
        layers = []
        while isinstance(block, torch.nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            layers.append(block[0])  # down layer of this level
            block = block[1].submodule
        layers.append(block)  # the bottom layer
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(2).mean(dim=2)


def feature_network(network: str | Callable | torch.nn.Module, **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network whose features FID compares.

    Args:
        network: a MONAI ``UNet`` (its :class:`UNetEncoder` is used: the default with our own segmenter), any other
            torch module or callable (used as it is; outputs with spatial axes are average-pooled by
            :func:`extract_features`), or the dotted path of one, e.g. ``"torchvision.models.resnet50"`` or
            ``"mypackage.radimagenet.encoder"``: a class or function there is called with ``kwargs`` to build it.
        kwargs: arguments of a class or function named by a dotted path (e.g. ``weights=None``).
    """
    if isinstance(network, str):
        located = pydoc.locate(network)
        if located is None:
            raise ImportError(f"feature network {network!r} not found: give a dotted path to a module, class or function")
        network = located(**kwargs) if callable(located) and not isinstance(located, torch.nn.Module) else located
    if not callable(network):
        raise TypeError(f"feature network must be a torch module or a callable, found {type(network).__name__}")
    from monai.networks.nets import UNet

    if isinstance(network, UNet):
        return UNetEncoder(network)
    return network


def as_network_inputs(
    cases: Sequence[Any], spatial_dims: int = 2, image_size: Sequence[int] | None = None, slice_axis: int = 2
) -> torch.Tensor:
    """Cases ``(C, *spatial)`` as the network inputs a segmenter sees: 2D slices of volumes (all of them), resized
    to ``image_size``; ``(N, C, *image_size)``."""
    units = []
    for case in cases:
        x = to_network_units(torch.as_tensor(np.asarray(case) if isinstance(case, np.ndarray) else case).float(),
                             spatial_dims, slice_axis)
        units.append(resize(x, image_size, "linear"))
    if not units:
        raise ValueError("no images given")
    shapes = {tuple(u.shape[1:]) for u in units}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}: give image_size to resize them to one")
    return torch.cat(units)


@torch.no_grad()
def extract_features(
    images: torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 32,
    channels: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One feature vector per image, ``(N, F)``: the network's output, global-average-pooled when it has spatial axes.

    Args:
        images: network inputs ``(N, C, *spatial)`` (see :func:`as_network_inputs`).
        network: from :func:`feature_network`.
        batch_size: images per forward pass.
        channels: repeat single-channel images to this many channels (3 for ImageNet or RadImageNet networks).
        device: where the network runs (default: where its parameters are, else the CPU).
    """
    if isinstance(network, torch.nn.Module):
        params = next(network.parameters(), None)
        device = device or (params.device if params is not None else "cpu")
        was_training = network.training
        network.eval()
    features = []
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo : lo + batch_size].float()
        if channels is not None and x.shape[1] != channels:
            if x.shape[1] != 1:
                raise ValueError(f"cannot repeat {x.shape[1]}-channel images to {channels} channels")
            x = x.repeat(1, channels, *([1] * (x.ndim - 2)))
        out = network(x.to(device or "cpu"))
        out = torch.as_tensor(out).float()
        if out.ndim > 2:
            out = out.flatten(2).mean(dim=2)
        features.append(out.reshape(out.shape[0], -1).cpu())
    if isinstance(network, torch.nn.Module):
        network.train(was_training)
    return torch.cat(features)


def fid(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> float:
    """Frechet distance between two feature sets ``(N, F)`` (MONAI's ``FIDMetric``): 0 for identical sets.

    Args:
        real_features: features of real images, N >= 2.
        synthetic_features: features of generated images, N >= 2, the same F.
    """
    from monai.metrics import FIDMetric

    try:
        import scipy.linalg  # noqa: F401  (MONAI's FIDMetric takes the matrix square root with scipy)
    except ImportError as e:
        raise ImportError("fid needs scipy (MONAI's FIDMetric uses scipy.linalg.sqrtm): pip install scipy") from e
    real, synthetic = torch.as_tensor(real_features).double(), torch.as_tensor(synthetic_features).double()
    for name, x in (("real_features", real), ("synthetic_features", synthetic)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"fid: {name} must be (N, F) with N >= 2, found shape {tuple(x.shape)}")
    if real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"fid: feature sizes differ: real {real.shape[1]}, synthetic {synthetic.shape[1]}")
    return float(FIDMetric()(synthetic, real).real.item())


def mmd(
    real_images: torch.Tensor | Sequence[Any],
    synthetic_images: torch.Tensor | Sequence[Any],
    y_mapping: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> float:
    """Unbiased squared MMD between real and generated IMAGES (MONAI's ``MMDMetric``, linear kernel): 0 in
    expectation when both come from one distribution.

    Args:
        real_images: ``(N, C, *spatial)`` or a sequence of ``(C, *spatial)``, N >= 2.
        synthetic_images: the same shape except N, N >= 2.
        y_mapping: applied to both sets first (MONAI's ``y_mapping``), e.g. a Gaussian filter or a feature network.
        seed: the larger set is subsampled to the smaller set's size with this seed (MONAI needs equal sizes).
    """
    from monai.metrics import MMDMetric

    real, synthetic = _stack(real_images, "mmd real_images"), _stack(synthetic_images, "mmd synthetic_images")
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"mmd: real images {tuple(real.shape[1:])} and synthetic {tuple(synthetic.shape[1:])} differ")
    n = min(real.shape[0], synthetic.shape[0])
    if n < 2:
        raise ValueError(f"mmd needs at least 2 images in each set, found {real.shape[0]} real, {synthetic.shape[0]} synthetic")
    generator = torch.Generator().manual_seed(seed)
    if real.shape[0] > n:
        real = real[torch.randperm(real.shape[0], generator=generator)[:n]]
    if synthetic.shape[0] > n:
        synthetic = synthetic[torch.randperm(synthetic.shape[0], generator=generator)[:n]]
    return float(MMDMetric(y_mapping=y_mapping)(real, synthetic).item())


def mask_groups(entries: Sequence[Mapping[str, Any]], group_key: str | None = None) -> dict[str, list[int]]:
    """Which entries were generated from one mask: by ``entry[group_key]`` when given, else by the entry's ``"case"``
    (synthesize.yaml records it), else by the image name ``<case>_syn<k>`` (synthesize.yaml's naming), else by the
    label file. Returns group -> entry indices."""
    from segdiff.data.naming import source_of_synthetic_case

    groups: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        if group_key is not None:
            if group_key not in entry:
                raise KeyError(f"entry {index} has no {group_key!r} to group samples by; its keys: {sorted(entry)}")
            group = str(entry[group_key])
        elif "case" in entry:
            group = str(entry["case"])
        else:
            image = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
            group = source_of_synthetic_case(image) or str(entry.get("label", image))
        groups.setdefault(group, []).append(index)
    return groups


def image_quality_report(
    real_entries: Sequence[Mapping[str, Any]],
    synthetic_entries: Sequence[Mapping[str, Any]],
    load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    network: str | Callable | torch.nn.Module,
    spatial_dims: int = 2,
    image_size: Sequence[int] | None = None,
    slice_axis: int = 2,
    channels: int | None = None,
    group_key: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FID (on ``network``'s features) and MMD (on the images) between real and synthetic images, and the MS-SSIM
    diversity among the samples of each mask, all on the 2D slices (or volumes) the segmenter sees.

    Args:
        real_entries, synthetic_entries: entries with absolute ``"image"`` paths.
        load: transform loading an entry's ``"image"`` scaled as in training (evaluate.yaml's ``load_real``; it may
            load the label too).
        network: the feature network, see :func:`feature_network`.
        spatial_dims, image_size, slice_axis: how the network sees a case.
        channels: repeat single-channel images to this many channels for the feature network.
        group_key: entry key naming the source mask of each synthetic entry (default: from the file name).
        seed: subsampling seed of the MMD.

    Returns:
        ``{"fid", "mmd", "ms_ssim_diversity", "num_masks_with_several_samples", "num_real_images",
        "num_synthetic_images", "feature_network"}``; a figure that cannot be computed is None.
    """
    def images(entries):
        return [torch.as_tensor(load(dict(e))["image"]) for e in entries]

    real_cases, synthetic_cases = images(real_entries), images(synthetic_entries)
    real = as_network_inputs(real_cases, spatial_dims, image_size, slice_axis)
    synthetic = as_network_inputs(synthetic_cases, spatial_dims, image_size, slice_axis)
    extractor = feature_network(network)
    report: dict[str, Any] = {
        "feature_network": network if isinstance(network, str) else type(extractor).__name__,
        "num_real_images": int(real.shape[0]),
        "num_synthetic_images": int(synthetic.shape[0]),
    }
    enough = real.shape[0] >= 2 and synthetic.shape[0] >= 2
    report["fid"] = fid(extract_features(real, extractor, channels=channels),
                        extract_features(synthetic, extractor, channels=channels)) if enough else None
    report["mmd"] = mmd(real, synthetic, seed=seed) if enough else None
    diversities = []
    for indices in mask_groups(synthetic_entries, group_key).values():
        if len(indices) >= 2:
            group = [synthetic_cases[i] for i in indices]
            samples = _group_inputs(group, spatial_dims, image_size, slice_axis)
            diversities.append(ms_ssim_diversity(samples, spatial_dims=spatial_dims, slice_axis=2))
    report["ms_ssim_diversity"] = float(np.mean(diversities)) if diversities else None
    report["num_masks_with_several_samples"] = len(diversities)
    return report


def _group_inputs(group: Sequence[torch.Tensor], spatial_dims: int, image_size: Sequence[int] | None,
                  slice_axis: int) -> torch.Tensor:
    """The samples of one mask as ``(N, C, *image_size)`` (2D images or 3D volumes) or, for 2D models over volumes,
    ``(N, C, H, W, slices)`` so that :func:`ms_ssim_diversity` pairs slice k of one sample with slice k of another."""
    stacked = []
    for case in group:
        units = resize(to_network_units(case.float(), spatial_dims, slice_axis), image_size, "linear")  # (S, C, ...)
        stacked.append(units.movedim(0, -1) if case.ndim == 4 and spatial_dims == 2 else units[0])
    return torch.stack(stacked)
