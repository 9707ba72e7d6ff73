"""``python -m refine``: a full-step image, fresh or from a stored preview, written as a PNG.

Examples::

    python -m refine --prompt "a red circle on a blue background" --seed 3 --steps 40 --out finals/
    python -m refine --preview-id 12 --out finals/
    python -m refine --model KONTEXT --image in.png --prompt "make the sky purple" --seed 3 --out finals/

Prints one JSON object (prompt, seed, steps, solver, path, ids, and for a preview its consistency
with the final). The job goes through the store's queue like the app's, and this process claims and
runs its own job only: other queued jobs of the same database stay queued for their own processes.
Stopped mid-job (Ctrl-C), the job is queued again (``interrupted``, restarts + 1). Without
``--model`` the embedded default model is used, with no network.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from refine.full_step import DEFAULT_STEPS, MAX_STEPS
from runtime.cli import add_db_option, add_model_options, load_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refine", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt of a fresh full-step image (with --seed)")
    what.add_argument("--preview-id", type=int, help="refine this stored preview")
    p.add_argument("--seed", type=int, help="seed of a fresh image")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"full steps, 1..{MAX_STEPS} (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", default=None, help="input image of a fresh edit (an editing model such as FLUX.1 Kontext)")
    p.add_argument("--keep-image-size", action="store_true",
                   help="with --image and no --height/--width: keep the input's size, not the nearest preferred resolution")
    p.add_argument("--out", required=True, help="folder for the PNG file")
    add_model_options(p)
    add_db_option(p)
    return p


def main(argv: Sequence[str] | None = None, *, model: Any = None) -> int:
    """Run the CLI; ``model`` lets tests pass a loaded denoiser instead of ``--model``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and args.seed is None:
        parser.error("--seed is required with --prompt")
    if args.image is not None and args.preview_id is not None:
        parser.error("--image is for a fresh edit (--prompt); a preview is refined with its own stored input image")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from refine.jobs import FINISHED, RefineService
    from runtime.worker import start_worker_and_store

    try:
        worker, store = start_worker_and_store(args.model, args.db, model, device=args.device,
                                               options=load_options(args))
    except Exception as exc:  # noqa: BLE001 - one sentence for the user, not a stack trace
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        service = RefineService(worker, store)
        try:
            if args.preview_id is not None:
                job_id = service.refine_preview(args.preview_id, args.steps)
            else:
                job_id = service.refine_new(args.prompt, args.seed, negative_prompt=args.negative_prompt,
                                            guidance=args.guidance, height=args.height, width=args.width,
                                            steps=args.steps, image=args.image, keep_image_size=args.keep_image_size)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        with tqdm(total=args.steps, desc=f"refine job {job_id}", unit="step", file=sys.stderr) as bar:
            while (p := service.progress(job_id)).state not in FINISHED:
                if p.state == "queued" and worker.pending == 0:
                    service.dispatch(job_id)  # another process claimed it, then was shut down: claim it again
                bar.update(p.step - bar.n)
                time.sleep(0.05)
            bar.update(p.step - bar.n)
        p = service.wait(job_id)  # also waits for the consistency row stored right after 'done'
        if p.state != "done":
            print(f"error: refine job {job_id} ended {p.state}" + (f": {p.error}" if p.error else ""), file=sys.stderr)
            return 1
        assert p.final_id is not None  # a done job always has its final (same transaction)
        job = store.get_job(job_id)
        generation = store.get_generation(job.generation_id)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = store.export_png("final", p.final_id, out / f"final-{p.final_id:06d}-seed{generation.seed}.png")
        record: dict[str, Any] = {
            "prompt": generation.prompt, "seed": generation.seed, "steps": job.steps, "solver": job.solver,
            "path": str(path), "job_id": job_id, "final_id": p.final_id, "preview_id": job.preview_id,
            "restarts": p.restarts,
        }
        if generation.input_image_id is not None:
            record["input_image_id"] = generation.input_image_id
        if job.preview_id is not None:
            rows = store.list_consistency(preview_id=job.preview_id, final_id=p.final_id)
            if rows:
                psnr = rows[0].psnr
                record["consistency"] = {"psnr": psnr if psnr is None or psnr != float("inf") else "inf",
                                         "ssim": rows[0].ssim, **rows[0].metrics}
        print(json.dumps(record), flush=True)
    finally:
        worker.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
