"""``python -m preview.bench``: what a preview grid costs, against the least it could cost and against diffusers.

Measured in one run, on one device and model, for each seed count of ``--seeds-list`` (medians over
``--repeats`` rounds after ``--warmup`` untimed ones; ``torch.cuda.synchronize`` around every timing):

- ``grid_s``: wall time of the grid at K steps through :class:`~preview.engine.PreviewEngine`
  (validate, noise from the store, encode, K solver steps, decode, PNG + store writes, every result
  yielded); ``first_tile_s``: from the request to the first stored, yielded preview; ``grid_parts_ms``:
  where the grid's time went (encode, sample, decode, the last tile's decode end and the host's share past
  it; :func:`grid_times`).
- ``floor_s``, the honest floor: K guided model calls at the grid's REAL batch (no padding) plus one
  decode of the real rows, the faster of one batched VAE call and one call per row.
- ``diffusers_s`` (``--against diffusers``): diffusers' own pipeline of the model's family on the same
  prompt, noise (our stored latents, passed as ``latents``), K, guidance and size --
  ``StableDiffusionPipeline`` with ``DPMSolverMultistepScheduler``, PIL images out, its default settings
  (no VAE slicing), sharing the model's modules.
- ``vs_diffusers`` = grid_s / diffusers_s (target <= 1.0); ``overhead`` = grid_s / floor_s (target <= 1.15).
- ``contention``: for the main seed count, the grid's wall time while a full-step refine runs on the
  same worker, over its idle time (target <= 1.3).
- peak GPU memory (``torch.cuda.max_memory_allocated``) per seed count; null on the CPU.

Also reported: the decode both ways and whether a row's bits depend on the decode batch
(``decode_batch_invariant``), and the PNG encode time of one tile at compression levels 1 and 6.
``--compile``, ``--channels-last`` and ``--sdpa`` try the GPU speed settings; every part of the run
uses them, diffusers' pipeline included. A temporary store is used unless ``--db`` is given.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from preview.engine import PreviewEngine, encode_each
from refine.jobs import RefineService
from runtime.cli import add_db_option, add_model_options, model_from_args
from runtime.images import to_pil
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker

logger = logging.getLogger(__name__)

PROMPT = "a red circle on a blue background"
AGAINST = ("diffusers",)
SDPA_CHOICES = ("default", "flash", "efficient", "math", "cudnn")


class BenchError(ValueError):
    """A bench setting that cannot work with this model (one sentence for the user)."""


def _sync(model: Any) -> None:
    if torch.device(model.device).type == "cuda":
        torch.cuda.synchronize(model.device)


def _timed(model: Any, fn: Callable[[], Any]) -> float:
    _sync(model)
    t0 = time.perf_counter()
    fn()
    _sync(model)
    return time.perf_counter() - t0


def _is_cuda(model: Any) -> bool:
    return torch.device(model.device).type == "cuda"


def _noise(store: Any, model: Any, n: int, size: tuple[int, int]) -> torch.Tensor:
    shape = model.latent_shape(*size)
    return torch.stack([store.get_or_create_noise(s, shape)[1] for s in range(n)])


def measure_floor(model: Any, store: Any, n: int, steps: int, guidance: float, size: tuple[int, int]) -> dict[str, float]:
    """K guided calls at batch ``n`` (real rows only) and the decode of the ``n`` rows, both ways (runs on the worker)."""
    cond = encode_each(model, [PROMPT] * n, "")
    x = _noise(store, model, n, size).to(model.device)
    ts = model.schedule.timesteps(steps)
    model.guided_eps(x, ts[0], cond, guidance)  # untimed: warm caches after the text encoder ran

    def calls() -> None:
        for t in ts:
            model.guided_eps(x, t, cond, guidance)

    vae = getattr(model, "vae", None)
    slicing = getattr(vae, "use_slicing", None)

    def decode_batched() -> torch.Tensor:
        if vae is not None:
            vae.use_slicing = False
        try:
            return model.decode(x)
        finally:
            if vae is not None:
                vae.use_slicing = slicing

    def decode_rows() -> torch.Tensor:
        return torch.cat([model.decode(x[i : i + 1]) for i in range(n)])

    out = {"calls_s": _timed(model, calls)}
    out["decode_batched_s"] = _timed(model, decode_batched)
    out["decode_rows_s"] = _timed(model, decode_rows)
    out["floor_s"] = out["calls_s"] + min(out["decode_batched_s"], out["decode_rows_s"])
    return out


def decode_batch_invariant(model: Any, store: Any, n: int, size: tuple[int, int]) -> bool:
    """Whether row 0 decodes to the same bits alone as in one batched call of ``n`` rows (runs on the worker)."""
    x = _noise(store, model, n, size).to(model.device) * 0.5
    vae = getattr(model, "vae", None)
    slicing = getattr(vae, "use_slicing", None)
    if vae is not None:
        vae.use_slicing = False
    try:
        return bool(torch.equal(model.decode(x)[:1], model.decode(x[:1])))
    finally:
        if vae is not None:
            vae.use_slicing = slicing


def diffusers_pipeline(model: Any) -> Any:
    """diffusers' own pipeline of ``model``'s family, built on the model's modules (nothing is copied)."""
    from models.sd import StableDiffusionDenoiser

    if type(model) is not StableDiffusionDenoiser:  # SDXL's denoiser is a subclass with another pipeline
        raise BenchError(f"--against diffusers: {model.model_id} has no diffusers pipeline to compare with (only "
                         "Stable Diffusion models do); run the bench without --against for this model")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.pipe.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_diffusers(model: Any, pipe: Any, store: Any, n: int, steps: int, guidance: float,
                      size: tuple[int, int]) -> float:
    """Seconds of ``pipe(...)`` on the grid's prompt, noise, K, guidance and size (runs on the worker)."""
    latents = _noise(store, model, n, size).to(model.device, model.dtype)
    vae = model.vae
    slicing = vae.use_slicing
    vae.use_slicing = False  # the pipeline's default
    try:
        return _timed(model, lambda: pipe(prompt=[PROMPT] * n, height=size[0], width=size[1], num_inference_steps=steps,
                                          guidance_scale=guidance, latents=latents, output_type="pil"))
    finally:
        vae.use_slicing = slicing


def grid_times(engine: PreviewEngine, request: PreviewRequest) -> tuple[float, float, dict[str, float]]:
    """(seconds to the first stored preview, seconds to the last, where the time went) of one grid.

    Where the time went, in ms, from the tiles' own timings (:class:`~preview.engine.PreviewResult`):
    ``encode`` and ``sample`` (summed over chunks), ``decode`` (summed over tiles), ``last_decoded`` (the
    latest tile's decode end, from its chunk's submission) and ``host`` (the wall time past it: the work before
    the first chunk is submitted, storing the last tile and handing it over).
    """
    t0 = time.perf_counter()
    first = None
    results = []
    for result in engine.run(request):
        results.append(result)
        if first is None:
            first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if len(results) != len(request.seeds) * len(request.prompts):
        raise RuntimeError(f"the grid yielded {len(results)} previews, not {len(request.seeds)}")
    chunks = {r.chunk_index: r.timings_ms for r in results}
    last = max(r.timings_ms["latency"] for r in results)
    parts = {"encode": sum(t["encode"] for t in chunks.values()), "sample": sum(t["sample"] for t in chunks.values()),
             "decode": sum(r.timings_ms["decode"] for r in results), "last_decoded": last, "host": wall * 1e3 - last}
    return float(first or wall), wall, {k: round(v, 2) for k, v in parts.items()}


def png_seconds(size: tuple[int, int]) -> dict[str, float]:
    """One tile's PNG encode time at zlib levels 1 and 6 (Pillow's default), on this host."""
    img = to_pil(torch.rand(3, *size, generator=torch.Generator().manual_seed(0)) * 0.2
                 + torch.linspace(0, 0.8, size[1]).expand(3, size[0], -1))
    out = {}
    for level in (1, 6):
        t0 = time.perf_counter()
        img.save(io.BytesIO(), format="PNG", compress_level=level)
        out[f"level_{level}_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    return out


def embedded_random_weights(device: str | None = None):
    """The embedded model's exact architecture and text encoder, UNet weights random (seed 0), on ``device``
    (default: CUDA when present, else the CPU)."""
    from models.embedded.config import PATCH, SCHEDULER_CONFIG, UNET_CONFIG
    from models.embedded.model import EmbeddedDenoiser
    from models.embedded.network import PatchUNet
    from models.embedded.text import TextEncoder

    torch.manual_seed(0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return EmbeddedDenoiser(PatchUNet(UNET_CONFIG, PATCH), TextEncoder(device), SCHEDULER_CONFIG, device)


def apply_speed_settings(model: Any, *, compile: bool, channels_last: bool, sdpa: str) -> list[str]:
    """Apply the GPU speed settings to ``model`` (on the worker); return what was applied."""
    applied = []
    if sdpa != "default":
        if not _is_cuda(model):
            raise BenchError(f"--sdpa {sdpa} chooses a CUDA attention kernel; this model runs on {model.device}")
        for name in ("flash", "efficient", "math", "cudnn"):
            setter = {"flash": torch.backends.cuda.enable_flash_sdp, "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
                      "math": torch.backends.cuda.enable_math_sdp, "cudnn": getattr(torch.backends.cuda, "enable_cudnn_sdp", None)}[name]
            if setter is not None:
                setter(name == sdpa)
        applied.append(f"sdpa={sdpa}")
    for part in ("unet", "vae"):
        module = getattr(model, part, None)
        if module is None:
            if compile or channels_last:
                raise BenchError(f"--compile / --channels-last need a model with a {part} (a Stable Diffusion model)")
            continue
        if channels_last:
            module.to(memory_format=torch.channels_last)
            applied.append(f"{part}:channels_last")
    if compile:
        model.unet.compile()  # in place: the pipeline and the engine share the compiled UNet
        model.vae.decoder.compile()
        applied.append("unet+vae.decoder:torch.compile")
    return applied


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def _peak_mib(model: Any) -> float | None:
    if not _is_cuda(model):
        return None
    return round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)


def _reset_peak(model: Any) -> None:
    if _is_cuda(model):
        torch.cuda.reset_peak_memory_stats(model.device)


def parse_seed_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--seeds-list must be comma-separated positive integers, got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise BenchError(f"--seeds-list must be comma-separated positive integers, got {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preview.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--against", choices=AGAINST, default=None, help="also time the model family's diffusers pipeline")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seeds", type=int, default=8, help="the main grid's seed count (overhead, contention)")
    p.add_argument("--seeds-list", default=None, help="seed counts to report, e.g. 1,4,8,16,32 (default: --seeds)")
    p.add_argument("--solver", default="consistency")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, 7.5 for SD)")
    p.add_argument("--size", type=int, default=None, help="image height and width in pixels (default: the model's)")
    p.add_argument("--chunk-size", type=int, default=None, help="UNet rows per call (default: the engine's)")
    p.add_argument("--preview-decoder", default=None, help="an AutoencoderTiny folder for previews")
    p.add_argument("--decode-streams", type=int, default=1, help="rows the engine decodes at once (default 1)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--refine-steps", type=int, default=200, help="steps of the background refine")
    p.add_argument("--no-contention", action="store_true", help="skip the grid-during-a-refine measurement")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (everyone's)")
    p.add_argument("--channels-last", action="store_true", help="channels-last UNet and VAE (everyone's)")
    p.add_argument("--sdpa", choices=SDPA_CHOICES, default="default", help="the only attention kernel allowed (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_model_options(p)
    add_db_option(p, help="SQLite store file (default: a temporary one)")
    p.add_argument("--random-weights", action="store_true",
                   help="the embedded architecture with random weights (same cost; before the weights are trained)")
    return p


def _positive(args: argparse.Namespace) -> None:
    for name in ("steps", "seeds", "repeats", "refine_steps", "decode_streams"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {args.warmup}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _positive(args)
        counts = parse_seed_counts(args.seeds_list) if args.seeds_list else [args.seeds]
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seeds not in counts:
        counts.append(args.seeds)
    if args.threads:
        torch.set_num_threads(args.threads)
    from store import open_store

    tmp = tempfile.TemporaryDirectory()
    store = open_store(args.db or Path(tmp.name) / "bench.db")
    factory = (lambda: embedded_random_weights(args.device)) if args.random_weights else (lambda: model_from_args(args))
    worker = DeviceWorker(factory=factory, name="device")
    try:
        model = worker.wait_ready()
        report = _run(args, counts, worker, model, store)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        worker.close()
        store.close()
    main_row = report["per_seeds"][str(args.seeds)]
    print(f"grid of {args.seeds} seeds at K={args.steps}: {report['grid_s']:.3f} s (first tile {report['first_tile_s']:.3f} s), "
          f"floor {report['floor_s']:.3f} s -> overhead {report['overhead']:.3f} (target <= 1.15)", file=sys.stderr)
    if report["diffusers_s"] is not None:
        print(f"diffusers' pipeline on the same grid: {report['diffusers_s']:.3f} s -> vs_diffusers "
              f"{report['vs_diffusers']:.3f} (target <= 1.0)", file=sys.stderr)
    if report["contention"] is not None:
        print(f"same grid while a refine runs: {main_row['grid_during_refine_s']:.3f} s -> contention "
              f"{report['contention']:.3f} (target <= 1.3)", file=sys.stderr)
    print(json.dumps(report))
    return 0


def _run(args: argparse.Namespace, counts: list[int], worker: DeviceWorker, model: Any, store: Any) -> dict[str, Any]:
    pipe = worker.submit(diffusers_pipeline).result() if args.against == "diffusers" else None
    applied = worker.submit(lambda m: apply_speed_settings(
        m, compile=args.compile, channels_last=args.channels_last, sdpa=args.sdpa)).result()
    size = (args.size, args.size) if args.size else tuple(model.default_size)
    guidance = args.guidance if args.guidance is not None else float(getattr(model, "default_guidance", 7.5))
    try:
        engine = PreviewEngine(worker, store, chunk_size=args.chunk_size, max_seeds=max(counts),
                               preview_decoder=args.preview_decoder, decode_streams=args.decode_streams)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    chunk = engine.chunk_size_for(*size)
    service = RefineService(worker, store)
    per_seeds: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def diffusers_seconds(n: int) -> float | None:
        """diffusers' time, or None with the error kept for the report (one failure must not lose the run)."""
        if pipe is None or "diffusers" in errors:
            return None
        try:
            return worker.submit(lambda m: measure_diffusers(m, pipe, store, n, args.steps, guidance, size)).result()
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            errors["diffusers"] = f"{type(exc).__name__}: {exc}"
            return None

    for n in counts:
        request = PreviewRequest(prompts=[PROMPT], seeds=list(range(n)), steps=args.steps, solver=args.solver,
                                 guidance=guidance, height=size[0], width=size[1])
        for _ in range(args.warmup):
            grid_times(engine, request)
            worker.submit(lambda m: measure_floor(m, store, n, args.steps, guidance, size)).result()
            diffusers_seconds(n)
        worker.submit(lambda m: _reset_peak(m)).result()
        floors, firsts, grids, diff, busy, parts = [], [], [], [], [], []
        for _ in range(args.repeats):
            floors.append(worker.submit(lambda m: measure_floor(m, store, n, args.steps, guidance, size)).result())
            first, wall, where = grid_times(engine, request)
            firsts.append(first)
            grids.append(wall)
            parts.append(where)
            d = diffusers_seconds(n)
            if d is not None:
                diff.append(d)
            if n == args.seeds and not args.no_contention:
                busy.append(_grid_during_refine(service, engine, request, args.refine_steps, size))
        peak = worker.submit(_peak_mib).result()
        grid_s = _median(grids)
        floor_s = _median([f["floor_s"] for f in floors])
        row: dict[str, Any] = {
            "seeds": n, "chunk_size": chunk, "chunks": -(-n // chunk), "padded_rows": -(-n // chunk) * chunk - n,
            "grid_s": grid_s, "first_tile_s": _median(firsts), "floor_s": floor_s,
            "floor_calls_s": _median([f["calls_s"] for f in floors]),
            "decode_batched_s": _median([f["decode_batched_s"] for f in floors]),
            "decode_rows_s": _median([f["decode_rows_s"] for f in floors]),
            "diffusers_s": _median(diff) if diff else None,
            "overhead": round(grid_s / floor_s, 3),
            "vs_diffusers": round(grid_s / statistics.median(diff), 3) if diff else None,
            "first_tile_ratio": round(statistics.median(firsts) / grid_s, 3),
            "grid_parts_ms": {k: round(statistics.median(p[k] for p in parts), 2) for k in parts[0]},
            "peak_gpu_mem_mib": peak,
        }
        if busy:
            row["grid_during_refine_s"] = _median(busy)
            row["contention"] = round(statistics.median(busy) / grid_s, 3)
        per_seeds[str(n)] = row
        logger.info("%d seeds: %s", n, json.dumps(row))  # scripts/gpu_bench.sh greps these lines
    main_row = per_seeds[str(args.seeds)]
    invariant = worker.submit(lambda m: decode_batch_invariant(m, store, min(4, args.seeds), size)).result()
    return {
        "model": model.model_id + (" (random weights)" if args.random_weights else ""), "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if _is_cuda(model) else None,
        "dtype": str(model.dtype).replace("torch.", ""), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "size": list(size), "steps": args.steps, "guidance": guidance,
        "solver": args.solver, "seeds": args.seeds, "chunk_size": chunk, "repeats": args.repeats, "warmup": args.warmup,
        "against": args.against, "speed_settings": applied, "preview_decoder": args.preview_decoder,
        "decode_streams": args.decode_streams,
        "grid_s": main_row["grid_s"], "diffusers_s": main_row["diffusers_s"], "floor_s": main_row["floor_s"],
        "first_tile_s": main_row["first_tile_s"], "vs_diffusers": main_row["vs_diffusers"],
        "overhead": main_row["overhead"], "contention": main_row.get("contention"),
        "peak_gpu_mem_mib": main_row["peak_gpu_mem_mib"],
        "targets": {"vs_diffusers": 1.0, "overhead": 1.15, "first_tile_ratio": 0.6, "contention": 1.3},
        "vae_dtype": str(getattr(getattr(model, "vae", None), "dtype", None)).replace("torch.", ""),
        "decode_batch_invariant": invariant, "png_encode": png_seconds(size),
        "errors": errors or None, "per_seeds": per_seeds,
    }


def _grid_during_refine(service: RefineService, engine: PreviewEngine, request: PreviewRequest, steps: int,
                        size: tuple[int, int]) -> float:
    job = service.refine_new(PROMPT, 10_000, steps=steps, height=size[0], width=size[1])
    while service.progress(job).step < 1:
        time.sleep(0.005)
    _, wall, _ = grid_times(engine, request)
    still_running = service.progress(job).state == "running"
    service.cancel(job)
    service.wait(job)
    if not still_running:
        logger.warning("warning: the refine finished before the grid did; raise --refine-steps")
    return wall


if __name__ == "__main__":
    raise SystemExit(main())
