"""Flow matching (SD3, FLUX) in the solver's (y, n) coordinates: alpha = 1 - t, sigma = t.

- DDIM in (y, n) on a flow grid is FlowMatchEulerDiscreteScheduler's Euler step, including the first
  step from t = 1 (n = inf), where the denoiser hands the solver x0_hat (solver.schedules.FlowSchedule).
- The classic rules keep their orders on a flow grid (Gaussian data, exact endpoint).
- The flow baselines are diffusers' own schedulers driven with the velocity.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from models.base import Conditioning, Denoiser
from solver.coefficients import RULES
from solver.policy import ConsistencyPolicy
from solver.registry import get_solver
from solver.sampling import iter_lmm, sample_lmm
from solver.schedules import FlowSchedule, schedule_family, schedule_from_config

SD3_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096, "mu": 0.83, "sigmas": "linear",
}


def velocity(x: torch.Tensor, t: torch.Tensor, c: float) -> torch.Tensor:
    """A smooth nonlinear stand-in for a flow network: v(x, t) per row, conditional on c."""
    s = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(x) * (1.0 + s) - 0.7 * x + c * torch.sin(3 * s)


class FakeFlowDenoiser(Denoiser):
    """A Denoiser whose network is :func:`velocity`; the condition is a scalar per row."""

    model_id = "fake-flow"
    device = torch.device("cpu")
    dtype = torch.float32
    size_multiple = 1
    default_size = (4, 4)

    def __init__(self, config):
        self.scheduler_config = dict(config)
        self.schedule = schedule_from_config(config)

    def latent_shape(self, height, width):
        return (2, height, width)

    def encode_prompts(self, prompts, negative_prompts=""):
        n = len(prompts)
        return Conditioning(cond=torch.ones(n, 1, 1), uncond=torch.zeros(n, 1, 1), prompts=list(prompts),
                            negative_prompts=[""] * n)

    def model_output(self, x, t, context, mask):
        t = torch.as_tensor(t).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        return velocity(x, t, 1.0) * context.reshape(-1, 1, 1, 1) + velocity(x, t, 0.0) * (1 - context.reshape(-1, 1, 1, 1))

    def decode(self, latents):
        return latents


def guided_velocity(x, t, guidance):
    vu, vc = velocity(x, t.expand(x.shape[0]), 0.0), velocity(x, t.expand(x.shape[0]), 1.0)
    return vu + guidance * (vc - vu)


def euler_reference(config, x_T, num_steps, guidance):
    """diffusers' FlowMatchEulerDiscreteScheduler loop, as the SD3 / FLUX pipelines run it."""
    schedule = FlowSchedule.from_config(config)
    scheduler = schedule.scheduler()
    scheduler.set_timesteps(**schedule.set_timesteps_kwargs(num_steps))
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(guided_velocity(x, t, guidance), t, x).prev_sample
    return x


@pytest.mark.parametrize("config", [SD3_CONFIG, FLUX_CONFIG], ids=["sd3-static-shift", "flux-dynamic-mu"])
@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_ddim_in_y_n_is_flow_match_euler(config, guidance):
    model = FakeFlowDenoiser(config)
    cond = model.encode_prompts(["a", "b"])
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    solver = get_solver("rule:ddim", model.scheduler_config)
    ours = solver.sample(lambda x, t: model.guided_eps(x, t, cond, guidance), x_T, 10)
    ref = euler_reference(config, x_T, 10, guidance)
    assert solver.grid(10).alpha[0] == 0.0  # these grids start at t = 1, n = inf
    assert (ours - ref).abs().max().item() < 1e-5


def test_the_first_step_from_t_1_is_the_euler_step_in_x():
    model = FakeFlowDenoiser(SD3_CONFIG)
    cond = model.encode_prompts(["a"])
    x_T = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    grid = model.schedule.grid(4)
    first = next(iter_lmm(lambda x, t: model.guided_eps(x, t, cond, 2.0), x_T, grid, RULES["ab2"](grid)))
    t0, t1 = grid.sigma[0].item(), grid.sigma[1].item()
    v0 = guided_velocity(x_T, grid.timesteps[0].float(), 2.0)
    assert t0 == 1.0
    assert torch.allclose(first.x, x_T + (t1 - t0) * v0, atol=1e-6)
    assert torch.allclose(first.denoised, x_T - v0, atol=1e-6)  # x0_hat = x - t v at t = 1
    # at t = 1 the denoiser returns x0_hat (eps = x there carries nothing), per row too
    out = model.guided_eps(x_T.repeat(2, 1, 1, 1), torch.tensor([1000.0, 500.0]), cond.select([0, 0]), 2.0)
    v_half = guided_velocity(x_T, torch.tensor(500.0), 2.0)
    assert torch.allclose(out[0], (x_T - v0)[0], atol=1e-6)
    assert torch.allclose(out[1], (x_T + 0.5 * v_half)[0], atol=1e-6)


def test_a_first_step_that_is_not_ddim_is_refused():
    grid = FlowSchedule.from_config(SD3_CONFIG).grid(3)
    table = RULES["ab2"](grid)
    table[0, 0] = 0.5  # a row 0 that does not sum to 1
    with pytest.raises(ValueError, match="step 0 from n = inf"):
        list(iter_lmm(lambda x, t: x, torch.zeros(1, 1), grid, table))


# --- orders on a Gaussian: x0 ~ N(0, s^2), so x(t) = x_T sqrt(s^2 (1 - t)^2 + t^2) from x_T at t = 1 --------
S2 = 0.5**2


def integrate(grid, table) -> float:
    """x at t = 0 from x_T = 1 at t = 1 with eq. 10 and the exact denoiser, in float64."""
    n, sigma = grid.n.tolist(), grid.sigma.tolist()
    eps0 = 1.0 / sigma[0]
    history, y = [eps0], 0.0 + n[1] * eps0  # x0_hat(x_T) = E[x0 | x_T] = 0 at t = 1
    for i, row in enumerate(table.tolist()[1:], start=1):
        history.insert(0, n[i] * y / (S2 + n[i] ** 2))
        y += (n[i + 1] - n[i]) * sum(w * e for w, e in zip(row, history))
    return y * grid.alpha[-1].item()


def fitted_order(rule, steps):
    errors = []
    for k in steps:
        grid = FlowSchedule.from_config(SD3_CONFIG).grid(k)
        errors.append(abs(integrate(grid, RULES[rule](grid)) - math.sqrt(S2)) / math.sqrt(S2))
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("rule, order", [("ddim", 1), ("ab1", 1), ("ab2", 2), ("dpm2m", 2)])
def test_rules_keep_their_order_on_a_flow_grid(rule, order):
    assert abs(fitted_order(rule, [16, 32, 64, 128]) - order) < 0.3


def test_ab3_is_at_least_second_order_on_a_flow_grid():
    assert fitted_order("ab3", [16, 32, 64, 128]) > 2 - 0.3


def test_the_float32_sampler_matches_the_float64_integration():
    grid = FlowSchedule.from_config(SD3_CONFIG).grid(8)
    table = RULES["ab2"](grid)

    def eps_fn(x, t):
        s = float(t) / 1000.0
        if s == 1.0:
            return torch.zeros_like(x)  # x0_hat
        alpha = 1.0 - s
        y, n = x / alpha, s / alpha
        return n * y / (S2 + n**2)

    x = sample_lmm(eps_fn, torch.ones(1), grid, table)
    assert abs(x.item() - integrate(grid, table)) < 1e-5


# --- baselines: diffusers' flow schedulers, driven with the velocity -----------------------------------
def flow_reference(scheduler, x_T, num_steps, guidance, **kwargs):
    scheduler.set_timesteps(num_steps, **kwargs)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(guided_velocity(x, t.float(), guidance), t, x).prev_sample
    return x


@pytest.mark.parametrize("config", [SD3_CONFIG, FLUX_CONFIG], ids=["sd3", "flux"])
@pytest.mark.parametrize("name", ["dpmpp2m", "unipc", "euler"])
def test_flow_baselines_are_diffusers_schedulers(config, name):
    model = FakeFlowDenoiser(config)
    cond = model.encode_prompts(["a", "b"])
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    ours = get_solver(name, model.scheduler_config).sample(lambda x, t: model.guided_eps(x, t, cond, 3.0), x_T, 6)
    dynamic = bool(config.get("use_dynamic_shifting"))
    mu = {"mu": config["mu"]} if dynamic else {}
    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, use_dynamic_shifting=dynamic,
                  solver_order=2)
    if name == "euler":
        ref = euler_reference(config, x_T, 6, 3.0)
    elif name == "dpmpp2m":
        ref = flow_reference(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common), x_T, 6, 3.0, **mu)
    else:
        ref = flow_reference(UniPCMultistepScheduler(**common), x_T, 6, 3.0, **mu)
    # the round trip v -> eps -> v at t = 0.999 costs float32 digits (x 1 / (1 - t))
    assert (ours - ref).abs().max().item() < 1e-4


def test_baselines_with_no_flow_version_are_refused():
    for name in ("deis", "plms"):
        with pytest.raises(ValueError, match="no flow-matching version"):
            get_solver(name, SD3_CONFIG)


def test_dpm2m_on_a_flow_model_is_the_eq10_dpm_solver_2_table():
    solver = get_solver("dpm2m", SD3_CONFIG)  # refine's full-step sampler
    grid = solver.grid(12)
    assert torch.equal(solver.table_fn(grid), RULES["dpm2m"](grid)) and grid.alpha[0] == 0.0


def test_a_dynamic_shift_config_without_mu_is_refused_naming_mu():
    config = {k: v for k, v in FLUX_CONFIG.items() if k != "mu"}
    with pytest.raises(ValueError, match="^mu: "):
        schedule_from_config(config)


def test_schedule_family_and_policy_refused_on_the_other_family(tmp_path):
    assert schedule_family(SD3_CONFIG) == "flow" and schedule_family(FLUX_CONFIG) == "flow"
    vp = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    assert schedule_family(vp) == "vp"
    policy = ConsistencyPolicy()
    policy.schedule_family = "vp"
    get_solver("consistency", vp, policy=policy)  # accepted on its own family
    with pytest.raises(ValueError, match="trained on a 'vp' schedule"):
        get_solver("consistency", SD3_CONFIG, policy=policy)
    ConsistencyPolicy(schedule_family="flow").save(tmp_path / "flow-policy")  # recorded in policy_config.json
    assert ConsistencyPolicy.load(tmp_path / "flow-policy").schedule_family == "flow"
    with pytest.raises(ValueError, match="trained on a 'flow' schedule and the model's schedule is 'vp'"):
        get_solver(f"consistency:{tmp_path / 'flow-policy'}", vp)
    grid = get_solver(f"consistency:{tmp_path / 'flow-policy'}", SD3_CONFIG).grid(4)
    assert grid.alpha[0] == 0.0 and FlowSchedule.from_config(SD3_CONFIG).grid(4).timesteps.equal(grid.timesteps)
    assert "schedule_family" not in ConsistencyPolicy().config_dict()  # unrecorded: accepted on either family


def test_training_rollouts_take_the_same_first_step_from_t_1():
    """training.rollout runs eq. 10 for R rollouts with their own tables; on a flow grid starting at
    t = 1 it takes the sampler's limit step there, so each rollout equals iter_lmm with its table."""
    from training.rollout import lmm_rollouts

    grid = FlowSchedule.from_config(SD3_CONFIG).grid(5)
    names = ["ddim", "ab2", "ab3", "dpm2m"]
    rows = [RULES[r](grid).float() for r in names]
    m = max(t.shape[1] for t in rows)
    tables = torch.stack([torch.nn.functional.pad(t, (0, m - t.shape[1])) for t in rows])
    x_T = torch.randn(len(names), 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def eps_fn(x, t, index=None):  # the Denoiser convention: x0_hat at t = 1, eps below
        s = float(t) / 1000.0
        x0 = torch.tanh(x) * 0.8 + 0.1 * torch.sin(x * (1.0 + s))
        return x0 if s >= 1.0 else (x - (1.0 - s) * x0) / s

    ours = lmm_rollouts(eps_fn, x_T, grid, tables)
    for r, name in enumerate(names):
        one = sample_lmm(eps_fn, x_T[r : r + 1], grid, rows[r])
        assert torch.allclose(ours[r : r + 1], one, atol=1e-5), name
    assert torch.isfinite(ours).all()
