"""Tune the classic solvers as a practitioner would, on a validation split, at equal model calls.

    nice -n 5 python -m training.tune_baselines --prompts models/embedded/validation_prompts.txt \\
        --max-prompts 12 --seeds 2-3 --steps 3-6 --threads 1 --out training/results/tuned_baselines.json

For every family (``ddim``, ``dpmpp2m`` = diffusers' DPMSolverMultistepScheduler, ``unipc``, ``deis``) and every
step count K, a coordinate descent over the options practitioners use, one option at a time from the
registry's default (each value tried with the best found so far, the best kept), in this order (the
options marked * only at K = 4, see :func:`family_axes`):

- timestep spacing: trailing, leading, leading with ``steps_offset=1``, linspace;
- solver order 1-3 (multistep families);
- ``final_sigmas_type`` zero / sigma_min (DPM, UniPC; before the next two, which diffusers cannot run to
  sigma = 0: bh1 and eps-form UniPC, and ``algorithm_type="dpmsolver"``, give non-finite samples there);
- DPM: ``algorithm_type`` dpmsolver++ / dpmsolver*; UniPC: ``solver_type`` bh1 / bh2, ``predict_x0``*;
- ``lower_order_final``*;
- sigma families*: Karras, exponential, and (DPM) lu-lambdas;

``--full-search`` sweeps the starred options at every K and then tries the spacing once more with the
options found (``descend(..., full=True)``). The score is the mean PSNR of the decoded K-step
preview against the decoded 40-step reference of the same (prompt, seed) (refine's full-step sampler),
SSIM as tie-breaker. The references are computed once per (prompt, seed) and reused by every
configuration, which is most of the saving.

Equal model calls only: every configuration above costs one model call per step. Left out, and recorded
under ``left_out`` in the JSON: PLMS (K + 1 calls), single-step DPM-Solver and Heun / KDPM2 (two or more
calls per step), and the SDE variants (``sde-dpmsolver++``: stochastic, not the ODE the preview and its final
share).

The JSON (default ``training/results/tuned_baselines.json``) records the model id and its scheduler
identity, the K range, the validation split, every trial, and ``best``: per family and K the chosen name
(``NAME[key=value,...]``, exactly what ``training.evaluate --solvers`` accepts), plus ``best`` family
``best``: the best family per K. ``tuned:FAMILY`` / ``tuned:best`` in the registry read it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from runtime.cli import add_model_options, model_from_args

logger = logging.getLogger(__name__)

DEFAULT_OUT = "training/results/tuned_baselines.json"
FAMILIES = ("ddim", "dpmpp2m", "unipc", "deis")
SPACINGS: tuple[dict[str, Any], ...] = (
    {},  # the registry's default: trailing
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "linspace"},
)
SPACING_KEYS = ("timestep_spacing", "steps_offset")
SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")


def _axis(key: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    return [{key: v} for v in values]


def family_axes(family: str, k: int | None = None, full: bool = False) -> list[tuple[str, list[dict[str, Any]]]]:
    """The options swept for ``family`` at K = ``k``, in descent order: (axis name, option sets; {} = the default).

    Every K: spacing, solver order, final sigma, UniPC's bh1 / bh2. At K = ``EXTRA_AT`` (the app's default
    preview) also ``algorithm_type``, UniPC's ``predict_x0``, ``lower_order_final`` and the sigma families: on
    the 2-core CPU the full sweep at every K did not fit, and these lose at K = 4 (the issue's own sweep of 125
    configurations found Karras, exponential and lu sigmas and ``lower_order_final=False`` falling apart there).
    ``full``: every option at every K."""
    extra = full or k is None or k == EXTRA_AT
    spacing = ("spacing", list(SPACINGS))
    if family == "ddim":
        return [spacing]
    order = ("solver_order", [{}] + _axis("solver_order", [1, 2, 3]))
    final = ("final_sigmas_type", [{}, {"final_sigmas_type": "sigma_min"}])
    lof = [("lower_order_final", [{}, {"lower_order_final": False}])] if extra else []
    if family == "dpmpp2m":
        return [spacing, order, final] + ([("algorithm_type", [{}, {"algorithm_type": "dpmsolver"}])] if extra else []) \
            + lof + ([("sigmas", [{}] + [{k_: True} for k_ in SIGMA_KEYS])] if extra else [])
    if family == "unipc":
        return [spacing, order, final, ("solver_type", [{}, {"solver_type": "bh1"}])] \
            + ([("predict_x0", [{}, {"predict_x0": False}])] if extra else []) + lof \
            + ([("sigmas", [{}] + [{k_: True} for k_ in SIGMA_KEYS[:2]])] if extra else [])
    if family == "deis":
        return [spacing, order] + lof + ([("sigmas", [{}] + [{k_: True} for k_ in SIGMA_KEYS[:2]])] if extra else [])
    raise ValueError(f"families: unknown family {family!r}; known: {', '.join(FAMILIES)}")


EXTRA_AT = 4


LEFT_OUT = {
    "plms": "PNDMScheduler(skip_prk_steps) repeats its first timestep: K + 1 model calls for K steps",
    "dpm singlestep / heun / kdpm2": "two or more model calls per step",
    "sde-dpmsolver++ / sde-dpmsolver": "stochastic: not the probability-flow ODE the preview and its final share",
}

_KEY_ORDER = ("timestep_spacing", "steps_offset", "algorithm_type", "solver_order", "solver_type", "predict_x0",
              "lower_order_final", "final_sigmas_type", *SIGMA_KEYS)


def config_name(family: str, options: dict[str, Any]) -> str:
    """``family[key=value,...]`` with the options in a fixed order (the plain family name without options)."""
    if not options:
        return family
    keys = sorted(options, key=lambda k: (_KEY_ORDER.index(k) if k in _KEY_ORDER else len(_KEY_ORDER), k))
    text = ",".join(f"{k}={str(options[k]).lower() if isinstance(options[k], bool) else options[k]}" for k in keys)
    return f"{family}[{text}]"


def merge(current: dict[str, Any], axis: str, choice: dict[str, Any]) -> dict[str, Any]:
    """``current`` with the keys of ``axis`` replaced by ``choice``."""
    drop = SPACING_KEYS if axis == "spacing" else SIGMA_KEYS if axis == "sigmas" else tuple(choice) or (axis,)
    return {**{k: v for k, v in current.items() if k not in drop}, **choice}


Scorer = Callable[[str, int], dict[str, float]]  # (name, K) -> {"psnr": ..., "ssim": ...}


def descent_axes(family: str, k: int, full: bool = False) -> list[tuple[str, list[dict[str, Any]]]]:
    """The axes :func:`descend` walks, in order: ``family_axes(family, k, full)``, and with ``full`` the spacing
    once more, with the other options found."""
    axes = family_axes(family, k, full)
    return axes + [axes[0]] if full and len(axes) > 1 else axes


def descend(family: str, k: int, score: Scorer, full: bool = False) -> tuple[str, list[str]]:
    """Coordinate descent over :func:`descent_axes` at K = ``k``; returns (best name, names tried).
    A configuration diffusers refuses, or whose preview is not finite, is skipped (score -inf)."""
    current: dict[str, Any] = {}
    tried: list[str] = []
    for axis, choices in descent_axes(family, k, full):
        best_key, best_opts = None, current
        for choice in choices:
            opts = merge(current, axis, choice)
            name = config_name(family, opts)
            tried.append(name)
            s = score(name, k)
            key = (s["psnr"], s["ssim"])
            if best_key is None or key > best_key:
                best_key, best_opts = key, opts
        current = best_opts
    return config_name(family, current), list(dict.fromkeys(tried))


class ValidationScorer:
    """Scores solver names on fixed (prompt, seed) pairs against their cached 40-step references."""

    def __init__(self, model: Any, prompts: Sequence[str], seeds: Sequence[int], guidance: float | None = None,
                 reference_steps: int = 40, batch_size: int = 48, negative_prompt: str = "",
                 cache: str | None = None) -> None:
        from refine.full_step import check_full_steps, sample_full_step
        from store.noise import make_noise

        self.model = model
        self.guidance = float(getattr(model, "default_guidance", 5.0)) if guidance is None else float(guidance)
        shape = model.latent_shape(*model.default_size)
        pairs = [(p, s) for p in prompts for s in seeds]
        chunks = [pairs[i: i + batch_size] for i in range(0, len(pairs), batch_size)]
        self.conds = [model.encode_prompts([p for p, _ in c], negative_prompt) for c in chunks]
        self.noises = [torch.stack([make_noise(s, shape) for _, s in c]) for c in chunks]
        steps = check_full_steps(reference_steps, "reference_steps")
        start = time.perf_counter()
        self.reference = self._cached_reference(cache, pairs, steps) if cache else None
        if self.reference is None:
            with torch.no_grad():
                self.reference = torch.cat([model.decode(sample_full_step(model, c, n.to(model.device), self.guidance,
                                                                          steps)).float().cpu()
                                            for c, n in zip(self.conds, self.noises)])
            if cache:
                from safetensors.torch import save_file

                Path(cache).parent.mkdir(parents=True, exist_ok=True)
                save_file({"reference": self.reference.contiguous()}, cache, metadata={"key": self._key(pairs, steps)})
        self.reference_seconds = time.perf_counter() - start
        self.num_pairs = len(pairs)
        self.cache: dict[tuple[str, int], dict[str, float]] = {}
        self.calls = 0

    def _key(self, pairs: Sequence[tuple[str, int]], steps: int) -> str:
        return json.dumps({"model": self.model.model_id, "guidance": self.guidance, "steps": steps,
                           "pairs": [list(p) for p in pairs]})

    def _cached_reference(self, cache: str, pairs: Sequence[tuple[str, int]], steps: int) -> torch.Tensor | None:
        """The decoded references saved at ``cache`` (safetensors) for these pairs (or a run whose pairs begin
        with them), model, guidance and reference steps."""
        from safetensors import safe_open

        if not Path(cache).is_file():
            return None
        with safe_open(cache, "pt") as f:
            try:
                saved = json.loads((f.metadata() or {}).get("key", ""))
            except json.JSONDecodeError:
                return None
            want = json.loads(self._key(pairs, steps))
            if {k: saved.get(k) for k in ("model", "guidance", "steps")} != {k: want[k] for k in ("model", "guidance", "steps")}:
                return None
            if saved.get("pairs", [])[: len(pairs)] != want["pairs"]:
                return None
            return f.get_tensor("reference")[: len(pairs)].clone()

    def __call__(self, name: str, k: int) -> dict[str, float]:
        key = (name, k)
        if key not in self.cache:
            self.cache[key] = self._score(name, k)
            logger.info("K=%d %-90s psnr %.3f ssim %.4f", k, name, self.cache[key]["psnr"], self.cache[key]["ssim"])
        return self.cache[key]

    @torch.no_grad()
    def _score(self, name: str, k: int) -> dict[str, float]:
        from solver.registry import get_solver
        from training.rewards import PIXEL_MEASURES

        bad = {"psnr": -math.inf, "ssim": -math.inf, "error": ""}
        try:
            solver = get_solver(name, self.model.scheduler_config)
            if hasattr(solver, "make_scheduler"):
                solver.make_scheduler().set_timesteps(k)
        except (ValueError, NotImplementedError) as exc:
            return {**bad, "error": str(exc)}
        if solver.nfe(k) != k:
            return {**bad, "error": f"{solver.nfe(k)} model calls for {k} steps"}
        images = []
        try:
            for cond, noise in zip(self.conds, self.noises):
                eps = lambda x, t, cond=cond: self.model.guided_eps(x, t, cond, self.guidance)  # noqa: E731
                images.append(self.model.decode(solver.sample(eps, noise.to(self.model.device), k)).float().cpu())
                self.calls += k
        except (ValueError, IndexError, RuntimeError) as exc:
            return {**bad, "error": str(exc)}
        previews = torch.cat(images)
        if not bool(torch.isfinite(previews).all()):
            return {**bad, "error": "non-finite preview"}
        return {m: round(float(PIXEL_MEASURES[m][0](self.reference, previews).mean()), 4) for m in ("psnr", "ssim")}


def tune(score: Scorer, steps: Sequence[int], families: Sequence[str] = FAMILIES,
         on_step: Callable[[dict[str, Any]], None] | None = None, full: bool = False) -> dict[str, Any]:
    """``best`` ({family: {K: {"name", "psnr", "ssim"}}}, with family ``best`` the best family per K) and every
    trial; ``on_step`` gets the partial result after each K (to write it as it goes); ``full``: see
    :func:`descend`."""
    best: dict[str, dict[str, Any]] = {f: {} for f in families}
    best["best"] = {}
    trials: list[dict[str, Any]] = []
    done: list[int] = []
    for k in steps:
        for family in families:
            name, tried = descend(family, k, score, full)
            for t in tried:
                trials.append({"family": family, "steps": k, "name": t, **score(t, k)})
            best[family][str(k)] = {"name": name, **score(name, k)}
        top = max(families, key=lambda f: (best[f][str(k)]["psnr"], best[f][str(k)]["ssim"]))
        best["best"][str(k)] = {"family": top, **best[top][str(k)]}
        done.append(k)
        if on_step is not None:
            on_step({"steps": list(done), "best": {f: dict(v) for f, v in best.items()}, "trials": list(trials)})
    return {"steps": list(done), "best": best, "trials": trials}


def merge_files(paths: Sequence[str]) -> dict[str, Any]:
    """One tuned document from several with the same model, scheduler, validation split and families, over
    disjoint K (each a complete ``training.tune_baselines`` run); anything else is one ValueError naming it."""
    from solver.registry import read_tuned

    docs = [read_tuned(p) for p in paths]
    if not docs:
        raise ValueError("merge: no files")
    first = docs[0]
    for path, doc in zip(paths[1:], docs[1:]):
        for key in ("model", "scheduler", "validation"):
            if doc.get(key) != first.get(key):
                raise ValueError(f"merge: {path!r} differs from {paths[0]!r} in {key!r}")
        if set(doc["best"]) != set(first["best"]):
            raise ValueError(f"merge: {path!r} tunes families {sorted(doc['best'])}, {paths[0]!r} {sorted(first['best'])}")
    steps = [k for d in docs for k in d["steps"]]
    if len(set(steps)) != len(steps):
        raise ValueError(f"merge: K = {steps} overlap")
    merged = {key: first[key] for key in first if key not in ("steps", "best", "trials", "seconds", "model_calls",
                                                                 "command", "search")}
    merged["steps"] = sorted(steps)
    merged["best"] = {f: {k: v for d in docs for k, v in d["best"][f].items()} for f in first["best"]}
    merged["trials"] = [t for d in docs for t in d["trials"]]
    merged["search"] = {f: {k: v for d in docs for k, v in d.get("search", {}).get(f, {}).items()} for f in first["best"]}
    merged["seconds"] = [d.get("seconds") for d in docs]
    merged["model_calls"] = sum(d.get("model_calls", 0) for d in docs)
    merged["command"] = [d.get("command") for d in docs]
    return merged


def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    from training.config import MAX_PREVIEW_STEPS
    from training.dataset import parse_int_list, read_prompts

    parser = argparse.ArgumentParser(prog="python -m training.tune_baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", default="models/embedded/validation_prompts.txt",
                        help="validation prompts (never the held-out file)")
    parser.add_argument("--max-prompts", type=int, default=12, help="the first N prompts of the file")
    parser.add_argument("--seeds", default="2-3")
    parser.add_argument("--steps", default="3-6", help=f"step counts K, each in 1..{MAX_PREVIEW_STEPS}")
    parser.add_argument("--families", default=",".join(FAMILIES))
    add_model_options(parser)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--reference-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-search", action="store_true",
                        help="every option at every K (not only at K = 4), then the spacing once more")
    parser.add_argument("--merge", default="",
                        help="instead of tuning: merge these tuned files (FILE,FILE,...: the same model, validation "
                             "split and families, disjoint K, e.g. K = 3,4 and K = 5,6 tuned side by side) into --out")
    parser.add_argument("--score", default="",
                        help="instead of tuning: score these solver names (e.g. two policies, consistency:DIR,...) on "
                             "the same validation pairs and print PSNR / SSIM per K (to choose between policies on "
                             "validation, never on the held-out file)")
    parser.add_argument("--reference-cache", default="runs/tune_baselines/references.safetensors",
                        help="decoded 40-step references, reused when prompts, seeds, model and guidance match ('' = none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        merged = merge_files([f.strip() for f in args.merge.split(",") if f.strip()])
        Path(args.out).write_text(json.dumps(merged, indent=1))
        print(json.dumps({"out": args.out, "steps": merged["steps"]}))
        return 0
    if "heldout" in Path(args.prompts).name:
        raise ValueError(f"prompts: {args.prompts!r} is the held-out file; tune on a validation split")
    prompts = read_prompts(args.prompts, args.max_prompts)
    seeds = parse_int_list(args.seeds, "seeds", 0, 2**32 - 1)
    steps = parse_int_list(args.steps, "steps", 1, MAX_PREVIEW_STEPS)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        family_axes(f)  # unknown family: one error, before the model is loaded
    if args.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {args.batch_size}")
    if model is None:
        model = model_from_args(args)
    from solver.registry import scheduler_identity

    t0 = time.perf_counter()
    scorer = ValidationScorer(model, prompts, seeds, reference_steps=args.reference_steps, batch_size=args.batch_size,
                              cache=args.reference_cache or None)
    if args.score:
        from solver.registry import split_solver_list

        scores = {name: {str(k): scorer(name, k) for k in steps} for name in split_solver_list(args.score)}
        for name, per_k in scores.items():
            means = {m: sum(v[m] for v in per_k.values()) / len(per_k) for m in ("psnr", "ssim")}
            print(json.dumps({"solver": name, "per_k": per_k, "mean": means}))
        return 0
    out = Path(args.out)
    header = {
        "model": model.model_id,
        "scheduler": scheduler_identity(model.scheduler_config),
        "validation": {"prompts": str(args.prompts), "num_prompts": len(prompts), "seeds": seeds,
                       "pairs": scorer.num_pairs, "reference_steps": args.reference_steps,
                       "score": "mean PSNR of decoded previews to the 40-step reference (SSIM breaks ties)"},
        "search": {f: {str(k): [axis for axis, _ in descent_axes(f, k, args.full_search)] for k in steps}
                   for f in families},
        "left_out": LEFT_OUT,
        "command": "python -m training.tune_baselines " + shlex.join(sys.argv[1:] if argv is None else argv),
    }

    def write(partial: dict[str, Any]) -> None:
        doc = {**header, **partial, "seconds": round(time.perf_counter() - t0, 1), "model_calls": scorer.calls}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)

    result = tune(scorer, steps, families, on_step=write, full=args.full_search)
    write(result)
    for k in result["steps"]:
        row = " | ".join(f"{f} {result['best'][f][str(k)]['psnr']:.2f}" for f in families)
        print(f"K={k}: {row} | best {result['best']['best'][str(k)]['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
