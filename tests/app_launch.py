"""Launch the app for a test: temp folders, a free port on 127.0.0.1, the app's own launch settings."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]

from webui import app

# Debian's chromium driven by Playwright (never `playwright install`): the flags keep it offline and quiet.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
from webui.admin import Admin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_paths(tmp: Path) -> app.AppPaths:
    """Database and work folder apart from the served exports and Gradio cache, as in production."""
    paths = app.AppPaths(db=tmp / "data" / "store.sqlite3", exports=tmp / "cache" / "exports",
                         gradio_tmp=tmp / "cache" / "gradio", work=tmp / "data" / "work")
    paths.prepare()  # also points GRADIO_TEMP_DIR at tmp
    return paths


@contextlib.contextmanager
def launched(backend, paths: app.AppPaths, model: str | None = None, user_header: str | None = None,
             admin_users: tuple[str, ...] = ()) -> Iterator[tuple[str, Admin]]:
    """Yield (url, admin) of the running app (multi-user mode with ``user_header``); close it in any case."""
    admin = Admin(db=paths.db, work=paths.work, exports=paths.exports, model=model, backend=backend)
    demo = app.build_demo(backend, admin, user_header=user_header, admin_users=admin_users)
    demo.queue(max_size=64, default_concurrency_limit=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                            **app.launch_kwargs(paths, "127.0.0.1", free_port(), user_header=user_header,
                                                takes_image=bool(getattr(backend, "takes_image", False))))
    try:
        yield url, admin
    finally:
        admin.close()
        demo.close()


def fake_server(tmp_path_factory, name: str) -> Iterator[tuple]:
    """(backend, paths, url) of the app on a FakeBackend, with the Admin tab disabled; for module fixtures:
    ``yield from fake_server(tmp_path_factory, "app")``."""
    import pytest
    from app_fake_backend import FakeBackend

    from webui.admin import ADMIN_PASSWORD_ENV

    tmp = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ADMIN_PASSWORD_ENV, raising=False)
        paths = app_paths(tmp)
        backend = FakeBackend(paths.exports)
        with launched(backend, paths) as (url, _admin):
            yield backend, paths, url


def store_row_counts(db: Path) -> dict[str, int]:
    """Rows of every table of the store at ``db``, read through a separate read-only connection (to assert
    that a refused request wrote nothing)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                            "AND name NOT LIKE 'sqlite_%'")]
        return {t: con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


JOB_TIMEOUT_S = 90


def wait_for_done(client, job_id: int, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """The job list (``/jobs``) once the job is done and its consistency (stored just after) is shown."""
    deadline = time.monotonic() + timeout_s
    html = ""
    while time.monotonic() < deadline:
        html, _finals = client.predict(api_name="/jobs")
        m = re.search(rf"data-job='{job_id}' data-state='(\w+)'.*?</tr>", html)
        if m and m.group(1) in ("failed", "cancelled"):
            raise AssertionError(html)
        if m and m.group(1) == "done" and "PSNR" in m.group(0):
            return html
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} not done with its consistency after {timeout_s} s: {html}")
