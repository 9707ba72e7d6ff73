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
    if any(a == 0.0 for a in alpha[1:]):
        raise ValueError("only the first grid point may have alpha = 0 (n = inf)")
    start = 0
    if alpha[0] == 0.0:  # a flow grid starting at t = 1: n_0 = inf (solver.schedules.FlowSchedule)
        y, first = _first_step_from_pure_noise(eps_fn, x_T, grid, rows[0], history)
        if num_steps == 1:
            _check_final(y, num_steps)
        yield first
        start = 1
    else:
        y = x_T.float() / alpha[0]
    for i in range(start, num_steps):
        t = grid.timesteps[i]
        eps = eps_fn(y * alpha[i], t).float()
        history.appendleft(eps)
        denoised = y - n[i] * eps
        y = lmm_step(y, n[i], n[i + 1], list(history), rows[i])
        if i == num_steps - 1:
            _check_final(y, num_steps)
        yield SamplerStep(i=i, num_steps=num_steps, t=t, x=y * alpha[i + 1], denoised=denoised)


def _first_step_from_pure_noise(
    eps_fn: EpsFn, x_T: torch.Tensor, grid: TimeGrid, row: list[float], history: deque
) -> tuple[torch.Tensor, SamplerStep]:
    """Step 0 of eq. 10 on a grid whose first point has alpha_0 = 0, n_0 = inf (flow matching at t = 1).

    There ``eps_fn`` returns the denoised x0_hat (``Denoiser.guided_eps``'s convention at alpha = 0)
    and eps_0 = x_T / sigma_0 exactly; step 0 is the limit y_1 = x0_hat + n_1 eps_0 of
    y_1 = y_0 + (n_1 - n_0) eps_0 (derivation: ``solver.schedules.FlowSchedule``). Its row must be
    w = (1, 0, ...), which every rule and policy gives at step 0 (one epsilon, sum w = 1). Returns y_1
    (eps_0 is pushed onto ``history``) and the step's record.
    """
    if row[0] != 1.0 or any(w != 0.0 for w in row[1:]):
        raise ValueError(f"step 0 from n = inf must be the DDIM step w = (1, 0, ...), got {row}")
    t = grid.timesteps[0]
    x_T = x_T.float()
    denoised = eps_fn(x_T, t).float()
    eps = x_T / float(grid.sigma[0])
    history.appendleft(eps)
    y = denoised + float(grid.n[1]) * eps
    return y, SamplerStep(i=0, num_steps=grid.num_steps, t=t, x=y * float(grid.alpha[1]), denoised=denoised)


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


def iter_flow_diffusers(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    scheduler: Any,
    set_timesteps_kwargs: dict[str, Any],
    num_train_timesteps: int = 1000,
) -> Iterator[SamplerStep]:
    """A diffusers flow-matching scheduler's own loop (``prediction_type="flow_prediction"``).

    ``eps_fn`` returns eps (or x0_hat at t = 1, see ``Denoiser.guided_eps``); the scheduler gets the
    velocity back, v = (eps - x) / (1 - t) with t = timestep / num_train_timesteps, the same t the
    model saw (at t = 1: v = x - x0_hat). ``set_timesteps_kwargs`` are the pipeline's own arguments
    (``FlowSchedule.set_timesteps_kwargs``, or ``mu`` / ``num_inference_steps`` for DPM / UniPC).
    """
    scheduler.set_timesteps(**set_timesteps_kwargs, device=x_T.device)
    timesteps = scheduler.timesteps
    t_host = timesteps.detach().cpu().tolist()  # read once: no device sync per step
    total = len(timesteps)
    x = x_T.float()
    for i, t in enumerate(timesteps):
        s = float(t_host[i]) / num_train_timesteps
        out = eps_fn(x, t).float()
        if s >= 1.0:
            denoised, v = out, x - out
        else:
            v = (out - x) / (1.0 - s)
            denoised = x - s * v
        x = scheduler.step(v, t, x).prev_sample.float()
        if i == total - 1:
            _check_final(x, total)
        yield SamplerStep(i=i, num_steps=total, t=t, x=x, denoised=denoised)
