"""One thread per device owns the model; work arrives on a priority queue (datasette ``_execute_writes``).

Two kinds of work:

- a **call**: ``fn(model) -> result``, run whole (a preview chunk: K guided steps and a decode);
- a **stepped task**: ``fn(model) -> generator``; each ``next()`` is one unit of device work (one model
  step of a refine). After every unit the task goes back on the queue, so anything more urgent that
  arrived meanwhile (a preview) runs first: a preview waits at most one refine step.

Lower priority numbers run first (:data:`PREVIEW` < :data:`REFINE`); equal priorities run in submission
order. Results come back as :class:`concurrent.futures.Future`; a failing task sets its exception on its
future and the worker carries on. ``close()`` enqueues a ``_SHUTDOWN`` sentinel that outranks all work,
joins with a timeout, fails whatever is still queued with :class:`WorkerClosed`, and closes unfinished
stepped tasks (their ``finally`` blocks run, so a refine job can record that it was interrupted).
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Generator, Generic, Iterable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
Model = Any  # a models.base.Denoiser, or anything the submitted functions accept

PREVIEW = 0
REFINE = 10
_URGENT = -1  # the shutdown sentinel outranks everything


class WorkerClosed(RuntimeError):
    """The worker was closed before this task ran (or finished)."""


class _Shutdown:
    __slots__ = ()


_SHUTDOWN = _Shutdown()


class Task(Generic[T]):
    """One unit of submitted work and the future its submitter waits on."""

    __slots__ = ("fn", "stepped", "priority", "future", "label", "steps_run", "_gen")

    def __init__(self, fn: Callable[[Model], Any], stepped: bool, priority: int, label: str) -> None:
        self.fn = fn
        self.stepped = stepped
        self.priority = priority
        self.future: Future[T] = Future()
        self.label = label
        self.steps_run = 0
        self._gen: Generator[Any, None, T] | None = None

    def run_one_unit(self, model: Model) -> bool:
        """Run one unit of work; True when the task is finished (its future is then set)."""
        if not self.stepped:
            self.future.set_result(self.fn(model))
            return True
        if self._gen is None:
            self._gen = self.fn(model)
        try:
            next(self._gen)
        except StopIteration as stop:
            self.future.set_result(stop.value)
            return True
        self.steps_run += 1
        return False

    def abandon(self, exc: BaseException) -> None:
        """Close an unfinished generator (its ``finally`` runs) and fail the future."""
        if self._gen is not None:
            try:
                self._gen.close()
            except Exception:  # noqa: BLE001 - the generator's own cleanup failed; still fail the future
                logger.exception("closing task %s failed", self.label)
        if not self.future.done():
            self.future.set_exception(exc)


class DeviceWorker:
    """The one thread that owns a model on one device.

    Args:
        model: the model (already on its device), or
        factory: a zero-argument function that builds it, called on the worker thread so the model is
            built where it runs. Exactly one of the two.
        name: a label for logs and for :class:`WorkerPool` (e.g. ``"cuda:0"``).
    """

    def __init__(
        self, model: Model | None = None, *, factory: Callable[[], Model] | None = None, name: str = "cpu"
    ) -> None:
        if (model is None) == (factory is None):
            raise ValueError("pass exactly one of model or factory")
        self.name = name
        self._factory = factory if factory is not None else (lambda: model)
        self.model: Model | None = None
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._pending = 0  # tasks submitted and not finished (for load balancing)
        self._closed = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"device-worker-{name}", daemon=True)
        self._thread.start()

    # --- submitting ----------------------------------------------------------------------------
    def submit(self, fn: Callable[[Model], T], priority: int = PREVIEW, label: str = "call") -> Future[T]:
        """Run ``fn(model)`` whole on the worker thread."""
        return self._put(Task(fn, stepped=False, priority=priority, label=label))

    def submit_stepped(
        self, fn: Callable[[Model], Generator[Any, None, T]], priority: int = REFINE, label: str = "stepped"
    ) -> Future[T]:
        """Run the generator ``fn(model)`` one ``next()`` at a time, yielding the device between steps."""
        return self._put(Task(fn, stepped=True, priority=priority, label=label))

    def _put(self, task: Task[T]) -> Future[T]:
        with self._lock:
            if self._closed:
                raise WorkerClosed(f"worker {self.name} is closed")
            self._pending += 1
            self._queue.put((task.priority, next(self._counter), task))
        task.future.add_done_callback(self._done)
        return task.future

    def _done(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        """Tasks submitted to this worker and not finished yet."""
        with self._lock:
            return self._pending

    def wait_ready(self, timeout: float | None = None) -> Model:
        """Block until the model is built on the worker thread; re-raise a failure to build it."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"worker {self.name} did not build its model within {timeout} s")
        if self._startup_error is not None:
            raise self._startup_error
        return self.model

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.model = self._factory()
        except BaseException as exc:  # noqa: BLE001 - handed to every submitter below
            logger.debug("worker %s could not build its model", self.name, exc_info=True)  # the caller reports it
            self._startup_error = exc
            self._ready.set()
            self._drain(exc)
            return
        self._ready.set()
        while True:
            priority, seq, task = self._queue.get()
            if task is _SHUTDOWN:
                break
            if task.steps_run == 0 and task._gen is None and not task.future.set_running_or_notify_cancel():
                continue  # cancelled through its future while still queued
            try:
                finished = task.run_one_unit(self.model)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it; the worker survives
                logger.debug("task %s failed on %s: %r", task.label, self.name, exc)
                task.abandon(exc)
                continue
            if not finished:
                # Back on the queue with its original sequence number: anything more urgent goes first,
                # and among equals the oldest job keeps the device.
                self._queue.put((priority, seq, task))
        self._drain(WorkerClosed(f"worker {self.name} closed before this task finished"))

    def _drain(self, exc: BaseException) -> None:
        while True:
            try:
                _, _, task = self._queue.get_nowait()
            except queue.Empty:
                return
            if task is not _SHUTDOWN:
                task.abandon(exc)

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current unit of work; queued and unfinished tasks fail with :class:`WorkerClosed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put((_URGENT, next(self._counter), _SHUTDOWN))
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("worker %s still busy after %.1f s; left as a daemon thread", self.name, timeout)

    def __enter__(self) -> "DeviceWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerPool:
    """One :class:`DeviceWorker` per device; each submission goes to the least-loaded worker.

    Args:
        workers: the workers (e.g. ``[DeviceWorker(load_model(device=d), d) for d in devices]``).
    """

    def __init__(self, workers: Iterable[DeviceWorker]) -> None:
        self.workers = list(workers)
        if not self.workers:
            raise ValueError("workers must hold at least one DeviceWorker")
        self._rr = itertools.count()

    @classmethod
    def for_devices(cls, devices: Iterable[str], model_factory: Callable[[str], Model]) -> "WorkerPool":
        """A worker per device name; ``model_factory(device)`` runs on that device's thread."""
        return cls(DeviceWorker(factory=functools.partial(model_factory, d), name=d) for d in devices)

    def pick(self) -> DeviceWorker:
        """The worker with the fewest unfinished tasks (round robin among ties)."""
        start = next(self._rr)
        n = len(self.workers)
        order = [self.workers[(start + k) % n] for k in range(n)]
        return min(order, key=lambda w: w.pending)

    def submit(self, fn: Callable[[Model], T], priority: int = PREVIEW, label: str = "call") -> Future[T]:
        return self.pick().submit(fn, priority=priority, label=label)

    def submit_stepped(
        self, fn: Callable[[Model], Generator[Any, None, T]], priority: int = REFINE, label: str = "stepped"
    ) -> Future[T]:
        return self.pick().submit_stepped(fn, priority=priority, label=label)

    @property
    def pending(self) -> int:
        return sum(w.pending for w in self.workers)

    def wait_ready(self, timeout: float | None = None) -> list[Model]:
        return [w.wait_ready(timeout) for w in self.workers]

    def close(self, timeout: float = 30.0) -> None:
        for w in self.workers:
            w.close(timeout)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_worker_and_store(model_name: str | None, db: str | None, model: Any = None, *, device: str | None = None,
                           options: Any = None) -> tuple[DeviceWorker, Any]:
    """The command lines' start-up: a worker that loads ``model_name`` (on ``device``, with the
    ``models.sd.LoadOptions`` ``options``) on its own thread, or owns the given ``model``, and the store
    at ``db``. On any failure the worker is closed and the error raised."""
    from store import open_store

    if model is None:
        from models.registry import load_model

        worker = DeviceWorker(factory=lambda: load_model(model_name, device=device, options=options),
                              name=device or "device")
    else:
        worker = DeviceWorker(model)
    try:
        worker.wait_ready()
        return worker, open_store(db)
    except BaseException:
        worker.close()
        raise
