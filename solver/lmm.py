"""The linear multistep update of ConsistencySolver in the solver coordinates (y, n): the one implementation.

Paper eq. 10 (paper.md section 1.2)::

    y_{i+1} = y_i + (n_{i+1} - n_i) * sum_{j=1..m} w_j * eps_{i+1-j}

Notation (<variable> -> paper symbol):
- ``y``           -> y_{t_i} = x_{t_i} / alpha_{t_i}
- ``n``, ``n_next`` -> n_{t_i}, n_{t_{i+1}} (n = sigma / alpha)
- ``eps_history`` -> (eps_i, eps_{i-1}, ...), most recent first, each evaluated at its own timestep
- ``w``           -> (w_1, ..., w_m), one row of a coefficient table

A batch either shares one row ``w`` (m,) and scalar ``n``, ``n_next`` (sampling, ``solver.sampling``), or
carries its own per batch row: ``w`` (R, m) and ``n``, ``n_next`` (R,) (training rollouts, each with its
own coefficients, ``training.rollout``). Both go through :func:`lmm_step`; per-row weights keep their
autograd graph (distillation differentiates through them).
"""

from __future__ import annotations

from typing import Sequence

import torch


def check_table(table: torch.Tensor, num_steps: int) -> None:
    """Refuse a coefficient table whose row i uses more than the i + 1 epsilons computed by step i.

    ``table`` is one (K, m) table or R stacked tables (R, K, m), K = ``num_steps``.
    """
    if table.ndim not in (2, 3) or table.shape[-2] != num_steps:
        raise ValueError(f"table must have shape ({num_steps}, m) or (R, {num_steps}, m), got {tuple(table.shape)}")
    order = int(table.shape[-1])
    for i in range(num_steps):
        if bool((table[..., i, min(i + 1, order):] != 0).any()):
            raise ValueError(f"table row {i} uses more than the {i + 1} epsilons available at step {i}")


def _used(w: Sequence[float] | torch.Tensor, history: int) -> int:
    """How many leading coefficients are used: trailing zero weights (zero in every row) are skipped."""
    if isinstance(w, torch.Tensor):
        nonzero = (w.detach().reshape(-1, w.shape[-1]) != 0).any(0).tolist()
    else:
        nonzero = [float(v) != 0.0 for v in w]
    if len(nonzero) < 1:
        raise ValueError("w must hold at least one coefficient")
    if history == 0:
        raise ValueError("eps_history must hold at least one epsilon")
    used = len(nonzero)
    while used > 1 and not nonzero[used - 1]:
        used -= 1
    if used > history:
        raise ValueError(f"w uses {used} history entries but eps_history holds only {history}")
    return used


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R,) -> (R, 1, ..., 1) in float32 on ``like``'s device, to scale each batch row of ``like``."""
    return v.to(device=like.device, dtype=torch.float32).view((-1,) + (1,) * (like.ndim - 1))


def effective_eps(eps_history: Sequence[torch.Tensor], w: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """eps_eff = sum_j w_j eps_{i+1-j} over the history entries whose weight is used (float32).

    ``w`` is one row (m,) shared by the batch, or one row per batch row (R, m).
    """
    used = _used(w, len(eps_history))
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        eps_eff = _per_row(w[:, 0], eps_history[0]) * eps_history[0].float()
        for j in range(1, used):
            eps_eff = eps_eff + _per_row(w[:, j], eps_history[j]) * eps_history[j].float()
        return eps_eff
    weights = [float(v) for v in w]
    eps_eff = eps_history[0].float() * weights[0]
    for w_j, eps_j in zip(weights[1:used], eps_history[1:used]):
        eps_eff.add_(eps_j.float(), alpha=w_j)
    return eps_eff


def lmm_step(
    y: torch.Tensor,
    n: float | torch.Tensor,
    n_next: float | torch.Tensor,
    eps_history: Sequence[torch.Tensor],
    w: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """One Adams-type step of paper eq. 10: y_{i+1} = y_i + (n_{i+1} - n_i) sum_j w_j eps_{i+1-j}.

    Arithmetic in float32 whatever the input dtype; the result is float32. Trailing zero weights
    are skipped, so a zero-padded table row only needs the history it actually uses. ``n`` and
    ``n_next`` are numbers (a shared grid) or (R,) tensors (one grid per batch row).
    """
    eps_eff = effective_eps(eps_history, w)
    if isinstance(n, torch.Tensor) and n.ndim == 1:
        n_next_t = torch.as_tensor(n_next)
        dn = n_next_t.to(torch.float32) - n.to(torch.float32)
        return y.float() + _per_row(dn, y) * eps_eff
    return torch.add(y.float(), eps_eff, alpha=float(n_next) - float(n))
