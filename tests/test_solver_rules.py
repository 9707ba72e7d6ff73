"""The classic coefficient rules against diffusers' own schedulers, and their basic algebra."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from solver.coefficients import RULES, adams_bashforth_table, ddim_table, dpm_solver_2m_table
from solver.lmm import lmm_step
from solver.sampling import iter_lmm, sample_lmm
from solver.schedules import TimeGrid, VPSchedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def replay(eps_seq: torch.Tensor):
    """An eps_fn returning a fixed random epsilon sequence, one entry per call."""
    calls = iter(eps_seq)
    return lambda x, t: next(calls)


def random_denoiser(alphas_cumprod: torch.Tensor, x0_seq: torch.Tensor):
    """An eps_fn whose x0 guess at call i is the random x0_seq[i]: eps = (x - alpha_t x0) / sigma_t.

    Random epsilon sequences with the structure of a real model's (eps ~ x_T at high noise), so the
    states keep the scale of real latents.
    """
    calls = iter(x0_seq)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod[int(t)].double()
        return ((x.double() - abar.sqrt() * next(calls)) / (1 - abar).sqrt()).float()

    return eps_fn


def run_diffusers(scheduler, eps_fn, x_T: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    scheduler.set_timesteps(num_steps)
    x, states = x_T, []
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t), t, x).prev_sample
        states.append(x)
    return states


def max_diff(ours: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert len(ours) == len(expected)
    return max((a - b).abs().max().item() for a, b in zip(ours, expected))


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("num_steps", [1, 4, 5, 10, 50])
def test_ddim_rule_equals_diffusers_ddim(num_steps, set_alpha_to_one):
    scheduler = DDIMScheduler(**SD, set_alpha_to_one=set_alpha_to_one, timestep_spacing="trailing", clip_sample=False)
    grid = VPSchedule.from_config(scheduler.config).grid(num_steps)
    g = torch.Generator().manual_seed(num_steps)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    x0_seq = 0.5 * torch.randn(num_steps, 2, 4, 8, 8, generator=g)
    eps_fn = random_denoiser(scheduler.alphas_cumprod, x0_seq)
    expected = run_diffusers(scheduler, random_denoiser(scheduler.alphas_cumprod, x0_seq), x_T, num_steps)
    ours = [r.x for r in iter_lmm(eps_fn, x_T, grid, ddim_table(grid))]
    assert torch.equal(grid.timesteps, scheduler.timesteps)
    assert max_diff(ours, expected) < 1e-5


def test_ddim_rule_equals_diffusers_ddim_on_a_replayed_random_eps_sequence():
    # i.i.d. N(0, 1) eps ignore x, so states grow to |x| ~ 60; compare at float32 resolution of that scale.
    num_steps = 10
    scheduler = DDIMScheduler(**SD, set_alpha_to_one=False, timestep_spacing="trailing", clip_sample=False)
    grid = VPSchedule.from_config(scheduler.config).grid(num_steps)
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    eps_seq = torch.randn(num_steps, 2, 4, 8, 8, generator=g)
    expected = run_diffusers(scheduler, replay(eps_seq), x_T, num_steps)
    ours = [r.x for r in iter_lmm(replay(eps_seq), x_T, grid, ddim_table(grid))]
    scale = max(1.0, max(x.abs().max().item() for x in expected))
    assert max_diff(ours, expected) < 1e-5 * scale


def test_next_timestep_is_read_from_the_grid():
    # Trailing spacing with K = 6 gives 999, 832, 666, ...; "t - 1000 // K" would land on 833 (paper.md N1).
    grid = VPSchedule.from_config(DDIMScheduler(**SD).config).grid(6)
    c = 0.3  # constant eps: every rule integrates it exactly, y_{i+1} = y_0 + (n_{i+1} - n_0) c
    seen = []
    x_T = torch.randn(3, 5)
    for record in iter_lmm(lambda x, t: seen.append(int(t)) or torch.full_like(x, c), x_T, grid, RULES["ab3"](grid)):
        i = record.i
        y_expected = x_T.double() / grid.alpha[0] + (grid.n[i + 1] - grid.n[0]) * c
        assert torch.allclose(record.x.double(), grid.alpha[i + 1] * y_expected, atol=1e-5)
    assert seen == [999, 832, 666, 499, 332, 166]


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("num_steps", [2, 4, 7, 10, 20])
def test_dpm2m_rule_equals_diffusers_dpmsolver_order2(num_steps, lower_order_final):
    scheduler = DPMSolverMultistepScheduler(
        **SD,
        algorithm_type="dpmsolver",
        solver_order=2,
        final_sigmas_type="sigma_min",
        lower_order_final=lower_order_final,
        timestep_spacing="trailing",
    )
    grid = VPSchedule.from_config(scheduler.config).grid(num_steps, final="first")
    g = torch.Generator().manual_seed(100 + num_steps)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    x0_seq = 0.5 * torch.randn(num_steps, 2, 4, 8, 8, generator=g)
    expected = run_diffusers(scheduler, random_denoiser(scheduler.alphas_cumprod, x0_seq), x_T, num_steps)
    table = dpm_solver_2m_table(grid, lower_order_final=lower_order_final)
    ours = [r.x for r in iter_lmm(random_denoiser(scheduler.alphas_cumprod, x0_seq), x_T, grid, table)]
    assert max_diff(ours, expected) < 1e-4
    if num_steps > 2:  # the two solvers are not trivially equal: DDIM differs by far more
        assert max_diff([r.x for r in iter_lmm(random_denoiser(scheduler.alphas_cumprod, x0_seq), x_T, grid, ddim_table(grid))], expected) > 1e-2


def test_dpm2m_is_first_order_on_the_final_step_into_n_zero():
    grid = VPSchedule.from_config(DDIMScheduler(**SD).config).grid(20, final="zero")
    table = dpm_solver_2m_table(grid, lower_order_final=False)
    assert table[-1].tolist() == [1.0, 0.0] and torch.isfinite(table).all()
    assert table[-2, 1] != 0


def uniform_n_grid(num_steps: int) -> TimeGrid:
    n = torch.linspace(3.0, 0.0, num_steps + 1, dtype=torch.float64)
    alpha = 1.0 / torch.sqrt(1.0 + n**2)
    return TimeGrid(timesteps=torch.arange(num_steps), alpha=alpha, sigma=n * alpha)


def test_adams_bashforth_on_a_uniform_grid_is_classic_ab_with_warm_up():
    table = adams_bashforth_table(uniform_n_grid(6), 4)
    expected = torch.tensor(
        [[24, 0, 0, 0], [36, -12, 0, 0], [46, -32, 10, 0], [55, -59, 37, -9], [55, -59, 37, -9], [55, -59, 37, -9]],
        dtype=torch.float64,
    ) / 24
    assert torch.allclose(table, expected, atol=1e-12)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("num_steps", [1, 3, 9])
def test_rows_sum_to_one_and_use_only_available_history(rule, num_steps):
    grid = VPSchedule.from_config(DDIMScheduler(**SD).config).grid(num_steps)
    table = RULES[rule](grid)
    assert table.dtype == torch.float64 and table.shape[0] == num_steps
    assert torch.allclose(table.sum(1), torch.ones(num_steps, dtype=torch.float64), atol=1e-12)
    for i in range(num_steps):
        assert not table[i, i + 1 :].any()


@pytest.mark.parametrize("order", [0, 5, 2.0, True])
def test_adams_order_out_of_range_is_refused(order):
    with pytest.raises(ValueError, match="order"):
        adams_bashforth_table(uniform_n_grid(3), order)


def test_lmm_step_is_eq_10_in_float32():
    y = torch.randn(4, dtype=torch.float16)
    eps = [torch.randn(4), torch.randn(4), torch.randn(4)]
    w = [1.5, -0.7, 0.2]
    out = lmm_step(y, 2.0, 1.5, eps, w)
    expected = y.float() + (1.5 - 2.0) * (1.5 * eps[0] - 0.7 * eps[1] + 0.2 * eps[2])
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(lmm_step(y, 2.0, 1.5, eps[:1], [1.0, 0.0, 0.0]), y.float() - 0.5 * eps[0])
    with pytest.raises(ValueError, match="eps_history"):
        lmm_step(y, 2.0, 1.5, eps[:1], w)


# Tuned diffusers baselines that are eq.-10 tables (solver.coefficients.scheduler_table) ----------------

EMBEDDED_LIKE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "prediction_type": "v_prediction", "set_alpha_to_one": True}
TABLE_NAMES = [
    "ddim[timestep_spacing=leading]",
    "dpmpp2m[solver_order=1,timestep_spacing=leading]",  # DPM-Solver++ 1M = DDIM
    "dpmpp2m[timestep_spacing=leading,final_sigmas_type=sigma_min]",
    "unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]",  # UniPC-1, corrector folded
    "unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading,steps_offset=1,final_sigmas_type=sigma_min]",
    "unipc",
    "unipc[solver_type=bh1,final_sigmas_type=sigma_min]",
    "deis[solver_order=3,timestep_spacing=leading,steps_offset=1]",
    "dpmpp2m[use_karras_sigmas=true]",
]


def _nonlinear_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = float(DDIMScheduler(**{k: v for k, v in EMBEDDED_LIKE.items() if not k.startswith("_")}
                               ).alphas_cumprod[int(round(float(t)))])
    return ((1 - abar) ** 0.5 / (0.25 * abar + (1 - abar))) * x * (1 + 0.1 * torch.tanh(x))


@pytest.mark.parametrize("name", TABLE_NAMES)
@pytest.mark.parametrize("num_steps", [3, 4])
def test_tuned_rules_are_eq10_tables_equal_to_diffusers(name, num_steps):
    """At K <= m the tuned baselines are exactly eq.-10 tables on their own grid (first timestep below T for
    leading spacing; UniPC's corrector folded into the next row): the table run through iter_lmm equals
    diffusers' own loop to < 1e-5 (relative to the largest value above 1) on a nonlinear denoiser."""
    from solver.coefficients import scheduler_table
    from solver.registry import get_solver

    solver = get_solver(name, EMBEDDED_LIKE)
    grid, table = scheduler_table(solver.make_scheduler(), num_steps, order=4)
    assert table.shape == (num_steps, 4)
    assert torch.allclose(table.sum(1), torch.ones(num_steps, dtype=torch.float64), atol=1e-6)  # eps const: exact
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = solver.sample(_nonlinear_eps, noise, num_steps)
    ours = sample_lmm(_nonlinear_eps, noise, grid, table)
    assert float((ours - theirs).abs().max()) < 1e-5 * max(1.0, float(theirs.abs().max()))  # float32 rounding


def test_dpmpp_1m_and_unipc_1_tables_in_closed_form():
    """DPM-Solver++ 1M is DDIM (w = 1 every step); UniPC-1 (bh2) is DDIM plus its corrector, which the next
    step's row carries: row 0 is DDIM, rows 1..K-2 reach back (in y = x / alpha its data-prediction form
    also reaches the epsilon before); the last row, ending at n = 0, is
    DDIM again (its data prediction comes from the uncorrected state, and sigma_K = 0 drops the state)."""
    from solver.coefficients import scheduler_table
    from solver.registry import get_solver

    _, dpm1 = scheduler_table(get_solver("dpmpp2m[solver_order=1,timestep_spacing=leading]",
                                         EMBEDDED_LIKE).make_scheduler(), 4, order=4)
    assert torch.allclose(dpm1, torch.nn.functional.pad(torch.ones(4, 1, dtype=torch.float64), (0, 3)), atol=1e-6)
    _, uni = scheduler_table(get_solver("unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading]",
                                        EMBEDDED_LIKE).make_scheduler(), 4, order=4)
    assert float(uni[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert bool((uni[1:-1, 1].abs() > 1e-3).all())  # the corrector reaches back one epsilon
    assert float(uni[-1, 0]) == pytest.approx(1.0, abs=1e-6) and float(uni[-1, 1]) == pytest.approx(0.0, abs=1e-9)


def test_a_scheduler_that_leaves_its_grid_is_not_a_table():
    """DDIM with linspace spacing steps to t - T // K, not to the next timestep the model is evaluated at."""
    from solver.coefficients import scheduler_table
    from solver.registry import get_solver

    with pytest.raises(ValueError, match="not an eq.-10 table"):
        scheduler_table(get_solver("ddim[timestep_spacing=linspace]", EMBEDDED_LIKE).make_scheduler(), 4, order=4)
    with pytest.raises(ValueError, match="epsilons"):  # DPM-Solver++ 2M reaches back further than m = 2 at K = 4
        scheduler_table(get_solver("dpmpp2m", EMBEDDED_LIKE).make_scheduler(), 4, order=2)
