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

from typing import Callable

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
