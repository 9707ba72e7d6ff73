"""ConsistencySolverScheduler: same numbers as the pure sampler, diffusers contract, checkpoints, bad input."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from solver.coefficients import RULES
from solver.policy import ConsistencyPolicy
from solver.sampling import iter_lmm, sample_lmm
from solver.scheduler import ConsistencySolverScheduler
from solver.schedules import VPSchedule, schedule_from_config

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False}


def sd_pndm_config():
    """Stable Diffusion v1's scheduler config (PNDM-style)."""
    return PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1).config


ABAR = DDIMScheduler(**SD).alphas_cumprod.double()


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A dummy model: the exact denoiser of N(0, 0.25 I) data, made nonlinear in x."""
    abar = ABAR[int(t)]
    scale = float((1 - abar).sqrt() / (0.25 * abar + (1 - abar)))
    return scale * x * (1 + 0.1 * torch.tanh(x))


def perturbed_policy(order: int = 4, seed: int = 0) -> ConsistencyPolicy:
    torch.manual_seed(seed)  # the hidden layers' default init
    policy = ConsistencyPolicy(order=order)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return policy


def run(scheduler, noise: torch.Tensor, num_steps: int, model=toy_eps) -> list[torch.Tensor]:
    scheduler.set_timesteps(num_steps)
    x, states = noise * scheduler.init_noise_sigma, []
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        states.append(x)
    return states


@pytest.mark.parametrize("num_steps", [1, 3, 4, 8, 13])
def test_step_matches_iter_lmm_on_a_dummy_model(num_steps):
    policy = perturbed_policy()
    scheduler = ConsistencySolverScheduler(**SD, policy=policy)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(num_steps))
    ours = run(scheduler, noise, num_steps)
    grid = VPSchedule.from_config(scheduler.config).grid(num_steps)
    reference = [r.x for r in iter_lmm(toy_eps, noise, grid, policy.coefficient_table(grid))]
    assert torch.equal(scheduler.timesteps, grid.timesteps)
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) < 1e-5


def test_from_config_of_a_stable_diffusion_scheduler_is_the_base_rule():
    pndm = PNDMScheduler.from_config(sd_pndm_config())
    scheduler = ConsistencySolverScheduler.from_config(pndm.config)
    assert scheduler.config.set_alpha_to_one is False and scheduler.config.solver_order == 4
    assert torch.allclose(scheduler.alphas_cumprod, pndm.alphas_cumprod)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = VPSchedule.from_config(pndm.config).grid(6)
    assert float(grid.alpha[-1] ** 2) == pytest.approx(float(pndm.alphas_cumprod[0]))
    expected = sample_lmm(toy_eps, noise, grid, RULES["dpm2m"](grid))
    assert (run(scheduler, noise, 6)[-1] - expected).abs().max() < 1e-5
    assert DDIMScheduler.from_config(scheduler.config).config.beta_schedule == "scaled_linear"


def test_v_prediction_is_converted_at_its_own_timestep():
    policy = perturbed_policy()
    eps_scheduler = ConsistencySolverScheduler(**SD, policy=policy)
    v_scheduler = ConsistencySolverScheduler(**SD, prediction_type="v_prediction", policy=policy)
    abar = eps_scheduler.alphas_cumprod.double()

    def v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = abar[int(t)].sqrt(), (1 - abar[int(t)]).sqrt()
        eps = toy_eps(x, t).double()
        x0 = (x.double() - sigma * eps) / alpha
        return (alpha * eps - sigma * x0).float()

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = run(eps_scheduler, noise, 7)[-1]
    b = run(v_scheduler, noise, 7, model=v_model)[-1]
    assert (a - b).abs().max() < 1e-5


def test_save_load_round_trip_keeps_config_and_policy(tmp_path):
    scheduler = ConsistencySolverScheduler.from_config(sd_pndm_config(), solver_order=3, policy=perturbed_policy(3))
    scheduler.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert "policy" not in saved and saved["solver_order"] == 3
    assert (tmp_path / "scheduler" / "policy.safetensors").is_file()
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    public = lambda config: {k: v for k, v in config.items() if k != "_use_default_values"}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run(loaded, noise, 5)[-1], run(scheduler, noise, 5)[-1])
    assert not torch.equal(run(ConsistencySolverScheduler.from_config(scheduler.config), noise, 5)[-1], run(scheduler, noise, 5)[-1])


def test_a_checkpoint_of_another_order_is_refused(tmp_path):
    ConsistencySolverScheduler(**SD, solver_order=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**config, "solver_order": 3}))
    with pytest.raises(ValueError, match="order"):
        ConsistencySolverScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="solver_order"):
        ConsistencySolverScheduler(**SD, solver_order=3, policy=ConsistencyPolicy(order=4))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5])
def test_bad_step_counts_are_refused(steps):
    scheduler = ConsistencySolverScheduler(**SD)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)
    scheduler.set_timesteps(1000)
    assert len(scheduler.timesteps) == 1000


@pytest.mark.parametrize("order", [0, 9])
def test_order_outside_1_to_8_is_refused(order):
    with pytest.raises(ValueError, match="order"):
        ConsistencySolverScheduler(**SD, solver_order=order)


def test_unknown_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_from_config({"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="beta_schedule"):
        ConsistencySolverScheduler(beta_schedule="cosine-ish")
    with pytest.raises(ValueError, match="flow-matching"):
        ConsistencySolverScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_nan_in_model_output_is_refused():
    scheduler = ConsistencySolverScheduler(**SD)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    bad = torch.zeros_like(x)
    bad[0, 1, 2, 3] = float("nan")
    x = scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(bad, scheduler.timesteps[1], x)
    v = ConsistencySolverScheduler(**SD, prediction_type="v_prediction")
    v.set_timesteps(4)
    with pytest.raises(ValueError, match="model_output"):
        v.step(bad, v.timesteps[0], x)
    with pytest.raises(ValueError, match="model_output"):
        sample_lmm(lambda x, t: bad, x, VPSchedule.from_config(SD).grid(3), RULES["ab2"](VPSchedule.from_config(SD).grid(3)))


def test_step_contract_errors():
    scheduler = ConsistencySolverScheduler(**SD)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep 500"):
        scheduler.step(x, 500, x)
    with pytest.raises(ValueError, match="must start at 999"):
        scheduler.step(x, 499, x)
    x = scheduler.step(x, 999, x, return_dict=False)[0]
    x = scheduler.step(x, 499, x).prev_sample
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.step(x, 499, x)


def test_add_noise_and_scale_model_input_match_ddim():
    ddim = DDIMScheduler(**SD)
    scheduler = ConsistencySolverScheduler(**SD)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    assert torch.allclose(scheduler.add_noise(x0, noise, t), ddim.add_noise(x0, noise, t), atol=1e-6)
    assert torch.equal(scheduler.scale_model_input(x0, 10), x0)


def test_half_precision_state_is_stepped_in_float32():
    """Each fp16 step is the float32 step of the same (upcast) inputs, rounded once to fp16: within one
    fp16 ulp. Arithmetic in fp16 rounds every product and partial sum and lands several ulps away."""
    scheduler = ConsistencySolverScheduler(**SD, policy=perturbed_policy())
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    full = run(scheduler, noise, 4)[-1]
    half = run(scheduler, noise.half(), 4, model=lambda x, t: toy_eps(x.float(), t).half())[-1]
    assert half.dtype == torch.float16 and (half.float() - full).abs().max() < 2e-2
    reference = ConsistencySolverScheduler(**SD, policy=perturbed_policy())
    scheduler.set_timesteps(4)
    reference.set_timesteps(4)
    x = noise.half()
    for t in scheduler.timesteps:
        eps = toy_eps(x.float(), t).half()
        out = scheduler.step(eps, t, x).prev_sample
        exact = reference.step(eps.float(), t, x.float()).prev_sample  # the same inputs, float32 throughout
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 11)  # fp16 spacing at |exact|
        assert out.dtype == torch.float16 and ((out.float() - exact).abs() <= ulp).all(), int(t)
        x = out


def test_scheduler_output_is_independent_of_batch_size_and_order():
    scheduler = ConsistencySolverScheduler(**SD, policy=perturbed_policy())
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    batch = run(scheduler, noise, 6)[-1]
    alone = torch.cat([run(scheduler, noise[i : i + 1], 6)[-1] for i in range(4)])
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(batch, alone)
    assert torch.equal(batch[order], run(scheduler, noise[order], 6)[-1])
