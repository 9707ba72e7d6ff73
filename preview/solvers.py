"""Which solver a preview runs: a registry name, or ``consistency`` = the learned policy in force
for the loaded model (design contract 7: a learned policy belongs to the model it was trained on).

``consistency`` resolves, in order, to
1. the checkpoint in force for the loaded model in the store (its own active checkpoint, or one
   explicitly assigned from another model of the same schedule family: "transferred from A"),
   matched by :func:`preview.identity.model_identity` (and, for checkpoints migrated from older
   stores, by model id);
2. a checkpoint shipped with the code *for that model*: a folder of :data:`SHIPPED_CHECKPOINT_DIRS`
   whose ``model_identity.json`` matches (a shipped folder without one is the embedded model's);
3. the zero-initialised policy, which is exactly its analytic base rule (DPM-Solver-2 in eq. 10 form).
``consistency:PATH`` loads the policy saved in PATH: used as "transferred" when PATH records another
model of the same schedule family, refused across families.
The resolution is recorded with every preview (``checkpoint_id`` and the ``Preview solver`` PNG
field, in words: "ConsistencySolver, not yet trained for this model: runs DPM-Solver-2").
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from preview.identity import EMBEDDED_ID, ModelIdentity, model_identity, read_identity, short_name
from solver.policy import CONFIG_NAME, WEIGHTS_NAME, ConsistencyPolicy
from solver.registry import CONSISTENCY, Solver, get_solver

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent
SHIPPED_CHECKPOINT_DIRS = (
    _REPO / "solver" / "checkpoints" / "default",
    _REPO / "training" / "checkpoints" / "default",
)


_POLICY_CACHE: dict[tuple[int, str, str], ConsistencyPolicy] = {}  # (id, weights sha256, config) -> policy


@dataclass(frozen=True)
class ResolvedSolver:
    solver: Solver
    label: str  # stored in previews.solver
    description: str  # stored in the PNG parameters
    checkpoint_id: int | None = None


def policy_from_checkpoint(config: dict, weights: dict) -> ConsistencyPolicy:
    """Rebuild a stored policy through :meth:`ConsistencyPolicy.load`, so its schema checks apply."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(tmp) / WEIGHTS_NAME))
        return ConsistencyPolicy.load(tmp)


RULE_WORDS = {"dpm2m": "DPM-Solver-2", "ddim": "DDIM", "ab1": "Adams-Bashforth 1 (DDIM)", "ab2": "Adams-Bashforth 2",
              "ab3": "Adams-Bashforth 3", "ab4": "Adams-Bashforth 4", "ipndm": "iPNDM"}


def shipped_checkpoint_dir(identity: ModelIdentity | None = None) -> Path | None:
    """The shipped checkpoint folder for the model ``identity`` (None: the first shipped folder).

    A shipped folder applies to the model its ``model_identity.json`` names; one without the file
    was trained on the embedded model.
    """
    for d in SHIPPED_CHECKPOINT_DIRS:
        if not ((d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()):
            continue
        if identity is None:
            return d
        recorded = read_identity(d)
        key = recorded.key if recorded is not None else EMBEDDED_ID
        if key == identity.key:
            return d
    return None


def display_path(path: Path) -> str:
    return str(path.relative_to(_REPO)) if path.is_relative_to(_REPO) else str(path)


def check_transfer(recorded: ModelIdentity | None, identity: ModelIdentity, where: str) -> str | None:
    """None when ``recorded`` is the loaded model; else the model it was trained on (a transfer),
    after refusing one across schedule families."""
    if recorded is None or recorded.key == identity.key:
        return None
    if recorded.family != identity.family:
        raise ValueError(f"solver: {where} was trained on {short_name(recorded)}, a {recorded.family} model; the loaded "
                         f"model {short_name(identity)} is {identity.family}, another schedule family, so it cannot be used")
    return short_name(recorded)


def resolve_policy(store: Any, model: Any) -> tuple[ConsistencyPolicy, str, int | None]:
    """(policy, description in words, checkpoint id) for the name ``consistency`` on ``model``."""
    identity = model_identity(model)
    found = None if store is None else store.get_assignment(identity.key, identity.legacy_key)
    if found is not None:
        active = found.checkpoint
        if found.transferred and active.model_family not in (None, identity.family):  # the store checked; re-check
            raise ValueError(f"solver: checkpoint #{active.id} is a {active.model_family} policy; this model is {identity.family}")
        key = (active.id, active.weights_sha256, json.dumps(active.config, sort_keys=True))
        policy = _POLICY_CACHE.get(key)
        if policy is None:
            policy = policy_from_checkpoint(active.config, store.load_checkpoint_weights(active.id)).eval()
            _POLICY_CACHE.clear()  # keep only the checkpoint in force
            _POLICY_CACHE[key] = policy
        how = f"transferred from {short_name(active.model_id or '?')}" if found.transferred else "trained for this model"
        return policy, f"ConsistencySolver checkpoint #{active.id} {active.name}, {how}", active.id
    shipped = shipped_checkpoint_dir(identity)
    if shipped is not None:
        return ConsistencyPolicy.load(shipped).eval(), f"ConsistencySolver shipped {display_path(shipped)}, trained for this model", None
    policy = ConsistencyPolicy().eval()
    return policy, zero_description(policy.base), None


def zero_description(base: str) -> str:
    return (f"ConsistencySolver, not yet trained for this model: runs {RULE_WORDS.get(base, base)} "
            f"(the zero-initialised policy, = rule:{base})")


def resolve_path_policy(path: str, model: Any) -> tuple[ConsistencyPolicy, str]:
    """The policy saved in folder ``path`` and its description; refused across schedule families."""
    identity = model_identity(model)
    policy = ConsistencyPolicy.load(path).eval()
    recorded = read_identity(path)
    source = check_transfer(recorded, identity, f"the checkpoint in {path}")
    if recorded is None:
        how = "records no model (trained before checkpoints recorded one)"
    else:
        how = "trained for this model" if source is None else f"transferred from {source}"
    return policy, f"ConsistencySolver from {path}, {how}"


def resolve_solver(name: str, model: Any, store: Any, size: tuple[int, int] | None = None) -> ResolvedSolver:
    """The solver for a validated ``name`` on ``model``'s schedule for images of ``size`` = (height, width)
    (FLUX's and dynamically shifted SD3's time grids depend on the size: ``Denoiser.scheduler_config_for``)."""
    config = model.scheduler_config if size is None else model.scheduler_config_for(*size)
    if name == CONSISTENCY:
        policy, description, checkpoint_id = resolve_policy(store, model)
        return ResolvedSolver(get_solver(CONSISTENCY, config, policy=policy), CONSISTENCY,
                              description, checkpoint_id)
    if name.startswith(CONSISTENCY + ":"):
        try:
            policy, description = resolve_path_policy(name[len(CONSISTENCY) + 1:], model)
        except ValueError as exc:
            raise ValueError(str(exc) if str(exc).startswith("solver:") else f"solver: {exc}") from None
        return ResolvedSolver(get_solver(CONSISTENCY, config, policy=policy), name, description)
    try:
        solver = get_solver(name, config)
    except ValueError as exc:  # consistency:PATH with no checkpoint there
        raise ValueError(f"solver: {exc}") from None
    return ResolvedSolver(solver, name, name)
