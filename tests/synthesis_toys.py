"""A toy generator, judge and synthesizer for the synthesis tests (also run under torchrun by
tests/synthesis_shard_worker.py): images are the mask's classes plus seeded noise, so the judge's Dice varies with the
seed, deterministically."""

from __future__ import annotations

import torch
from monai.transforms import Compose, CopyItemsd, LoadImaged

from segdiff.synthesis import FilterCriteria, RandMaskDeformd, Synthesizer
from segdiff.transforms import EncodeMaskd, RandMaskAblationd


class ToyGenerator:
    """Image = class index scaled to [-1, 1] plus seeded noise of a seeded strength: the toy judge's Dice varies with
    the seed, deterministically. Counts the images it draws."""

    def __init__(self):
        self.calls = []

    def __call__(self, condition, num_samples, seed, initial=None):
        self.calls.append((seed, num_samples))
        generator = torch.Generator().manual_seed(seed)
        classes = torch.as_tensor(condition).argmax(dim=0).float()
        k = condition.shape[0] - 1
        strength = torch.rand(num_samples, generator=generator) * 0.5
        noise = torch.randn((num_samples, 1, *classes.shape), generator=generator)
        return (classes / k * 2 - 1)[None, None] + strength.view(-1, 1, *[1] * classes.ndim) * noise


def toy_judge(image, num_classes=3):
    return (((image[0] + 1) / 2) * (num_classes - 1)).round().clamp(0, num_classes - 1).long()


def toy_synthesizer(output_dir, generator=None, criteria=None, settings=None, **kwargs):
    load = LoadImaged(keys="label", image_only=True, ensure_channel_first=True)
    variety = Compose([
        RandMaskDeformd("label", affine_prob=1.0),
        CopyItemsd("label", names="condition"),
        EncodeMaskd("condition", num_classes=3),
        RandMaskAblationd("condition", ablation_prob=0.3),
    ])
    criteria = criteria or FilterCriteria(num_classes=3, min_class_dice=0.9, min_mean_dice=0.92, keep_k=2)
    options = {"samples_per_mask": 3, "max_tries_per_mask": 9, "seed": 5, "progress": False, **kwargs}
    return Synthesizer(generator or ToyGenerator(), toy_judge, criteria, str(output_dir), load, variety,
                       settings=settings or {"toy": 1}, **options)
