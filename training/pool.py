"""Pool evaluations of disjoint prompt sets into one report: the same solvers, K and reference, more pairs.

    python -m training.pool training/results/embedded_eval_fresh_retuned.json \\
        training/results/embedded_eval_second.json --json training/results/embedded_eval_pooled.json

Each input is a ``training.evaluate`` JSON. For every (solver, K) they all hold: PSNR / SSIM as the mean over
every pair, verdict agreement likewise, and for each ConsistencySolver row against each baseline the paired
PSNR / SSIM difference over the pooled per-pair values with its 95% interval
(:func:`training.evaluate.paired_difference`), and the pooled discordant verdict pairs with their exact
McNemar p-value. Inputs that do not describe the same comparison are refused, each with the field that
differs: another model, reference or guidance; another tuned configuration at some K (the tuned file
changed in between); a (prompt, seed) pair in two inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from training.evaluate import PAIRED_MEASURES, paired_difference

SAME = ("model", "reference", "guidance")  # fields every input must share


def _comparable(value: Any) -> Any:
    """A field as the inputs must share it: the reference without its adherence (which depends on the prompts)."""
    return {k: v for k, v in value.items() if k != "adherence"} if isinstance(value, dict) else value


def _check(docs: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    first = docs[0]
    seen: dict[tuple, str] = {}
    for doc, name in zip(docs, names):
        for field in SAME:
            ref, got = _comparable(first[field]), _comparable(doc[field])
            if got != ref:
                raise ValueError(f"{field}: {name!r} has {got!r}, {names[0]!r} has {ref!r}")
        for pair in doc["pairs"]:
            key = tuple(pair)
            if key in seen:
                raise ValueError(f"pairs: {list(key)!r} is in both {seen[key]!r} and {name!r}; pool disjoint sets only")
            seen[key] = name
        for row in doc["results"]:
            if "per_pair" not in row:
                raise ValueError(f"results: {name!r} has no per-pair values for {row['solver']} K={row['steps']}")


def _rows(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["solver"], r["steps"]): r for r in doc["results"]}


def pool(docs: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """The pooled report of ``docs`` (``names`` label them in errors)."""
    from scipy.stats import binomtest

    if not docs:
        raise ValueError("inputs: nothing to pool")
    _check(docs, names)
    by_doc = [_rows(d) for d in docs]
    keys = [k for k in by_doc[0] if all(k in rows for rows in by_doc[1:])]
    results = []
    for solver, k in keys:
        parts = [rows[(solver, k)] for rows in by_doc]
        configs = {p.get("config") for p in parts}
        if len(configs) > 1:
            raise ValueError(f"config: {solver} at K={k} ran as {sorted(map(str, configs))} in the inputs "
                             "(the tuned file changed between them); rerun them with one tuned file")
        n = [len(p["per_pair"]["psnr"]) for p in parts]
        row: dict[str, Any] = {"solver": solver, "steps": k, "nfe": parts[0]["nfe"], "pairs": sum(n)}
        if parts[0].get("config"):
            row["config"] = parts[0]["config"]
        values = {m: torch.tensor([v for p in parts for v in p["per_pair"][m]], dtype=torch.float64)
                  for m in ("psnr", "ssim", "gms") if all(m in p["per_pair"] for p in parts)}  # pooled, in pair order
        row.update({m: float(v.mean()) for m, v in values.items()})
        for m in ("adherence", "verdict_agreement"):
            if all(m in p for p in parts):
                row[m] = sum(p[m] * c for p, c in zip(parts, n)) / sum(n)
        if all("paired" in p for p in parts):
            row["paired"] = {}
            for b in parts[0]["paired"]:
                theirs = {m: torch.tensor([v for rows in by_doc for v in rows[(b, k)]["per_pair"][m]],
                                          dtype=torch.float64) for m in PAIRED_MEASURES}
                row["paired"][b] = {m: paired_difference(values[m], theirs[m]) for m in PAIRED_MEASURES}
        if all("verdict_paired" in p for p in parts):
            row["verdict_paired"] = {}
            for b in parts[0]["verdict_paired"]:
                only_ours = sum(p["verdict_paired"][b]["only_ours"] for p in parts)
                only_theirs = sum(p["verdict_paired"][b]["only_baseline"] for p in parts)
                total = only_ours + only_theirs
                row["verdict_paired"][b] = {"only_ours": only_ours, "only_baseline": only_theirs,
                                            "p_value": binomtest(only_ours, total).pvalue if total else 1.0}
                if all("by_seed" in p["verdict_paired"][b] for p in parts):  # a seed's pairs, summed over inputs
                    by_seed: dict[str, list[int]] = {}
                    for p in parts:
                        for seed, counts in p["verdict_paired"][b]["by_seed"].items():
                            by_seed[seed] = [x + y for x, y in zip(by_seed.get(seed, [0, 0]), counts)]
                    row["verdict_paired"][b]["by_seed"] = by_seed
        results.append(row)
    return {"model": docs[0]["model"], "reference": _comparable(docs[0]["reference"]),
            "guidance": docs[0]["guidance"], "inputs": list(names), "pairs": sum(len(d["pairs"]) for d in docs),
            "results": results}


def table(doc: dict[str, Any], baseline: str = "tuned:best") -> str:
    """Markdown: per K, each ConsistencySolver row against ``baseline``."""
    lines = ["| K | solver | PSNR / SSIM | baseline PSNR / SSIM | PSNR diff [95% CI] | SSIM diff [95% CI] | "
             "verdict agreement (only ours / only baseline, p) |", "|---|---|---|---|---|---|---|"]
    rows = _rows(doc)
    for r in doc["results"]:
        if baseline not in r.get("paired", {}):
            continue
        b, p = rows[(baseline, r["steps"])], r["paired"][baseline]
        diff = [f"{p[m]['mean_diff']:+.3f} [{p[m]['ci95'][0]:+.3f}, {p[m]['ci95'][1]:+.3f}]" for m in PAIRED_MEASURES]
        verdict = ""
        if "verdict_agreement" in r:
            v = r.get("verdict_paired", {}).get(baseline, {})
            verdict = (f"{r['verdict_agreement']:.1f}% vs {b['verdict_agreement']:.1f}% "
                       f"({v.get('only_ours')} / {v.get('only_baseline')}, p = {v.get('p_value', float('nan')):.2f})")
        lines.append(f"| {r['steps']} | {r['solver']} | {r['psnr']:.2f} / {r['ssim']:.3f} | "
                     f"{b['psnr']:.2f} / {b['ssim']:.3f} | {diff[0]} | {diff[1]} | {verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pool", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="training.evaluate JSON files of disjoint prompt sets")
    parser.add_argument("--json", dest="json_out", required=True, help="write the pooled report here")
    parser.add_argument("--baseline", default="tuned:best", help="the comparison row of the printed table")
    args = parser.parse_args(argv)
    docs = []
    for path in args.inputs:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"inputs: cannot read {path!r}: {exc}") from None
    try:
        doc = pool(docs, args.inputs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    Path(args.json_out).write_text(json.dumps(doc, indent=1))
    print(table(doc, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
