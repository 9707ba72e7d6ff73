"""Ours-Distill: the same policy trained by backpropagating through the unrolled few-step sampler.

The paper's comparison (paper.md 4.1 "Ours-Distill", 4.6): the deterministic coefficients
w = f_theta(step) are used in eq. 10, the K-step preview x_K(w) is compared with the full-step target,
and the loss gradient flows through every step, including through the model's epsilon at the states
the coefficients produced (the chain rule through the denoiser, which is frozen but differentiated).

    loss = mean_rows [ log MSE(x_K(w), x_target) + lambda log(1 - SSIM(x_K(w), x_target))
                       + xi log MSE(grad x_K(w), grad x_target) ] + rho sum(a^2)

The log makes each term a relative error per row (PSNR-like); ``ssim_weight`` lambda (default 0) adds the
structure term, SSIM of the two latents read as images in [-1, 1] (the embedded model's latent is its image).
``residual_decay`` ('K:rho,...', default none) pulls K's coefficients w = b + a toward the base rule b
(+ rho sum(a^2)). ``label_weight`` nu (default 0, embedded model only) adds nu log CE of the scene
analyzer's palette labels (:func:`palette_label_ce`) on the updates of the K ``label_steps`` names (default
all); ``coverage_weight`` kappa (default 0, embedded model only, the same K) adds kappa log MSE of the main
object's coverage where the analyzer reads its shape (:func:`main_coverage_mse`). ``edge_weight`` xi
(default 0) adds xi log MSE of the Sobel gradients (:func:`training.rewards.gradient_mse`, the gradient part of
the h1_psnr reward).
``colour_weight`` mu (default 0) adds mu log MSE of the 4 x 4 block means, the colour of a region, which
the scene analyzer reads. Why each default is what it is: ``training/results/experiments.md``.

With ``time_grid`` the grid is learned too: during training its timesteps stay real-valued
(``ConsistencyPolicy.relaxed_time_grid``), alpha_t and sigma_t come from the schedule's continuous
interpolation and t enters the network as a float, so d loss / d t flows through both the LMM step
sizes (n_{i+1} - n_i) and the model's epsilon. The sampling grid is that grid rounded.

Two ways to descend (``--method``):

- ``tables`` (default): free residuals a_K and grid log-weights g_K for every K of the step range, one
  Adam each, updates round robin over K (``repeat_steps`` get a second turn in each round); the policy's
  heads are then regressed onto them (:func:`fit_policy`, no model calls). Each K gets its own exact
  gradient, none traded against another. The K that ``step_tables`` names keep their tables exactly (the
  policy's own tables hold what the shared heads miss there).
- ``policy``: descend on the policy's MLP parameters directly, one random K per update.

The model is never updated; only the policy's parameters get gradients. ``Denoiser.model_output`` is
wrapped in ``torch.no_grad`` by the backends, so the undecorated function (``__wrapped__``) is called
here; classifier-free guidance and the conversion to epsilon are the same arithmetic as
``Denoiser.guided_eps``.

    python -m training.distill --dataset DIR --out DIR [--time-grid] [--max-minutes M] [--batch-size B]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from solver.outputs import to_epsilon
from solver.policy import ConsistencyPolicy
from training.config import MAX_PREVIEW_STEPS, add_dataclass_arguments, check_positive_number, config_from_args, doc
from training.dataset import parse_int_list
from training.rollout import lmm_rollouts

logger = logging.getLogger(__name__)

COLOUR_POOL = 4  # the colour term's block side, in latent pixels
LABEL_TEMPERATURE = 0.01  # tau of the label term's soft palette labels, in squared RGB distance on [0, 1]
TABLE_LR_SCALE = 5.0  # method 'tables': Adam step of the raw coefficients / grid weights = 5 x learning_rate


@dataclass
class DistillConfig:
    """Distillation of the ConsistencySolver policy through the unrolled sampler."""

    dataset: str = doc("offline dataset folder (training.dataset)", "")
    model: str | None = doc("model name or path; None = the embedded default", None)
    out: str = doc("output folder (final/ holds the policy)", "runs/distill")
    order: int = doc("LMM order m", 4)
    base: str = doc("analytic base rule of the zero-initialised policy", "dpm2m")
    hidden: int = doc("policy MLP width", 64)
    time_grid: bool = doc("also learn the time grid: the loss is differentiated through real-valued timesteps "
                          "(the sampling grid is that grid rounded)", False)
    learn_start: bool = doc("also learn where sampling starts (the policy's start head, with time_grid): the first "
                            "timestep may lie below T, the initial noise then taken as x at that time", False)
    final: str = doc("end point of the policy's grid: 'config', 'first' (alphas_cumprod[0], final_sigmas_type="
                     "sigma_min) or 'zero'", "config")
    warm_start: str = doc("tuned-baselines JSON (training.tune_baselines): method 'tables' starts each K it tunes "
                          "from the best tuned rule there that is an eq.-10 table (its coefficients, grid and start); "
                          "'' = from the base rule", "")
    warm_start_k: str = doc("with warm_start, the K whose tuned rule each K starts from (run at K): 'S' = every K from "
                            "the rule tuned at S; 'K:S,...' = each named K from S's, the others from their own; "
                            "'' = every K from its own", "")
    method: str = doc("'tables': fit free coefficients and grid weights per step count K (round robin over K), "
                      "then regress the policy's heads onto them; 'policy': descend on the policy's parameters "
                      "directly, one random K per update", "tables")
    fit_iterations: int = doc("Adam iterations of the regression of the policy's heads onto the fitted tables "
                              "(method 'tables'; no model calls)", 3000)
    fit_learning_rate: float = doc("Adam learning rate of that regression", 3e-3)
    fit_weights: str = doc("weight of each K's table in that regression, 'K:W,...' (unnamed K weigh 1; '' = all 1): "
                           "the policy's heads cannot hold every K's table, and a K of low weight pulls the others less",
                           "")
    ssim_weight: float = doc("lambda of the structure term: loss = log MSE + lambda log(1 - SSIM) per row, SSIM of "
                             "the latents read as images in [-1, 1]; 0 = log MSE alone", 0.0)
    colour_weight: float = doc("mu of the colour term: + mu log MSE of the latents average-pooled over "
                               f"{COLOUR_POOL} x {COLOUR_POOL} blocks (an object's mean colour); 0 = off", 0.0)
    edge_weight: float = doc("xi of the edge term: + xi log MSE of the Sobel gradients of the latents read as images "
                             "(the gradient part of the h1_psnr reward: blurred or moved edges); 0 = off", 0.0)
    label_weight: float = doc("nu of the label term: + nu log CE of the preview's soft palette labels against the "
                              "target's, per pixel, the colour names the scene analyzer reads (embedded model "
                              "only); 0 = off", 0.0)
    coverage_weight: float = doc("kappa of the coverage term: + kappa log MSE of the main object's coverage, read "
                                 "as the scene analyzer reads the shape from it (in the target's main-object window, "
                                 "on its foreground-background colour segment; embedded model only); 0 = off", 0.0)
    label_steps: str = doc("step counts K whose updates carry the analyzer's terms (label, coverage; comma-separated, "
                           "within min_steps..max_steps; '' = every K)", "")
    step_tables: str = doc("method 'tables': step counts K whose fitted table the policy keeps exactly in its own "
                           "parameters, what the shared heads miss there (comma-separated, within "
                           "min_steps..max_steps; '' = none); give them a low fit weight to keep them from pulling "
                           "the other K", "")
    residual_decay: str = doc("rho of each K, 'K:rho,...' (unnamed K: 0; '' = off): + rho sum(a^2) of K's squared "
                              "coefficient residuals a on the base rule, a pull toward the analytic rule", "")
    batch_size: int = doc("rows per update (all share one step count K, so each step is one model call)", 8)
    min_steps: int = doc("smallest K drawn per update", 3)
    max_steps: int = doc("largest K drawn per update", 6)
    num_updates: int = doc("optimiser steps", 100)
    learning_rate: float = doc("Adam learning rate", 1e-3)
    repeat_steps: str = doc("method 'tables': step counts that get a second turn in each round of the round robin "
                            "(comma-separated, within min_steps..max_steps; '' = none)", "")
    max_grad_norm: float = doc("gradient-norm clip", 1.0)
    seed: int = doc("seed of rows and K draws", 0)
    max_minutes: float | None = doc("stop before an update that would end past this many minutes (as long as the last)", None)
    threads: int | None = doc("torch intra-op threads", None)

    def validate(self) -> "DistillConfig":
        for name in ("hidden", "batch_size", "num_updates", "fit_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("learning_rate", "fit_learning_rate"):
            check_positive_number(name, getattr(self, name))
        for name in ("ssim_weight", "colour_weight", "label_weight", "coverage_weight", "edge_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or v != 0:  # 0 = off; else positive
                check_positive_number(name, v)
        for name in ("min_steps", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PREVIEW_STEPS:
                raise ValueError(f"{name} must be an integer in 1..{MAX_PREVIEW_STEPS}, got {v!r}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        self.repeat_step_counts()
        self.labelled_step_counts()
        if self.own_step_counts() and self.method != "tables":
            raise ValueError("step_tables needs method 'tables'")
        self.fit_weight_map()
        self.residual_decay_map()
        if self.learn_start and not self.time_grid:
            raise ValueError("learn_start needs time_grid (the start is part of the learned time grid)")
        if self.final not in ("config", "first", "zero"):
            raise ValueError(f"final must be 'config', 'first' or 'zero', got {self.final!r}")
        if self.warm_start and self.method != "tables":
            raise ValueError("warm_start needs method 'tables'")
        self.warm_start_sources()
        if self.method not in ("tables", "policy"):
            raise ValueError(f"method must be 'tables' or 'policy', got {self.method!r}")
        if not self.dataset:
            raise ValueError("dataset must name a dataset folder built by `python -m training.dataset`")
        return self

    def repeat_step_counts(self) -> list[int]:
        """``repeat_steps`` as a list ('' = none); each must lie within min_steps..max_steps."""
        return self._step_list("repeat_steps")

    def labelled_step_counts(self) -> list[int]:
        """The K whose updates carry the analyzer's terms: ``label_steps`` ('' = every K of the step range), each
        within min_steps..max_steps; none when ``label_weight`` and ``coverage_weight`` are 0."""
        steps = self._step_list("label_steps") or list(range(self.min_steps, self.max_steps + 1))
        return steps if self.label_weight or self.coverage_weight else []

    def own_step_counts(self) -> list[int]:
        """``step_tables`` as a list ('' = none); each within min_steps..max_steps."""
        return self._step_list("step_tables")

    def _step_list(self, name: str) -> list[int]:
        """The comma-separated step counts of field ``name`` ('' = none), each within min_steps..max_steps."""
        value = getattr(self, name)
        if isinstance(value, str) and not value.strip():
            return []
        return parse_int_list(value, name, self.min_steps, self.max_steps)

    def warm_start_sources(self) -> int | dict[int, int] | None:
        """``warm_start_k`` as the K whose tuned rule every K starts from (an int), as {K: that K} for the K it
        names (the others start from their own), or None ('': every K from its own)."""
        spec = str(self.warm_start_k).strip()
        if not spec:
            return None
        if ":" in spec:
            return {k: int(s) for k, s in self._step_map("warm_start_k", integer=True).items()}
        try:
            source = int(spec)
        except ValueError:
            raise ValueError(f"warm_start_k: cannot parse {spec!r} "
                             "(expected S or K:S,..., e.g. '4' or '3:4,4:4')") from None
        if not 1 <= source <= MAX_PREVIEW_STEPS:
            raise ValueError(f"warm_start_k: {spec!r} must be a step count in 1..{MAX_PREVIEW_STEPS}")
        return source

    def fit_weight_map(self) -> dict[int, float]:
        """``fit_weights`` as {K: weight} ('' = {}): each K within min_steps..max_steps, named once, with a
        positive finite weight."""
        return self._step_map("fit_weights")

    def residual_decay_map(self) -> dict[int, float]:
        """``residual_decay`` as {K: rho} ('' = {}), checked as ``fit_weights`` is."""
        return self._step_map("residual_decay")

    def _step_map(self, name: str, integer: bool = False) -> dict[int, float]:
        """``name`` as {K: value}: each K within min_steps..max_steps, named once, with a positive finite value
        (``integer``: a whole number within 1..MAX_PREVIEW_STEPS, a step count)."""
        out: dict[int, float] = {}
        for part in filter(None, (p.strip() for p in str(getattr(self, name)).split(","))):
            k, sep, w = part.partition(":")
            try:
                k, w = int(k), int(w) if integer else float(w)
            except ValueError:
                raise ValueError(f"{name}: cannot parse {part!r} (expected K:{'S' if integer else 'W'}, "
                                 f"e.g. '{'3:4,4:4' if integer else '7:0.2,8:0.2'}')") from None
            if not sep or not self.min_steps <= k <= self.max_steps or k in out:
                raise ValueError(f"{name}: {part!r} must name a K in {self.min_steps}..{self.max_steps} once, "
                                 f"as K:{'S' if integer else 'W'}")
            if integer and not 1 <= w <= MAX_PREVIEW_STEPS:
                raise ValueError(f"{name}: {part!r} must give a step count in 1..{MAX_PREVIEW_STEPS}")
            check_positive_number(name, w)
            out[k] = w
        return out

    def round_robin(self) -> list[int]:
        """One round of method 'tables': every K of the step range once, then the repeated ones again."""
        return list(range(self.min_steps, self.max_steps + 1)) + self.repeat_step_counts()


def differentiable_guided_eps(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float) -> torch.Tensor:
    """``Denoiser.guided_eps`` with the graph kept: d eps / d x flows back to the coefficients.

    A real-valued (floating) ``t``, as on a relaxed learned grid, enters the network as a float and
    alpha_t, sigma_t come from the schedule's continuous interpolation, so d eps / d t flows back to
    the time grid as well. One scalar timestep for the whole batch. Conditioning extras (SDXL's and
    SD3's pooled embeddings and time ids) go to the network as ``guided_eps`` passes them, and on a flow
    schedule at t = 1 the output is x0_hat (``Denoiser.solver_output``). A backend with a guidance of its
    own (FLUX's distilled guidance embedding overrides ``guided_eps``) is refused: use PPO for it.
    """
    from models.base import Denoiser

    if isinstance(model, Denoiser) and type(model).guided_eps is not Denoiser.guided_eps:
        raise ValueError(f"model: distillation needs the plain classifier-free guidance of Denoiser.guided_eps; "
                         f"{type(model).__name__} guides its own way (train it with PPO: python -m training.train)")
    raw = getattr(type(model).model_output, "__wrapped__", type(model).model_output)
    if torch.is_tensor(t) and t.is_floating_point():
        t = t.to(torch.float64)
        alpha, sigma = model.schedule.alpha_sigma_continuous(t)
    else:
        t = torch.as_tensor(t, dtype=torch.long)
        alpha, sigma = model.schedule.alpha_sigma(t)
    x32 = x.to(model.device, torch.float32)
    context = torch.cat([cond.uncond, cond.cond])
    mask = None if cond.cond_mask is None else torch.cat([cond.uncond_mask, cond.cond_mask])
    extra = {}
    if getattr(cond, "cond_extra", None):
        extra = {"extra": {k: torch.cat([cond.uncond_extra[k], v]) for k, v in cond.cond_extra.items()}}
    out = raw(model, torch.cat([x32, x32]).to(model.dtype), t, context, mask, **extra)
    alpha, sigma = alpha.to(torch.float32).to(model.device), sigma.to(torch.float32).to(model.device)
    solver_output = getattr(model, "solver_output", None)
    if solver_output is not None:
        eps = solver_output(out, torch.cat([x32, x32]), alpha, sigma)
    else:
        eps = to_epsilon(out, torch.cat([x32, x32]), alpha, sigma, model.schedule.prediction_type)
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def latent_ssim(target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row SSIM of two latent batches read as images in [-1, 1], i.e. of (x + 1) / 2 at data range 1
    (``training.rewards.ssim``, torchmetrics); differentiable in ``x``, and not clamped, so the gradient
    also reaches values the decoder would clip."""
    from training.rewards import ssim

    return ssim((target + 1.0) / 2.0, (x + 1.0) / 2.0)


def pooled(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over COLOUR_POOL x COLOUR_POOL blocks (a latent smaller than that: over all of it)."""
    side = min(COLOUR_POOL, *x.shape[-2:])
    return torch.nn.functional.avg_pool2d(x, side)


def model_palette(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The colours the scene analyzer names pixels by, as (refs (R, 3) float32 RGB in [0, 1], names (R,) long);
    only the embedded model has them (:func:`models.embedded.analyzer.palette_references`)."""
    from models.embedded import is_embedded
    from models.embedded.analyzer import palette_references

    if not is_embedded(model):
        raise ValueError("label_weight and coverage_weight need the embedded model's palette (its scene analyzer's "
                         f"colours); model {getattr(model, 'model_id', model)!r} has none")
    refs, names = palette_references()
    return torch.from_numpy(refs).float(), torch.from_numpy(names).long()


def palette_label_ce(target: torch.Tensor, x: torch.Tensor, refs: torch.Tensor, names: torch.Tensor,
                     tau: float = LABEL_TEMPERATURE) -> torch.Tensor:
    """Per-row cross-entropy of ``x``'s soft palette labels against ``target``'s hard ones, averaged over pixels.

    Both latents are read as images (x + 1) / 2 clamped to [0, 1], as the decoder does. The target pixel's
    label is the name of its nearest reference colour (``analyzer.colour_labels``); the preview pixel's
    label distribution is p(c) = sum_{r named c} exp(-|x - ref_r|^2 / tau) / sum_r exp(-|x - ref_r|^2 / tau).
    A pixel well inside its colour costs about 0; one on the wrong side of a boundary between two names
    (an object's rim, where the analyzer's main region and silhouette are decided) costs the most."""
    def squared_distances(latent: torch.Tensor) -> torch.Tensor:  # (B, H, W, R)
        rgb = ((latent.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)
        return (rgb.unsqueeze(-2) - refs.to(rgb)).pow(2).sum(-1)

    logits = -squared_distances(x) / tau
    log_groups = torch.log(torch.nn.functional.one_hot(names, int(names.max()) + 1).to(logits))  # 0 or -inf
    per_name = torch.logsumexp(logits.unsqueeze(-1) + log_groups, dim=-2)  # (B, H, W, C)
    log_p = per_name - torch.logsumexp(per_name, dim=-1, keepdim=True)
    with torch.no_grad():
        want = names.to(log_p.device)[squared_distances(target).argmin(-1)]
    return -log_p.gather(-1, want.unsqueeze(-1)).squeeze(-1).flatten(1).mean(1)


def main_coverage_mse(target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row MSE of ``x``'s coverage of the target's main object against the target's own, where the scene
    analyzer reads the object's shape (:func:`models.embedded.analyzer.main_region`): in the window around the
    target's main region, a pixel's coverage is its projection on the segment from the background's reference
    colour to the object's, clipped to [0, 1], kept on the region grown by one pixel and 0 elsewhere. Its shape
    template is read from this map, so a rounded corner or a bridged gap between two copies costs here in
    proportion to the object's size, not the image's. Rows whose target has no main object cost 0."""
    from models.embedded.analyzer import coverage, main_region

    rgb = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0  # (B, 3, H, W), as the analyzer reads an image

    def as_t(a: Any) -> torch.Tensor:
        return torch.as_tensor(a, dtype=rgb.dtype, device=rgb.device)

    out = []
    for i in range(len(x)):
        region = main_region(((target[i].detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0))[2]
        if region is None:
            out.append(rgb.new_zeros(()))
            continue
        y0, y1, x0, x1 = region.box
        window = rgb[i, :, y0:y1, x0:x1].permute(1, 2, 0)
        alpha = coverage(window, as_t(region.fg), as_t(region.bg)) * as_t(region.grown)
        out.append((alpha - as_t(region.alpha)).pow(2).mean())
    return torch.stack(out)


def distill(config: DistillConfig, model: Any, dataset: Any,
            progress: bool = True) -> tuple[ConsistencyPolicy, list[dict], dict[str, Any] | None]:
    """Fit the policy's mean coefficients (and, with ``time_grid``, its time grid) by gradient descent
    through the sampler; returns (policy, per-update log, fit) where fit (method 'tables'; else None) holds
    the fitted per-K tables and the regression's largest errors.
    The Gaussian's log-std is not touched.

    method ``tables`` (default): every K of the step range has its own free residuals a_K (K, m - 1) and grid
    log-weights g_K (K,), each with its own Adam; updates go round robin over K. The policy's two heads
    are then regressed onto the fitted (a_K, g_K) (:func:`fit_policy`).
    method ``policy``: gradient descent on the policy's parameters, one random K per update.
    """
    from tqdm.auto import tqdm

    from models.base import Conditioning
    from solver.policy import reweight_grid

    cfg = config.validate()
    palette = model_palette(model) if cfg.label_weight or cfg.coverage_weight else None
    decay, labelled = cfg.residual_decay_map(), set(cfg.labelled_step_counts())
    torch.manual_seed(cfg.seed)
    policy = ConsistencyPolicy(order=cfg.order, base=cfg.base, hidden=cfg.hidden, time_grid=cfg.time_grid,
                               start=cfg.learn_start, final=cfg.final, step_tables=cfg.own_step_counts())
    guidance, schedule, log = float(dataset.index.guidance), model.schedule, []
    steps, rounds = list(range(cfg.min_steps, cfg.max_steps + 1)), cfg.round_robin()
    warm: dict[int, dict[str, Any]] = {}
    if cfg.warm_start:
        warm = warm_start_tables(policy, schedule, model.scheduler_config, cfg.warm_start, steps,
                                 model_id=getattr(model, "model_id", None), source_k=cfg.warm_start_sources())
    anchors: dict[int, torch.Tensor] = {}
    if cfg.method == "tables":
        free = {}
        for k in steps:
            init = warm.get(k)
            a = torch.zeros(k, cfg.order - 1, dtype=torch.float64) if init is None else init["residual"].clone()
            g = None if not cfg.time_grid else torch.zeros(k, dtype=torch.float64) if init is None else init["g"].clone()
            u = None if not cfg.learn_start else torch.zeros((), dtype=torch.float64) if init is None or init["u"] is None \
                else init["u"].clone()
            anchors[k] = a.clone()
            free[k] = tuple(None if v is None else v.requires_grad_(True) for v in (a, g, u))
        params = {k: [p for p in trio if p is not None] for k, trio in free.items()}
        # raw coefficients and log-weights are O(1): a larger step than the MLP's
        optimizers = {k: torch.optim.Adam(ps, lr=cfg.learning_rate * TABLE_LR_SCALE) for k, ps in params.items()}
    else:
        params = {None: mean_heads(policy)}
        optimizers = {None: torch.optim.Adam(params[None], lr=cfg.learning_rate)}

    def grid_and_table(k: int) -> tuple[Any, torch.Tensor]:
        if cfg.method == "policy":
            grid = policy.relaxed_time_grid(schedule, k)
            return grid, policy.mean_table(grid)
        a, g, u = free[k]
        default = policy.default_grid(schedule, k)
        grid = default if g is None else reweight_grid(schedule, default, g, relaxed=True, start=u)
        return grid, policy.compose(grid, a)

    cache: dict[str, Any] = {}
    start = last = time.perf_counter()
    for update in tqdm(range(cfg.num_updates), desc="distill", disable=not progress):
        rows, k = update_batch(cfg, update, rounds, len(dataset))
        prompts = [dataset.prompts[r] for r in rows.tolist()]
        for p in set(prompts) - set(cache):
            cache[p] = model.encode_prompts([p], dataset.index.negative_prompt)
        cond = Conditioning.cat([cache[p] for p in prompts])
        grid, table = grid_and_table(k)
        x = lmm_rollouts(lambda x, t: differentiable_guided_eps(model, x, t, cond, guidance),
                         dataset.noise[rows].to(model.device), grid,
                         table.to(torch.float32).unsqueeze(0).expand(len(rows), -1, -1))
        loss, mse, entry = distill_loss(cfg, x, dataset.target[rows].to(x.device), palette if k in labelled else None)
        if k in decay:
            a = free[k][0] - anchors[k] if cfg.method == "tables" else policy.residual_mean(grid)
            loss = loss + decay[k] * a.pow(2).sum()  # pulled toward the rule it started from
        key = k if cfg.method == "tables" else None
        optimizers[key].zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params[key], cfg.max_grad_norm)
        optimizers[key].step()
        log.append({"update": update, "steps": k, "psnr_latent": float(-10 * torch.log10(mse.detach()).mean()),
                    "grad_norm": float(grad_norm), **entry})
        now, took = time.perf_counter(), time.perf_counter() - last
        last = now
        if cfg.max_minutes is not None and now - start + took > 60 * cfg.max_minutes:  # the next would end past it
            break
    error = regress_onto_tables(policy, schedule, free, cfg, warm) if cfg.method == "tables" else None
    return policy, log, error


def update_batch(cfg: DistillConfig, update: int, rounds: list[int], num_rows: int) -> tuple[torch.Tensor, int]:
    """The rows and step count K of update number ``update``: a pure function of (seed, update), so a run
    draws the same batches whatever ran before. Method 'tables' takes K round robin from ``rounds``,
    'policy' draws it."""
    digest = hashlib.sha256(f"{cfg.seed}:{update}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    rows = torch.randint(num_rows, (cfg.batch_size,), generator=gen)
    if cfg.method == "tables":
        return rows, rounds[update % len(rounds)]
    return rows, int(torch.randint(cfg.min_steps, cfg.max_steps + 1, (1,), generator=gen))


def distill_loss(cfg: DistillConfig, x: torch.Tensor, target: torch.Tensor,
                 palette: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The module docstring's loss without the pull toward the base rule: mean over rows of log MSE plus
    each weighted term of ``cfg`` (structure, colour, edges; the analyzer's label and coverage terms when
    ``palette`` is given, on the K ``label_steps`` names).
    Returns (loss, per-row MSE, {term: value} for the update log)."""
    from training.rewards import gradient_mse

    mse = (x - target).pow(2).flatten(1).mean(1)
    loss = torch.log(mse + 1e-10).mean()
    entry = {}
    if cfg.ssim_weight:
        structure = latent_ssim(target, x)
        loss = loss + cfg.ssim_weight * torch.log(1.0 - structure + 1e-6).mean()
        entry["ssim"] = float(structure.detach().mean())
    if cfg.colour_weight:
        low = (pooled(x) - pooled(target)).pow(2).flatten(1).mean(1)
        loss = loss + cfg.colour_weight * torch.log(low + 1e-10).mean()
        entry["psnr_colour"] = float(-10 * torch.log10(low.detach() + 1e-10).mean())
    if cfg.edge_weight:
        edges = gradient_mse((target + 1.0) / 2.0, (x + 1.0) / 2.0)
        loss = loss + cfg.edge_weight * torch.log(edges + 1e-10).mean()
        entry["psnr_edges"] = float(-10 * torch.log10(edges.detach() + 1e-10).mean())
    if palette is not None and cfg.coverage_weight:
        cover = main_coverage_mse(target, x)
        loss = loss + cfg.coverage_weight * torch.log(cover + 1e-6).mean()
        entry["coverage_mse"] = float(cover.detach().mean())
    if palette is not None and cfg.label_weight:
        ce = palette_label_ce(target, x, *palette)
        loss = loss + cfg.label_weight * torch.log(ce + 1e-6).mean()
        entry["label_ce"] = float(ce.detach().mean())
    return loss, mse, entry


def regress_onto_tables(policy: ConsistencyPolicy, schedule: Any,
                        free: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], cfg: DistillConfig,
                        warm: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Method 'tables', last step: regress the policy's heads onto the fitted (a_K, g_K, u_K) (:func:`fit_policy`);
    returns the regression's largest errors and, under ``tables``, the fitted tables themselves (with the
    learned start shift, the warm start's name and the resulting timesteps)."""
    from solver.policy import reweight_grid

    fitted = {k: (a.detach(), None if g is None else g.detach()) for k, (a, g, _) in free.items()}
    starts = {k: u.detach() for k, (_, _, u) in free.items() if u is not None}
    error = fit_policy(policy, schedule, fitted, iterations=cfg.fit_iterations, lr=cfg.fit_learning_rate,
                       seed=cfg.seed, weights=cfg.fit_weight_map(), starts=starts)

    def timesteps(k: int, g: torch.Tensor | None) -> list[float]:
        default = policy.default_grid(schedule, k)
        return (default if g is None else reweight_grid(schedule, default, g, start=starts.get(k))).timesteps.tolist()

    error["tables"] = {str(k): {"residual": a.tolist(), "grid_log_weights": None if g is None else g.tolist(),
                                "start_shift": float(starts[k]) if k in starts else None,
                                "warm_start": warm[k]["name"] if k in warm else None,
                                "timesteps": timesteps(k, g)}
                       for k, (a, g) in fitted.items()}
    logger.info("policy regressed onto the fitted tables: max errors coefficients %.4f, grid %.4f",
                error["coef_max_error"], error["grid_max_error"])
    return error


def fit_policy(policy: ConsistencyPolicy, schedule: Any, fitted: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
               iterations: int = 3000, lr: float = 3e-3, seed: int = 0,
               weights: dict[int, float] | None = None,
               starts: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """Regress the policy's heads onto per-K fitted tables: the grid head onto g_K on the default grid's
    increments, the coefficient head onto a_K on the features of the grid the policy will sample on
    (g_K rounded); g is compared up to a constant per K, which leaves the grid unchanged. ``weights``
    ({K: w}, default 1) weighs each K's rows in both losses. Then the own table of each K among the policy's
    ``step_tables`` is set to what the shared heads miss there, so the policy returns K's fitted table
    exactly (a low weight keeps such a K's table from pulling the shared heads, and so the other K).
    Returns the largest absolute errors left (``coef_max_error``, ``grid_max_error``,
    ``start_max_error_steps``, over every K whatever its weight).
    Pure regression: no model calls.

    The grid head reads only the end points of each increment, and those overlap across K, so it cannot
    hold every K's table (max error about 0.2): the regression blends neighbouring K. The measurements
    behind the defaults (iterations, learning rate, weights) are in ``training/results/experiments.md``."""
    from solver.policy import START_SCALE

    torch.manual_seed(seed)
    weights, starts = weights or {}, starts or {}
    with torch.no_grad():
        for own in policy.own_parameters():
            own.zero_()  # the shared heads are regressed alone, then the own tables hold what they miss
    rows = {k: _regression_rows(policy, schedule, a, g, starts.get(k)) for k, (a, g) in sorted(fitted.items())}
    x, mask, y = (torch.cat([getattr(r, f) for r in rows.values()]) for f in ("x", "mask", "y"))
    w = torch.cat([torch.full((k, 1), float(weights.get(k, 1.0))) for k in rows])
    grids = [(r.default, r.g, float(weights.get(k, 1.0))) for k, r in rows.items() if r.g is not None]
    coef_total, grid_total = (w * mask).sum().clamp_min(1e-12), max(sum(gw for _, _, gw in grids), 1e-12)
    optimizer = torch.optim.Adam(mean_heads(policy, own=False), lr=lr)
    schedule_lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    for _ in range(iterations):
        loss = (w * (policy.net(x) * mask - y) ** 2).sum() / coef_total
        for default, g, gw in grids:
            loss = loss + gw * _centred(policy.grid_mean(default) - g).pow(2).mean() / grid_total
        if policy.start_net is not None:
            for k, u in starts.items():
                loss = loss + (policy.start_mean(k) - u.to(torch.float32)).pow(2) / len(starts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule_lr.step()
    with torch.no_grad():
        for k in policy.step_tables:
            if k not in rows:
                continue
            r = rows[k]
            policy.own_table("residual", k).copy_((r.y - policy.net(r.x)) * r.mask)
            if r.g is not None and policy.own_table("grid", k) is not None:
                policy.own_table("grid", k).copy_(r.g - policy.grid_mean(r.default))
            if k in starts and policy.own_table("start", k) is not None:
                policy.own_table("start", k).copy_(starts[k].to(torch.float32) - policy.start_mean(k))
        coef_error = max((float((policy.residual_on(r.x, k) * r.mask - r.y).abs().max()) if r.mask.any() else 0.0
                          for k, r in rows.items()), default=0.0)
        grid_error = max((float(_centred(policy.grid_mean(r.default) - r.g).abs().max())
                          for r in rows.values() if r.g is not None), default=0.0)
        start_error = max((abs(float(policy.start_mean(k)) - float(u)) * START_SCALE for k, u in starts.items()),
                          default=0.0) if policy.start_net is not None else 0.0
    return {"coef_max_error": round(coef_error, 6), "grid_max_error": round(grid_error, 6),
            "start_max_error_steps": round(start_error, 3)}


class _Rows(NamedTuple):
    """K's rows of the regression onto the policy."""

    x: torch.Tensor  # step features of the grid the policy samples on (K, F)
    mask: torch.Tensor  # free dims (K, m - 1)
    y: torch.Tensor  # target a_K, masked
    default: Any  # the default grid the grid head reads
    g: torch.Tensor | None  # g_K as float32, or None without a learned grid


def _regression_rows(policy: ConsistencyPolicy, schedule: Any, a: torch.Tensor, g: torch.Tensor | None,
                     u: torch.Tensor | None) -> _Rows:
    """K's rows of the regression (:class:`_Rows`)."""
    from solver.policy import free_mask, reweight_grid, step_features

    k = a.shape[0]
    default = policy.default_grid(schedule, k)
    grid = default if g is None else reweight_grid(schedule, default, g, start=u)
    mask = free_mask(k, policy.order).to(torch.float32)
    return _Rows(step_features(grid, policy.order, policy.features), mask, a.to(torch.float32) * mask, default,
                 None if g is None else g.to(torch.float32))


def mean_heads(policy: ConsistencyPolicy, own: bool = True) -> list[torch.nn.Parameter]:
    """The parameters of the policy's deterministic outputs (coefficient head, grid and start heads if any,
    and with ``own`` the own tables); not the Gaussian's log-stds, which distillation leaves alone."""
    heads = [h for h in (policy.net, policy.grid_net, policy.start_net) if h is not None]
    return [p for h in heads for p in h.parameters()] + (policy.own_parameters() if own else [])


def warm_start_tables(policy: ConsistencyPolicy, schedule: Any, scheduler_config: Any, tuned_file: str,
                      steps: Sequence[int], model_id: str | None = None,
                      source_k: int | dict[int, int] | None = None) -> dict[int, dict[str, Any]]:
    """Per K of ``steps``: the free parameters that make ``policy`` (on its default grid) the best tuned rule
    that is an eq.-10 table (``solver.registry.tuned_tables``; a K the file does not tune takes the
    configurations tuned at the nearest K, run at K; with ``source_k`` every K takes those tuned at source_k, a
    {K: S} map each K it names those tuned at S): {K: {"name",
    "residual" a (K, m - 1), "g" (K,), "u" (scalar or None)}}. The grid is matched timestep for timestep
    (a start below T needs the policy's start head; without it such a rule is skipped); the coefficients are
    the rule's own table as residuals on the policy's base rule on that grid. The end point is the policy's."""
    from solver.policy import free_mask, grid_actions_for, reweight_grid
    from solver.registry import check_tuned, read_tuned, tuned_tables

    doc = read_tuned(tuned_file)
    check_tuned(doc, model_id, (), scheduler_config, source=f"warm_start {tuned_file!r}")
    out: dict[int, dict[str, Any]] = {}
    tables = tuned_tables(doc, scheduler_config, steps, policy.order, nearest=True, source_k=source_k)
    for k, (name, grid, table) in tables.items():
        default = policy.default_grid(schedule, k)
        try:
            g, u = grid_actions_for(schedule, default, grid.timesteps, with_start=policy.learn_start)
        except ValueError as exc:
            logger.info("warm start K=%d: %s skipped (%s)", k, name, exc)
            continue
        start = reweight_grid(schedule, default, g, start=u)
        residual = (table - policy.base_table(start))[:, : policy.order - 1] * free_mask(k, policy.order)
        out[k] = {"name": name, "residual": residual, "g": g, "u": u}
        logger.info("warm start K=%d from %s: timesteps %s", k, name, start.timesteps.tolist())
    return out


def _centred(v: torch.Tensor) -> torch.Tensor:
    """g up to its mean: the grid's increments are exp(g) renormalised, so g and g + c give the same grid."""
    return v - v.mean()


def save_distilled(policy: ConsistencyPolicy, config: DistillConfig, log: list[dict], folder: Path,
                   fit: dict[str, Any] | None = None, model: Any = None) -> None:
    """The policy plus ``train_config.json`` (values and field docs), ``metrics.json`` (the update log
    and the regression's errors) and, given ``model``, ``model_identity.json`` (the model it belongs to)."""
    policy.save(folder)
    if model is not None:
        from preview.identity import model_identity, write_identity

        write_identity(folder, model_identity(model))
    (folder / "train_config.json").write_text(json.dumps({"values": asdict(config), "docs": {
        f.name: f.metadata.get("doc", "") for f in fields(DistillConfig)}}, indent=1))
    (folder / "metrics.json").write_text(json.dumps({"updates": log, "fit": fit}, indent=1))


def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.distill", description=DistillConfig.__doc__)
    add_dataclass_arguments(parser, DistillConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(DistillConfig, args).validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    from refine.full_step import FULL_STEP_SOLVER
    from training.dataset import DatasetIndex, load_dataset

    DatasetIndex.read(config.dataset)
    if model is None:
        from runtime.cli import model_from_args

        model = model_from_args(args)
    dataset = load_dataset(config.dataset, model_id=model.model_id, reference_solver=FULL_STEP_SOLVER)
    policy, log, fit = distill(config, model, dataset)
    final = Path(config.out) / "final"
    save_distilled(policy, config, log, final, fit, model=model)
    print(json.dumps({"final": str(final), "updates": len(log), "last": log[-1] if log else None,
                      "fit": None if fit is None else {k: v for k, v in fit.items() if k != "tables"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
