"""The app on a tiny random-weight FLUX.1 Kontext folder (an editing model): the editing flow through
gradio_client (upload, preview instructions x seeds, refine, History with the input image, a final as the
next input), refused input images (named ``image``, nothing written), and the same flow in Chromium.

One server for the module: the tiny model is built from configs in the test (no download) and loads in
seconds; every preview is 32x32 with 1-2 steps.
"""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
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
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from webui.admin import ADMIN_PASSWORD_ENV  # noqa: E402

ARTIFACTS = REPO / "tests" / "artifacts"
INSTRUCTIONS = "make the sky purple\nadd a small red hat"


@pytest.fixture(scope="module")
def kontext_app(tmp_path_factory):
    from tiny_flux import save_tiny_kontext

    from webui.backend import EngineBackend

    tmp = tmp_path_factory.mktemp("app-kontext")
    model = str(save_tiny_kontext(tmp / "tiny-kontext"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ADMIN_PASSWORD_ENV, raising=False)
        paths = app_paths(tmp)
        backend = EngineBackend.open(model=model, db=paths.db, exports=paths.exports, devices="cpu",
                                     forbid_under=[paths.exports, paths.gradio_tmp])
        try:
            assert backend.takes_image
            with launched(backend, paths, model=model) as (url, _admin):
                yield url, backend, paths
        finally:
            backend.close()


def picture(path: Path, seed: int = 7, size: tuple[int, int] = (32, 32)) -> Path:
    rgb = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    Image.fromarray(rgb).save(path)
    return path


def explore(image, instructions: str = INSTRUCTIONS, seeds: int = 2, steps: int = 2, keep: bool = True,
            width=None, height=None, solver: str = "ddim") -> list:
    """The /preview arguments: instructions x seeds at the input's own size (keep) unless a size is given."""
    return [instructions, "", seeds, 0, "", steps, solver, 2.5, width, height, 4, image, keep]


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_edit_flow_upload_preview_refine_history_with_gradio_client(kontext_app, tmp_path):
    """Upload an image, preview 2 instructions x 2 seeds at its size, refine one, find the edit with its input
    in History, and use the final as the next input; the store holds each input image once."""
    url, backend, _paths = kontext_app
    store = backend.store
    client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
    source = picture(tmp_path / "in.png")
    gallery, selection, status = client.predict(*explore(handle_file(str(source))), api_name="/preview")
    captions = [g["caption"] for g in gallery]
    assert captions == [f"seed {s} · {i}" for i in INSTRUCTIONS.splitlines() for s in (0, 1)], status
    assert all(pixels(g["image"]).shape == (32, 32, 3) for g in gallery)
    assert store.count_input_images() == 1

    message = client.predict([selection["choices"][3][1]], 4, api_name="/refine")  # add a small red hat, seed 1
    job_id = int(re.search(r"#(\d+)", message).group(1))
    # The same upload again (a second grid) reuses the stored image.
    client.predict(*explore(handle_file(str(source)), instructions="make the sky purple", seeds=1),
                   api_name="/preview")
    assert store.count_input_images() == 1
    wait_for_done(client, job_id)
    final_id = store.get_final_for_job(job_id).id

    history, note = client.predict("red hat", api_name="/search_history")
    first = history[0]["caption"]
    assert first == f"final:{final_id} · add a small red hat · seed 1 · 4 steps · edit", (first, note)
    input_path, edit_path = client.predict(f"final:{final_id}", api_name="/history_edit")
    assert np.array_equal(pixels(input_path), pixels(source))  # the input image, beside the edit
    assert np.array_equal(pixels(edit_path), pixels(io.BytesIO(store.get_final(final_id).png)))
    from store.png import read_png_parameters

    params = read_png_parameters(Path(client.predict(f"final:{final_id}", api_name="/history_png")).read_bytes())
    input_id = store.get_generation(store.get_job(job_id).generation_id).input_image_id
    assert params["Input image"] == store.get_input_image(input_id, with_png=False).sha256  # the download names it
    sent = client.predict(f"final:{final_id}", api_name="/send_to_explore")
    assert sent[0] == "add a small red hat" and sent[3] == 1 and np.array_equal(pixels(sent[11]), pixels(source))

    # "Use this final as input": the final becomes Explore's input image, and the next edit starts from it.
    used = client.predict(f"final:{final_id}", api_name="/use_as_input")  # (the Tabs output is no value)
    assert np.array_equal(pixels(used), pixels(edit_path))
    preview_id = store.list_previews(search=None, owner=None, limit=1)[0].id
    with pytest.raises(AppError, match=f"Item: preview:{preview_id} is a preview"):
        client.predict(f"preview:{preview_id}", api_name="/use_as_input")
    again, _sel, _status = client.predict(*explore(handle_file(used), instructions="make it night", seeds=1),
                                          api_name="/preview")
    assert [g["caption"] for g in again] == ["seed 0 · make it night"]
    assert store.count_input_images() == 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (its data is a few bytes: a bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def palette(transparent_pixel: bool) -> bytes:
    """A palette PNG with a transparent palette entry, used by one pixel or by none."""
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    if transparent_pixel:
        image.putpixel((3, 3), 0)
    return _encoded(image, transparency=0)


REFUSED = {
    "no image": (None, r"image: .* is an editing model; give an input image"),
    "not an image": (b"this is not a picture at all", r"image: not a readable image file"),
    "decompression bomb": (declared_png(100_000, 100_000), r"image: its declared size is over the limit"),
    "over the pixel limit": (declared_png(5000, 4000), r"image: 5000x4000 is 20000000 pixels, over the limit"),
    "CMYK": (_encoded(Image.new("CMYK", (32, 32), (0, 50, 100, 0)), "JPEG"), r"image: mode CMYK is refused"),
    "palette with transparent pixels": (palette(True), r"image: it has transparent pixels"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_input_images_name_the_field_and_write_nothing(kontext_app, tmp_path, case):
    url, _backend, paths = kontext_app
    data, message = REFUSED[case]
    image = None
    if data is not None:
        (tmp_path / "upload.png").write_bytes(data)
        image = handle_file(str(tmp_path / "upload.png"))
    client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
    before = store_row_counts(paths.db)
    with pytest.raises(AppError, match=message):
        client.predict(*explore(image, seeds=1, steps=1), api_name="/preview")
    assert store_row_counts(paths.db) == before


SAFE = {  # converted to RGB without changing what the user sees (runtime.images.read_input_image)
    "16-bit greyscale": _encoded(Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64),
                                                 mode="I;16")),
    "palette with an unused transparent entry": palette(False),
}


@pytest.mark.parametrize("case", list(SAFE))
def test_safe_modes_are_converted_and_previewed(kontext_app, tmp_path, case):
    url, _backend, _paths = kontext_app
    (tmp_path / "upload.png").write_bytes(SAFE[case])
    client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
    gallery, _sel, status = client.predict(*explore(handle_file(str(tmp_path / "upload.png")), seeds=1, steps=1,
                                                    instructions="make it blue"), api_name="/preview")
    assert len(gallery) == 1 and pixels(gallery[0]["image"]).shape == (32, 32, 3), status


def test_uploads_are_open_and_bounded_for_an_editing_model(kontext_app):
    import httpx

    from runtime.images import MAX_INPUT_BYTES
    from webui.guard import UPLOAD_OVERHEAD_BYTES

    url, _backend, _paths = kontext_app
    r = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", declared_png(8, 8))})
    assert r.status_code == 200 and len(r.json()) == 1
    too_big = b"x" * (MAX_INPUT_BYTES + UPLOAD_OVERHEAD_BYTES + 1)
    r = httpx.post(url + "gradio_api/upload", content=too_big, headers={"content-type": "multipart/form-data"})
    assert r.status_code == 413
    assert httpx.get(url + "monitoring").status_code == 404  # the other closed routes stay closed


@pytest.mark.browser
def test_browser_uploads_previews_refines_and_uses_a_final_as_input(kontext_app, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (Debian package 'chromium'; scripts/test.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, backend, _paths = kontext_app
    source = picture(tmp_path / "in.png", seed=11)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            sync_api.expect(page.locator("#input-image")).to_be_visible(timeout=30_000)
            sync_api.expect(page.get_by_text("Instructions", exact=True).first).to_be_visible()
            page.locator("#input-image input[type=file]").set_input_files(str(source))
            sync_api.expect(page.locator("#input-image img").first).to_be_visible(timeout=20_000)
            page.locator("#keep-size input").check()
            page.locator("#prompts textarea").fill("make the sky purple")
            page.locator("#seed-count input").fill("2")
            page.locator("#steps input").fill("2")
            page.locator("#preview-btn").click()
            sync_api.expect(page.locator("#preview-gallery img")).to_have_count(2, timeout=60_000)
            sync_api.expect(page.locator("#explore-status")).to_contain_text("2 previews", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "app-kontext-explore.png"), full_page=True)
            page.locator("#refine-steps input").fill("2")
            page.locator("#preview-gallery img").nth(1).click()  # seed 1
            sync_api.expect(page.locator("#selection")).to_contain_text("#2 make the sky purple · seed 1")
            page.locator("#refine-btn").click()
            sync_api.expect(page.locator("#refine-status")).to_contain_text("Queued refine job", timeout=20_000)
            job_id = int(re.search(r"#(\d+)", page.locator("#refine-status").inner_text()).group(1))

            # History: the edit, picked, shows beside the input image it started from.
            page.get_by_role("tab", name="History").click()
            page.locator("#history-query textarea").fill("purple")
            page.locator("#history-search-btn").click()
            history = page.locator("#history-gallery")
            sync_api.expect(history).to_contain_text(re.compile(r"preview:\d+ · make the sky purple .* · edit"),
                                                     timeout=20_000)
            history.locator("img").first.click()
            sync_api.expect(page.locator("#history-input img").first).to_be_visible(timeout=20_000)
            sync_api.expect(page.locator("#history-picked img").first).to_be_visible(timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "app-kontext-history.png"), full_page=True)

            # The refined final, used as the next input: it lands in Explore's image input.
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while backend.store.get_job(job_id).state != "done" and time.monotonic() < deadline:
                time.sleep(0.2)
            final_id = backend.store.get_final_for_job(job_id).id
            page.locator("#history-item textarea").fill(f"final:{final_id}")
            page.locator("#use-input-btn").click()
            sync_api.expect(page.locator("#input-image img[src*='final-']").first).to_be_visible(timeout=20_000)
            sync_api.expect(page.locator("#prompts textarea")).to_be_visible()  # back on Explore
        finally:
            browser.close()
