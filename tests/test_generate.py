"""Samples from noise (segdiff.synthesis.generate): splitting joint samples into image and mask, the reference grid,
and the generation loop with a toy joint generator (plausibility filter, judge, records, resume, shares of the
cases, masks alone feeding mask -> image synthesis)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import raises_with, write_dataset
from synthesis_toys import toy_judge, toy_synthesizer

from segdiff.synthesis import FilterCriteria, MaskStatistics, PlausibilityFilter
from segdiff.synthesis.generate import (
    NoiseGenerator,
    SampleSynthesizer,
    generated_case_names,
    masks_on_grid,
    reference_grid,
    split_joint_sample,
)

SHAPE = (24, 20, 1)  # a 2D model's samples on the middle slice of a volume (reference_grid)


def test_a_joint_sample_splits_into_its_image_channels_and_the_argmax_of_its_mask_channels():
    mask = torch.tensor([[0, 1, 2], [2, 2, 0]])
    onehot = torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float() * 2 - 1  # [-1, 1] as trained
    image = torch.randn(2, 2, 3)
    got_image, got_mask = split_joint_sample(torch.cat([image, onehot + 0.3 * torch.rand(3, 2, 3)]), 2, 3)
    torch.testing.assert_close(got_image, image)
    assert got_mask.shape == (1, 2, 3) and torch.equal(got_mask[0], mask)
    only_image, only_mask = split_joint_sample(onehot, 0, 3)  # a mask generator
    assert only_image is None and torch.equal(only_mask[0], mask)
    raises_with("a sample has 3 channels; image_channels (1) + num_classes (3) = 4 expected",
                split_joint_sample, onehot, 1, 3)


def test_the_reference_grid_of_a_2d_model_is_the_middle_slice_of_a_volume_in_its_space(tmp_path):
    write_dataset(tmp_path, shape=(20, 16, 12), splits={"training": 1})
    path = str(tmp_path / "images" / "case0.nii.gz")
    affine = nib.load(path).affine
    grid = reference_grid(path, spatial_dims=2, slice_axis=2)
    assert grid.shape == (1, 20, 16, 1)
    expected = affine.copy()
    expected[:3, 3] += 6 * affine[:3, 2]  # the origin moves to slice 6 of 12
    np.testing.assert_allclose(np.asarray(grid.affine), expected, atol=1e-5)
    assert reference_grid(path, spatial_dims=3).shape == (1, 20, 16, 12)
    assert generated_case_names(3) == ["gen00000", "gen00001", "gen00002"]


class ToyJointGenerator:
    """A seeded rectangle of class 1 with a class-2 core; every third seed a thin sliver (implausible). Image: the
    classes scaled to [-1, 1] plus seeded noise, so the toy judge mostly agrees."""

    def __init__(self, image_channels=1):
        self.image_channels, self.calls = image_channels, []

    def __call__(self, num_samples, seed):
        self.calls.append(seed)
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(1, *SHAPE, dtype=torch.long)
        if seed % 3 == 0:
            mask[0, 10, 2:18, 0] = 1
        else:
            h, w = (int(v) for v in torch.randint(8, 14, (2,), generator=g))
            mask[0, 4:4 + h, 3:3 + w, 0] = 1
            mask[0, 6:6 + h // 2, 5:5 + w // 2, 0] = 2
        image = None
        if self.image_channels:
            image = mask.float() - 1 + 0.2 * torch.randn((1, *SHAPE), generator=g)
        return [(image, mask)]


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """The grid and plausibility statistics of plausible toy masks (the generator's non-sliver shapes)."""
    root = tmp_path_factory.mktemp("generate")
    write_dataset(root, shape=(*SHAPE[:2], 4), splits={"training": 1})
    grid = reference_grid(str(root / "images" / "case0.nii.gz"), spatial_dims=2)
    masks = [ToyJointGenerator(0)(1, s)[0][1] for s in (1, 2, 4, 5, 7, 8)]
    return grid, MaskStatistics.from_masks(masks, num_classes=3)


def synthesizer(out, training, generator=None, **kwargs):
    grid, statistics = training
    options = {"num_cases": 4, "max_tries_per_case": 3, "seed": 1, "progress": False, "settings": {"toy": 1}}
    return SampleSynthesizer(generator or ToyJointGenerator(), str(out), reference=grid, num_classes=3,
                             mask_filter=PlausibilityFilter(statistics, volume_tolerance=0.5), **{**options, **kwargs})


def test_generated_pairs_pass_the_filters_lie_on_the_reference_grid_and_are_recorded(tmp_path, training):
    criteria = FilterCriteria(num_classes=3, min_class_dice=0.8, min_mean_dice=0.8, keep_k=1)
    summary = synthesizer(tmp_path / "out", training, judge=toy_judge, criteria=criteria).run()
    journal = json.loads((tmp_path / "out" / "tries.json").read_text())
    tries = journal["tries"]
    assert summary["cases"] == 4 and summary["tries"] == len(tries) and summary["kept"] == 4
    rejected = [t for t in tries if not t["passed"]]
    assert rejected and all("connected components" in t["reason"] or "volume" in t["reason"] for t in rejected)
    entries = json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]
    assert [e["case"] for e in entries] == ["gen00000", "gen00001", "gen00002", "gen00003"]
    grid = training[0]
    for entry in entries:
        assert entry["mean_dice"] >= 0.8
        image, label = (nib.load(str(tmp_path / "out" / entry[k])) for k in ("image", "label"))
        assert image.shape == label.shape == SHAPE[:2]  # the one-slice axis is not stored
        np.testing.assert_allclose(label.affine, np.asarray(grid.affine), atol=1e-6)
        np.testing.assert_allclose(image.affine, np.asarray(grid.affine), atol=1e-6)
        values = np.unique(label.get_fdata())
        assert set(values) <= {0, 1, 2} and label.get_data_dtype() == np.uint8


def test_a_rerun_resumes_and_two_shares_write_what_one_process_writes(tmp_path, training):
    synthesizer(tmp_path / "one", training).run()
    generator = ToyJointGenerator()
    synthesizer(tmp_path / "one", training, generator).run()
    assert generator.calls == []  # everything finished: nothing drawn again
    for rank in (1, 0):  # the shares of two processes, one after the other
        synthesizer(tmp_path / "two", training, rank=rank, world_size=2).run()
    for name in ("tries.json", "datalist.json", "tries.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    raises_with("was written with other settings", synthesizer(tmp_path / "one", training, seed=2).run)


def test_a_case_without_an_accepted_draw_keeps_nothing_and_says_why(tmp_path, training):
    class Slivers(ToyJointGenerator):
        def __call__(self, num_samples, seed):
            return super().__call__(num_samples, 3)  # always the implausible sliver

    summary = synthesizer(tmp_path / "out", training, Slivers(), num_cases=1).run()
    assert summary["kept"] == 0 and summary["cases_without_sample"] == ["gen00000"]
    rows = json.loads((tmp_path / "out" / "tries.json").read_text())["tries"]
    assert len(rows) == 3 and all(r["reason"].startswith("rejected: class 1: volume 16 voxels") and "class 2: absent" in r["reason"] for r in rows)
    assert not list((tmp_path / "out").rglob("*.nii.gz"))
    assert summary["rejections"] == {"class #: volume # voxels outside the training range [#, #] +- #% = [#, #]": 3,
                                     "class #: absent, but present in all # training masks": 3}


def test_generated_masks_alone_feed_mask_to_image_synthesis(tmp_path, training):
    summary = synthesizer(tmp_path / "masks", training, ToyJointGenerator(0)).run()
    entries = json.loads((tmp_path / "masks" / "datalist.json").read_text())["training"]
    assert len(entries) == summary["kept"] == 4 and all("image" not in e for e in entries)
    assert not list((tmp_path / "masks" / "images").glob("*.nii.gz"))
    masks = [{"label": str(tmp_path / "masks" / e["label"])} for e in entries]
    pairs = toy_synthesizer(tmp_path / "pairs").run(masks)
    assert pairs["masks"] == 4


def test_the_noise_generator_refuses_a_conditional_sampler_or_other_channel_counts(training):
    class Sampler:
        conditional, target_channels = False, 4

    network = torch.nn.Conv2d(4, 4, 1)
    raises_with("the sampler draws 4 channels; image_channels + num_classes = 3",
                NoiseGenerator, network, Sampler(), training[0], 0, 3)
    Sampler.conditional = True
    raises_with("must be unconditional", NoiseGenerator, network, Sampler(), training[0], 1, 3)


def test_training_masks_on_the_grid_of_a_2d_model_are_its_labelled_slices_resized(tmp_path):
    write_dataset(tmp_path, shape=(20, 16, 12), splits={"training": 2})
    entries = [{"label": str(tmp_path / "labels" / f"case{i}.nii.gz")} for i in range(2)]
    reference = reference_grid(entries[0]["label"], spatial_dims=2)
    small = reference[:, ::2, ::2]  # a coarser grid: the slices are resized (nearest) to it
    masks = list(masks_on_grid(entries, small, spatial_dims=2))
    labels = [nib.load(e["label"]).get_fdata() for e in entries]
    labelled = [k for x in labels for k in range(x.shape[2]) if x[..., k].any()]
    assert len(masks) == len(labelled) and all(m.shape == (1, 10, 8, 1) for m in masks)
    np.testing.assert_array_equal(masks[0][0, :, :, 0].numpy(), labels[0][::2, ::2, labelled[0]])
    volumes = list(masks_on_grid(entries, reference_grid(entries[0]["label"], spatial_dims=3), spatial_dims=3))
    assert len(volumes) == 2 and torch.equal(volumes[1][0], torch.as_tensor(labels[1]).long())
