"""Round trips through the store: noise tensors, PNG images with A1111 metadata, checkpoints;
corrupted blobs raise errors that name the row."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import store
from store import parse_parameters

# sha256 of the raw float32 bytes of make_noise(42, (4, 8, 8)) with torch's CPU generator.
# If this changes, torch changed its CPU RNG: seeds would no longer reproduce old previews,
# which is exactly why the store keeps the noise itself.
PINNED_NOISE_SHA256 = "9ff459eefd9169b11138967326b63683050096a4f7b9df76ecb1bb893ad4c84f"


@pytest.fixture
def s(tmp_path: Path):
    with store.open_store(tmp_path / "s.sqlite3") as st:
        yield st


def random_image(seed: int, size: tuple[int, int] = (24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_noise_round_trip_and_reuse(s: store.Store) -> None:
    nid, t = s.get_or_create_noise(42, (4, 8, 8))
    assert store.tensor_sha256(t) == PINNED_NOISE_SHA256
    assert torch.equal(t, torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(42)))
    nid2, t2 = s.get_or_create_noise(42, (4, 8, 8))
    assert nid2 == nid and torch.equal(t2, t)
    assert torch.equal(s.get_noise(nid), t)
    rec = s.get_noise_record(nid)
    assert (rec.seed, rec.shape, rec.dtype, rec.device, rec.sha256) == (42, (4, 8, 8), "float32", "cpu", PINNED_NOISE_SHA256)
    half_id, half = s.get_or_create_noise(42, (4, 8, 8), torch.float16)
    assert half_id != nid and half.dtype == torch.float16 and torch.equal(half, t.half())
    assert torch.equal(s.get_noise(half_id), half)


def test_noise_does_not_depend_on_batch_or_order(s: store.Store) -> None:
    seeds = [7, 3, 2**32 - 1, 0]
    forward = {seed: s.get_or_create_noise(seed, (2, 4, 4))[1] for seed in seeds}
    fresh = {seed: store.make_noise(seed, (2, 4, 4)) for seed in reversed(seeds)}
    batch = torch.stack([forward[seed] for seed in seeds])
    for i, seed in enumerate(seeds):
        assert torch.equal(batch[i], fresh[seed])
    assert not torch.equal(forward[7], forward[3])


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_noise_names_the_row_and_is_not_regenerated(s: store.Store, where: str) -> None:
    s.get_or_create_noise(1, (4, 8, 8))
    nid, _ = s.get_or_create_noise(2, (4, 8, 8))
    blob = bytearray(s.query("SELECT data FROM noise WHERE id = ?", [nid])[0]["data"])
    if where == "data":
        blob[-5] ^= 0x01  # one flipped bit in the tensor bytes
    else:
        blob[10] = ord("#")  # break the safetensors JSON header
    with s.transaction() as db:
        db.execute("UPDATE noise SET data = ? WHERE id = ?", [bytes(blob), nid])
    with pytest.raises(store.NoiseIntegrityError, match=rf"^noise row {nid} is corrupted") as err:
        s.get_noise(nid)
    assert err.value.row_id == nid
    with pytest.raises(store.NoiseIntegrityError, match=f"noise row {nid}"):
        s.get_or_create_noise(2, (4, 8, 8))
    assert s.query("SELECT data FROM noise WHERE id = ?", [nid])[0]["data"] == bytes(blob)  # untouched
    assert s.verify_blobs() == [str(err.value)]


def test_png_parameters_round_trip() -> None:
    params = {
        "prompt": "a lighthouse, at dusk: oil\nsecond line ✨",
        "negative_prompt": "blurry, lowres",
        "steps": 4, "sampler": "consistency", "cfg_scale": 7.25, "seed": 2**32 - 1, "width": 640, "height": 384,
        "model": "tiny/sd", "noise_hash": "0123456789ab", "version": "diffusion-preview 9.9",
        "Preview solver": "ckpt 3, step 4", "Refined from": "preview 12",
    }
    png = store.encode_png(random_image(0), params)
    assert store.read_png_parameters(png) == params
    no_negative = {**params, "negative_prompt": ""}
    assert parse_parameters(store.format_parameters(no_negative)) == no_negative
    assert "Negative prompt" not in store.format_parameters(no_negative)


def test_parse_a1111_text() -> None:
    text = ("a photo of a cat\nNegative prompt: blurry, lowres\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc123, "
            'Model: sd15, Lora hashes: "a: 1, b: 2", Version: v1.6.0')
    assert parse_parameters(text) == {
        "prompt": "a photo of a cat", "negative_prompt": "blurry, lowres", "steps": 20, "sampler": "Euler a",
        "cfg_scale": 7.0, "seed": 1234, "width": 512, "height": 768, "model_hash": "abc123", "model": "sd15",
        "Lora hashes": "a: 1, b: 2", "version": "v1.6.0",
    }
    with pytest.raises(ValueError, match="Steps"):
        parse_parameters("just a prompt")


def test_preview_and_final_images_round_trip_with_metadata(s: store.Store, tmp_path: Path) -> None:
    nid, _ = s.get_or_create_noise(99, (4, 2, 3))
    gen = s.add_generation(model_id="tiny", prompt="red fox", negative_prompt="text", seed=99, height=16, width=24,
                           guidance=5.5, noise_id=nid)
    img = random_image(1)
    pid = s.add_preview(gen, solver="consistency", steps=4, image=img, timings_ms={"sample": 3.5, "decode": 1.0})
    preview = s.get_preview(pid)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(preview.png))), np.asarray(img))
    meta = store.read_png_parameters(preview.png)
    assert meta["prompt"] == "red fox" and meta["negative_prompt"] == "text"
    assert (meta["seed"], meta["width"], meta["height"], meta["cfg_scale"], meta["steps"]) == (99, 24, 16, 5.5, 4)
    assert meta["sampler"] == "consistency" and meta["model"] == "tiny"
    assert meta["noise_hash"] == s.get_noise_record(nid).sha256[:12]
    assert meta["version"].startswith("diffusion-preview ")
    assert preview.timings_ms == {"sample": 3.5, "decode": 1.0}

    job = s.enqueue_job(gen, steps=30, solver="ddim", preview_id=pid)
    s.claim_next_job("cpu")
    final_img = random_image(2)
    fid = s.finish_job(job, "done", image=final_img, timings_ms={"total": 900.0})
    final = s.get_final(fid)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(final.png))), np.asarray(final_img))
    assert store.read_png_parameters(final.png)["steps"] == 30
    out = s.export_png("final", fid, tmp_path / "final.png")
    assert out.read_bytes() == final.png

    cid = s.add_consistency(pid, fid, psnr=float("inf"), ssim=0.91, metrics={"lpips": 0.1})
    (c,) = s.list_consistency(preview_id=pid)
    assert (c.id, c.psnr, c.ssim, c.metrics) == (cid, float("inf"), 0.91, {"lpips": 0.1})


def test_corrupted_images_and_weights_name_the_row(s: store.Store) -> None:
    gen = s.add_generation(model_id="m", prompt="p", seed=1, height=16, width=24, guidance=1.0)
    pid = s.add_preview(gen, solver="s", steps=2, image=random_image(3), timings_ms={})
    ck = s.add_checkpoint("c1", config={"k": 4}, weights={"w": torch.arange(6.0)})
    assert torch.equal(s.load_checkpoint_weights(ck)["w"], torch.arange(6.0))
    conn = sqlite3.connect(s.path)  # corrupt behind the store's back, as a disk would
    png = bytearray(conn.execute("SELECT png FROM previews WHERE id = ?", [pid]).fetchone()[0])
    png[len(png) // 2] ^= 0xFF
    conn.execute("UPDATE previews SET png = ? WHERE id = ?", [bytes(png), pid])
    w = bytearray(conn.execute("SELECT weights FROM solver_checkpoints WHERE id = ?", [ck]).fetchone()[0])
    w[-1] ^= 0x01
    conn.execute("UPDATE solver_checkpoints SET weights = ? WHERE id = ?", [bytes(w), ck])
    conn.commit()
    conn.close()
    with pytest.raises(store.BlobIntegrityError, match=f"^previews row {pid} is corrupted"):
        s.get_preview(pid)
    with pytest.raises(store.BlobIntegrityError, match=f"^previews row {pid}"):
        s.export_png("preview", pid, s.path.with_name("x.png"))
    assert not s.path.with_name("x.png").exists()
    with pytest.raises(store.BlobIntegrityError, match=f"^solver_checkpoints row {ck} is corrupted"):
        s.load_checkpoint_weights(ck)
    assert s.list_previews()[0].id == pid  # listing without images still works
    assert len(s.verify_blobs()) == 2


def test_owner_none_lists_every_owners_previews_and_jobs(s):
    """owner=None (an admin's scope in multi-user mode) lists every user's rows; a name lists only theirs."""
    from PIL import Image

    for owner in ("alice", "bob"):
        nid, _ = s.get_or_create_noise(1, (4, 8, 8))
        gid = s.add_generation(model_id="m", prompt=f"{owner}'s cat", seed=1, height=64, width=64, guidance=3.0,
                               noise_id=nid, owner=owner)
        s.add_preview(gid, solver="ddim", steps=4, image=Image.new("RGB", (8, 8)), timings_ms={"device": 1.0})
    assert sorted(p.generation.prompt for p in s.list_previews(owner=None)) == ["alice's cat", "bob's cat"]
    assert [p.generation.prompt for p in s.list_previews(owner="bob")] == ["bob's cat"]
    assert s.list_previews(owner="carol") == []
    assert s.newest_job_stamps(owner=None) == [] and s.list_final_ids(owner=None) == []
