"""Weighted random sampling for data-parallel training that keeps the weights' mix on every rank.

In one process ``torch.utils.data.WeightedRandomSampler`` draws each epoch's entries with probabilities proportional
to their weights (train_controlnet.yaml: a ``target_mix_ratio`` share of target-modality entries). Under torchrun every
rank must draw its own entries from those same probabilities. MONAI's ``DistributedWeightedRandomSampler`` does not:
it first splits the dataset between the ranks (``DistributedSampler``) and then draws within each rank's split, so a
rank whose split holds few (or none) of a small group's entries draws that group less (or never), and the mix of the
whole run depends on how the split fell. :class:`DistributedWeightedSampler` lets every rank draw from the whole
dataset, from a generator seeded with the run's seed, the epoch and the rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
import numpy as np
import torch
from torch.utils.data import DistributedSampler

from segdiff.errors import ConfigKeyError

__all__ = ["DistributedWeightedSampler"]


class DistributedWeightedSampler(DistributedSampler):
    """``WeightedRandomSampler`` for data-parallel training: each rank draws its own share of an epoch's entries from
    the whole dataset, with probabilities proportional to ``weights``.

    Each of the ``num_replicas`` ranks draws ``ceil(num_samples / num_replicas)`` indices per epoch (so the ranks
    together draw ``num_samples``, rounded up to a multiple of the rank count), with a ``torch.Generator`` seeded from
    ``(seed, epoch, rank)``: the ranks draw independently, every rank's expected mix is that of ``weights``, and a
    resumed run draws what the uninterrupted run would have drawn. It is a ``DistributedSampler``, so MONAI's trainers
    and evaluators call :meth:`set_epoch` when an epoch starts; without them, call it yourself, or every epoch draws
    epoch 0's indices.

    Args:
        weights: one non-negative weight per dataset entry (not necessarily summing to 1); at least one positive.
        num_samples: entries drawn per epoch by all ranks together (as ``WeightedRandomSampler``'s ``num_samples`` in
            one process, e.g. the dataset's length).
        replacement: draw with replacement (the default; each rank's draw is then independent of the other ranks').
            Without, each rank draws distinct entries, at most as many as there are positive weights.
        seed: the run's seed; with the epoch and the rank it seeds each draw.
        num_replicas: the number of ranks; default the world size of the initialised process group.
        rank: this process's rank; default its rank in the initialised process group.
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        num_samples: int,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        weights = torch.as_tensor(weights, dtype=torch.double)
        if weights.ndim != 1 or weights.numel() == 0:
            raise ConfigKeyError(f"weights must be one number per dataset entry, found shape {tuple(weights.shape)}")
        bad = [i for i, w in enumerate(weights.tolist()) if not math.isfinite(w) or w < 0]
        if bad:
            raise ConfigKeyError(
                f"weights must be finite and >= 0; entries {bad[:5]} have {[weights[i].item() for i in bad[:5]]}"
            )
        if not weights.sum() > 0:
            raise ConfigKeyError(f"weights are all 0 (over {weights.numel()} entries): nothing can be drawn")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigKeyError(f"num_samples must be a positive integer, found {num_samples!r}")
        # the dataset's only use in DistributedSampler is its length: the weights have one entry per dataset entry
        super().__init__(weights, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = weights
        self.replacement = bool(replacement)
        self.num_samples = math.ceil(num_samples / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        positive = int((weights > 0).sum())
        if not self.replacement and self.num_samples > positive:
            raise ConfigKeyError(
                f"without replacement each of {self.num_replicas} rank(s) draws {self.num_samples} distinct entries, "
                f"but only {positive} have a positive weight: set replacement true or lower num_samples"
            )

    def generator(self) -> torch.Generator:
        """The generator of this rank's draw in the current epoch (seeded from seed, epoch and rank)."""
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __iter__(self) -> Iterator[int]:
        drawn = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=self.generator())
        return iter(drawn.tolist())

    def __len__(self) -> int:
        return self.num_samples
