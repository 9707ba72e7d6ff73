"""Batched few-step previews of prompts x seeds, streamed chunk by chunk and stored as they come.

A run: validate the whole request (nothing written on bad input), resolve the solver, fetch each
seed's noise from the store (created on first use), cut the (prompt, seed) pairs into chunks and
submit every chunk to the device worker at preview priority. On the device, one chunk is: encode its
prompts (batched where exact), K steps of the solver with ONE guided model call per step for the
whole chunk (padded to the fixed chunk size, see :mod:`preview.batching`) and no host sync, then each
real row decoded and handed at once to a thread pool that PNG-encodes and stores it (generation row,
preview row with PNG + A1111 parameters + timings) while the device goes on; the caller gets each row
as soon as it is stored.

preview/ owns no device: it only submits work to a :class:`runtime.worker.DeviceWorker` (or a
:class:`~runtime.worker.WorkerPool`), which interleaves it with refine steps.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from models.base import Conditioning, Denoiser
from preview.batching import (
    TEXT_BATCH,
    chunks,
    default_chunk_size,
    pad_conditioning,
    pad_rows,
    rows_per_commit,
    text_fillers,
)
from preview.solvers import ResolvedSolver, resolve_solver
from runtime.images import to_pil
from runtime.request import DEFAULT_MAX_SEEDS, PreviewRequest, validate
from runtime.worker import PREVIEW, DeviceWorker, WorkerPool

logger = logging.getLogger(__name__)

ENCODE_CACHE_SIZE = 256  # (prompt, negative prompt) encodings kept per engine
_CHUNK_DONE = object()  # queued after a chunk's last row (or its failure)


@dataclass(frozen=True)
class PreviewResult:
    """One stored preview.

    ``pixels`` is the decoded image, float32 (3, H, W) in [0, 1] on the CPU, exactly as the model
    produced it (the PNG is its 8-bit rounding). ``timings_ms`` are those of the chunk it ran in.
    """

    preview_id: int
    generation_id: int
    noise_id: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    solver: str
    checkpoint_id: int | None
    guidance: float
    height: int
    width: int
    image: Image.Image = field(repr=False)
    pixels: torch.Tensor = field(repr=False)
    timings_ms: dict[str, float] = field(default_factory=dict)
    chunk_index: int = 0
    input_image_id: int | None = None  # the stored input image of an edit


@dataclass
class _ChunkOutput:
    timings_ms: dict[str, float]  # encode, sample and the whole device time of the chunk


def _cache_put(cache: dict | None, key: Any, row: Conditioning) -> None:
    if cache is not None:
        if len(cache) >= ENCODE_CACHE_SIZE:
            cache.clear()  # bounded; prompts of a session are few
        cache[key] = row


def encode_each(model: Denoiser, prompts: Sequence[str], negative_prompt: str, cache: dict | None = None,
                also: Sequence[str] = ()) -> Conditioning:
    """Encode the chunk's prompts, each to the same bits whatever the other prompts of the grid.

    A model that sets ``fixed_text_length`` (its encoder pads every prompt to one length, as CLIP
    pads to 77 tokens) encodes its distinct uncached prompts :data:`~preview.batching.TEXT_BATCH` at
    a time, the batch always filled to that size with filler prompts, so each prompt is computed at
    one batch size and one call serves a whole grid. Any other encoder (one that pads to the longest
    prompt of its batch would make a prompt's context depend on its neighbours) gets one prompt per
    call. ``cache`` (keyed by model and text) saves re-encoding across chunks and grids; ``also``
    (the grid's other prompts, with a cache) are encoded in the same calls, for the chunks to come.
    """
    key = lambda p: (id(model), p, negative_prompt)  # noqa: E731
    found: dict[str, Conditioning] = {}
    for p in dict.fromkeys(prompts):
        row = None if cache is None else cache.get(key(p))
        if row is not None:
            found[p] = row
    missing = [p for p in dict.fromkeys(prompts) if p not in found]
    if getattr(model, "fixed_text_length", False):
        if cache is not None:
            missing += [p for p in dict.fromkeys(also) if p not in found and p not in missing and cache.get(key(p)) is None]
        for batch in chunks(missing, TEXT_BATCH):
            enc = model.encode_prompts(text_fillers(list(batch), TEXT_BATCH), negative_prompt)
            for i, p in enumerate(batch):
                found[p] = enc.select([i])
                _cache_put(cache, key(p), found[p])
    else:
        for p in missing:
            found[p] = model.encode_prompts([p], negative_prompt)
            _cache_put(cache, key(p), found[p])
    rows = [found[p] for p in prompts]
    lengths = {tuple(r.cond.shape[1:]) for r in rows} | {tuple(r.uncond.shape[1:]) for r in rows}
    if len(lengths) != 1:
        raise RuntimeError(f"{model.model_id}: prompt encodings have different shapes {sorted(lengths)}; "
                           "its encoder must pad to a fixed length")
    return Conditioning.cat(rows)


@torch.no_grad()
def run_chunk(
    model: Denoiser,
    solver: ResolvedSolver,
    prompts: Sequence[str],
    negative_prompt: str,
    noise: torch.Tensor,
    guidance: float,
    steps: int,
    chunk_size: int,
    cache: dict | None = None,
    emit: Callable[[int, torch.Tensor, dict[str, float]], None] | None = None,
    also_prompts: Sequence[str] = (),
    image: Image.Image | None = None,
    size: tuple[int, int] | None = None,
    decode_streams: int = 1,
) -> _ChunkOutput:
    """One chunk on the device: encode, K solver steps (one guided call each), decode. Runs on the worker.

    The UNet always sees ``chunk_size`` rows (padded), so each row's result depends on that row only.
    The K-step loop never waits for the device (no host sync; the solver checks finiteness once at the
    end). Then each REAL row is decoded on its own (padded rows never are: batch-invariant, see
    :mod:`preview.batching`) through the model's ``preview_decode`` when it has one (a fast preview
    decoder) or its ``decode``, and handed to ``emit(row, pixels, timings_ms)`` at once, so the host
    encodes and stores tile i while the device decodes tile i + 1 and then starts the next chunk.
    An edit's input ``image`` (with the output ``size``) joins every row's conditioning
    (``model.image_conditioning``; the model caches its encoding). ``decode_streams`` > 1 decodes that many
    rows at once, each still alone (:func:`decode_rows`).
    """
    b = noise.shape[0]
    device = torch.device(model.device)
    t0 = time.perf_counter()
    cond = encode_each(model, prompts, negative_prompt, cache, also_prompts)
    if image is not None:
        assert size is not None  # validated with the image
        cond = model.image_conditioning(cond, image, *size)
    cond = pad_conditioning(cond, chunk_size)
    x_T = pad_rows(noise, chunk_size).to(device, torch.float32)
    t1 = time.perf_counter()

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.guided_eps(x, t, cond, guidance)

    x = x_T
    for record in solver.solver.iterate(eps_fn, x_T, steps):
        x = record.x
    if not torch.isfinite(x[:b]).all():  # one host sync, after the loop
        raise ValueError(f"model_output contains NaN or inf: the {steps}-step preview of {model.model_id} diverged")
    t2 = time.perf_counter()
    decode = getattr(model, "preview_decode", None) or model.decode
    t_prev = t2
    for row, pixels in decode_rows(decode, x, b, decode_streams):
        t_row = time.perf_counter()
        if emit is not None:
            emit(row, pixels, {"encode": (t1 - t0) * 1e3, "sample": (t2 - t1) * 1e3, "decode": (t_row - t_prev) * 1e3,
                               "device": (t_row - t0) * 1e3})
        t_prev = time.perf_counter()  # the next row's decode time starts after this row's hand-off
    t3 = time.perf_counter()
    return _ChunkOutput(timings_ms={"encode": (t1 - t0) * 1e3, "sample": (t2 - t1) * 1e3, "decode": (t3 - t2) * 1e3,
                                    "device": (t3 - t0) * 1e3})


def decode_rows(decode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int,
                streams: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode rows 0..``rows`` - 1 of ``x`` one by one (batch 1, so each row's bits never depend on the others)
    and yield (row, pixels (3, H, W) float32 on the CPU) in row order, each as soon as it and the rows before it
    are done.

    ``streams`` > 1 decodes up to that many rows at once, each still at batch 1, from as many host threads, each
    on its own CUDA stream on a GPU (after the stream that computed ``x``): the same kernels as one by one, so
    the same bits, with the GPU's idle share of a batch-1 decode filled by the other rows. On the CPU the
    threads share the cores. A row whose concurrent decode raises (a float16 VAE that overflows switches the
    model to float32 mid-flight) is decoded again alone, once the others are done.
    """
    def alone(row: int) -> torch.Tensor:
        return decode(x[row : row + 1])[0].float().cpu()  # .cpu() waits for this row only

    if streams <= 1:
        for row in range(rows):
            yield row, alone(row)
        return
    cuda = x.device.type == "cuda"
    ready = None
    if cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(x.device))
    side = [torch.cuda.Stream(x.device) if cuda else None for _ in range(min(streams, rows))]

    def one(row: int) -> torch.Tensor:
        stream = side[row % len(side)]
        if stream is None:
            return alone(row)
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            return alone(row)

    pool = ThreadPoolExecutor(max_workers=len(side), thread_name_prefix="preview-decode")
    try:
        futures = [pool.submit(one, row) for row in range(rows)]
        for row, future in enumerate(futures):
            try:
                pixels = future.result()
            except Exception:  # decoded again alone below, where its error (if any) is raised
                logger.warning("concurrent decode of row %d failed; decoding it alone", row, exc_info=True)
                pool.shutdown(wait=True)
                pixels = alone(row)
            yield row, pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


Executor = DeviceWorker | WorkerPool


def _first_model(executor: Executor, timeout: float | None) -> Denoiser:
    if isinstance(executor, WorkerPool):
        return executor.wait_ready(timeout)[0]
    return executor.wait_ready(timeout)


class PreviewEngine:
    """Runs :class:`PreviewRequest` grids on a device worker (or pool) and stores every preview.

    Args:
        executor: the :class:`DeviceWorker` / :class:`WorkerPool` owning the model.
        store: a ``store`` object (noise, generations, previews, solver checkpoints).
        max_seeds: the most seeds one request may ask for.
        chunk_size: rows per model call (``None`` = :func:`preview.batching.default_chunk_size`).
            Keep it fixed for a device: it is part of what makes previews reproducible bit for bit.
        preview_decoder: a folder holding a diffusers ``AutoencoderTiny`` (TAESD) to decode previews
            with; refines keep the model's own VAE. Loaded onto every worker here, and refused here,
            with one sentence, when its latents do not fit the model.
        store_threads: threads that PNG-encode and store rows (default: up to 8, one per CPU core).
        decode_streams: rows decoded at once, each still alone (:func:`decode_rows`; 1 = one after another).
    """

    def __init__(self, executor: Executor, store: Any, *, max_seeds: int = DEFAULT_MAX_SEEDS,
                 chunk_size: int | None = None, owner: str | None = None,
                 preview_decoder: str | os.PathLike | None = None, store_threads: int | None = None,
                 decode_streams: int = 1) -> None:
        if isinstance(chunk_size, bool) or (chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1)):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if isinstance(decode_streams, bool) or not isinstance(decode_streams, int) or decode_streams < 1:
            raise ValueError(f"decode_streams must be a positive integer, got {decode_streams!r}")
        self.decode_streams = decode_streams
        self.executor = executor
        self.store = store
        self.max_seeds = max_seeds
        self.chunk_size = chunk_size
        self.owner = owner
        self.store_threads = store_threads or max(1, min(8, os.cpu_count() or 1))
        self._cache: dict = {}
        if preview_decoder is not None:
            from models.sd import attach_preview_decoder

            workers = executor.workers if isinstance(executor, WorkerPool) else [executor]
            for w in workers:
                w.submit(lambda m: attach_preview_decoder(m, preview_decoder)).result()

    @property
    def model(self) -> Denoiser:
        return _first_model(self.executor, timeout=None)

    def chunk_size_for(self, height: int, width: int) -> int:
        return self.chunk_size or default_chunk_size(self.model, height, width)

    def validate(self, request: PreviewRequest) -> PreviewRequest:
        """The request with defaults filled in; one ValueError naming the bad field otherwise."""
        return validate(request, self.model, self.max_seeds)

    def run(self, request: PreviewRequest) -> Iterator[PreviewResult]:
        """Validate, then stream stored previews chunk by chunk (prompt-major order).

        Validation and solver resolution happen before the first ``next()`` returns anything and
        before anything is written. Closing the generator early cancels chunks not yet started.
        """
        req = self.validate(request)
        solver = resolve_solver(req.solver, self.model, self.store, (req.height, req.width))
        return self._stream(req, solver)

    def _stream(self, req: PreviewRequest, solver: ResolvedSolver) -> Iterator[PreviewResult]:
        """Submit every chunk, then yield each row once it is stored, in request order.

        Rows are stored by a small thread pool (PNG encoding releases the GIL), submitted from the
        device thread the moment they are decoded, so neither the device nor the caller waits for the
        host: the device goes on with the next row or chunk (or a refine step) while earlier rows are
        encoded and written. Large images are stored row by row, each in its own short transactions, so
        their PNGs are encoded side by side and each tile comes out as soon as it is stored; small ones a
        chunk per transaction, where one commit costs more than the PNGs
        (:func:`preview.batching.rows_per_commit`). A crash loses at most the rows being stored, and a row
        is yielded only once it is committed: whatever the user sees can be selected and refined.
        """
        model = self.model
        assert req.height is not None and req.width is not None and req.guidance is not None
        shape = model.latent_shape(req.height, req.width)
        size = self.chunk_size_for(req.height, req.width)
        noise_by_seed = {s: self.store.get_or_create_noise(s, shape) for s in req.seeds}
        owner = {} if self.owner is None else {"owner": self.owner}
        input_image_id = None if req.image is None else self.store.put_input_image(req.image, **owner).id
        pairs = req.pairs
        group = rows_per_commit(req.height, req.width, size)
        pool = ThreadPoolExecutor(max_workers=self.store_threads, thread_name_prefix="preview-store")
        closed = threading.Event()
        submitted: list[tuple[Future, queue.SimpleQueue]] = []
        try:
            for index, part in enumerate(chunks(pairs, size)):
                noise = torch.stack([noise_by_seed[s][1] for _, s in part])
                prompts = [p for p, _ in part]
                stored: queue.SimpleQueue = queue.SimpleQueue()  # futures of lists of stored rows, in order
                pending: list[tuple[int, torch.Tensor, dict[str, float]]] = []
                t_submit = time.perf_counter()

                def emit(row: int, pixels: torch.Tensor, timings: dict[str, float], part=part, index=index,
                         stored=stored, pending=pending, t_submit=t_submit) -> None:
                    if closed.is_set():
                        return
                    pending.append((row, pixels, {**timings, "latency": (time.perf_counter() - t_submit) * 1e3}))
                    if len(pending) < group and row < len(part) - 1:
                        return
                    rows = list(pending)
                    pending.clear()
                    try:
                        stored.put(pool.submit(self._store_rows, req, solver, part, rows, noise_by_seed, index,
                                               input_image_id))
                    except RuntimeError:  # the pool was shut down: the caller closed the stream
                        pass

                also = req.prompts if index == 0 else ()  # the first chunk encodes every prompt of the grid
                fn = (lambda m, prompts=prompts, noise=noise, emit=emit, also=also: run_chunk(
                    m, solver, prompts, req.negative_prompt, noise, req.guidance, req.steps, size, self._cache, emit, also,
                    req.image, (req.height, req.width), self.decode_streams))
                future = self.executor.submit(fn, priority=PREVIEW, label="preview")
                future.add_done_callback(lambda _, stored=stored: stored.put(_CHUNK_DONE))
                submitted.append((future, stored))
            for future, stored in submitted:
                while (item := stored.get()) is not _CHUNK_DONE:
                    yield from item.result()
                future.result()  # a failed chunk raises here, after its stored rows were yielded
        finally:
            closed.set()
            for future, _ in submitted:
                future.cancel()  # only chunks still queued; a running one finishes and is not stored
            pool.shutdown(wait=True, cancel_futures=True)  # rows being written finish: no write after return

    def _store_rows(self, req: PreviewRequest, solver: ResolvedSolver, part: Sequence[tuple[str, int]],
                    rows: list[tuple[int, torch.Tensor, dict[str, float]]], noise_by_seed: dict,
                    chunk_index: int, input_image_id: int | None = None) -> list[PreviewResult]:
        """Store decoded rows: one row in its own transactions (its PNG encoded beside other rows'), or
        several in one transaction (one commit, when the images are small enough that the commit dominates)."""
        def store_all() -> list[PreviewResult]:
            return [self._store_one(req, solver, part[row][0], part[row][1], noise_by_seed[part[row][1]][0],
                                    pixels, timings, chunk_index, input_image_id) for row, pixels, timings in rows]

        if len(rows) == 1:
            return store_all()
        with self.store.transaction():  # all or nothing, one commit
            return store_all()

    def _store_one(self, req: PreviewRequest, solver: ResolvedSolver, prompt: str, seed: int, noise_id: int,
                   pixels: torch.Tensor, timings: dict[str, float], chunk_index: int,
                   input_image_id: int | None = None) -> PreviewResult:
        model = self.model
        assert req.height is not None and req.width is not None and req.guidance is not None  # validated
        extra: dict[str, Any] = {} if self.owner is None else {"owner": self.owner}
        if input_image_id is not None:
            extra["input_image_id"] = input_image_id
        generation_id = self.store.add_generation(
            model_id=model.model_id, prompt=prompt, negative_prompt=req.negative_prompt, seed=seed,
            height=req.height, width=req.width, guidance=req.guidance, noise_id=noise_id, **extra)
        image = to_pil(pixels)
        preview_id = self.store.add_preview(
            generation_id, solver=solver.label, steps=req.steps, image=image, timings_ms=timings,
            checkpoint_id=solver.checkpoint_id, extra_params={"Preview solver": solver.description, **model.png_params()})
        return PreviewResult(
            preview_id=preview_id, generation_id=generation_id, noise_id=noise_id, prompt=prompt,
            negative_prompt=req.negative_prompt, seed=seed, steps=req.steps, solver=solver.label,
            checkpoint_id=solver.checkpoint_id, guidance=float(req.guidance), height=int(req.height),
            width=int(req.width), image=image, pixels=pixels, timings_ms=timings, chunk_index=chunk_index,
            input_image_id=input_image_id)
