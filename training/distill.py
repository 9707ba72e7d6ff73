"""Ours-Distill: the same policy trained by backpropagating through the unrolled few-step sampler.

The paper's comparison (paper.md 4.1 "Ours-Distill", 4.6): the deterministic coefficients
w = f_theta(step) are used in eq. 10, the K-step preview x_K(w) is compared with the full-step target,
and the loss gradient flows through every step, including through the model's epsilon at the states
the coefficients produced (the chain rule through the denoiser, which is frozen but differentiated).

    loss = mean_rows log MSE(x_K(w), x_target)      (log: a PSNR-like relative error per row)

The model is never updated; only the policy's parameters get gradients. ``Denoiser.model_output`` is
wrapped in ``torch.no_grad`` by the backends, so the undecorated function (``__wrapped__``) is called
here; classifier-free guidance and the conversion to epsilon are the same arithmetic as
``Denoiser.guided_eps``.

    python -m training.distill --dataset DIR --out DIR [--num-updates N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from solver.outputs import to_epsilon
from solver.policy import ConsistencyPolicy
from training.config import MAX_PREVIEW_STEPS, add_dataclass_arguments, doc
from training.rollout import lmm_rollouts

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Distillation of the ConsistencySolver policy through the unrolled sampler."""

    dataset: str = doc("offline dataset folder (training.dataset)", "")
    model: str | None = doc("model name or path; None = the embedded default", None)
    out: str = doc("output folder (final/ holds the policy)", "runs/distill")
    order: int = doc("LMM order m", 4)
    base: str = doc("analytic base rule of the zero-initialised policy", "dpm2m")
    hidden: int = doc("policy MLP width", 64)
    batch_size: int = doc("rows per update (all share one step count K, so each step is one model call)", 8)
    min_steps: int = doc("smallest K drawn per update", 3)
    max_steps: int = doc("largest K drawn per update", 6)
    num_updates: int = doc("optimiser steps", 100)
    learning_rate: float = doc("Adam learning rate", 1e-3)
    max_grad_norm: float = doc("gradient-norm clip", 1.0)
    seed: int = doc("seed of rows and K draws", 0)
    max_minutes: float | None = doc("stop after this many minutes", None)
    threads: int | None = doc("torch intra-op threads", None)

    def validate(self) -> "DistillConfig":
        for name in ("hidden", "batch_size", "num_updates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("min_steps", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PREVIEW_STEPS:
                raise ValueError(f"{name} must be an integer in 1..{MAX_PREVIEW_STEPS}, got {v!r}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if not self.dataset:
            raise ValueError("dataset must name a dataset folder built by `python -m training.dataset`")
        return self


def differentiable_guided_eps(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float) -> torch.Tensor:
    """``Denoiser.guided_eps`` with the graph kept: d eps / d x flows back to the coefficients."""
    raw = getattr(type(model).model_output, "__wrapped__", type(model).model_output)
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha, sigma = model.schedule.alpha_sigma(t)
    x32 = x.to(model.device, torch.float32)
    context = torch.cat([cond.uncond, cond.cond])
    mask = None if cond.cond_mask is None else torch.cat([cond.uncond_mask, cond.cond_mask])
    out = raw(model, torch.cat([x32, x32]).to(model.dtype), t, context, mask)
    eps = to_epsilon(out, torch.cat([x32, x32]), alpha.item(), sigma.item(), model.schedule.prediction_type)
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def distill(config: DistillConfig, model: Any, dataset: Any, progress: bool = True) -> tuple[ConsistencyPolicy, list[dict]]:
    """Train the policy's mean coefficients by gradient descent through the sampler; returns (policy, log)."""
    from tqdm.auto import tqdm

    from models.base import Conditioning

    cfg = config.validate()
    torch.manual_seed(cfg.seed)
    policy = ConsistencyPolicy(order=cfg.order, base=cfg.base, hidden=cfg.hidden)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=cfg.learning_rate)
    guidance, schedule, log = float(dataset.index.guidance), model.schedule, []
    cache: dict[str, Any] = {}
    start = time.perf_counter()
    for update in tqdm(range(cfg.num_updates), desc="distill", disable=not progress):
        digest = hashlib.sha256(f"{cfg.seed}:{update}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        rows = torch.randint(len(dataset), (cfg.batch_size,), generator=g)
        k = int(torch.randint(cfg.min_steps, cfg.max_steps + 1, (1,), generator=g))
        prompts = [dataset.prompts[r] for r in rows.tolist()]
        for p in set(prompts) - set(cache):
            cache[p] = model.encode_prompts([p], dataset.index.negative_prompt)
        cond = Conditioning.cat([cache[p] for p in prompts])
        grid = schedule.grid(k)
        table = policy.mean_table(grid).to(torch.float32)
        x = lmm_rollouts(lambda x, t: differentiable_guided_eps(model, x, t, cond, guidance),
                         dataset.noise[rows].to(model.device), grid, table.unsqueeze(0).expand(len(rows), -1, -1))
        mse = (x - dataset.target[rows].to(x.device)).pow(2).flatten(1).mean(1)
        loss = torch.log(mse + 1e-10).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.net.parameters(), cfg.max_grad_norm)
        optimizer.step()
        log.append({"update": update, "steps": k, "psnr_latent": float(-10 * torch.log10(mse.detach()).mean()),
                    "grad_norm": float(grad_norm)})
        if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
            break
    return policy, log


def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.distill", description=DistillConfig.__doc__)
    add_dataclass_arguments(parser, DistillConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = DistillConfig(**vars(args)).validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    from refine.full_step import FULL_STEP_SOLVER
    from training.dataset import DatasetIndex, load_dataset

    DatasetIndex.read(config.dataset)
    if model is None:
        from models.registry import load_model

        model = load_model(config.model)
    dataset = load_dataset(config.dataset, model_id=model.model_id, reference_solver=FULL_STEP_SOLVER)
    policy, log = distill(config, model, dataset)
    final = Path(config.out) / "final"
    policy.save(final)
    (final / "train_config.json").write_text(json.dumps({"values": vars(config), "docs": {
        f: DistillConfig.__dataclass_fields__[f].metadata.get("doc", "") for f in DistillConfig.__dataclass_fields__}}, indent=1))
    (final / "metrics.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({"final": str(final), "updates": len(log), "last": log[-1] if log else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
