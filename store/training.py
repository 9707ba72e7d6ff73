"""Solver checkpoints, training runs with per-update metrics, and offline dataset indexes.

Checkpoint weights are safetensors bytes with a sha256 over the whole blob, checked on every load;
configs and metrics are JSON. A checkpoint belongs to the model it was trained on (``model_key``,
``model_family``, the identity JSON; see ``preview.identity``). Each model has at most one active
checkpoint (``checkpoint_assignments``, keyed by model key): its own, or, when assigned explicitly
with :meth:`TrainingStore.assign_checkpoint`, one transferred from another model of the same
schedule family, which stays labelled as transferred.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from store.connection import check_text, dumps_json, utc_now
from store.errors import BlobIntegrityError, JobStateError, NotFoundError
from store.jobs import JobStore

RUN_STATES = ("running", "done", "failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class Checkpoint:
    """A solver checkpoint without its weights (load them with ``load_checkpoint_weights``)."""

    id: int
    name: str
    model_id: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    active: bool
    training_run_id: int | None
    weights_sha256: str
    created_at: str
    model_key: str | None = None
    model_family: str | None = None
    identity: dict[str, Any] | None = None


@dataclass(frozen=True)
class Assignment:
    """The checkpoint in force for one model; ``transferred``: trained on another model."""

    model_key: str
    checkpoint: Checkpoint
    transferred: bool
    assigned_at: str


def legacy_key(model_id: str) -> str:
    """The model key of a checkpoint that recorded only a model id (stores before m0004)."""
    return "embedded" if model_id == "embedded" else f"legacy:{model_id}"


@dataclass(frozen=True)
class TrainingRun:
    """A training run; ``state`` is one of :data:`RUN_STATES`."""

    id: int
    name: str | None
    config: dict[str, Any]
    state: str
    error: str | None
    created_at: str
    updated_at: str
    finished_at: str | None


@dataclass(frozen=True)
class TrainingMetric:
    """Metrics logged after one policy update."""

    run_id: int
    update_index: int
    metrics: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Dataset:
    """Index of an offline dataset (prompt, noise, full-step target) stored as shards on disk."""

    id: int
    name: str
    model_id: str
    reference_sampler: str
    prompt_file_sha256: str
    shard_paths: list[str]
    config: dict[str, Any]
    created_at: str


def _checkpoint(r: Mapping[str, Any]) -> Checkpoint:
    return Checkpoint(id=r["id"], name=r["name"], model_id=r["model_id"], config=json.loads(r["config"]),
                      metrics=json.loads(r["metrics"]), active=bool(r["active"]), training_run_id=r["training_run_id"],
                      weights_sha256=r["weights_sha256"], created_at=r["created_at"], model_key=r["model_key"],
                      model_family=r["model_family"], identity=json.loads(r["model_identity"]) or None)


def _run(r: Mapping[str, Any]) -> TrainingRun:
    return TrainingRun(id=r["id"], name=r["name"], config=json.loads(r["config"]), state=r["state"], error=r["error"],
                       created_at=r["created_at"], updated_at=r["updated_at"], finished_at=r["finished_at"])


# ``active``: the checkpoint is in force for its own model (not counting transfers to other models).
_CHECKPOINT_COLUMNS = (
    "c.id, c.name, c.model_id, c.config, c.metrics, c.training_run_id, c.weights_sha256, c.created_at, c.model_key, "
    "c.model_family, c.model_identity, EXISTS (SELECT 1 FROM checkpoint_assignments a WHERE a.checkpoint_id = c.id "
    "AND a.model_key = c.model_key AND a.transferred = 0) AS active"
)


class TrainingStore(JobStore):
    """Checkpoints, training runs and datasets."""

    # -- solver checkpoints -------------------------------------------------------------------

    def add_checkpoint(
        self,
        name: str,
        *,
        config: Mapping[str, Any],
        weights: Mapping[str, torch.Tensor],
        metrics: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        training_run_id: int | None = None,
        activate: bool = False,
        identity: Mapping[str, Any] | None = None,
    ) -> int:
        """Store a solver checkpoint (weights via safetensors, never pickle) and return its id.

        ``identity``: the model's identity dict (``preview.identity.ModelIdentity.to_dict()``: ``key``,
        ``family``, ``model_id``, ...); without it the checkpoint is keyed by ``model_id`` alone.
        ``activate``: make it the active checkpoint of that model.
        """
        check_text(name, "name", max_len=200)
        if identity is not None:
            if not isinstance(identity, Mapping) or not all(isinstance(identity.get(k), str) and identity.get(k)
                                                            for k in ("key", "family", "model_id")):
                raise ValueError("identity must be a mapping with non-empty string key, family and model_id")
            if model_id is not None and model_id != identity["model_id"]:
                raise ValueError(f"model_id {model_id!r} differs from the identity's {identity['model_id']!r}")
            model_id = identity["model_id"]
        model_key = identity["key"] if identity is not None else (legacy_key(model_id) if model_id else None)
        model_family = identity["family"] if identity is not None else None
        if activate and model_key is None:
            raise ValueError("activate: a checkpoint that records no model cannot be active for one (pass model_id or identity)")
        if not isinstance(weights, Mapping) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
        ):
            raise ValueError("weights must be a non-empty mapping of str to torch.Tensor")
        blob = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        config_json = dumps_json(dict(config), "config")
        metrics_json = dumps_json(dict(metrics or {}), "metrics")
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM solver_checkpoints WHERE name = ?", [name]).fetchone():
                raise ValueError(f"name {name!r} is already used by another solver checkpoint")
            if training_run_id is not None and not db.execute("SELECT 1 FROM training_runs WHERE id = ?", [training_run_id]).fetchone():
                raise NotFoundError("training_runs", training_run_id)
            cur = db.execute(
                "INSERT INTO solver_checkpoints (name, model_id, config, weights, weights_sha256, metrics, active, "
                "training_run_id, created_at, model_key, model_family, model_identity) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                [name, model_id, config_json, blob, hashlib.sha256(blob).hexdigest(), metrics_json, training_run_id, utc_now(),
                 model_key, model_family, dumps_json(dict(identity or {}), "identity")],
            )
            checkpoint_id = int(cur.lastrowid)  # type: ignore[arg-type]
            if activate:
                db.execute("INSERT OR REPLACE INTO checkpoint_assignments (model_key, checkpoint_id, transferred, "
                           "assigned_at) VALUES (?, ?, 0, ?)", [model_key, checkpoint_id, utc_now()])
        return checkpoint_id

    def get_checkpoint(self, checkpoint_id: int) -> Checkpoint:
        """Checkpoint ``checkpoint_id`` without weights. :raises NotFoundError:"""
        row = self.query_one(f"SELECT {_CHECKPOINT_COLUMNS} FROM solver_checkpoints c WHERE c.id = ?", [checkpoint_id])
        if row is None:
            raise NotFoundError("solver_checkpoints", checkpoint_id)
        return _checkpoint(row)

    def list_checkpoints(self, model_key: str | None = None) -> list[Checkpoint]:
        """All checkpoints (or those trained on the model ``model_key``) with their metrics, newest first."""
        if model_key is None:
            return [_checkpoint(r) for r in self.query(f"SELECT {_CHECKPOINT_COLUMNS} FROM solver_checkpoints c ORDER BY c.id DESC")]
        return [_checkpoint(r) for r in self.query(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM solver_checkpoints c WHERE c.model_key = ? ORDER BY c.id DESC", [model_key])]

    def load_checkpoint_weights(self, checkpoint_id: int) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, after checking the blob's sha256. :raises BlobIntegrityError:"""
        row = self.query_one("SELECT id, weights, weights_sha256 FROM solver_checkpoints WHERE id = ?", [checkpoint_id])
        if row is None:
            raise NotFoundError("solver_checkpoints", checkpoint_id)
        digest = hashlib.sha256(row["weights"]).hexdigest()
        if digest != row["weights_sha256"]:
            raise BlobIntegrityError("solver_checkpoints", checkpoint_id,
                                     f"weights sha256 {digest[:12]}... does not match the stored {row['weights_sha256'][:12]}...")
        return safetensors.torch.load(row["weights"])

    def set_checkpoint_metrics(self, checkpoint_id: int, metrics: Mapping[str, Any]) -> None:
        """Replace a checkpoint's metrics (e.g. after evaluation)."""
        metrics_json = dumps_json(dict(metrics), "metrics")
        with self.transaction() as db:
            cur = db.execute("UPDATE solver_checkpoints SET metrics = ? WHERE id = ?", [metrics_json, checkpoint_id])
            if cur.rowcount == 0:
                raise NotFoundError("solver_checkpoints", checkpoint_id)

    def set_active_checkpoint(self, checkpoint_id: int | None, *, model_key: str | None = None) -> None:
        """Make ``checkpoint_id`` the active checkpoint of the model it was trained on (one transaction).

        ``None`` with ``model_key``: no checkpoint active for that model; ``None`` alone: none for any.
        """
        if checkpoint_id is None:
            with self.transaction() as db:
                if model_key is None:
                    db.execute("DELETE FROM checkpoint_assignments")
                else:
                    db.execute("DELETE FROM checkpoint_assignments WHERE model_key = ?", [model_key])
            return
        ckpt = self.get_checkpoint(checkpoint_id)
        if ckpt.model_key is None:
            raise ValueError(f"checkpoint_id: checkpoint #{checkpoint_id} records no model, so it cannot be active for one")
        if model_key is not None and model_key != ckpt.model_key:
            raise ValueError(f"model_key: checkpoint #{checkpoint_id} was trained for {ckpt.model_id}; "
                             "use assign_checkpoint to use it for another model")
        self._assign(ckpt.model_key, checkpoint_id, transferred=False)

    def assign_checkpoint(self, checkpoint_id: int, model_key: str, *, family: str) -> bool:
        """Use checkpoint ``checkpoint_id`` for the model ``model_key`` (of schedule ``family``).

        Returns whether this is a transfer (the checkpoint was trained on another model). A transfer
        is recorded as such; one across schedule families is refused, and nothing is written.
        """
        check_text(model_key, "model_key", max_len=1000)
        ckpt = self.get_checkpoint(checkpoint_id)
        transferred = ckpt.model_key != model_key
        if transferred:
            if ckpt.model_family is None:
                raise ValueError(f"checkpoint_id: checkpoint #{checkpoint_id} records no schedule family (an older "
                                 "checkpoint), so it cannot be transferred to another model")
            if ckpt.model_family != family:
                raise ValueError(f"checkpoint_id: checkpoint #{checkpoint_id} was trained on a {ckpt.model_family} model "
                                 f"({ckpt.model_id}); this model is {family}, another schedule family")
        self._assign(model_key, checkpoint_id, transferred=transferred)
        return transferred

    def _assign(self, model_key: str, checkpoint_id: int, *, transferred: bool) -> None:
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM solver_checkpoints WHERE id = ?", [checkpoint_id]).fetchone():
                raise NotFoundError("solver_checkpoints", checkpoint_id)
            db.execute("INSERT OR REPLACE INTO checkpoint_assignments (model_key, checkpoint_id, transferred, assigned_at) "
                       "VALUES (?, ?, ?, ?)", [model_key, checkpoint_id, int(transferred), utc_now()])

    def get_assignment(self, *model_keys: str) -> Assignment | None:
        """The checkpoint in force for the first of ``model_keys`` that has one, or ``None``."""
        for key in model_keys:
            row = self.query_one("SELECT checkpoint_id, transferred, assigned_at FROM checkpoint_assignments "
                                 "WHERE model_key = ?", [key])
            if row is not None:
                return Assignment(key, self.get_checkpoint(row["checkpoint_id"]), bool(row["transferred"]),
                                  row["assigned_at"])
        return None

    def list_assignments(self) -> list[Assignment]:
        """Every model's checkpoint in force, newest assignment first."""
        rows = self.query("SELECT model_key FROM checkpoint_assignments ORDER BY assigned_at DESC, rowid DESC")
        return [a for a in (self.get_assignment(r["model_key"]) for r in rows) if a is not None]

    def get_active_checkpoint(self, model_key: str | None = None) -> Checkpoint | None:
        """The checkpoint in force for ``model_key`` (``None``: the most recently activated one of any model)."""
        if model_key is not None:
            found = self.get_assignment(model_key)
            return None if found is None else found.checkpoint
        assignments = self.list_assignments()
        return assignments[0].checkpoint if assignments else None

    # -- training runs ------------------------------------------------------------------------

    def start_training_run(self, config: Mapping[str, Any], *, name: str | None = None) -> int:
        """Record a new training run in state ``running`` and return its id."""
        if name is not None:
            check_text(name, "name", max_len=200)
        config_json = dumps_json(dict(config), "config")
        now = utc_now()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO training_runs (name, config, state, created_at, updated_at) VALUES (?, ?, 'running', ?, ?)",
                [name, config_json, now, now],
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def finish_training_run(self, run_id: int, state: str, *, error: str | None = None) -> None:
        """End a running run as done / failed / cancelled / interrupted. :raises JobStateError:"""
        if state not in RUN_STATES[1:]:
            raise ValueError(f"state must be one of {', '.join(RUN_STATES[1:])}, got {state!r}")
        with self.transaction() as db:
            row = db.execute("SELECT state FROM training_runs WHERE id = ?", [run_id]).fetchone()
            if row is None:
                raise NotFoundError("training_runs", run_id)
            if row[0] != "running":
                raise JobStateError(f"training run {run_id} is {row[0]}, so it cannot become {state}")
            now = utc_now()
            db.execute("UPDATE training_runs SET state = ?, error = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                       [state, error, now, now, run_id])

    def get_training_run(self, run_id: int) -> TrainingRun:
        """Training run ``run_id``. :raises NotFoundError:"""
        row = self.query_one("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if row is None:
            raise NotFoundError("training_runs", run_id)
        return _run(row)

    def list_training_runs(self) -> list[TrainingRun]:
        """All training runs, newest first."""
        return [_run(r) for r in self.query("SELECT * FROM training_runs ORDER BY id DESC")]

    def log_training_metrics(self, run_id: int, update_index: int, metrics: Mapping[str, Any]) -> None:
        """Record the metrics of update ``update_index`` of a running run (each index once)."""
        if isinstance(update_index, bool) or not isinstance(update_index, int) or update_index < 0:
            raise ValueError(f"update_index must be a non-negative integer, got {update_index!r}")
        metrics_json = dumps_json(dict(metrics), "metrics")
        with self.transaction() as db:
            row = db.execute("SELECT state FROM training_runs WHERE id = ?", [run_id]).fetchone()
            if row is None:
                raise NotFoundError("training_runs", run_id)
            if row[0] != "running":
                raise JobStateError(f"training run {run_id} is {row[0]}, so no metrics can be added")
            if db.execute("SELECT 1 FROM training_metrics WHERE run_id = ? AND update_index = ?", [run_id, update_index]).fetchone():
                raise ValueError(f"update_index {update_index} is already logged for training run {run_id}")
            now = utc_now()
            db.execute("INSERT INTO training_metrics (run_id, update_index, metrics, created_at) VALUES (?, ?, ?, ?)",
                       [run_id, update_index, metrics_json, now])
            db.execute("UPDATE training_runs SET updated_at = ? WHERE id = ?", [now, run_id])

    def training_metrics(self, run_id: int) -> list[TrainingMetric]:
        """All metrics of a run in update order. :raises NotFoundError: unknown run."""
        self.get_training_run(run_id)
        rows = self.query("SELECT * FROM training_metrics WHERE run_id = ? ORDER BY update_index", [run_id])
        return [TrainingMetric(run_id=r["run_id"], update_index=r["update_index"], metrics=json.loads(r["metrics"]),
                               created_at=r["created_at"]) for r in rows]

    # -- datasets -----------------------------------------------------------------------------

    def add_dataset(
        self,
        name: str,
        *,
        model_id: str,
        reference_sampler: str,
        prompt_file_sha256: str,
        shard_paths: Sequence[str],
        config: Mapping[str, Any] | None = None,
    ) -> int:
        """Index an offline dataset (its shards stay on disk) and return its id."""
        check_text(name, "name", max_len=200)
        check_text(model_id, "model_id", max_len=1000)
        check_text(reference_sampler, "reference_sampler", max_len=1000)
        if not isinstance(prompt_file_sha256, str) or len(prompt_file_sha256) != 64:
            raise ValueError("prompt_file_sha256 must be a 64-character sha256 hex digest")
        if isinstance(shard_paths, str) or not all(isinstance(p, str) and p for p in shard_paths):
            raise ValueError("shard_paths must be a list of non-empty path strings")
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM datasets WHERE name = ?", [name]).fetchone():
                raise ValueError(f"name {name!r} is already used by another dataset")
            cur = db.execute(
                "INSERT INTO datasets (name, model_id, reference_sampler, prompt_file_sha256, shard_paths, config, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [name, model_id, reference_sampler, prompt_file_sha256, dumps_json(list(shard_paths), "shard_paths"),
                 dumps_json(dict(config or {}), "config"), utc_now()],
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def get_dataset(self, name_or_id: str | int) -> Dataset:
        """A dataset by name or id. :raises NotFoundError:"""
        column = "id" if isinstance(name_or_id, int) else "name"
        row = self.query_one(f"SELECT * FROM datasets WHERE {column} = ?", [name_or_id])
        if row is None:
            raise NotFoundError("datasets", name_or_id)
        return Dataset(id=row["id"], name=row["name"], model_id=row["model_id"], reference_sampler=row["reference_sampler"],
                       prompt_file_sha256=row["prompt_file_sha256"], shard_paths=json.loads(row["shard_paths"]),
                       config=json.loads(row["config"]), created_at=row["created_at"])

    def list_datasets(self) -> list[Dataset]:
        """All datasets, newest first."""
        return [self.get_dataset(r["id"]) for r in self.query("SELECT id FROM datasets ORDER BY id DESC")]
