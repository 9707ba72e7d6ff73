"""Ordinary stops: SIGTERM / SIGINT to the real app mid-refine, and the training child at shutdown.

Before issue 26 SIGTERM killed the app at once: the running job stayed ``running`` and counted as a
crash at the next start (four such stops failed a job), and a training process started from Admin
survived as an orphan.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from app_fake_backend import FakeBackend
from app_launch import REPO, app_paths, free_port

from store.jobs import CRASH_NOTE
from webui.admin import ADMIN_PASSWORD_ENV, Admin

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client

STOP_LIMIT_S = 10.0


def start_app(db: Path, cache: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, DIFFUSION_PREVIEW_CACHE=str(cache), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    env.pop(ADMIN_PASSWORD_ENV, None)
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "webui.app", "--db", str(db), "--port", str(port),
                                 "--device", "cpu"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "healthz", timeout=2).text == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the app did not come up in {timeout} s: {log.read_text()[-3000:]}")


def job_row(db: Path, job_id: int) -> dict:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM refine_jobs WHERE id = ?", [job_id]).fetchone())
        row["events"] = [tuple(r) for r in conn.execute(
            "SELECT from_state, to_state, note FROM refine_job_events WHERE job_id = ? ORDER BY id", [job_id])]
    return row


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> float:
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(STOP_LIMIT_S + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{signal.Signals(sig).name}: still running after {STOP_LIMIT_S + 5} s")
    return time.monotonic() - t0


def children_of(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            out.append(int(status.parent.name))
    return out


@pytest.mark.slow
def test_sigterm_mid_refine_exits_within_10_s_and_the_job_resumes_as_an_interruption(tmp_path):
    """The bar: SIGTERM mid-refine -> exit within 10 s; after a restart the job resumes and finishes,
    its stop counted as an interruption, not a failure; no process left behind."""
    db, cache, log = tmp_path / "data" / "store.sqlite3", tmp_path / "cache", tmp_path / "app.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_app(db, cache, port, log)
    try:
        wait_healthy(url, proc, log)
        client = Client(url, verbose=False, download_files=str(tmp_path))
        _gallery, selection, _status = client.predict(
            "a red circle", "", 1, 3, "", 4, "ddim", 3.0, 32, 32, 60, api_name="/preview")
        client.predict([selection["choices"][0][1]], 60, api_name="/refine")
        job_id = 1
        deadline = time.monotonic() + 60
        while job_row(db, job_id)["progress_step"] < 2:
            assert time.monotonic() < deadline, job_row(db, job_id)
            time.sleep(0.1)
        assert job_row(db, job_id)["state"] == "running"
        took = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    print(f"\nSIGTERM mid-refine: exited in {took:.2f} s (exit code {proc.returncode})")
    assert took < STOP_LIMIT_S and proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert children_of(proc.pid) == []
    row = job_row(db, job_id)
    assert (row["state"], row["restarts"]) == ("queued", 1)
    assert ("running", "interrupted", "the worker was shut down while it ran") in row["events"]
    assert not any(note == CRASH_NOTE for _f, _t, note in row["events"])

    proc = start_app(db, cache, port, log)  # the next start resumes it
    try:
        wait_healthy(url, proc, log)
        deadline = time.monotonic() + 120
        while job_row(db, job_id)["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, job_row(db, job_id)
            time.sleep(0.3)
        took_int = stop(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
    row = job_row(db, job_id)
    print(f"after restart: job {job_id} {row['state']}, restarts {row['restarts']}, "
          f"crash restarts {sum(n == CRASH_NOTE for *_, n in row['events'])}; SIGINT exit in {took_int:.2f} s")
    assert (row["state"], row["restarts"], row["error"]) == ("done", 1, None)
    assert took_int < STOP_LIMIT_S and proc.returncode == 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM finals WHERE job_id = ?", [job_id]).fetchone()[0] == 1


def test_the_training_child_and_its_children_are_stopped_at_shutdown(tmp_path, monkeypatch):
    """A trainer that ignores SIGINT (and started a child of its own) is killed with its group in time."""
    monkeypatch.setenv(ADMIN_PASSWORD_ENV, "pw")
    paths = app_paths(tmp_path)
    admin = Admin(paths.db, paths.work, paths.exports, None, FakeBackend(paths.exports))
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)']); "
            "print(c.pid, flush=True); time.sleep(60)")
    run = admin.slot.start("ppo", [sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not run.log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(run.log.read_text().split()[0])
    t0 = time.monotonic()
    admin.close(grace_s=1.0)
    took = time.monotonic() - t0
    assert run.proc.poll() is not None and took < 3.0
    deadline = time.monotonic() + 5
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{grandchild}/status").read_text() if Path(f"/proc/{grandchild}").exists() else ""
        if "zombie" in state:
            break
        time.sleep(0.05)
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text(), "the trainer's own child survived"


def test_a_read_only_location_is_one_clear_error_and_creates_nothing(tmp_path, capsys):
    from webui import app

    with pytest.raises(SystemExit) as err:
        app.main(["--db", "/proc/no-such-folder/store.sqlite3"])
    assert str(err.value).startswith("error: cannot create the folder /proc/no-such-folder")
    assert "\n" not in str(err.value)
    db = tmp_path / "db-folder"
    db.mkdir()
    with pytest.raises(SystemExit) as err:  # a folder where the database file should be
        app.main(["--db", str(db)])
    assert "is a folder" in str(err.value) and not (tmp_path / "diffusion-preview-work").exists()
