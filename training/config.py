"""The PPO trainer's configuration: one typed dataclass, every field documented, saved with each checkpoint.

Field documentation lives in ``field(metadata={"doc": ...})`` so that the command line (``--help``) and
every checkpoint's ``train_config.json`` carry the same text (style.md 10.10).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from runtime.cli import add_db_option, add_model_options

MAX_PREVIEW_STEPS = 50  # the preview range 1..50 of the engine


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass
class TrainConfig:
    """PPO on the ConsistencySolver policy (paper.md 3, without the defects of 6.4)."""

    # -- data and model ----------------------------------------------------------------------
    dataset: str = doc("folder of an offline dataset built by `python -m training.dataset` (holds index.json)", "")
    model: str | None = doc("model name or path (models.registry.load_model); None = the embedded default", None)
    out: str = doc("folder for checkpoints (checkpoint-XXXXX/ and final/); resumed from if it holds one", "runs/ppo")
    store: str | None = doc("SQLite store file for runs, per-update metrics and checkpoints; '' = no store; None = default path", None)
    # -- policy ------------------------------------------------------------------------------
    order: int = doc("LMM order m: past epsilons one step may combine (paper: 4)", 4)
    base: str = doc("analytic base rule the zero-initialised policy equals (solver.coefficients.RULES)", "dpm2m")
    hidden: int = doc("width of the policy MLP's two hidden layers", 64)
    init_log_std: float = doc("initial log standard deviation of the Gaussian on the residual coefficients", -3.0)
    time_grid: bool = doc("also learn the time grid (the policy's second head); rollouts then use per-sample timesteps", False)
    init_from: str | None = doc("start from this policy checkpoint folder instead of the zero-initialised policy", None)
    tables_only: bool = doc("train only the own tables (solver.policy step_tables) of min_steps..max_steps, added "
                            "at zero where the policy has none: the shared heads, the exploration noise and every "
                            "other K's previews stay exactly as they are", False)
    explore_log_std: float | None = doc("set the policy's exploration log std (coefficients and time grid) to this "
                                        "before training; None = keep the policy's (init_log_std for a new or "
                                        "distilled one)", None)
    # -- rollouts ----------------------------------------------------------------------------
    group_size: int = doc("G: previews of the same (prompt, noise) per group; advantages are normalised within it", 8)
    groups_per_update: int = doc("groups (distinct prompt/noise pairs) per update, per process", 4)
    min_steps: int = doc("smallest step count K drawn per group", 3)
    max_steps: int = doc("largest step count K drawn per group", 8)
    reward: str | None = doc("similarity spec (training.rewards), e.g. 'h1_psnr' or 'psnr+10*gms'; None = the model's default", None)
    reward_weights: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "model-based reward -> local folder or hub id of its weights (NAME=PATH,...)"}
    )
    allow_download: bool = doc("let model-based rewards download weights (otherwise local files only)", False)
    # -- PPO ---------------------------------------------------------------------------------
    num_updates: int = doc("policy updates (each = one batch of rollouts + update_epochs passes)", 200)
    update_epochs: int = doc("passes over each batch; >= 2 so the clipped surrogate can bind (paper.md T1)", 4)
    num_minibatches: int = doc("minibatches per epoch (rollouts are split evenly)", 2)
    learning_rate: float = doc("Adam learning rate", 3e-3)
    clip_coef: float = doc("PPO ratio clip epsilon", 0.2)
    ent_coef: float = doc("entropy bonus coefficient (entropy over the free coefficients only)", 0.0)
    max_grad_norm: float = doc("gradient-norm clip", 1.0)
    adv_eps: float = doc("delta in A = (R - mean) / (std + delta) within a group", 1e-6)
    target_kl: float | None = doc("stop an update's epochs early once approx KL exceeds this (None = never)", None)
    # -- bookkeeping -------------------------------------------------------------------------
    seed: int = doc("seed of data order, K draws and policy noise (rank r uses seed + 1000 r)", 0)
    checkpoint_every: int = doc("save a checkpoint every N updates (and at the end)", 25)
    log_every: int = doc("write per-update metrics to the store every N updates", 1)
    activate: bool = doc("make the final checkpoint the store's active solver", False)
    name: str | None = doc("run name in the store (default: derived from the out folder)", None)
    max_minutes: float | None = doc("stop (and checkpoint) after this many minutes of wall time", None)
    threads: int | None = doc("torch intra-op threads (1 is fastest on a shared 2-core CPU); None = torch's default", None)

    def validate(self) -> "TrainConfig":
        """Raise one ValueError naming the field for any bad value; return self."""
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        for name in ("hidden", "groups_per_update", "num_updates", "num_minibatches", "checkpoint_every", "log_every"):
            positive_int(name)
        positive_int("group_size", 2)
        positive_int("update_epochs", 2)
        for name in ("min_steps", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PREVIEW_STEPS:
                raise ValueError(f"{name} must be an integer in 1..{MAX_PREVIEW_STEPS}, got {v!r}")
        if self.min_steps < 2:
            raise ValueError(f"min_steps must be >= 2 for training: a 1-step sample has no free coefficient, got {self.min_steps}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if self.num_minibatches > self.group_size:
            raise ValueError(f"num_minibatches ({self.num_minibatches}) must not exceed group_size ({self.group_size}), "
                             f"so every minibatch holds rollouts of every step count")
        for name in ("learning_rate", "clip_coef", "max_grad_norm", "adv_eps"):
            check_positive_number(name, getattr(self, name))
        if not math.isfinite(self.ent_coef) or self.ent_coef < 0:
            raise ValueError(f"ent_coef must be a non-negative finite number, got {self.ent_coef!r}")
        if not math.isfinite(self.init_log_std):
            raise ValueError(f"init_log_std must be finite, got {self.init_log_std!r}")
        if self.explore_log_std is not None and (isinstance(self.explore_log_std, bool)
                                                 or not math.isfinite(self.explore_log_std)):
            raise ValueError(f"explore_log_std must be a finite number or None, got {self.explore_log_std!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes!r}")
        if not self.dataset:
            raise ValueError("dataset must name a dataset folder built by `python -m training.dataset`")
        return self

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> documentation (saved beside the values in each checkpoint)."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def check_positive_number(name: str, value: Any) -> None:
    """Refuse ``value`` for field ``name`` unless it is a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _parse_mapping(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"expected NAME=PATH[,NAME=PATH...], got {text!r}")
        out[key.strip()] = value.strip()
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per dataclass field, typed, with the field's doc as help.

    The fields ``model`` and ``store`` get the options every CLI shares (``runtime.cli``): ``--model`` with
    the model-loading options, and ``--db`` (``--store`` a deprecated alias) into ``store``.
    """
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        help_text = f"{f.metadata.get('doc', '')} (default: {default!r})"
        annotation = str(f.type)
        if f.name == "model":
            add_model_options(parser)
        elif f.name == "store":
            add_db_option(parser, dest="store", default=default, help=help_text)
        elif annotation == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif annotation.startswith("dict"):
            parser.add_argument(flag, dest=f.name, type=_parse_mapping, default=default, help=help_text)
        else:
            base = annotation.split("|")[0].strip()
            kind = {"int": int, "float": float, "str": str}[base]
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the parsed options of :func:`add_dataclass_arguments` (the shared model
    loading options, which are not fields, stay in ``args`` for ``runtime.cli.model_from_args``)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
