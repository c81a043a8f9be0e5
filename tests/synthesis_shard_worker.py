"""One rank of a sharded toy synthesis, for tests/test_synthesis_shards.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/synthesis_shard_worker.py OUT MASKS.json

joins a gloo process group (so the Synthesizer finds its rank through ``torch.distributed``), runs the toy synthesizer
of tests/synthesis_toys.py on the masks listed in MASKS.json, and with ``--exit-at-case CASE`` dies (``os._exit``)
at the first generation of that case, as a crashed or killed rank would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthesis_toys import ToyGenerator, toy_synthesizer  # noqa: E402

from segdiff.synthesis import derive_seed  # noqa: E402


class DyingGenerator(ToyGenerator):
    """The toy generator, ending the process without any clean-up when asked for the given seed."""

    def __init__(self, fatal_seed: int | None):
        super().__init__()
        self.fatal_seed = fatal_seed

    def __call__(self, condition, num_samples, seed, initial=None):
        if seed == self.fatal_seed:
            os._exit(3)
        return super().__call__(condition, num_samples, seed, initial)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("masks")
    parser.add_argument("--exit-at-case", default=None)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    try:
        fatal = None if args.exit_at_case is None else derive_seed(5, args.exit_at_case, 0)  # toy_synthesizer's seed
        with open(args.masks) as f:
            masks = json.load(f)
        toy_synthesizer(args.output_dir, DyingGenerator(fatal)).run(masks)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
