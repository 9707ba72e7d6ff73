"""Store migrations: from an empty file, from every earlier schema version, from a partial state;
a newer or foreign database is refused unchanged; a backup is taken before migrating."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import pytest

import store
from store.connection import StoreBase
from store.migrations import MIGRATIONS, Migration, apply_migrations

FINAL_TABLES = {
    "migrations", "prompts", "noise", "generations", "training_runs", "training_metrics", "datasets",
    "solver_checkpoints", "previews", "refine_jobs", "refine_job_events", "finals", "consistency",
    "checkpoint_assignments", "input_images",
}


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
    finally:
        conn.close()


def recorded(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY rowid")]
    finally:
        conn.close()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``folder`` with its bytes and mtime, to prove nothing changed."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def schema_at(path: Path, n: int) -> None:
    """Build the schema a release with only the first ``n`` migrations would have left.

    Migrations are never edited once shipped, so a prefix of MIGRATIONS *is* that earlier
    version. When a version ships, keep using this (or add a frozen fixture file for it).
    """
    conn = StoreBase.connect(path, 5000)
    s = StoreBase(path, conn)
    s.enable_wal()
    apply_migrations(s, MIGRATIONS[:n])
    s.close()


def test_from_empty_file_all_tables_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    path.touch()  # an empty file is an empty database
    with store.open_store(path) as s:
        assert s.journal_mode == "wal"
        pragmas = {p: next(iter(s.query(f"PRAGMA {p}")[0].values())) for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")}
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 10_000}
        assert s.backup_path is None  # nothing to back up in an empty file
    assert tables(path) == FINAL_TABLES
    assert recorded(path) == [m.name for m in MIGRATIONS]


def test_reopen_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with store.open_store(path) as s:
        s.add_prompt("kept")
    with store.open_store(path) as s:
        assert s.backup_path is None
        assert s.query("SELECT prompt FROM prompts") == [{"prompt": "kept"}]
    assert recorded(path) == [m.name for m in MIGRATIONS]
    assert not list(tmp_path.glob("*.backup-*"))


@pytest.mark.parametrize("n", range(len(MIGRATIONS)), ids=lambda n: f"from-{n}-of-{len(MIGRATIONS)}")
def test_from_every_earlier_version(tmp_path: Path, n: int) -> None:
    path = tmp_path / "s.sqlite3"
    schema_at(path, n)
    if n >= 1:  # put a row in, which must survive the upgrade
        conn = sqlite3.connect(path)
        conn.execute("INSERT INTO prompts (owner, prompt, negative_prompt, created_at) VALUES ('local', 'old', '', 'x')")
        conn.commit()
        conn.close()
    with store.open_store(path) as s:
        assert (s.backup_path is not None) == (n >= 1)
        if n >= 1:
            assert recorded(s.backup_path) == [m.name for m in MIGRATIONS[:n]]
            assert s.query("SELECT prompt FROM prompts") == [{"prompt": "old"}]
        s.add_generation(model_id="m", prompt="new", seed=1, height=8, width=8, guidance=1.0)
    assert recorded(path) == [m.name for m in MIGRATIONS]
    assert tables(path) == FINAL_TABLES


def test_m0004_assigns_existing_checkpoints_to_their_datasets_model(tmp_path: Path) -> None:
    """Before m0004 one checkpoint was active for every model; after it, each existing checkpoint
    belongs to the model its dataset was built with, and the active one only serves that model."""
    path = tmp_path / "s.sqlite3"
    n = next(i for i, m in enumerate(MIGRATIONS) if m.name == "m0004_checkpoints_per_model")
    schema_at(path, n)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO datasets (name, model_id, reference_sampler, prompt_file_sha256, shard_paths, created_at) "
                 "VALUES ('d', '/models/sd-a', 'ddim', ?, '[\"/work/ds/shard-0.safetensors\"]', 'x')", ["0" * 64])
    conn.execute("INSERT INTO training_runs (name, config, state, created_at, updated_at) "
                 "VALUES ('r', '{\"values\": {\"dataset\": \"/work/ds\"}}', 'done', 'x', 'x')")
    for name, model_id, active, run in (("from-run", None, 1, 1), ("embedded-one", "embedded", 0, None),
                                        ("orphan", None, 0, None)):
        conn.execute("INSERT INTO solver_checkpoints (name, model_id, config, weights, weights_sha256, active, "
                     "training_run_id, created_at) VALUES (?, ?, '{}', x'00', ?, ?, ?, 'x')", [name, model_id, "0" * 64, active, run])
    conn.commit()
    conn.close()
    with store.open_store(path) as s:
        assert s.backup_path is not None
        by_name = {c.name: c for c in s.list_checkpoints()}
        assert by_name["from-run"].model_id == "/models/sd-a" and by_name["from-run"].model_key == "legacy:/models/sd-a"
        assert by_name["from-run"].active and not by_name["embedded-one"].active
        assert by_name["embedded-one"].model_key == "embedded" and by_name["orphan"].model_key is None
        assert s.get_active_checkpoint("legacy:/models/sd-a").name == "from-run"
        assert s.get_active_checkpoint("embedded") is None  # the other model's previews are not touched


def test_backup_is_a_full_copy_taken_before_migrating(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    schema_at(path, 1)
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO prompts (owner, prompt, negative_prompt, created_at) VALUES ('local', ?, '', 'x')",
                     [(f"p{i}",) for i in range(50)])
    conn.commit()
    conn.close()
    with store.open_store(path) as s:
        backup = s.backup_path
    assert backup is not None and backup.parent == tmp_path and MIGRATIONS[1].name in backup.name
    b = sqlite3.connect(backup)
    assert b.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert b.execute("SELECT count(*) FROM prompts").fetchone()[0] == 50
    assert "previews" not in {r[0] for r in b.execute("SELECT name FROM sqlite_master")}  # taken *before*
    b.close()


def test_failed_migration_rolls_back_its_ddl_and_reopen_completes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    schema_at(path, 1)

    def broken(db) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        db.execute("INSERT INTO half_done VALUES (1)")
        raise RuntimeError("disk on fire")

    conn = StoreBase.connect(path, 5000)
    s = StoreBase(path, conn)
    with pytest.raises(store.StoreError, match=r"migration m_broken failed .*rolled back"):
        apply_migrations(s, MIGRATIONS[:1] + [Migration("m_broken", broken)])
    s.close()
    assert "half_done" not in tables(path)  # the DDL went with the rollback
    assert recorded(path) == [MIGRATIONS[0].name]
    with store.open_store(path) as s2:
        assert s2.integrity_check() == ["ok"]
    assert recorded(path) == [m.name for m in MIGRATIONS]


def test_synthetic_partial_state_empty_migrations_table(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL) STRICT")
    conn.commit()
    conn.close()
    with store.open_store(path) as s:
        assert s.integrity_check() == ["ok"]
    assert tables(path) == FINAL_TABLES


def test_newer_schema_is_refused_and_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with store.open_store(path) as s:
        s.add_prompt("precious")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('m0099_from_the_future', 'x')")
    conn.commit()
    conn.close()
    before = snapshot(tmp_path)
    with pytest.raises(store.StoreError) as err:
        store.open_store(path)
    message = str(err.value)
    assert str(path) in message and "newer" in message and "m0099_from_the_future" in message
    assert message.count(". ") == 0  # one sentence
    assert snapshot(tmp_path) == before


def test_foreign_sqlite_database_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE images (path TEXT)")
    conn.commit()
    conn.close()
    before = snapshot(tmp_path)
    with pytest.raises(store.StoreError, match="another program"):
        store.open_store(path)
    assert snapshot(tmp_path) == before


def _open_in_child(path: str, q) -> None:
    try:
        with store.open_store(path) as s:
            q.put(("ok", s.integrity_check()))
    except BaseException as exc:  # reported to the parent
        q.put(("error", repr(exc)))


def test_concurrent_first_open_migrates_once(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(str(path), q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [("ok", ["ok"])] * 3
    assert recorded(path) == [m.name for m in MIGRATIONS]
    assert os.path.getsize(path) > 0
