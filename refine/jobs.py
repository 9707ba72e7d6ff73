"""Refine jobs: persisted in the store, run on a device worker one model step at a time.

Life of a job (states are the store's, see ``store.jobs``):

1. :meth:`RefineService.refine_preview` / :meth:`RefineService.refine_new` validate, write the job
   (``queued``) and hand the worker a stepped task.
2. On the worker the task claims ITS job (``running``; two workers or processes never claim the
   same one; older queued jobs of the database stay queued, and a job no longer queued, e.g.
   claimed by another process, is left alone), encodes the prompt, and then advances the full-step
   sampler by ONE guided model call per ``next()``. After each step it records ``progress_step``
   and reads the cancel flag: a cancel takes effect within one step. Between two steps the worker
   runs any preview that is waiting.
3. At the end: decode, store the final PNG (``done``, same transaction), then measure and store the
   preview-vs-final consistency (:mod:`refine.consistency`). An exception ends the job ``failed``
   with its message and reaches whoever waits on the task.
4. A clean shutdown (the worker or pool is closed mid-job) calls the store's ``interrupt_job``: the
   job becomes ``interrupted`` and is queued again with ``restarts + 1``, so it is never left
   ``running``. After a crash, :meth:`RefineService.resume` at the next start calls
   ``recover_interrupted``, which does the same to every job a dead process left ``running``, and
   then dispatches every queued job. A resumed job restarts from its stored noise at step 0 (there
   is no mid-trajectory checkpoint); since the noise and inputs are the same, so is the final
   image. Its progress says so (:attr:`JobProgress.restarted`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generator

from PIL import Image

from models.base import Denoiser
from refine.consistency import measure_consistency
from refine.full_step import DEFAULT_STEPS, FULL_STEP_SOLVER, check_full_steps, iterate_full_step
from runtime.images import image_to_tensor, to_pil
from runtime.request import (
    MAX_PROMPT_CHARS,
    check_guidance,
    check_image,
    check_prompts,
    check_request_size,
    check_seeds,
    default_guidance,
)
from runtime.worker import REFINE, DeviceWorker, WorkerPool

logger = logging.getLogger(__name__)

Executor = DeviceWorker | WorkerPool
FINISHED = ("done", "failed", "cancelled")
PROGRESS_WRITE_S = 0.2  # how stale a job's stored progress may get


@dataclass(frozen=True)
class JobProgress:
    """What a UI shows for a job: state, step i of N, an ETA, and whether it was restarted."""

    job_id: int
    state: str
    step: int
    steps: int
    eta_s: float | None
    restarts: int
    device: str | None
    error: str | None
    final_id: int | None

    @property
    def restarted(self) -> bool:
        """True when the job was interrupted by a restart and began again from its noise."""
        return self.restarts > 0


def _parse_time(text: str | None) -> float | None:
    return None if text is None else _dt.datetime.fromisoformat(text).timestamp()


class RefineService:
    """Queue, run, cancel, resume and watch refine jobs.

    Args:
        executor: the device worker (or pool) owning the model.
        store: the project store (``store.open_store``).
        poll_s: how often :meth:`wait` re-reads a job's row.
    """

    def __init__(self, executor: Executor, store: Any, *, poll_s: float = 0.02) -> None:
        self.executor = executor
        self.store = store
        self.poll_s = poll_s
        # jobs this process claimed -> set once everything after the final (consistency) is stored
        self._settled: dict[int, threading.Event] = {}

    @property
    def model(self) -> Denoiser:
        ex = self.executor
        return ex.wait_ready()[0] if isinstance(ex, WorkerPool) else ex.wait_ready()

    # --- queueing ------------------------------------------------------------------------------
    def refine_preview(self, preview_id: int, steps: int = DEFAULT_STEPS) -> int:
        """Queue a full-step refine of a stored preview (same prompt, negative, noise, guidance, size)."""
        check_full_steps(steps)
        if isinstance(preview_id, bool) or not isinstance(preview_id, int):
            raise ValueError(f"preview_id must be an integer, got {preview_id!r}")
        from store.errors import NotFoundError

        try:
            preview = self.store.get_preview(preview_id, with_image=False)
        except NotFoundError:
            raise ValueError(f"preview_id {preview_id} does not exist in the store") from None
        self._check_generation_model(preview.generation)
        job_id = self.store.enqueue_job(preview.generation.id, steps=steps, solver=FULL_STEP_SOLVER, preview_id=preview_id)
        self.dispatch(job_id)
        return job_id

    def refine_new(
        self,
        prompt: str,
        seed: int,
        *,
        negative_prompt: str = "",
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = DEFAULT_STEPS,
        owner: str | None = None,
        image: Any = None,
        keep_image_size: bool = False,
    ) -> int:
        """Queue a fresh full-step image of (prompt, seed) with no preview; everything validated first.

        ``image``: the input image of an edit (bytes, a path or a PIL image; an editing model needs one), stored
        once by its hash; ``keep_image_size`` as in :class:`runtime.request.PreviewRequest`."""
        model = self.model
        (prompt,) = check_prompts([prompt])
        (seed,) = check_seeds([seed], 1)
        if not isinstance(negative_prompt, str) or len(negative_prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"negative_prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        g = check_guidance(default_guidance(model) if guidance is None else guidance)
        image = check_image(model, image)
        h, w = check_request_size(model, height, width, image, keep_image_size)
        check_full_steps(steps)
        owned: dict[str, Any] = {} if owner is None else {"owner": owner}
        extra = dict(owned)
        with self.store.transaction():  # input image and noise (if new), generation and job: all or nothing
            if image is not None:
                extra["input_image_id"] = self.store.put_input_image(image, **owned).id
            noise_id, _ = self.store.get_or_create_noise(seed, model.latent_shape(h, w))
            generation_id = self.store.add_generation(model_id=model.model_id, prompt=prompt, negative_prompt=negative_prompt,
                                                      seed=seed, height=h, width=w, guidance=g, noise_id=noise_id, **extra)
            job_id = self.store.enqueue_job(generation_id, steps=steps, solver=FULL_STEP_SOLVER)
        self.dispatch(job_id)
        return job_id

    def _check_generation_model(self, generation: Any) -> None:
        if generation.model_id != self.model.model_id:
            raise ValueError(f"preview_id: it was made with model {generation.model_id!r}, "
                             f"but this worker runs {self.model.model_id!r}")

    def dispatch(self, job_id: int | None = None) -> Future:
        """Give the worker one stepped task that claims and runs job ``job_id``.

        With ``job_id=None`` the task claims the oldest queued job instead. The future's result is the
        final's id, or ``None`` when there was nothing to run (no queued job; or job ``job_id`` was no
        longer queued, e.g. another worker or process had claimed it) or the job was cancelled.
        """
        if job_id is not None and (isinstance(job_id, bool) or not isinstance(job_id, int)):
            raise ValueError(f"job_id must be an integer, got {job_id!r}")
        fn = self._run_next_job if job_id is None else functools.partial(self._run_next_job, job_id=job_id)
        return self.executor.submit_stepped(fn, priority=REFINE, label="refine" if job_id is None else f"refine {job_id}")

    def resume(self, max_restarts: int = 3) -> list[int]:
        """At start-up: re-queue jobs interrupted by a restart, and dispatch every queued job.

        Call once, before this process dispatches anything. Returns the re-queued job ids.
        """
        requeued = self.store.recover_interrupted(max_restarts=max_restarts)
        for job_id in requeued:
            logger.info("refine job %d was interrupted by a restart; it starts again from its noise", job_id)
        for job in self.store.list_jobs(states=["queued"], owner=None, limit=10_000):
            self.dispatch(job.id)
        return requeued

    def retry(self, job_id: int) -> None:
        """Queue a failed or cancelled job again (from its noise, step 0) and dispatch it."""
        self.store.retry_job(job_id)
        self.dispatch(job_id)

    # --- watching --------------------------------------------------------------------------------
    def cancel(self, job_id: int) -> str:
        """Cancel a job: queued -> cancelled now; running -> stops within one step. Returns the state."""
        return self.store.request_cancel(job_id)

    def progress(self, job_id: int) -> JobProgress:
        job = self.store.get_job(job_id)
        eta = None
        if job.state == "running" and job.progress_step > 0 and job.started_at:
            elapsed = time.time() - _parse_time(job.started_at)  # type: ignore[operator]
            eta = elapsed / job.progress_step * (job.steps - job.progress_step)
        elif job.state == "done":
            eta = 0.0
        final = self.store.get_final_for_job(job_id) if job.state == "done" else None
        return JobProgress(job_id=job.id, state=job.state, step=job.progress_step, steps=job.steps, eta_s=eta,
                           restarts=job.restarts, device=job.device, error=job.error,
                           final_id=None if final is None else final.id)

    def wait(self, job_id: int, timeout: float | None = None) -> JobProgress:
        """Block until the job is done, failed or cancelled (polls the store; works across processes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            p = self.progress(job_id)
            if p.state in FINISHED:
                settled = self._settled.get(job_id)
                if settled is not None:  # ours: also wait for the consistency row written after 'done'
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    settled.wait(left)
                return p
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"refine job {job_id} still {p.state} at step {p.step}/{p.steps} after {timeout} s")
            time.sleep(self.poll_s)

    # --- on the worker ---------------------------------------------------------------------------
    def _run_next_job(self, model: Denoiser, job_id: int | None = None) -> Generator[None, None, int | None]:
        """Claim job ``job_id`` (``None``: the oldest queued one) and run it, one unit of device work per ``next()``."""
        from store.errors import JobStateError

        workers = self.executor.workers if isinstance(self.executor, WorkerPool) else [self.executor]
        device = next((w.name for w in workers if w.model is model), str(model.device))
        if job_id is None:
            job = self.store.claim_next_job(device)
        else:
            try:
                job = self.store.claim_job(job_id, device)
            except JobStateError as exc:  # claimed by another worker or process, or cancelled meanwhile
                logger.info("%s; this task leaves it alone", exc)
                job = None
        if job is None:
            return None
        settled = self._settled.setdefault(job.id, threading.Event())
        if job.restarts:
            logger.info("refine job %d: restart %d, running again from its noise at step 0", job.id, job.restarts)
        try:
            final_id = yield from self._run_job(model, job)
        except GeneratorExit:
            # The worker is closing mid-job: interrupted -> queued again, so a clean shutdown never
            # leaves it 'running'. (If that write fails, recover_interrupted() at the next start does it.)
            self._interrupt_at_shutdown(job.id)
            raise
        except BaseException as exc:
            logger.exception("refine job %d failed", job.id)
            try:
                self.store.finish_job(job.id, "failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.exception("could not record the failure of refine job %d", job.id)
            raise
        finally:
            settled.set()
        return final_id

    def _interrupt_at_shutdown(self, job_id: int) -> None:
        """Re-queue job ``job_id`` if it is still running (it may already be done, between its final and
        its consistency row)."""
        try:
            if self.store.get_job(job_id).state != "running":
                return
            state = self.store.interrupt_job(job_id)
        except Exception:  # noqa: BLE001 - e.g. the store was closed first; the next start recovers it
            logger.exception("refine job %d stopped at shutdown and stays running until the next start", job_id)
            return
        logger.info("refine job %d stopped at shutdown; it is %s (it restarts from its noise)", job_id, state)

    def _run_job(self, model: Denoiser, job: Any) -> Generator[None, None, int | None]:
        store = self.store
        generation = store.get_generation(job.generation_id)
        if generation.model_id != model.model_id:
            raise ValueError(f"generation {generation.id} was made with model {generation.model_id!r}, "
                             f"this worker runs {model.model_id!r}")
        if generation.noise_id is None:
            raise ValueError(f"generation {generation.id} has no stored noise to refine from")
        t0 = time.perf_counter()
        noise = store.get_noise(generation.noise_id).unsqueeze(0)
        cond = model.encode_prompts([generation.prompt], generation.negative_prompt)
        if generation.input_image_id is not None:  # an edit: the same stored input image as its previews
            image = store.get_input_image(generation.input_image_id).image()
            cond = model.image_conditioning(cond, image, generation.height, generation.width)
        elif getattr(model, "takes_image", False):
            raise ValueError(f"generation {generation.id} has no input image, and {model.model_id} is an editing model")
        yield  # setup is one unit of device work, each model step another: a waiting preview goes between
        x = None
        last_write = 0.0
        for record in iterate_full_step(model, cond, noise, generation.guidance, job.steps,
                                         (generation.height, generation.width)):
            x = record.x
            step = min(record.i + 1, job.steps)
            # Progress is a write (a commit, an fsync): at most every PROGRESS_WRITE_S. The cancel flag is
            # read after every step, so a cancel still lands within one step.
            now = time.monotonic()
            if now - last_write >= PROGRESS_WRITE_S or step == job.steps:
                cancel = store.update_job_progress(job.id, step)
                last_write = now
            else:
                cancel = store.get_job(job.id).cancel_requested
            if cancel:
                store.finish_job(job.id, "cancelled")
                logger.info("refine job %d cancelled at step %d/%d", job.id, step, job.steps)
                return None
            yield
        t1 = time.perf_counter()
        assert x is not None  # steps >= 1
        pixels = model.decode(x)[0].float().cpu()
        image = to_pil(pixels)
        t2 = time.perf_counter()
        yield  # the decode was a unit of its own (a VAE decode costs about a step)
        final_id = store.finish_job(
            job.id, "done", image=image,
            timings_ms={"sampling_wall": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3},  # wall: previews ran between steps
            extra_params={**model.png_params(), **({"Refine restarts": job.restarts} if job.restarts else {})} or None,
        )
        if job.preview_id is not None:
            yield
            self._record_consistency(job.preview_id, final_id, image)
        return final_id

    def _record_consistency(self, preview_id: int, final_id: int, final_image: Image.Image) -> None:
        """Preview vs final, both as stored (8-bit PNG pixels)."""
        import io

        png = self.store.get_preview(preview_id).png
        preview = image_to_tensor(Image.open(io.BytesIO(png)))
        metrics = measure_consistency(preview, image_to_tensor(final_image))
        self.store.add_consistency(preview_id, final_id, psnr=metrics["psnr"], ssim=metrics["ssim"],
                                   metrics={k: v for k, v in metrics.items() if k not in ("psnr", "ssim")})
