"""Bad input to the store: each stops with one clear sentence and changes nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

import store


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def one_sentence(message: str) -> bool:
    return "\n" not in message and ". " not in message.rstrip(".")


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A folder an unprivileged user can traverse (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="store-ro-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(d)


def run_unprivileged(fn: Callable[[], str]) -> str:
    """Run ``fn`` as a user who cannot write root's read-only folders; return its result string.

    As root, permissions do not stop writes, so ``fn`` runs in a forked child that drops to uid
    65534 (nobody) first. As an ordinary user it just runs.
    """
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as exc:  # report anything unexpected to the parent
            out = f"unexpected {exc!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _open_message(path: Path) -> str:
    try:
        store.open_store(path).close()
    except store.StoreError as exc:
        return f"StoreError: {exc}"
    return "opened"


def test_read_only_folder_new_file(world_readable_dir: Path) -> None:
    ro = world_readable_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    message = run_unprivileged(lambda: _open_message(ro / "store.sqlite3"))
    assert message.startswith("StoreError: ") and "read-only" in message and str(ro) in message, message
    assert one_sentence(message)
    assert list(ro.iterdir()) == []


def test_read_only_folder_existing_store(world_readable_dir: Path) -> None:
    ro = world_readable_dir / "ro"
    ro.mkdir()
    with store.open_store(ro / "store.sqlite3") as s:
        s.add_prompt("keep me")
    ro.chmod(0o555)
    (ro / "store.sqlite3").chmod(0o644)
    before = snapshot(ro)
    message = run_unprivileged(lambda: _open_message(ro / "store.sqlite3"))
    assert message.startswith("StoreError: ") and "read-only" in message, message
    assert snapshot(ro) == before


def test_not_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite3"
    path.write_bytes(b"these are my notes, not a database\n" * 10)
    before = snapshot(tmp_path)
    with pytest.raises(store.StoreError) as err:
        store.open_store(path)
    assert "not a SQLite database" in str(err.value) and str(path) in str(err.value)
    assert one_sentence(str(err.value))
    assert snapshot(tmp_path) == before


def test_sqlite_header_but_damaged(tmp_path: Path) -> None:
    path = tmp_path / "damaged.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    before = snapshot(tmp_path)
    with pytest.raises(store.StoreError, match="not a usable SQLite database"):
        store.open_store(path)
    assert snapshot(tmp_path) == before


def test_path_is_a_folder_or_inside_a_served_folder(tmp_path: Path) -> None:
    with pytest.raises(store.StoreError, match="is a folder"):
        store.open_store(tmp_path)
    served = tmp_path / "static"
    served.mkdir()
    with pytest.raises(store.StoreError, match="serves"):
        store.open_store(served / "db" / "s.sqlite3", forbid_under=[served])
    assert list(served.iterdir()) == []


def test_default_path_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSION_PREVIEW_HOME", str(tmp_path / "home"))
    assert store.default_store_path() == tmp_path / "home" / "store.sqlite3"
    with store.open_store() as s:
        assert s.path == tmp_path / "home" / "store.sqlite3"


def test_second_app_instance_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    first = store.open_store(path, app_lock=True)
    with pytest.raises(store.StoreError, match=rf"another Diffusion Preview app \(pid {os.getpid()}\)"):
        store.open_store(path, app_lock=True)
    with store.open_store(path) as worker:  # a worker/CLI without the app lock may share the file
        worker.add_prompt("shared")
    first.close()
    store.open_store(path, app_lock=True).close()  # the lock went with the first app


def test_bad_arguments_name_the_field_and_write_nothing(tmp_path: Path) -> None:
    with store.open_store(tmp_path / "s.sqlite3") as s:
        for seed in (-1, 2**32, 1.5, True, "7"):
            with pytest.raises(ValueError, match="seed"):
                s.get_or_create_noise(seed, (4, 8, 8))
        with pytest.raises(ValueError, match="shape"):
            s.get_or_create_noise(1, (4, 0, 8))
        with pytest.raises(ValueError, match="dtype"):
            s.get_or_create_noise(1, (4,), dtype=torch.int64)
        with pytest.raises(ValueError, match="guidance"):
            s.add_generation(model_id="m", prompt="p", seed=1, height=8, width=8, guidance=float("nan"))
        with pytest.raises(ValueError, match="height"):
            s.add_generation(model_id="m", prompt="p", seed=1, height=0, width=8, guidance=1.0)
        with pytest.raises(ValueError, match="metrics"):
            s.start_training_run({"lr": 1e-3})
            s.log_training_metrics(1, 0, {"loss": float("nan")})
        with pytest.raises(ValueError, match="timings_ms"):
            gen = s.add_generation(model_id="m", prompt="p", seed=1, height=8, width=8, guidance=1.0)
            s.add_preview(gen, solver="s", steps=2, image=Image.new("RGB", (8, 8)), timings_ms={"total": -1})
        counts = {t: s.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("noise", "previews", "training_metrics")}
        assert counts == {"noise": 0, "previews": 0, "training_metrics": 0}
        with pytest.raises(store.NotFoundError, match="previews row 999 does not exist"):
            s.get_preview(999)
        with pytest.raises(store.NotFoundError, match="noise row 5"):
            s.add_generation(model_id="m", prompt="p", seed=1, height=8, width=8, guidance=1.0, noise_id=5)


def test_store_refuses_use_after_fork(tmp_path: Path) -> None:
    s = store.open_store(tmp_path / "s.sqlite3")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            s.add_prompt("from the child")
            out = "no error"
        except store.StoreError as exc:
            out = str(exc)
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert "fork" in out
    assert s.query("SELECT count(*) AS n FROM prompts")[0]["n"] == 0
    s.close()
