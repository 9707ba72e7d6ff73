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

Options: a baseline name may carry any ``__init__`` option of its diffusers scheduler in brackets,
``NAME[key=value,...]``, e.g. ``unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading]``; the
options override the defaults above (``timestep_spacing`` included). Values are read as bool
(true/false), None (none), int, float, else text. An option the scheduler does not accept, one that
would change the model (betas, ``num_train_timesteps``, ``prediction_type``) or a malformed bracket is
one ValueError naming it, raised before anything runs. The name is kept exactly as given.

Tuned baselines: ``tuned:FAMILY`` (and ``tuned:best``, the best family per K) read the configuration
``python -m training.tune_baselines`` chose on the validation split for each step count K
(``training/results/tuned_baselines.json`` by default, :data:`TUNED_FILE`); the file names its model and
K range, and a solver built for another model, or run at a K outside the range, is refused.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

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


def _flow_baseline(name: str, schedule: FlowSchedule) -> Solver:
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


TUNED_PREFIX = "tuned:"
TUNED_BEST = "best"
TUNED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "results",
                          "tuned_baselines.json")
FIXED_OPTIONS = ("prediction_type", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def solver_names(model_id: str | None = None, tuned_file: str | os.PathLike | None = None) -> list[str]:
    """Every plain accepted name (``consistency:PATH`` is ``consistency`` with a checkpoint directory;
    any baseline may also carry ``[options]``). With ``model_id``: also the ``tuned:*`` names of the tuned
    file (:data:`TUNED_FILE` unless given) when it was tuned for that model."""
    names = [CONSISTENCY, *(RULE_PREFIX + r for r in RULES), IPNDM, *BASELINES]
    if model_id is not None:
        names += tuned_names(model_id, tuned_file)
    return names


def split_solver_list(text: str) -> list[str]:
    """A comma list of solver names; commas inside ``[...]`` do not split. Unbalanced brackets: ValueError."""
    names, depth, current = [], 0, ""
    for ch in str(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"solvers: unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            names.append(current.strip())
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ValueError(f"solvers: unclosed '[' in {text!r}")
    names.append(current.strip())
    return [n for n in names if n]


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_solver_name(name: str) -> tuple[str, dict[str, Any]]:
    """``NAME[key=value,...]`` -> (NAME, {key: value}); a name without brackets -> (name, {}).

    Malformed brackets (text after ``]``, an empty or repeated key, a part without ``=``): ValueError
    naming the solver and the part."""
    if not isinstance(name, str):
        raise ValueError(f"solver name must be text, got {name!r}")
    if "[" not in name and "]" not in name:
        return name, {}
    base, sep, rest = name.partition("[")
    if not sep or not rest.endswith("]") or "[" in rest or rest.count("]") != 1 or not base:
        raise ValueError(f"solver {name!r}: malformed options; expected NAME[key=value,...]")
    options: dict[str, Any] = {}
    body = rest[:-1].strip()
    for part in (p.strip() for p in body.split(",")) if body else ():
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"solver {name!r}: malformed option {part!r}; expected key=value")
        if key in options:
            raise ValueError(f"solver {name!r}: option {key!r} given twice")
        options[key] = _parse_value(value)
    if not options:
        raise ValueError(f"solver {name!r}: empty brackets; give key=value options or drop the brackets")
    return base, options


GENERIC_VP_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}


def check_name(name: str) -> str:
    """Validate a solver name without a model: a plain name, ``consistency:PATH``, ``tuned:FAMILY`` or a
    baseline with options (options checked against its diffusers scheduler on a generic VP config, so the
    error comes before any model is loaded). Returns the name unchanged."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"solver name must be non-empty text, got {name!r}")
    if name in solver_names() or (name.startswith(CONSISTENCY + ":") and len(name) > len(CONSISTENCY) + 1):
        return name
    if name.startswith(TUNED_PREFIX) and len(name) > len(TUNED_PREFIX):
        return name
    base, options = parse_solver_name(name)
    if base in BASELINES and options:
        baseline_solver(name, base, options, GENERIC_VP_CONFIG)
        return name
    if options:
        raise ValueError(f"solver {name!r}: only diffusers baselines ({', '.join(BASELINES)}) take [options]")
    raise ValueError(f"unknown solver {name!r}; known: {', '.join(solver_names())}, consistency:PATH, "
                     "tuned:FAMILY or a baseline with options NAME[key=value,...]")


def _accepted_options(scheduler_class: type) -> set[str]:
    return {k for k in inspect.signature(scheduler_class.__init__).parameters if k not in ("self", "kwargs")}


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
    if name.startswith(TUNED_PREFIX):
        return tuned_solver(name, config)
    base, options = parse_solver_name(name)
    if base in BASELINES:
        return baseline_solver(name, base, options, config)
    if options:
        raise ValueError(f"solver {name!r}: only diffusers baselines ({', '.join(BASELINES)}) take [options]")
    raise ValueError(f"name must be one of {solver_names()}, 'consistency:PATH', 'tuned:FAMILY' or a baseline "
                     f"with options NAME[key=value,...], got {name!r}")


def baseline_solver(name: str, base: str, options: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> DiffusersSolver:
    """diffusers' scheduler ``base`` on the model's config, with the registry's defaults overridden by
    ``options`` (validated against the scheduler's ``__init__``, then built and stepped once, so diffusers
    rejects a bad value here, before any model call)."""
    config = dict(scheduler_config)
    schedule = schedule_from_config(config)
    if isinstance(schedule, FlowSchedule):
        if base not in FLOW_BASELINES:
            raise ValueError(
                f"name {name!r} has no flow-matching version in diffusers; for a flow model use one of "
                f"{list(FLOW_BASELINES)}"
            )
        if options:
            raise ValueError(f"solver {name!r}: [options] are not taken on flow-matching models yet")
        return _flow_baseline(name, schedule)
    scheduler_class, specific, extra_nfe = _baselines()[base]
    accepted = _accepted_options(scheduler_class)
    for key in options:
        if key in FIXED_OPTIONS:
            raise ValueError(f"solver {name!r}: option {key!r} belongs to the model and cannot be changed")
        if key not in accepted:
            raise ValueError(f"solver {name!r}: {scheduler_class.__name__} has no option {key!r}; "
                             f"its options: {', '.join(sorted(accepted - set(FIXED_OPTIONS)))}")
    overrides = {
        "timestep_spacing": "trailing",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "thresholding": False,
        **specific,
        **options,
    }
    overrides = {k: v for k, v in overrides.items() if k in accepted}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in overrides}
    solver = DiffusersSolver(name=name, scheduler_class=scheduler_class, scheduler_config=config, extra_nfe=extra_nfe,
                             overrides=overrides)
    if options:
        try:
            solver.make_scheduler().set_timesteps(4)
        except Exception as exc:  # diffusers' own message, attributed to the name
            raise ValueError(f"solver {name!r}: {scheduler_class.__name__} refused the options: {exc}") from None
    return solver


# Tuned baselines ---------------------------------------------------------------------------------


def scheduler_identity(scheduler_config: Mapping[str, Any]) -> str:
    """A digest of the model's scheduler config (betas, T, prediction type): what a tuned file was tuned on."""
    import hashlib

    clean = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_tuned(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The tuned-baselines JSON written by ``training.tune_baselines`` (``path`` or :data:`TUNED_FILE`)."""
    path = TUNED_FILE if path is None else path
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"tuned baselines: no file {str(path)!r}; run `python -m training.tune_baselines`") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"tuned baselines: {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("best"), dict) or "model" not in doc or "steps" not in doc:
        raise ValueError(f"tuned baselines: {str(path)!r} lacks 'model', 'steps' or 'best'")
    return doc


def tuned_names(model_id: str, tuned_file: str | os.PathLike | None = None) -> list[str]:
    """``tuned:best`` and ``tuned:FAMILY`` for each family of the tuned file, if it was tuned for ``model_id``
    (else none: the app's list simply lacks them)."""
    try:
        doc = read_tuned(tuned_file)
    except ValueError:
        return []
    if doc["model"] != model_id:
        return []
    return [TUNED_PREFIX + f for f in doc["best"]]


def check_tuned(doc: Mapping[str, Any], model_id: str | None, steps: Sequence[int] = (),
                scheduler_config: Mapping[str, Any] | None = None, source: str = "tuned baselines") -> None:
    """Refuse a tuned file made for another model (id or scheduler config) or that lacks a K of ``steps``."""
    if model_id is not None and doc["model"] != model_id:
        raise ValueError(f"{source}: tuned for model {doc['model']!r}, not {model_id!r}; "
                         "run `python -m training.tune_baselines` for this model")
    if scheduler_config is not None and doc.get("scheduler") not in (None, scheduler_identity(scheduler_config)):
        raise ValueError(f"{source}: tuned for another scheduler config ({doc.get('scheduler')!r}, "
                         f"this model's is {scheduler_identity(scheduler_config)!r})")
    have = [int(k) for k in doc["steps"]]
    missing = [k for k in steps if int(k) not in have]
    if missing:
        raise ValueError(f"{source}: tuned for K = {have}, not K = {missing}; tune those step counts first")


def check_steps_covered(doc: Mapping[str, Any], source: str) -> list[int]:
    """The K range a tuned file covers; a file whose ``best`` lacks one of its own ``steps``: ValueError."""
    steps = [int(k) for k in doc["steps"]]
    for family, per_k in doc["best"].items():
        missing = [k for k in steps if str(k) not in per_k]
        if missing:
            raise ValueError(f"{source}: family {family!r} has no entry for K = {missing}")
    return steps


@dataclass
class TunedSolver(Solver):
    """The configuration tuned on the validation split for each step count K (a baseline name per K)."""

    name: str
    per_step: dict[int, Solver]

    def _at(self, num_steps: int) -> Solver:
        if num_steps not in self.per_step:
            raise ValueError(f"solver {self.name!r} was tuned for K = {sorted(self.per_step)}, not K = {num_steps}")
        return self.per_step[num_steps]

    def config_name(self, num_steps: int) -> str:
        """The baseline name (with its options) this solver runs at K = ``num_steps``."""
        return self._at(num_steps).name

    def iterate(self, eps_fn: EpsFn, noise: torch.Tensor, num_steps: int) -> Iterator[SamplerStep]:
        return self._at(num_steps).iterate(eps_fn, noise, num_steps)

    def nfe(self, num_steps: int) -> int:
        return self._at(num_steps).nfe(num_steps)


def tuned_solver(name: str, scheduler_config: Mapping[str, Any], tuned_file: str | os.PathLike | None = None,
                 model_id: str | None = None) -> TunedSolver:
    """``tuned:FAMILY`` or ``tuned:best`` from the tuned file (every per-K name validated here)."""
    family = name[len(TUNED_PREFIX):]
    doc = read_tuned(tuned_file)
    check_tuned(doc, model_id, scheduler_config=scheduler_config)
    if family not in doc["best"]:
        raise ValueError(f"solver {name!r}: the tuned file has {sorted(doc['best'])}, not {family!r}")
    per_step = {int(k): get_solver(entry["name"] if isinstance(entry, dict) else entry, scheduler_config)
                for k, entry in doc["best"][family].items()}
    return TunedSolver(name=name, per_step=per_step)


def tuned_sources(doc: Mapping[str, Any], steps: Sequence[int],
                  source_k: int | Mapping[int, int] | None) -> dict[int, int]:
    """{K: the K whose tuned configurations K takes} for the K that ``source_k`` names (an int: every K of
    ``steps``; a {K: S} map: its K; None: none); a source the file ``doc`` does not tune is refused, naming
    warm_start_k."""
    sources = ({} if source_k is None else dict(source_k) if isinstance(source_k, Mapping)
               else {k: source_k for k in steps})
    covered = sorted(int(k) for k in doc["steps"])
    missing = sorted(set(sources.values()) - set(covered))
    if missing:
        raise ValueError(f"warm_start_k: the tuned file tunes K = {covered}, not {missing[0]}")
    return sources


def tuned_tables(doc: Mapping[str, Any], scheduler_config: Mapping[str, Any], steps: Sequence[int],
                 order: int, nearest: bool = False,
                 source_k: int | Mapping[int, int] | None = None) -> dict[int, tuple[str, TimeGrid, torch.Tensor]]:
    """Per K of ``steps``: (name, grid, table) of the best tuned baseline (by validation PSNR, over the families'
    tuned configurations) that is exactly an eq.-10 table of order ``order`` on its grid
    (:func:`solver.coefficients.scheduler_table`); a K with none is left out. ``nearest``: a K the file does not
    tune takes the configurations tuned at the nearest K it does (the larger on a tie), run at K. ``source_k``: every K
    takes the configurations tuned at that K (which the file must tune), run at K; a {K: S} map does so for the K it
    names, the others as without it."""
    from solver.coefficients import scheduler_table

    covered = sorted(int(k) for k in doc["steps"])
    sources = tuned_sources(doc, steps, source_k)
    out: dict[int, tuple[str, TimeGrid, torch.Tensor]] = {}
    for k in steps:
        nearest_k = min(covered, key=lambda c: (abs(c - k), -c)) if nearest and covered else None
        source = sources[k] if k in sources else k if k in covered else nearest_k
        if source is None:
            continue
        entries = [v[str(source)] for f, v in doc["best"].items() if f != TUNED_BEST and str(source) in v]
        for entry in sorted(entries, key=lambda e: (-e.get("psnr", -math.inf), -e.get("ssim", -math.inf))):
            solver = get_solver(entry["name"], scheduler_config)
            try:
                grid, table = scheduler_table(solver.make_scheduler(), k, order=order)
            except ValueError:
                continue
            out[int(k)] = (entry["name"], grid, table)
            break
    return out
