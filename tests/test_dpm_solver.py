"""DPM-Solver++ 2M (segdiff.engine.DPMSolverScheduler) and every sampler of build_scheduler in the engine.

The analytic case: for data x0 ~ N(MU, S^2) the noisy marginal at timestep t is N(alpha_t MU, alpha_t^2 S^2 +
sigma_t^2) and the exact noise predictor is eps(x_t, t) = sigma_t (x_t - alpha_t MU) / (alpha_t^2 S^2 + sigma_t^2).
With that oracle as the network, a sampler's output distribution shows its own error only. Measured here (20000
values, seed 0, the bundles' linear schedule 1e-4..0.02 over 1000 steps; std of the samples / S, mean):

    dpm_solver, 10 steps, logsnr spacing (default)            0.996   mean 0.297   (epsilon, v and sample alike)
    dpm_solver, 10 steps, time_uniform spacing                0.498   mean 0.299
    ddim, 10 steps, as ConditionalDiffusionSampler runs it    0.526   mean 0.298
    ddpm, 1000 steps                                          0.983   mean 0.299

(dpm_solver 5 / 20 / 50 steps: 0.720 / 1.014 / 1.004; ddim 5 / 20 / 50 steps: 0.310 / 0.729 / 0.885.)

The same data as a rectified flow (x_t = (1 - t/T) x0 + (t/T) noise, the exact velocity E[x0 - noise | x_t] as the
network), sampled by ``euler`` (MONAI's RFlowScheduler) in the engine: std ratio 0.572 / 0.774 / 0.923 / 0.979 at
5 / 10 / 30 / 100 steps, mean 0.298: first order, and the straight-line coupling of noise and narrow data is curved.
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import RFlowScheduler

from segdiff.engine import ConditionalDiffusionSampler, DPMSolverScheduler, build_scheduler
from segdiff.errors import ConfigKeyError

MU, S = 0.3, 0.2
#: the bundles' noise schedule (their noise_schedule key)
LINEAR = dict(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


class GaussianOracle(torch.nn.Module):
    """The exact network for data N(MU, S^2) under the schedule ``alphas_cumprod``, as an epsilon, v or x0 output."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.double())
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the sampler reads the device off the parameters
        self.prediction_type = prediction_type
        self.timesteps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        self.timesteps.append(timesteps.clone())
        abar = self.abar[timesteps.long()].view(-1, *[1] * (x.ndim - 1))
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x = x.double()
        eps = sigma * (x - alpha * MU) / (alpha**2 * S**2 + sigma**2)
        x0 = (x - sigma * eps) / alpha
        out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[self.prediction_type]
        return out.float()


def scheduler_for(name: str, prediction_type: str = "epsilon", **kwargs):
    diffusion = "rflow" if name == "euler" else "ddpm"
    return build_scheduler(name, **{**LINEAR, "prediction_type": prediction_type, "diffusion": diffusion, **kwargs})


def oracle_samples(name: str, steps: int, prediction_type: str = "epsilon", **kwargs) -> torch.Tensor:
    """20000 samples (one 100 x 200 unconditional 'image') drawn by the engine with the Gaussian oracle."""
    scheduler = scheduler_for(name, prediction_type, **kwargs)
    network = GaussianOracle(scheduler.alphas_cumprod, prediction_type)
    sampler = ConditionalDiffusionSampler(
        scheduler, num_inference_steps=steps, conditional=False, progress=False, seed=0
    )
    return sampler(torch.zeros(1, 0, 100, 200), network)


def std_ratio(x: torch.Tensor) -> float:
    return x.std().item() / S


# ---- the analytic case ---------------------------------------------------------------------------------------------
#: measured std ratios (samples' std / S) of the two baselines, as the engine runs them
DDIM_10, DDPM_1000 = 0.526, 0.983


def test_dpm_solver_10_steps_reaches_the_gaussian_datas_mean_and_std():
    x = oracle_samples("dpm_solver", 10)
    assert x.mean().item() == pytest.approx(MU, rel=0.03)
    assert std_ratio(x) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_dpm_solver_gives_the_same_samples_for_v_and_x0_networks(prediction_type):
    reference = oracle_samples("dpm_solver", 10, "epsilon")
    assert torch.allclose(oracle_samples("dpm_solver", 10, prediction_type), reference, atol=1e-4)


def test_time_uniform_spacing_falls_short_at_10_steps():
    # the last evaluated timestep is 100 (abar 0.90), whose x0 prediction (the posterior mean) halves the std: log-SNR
    # spacing is what makes 10 steps enough
    assert std_ratio(oracle_samples("dpm_solver", 10, timestep_spacing="time_uniform")) == pytest.approx(0.50, abs=0.03)


def test_ddim_10_as_the_engine_runs_it_falls_short_and_ddpm_1000_does_not():
    assert std_ratio(oracle_samples("ddim", 10)) == pytest.approx(DDIM_10, abs=0.03)
    assert std_ratio(oracle_samples("ddpm", 1000)) == pytest.approx(DDPM_1000, abs=0.02)


class FlowOracle(torch.nn.Module):
    """The exact rectified-flow velocity E[x0 - noise | x_t] for data N(MU, S^2), x_t = (1 - t/T) x0 + (t/T) noise."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        tau = (timesteps.double() / self.num_train_timesteps).view(-1, *[1] * (x.ndim - 1))
        centred = x.double() - (1 - tau) * MU
        var = (1 - tau) ** 2 * S**2 + tau**2
        return (MU + (1 - tau) * S**2 * centred / var - tau * centred / var).float()


def test_euler_converges_to_the_gaussian_data_with_the_step_count():
    # pins the engine's use of RFlowScheduler: velocity sign, timesteps, and the next timestep passed to step()
    def ratio(steps):
        sampler = ConditionalDiffusionSampler(
            scheduler_for("euler"), num_inference_steps=steps, conditional=False, progress=False, seed=0
        )
        return std_ratio(sampler(torch.zeros(1, 0, 100, 200), FlowOracle()))

    assert ratio(10) == pytest.approx(0.774, abs=0.02)
    assert ratio(100) == pytest.approx(1.0, abs=0.03)


def test_diffusion_inferer_runs_the_solver_as_the_engine_does():
    # MONAI's DiffusionInferer walks scheduler.timesteps and calls step(output, t, x): the scheduler is MONAI-shaped
    scheduler = scheduler_for("dpm_solver")
    scheduler.set_timesteps(10)
    noise = torch.randn((1, 1, 100, 200), generator=torch.Generator().manual_seed(0))
    network = GaussianOracle(scheduler.alphas_cumprod)
    out = DiffusionInferer(scheduler).sample(noise, network, scheduler=scheduler, verbose=False)
    assert torch.allclose(out, oracle_samples("dpm_solver", 10), atol=1e-5)
    assert [int(t) for t in network.timesteps] == scheduler.timesteps.tolist()


# ---- the scheduler ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["logsnr", "time_uniform"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 200, 999])
def test_timesteps_are_strictly_decreasing_integers_in_range_with_the_requested_count(spacing, steps):
    scheduler = DPMSolverScheduler(**LINEAR, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps
    assert t.dtype == torch.int64
    assert len(t) == steps
    assert int(t[0]) == 999
    assert int(t.min()) >= 0
    assert bool((t[1:] < t[:-1]).all())


def test_logsnr_timesteps_are_uniform_in_log_snr_up_to_rounding():
    scheduler = DPMSolverScheduler(**LINEAR)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [999, 898, 785, 653, 492, 302, 138, 52, 17, 4]


def test_steps_offset_shifts_the_timesteps_up_as_in_monais_ddim():
    plain, shifted = DPMSolverScheduler(**LINEAR), DPMSolverScheduler(**LINEAR, steps_offset=1)
    plain.set_timesteps(10)
    shifted.set_timesteps(10)
    assert int(shifted.timesteps[0]) == 999
    assert bool((shifted.timesteps >= plain.timesteps).all()) and int(shifted.timesteps.min()) >= 1


def test_step_before_set_timesteps_is_refused():
    scheduler = DPMSolverScheduler(**LINEAR)
    with pytest.raises(RuntimeError, match=r"call set_timesteps\(num_inference_steps\) first"):
        scheduler.step(torch.zeros(2, 1, 4, 4), 999, torch.zeros(2, 1, 4, 4))


def test_a_timestep_off_the_grid_is_refused():
    scheduler = DPMSolverScheduler(**LINEAR)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 500 is not one of the timesteps set by set_timesteps"):
        scheduler.step(torch.zeros(1, 1, 4, 4), 500, torch.zeros(1, 1, 4, 4))


def test_too_many_steps_are_refused():
    with pytest.raises(ValueError, match=r"num_inference_steps must lie in \[1, 999\].*got 1000"):
        DPMSolverScheduler(**LINEAR).set_timesteps(1000)


def test_unknown_timestep_spacing_is_refused_naming_the_key():
    message = r"'timestep_spacing' must be one of 'logsnr', 'time_uniform'; got 'karras'"
    with pytest.raises(ValueError, match=message):
        DPMSolverScheduler(**LINEAR, timestep_spacing="karras")
    with pytest.raises(ConfigKeyError, match=message):
        scheduler_for("dpm_solver", timestep_spacing="karras")
    with pytest.raises(ConfigKeyError, match=message):  # checked whichever sampler a config names
        scheduler_for("ddim", timestep_spacing="karras")


def test_unknown_prediction_type_is_refused_naming_the_key():
    message = r"'prediction_type' must be one of 'epsilon', 'v_prediction', 'sample'; got 'x0'"
    with pytest.raises(ValueError, match=message):
        DPMSolverScheduler(**LINEAR, prediction_type="x0")


def test_first_step_is_a_ddim_step():
    scheduler = DPMSolverScheduler(**LINEAR, clip_sample=False)
    scheduler.set_timesteps(10)
    s, t = (int(v) for v in scheduler.timesteps[:2])
    abar_s, abar_t = scheduler.alphas_cumprod[s].double(), scheduler.alphas_cumprod[t].double()
    x, eps = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    x0 = (x - (1 - abar_s).sqrt() * eps) / abar_s.sqrt()
    ddim = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps
    out, predicted = scheduler.step(eps, s, x)
    assert torch.allclose(predicted, x0)
    assert torch.allclose(out, ddim)


def test_second_step_uses_the_previous_x0_and_set_timesteps_forgets_it():
    scheduler = DPMSolverScheduler(**LINEAR, clip_sample=False)
    network = GaussianOracle(scheduler.alphas_cumprod)

    def two_steps(first_x0_changed: bool):
        scheduler.set_timesteps(10)
        x = torch.ones(1, 1, 2, 2)
        t0, t1 = (int(v) for v in scheduler.timesteps[:2])
        x, _ = scheduler.step(network(x, torch.tensor([t0])) + (0.5 if first_x0_changed else 0.0), t0, x)
        return scheduler.step(network(x, torch.tensor([t1])), t1, torch.ones(1, 1, 2, 2))[0]

    # the second step's input is the same in both runs; only the remembered x0 differs
    assert not torch.allclose(two_steps(False), two_steps(True))
    assert torch.equal(two_steps(False), two_steps(False))


def test_final_step_lands_on_the_x0_prediction():
    scheduler = DPMSolverScheduler(**LINEAR)
    scheduler.set_timesteps(10)
    last = int(scheduler.timesteps[-1])
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4) * 0.01
    out, predicted = scheduler.step(eps, last, x)  # a first step: no previous x0 is needed here either
    assert torch.allclose(out, predicted)


def test_final_step_without_alpha_one_lands_on_the_first_training_timestep():
    scheduler = DPMSolverScheduler(**LINEAR, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(10)
    last = int(scheduler.timesteps[-1])
    x, eps = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    abar_s, abar_0 = scheduler.alphas_cumprod[last].double(), scheduler.alphas_cumprod[0].double()
    x0 = (x - (1 - abar_s).sqrt() * eps) / abar_s.sqrt()
    out, _ = scheduler.step(eps, last, x)
    assert torch.allclose(out, abar_0.sqrt() * x0 + (1 - abar_0).sqrt() * eps)


# ---- every sampler in the engine ------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Wraps a network and records the timesteps it is called with."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.timesteps: list[torch.Tensor] = []

    def forward(self, x, timesteps):
        self.timesteps.append(timesteps.clone())
        return self.network(x, timesteps=timesteps)


def test_build_scheduler_returns_the_solver_and_monais_rflow():
    solver = scheduler_for("dpm_solver", "v_prediction", clip_sample=False, timestep_spacing="time_uniform")
    assert type(solver) is DPMSolverScheduler
    assert (solver.prediction_type, solver.clip_sample) == ("v_prediction", False)
    assert solver.timestep_spacing == "time_uniform"
    assert solver.betas[-1].item() == pytest.approx(0.02)
    assert scheduler_for("dpm_solver").timestep_spacing == "logsnr"
    flow = scheduler_for("euler", num_train_timesteps=500)
    assert type(flow) is RFlowScheduler
    assert flow.num_train_timesteps == 500


@pytest.mark.parametrize("name", ["dpm_solver", "euler"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["conditional", "strength", "unconditional"])
def test_sampler_runs_end_to_end_with_a_tiny_unet(tiny_unet, name, spatial_dims, mode):
    conditional = mode != "unconditional"
    network = Recorder(tiny_unet(in_channels=1 + (2 if conditional else 0), out_channels=1, spatial_dims=spatial_dims))
    scheduler = scheduler_for(name)
    strength = 0.5 if mode == "strength" else 1.0
    sampler = ConditionalDiffusionSampler(
        scheduler,
        num_inference_steps=6,
        spatial_dims=spatial_dims,
        image_size=(8,) * spatial_dims,
        num_samples=2,
        strength=strength,
        conditional=conditional,
        progress=False,
    )
    shape = (10, 9, 7) if spatial_dims == 3 else (10, 9)
    condition = torch.rand(1, 2 if conditional else 0, *shape)
    initial = torch.rand(1, 1, *shape) if mode == "strength" else None
    out = sampler(condition, network, initial=initial)
    assert out.shape == (1, 2, *shape)
    assert torch.isfinite(out).all()
    scheduler.set_timesteps(6)  # the scheduler's own timesteps (no DDIM override), those below the start only
    expected = [int(t) for t in scheduler.timesteps if strength == 1.0 or t <= round(strength * 999)]
    assert len(expected) == (3 if mode == "strength" else 6)
    assert [int(t[0]) for t in network.timesteps] == expected
    assert all(t.dtype == torch.int64 and t.shape == (2,) for t in network.timesteps)


def test_euler_passes_continuous_timesteps_to_the_network_as_floats():
    network = GaussianOracle(torch.linspace(0.999, 0.001, 1001))  # only records the timesteps here
    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
    sampler = ConditionalDiffusionSampler(scheduler, num_inference_steps=3, conditional=False, progress=False)
    sampler(torch.zeros(1, 0, 4, 4), network)
    assert [t.dtype for t in network.timesteps] == [torch.float32] * 3
    assert [round(float(t[0]), 2) for t in network.timesteps] == [1000.0, 666.5, 333.25]


def test_a_strength_below_the_lowest_timestep_is_refused():
    # RFlow's 10 timesteps are 1000, 900, ..., 100: strength 0.05 (timestep 50) has none to run
    sampler = ConditionalDiffusionSampler(scheduler_for("euler"), num_inference_steps=10, strength=0.05, progress=False)
    with pytest.raises(ValueError, match=r"strength 0.05 starts at timestep 50, below the lowest .* \(100\)"):
        sampler(torch.zeros(1, 2, 8, 8), FlowOracle(), initial=torch.zeros(1, 1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["dpm_solver", "euler"])
def test_sampler_runs_on_cuda_with_autocast(tiny_unet, name):
    network = tiny_unet(in_channels=1 + 2, out_channels=1).cuda()
    sampler = ConditionalDiffusionSampler(
        scheduler_for(name), num_inference_steps=6, image_size=(8, 8), strength=0.5, amp=True, progress=False
    )
    out = sampler(torch.rand(1, 2, 10, 9), network, initial=torch.rand(1, 1, 10, 9))
    assert out.shape == (1, 1, 10, 9) and torch.isfinite(out).all()
