"""The app's wiring against a stand-in backend, through gradio_client on a launched server.

Fast (no model): streaming, selection-to-id mapping, refine polling, history, the PNG download,
bad input, the admin lock and the file-serving limits. The same flow on the embedded model is
``test_app_e2e.py``.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from app_launch import fake_server

from webui.app import launch_kwargs

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from store.png import read_png_parameters  # noqa: E402
from webui.admin import ADMIN_PASSWORD_ENV, Admin  # noqa: E402

FIELDS = dict(prompts="a red circle\na blue square", negative="", seed_count=3, seed_start=5, seed_list="",
              steps=4, solver="consistency", guidance=3.0, width=32, height=32, refine_steps=6)


def explore(**changes):
    return list({**FIELDS, **changes}.values())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (launching costs seconds); each test gets a fresh backend state."""
    yield from fake_server(tmp_path_factory, "app")


@pytest.fixture()
def served(server, tmp_path):
    backend, paths, url = server
    backend.__init__(paths.exports, chunk=2, step_s=0.01)  # forget earlier tests' previews and jobs
    return Client(url, verbose=False, download_files=str(tmp_path)), backend, paths, url


def wait_done(client: Client, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        html, _finals = client.predict(api_name="/jobs")
        if "data-state='done'" in html:
            return html
        time.sleep(0.1)
    raise AssertionError(f"no job finished in {timeout} s: {html}")


def test_preview_select_refine_history_download(served):
    client, backend, _paths, _url = served
    gallery, selection, status = client.predict(*explore(), api_name="/preview")
    expected = [f"seed {s} · {p}" for p in ("a red circle", "a blue square") for s in (5, 6, 7)]
    assert [g["caption"] for g in gallery] == expected
    assert "6 previews" in status
    values = [v for _label, v in selection["choices"]]
    # Tile #5 ("a blue square", seed 6): the refine maps it back to its preview id through the snapshot.
    client.predict([values[4]], 6, api_name="/refine")
    assert backend.jobs_[1]["preview_id"] == 5
    html = wait_done(client)
    assert "a blue square" in html and "PSNR" in html

    history, note = client.predict("blue square", api_name="/search_history")
    assert history[0]["caption"].startswith("final:1 · a blue square · seed 6")
    png = Path(client.predict("final:1", api_name="/history_png"))
    params = read_png_parameters(png.read_bytes())
    assert (params["prompt"], params["seed"], params["width"]) == ("a blue square", 6, 32)

    sent = client.predict("final:1", api_name="/send_to_explore")
    assert list(sent[:4]) == ["a blue square", "", 1, 6] and sent[6] == "consistency"


def test_preview_streams_before_the_grid_is_done(served):
    client, backend, _paths, _url = served
    backend.chunk, backend.chunk_s = 1, 0.35
    job = client.submit(*explore(seed_count=2, prompts="one\ntwo"), api_name="/preview")
    job.result(timeout=30)
    sizes = [len(out[0]) for out in job.outputs()]
    assert sizes[-1] == 4 and min(sizes) < 4, sizes


@pytest.mark.parametrize("changes, field", [
    (dict(prompts="  \n "), "Prompts"),
    (dict(seed_list="9-3"), "Seed list"),
    (dict(seed_list="1, x"), "Seed list"),
    (dict(seed_count=0), "Seed count"),
    (dict(seed_start=2**32), "Seed start"),
    (dict(steps=0), "Preview steps"),
    (dict(solver="nope"), "Solver"),
    (dict(solver="consistency:/tmp/elsewhere"), "Solver"),  # a path-form name never comes from the UI
    (dict(guidance=-1.0), "Guidance"),
    (dict(width=33.5), "Width"),
    (dict(negative="two\nlines"), "Negative prompt"),
])
def test_bad_input_names_the_field_and_runs_nothing(served, changes, field):
    client, backend, _paths, _url = served
    with pytest.raises(AppError, match=field):
        client.predict(*explore(**changes), api_name="/preview")
    assert backend.calls == [] and backend.previews == {}


def test_refine_refuses_stale_or_empty_selection(served):
    client, backend, _paths, _url = served
    with pytest.raises(AppError, match="Selection"):
        client.predict([], 6, api_name="/refine")
    _g, first, _s = client.predict(*explore(seed_count=1), api_name="/preview")
    client.predict(*explore(seed_count=1), api_name="/preview")  # a new grid replaces the snapshot
    with pytest.raises(AppError, match="grid changed"):
        client.predict([first["choices"][0][1]], 6, api_name="/refine")
    with pytest.raises(AppError, match="Refine steps"):
        _g, sel, _s = client.predict(*explore(seed_count=1), api_name="/preview")
        client.predict([sel["choices"][0][1]], 0, api_name="/refine")
    assert backend.jobs_ == {}


def test_admin_endpoints_are_private_and_locked(served, tmp_path, monkeypatch):
    client, backend, paths, _url = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert not [name for name in endpoints if "admin" in name]
    assert {"/preview", "/refine", "/jobs", "/cancel_job", "/search_history", "/history_png"} <= set(endpoints)
    admin = Admin(paths.db, paths.work, paths.exports, None, backend)
    assert not admin.enabled
    import gradio as gr

    with pytest.raises(gr.Error, match="disabled"):
        admin.unlock("anything")
    monkeypatch.setenv(ADMIN_PASSWORD_ENV, "s3cret")
    admin = Admin(paths.db, paths.work, paths.exports, None, backend)
    for forged in (False, True, None, "a-guessed-token"):
        with pytest.raises(gr.Error, match="unlock"):
            admin.start_ppo(forged, 1, 10)
    refused = admin.unlock("guess")
    assert refused[3] == "Admin password: wrong password." and refused[0] == gr.skip()  # nothing unlocked
    token = admin.unlock("s3cret")[0]
    assert isinstance(token, str) and len(token) >= 32 and admin.gate.alive(token)
    assert admin.slot.current is None  # nothing was started by the refused calls


def test_files_outside_the_export_folder_are_not_served(served):
    client, _backend, paths, url = served
    paths.db.write_bytes(b"SQLite format 3\x00 secret")
    (paths.work / "note.txt").write_text("secret")
    for target in (paths.db, paths.work / "note.txt", Path(__file__)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}gradio_api/file={target}", timeout=5)
        assert err.value.code in (403, 404)
    kwargs = launch_kwargs(paths)
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["share"] is False
    assert kwargs["allowed_paths"] == [str(paths.exports)] and str(paths.db) in kwargs["blocked_paths"]


def test_cancel_bad_id_and_unknown_history_item(served):
    client, _backend, _paths, _url = served
    with pytest.raises(AppError, match="Job id"):
        client.predict(0, api_name="/cancel_job")
    with pytest.raises(AppError, match="Item"):
        client.predict("../../etc/passwd", api_name="/history_png")
    with pytest.raises(AppError, match="Item"):
        client.predict("final:999", api_name="/history_png")


@pytest.mark.browser
def test_escape_stops_a_streaming_grid(served):
    """Esc (the Stop button) ends the preview stream between chunks; later chunks are never made."""
    from app_launch import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (Debian package 'chromium'; scripts/test.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    _client, backend, _paths, url = served
    backend.chunk, backend.chunk_s = 1, 0.5
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#prompts textarea").fill("a slow grid")
            page.locator("#seed-count input").fill("12")
            page.locator("#preview-btn").click()
            sync_api.expect(page.locator("#preview-gallery img")).to_have_count(2, timeout=30_000)
            page.keyboard.press("Escape")
            made = len(backend.previews)
            time.sleep(2.5)  # five more chunks' worth
            assert len(backend.previews) <= made + 1 < 12  # at most the chunk in flight finishes
        finally:
            browser.close()
