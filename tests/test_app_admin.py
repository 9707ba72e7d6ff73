"""The Admin tab's handlers: commands that the training CLIs accept, background processes, bad input."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import gradio as gr
import pytest
from app_fake_backend import FakeBackend
from app_launch import app_paths

from webui.admin import ADMIN_PASSWORD_ENV, Admin  # noqa: E402


class Captured(Exception):
    pass


@pytest.fixture()
def admin(tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_PASSWORD_ENV, "pw")
    paths = app_paths(tmp_path)
    a = Admin(paths.db, paths.work, paths.exports, None, FakeBackend(paths.exports))
    a.token = a.unlock("pw")[0]
    yield a
    a.close()


def _capture_argv(admin: Admin, monkeypatch) -> list[list[str]]:
    seen: list[list[str]] = []

    def fake_start(kind, argv):
        seen.append(argv)
        raise Captured(kind)

    monkeypatch.setattr(admin.slot, "start", fake_start)
    return seen


def _accepted_by_cli(argv: list[str], monkeypatch) -> None:
    """Run the CLI's own argument parser on argv (stopping right after parsing): no unknown flags."""
    assert argv[:2] == [sys.executable, "-m"]
    module = importlib.import_module(argv[2])
    real = argparse.ArgumentParser.parse_args

    def checked(self, args=None, namespace=None):
        _ns, unknown = self.parse_known_args(args, namespace)
        assert unknown == [], f"{argv[2]} does not accept {unknown}"
        raise Captured("parsed")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", checked)
    try:
        with pytest.raises(Captured):
            module.main(argv[3:])
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)


def test_admin_commands_are_accepted_by_the_training_clis(admin, monkeypatch):
    seen = _capture_argv(admin, monkeypatch)
    with pytest.raises(Captured):
        admin.build_dataset(admin.token, "a red circle\na blue square", 2)
    with pytest.raises(Captured):
        admin.start_ppo(admin.token, 1, 5, "psnr + 10*gms")
    with pytest.raises(Captured):
        next(admin.evaluate(admin.token, "a green triangle", "3,4", 1))
    assert [a[2] for a in seen] == ["training.dataset", "training.train", "training.evaluate"]
    for argv in seen:
        assert str(admin.db) in argv  # every child writes to the app's store
        _accepted_by_cli(argv, monkeypatch)
    prompt_file = seen[0][seen[0].index("--prompts") + 1]
    assert admin.work in __import__("pathlib").Path(prompt_file).parents  # a name the app chose, in its work folder


@pytest.mark.parametrize("call, field", [
    (lambda a: a.build_dataset(a.token, "  \n", 2), "Training prompts"),
    (lambda a: a.build_dataset(a.token, "x", 0), "Seeds per prompt"),
    (lambda a: a.start_ppo(a.token, None, 5), "Dataset"),
    (lambda a: a.start_ppo(a.token, 7, 5), "Dataset"),
    (lambda a: a.start_ppo(a.token, 1, 0), "Updates"),
    (lambda a: a.start_ppo(a.token, 1, 5, "psnr+rm -rf"), "Reward"),
    (lambda a: a.start_ppo(a.token, 1, 5, "h1_psnr+3*readings"), "Reward.*'fake' is not the embedded model"),
    (lambda a: next(a.evaluate(a.token, "x", "0,3", 1)), "Steps"),
    (lambda a: next(a.evaluate(a.token, "", "3", 1)), "Held-out prompts"),
    (lambda a: a.activate(a.token, 2), "Checkpoint id"),
    (lambda a: a.assign(a.token, 2), "Checkpoint id"),
    (lambda a: a.assign(a.token, "x"), "Checkpoint id"),
])
def test_bad_admin_input_names_the_field_and_starts_nothing(admin, call, field):
    with pytest.raises(gr.Error, match=field):
        call(admin)
    assert admin.slot.current is None


def test_background_process_never_blocks_and_stops_on_request(admin):
    t0 = time.monotonic()  # before start(): a start() that waits for its process would take the full 30 s
    run = admin.slot.start("ppo", [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(30)"])
    assert time.monotonic() - t0 < 5 and run.proc.poll() is None  # returned at once, the process still runs
    with pytest.raises(gr.Error, match="still running"):
        admin.slot.start("dataset", [sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while "working" not in admin.slot.status() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "running" in admin.slot.status() and "working" in admin.slot.status()
    assert "Stopped the ppo process" in admin.stop(admin.token)
    assert run.proc.poll() is not None and "finished with exit code" in admin.slot.status()
