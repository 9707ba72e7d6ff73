"""Which solver a preview runs: a registry name, or ``consistency`` = the learned policy in force.

``consistency`` resolves, in order, to
1. the active solver checkpoint in the store (config JSON + safetensors weights),
2. the checkpoint shipped with the code, if one exists (see :data:`SHIPPED_CHECKPOINT_DIRS`),
3. the zero-initialised policy, which is exactly its analytic base rule (DPM-Solver-2 in eq. 10 form).
The resolution is recorded with every preview (``checkpoint_id`` and a ``Preview solver`` PNG field).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

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


def shipped_checkpoint_dir() -> Path | None:
    for d in SHIPPED_CHECKPOINT_DIRS:
        if (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file():
            return d
    return None


def resolve_policy(store: Any) -> tuple[ConsistencyPolicy, str, int | None]:
    """(policy, description, checkpoint id) for the name ``consistency``."""
    active = None if store is None else store.get_active_checkpoint()
    if active is not None:
        key = (active.id, active.weights_sha256, json.dumps(active.config, sort_keys=True))
        policy = _POLICY_CACHE.get(key)
        if policy is None:
            policy = policy_from_checkpoint(active.config, store.load_checkpoint_weights(active.id)).eval()
            _POLICY_CACHE.clear()  # keep only the checkpoint in force
            _POLICY_CACHE[key] = policy
        return policy, f"consistency checkpoint #{active.id} {active.name}", active.id
    shipped = shipped_checkpoint_dir()
    if shipped is not None:
        return ConsistencyPolicy.load(shipped).eval(), f"consistency shipped {shipped.relative_to(_REPO) if shipped.is_relative_to(_REPO) else shipped}", None
    policy = ConsistencyPolicy().eval()
    return policy, f"consistency zero-init (= rule:{policy.base})", None


def resolve_solver(name: str, model: Any, store: Any) -> ResolvedSolver:
    """The solver for a validated ``name`` on ``model``'s schedule."""
    if name == CONSISTENCY:
        policy, description, checkpoint_id = resolve_policy(store)
        return ResolvedSolver(get_solver(CONSISTENCY, model.scheduler_config, policy=policy), CONSISTENCY,
                              description, checkpoint_id)
    try:
        solver = get_solver(name, model.scheduler_config)
    except ValueError as exc:  # consistency:PATH with no checkpoint there
        raise ValueError(f"solver: {exc}") from None
    return ResolvedSolver(solver, name, name)
