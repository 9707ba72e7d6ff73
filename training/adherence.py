"""Prompt adherence of the full-step images, by prompt category, and of given prompts.

    python -m training.adherence --per-category 16 --seeds 0-1 --threads 2
    python -m training.adherence --prompt "a crimson disc on a navy field" --seeds 0-7

Renders each prompt at each seed with refine's full-step sampler (``refine.full_step``, 40 steps, the
model's default guidance, the store's per-seed noise) and scores it with
:func:`models.embedded.adherence.adherence_mismatches`: the scene analyzer's verdict (main colour, main
shape, background) and the main object's position and count. Per category (``models.embedded.adherence
.CATEGORIES``) it prints the share of images right in every field the prompt names, each check's own
pass rate and, for categories the grammar renders, the same checks on the rendered scenes (how often the
checks pass on a perfect image). With ``--prompt`` it prints, per prompt, how many seeds are right and
what the wrong ones show. Embedded model only (the analyzer reads its scene domain).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from training.dataset import parse_int_list


def render_full_step(model: Any, prompts: Sequence[str], seeds: Sequence[int], num_steps: int,
                     batch_size: int = 32) -> torch.Tensor:
    """Full-step images (N, 3, H, W) in [0, 1] of every (prompt, seed) pair, prompt-major."""
    from refine.full_step import sample_full_step
    from store.noise import make_noise

    guidance = float(model.default_guidance)
    shape = model.latent_shape(*model.default_size)
    pairs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        cond = model.encode_prompts([p for p, _ in chunk])
        noise = torch.stack([make_noise(s, shape) for _, s in chunk]).to(model.device)
        images.append(model.decode(sample_full_step(model, cond, noise, guidance, num_steps)).float().cpu())
    return torch.cat(images)


def _fields(mismatches: Sequence[str]) -> set[str]:
    return {m.split(":")[0] for m in mismatches}


def category_table(model: Any, per_category: int, seeds: Sequence[int], num_steps: int, grammar: str,
                   prompt_seed: int = 0) -> list[dict[str, Any]]:
    """One row per category: pairs scored, % right in every field, % right per field the prompts name,
    and % of the rendered scenes (where the grammar has them) the checks pass."""
    from models.embedded.adherence import CATEGORIES, adherence_mismatches, category_prompts
    from models.embedded.scenes import render

    rows = []
    for category in CATEGORIES:
        items = category_prompts(category, per_category, prompt_seed, grammar)
        prompts = [t for t, _ in items]
        images = render_full_step(model, prompts, seeds, num_steps)
        found = [_fields(adherence_mismatches(img, prompts[i // len(seeds)])) for i, img in enumerate(images)]
        row: dict[str, Any] = {"category": category.name, "in_grammar": category.in_grammar, "pairs": len(found),
                               "example": prompts[0], "right": 100.0 * sum(not f for f in found) / len(found)}
        fields = ["main_colour", "main_shape"] + ["background"] * category.background
        fields += ["position"] * category.position + ["count"] * category.count
        for field in fields:
            row[field] = 100.0 * sum(field not in f for f in found) / len(found)
        scenes = [(t, s) for t, s in items if s is not None]
        if scenes:
            row["rendered_scenes_right"] = 100.0 * sum(not adherence_mismatches(render(s), t) for t, s in scenes) / len(scenes)
        rows.append(row)
    return rows


def prompt_rows(model: Any, prompts: Sequence[str], seeds: Sequence[int], num_steps: int) -> list[dict[str, Any]]:
    """Per prompt: seeds right out of seeds scored, and the mismatches of the wrong ones."""
    from models.embedded.adherence import adherence_mismatches

    images = render_full_step(model, prompts, seeds, num_steps)
    rows = []
    for j, prompt in enumerate(prompts):
        wrong = {}
        for i, seed in enumerate(seeds):
            m = adherence_mismatches(images[j * len(seeds) + i], prompt)
            if m:
                wrong[seed] = list(m)
        rows.append({"prompt": prompt, "right": len(seeds) - len(wrong), "seeds": len(seeds), "wrong": wrong})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    if "category" not in rows[0]:
        return "\n".join(["| prompt | right / seeds | wrong |", "|---|---|---|"] + [
            f"| {r['prompt']} | {r['right']} / {r['seeds']} | "
            + "; ".join(f"seed {s}: {', '.join(m)}" for s, m in r["wrong"].items()) + " |" for r in rows])
    cols = ["main_colour", "main_shape", "background", "position", "count"]
    lines = ["| category | in training grammar | pairs | all right % | " + " | ".join(f"{c} %" for c in cols)
             + " | checks on rendered scenes % | example |", "|" + "---|" * (len(cols) + 6)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if c in r else "-" for c in cols]
        truth = f"{r['rendered_scenes_right']:.1f}" if "rendered_scenes_right" in r else "-"
        lines.append(f"| {r['category']} | {'yes' if r['in_grammar'] else 'no'} | {r['pairs']} | {r['right']:.1f} | "
                     + " | ".join(cells) + f" | {truth} | {r['example']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.adherence", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", action="append", default=[], help="score this prompt (repeatable) instead of the categories")
    parser.add_argument("--per-category", type=int, default=16, help="prompts per category")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the category prompts")
    parser.add_argument("--grammar", default="train", help="'train' or 'heldout' combinations and templates")
    parser.add_argument("--seeds", default="0-1", help="noise seeds per prompt")
    parser.add_argument("--steps", type=int, default=40, help="full-step sampler steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {args.per_category}")
    if args.grammar not in ("train", "heldout"):
        raise ValueError(f"grammar must be 'train' or 'heldout', got {args.grammar!r}")
    seeds = parse_int_list(args.seeds, "seeds", 0, 2**32 - 1)
    from refine.full_step import check_full_steps

    check_full_steps(args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.registry import load_model

    model = load_model(None)
    if args.prompt:
        rows = prompt_rows(model, args.prompt, seeds, args.steps)
    else:
        rows = category_table(model, args.per_category, seeds, args.steps, args.grammar, args.prompt_seed)
    print(markdown(rows))
    if args.json_out:
        command = "python -m training.adherence " + shlex.join(sys.argv[1:] if argv is None else argv)
        Path(args.json_out).write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
