"""``open_store()``: check the file, connect, migrate, and hand back one :class:`Store`.

Opening order, so that bad input changes nothing: the path is checked (served folder, read-only
folder or file) before anything is created; a non-empty file must carry the SQLite header before
SQLite opens it; the schema is read and a newer or foreign database refused before the first
write; only then is WAL switched on and pending migrations applied (after a backup).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from store.connection import DEFAULT_BUSY_TIMEOUT_MS, StoreBase, check_header, check_location, default_store_path
from store.errors import BlobIntegrityError, StoreError
from store.history import verify_png
from store.migrations import apply_migrations, check_schema
from store.training import TrainingStore

log = logging.getLogger(__name__)

CHECKS = ("off", "quick", "full")
MAX_REPORTED_PROBLEMS = 3


def check_pages(conn: sqlite3.Connection, path: Path, level: str) -> None:
    """``PRAGMA quick_check`` (``level="quick"``) or ``integrity_check`` (``"full"``) before any write.

    :raises StoreError: one sentence naming the file and the first problems SQLite found.
    """
    if level == "off":
        return
    pragma = "quick_check" if level == "quick" else "integrity_check"
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}({MAX_REPORTED_PROBLEMS})")]
    except sqlite3.DatabaseError as exc:
        rows = [str(exc)]
    if rows != ["ok"]:
        raise StoreError(f"the store {path} is damaged ({pragma}: {'; '.join(' '.join(r.split()) for r in rows)}); "
                         "it was left untouched, restore it from a backup")


class Store(TrainingStore):
    """The whole store: history, noise, input images, refine jobs, checkpoints, training runs, datasets.

    Thread-safe (one lock around one connection); open one per process with :func:`open_store`.
    """

    def verify_blobs(self) -> list[str]:
        """Check every stored blob's hash; returns one line per corrupted row (empty when all good)."""
        problems: list[str] = []
        for r in self.query("SELECT id FROM noise ORDER BY id"):
            try:
                self.get_noise(r["id"])
            except BlobIntegrityError as exc:
                problems.append(str(exc))
        for table in ("previews", "finals"):
            for r in self.query(f"SELECT id FROM {table} ORDER BY id"):
                try:
                    verify_png(table, self.query_one(f"SELECT id, png, png_sha256 FROM {table} WHERE id = ?", [r["id"]]))  # type: ignore[arg-type]
                except BlobIntegrityError as exc:
                    problems.append(str(exc))
        for r in self.query("SELECT id FROM input_images ORDER BY id"):
            try:
                self.get_input_image(r["id"])
            except BlobIntegrityError as exc:
                problems.append(str(exc))
        for r in self.query("SELECT id FROM solver_checkpoints ORDER BY id"):
            try:
                self.load_checkpoint_weights(r["id"])
            except BlobIntegrityError as exc:
                problems.append(str(exc))
        return problems


def open_store(
    path: str | Path | None = None,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    forbid_under: Iterable[str | Path] = (),
    app_lock: bool = False,
    check: str = "quick",
) -> Store:
    """Open (creating and migrating as needed) the store at ``path``.

    :param path: the database file; ``None`` for :func:`~store.connection.default_store_path`.
    :param busy_timeout_ms: how long a write waits for another process's write to finish.
    :param forbid_under: folders the web server serves; a path inside one is refused.
    :param app_lock: take the single-app-instance lock (the app passes ``True``; CLIs and
        workers sharing the file do not).
    :param check: ``"quick"`` runs ``PRAGMA quick_check`` before anything is written (damaged pages
        anywhere in the file are found at open, not by a later read); ``"full"`` runs
        ``integrity_check`` and then verifies every stored blob's hash (reads the whole database);
        ``"off"`` skips both.
    :raises StoreError: one sentence naming the file for a read-only location, a file that is not
        SQLite, a SQLite file of another program, a newer schema, a failed backup or migration, or
        another app instance holding the lock. Nothing is changed in any of these cases.
    """
    path = Path(path).expanduser() if path is not None else default_store_path()
    path = path.absolute()
    check_location(path, forbid_under)
    check_header(path)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    conn = StoreBase.connect(path, busy_timeout_ms)
    try:
        check_pages(conn, path, check)
        check_schema(conn, path)  # refuse newer / foreign databases before any write
    except BaseException:
        conn.close()
        raise
    store = Store(path, conn)
    try:
        if app_lock:
            store.acquire_app_lock()
        store.enable_wal()
        applied = apply_migrations(store)
        if applied:
            log.info("store %s migrated: %s", path, ", ".join(applied))
        if check == "full":
            problems = store.verify_blobs()
            if problems:
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                raise StoreError(f"{problems[0]}{more}")
    except BaseException:
        store.close()
        raise
    return store
