"""End to end on the real engine and store: the launched app driven by gradio_client, then by Chromium.

The model is the embedded default when it loads here, else a tiny random-weight Stable Diffusion
folder built in the test (no download either way). One server serves both tests (a model load and
a launch cost seconds on two cores).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from app_launch import (
    CHROMIUM,
    CHROMIUM_ARGS,
    JOB_TIMEOUT_S,
    REPO,
    app_paths,
    launched,
    store_row_counts,
    wait_for_done,
)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from webui.admin import ADMIN_PASSWORD_ENV  # noqa: E402

ARTIFACTS = REPO / "tests" / "artifacts"
ADMIN_PASSWORD = "e2e-admin-password"


def _open_backend(paths, tmp: Path):
    """The embedded default model; a tiny random SD folder only while the embedded weights are absent."""
    from models.errors import ModelLoadError
    from webui.backend import EngineBackend

    opts = dict(db=paths.db, exports=paths.exports, devices="cpu", forbid_under=[paths.exports, paths.gradio_tmp])
    try:
        return EngineBackend.open(model=None, **opts), None
    except ModelLoadError:  # EngineBackend.open closed the store and released its lock
        from tiny_sd import save_tiny_sd

        model = str(save_tiny_sd(tmp / "tiny-sd"))
        return EngineBackend.open(model=model, **opts), model


@pytest.fixture(scope="module")
def real_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app-e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
        paths = app_paths(tmp)
        backend, model = _open_backend(paths, tmp)
        try:
            with launched(backend, paths, model=model) as (url, _admin):
                yield url, backend, tmp
        finally:
            backend.close()


def test_preview_refine_history_download_with_gradio_client(real_app, tmp_path):
    from store.png import read_png_parameters

    url, backend, _tmp = real_app
    height, width = backend.default_size
    client = Client(url, verbose=False, download_files=str(tmp_path))
    gallery, selection, status = client.predict(
        "a red circle", "", 2, 0, "", 2, "consistency", backend.default_guidance, width, height, 4,
        api_name="/preview")
    assert [g["caption"] for g in gallery] == ["seed 0 · a red circle", "seed 1 · a red circle"], status
    for g in gallery:  # the PNG the store wrote, parameters and all, is what the gallery serves
        assert read_png_parameters(Path(g["image"]).read_bytes())["prompt"] == "a red circle"

    message = client.predict([selection["choices"][1][1]], 4, api_name="/refine")
    job_id = int(re.search(r"#(\d+)", message).group(1))
    wait_for_done(client, job_id)
    _html, finals = client.predict(api_name="/jobs")
    assert [f["caption"].split(" · ")[0] for f in finals[:2]] == ["preview", "final"]

    history, note = client.predict("red circle", api_name="/search_history")
    first = history[0]["caption"]
    assert re.match(r"final:\d+ · a red circle · seed 1 · 4 steps", first), (first, note)
    ref = first.split(" · ")[0]
    png = Path(client.predict(ref, api_name="/history_png"))
    stored = backend.store.get_final(int(ref.split(":")[1])).png
    assert png.read_bytes() == stored  # the stored PNG itself, not a re-encoded image
    params = read_png_parameters(png.read_bytes())
    assert (params["prompt"], params["seed"], params["steps"]) == ("a red circle", 1, 4)
    assert (params["width"], params["height"]) == (width, height)

    assert backend.prune_exports(max_age_s=0) >= 3  # export copies go; the store re-exports on demand
    assert Path(client.predict(ref, api_name="/history_png")).read_bytes() == stored

    sent = client.predict(ref, api_name="/send_to_explore")
    assert list(sent[:4]) == ["a red circle", "", 1, 1] and sent[5] == 2 and sent[10] == 4

    # A long refine is cancelled from the Refine tab and ends 'cancelled', without a final.
    message = client.predict([selection["choices"][0][1]], 200, api_name="/refine")
    long_job = int(re.search(r"#(\d+)", message).group(1))
    assert "cancel" in client.predict(long_job, api_name="/cancel_job")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while backend.store.get_job(long_job).state != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.1)
    job = backend.store.get_job(long_job)
    assert job.state == "cancelled" and job.progress_step < 200 and backend.store.get_final_for_job(long_job) is None


def test_a_text_to_image_model_takes_no_input_image(real_app):
    """Its image input is absent and uploads are closed; an image record sent through the API anyway (a file
    the app itself served) is refused naming ``image``, and nothing is written."""
    import json

    import httpx
    from test_app_hostile import call

    url, backend, tmp = real_app
    assert not backend.takes_image
    assert httpx.post(url + "gradio_api/upload", files={"files": ("a.png", b"\x89PNG")}).status_code == 404
    h, w = backend.default_size
    fields = ["a blue square", "", 1, 0, "", 2, "ddim", backend.default_guidance, w, h, 4]
    event, data, _ = call(url, "preview", json.dumps({"data": fields + [None, False]}), timeout=60)
    assert event == "complete", data
    served = data[0][0]["image"]["path"]  # a PNG in Gradio's cache: a file Gradio accepts as input
    before = store_row_counts(tmp / "data" / "store.sqlite3")
    image = {"path": served, "meta": {"_type": "gradio.FileData"}}
    event, data, _ = call(url, "preview", json.dumps({"data": fields + [image, False]}), timeout=60)
    assert event == "error" and re.fullmatch(r"image: .* is a text-to-image model and takes no input image",
                                             data["error"]), data
    assert store_row_counts(tmp / "data" / "store.sqlite3") == before


def test_concurrent_sessions_interleave_on_the_device(real_app):
    """A one-tile grid submitted while a four-chunk grid runs finishes before that grid does."""
    import threading

    from webui.backend import EngineBackend
    from webui.inputs import ExploreSettings

    _url, shared, _tmp = real_app
    backend = EngineBackend(shared.store, shared.executor, shared.exports, chunk_size=1)
    h, w = backend.default_size

    def grid(prompts):
        return ExploreSettings(prompts=prompts, negative_prompt="", seeds=[3], steps=2, solver="ddim",
                               guidance=backend.default_guidance, width=w, height=h)

    done_at: dict[str, list[float]] = {"alice": [], "bob": []}
    first_tile = threading.Event()

    def alice():
        for _chunk in backend.preview(grid(["one", "two", "three", "four"]), "alice"):
            done_at["alice"].append(time.monotonic())
            first_tile.set()

    thread = threading.Thread(target=alice)
    thread.start()
    assert first_tile.wait(60)
    for _chunk in backend.preview(grid(["bob's"]), "bob"):
        done_at["bob"].append(time.monotonic())
    thread.join(60)
    assert len(done_at["alice"]) == 4 and len(done_at["bob"]) == 1
    assert done_at["bob"][0] < done_at["alice"][-1], done_at


def test_admin_views_follow_the_store(real_app):
    """The reward plot, checkpoint table and activation read and write the app's store."""
    import torch

    _url, backend, _tmp = real_app
    store = backend.store
    run = store.start_training_run({"num_updates": 3}, name="e2e-run")
    for update, reward in enumerate([0.1, 0.25, 0.4]):
        store.log_training_metrics(run, update, {"update": update, "reward_mean": reward, "approx_kl": 0.01})
    frame = backend.reward_frame()
    assert frame["update"].tolist() == [0, 1, 2] and frame["reward"].tolist() == pytest.approx([0.1, 0.25, 0.4])
    ours = store.add_checkpoint("e2e-ours", config={"k": 1}, weights={"w": torch.zeros(2)}, metrics={"psnr_k4": 30.5},
                                model_id=backend.model_name, training_run_id=run)
    other = store.add_checkpoint("e2e-other", config={"k": 1}, weights={"w": torch.zeros(2)}, model_id="another")
    table = backend.checkpoints_table()
    assert table.loc[table["id"] == ours, "psnr_k4"].item() == 30.5
    with pytest.raises(ValueError, match="Checkpoint id: .* another"):
        backend.activate_checkpoint(other)
    with pytest.raises(ValueError, match="Checkpoint id: there is no checkpoint"):
        backend.activate_checkpoint(10_000)
    try:
        assert backend.activate_checkpoint(ours) == "e2e-ours"
        assert store.get_active_checkpoint().id == ours
        assert backend.checkpoints_table().loc[lambda t: t["id"] == ours, "active"].item() == "✔"
    finally:
        store.set_active_checkpoint(None)  # the fake weights must not serve the other tests' previews


@pytest.mark.browser
def test_browser_preview_and_refine(real_app):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (Debian package 'chromium'; scripts/test.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, backend, _tmp = real_app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            prompts = page.locator("#prompts textarea")
            sync_api.expect(prompts).to_be_visible(timeout=30_000)
            # A text-to-image model: no image input, no keep-size box, no "use as input" (editing models only).
            for hidden in ("#input-image", "#keep-size", "#use-input-btn", "#history-input"):
                sync_api.expect(page.locator(hidden)).to_be_hidden()
            prompts.fill("a green triangle\na yellow circle")
            page.locator("#seed-count input").fill("3")
            page.locator("#steps input").fill("2")
            page.locator("#refine-steps input").fill("4")
            prompts.press("Control+Enter")  # the shortcut, not the button
            tiles = page.locator("#preview-gallery img")
            sync_api.expect(tiles).to_have_count(6, timeout=60_000)
            sync_api.expect(page.locator("#explore-status")).to_contain_text("6 previews", timeout=30_000)
            selection = page.locator("#selection")
            tiles.nth(4).click()  # "a yellow circle", seed 1
            sync_api.expect(selection).to_contain_text("#5 a yellow circle · seed 1", timeout=10_000)
            tiles.nth(0).click()  # a second tile, then the first again: clicks toggle
            sync_api.expect(selection).to_contain_text("#1 a green triangle · seed 0", timeout=10_000)
            tiles.nth(0).click()
            sync_api.expect(selection).not_to_contain_text("#1 a green triangle", timeout=10_000)
            sync_api.expect(selection).to_contain_text("#5 a yellow circle · seed 1")
            page.screenshot(path=str(ARTIFACTS / "app-explore.png"), full_page=True)
            if os.environ.get("DIFFUSION_PREVIEW_SCREENSHOT"):  # e.g. docs/screenshot.png for the README
                page.screenshot(path=os.environ["DIFFUSION_PREVIEW_SCREENSHOT"], full_page=False)
            page.locator("#refine-btn").click()
            status = page.locator("#refine-status")
            sync_api.expect(status).to_contain_text("Queued refine job", timeout=20_000)
            job_id = int(re.search(r"#(\d+)", status.inner_text()).group(1))
            page.get_by_role("tab", name="Refine").click()
            job_row = page.locator(f"#jobs tr[data-job='{job_id}']")
            sync_api.expect(job_row).to_have_attribute("data-state", "done", timeout=JOB_TIMEOUT_S * 1000)
            final = page.locator("#finals-gallery").get_by_text(re.compile(rf"final · job #{job_id} · PSNR"))
            sync_api.expect(final).to_be_visible(timeout=10_000)
            sync_api.expect(page.locator("#finals-gallery img").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "app-refine.png"), full_page=True)

            page.get_by_role("tab", name="History").click()
            page.locator("#history-query textarea").fill("yellow")
            page.locator("#history-search-btn").click()
            history = page.locator("#history-gallery")
            caption = re.compile(r"final:\d+ · a yellow circle · seed 1")
            sync_api.expect(history).to_contain_text(caption, timeout=20_000)
            history.locator("img").first.click()
            item = page.locator("#history-item textarea")
            sync_api.expect(item).to_have_value(re.compile(r"final:\d+"), timeout=10_000)
            final_id = item.input_value().split(":")[1]
            page.locator("#png-btn").click()
            sync_api.expect(page.locator("#png-file")).to_contain_text(f"final-{final_id}-", timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "app-history.png"), full_page=True)
            page.locator("#send-btn").click()
            sync_api.expect(page.locator("#prompts textarea")).to_have_value("a yellow circle", timeout=20_000)
            sync_api.expect(page.locator("#seed-start input")).to_have_value("1")

            page.get_by_role("tab", name="Admin").click()
            page.locator("#admin-password input").fill("not the password")
            page.locator("#unlock-btn").click()
            sync_api.expect(page.get_by_text("wrong password")).to_be_visible(timeout=20_000)
            sync_api.expect(page.locator("#admin-proc")).to_be_hidden()
            page.locator("#admin-password input").fill(ADMIN_PASSWORD)
            page.locator("#admin-password input").press("Enter")
            sync_api.expect(page.get_by_text("Start PPO run")).to_be_visible(timeout=20_000)
            sync_api.expect(page.locator("#admin-proc")).to_contain_text("No background process", timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "app-admin.png"), full_page=True)
        finally:
            browser.close()


def test_16_concurrent_users_get_no_errors(real_app):
    """Load, bounded: 16 users on loopback each preview a grid of two new seeds (noise rows are written
    concurrently), search and poll jobs through raw HTTP. 0 errors; the store's integrity_check is ok."""
    import json
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from test_app_hostile import call

    url, backend, _tmp = real_app
    h, w = backend.default_size
    errors: list[str] = []
    preview_s: list[float] = []

    def user(u: int) -> None:
        for k in range(1):
            body = json.dumps({"data": [f"user {u} shape {k}", "", 2, 1000 + 10 * u + 2 * k, "", 4, "ddim",
                                        backend.default_guidance, w, h, 10, None, False]})
            event, data, took = call(url, "preview", body, timeout=120)
            if event != "complete":
                errors.append(f"preview {u}/{k}: {event} {data}")
            preview_s.append(took)
        for api, payload in (("search_history", [f"user {u}"]), ("jobs", [])):
            event, data, _ = call(url, api, json.dumps({"data": payload}), timeout=60)
            if event != "complete":
                errors.append(f"{api} {u}: {event} {data}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        for f in [pool.submit(user, u) for u in range(16)]:
            f.result()
    wall = time.perf_counter() - t0
    p95 = statistics.quantiles(preview_s, n=20, method="inclusive")[-1]
    print(f"\n16 users, {len(preview_s)} previews in {wall:.1f} s: {len(errors)} errors; preview latency median "
          f"{statistics.median(preview_s):.2f} s, p95 {p95:.2f} s, max {max(preview_s):.2f} s")
    assert errors == []
    assert backend.store.integrity_check() == ["ok"]
    n = backend.store.query_one("SELECT count(*) AS n FROM noise WHERE seed BETWEEN 1000 AND 1200")["n"]
    assert n == 16 * 2
