"""A condition encoder for diffusion segmentation (MedSegDiff's idea): a supervised first guess that the diffusion refines.

What: :class:`ConditionEncoderDiffusion` wraps a diffusion UNet and a plain segmentation network (the condition
encoder: MONAI's ``UNet`` by default, ``DynUNet`` or ``SegResNet`` by config) that sees only the image. The wrapper
takes what MONAI's ``DiffusionInferer`` passes in ``"concat"`` mode, ``x = cat([noisy one-hot mask, image])``, runs
the encoder on the image, and feeds ``cat([noisy mask, image, encoded probabilities])`` to the diffusion UNet, the
probabilities in the mask's [-1, 1] target encoding (``2 p - 1``, :func:`segdiff.transforms.encode_probabilities`),
the values the noisy mask itself is a noised version of. The encoder is trained jointly by its own segmentation loss
(the anchor loss, :class:`segdiff.engine.SegmentationDiffusionLoss`) and, unless ``stop_gradient``, also through the
diffusion's loss.

Why: measured on this project's data, a diffusion segmenter that only sees the image loses clearly to a plain UNet
trained for the same steps (docs: image_to_mask). MedSegDiff (Wu et al., MIDL 2023) gives the diffusion network a
separately supervised encoder's output, so the diffusion starts from a good segmentation and learns the part a
single segmenter gets wrong or is unsure of. Unlike MedSegDiff, which adds the encoder's (detached) decoder features
to the first block of its diffusion UNet, only the encoder's class probabilities are concatenated here: any MONAI
segmentation network fits, and the diffusion network stays an unchanged ``DiffusionModelUNet``. Decoder features at
matching resolutions are not used.

The wrapper is one module (one ``network_def``), so the bundle's ``models/model.pt`` is one state dict
(``diffusion.*`` and ``encoder.*``), and MONAI Label, ``segdiff export-network`` (``network(x, timesteps)``) and
MONAI's ``verify_net_in_out`` see the same inputs and outputs as for a plain diffusion UNet. Called without
``timesteps`` (``network(image)``), it is the condition encoder alone and returns its logits: the path
``segmenter: encoder`` of inference.yaml and any plain-segmenter evaluation take.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from segdiff.transforms.mask import encode_probabilities

__all__ = ["ConditionEncoderDiffusion", "describe_encoder", "segmentation_diffusion_network"]


def _exporting() -> bool:
    compiler = getattr(torch, "compiler", None)
    for name in ("is_exporting", "is_compiling"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return True
    return torch.jit.is_tracing() or torch.jit.is_scripting()


class ConditionEncoderDiffusion(torch.nn.Module):
    """A diffusion UNet whose input also holds a condition encoder's class probabilities (see the module docstring).

    Args:
        diffusion: the diffusion network (a MONAI ``DiffusionModelUNet``) with ``in_channels`` =
            ``2 * num_classes + image_channels`` (noisy mask, image, encoder probabilities) and ``num_classes``
            output channels.
        encoder: a segmentation network mapping the image ``(B, image_channels, *spatial)`` to class logits
            ``(B, num_classes, *spatial)``, e.g. ``monai.networks.nets.UNet``.
        num_classes: classes including background: the channels of the noisy one-hot mask.
        image_channels: channels of the image.
        stop_gradient: True: the probabilities fed to the diffusion are detached, so the encoder is trained by its
            anchor loss only; False (default): the diffusion's loss also reaches the encoder.

    ``forward(x, timesteps, context=None, class_labels=None, ...)`` takes ``x = cat([noisy mask, image])`` and returns
    the diffusion's output; ``forward(image)`` (no timesteps) returns the encoder's logits. After every forward,
    ``last_encoder_logits`` holds the encoder's logits (with their graph in training), for the anchor loss.

    In eval mode without gradients the encoder's probabilities are cached: a sampler calls the network once per
    denoising step with the same image, and the encoder runs again only when the image (compared with
    ``torch.equal``, one pass over it), the encoder's weights (their version counters: in-place updates and
    ``load_state_dict``), the autocast state or the mode changed.
    """

    def __init__(
        self,
        diffusion: torch.nn.Module,
        encoder: torch.nn.Module,
        num_classes: int,
        image_channels: int,
        stop_gradient: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1 or image_channels < 1:
            raise ValueError(f"num_classes and image_channels must be >= 1, got {num_classes} and {image_channels}.")
        expected = 2 * num_classes + image_channels
        found = getattr(diffusion, "in_channels", expected)
        if found != expected:
            raise ValueError(
                f"the diffusion network of a condition encoder takes the noisy mask, the image and the encoder's "
                f"probabilities: in_channels must be 2 * {num_classes} + {image_channels} = {expected}, got {found}."
            )
        self.diffusion = diffusion
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.image_channels = int(image_channels)
        self.stop_gradient = bool(stop_gradient)
        # what callers read off a network_def (export, samplers): the input is the noisy mask and the image, as for
        # a plain diffusion UNet
        self.in_channels = self.num_classes + self.image_channels
        self.out_channels = getattr(diffusion, "out_channels", self.num_classes)
        if hasattr(diffusion, "block_out_channels"):
            self.block_out_channels = diffusion.block_out_channels
        self.last_encoder_logits: torch.Tensor | None = None
        self._cache: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- what the model record stores about the network (segdiff.engine.describe_network reads it) -----------------
    @property
    def definition(self) -> dict[str, Any]:
        """The diffusion network's constructor arguments, named as ``network_def``'s keys (``in_channels`` is the
        wrapper's own input: mask and image); the encoder is described in the model record's settings."""
        from segdiff.engine.provenance import describe_network

        arguments = dict(describe_network(self.diffusion)["arguments"])
        arguments["in_channels"] = self.in_channels
        return arguments

    # -- the encoder ---------------------------------------------------------------------------------------------
    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """The condition encoder's own class logits of ``image`` ``(B, image_channels, *spatial)``."""
        if image.shape[1] != self.image_channels:
            raise ValueError(
                f"the condition encoder takes the image ({self.image_channels} channel(s)); got {image.shape[1]}."
            )
        logits = self.encoder(image)
        if isinstance(logits, (list, tuple)):  # deep supervision (DynUNet in training): the full-resolution head
            logits = logits[0]
        if logits.dim() == image.dim() + 1:  # DynUNet stacks its deep-supervision heads on dim 1
            logits = logits[:, 0]
        if logits.shape[1] != self.num_classes or logits.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"the condition encoder must map the image {list(image.shape)} to {self.num_classes} class logits on "
                f"the same grid; it returned {list(logits.shape)} (check encoder_def#out_channels and its strides)."
            )
        if not _exporting():  # torch.export refuses tensor attributes assigned in forward
            self.last_encoder_logits = logits
        return logits

    def _cache_key(self, image: torch.Tensor) -> tuple:
        versions = tuple(t._version for t in self.encoder.parameters()) + tuple(t._version for t in self.encoder.buffers())
        return (image.shape, image.dtype, image.device, torch.is_autocast_enabled(), versions)

    def encoded_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder's softmax probabilities in the mask's [-1, 1] encoding (``2 p - 1``), as the diffusion sees
        them; cached between calls in eval mode without gradients (see the class docstring)."""
        cacheable = not self.training and not torch.is_grad_enabled() and not _exporting()
        if cacheable and self._cache is not None:
            key, cached_image, logits, encoded = self._cache
            if key == self._cache_key(image) and torch.equal(cached_image, image):
                self.last_encoder_logits = logits
                return encoded
        logits = self.segment(image)
        encoded = encode_probabilities(torch.softmax(logits.float(), dim=1), "target").to(image.dtype)
        if self.stop_gradient:
            encoded = encoded.detach()
        self._cache = (self._cache_key(image), image.detach().clone(), logits, encoded) if cacheable else None
        return encoded

    # -- the network -----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``x = cat([noisy mask, image])`` at ``timesteps`` -> the diffusion's output (``num_classes`` channels);
        without ``timesteps``, ``x`` is the image and the encoder's logits are returned."""
        if timesteps is None:
            return self.segment(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected the noisy mask ({self.num_classes} channels) and the image ({self.image_channels}) "
                f"concatenated: {self.in_channels} channels, got {x.shape[1]}."
            )
        image = x[:, self.num_classes :]
        encoded = self.encoded_probabilities(image)
        extra = dict(kwargs)
        if context is not None:
            extra["context"] = context
        if class_labels is not None:
            extra["class_labels"] = class_labels
        return self.diffusion(torch.cat([x, encoded], dim=1), timesteps=timesteps, **extra)

    def train(self, mode: bool = True) -> ConditionEncoderDiffusion:
        self._cache = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        # copies (EMA's deepcopy, pickling) take the weights, not the last batch's logits and their graph
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["last_encoder_logits"] = None
        state["_cache"] = None
        return state


def describe_encoder(encoder: Any) -> dict[str, Any]:
    """The condition encoder's class and constructor arguments, keyed as the ``encoder_def`` section of a bundle
    (``_target_``, ``channels``, ...), for the model record. Takes what ``@encoder_def`` is: a network factory
    (``_mode_: callable``, a ``functools.partial``) or a built network."""
    from segdiff.engine.provenance import _plain, describe_network

    if isinstance(encoder, functools.partial):
        cls = encoder.func
        arguments: Mapping[str, Any] = dict(encoder.keywords)
    elif isinstance(encoder, torch.nn.Module):
        cls = type(encoder)
        arguments = describe_network(encoder)["arguments"]
    else:
        raise TypeError(f"encoder_def must build a torch.nn.Module; got {type(encoder).__name__}.")
    name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)
    return {"_target_": name, **_plain(dict(arguments))}


def segmentation_diffusion_network(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    condition_encoder: bool = False,
    encoder: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    encoder_stop_gradient: bool = False,
    **diffusion_arguments: Any,
) -> torch.nn.Module:
    """image_to_mask's ``network_def``: a MONAI ``DiffusionModelUNet`` with ``in_channels`` (noisy mask + image) and
    ``out_channels`` (= num_classes) and the other ``diffusion_arguments`` (``channels``, ``attention_levels``...),
    exactly as the bundle built it before condition encoders existed; with ``condition_encoder`` a
    :class:`ConditionEncoderDiffusion` of that UNet (widened by ``out_channels`` input channels for the encoder's
    probabilities) and ``encoder``.

    Args:
        encoder: the condition encoder, or a callable that builds it (``encoder_def`` with ``_mode_: callable``):
            it is built after the diffusion UNet and only when used, so without a condition encoder the random
            initialisation is the same as the plain UNet's.
        encoder_stop_gradient: :class:`ConditionEncoderDiffusion`'s ``stop_gradient``.
    """
    num_classes = int(out_channels)
    image_channels = int(in_channels) - num_classes
    widened = int(in_channels) + (num_classes if condition_encoder else 0)
    diffusion = DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=widened, out_channels=out_channels, **diffusion_arguments
    )
    if not condition_encoder:
        return diffusion
    if encoder is None:
        raise ValueError("condition_encoder true needs the encoder network (encoder_def).")
    if not isinstance(encoder, torch.nn.Module):
        encoder = encoder()
    return ConditionEncoderDiffusion(diffusion, encoder, num_classes, image_channels, stop_gradient=encoder_stop_gradient)
