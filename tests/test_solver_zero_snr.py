"""Zero terminal SNR (``rescale_betas_zero_snr=True``): a v-prediction model's eq.-10 solvers start at
alpha = 0 and take the limit step there from x0_hat (``VPSchedule.from_config``, ``Denoiser.solver_output``),
never NaN; DDIM then equals diffusers' DDIMScheduler (which steps from alpha = 0 exactly) to float32
rounding, and DPM-Solver-2 agrees with DPMSolverMultistepScheduler (which starts at abar = 2^-24, so the two
differ by O(2^-12) at the first step). An epsilon-prediction model, which holds no x0 at alpha = 0, starts at
abar = 2^-24 as diffusers' multistep solvers do."""

from __future__ import annotations

import pytest
import torch

from solver.coefficients import RULES
from solver.outputs import start_denoised, to_epsilon
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

    def eps_fn(x, t):  # what models.base.Denoiser.guided_eps hands the solver: x0_hat at alpha = 0, else eps
        alpha, sigma = schedule.alpha_sigma(int(t))
        if float(alpha) == 0.0:
            return start_denoised(v_model(x, t), x, "v_prediction")
        return to_epsilon(v_model(x, t), x, float(alpha), float(sigma), "v_prediction")

    return v_model, eps_fn, torch.randn(2, 3, 8, 8, generator=g)


def test_zero_snr_schedule_starts_at_alpha_zero_for_v_and_at_2_24_for_epsilon():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert float(DDIMScheduler.from_config(CONFIG).alphas_cumprod[-1]) == 0.0  # the raw schedule: n = inf
    grid = VPSchedule.from_config(CONFIG).grid(4)
    assert int(grid.timesteps[0]) == 999 and float(grid.alpha[0]) == 0.0 and bool(torch.isfinite(grid.n[1:]).all())
    eps_config = {**CONFIG, "prediction_type": "epsilon"}
    assert float(VPSchedule.from_config(eps_config).alphas_cumprod[-1]) == ZERO_SNR_ABAR
    assert float(DPMSolverMultistepScheduler.from_config(eps_config).alphas_cumprod[-1]) == ZERO_SNR_ABAR
    assert bool(torch.isfinite(VPSchedule.from_config(eps_config).grid(4).n).all())


@pytest.mark.parametrize("name", [*(f"rule:{r}" for r in RULES), "consistency"])
def test_every_eq10_solver_is_finite_on_a_zero_snr_config(name):
    _, eps_fn, noise = _model()
    for steps in (1, 3, 6):
        policy = ConsistencyPolicy() if name == "consistency" else None
        x = get_solver(name, CONFIG, policy=policy).sample(eps_fn, noise, steps)
        assert bool(torch.isfinite(x).all()), (name, steps)


@pytest.mark.parametrize("steps", [4, 5, 8])  # not 3: DDIMScheduler steps 666 -> 333, off the trailing grid's 332
def test_zero_snr_ddim_matches_diffusers_ddim_from_alpha_zero(steps):
    from diffusers import DDIMScheduler

    v_model, eps_fn, noise = _model()
    ddim = DDIMScheduler.from_config(CONFIG, clip_sample=False)
    ddim.set_timesteps(steps)
    x = noise.clone()
    for t in ddim.timesteps:
        x = ddim.step(v_model(x, t), t, x).prev_sample
    ours = get_solver("rule:ddim", CONFIG).sample(eps_fn, noise, steps)
    assert bool(torch.isfinite(x).all())
    assert float((ours - x).abs().max()) < 1e-4


@pytest.mark.parametrize("steps", [3, 5, 8])
def test_zero_snr_dpm2_matches_diffusers_dpm_solver_on_an_epsilon_model(steps):
    """An epsilon-prediction model starts at abar = 2^-24 like DPMSolverMultistepScheduler, and matches it.
    (On a v-prediction model ours takes the exact limit from alpha = 0, where DPM-Solver-2's second-order
    correction vanishes; diffusers' starts at 2^-24 and keeps it, so the two are not compared there.)"""
    from diffusers import DPMSolverMultistepScheduler

    v_model, _, noise = _model()
    config = {**CONFIG, "prediction_type": "epsilon"}
    schedule = VPSchedule.from_config(config)

    def eps_model(x, t):  # an epsilon "network": the same smooth field, read as eps on this schedule
        alpha, sigma = schedule.alpha_sigma(int(t))
        return to_epsilon(v_model(x, t), x, float(alpha), float(sigma), "v_prediction")

    dpm = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver", solver_order=2,
                                                  final_sigmas_type="sigma_min")
    dpm.set_timesteps(steps)
    x = noise.clone()
    for t in dpm.timesteps:
        x = dpm.step(eps_model(x, t), t, x).prev_sample
    ours = get_solver("rule:dpm2m", config).sample(eps_model, noise, steps)
    assert float((ours - x).abs().max()) < 1e-3


def test_a_zero_snr_model_previews_ddim_exactly_as_diffusers(tmp_path):
    """The bar, end to end: a tiny v-prediction SD whose scheduler config has rescale_betas_zero_snr=True,
    previewed through the app's path (Denoiser.guided_eps -> the registry's DDIM rule) equals DDIMScheduler
    driven by the same UNet, guidance and latents, within 1e-4."""
    import json

    from diffusers import DDIMScheduler
    from tiny_sd import save_tiny_sd

    from models.registry import load_model

    folder = save_tiny_sd(tmp_path / "sd", prediction_type="v_prediction")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    model = load_model(str(folder), device="cpu")
    cond = model.encode_prompts(["a red cat", "a dog"], "")
    x_T = torch.randn(2, *model.latent_shape(*model.default_size), generator=torch.Generator().manual_seed(1))
    guidance = 4.0
    ours = get_solver("rule:ddim", model.scheduler_config).sample(
        lambda x, t: model.guided_eps(x, t, cond, guidance), x_T, 5)
    ddim = DDIMScheduler.from_config(model.scheduler_config, clip_sample=False)
    ddim.set_timesteps(5)
    x = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            v_u, v_c = model.model_output(torch.cat([x, x]), t, torch.cat([cond.uncond, cond.cond]), None).chunk(2)
            x = ddim.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
    assert bool(torch.isfinite(ours).all()) and float((ours - x).abs().max()) < 1e-4
