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
from dataclasses import dataclass, field
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
    def from_config(cls, config: Mapping[str, Any], timestep_spacing: str = "trailing",
                    exact_zero_snr: bool = True) -> "VPSchedule":
        """Read betas and prediction type from any diffusers scheduler config (DDIM, PNDM, DPM, ...).

        Zero terminal SNR (``rescale_betas_zero_snr=True``, Lin et al. 2024): the rescaled schedule
        ends at abar_{T-1} = 0, i.e. alpha = 0, n = sigma / alpha = inf, where y = x / alpha and the
        step of eq. 10 are not finite. Its limit is finite: with one epsilon in the history the first row
        is w = (1), and y_1 = y_0 + (n_1 - n_0) eps_0 = (x_0 - sigma_0 eps_0) / alpha_0 + n_1 eps_0
        = x0_hat + n_1 eps_0, i.e. x_1 = alpha_1 x0_hat + sigma_1 eps_0 (DDIM from alpha = 0, as
        ``DDIMScheduler`` steps). A v- or x0-prediction model gives x0_hat at alpha = 0 (v = -x0 there), so
        for those (``exact_zero_snr``, the default) the grid keeps alpha_0 = 0 and the solver takes that
        limit step (``Denoiser.solver_output`` hands it x0_hat there, ``solver.sampling.iter_lmm`` steps).
        An epsilon-prediction model holds no x0 at alpha = 0 (eps = x exactly), so for it, or with
        ``exact_zero_snr=False``, the schedule starts where diffusers' multistep solvers start for such
        configs (``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``): abar_{T-1} = 2^-24,
        alpha_0 = 2^-12, and every grid point is finite.
        """
        from diffusers import DDIMScheduler

        config = dict(config)
        config.pop("timestep_spacing", None)
        config.pop("steps_offset", None)  # the solver's own grid: trailing spacing, no offset (paper.md N1)
        ddim = DDIMScheduler.from_config(config, timestep_spacing=timestep_spacing)
        alphas_cumprod = ddim.alphas_cumprod.to(torch.float64)
        if config.get("rescale_betas_zero_snr") and not (exact_zero_snr and ddim.config.prediction_type in (
                "v_prediction", "sample")):
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
    """Rectified-flow schedule (SD3, FLUX): x_t = (1 - t) x0 + t eps with t = sigma in [0, 1].

    In the paper's coordinates alpha = 1 - t and sigma = t, so

        y = x / (1 - t),    n = t / (1 - t),    eps = x + (1 - t) v    (v = eps - x0, the model's velocity)

    The model timestep is ``t * num_train_timesteps``. The grid is diffusers' own:
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` on the model's scheduler config, with the
    static ``shift`` of the config (SD3) or the resolution-dependent ``mu`` (``use_dynamic_shifting``,
    FLUX; computed by the backend exactly as its pipeline does and kept in the config as ``"mu"``),
    and FLUX's explicit ``sigmas = linspace(1, 1/K, K)`` when the config says ``"sigmas": "linear"``.

    **The start point t = 1.** These grids start at t_0 = 1, where alpha_0 = 0 and n_0 = inf: y_0 is
    not a number, and eps_0 = x_0 / sigma_0 = x_0 carries no information about the model. The first
    step is the limit of eq. 10 as n_0 -> inf. Step 0 has one epsilon, so its row is w_1 = 1 (every
    row sums to 1) and eq. 10 reads

        y_1 = y_0 + (n_1 - n_0) eps_0 = (y_0 - n_0 eps_0) + n_1 eps_0 = x0_hat + n_1 eps_0,

    where y_0 - n_0 eps_0 = (x_0 - sigma_0 eps_0) / alpha_0 = x0_hat is the denoised estimate, finite
    in the limit: x0_hat = x_t - t v -> x_0 - v_0. Multiplying by alpha_1 = 1 - t_1 (eps_0 = x_0):

        x_1 = (1 - t_1) (x_0 - v_0) + t_1 x_0 = x_0 + (t_1 - t_0) v_0,

    exactly FlowMatchEulerDiscreteScheduler's Euler step. So at alpha = 0 the solver needs x0_hat,
    not eps: ``Denoiser.guided_eps`` returns the guided x0_hat at such a point (the only model
    information there) and ``solver.sampling.iter_lmm`` takes the step above. Later steps are
    ordinary eq.-10 steps; a multistep rule's weight on eps_0 at n_0 = inf has limit 0 (DPM-Solver's
    r = inf, Adams' Lagrange point at infinity), so the rules in ``solver.coefficients`` drop it.
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    prediction_type: str = "flow_prediction"
    mu: float | None = None
    linear_sigmas: bool = False
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    kind = "flow"

    def __post_init__(self) -> None:
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift must be a positive finite number, got {self.shift!r}")
        if self.mu is not None and not math.isfinite(self.mu):
            raise ValueError(f"mu must be a finite number, got {self.mu!r}")
        if self.config.get("use_dynamic_shifting") and self.mu is None:
            raise ValueError(
                "mu: the scheduler config has use_dynamic_shifting=True, so the resolution-dependent shift mu "
                "must be given (the backend computes it for the image size)"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowSchedule":
        """From a FlowMatchEulerDiscreteScheduler config, plus the backend's ``"mu"`` / ``"sigmas"`` keys."""
        sigmas = config.get("sigmas")
        if sigmas not in (None, "linear"):
            raise ValueError(f"sigmas must be absent or 'linear' (FLUX's linspace(1, 1/K, K)), got {sigmas!r}")
        mu = config.get("mu")
        return cls(
            shift=float(config.get("shift", 1.0)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            mu=None if mu is None else float(mu),
            linear_sigmas=sigmas == "linear",
            config=dict(config),
        )

    def scheduler(self) -> Any:
        """diffusers' FlowMatchEulerDiscreteScheduler for this schedule (the backend's keys removed)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = {k: v for k, v in self.config.items() if k not in FLOW_EXTRA_KEYS and not k.startswith("_")}
        config.setdefault("shift", self.shift)
        config.setdefault("num_train_timesteps", self.num_train_timesteps)
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def set_timesteps_kwargs(self, num_steps: int) -> dict[str, Any]:
        """The arguments the model's pipeline passes to ``set_timesteps`` for ``num_steps`` steps."""
        import numpy as np

        kwargs: dict[str, Any] = {}
        if self.linear_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / num_steps, num_steps)
        else:
            kwargs["num_inference_steps"] = num_steps
        if self.mu is not None:
            kwargs["mu"] = self.mu
        return kwargs

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = 1 - t, sigma = t at model timesteps (t in [0, num_train_timesteps]), float64."""
        sigma = torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps
        return 1.0 - sigma, sigma

    def alpha_sigma_continuous(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow timesteps are already real-valued: the same as :meth:`alpha_sigma`, differentiable in t."""
        return self.alpha_sigma(t)

    def grid(self, num_steps: int, final: FinalPoint = "zero") -> TimeGrid:
        """diffusers' own sigmas for ``num_steps`` steps (K + 1 points, the last t = 0)."""
        if final not in ("zero", "config"):
            raise ValueError(f"a flow schedule always ends at sigma = 0; final must be 'zero', got {final!r}")
        _check_num_steps(num_steps, self.num_train_timesteps)
        scheduler = self.scheduler()
        scheduler.set_timesteps(**self.set_timesteps_kwargs(num_steps))
        sigma = scheduler.sigmas.to(torch.float64).cpu()
        ts = scheduler.timesteps.to(torch.float64).cpu()
        if sigma.shape[0] != num_steps + 1 or float(sigma[-1]) != 0.0:
            raise ValueError(f"the scheduler config gives {sigma.shape[0] - 1} steps ending at {float(sigma[-1])}")
        return TimeGrid(timesteps=ts, alpha=1.0 - sigma, sigma=sigma)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        return self.grid(num_steps).timesteps


FLOW_EXTRA_KEYS = ("mu", "sigmas")  # keys a backend adds to a flow scheduler config (see FlowSchedule)


Schedule = VPSchedule | FlowSchedule


def schedule_family(config: Mapping[str, Any] | VPSchedule | FlowSchedule) -> str:
    """``"vp"`` or ``"flow"``: the family of a schedule, or of a model's scheduler config.

    A policy trained on one family is refused on the other (the timesteps mean different things).
    """
    if isinstance(config, (VPSchedule, FlowSchedule)):
        return config.kind
    return "flow" if _is_flow_config(config) else "vp"


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """A VP schedule for DDPM-family configs, a flow schedule for flow-matching configs."""
    class_name = str(config.get("_class_name", ""))
    if _is_flow_config(config):
        return FlowSchedule.from_config(config)
    if "beta_schedule" in config or "trained_betas" in config or class_name:
        return VPSchedule.from_config(config)
    raise ValueError(f"unknown schedule: config {dict(config)!r} is neither a VP nor a flow-matching scheduler config")


def _is_flow_config(config: Mapping[str, Any]) -> bool:
    return "FlowMatch" in str(config.get("_class_name", "")) or config.get("prediction_type") == "flow_prediction"
