"""Classic linear-multistep coefficient rules as pure functions of the n-grid (paper.md section 2).

Every rule returns a (K, m) float64 table: row i holds (w_1, ..., w_m) for the step
n_i -> n_{i+1} of paper eq. 10, most recent epsilon first, zero-padded past the k = min(i + 1, m)
epsilons available at step i. Every row sums to 1 (a constant epsilon is integrated exactly).

Notation (<variable> -> paper symbol):
- ``n``   -> n_t = sigma_t / alpha_t, the grid of K + 1 points (K steps)
- ``lam`` -> lambda_t = log(alpha_t / sigma_t) = -log n_t
- ``h``   -> n_{i+1} - n_i (Adams) or lambda_{i+1} - lambda_i (DPM-Solver)
- ``r``   -> r_i = (lambda_i - lambda_{i-1}) / (lambda_{i+1} - lambda_i)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from solver.schedules import TimeGrid

MAX_ADAMS_ORDER = 4


def ddim_table(grid: TimeGrid) -> torch.Tensor:
    """DDIM / Euler in n: w_1 = 1 at every step (paper.md section 2, first row). Shape (K, 1)."""
    return torch.ones(grid.num_steps, 1, dtype=torch.float64)


def adams_weights(n_past: torch.Tensor, n_next: float) -> torch.Tensor:
    """Variable-step Adams-Bashforth weights in n (DEIS rho-AB).

    ``n_past`` = (n_i, n_{i-1}, ..., n_{i-k+1}), most recent first. Returns w (k,) with
    w_j = 1 / (n_{i+1} - n_i) * int_{n_i}^{n_{i+1}} l_j(n) dn, l_j the Lagrange basis over ``n_past``.
    Solved as the moment conditions sum_j w_j u_j^p = 1 / (p + 1), p < k, in the scaled variable
    u = (n - n_i) / (n_{i+1} - n_i), which keeps the small Vandermonde system well conditioned.
    """
    n_past = n_past.to(torch.float64)
    k = int(n_past.shape[0])
    h = n_next - float(n_past[0])
    u = (n_past - n_past[0]) / h  # (k,), u_1 = 0
    powers = torch.arange(k, dtype=torch.float64)
    vandermonde = u.unsqueeze(0) ** powers.unsqueeze(1)  # (k, k): row p, column j -> u_j^p
    moments = 1.0 / (powers + 1.0)
    return torch.linalg.solve(vandermonde, moments)


def adams_bashforth_table(grid: TimeGrid, order: int) -> torch.Tensor:
    """Variable-step Adams-Bashforth of order 1..4 in n with lower-order warm-up (DEIS rho-AB, iPNDM family).

    Step i uses k = min(i + 1, order) past epsilons. On a uniform n-grid the rows are the classic
    (1), (3/2, -1/2), (23/12, -16/12, 5/12), (55/24, -59/24, 37/24, -9/24). Shape (K, order).
    """
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ADAMS_ORDER:
        raise ValueError(f"order must be an integer in 1..{MAX_ADAMS_ORDER}, got {order!r}")
    n = grid.n
    table = torch.zeros(grid.num_steps, order, dtype=torch.float64)
    finite = torch.isfinite(n)
    for i in range(grid.num_steps):
        k = min(i + 1, order)
        while k > 1 and not bool(finite[i + 1 - k]):  # a point at n = inf (flow start) has weight 0 in the limit
            k -= 1
        table[i, :k] = adams_weights(n[i + 1 - k : i + 1].flip(0), float(n[i + 1]))
    return table


def dpm_solver_2m_table(grid: TimeGrid, lower_order_final: bool = True) -> torch.Tensor:
    """Multistep DPM-Solver-2 (eps form, ``algorithm_type="dpmsolver"``, midpoint) as eq.-10 weights.

    Dividing the multistep update x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1)(D0 + D1 / 2)
    by alpha_t gives y_{i+1} = y_i + (n_{i+1} - n_i)(w_1 eps_i + w_2 eps_{i-1}) with
    w_1 = 1 + 1 / (2 r_i), w_2 = -1 / (2 r_i). Step 0 is first order (one epsilon).

    The last step falls back to first order as diffusers' ``DPMSolverMultistepScheduler`` does:
    when ``lower_order_final`` and K < 15, or when the grid ends at n = 0 (lambda = inf). Shape (K, 2).
    """
    num_steps = grid.num_steps
    lam = grid.lam
    table = torch.zeros(num_steps, 2, dtype=torch.float64)
    table[:, 0] = 1.0
    ends_at_zero = float(grid.sigma[-1]) == 0.0
    for i in range(1, num_steps):
        is_final = i == num_steps - 1
        if is_final and ((lower_order_final and num_steps < 15) or ends_at_zero):
            continue
        h = lam[i + 1] - lam[i]
        r = (lam[i] - lam[i - 1]) / h
        table[i, 0] = 1.0 + 0.5 / r
        table[i, 1] = -0.5 / r
    return table


IPNDM_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def ipndm_table(grid: TimeGrid) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2022, the DEIS paper's "improved PNDM"): the classic fixed-step
    Adams-Bashforth weights on eps, whatever the step sizes, with lower-order warm-up (step i uses
    min(i + 1, 4) epsilons). On a uniform n-grid it equals ``adams_bashforth_table(grid, 4)``.

    diffusers has no iPNDM for DDPM-trained models (its ``IPNDMScheduler`` carries its own noise
    schedule, and ``PNDMScheduler(skip_prk_steps=True)`` is PLMS, with a repeated first timestep).
    Shape (K, 4).
    """
    table = torch.zeros(grid.num_steps, MAX_ADAMS_ORDER, dtype=torch.float64)
    for i in range(grid.num_steps):
        row = IPNDM_WEIGHTS[min(i, MAX_ADAMS_ORDER - 1)]
        table[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return table


def _ab(order: int) -> Callable[[TimeGrid], torch.Tensor]:
    def rule(grid: TimeGrid) -> torch.Tensor:
        return adams_bashforth_table(grid, order)

    rule.__name__ = f"adams_bashforth_{order}_table"
    rule.__doc__ = f"Variable-step Adams-Bashforth of order {order} in n (see adams_bashforth_table)."
    return rule


RULES: dict[str, Callable[[TimeGrid], torch.Tensor]] = {
    "ddim": ddim_table,
    "ab1": _ab(1),
    "ab2": _ab(2),
    "ab3": _ab(3),
    "ab4": _ab(4),
    "dpm2m": dpm_solver_2m_table,
    "ipndm": ipndm_table,
}


def rule_table(name: str, grid: TimeGrid) -> torch.Tensor:
    """The table of the rule ``name`` (a key of :data:`RULES`) on ``grid``."""
    if name not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {name!r}")
    return RULES[name](grid)


def pad_table(table: torch.Tensor, order: int) -> torch.Tensor:
    """Zero-pad (or check) a (K, m') table to width ``order``; refuse to drop used columns."""
    width = int(table.shape[1])
    if width > order:
        if bool((table[:, order:] != 0).any()):
            raise ValueError(f"order {order} is too small for a rule that uses {width} past epsilons")
        return table[:, :order].clone()
    return torch.nn.functional.pad(table, (0, order - width))


def scheduler_table(scheduler: Any, num_steps: int, order: int | None = None) -> tuple[TimeGrid, torch.Tensor]:
    """A linear multistep diffusers scheduler (DDIM, DPM-Solver(++) multistep, UniPC, DEIS) as the grid the
    model sees plus its eq.-10 table (K, w) float64, read off the scheduler itself.

    These schedulers are linear in (x_T, eps_0, ..., eps_{K-1}) once the timesteps are fixed, so probing
    them with x_T and each eps on its own channel gives every state the model is evaluated at as
    x_i = alpha_i (y_0 + sum_j c_ij eps_j). The run is an eq.-10 table on the grid (t_i, n_i) exactly when
    the coefficient of x_T in y_i = x_i / alpha_i stays 1 (no rescaling the grid does not explain), and
    then row i is w_{i, l} = (c_{i+1, i-l} - c_{i, i-l}) / (n_{i+1} - n_i), most recent epsilon first.
    UniPC's corrector, which revises x_i with eps_i before the next prediction, is folded in this way: the
    model is evaluated at the predicted states, and the correction lands in the next step's weights.

    The grid: n_i is the scheduler's own ``sigmas`` (k-diffusion sigma = sigma / alpha; K + 1 values,
    the last its final point) where it has them, else (DDIM) from ``alphas_cumprod`` at the timesteps and
    at DDIM's own last ``prev_timestep`` (t_{K-1} - T // K, ``final_alpha_cumprod`` below 0) at the end; alpha_i = (1 + n_i^2)^(-1/2). ``order`` (m): the table must use at
    most min(i + 1, m) epsilons at step i. Raises ValueError when the scheduler is not such a table
    (e.g. DDIM with ``linspace`` spacing, whose step lands off the next timestep).
    """
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    if len(timesteps) != num_steps:
        raise ValueError(f"{type(scheduler).__name__} runs {len(timesteps)} model calls for {num_steps} steps")
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} scales its initial noise (init_noise_sigma != 1)")
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == num_steps + 1:
        n = torch.as_tensor(sigmas, dtype=torch.float64).cpu().clone()
    else:
        abar = scheduler.alphas_cumprod.to(torch.float64)
        last = int(timesteps[-1]) - scheduler.config.num_train_timesteps // num_steps  # DDIM's own prev_timestep
        final = float(abar[last]) if last >= 0 else float(getattr(scheduler, "final_alpha_cumprod", abar[0]))
        ab = torch.cat([abar[timesteps.long()], torch.tensor([final], dtype=torch.float64)])
        n = ((1.0 - ab).clamp_min(0.0) / ab).sqrt()
    alpha = (1.0 + n**2).rsqrt()
    grid = TimeGrid(timesteps=timesteps.clone(), alpha=alpha, sigma=n * alpha)
    for attr in ("sigmas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):  # probe in float64
        value = getattr(scheduler, attr, None)
        if torch.is_tensor(value) and value.is_floating_point():
            setattr(scheduler, attr, value.to(torch.float64))
    width = num_steps + 1
    x = torch.zeros(1, width, 1, 1, dtype=torch.float64)
    x[0, 0] = 1.0
    states = [x.clone()]
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if not torch.equal(x_in, x):
            raise ValueError(f"{type(scheduler).__name__} rescales its model input")
        eps = torch.zeros_like(x)
        eps[0, i + 1] = 1.0
        x = scheduler.step(eps, t, x).prev_sample.to(torch.float64)
        states.append(x.clone())
    y = torch.stack([s.flatten() for s in states]) / alpha.unsqueeze(1)  # (K+1, K+1): y_i's coefficients
    y[:, 0] = y[:, 0] * alpha[0]  # in units of y_0 = x_T / alpha_0
    if not torch.allclose(y[:, 0], torch.ones_like(y[:, 0]), atol=1e-5):
        raise ValueError(f"{type(scheduler).__name__} is not an eq.-10 table on its grid "
                         f"(y_0 is rescaled by {y[:, 0].tolist()})")
    dn = n[1:] - n[:-1]
    table = torch.zeros(num_steps, num_steps, dtype=torch.float64)
    for i in range(num_steps):
        increment = (y[i + 1, 1:] - y[i, 1:]) / dn[i]  # weights of eps_0..eps_{K-1}
        increment = increment.masked_fill(increment.abs() <= 1e-6 * float(increment.abs().max()), 0.0)
        if bool((increment[i + 1:] != 0).any()):
            raise ValueError(f"{type(scheduler).__name__} step {i} uses an epsilon not yet evaluated")
        table[i, : i + 1] = increment[: i + 1].flip(0)
    used = max((int(torch.nonzero(row).max()) + 1 if bool(row.any()) else 1) for row in table)
    table = table[:, :used].clone()
    if order is not None:
        k = torch.clamp(torch.arange(num_steps) + 1, max=order)
        for i in range(num_steps):
            if bool((table[i, int(k[i]):] != 0).any()):
                raise ValueError(f"{type(scheduler).__name__} step {i} uses more than the {int(k[i])} epsilons an "
                                 f"order-{order} table holds")
        table = pad_table(table, order) if used <= order else table[:, :order].clone()
    return grid, table
