"""monai-segdiff: diffusion models conditioned on segmentation masks, as MONAI bundles.

The sub-packages (``segdiff.data``, ``segdiff.transforms``, ``segdiff.engine``, ``segdiff.evaluation``,
``segdiff.visualize``) load on first use, so a bundle config needs a single ``$import segdiff`` and the command
line starts without importing torch.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("config", "convert", "data", "engine", "evaluation", "export", "synthesis", "transforms", "visualize")

from segdiff.errors import SegdiffError, install_excepthook  # noqa: E402  (no torch: the CLI starts fast)

install_excepthook()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
