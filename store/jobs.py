"""Refine jobs: an explicit state machine where every transition is one transaction.

States and the transitions allowed between them (anything else raises :class:`JobStateError`)::

    queued ──claim──> running ──finish──> done | failed | cancelled
      │                  │ └──recover_interrupted (process died)──> interrupted ──> queued (restarts + 1)
      │                  └──interrupt_job (clean shutdown)───────┘             └──> failed (too many restarts)
      └──cancel──> cancelled
    failed | cancelled ──retry──> queued

Each transition also appends a row to ``refine_job_events`` (the job's state history), in the
same transaction. ``claim_next_job`` (the oldest queued job) and ``claim_job`` (one given job)
read and update under ``BEGIN IMMEDIATE``, so two workers (threads or processes) never claim the
same job. A job is never marked ``done`` without its
final image: :meth:`JobStore.finish_job` writes both in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils
from PIL import Image

from store.connection import DEFAULT_OWNER, check_owner, check_positive_int, check_text, dumps_json, utc_now
from store.errors import JobStateError, NotFoundError
from store.history import MAX_LIST, MAX_STEPS, HistoryStore, _sha256, check_timings
from store.png import encode_png

JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"done", "failed", "cancelled", "interrupted"}),
    "interrupted": frozenset({"queued", "failed", "cancelled"}),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
    "done": frozenset(),
}
FINISHED_STATES = ("done", "failed", "cancelled")
CRASH_NOTE = "the process stopped while it ran"  # recover_interrupted's history note: a crash, not a clean stop


@dataclass(frozen=True)
class Job:
    """A refine job row. Progress is ``progress_step`` of ``steps``."""

    id: int
    owner: str
    generation_id: int
    preview_id: int | None
    steps: int
    solver: str
    state: str
    progress_step: int
    cancel_requested: bool
    restarts: int
    device: str | None
    error: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's state history (``from_state`` is ``None`` for the enqueue)."""

    id: int
    job_id: int
    from_state: str | None
    to_state: str
    note: str | None
    at: str


@dataclass(frozen=True)
class JobStamp:
    """What changes when a job moves: a poller redraws a job only when its stamp changed."""

    id: int
    state: str
    progress_step: int
    restarts: int
    updated_at: str


def _check_max_restarts(max_restarts: Any) -> None:
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be a non-negative integer, got {max_restarts!r}")


def _job(row: Mapping[str, Any]) -> Job:
    values = {f: row[f] for f in Job.__dataclass_fields__}
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)


class JobStore(HistoryStore):
    """Refine job queue and state transitions."""

    def _job_row(self, db: sqlite_utils.Database, job_id: int) -> dict[str, Any]:
        cur = db.execute("SELECT * FROM refine_jobs WHERE id = ?", [job_id])
        row = cur.fetchone()
        if row is None:
            raise NotFoundError("refine_jobs", job_id)
        return dict(zip([d[0] for d in cur.description], row))

    def _move(
        self, db: sqlite_utils.Database, job: Mapping[str, Any], to_state: str, note: str | None = None, **updates: Any
    ) -> None:
        """Check and apply one transition inside the caller's transaction, with its history row."""
        from_state = job["state"]
        if to_state not in TRANSITIONS[from_state]:
            raise JobStateError(f"refine job {job['id']} cannot go from {from_state} to {to_state}")
        now = utc_now()
        updates = {"state": to_state, "updated_at": now, **updates}
        sets = ", ".join(f"{k} = ?" for k in updates)
        db.execute(f"UPDATE refine_jobs SET {sets} WHERE id = ?", [*updates.values(), job["id"]])
        db.execute(
            "INSERT INTO refine_job_events (job_id, from_state, to_state, note, at) VALUES (?, ?, ?, ?, ?)",
            [job["id"], from_state, to_state, note, now],
        )

    def enqueue_job(
        self, generation_id: int, *, steps: int, solver: str, preview_id: int | None = None, owner: str | None = None
    ) -> int:
        """Queue a refine of ``generation_id`` (optionally from ``preview_id``); returns the job id.

        ``owner`` defaults to the generation's owner.
        """
        check_positive_int(steps, "steps", MAX_STEPS)
        check_text(solver, "solver", max_len=200)
        with self.transaction() as db:
            gen = db.execute("SELECT owner FROM generations WHERE id = ?", [generation_id]).fetchone()
            if gen is None:
                raise NotFoundError("generations", generation_id)
            if preview_id is not None:
                prev = db.execute("SELECT generation_id FROM previews WHERE id = ?", [preview_id]).fetchone()
                if prev is None:
                    raise NotFoundError("previews", preview_id)
                if prev[0] != generation_id:
                    raise ValueError(f"preview_id {preview_id} belongs to generation {prev[0]}, not {generation_id}")
            now = utc_now()
            cur = db.execute(
                "INSERT INTO refine_jobs (owner, generation_id, preview_id, steps, solver, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                [check_owner(owner or gen[0]), generation_id, preview_id, steps, solver, now, now],
            )
            job_id = int(cur.lastrowid)  # type: ignore[arg-type]
            db.execute(
                "INSERT INTO refine_job_events (job_id, from_state, to_state, note, at) VALUES (?, NULL, 'queued', 'enqueued', ?)",
                [job_id, now],
            )
        return job_id

    def _claim(self, db: sqlite_utils.Database, job: Mapping[str, Any], device: str) -> None:
        """queued -> running on ``device``, inside the caller's transaction."""
        self._move(db, job, "running", f"claimed on {device}", device=device, started_at=utc_now(), progress_step=0,
                   error=None, finished_at=None)

    def claim_next_job(self, device: str) -> Job | None:
        """Atomically move the oldest queued job to ``running`` on ``device``; ``None`` if none is queued."""
        check_text(device, "device", max_len=200)
        with self.transaction() as db:
            cur = db.execute("SELECT id FROM refine_jobs WHERE state = 'queued' ORDER BY id LIMIT 1")
            row = cur.fetchone()
            if row is None:
                return None
            job = self._job_row(db, row[0])
            self._claim(db, job, device)
            job_id = job["id"]
        return self.get_job(job_id)

    def claim_job(self, job_id: int, device: str) -> Job:
        """Atomically move the queued job ``job_id`` to ``running`` on ``device`` (older queued jobs stay queued).

        :raises JobStateError: the job is not queued (another worker claimed it, or it was cancelled...);
            the message names the job and its state. :raises NotFoundError: no such job.
        """
        check_text(device, "device", max_len=200)
        with self.transaction() as db:
            job = self._job_row(db, job_id)
            if job["state"] != "queued":
                raise JobStateError(f"refine job {job_id} is {job['state']}, not queued, so it cannot be claimed")
            self._claim(db, job, device)
        return self.get_job(job_id)

    def update_job_progress(self, job_id: int, step: int) -> bool:
        """Record that a running job finished ``step`` of its steps; returns whether cancel was requested.

        :raises JobStateError: the job is not running. :raises ValueError: ``step`` out of [0, steps].
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an integer, got {step!r}")
        with self.transaction() as db:
            job = self._job_row(db, job_id)
            if job["state"] != "running":
                raise JobStateError(f"refine job {job_id} is {job['state']}, so its progress cannot be updated")
            if not 0 <= step <= job["steps"]:
                raise ValueError(f"step must be in [0, {job['steps']}] for refine job {job_id}, got {step}")
            db.execute("UPDATE refine_jobs SET progress_step = ?, updated_at = ? WHERE id = ?", [step, utc_now(), job_id])
            return bool(job["cancel_requested"])

    def request_cancel(self, job_id: int) -> str:
        """Cancel a job: a queued one is cancelled now, a running one gets a flag its worker checks.

        Returns the job's state afterwards (``cancelled`` or ``running``); cancelling a cancelled
        job is a no-op.

        :raises JobStateError: the job is already done or failed.
        """
        with self.transaction() as db:
            job = self._job_row(db, job_id)
            if job["state"] == "cancelled":
                return "cancelled"
            if job["state"] == "running":
                db.execute("UPDATE refine_jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", [utc_now(), job_id])
                db.execute(
                    "INSERT INTO refine_job_events (job_id, from_state, to_state, note, at) VALUES (?, 'running', 'running', 'cancel requested', ?)",
                    [job_id, utc_now()],
                )
                return "running"
            if job["state"] in ("done", "failed"):
                raise JobStateError(f"refine job {job_id} is already {job['state']}, so it cannot be cancelled")
            self._move(db, job, "cancelled", "cancelled before it ran", finished_at=utc_now())
            return "cancelled"

    def finish_job(
        self,
        job_id: int,
        state: str,
        *,
        error: str | None = None,
        image: Image.Image | None = None,
        timings_ms: Mapping[str, float] | None = None,
        extra_params: Mapping[str, Any] | None = None,
    ) -> int | None:
        """End a running job as ``done`` (with its final ``image``), ``failed`` (with ``error``) or ``cancelled``.

        For ``done`` the final PNG (with A1111 parameters) is stored in the same transaction and
        its id returned; otherwise returns ``None``.

        :raises JobStateError: the job is not running. :raises ValueError: missing image / error.
        """
        if state not in FINISHED_STATES:
            raise ValueError(f"state must be one of {', '.join(FINISHED_STATES)}, got {state!r}")
        if (state == "done") != (image is not None):
            raise ValueError("image is required for state 'done' and only for it")
        if state == "failed":
            check_text(error, "error", max_len=100_000)
        png = None
        timings = check_timings(timings_ms or {})
        job = self.get_job(job_id)
        if state == "done":
            generation = self.get_generation(job.generation_id)
            params = self.png_parameters(generation, solver=job.solver, steps=job.steps, extra=extra_params)
            png = encode_png(image, params)  # type: ignore[arg-type]
        with self.transaction() as db:
            row = self._job_row(db, job_id)
            now = utc_now()
            updates: dict[str, Any] = {"finished_at": now, "error": error}
            if state == "done":
                updates["progress_step"] = row["steps"]
            self._move(db, row, state, None, **updates)
            if png is None:
                return None
            cur = db.execute(
                "INSERT INTO finals (owner, job_id, png, png_sha256, timings_ms, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [row["owner"], job_id, png, _sha256(png), dumps_json(timings, "timings_ms"), now],
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def retry_job(self, job_id: int) -> None:
        """Queue a failed or cancelled job again (progress, error and cancel flag are reset)."""
        with self.transaction() as db:
            job = self._job_row(db, job_id)
            self._move(db, job, "queued", "retry", progress_step=0, error=None, cancel_requested=0,
                       device=None, started_at=None, finished_at=None)

    def recover_interrupted(self, *, max_restarts: int = 3) -> list[int]:
        """On start-up: every ``running`` job becomes ``interrupted`` and is queued again.

        Its ``restarts`` count goes up by one and its history shows ``running -> interrupted ->
        queued``. A job whose cancel was requested ends ``cancelled`` instead, and one found running
        after more than ``max_restarts`` crashes ends ``failed`` (so a job that crashes the process
        cannot loop forever). Only crashes count toward that limit: a clean shutdown
        (:meth:`interrupt_job`, e.g. SIGTERM) is an interruption, not the job's failure. One transaction for all. Call it once, while no worker of this database is
        running (the app lock guarantees that). Returns the ids queued again.
        """
        _check_max_restarts(max_restarts)
        requeued = []
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM refine_jobs WHERE state = 'running' ORDER BY id")]
            for job_id in ids:
                job = self._job_row(db, job_id)
                if self._interrupt(db, job, CRASH_NOTE, max_restarts, crashes_only=True) == "queued":
                    requeued.append(job_id)
        return requeued

    def interrupt_job(self, job_id: int, *, max_restarts: int | None = None,
                      note: str = "the worker was shut down while it ran") -> str:
        """Clean shutdown: the running job ``job_id`` becomes ``interrupted`` and is queued again.

        Exactly what :meth:`recover_interrupted` does to each job a dead process left running, for one
        job and at once (one transaction): ``restarts`` goes up by one, the history shows ``running ->
        interrupted -> queued``, progress goes back to 0 (a job restarts from its noise). A job whose
        cancel was requested ends ``cancelled`` instead. ``max_restarts`` (default: no limit, since a
        shutdown is not the job's fault) ends it ``failed`` once interrupted more often than that.
        ``note`` is the interrupt's entry in the history. Returns the job's state afterwards
        (``queued``, ``cancelled`` or ``failed``).

        :raises JobStateError: the job is not running (the message names the job and its state).
            :raises NotFoundError: no such job.
        """
        if max_restarts is not None:
            _check_max_restarts(max_restarts)
        check_text(note, "note", max_len=1000)
        with self.transaction() as db:
            job = self._job_row(db, job_id)
            if job["state"] != "running":
                raise JobStateError(f"refine job {job_id} is {job['state']}, not running, so it cannot be interrupted")
            return self._interrupt(db, job, note, max_restarts)

    def _interrupt(
        self, db: sqlite_utils.Database, job: Mapping[str, Any], note: str, max_restarts: int | None,
        crashes_only: bool = False,
    ) -> str:
        """running -> interrupted (restarts + 1) -> queued | cancelled | failed, in the caller's transaction.

        ``max_restarts`` limits all interruptions, or with ``crashes_only`` those whose history note is
        :data:`CRASH_NOTE` (this one included). Returns the state the job ends in.
        """
        job_id = job["id"]
        restarts = job["restarts"] + 1
        self._move(db, job, "interrupted", note, restarts=restarts)
        job = self._job_row(db, job_id)
        if job["cancel_requested"]:
            self._move(db, job, "cancelled", "cancel was requested before the restart", finished_at=utc_now())
            return "cancelled"
        counted = restarts
        if crashes_only:
            counted = db.execute("SELECT count(*) FROM refine_job_events WHERE job_id = ? AND to_state = 'interrupted' "
                                 "AND note = ?", [job_id, CRASH_NOTE]).fetchone()[0]
        if max_restarts is not None and counted > max_restarts:
            self._move(db, job, "failed", f"interrupted {restarts} times", finished_at=utc_now(),
                       error=f"interrupted by {restarts} restarts ({counted} of them counted against the limit "
                             f"of {max_restarts}); not retried automatically")
            return "failed"
        self._move(db, job, "queued", "queued again after restart", progress_step=0, device=None)
        return "queued"

    def get_job(self, job_id: int) -> Job:
        """Refine job ``job_id``. :raises NotFoundError:"""
        row = self.query_one("SELECT * FROM refine_jobs WHERE id = ?", [job_id])
        if row is None:
            raise NotFoundError("refine_jobs", job_id)
        return _job(row)

    def list_jobs(
        self, *, states: Sequence[str] | None = None, owner: str | None = DEFAULT_OWNER, limit: int = 100
    ) -> list[Job]:
        """Jobs in queue order (oldest first), optionally only the given states; ``owner=None`` for all."""
        check_positive_int(limit, "limit", MAX_LIST)
        where, params = ["1"], []
        if states is not None:
            bad = [s for s in states if s not in JOB_STATES]
            if bad or not states:
                raise ValueError(f"states must be a non-empty list from {', '.join(JOB_STATES)}, got {list(states)!r}")
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        rows = self.query(f"SELECT * FROM refine_jobs WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", params + [limit])
        return [_job(r) for r in rows]

    def newest_job_stamps(self, *, owner: str | None = DEFAULT_OWNER, limit: int = 50) -> list[JobStamp]:
        """The stamps of ``owner``'s newest jobs (``None``: everyone's), newest first (one small query, no job
        rows decoded)."""
        check_positive_int(limit, "limit", MAX_LIST)
        rows = self.query("SELECT id, state, progress_step, restarts, updated_at FROM refine_jobs "
                          "WHERE (? IS NULL OR owner = ?) ORDER BY id DESC LIMIT ?", [owner, owner, limit])
        return [JobStamp(**r) for r in rows]

    def job_history(self, job_id: int) -> list[JobEvent]:
        """The job's state history, oldest first."""
        rows = self.query("SELECT * FROM refine_job_events WHERE job_id = ? ORDER BY id", [job_id])
        if not rows:
            self.get_job(job_id)  # NotFoundError for an unknown id
        return [JobEvent(**r) for r in rows]

