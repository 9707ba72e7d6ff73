"""Samplers as generators over model evaluations: one :class:`SamplerStep` per call of ``eps_fn``.

A device worker can interleave several jobs step by step by advancing their iterators in turn;
``sample_*`` simply exhausts one. The model is seen only through ``eps_fn(x, t) -> eps``
(float32, classifier-free guidance already applied, see ``models.base.Denoiser.guided_eps``).
No step waits for the device: finiteness is checked once, after the last step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from solver.lmm import check_table, lmm_step
from solver.schedules import TimeGrid

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerStep:
    """What one model evaluation produced.

    ``i`` counts evaluations (0-based) out of ``num_steps``; ``t`` is the timestep the model saw;
    ``x`` is the state after the step; ``denoised`` the x0 estimate at that step,
    x0 = (x_t - sigma_t eps) / alpha_t = y_t - n_t eps.
    """

    i: int
    num_steps: int
    t: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor


def _check_final(x: torch.Tensor, num_steps: int) -> None:
    """Finiteness checked ONCE, after the last step: a NaN or inf in any step's epsilon reaches the
    final state (every step adds w * eps with w != 0), and a per-step check would make the host wait
    for the device at every step."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"model_output contains NaN or inf (the state is not finite after {num_steps} steps)")


def iter_lmm(eps_fn: EpsFn, x_T: torch.Tensor, grid: TimeGrid, table: torch.Tensor) -> Iterator[SamplerStep]:
    """Paper eq. 10 over ``grid`` with the (K, m) coefficient ``table`` (row i = w for step i).

    The state is carried as y = x / alpha; every step reads n_{i+1} from the grid itself (never
    ``t - T // K``, paper.md N1). Solver arithmetic in float32; ``x`` is float32.
    """
    num_steps = grid.num_steps
    if table.ndim != 2:
        raise ValueError(f"table must have shape ({num_steps}, m), got {tuple(table.shape)}")
    check_table(table, num_steps)
    order = int(table.shape[1])
    alpha, n = grid.alpha.tolist(), grid.n.tolist()
    rows = table.tolist()
    history: deque[torch.Tensor] = deque(maxlen=order)
    y = x_T.float() / alpha[0]
    for i in range(num_steps):
        t = grid.timesteps[i]
        eps = eps_fn(y * alpha[i], t).float()
        history.appendleft(eps)
        denoised = y - n[i] * eps
        y = lmm_step(y, n[i], n[i + 1], list(history), rows[i])
        if i == num_steps - 1:
            _check_final(y, num_steps)
        yield SamplerStep(i=i, num_steps=num_steps, t=t, x=y * alpha[i + 1], denoised=denoised)


def sample_lmm(eps_fn: EpsFn, x_T: torch.Tensor, grid: TimeGrid, table: torch.Tensor) -> torch.Tensor:
    """Run :func:`iter_lmm` to the end and return the final x (float32)."""
    x = x_T.float()
    for record in iter_lmm(eps_fn, x_T, grid, table):
        x = record.x
    return x


def iter_diffusers(eps_fn: EpsFn, x_T: torch.Tensor, scheduler: Any, num_steps: int) -> Iterator[SamplerStep]:
    """A diffusers scheduler's own loop, one record per model evaluation.

    The scheduler must be configured with ``prediction_type="epsilon"`` (``eps_fn`` returns eps). As in
    the pipelines: x = noise * init_noise_sigma, then per timestep ``scale_model_input`` -> ``eps_fn``
    -> ``step``. ``denoised`` is computed from the scaled (variance-preserving) model input and eps with
    the scheduler's own ``alphas_cumprod``. Timesteps come from ``scheduler.timesteps`` (PNDM repeats one).
    """
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"scheduler prediction_type must be 'epsilon', got {scheduler.config.prediction_type!r}")
    scheduler.set_timesteps(num_steps, device=x_T.device)
    timesteps = scheduler.timesteps
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).cpu()
    t_host = timesteps.detach().cpu().tolist()  # read once: no device sync per step
    total = len(timesteps)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        eps = eps_fn(x_in, t).float()
        abar = float(alphas_cumprod[int(round(float(t_host[i])))])
        denoised = (x_in.float() - (1.0 - abar) ** 0.5 * eps) / abar**0.5
        x = scheduler.step(eps, t, x).prev_sample
        if i == total - 1:
            _check_final(x, total)
        yield SamplerStep(i=i, num_steps=total, t=t, x=x, denoised=denoised)

