"""Refine job state machine, exclusive claims, restart recovery; checkpoints, training, search."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import store

IMG = Image.new("RGB", (8, 8), (10, 20, 30))


@pytest.fixture
def s(tmp_path: Path):
    with store.open_store(tmp_path / "s.sqlite3") as st:
        yield st


def new_generation(s: store.Store, prompt: str = "p", seed: int = 1) -> int:
    return s.add_generation(model_id="m", prompt=prompt, seed=seed, height=8, width=8, guidance=3.0)


def states(s: store.Store, job_id: int) -> list[tuple[str | None, str]]:
    return [(e.from_state, e.to_state) for e in s.job_history(job_id)]


def test_happy_path_and_history(s: store.Store) -> None:
    gen = new_generation(s)
    job_id = s.enqueue_job(gen, steps=3, solver="ddim")
    assert s.get_job(job_id).state == "queued"
    job = s.claim_next_job("cuda:0")
    assert job is not None and (job.id, job.state, job.device, job.progress_step) == (job_id, "running", "cuda:0", 0)
    assert s.claim_next_job("cuda:0") is None
    for step in (1, 2):
        assert s.update_job_progress(job_id, step) is False
    assert [(j.progress_step, j.steps) for j in s.list_jobs(states=["running"])] == [(2, 3)]
    fid = s.finish_job(job_id, "done", image=IMG, timings_ms={"total": 5})
    job = s.get_job(job_id)
    assert (job.state, job.progress_step, job.finished_at is not None) == ("done", 3, True)
    assert s.get_final_for_job(job_id).id == fid
    assert states(s, job_id) == [(None, "queued"), ("queued", "running"), ("running", "done")]


def test_illegal_transitions_raise_and_change_nothing(s: store.Store) -> None:
    gen = new_generation(s)
    job_id = s.enqueue_job(gen, steps=2, solver="ddim")
    with pytest.raises(store.JobStateError, match=f"refine job {job_id} cannot go from queued to done"):
        s.finish_job(job_id, "done", image=IMG)
    with pytest.raises(store.JobStateError, match="is queued"):
        s.update_job_progress(job_id, 1)
    with pytest.raises(store.JobStateError):
        s.retry_job(job_id)
    s.claim_next_job("cpu")
    with pytest.raises(ValueError, match="step"):
        s.update_job_progress(job_id, 3)
    with pytest.raises(ValueError, match="image"):
        s.finish_job(job_id, "done")
    s.finish_job(job_id, "done", image=IMG)
    for action in (lambda: s.finish_job(job_id, "failed", error="late"), lambda: s.request_cancel(job_id),
                   lambda: s.retry_job(job_id)):
        with pytest.raises(store.JobStateError):
            action()
    assert s.get_job(job_id).state == "done"
    assert s.query("SELECT count(*) AS n FROM finals")[0]["n"] == 1
    with pytest.raises(store.NotFoundError, match="refine_jobs row 77"):
        s.get_job(77)


def test_cancel_queued_and_running_then_retry(s: store.Store) -> None:
    gen = new_generation(s)
    a = s.enqueue_job(gen, steps=4, solver="ddim")
    b = s.enqueue_job(gen, steps=4, solver="ddim")
    assert s.request_cancel(b) == "cancelled"
    assert s.request_cancel(b) == "cancelled"
    assert s.claim_next_job("cpu").id == a  # b is not claimable
    assert s.claim_next_job("cpu") is None
    assert s.request_cancel(a) == "running"
    assert s.update_job_progress(a, 1) is True  # the worker sees the flag at its next step
    assert s.finish_job(a, "cancelled") is None
    assert s.get_job(a).state == "cancelled" and s.get_final_for_job(a) is None
    s.retry_job(a)
    job = s.get_job(a)
    assert (job.state, job.cancel_requested, job.progress_step) == ("queued", False, 0)
    failed = s.claim_next_job("cpu")
    s.finish_job(failed.id, "failed", error="CUDA out of memory")
    assert s.get_job(failed.id).error == "CUDA out of memory"


def test_recover_interrupted(s: store.Store) -> None:
    gen = new_generation(s)
    running = s.enqueue_job(gen, steps=5, solver="ddim")
    cancelled = s.enqueue_job(gen, steps=5, solver="ddim")
    queued = s.enqueue_job(gen, steps=5, solver="ddim")
    s.claim_next_job("cpu")
    s.claim_next_job("cpu")
    s.update_job_progress(running, 3)
    s.request_cancel(cancelled)
    assert s.recover_interrupted() == [running]
    job = s.get_job(running)
    assert (job.state, job.restarts, job.progress_step, job.device) == ("queued", 1, 0, None)
    assert states(s, running)[-2:] == [("running", "interrupted"), ("interrupted", "queued")]
    assert s.get_job(cancelled).state == "cancelled"
    assert s.get_job(queued).state == "queued" and s.get_job(queued).restarts == 0
    # A job that keeps killing the process is given up after max_restarts.
    for expected_restarts in (2, 3):
        while s.claim_next_job("cpu").id != running:
            pass
        assert s.recover_interrupted(max_restarts=2) == ([running] if expected_restarts <= 2 else [])
    job = s.get_job(running)
    assert (job.state, job.restarts) == ("failed", 3) and "3 restarts" in job.error


def test_claim_job_takes_that_job_and_leaves_older_ones_queued(s: store.Store) -> None:
    gen = new_generation(s)
    older, mine, gone = (s.enqueue_job(gen, steps=2, solver="ddim") for _ in range(3))
    s.request_cancel(gone)
    job = s.claim_job(mine, "cuda:1")
    assert (job.id, job.state, job.device, job.progress_step) == (mine, "running", "cuda:1", 0)
    assert s.get_job(older).state == "queued"
    assert states(s, mine) == [(None, "queued"), ("queued", "running")]
    events = len(s.job_history(mine))
    for job_id, state in ((mine, "running"), (gone, "cancelled")):
        with pytest.raises(store.JobStateError, match=f"refine job {job_id} is {state}, not queued"):
            s.claim_job(job_id, "cpu")
    assert len(s.job_history(mine)) == events and s.get_job(mine).device == "cuda:1"  # nothing changed
    with pytest.raises(store.NotFoundError, match="refine_jobs row 99"):
        s.claim_job(99, "cpu")
    with pytest.raises(ValueError, match="device"):
        s.claim_job(older, "")
    assert s.claim_next_job("cpu").id == older  # the queue order is untouched


def test_interrupt_job_requeues_like_recover_interrupted(s: store.Store) -> None:
    gen = new_generation(s)
    a = s.enqueue_job(gen, steps=5, solver="ddim")
    other = s.enqueue_job(gen, steps=5, solver="ddim")
    s.claim_job(a, "cpu")
    s.claim_job(other, "cpu")
    s.update_job_progress(a, 3)
    assert s.interrupt_job(a) == "queued"
    job = s.get_job(a)
    assert (job.state, job.restarts, job.progress_step, job.device) == ("queued", 1, 0, None)
    assert states(s, a)[-2:] == [("running", "interrupted"), ("interrupted", "queued")]
    assert s.job_history(a)[-2].note == "the worker was shut down while it ran"
    assert s.get_job(other).state == "running"  # only that job
    events = len(s.job_history(a))
    with pytest.raises(store.JobStateError, match=f"refine job {a} is queued, not running"):
        s.interrupt_job(a)
    assert len(s.job_history(a)) == events and s.get_job(a).restarts == 1
    with pytest.raises(ValueError, match="max_restarts"):
        s.interrupt_job(other, max_restarts=-1)
    assert s.get_job(other).state == "running"
    # A clean shutdown is not the job's fault: only crashes count toward recover_interrupted's limit.
    s.claim_job(a, "cpu")
    assert s.recover_interrupted(max_restarts=1) == [a, other]  # a: 1 clean stop + 1 crash, restarts 2
    assert (s.get_job(a).state, s.get_job(a).restarts) == ("queued", 2)
    s.claim_job(a, "cpu")
    assert s.recover_interrupted(max_restarts=1) == []  # the second crash is one too many
    job = s.get_job(a)
    assert (job.state, job.restarts) == ("failed", 3) and "3 restarts (2 of them counted" in job.error
    # A requested cancel wins, and interrupt_job has its own optional limit.
    s.claim_job(other, "cpu")
    s.request_cancel(other)
    assert s.interrupt_job(other, note="app closed") == "cancelled"
    assert s.job_history(other)[-2].note == "app closed" and s.get_job(other).restarts == 2
    s.retry_job(other)
    s.claim_job(other, "cpu")
    assert s.interrupt_job(other, max_restarts=2) == "failed" and s.get_job(other).restarts == 3


def _claim_each(path: str, ids: list[int], q) -> None:
    with store.open_store(path) as st:
        got = []
        for job_id in ids:
            try:
                got.append(st.claim_job(job_id, "proc").id)
            except store.JobStateError:
                pass
        q.put(got)


def test_two_processes_claiming_one_job_by_id_never_both_get_it(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with store.open_store(path) as s:
        gen = new_generation(s)
        ids = [s.enqueue_job(gen, steps=1, solver="ddim") for _ in range(30)]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_each, args=(str(path), ids, q)) for _ in range(3)]
    for p in procs:
        p.start()
    claims = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(i for c in claims for i in c) == ids  # every job claimed exactly once
    with store.open_store(path) as s:
        assert s.query("SELECT count(*) AS n FROM refine_job_events WHERE to_state = 'running'")[0]["n"] == 30


def _claim_all(path: str, q) -> None:
    with store.open_store(path) as st:
        got = []
        while (job := st.claim_next_job("proc")) is not None:
            got.append(job.id)
        q.put(got)


def test_two_workers_never_claim_one_job(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with store.open_store(path) as s:
        gen = new_generation(s)
        ids = [s.enqueue_job(gen, steps=1, solver="ddim") for _ in range(40)]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    shared = store.open_store(path)
    thread_claims: list[list[int]] = [[], []]

    def claim(out: list[int]) -> None:
        while (job := shared.claim_next_job("thread")) is not None:
            out.append(job.id)

    threads = [threading.Thread(target=claim, args=(out,)) for out in thread_claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claims = thread_claims + [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    flat = [i for c in claims for i in c]
    assert sorted(flat) == ids  # every job claimed exactly once
    assert shared.query("SELECT count(*) AS n FROM refine_job_events WHERE to_state = 'running'")[0]["n"] == 40
    shared.close()


def test_checkpoints_one_active_per_model_enforced(s: store.Store) -> None:
    run = s.start_training_run({"lr": 3e-4}, name="ppo")
    a = s.add_checkpoint("a", config={"steps": 4}, weights={"w": torch.ones(3)}, training_run_id=run, activate=True,
                         model_id="m")
    b = s.add_checkpoint("b", config={"steps": 4}, weights={"w": torch.zeros(3)}, metrics={"reward": 0.5}, model_id="m")
    assert s.get_active_checkpoint("legacy:m").id == a
    s.set_active_checkpoint(b)
    assert [(c.id, c.active) for c in s.list_checkpoints()] == [(b, True), (a, False)]
    assert s.get_checkpoint(b).metrics == {"reward": 0.5}
    s.set_checkpoint_metrics(a, {"reward": 0.7})
    assert s.get_checkpoint(a).metrics == {"reward": 0.7}
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # the database itself refuses two for one model
        with s.transaction() as db:
            db.execute("INSERT INTO checkpoint_assignments (model_key, checkpoint_id, assigned_at) VALUES ('legacy:m', ?, 'x')", [a])
    assert s.get_active_checkpoint("legacy:m").id == b
    with pytest.raises(ValueError, match="name 'a' is already used"):
        s.add_checkpoint("a", config={}, weights={"w": torch.ones(1)})
    s.set_active_checkpoint(None)
    assert s.get_active_checkpoint() is None


def test_checkpoints_belong_to_their_model_and_transfer_only_within_a_family(s: store.Store) -> None:
    ident = {"model_id": "A", "key": "ka", "family": "vp/epsilon", "schedule_sha256": "0" * 64}
    a = s.add_checkpoint("on-a", config={}, weights={"w": torch.ones(1)}, identity=ident, activate=True)
    assert s.get_active_checkpoint("ka").id == a and s.get_assignment("kb") is None  # model B: nothing
    with pytest.raises(ValueError, match="checkpoint_id: .*vp/epsilon.*flow/flow_prediction"):
        s.assign_checkpoint(a, "kf", family="flow/flow_prediction")
    assert s.get_assignment("kf") is None  # nothing written
    assert s.assign_checkpoint(a, "kb", family="vp/epsilon") is True
    found = s.get_assignment("kb")
    assert found.checkpoint.id == a and found.transferred and found.checkpoint.model_id == "A"
    assert s.get_assignment("ka").transferred is False
    s.set_active_checkpoint(None, model_key="kb")
    assert s.get_assignment("kb") is None and s.get_assignment("ka").checkpoint.id == a
    with pytest.raises(ValueError, match="activate: .*records no model"):
        s.add_checkpoint("nomodel", config={}, weights={"w": torch.ones(1)}, activate=True)
    assert all(c.name != "nomodel" for c in s.list_checkpoints())


def test_training_runs_metrics_and_datasets(s: store.Store) -> None:
    run = s.start_training_run({"lr": 3e-4, "batch": 8})
    for i in (0, 1, 2):
        s.log_training_metrics(run, i, {"reward": 0.1 * i, "kl": 0.01})
    with pytest.raises(ValueError, match="update_index 1 is already logged"):
        s.log_training_metrics(run, 1, {"reward": 9})
    assert [(m.update_index, m.metrics["reward"]) for m in s.training_metrics(run)] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    s.finish_training_run(run, "done")
    assert s.get_training_run(run).state == "done"
    with pytest.raises(store.JobStateError, match=f"training run {run} is done"):
        s.log_training_metrics(run, 3, {})
    did = s.add_dataset("d1", model_id="tiny", reference_sampler="ddim-50", prompt_file_sha256="a" * 64,
                        shard_paths=["shards/0.safetensors", "shards/1.safetensors"], config={"n": 64})
    d = s.get_dataset("d1")
    assert (d.id, d.shard_paths, d.config) == (did, ["shards/0.safetensors", "shards/1.safetensors"], {"n": 64})
    assert [x.name for x in s.list_datasets()] == ["d1"]


def test_search_is_literal_and_owned(s: store.Store) -> None:
    for prompt in ("100% cat", "1000 cats", "dog_1", "dogs1", "Robert'); DROP TABLE prompts;--"):
        s.add_preview(new_generation(s, prompt), solver="s", steps=1, image=IMG, timings_ms={})
    s.add_generation(model_id="m", prompt="100% cat", seed=1, height=8, width=8, guidance=1.0, owner="someone")

    def found(text: str) -> list[str]:
        return sorted(p.generation.prompt for p in s.list_previews(search=text))

    assert found("100%") == ["100% cat"]
    assert found("g_1") == ["dog_1"]
    assert found("CAT") == ["100% cat", "1000 cats"]
    assert found("DROP TABLE") == ["Robert'); DROP TABLE prompts;--"]
    assert len(s.list_generations(search="100%")) == 1
    assert len(s.list_generations(search="100%", owner="someone")) == 1
    assert len(s.list_previews(limit=2)) == 2
    assert s.list_previews(with_images=True, limit=1)[0].png.startswith(b"\x89PNG")


def test_newest_job_stamps_and_final_search(s: store.Store) -> None:
    """The two reads the app polls: job stamps (change when a job moves) and finals by prompt text."""
    cat = s.enqueue_job(new_generation(s, "a 100% cat"), steps=2, solver="ddim")
    dog = s.enqueue_job(new_generation(s, "a dog"), steps=2, solver="ddim")
    s.add_generation(model_id="m", prompt="a 100% cat", seed=1, height=8, width=8, guidance=1.0, owner="someone")
    before = s.newest_job_stamps(limit=5)
    assert [(j.id, j.state, j.progress_step) for j in before] == [(dog, "queued", 0), (cat, "queued", 0)]
    assert s.newest_job_stamps(owner="someone") == [] and len(s.newest_job_stamps(limit=1)) == 1
    for job_id in (cat, dog):
        s.claim_job(job_id, "cpu")
        s.finish_job(job_id, "done", image=IMG)
    after = s.newest_job_stamps()
    assert after[0] != before[0] and after[0].state == "done"
    finals = {j: s.get_final_for_job(j).id for j in (cat, dog)}
    assert s.list_final_ids() == [finals[dog], finals[cat]]
    assert s.list_final_ids(search="100%") == [finals[cat]]  # literal, not a LIKE wildcard
    assert s.list_final_ids(search="0_") == [] and s.list_final_ids(owner="someone") == []
    with pytest.raises(ValueError, match="limit"):
        s.list_final_ids(limit=0)
