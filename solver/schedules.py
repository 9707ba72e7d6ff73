"""Noise schedules as data, and the solver coordinates y = x / alpha, n = sigma / alpha.

Notation (<variable> -> paper symbol):
- ``alpha``  -> alpha_t, the signal scale of the forward marginal N(alpha_t x0, sigma_t^2 I)
- ``sigma``  -> sigma_t, the noise scale
- ``n``      -> n_t = sigma_t / alpha_t (the DDIM / DEIS "rho" coordinate, paper eq. 6)
- ``lam``    -> lambda_t = log(alpha_t / sigma_t) = -log n_t (half the log-SNR)

The probability-flow ODE in these coordinates is ``dy = eps dn`` (paper eq. 6-7), so every solver in
this package walks a :class:`TimeGrid` of ``n`` values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

FinalPoint = Literal["config", "zero", "first"]
ZERO_SNR_ABAR = 2.0**-24  # abar at t = T - 1 of a zero-terminal-SNR schedule, as diffusers' multistep solvers set it


@dataclass(frozen=True)
class TimeGrid:
    """The K evaluation timesteps of one sampling run plus its end point.

    ``timesteps[i]`` is the model timestep of grid point ``i`` (i = 0..K-1). ``alpha``, ``sigma`` and
    ``n`` have K + 1 entries: entry K is the end point the last step lands on. All float64 on the CPU.
    """

    timesteps: torch.Tensor  # (K,) model timesteps, descending (int64 for VP, float for flow)
    alpha: torch.Tensor  # (K+1,)
    sigma: torch.Tensor  # (K+1,)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def n(self) -> torch.Tensor:
        return self.sigma / self.alpha

    @property
    def lam(self) -> torch.Tensor:
        """lambda = log(alpha / sigma); +inf where sigma = 0."""
        return torch.log(self.alpha) - torch.log(self.sigma)


def _check_num_steps(num_steps: int, limit: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= limit:
        raise ValueError(f"num_steps must be in 1..{limit}, got {num_steps}")


@dataclass(frozen=True)
class VPSchedule:
    """Discrete variance-preserving schedule (DDPM / Stable Diffusion): alpha_t^2 + sigma_t^2 = 1.

    Built from a diffusers scheduler config, so the betas are exactly the model's.
    """

    alphas_cumprod: torch.Tensor  # (T,) float64
    final_alpha_cumprod: float  # abar after the last step ("set_alpha_to_one")
    prediction_type: str = "epsilon"
    timestep_spacing: str = "trailing"
    steps_offset: int = 0  # added to every timestep, as diffusers' "leading" spacing does
    final_point: str = "config"  # the default end point of :meth:`grid` (see ``final`` there)

    kind = "vp"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], timestep_spacing: str = "trailing") -> "VPSchedule":
        """Read betas and prediction type from any diffusers scheduler config (DDIM, PNDM, DPM, ...).

        Zero terminal SNR (``rescale_betas_zero_snr=True``, Lin et al. 2024): the rescaled schedule
        ends at abar_{T-1} = 0, i.e. alpha = 0, n = sigma / alpha = inf, where y = x / alpha and the
        step of eq. 10 are not finite. The solver's first step is the first-order one (w = (1), the
        only row a one-entry history allows), x_1 = alpha_1 x0_hat + sigma_1 eps_0 with
        x0_hat = (x_0 - sigma_0 eps_0) / alpha_0: at alpha_0 = 0 that is 0 / 0 for a model seen
        through epsilon (``eps = x`` exactly there, so x0_hat is not recoverable from it). We
        therefore start where diffusers' multistep solvers start for such configs
        (``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ``UniPCMultistepScheduler``):
        abar_{T-1} = 2^-24, alpha_0 = 2^-12. This choice also balances the two errors of the first
        step in float32: the distance to the alpha = 0 limit is O(alpha_0) and the rounding of
        y_0 = x_0 / alpha_0 against n_0 eps_0 is O(2^-24 / alpha_0); both are about 2^-12.
        Every grid is then finite (tested against DDIMScheduler and DPMSolverMultistepScheduler).
        """
        from diffusers import DDIMScheduler

        config = dict(config)
        config.pop("timestep_spacing", None)
        config.pop("steps_offset", None)  # the solver's own grid: trailing spacing, no offset (paper.md N1)
        ddim = DDIMScheduler.from_config(config, timestep_spacing=timestep_spacing)
        alphas_cumprod = ddim.alphas_cumprod.to(torch.float64)
        if config.get("rescale_betas_zero_snr"):
            alphas_cumprod[-1] = ZERO_SNR_ABAR
        return cls(
            alphas_cumprod=alphas_cumprod,
            final_alpha_cumprod=float(ddim.final_alpha_cumprod),
            prediction_type=ddim.config.prediction_type,
            timestep_spacing=timestep_spacing,
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t (float64) at integer timesteps t."""
        abar = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long)]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def alpha_sigma_continuous(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t at real t in [0, T - 1], differentiable in t: log(abar) is interpolated
        linearly between the integer timesteps, so integer t gives exactly :meth:`alpha_sigma`.

        Used only where a training loss is differentiated through the time grid (training.distill);
        sampling always stands on integer timesteps.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool((t.detach() < 0).any()) or bool((t.detach() > self.num_train_timesteps - 1).any()):
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps - 1}], got {t.detach().tolist()}")
        log_abar = torch.log(self.alphas_cumprod)
        lo = t.detach().floor().clamp(max=self.num_train_timesteps - 2).long()
        frac = t - lo.to(torch.float64)
        abar = torch.exp(log_abar[lo] * (1.0 - frac) + log_abar[lo + 1] * frac)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The K model timesteps, with diffusers' own spacing rule (trailing by default)."""
        from diffusers import DDIMScheduler

        _check_num_steps(num_steps, self.num_train_timesteps)
        ddim = DDIMScheduler(num_train_timesteps=self.num_train_timesteps, timestep_spacing=self.timestep_spacing,
                             steps_offset=self.steps_offset)
        ddim.set_timesteps(num_steps)
        return ddim.timesteps.to(torch.long)

    def grid(self, num_steps: int, final: FinalPoint | None = None) -> TimeGrid:
        """Evaluation timesteps plus the end point.

        ``final``: ``"config"`` uses the config's ``final_alpha_cumprod`` (DDIM ``set_alpha_to_one``),
        ``"zero"`` ends at n = 0 (DPM-Solver ``final_sigmas_type="zero"``), ``"first"`` ends at
        ``alphas_cumprod[0]`` (``final_sigmas_type="sigma_min"``); ``None``: :attr:`final_point`.
        """
        return self.grid_at(self.timesteps(num_steps), final)

    def grid_at(self, timesteps: torch.Tensor, final: FinalPoint | None = None) -> TimeGrid:
        """The grid on given integer ``timesteps`` (strictly decreasing, in [0, T - 1]) plus the end point."""
        ts = torch.as_tensor(timesteps, dtype=torch.long)
        if ts.ndim != 1 or len(ts) < 1 or bool((ts[1:] >= ts[:-1]).any()) or int(ts.min()) < 0 \
                or int(ts.max()) >= self.num_train_timesteps:
            raise ValueError(f"timesteps must be strictly decreasing integers in 0..{self.num_train_timesteps - 1}, "
                             f"got {ts.tolist()}")
        final = self.final_point if final is None else final
        abar = self.alphas_cumprod[ts]
        if final == "config":
            abar_end = self.final_alpha_cumprod
        elif final == "zero":
            abar_end = 1.0
        elif final == "first":
            abar_end = float(self.alphas_cumprod[0])
        else:
            raise ValueError(f"final must be 'config', 'zero' or 'first', got {final!r}")
        abar = torch.cat([abar, torch.tensor([abar_end], dtype=torch.float64)])
        return TimeGrid(timesteps=ts, alpha=abar.sqrt(), sigma=(1.0 - abar).clamp_min(0.0).sqrt())


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified-flow schedule: x_t = (1 - sigma) x0 + sigma eps, sigma in [0, 1], with a time shift.

    alpha = 1 - sigma. The model timestep is ``sigma * num_train_timesteps`` as in diffusers'
    FlowMatchEulerDiscreteScheduler. The shifted sigma is ``shift * s / (1 + (shift - 1) * s)``.
    sigma = 1 (alpha = 0, n = inf) is not a point the (y, n) solver can stand on, so ``sigma_max``
    must be below 1; the default matches the first training timestep 999/1000.
    """

    shift: float = 1.0
    sigma_max: float = 0.999
    num_train_timesteps: int = 1000
    prediction_type: str = "flow_prediction"

    kind = "flow"

    def __post_init__(self) -> None:
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift must be a positive finite number, got {self.shift!r}")
        if not 0.0 < self.sigma_max < 1.0:
            raise ValueError(f"sigma_max must be in (0, 1), got {self.sigma_max!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowSchedule":
        return cls(shift=float(config.get("shift", 1.0)), num_train_timesteps=int(config.get("num_train_timesteps", 1000)))

    def shifted(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps
        return 1.0 - sigma, sigma

    def alpha_sigma_continuous(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow timesteps are already real-valued: the same as :meth:`alpha_sigma`, differentiable in t."""
        return self.alpha_sigma(t)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        _check_num_steps(num_steps, self.num_train_timesteps)
        s = torch.linspace(self.sigma_max, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return self.shifted(s) * self.num_train_timesteps

    def grid(self, num_steps: int, final: FinalPoint = "zero") -> TimeGrid:
        if final not in ("zero", "config"):
            raise ValueError(f"a flow schedule always ends at sigma = 0; final must be 'zero', got {final!r}")
        ts = self.timesteps(num_steps)
        sigma = torch.cat([ts / self.num_train_timesteps, torch.zeros(1, dtype=torch.float64)])
        return TimeGrid(timesteps=ts, alpha=1.0 - sigma, sigma=sigma)


Schedule = VPSchedule | FlowSchedule


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """A VP schedule for DDPM-family configs, a flow schedule for flow-matching configs."""
    class_name = str(config.get("_class_name", ""))
    if "FlowMatch" in class_name or config.get("prediction_type") == "flow_prediction":
        return FlowSchedule.from_config(config)
    if "beta_schedule" in config or "trained_betas" in config or class_name:
        return VPSchedule.from_config(config)
    raise ValueError(f"unknown schedule: config {dict(config)!r} is neither a VP nor a flow-matching scheduler config")
