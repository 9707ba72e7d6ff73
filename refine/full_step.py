"""THE full-step sampler: the one definition shared by refine and by training targets.

The ConsistencySolver is trained to predict exactly what refine produces, so training imports
:func:`iterate_full_step` / :func:`sample_full_step` from here and never builds its own.

Definition: multistep DPM-Solver-2 in epsilon form (``"dpm2m"`` of ``solver.registry``, trailing
timestep spacing), 40 steps by default, 1..200 allowed, one classifier-free-guided model call per step.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch

from models.base import Conditioning, Denoiser

# diffusers marks algorithm_type="dpmsolver" (DPM-Solver-2 in epsilon form) for removal in its 1.0; it is the
# sampler this project chose on purpose, so the warning is silenced once here rather than on every refine.
warnings.filterwarnings("ignore", message=r"`algorithm_types dpmsolver", category=FutureWarning)

FULL_STEP_SOLVER = "dpm2m"
DEFAULT_STEPS = 40
MAX_STEPS = 200


def check_full_steps(num_steps: int, field: str = "steps") -> int:
    """``num_steps`` if it is an integer in 1..MAX_STEPS, else a ValueError naming ``field``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"{field} must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"{field} must be in 1..{MAX_STEPS} for a full-step refine, got {num_steps}")
    return num_steps


def full_step_solver(model: Denoiser, size: tuple[int, int] | None = None):
    """The solver object of the full-step sampler for ``model``'s training schedule, for images of
    ``size`` = (height, width) where the model's time grid depends on it (``Denoiser.scheduler_config_for``)."""
    from solver.registry import get_solver

    return get_solver(FULL_STEP_SOLVER, model.scheduler_config if size is None else model.scheduler_config_for(*size))


def iterate_full_step(
    model: Denoiser,
    cond: Conditioning,
    noise: torch.Tensor,
    guidance: float,
    num_steps: int = DEFAULT_STEPS,
    size: tuple[int, int] | None = None,
) -> Iterator:
    """Yield one ``SamplerStep`` per guided model call; the last step's ``x`` is the final latent.

    Args:
        model: the denoiser (its ``scheduler_config`` fixes the betas and prediction type).
        cond: one row per sample (``model.encode_prompts``).
        noise: x_T, (B, C, h, w) float32, from the store (one CPU generator per seed).
        guidance: classifier-free guidance scale w.
        num_steps: N, 1..200.
        size: the image's (height, width) in pixels, for models whose time grid depends on it (FLUX).
    """
    check_full_steps(num_steps, "num_steps")
    solver = full_step_solver(model, size)
    x_T = noise.to(model.device, torch.float32)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.guided_eps(x, t, cond, guidance)

    yield from solver.iterate(eps_fn, x_T, num_steps)


@torch.no_grad()
def sample_full_step(
    model: Denoiser,
    cond: Conditioning,
    noise: torch.Tensor,
    guidance: float,
    num_steps: int = DEFAULT_STEPS,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The full-step final latent x_0 for ``noise`` (B, C, h, w); float32 on ``model.device``.
    ``size``: the image's (height, width), as :func:`iterate_full_step` takes it."""
    last = None
    for last in iterate_full_step(model, cond, noise, guidance, num_steps, size=size):
        pass
    assert last is not None  # num_steps >= 1
    return last.x
