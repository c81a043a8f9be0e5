"""monai-segdiff: diffusion models conditioned on segmentation masks, as MONAI bundles.

``import segdiff`` makes the sub-packages available (``segdiff.data``, ``segdiff.transforms``, ``segdiff.engine``,
``segdiff.evaluation``), so a bundle config needs a single ``$import segdiff``.
"""

__version__ = "0.1.0"

from . import data, engine, evaluation, transforms, visualize  # noqa: E402  (sub-packages for bundle configs)
import segdiff.data.inputs  # noqa: E402,F401  (TODO move into segdiff/data/__init__)
