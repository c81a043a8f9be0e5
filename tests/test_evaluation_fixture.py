"""A tiny, fully deterministic evaluation fixture (no tests of its own) shared by the equality tests of the evaluation
drivers: small NIfTI images, labels, "generated" images and image -> mask outputs, and a fixed-weight segmenter.

The expected numbers in tests/test_evaluation_equality.py were recorded by running the drivers as they were before
they were rebuilt on MONAI's evaluators and metric classes (last changed in commit 0129806) on exactly these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from bundle_utils import anisotropic_affine, write_dataset

NUM_CLASSES = 3
SHAPE = (20, 16, 12)
IMAGE_SIZE = [16, 16]  # training slices of the downstream arms (MONAI Resized)
#: the segmenter sees whole slices at their own size: the scores do not depend on how segdiff.engine.grid resizes
INFER_SIZE = None


class FixedSegmenter(torch.nn.Module):
    """Logits linear in the intensity (scaled to [-1, 1]): class 0 below -0.5, class 1 around 0, class 2 above 0.5,
    then a fixed 3 x 3 smoothing, so that resizing and noise give a Dice below 1 but far from 0."""

    def __init__(self) -> None:
        super().__init__()
        self.point = torch.nn.Conv2d(1, 3, 1)
        self.smooth = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        with torch.no_grad():
            self.point.weight.copy_(torch.tensor([-4.0, 0.0, 4.0]).view(3, 1, 1, 1))
            self.point.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
            kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
            self.smooth.weight.copy_(kernel.expand(3, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.smooth(self.point(x))


def write_real(root: Path, splits: dict[str, int] | None = None) -> Path:
    """The real data set (bundle_utils' nested-box phantoms, anisotropic affines): returns the datalist path."""
    return write_dataset(root, shape=SHAPE, num_classes=NUM_CLASSES, splits=splits or {"training": 2, "test": 2})


def write_generated(datalist: Path, out: Path, samples_per_mask: int = 2, seed: int = 1) -> Path:
    """'Generated' images of every test mask: the mask's classes at -1 / 0 / 1 plus noise, the second sample with
    class 2 partly painted as class 1 (an unfaithful generator)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for entry in json.loads(datalist.read_text())["test"]:
        label_path = datalist.parent / entry["label"]
        label = nib.load(str(label_path)).get_fdata().astype(np.int64)
        case = label_path.name[: -len(".nii.gz")]
        for k in range(samples_per_mask):
            image = (label - 1.0) + rng.normal(0, 0.25 + 0.1 * k, label.shape)
            if k == 1:
                image[: label.shape[0] // 2][label[: label.shape[0] // 2] == 2] = 0.0
            name = f"{case}_image.nii.gz" if samples_per_mask == 1 else f"{case}_sample{k}_image.nii.gz"
            nib.save(nib.Nifti1Image(image.astype(np.float32), nib.load(str(label_path)).affine), str(out / name))
    return out


def write_outputs(root: Path, seed: int = 2) -> tuple[Path, Path]:
    """An image -> mask data set of two test cases and the files an inference run writes for them: ``_seg`` (the
    truth with errors, case 1 missing class 2 entirely), ``_uncertainty`` (higher where wrong, plus noise), ``_prob``
    (K channels summing to 1) and, for case 0 only, ``_members`` (3 members). Returns (datalist, output_dir)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    out = root / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    test = []
    for case in range(2):
        affine = anisotropic_affine(shift=case)
        truth = np.zeros(SHAPE, np.uint8)
        truth[3:17, 3:13, 2:10] = 1
        truth[6:14, 5:11, 4:8] = 2
        seg = truth.copy()
        flip = rng.random(SHAPE) < 0.08
        seg[flip] = rng.integers(0, NUM_CLASSES, int(flip.sum()))
        seg[:, :3 + case, :] = 0
        if case == 1:
            seg[seg == 2] = 1
        uncertainty = (seg != truth) * 0.3 + rng.random(SHAPE) * 0.5
        logits = rng.normal(0, 1.0, SHAPE + (NUM_CLASSES,))
        logits[..., :] += 3.0 * np.eye(NUM_CLASSES)[seg]
        prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        name = f"case{case}"
        nib.save(nib.Nifti1Image(truth.astype(np.float32) * 50, affine), str(root / "images" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(truth, affine), str(root / "labels" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(out / f"{name}_seg.nii.gz"))
        nib.save(nib.Nifti1Image(uncertainty.astype(np.float32), affine), str(out / f"{name}_uncertainty.nii.gz"))
        nib.save(nib.Nifti1Image(prob.astype(np.float32), affine), str(out / f"{name}_prob.nii.gz"))
        if case == 0:
            members = np.stack([np.where(rng.random(SHAPE) < 0.1, 0, seg) for _ in range(3)], axis=-1).astype(np.uint8)
            nib.save(nib.Nifti1Image(members, affine), str(out / f"{name}_members.nii.gz"))
        test.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"test": test}))
    return datalist, out


def load_real():
    """mask_to_image evaluate.yaml's ``load_real``: load, float32, percentile scaling to [-1, 1]."""
    from monai.transforms import Compose, EnsureTyped, LoadImaged, ScaleIntensityRangePercentilesd

    return Compose([
        LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
        ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=-1.0, b_max=1.0, clip=True,
                                        channel_wise=True),
    ])


def downstream_network() -> torch.nn.Module:
    """The seeded, untrained segmenter every downstream arm starts from."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(2, 1, NUM_CLASSES, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def downstream_transform():
    """The arms' training preprocessing: load_real, 2 random slices per volume, resize, noise."""
    from monai.transforms import Compose, RandGaussianNoised, Resized

    from segdiff.transforms import RandSliced

    return Compose([
        *load_real().transforms,
        RandSliced(keys=["image", "label"], num_samples=2),
        Resized(keys=["image", "label"], spatial_size=IMAGE_SIZE, mode=["bilinear", "nearest"]),
        RandGaussianNoised(keys="image", prob=0.5, std=0.05),
    ])


def downstream_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, label[:, 0].long())


def downstream_optimizer(parameters):
    return torch.optim.Adam(parameters, lr=1e-2)
