"""One registry of solver names: ConsistencySolver, the pure coefficient rules, and diffusers' baselines.

Names:
- ``consistency``: paper eq. 10 with a :class:`~solver.policy.ConsistencyPolicy` (pass ``policy=``);
  ``consistency:PATH`` loads the policy saved in directory PATH.
- ``rule:<r>``: eq. 10 with a classic table, r in ``solver.coefficients.RULES``
  (``rule:ddim``, ``rule:ab1`` .. ``rule:ab4``, ``rule:dpm2m``, ``rule:ipndm``).
- ``ipndm``: iPNDM (Zhang & Chen 2022), the fixed-step Adams-Bashforth weights with lower-order
  warm-up, as an eq.-10 table (``solver.coefficients.ipndm_table``): diffusers has no iPNDM for
  DDPM-trained models.
- diffusers' own schedulers, never reimplemented: ``ddim``, ``dpm2m`` (DPM-Solver-2M, eps form,
  ``final_sigmas_type="sigma_min"`` as diffusers requires for it), ``dpmpp2m`` (DPM-Solver++ 2M),
  ``unipc``, ``deis``, ``plms`` (``PNDMScheduler`` with ``skip_prk_steps``: its first step repeats a
  timestep, so K steps cost K + 1 model evaluations; unstable below about 20 steps), ``euler``.

On a flow-matching model (SD3, FLUX; ``solver.schedules.FlowSchedule``) the same names mean
diffusers' flow schedulers: ``euler`` (and ``ddim``, identical there) is the model's own
``FlowMatchEulerDiscreteScheduler`` with its pipeline's shift / ``mu`` / sigmas, ``dpmpp2m`` and
``unipc`` are DPM-Solver++ 2M and UniPC with ``use_flow_sigmas=True,
prediction_type="flow_prediction"``. diffusers' DPM-Solver-2 (``algorithm_type="dpmsolver"``) takes no
flow prediction, so ``dpm2m`` (refine's full-step sampler) is the same multistep DPM-Solver-2 as eq.-10
weights (``rule:dpm2m``, ``solver.coefficients.dpm_solver_2m_table``); ``deis`` and ``plms`` have no flow
version and are refused.

On a VP model every baseline is built from the model's own scheduler config (so betas and final alpha match),
with ``timestep_spacing="trailing"``, ``prediction_type="epsilon"`` (the samplers pass epsilon) and
x0 clipping/thresholding off (the ODE comparison is unclipped, like eq. 10).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from solver.coefficients import RULES
from solver.policy import ConsistencyPolicy
from solver.sampling import EpsFn, SamplerStep, iter_diffusers, iter_flow_diffusers, iter_lmm
from solver.schedules import FlowSchedule, Schedule, TimeGrid, schedule_family, schedule_from_config


class Solver:
    """A named sampler: ``iterate`` yields one :class:`SamplerStep` per model evaluation."""

    name: str

    def iterate(self, eps_fn: EpsFn, noise: torch.Tensor, num_steps: int) -> Iterator[SamplerStep]:
        raise NotImplementedError

    def nfe(self, num_steps: int) -> int:
        """Model evaluations actually used for ``num_steps`` steps."""
        return num_steps

    def sample(self, eps_fn: EpsFn, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The final x after ``num_steps`` steps from x_T = ``noise``."""
        x = noise
        for record in self.iterate(eps_fn, noise, num_steps):
            x = record.x
        return x


@dataclass
class LMMSolver(Solver):
    """Paper eq. 10 on the schedule's grid with the coefficient table ``table_fn(grid)``."""

    name: str
    schedule: Schedule
    table_fn: Callable[[TimeGrid], torch.Tensor]
    grid_fn: Callable[[int], TimeGrid] | None = None

    def grid(self, num_steps: int) -> TimeGrid:
        return self.grid_fn(num_steps) if self.grid_fn is not None else self.schedule.grid(num_steps)

    def iterate(self, eps_fn: EpsFn, noise: torch.Tensor, num_steps: int) -> Iterator[SamplerStep]:
        grid = self.grid(num_steps)
        return iter_lmm(eps_fn, noise, grid, self.table_fn(grid))


@dataclass
class DiffusersSolver(Solver):
    """A diffusers scheduler; a fresh instance per run, so interleaved runs never share history."""

    name: str
    scheduler_class: type
    scheduler_config: dict[str, Any]
    extra_nfe: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    def make_scheduler(self) -> Any:
        return self.scheduler_class.from_config(self.scheduler_config, **self.overrides)

    def iterate(self, eps_fn: EpsFn, noise: torch.Tensor, num_steps: int) -> Iterator[SamplerStep]:
        return iter_diffusers(eps_fn, noise, self.make_scheduler(), num_steps)

    def nfe(self, num_steps: int) -> int:
        return num_steps + self.extra_nfe


@dataclass
class FlowDiffusersSolver(Solver):
    """A diffusers flow-matching scheduler on a :class:`FlowSchedule` (fresh instance per run).

    ``FlowMatchEulerDiscreteScheduler`` gets the model's own config and the pipeline's
    ``set_timesteps`` arguments; DPM-Solver++ 2M and UniPC get ``use_flow_sigmas=True``,
    ``prediction_type="flow_prediction"``, the model's ``shift`` and (FLUX) its dynamic ``mu``.
    """

    name: str
    schedule: FlowSchedule
    scheduler_class: type | None = None  # None: the model's own FlowMatchEulerDiscreteScheduler
    overrides: dict[str, Any] = field(default_factory=dict)

    def make_scheduler(self) -> Any:
        if self.scheduler_class is None:
            return self.schedule.scheduler()
        return self.scheduler_class(**self.overrides)

    def set_timesteps_kwargs(self, num_steps: int) -> dict[str, Any]:
        if self.scheduler_class is None:
            return self.schedule.set_timesteps_kwargs(num_steps)
        kwargs: dict[str, Any] = {"num_inference_steps": num_steps}
        if self.schedule.mu is not None:
            kwargs["mu"] = self.schedule.mu
        return kwargs

    def iterate(self, eps_fn: EpsFn, noise: torch.Tensor, num_steps: int) -> Iterator[SamplerStep]:
        return iter_flow_diffusers(
            eps_fn, noise, self.make_scheduler(), self.set_timesteps_kwargs(num_steps), self.schedule.num_train_timesteps
        )


FLOW_BASELINES = ("ddim", "euler", "dpmpp2m", "unipc", "dpm2m")  # ddim = euler on a flow schedule


def _flow_baseline(name: str, schedule: FlowSchedule) -> FlowDiffusersSolver:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if name in ("ddim", "euler"):
        return FlowDiffusersSolver(name=name, schedule=schedule)
    if name == "dpm2m":  # diffusers' "dpmsolver" has no flow_prediction: the same multistep DPM-Solver-2 as eq.-10 weights
        return LMMSolver(name=name, schedule=schedule, table_fn=RULES["dpm2m"])
    config = schedule.config
    common = {
        "num_train_timesteps": schedule.num_train_timesteps,
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "flow_shift": schedule.shift,
        "use_dynamic_shifting": bool(config.get("use_dynamic_shifting", False)),
        "time_shift_type": config.get("time_shift_type", "exponential"),
        "solver_order": 2,
    }
    if name == "dpmpp2m":
        return FlowDiffusersSolver(
            name=name, schedule=schedule, scheduler_class=DPMSolverMultistepScheduler,
            overrides={**common, "algorithm_type": "dpmsolver++"},
        )
    return FlowDiffusersSolver(name=name, schedule=schedule, scheduler_class=UniPCMultistepScheduler, overrides=common)


def _baselines() -> dict[str, tuple[type, dict[str, Any], int]]:
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    return {
        "ddim": (DDIMScheduler, {}, 0),
        "dpm2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}, 0),
        "dpmpp2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, 0),
        "unipc": (UniPCMultistepScheduler, {}, 0),
        "deis": (DEISMultistepScheduler, {}, 0),
        "plms": (PNDMScheduler, {"skip_prk_steps": True}, 1),
        "euler": (EulerDiscreteScheduler, {}, 0),
    }


BASELINES = ("ddim", "dpm2m", "dpmpp2m", "unipc", "deis", "plms", "euler")  # diffusers schedulers
IPNDM = "ipndm"  # the eq.-10 iPNDM table
RULE_PREFIX = "rule:"
CONSISTENCY = "consistency"


def check_policy_family(policy: ConsistencyPolicy, schedule: Schedule) -> None:
    """Refuse a policy trained on one schedule family ("vp" / "flow") for a model of the other.

    A policy records its family as ``policy.schedule_family`` (None: not recorded, accepted).
    """
    trained_on = getattr(policy, "schedule_family", None)
    if trained_on is not None and trained_on != schedule_family(schedule):
        raise ValueError(
            f"policy: this ConsistencySolver policy was trained on a {trained_on!r} schedule and the model's "
            f"schedule is {schedule_family(schedule)!r}; train a policy for this model family"
        )


def solver_names() -> list[str]:
    """Every accepted name (``consistency:PATH`` is ``consistency`` with a checkpoint directory)."""
    return [CONSISTENCY, *(RULE_PREFIX + r for r in RULES), IPNDM, *BASELINES]


def get_solver(name: str, scheduler_config: Mapping[str, Any], policy: ConsistencyPolicy | None = None) -> Solver:
    """The solver called ``name`` for a model whose training scheduler config is ``scheduler_config``."""
    config = dict(scheduler_config)
    if name == CONSISTENCY or name.startswith(CONSISTENCY + ":"):
        path = name[len(CONSISTENCY) + 1 :]
        if path:
            if policy is not None:
                raise ValueError(f"name {name!r} names a checkpoint and policy= was also given; pass one of them")
            policy = ConsistencyPolicy.load(path)
        if policy is None:
            raise ValueError("policy is required for name 'consistency' (or use 'consistency:PATH')")
        schedule = schedule_from_config(config)
        check_policy_family(policy, schedule)
        return LMMSolver(
            name=name,
            schedule=schedule,
            table_fn=policy.coefficient_table,
            grid_fn=lambda num_steps: policy.time_grid(schedule, num_steps),
        )
    if name.startswith(RULE_PREFIX) and name[len(RULE_PREFIX) :] in RULES:
        return LMMSolver(name=name, schedule=schedule_from_config(config), table_fn=RULES[name[len(RULE_PREFIX) :]])
    if name == IPNDM:
        return LMMSolver(name=name, schedule=schedule_from_config(config), table_fn=RULES[IPNDM])
    if name in BASELINES:
        schedule = schedule_from_config(config)
        if isinstance(schedule, FlowSchedule):
            if name not in FLOW_BASELINES:
                raise ValueError(
                    f"name {name!r} has no flow-matching version in diffusers; for a flow model use one of "
                    f"{list(FLOW_BASELINES)}"
                )
            return _flow_baseline(name, schedule)
        scheduler_class, specific, extra_nfe = _baselines()[name]
        overrides = {
            "timestep_spacing": "trailing",
            "prediction_type": "epsilon",
            "clip_sample": False,
            "thresholding": False,
            **specific,
        }
        accepted = set(inspect.signature(scheduler_class.__init__).parameters)
        overrides = {k: v for k, v in overrides.items() if k in accepted}
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in overrides}
        return DiffusersSolver(name=name, scheduler_class=scheduler_class, scheduler_config=config, extra_nfe=extra_nfe, overrides=overrides)
    raise ValueError(f"name must be one of {solver_names()} or 'consistency:PATH', got {name!r}")
