"""Refine: same image as a fresh full-step run, consistency stored, progress, cancel, failure, resume."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from engine_models import TinyUNetDenoiser, one_cpu_thread, row_counts, store  # noqa: F401 - fixtures
from PIL import Image

from preview.engine import PreviewEngine
from refine.full_step import DEFAULT_STEPS, FULL_STEP_SOLVER, iterate_full_step, sample_full_step
from refine.jobs import RefineService
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker, WorkerClosed


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_full_step_sampler_is_dpm2m_of_the_registry():
    """One definition: refine's sampler is the registry's DPM-Solver-2M, 40 steps by default."""
    from solver.registry import get_solver

    assert (FULL_STEP_SOLVER, DEFAULT_STEPS) == ("dpm2m", 40)
    model = TinyUNetDenoiser(size=8)
    cond = model.encode_prompts(["a red circle"], "")
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    records = list(iterate_full_step(model, cond, noise, 3.0, 6))
    assert [r.i for r in records] == list(range(6)) and len(model.calls) == 6
    direct = get_solver("dpm2m", model.scheduler_config).sample(lambda x, t: model.guided_eps(x, t, cond, 3.0), noise, 6)
    assert torch.equal(records[-1].x, direct)
    assert torch.equal(sample_full_step(model, cond, noise, 3.0, 6), direct)
    for bad in (0, 201, 2.0):
        with pytest.raises(ValueError, match="num_steps"):
            sample_full_step(model, cond, noise, 3.0, bad)


def test_refining_a_preview_equals_a_fresh_full_step_run(store):
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        previews = list(PreviewEngine(worker, store, chunk_size=4).run(
            PreviewRequest(prompts=["a red circle", "a blue square"], seeds=[3, 8], steps=3, guidance=2.5, negative_prompt="dull")))
        chosen = previews[3]  # ("a blue square", 8), row 3 of its chunk
        service = RefineService(worker, store)
        from_preview = service.refine_preview(chosen.preview_id, steps=8)
        fresh = service.refine_new("a blue square", 8, negative_prompt="dull", guidance=2.5, steps=8)
        a, b = service.wait(from_preview, 60), service.wait(fresh, 60)
    assert a.state == b.state == "done" and a.step == a.steps == 8
    final_a, final_b = store.get_final(a.final_id), store.get_final(b.final_id)
    assert np.array_equal(_pixels(final_a.png), _pixels(final_b.png))
    assert store.get_job(from_preview).preview_id == chosen.preview_id
    # consistency of the preview against its final, stored after the refine
    (c,) = store.list_consistency(preview_id=chosen.preview_id)
    assert c.final_id == a.final_id and 0 < c.psnr < 100 and -1 <= c.ssim <= 1
    assert "scc" in c.metrics and c.metrics["ms_ssim"] is None  # 16 px: too small for MS-SSIM
    assert store.list_consistency(final_id=b.final_id) == []  # a fresh run has no preview to compare


def test_bad_refine_input_is_refused_and_nothing_written(store):
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        service = RefineService(worker, store)
        before = row_counts(store)
        for call, field in [
            (lambda: service.refine_preview(999), "preview_id"),
            (lambda: service.refine_preview(1, steps=0), "steps"),
            (lambda: service.refine_new("x", 1, steps=201), "steps"),
            (lambda: service.refine_new("", 1), "prompts"),
            (lambda: service.refine_new("x", -3), "seeds"),
            (lambda: service.refine_new("x", 1, guidance=float("nan")), "guidance"),
            (lambda: service.refine_new("x", 1, height=10), "height"),
        ]:
            with pytest.raises(ValueError, match=field):
                call()
        assert row_counts(store) == before


def test_progress_eta_and_cancel_within_one_step(store):
    model = TinyUNetDenoiser(size=16, delay=0.05)
    with DeviceWorker(model) as worker:
        service = RefineService(worker, store)
        job = service.refine_new("a red circle", 1, steps=60)
        deadline = time.monotonic() + 30
        while (p := service.progress(job)).step < 3:
            assert time.monotonic() < deadline and p.state in ("queued", "running")
            time.sleep(0.01)
        assert p.state == "running" and p.steps == 60 and p.eta_s is not None and p.eta_s > 0
        calls_at_cancel = len(model.calls)
        assert service.cancel(job) == "running"
        done = service.wait(job, 30)
    assert done.state == "cancelled" and done.final_id is None
    assert len(model.calls) - calls_at_cancel <= 1  # at most the step already under way
    assert store.get_final_for_job(job) is None


def test_failing_refine_is_recorded_and_the_worker_survives(store):
    class BreaksAtStep3(TinyUNetDenoiser):
        broken = False

        def model_output(self, x, t, context, mask):
            if len(self.calls) == 3 and not self.broken:
                self.broken = True
                raise RuntimeError("device lost (simulated)")
            return super().model_output(x, t, context, mask)

    with DeviceWorker(BreaksAtStep3(size=16)) as worker:
        service = RefineService(worker, store)
        job = service.refine_new("a red circle", 1, steps=10)
        p = service.wait(job, 30)
        assert p.state == "failed" and "device lost" in p.error and p.step <= 3
        ok = list(PreviewEngine(worker, store, chunk_size=2).run(PreviewRequest(prompts=["x"], seeds=[0], steps=2, solver="ddim")))
        assert len(ok) == 1
        service.retry(job)  # a failed job can be queued again; it starts from its noise
        again = service.wait(job, 30)
    assert again.state == "done" and again.final_id is not None


def _refine_until_killed(path: str, conn) -> None:
    """Runs in a forked child: starts two refines and works on them until the parent kills it."""
    from store import open_store

    torch.set_num_threads(1)
    service = RefineService(DeviceWorker(TinyUNetDenoiser(size=16, delay=0.03)), open_store(path))
    conn.send((service.refine_new("a red circle", 4, steps=30), service.refine_new("a red circle", 4, steps=30)))
    while True:
        time.sleep(1)


def test_job_survives_a_crash_and_starts_again_from_its_noise(tmp_path):
    """A process killed mid-job (SIGKILL: no cleanup runs) leaves the job running; the next start
    re-queues it (interrupted -> queued, restarts 1) and it runs from its noise to the same final image."""
    import multiprocessing as mp
    import os
    import signal

    from store import open_store

    path = tmp_path / "restart.db"
    open_store(path).close()  # created and migrated before the child starts
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_refine_until_killed, args=(str(path), child_end))
    proc.start()
    try:
        assert parent_end.poll(60), "the child did not start its refines"
        job, reference = parent_end.recv()
        store = open_store(path)
        deadline = time.monotonic() + 60
        while store.get_job(job).progress_step < 2:
            assert time.monotonic() < deadline and proc.is_alive()
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert store.get_job(job).state == "running" and store.get_job(reference).state == "queued"
    store.close()

    store = open_store(path)  # "the next start"
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        service = RefineService(worker, store)
        assert service.resume() == [job]
        p, q = service.wait(job, 60), service.wait(reference, 60)
    assert p.state == "done" and p.restarted and p.restarts == 1 and not q.restarted
    history = [(e.from_state, e.to_state) for e in store.job_history(job)]
    assert ("running", "interrupted") in history and ("interrupted", "queued") in history
    assert np.array_equal(_pixels(store.get_final(p.final_id).png), _pixels(store.get_final(q.final_id).png))
    store.close()


def test_closing_the_worker_mid_job_requeues_it_and_a_new_service_resumes_it(tmp_path):
    """A clean shutdown never leaves a job running: closing the worker mid-refine records
    running -> interrupted -> queued (restarts 1) at once; the next start runs it to the same image."""
    from store import open_store

    path = tmp_path / "shutdown.db"
    store = open_store(path)
    worker = DeviceWorker(TinyUNetDenoiser(size=16, delay=0.03))
    service = RefineService(worker, store)
    job = service.refine_new("a red circle", 4, steps=30)
    reference = service.refine_new("a red circle", 4, steps=30)  # queued behind it
    deadline = time.monotonic() + 60
    while service.progress(job).step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker.close()
    j = store.get_job(job)
    assert (j.state, j.restarts, j.progress_step, j.device) == ("queued", 1, 0, None)
    assert [(e.from_state, e.to_state) for e in store.job_history(job)] == [
        (None, "queued"), ("queued", "running"), ("running", "interrupted"), ("interrupted", "queued")]
    r = store.get_job(reference)
    assert (r.state, r.restarts) == ("queued", 0)  # never claimed, so not interrupted
    store.close()

    store = open_store(path)  # "the next start"
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        service = RefineService(worker, store)
        assert service.resume() == []  # nothing was left running: both are simply queued
        p, q = service.wait(job, 60), service.wait(reference, 60)
    assert p.state == q.state == "done" and p.restarted and p.restarts == 1 and not q.restarted
    assert np.array_equal(_pixels(store.get_final(p.final_id).png), _pixels(store.get_final(q.final_id).png))
    store.close()


def test_closed_worker_refuses_new_jobs(store):
    worker = DeviceWorker(TinyUNetDenoiser(size=16))
    worker.close()
    service = RefineService(worker, store)
    with pytest.raises(WorkerClosed):
        service.dispatch()
