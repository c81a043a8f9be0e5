"""Diffusion segmentation ensembles: fuse the sampled members of one case and measure how much they disagree.

A diffusion segmenter draws ``num_members`` independent samples per case (Wolleb et al., 2022: 5). The sampler
stacks them sample-major along channels: a tensor ``(num_members * C, *spatial)`` whose member ``k`` occupies
channels ``[k * C, (k + 1) * C)``. Each member is the diffusion target encoding of a mask:

- ``C = num_classes >= 2``: one-hot class channels scaled to ``[-1, 1]``;
- ``C = 1`` (a binary task): one channel in ``[-1, 1]`` whose foreground probability is ``(x + 1) / 2``.

:func:`member_probabilities` turns that into per-member class probabilities ``(num_members, K, *spatial)``
(``K = C``, or ``K = 2`` for a binary task); every transform here starts from it. The transforms are post-transforms:
put them in the postprocessing ``Compose`` after the sampler. The dictionary versions write to ``output_key``
(default: over the input key), so compute uncertainty, mean probabilities and member labels BEFORE a fusion that
overwrites the stacked members, or give the fusion its own output key.

Labels come out as ``(1, *spatial)`` integers, uncertainty maps as ``(1, *spatial)`` float32; MetaTensor metadata
(affine, filename) of the input is carried over to every output.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor, ensure_tuple

from segdiff.transforms.mask import mask_probabilities

__all__ = [
    "FUSIONS",
    "UNCERTAINTIES",
    "EnsembleUncertainty",
    "EnsembleUncertaintyd",
    "FuseEnsemble",
    "FuseEnsembled",
    "MeanProbability",
    "MeanProbabilityd",
    "MemberLabels",
    "MemberLabelsd",
    "member_probabilities",
]

#: ``mean``: argmax of the members' mean class probabilities (Wolleb et al.'s pixel mean thresholded at 0.5).
#: ``vote``: majority vote of the members' labels, ties broken by the mean probability.
#: ``staple``: Warfield's STAPLE, the labels weighted by each member's performance estimated by EM.
FUSIONS = ("mean", "vote", "staple")

#: ``variance``: sum over classes of the members' probability variance. ``entropy``: predictive entropy of the
#: mean probabilities. ``mutual_information``: entropy of the mean minus the members' mean entropy.
#: ``disagreement``: fraction of members whose label differs from the majority vote.
UNCERTAINTIES = ("variance", "entropy", "mutual_information", "disagreement")

#: below this total probability a voxel carries no class evidence and becomes uniform over the classes
_EPS = 1e-6


def _check_num_members(num_members: int) -> int:
    try:
        valid = not isinstance(num_members, bool) and int(num_members) == num_members and num_members >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"num_members must be a positive integer, got {num_members!r}.")
    return int(num_members)


def _check_name(name: str, valid: Sequence[str], what: str) -> str:
    if name not in valid:
        raise ValueError(f"{what} must be one of {tuple(valid)}, got {name!r}.")
    return name


def _check_integer_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"dtype must be a torch integer dtype such as torch.int64 or torch.uint8, got {dtype!r}.")
    return dtype


def member_probabilities(stacked: Any, num_members: int) -> torch.Tensor:
    """Per-member class probabilities ``(num_members, K, *spatial)`` from the sampler's stacked members.

    Each value ``x`` in ``[-1, 1]`` is mapped to ``(x + 1) / 2`` and clamped to ``[0, 1]``. With ``C >= 2`` channels a
    member the probabilities are renormalised to sum to 1 over the classes (``K = C``); a voxel whose channels are
    all 0 (or non-finite) carries no evidence and gets the uniform distribution ``1 / K``. With ``C = 1`` the channel is
    the foreground probability ``p`` and the classes are ``[1 - p, p]`` (``K = 2``); a non-finite ``p`` becomes 0.5.

    Args:
        stacked: ``(num_members * C, *spatial)`` tensor or array, member ``k`` in channels ``[k * C, (k + 1) * C)``.
        num_members: number of ensemble members stacked along the channels.

    Returns:
        a float32 ``torch.Tensor`` (no metadata: its leading dimension is not a channel dimension).
    """
    num_members = _check_num_members(num_members)
    x = torch.as_tensor(convert_to_tensor(stacked, track_meta=False))
    if x.ndim < 2:
        raise ValueError(
            f"expected stacked members of shape (num_members * C, *spatial), got shape {tuple(x.shape)} "
            "with no spatial dimension."
        )
    channels = x.shape[0]
    if channels == 0 or channels % num_members:
        raise ValueError(
            f"the input has {channels} channels, which is not a multiple of num_members={num_members} "
            f"(expected num_members * C channels, member k in channels [k*C, (k+1)*C))."
        )
    per_member = channels // num_members
    p = mask_probabilities(x, "target").reshape(num_members, per_member, *x.shape[1:])
    if per_member == 1:
        p = torch.nan_to_num(p, nan=0.5)
        return torch.cat([1.0 - p, p], dim=1)
    p = torch.nan_to_num(p, nan=0.0)
    total = p.sum(dim=1, keepdim=True)
    return torch.where(total > _EPS, p / total.clamp_min(_EPS), torch.full_like(p, 1.0 / per_member))


def _labels(probs: torch.Tensor) -> torch.Tensor:
    """Argmax over the class dimension (dim 1 of ``(M, K, *spatial)``); ties go to the lowest class index."""
    return probs.argmax(dim=1)


def _vote(labels: torch.Tensor, mean_prob: torch.Tensor) -> torch.Tensor:
    """Majority vote ``(*spatial)`` of member labels ``(M, *spatial)``; a tie goes to the tied class of highest mean
    probability ``(K, *spatial)``, then to the lowest class index."""
    counts = torch.zeros_like(mean_prob).scatter_add_(0, labels, torch.ones_like(labels, dtype=mean_prob.dtype))
    tied = counts == counts.max(dim=0, keepdim=True).values
    return torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(dim=0)


def _entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy (natural log) along ``dim``, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def _itk_staple_filter(spatial_dims: int):
    """A new ``itk.STAPLEImageFilter`` for float images of ``spatial_dims`` (2 to 4) dimensions."""
    import itk

    try:
        # The wrapping module alone loads in a few seconds; ``itk.STAPLEImageFilter`` makes ITK's lazy loader import
        # every module it depends on (some 800 Python modules, 10-15 s on 2 cores) for the same class.
        from itk import itkSTAPLEImageFilterPython

        filter_type = getattr(itkSTAPLEImageFilterPython, f"itkSTAPLEImageFilterIF{spatial_dims}IF{spatial_dims}")
    except (ImportError, AttributeError):  # another ITK layout: the public, slower route
        image_type = itk.Image[itk.F, spatial_dims]
        filter_type = itk.STAPLEImageFilter[image_type, image_type]
    return filter_type.New()


def _binary_staple(labels: np.ndarray, max_iterations: int) -> np.ndarray:
    """Foreground probability ``(*spatial)`` of binary member labels ``(M, *spatial)`` by ``itk.STAPLEImageFilter``."""
    import itk

    # ITK wraps the filter for float images of 2 to 4 dimensions only; STAPLE has no spatial coupling, so a 1-D
    # input is safely viewed as a 1 x N image.
    spatial = labels.shape[1:]
    images = labels.reshape(labels.shape[0], 1, -1) if len(spatial) == 1 else labels
    if not 2 <= images.ndim - 1 <= 4:
        raise ValueError(f"STAPLE fusion of two classes supports 1 to 4 spatial dimensions, got {len(spatial)}.")
    staple = _itk_staple_filter(images.ndim - 1)
    for index, member in enumerate(images):
        staple.SetInput(index, itk.image_from_array(np.ascontiguousarray(member, dtype=np.float32)))
    staple.SetForegroundValue(1.0)
    staple.SetMaximumIterations(int(max_iterations))
    staple.Update()
    return np.asarray(itk.array_from_image(staple.GetOutput()), dtype=np.float64).reshape(spatial)


def _multilabel_staple(labels: torch.Tensor, num_classes: int, max_iterations: int, tolerance: float) -> torch.Tensor:
    """Posterior class probabilities ``(K, *spatial)`` of multi-label STAPLE (Warfield et al. 2004; Rohlfing et al.
    2004) from member labels ``(M, *spatial)``.

    The model is the one of ITK's MultiLabelSTAPLEImageFilter, which ITK's Python wheels do not wrap: each member r
    has a confusion matrix ``theta[r, s, l] = P(member says s | truth is l)``; the class priors are the relative label
    frequencies over all members and stay fixed. EM starts from the members' vote fractions as the truth estimate,
    then alternates the M-step (``theta`` from the current truth estimate) and the E-step (truth posterior
    ``W(x, l) ~ prior(l) * prod_r theta[r, D_r(x), l]``, computed in log space) until no confusion-matrix entry moves
    by more than ``tolerance`` (ITK's TerminationUpdateThreshold default, 1e-5) or after ``max_iterations``.

    The posterior of a voxel depends only on the members' labels there, so EM runs once per distinct label
    combination, weighted by how many voxels have it: a few hundred rows instead of millions of voxels.
    """
    num_members = labels.shape[0]
    flat = labels.reshape(num_members, -1)
    if num_classes**num_members < 2**62:
        # one integer per combination (base num_classes digits): far faster than torch.unique over rows
        code = torch.zeros_like(flat[0])
        for member in flat:
            code = code * num_classes + member
        codes, inverse, counts = torch.unique(code, return_inverse=True, return_counts=True)
        combos = torch.stack([codes // num_classes ** (num_members - 1 - r) % num_classes for r in range(num_members)])
    else:
        combos, inverse, counts = torch.unique(flat.T, dim=0, return_inverse=True, return_counts=True)
        combos = combos.T
    counts = counts.to(torch.float64)  # combos (M, P): the members' labels in each of the P distinct combinations
    rows = torch.arange(combos.shape[1], device=combos.device)
    weights = torch.zeros((combos.shape[1], num_classes), dtype=torch.float64, device=combos.device)
    for member in combos:
        weights[rows, member] += 1.0 / num_members
    prior = (weights * counts[:, None]).sum(dim=0) / counts.sum()
    log_prior = torch.log(prior)  # -inf for a class no member uses: it can never be the truth
    theta = torch.zeros((num_members, num_classes, num_classes), dtype=torch.float64, device=combos.device)
    for _ in range(max(int(max_iterations), 1)):
        voxel_weights = weights * counts[:, None]
        new_theta = torch.stack(
            [torch.zeros_like(theta[0]).index_add_(0, member, voxel_weights) for member in combos]
        ) / voxel_weights.sum(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        log_post = log_prior.expand_as(weights).clone()
        log_theta = torch.log(new_theta)
        for r, member in enumerate(combos):
            log_post += log_theta[r][member]
        # a combination whose classes all became impossible cannot occur in exact arithmetic (EM keeps every class
        # the previous estimate allowed); should round-off produce one, keep its previous estimate
        new_weights = torch.softmax(log_post, dim=1)
        weights = torch.where(torch.isfinite(new_weights), new_weights, weights)
        converged = bool((new_theta - theta).abs().max() < tolerance)
        theta = new_theta
        if converged:
            break
    return weights[inverse].T.reshape(num_classes, *labels.shape[1:])


def _argmax_tie_break(score: torch.Tensor, mean_prob: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """Argmax over dim 0 of ``score`` ``(K, *spatial)``; classes within ``atol`` of the best tie and are decided by
    ``mean_prob``, then by the lowest class index."""
    tied = score >= score.max(dim=0, keepdim=True).values - atol
    return torch.where(tied, mean_prob.to(score.dtype), torch.full_like(score, -1.0)).argmax(dim=0)


def _with_meta(out: torch.Tensor, like: Any) -> torch.Tensor:
    """``out`` with its own copy of ``like``'s metadata when ``like`` is a MetaTensor (outputs of one input written to
    several keys must not share one meta dictionary: a later change to one would show in all)."""
    if isinstance(like, MetaTensor):
        return MetaTensor(out, meta=deepcopy(like.meta), applied_operations=deepcopy(like.applied_operations))
    return out


class FuseEnsemble(Transform):
    """Fuse the sampled segmentations of one case into a single label map ``(1, *spatial)``.

    Args:
        num_members: number of ensemble members stacked along the input's channels (see
            :func:`member_probabilities` for the layout).
        fusion: how the members are fused, one of :data:`FUSIONS` (default ``"mean"``):

            - ``"mean"``: argmax of the members' mean class probabilities (for a binary task: foreground where the
              mean foreground probability exceeds 0.5). Ties go to the lowest class index.
            - ``"vote"``: each member votes with its argmax label; the most voted class wins, a tie goes to the tied
              class of highest mean probability (then to the lowest class index).
            - ``"staple"``: Warfield's STAPLE on the members' argmax labels: each member's performance is estimated by
              expectation-maximisation and the labels are weighted by it. Two classes (``C = 1``, or ``C = 2``) run
              ``itk.STAPLEImageFilter``; more classes run the multi-label STAPLE model of ITK's
              ``MultiLabelSTAPLEImageFilter`` (implemented here: ITK's Python wheels do not wrap that filter). The
              label is the class of highest STAPLE posterior; a tie (e.g. two members that contradict each other
              everywhere) goes to the tied class of highest mean probability.
        staple_max_iterations: upper bound on STAPLE's EM iterations (default 100); EM usually stops earlier,
            when the performance estimates no longer change.
        dtype: integer dtype of the label map (default ``torch.int64``; ``torch.uint8`` for up to 256 classes).
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        num_members: int,
        fusion: str = "mean",
        staple_max_iterations: int = 100,
        dtype: torch.dtype = torch.int64,
    ) -> None:
        self.num_members = _check_num_members(num_members)
        self.fusion = _check_name(fusion, FUSIONS, "fusion")
        if int(staple_max_iterations) < 1:
            raise ValueError(f"staple_max_iterations must be >= 1, got {staple_max_iterations}.")
        self.staple_max_iterations = int(staple_max_iterations)
        self.dtype = _check_integer_dtype(dtype)

    def __call__(self, stacked: Any) -> torch.Tensor:
        probs = member_probabilities(stacked, self.num_members)
        mean_prob = probs.mean(dim=0)
        if self.fusion == "mean":
            fused = mean_prob.argmax(dim=0)
        elif self.fusion == "vote":
            fused = _vote(_labels(probs), mean_prob)
        else:
            fused = self._staple(probs, mean_prob)
        return _with_meta(fused.unsqueeze(0).to(self.dtype), stacked)

    def _staple(self, probs: torch.Tensor, mean_prob: torch.Tensor) -> torch.Tensor:
        labels = _labels(probs)
        num_classes = probs.shape[1]
        if bool((labels == labels[:1]).all()):
            # unanimous members (or a single one): STAPLE's answer is their common label map. ITK's binary filter
            # would return NaN where no member marks any foreground (or all mark only foreground).
            return labels[0]
        if num_classes == 2:
            foreground = _binary_staple(labels.cpu().numpy(), self.staple_max_iterations)
            if not np.isfinite(foreground).all():
                raise RuntimeError("itk.STAPLEImageFilter returned non-finite foreground probabilities.")
            foreground_t = torch.as_tensor(foreground, device=probs.device)
            posterior = torch.stack([1.0 - foreground_t, foreground_t])
        else:
            posterior = _multilabel_staple(labels, num_classes, self.staple_max_iterations, tolerance=1e-5)
        return _argmax_tie_break(posterior, mean_prob)


class EnsembleUncertainty(Transform):
    """Per-voxel uncertainty ``(1, *spatial)`` (float32, finite, >= 0) of the sampled segmentations of one case.

    With ``P[m, k]`` the probability member ``m`` gives class ``k`` at a voxel (:func:`member_probabilities`),
    ``Pbar[k]`` its mean over the ``M`` members, ``H(q) = -sum_k q[k] ln q[k]`` (natural log, ``0 ln 0 = 0``):

    - ``"variance"``: ``sum_k (1/M) sum_m (P[m, k] - Pbar[k])^2``, the population variance over members (divided by
      ``M``, not ``M - 1``) summed over the ``K`` classes. For a binary task (``K = 2``, classes ``[1 - p, p]``) this is
      twice the variance of the foreground probability ``p``. Range ``[0, 1 - 1/K]``.
    - ``"entropy"``: predictive entropy ``H(Pbar)``. Range ``[0, ln K]``.
    - ``"mutual_information"``: ``H(Pbar) - (1/M) sum_m H(P[m])``, the part of the entropy due to the members
      disagreeing (BALD), clamped at 0 against round-off. Range ``[0, ln min(K, M)]``.
    - ``"disagreement"``: fraction of members whose argmax label differs from the majority vote (ties broken as in
      ``FuseEnsemble(fusion="vote")``). Range ``[0, 1 - 1/M]``.

    Args:
        num_members: number of ensemble members stacked along the input's channels.
        uncertainty: the measure, one of :data:`UNCERTAINTIES` (default ``"variance"``, Wolleb et al.'s choice).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, num_members: int, uncertainty: str = "variance") -> None:
        self.num_members = _check_num_members(num_members)
        self.uncertainty = _check_name(uncertainty, UNCERTAINTIES, "uncertainty")

    def __call__(self, stacked: Any) -> torch.Tensor:
        probs = member_probabilities(stacked, self.num_members)
        mean_prob = probs.mean(dim=0)
        if self.uncertainty == "variance":
            value = ((probs - mean_prob) ** 2).mean(dim=0).sum(dim=0)
        elif self.uncertainty == "entropy":
            value = _entropy(mean_prob, dim=0)
        elif self.uncertainty == "mutual_information":
            value = _entropy(mean_prob, dim=0) - _entropy(probs, dim=1).mean(dim=0)
        else:
            labels = _labels(probs)
            value = (labels != _vote(labels, mean_prob)).float().mean(dim=0)
        value = torch.nan_to_num(value.clamp_min(0.0), nan=0.0).float() + 0.0  # + 0.0 turns -0.0 into 0.0
        return _with_meta(value.unsqueeze(0), stacked)


class MeanProbability(Transform):
    """Per-class mean probability ``(K, *spatial)`` (float32) of the members: the soft prediction of the ensemble.

    ``K`` is the number of classes (2 for a binary task: background and foreground probability).

    Args:
        num_members: number of ensemble members stacked along the input's channels.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, num_members: int) -> None:
        self.num_members = _check_num_members(num_members)

    def __call__(self, stacked: Any) -> torch.Tensor:
        return _with_meta(member_probabilities(stacked, self.num_members).mean(dim=0), stacked)


class MemberLabels(Transform):
    """Every member's argmax label map, ``(num_members, *spatial)``: member ``k`` in channel ``k``.

    A member's tie between classes goes to the lowest class index (for a binary task, ``p = 0.5`` is background).

    Args:
        num_members: number of ensemble members stacked along the input's channels.
        dtype: integer dtype of the labels (default ``torch.int64``).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, num_members: int, dtype: torch.dtype = torch.int64) -> None:
        self.num_members = _check_num_members(num_members)
        self.dtype = _check_integer_dtype(dtype)

    def __call__(self, stacked: Any) -> torch.Tensor:
        return _with_meta(_labels(member_probabilities(stacked, self.num_members)).to(self.dtype), stacked)


class _EnsembleMapTransform(MapTransform):
    """Applies ``self.transform`` to each key and writes the result to the matching output key."""

    transform: Transform

    def __init__(self, keys: KeysCollection, output_key: KeysCollection | None, allow_missing_keys: bool) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_key is None:
            self.output_keys = self.keys
        else:
            self.output_keys = ensure_tuple(output_key)
            if len(self.output_keys) != len(self.keys):
                raise ValueError(
                    f"output_key must name one output per key: {len(self.keys)} keys {self.keys}, "
                    f"got {len(self.output_keys)} output keys {self.output_keys}."
                )
            if len(set(self.output_keys)) != len(self.output_keys):
                raise ValueError(f"output_key {self.output_keys} names the same output twice.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            d[output_key] = self.transform(d[key])
        return d


class FuseEnsembled(_EnsembleMapTransform):
    """Dictionary version of :class:`FuseEnsemble`.

    Args:
        keys: keys of the stacked members ``(num_members * C, *spatial)`` to fuse.
        num_members, fusion, staple_max_iterations, dtype: as in :class:`FuseEnsemble`.
        output_key: where each fused label map is written, one per key (default: over the input key). Compute
            uncertainty, mean probabilities or member labels from the stacked members before they are overwritten.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = FuseEnsemble.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_members: int,
        fusion: str = "mean",
        output_key: KeysCollection | None = None,
        staple_max_iterations: int = 100,
        dtype: torch.dtype = torch.int64,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_key, allow_missing_keys)
        self.transform = FuseEnsemble(num_members, fusion, staple_max_iterations, dtype)


class EnsembleUncertaintyd(_EnsembleMapTransform):
    """Dictionary version of :class:`EnsembleUncertainty`.

    Args:
        keys: keys of the stacked members ``(num_members * C, *spatial)``.
        num_members, uncertainty: as in :class:`EnsembleUncertainty`.
        output_key: where each uncertainty map is written, one per key (default: over the input key), e.g.
            ``"uncertainty"``.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = EnsembleUncertainty.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_members: int,
        uncertainty: str = "variance",
        output_key: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_key, allow_missing_keys)
        self.transform = EnsembleUncertainty(num_members, uncertainty)


class MeanProbabilityd(_EnsembleMapTransform):
    """Dictionary version of :class:`MeanProbability`.

    Args:
        keys: keys of the stacked members ``(num_members * C, *spatial)``.
        num_members: as in :class:`MeanProbability`.
        output_key: where each mean probability map is written, one per key (default: over the input key), e.g.
            ``"pred_prob"``.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = MeanProbability.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_members: int,
        output_key: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_key, allow_missing_keys)
        self.transform = MeanProbability(num_members)


class MemberLabelsd(_EnsembleMapTransform):
    """Dictionary version of :class:`MemberLabels`.

    Args:
        keys: keys of the stacked members ``(num_members * C, *spatial)``.
        num_members, dtype: as in :class:`MemberLabels`.
        output_key: where each member label stack is written, one per key (default: over the input key), e.g.
            ``"pred_members"``.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = MemberLabels.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_members: int,
        output_key: KeysCollection | None = None,
        dtype: torch.dtype = torch.int64,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_key, allow_missing_keys)
        self.transform = MemberLabels(num_members, dtype)
