"""segdiff.transforms: mask encodings, class ablation (fixed and random), slice sampling and sample writing."""

from __future__ import annotations

import itertools
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segdiff.transforms import (
    EncodeMask,
    EncodeMaskd,
    MaskAblation,
    MaskAblationd,
    RandMaskAblation,
    RandMaskAblationd,
    RandSliced,
    SaveSamplesd,
    check_outputs_free,
    encoded_mask_channels,
    existing_outputs,
    sample_output_paths,
)


def label_map(shape=(4, 5), num_classes=3):
    """A (1, *shape) label map cycling through 0..num_classes-1, so every class is present."""
    return torch.arange(int(np.prod(shape))).reshape(1, *shape).remainder(num_classes).float()


def onehot(label, num_classes):
    return EncodeMask(num_classes)(label)


def dropped_classes(mask):
    """Foreground classes whose channel is all zero."""
    return tuple(c for c in range(1, mask.shape[0]) if not mask[c].any())


# ---- EncodeMask ---------------------------------------------------------------------------------------------------
def test_onehot_sets_exactly_the_channel_of_each_voxels_class():
    label = label_map()
    encoded = EncodeMask(3)(label)
    expected = torch.stack([(label[0] == c).float() for c in range(3)])
    assert torch.equal(torch.as_tensor(encoded), expected)


def test_onehot_has_num_classes_channels_even_when_classes_are_absent():
    label = torch.zeros(1, 4, 4)
    label[0, :2] = 1
    encoded = EncodeMask(5)(label)
    assert encoded.shape == (5, 4, 4)
    assert not encoded[2:].any()
    assert torch.equal(encoded.sum(0), torch.ones(4, 4))


def test_onehot_as_diffusion_target_maps_on_to_1_and_off_to_minus_1():
    label = label_map()
    encoded = EncodeMask(3, role="target")(label)
    expected = torch.stack([(label[0] == c).float() * 2 - 1 for c in range(3)])
    assert torch.equal(torch.as_tensor(encoded), expected)


def test_mask_probabilities_invert_the_target_encoding_and_clamp_overshoots():
    from segdiff.transforms import encode_probabilities, mask_probabilities

    label = label_map()
    encoded = torch.as_tensor(EncodeMask(3, role="target")(label))
    assert torch.equal(mask_probabilities(encoded, "target"), (encoded + 1) / 2)
    probabilities = torch.rand(3, 4, 5)
    assert torch.allclose(mask_probabilities(encode_probabilities(probabilities, "target"), "target"), probabilities)
    assert torch.equal(mask_probabilities(torch.tensor([-1.5, 0.0, 1.7]), "target"), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(mask_probabilities(torch.tensor([0.25]), "condition"), torch.tensor([0.25]))
    with pytest.raises(ValueError, match=r"mask role must be one of \('condition', 'target'\), got 'image'"):
        EncodeMask(3, role="image")


def test_legacy_encoding_is_one_channel_holding_class_index_over_255():
    label = label_map(num_classes=4)
    encoded = EncodeMask(4, encoding="legacy")(label)
    assert encoded.shape == (1, 4, 5)
    assert torch.allclose(torch.as_tensor(encoded), label / 255.0)


def test_legacy_encoding_as_target_is_mapped_into_minus_one_to_one():
    label = label_map(num_classes=4)
    encoded = EncodeMask(4, encoding="legacy", role="target")(label)
    assert torch.allclose(torch.as_tensor(encoded), label / 255.0 * 2 - 1)


def test_nearly_integer_labels_are_rounded_to_their_class():
    label = torch.tensor([[[0.0001, 0.9999, 2.0002]]])
    encoded = EncodeMask(3)(label)
    assert torch.equal(torch.as_tensor(encoded)[:, 0, :], torch.eye(3))


def test_num_classes_zero_encodes_to_no_channels():
    encoded = EncodeMask(0)(label_map())
    assert encoded.shape == (0, 4, 5)


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_label_outside_class_range_raises_naming_the_value(bad):
    label = label_map()
    label[0, 1, 1] = bad
    with pytest.raises(ValueError, match=rf"\[{bad}\] lie outside \[0, 3\)"):
        EncodeMask(3)(label)


def test_multi_channel_label_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r"single-channel.*\(2, 4, 5\)"):
        EncodeMask(3)(torch.zeros(2, 4, 5))


def test_unknown_encoding_and_negative_num_classes_are_rejected():
    with pytest.raises(ValueError, match="mask_encoding must be one of"):
        EncodeMask(3, encoding="binary")
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        EncodeMask(-1)


def test_encoding_keeps_the_metatensor_affine_and_file_name(loaded_label, affine):
    encoded = EncodeMask(3)(loaded_label)
    assert isinstance(encoded, MetaTensor)
    assert np.allclose(np.asarray(encoded.affine), affine)
    assert encoded.meta["filename_or_obj"].endswith("case7.nii.gz")
    assert encoded.shape == (3, 6, 5, 4)


def test_unconditional_encoding_keeps_the_metatensor_affine(loaded_label, affine):
    encoded = EncodeMask(0)(loaded_label)
    assert isinstance(encoded, MetaTensor)
    assert np.allclose(np.asarray(encoded.affine), affine)


def test_encoded_mask_channels_matches_the_encoding():
    assert encoded_mask_channels(4) == 4
    assert encoded_mask_channels(4, "legacy") == 1
    assert encoded_mask_channels(0) == 0
    assert encoded_mask_channels(0, "legacy") == 0
    for num_classes, encoding in [(4, "onehot"), (4, "legacy")]:
        assert EncodeMask(num_classes, encoding)(label_map()).shape[0] == encoded_mask_channels(num_classes, encoding)


def test_encode_maskd_encodes_only_its_keys():
    label, other = label_map(), label_map()
    out = EncodeMaskd("label", 3)({"label": label, "other": other})
    assert out["label"].shape == (3, 4, 5)
    assert out["other"] is other


# ---- MaskAblation -------------------------------------------------------------------------------------------------
def test_dropped_class_channel_is_zero_and_other_channels_unchanged():
    mask = onehot(label_map(num_classes=4), 4)
    out = MaskAblation(drop_classes=[2])(mask)
    assert not out[2].any()
    for c in (0, 1, 3):
        assert torch.equal(out[c], mask[c])


def test_dropped_class_voxels_are_unspecified_not_background():
    label = label_map(num_classes=4)
    out = MaskAblation(drop_classes=[2])(onehot(label, 4))
    dropped_voxels = label[0] == 2
    assert torch.equal(out.sum(0)[dropped_voxels], torch.zeros(int(dropped_voxels.sum())))
    assert torch.equal(out.sum(0)[~dropped_voxels], torch.ones(int((~dropped_voxels).sum())))


def test_keep_classes_drops_every_other_foreground_class():
    mask = onehot(label_map(num_classes=4), 4)
    out = MaskAblation(keep_classes=[2])(mask)
    assert dropped_classes(out) == (1, 3)
    assert torch.equal(out[0], mask[0])
    assert torch.equal(out[2], mask[2])


def test_keep_classes_empty_drops_all_foreground_but_keeps_background():
    mask = onehot(label_map(num_classes=4), 4)
    out = MaskAblation(keep_classes=[])(mask)
    assert dropped_classes(out) == (1, 2, 3)
    assert torch.equal(out[0], mask[0])


def test_ablation_without_arguments_changes_nothing():
    mask = onehot(label_map(num_classes=4), 4)
    assert torch.equal(MaskAblation()(mask), mask)


def test_ablation_does_not_change_its_input_in_place():
    mask = onehot(label_map(num_classes=4), 4)
    before = mask.clone()
    MaskAblation(drop_classes=[1, 3])(mask)
    assert torch.equal(mask, before)


def test_dropping_background_raises():
    with pytest.raises(ValueError, match="may not contain 0"):
        MaskAblation(drop_classes=[0, 1])


def test_drop_and_keep_classes_together_raise():
    with pytest.raises(ValueError, match="either drop_classes or keep_classes"):
        MaskAblation(drop_classes=[1], keep_classes=[2])


@pytest.mark.parametrize("bad", [4, -1])
def test_dropping_a_class_the_mask_does_not_have_raises_naming_it(bad):
    mask = onehot(label_map(num_classes=4), 4)
    with pytest.raises(ValueError, match=rf"drop_classes \[{bad}\] are not foreground classes of a 4-class mask"):
        MaskAblation(drop_classes=[1, bad])(mask)


def test_keeping_a_class_the_mask_does_not_have_raises():
    mask = onehot(label_map(num_classes=4), 4)
    with pytest.raises(ValueError, match="5"):
        MaskAblation(keep_classes=[5])(mask)


def test_mask_ablationd_drops_the_same_classes_in_every_key():
    mask = onehot(label_map(num_classes=4), 4)
    out = MaskAblationd(["a", "b"], drop_classes=[1, 3])({"a": mask, "b": mask.clone()})
    assert dropped_classes(out["a"]) == (1, 3)
    assert dropped_classes(out["b"]) == (1, 3)


# ---- RandMaskAblation ---------------------------------------------------------------------------------------------
NUM_DRAWS = 4000
TOLERANCE = 0.03  # about 4 standard deviations of a frequency over 4000 draws at p = 0.5


def draw_patterns(ablation_prob, seed=0, num_draws=NUM_DRAWS):
    """The dropped classes of ``num_draws`` ablations of a 4-class mask (background checked intact every time)."""
    ablation = RandMaskAblation(ablation_prob).set_random_state(seed)
    mask = onehot(label_map(num_classes=4), 4)
    patterns = []
    for _ in range(num_draws):
        out = ablation(mask)
        assert torch.equal(out[0], mask[0])
        patterns.append(dropped_classes(out))
    return patterns


@pytest.fixture(scope="module", params=[0.5, 0.2])
def ablation_draws(request):
    return request.param, draw_patterns(request.param)


def test_each_foreground_class_is_dropped_with_ablation_prob(ablation_draws):
    p, patterns = ablation_draws
    for c in (1, 2, 3):
        frequency = sum(c in dropped for dropped in patterns) / NUM_DRAWS
        assert abs(frequency - p) < TOLERANCE, (c, frequency)


def test_classes_are_dropped_independently(ablation_draws):
    p, patterns = ablation_draws
    for dropped in itertools.product([False, True], repeat=3):
        expected = np.prod([p if d else 1 - p for d in dropped])
        observed = sum(tuple(c in pattern for c in (1, 2, 3)) == dropped for pattern in patterns) / NUM_DRAWS
        assert abs(observed - expected) < TOLERANCE, (dropped, observed, expected)


def test_ablation_prob_one_drops_every_foreground_class_and_never_background():
    mask = onehot(label_map(num_classes=4), 4)
    out = RandMaskAblation(1.0)(mask)
    assert dropped_classes(out) == (1, 2, 3)
    assert torch.equal(out[0], mask[0])


def test_ablation_prob_zero_leaves_the_mask_unchanged():
    mask = onehot(label_map(num_classes=4), 4)
    ablation = RandMaskAblation(0.0).set_random_state(0)
    for _ in range(50):
        assert torch.equal(ablation(mask), mask)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_ablation_prob_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"ablation_prob must lie in \[0, 1\]"):
        RandMaskAblation(bad)


def test_random_ablation_is_reproducible_with_set_random_state():
    first = draw_patterns(0.5, seed=123, num_draws=50)
    assert draw_patterns(0.5, seed=123, num_draws=50) == first
    assert draw_patterns(0.5, seed=124, num_draws=50) != first


def test_randomize_false_reuses_the_last_draw():
    mask = onehot(label_map(num_classes=4), 4)
    ablation = RandMaskAblation(0.5).set_random_state(1)
    for _ in range(20):
        first = dropped_classes(ablation(mask))
        assert dropped_classes(ablation(mask, randomize=False)) == first


def test_rand_mask_ablationd_drops_the_same_classes_in_every_key_of_a_sample():
    mask = onehot(label_map(num_classes=4), 4)
    ablation = RandMaskAblationd(["a", "b"], ablation_prob=0.5).set_random_state(0)
    seen = set()
    for _ in range(200):
        out = ablation({"a": mask, "b": mask.clone()})
        assert dropped_classes(out["a"]) == dropped_classes(out["b"])
        seen.add(dropped_classes(out["a"]))
    assert len(seen) == 8  # every subset of the 3 classes occurs, so the agreement is not trivial


def test_rand_mask_ablationd_is_reproducible_with_set_random_state():
    mask = onehot(label_map(num_classes=4), 4)

    def patterns(seed):
        ablation = RandMaskAblationd("label", ablation_prob=0.5).set_random_state(seed)
        return [dropped_classes(ablation({"label": mask})["label"]) for _ in range(30)]

    assert patterns(5) == patterns(5)
    assert patterns(5) != patterns(6)


# ---- RandSliced ---------------------------------------------------------------------------------------------------
VOLUME_SHAPE = (4, 6, 5)


def volume_sample():
    """image: every voxel a distinct value; label: the image's copy, so the two can be compared slice by slice."""
    image = torch.arange(float(np.prod(VOLUME_SHAPE))).reshape(1, *VOLUME_SHAPE)
    return {"image": image, "label": image.clone() + 1000.0, "name": "case0"}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_have_the_in_plane_shape_of_the_axis(axis):
    samples = RandSliced(["image", "label"], axis=axis, num_samples=3).set_random_state(0)(volume_sample())
    in_plane = tuple(s for i, s in enumerate(VOLUME_SHAPE) if i != axis)
    assert len(samples) == 3
    for sample in samples:
        assert sample["image"].shape == (1, *in_plane)
        assert sample["label"].shape == (1, *in_plane)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_is_the_volume_at_the_recorded_slice_index_for_every_key(axis):
    data = volume_sample()
    samples = RandSliced(["image", "label"], axis=axis, num_samples=8).set_random_state(0)(data)
    for sample in samples:
        index = sample["slice_index"]
        assert 0 <= index < VOLUME_SHAPE[axis]
        assert torch.equal(sample["image"], data["image"].select(axis + 1, index))
        assert torch.equal(sample["label"], data["label"].select(axis + 1, index))


def test_keys_not_sliced_are_passed_on():
    samples = RandSliced("image", num_samples=2).set_random_state(0)(volume_sample())
    assert all(sample["name"] == "case0" and sample["label"].ndim == 4 for sample in samples)


def test_slices_are_plain_tensors_without_a_3d_affine(loaded_label):
    samples = RandSliced("label", num_samples=2).set_random_state(0)({"label": loaded_label})
    assert all(type(sample["label"]) is torch.Tensor for sample in samples)


def test_foreground_key_draws_only_slices_holding_foreground():
    data = volume_sample()
    label = torch.zeros(1, *VOLUME_SHAPE)
    label[0, :, :, 1] = 2
    label[0, 3, 2, 3] = 1
    data["mask"] = label
    samples = RandSliced(["image", "mask"], axis=2, num_samples=200, foreground_key="mask").set_random_state(0)(data)
    assert {s["slice_index"] for s in samples} == {1, 3}


def test_foreground_key_falls_back_to_any_slice_when_the_volume_has_no_foreground():
    data = volume_sample()
    data["mask"] = torch.zeros(1, *VOLUME_SHAPE)
    samples = RandSliced("image", axis=0, num_samples=200, foreground_key="mask").set_random_state(0)(data)
    assert {s["slice_index"] for s in samples} == set(range(VOLUME_SHAPE[0]))


def test_2d_input_is_returned_num_samples_times():
    image = torch.rand(1, 6, 5)
    samples = RandSliced(["image"], num_samples=3).set_random_state(0)({"image": image})
    assert len(samples) == 3
    assert all(torch.equal(s["image"], image) and "slice_index" not in s for s in samples)


def test_3d_model_gets_the_volume_unchanged():
    data = volume_sample()
    out = RandSliced(["image", "label"], num_samples=3, spatial_dims=3)(data)
    assert isinstance(out, dict)
    assert out["image"] is data["image"] and out["label"] is data["label"]


def test_3d_model_rejects_2d_input():
    with pytest.raises(ValueError, match=r"3D model needs \(C, D, H, W\).*\(1, 6, 5\)"):
        RandSliced("image", spatial_dims=3)({"image": torch.rand(1, 6, 5)})


def test_input_that_is_neither_2d_nor_3d_is_rejected():
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(C, D, H, W\).*\(1, 2, 3, 4, 5\)"):
        RandSliced("image")({"image": torch.rand(1, 2, 3, 4, 5)})


@pytest.mark.parametrize(
    "kwargs, message",
    [({"axis": 3}, "slice axis must be 0, 1 or 2"), ({"num_samples": 0}, "num_samples must be >= 1"),
     ({"spatial_dims": 1}, "spatial_dims must be 2 or 3")],
)
def test_bad_slicing_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandSliced("image", **kwargs)


def test_slicing_is_reproducible_with_set_random_state():
    def indices(seed):
        return [s["slice_index"] for s in RandSliced("image", num_samples=20).set_random_state(seed)(volume_sample())]

    assert indices(3) == indices(3)
    assert indices(3) != indices(4)


# ---- writing samples ----------------------------------------------------------------------------------------------
def test_one_sample_is_named_after_the_case_and_postfix():
    paths = sample_output_paths("/data/labels/case7.nii.gz", "out", 1, "image")
    assert paths == [os.path.join("out", "case7_image.nii.gz")]


def test_several_samples_are_numbered_from_zero():
    assert sample_output_paths("/data/case7.nii", "out", 3, "mask") == [
        os.path.join("out", f"case7_sample{k}_mask.nii.gz") for k in range(3)
    ]


@pytest.mark.parametrize(
    "source, case",
    [("sub.01.nii.gz", "sub.01"), ("x/scan.png", "scan"), ("scan.mha", "scan"), ("scan.nrrd", "scan"),
     ("scan.tif", "scan")],
)
def test_case_name_drops_only_the_file_extension(source, case):
    assert sample_output_paths(source, "o", 1, "image") == [os.path.join("o", f"{case}_image.nii.gz")]


def stacked_samples(label, num_samples, channels=1):
    """A MetaTensor (num_samples * channels, *spatial) with the label's metadata; channel i holds the value i + 1."""
    values = torch.arange(1.0, num_samples * channels + 1)
    data = torch.ones(num_samples * channels, *label.shape[1:]) * values.view(-1, 1, 1, 1)
    return MetaTensor(data, meta=label.meta)


def test_saved_samples_lie_on_the_source_grid(tmp_path, loaded_label, affine):
    out_dir = tmp_path / "out"
    SaveSamplesd("pred", str(out_dir), num_samples=2)({"pred": stacked_samples(loaded_label, 2)})
    assert sorted(os.listdir(out_dir)) == ["case7_sample0_image.nii.gz", "case7_sample1_image.nii.gz"]
    for k in range(2):
        written = nib.load(str(out_dir / f"case7_sample{k}_image.nii.gz"))
        assert written.shape == (6, 5, 4)
        assert np.allclose(written.affine, affine)
        assert np.all(written.get_fdata() == k + 1)


def test_multi_channel_samples_are_written_channels_last(tmp_path, loaded_label):
    SaveSamplesd("pred", str(tmp_path), num_samples=2, output_postfix="mask")(
        {"pred": stacked_samples(loaded_label, 2, channels=3)}
    )
    written = nib.load(str(tmp_path / "case7_sample1_mask.nii.gz"))
    assert written.shape == (6, 5, 4, 3)
    assert np.allclose(written.get_fdata()[0, 0, 0], [4, 5, 6])


def test_existing_output_is_not_overwritten(tmp_path, loaded_label):
    save = SaveSamplesd("pred", str(tmp_path))
    save({"pred": stacked_samples(loaded_label, 1)})
    with pytest.raises(FileExistsError, match="case7_image.nii.gz exists"):
        save({"pred": stacked_samples(loaded_label, 1) * 5})
    assert np.all(nib.load(str(tmp_path / "case7_image.nii.gz")).get_fdata() == 1)


def test_overwrite_replaces_existing_output(tmp_path, loaded_label):
    save = SaveSamplesd("pred", str(tmp_path), overwrite=True)
    save({"pred": stacked_samples(loaded_label, 1)})
    save({"pred": stacked_samples(loaded_label, 1) * 5})
    assert np.all(nib.load(str(tmp_path / "case7_image.nii.gz")).get_fdata() == 5)


def test_saving_a_plain_tensor_is_refused():
    with pytest.raises(TypeError, match="MetaTensor under 'pred'"):
        SaveSamplesd("pred", "unused")({"pred": torch.zeros(1, 4, 4)})


def test_check_outputs_free_passes_when_nothing_exists(tmp_path):
    entries = [{"label": "a/case1.nii.gz"}, {"label": "a/case2.nii.gz"}]
    assert existing_outputs(entries, "label", str(tmp_path), 2, "image") == []
    check_outputs_free(entries, "label", str(tmp_path), 2, "image", overwrite=False)


def test_check_outputs_free_raises_naming_an_existing_output(tmp_path):
    entries = [{"label": "a/case1.nii.gz"}, {"label": "a/case2.nii.gz"}]
    existing = tmp_path / "case2_sample1_image.nii.gz"
    existing.write_bytes(b"")
    assert existing_outputs(entries, "label", str(tmp_path), 2, "image") == [str(existing)]
    with pytest.raises(FileExistsError, match="1 output file\\(s\\) already exist, e.g. .*case2_sample1_image.nii.gz"):
        check_outputs_free(entries, "label", str(tmp_path), 2, "image", overwrite=False)
    check_outputs_free(entries, "label", str(tmp_path), 2, "image", overwrite=True)


def test_legacy_ablation_turns_dropped_classes_into_background():
    label = torch.tensor([[[0, 1, 2, 3]]])
    legacy = EncodeMask(4, encoding="legacy")(label)
    out = MaskAblation(drop_classes=[2], encoding="legacy", num_classes=4)(legacy)
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0, 0.0, 3.0]]]) / 255.0)
    kept = MaskAblation(keep_classes=[3], encoding="legacy", num_classes=4)(legacy)
    assert torch.allclose(kept, torch.tensor([[[0.0, 0.0, 0.0, 3.0]]]) / 255.0)


def test_legacy_ablation_needs_the_class_count_and_checks_classes_against_it():
    with pytest.raises(ValueError, match="needs num_classes"):
        MaskAblation(drop_classes=[1], encoding="legacy")
    legacy = EncodeMask(3, encoding="legacy")(torch.tensor([[[0, 1, 2]]]))
    with pytest.raises(ValueError, match=r"drop_classes \[3\] are not foreground classes of a 3-class mask"):
        MaskAblation(drop_classes=[3], encoding="legacy", num_classes=3)(legacy)
