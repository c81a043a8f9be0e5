"""The condition encoder (MedSegDiff) and Fu et al.'s training fixes for image_to_mask: the wrapper's forward, shapes,
stop-gradient and eval cache; the x0 conversion for every prediction type; the x0 and anchor losses against
hand-computed values; recycling; and the refusals of impossible loss settings. Tiny networks, 16 x 16 images."""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet, UNet
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from segdiff.engine import (
    ConditionalDiffusionPrepareBatch,
    ConditionEncoderDiffusion,
    SegmentationDiffusionLoss,
    check_segmentation_objective,
    check_segmenter,
    describe_encoder,
    describe_network,
    predicted_x0,
    segmentation_diffusion_network,
)
from segdiff.errors import ConfigKeyError
from segdiff.export import export_network, max_abs_difference

NUM_CLASSES, IMAGE_CHANNELS = 3, 1
TINY_UNET = dict(channels=[8, 8], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=4)
LINEAR = dict(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)


def encoder_factory(spatial_dims=2):
    return functools.partial(UNet, spatial_dims=spatial_dims, in_channels=IMAGE_CHANNELS, out_channels=NUM_CLASSES,
                             channels=[8, 8], strides=[2], num_res_units=0)


def wrapper(spatial_dims=2, stop_gradient=False, seed=0):
    torch.manual_seed(seed)
    network = segmentation_diffusion_network(spatial_dims, NUM_CLASSES + IMAGE_CHANNELS, NUM_CLASSES, condition_encoder=True,
                                             encoder=encoder_factory(spatial_dims), encoder_stop_gradient=stop_gradient, **TINY_UNET)
    with torch.no_grad():  # DiffusionModelUNet starts with a zeroed output layer: make outputs depend on the inputs
        for p in network.diffusion.out.parameters():
            p.normal_(0, 0.1)
    return network


def inputs(spatial=(16, 16), batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, NUM_CLASSES + IMAGE_CHANNELS, *spatial), generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g)


def diffusion_input(network):
    """Record what the inner diffusion UNet receives."""
    seen = []
    network.diffusion.register_forward_hook(lambda module, args, kwargs, out: seen.append(args[0] if args else kwargs["x"]),
                                            with_kwargs=True)
    return seen


# ---- the wrapper ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_wrapper_predicts_the_mask_channels_and_feeds_the_encoder_probabilities_to_the_diffusion(spatial):
    network = wrapper(spatial_dims=len(spatial))
    seen = diffusion_input(network)
    x, t = inputs(spatial)
    out = network(x, timesteps=t)
    assert out.shape == (2, NUM_CLASSES, *spatial)
    assert network.in_channels == NUM_CLASSES + IMAGE_CHANNELS and network.diffusion.in_channels == 2 * NUM_CLASSES + IMAGE_CHANNELS
    fed = seen[0]
    assert fed.shape == (2, 2 * NUM_CLASSES + IMAGE_CHANNELS, *spatial)
    torch.testing.assert_close(fed[:, : NUM_CLASSES + IMAGE_CHANNELS], x)  # noisy mask and image unchanged
    logits = network.encoder(x[:, NUM_CLASSES:])
    torch.testing.assert_close(fed[:, NUM_CLASSES + IMAGE_CHANNELS :], 2 * logits.softmax(dim=1) - 1)  # the target encoding
    torch.testing.assert_close(network.last_encoder_logits, logits)
    # without timesteps it is the encoder alone, on the image
    torch.testing.assert_close(network(x[:, NUM_CLASSES:]), logits)


def test_wrapper_refuses_a_diffusion_network_without_room_for_the_probabilities():
    diffusion = DiffusionModelUNet(spatial_dims=2, in_channels=NUM_CLASSES + IMAGE_CHANNELS, out_channels=NUM_CLASSES, **TINY_UNET)
    with pytest.raises(ValueError, match=r"in_channels must be 2 \* 3 \+ 1 = 7, got 4"):
        ConditionEncoderDiffusion(diffusion, encoder_factory()(), NUM_CLASSES, IMAGE_CHANNELS)
    network = wrapper()
    with pytest.raises(ValueError, match="4 channels, got 5"):
        network(torch.zeros(1, 5, 16, 16), timesteps=torch.tensor([3]))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_keeps_the_diffusion_loss_out_of_the_encoder(stop_gradient):
    network = wrapper(stop_gradient=stop_gradient)
    x, t = inputs()
    network(x, timesteps=t).pow(2).mean().backward()  # a loss on the diffusion's output only
    encoder_grads = [p.grad for p in network.encoder.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    assert reached is not stop_gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.diffusion.parameters())
    # the anchor loss reaches the encoder either way
    network.zero_grad()
    network(x, timesteps=t)
    network.last_encoder_logits.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.encoder.parameters())


def test_eval_cache_runs_the_encoder_once_per_image_and_equals_a_fresh_forward():
    network = wrapper().eval()
    calls = []
    network.encoder.register_forward_hook(lambda *a: calls.append(1))
    x, t = inputs()
    with torch.no_grad():
        first = network(x, timesteps=t)
        noisier = torch.cat([torch.randn_like(x[:, :NUM_CLASSES]), x[:, NUM_CLASSES:]], dim=1)  # next step: same image
        cached = network(noisier, timesteps=t - 1)
        assert len(calls) == 1
        network._cache = None
        fresh = network(noisier, timesteps=t - 1)
        assert len(calls) == 2
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
        other = x.clone()
        other[:, NUM_CLASSES:] += 0.5  # another image: recomputed
        network(other, timesteps=t)
        assert len(calls) == 3
        for p in network.encoder.parameters():  # new weights in place (EMA update, load_state_dict): recomputed
            p.mul_(0.5)
        after = network(other, timesteps=t)
        assert len(calls) == 4
        network._cache = None
        torch.testing.assert_close(after, network(other, timesteps=t), rtol=0, atol=0)
    assert first.shape == cached.shape
    network(x, timesteps=t)  # with gradients: never cached
    network.train()
    with torch.no_grad():
        network(x, timesteps=t)
        network(x, timesteps=t)
    assert len(calls) == 8


def test_copies_of_a_trained_wrapper_leave_the_last_batch_behind():
    network = wrapper()
    network(*inputs())  # last_encoder_logits now carries a graph, which deepcopy cannot copy
    copied = copy.deepcopy(network)  # what ignite's EMAHandler does
    assert copied.last_encoder_logits is None and network.last_encoder_logits is not None
    for a, b in zip(copied.state_dict().values(), network.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_network_def_without_an_encoder_is_the_plain_unet_with_the_same_initial_weights():
    torch.manual_seed(3)
    plain = DiffusionModelUNet(spatial_dims=2, in_channels=4, out_channels=3, **TINY_UNET)
    torch.manual_seed(3)
    built = segmentation_diffusion_network(2, 4, 3, condition_encoder=False, encoder=encoder_factory(), **TINY_UNET)
    assert type(built) is DiffusionModelUNet
    assert describe_network(built) == describe_network(plain)
    for a, b in zip(built.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs the encoder network"):
        segmentation_diffusion_network(2, 4, 3, condition_encoder=True, encoder=None, **TINY_UNET)


def test_the_encoder_is_described_by_its_class_and_arguments_for_the_model_record():
    expected = {"_target_": "monai.networks.nets.unet.UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                "channels": [8, 8], "strides": [2], "num_res_units": 0}
    assert describe_encoder(encoder_factory()) == expected
    built = describe_encoder(encoder_factory()())
    assert built["_target_"] == expected["_target_"] and built["channels"] == [8, 8] and built["strides"] == [2]
    network = wrapper()
    assert describe_network(network)["class"] == "segdiff.engine.condition_encoder.ConditionEncoderDiffusion"
    assert describe_network(network)["arguments"]["in_channels"] == 4  # network_def's input: mask and image


def test_torch_export_of_the_wrapper_matches_the_eager_network():
    network = wrapper().eval()
    x, t = inputs()
    program = export_network(network, (x, t), spatial_multiple=2)
    check = inputs((20, 20), batch=3, seed=5)
    assert max_abs_difference(program.module(), network, check) < 1e-5


# ---- the clean mask a network output implies ------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_recovers_the_clean_sample_from_the_ideal_output(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type, **LINEAR)
    x0, noise = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 990])
    noisy = scheduler.add_noise(x0, noise, t)
    ideal = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    atol = 5e-4 if prediction_type == "epsilon" else 1e-5  # epsilon: / alpha_990 = / 0.007 amplifies rounding
    torch.testing.assert_close(predicted_x0(scheduler, ideal, noisy, t, prediction_type), x0, atol=atol, rtol=0)


def test_predicted_x0_of_a_rectified_flow_walks_the_velocity_back():
    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True)
    x0, noise = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 400, 999])
    noisy = scheduler.add_noise(x0, noise, t)  # (1 - t/T) x0 + (t/T) noise
    torch.testing.assert_close(predicted_x0(scheduler, x0 - noise, noisy, t, "v_prediction"), x0, atol=1e-5, rtol=0)


# ---- the losses against hand-computed values ------------------------------------------------------------------------
#: two classes on two voxels: voxel 0 is class 0, voxel 1 is class 1 (as probabilities, then in the [-1, 1] encoding)
TRUTH = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
SMOOTH = 1e-5  # MONAI's DiceLoss smoothing


def dice(intersection, sum_p, sum_y):
    return 1 - (2 * intersection + SMOOTH) / (sum_p + sum_y + SMOOTH)


def holder(prediction_type="sample", **last):
    scheduler = DDPMScheduler(prediction_type=prediction_type, **LINEAR)
    batch = {"target": 2 * TRUTH - 1, "noisy": torch.zeros_like(TRUTH), "timesteps": torch.tensor([10]), "loss_weights": None}
    return SimpleNamespace(last_batch={**batch, **last}, scheduler=scheduler, prediction_type=prediction_type)


def test_x0_loss_is_dice_plus_cross_entropy_of_the_clamped_mask_probabilities():
    # predicted x0 (sample prediction: the output itself): class 0 [1, -0.5] -> p [1, 0.25]; class 1 [0, 0.5] -> [0.5, 0.75]
    prediction = torch.tensor([[1.0, -0.5], [0.0, 0.5]]).reshape(1, 2, 1, 2)
    loss = SegmentationDiffusionLoss(holder(), mse_loss_weight=0.0, x0_loss_weight=2.0)
    expected_dice = (dice(1.0, 1.25, 1.0) + dice(0.75, 1.25, 1.0)) / 2
    expected_ce = (-math.log(1.0) - math.log(0.75)) / 2  # per voxel, the true class's log-probability
    assert loss(prediction, 2 * TRUTH - 1).item() == pytest.approx(2.0 * (expected_dice + expected_ce), rel=1e-5)
    # beyond [-1, 1] the probabilities are clamped (class 1 of voxel 1 at 3.0 -> 1), no softmax: a perfect mask costs ~0
    perfect = SegmentationDiffusionLoss(holder(), mse_loss_weight=0.0, x0_loss_weight=1.0)(3.0 * (2 * TRUTH - 1), 2 * TRUTH - 1)
    assert perfect.item() == pytest.approx(0.0, abs=1e-4)
    # alongside the MSE: the sum of both
    both = SegmentationDiffusionLoss(holder(), mse_loss_weight=1.0, x0_loss_weight=2.0)
    mse = (prediction - (2 * TRUTH - 1)).pow(2).mean().item()
    assert both(prediction, 2 * TRUTH - 1).item() == pytest.approx(mse + 2.0 * (expected_dice + expected_ce), rel=1e-5)
    assert set(both.last_terms) == {"mse", "x0"}


def test_x0_loss_reads_the_mask_off_an_epsilon_output():
    scheduler = DDPMScheduler(prediction_type="epsilon", **LINEAR)
    noise, t = torch.randn(1, 2, 1, 2), torch.tensor([100])
    noisy = scheduler.add_noise(2 * TRUTH - 1, noise, t)
    loss = SegmentationDiffusionLoss(holder("epsilon", noisy=noisy, timesteps=t), mse_loss_weight=0.0, x0_loss_weight=1.0)
    assert loss(noise, noise).item() == pytest.approx(0.0, abs=1e-3)  # the true noise implies the true mask


class EncoderLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.last_encoder_logits = logits


def test_anchor_loss_is_dice_ce_of_the_encoder_softmax_against_the_truth():
    # voxel 0 logits [0, 0] -> p [0.5, 0.5]; voxel 1 [ln 3, 0] -> [0.75, 0.25]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    prediction = torch.zeros_like(TRUTH)
    loss = SegmentationDiffusionLoss(holder(), network=EncoderLogits(logits), mse_loss_weight=1.0, anchor_loss_weight=0.5)
    expected_dice = (dice(0.5, 1.25, 1.0) + dice(0.25, 0.75, 1.0)) / 2
    expected_ce = (math.log(2.0) + math.log(4.0)) / 2
    mse = (prediction - (2 * TRUTH - 1)).pow(2).mean().item()
    assert loss(prediction, 2 * TRUTH - 1).item() == pytest.approx(mse + 0.5 * (expected_dice + expected_ce), rel=1e-5)
    assert loss.last_terms["anchor"].item() == pytest.approx(0.5 * (expected_dice + expected_ce), rel=1e-5)
    # a network without a condition encoder has no anchor loss, whatever its weight
    plain = SegmentationDiffusionLoss(holder(), network=torch.nn.Linear(1, 1), anchor_loss_weight=1.0)
    assert plain(prediction, 2 * TRUTH - 1).item() == pytest.approx(mse)


# ---- recycling (Fu et al.) --------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """A mask 'network' that records how it was called; its outputs overshoot [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(NUM_CLASSES + IMAGE_CHANNELS, NUM_CLASSES, 1)
        self.calls = []

    def forward(self, x, timesteps, context=None):
        out = 3.0 * torch.tanh(self.conv(x))
        self.calls.append({"timesteps": timesteps.clone(), "grad": torch.is_grad_enabled(), "input": x.detach().clone(),
                           "requires_grad": out.requires_grad})
        return out


def recycling_batch(n=4):
    labels = torch.randint(0, NUM_CLASSES, (n, 1, 8, 8))
    truth = 2 * torch.nn.functional.one_hot(labels[:, 0], NUM_CLASSES).permute(0, 3, 1, 2).float() - 1
    return {"label": truth, "image": torch.randn(n, IMAGE_CHANNELS, 8, 8)}


def test_recycling_noises_the_models_own_prediction_without_gradient_and_targets_the_truth():
    torch.manual_seed(0)
    scheduler = DDPMScheduler(prediction_type="sample", **LINEAR)
    network = Recorder()
    prepare = ConditionalDiffusionPrepareBatch(1000, target_key="label", condition_key="image", scheduler=scheduler,
                                               network=network, recycling=True)
    data = recycling_batch()
    noised, loss_target, _, kwargs = prepare(data)
    # the recycling pass: the truth noised to T - 1, the condition concatenated, no gradient
    (call,) = network.calls
    assert not call["grad"] and not call["requires_grad"] and not noised.requires_grad
    assert torch.equal(call["timesteps"], torch.full((4,), 999))
    torch.testing.assert_close(call["input"][:, NUM_CLASSES:], data["image"])
    # its clamped prediction is what the inferer noises, at the drawn timesteps; the loss target is the truth
    expected = (3.0 * torch.tanh(network.conv(call["input"]))).clamp(-1, 1).detach()
    torch.testing.assert_close(noised, expected)
    assert not torch.equal(noised, data["label"])
    assert torch.equal(loss_target, data["label"]) and torch.equal(prepare.last_batch["target"], data["label"])
    t = kwargs["timesteps"]
    assert len(set(t.tolist())) > 1  # drawn per sample, not T - 1
    torch.testing.assert_close(prepare.last_batch["noisy"], scheduler.add_noise(noised, kwargs["noise"], t))
    # the trainer's pass: the inferer noises the recycled mask exactly as last_batch says, with gradient
    out = DiffusionInferer(scheduler)(noised, network, **kwargs)
    torch.testing.assert_close(network.calls[1]["input"][:, :NUM_CLASSES], prepare.last_batch["noisy"])
    assert network.calls[1]["grad"] and out.requires_grad
    assert torch.equal(network.calls[1]["timesteps"], t)


def test_without_recycling_the_truth_is_noised_and_the_network_is_not_called():
    scheduler = DDPMScheduler(prediction_type="sample", **LINEAR)
    network = Recorder()
    prepare = ConditionalDiffusionPrepareBatch(1000, target_key="label", condition_key="image", scheduler=scheduler, network=network)
    data = recycling_batch()
    noised, _, _, kwargs = prepare(data)
    assert torch.equal(noised, data["label"]) and network.calls == []
    torch.testing.assert_close(prepare.last_batch["noisy"], scheduler.add_noise(data["label"], kwargs["noise"], kwargs["timesteps"]))


@pytest.mark.parametrize("scheduler", [DDPMScheduler(prediction_type="v_prediction", **LINEAR),
                                       DDPMScheduler(prediction_type="epsilon", **LINEAR),
                                       RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True)])
def test_recycling_is_refused_unless_the_model_predicts_the_mask_under_ddpm(scheduler):
    with pytest.raises(ConfigKeyError, match="'recycling' true .* needs 'prediction_type' sample with 'diffusion' ddpm"):
        ConditionalDiffusionPrepareBatch(1000, scheduler=scheduler, network=Recorder(), recycling=True)


# ---- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"recycling": "false"}, "'recycling' must be True or False, got 'false' (on the command line: --recycling True)"),
        ({"mse_loss_weight": -1.0}, "'mse_loss_weight' must be a number >= 0, got -1.0"),
        ({"x0_loss_weight": float("nan")}, "'x0_loss_weight' must be a number >= 0, got nan"),
        ({"anchor_loss_weight": -0.5}, "'anchor_loss_weight' must be a number >= 0, got -0.5"),
        ({"mse_loss_weight": 0.0, "x0_loss_weight": 0.0}, "'mse_loss_weight' and 'x0_loss_weight' are both 0"),
        ({"mse_loss_weight": 0.0, "anchor_loss_weight": 1.0, "condition_encoder": True}, "nothing trains the diffusion network"),
        ({"encoder_stop_gradient": True}, "'encoder_stop_gradient' true needs 'condition_encoder' true"),
        ({"encoder_stop_gradient": True, "condition_encoder": True, "anchor_loss_weight": 0.0}, "nothing trains the condition encoder"),
        ({"recycling": True, "prediction_type": "v_prediction"}, "got prediction_type 'v_prediction', diffusion 'ddpm'"),
        ({"recycling": True, "prediction_type": "sample", "diffusion": "rflow"}, "got prediction_type 'sample', diffusion 'rflow'"),
    ],
)
def test_impossible_loss_settings_are_refused_naming_the_key(settings, message):
    with pytest.raises(ConfigKeyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_segmentation_objective(**settings)


def test_segmenter_encoder_is_refused_for_a_model_without_one():
    assert check_segmenter("encoder", True) == "encoder" and check_segmenter("ensemble", False) == "ensemble"
    with pytest.raises(ConfigKeyError, match="'segmenter' encoder .* but 'condition_encoder' is false"):
        check_segmenter("encoder", False)
    assert check_segmenter("both", True) == "both"
    with pytest.raises(ConfigKeyError, match="'segmenter' both fuses the condition encoder's softmax .* but 'condition_encoder' is false"):
        check_segmenter("both", False)
    with pytest.raises(ConfigKeyError, match="'segmenter' must be one of 'ensemble', 'encoder', 'both'; got 'unet'"):
        check_segmenter("unet", True)


@pytest.mark.parametrize("name", ["DynUNet", "SegResNet"])
def test_other_monai_segmentation_networks_serve_as_the_encoder(name):
    from monai.networks import nets

    arguments = {"DynUNet": dict(kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[8, 8, 8]),
                 "SegResNet": dict(init_filters=4, blocks_down=[1, 1], blocks_up=[1], norm=("group", {"num_groups": 2}))}[name]
    factory = functools.partial(getattr(nets, name), spatial_dims=2, in_channels=IMAGE_CHANNELS, out_channels=NUM_CLASSES, **arguments)
    network = segmentation_diffusion_network(2, NUM_CLASSES + IMAGE_CHANNELS, NUM_CLASSES, condition_encoder=True, encoder=factory, **TINY_UNET)
    x, t = inputs()
    assert network(x, timesteps=t).shape == (2, NUM_CLASSES, 16, 16)
    assert network.last_encoder_logits.shape == (2, NUM_CLASSES, 16, 16)
    assert describe_encoder(factory)["_target_"].endswith(name)


# ---- decoder features at matching resolutions (encoder_features) ------------------------------------------------------
DEEP_UNET = dict(channels=[8, 8, 8], attention_levels=[False, False, False], num_res_blocks=1, num_head_channels=8,
                 norm_num_groups=4)  # three levels: skip connections at 1, 1/2 and 1/4 of the image size


def featured(spatial_dims=2, stop_gradient=False, encoder_features=True, seed=0):
    """A three-level diffusion UNet with a two-level MONAI UNet encoder (features at 1/2 and 1/4)."""
    torch.manual_seed(seed)
    encoder = functools.partial(UNet, spatial_dims=spatial_dims, in_channels=IMAGE_CHANNELS, out_channels=NUM_CLASSES,
                                channels=[8, 16, 16], strides=[2, 2], num_res_units=1)
    network = segmentation_diffusion_network(spatial_dims, NUM_CLASSES + IMAGE_CHANNELS, NUM_CLASSES, condition_encoder=True,
                                             encoder=encoder, encoder_stop_gradient=stop_gradient,
                                             encoder_features=encoder_features, **DEEP_UNET)
    with torch.no_grad():
        for p in network.diffusion.out.parameters():
            p.normal_(0, 0.1)
    return network


def test_encoder_features_map_every_skip_connection_to_a_feature_of_its_resolution():
    network = featured()
    # MONAI's order: input conv (1), level 0 res-block (1) and downsampler (1/2), level 1 (1/2, 1/4), level 2 (1/4), mid
    assert network._skip_layout() == [(8, 1), (8, 1), (8, 2), (8, 2), (8, 4), (8, 4), (8, 4)]
    assert set(network.feature_modules) == {1, 2, 4}
    image = torch.randn(2, IMAGE_CHANNELS, 16, 16)
    logits, features = network._run_encoder_with_features(image)
    for factor, feature in features.items():
        assert feature.shape[2:] == (16 // factor, 16 // factor)
        assert not (factor == 1 and feature is logits)  # the logits themselves are never a "feature"
    # the chosen module is the last of its size in the forward: at 1/4 the innermost skip block (encoder and decoder
    # features), not the downsampling convolution that first produced that size
    assert network.feature_modules[4] == "model.1.submodule.1"
    assert len(network.feature_projections) == 7 and all(p.kernel_size == (1, 1) for p in network.feature_projections.values())


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_encoder_features_start_as_an_exact_no_op_and_change_the_output_once_trained(spatial):
    with_features, without = featured(len(spatial)), featured(len(spatial), encoder_features=False)
    missing = without.load_state_dict(with_features.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith("feature_projections.") for k in missing.unexpected_keys)
    x, t = inputs(spatial)
    torch.testing.assert_close(with_features(x, timesteps=t), without(x, timesteps=t), rtol=0, atol=0)
    with torch.no_grad():
        for p in with_features.feature_projections.parameters():
            p.normal_(0, 0.1)
    assert (with_features(x, timesteps=t) - without(x, timesteps=t)).abs().max() > 1e-3


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_encoder_features_train_their_projections_and_respect_stop_gradient(stop_gradient):
    network = featured(stop_gradient=stop_gradient)
    with torch.no_grad():
        for p in network.feature_projections.parameters():
            p.normal_(0, 0.1)
    x, t = inputs()
    network(x, timesteps=t).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.feature_projections.parameters())
    reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.encoder.parameters())
    assert reached is not stop_gradient


def test_encoder_features_survive_copies_caching_and_export():
    network = featured()
    with torch.no_grad():
        for p in network.feature_projections.parameters():
            p.normal_(0, 0.1)
    network(*inputs())
    copied = copy.deepcopy(network)  # EMA: hooks live only within a forward, so the copy writes nowhere else
    assert not any(m._forward_hooks for m in network.encoder.modules())
    network.eval()
    copied.eval()
    x, t = inputs()
    with torch.no_grad():
        first = network(x, timesteps=t)
        torch.testing.assert_close(copied(x, timesteps=t), first)
        calls = []
        network.encoder.register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(network(x, timesteps=t + 1), network(x, timesteps=t + 1))
        assert len(calls) == 0  # the cache holds the features too: the encoder ran for `first` only
    program = export_network(copied, (x, t), spatial_multiple=4)
    assert max_abs_difference(program.module(), copied, inputs((20, 20), batch=3, seed=5)) < 1e-5


def test_encoder_features_are_refused_without_an_encoder_and_on_a_grid_the_encoder_cannot_match():
    with pytest.raises(ValueError, match="encoder_features true needs condition_encoder true"):
        segmentation_diffusion_network(2, 4, 3, condition_encoder=False, encoder_features=True, **TINY_UNET)
    network = featured()
    network.feature_modules[2] = network.feature_modules[4]  # a module that no longer gives the size it was chosen for
    with pytest.raises(ValueError, match=r"module 'model.1.submodule.1' gave \[1, 32, 4, 4\] .* expected a spatial size "
                                         r"of \[8, 8\] \(1/2 of the image\)"):
        network(torch.randn(1, NUM_CLASSES + IMAGE_CHANNELS, 16, 16), timesteps=torch.tensor([3]))
