"""Opening the SQLite file safely, and the one way to run a transaction.

Connection settings (see shared/reference/ecosystem.md D.1):

* ``journal_mode=WAL`` (checked after setting it; a filesystem that refuses WAL is logged and
  the store keeps working in rollback-journal mode), ``synchronous=FULL`` so a commit that returned
  survives power loss, ``foreign_keys=ON`` and a ``busy_timeout``.
* The driver runs with ``isolation_level=None``: it never opens transactions behind our back.
  Every write goes through :meth:`StoreBase.transaction`, which issues ``BEGIN IMMEDIATE`` so a
  read-then-write never fails with ``SQLITE_BUSY`` half way (the "single biggest footgun").
* One :class:`StoreBase` may be shared by threads (``check_same_thread=False``, every statement
  runs under one re-entrant lock). Processes each open their own store; a store object refuses to
  be used after a ``fork``.
* ``app_lock=True`` takes an exclusive ``flock`` on ``<file>.lock`` so two app instances cannot
  serve the same database; the kernel drops it when the process dies, so it never goes stale.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from store.errors import StoreError

try:  # POSIX only; on Windows the app lock is skipped with a warning.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
DEFAULT_BUSY_TIMEOUT_MS = 10_000
DEFAULT_OWNER = "local"
_MIN_SQLITE = (3, 37, 0)  # STRICT tables


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with microseconds (how every row stores time)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def dumps_json(value: Any, field: str) -> str:
    """Serialize ``value`` as canonical JSON for a TEXT column; NaN/inf and odd types are refused.

    :raises ValueError: naming ``field`` when the value is not finite JSON.
    """
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be JSON-serializable with finite numbers ({exc})") from None


def check_owner(owner: str) -> str:
    """Validate an owner name (non-empty string of at most 200 characters)."""
    if not isinstance(owner, str) or not owner or len(owner) > 200:
        raise ValueError(f"owner must be a non-empty string of at most 200 characters, got {owner!r}")
    return owner


def check_positive_int(value: Any, field: str, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int in [1, maximum]; otherwise a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field} must be at most {maximum}, got {value}")
    return value


def check_finite(value: Any, field: str) -> float:
    """Return ``float(value)`` if it is a finite real number; otherwise a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def check_text(value: Any, field: str, *, max_len: int = 10_000, allow_empty: bool = False) -> str:
    """Return ``value`` if it is a string within ``max_len`` characters; otherwise a ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > max_len:
        raise ValueError(f"{field} is {len(value)} characters long; the limit is {max_len}")
    return value


def default_store_path() -> Path:
    """Where the store lives when no path is given.

    ``$DIFFUSION_PREVIEW_HOME/store.sqlite3`` if that variable is set, else the platform's user
    data folder (``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux, ``~/Library/Application
    Support`` on macOS, ``%LOCALAPPDATA%`` on Windows) + ``diffusion-preview/store.sqlite3``.
    Never a folder the web server serves.
    """
    home = os.environ.get("DIFFUSION_PREVIEW_HOME")
    if home:
        return Path(home).expanduser() / "store.sqlite3"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "diffusion-preview" / "store.sqlite3"


def check_location(path: Path, forbid_under: Iterable[str | Path] = ()) -> None:
    """Refuse, before anything is created, a path the store could not (or must not) write.

    :raises StoreError: for a path inside a served folder, a folder, a read-only folder or file.
    """
    resolved = path.resolve()
    for served in forbid_under:
        served_path = Path(served).expanduser().resolve()
        if resolved == served_path or served_path in resolved.parents:
            raise StoreError(
                f"the store {path} is inside {served_path}, a folder the web server serves; "
                "choose a path outside it"
            )
    if path.is_dir():
        raise StoreError(f"the store path {path} is a folder, not a database file")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder {parent} for the store ({exc.strerror or exc})"
            ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(
            f"the folder {parent} is read-only, so the store {path.name} cannot be created or "
            "written there (SQLite also needs to create its -wal and -shm files beside it)"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"the store file {path} is read-only; make it writable or choose another path")


def check_header(path: Path) -> None:
    """Refuse a non-empty file that does not start with the SQLite header (nothing is opened)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        raise StoreError(f"{path} is not a SQLite database (it lacks the SQLite header), so it was left untouched")


class StoreBase:
    """The connection, its lock and the transaction helper shared by every part of the store.

    Use :func:`store.open_store` to get one; it checks the file and applies migrations first.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._app_lock_file: Any = None
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.journal_mode: str = "unknown"
        #: The backup copy taken before migrations ran while opening, if any.
        self.backup_path: Path | None = None

    # -- connection -------------------------------------------------------------------------

    @staticmethod
    def connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
        """Open ``path`` with the store's per-connection settings (nothing is written yet)."""
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old for the store; version "
                f"{'.'.join(map(str, _MIN_SQLITE))} or newer is needed"
            )
        check_positive_int(busy_timeout_ms, "busy_timeout_ms")
        try:
            conn = sqlite3.connect(
                str(path),
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path} ({exc})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            got = (
                conn.execute("PRAGMA busy_timeout").fetchone()[0],
                conn.execute("PRAGMA foreign_keys").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
            )
            if got != (int(busy_timeout_ms), 1, 2):
                raise StoreError(f"SQLite did not accept the store's connection settings for {path} (got {got})")
            # Reading the schema is the first real read: it fails here for a damaged header.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path} is not a usable SQLite database ({exc}), so it was left untouched") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def enable_wal(self) -> str:
        """Switch the file to WAL (persistent) and return the journal mode that is actually in force."""
        with self._locked() as conn:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                log.warning("SQLite refused WAL for %s (journal_mode=%s); continuing with synchronous=FULL", self.path, mode)
        self.journal_mode = mode
        return mode

    def close(self) -> None:
        """Close the connection (and release the app lock, if held). Safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None  # type: ignore[assignment]
            if self._app_lock_file is not None:
                self._app_lock_file.close()  # closing the descriptor drops the flock
                self._app_lock_file = None

    def __enter__(self) -> StoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def acquire_app_lock(self) -> None:
        """Take an exclusive lock on ``<file>.lock`` so a second app instance stops with a clear message.

        :raises StoreError: naming the other process when it already holds the lock.
        """
        if fcntl is None:  # pragma: no cover - Windows
            log.warning("no app lock on this platform; do not run two app instances on %s", self.path)
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            other = f.read().strip() or "unknown"
            f.close()
            raise StoreError(
                f"another Diffusion Preview app (pid {other}) is already using {self.path}; "
                "close it first or pass a different database path"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._app_lock_file = f

    # -- statements -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"the store {self.path} is closed")
            if os.getpid() != self._pid:
                raise StoreError(
                    "a store object cannot be used across fork(); call open_store() again in the child process"
                )
            yield self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One atomic write: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception).

        Holds the store's lock, so other threads using this object wait; other processes wait on
        SQLite's busy timeout. Nested use joins the outer transaction through a savepoint.
        Yields the ``sqlite_utils.Database``.

        :raises StoreError: when another process kept the database locked past the busy timeout,
            or the disk is full (the transaction is rolled back).
        """
        with self._locked() as conn:
            if conn.in_transaction:
                with self.db.atomic():  # a SAVEPOINT inside the outer transaction
                    yield self.db
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreError(
                        f"the store {self.path} stayed locked by another process for longer than the "
                        "busy timeout; is another app instance or a long write running?"
                    ) from None
                raise
            try:
                yield self.db
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                    raise StoreError(
                        f"the disk holding {self.path} is full, so this change was rolled back and nothing "
                        "of it was saved"
                    ) from exc
                raise

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Run a read-only statement with bound parameters and return all rows as dicts."""
        with self._locked():
            return list(self.db.query(sql, params))

    def query_one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        """Like :meth:`query`, returning the first row or ``None``."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` plus ``PRAGMA foreign_key_check``; ``["ok"]`` when healthy."""
        rows = [r["integrity_check"] for r in self.query("PRAGMA integrity_check")]
        fk = self.query("PRAGMA foreign_key_check")
        if fk:
            rows = [r for r in rows if r != "ok"] + [
                f"foreign key violation: {r['table']} row {r['rowid']} -> {r['parent']}" for r in fk
            ]
        return rows
