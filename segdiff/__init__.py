"""monai-segdiff: diffusion models conditioned on segmentation masks, as MONAI bundles."""

__version__ = "0.1.0"
