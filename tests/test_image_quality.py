"""Image-quality metrics on known inputs: MS-SSIM diversity, FID against its closed form, MMD, feature networks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from bundle_utils import raises_with
from monai.networks.nets import UNet

from segdiff.evaluation.image_quality import (
    MS_SSIM_WEIGHTS,
    UNetEncoder,
    as_network_inputs,
    extract_features,
    feature_network,
    fid,
    mask_groups,
    mmd,
    ms_ssim_diversity,
    ms_ssim_weights,
)


def smooth_images(n, shape=(64, 76), seed=0):
    """Independent smooth random images (blurred noise), so that MS-SSIM sees structure at every scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *shape, generator=g)
    return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)


def test_ms_ssim_of_identical_samples_is_one():
    image = smooth_images(1)[0]
    assert ms_ssim_diversity([image, image, image]) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_is_lower_for_independent_than_for_nearly_identical_samples():
    images = smooth_images(3)
    g = torch.Generator().manual_seed(1)
    nearly = images[:1] + 0.05 * torch.randn(3, 1, 64, 76, generator=g)
    independent, close = ms_ssim_diversity(images), ms_ssim_diversity(nearly)
    assert independent < 0.3
    assert 0.8 < close < 1.0


def test_ms_ssim_weights_keep_the_standard_window_and_fit_the_scales_to_the_image():
    three = np.array(MS_SSIM_WEIGHTS[:3]) / sum(MS_SSIM_WEIGHTS[:3])
    np.testing.assert_allclose(ms_ssim_weights((64, 76)), three)  # the demo's CPU slices
    assert len(ms_ssim_weights((128, 152))) == 4
    np.testing.assert_allclose(ms_ssim_weights((256, 256)), np.array(MS_SSIM_WEIGHTS) / sum(MS_SSIM_WEIGHTS))
    assert ms_ssim_weights((16, 16)) == (1.0,)  # plain SSIM
    raises_with("too small for an SSIM window of 11 pixels", ms_ssim_weights, (10, 40))


def test_volumes_of_a_2d_model_are_compared_slice_by_slice():
    slices = smooth_images(4)  # 4 different slices, the same in every sample
    volume = slices.permute(1, 2, 3, 0)  # (C, H, W, slices)
    assert ms_ssim_diversity([volume, volume.clone()], spatial_dims=2, slice_axis=2) == pytest.approx(1.0, abs=1e-5)
    other = smooth_images(4, seed=5).permute(1, 2, 3, 0)
    assert ms_ssim_diversity([volume, other], spatial_dims=2, slice_axis=2) < 0.3


def test_ms_ssim_needs_two_samples_of_one_shape():
    raises_with("at least 2 samples", ms_ssim_diversity, smooth_images(1))
    raises_with("all images need one shape", ms_ssim_diversity, [torch.zeros(1, 64, 76), torch.zeros(1, 64, 64)])


def gaussian_features(n=400, dims=4, seed=0):
    return torch.randn(n, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fid_of_identical_feature_sets_is_zero():
    features = gaussian_features()
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_shifted_features_is_the_squared_shift():
    features = gaussian_features()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert fid(features, features + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fid_of_scaled_features_matches_the_closed_form():
    real = gaussian_features() + 0.3
    synthetic = 2.0 * real
    mu_r, mu_s = real.mean(0).numpy(), synthetic.mean(0).numpy()
    cov_r, cov_s = np.cov(real.numpy(), rowvar=False), np.cov(synthetic.numpy(), rowvar=False)
    expected = np.sum((mu_r - mu_s) ** 2) + np.trace(cov_r + cov_s - 2 * scipy.linalg.sqrtm(cov_r @ cov_s).real)
    assert fid(real, synthetic) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(float(mu_r @ mu_r) + np.trace(cov_r), rel=1e-6)


def test_fid_rejects_mismatched_features():
    raises_with("feature sizes differ", fid, gaussian_features(dims=4), gaussian_features(dims=3))
    raises_with("N >= 2", fid, gaussian_features(n=1), gaussian_features())


def test_mmd_of_constant_images_is_the_squared_difference_summed_over_pixels():
    real, synthetic = torch.zeros(4, 1, 5, 6), torch.full((4, 1, 5, 6), 2.0)
    assert mmd(real, synthetic) == pytest.approx(2.0**2 * 30)
    assert mmd(real, real) == pytest.approx(0.0)


def test_mmd_subsamples_the_larger_set_reproducibly():
    real = smooth_images(6, shape=(8, 8))
    synthetic = smooth_images(3, shape=(8, 8), seed=3)
    assert mmd(real, synthetic, seed=4) == mmd(real, synthetic, seed=4)
    raises_with("at least 2 images in each set", mmd, real, synthetic[:1])
    raises_with("differ", mmd, real, smooth_images(3, shape=(8, 9)))


def tiny_unet():
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def test_unet_encoder_gives_the_pooled_output_of_the_unets_own_bottom_layer():
    unet = tiny_unet()
    seen = {}
    bottom = unet.model[1].submodule[1].submodule  # channels (4, 8, 16): two levels, then the bottom layer
    bottom.register_forward_hook(lambda module, args, output: seen.setdefault("bottom", output))
    x = torch.randn(2, 1, 16, 20)
    unet.eval()
    with torch.no_grad():
        unet(x)
        features = feature_network(unet)(x)
    assert isinstance(feature_network(unet), UNetEncoder)
    assert features.shape == (2, 16)
    torch.testing.assert_close(features, seen["bottom"].mean(dim=(2, 3)))


def test_unet_encoder_refuses_other_networks():
    raises_with("needs a monai.networks.nets.UNet", UNetEncoder, torch.nn.Conv2d(1, 1, 1))


def test_a_dotted_path_names_the_feature_network_and_spatial_outputs_are_pooled():
    network = feature_network("torch.nn.Identity")
    assert isinstance(network, torch.nn.Identity)
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    torch.testing.assert_close(extract_features(images, network, batch_size=1), images.mean(dim=(2, 3)))
    raises_with("not found", feature_network, "segdiff.no_such_network")


def test_single_channel_images_are_repeated_for_three_channel_networks():
    seen = []
    extract_features(torch.zeros(2, 1, 4, 4), lambda x: seen.append(x.shape) or x.mean(dim=(2, 3)), channels=3)
    assert seen == [torch.Size([2, 3, 4, 4])]


def test_volumes_become_resized_slices_as_the_segmenter_sees_them():
    volume = torch.rand(1, 10, 12, 4)
    inputs = as_network_inputs([volume, volume], spatial_dims=2, image_size=(8, 8), slice_axis=2)
    assert inputs.shape == (8, 1, 8, 8)
    raises_with("give image_size", as_network_inputs, [volume, torch.rand(1, 10, 14, 4)])


def test_samples_are_grouped_by_their_source_mask():
    entries = [{"image": f"/s/images/{c}_syn{k}.nii.gz", "label": f"/s/labels/{c}_syn{k}.nii.gz"}
               for c in ("slab_02", "slab_07") for k in range(3)]
    assert mask_groups(entries) == {"slab_02": [0, 1, 2], "slab_07": [3, 4, 5]}
    keyed = [dict(e, mask=str(i % 2)) for i, e in enumerate(entries)]
    assert mask_groups(keyed, group_key="mask") == {"0": [0, 2, 4], "1": [1, 3, 5]}
    recorded = [dict(e, case="a" if i < 2 else "b") for i, e in enumerate(entries)]  # synthesize.yaml's "case" key
    assert mask_groups(recorded) == {"a": [0, 1], "b": [2, 3, 4, 5]}
