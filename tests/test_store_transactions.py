"""The transaction helper: all-or-nothing (nested too), disk full, one Store shared by threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import store


@pytest.fixture
def s(tmp_path: Path):
    with store.open_store(tmp_path / "s.sqlite3") as st:
        yield st


def count(s: store.Store, table: str) -> int:
    return s.query(f"SELECT count(*) AS n FROM {table}")[0]["n"]


def test_outer_transaction_rolls_back_nested_calls(s: store.Store) -> None:
    with pytest.raises(RuntimeError, match="changed my mind"):
        with s.transaction():
            gen = s.add_generation(model_id="m", prompt="p", seed=1, height=8, width=8, guidance=1.0)
            s.add_preview(gen, solver="s", steps=1, image=Image.new("RGB", (8, 8)), timings_ms={})
            s.enqueue_job(gen, steps=2, solver="ddim")
            raise RuntimeError("changed my mind")
    assert [count(s, t) for t in ("prompts", "generations", "previews", "refine_jobs", "refine_job_events")] == [0] * 5
    with s.transaction():
        gen = s.add_generation(model_id="m", prompt="p", seed=1, height=8, width=8, guidance=1.0)
        s.enqueue_job(gen, steps=2, solver="ddim")
    assert count(s, "refine_jobs") == 1 and count(s, "refine_job_events") == 1


def test_disk_full_is_one_clear_error_and_rolls_back(s: store.Store) -> None:
    s.get_or_create_noise(1, (4, 8, 8))
    pages = s.query("PRAGMA page_count")[0]["page_count"]
    s.query(f"PRAGMA max_page_count = {pages + 1}")  # pretend the disk has room for one more page
    with pytest.raises(store.StoreError, match="is full, so this change was rolled back"):
        s.get_or_create_noise(2, (4, 256, 256))  # 1 MiB of noise cannot fit
    s.query("PRAGMA max_page_count = 1073741823")
    assert count(s, "noise") == 1 and s.integrity_check() == ["ok"]
    nid, _ = s.get_or_create_noise(2, (4, 256, 256))  # room again: works
    assert s.get_noise(nid).shape == (4, 256, 256)


def test_one_store_shared_by_threads(s: store.Store) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(25):
                nid, x = s.get_or_create_noise(i % 5, (2, 4))
                assert torch.equal(x, store.make_noise(i % 5, (2, 4)))
                s.add_generation(model_id="m", prompt=f"t{k}", seed=i, height=8, width=8, guidance=1.0, noise_id=nid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert count(s, "generations") == 100 and count(s, "noise") == 5
