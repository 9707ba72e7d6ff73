"""Crash: a writer process is killed with SIGKILL at random points, round after round.

The writer reports each id on a pipe only after the call that committed it returned. Afterwards
``PRAGMA integrity_check`` must be ok and every reported row must be there and whole (hashes
verify), no job may be ``done`` without its final, and restart recovery must requeue the
jobs the kills left ``running``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import store

ROUNDS = 24
MAX_ALIVE_S = 0.5


def _writer(path: str, fd: int, seed: int) -> None:
    """Runs in the forked child until it is killed."""
    torch.set_num_threads(1)
    rng = random.Random(seed)

    def report(kind: str, *ids: int) -> None:
        os.write(fd, (" ".join([kind, *map(str, ids)]) + "\n").encode())

    s = store.open_store(path)
    report("opened")
    while True:
        noise_seed = rng.randrange(2**32)
        nid, _ = s.get_or_create_noise(noise_seed, (4, 8, 8))
        report("noise", nid)
        gen = s.add_generation(model_id="m", prompt=f"prompt {noise_seed}", seed=noise_seed, height=16, width=16,
                               guidance=4.0, noise_id=nid)
        pixels = np.random.default_rng(noise_seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        pid = s.add_preview(gen, solver="cs", steps=2, image=Image.fromarray(pixels), timings_ms={"total": 1.0})
        report("preview", pid)
        report("job", s.enqueue_job(gen, steps=2, solver="ddim", preview_id=pid))
        job = s.claim_next_job("cpu")
        if job is not None:
            s.update_job_progress(job.id, 1)
            fid = s.finish_job(job.id, "done", image=Image.fromarray(255 - pixels), timings_ms={"total": 2.0})
            report("final", fid, job.id)


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    rng = random.Random(1234)
    ctx = mp.get_context("fork")
    reported: dict[str, list[tuple[int, ...]]] = {"noise": [], "preview": [], "job": [], "final": []}
    for round_ in range(ROUNDS):
        r, w = os.pipe()
        proc = ctx.Process(target=_writer, args=(str(path), w, round_))
        proc.start()
        os.close(w)
        time.sleep(rng.uniform(0.0, MAX_ALIVE_S))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL, f"round {round_}: the writer ended on its own ({proc.exitcode})"
        out = b""
        while chunk := os.read(r, 1 << 16):
            out += chunk
        os.close(r)
        for line in out.decode().splitlines():
            kind, *ids = line.split()
            if kind != "opened":
                reported[kind].append(tuple(map(int, ids)))

    assert len(reported["final"]) >= 3, reported  # the rounds really wrote something
    with store.open_store(path) as s:
        assert s.integrity_check() == ["ok"]
        for (nid,) in reported["noise"]:
            s.get_noise(nid)  # verifies sha256, shape and dtype
        for (pid,) in reported["preview"]:
            assert store.read_png_parameters(s.get_preview(pid).png)["steps"] == 2
        for (jid,) in reported["job"]:
            s.get_job(jid)
        for fid, jid in reported["final"]:
            assert s.get_final(fid).job_id == jid and s.get_job(jid).state == "done"
        assert s.verify_blobs() == []
        orphans = s.query("SELECT count(*) AS n FROM refine_jobs j LEFT JOIN finals f ON f.job_id = j.id "
                          "WHERE j.state = 'done' AND f.id IS NULL")
        assert orphans[0]["n"] == 0
        running = [j.id for j in s.list_jobs(states=["running"], limit=10_000)]
        assert s.recover_interrupted() == running
        assert s.list_jobs(states=["running"]) == []
