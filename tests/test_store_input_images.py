"""The input image of an edit in the store: stored once per owner by the sha256 of its canonical PNG,
referenced by every generation (so every preview and final) that used it, its hash in their PNG
``parameters``, verified on read; bad input writes nothing; the m0005 migration keeps old rows."""

from __future__ import annotations

import hashlib
import io
import re
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import store
from store.connection import StoreBase
from store.migrations import MIGRATIONS, apply_migrations


@pytest.fixture
def s(tmp_path: Path):
    with store.open_store(tmp_path / "s.sqlite3") as st:
        yield st


def picture(seed: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def edit(s: store.Store, input_image_id: int | None, seed: int = 1, **kw) -> int:
    noise_id, _ = s.get_or_create_noise(seed, (4, 2, 2))
    return s.add_generation(model_id="tiny/kontext", prompt="make the sky purple", seed=seed, height=16, width=16,
                            guidance=2.5, noise_id=noise_id, input_image_id=input_image_id, **kw)


def counts(s: store.Store) -> tuple[int, int, int]:
    return tuple(s.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("input_images", "generations", "prompts"))


def test_stored_once_however_many_generations_and_previews_use_it(s: store.Store) -> None:
    image = picture(0)
    ids = {s.put_input_image(image).id for _ in range(5)}
    assert len(ids) == 1 and s.count_input_images() == 1
    (input_id,) = ids
    generations = [edit(s, s.put_input_image(picture(0)).id, seed=seed) for seed in range(5)]  # equal pixels, new objects
    previews = [s.add_preview(g, solver="consistency", steps=4, image=picture(9), timings_ms={}) for g in generations]
    assert s.count_input_images() == 1
    assert {s.get_generation(g).input_image_id for g in generations} == {input_id}
    assert {p.generation.input_image_id for p in s.list_previews(limit=10)} == {input_id}
    stored = s.get_input_image(input_id)
    assert (stored.width, stored.height, stored.mode, stored.owner) == (20, 12, "RGB", "local")
    assert stored.sha256 == hashlib.sha256(stored.png).hexdigest()
    assert np.array_equal(np.asarray(stored.image()), np.asarray(image))  # the pixels come back exactly
    assert s.find_input_image(stored.sha256) == stored
    assert s.get_input_image(input_id, with_png=False).png is None
    assert len(previews) == 5


def test_different_pixels_are_different_rows(s: store.Store) -> None:
    a, b = picture(0), picture(0)
    b.putpixel((3, 4), tuple((v + 1) % 256 for v in b.getpixel((3, 4))))
    ia, ib = s.put_input_image(a), s.put_input_image(b)
    assert ia.id != ib.id and ia.sha256 != ib.sha256 and s.count_input_images() == 2


def test_canonical_png_ignores_metadata_and_is_deterministic(s: store.Store) -> None:
    """The same pixels give the same row however they arrived: an ICC profile or text chunk of the
    upload, or the upload's own PNG compression, is not part of the stored bytes."""
    plain = s.put_input_image(picture(3))
    tagged = picture(3)
    tagged.info.update({"icc_profile": b"not really a profile", "comment": "hello"})
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "someone else's prompt")
    buf = io.BytesIO()
    picture(3).save(buf, format="PNG", compress_level=0, pnginfo=info)
    reloaded = Image.open(io.BytesIO(buf.getvalue()))
    assert reloaded.text and s.put_input_image(tagged).id == plain.id == s.put_input_image(reloaded.convert("RGB")).id
    with Image.open(io.BytesIO(s.get_input_image(plain.id).png)) as im:
        assert "icc_profile" not in im.info and not im.text


def test_owners_do_not_share_input_images(s: store.Store) -> None:
    mine = s.put_input_image(picture(1))
    theirs = s.put_input_image(picture(1), owner="bob")
    assert mine.id != theirs.id and mine.sha256 == theirs.sha256 and theirs.owner == "bob"
    assert s.count_input_images() == 2 and s.count_input_images(owner="bob") == 1
    assert s.find_input_image(mine.sha256, owner="carol") is None
    before = counts(s)
    with pytest.raises(store.NotFoundError, match=f"input_images row {theirs.id}"):
        edit(s, theirs.id)  # owner 'local' may not reference bob's upload
    assert counts(s) == before


def test_preview_and_final_parameters_carry_the_full_hash(s: store.Store) -> None:
    stored = s.put_input_image(picture(2))
    gen = edit(s, stored.id)
    pid = s.add_preview(gen, solver="consistency", steps=4, image=picture(7), timings_ms={"total": 1.0})
    params = store.read_png_parameters(s.get_preview(pid).png)
    assert params["Input image"] == stored.sha256 and len(params["Input image"]) == 64
    job = s.enqueue_job(gen, steps=8, solver="euler")
    s.claim_job(job, "cpu")
    final_id = s.finish_job(job, "done", image=picture(8))
    assert store.read_png_parameters(s.get_final(final_id).png)["Input image"] == stored.sha256
    text_to_image = s.add_preview(edit(s, None, seed=2), solver="consistency", steps=4, image=picture(7), timings_ms={})
    assert "Input image" not in store.read_png_parameters(s.get_preview(text_to_image).png)


def test_format_and_parse_round_trip_the_input_image_hash() -> None:
    params = {"prompt": "add a hat", "steps": 4, "sampler": "consistency", "cfg_scale": 2.5, "seed": 3,
              "width": 16, "height": 16, "model": "tiny/kontext", "Input image": "ab" * 32}
    assert store.parse_parameters(store.format_parameters(params))["Input image"] == "ab" * 32


def test_corrupted_png_raises_and_verify_blobs_reports_it(s: store.Store, tmp_path: Path) -> None:
    good = s.put_input_image(picture(4))
    bad = s.put_input_image(picture(5))
    blob = bytearray(bad.png)
    blob[-20] ^= 0x01
    with s.transaction() as db:
        db.execute("UPDATE input_images SET png = ? WHERE id = ?", [bytes(blob), bad.id])
    with pytest.raises(store.BlobIntegrityError, match=rf"^input_images row {bad.id} is corrupted") as err:
        s.get_input_image(bad.id)
    assert err.value.row_id == bad.id and s.get_input_image(good.id).png == good.png
    assert s.verify_blobs() == [str(err.value)]
    with pytest.raises(store.BlobIntegrityError):
        s.export_png("input", bad.id, tmp_path / "out.png")
    s.close()
    with pytest.raises(store.StoreError, match=f"input_images row {bad.id}"):
        store.open_store(s.path, check="full")


def test_export_input_image(s: store.Store, tmp_path: Path) -> None:
    stored = s.put_input_image(picture(6))
    out = s.export_png("input", stored.id, tmp_path / "in.png")
    assert out.read_bytes() == stored.png


@pytest.mark.parametrize("bad, why", [
    (picture(0).convert("RGBA"), "mode 'RGBA'"),
    (picture(0).convert("L"), "mode 'L'"),
    (picture(0).convert("P"), "mode 'P'"),
    (Image.new("I;16", (4, 4)), "mode 'I;16'"),
    (Image.new("RGB", (0, 4)), "at least one pixel"),
    (b"\x89PNG not an image object", "PIL.Image.Image"),
    (np.zeros((4, 4, 3), np.uint8), "PIL.Image.Image"),
])
def test_bad_image_is_refused_naming_image_and_nothing_written(s: store.Store, bad, why: str) -> None:
    with pytest.raises(ValueError, match=rf"^image must .*{re.escape(why)}"):
        s.put_input_image(bad)
    assert s.count_input_images() == 0


def test_bad_owner_and_hash_are_refused(s: store.Store) -> None:
    with pytest.raises(ValueError, match="owner"):
        s.put_input_image(picture(0), owner="")
    with pytest.raises(ValueError, match="sha256"):
        s.find_input_image("ABC")
    assert s.count_input_images() == 0


@pytest.mark.parametrize("bad_id", [12345, "1", True])
def test_unknown_input_image_id_writes_no_generation(s: store.Store, bad_id) -> None:
    s.put_input_image(picture(0))
    before = counts(s)
    with pytest.raises((store.NotFoundError, ValueError), match="input_image"):
        s.add_generation(model_id="m", prompt="a brand new prompt", seed=1, height=8, width=8, guidance=1.0,
                         input_image_id=bad_id)
    assert counts(s) == before  # not even the new prompt row
    with pytest.raises(store.NotFoundError, match="input_images row 999"):
        s.get_input_image(999)


def test_unknown_id_is_not_found_error_naming_table(s: store.Store) -> None:
    with pytest.raises(store.NotFoundError) as err:
        edit(s, 77)
    assert (err.value.table, err.value.row_id) == ("input_images", 77)
    assert s.query("SELECT count(*) AS n FROM generations")[0]["n"] == 0


def test_put_joins_an_enclosing_transaction(s: store.Store) -> None:
    """The refine path puts the image, the noise, the generation and the job in one transaction."""
    with pytest.raises(RuntimeError):
        with s.transaction():
            edit(s, s.put_input_image(picture(0)).id)
            raise RuntimeError("crash before commit")
    assert counts(s) == (0, 0, 0)


def test_migration_from_m0004_keeps_generations(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    n = next(i for i, m in enumerate(MIGRATIONS) if m.name == "m0005_input_images")
    conn = StoreBase.connect(path, 5000)
    old = StoreBase(path, conn)
    old.enable_wal()
    apply_migrations(old, MIGRATIONS[:n])
    old.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO prompts (owner, prompt, negative_prompt, created_at) VALUES ('local', 'old', '', 'x')")
    conn.execute("INSERT INTO generations (owner, prompt_id, model_id, seed, height, width, guidance, created_at) "
                 "VALUES ('local', 1, 'm', 5, 8, 8, 7.5, 'x')")
    conn.commit()
    conn.close()
    with store.open_store(path, check="full") as s:
        assert s.backup_path is not None
        old_gen = s.get_generation(1)
        assert (old_gen.prompt, old_gen.seed, old_gen.input_image_id) == ("old", 5, None)
        assert s.count_input_images() == 0
        new_gen = edit(s, s.put_input_image(picture(0)).id)
        assert s.get_generation(new_gen).input_image_id is not None
        assert [g.input_image_id is None for g in s.list_generations()] == [False, True]
        assert s.integrity_check() == ["ok"]


def test_two_threads_on_two_connections_put_one_row(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store.open_store(path).close()
    stores = [store.open_store(path) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[store.InputImage] = []
    errors: list[BaseException] = []

    def put(st: store.Store) -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(10):
                results.append(st.put_input_image(picture(0)))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(st,)) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for st in stores:
        st.close()
    assert errors == []
    assert len(results) == 20 and len({r.id for r in results}) == 1
    with store.open_store(path) as st:
        assert st.count_input_images() == 1
