"""Zero terminal SNR (``rescale_betas_zero_snr=True``): the eq.-10 solvers start where diffusers' multistep
solvers start (abar_{T-1} = 2^-24, see ``VPSchedule.from_config``), never NaN, and agree with diffusers'
DDIMScheduler (which steps from alpha = 0 exactly) and DPMSolverMultistepScheduler on the same config.

Tolerances: the first step differs from the alpha = 0 limit by O(alpha_0) = O(2^-12) relative, and a
float32 epsilon at alpha_0 carries the data prediction only to ulp(x) / alpha_0 ~ 2^-12 relative, so the
agreement is ~1e-3 on unit-scale states, not 1e-6 (measured: DDIM 1.8e-3 at K = 3, 4.7e-4 at K = 5;
DPM-Solver-2 3.8e-4 at K = 3, 1.0e-4 at K = 8)."""

from __future__ import annotations

import pytest
import torch

from solver.coefficients import RULES
from solver.outputs import to_epsilon
from solver.policy import ConsistencyPolicy
from solver.registry import get_solver
from solver.schedules import ZERO_SNR_ABAR, VPSchedule

CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
              set_alpha_to_one=False)


def _model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g) * 0.5
    x0 = torch.randn(2, 3, 8, 8, generator=g) * 0.5
    schedule = VPSchedule.from_config(CONFIG)

    def v_model(x, t):  # a smooth v-prediction "network"
        tt = float(t) / 1000
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 - tt) + x0 * tt - 0.3 * x

    def eps_fn(x, t):  # what models.base.Denoiser.guided_eps hands the solver
        alpha, sigma = schedule.alpha_sigma(int(t))
        return to_epsilon(v_model(x, t), x, float(alpha), float(sigma), "v_prediction")

    return v_model, eps_fn, torch.randn(2, 3, 8, 8, generator=g)


def test_zero_snr_schedule_starts_where_diffusers_multistep_solvers_start():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert float(DDIMScheduler.from_config(CONFIG).alphas_cumprod[-1]) == 0.0  # the raw schedule: n = inf
    schedule = VPSchedule.from_config(CONFIG)
    assert float(schedule.alphas_cumprod[-1]) == ZERO_SNR_ABAR
    assert float(DPMSolverMultistepScheduler.from_config(CONFIG).alphas_cumprod[-1]) == ZERO_SNR_ABAR
    grid = schedule.grid(4)
    assert int(grid.timesteps[0]) == 999 and bool(torch.isfinite(grid.n).all())


@pytest.mark.parametrize("name", [*(f"rule:{r}" for r in RULES), "consistency"])
def test_every_eq10_solver_is_finite_on_a_zero_snr_config(name):
    _, eps_fn, noise = _model()
    for steps in (1, 3, 6):
        policy = ConsistencyPolicy() if name == "consistency" else None
        x = get_solver(name, CONFIG, policy=policy).sample(eps_fn, noise, steps)
        assert bool(torch.isfinite(x).all()), (name, steps)


@pytest.mark.parametrize("steps, tol", [(3, 4e-3), (5, 2e-3), (8, 2e-3)])
def test_zero_snr_ddim_matches_diffusers_ddim_from_alpha_zero(steps, tol):
    from diffusers import DDIMScheduler

    v_model, eps_fn, noise = _model()
    ddim = DDIMScheduler.from_config(CONFIG, clip_sample=False)
    ddim.set_timesteps(steps)
    x = noise.clone()
    for t in ddim.timesteps:
        x = ddim.step(v_model(x, t), t, x).prev_sample
    ours = get_solver("rule:ddim", CONFIG).sample(eps_fn, noise, steps)
    assert bool(torch.isfinite(x).all())
    assert float((ours - x).abs().max()) < tol


@pytest.mark.parametrize("steps", [3, 5, 8])
def test_zero_snr_dpm2_matches_diffusers_dpm_solver(steps):
    from diffusers import DPMSolverMultistepScheduler

    _, eps_fn, noise = _model()
    dpm = DPMSolverMultistepScheduler.from_config(CONFIG, algorithm_type="dpmsolver", solver_order=2,
                                                  prediction_type="epsilon", final_sigmas_type="sigma_min")
    dpm.set_timesteps(steps)
    x = noise.clone()
    for t in dpm.timesteps:
        x = dpm.step(eps_fn(x, t), t, x).prev_sample
    ours = get_solver("rule:dpm2m", CONFIG).sample(eps_fn, noise, steps)
    assert float((ours - x).abs().max()) < 1e-3
