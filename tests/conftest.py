"""Shared helpers for the unit tests: tiny networks and NIfTI files with a known, non-trivial affine."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

#: anisotropic spacing and an offset, so that a lost affine cannot pass for identity
TEST_AFFINE = np.array(
    [
        [1.5, 0.0, 0.0, -10.0],
        [0.0, 2.0, 0.0, 5.0],
        [0.0, 0.0, 3.0, 2.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture
def write_nifti():
    """``write_nifti(path, data, affine=TEST_AFFINE)`` saves ``data`` as NIfTI and returns the path as a string."""

    def _write(path, data, affine=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data), TEST_AFFINE if affine is None else affine), str(path))
        return str(path)

    return _write


@pytest.fixture
def tiny_unet():
    """``tiny_unet(in_channels, out_channels, spatial_dims=2)``: the smallest DiffusionModelUNet with attention."""
    from monai.networks.nets import DiffusionModelUNet

    def _build(in_channels, out_channels, spatial_dims=2, seed=0):
        torch.manual_seed(seed)
        return DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=(8, 16),
            attention_levels=(False, True),
            num_res_blocks=1,
            num_head_channels=8,
            norm_num_groups=8,
        )

    return _build


@pytest.fixture
def affine():
    """The affine :func:`write_nifti` uses by default (a copy, so tests cannot change it for each other)."""
    return TEST_AFFINE.copy()


@pytest.fixture
def loaded_label(tmp_path, write_nifti):
    """A real MetaTensor label map (1, 6, 5, 4) with classes 0..2, loaded from ``masks/case7.nii.gz`` as the bundles
    load it."""
    from monai.transforms import LoadImage

    data = (np.arange(120) % 3).reshape(6, 5, 4).astype(np.uint8)
    path = write_nifti(tmp_path / "masks" / "case7.nii.gz", data)
    return LoadImage(image_only=True, ensure_channel_first=True)(path)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny networks run fastest on one thread: with two threads on a busy 2-core machine the first forward passes
    of a new shape took 5-10 s each (measured), with one thread 0.1 s. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
