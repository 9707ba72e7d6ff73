"""``python -m preview``: a grid of few-step previews, written as PNGs with A1111 metadata.

Example::

    python -m preview --prompt "a red circle on a blue background" --seeds 0-7 --steps 4 --out previews/
    python -m preview --model KONTEXT --image in.png --prompt "make the sky purple" --seeds 0-7 --out edits/

Prints one JSON object per image (prompt, seed, steps, solver, path, ids, timings). Without
``--model`` the embedded default model is used and nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from runtime.cli import add_db_option, add_model_options, load_options
from runtime.request import DEFAULT_MAX_SEEDS, DEFAULT_SOLVER, DEFAULT_STEPS, PreviewRequest, parse_seeds
from store.png import read_png_parameters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preview", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--seeds", default="0", help="seeds: '0-7', '1,5,9' or a mix (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"preview steps K, 1..50 (default {DEFAULT_STEPS})")
    p.add_argument("--solver", default=DEFAULT_SOLVER, help="'consistency' (the active checkpoint) or a solver name")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--negative-prompt", default="", help="negative prompt")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", default=None, help="input image of an edit (an editing model such as FLUX.1 Kontext); "
                   "each --prompt is then an instruction")
    p.add_argument("--keep-image-size", action="store_true",
                   help="with --image and no --height/--width: keep the input's size, not the nearest preferred resolution")
    p.add_argument("--chunk-size", type=int, default=None, help="UNet rows per model call (default: measured per device, see preview.batching)")
    p.add_argument("--max-seeds", type=int, default=DEFAULT_MAX_SEEDS)
    p.add_argument("--preview-decoder", default=None,
                   help="a diffusers AutoencoderTiny (TAESD) folder to decode previews with (refines keep the model's VAE)")
    p.add_argument("--decode-streams", type=int, default=1,
                   help="rows decoded at once, each still alone, on their own CUDA streams (default 1: one by one)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    add_model_options(p)
    add_db_option(p)
    return p


def main(argv: Sequence[str] | None = None, *, model: Any = None) -> int:
    """Run the CLI; ``model`` lets tests pass a loaded denoiser instead of ``--model``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from preview.engine import PreviewEngine
    from runtime.worker import start_worker_and_store

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = PreviewRequest(prompts=args.prompt, seeds=seeds, steps=args.steps, solver=args.solver,
                             guidance=args.guidance, height=args.height, width=args.width,
                             negative_prompt=args.negative_prompt, image=args.image,
                             keep_image_size=args.keep_image_size)
    try:
        worker, store = start_worker_and_store(args.model, args.db, model, device=args.device,
                                               options=load_options(args))
    except Exception as exc:  # noqa: BLE001 - one sentence for the user, not a stack trace
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    try:
        try:
            engine = PreviewEngine(worker, store, max_seeds=args.max_seeds, chunk_size=args.chunk_size,
                                   preview_decoder=args.preview_decoder, decode_streams=args.decode_streams)
            results = engine.run(request)  # validates everything before writing anything
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        total = len(request.prompts) * len(seeds)
        for r in tqdm(results, total=total, desc="previews", unit="img", file=sys.stderr):
            path = store.export_png("preview", r.preview_id, out / f"preview-{r.preview_id:06d}-seed{r.seed}.png")
            ran = read_png_parameters(path.read_bytes()).get("Preview solver", r.solver)  # which policy, in words
            print(json.dumps({
                "prompt": r.prompt, "seed": r.seed, "steps": r.steps, "solver": r.solver, "solver_ran": ran,
                "path": str(path),
                "preview_id": r.preview_id, "generation_id": r.generation_id, "checkpoint_id": r.checkpoint_id,
                "guidance": r.guidance, "size": [r.height, r.width],
                **({} if r.input_image_id is None else {"input_image_id": r.input_image_id}),
                "timings_ms": {k: round(v, 2) for k, v in r.timings_ms.items()},
            }), flush=True)
    finally:
        worker.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
