"""``python -m preview.bench``: what an 8-seed preview grid costs, against the least it could cost.

1. **Overhead.** Wall time of an 8-seed grid at K = 4 (validate, noise from the store, encode,
   K solver steps, decode, PNG + store writes, results yielded), over the floor: K times ONE batched
   guided model call for the same 8 rows, measured on the same worker in the same run.
   Target: <= 1.15.
2. **Contention.** The same grid's latency while a full-step refine runs on the same worker, over
   its idle latency. A preview waits for at most one refine step. Target: <= 1.3.

Medians over ``--repeats`` rounds; each round measures floor, idle grid, busy grid, floor again,
so drifting background load hits all of them alike (on a shared CPU expect +-5 % between runs). A temporary store is used unless ``--db`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from preview.batching import default_chunk_size, pad_conditioning, pad_rows
from preview.engine import PreviewEngine, encode_each
from refine.jobs import RefineService
from runtime.cli import add_db_option, add_model_options, model_from_args
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker

PROMPT = "a red circle on a blue background"


def measure_floor(worker: DeviceWorker, request: PreviewRequest, chunk: int) -> float:
    """Seconds of K batched guided model calls on the grid's rows (the same padded chunk the engine runs).

    Inputs are prepared and one call is run untimed first, so the floor is the bare cost of the K
    calls with warm caches: the strictest reference for the overhead ratio.
    """

    def run(model) -> float:
        h, w = request.height or model.default_size[0], request.width or model.default_size[1]
        cond = pad_conditioning(encode_each(model, [PROMPT] * len(request.seeds), request.negative_prompt), chunk)
        x = pad_rows(torch.randn(len(request.seeds), *model.latent_shape(h, w)), chunk).to(model.device)
        g = request.guidance if request.guidance is not None else getattr(model, "default_guidance", 5.0)
        ts = model.schedule.timesteps(request.steps)
        model.guided_eps(x, ts[0], cond, g)  # untimed: warm caches after the text encoder ran
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        for t in ts:
            model.guided_eps(x, t, cond, g)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - t0

    return worker.submit(run).result()


def embedded_random_weights():
    """The embedded model's exact architecture and text encoder, UNet weights random (seed 0)."""
    from models.embedded.config import PATCH, SCHEDULER_CONFIG, UNET_CONFIG
    from models.embedded.model import EmbeddedDenoiser
    from models.embedded.network import PatchUNet
    from models.embedded.text import TextEncoder

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return EmbeddedDenoiser(PatchUNet(UNET_CONFIG, PATCH), TextEncoder(device), SCHEDULER_CONFIG, device)


def grid_seconds(engine: PreviewEngine, request: PreviewRequest, parts: list | None = None) -> float:
    """Wall seconds from the request to the last stored preview; ``parts`` gets (queue wait, device) seconds."""
    t0 = time.perf_counter()
    results = list(engine.run(request))
    wall = time.perf_counter() - t0
    assert len(results) == len(request.seeds)
    if parts is not None:
        t = results[-1].timings_ms
        parts.append(((t["latency"] - t["device"]) / 1e3, t["device"] / 1e3))
    return wall


def _median(parts: list, k: int) -> float:
    return round(statistics.median(p[k] for p in parts), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preview.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--solver", default="consistency")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--refine-steps", type=int, default=200, help="steps of the background refine")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_model_options(p)
    add_db_option(p, help="SQLite store file (default: a temporary one)")
    p.add_argument("--random-weights", action="store_true",
                   help="the embedded architecture with random weights (same cost; before the weights are trained)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from store import open_store

    tmp = tempfile.TemporaryDirectory()
    store = open_store(args.db or Path(tmp.name) / "bench.db")
    factory = embedded_random_weights if args.random_weights else (lambda: model_from_args(args))
    worker = DeviceWorker(factory=factory, name="device")
    model = worker.wait_ready()
    request = PreviewRequest(prompts=[PROMPT], seeds=list(range(args.seeds)), steps=args.steps, solver=args.solver)
    h, w = model.default_size
    chunk = default_chunk_size(model, h, w)
    if chunk < args.seeds:
        print(f"note: chunk size {chunk} < {args.seeds} seeds on this device; the floor is one call per chunk", file=sys.stderr)
        chunk_floor_calls = -(-args.seeds // chunk)
    else:
        chunk_floor_calls = 1
    engine = PreviewEngine(worker, store, chunk_size=chunk)
    service = RefineService(worker, store)

    grid_seconds(engine, request)  # warm-up: encoder cache, kernels, noise rows
    measure_floor(worker, request, chunk)
    floors: list[float] = []
    idle: list[float] = []
    busy: list[float] = []
    idle_parts: list[tuple[float, float]] = []
    busy_parts: list[tuple[float, float]] = []
    for _ in tqdm(range(args.repeats), desc="bench rounds", file=sys.stderr):
        floors.append(measure_floor(worker, request, chunk) * chunk_floor_calls)
        idle.append(grid_seconds(engine, request, idle_parts))
        job = service.refine_new(PROMPT, 10_000, steps=args.refine_steps)
        while service.progress(job).step < 1:
            time.sleep(0.005)
        busy.append(grid_seconds(engine, request, busy_parts))
        still_running = service.progress(job).state == "running"
        service.cancel(job)
        service.wait(job)
        if not still_running:
            print("warning: the refine finished before the grid did; raise --refine-steps", file=sys.stderr)
        floors.append(measure_floor(worker, request, chunk) * chunk_floor_calls)  # before and after: drift cancels
    worker.close()
    store.close()

    floor, t_idle, t_busy = statistics.median(floors), statistics.median(idle), statistics.median(busy)
    report = {
        "model": model.model_id + (" (random weights)" if args.random_weights else ""), "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "seeds": args.seeds, "steps": args.steps, "solver": args.solver,
        "chunk_size": chunk, "repeats": args.repeats,
        "floor_s": round(floor, 4), "grid_idle_s": round(t_idle, 4), "grid_during_refine_s": round(t_busy, 4),
        "overhead_ratio": round(t_idle / floor, 3), "overhead_target": 1.15,
        "contention_ratio": round(t_busy / t_idle, 3), "contention_target": 1.3,
        "queue_wait_s": {"idle": _median(idle_parts, 0), "during_refine": _median(busy_parts, 0)},
        "device_s": {"idle": _median(idle_parts, 1), "during_refine": _median(busy_parts, 1)},
    }
    print(f"grid of {args.seeds} seeds at K={args.steps}: {t_idle:.3f} s, floor (K x one batched guided call) "
          f"{floor:.3f} s -> overhead ratio {t_idle / floor:.3f} (target <= 1.15)")
    print(f"same grid while a refine runs: {t_busy:.3f} s -> latency over idle {t_busy / t_idle:.3f} (target <= 1.3)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
