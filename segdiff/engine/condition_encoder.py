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
single segmenter gets wrong or is unsure of. By default only the encoder's class probabilities are concatenated:
any MONAI segmentation network fits, and the diffusion network stays an unchanged ``DiffusionModelUNet``. With
``encoder_features`` the encoder's decoder features also reach the diffusion UNet, at matching resolutions (as in
MedSegDiff, which adds them to its UNet's blocks): at each resolution of the diffusion UNet's encoder path, the
feature map that the condition encoder computed LAST at that size (its decoder's, which runs after its encoder path;
found once by a probe forward at construction, so any network fits), projected by a zero-initialised 1x1
convolution, is added to the diffusion UNet's skip connections the way MONAI's ControlNet adds its residuals. Zero
initialisation makes the untrained option an exact no-op.

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
        stop_gradient: True: the probabilities (and features) fed to the diffusion are detached, so the encoder is
            trained by its anchor loss only; False (default): the diffusion's loss also reaches the encoder.
        encoder_features: also add the encoder's decoder features at matching resolutions to the diffusion UNet's
            skip connections (see the module docstring); needs a MONAI ``DiffusionModelUNet``.

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
        encoder_features: bool = False,
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
        self._cache: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, Any] | None = None
        self.encoder_features = bool(encoder_features)
        self.feature_modules: dict[int, str] = {}  # downsampling factor -> the encoder module whose output is used
        if self.encoder_features:
            self._build_feature_projections()

    # -- what the model record stores about the network (segdiff.engine.describe_network reads it) -----------------
    @property
    def definition(self) -> dict[str, Any]:
        """The diffusion network's constructor arguments, named as ``network_def``'s keys (``in_channels`` is the
        wrapper's own input: mask and image); the encoder is described in the model record's settings."""
        from segdiff.engine.provenance import describe_network

        arguments = dict(describe_network(self.diffusion)["arguments"])
        arguments["in_channels"] = self.in_channels
        return arguments

    # -- decoder features at matching resolutions (encoder_features) ----------------------------------------------
    def _skip_layout(self) -> list[tuple[int, int]]:
        """``(channels, downsampling factor)`` of each skip connection of the diffusion UNet in MONAI's order (the
        input convolution, then per level its res-blocks and its downsampler), then the middle block's output."""
        channels = getattr(self.diffusion, "block_out_channels", None)
        res_blocks = getattr(self.diffusion, "num_res_blocks", None)
        if channels is None or res_blocks is None:
            raise ValueError("encoder_features needs a MONAI DiffusionModelUNet as the diffusion network.")
        layout = [(channels[0], 1)]
        for level, (width, blocks) in enumerate(zip(channels, res_blocks)):
            layout += [(width, 2**level)] * blocks
            if level < len(channels) - 1:
                layout.append((width, 2 ** (level + 1)))
        return layout + [(channels[-1], 2 ** (len(channels) - 1))]

    def _build_feature_projections(self) -> None:
        """Probe the encoder once (eval mode, no gradients, zeros of a size every level divides) to find, per
        downsampling factor, the module that completes last with an output of that size (the logits excluded: the
        probabilities are concatenated anyway), and build one zero-initialised 1x1 convolution per skip connection
        from that module's channels."""
        layout = self._skip_layout()
        deepest = max(factor for _, factor in layout)
        spatial_dims = self.diffusion.conv_in.conv.weight.dim() - 2
        edge = max(32, deepest * 8)
        probe = torch.zeros((1, self.image_channels) + (edge,) * spatial_dims)
        finished: list[tuple[str, torch.Tensor]] = []
        hooks = [
            module.register_forward_hook(
                lambda _m, _i, out, name=name: finished.append((name, out))
                if isinstance(out, torch.Tensor) and out.dim() == spatial_dims + 2 else None
            )
            for name, module in self.encoder.named_modules() if name
        ]
        was_training = self.encoder.training
        try:
            self.encoder.eval()
            with torch.no_grad():
                final = self.encoder(probe.to(next(self.encoder.parameters()).device))
        finally:
            for hook in hooks:
                hook.remove()
            self.encoder.train(was_training)
        sources: dict[int, tuple[str, int]] = {}
        for name, out in finished:  # later completions overwrite earlier ones: the decoder's features win
            sizes = out.shape[2:]
            if out is final:  # the logits themselves (and the containers returning them): already concatenated
                continue
            if all(edge % size == 0 for size in sizes) and len({edge // size for size in sizes}) == 1:
                sources[edge // sizes[0]] = (name, int(out.shape[1]))
        self.feature_modules = {factor: sources[factor][0] for _, factor in layout if factor in sources}
        if not self.feature_modules:
            raise ValueError(
                "encoder_features: no module of the condition encoder produces a feature map at any resolution of "
                f"the diffusion UNet (factors {sorted({f for _, f in layout})} of the image size)."
            )
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        projections = {}
        for index, (width, factor) in enumerate(layout):
            if factor in sources:
                projection = conv(sources[factor][1], width, kernel_size=1)
                torch.nn.init.zeros_(projection.weight)
                torch.nn.init.zeros_(projection.bias)
                projections[str(index)] = projection
        self.feature_projections = torch.nn.ModuleDict(projections)

    def _run_encoder_with_features(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The encoder's logits and, per factor of :attr:`feature_modules`, that module's output (hooks live only
        for this call, so copies of the network, e.g. EMA's, never write into this one)."""
        outputs: dict[str, torch.Tensor] = {}
        modules = dict(self.encoder.named_modules())
        hooks = [
            modules[name].register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
            for name in set(self.feature_modules.values())
        ]
        try:
            logits = self.segment(image)
        finally:
            for hook in hooks:
                hook.remove()
        features = {}
        for factor, name in self.feature_modules.items():
            feature = outputs.get(name)
            expected = [size // factor for size in image.shape[2:]]
            if feature is None or list(feature.shape[2:]) != expected:
                found = None if feature is None else list(feature.shape)
                raise ValueError(
                    f"encoder_features: the condition encoder's module {name!r} gave {found} for an image of "
                    f"{list(image.shape)}; expected a spatial size of {expected} (1/{factor} of the image)."
                )
            features[factor] = feature
        return logits, features

    def _skip_residuals(self, features: dict[int, torch.Tensor], like: torch.Tensor):
        """The projected features as ``down_block_additional_residuals`` and ``mid_block_additional_residual``;
        skip connections at a resolution the encoder has no feature for get a zero."""
        layout = self._skip_layout()
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        residuals = []
        for index, (_, factor) in enumerate(layout):
            key = str(index)
            residuals.append(self.feature_projections[key](features[factor]) if key in self.feature_projections else zero)
        return residuals[:-1], residuals[-1]

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
        return self._encode(image)[0]

    def _encode(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`encoded_probabilities` and the decoder features (empty without ``encoder_features``)."""
        cacheable = not self.training and not torch.is_grad_enabled() and not _exporting()
        if cacheable and self._cache is not None:
            key, cached_image, logits, encoded, features = self._cache
            if key == self._cache_key(image) and torch.equal(cached_image, image):
                self.last_encoder_logits = logits
                return encoded, features
        if self.encoder_features:
            logits, features = self._run_encoder_with_features(image)
        else:
            logits, features = self.segment(image), {}
        encoded = encode_probabilities(torch.softmax(logits.float(), dim=1), "target").to(image.dtype)
        if self.stop_gradient:
            encoded = encoded.detach()
            features = {factor: feature.detach() for factor, feature in features.items()}
        self._cache = (self._cache_key(image), image.detach().clone(), logits, encoded, features) if cacheable else None
        return encoded, features

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
        encoded, features = self._encode(image)
        extra = dict(kwargs)
        if self.encoder_features:
            extra["down_block_additional_residuals"], extra["mid_block_additional_residual"] = self._skip_residuals(
                features, x
            )
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
    encoder_features: bool = False,
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
        encoder_features: :class:`ConditionEncoderDiffusion`'s ``encoder_features`` (needs ``condition_encoder``).
    """
    num_classes = int(out_channels)
    image_channels = int(in_channels) - num_classes
    widened = int(in_channels) + (num_classes if condition_encoder else 0)
    diffusion = DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=widened, out_channels=out_channels, **diffusion_arguments
    )
    if not condition_encoder:
        if encoder_features:
            raise ValueError("encoder_features true needs condition_encoder true (the features are the encoder's).")
        return diffusion
    if encoder is None:
        raise ValueError("condition_encoder true needs the encoder network (encoder_def).")
    if not isinstance(encoder, torch.nn.Module):
        encoder = encoder()
    return ConditionEncoderDiffusion(diffusion, encoder, num_classes, image_channels, stop_gradient=encoder_stop_gradient,
                                     encoder_features=encoder_features)
