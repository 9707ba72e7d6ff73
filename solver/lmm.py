"""The linear multistep update of ConsistencySolver in the solver coordinates (y, n).

Paper eq. 10 (paper.md section 1.2)::

    y_{i+1} = y_i + (n_{i+1} - n_i) * sum_{j=1..m} w_j * eps_{i+1-j}

Notation (<variable> -> paper symbol):
- ``y``           -> y_{t_i} = x_{t_i} / alpha_{t_i}
- ``n``, ``n_next`` -> n_{t_i}, n_{t_{i+1}} (n = sigma / alpha)
- ``eps_history`` -> (eps_i, eps_{i-1}, ...), most recent first, each evaluated at its own timestep
- ``w``           -> (w_1, ..., w_m), one row of a coefficient table
"""

from __future__ import annotations

from typing import Sequence

import torch


def effective_eps(eps_history: Sequence[torch.Tensor], w: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """eps_eff = sum_j w_j eps_{i+1-j} over the history entries whose weight is used (float32)."""
    weights = [float(v) for v in w]
    if len(eps_history) == 0:
        raise ValueError("eps_history must hold at least one epsilon")
    if len(weights) < 1:
        raise ValueError("w must hold at least one coefficient")
    used = len(weights)
    while used > 1 and weights[used - 1] == 0.0:
        used -= 1
    if used > len(eps_history):
        raise ValueError(f"w uses {used} history entries but eps_history holds only {len(eps_history)}")
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
    are skipped, so a zero-padded table row only needs the history it actually uses.
    """
    dn = float(n_next) - float(n)
    return torch.add(y.float(), effective_eps(eps_history, w), alpha=dn)
