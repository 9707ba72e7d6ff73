"""Closed-form check: Gaussian data x0 ~ N(0, s^2 I) has an exact denoiser and an exact PF-ODE endpoint.

In (y, n): eps(y, n) = n y / (s^2 + n^2) and dy/dn = n y / (s^2 + n^2), so
y(n) = y(n_T) sqrt((s^2 + n^2) / (s^2 + n_T^2)). The problem is linear and isotropic, so a scalar
y in float64 is enough to measure each coefficient rule's global error; one run goes through the
float32 sampler to tie the two together.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from solver.coefficients import RULES
from solver.sampling import sample_lmm
from solver.schedules import TimeGrid, VPSchedule

S2 = 0.5**2  # data variance s^2


def lambda_grid(num_steps: int, lam_min: float = -2.5, lam_max: float = 3.0) -> TimeGrid:
    """A VP grid uniform in lambda = -log n (n from 12.2 down to 0.05)."""
    n = torch.exp(-torch.linspace(lam_min, lam_max, num_steps + 1, dtype=torch.float64))
    alpha = 1.0 / torch.sqrt(1.0 + n**2)
    return TimeGrid(timesteps=torch.arange(num_steps), alpha=alpha, sigma=n * alpha)


def exact_eps(y: float, n: float) -> float:
    return n * y / (S2 + n**2)


def exact_endpoint(grid: TimeGrid) -> float:
    n = grid.n.tolist()
    return math.sqrt((S2 + n[-1] ** 2) / (S2 + n[0] ** 2))


def integrate(grid: TimeGrid, table: torch.Tensor) -> float:
    """y at the end point of eq. 10 with ``table`` and the exact eps, in float64, from y_T = 1."""
    n = grid.n.tolist()
    y, history = 1.0, []
    for i, row in enumerate(table.tolist()):
        history.insert(0, exact_eps(y, n[i]))
        y += (n[i + 1] - n[i]) * sum(w * e for w, e in zip(row, history))
    return y


def relative_error(grid: TimeGrid, table: torch.Tensor) -> float:
    """Global relative error at the end point."""
    exact = exact_endpoint(grid)
    return abs(integrate(grid, table) - exact) / exact


def fitted_order(rule: str, steps: list[int]) -> float:
    errors = [relative_error(lambda_grid(k), RULES[rule](lambda_grid(k))) for k in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


ASYMPTOTIC_STEPS = [16, 32, 64, 128]


@pytest.mark.parametrize("rule, order", [("ddim", 1), ("ab1", 1), ("ab2", 2), ("dpm2m", 2)])
def test_global_error_falls_at_the_expected_order(rule, order):
    assert abs(fitted_order(rule, ASYMPTOTIC_STEPS) - order) < 0.3


@pytest.mark.parametrize("rule", ["ab3", "ab4"])
def test_higher_adams_orders_are_at_least_second_order(rule):
    # Their first steps are lower order (warm-up), so the global order is at least 2.
    assert fitted_order(rule, ASYMPTOTIC_STEPS) > 2 - 0.3


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("num_steps", [4, 10, 25])
def test_adams_tables_equal_diffusers_lms_coefficients(order, num_steps):
    """On LMSDiscreteScheduler's own (non-uniform) sigma grid, w_j (n_{i+1} - n_i) of ab1..ab4 equals its
    coefficient ``get_lms_coefficient(min(i + 1, order), i, j)`` (the integral of the Lagrange basis, by
    quadrature): the same variable-step Adams-Bashforth in n = sigma, warm-up included."""
    from diffusers import LMSDiscreteScheduler

    lms = LMSDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    lms.set_timesteps(num_steps)
    n = lms.sigmas.to(torch.float64)  # K + 1 values, the last 0
    alpha = 1.0 / torch.sqrt(1.0 + n**2)
    grid = TimeGrid(timesteps=torch.arange(num_steps), alpha=alpha, sigma=n * alpha)
    table = RULES[f"ab{order}"](grid)
    for i in range(num_steps):
        k = min(i + 1, order)
        theirs = torch.tensor([lms.get_lms_coefficient(k, i, j) for j in range(k)], dtype=torch.float64)
        ours = table[i, :k] * (n[i + 1] - n[i])
        # rtol: diffusers keeps its sigmas, and so its integrand, in float32
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8, msg=lambda m: f"step {i}: {m}")
        assert bool((table[i, k:] == 0).all())


def sd_schedule() -> VPSchedule:
    config = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False).config
    return VPSchedule.from_config(config)


@pytest.mark.parametrize("num_steps", [4, 6, 8, 10, 16, 32])
def test_ab3_and_dpm2m_beat_ddim_at_equal_steps(num_steps):
    for grid in (lambda_grid(num_steps), sd_schedule().grid(num_steps)):
        ddim = relative_error(grid, RULES["ddim"](grid))
        assert relative_error(grid, RULES["ab3"](grid)) < ddim
        assert relative_error(grid, RULES["dpm2m"](grid)) < ddim


def test_float32_sampler_matches_the_float64_reference():
    grid = lambda_grid(16)
    table = RULES["ab3"](grid)
    n_of_t = dict(zip(grid.timesteps.tolist(), grid.n.tolist()))
    x_T = torch.full((2, 3), float(grid.alpha[0]))  # y_T = 1

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = n_of_t[int(t)]
        y = x / (1.0 / math.sqrt(1.0 + n**2))
        return n * y / (S2 + n**2)

    x = sample_lmm(eps_fn, x_T, grid, table)
    y = x / float(grid.alpha[-1])
    y64 = integrate(grid, table)
    assert (y - y64).abs().max().item() < 1e-5 * abs(y64)
    assert abs(y64 - exact_endpoint(grid)) > 1e-4  # the reference really is a discrete solution
