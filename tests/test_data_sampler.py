"""segdiff.engine.data_sampler.DistributedWeightedSampler: every rank draws its own share of an epoch from the whole
dataset with the weights' probabilities (train_controlnet.yaml's target_mix_ratio under torchrun), reproducibly."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from segdiff.engine.data_sampler import DistributedWeightedSampler
from segdiff.errors import ConfigKeyError

#: train_controlnet.yaml's weights for target_mix_ratio 0.25 with 2 target entries (at even indices: a
#: DistributedSampler split of 2 ranks gives them both to rank 0) among 10
TARGET = [0, 2]
WEIGHTS = [0.25 / 2 if i in TARGET else 0.75 / 8 for i in range(10)]


def draws(rank, epoch, num_replicas=2, **kwargs):
    sampler = DistributedWeightedSampler(WEIGHTS, len(WEIGHTS), num_replicas=num_replicas, rank=rank, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_rank_draws_its_share_of_num_samples_rounded_up():
    for num_replicas, per_rank in ((1, 10), (2, 5), (3, 4), (4, 3)):
        for rank in range(num_replicas):
            sampler = DistributedWeightedSampler(WEIGHTS, 10, num_replicas=num_replicas, rank=rank)
            assert len(sampler) == len(list(sampler)) == per_rank
            assert all(0 <= i < 10 for i in sampler)


def test_every_rank_keeps_the_mix_of_the_weights_even_where_a_split_would_give_it_no_target_entry():
    for rank in (0, 1):
        drawn = [i for epoch in range(400) for i in draws(rank, epoch)]
        share = sum(i in TARGET for i in drawn) / len(drawn)
        assert share == pytest.approx(0.25, abs=0.03), rank  # 2000 draws: the standard error is 0.01
    # a DistributedSampler split (what MONAI's DistributedWeightedRandomSampler draws within) holds no target on rank 1
    split = DistributedSampler(range(10), num_replicas=2, rank=1, shuffle=False)
    assert not set(split) & set(TARGET)


def test_the_draw_depends_on_seed_epoch_and_rank_alone():
    assert draws(0, 3) == draws(0, 3)  # a resumed run draws what the uninterrupted run drew at that epoch
    assert draws(0, 3) != draws(1, 3) and draws(0, 3) != draws(0, 4) and draws(0, 3) != draws(0, 3, seed=1)
    state = torch.random.get_rng_state()
    draws(0, 5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_it_is_a_distributed_sampler_so_monai_sets_its_epoch():
    assert isinstance(DistributedWeightedSampler(WEIGHTS, 10, num_replicas=2, rank=0), DistributedSampler)


def test_without_replacement_each_rank_draws_distinct_entries():
    drawn = draws(1, 0, num_replicas=2, replacement=False)
    assert len(drawn) == len(set(drawn)) == 5
    with pytest.raises(ConfigKeyError, match="only 2 have a positive weight"):
        DistributedWeightedSampler([1, 1, 0, 0], 4, replacement=False, num_replicas=1, rank=0)


@pytest.mark.parametrize("weights, num_samples, message", [
    ([1.0, -0.5, 1.0], 3, "finite and >= 0; entries [1] have [-0.5]"),
    ([1.0, float("nan")], 2, "finite and >= 0; entries [1] have [nan]"),
    ([0.0, 0.0], 2, "weights are all 0 (over 2 entries)"),
    ([[1.0, 1.0]], 2, "one number per dataset entry, found shape (1, 2)"),
    ([1.0, 1.0], 0, "num_samples must be a positive integer, found 0"),
])
def test_weights_or_counts_nothing_can_be_drawn_from_are_refused(weights, num_samples, message):
    with pytest.raises(ConfigKeyError) as error:
        DistributedWeightedSampler(weights, num_samples, num_replicas=1, rank=0)
    assert message in str(error.value)
