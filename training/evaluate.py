"""Evaluation: few-step previews of every solver against the full-step reference of the same prompt and noise.

    python -m training.evaluate --prompts FILE --seeds 0-3 --steps 3,4,5,6,8 \\
        --solvers consistency,ddim,dpmpp2m,unipc,deis,ipndm [--model M] --json OUT [--plot PNG]
    python -m training.evaluate --model KONTEXT_DIR --images FOLDER --instructions FILE --seeds 0-3 \\
        --steps 3,4,5,6,8 --solvers consistency,dpm2m,euler --json OUT [--plot PNG] [--keep-image-size]

An editing model (FLUX.1 Kontext) is evaluated on (input image, instruction, seed) pairs: every image of
the folder (``training.dataset.read_image_folder``: the app's rules, equal files once) x every instruction
x every seed, each preview and reference conditioned on its image, all at one output size (as an editing
dataset: ``--height/--width`` or ``model.default_size_for``, the same for every image). The JSON then also
lists the images and the pairs. ``--dataset DIR`` (instead of ``--prompts``) evaluates on a built dataset,
text-to-image or editing: its rows are the pairs, its stored full-step targets the references::

    python -m training.evaluate --model KONTEXT_DIR --dataset runs/edit-data --steps 3,4,6 \\
        --solvers consistency,dpm2m,euler --json OUT

For each solver and step count K: PSNR, SSIM and the structure measure (GMS) to the reference, the
model-based measures whose weights were given (``--reward-weights depth=DIR,...``), and the NFE the
solver actually used. On the embedded model also the scene analyzer's prompt adherence and the verdict
agreement (the fraction of (prompt, seed) pairs whose preview verdict equals the final's verdict), with
``verdict_flips``: how many pairs flipped each way (``lost``: the final is right and the preview wrong;
``gained``: the reverse) and, among them, how often each field the analyzer reads (main colour, main
shape, background) differed between preview and final. Verdict agreement is a count over a few hundred
pairs, so each ConsistencySolver row also carries ``verdict_paired``: against each baseline at the same K,
the pairs only ours gets right (agrees with the final), the pairs only the baseline gets right, and the
exact two-sided McNemar p-value of that split (a difference of a few pairs is within noise).
The reference is refine's full-step sampler (``refine.full_step``). ``consistency`` is the solver the
engine would use for the loaded model (the store's active checkpoint for it, else the one shipped for
it, else the zero-initialised policy); ``consistency:PATH`` a given checkpoint (refused across schedule
families). A policy with a learned time grid is also evaluated
on the fixed grid (``<name>@fixed-grid``).

Summary (in the JSON and on stdout): per solver the smallest K whose adherence is within 2 points of
the reference images', and the step saving K': the smallest K at which the best baseline matches
ConsistencySolver at K = 4 (per measure).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from runtime.cli import add_db_option, add_model_options
from training.config import MAX_PREVIEW_STEPS
from training.dataset import (
    InputImages,
    OfflineDataset,
    check_images_for_model,
    condition_on_images,
    edit_size,
    images_from_args,
    parse_int_list,
    read_prompts,
)

logger = logging.getLogger(__name__)

PIXEL_MEASURES = ("psnr", "ssim", "gms")
MODEL_MEASURES = ("depth", "depth_aligned", "dino", "clip", "segformer")
ADHERENCE_TOLERANCE = 2.0  # points (percent)
STEP_SAVING_AT = 4


@dataclass
class NamedSolver:
    name: str
    solver: Any
    is_consistency: bool


def parse_solvers(text: str, tuned_file: str | None = None) -> list[str]:
    """Comma list of solver-registry names (``consistency[:PATH]``, ``rule:*``, baselines, baselines with
    options ``NAME[key=value,...]`` whose commas do not split, ``tuned:FAMILY``); ``tuned`` expands to
    ``tuned:best`` (the best tuned baseline at each K, the comparison row) and ``tuned:FAMILY`` for every
    family of the tuned file. Every name is checked here, before any model is loaded."""
    from solver.registry import TUNED_PREFIX, check_name, read_tuned, split_solver_list

    names = split_solver_list(text)
    if not names:
        raise ValueError("solvers: empty list")
    expanded: list[str] = []
    for name in names:
        if name == "tuned":
            expanded += [TUNED_PREFIX + f for f in read_tuned(tuned_file)["best"]]
        else:
            try:
                expanded.append(check_name(name))
            except ValueError as exc:
                raise ValueError(f"solvers: {exc}") from None
    if len(set(expanded)) != len(expanded):
        raise ValueError(f"solvers: repeated names in {text!r}")
    return expanded


def resolve_solvers(names: Sequence[str], model: Any, store: Any = None, tuned_file: str | None = None,
                    steps: Sequence[int] = (), fixed_grid: bool = True,
                    size: tuple[int, int] | None = None) -> list[NamedSolver]:
    """Solver objects for ``names``; checkpoints are loaded (and checked) here, before any sampling, and so
    is the tuned file of ``tuned:*`` names (its model and K range against ``model`` and ``steps``).
    ``size``: the images' (height, width) where the time grid depends on it (``Denoiser.scheduler_config_for``)."""
    from solver.registry import LMMSolver, get_solver
    from solver.schedules import schedule_from_config

    config = model.scheduler_config if size is None else model.scheduler_config_for(*size)
    out = []
    for name in names:
        policy = None
        if name.startswith("tuned:"):
            from solver.registry import check_tuned, read_tuned, tuned_solver

            check_tuned(read_tuned(tuned_file), model.model_id, steps, model.scheduler_config)
            out.append(NamedSolver(name, tuned_solver(name, config, tuned_file, model.model_id), False))
            continue
        if name == "consistency":
            from preview.solvers import resolve_policy

            policy, description, _ = resolve_policy(store, model)
            logger.info("consistency = %s", description)
        elif name.startswith("consistency:"):
            from preview.solvers import resolve_path_policy

            policy, description = resolve_path_policy(name.split(":", 1)[1], model)
            logger.info("%s = %s", name, description)
        if policy is None:
            out.append(NamedSolver(name, get_solver(name, config), False))
            continue
        policy.eval()
        out.append(NamedSolver(name, get_solver("consistency", config, policy=policy), True))
        if policy.learn_time_grid and fixed_grid:
            schedule = schedule_from_config(config)
            fixed = LMMSolver(name=f"{name}@fixed-grid", schedule=schedule, table_fn=policy.coefficient_table,
                              grid_fn=lambda k, policy=policy, schedule=schedule: policy.default_grid(schedule, k))
            out.append(NamedSolver(fixed.name, fixed, True))
    return out


Judge = Callable[[torch.Tensor, Sequence[str]], Any]  # -> (B,) bool, or ((B,) bool, B readings {field: value})
VERDICT_FIELDS = ("main_colour", "main_shape", "background")  # what the scene analyzer reads


def load_judge(model: Any) -> Judge | None:
    """The embedded model's scene analyzer as judge(images (B,3,H,W) in [0,1], prompts) -> ((B,) bool,
    readings): ``ok`` per image and, per image, what it read ({field: value} for :data:`VERDICT_FIELDS`).

    None for other models (the analyzer only understands the embedded model's scenes).
    """
    from models.embedded import is_embedded

    if not is_embedded(model):
        return None
    from models.embedded import analyzer  # the scene analyzer of the embedded-model issue

    return analyzer_judge(analyzer)


def analyzer_judge(analyzer: Any) -> Judge:
    """Batch wrapper of ``analyzer.judge(image, prompt) -> Verdict`` (``.ok`` = right for its prompt,
    ``.found`` = what it read)."""
    def judge(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        verdicts = [analyzer.judge(img, p) for img, p in zip(images, prompts)]
        return (torch.tensor([bool(v.ok) for v in verdicts]),
                [{f: getattr(v.found, f) for f in VERDICT_FIELDS} for v in verdicts])

    return judge


def _verdicts(out: Any) -> tuple[torch.Tensor, list[dict[str, Any]] | None]:
    """A judge's answer as (ok (B,) bool, readings or None)."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def verdict_flips(ref_ok: torch.Tensor, ok: torch.Tensor, ref_readings: list[dict[str, Any]] | None,
                  readings: list[dict[str, Any]] | None) -> dict[str, int]:
    """Pairs whose preview verdict differs from the final's: ``lost`` (final right, preview wrong),
    ``gained`` (the reverse) and, with readings, per field how many of those pairs read it differently."""
    flipped = ref_ok != ok
    out = {"lost": int((flipped & ref_ok).sum()), "gained": int((flipped & ~ref_ok).sum())}
    if ref_readings is not None and readings is not None:
        pairs = torch.nonzero(flipped).flatten().tolist()
        for f in VERDICT_FIELDS:
            out[f] = sum(ref_readings[i][f] != readings[i][f] for i in pairs)
    return out


def paired_verdicts(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float | int]:
    """Paired comparison of two solvers' verdict agreement on the same pairs (bool (N,) each: the preview's
    verdict equals the final's): ``only_ours`` / ``only_baseline`` count the discordant pairs each way, and
    ``p_value`` is the exact two-sided McNemar test, a binomial test of that split against 1/2."""
    from scipy.stats import binomtest

    b, c = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
    return {"only_ours": b, "only_baseline": c, "p_value": binomtest(b, b + c).pvalue if b + c else 1.0}


def _batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def similarity_measures(reference: torch.Tensor, previews: torch.Tensor, model_measures: dict[str, Any],
                        ref_features: dict[str, Any], per_pair: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """One row's similarity to the references: each pixel measure's mean and standard error of the mean,
    and each model-based measure's mean (``ref_features`` holds the references' features per measure).
    ``per_pair`` (if given) receives each pixel measure's per-pair values, for the paired comparison."""
    from training.rewards import PIXEL_MEASURES as FUNCTIONS

    out: dict[str, float] = {}
    for name in PIXEL_MEASURES:
        values = FUNCTIONS[name][0](reference, previews)
        if per_pair is not None:
            per_pair[name] = values.double().cpu()
        out[name] = float(values.mean())
        out[f"{name}_sem"] = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    for name, sim in model_measures.items():
        out[name] = float(sim.compare(ref_features[name], sim.features(previews)).mean())
    return out


def add_paired_verdicts(results: list[dict[str, Any]], agree: dict[tuple[str, int], torch.Tensor],
                        solvers: Sequence[NamedSolver], seeds: Sequence[int]) -> None:
    """Give each ConsistencySolver row (not its fixed-grid variant) ``verdict_paired``: against every
    baseline at the same K, :func:`paired_verdicts` of the per-pair agreement with the final, and under
    ``by_seed`` the discordant pairs of each noise seed (``seeds``: each pair's), [only ours, only baseline]:
    every pair of a seed starts from the same noise, so the pairs of one seed are not independent draws."""
    is_consistency = {s.name: s.is_consistency for s in solvers}
    seed_of = torch.tensor(list(seeds))
    for row in results:
        name, k = row["solver"], row["steps"]
        if is_consistency[name] and "@" not in name and (name, k) in agree:
            row["verdict_paired"] = {}
            for b, theirs in is_consistency.items():
                if theirs or (b, k) not in agree:
                    continue
                ours, base = agree[(name, k)], agree[(b, k)]
                row["verdict_paired"][b] = {**paired_verdicts(ours, base), "by_seed": {
                    str(s): [int((ours & ~base & (seed_of == s)).sum()), int((~ours & base & (seed_of == s)).sum())]
                    for s in dict.fromkeys(seed_of.tolist())}}


@torch.no_grad()
def evaluate(
    model: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: Sequence[int],
    solvers: Sequence[NamedSolver],
    *,
    guidance: float | None = None,
    reference_steps: int | None = None,
    model_measures: dict[str, Any] | None = None,
    judge: Judge | None = None,
    batch_size: int = 32,
    negative_prompt: str = "",
    progress: bool = True,
    images: InputImages | None = None,
    size: tuple[int, int] | None = None,
    dataset: OfflineDataset | None = None,
) -> dict[str, Any]:
    """Every measure for every (solver, K); returns the JSON document (see the module docstring).

    ``images`` (an editing model): ``prompts`` are instructions, the pairs every image x every instruction
    x every seed, each conditioned on its image at ``size`` = (height, width) (the solvers must be resolved
    for that size too: :func:`resolve_solvers`).

    ``dataset`` (a loaded offline dataset, text-to-image or editing): its rows are the pairs and its stored
    full-step targets the references (nothing is resampled); its guidance, negative prompt, size, images and
    reference steps are used, and ``prompts``, ``seeds``, ``images``, ``guidance`` and ``reference_steps``
    must not be given."""
    from tqdm.auto import tqdm

    from refine.full_step import DEFAULT_STEPS, FULL_STEP_SOLVER, check_full_steps, sample_full_step
    from store.noise import make_noise

    if dataset is not None:
        given = [n for n, v in (("prompts", prompts), ("seeds", seeds), ("images", images), ("guidance", guidance),
                                ("reference_steps", reference_steps)) if v]
        if given:
            raise ValueError(f"{given[0]}: the dataset fixes it; evaluate a dataset without it")
        index = dataset.index
        prompts, seeds, guidance, negative_prompt = index.prompts, index.seeds, index.guidance, index.negative_prompt
        reference_steps, size = index.reference_steps, (index.height, index.width)
        ref_solver = index.reference_solver
        image_of = dataset.images
        check_images_for_model(model, image_of or None)
        pairs = [(p, s, dataset.image_ids[i] if dataset.takes_image else None)
                 for i, (p, s) in enumerate(zip(dataset.prompts, dataset.seeds))]
    else:
        reference_steps = check_full_steps(DEFAULT_STEPS if reference_steps is None else reference_steps,
                                           "reference_steps")
        guidance = float(getattr(model, "default_guidance", 5.0)) if guidance is None else float(guidance)
        ref_solver = FULL_STEP_SOLVER
        check_images_for_model(model, images)
        image_of = images.images if images is not None else {}
        items = [(p, sha) for sha in images.hashes for p in prompts] if images is not None else [(p, None) for p in prompts]
        pairs = [(p, s, sha) for p, sha in items for s in seeds]
    guidance = float(guidance)
    h, w = model.default_size if size is None else size
    shape = model.latent_shape(h, w)
    chunks = _batched(list(range(len(pairs))), batch_size)
    conds = [model.encode_prompts([pairs[i][0] for i in c], negative_prompt) for c in chunks]
    if image_of:
        conds = [condition_on_images(model, cond, [image_of[pairs[i][2]] for i in c], h, w)
                 for cond, c in zip(conds, chunks)]
    full_size = (h, w) if image_of else None
    if dataset is not None:
        noises = [dataset.noise[c] for c in chunks]
    else:
        noises = [torch.stack([make_noise(pairs[i][1], shape) for i in c]) for c in chunks]
    ref_calls = 0 if dataset is not None else reference_steps
    total = len(chunks) * (ref_calls + sum(s.solver.nfe(k) for s in solvers for k in steps))
    bar = tqdm(total=total, desc="evaluate", unit="call", disable=not progress)
    model_measures = model_measures or {}

    def run(sample: Callable[[Any, torch.Tensor, Any], torch.Tensor], calls: int) -> torch.Tensor:
        images = []
        for cond, noise in zip(conds, noises):
            images.append(model.decode(sample(cond, noise.to(model.device), calls)).float().cpu())
            bar.update(calls)
        return torch.cat(images)

    t0 = time.perf_counter()
    if dataset is not None:  # the dataset's full-step targets, decoded
        reference = torch.cat([model.decode(dataset.target[c].to(model.device)).float().cpu() for c in chunks])
    else:
        reference = run(lambda cond, noise, n: sample_full_step(model, cond, noise, guidance, n, size=full_size),
                        reference_steps)
    ref_features = {name: sim.features(reference) for name, sim in model_measures.items()}
    all_prompts = [pair[0] for pair in pairs]
    ref_verdicts, ref_readings = _verdicts(judge(reference, all_prompts)) if judge is not None else (None, None)
    results, agree, per_pair = [], {}, {}
    for named in solvers:
        for k in steps:
            def sample(cond: Any, noise: torch.Tensor, n: int, solver: Any = named.solver, k: int = k) -> torch.Tensor:
                return solver.sample(lambda x, t: model.guided_eps(x, t, cond, guidance), noise, k)

            start = time.perf_counter()
            previews = run(sample, named.solver.nfe(k))
            row: dict[str, Any] = {"solver": named.name, "steps": k, "nfe": named.solver.nfe(k),
                                   "seconds": round(time.perf_counter() - start, 3)}
            if hasattr(named.solver, "config_name"):  # a tuned baseline: the configuration it ran at this K
                row["config"] = named.solver.config_name(k)
            values: dict[str, torch.Tensor] = {}
            row.update(similarity_measures(reference, previews, model_measures, ref_features, values))
            per_pair.update({(named.name, k, m): v for m, v in values.items()})
            row["per_pair"] = {m: [round(float(x), 5) for x in v] for m, v in values.items()}  # in doc["pairs"] order
            if judge is not None:
                verdicts, readings = _verdicts(judge(previews, all_prompts))
                row["adherence"] = 100.0 * float(verdicts.float().mean())
                agree[(named.name, k)] = verdicts == ref_verdicts
                row["verdict_agreement"] = 100.0 * float(agree[(named.name, k)].float().mean())
                row["verdict_flips"] = verdict_flips(ref_verdicts, verdicts, ref_readings, readings)
            results.append(row)
    bar.close()
    add_paired_verdicts(results, agree, solvers, [pair[1] for pair in pairs])
    add_paired_differences(results, per_pair, {s.name: s.is_consistency for s in solvers})
    doc: dict[str, Any] = {
        "model": model.model_id,
        "reference": {"solver": ref_solver, "steps": reference_steps},
        "guidance": guidance,
        "num_prompts": len(prompts),
        "seeds": list(seeds),
        "size": [h, w],
        "pairs": [[p, s] if sha is None else [p, s, sha] for p, s, sha in pairs],  # (prompt, seed[, image sha256])
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if images is not None:
        doc["num_images"] = len(images.hashes)
        doc["images"] = {"sha256": list(images.hashes), "sources": dict(images.sources)}
    elif dataset is not None and dataset.takes_image:
        doc["num_images"] = len(dataset.index.images)
        doc["images"] = {"sha256": list(dataset.index.images), "sources": dict(dataset.index.image_sources)}
    if ref_verdicts is not None:
        doc["reference"]["adherence"] = 100.0 * float(ref_verdicts.float().mean())
    doc["summary"] = summarize(doc)
    return doc


TUNED_BEST_NAME = "tuned:best"  # the comparison row: the best tuned baseline at this K (tuned on validation)
PAIRED_MEASURES = ("psnr", "ssim")


def paired_difference(ours: torch.Tensor, theirs: torch.Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean per-pair difference ours - theirs on the same (prompt, seed) pairs, with its paired-t ``level``
    confidence interval (``ci95``: [low, high]) and the count of pairs each side wins."""
    from scipy import stats

    d = (ours - theirs).double()
    n = int(d.numel())
    mean = float(d.mean())
    if n > 1:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(d.std(unbiased=True)) / math.sqrt(n)
    else:
        half = math.inf
    return {"mean_diff": round(mean, 5), "ci95": [round(mean - half, 5), round(mean + half, 5)], "n": n,
            "ours_better": int((d > 0).sum()), "theirs_better": int((d < 0).sum())}


def add_paired_differences(results: list[dict[str, Any]], per_pair: dict[tuple[str, int, str], torch.Tensor],
                           is_consistency: dict[str, bool]) -> None:
    """Each ConsistencySolver row (not ``@fixed-grid``) gets ``paired``: against every baseline at the same K,
    per measure, the mean per-pair difference and its 95% interval (:func:`paired_difference`)."""
    for row in results:
        name, k = row["solver"], row["steps"]
        if not is_consistency.get(name) or "@" in name:
            continue
        row["paired"] = {b: {m: paired_difference(per_pair[(name, k, m)], per_pair[(b, k, m)])
                             for m in PAIRED_MEASURES if (b, k, m) in per_pair and (name, k, m) in per_pair}
                         for b, theirs in is_consistency.items() if not theirs and (b, k, "psnr") in per_pair}


def comparison_lines(doc: dict[str, Any]) -> list[str]:
    """The report's comparison row per K: ours against the best tuned baseline (``tuned:best``: tuned on the
    validation split, scored here), the paired differences with their 95% intervals, beside the defaults."""
    lines = []
    by = {(r["solver"], r["steps"]): r for r in doc["results"]}
    for r in doc["results"]:
        if TUNED_BEST_NAME not in r.get("paired", {}):
            continue
        k, tuned = r["steps"], by[(TUNED_BEST_NAME, r["steps"])]
        p = r["paired"][TUNED_BEST_NAME]
        parts = [f"{m.upper()} {r[m]:.3f} vs {tuned[m]:.3f}, diff {p[m]['mean_diff']:+.3f} "
                 f"[{p[m]['ci95'][0]:+.3f}, {p[m]['ci95'][1]:+.3f}]" for m in PAIRED_MEASURES if m in p]
        if "verdict_agreement" in r:
            parts.append(f"verdict {r['verdict_agreement']:.1f}% vs {tuned['verdict_agreement']:.1f}%")
        lines.append(f"K={k} {r['solver']} vs best tuned ({tuned.get('config', '?')}): " + "; ".join(parts))
    return lines


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Adherence-within-2-points K per solver, and the step saving K' per measure (module docstring)."""
    rows = doc["results"]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    by = {(r["solver"], r["steps"]): r for r in rows}
    summary: dict[str, Any] = {}
    ref_adh = doc["reference"].get("adherence")
    if ref_adh is not None:
        summary["adherence_within_2_points"] = {
            s: min((r["steps"] for r in rows if r["solver"] == s and r["adherence"] >= ref_adh - ADHERENCE_TOLERANCE),
                   default=None) for s in solvers}
    consistency = [s for s in solvers if s.startswith("consistency") and "@" not in s]
    baselines = [s for s in solvers if not s.startswith("consistency") and not s.startswith("rule:")]
    if consistency and baselines and (consistency[0], STEP_SAVING_AT) in by:
        ours = by[(consistency[0], STEP_SAVING_AT)]
        saving = {}
        for measure in ("psnr", "ssim", "gms", "verdict_agreement"):
            if measure not in ours:
                continue
            matches = {b: min((r["steps"] for r in rows if r["solver"] == b and r[measure] >= ours[measure]), default=None)
                       for b in baselines}
            found = [k for k in matches.values() if k is not None]
            k_prime = min(found) if found else None
            saving[measure] = {"consistency_at": STEP_SAVING_AT, "value": ours[measure], "k_prime": k_prime,
                               "per_baseline": matches,
                               "step_saving": None if k_prime is None else round(1 - STEP_SAVING_AT / k_prime, 3)}
        summary["step_saving"] = saving
    if consistency and baselines:
        wins = {}
        for k in sorted({r["steps"] for r in rows}):
            if (consistency[0], k) not in by:
                continue
            ours = by[(consistency[0], k)]
            wins[str(k)] = {m: {"ours": ours[m], "best_baseline": max(by[(b, k)][m] for b in baselines if (b, k) in by),
                                "margin": ours[m] - max(by[(b, k)][m] for b in baselines if (b, k) in by)}
                            for m in ("psnr", "ssim", "gms", "verdict_agreement", "adherence") if m in ours}
        summary["vs_best_baseline"] = wins
    if consistency and any(r["solver"] == TUNED_BEST_NAME for r in rows):
        summary["vs_best_tuned"] = {
            str(r["steps"]): {"config": by[(TUNED_BEST_NAME, r["steps"])].get("config"),
                              **{m: {"ours": r[m], "tuned": by[(TUNED_BEST_NAME, r["steps"])][m],
                                     **r["paired"][TUNED_BEST_NAME].get(m, {})}
                                 for m in ("psnr", "ssim", "verdict_agreement") if m in r}}
            for r in rows if r["solver"] == consistency[0] and (TUNED_BEST_NAME, r["steps"]) in by
            and TUNED_BEST_NAME in r.get("paired", {})}
    return summary


def markdown_table(doc: dict[str, Any]) -> str:
    rows = doc["results"]
    measures = [m for m in ("psnr", "ssim", "gms", *MODEL_MEASURES, "adherence", "verdict_agreement") if m in rows[0]]
    head = "| solver | K | NFE | " + " | ".join(measures) + " |"
    lines = [head, "|" + "---|" * (3 + len(measures))]
    for r in sorted(rows, key=lambda r: (r["steps"], r["solver"])):
        label = f"{r['solver']} ({r['config']})" if "config" in r else r["solver"]
        lines.append(f"| {label} | {r['steps']} | {r['nfe']} | " + " | ".join(f"{r[m]:.3f}" for m in measures) + " |")
    ref = doc["reference"]
    note = f"reference: {ref['solver']} {ref['steps']} steps"
    if "adherence" in ref:
        note += f", adherence {ref['adherence']:.1f}%"
    return "\n".join(lines) + "\n\n" + note


def paired_lines(doc: dict[str, Any]) -> list[str]:
    """One line per ConsistencySolver row with ``verdict_paired``: the discordant pairs against each baseline."""
    lines = []
    for r in doc["results"]:
        if "verdict_paired" in r:
            parts = [f"{b} {v['only_ours']}/{v['only_baseline']} (p {v['p_value']:.2f})" for b, v in r["verdict_paired"].items()]
            lines.append(f"verdict pairs only ours/only baseline, {r['solver']} K={r['steps']}: " + ", ".join(parts))
    return lines


def _short(name: str) -> str:
    """A legend label: ``consistency:/long/path/final`` -> ``consistency:…/path/final``."""
    if name.startswith("consistency:") and len(name) > 32:
        head, _, tail = name.partition(":")
        return f"{head}:…/" + "/".join(Path(tail.split("@")[0]).parts[-2:]) + ("@" + name.split("@")[1] if "@" in name else "")
    return name


def plot(doc: dict[str, Any], path: str | Path) -> None:
    """One panel per measure against NFE, one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    measures = [m for m in ("psnr", "ssim", "gms", *MODEL_MEASURES, "adherence", "verdict_agreement") if m in rows[0]]
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    for ax, m in zip(axes[0], measures):
        for s in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted((r["nfe"], r[m]) for r in rows if r["solver"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2.2 if s.startswith("consistency") else 1.2,
                    label=_short(s))
        if m == "adherence" and "adherence" in doc["reference"]:
            ax.axhline(doc["reference"]["adherence"], color="k", ls="--", lw=0.8, label="reference")
        ax.set_xlabel("NFE")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{doc['model']}: previews vs {doc['reference']['solver']} {doc['reference']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", "--instructions", dest="prompts", default=None,
                        help="prompt file, one per line (held out from training); for an editing model the instructions")
    parser.add_argument("--dataset", default=None,
                        help="instead of --prompts: a dataset folder (training.dataset); its rows are the pairs and its "
                             "full-step targets the references")
    parser.add_argument("--images", default=None,
                        help="editing models only: folder of input images; pairs are every image x instruction x seed")
    parser.add_argument("--keep-image-size", action="store_true",
                        help="editing: output size = the input's own size (rounded) instead of the preferred resolution")
    parser.add_argument("--height", type=int, default=None, help="editing: output height (with --width)")
    parser.add_argument("--width", type=int, default=None, help="editing: output width (with --height)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts of the file")
    parser.add_argument("--seeds", default=None, help="seeds (default 0-3; not with --dataset)")
    parser.add_argument("--steps", default="3,4,5,6,8", help=f"preview step counts, each in 1..{MAX_PREVIEW_STEPS}")
    parser.add_argument("--solvers", default="consistency,ddim,dpmpp2m,unipc,deis,ipndm")
    add_model_options(parser)
    parser.add_argument("--json", dest="json_out", required=True, help="write the results JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of every measure against NFE here")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--reference-steps", type=int, default=None, help="full-step sampler steps (default 40)")
    parser.add_argument("--measures", default="", help=f"model-based measures to add: {','.join(MODEL_MEASURES)}")
    parser.add_argument("--reward-weights", default="", help="NAME=PATH,... weights of the model-based measures")
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    add_db_option(parser, dest="store", help="store holding the active checkpoint ('' = none; default path)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--fixed-grid", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate a learned-grid policy on the fixed grid (<name>@fixed-grid)")
    parser.add_argument("--tuned-file", default=None,
                        help="tuned baselines JSON for 'tuned' / 'tuned:FAMILY' (default: training/results/tuned_baselines.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    # bad input: all checked before the model is loaded or anything is sampled
    if (args.prompts is None) == (args.dataset is None):
        raise ValueError("prompts: give a prompt (instruction) file with --prompts, or a dataset folder with --dataset")
    if args.dataset is not None:
        from training.dataset import DatasetIndex

        DatasetIndex.read(args.dataset)  # a folder that is no dataset fails here
        fixed = [("images", args.images), ("seeds", args.seeds), ("max_prompts", args.max_prompts),
                 ("guidance", args.guidance), ("reference_steps", args.reference_steps), ("height", args.height),
                 ("width", args.width), ("keep_image_size", args.keep_image_size)]
        for flag, value in fixed:
            if value is not None and value is not False:
                raise ValueError(f"{flag}: the dataset fixes it; drop it with --dataset")
        prompts, seeds = [], []
    else:
        prompts = read_prompts(args.prompts, args.max_prompts)
        seeds = parse_int_list("0-3" if args.seeds is None else args.seeds, "seeds", 0, 2**32 - 1)
    steps = parse_int_list(args.steps, "steps", 1, MAX_PREVIEW_STEPS)
    names = parse_solvers(args.solvers, args.tuned_file)
    images = images_from_args(args, "an edit's output size (text-to-image evaluation uses the model's default size)")
    if args.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {args.batch_size}")
    from training.config import _parse_mapping
    from training.rewards import get_similarity

    weights = _parse_mapping(args.reward_weights)
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    for m in measures:
        if m not in MODEL_MEASURES:
            raise ValueError(f"measures: unknown measure {m!r}; known: {', '.join(MODEL_MEASURES)}")
    model_measures = {m: get_similarity(m, weights=weights, allow_download=args.allow_download) for m in measures}
    store = None
    if args.store != "" and "consistency" in names:
        from store import open_store

        store = open_store(args.store)
    if model is None:
        from runtime.cli import model_from_args

        model = model_from_args(args)
    dataset = None
    if args.dataset is not None:
        from refine.full_step import FULL_STEP_SOLVER
        from training.dataset import load_dataset

        dataset = load_dataset(args.dataset, model_id=model.model_id, reference_solver=FULL_STEP_SOLVER)
        size = (dataset.index.height, dataset.index.width) if dataset.takes_image else None
    else:
        check_images_for_model(model, images)
        size = edit_size(model, images, args.height, args.width, args.keep_image_size) if images is not None else None
    solvers = resolve_solvers(names, model, store, tuned_file=args.tuned_file, steps=steps, fixed_grid=args.fixed_grid,
                              size=size)
    doc = evaluate(model, prompts, seeds, steps, solvers, guidance=args.guidance, reference_steps=args.reference_steps,
                   model_measures=model_measures, judge=load_judge(model), batch_size=args.batch_size,
                   images=images, size=size, dataset=dataset)
    if dataset is not None:
        doc["dataset"] = str(args.dataset)
    else:
        doc["prompts"] = str(args.prompts)
    if images is not None:
        doc["images"]["folder"] = str(args.images)
    doc["command"] = "python -m training.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    Path(args.json_out).write_text(json.dumps(doc, indent=1))
    if args.plot:
        plot(doc, args.plot)
    print(markdown_table(doc))
    for line in paired_lines(doc) + comparison_lines(doc):
        print(line)
    print(json.dumps(doc["summary"].get("step_saving", {}).get("psnr", {})))
    if "adherence_within_2_points" in doc["summary"]:
        print("adherence within 2 points of the reference at K =", json.dumps(doc["summary"]["adherence_within_2_points"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
