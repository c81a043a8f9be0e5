"""segdiff.transforms.ensemble: fusing sampled segmentations and measuring their disagreement, on hand-computed cases.

Inputs are built from per-member class probabilities ``(M, K, *spatial)``, encoded as the sampler emits them: the
diffusion target range ``2 p - 1`` with the members stacked sample-major along channels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from segdiff.transforms.ensemble import (
    FUSIONS,
    UNCERTAINTIES,
    EnsembleUncertainty,
    EnsembleUncertaintyd,
    FuseEnsemble,
    FuseEnsembled,
    MeanProbability,
    MeanProbabilityd,
    MemberLabels,
    MemberLabelsd,
    member_probabilities,
)

LN2, LN3 = math.log(2.0), math.log(3.0)

AFFINE = torch.tensor(
    [[1.5, 0.0, 0.0, -10.0], [0.0, 2.0, 0.0, 5.0], [0.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
)


def encode(probs) -> torch.Tensor:
    """Member probabilities ``(M, C, *spatial)`` -> the sampler's stacked members ``(M * C, *spatial)`` in [-1, 1]."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    return (2.0 * p - 1.0).reshape(-1, *p.shape[2:])


def onehot(labels, num_classes: int) -> torch.Tensor:
    """Member label maps ``(M, *spatial)`` -> one-hot member probabilities ``(M, K, *spatial)``."""
    t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 1).float()


def members_of(labels, num_classes: int) -> torch.Tensor:
    """Stacked encoded members whose argmax labels are ``labels`` ``(M, *spatial)``."""
    return encode(onehot(labels, num_classes))


def as_list(t) -> list:
    return torch.as_tensor(t).tolist()


# ---- member_probabilities -----------------------------------------------------------------------------------------
def test_member_probabilities_reads_member_k_from_channels_k_times_c_to_k_plus_one_times_c():
    x = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, 1.0]).reshape(6, 1, 1)  # 2 members x 3 classes
    probs = member_probabilities(x, num_members=2)
    assert probs.shape == (2, 3, 1, 1)
    assert as_list(probs[:, :, 0, 0]) == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_member_probabilities_renormalises_over_classes():
    x = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0]).reshape(6, 1, 1)  # p = [1, .5, 0] and [.5, .5, .5]
    probs = member_probabilities(x, num_members=2)[:, :, 0, 0]
    torch.testing.assert_close(probs, torch.tensor([[2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_member_probabilities_clamps_values_outside_minus_one_to_one():
    x = torch.tensor([1.4, -1.3, -1.0]).reshape(3, 1, 1)
    assert as_list(member_probabilities(x, num_members=1)[0, :, 0, 0]) == [1.0, 0.0, 0.0]


def test_member_probabilities_is_uniform_where_every_class_channel_is_zero():
    x = torch.full((3, 1, 2), -1.0)
    torch.testing.assert_close(member_probabilities(x, num_members=1), torch.full((1, 3, 1, 2), 1 / 3))


def test_member_probabilities_of_one_binary_channel_are_background_and_foreground():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0]).reshape(1, 1, 4)
    probs = member_probabilities(x, num_members=1)
    assert probs.shape == (1, 2, 1, 4)
    assert as_list(probs[0, :, 0]) == [[1.0, 0.5, 0.25, 0.0], [0.0, 0.5, 0.75, 1.0]]


def test_member_probabilities_treat_non_finite_values_as_no_evidence():
    multiclass = torch.tensor([float("nan"), float("nan"), float("nan")]).reshape(3, 1, 1)
    binary = torch.tensor([float("nan")]).reshape(1, 1, 1)
    torch.testing.assert_close(member_probabilities(multiclass, 1)[0, :, 0, 0], torch.full((3,), 1 / 3))
    assert as_list(member_probabilities(binary, 1)[0, :, 0, 0]) == [0.5, 0.5]


def test_member_probabilities_rejects_a_channel_count_that_is_not_a_multiple_of_num_members():
    with pytest.raises(ValueError, match=r"7 channels.*num_members=3"):
        member_probabilities(torch.zeros(7, 2, 2), num_members=3)


@pytest.mark.parametrize("num_members", [0, -2, 2.5, "five", None])
def test_num_members_must_be_a_positive_integer(num_members):
    with pytest.raises(ValueError, match="num_members must be a positive integer"):
        member_probabilities(torch.zeros(6, 2, 2), num_members=num_members)


# ---- FuseEnsemble: mean and vote ----------------------------------------------------------------------------------
# 3 members, 3 classes, a 1 x 4 image. Per voxel (member probabilities -> member labels):
#   0: all [0, 0, 1]                                   -> labels 2, 2, 2; mean [0, 0, 1]
#   1: [.6, .4, 0], [.6, .4, 0], [0, 1, 0]             -> labels 0, 0, 1; mean [.4, .6, 0]: mean says 1, vote 0
#   2: [.5, .3, .2], [.1, .5, .4], [.1, .3, .6]        -> labels 0, 1, 2 (three-way tie); mean [.233, .367, .4] -> 2
#   3: [.4, .6, 0], [.4, .6, 0], [1, 0, 0]             -> labels 1, 1, 0; mean [.6, .4, 0]: mean says 0, vote 1
VOXELS = [
    [[0, 0, 1], [0.6, 0.4, 0], [0.5, 0.3, 0.2], [0.4, 0.6, 0]],
    [[0, 0, 1], [0.6, 0.4, 0], [0.1, 0.5, 0.4], [0.4, 0.6, 0]],
    [[0, 0, 1], [0, 1, 0], [0.1, 0.3, 0.6], [1, 0, 0]],
]
THREE_MEMBERS = encode(torch.tensor(VOXELS).permute(0, 2, 1).unsqueeze(2))  # (9, 1, 4)


def test_mean_fusion_takes_the_argmax_of_the_mean_probabilities():
    assert as_list(FuseEnsemble(num_members=3, fusion="mean")(THREE_MEMBERS)) == [[[2, 1, 2, 0]]]


def test_vote_fusion_takes_the_majority_label_and_breaks_a_three_way_tie_by_the_mean_probability():
    assert as_list(FuseEnsemble(num_members=3, fusion="vote")(THREE_MEMBERS)) == [[[2, 0, 2, 1]]]


def test_vote_tie_goes_to_the_tied_class_of_highest_mean_even_when_an_untied_class_has_a_higher_mean():
    # labels 0, 0, 1, 1; means [.295, .305, .40]: the vote is tied between 0 and 1, class 2 got no vote
    probs = torch.tensor([[0.41, 0.19, 0.40], [0.41, 0.19, 0.40], [0.18, 0.42, 0.40], [0.18, 0.42, 0.40]])
    x = encode(probs.reshape(4, 3, 1, 1))
    assert as_list(FuseEnsemble(4, "vote")(x)) == [[[1]]]
    assert as_list(FuseEnsemble(4, "mean")(x)) == [[[2]]]


def test_binary_mean_fusion_is_foreground_only_where_the_mean_foreground_probability_exceeds_one_half():
    p = torch.tensor([[0.6, 0.55, 0.5, 0.1], [0.3, 0.55, 0.5, 0.1], [0.7, 0.0, 0.5, 0.95]])  # 3 members, 1 x 4
    x = encode(p.reshape(3, 1, 1, 4))
    assert as_list(FuseEnsemble(3, "mean")(x)) == [[[1, 0, 0, 0]]]
    assert as_list(FuseEnsemble(3, "vote")(x)) == [[[1, 1, 0, 0]]]


def test_fused_labels_are_int64_with_one_channel_or_the_requested_dtype():
    fused = FuseEnsemble(3, "vote")(THREE_MEMBERS)
    assert fused.shape == (1, 1, 4) and fused.dtype == torch.int64
    assert FuseEnsemble(3, "mean", dtype=torch.uint8)(THREE_MEMBERS).dtype == torch.uint8


# ---- FuseEnsemble: STAPLE -----------------------------------------------------------------------------------------
def test_staple_of_identical_multiclass_members_is_their_label_map_in_2d():
    labels = np.array([[0, 1, 2], [2, 1, 0]])
    fused = FuseEnsemble(3, "staple")(members_of([labels] * 3, 3))
    assert as_list(fused) == [labels.tolist()]


def test_staple_of_identical_binary_members_is_their_mask_also_when_it_is_empty():
    mask = [[0, 1], [1, 0]]
    assert as_list(FuseEnsemble(3, "staple")(members_of([mask] * 3, 2))) == [mask]
    empty = torch.full((3, 2, 2), -1.0)  # C = 1: no member marks any foreground (ITK alone would return NaN)
    assert as_list(FuseEnsemble(3, "staple")(empty)) == [[[0, 0], [0, 0]]]


def test_staple_follows_the_two_members_that_agree_when_all_members_perform_equally():
    truth = [0, 1, 2, 0, 1, 2]
    labels = [list(truth) for _ in range(3)]
    labels[0][0], labels[1][1], labels[2][2] = 1, 2, 0  # each member is wrong once, on a different voxel
    fused = FuseEnsemble(3, "staple")(members_of([[row] for row in labels], 3))
    assert as_list(fused) == [[truth]]


def test_multiclass_staple_sides_with_the_reliable_members_where_the_vote_is_split():
    # members 0 and 1 agree with the consensus everywhere; members 2 and 3 each err twice. On the last voxel the
    # vote is 2 : 2 (class 1 from the reliable members, class 2 from the others) and the mean favours class 2.
    truth = [0, 0, 1, 1, 2, 2, 0, 1]
    labels = [list(truth) for _ in range(4)]
    labels[2][1], labels[2][3], labels[3][2], labels[3][5] = 2, 0, 2, 0
    labels[2][7] = labels[3][7] = 2
    probs = onehot([[row] for row in labels], 3)
    probs[0, :, 0, 7] = probs[1, :, 0, 7] = torch.tensor([0.2, 0.45, 0.35])
    x = encode(probs)
    assert as_list(FuseEnsemble(4, "vote")(x))[0][0][7] == 2
    assert as_list(FuseEnsemble(4, "staple")(x)) == [[truth]]


def test_binary_staple_ignores_a_member_that_is_consistently_wrong_on_a_region_in_2d():
    truth = np.zeros((4, 4), dtype=int)
    truth[1:3, 1:4] = 1
    wrong = truth.copy()
    wrong[0:2, 0:2] = 1 - wrong[0:2, 0:2]
    x = encode(torch.tensor(np.stack([truth, truth, wrong]), dtype=torch.float32).unsqueeze(1))  # C = 1
    assert as_list(FuseEnsemble(3, "staple")(x)) == [truth.tolist()]


def test_binary_staple_sides_with_the_reliable_members_where_the_vote_is_split():
    truth = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    labels = [list(truth) for _ in range(4)]
    labels[2][1], labels[2][5], labels[3][2], labels[3][6] = 0, 1, 0, 1
    labels[2][9] = labels[3][9] = 0  # split 2 : 2 vote; one-hot members make the mean a tie too
    x = members_of([[row] for row in labels], 2)
    assert as_list(FuseEnsemble(4, "vote")(x))[0][0][9] == 0
    assert as_list(FuseEnsemble(4, "staple")(x)) == [[truth]]


def test_staple_works_on_3d_inputs_binary_and_multiclass():
    truth = np.zeros((3, 4, 5), dtype=int)
    truth[1:, 1:3, 2:] = 1
    truth[2, 2:, :2] = 2
    wrong_binary = (truth > 0).astype(int)
    wrong_binary[0, :2, :2] = 1
    binary = [(truth > 0).astype(int)] * 2 + [wrong_binary]
    assert as_list(FuseEnsemble(3, "staple")(members_of(binary, 2))) == [(truth > 0).astype(int).tolist()]
    wrong = truth.copy()
    wrong[1, 1:3, 2:] = 2
    fused = FuseEnsemble(3, "staple")(members_of([truth, wrong, truth], 3))
    assert fused.shape == (1, 3, 4, 5)
    assert as_list(fused) == [truth.tolist()]


def test_staple_tie_between_two_contradicting_members_goes_to_the_class_of_higher_mean_probability():
    # two binary members that disagree everywhere: STAPLE's posterior is 0.5 on every voxel
    p = torch.tensor([[0.9, 0.6, 0.1, 0.6], [0.2, 0.3, 0.6, 0.45]])  # labels 1 1 0 1 / 0 0 1 0
    x = encode(p.reshape(2, 1, 1, 4))  # means .55 .45 .35 .525
    assert as_list(FuseEnsemble(2, "staple")(x)) == [[[1, 0, 0, 1]]]


# ---- EnsembleUncertainty ------------------------------------------------------------------------------------------
# identical members: q = [.5, .25, .25] on voxel 0, one-hot class 1 on voxel 1
IDENTICAL = encode(torch.tensor([[[0.5, 0.0]], [[0.25, 1.0]], [[0.25, 0.0]]]).unsqueeze(0).expand(3, -1, -1, -1))


@pytest.mark.parametrize("uncertainty", ["variance", "mutual_information", "disagreement"])
def test_identical_members_have_zero_variance_mutual_information_and_disagreement(uncertainty):
    assert as_list(EnsembleUncertainty(3, uncertainty)(IDENTICAL)) == [[[0.0, 0.0]]]


def test_entropy_of_identical_members_is_the_entropy_of_their_common_distribution():
    expected = torch.tensor([[[-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), 0.0]]])  # 1.5 ln 2, 0
    torch.testing.assert_close(EnsembleUncertainty(3, "entropy")(IDENTICAL), expected)


# one voxel per column: two members with opposite one-hot predictions | two soft members
# [.5, .5, 0] and [0, .5, .5] (mean [.25, .5, .25])
OPPOSITE_AND_SOFT = encode(
    torch.tensor([[[1.0, 0.5], [0.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.5], [0.0, 0.5]]]).unsqueeze(2)
)


@pytest.mark.parametrize(
    "uncertainty, expected",
    [
        ("entropy", [LN2, 1.5 * LN2]),
        ("mutual_information", [LN2, 0.5 * LN2]),  # the soft members' own entropy (ln 2 each) is not disagreement
        ("variance", [0.5, 0.125]),  # 1/4 + 1/4 | 1/16 + 0 + 1/16
        ("disagreement", [0.5, 0.5]),
    ],
)
def test_uncertainty_of_two_opposite_one_hot_members_and_of_two_soft_members(uncertainty, expected):
    torch.testing.assert_close(EnsembleUncertainty(2, uncertainty)(OPPOSITE_AND_SOFT), torch.tensor([[expected]]))


@pytest.mark.parametrize(
    "uncertainty, expected",
    [
        # labels 0, 0, 1: mean [2/3, 1/3, 0] | labels 0, 1, 2: mean [1/3, 1/3, 1/3]
        ("entropy", [LN3 - 2 / 3 * LN2, LN3]),
        ("mutual_information", [LN3 - 2 / 3 * LN2, LN3]),
        ("variance", [4 / 9, 2 / 3]),  # 2/9 + 2/9 + 0 | 3 x 2/9
        ("disagreement", [1 / 3, 2 / 3]),
    ],
)
def test_uncertainty_of_three_one_hot_members_with_two_or_three_different_labels(uncertainty, expected):
    x = members_of([[[0, 0]], [[0, 1]], [[1, 2]]], 3)
    torch.testing.assert_close(EnsembleUncertainty(3, uncertainty)(x), torch.tensor([[expected]]))


@pytest.mark.parametrize(
    "uncertainty, expected",
    [
        # foreground probabilities 0 and 1 | 0.25 and 0.25
        ("entropy", [LN2, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]),
        ("mutual_information", [LN2, 0.0]),
        ("variance", [0.5, 0.0]),  # summed over background and foreground: twice the variance of p
        ("disagreement", [0.5, 0.0]),
    ],
)
def test_binary_uncertainty_is_computed_over_background_and_foreground(uncertainty, expected):
    x = encode(torch.tensor([[0.0, 0.25], [1.0, 0.25]]).reshape(2, 1, 1, 2))  # C = 1
    torch.testing.assert_close(EnsembleUncertainty(2, uncertainty)(x), torch.tensor([[expected]]))


@pytest.mark.parametrize("uncertainty", UNCERTAINTIES)
def test_uncertainty_is_a_finite_non_negative_float32_map_with_one_channel(uncertainty):
    x = torch.randn(5 * 4, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2  # values beyond [-1, 1] too
    x[0, 0, 0, 0] = float("nan")
    out = EnsembleUncertainty(5, uncertainty)(x)
    assert out.shape == (1, 3, 4, 5) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()


# ---- MeanProbability and MemberLabels -----------------------------------------------------------------------------
def test_mean_probability_is_the_per_class_mean_over_members():
    expected = torch.tensor([[[0.0, 0.4, 0.7 / 3, 0.6]], [[0.0, 0.6, 1.1 / 3, 0.4]], [[1.0, 0.0, 0.4, 0.0]]])
    torch.testing.assert_close(MeanProbability(3)(THREE_MEMBERS), expected)


def test_member_labels_are_each_members_argmax_in_member_order():
    assert as_list(MemberLabels(3)(THREE_MEMBERS)) == [[[2, 0, 0, 1]], [[2, 0, 1, 1]], [[2, 1, 2, 0]]]


def test_binary_member_labels_are_foreground_above_one_half():
    x = encode(torch.tensor([[0.2, 0.5, 0.7], [0.9, 0.51, 0.0]]).reshape(2, 1, 1, 3))
    assert as_list(MemberLabels(2)(x)) == [[[0, 0, 1]], [[1, 1, 0]]]


# ---- dictionary versions ------------------------------------------------------------------------------------------
def test_dictionary_versions_write_their_output_keys_and_keep_the_affine():
    pred = MetaTensor(THREE_MEMBERS.clone(), affine=AFFINE)
    post = Compose(
        [
            EnsembleUncertaintyd(keys="pred", uncertainty="entropy", num_members=3, output_key="uncertainty"),
            MeanProbabilityd(keys="pred", num_members=3, output_key="pred_prob"),
            MemberLabelsd(keys="pred", num_members=3, output_key="pred_members"),
            FuseEnsembled(keys="pred", fusion="vote", num_members=3, output_key="pred"),
        ]
    )
    out = post({"pred": pred})
    assert as_list(out["pred"]) == [[[2, 0, 2, 1]]]
    assert {k: tuple(out[k].shape) for k in out} == {
        "pred": (1, 1, 4),
        "uncertainty": (1, 1, 4),
        "pred_prob": (3, 1, 4),
        "pred_members": (3, 1, 4),
    }
    for key, value in out.items():
        assert isinstance(value, MetaTensor), key
        torch.testing.assert_close(value.affine, AFFINE, msg=key)


def test_dictionary_outputs_of_one_input_do_not_share_their_metadata():
    out = Compose(
        [
            EnsembleUncertaintyd(keys="pred", num_members=3, output_key="uncertainty"),
            FuseEnsembled(keys="pred", num_members=3),
        ]
    )({"pred": MetaTensor(THREE_MEMBERS.clone(), affine=AFFINE)})
    out["uncertainty"].meta["filename_or_obj"] = "case_uncertainty.nii.gz"
    assert "filename_or_obj" not in out["pred"].meta


def test_dictionary_version_writes_over_the_input_key_by_default():
    out = FuseEnsembled(keys="pred", fusion="mean", num_members=3)({"pred": THREE_MEMBERS})
    assert list(out) == ["pred"] and as_list(out["pred"]) == [[[2, 1, 2, 0]]]


def test_dictionary_version_needs_one_output_key_per_key():
    with pytest.raises(ValueError, match="one output per key"):
        EnsembleUncertaintyd(keys=["a", "b"], num_members=3, output_key="uncertainty")


# ---- argument errors ----------------------------------------------------------------------------------------------
def test_unknown_fusion_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"fusion must be one of \('mean', 'vote', 'staple'\), got 'median'"):
        FuseEnsemble(num_members=3, fusion="median")
    assert FUSIONS == ("mean", "vote", "staple")


def test_unknown_uncertainty_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"uncertainty must be one of .*'mutual_information'.*got 'std'"):
        EnsembleUncertainty(num_members=3, uncertainty="std")


@pytest.mark.parametrize(
    "transform", [FuseEnsemble(4, "mean"), EnsembleUncertainty(4, "entropy"), MeanProbability(4), MemberLabels(4)]
)
def test_transforms_name_the_channel_count_and_num_members_when_they_do_not_divide(transform):
    with pytest.raises(ValueError, match=r"9 channels, which is not a multiple of num_members=4"):
        transform(THREE_MEMBERS)
