"""Schema migrations: named, ordered functions recorded in the ``migrations`` table.

Each migration runs in its own explicit ``BEGIN IMMEDIATE`` transaction together with the row
that records it, DDL included (Python's legacy driver would not open a transaction before DDL on
its own; we run with ``isolation_level=None`` and issue ``BEGIN`` ourselves), so a crash or an error
mid-migration leaves the database at the previous version. Before migrating a database that
already holds tables, a copy is taken with SQLite's backup API. A database that records a
migration this code does not know was written by a newer version and is refused unchanged.

This follows sqlite-utils' ``Migrations`` shape (decorated functions, applied-at records), but
keeps its own small runner: sqlite-utils runs each migration under a deferred ``BEGIN`` and has no
notion of refusing a newer schema.

Rules for the future: never edit or reorder a migration once it has shipped; append a new one.
The tests migrate from every prefix of :data:`MIGRATIONS`, so each new migration is tested from
every earlier version automatically.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from store.connection import StoreBase, utc_now
from store.errors import StoreError

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "migrations"


@dataclass(frozen=True)
class Migration:
    """One schema change: ``fn(db)`` runs inside the migration's transaction."""

    name: str
    fn: Callable[[sqlite_utils.Database], None]


MIGRATIONS: list[Migration] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    """Register ``fn`` as the next migration, named after the function."""
    if any(m.name == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"migration {fn.__name__} is registered twice")
    MIGRATIONS.append(Migration(fn.__name__, fn))
    return fn


def _run(db: sqlite_utils.Database, statements: Sequence[str]) -> None:
    # One statement at a time: executescript() would COMMIT the open transaction first.
    for sql in statements:
        db.execute(sql)


@migration
def m0001_prompts_noise_generations(db: sqlite_utils.Database) -> None:
    """Prompts, generation-independent noise tensors, and generations."""
    _run(db, [
        """CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT 'local',
            prompt TEXT NOT NULL,
            negative_prompt TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            UNIQUE (owner, prompt, negative_prompt)
        ) STRICT""",
        """CREATE TABLE noise (
            id INTEGER PRIMARY KEY,
            seed INTEGER NOT NULL CHECK (seed BETWEEN 0 AND 4294967295),
            shape TEXT NOT NULL,
            dtype TEXT NOT NULL,
            device TEXT NOT NULL DEFAULT 'cpu',
            data BLOB NOT NULL,
            sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
            created_at TEXT NOT NULL,
            UNIQUE (seed, shape, dtype, device)
        ) STRICT""",
        """CREATE TABLE generations (
            id INTEGER PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT 'local',
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            model_id TEXT NOT NULL,
            seed INTEGER NOT NULL CHECK (seed BETWEEN 0 AND 4294967295),
            height INTEGER NOT NULL CHECK (height > 0),
            width INTEGER NOT NULL CHECK (width > 0),
            guidance REAL NOT NULL,
            noise_id INTEGER REFERENCES noise(id),
            created_at TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX generations_owner ON generations(owner, id)",
        "CREATE INDEX generations_prompt ON generations(prompt_id)",
    ])


@migration
def m0002_solver_training(db: sqlite_utils.Database) -> None:
    """Training runs and their per-update metrics, offline datasets, solver checkpoints."""
    _run(db, [
        """CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY,
            name TEXT,
            config TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed', 'cancelled', 'interrupted')),
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            finished_at TEXT
        ) STRICT""",
        """CREATE TABLE training_metrics (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES training_runs(id) ON DELETE CASCADE,
            update_index INTEGER NOT NULL CHECK (update_index >= 0),
            metrics TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (run_id, update_index)
        ) STRICT""",
        """CREATE TABLE datasets (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            model_id TEXT NOT NULL,
            reference_sampler TEXT NOT NULL,
            prompt_file_sha256 TEXT NOT NULL,
            shard_paths TEXT NOT NULL,
            config TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        ) STRICT""",
        """CREATE TABLE solver_checkpoints (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            model_id TEXT,
            config TEXT NOT NULL,
            weights BLOB NOT NULL,
            weights_sha256 TEXT NOT NULL CHECK (length(weights_sha256) = 64),
            metrics TEXT NOT NULL DEFAULT '{}',
            active INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
            training_run_id INTEGER REFERENCES training_runs(id) ON DELETE SET NULL,
            created_at TEXT NOT NULL
        ) STRICT""",
        # At most one active checkpoint, enforced by the database itself.
        "CREATE UNIQUE INDEX solver_checkpoints_one_active ON solver_checkpoints(active) WHERE active = 1",
    ])


@migration
def m0003_previews_jobs_finals(db: sqlite_utils.Database) -> None:
    """Previews, refine jobs with their state history, finals, preview/final consistency."""
    _run(db, [
        """CREATE TABLE previews (
            id INTEGER PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT 'local',
            generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
            solver TEXT NOT NULL,
            steps INTEGER NOT NULL CHECK (steps > 0),
            checkpoint_id INTEGER REFERENCES solver_checkpoints(id) ON DELETE SET NULL,
            png BLOB NOT NULL,
            png_sha256 TEXT NOT NULL CHECK (length(png_sha256) = 64),
            timings_ms TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX previews_generation ON previews(generation_id)",
        "CREATE INDEX previews_owner ON previews(owner, id)",
        """CREATE TABLE refine_jobs (
            id INTEGER PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT 'local',
            generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
            preview_id INTEGER REFERENCES previews(id) ON DELETE SET NULL,
            steps INTEGER NOT NULL CHECK (steps > 0),
            solver TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'queued'
                CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled', 'interrupted')),
            progress_step INTEGER NOT NULL DEFAULT 0 CHECK (progress_step BETWEEN 0 AND steps),
            cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
            restarts INTEGER NOT NULL DEFAULT 0 CHECK (restarts >= 0),
            device TEXT,
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        ) STRICT""",
        "CREATE INDEX refine_jobs_state ON refine_jobs(state, id)",
        """CREATE TABLE refine_job_events (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES refine_jobs(id) ON DELETE CASCADE,
            from_state TEXT,
            to_state TEXT NOT NULL,
            note TEXT,
            at TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX refine_job_events_job ON refine_job_events(job_id, id)",
        """CREATE TABLE finals (
            id INTEGER PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT 'local',
            job_id INTEGER NOT NULL UNIQUE REFERENCES refine_jobs(id) ON DELETE CASCADE,
            png BLOB NOT NULL,
            png_sha256 TEXT NOT NULL CHECK (length(png_sha256) = 64),
            timings_ms TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        ) STRICT""",
        """CREATE TABLE consistency (
            id INTEGER PRIMARY KEY,
            preview_id INTEGER NOT NULL REFERENCES previews(id) ON DELETE CASCADE,
            final_id INTEGER NOT NULL REFERENCES finals(id) ON DELETE CASCADE,
            psnr REAL,
            ssim REAL,
            metrics TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            UNIQUE (preview_id, final_id)
        ) STRICT""",
    ])


@migration
def m0004_checkpoints_per_model(db: sqlite_utils.Database) -> None:
    """A checkpoint belongs to one model: its identity (key, schedule family, the identity JSON), and
    the active checkpoint is per model (``checkpoint_assignments``), with explicit transfers labelled.

    Existing checkpoints are assigned to the model their dataset was built with (the training run's
    ``dataset`` folder holds the dataset's shards), else to the model id they recorded; a store that
    knew only model ids gets the key ``legacy:<model id>`` (``embedded`` for the embedded model),
    which the resolver matches by model id. The one global active checkpoint becomes the active
    checkpoint of its model. A checkpoint whose model cannot be found stays, inactive.
    """
    _run(db, [
        "ALTER TABLE solver_checkpoints ADD COLUMN model_key TEXT",
        "ALTER TABLE solver_checkpoints ADD COLUMN model_family TEXT",
        "ALTER TABLE solver_checkpoints ADD COLUMN model_identity TEXT NOT NULL DEFAULT '{}'",
        """CREATE TABLE checkpoint_assignments (
            model_key TEXT PRIMARY KEY,
            checkpoint_id INTEGER NOT NULL REFERENCES solver_checkpoints(id) ON DELETE CASCADE,
            transferred INTEGER NOT NULL DEFAULT 0 CHECK (transferred IN (0, 1)),
            assigned_at TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX solver_checkpoints_model ON solver_checkpoints(model_key, id)",
    ])
    datasets = [(r[0], [str(Path(p).parent) for p in _json_list(r[1])])
                for r in db.execute("SELECT model_id, shard_paths FROM datasets ORDER BY id").fetchall()]
    rows = db.execute(
        "SELECT c.id, c.model_id, c.active, r.config FROM solver_checkpoints c "
        "LEFT JOIN training_runs r ON r.id = c.training_run_id ORDER BY c.id"
    ).fetchall()
    for checkpoint_id, model_id, active, run_config in rows:
        config = _json_dict(run_config)
        folder = (config.get("values") if isinstance(config.get("values"), dict) else config).get("dataset")
        from_dataset = next((m for m, folders in datasets if folder and str(Path(str(folder))) in folders), None)
        model_id = from_dataset or model_id
        if not model_id:
            log.warning("solver checkpoint #%s records no model and no dataset; it stays unassigned", checkpoint_id)
            continue
        key = "embedded" if model_id == "embedded" else f"legacy:{model_id}"
        db.execute("UPDATE solver_checkpoints SET model_id = ?, model_key = ? WHERE id = ?", [model_id, key, checkpoint_id])
        if active:
            db.execute("INSERT OR REPLACE INTO checkpoint_assignments (model_key, checkpoint_id, transferred, assigned_at) "
                       "VALUES (?, ?, 0, ?)", [key, checkpoint_id, utc_now()])
    _run(db, ["DROP INDEX solver_checkpoints_one_active", "UPDATE solver_checkpoints SET active = 0"])


@migration
def m0005_input_images(db: sqlite_utils.Database) -> None:
    """Input images of instruction edits, stored once per owner by the sha256 of their canonical PNG
    (see ``store.input_images``), and ``generations.input_image_id`` pointing at the one an edit used
    (``NULL`` for text-to-image, so every existing generation stays as it was)."""
    _run(db, [
        """CREATE TABLE input_images (
            id INTEGER PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT 'local',
            sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
            png BLOB NOT NULL,
            width INTEGER NOT NULL CHECK (width > 0),
            height INTEGER NOT NULL CHECK (height > 0),
            mode TEXT NOT NULL,
            created_at TEXT NOT NULL
        ) STRICT""",
        "CREATE UNIQUE INDEX input_images_owner_sha256 ON input_images(owner, sha256)",
        "ALTER TABLE generations ADD COLUMN input_image_id INTEGER REFERENCES input_images(id)",
        "CREATE INDEX generations_input_image ON generations(input_image_id) WHERE input_image_id IS NOT NULL",
    ])


def _json_list(text: str | None) -> list:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- runner -------------------------------------------------------------------------------------


def _table_names(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    return {r[0] for r in rows}


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names recorded in the ``migrations`` table, in the order they were applied (read only)."""
    if MIGRATIONS_TABLE not in _table_names(conn):
        return []
    return [r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY rowid")]


def check_schema(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Refuse a database we must not touch; return the names already applied. Reads only.

    :raises StoreError: for a database from a newer version, or a SQLite file of another program.
    """
    tables = _table_names(conn)
    if tables and MIGRATIONS_TABLE not in tables:
        raise StoreError(
            f"{path} is a SQLite database of another program (it has tables but no "
            f"'{MIGRATIONS_TABLE}' table), so it was left untouched"
        )
    applied = applied_migrations(conn)
    known = {m.name for m in migrations}
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise StoreError(
            f"{path} was written by a newer Diffusion Preview (it has migrations this version does "
            f"not know: {', '.join(unknown)}); upgrade the app or open another file, nothing was changed"
        )
    return applied


def backup(store: StoreBase, before: str) -> Path:
    """Copy the whole database beside it with SQLite's backup API and return the copy's path."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = store.path.with_name(f"{store.path.name}.backup-{stamp}-before-{before}")
    with store._locked() as conn:
        target = sqlite3.connect(str(dest))
        try:
            conn.backup(target)
        except sqlite3.Error as exc:
            target.close()
            dest.unlink(missing_ok=True)
            raise StoreError(f"could not back up {store.path} to {dest} before migrating ({exc}); nothing was migrated") from None
        target.close()
    log.info("backed up %s to %s before migration %s", store.path, dest, before)
    return dest


def apply_migrations(store: StoreBase, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply every pending migration, each in its own transaction; return the names applied here.

    Takes a backup first when the database already holds tables. Safe when several processes
    open a fresh file at once: each migration re-checks, inside its ``BEGIN IMMEDIATE``, that no
    other process applied it meanwhile.

    :raises StoreError: newer schema, failed backup, or a migration that failed (rolled back).
    """
    with store._locked() as conn:
        applied = check_schema(conn, store.path, migrations)
        pending = [m for m in migrations if m.name not in applied]
        has_tables = bool(_table_names(conn))
    if not pending:
        return []
    if has_tables:
        store.backup_path = backup(store, pending[0].name)
    done: list[str] = []
    for m in pending:
        try:
            with store.transaction() as db:
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
                    "id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL) STRICT"
                )
                if m.name in check_schema(store._conn, store.path, migrations):
                    continue  # another process applied it while we waited for the lock
                m.fn(db)
                db.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)", [m.name, utc_now()])
        except StoreError:
            raise
        except Exception as exc:
            where = f"; a backup is at {store.backup_path}" if store.backup_path else ""
            raise StoreError(
                f"migration {m.name} failed on {store.path} ({exc}) and was rolled back, so the "
                f"database stays at the previous version{where}"
            ) from exc
        done.append(m.name)
        log.info("applied migration %s to %s", m.name, store.path)
    return done
