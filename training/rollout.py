"""Batched rollouts: R previews that share a step count K, each with its own coefficient table.

Paper eq. 10 for every rollout r at once::

    y^r_{i+1} = y^r_i + (n^r_{i+1} - n^r_i) * sum_j W^r[i, j] * eps^r_{i+1-j}

``solver.sampling.iter_lmm`` runs one table for a whole batch; training needs one table per rollout
(each rollout draws its own coefficients): both call the one update, ``solver.lmm.lmm_step``, here with
one coefficient row and one (n_i, n_{i+1}) per rollout. The equivalence is a test (tests/test_training_ppo.py). With a shared grid the R states sit at
the same timestep, so each step is ONE guided model call for all R rollouts (all groups of this K);
with a learned time grid each rollout has its own timesteps and the call passes a vector of timesteps.
Solver arithmetic is float32.
"""

from __future__ import annotations

from typing import Callable

import torch

from solver.lmm import check_table, lmm_step
from solver.schedules import TimeGrid

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (R, C, h, w), t scalar or (R,)) -> eps


def lmm_rollouts(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    grids: TimeGrid | list[TimeGrid],
    tables: torch.Tensor,
    group_size: int | None = None,
) -> torch.Tensor:
    """Final x of R rollouts from x_T (R, C, h, w) with per-rollout tables (R, K, m).

    ``grids``: one TimeGrid shared by all rollouts (eps_fn gets a scalar timestep), or one per rollout
    (eps_fn gets the (R,) timesteps of step i).

    ``group_size`` G: rollouts come in groups of G from the same x_T. While every rollout of a group is
    still in the same state (the first steps, whose coefficients have no free dims, are identical), the
    model is called once per group and its eps shared: ``eps_fn(x, t, index=rows)`` then receives the
    representative rows only (``index`` = their rollout indices). Bit-identical to calling every row.
    """
    shared = isinstance(grids, TimeGrid)
    grid_list = [grids] if shared else list(grids)  # type: ignore[list-item]
    num_steps = grid_list[0].num_steps
    if not shared and (len(grid_list) != x_T.shape[0] or any(g.num_steps != num_steps for g in grid_list)):
        raise ValueError("grids must be one TimeGrid or one per rollout, all with the same number of steps")
    if tables.ndim != 3:
        raise ValueError(f"tables must have shape (R, {num_steps}, m), got {tuple(tables.shape)}")
    check_table(tables, num_steps)
    R, order = x_T.shape[0], tables.shape[2]
    view = (R,) + (1,) * (x_T.ndim - 1)
    alpha = torch.stack([g.alpha for g in grid_list]).to(torch.float32).expand(R, -1)  # (R, K+1)
    n = torch.stack([g.n for g in grid_list]).to(torch.float32).expand(R, -1)
    w = tables.to(torch.float32).to(x_T.device)
    history: list[torch.Tensor] = []  # most recent first
    start = 0
    if bool((alpha[:, 0] == 0).any()):  # flow matching from t = 1: n_0 = inf (solver.schedules.FlowSchedule)
        y = _first_step_from_pure_noise(eps_fn, x_T, grid_list, shared, alpha, n, w, history, view)
        start = 1
    else:
        y = x_T.float() / alpha[:, 0].view(view).to(x_T.device)
    for i in range(start, num_steps):
        t = grid_list[0].timesteps[i] if shared else torch.stack([g.timesteps[i] for g in grid_list])
        x = y * alpha[:, i].view(view).to(y.device)
        if group_size is not None and group_size > 1 and shared and _groups_identical(x, group_size):
            rep = torch.arange(0, R, group_size)
            eps = eps_fn(x[rep], t, index=rep).float().repeat_interleave(group_size, 0)
        else:
            eps = eps_fn(x, t).float()
        history.insert(0, eps)
        del history[order:]
        y = lmm_step(y, n[:, i], n[:, i + 1], history, w[:, i, : len(history)])
    if not bool(torch.isfinite(y).all()):  # one host sync, after the loop (a NaN in any eps reaches y)
        raise ValueError(f"model_output contains NaN or inf (the rollouts are not finite after {num_steps} steps)")
    return y * alpha[:, num_steps].view(view).to(y.device)


def _first_step_from_pure_noise(eps_fn: EpsFn, x_T: torch.Tensor, grid_list: list[TimeGrid], shared: bool,
                                alpha: torch.Tensor, n: torch.Tensor, w: torch.Tensor, history: list[torch.Tensor],
                                view: tuple[int, ...]) -> torch.Tensor:
    """Step 0 of eq. 10 from alpha_0 = 0 (n_0 = inf), as ``solver.sampling.iter_lmm`` takes it: the limit
    y_1 = x0_hat + n_1 eps_0 with eps_0 = x_T / sigma_0, where ``eps_fn`` returns x0_hat at alpha = 0
    (``Denoiser.guided_eps``). Every rollout must start there, and its step-0 row must be w = (1, 0, ...)."""
    if not bool((alpha[:, 0] == 0).all()):
        raise ValueError("either every rollout's grid starts at alpha = 0 (t = 1) or none does")
    first = w[:, 0]
    if not bool((first[:, 0] == 1).all() and (first[:, 1:] == 0).all()):
        raise ValueError("step 0 from n = inf must be the DDIM step w = (1, 0, ...) in every table")
    t = grid_list[0].timesteps[0] if shared else torch.stack([g.timesteps[0] for g in grid_list])
    sigma_0 = torch.stack([g.sigma[0] for g in grid_list]).to(torch.float32).expand(x_T.shape[0])
    x_T = x_T.float()
    denoised = eps_fn(x_T, t).float()
    eps = x_T / sigma_0.view(view).to(x_T.device)
    history.insert(0, eps)
    return denoised + n[:, 1].view(view).to(x_T.device) * eps


def _groups_identical(x: torch.Tensor, group_size: int) -> bool:
    g = x.reshape(-1, group_size, x[0].numel())
    return bool((g == g[:, :1]).all())
