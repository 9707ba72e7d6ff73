"""PPO for the ConsistencySolver policy (paper.md section 3), without the defects of section 6.4.

One update, cleanrl-shaped (style.md 5):

1. Draw ``groups_per_update`` rows (prompt, noise, target) and one step count K per group.
2. Rollout under ``no_grad``: each group is G previews of the same (prompt, noise), each with its own
   coefficients drawn from the policy. All groups with the same K run together, so a step is ONE
   guided model call for all their G x groups rollouts. The target is decoded and featurised once
   per group (T4); R = Sim(target, preview).
3. Advantages A = (R - mean_group R) / (std_group R + delta), no x10 (T5).
4. ``update_epochs`` >= 2 passes of clipped-surrogate minibatches (T1). The ratio is per step action,
   over the coefficients that step actually uses (T2); the entropy also (T3). Old log-probs are the
   same fp32 computation as the new ones, re-scored before the first epoch (T6), so the first ratio is
   exactly 1. Gradient-norm clipping; solver arithmetic in float32.
5. Metrics into the store (reward mean/std, approx KL, clip fraction, entropy, the deterministic
   coefficient tables); a checkpoint every ``checkpoint_every`` updates.

Under ``accelerate launch`` every process rolls out its own groups (its own seed) and the policy
gradients are averaged across processes before each optimiser step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from preview.identity import model_identity, write_identity
from solver.policy import ConsistencyPolicy, free_mask
from solver.schedules import TimeGrid
from training.config import TrainConfig
from training.dataset import OfflineDataset
from training.rewards import Similarity
from training.rollout import lmm_rollouts

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{5,})$")
TRAIN_CONFIG_NAME = "train_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
METRICS_NAME = "metrics.json"


# ------------------------------------------------------------------------------------------------
# Rollout storage
# ------------------------------------------------------------------------------------------------
@dataclass
class Bucket:
    """The rollouts of one update that share a step count K (G per group, groups contiguous)."""

    num_steps: int
    rows: torch.Tensor  # (n_groups,) dataset rows
    grids: list[TimeGrid]  # one per rollout (all equal to the default grid unless the time grid is learned)
    actions: torch.Tensor  # (R, K, m - 1) residual coefficients, zero on dims not free
    grid_actions: torch.Tensor | None  # (R, K) time-grid actions, or None
    rewards: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (R,)
    advantages: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (R,)
    old_log_prob: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (R, K [+1])

    @property
    def size(self) -> int:
        return int(self.actions.shape[0])


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """A = (R - mean) / (std + eps) within each consecutive group of ``group_size`` rollouts."""
    r = rewards.view(-1, group_size).double()
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return a.view(-1).float()


def step_log_probs(policy: ConsistencyPolicy, bucket: Bucket, index: torch.Tensor, schedule: Any) -> torch.Tensor:
    """log pi(a_{r,i}) per rollout and step over the free dims only, (len(index), K [+1]), float32.

    The same function scores the old and the new policy (T6). With a learned time grid a last column
    holds the grid action's log-prob.
    """
    K = bucket.num_steps
    mask = free_mask(K, policy.order).to(policy.log_std.device)
    if bucket.grid_actions is None:  # one grid: one distribution scores every rollout at once
        dist = policy.distribution(bucket.grids[0])
        return (dist.log_prob(bucket.actions[index]) * mask).sum(-1)  # (n, K)
    out = []
    for r in index.tolist():
        lp = (policy.distribution(bucket.grids[r]).log_prob(bucket.actions[r]) * mask).sum(1)  # (K,)
        out.append(torch.cat([lp, policy.time_grid_log_prob(schedule, K, bucket.grid_actions[r]).view(1)]))
    return torch.stack(out)


def action_mask(policy: ConsistencyPolicy, bucket: Bucket) -> torch.Tensor:
    """(K [+1],) bool: the step actions that exist (step 0 uses one epsilon and has no free dim)."""
    m = free_mask(bucket.num_steps, policy.order).any(1)
    if bucket.grid_actions is not None:
        m = torch.cat([m, torch.ones(1, dtype=torch.bool)])
    return m


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class PPOTrainer:
    """Holds the model, data, reward, policy and optimiser of one run; :meth:`train` runs it."""

    def __init__(
        self,
        config: TrainConfig,
        model: Any,
        dataset: OfflineDataset,
        similarity: Similarity,
        *,
        policy: ConsistencyPolicy | None = None,
        store: Any = None,
        accelerator: Any = None,
        progress: bool = True,
        on_update: Callable[[int, dict], None] | None = None,
    ) -> None:
        self.cfg = config.validate()
        self.model, self.ds, self.sim = model, dataset, similarity
        self.store, self.acc, self.progress, self.on_update = store, accelerator, progress, on_update
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.guidance = float(dataset.index.guidance)
        self.negative_prompt = dataset.index.negative_prompt
        self.size = (int(dataset.index.height), int(dataset.index.width))
        self.schedule = self._schedule_for_size(model, dataset)
        torch.manual_seed(config.seed)  # identical initial weights on every process
        if policy is None and config.init_from:
            policy = ConsistencyPolicy.load(config.init_from, order=config.order)
        self.policy = policy or ConsistencyPolicy(order=config.order, base=config.base, hidden=config.hidden,
                                                  init_log_std=config.init_log_std, time_grid=config.time_grid)
        if self.policy.order != config.order:
            raise ValueError(f"order {config.order} of the config differs from the policy's order {self.policy.order}")
        if config.explore_log_std is not None:
            with torch.no_grad():
                self.policy.log_std.fill_(config.explore_log_std)
                if self.policy.learn_time_grid:
                    self.policy.grid_log_std.fill_(config.explore_log_std)
        trainable = list(self.policy.parameters())
        if config.tables_only:
            steps = range(config.min_steps, config.max_steps + 1)
            self.policy = self.policy.with_step_tables(steps)
            trainable = [p for k in steps for kind in ("residual", "grid", "start")
                         if (p := self.policy.own_table(kind, k)) is not None]
            for p in self.policy.parameters():
                p.requires_grad_(any(p is q for q in trainable))  # frozen: no grad, so no share of the norm clip
        self.optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, eps=1e-5)
        self.update = 0
        self.run_id: int | None = None
        self.elapsed = 0.0
        self._cond_cache: dict[str, Any] = {}
        self.history: list[dict] = []
        self.initial_reward: dict[str, float] | None = None  # the deterministic reward before training
        self._stored: tuple[int, int] | None = None  # (update, store checkpoint id) of the last stored policy

    # -- data --------------------------------------------------------------------------------
    def _generator(self, update: int, salt: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.cfg.seed}:{self.rank}:{update}:{salt}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @staticmethod
    def _schedule_for_size(model: Any, dataset: OfflineDataset) -> Any:
        """The model's schedule, or for an editing dataset of another size than the model's default the
        schedule of that size (FLUX's time grid depends on it: ``Denoiser.scheduler_config_for``), the one
        the preview engine uses for edits of that size."""
        size = (int(dataset.index.height), int(dataset.index.width))
        if not dataset.takes_image or size == tuple(model.default_size):
            return model.schedule
        from solver.schedules import schedule_from_config

        return schedule_from_config(model.scheduler_config_for(*size))

    def _cond(self, prompts: Sequence[str]) -> Any:
        from models.base import Conditioning

        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            enc = self.model.encode_prompts(missing, self.negative_prompt)
            for j, p in enumerate(missing):
                self._cond_cache[p] = enc.select([j])
        return Conditioning.cat([self._cond_cache[p] for p in prompts])

    def _row_cond(self, rows: Sequence[int]) -> Any:
        """The conditioning of dataset ``rows``: each row's prompt and, for an editing dataset, its input
        image (``model.image_conditioning`` per row; ``training.dataset.condition_on_images``)."""
        cond = self._cond([self.ds.prompts[r] for r in rows])
        if not self.ds.takes_image:
            return cond
        from training.dataset import condition_on_images

        return condition_on_images(self.model, cond, self.ds.row_images(rows), *self.size)

    def draw_groups(self, update: int) -> dict[int, torch.Tensor]:
        """K -> dataset rows of the groups drawn for ``update`` (this process's share)."""
        g = self._generator(update, "groups")
        rows = torch.randint(len(self.ds), (self.cfg.groups_per_update,), generator=g)
        ks = torch.randint(self.cfg.min_steps, self.cfg.max_steps + 1, (self.cfg.groups_per_update,), generator=g)
        return {int(k): rows[ks == k] for k in torch.unique(ks)}

    # -- rollout -----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, num_steps: int, rows: torch.Tensor, update: int) -> Bucket:
        G, policy, schedule = self.cfg.group_size, self.policy, self.schedule
        gen = self._generator(update, f"policy-{num_steps}")
        R = G * len(rows)
        rollout_rows = rows.repeat_interleave(G)
        tables, actions, grids, grid_actions = [], [], [], []
        default_grid = schedule.grid(num_steps)
        for _ in range(R):
            grid = default_grid
            if policy.learn_time_grid:
                grid, g_act, _ = policy.sample_time_grid(schedule, num_steps, gen)
                grid_actions.append(g_act)
            table, act, _ = policy.sample_table(grid, gen)
            tables.append(table)
            actions.append(act)
            grids.append(grid)
        cond = self._row_cond(rollout_rows.tolist())
        noise = self.ds.noise[rollout_rows].to(self.model.device)
        if policy.learn_time_grid:
            eps_fn = lambda x, t: self.model.guided_eps(x, t, cond, self.guidance)  # noqa: E731
            latents = lmm_rollouts(eps_fn, noise, grids, torch.stack(tables))
        else:
            def eps_fn(x: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
                return self.model.guided_eps(x, t, cond if index is None else cond.select(index), self.guidance)

            latents = lmm_rollouts(eps_fn, noise, grids[0], torch.stack(tables), group_size=G)
        bucket = Bucket(num_steps=num_steps, rows=rows, grids=grids, actions=torch.stack(actions),
                        grid_actions=torch.stack(grid_actions) if grid_actions else None)
        bucket.rewards = self.score(rows, latents)
        bucket.advantages = group_advantages(bucket.rewards, G, self.cfg.adv_eps)
        return bucket

    @torch.no_grad()
    def score(self, rows: torch.Tensor, preview_latents: torch.Tensor) -> torch.Tensor:
        """Sim(target, preview) for previews laid out group by group; each target decoded once (T4)."""
        G = preview_latents.shape[0] // len(rows)
        target_features = self.sim.features(self.model.decode(self.ds.target[rows].to(self.model.device)))
        preview_features = self.sim.features(self.model.decode(preview_latents))
        expand = torch.arange(len(rows)).repeat_interleave(G)
        return self.sim.compare(self.sim.select(target_features, expand), preview_features).float().cpu()

    # -- update ------------------------------------------------------------------------------
    def _all_reduce_grads(self) -> None:
        if self.world > 1:
            for p in self.policy.parameters():
                if p.grad is not None:
                    p.grad.copy_(self.acc.reduce(p.grad, reduction="mean"))

    def _mean_across(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.acc.device)
        return float(self.acc.reduce(t, reduction="mean").item())

    def optimise(self, buckets: list[Bucket], update: int) -> dict[str, float]:
        """update_epochs x num_minibatches clipped-surrogate steps over this update's rollouts."""
        cfg, policy, schedule = self.cfg, self.policy, self.schedule
        masks = [action_mask(policy, b) for b in buckets]
        with torch.no_grad():
            for b in buckets:
                b.old_log_prob = step_log_probs(policy, b, torch.arange(b.size), schedule)
        gen = self._generator(update, "minibatches")
        stats: dict[str, list[float]] = {"pg_loss": [], "entropy": [], "approx_kl": [], "clip_frac": [], "grad_norm": []}
        for epoch in range(cfg.update_epochs):
            perms = [torch.randperm(b.size, generator=gen) for b in buckets]
            epoch_kl = []
            for mb in range(cfg.num_minibatches):
                logratios, advs, ents = [], [], []
                for b, mask, perm in zip(buckets, masks, perms):
                    idx = perm[mb * b.size // cfg.num_minibatches : (mb + 1) * b.size // cfg.num_minibatches]
                    if len(idx) == 0:
                        continue
                    new = step_log_probs(policy, b, idx, schedule)
                    logratio = (new - b.old_log_prob[idx])[:, mask]  # (n, actions that exist)
                    logratios.append(logratio.reshape(-1))
                    advs.append(b.advantages[idx].unsqueeze(1).expand_as(logratio).reshape(-1))
                    ents.append(policy.entropy(b.grids[0])[mask[: b.num_steps]])
                logratio, adv = torch.cat(logratios), torch.cat(advs)
                ratio = logratio.exp()
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                entropy = torch.cat(ents).mean()
                loss = pg_loss - cfg.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._all_reduce_grads()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    approx_kl = float(((ratio - 1) - logratio).mean())
                    stats["clip_frac"].append(float(((ratio - 1).abs() > cfg.clip_coef).float().mean()))
                stats["pg_loss"].append(float(pg_loss.detach()))
                stats["entropy"].append(float(entropy.detach()))
                stats["approx_kl"].append(approx_kl)
                stats["grad_norm"].append(float(grad_norm))
                epoch_kl.append(approx_kl)
            if cfg.target_kl is not None and self._mean_across(sum(epoch_kl) / len(epoch_kl)) > cfg.target_kl:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["clip_frac_last_epoch"] = sum(stats["clip_frac"][-cfg.num_minibatches:]) / cfg.num_minibatches
        out["approx_kl_last_epoch"] = sum(stats["approx_kl"][-cfg.num_minibatches:]) / cfg.num_minibatches
        out["epochs"] = epoch + 1
        return out

    def coefficient_tables(self) -> dict[str, list[list[float]]]:
        """The deterministic coefficients, K -> (K, m) table, for every K of the training range."""
        schedule = self.schedule
        return {str(k): [[round(v, 5) for v in row] for row in
                         self.policy.coefficient_table(self.policy.time_grid(schedule, k)).tolist()]
                for k in range(self.cfg.min_steps, self.cfg.max_steps + 1)}

    def train_step(self, update: int) -> dict[str, Any]:
        """One PPO update: rollouts, advantages, optimisation; returns its metrics."""
        t0 = time.perf_counter()
        buckets = [self.rollout(k, rows, update) for k, rows in sorted(self.draw_groups(update).items())]
        t_rollout = time.perf_counter() - t0
        metrics = self.optimise(buckets, update)
        rewards = torch.cat([b.rewards for b in buckets])
        metrics.update(
            update=update,
            reward_mean=self._mean_across(float(rewards.mean())),
            reward_std=float(rewards.std(unbiased=False)),
            reward_group_std=float(torch.cat([b.rewards.view(-1, self.cfg.group_size).std(1, unbiased=False)
                                              for b in buckets]).mean()),
            reward_by_steps={str(b.num_steps): float(b.rewards.mean()) for b in buckets},
            log_std=[round(v, 5) for v in self.policy.log_std.detach().tolist()],
            rollouts=int(rewards.numel()),
            seconds_rollout=round(t_rollout, 3),
            seconds=round(time.perf_counter() - t0, 3),
        )
        return metrics

    # -- evaluation of the deterministic policy ---------------------------------------------------
    @torch.no_grad()
    def deterministic_reward(self, rows: torch.Tensor, steps: Sequence[int]) -> dict[str, float]:
        """Mean Sim of the deterministic policy (the inference solver) on dataset ``rows``, per K."""
        from solver.sampling import sample_lmm

        out = {}
        cond = self._row_cond(rows.tolist())
        for k in steps:
            grid = self.policy.time_grid(self.schedule, k)
            table = self.policy.coefficient_table(grid)
            x = sample_lmm(lambda x, t: self.model.guided_eps(x, t, cond, self.guidance),
                           self.ds.noise[rows].to(self.model.device), grid, table)
            out[str(k)] = float(self.score(rows, x).mean())
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: Path, metrics: dict) -> Path:
        """policy (safetensors + config), train config with field docs, optimiser, trainer state, metrics."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(exist_ok=True)
        self.policy.save(tmp)
        write_identity(tmp, model_identity(self.model))  # the model this policy belongs to
        (tmp / TRAIN_CONFIG_NAME).write_text(json.dumps(
            {"values": self.cfg.to_dict(), "docs": TrainConfig.field_docs()}, indent=1))
        save_file(_optimizer_tensors(self.optimizer), str(tmp / OPTIMIZER_NAME))
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(
            {"update": self.update, "run_id": self.run_id, "elapsed": self.elapsed, "model_id": self.model.model_id,
             "initial_reward": self.initial_reward,
             "dataset": self.cfg.dataset, "optimizer": _optimizer_meta(self.optimizer)}, indent=1))
        (tmp / METRICS_NAME).write_text(json.dumps(metrics, indent=1))
        for p in tmp.iterdir():
            os.replace(p, folder / p.name)
        tmp.rmdir()
        return folder

    def resume(self, folder: Path) -> None:
        """Continue from ``folder`` (a checkpoint written by :meth:`save`)."""
        state = json.loads((folder / TRAINER_STATE_NAME).read_text())
        if state.get("model_id") != self.model.model_id:
            raise ValueError(f"out: checkpoint {str(folder)!r} was trained on model {state.get('model_id')!r}, "
                             f"not {self.model.model_id!r}")
        policy = ConsistencyPolicy.load(folder, order=self.cfg.order)
        if policy.config_dict() != self.policy.config_dict():
            raise ValueError(f"out: checkpoint {str(folder)!r} has policy config {policy.config_dict()}, "
                             f"the run asks for {self.policy.config_dict()}")
        self.policy.load_state_dict(policy.state_dict())
        _load_optimizer(self.optimizer, load_file(str(folder / OPTIMIZER_NAME)), state["optimizer"])
        self.update, self.run_id, self.elapsed = int(state["update"]), state.get("run_id"), float(state["elapsed"])
        self.initial_reward = state.get("initial_reward")

    def _store_checkpoint(self, run_name: str, metrics: dict, activate: bool = False) -> int | None:
        """Store the current policy once per update (named after the run and update); returns its id."""
        if self.store is None:
            return None
        if self._stored is not None and self._stored[0] == self.update:
            if activate:
                self.store.set_active_checkpoint(self._stored[1])
            return self._stored[1]
        name = f"{run_name}#{self.run_id}-u{self.update:05d}"
        config = dict(self.policy.config_dict(), model_id=self.model.model_id, train=self.cfg.to_dict())
        weights = {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}
        checkpoint_id = self.store.add_checkpoint(name, config=config, weights=weights, metrics=metrics,
                                                  identity=model_identity(self.model).to_dict(),
                                                  training_run_id=self.run_id, activate=activate)
        self._stored = (self.update, checkpoint_id)
        return checkpoint_id

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run (or resume) to ``num_updates``; returns the final metrics."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.rank == 0
        out = Path(cfg.out)
        latest = latest_checkpoint(out)
        if latest is not None:
            self.resume(latest)
            logger.info("resumed from %s at update %d", latest, self.update)
        run_name = cfg.name or f"ppo:{out.resolve()}"
        if main and self.store is not None:
            self.run_id = _open_run(self.store, self.run_id, cfg, run_name)
        eval_rows = torch.arange(min(len(self.ds), 8))
        logged = _logged_updates(self.store, self.run_id) if main else set()
        bar = tqdm(total=cfg.num_updates, initial=self.update, desc="ppo", unit="update", disable=not (self.progress and main))
        steps_range = range(cfg.min_steps, cfg.max_steps + 1)
        start, metrics = time.perf_counter() - self.elapsed, {}  # the budget counts the first evaluation too
        if self.initial_reward is None:
            self.initial_reward = self.deterministic_reward(eval_rows, steps_range)
            logger.info("deterministic reward before training: %s", self.initial_reward)
        last_update_s = 0.0
        state = "done"
        try:
            while self.update < cfg.num_updates:
                t_update = time.perf_counter()
                metrics = self.train_step(self.update)
                self.update += 1
                self.elapsed = time.perf_counter() - start
                last_update_s = time.perf_counter() - t_update
                metrics["coefficient_tables"] = self.coefficient_tables()
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['approx_kl']:.4f}",
                                clip=f"{metrics['clip_frac']:.2f}")
                bar.update(1)
                if main and self.store is not None and self.update % cfg.log_every == 0 and metrics["update"] not in logged:
                    self.store.log_training_metrics(self.run_id, metrics["update"], metrics)
                self.history.append(metrics)
                if self.on_update is not None:
                    self.on_update(self.update, metrics)
                # stop once the next update (as long as the last) would end past max_minutes
                timed_out = cfg.max_minutes is not None and self.elapsed + last_update_s > 60 * cfg.max_minutes
                if self.update % cfg.checkpoint_every == 0 or self.update == cfg.num_updates or timed_out:
                    metrics["deterministic_reward"] = self.deterministic_reward(eval_rows, steps_range)
                    metrics["deterministic_reward_initial"] = self.initial_reward
                    if main:
                        self.save(out / f"checkpoint-{self.update:05d}", metrics)
                        self._store_checkpoint(run_name, metrics)
                if timed_out:
                    logger.info("max_minutes reached after %d updates", self.update)
                    break
        except KeyboardInterrupt:
            state = "interrupted"
            raise
        except Exception as err:
            state = "failed"
            if main and self.store is not None and self.run_id is not None:
                self.store.finish_training_run(self.run_id, "failed", error=str(err)[:2000])
            raise
        finally:
            bar.close()
            if state == "interrupted" and main and self.store is not None and self.run_id is not None:
                self.store.finish_training_run(self.run_id, "interrupted")
        if main:
            final = self.save(out / "final", metrics)
            checkpoint_id = self._store_checkpoint(run_name, metrics, activate=cfg.activate)
            if self.store is not None and self.run_id is not None:
                self.store.finish_training_run(self.run_id, "done")
            metrics = dict(metrics, final_dir=str(final), checkpoint_id=checkpoint_id)
        return metrics


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoint-NNNNN`` folder in ``out`` (None if there is none)."""
    if not out.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name))
                   and (p / TRAINER_STATE_NAME).is_file())
    return found[-1][1] if found else None


def _open_run(store: Any, run_id: int | None, cfg: TrainConfig, name: str) -> int:
    if run_id is not None:
        try:
            if store.get_training_run(run_id).state == "running":
                return run_id
        except Exception:  # the store was replaced: start a new run
            pass
    values = dict(cfg.to_dict(), resumed_from_run=run_id)
    return store.start_training_run({"values": values, "docs": TrainConfig.field_docs()}, name=name)


def _logged_updates(store: Any, run_id: int | None) -> set[int]:
    if store is None or run_id is None:
        return set()
    return {m.update_index for m in store.training_metrics(run_id)}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": v.detach().cpu().contiguous().reshape(v.shape) if v.ndim else v.detach().cpu().reshape(1)
            for i, s in state.items() for k, v in s.items() if isinstance(v, torch.Tensor)} or {"empty": torch.zeros(1)}


def _optimizer_meta(optimizer: torch.optim.Optimizer) -> dict:
    sd = optimizer.state_dict()
    return {"param_groups": sd["param_groups"],
            "scalar_keys": {str(i): [k for k, v in s.items() if isinstance(v, torch.Tensor) and v.ndim == 0]
                            for i, s in sd["state"].items()}}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key == "empty":
            continue
        i, name = key.split(".", 1)
        scalar = name in meta["scalar_keys"].get(i, [])
        state.setdefault(int(i), {})[name] = value.reshape(()) if scalar else value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
