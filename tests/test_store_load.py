"""Load: 8 concurrent writers (4 threads sharing one Store + 4 processes with their own) doing 200
mixed operations each finish with no "database is locked" error and no double-claimed job."""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import store

OPS = 200
N_THREADS = 4
N_PROCS = 4
SHARED_SEEDS = 20  # every writer draws noise from the same few seeds: contention on one key
IMG = Image.new("RGB", (8, 8), (1, 2, 3))


def mixed_ops(s: store.Store, writer: int, run_id: int, checkpoints: list[int]) -> Counter:
    """200 operations of every kind the app, the worker and training perform."""
    rng = random.Random(writer)
    done: Counter = Counter()
    gens: list[int] = []
    for i in range(OPS):
        op = rng.choice(["noise", "preview", "enqueue", "work", "read", "activate", "metrics"])
        if op == "noise" or not gens:
            nid, _ = s.get_or_create_noise(rng.randrange(SHARED_SEEDS), (4, 8, 8))
            gens.append(s.add_generation(model_id="m", prompt=f"w{writer} {i}", seed=i, height=8, width=8,
                                         guidance=2.0, noise_id=nid))
            done["noise"] += 1
        elif op == "preview":
            s.add_preview(rng.choice(gens), solver="cs", steps=2, image=IMG, timings_ms={"total": 1.0})
            done["preview"] += 1
        elif op == "enqueue":
            s.enqueue_job(rng.choice(gens), steps=2, solver="ddim")
            done["enqueue"] += 1
        elif op == "work":
            job = s.claim_next_job(f"w{writer}")
            done["work"] += 1
            if job is not None:
                s.update_job_progress(job.id, 1)
                s.finish_job(job.id, "done", image=IMG, timings_ms={"total": 3.0})
                done["finished"] += 1
        elif op == "read":
            s.list_previews(search=f"w{writer}", limit=20)
            s.list_jobs(states=["queued", "running"], owner=None)
            done["read"] += 1
        elif op == "activate":
            s.set_active_checkpoint(rng.choice(checkpoints))
            done["activate"] += 1
        else:
            s.log_training_metrics(run_id, writer * 10_000 + i, {"reward": rng.random()})
            done["metrics"] += 1
    return done


def _process_writer(path: str, writer: int, run_id: int, checkpoints: list[int], q) -> None:
    torch.set_num_threads(1)
    try:
        with store.open_store(path) as s:
            q.put((writer, mixed_ops(s, writer, run_id, checkpoints), None))
    except BaseException:
        q.put((writer, None, traceback.format_exc()))


@pytest.mark.slow
def test_eight_concurrent_writers_no_lock_errors(tmp_path: Path) -> None:
    path = tmp_path / "load.sqlite3"
    with store.open_store(path) as s:
        run_id = s.start_training_run({"load": True})
        checkpoints = [s.add_checkpoint(f"c{i}", config={}, weights={"w": torch.full((2,), float(i))}, model_id="m")
                       for i in range(3)]

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_process_writer, args=(str(path), N_THREADS + k, run_id, checkpoints, q))
             for k in range(N_PROCS)]
    for p in procs:  # fork before this process opens a store or starts threads
        p.start()

    shared = store.open_store(path)
    results: dict[int, Counter | None] = {}
    errors: list[str] = []

    def thread_writer(writer: int) -> None:
        try:
            results[writer] = mixed_ops(shared, writer, run_id, checkpoints)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=thread_writer, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for _ in procs:
        writer, counts, error = q.get(timeout=300)
        results[writer] = counts
        if error:
            errors.append(error)
    for t in threads:
        t.join(timeout=300)
    for p in procs:
        p.join(timeout=60)

    assert errors == [], "\n".join(errors)
    assert sorted(results) == list(range(N_THREADS + N_PROCS))
    totals = sum((c for c in results.values() if c), Counter())
    assert sum(totals.values()) - totals["finished"] == OPS * (N_THREADS + N_PROCS)
    assert all(totals[k] > 0 for k in ("noise", "preview", "enqueue", "finished", "read", "activate", "metrics"))
    s = shared
    assert s.integrity_check() == ["ok"]
    count = lambda sql: s.query(sql)[0]["n"]  # noqa: E731
    assert count("SELECT count(*) AS n FROM training_metrics") == totals["metrics"]
    assert count("SELECT count(*) AS n FROM previews") == totals["preview"]
    assert count("SELECT count(*) AS n FROM noise") <= SHARED_SEEDS
    assert count("SELECT count(*) AS n FROM finals") == totals["finished"]
    assert count("SELECT count(*) AS n FROM refine_jobs WHERE state = 'done'") == totals["finished"]
    # No job was claimed twice: one queued->running event per job at most.
    assert count("SELECT count(*) AS n FROM (SELECT job_id FROM refine_job_events WHERE to_state = 'running' "
                 "GROUP BY job_id HAVING count(*) > 1)") == 0
    assert count("SELECT count(*) AS n FROM checkpoint_assignments WHERE model_key = 'legacy:m'") == 1
    assert s.verify_blobs() == []
    shared.close()
