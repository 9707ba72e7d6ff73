"""The device worker: one thread owns the model, previews outrank refine steps, failures are contained."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.worker import PREVIEW, REFINE, DeviceWorker, WorkerClosed, WorkerPool


class FakeModel:
    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.thread = threading.current_thread().name


def stepped_job(log: list, tag: str, steps: int, started: threading.Event | None = None, delay: float = 0.0):
    def run(model):
        for i in range(steps):
            if started is not None and i == 1:
                started.set()
            time.sleep(delay)
            log.append((tag, i))
            yield i
        return f"{tag} done"

    return run


def test_preview_waits_at_most_one_refine_step():
    log: list = []
    started = threading.Event()
    with DeviceWorker(FakeModel()) as worker:
        refine = worker.submit_stepped(stepped_job(log, "refine", 20, started, delay=0.01), label="refine")
        assert started.wait(5)
        at_submit = len(log)  # steps finished when the preview arrives (one more may be running)
        preview = worker.submit(lambda m: log.append(("preview", 0)) or "p", priority=PREVIEW)
        assert preview.result(5) == "p"
        assert refine.result(5) == "refine done"
    where = log.index(("preview", 0))
    assert where - at_submit <= 1, log  # at most the one step that was running
    assert [e for e in log if e[0] == "refine"] == [("refine", i) for i in range(20)]


def test_refine_jobs_run_in_submission_order_and_previews_first():
    log: list = []
    gate = threading.Event()
    with DeviceWorker(FakeModel()) as worker:
        worker.submit(lambda m: gate.wait(5))  # hold the device while we queue work
        a = worker.submit_stepped(stepped_job(log, "a", 2), priority=REFINE)
        b = worker.submit_stepped(stepped_job(log, "b", 2), priority=REFINE)
        p = worker.submit(lambda m: log.append(("p", 0)), priority=PREVIEW)
        gate.set()
        for f in (a, b, p):
            f.result(5)
    assert log == [("p", 0), ("a", 0), ("a", 1), ("b", 0), ("b", 1)]


def test_failing_task_reaches_caller_and_worker_survives():
    cleaned = threading.Event()

    def bad_steps(model):
        try:
            yield 0
            raise RuntimeError("step 1 broke")
        finally:
            cleaned.set()

    with DeviceWorker(FakeModel()) as worker:
        f1 = worker.submit(lambda m: 1 / 0)
        f2 = worker.submit_stepped(bad_steps)
        f3 = worker.submit(lambda m: m.name)
        with pytest.raises(ZeroDivisionError):
            f1.result(5)
        with pytest.raises(RuntimeError, match="step 1 broke"):
            f2.result(5)
        assert f3.result(5) == "m"
        assert cleaned.is_set()


def test_close_stops_within_one_step_and_fails_queued_work():
    finalized = threading.Event()
    started = threading.Event()

    def long_job(model):
        try:
            for i in range(1000):
                started.set()
                time.sleep(0.005)
                yield i
        finally:
            finalized.set()

    worker = DeviceWorker(FakeModel())
    job = worker.submit_stepped(long_job)
    assert started.wait(5)
    queued = worker.submit_stepped(long_job, priority=REFINE + 1)
    t0 = time.monotonic()
    worker.close(timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert not worker._thread.is_alive()
    assert finalized.is_set()  # the running job's finally ran (a refine records "interrupted" there)
    with pytest.raises(WorkerClosed):
        job.result(1)
    with pytest.raises(WorkerClosed):
        queued.result(1)
    with pytest.raises(WorkerClosed):
        worker.submit(lambda m: None)


def test_factory_runs_on_worker_thread_and_its_failure_is_reported():
    worker = DeviceWorker(factory=lambda: FakeModel("built"), name="dev0")
    model = worker.wait_ready(5)
    assert model.name == "built" and model.thread == "device-worker-dev0"
    worker.close()

    def broken():
        raise OSError("no weights")

    bad = DeviceWorker(factory=broken, name="dev1")
    with pytest.raises(OSError, match="no weights"):
        bad.wait_ready(5)
    bad.close()
    with pytest.raises(ValueError, match="exactly one of model or factory"):
        DeviceWorker()


def test_pool_spreads_jobs_over_two_cpu_devices():
    pool = WorkerPool.for_devices(["cpu:0", "cpu:1"], lambda d: FakeModel(d))
    pool.wait_ready(5)
    seen: list = []
    barrier = threading.Barrier(2, timeout=5)

    def job(model):
        # both jobs must be running at the same time to pass the barrier: two devices, not one
        barrier.wait()
        seen.append(model.name)
        return model.name
        yield  # noqa: unreachable - makes this a generator

    with pool:
        futures = [pool.submit_stepped(job) for _ in range(2)]
        names = sorted(f.result(5) for f in futures)
    assert names == ["cpu:0", "cpu:1"]
