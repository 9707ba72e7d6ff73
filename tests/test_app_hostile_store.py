"""A damaged database file: found at open (quick_check), and a blob failing its hash names its row."""

from __future__ import annotations

import os
import sqlite3

import pytest
import torch

from store import open_store
from store.errors import StoreError

SHAPE = (4, 8, 8)


def make_store(path, n: int = 140) -> None:
    with open_store(path) as s:
        for seed in range(n):
            s.get_or_create_noise(seed, SHAPE)
        s.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_damage_in_the_middle_of_the_file_is_found_at_open(tmp_path):
    """Before issue 26 the damage was found row by row, later, each time with a generic error."""
    path = tmp_path / "store.sqlite3"
    make_store(path)
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # scribble over a page in the middle (a noise b-tree page)
        fh.seek((size // page // 2) * page)
        fh.write(os.urandom(page))
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"store.sqlite3 is damaged \(quick_check: .*restore it from a backup"):
        open_store(path)
    assert path.read_bytes() == before  # left untouched
    with open_store(path, check="off") as s:  # opening without the check still works (to rescue what is left)
        assert s.path == path.absolute()


def test_a_blob_failing_its_hash_names_its_row_and_the_full_check_finds_it(tmp_path):
    path = tmp_path / "store.sqlite3"
    make_store(path, n=5)
    with open_store(path) as s:
        row = s.query_one("SELECT id, data FROM noise WHERE seed = 3")
        damaged = bytearray(row["data"])
        damaged[-5] ^= 0xFF  # one flipped byte inside the tensor data
        with s.transaction() as db:
            db.execute("UPDATE noise SET data = ? WHERE id = ?", [bytes(damaged), row["id"]])
        with pytest.raises(StoreError, match=f"noise row {row['id']} is corrupted"):
            s.get_noise(row["id"])
        assert torch.equal(s.get_noise(1), s.get_or_create_noise(0, SHAPE)[1])  # the others are fine
    with open_store(path) as s:  # quick_check looks at pages, not at the contents
        pass
    with pytest.raises(StoreError, match=f"^noise row {row['id']} is corrupted"):
        open_store(path, check="full")
    with pytest.raises(ValueError, match="check must be one of"):
        open_store(path, check="thorough")
