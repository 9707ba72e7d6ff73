"""Batched few-step previews of prompts x seeds, streamed chunk by chunk and stored as they come.

A run: validate the whole request (nothing written on bad input), resolve the solver, fetch each
seed's noise from the store (created on first use), cut the (prompt, seed) pairs into chunks and
submit every chunk to the device worker at preview priority. On the device, one chunk is: encode its
prompts, K steps of the solver with ONE guided model call per step for the whole chunk (padded to
the fixed chunk size, see :mod:`preview.batching`), one decode. Back on the caller's thread each
image is stored (generation row, preview row with PNG + A1111 parameters + timings) and yielded.

preview/ owns no device: it only submits work to a :class:`runtime.worker.DeviceWorker` (or a
:class:`~runtime.worker.WorkerPool`), which interleaves it with refine steps.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from models.base import Conditioning, Denoiser
from preview.batching import chunks, default_chunk_size, pad_conditioning, pad_rows
from preview.solvers import ResolvedSolver, resolve_solver
from runtime.images import to_pil
from runtime.request import DEFAULT_MAX_SEEDS, PreviewRequest, validate
from runtime.worker import PREVIEW, DeviceWorker, WorkerPool

logger = logging.getLogger(__name__)

ENCODE_CACHE_SIZE = 256  # (prompt, negative prompt) encodings kept per engine


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


@dataclass
class _ChunkOutput:
    pixels: torch.Tensor  # (b, 3, H, W) float32 CPU
    timings_ms: dict[str, float]


def encode_each(model: Denoiser, prompts: Sequence[str], negative_prompt: str, cache: dict | None = None) -> Conditioning:
    """Encode every prompt on its own (batch of one) and stack the rows.

    A text encoder that pads to the longest prompt of its batch would make a prompt's context depend
    on its neighbours; one prompt at a time it cannot. ``cache`` (keyed by model and text) saves
    re-encoding across chunks.
    """
    rows = []
    for p in prompts:
        key = (id(model), p, negative_prompt)
        row = None if cache is None else cache.get(key)
        if row is None:
            row = model.encode_prompts([p], negative_prompt)
            if cache is not None:
                if len(cache) >= ENCODE_CACHE_SIZE:
                    cache.clear()  # bounded; prompts of a session are few
                cache[key] = row
        rows.append(row)
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
) -> _ChunkOutput:
    """One chunk on the device: encode, K solver steps (one guided call each), decode. Runs on the worker.

    The model always sees ``chunk_size`` rows (padded), so each row's result depends on that row only.
    """
    b = noise.shape[0]
    t0 = time.perf_counter()
    cond = pad_conditioning(encode_each(model, prompts, negative_prompt, cache), chunk_size)
    x_T = pad_rows(noise, chunk_size).to(model.device, torch.float32)
    t1 = time.perf_counter()

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.guided_eps(x, t, cond, guidance)

    x = x_T
    for record in solver.solver.iterate(eps_fn, x_T, steps):
        x = record.x
    t2 = time.perf_counter()
    pixels = model.decode(x)[:b].float().cpu()  # decoded at the padded size too
    t3 = time.perf_counter()
    return _ChunkOutput(
        pixels=pixels,
        timings_ms={"encode": (t1 - t0) * 1e3, "sample": (t2 - t1) * 1e3, "decode": (t3 - t2) * 1e3,
                    "device": (t3 - t0) * 1e3},
    )


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
    """

    def __init__(self, executor: Executor, store: Any, *, max_seeds: int = DEFAULT_MAX_SEEDS,
                 chunk_size: int | None = None, owner: str | None = None) -> None:
        if isinstance(chunk_size, bool) or (chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1)):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.executor = executor
        self.store = store
        self.max_seeds = max_seeds
        self.chunk_size = chunk_size
        self.owner = owner
        self._cache: dict = {}

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
        solver = resolve_solver(req.solver, self.model, self.store)
        return self._stream(req, solver)

    def _stream(self, req: PreviewRequest, solver: ResolvedSolver) -> Iterator[PreviewResult]:
        model = self.model
        assert req.height is not None and req.width is not None and req.guidance is not None
        shape = model.latent_shape(req.height, req.width)
        size = self.chunk_size_for(req.height, req.width)
        noise_by_seed = {s: self.store.get_or_create_noise(s, shape) for s in req.seeds}
        pairs = req.pairs
        submitted: list[tuple[Sequence[tuple[str, int]], Future, float]] = []
        try:
            for part in chunks(pairs, size):
                noise = torch.stack([noise_by_seed[s][1] for _, s in part])
                prompts = [p for p, _ in part]
                fn = (lambda m, prompts=prompts, noise=noise: run_chunk(
                    m, solver, prompts, req.negative_prompt, noise, req.guidance, req.steps, size, self._cache))
                submitted.append((part, self.executor.submit(fn, priority=PREVIEW, label="preview"), time.perf_counter()))
            for index, (part, future, t_submit) in enumerate(submitted):
                out = future.result()
                t_done = time.perf_counter()
                timings = dict(out.timings_ms)
                timings["latency"] = (t_done - t_submit) * 1e3
                with self.store.transaction():  # one commit (one fsync) per chunk, all or nothing
                    stored = [self._store_one(req, solver, prompt, seed, noise_by_seed[seed][0], out.pixels[row], timings, index)
                              for row, (prompt, seed) in enumerate(part)]
                yield from stored
        finally:
            for _, future, _ in submitted:
                future.cancel()  # only chunks still queued; a running one finishes and is dropped

    def _store_one(self, req: PreviewRequest, solver: ResolvedSolver, prompt: str, seed: int, noise_id: int,
                   pixels: torch.Tensor, timings: dict[str, float], chunk_index: int) -> PreviewResult:
        model = self.model
        assert req.height is not None and req.width is not None and req.guidance is not None  # validated
        extra = {} if self.owner is None else {"owner": self.owner}
        generation_id = self.store.add_generation(
            model_id=model.model_id, prompt=prompt, negative_prompt=req.negative_prompt, seed=seed,
            height=req.height, width=req.width, guidance=req.guidance, noise_id=noise_id, **extra)
        image = to_pil(pixels)
        preview_id = self.store.add_preview(
            generation_id, solver=solver.label, steps=req.steps, image=image, timings_ms=timings,
            checkpoint_id=solver.checkpoint_id, extra_params={"Preview solver": solver.description})
        return PreviewResult(
            preview_id=preview_id, generation_id=generation_id, noise_id=noise_id, prompt=prompt,
            negative_prompt=req.negative_prompt, seed=seed, steps=req.steps, solver=solver.label,
            checkpoint_id=solver.checkpoint_id, guidance=float(req.guidance), height=int(req.height),
            width=int(req.width), image=image, pixels=pixels, timings_ms=timings, chunk_index=chunk_index)
