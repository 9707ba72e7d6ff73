"""ConsistencySolver's policy f_theta: step features -> the m coefficients of paper eq. 10.

Parameterization (paper.md sections 1.3-1.4, 6.3 N6, 7.4):

- The coefficients are a residual on an analytic base rule (default multistep DPM-Solver-2):
  at step i with k = min(i + 1, m) past epsilons, the network's first k - 1 outputs a_1..a_{k-1}
  are the free dims, and w_j = b_j + a_j (j < k), w_k = b_k - sum_{j<k} a_j, w_j = 0 (j > k).
  Every row keeps sum w = 1, and the zero-initialized policy (last layer zero) *is* the base rule.
- Features are schedule-independent: ``lam_cur`` / ``lam_next`` / ``lam_prev`` are
  tanh(lambda / 4) of n_i, n_{i+1}, n_{i-1} (lambda = -log n, so n = 0 maps to 1; step 0 repeats
  n_0 as its previous point), ``history`` is (k - 1) / (m - 1). ``lam_prev`` and ``history`` give the
  policy the step-size ratio and step index that (t_i, t_{i+1}) alone hides (paper.md N7).
- Training distribution: a diagonal Gaussian on the free residual dims with a learned,
  state-independent log-std (continuous, no bins: N6). ``log_prob`` and ``entropy`` sum only over
  the dims that are free at each step (T2, T3).
- Inference is the mean: :meth:`ConsistencyPolicy.coefficient_table` is computed once per grid,
  cached, and bit-identical across calls; it never sees the images, so it cannot depend on the batch.
- Optional learned time grid (off by default): a second head moves the interior grid points by
  re-weighting the default grid's increments; zero-initialized it returns the default grid exactly.
- Optional learned start (``start=True``, with the time grid): a third head, read at 4 / K, moves the
  first timestep t_0 by ``START_SCALE`` train steps per unit, anywhere in [K - 1, T - 1]. Sampling then
  starts from the initial noise taken as x at t_0, as diffusers does with ``"leading"`` spacing (whose
  first timestep lies below T: ``init_noise_sigma`` = 1, the pure noise latents are x_{t_0}); eq. 10 reads
  it as y_0 = x_{t_0} / alpha_{t_0}. ``final`` picks the grid's end point (``VPSchedule.grid``: ``config``,
  ``first`` = alphas_cumprod[0] as ``final_sigmas_type="sigma_min"``, ``zero``).
- Optional own tables (``step_tables``, off by default): each step count K named carries its own residual
  (K, m - 1), grid log-weights (K,) and start shift, zero-initialized and added to the shared heads' outputs
  at that K only. The shared heads read step features that overlap across K, so they cannot hold every K's
  distilled table (``training.distill.fit_policy``); a K with its own table holds it exactly, and every
  other K (the app's whole preview range) is the shared heads alone.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from solver.coefficients import RULES, pad_table, rule_table
from solver.schedules import Schedule, TimeGrid

SCHEMA_VERSION = 1
MAX_ORDER = 8
FEATURES = ("lam_cur", "lam_next", "lam_prev", "history")
LAMBDA_SCALE = 4.0
WEIGHTS_NAME = "policy.safetensors"
CONFIG_NAME = "policy_config.json"
START_SCALE = 100.0  # train steps the start head moves t_0 per unit of its output
FINALS = (None, "config", "first", "zero")  # None: the schedule's own end point (VPSchedule.final_point)
_BASE_ORDER = {"ddim": 1, "ab1": 1, "ab2": 2, "ab3": 3, "ab4": 4, "dpm2m": 2, "ipndm": 4}


def check_step_tables(step_tables: Sequence[int]) -> tuple[int, ...]:
    """Validate ``step_tables``: distinct positive step counts, returned sorted."""
    steps = tuple(step_tables)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"step_tables must be distinct positive step counts, got {list(steps)!r}")
    return tuple(sorted(steps))


def _squash(lam: torch.Tensor) -> torch.Tensor:
    return torch.tanh(lam / LAMBDA_SCALE)


def check_order(order: int) -> int:
    """Validate the LMM order m (number of past epsilons a step may use)."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an integer in 1..{MAX_ORDER}, got {order!r}")
    return order


def history_lengths(num_steps: int, order: int) -> torch.Tensor:
    """k_i = min(i + 1, m): how many past epsilons step i can use. Shape (K,)."""
    return torch.clamp(torch.arange(num_steps) + 1, max=order)


def free_mask(num_steps: int, order: int) -> torch.Tensor:
    """(K, m - 1) bool: residual dim j is free at step i iff j < k_i - 1."""
    k = history_lengths(num_steps, order)
    return torch.arange(order - 1).unsqueeze(0) < (k - 1).unsqueeze(1)


def step_features(grid: TimeGrid, order: int, features: Sequence[str] = FEATURES) -> torch.Tensor:
    """Schedule-independent features of every step of ``grid``, shape (K, len(features)), float32."""
    num_steps = grid.num_steps
    u = _squash(grid.lam)  # (K+1,), n = 0 -> 1
    columns = {
        "lam_cur": u[:-1],
        "lam_next": u[1:],
        "lam_prev": torch.cat([u[:1], u[:-2]]),
        "history": (history_lengths(num_steps, order) - 1).to(torch.float64) / max(order - 1, 1),
    }
    return torch.stack([columns[name] for name in features], dim=1).to(torch.float32)


class ConsistencyPolicy(nn.Module):
    """f_theta of paper eq. 10 as a residual on a base rule; see the module docstring.

    Args:
        order: m, the number of past epsilons a step may combine (1..8).
        base: the analytic rule the zero-initialized policy reproduces (a key of ``coefficients.RULES``).
        features: which step features the MLP reads (subset of :data:`FEATURES`, in order).
        hidden: width of the two hidden layers.
        init_log_std: initial log standard deviation of the training distribution.
        time_grid: add the learned time-grid head.
        start: add the learned start head (needs ``time_grid``): the first timestep may lie below T.
        final: the grid's end point on a VP schedule (``config``, ``first``, ``zero``; None: the schedule's own).
        step_tables: the step counts K that carry their own table on top of the shared heads (module docstring).
    """

    def __init__(
        self,
        order: int = 4,
        base: str = "dpm2m",
        features: Sequence[str] = FEATURES,
        hidden: int = 64,
        init_log_std: float = -3.0,
        time_grid: bool = False,
        schedule_family: str | None = None,
        start: bool = False,
        final: str | None = None,
        step_tables: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if schedule_family not in (None, "vp", "flow"):
            raise ValueError(f"schedule_family must be 'vp', 'flow' or None, got {schedule_family!r}")
        # The schedule family ("vp" / "flow") the policy was trained on; None = not recorded. Checked by
        # solver.registry.check_policy_family: a policy is refused on the other family.
        self.schedule_family = schedule_family
        self.order = check_order(order)
        if base not in RULES:
            raise ValueError(f"base must be one of {sorted(RULES)}, got {base!r}")
        if _BASE_ORDER[base] > order:
            raise ValueError(f"order {order} is too small for base {base!r}, which needs {_BASE_ORDER[base]}")
        features = tuple(features)
        if not features or len(set(features)) != len(features) or not set(features) <= set(FEATURES):
            raise ValueError(f"features must be distinct names from {FEATURES}, got {features!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        if not math.isfinite(init_log_std):
            raise ValueError(f"init_log_std must be finite, got {init_log_std!r}")
        self.base = base
        self.features = features
        self.hidden = hidden
        self.init_log_std = float(init_log_std)
        self.learn_time_grid = bool(time_grid)
        if start and not time_grid:
            raise ValueError("start: the learned start needs the learned time grid (time_grid=True)")
        if final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {final!r}")
        self.learn_start = bool(start)
        self.final = final
        free = order - 1
        with warnings.catch_warnings():  # order 1 has no free dims: an empty output layer is intended
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.net = nn.Sequential(
                nn.Linear(len(features), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, free)
            )
        self.log_std = nn.Parameter(torch.full((free,), self.init_log_std))
        self.grid_net: nn.Sequential | None = None
        if self.learn_time_grid:
            self.grid_net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            self.grid_log_std = nn.Parameter(torch.tensor(self.init_log_std))
        self.start_net: nn.Sequential | None = None
        if self.learn_start:
            self.start_net = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # Own tables: parameters per K named, added to the heads' outputs at that K (zero: the heads alone).
        self.step_tables = check_step_tables(step_tables)
        self.own_residual = nn.ParameterDict({str(k): nn.Parameter(torch.zeros(k, free)) for k in self.step_tables})
        self.own_grid = nn.ParameterDict({str(k): nn.Parameter(torch.zeros(k)) for k in self.step_tables}
                                         if self.learn_time_grid else {})
        self.own_start = nn.ParameterDict({str(k): nn.Parameter(torch.zeros(())) for k in self.step_tables}
                                          if self.learn_start else {})
        self.reset_head()
        self._cache: dict[tuple, torch.Tensor] = {}

    def reset_head(self) -> None:
        """Zero the output layers and own tables, so the policy is exactly its base rule (and default grid)."""
        for head in (self.net, self.grid_net, self.start_net):
            if head is not None:
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
        for p in self.own_parameters():
            nn.init.zeros_(p)

    def own_parameters(self) -> list[nn.Parameter]:
        """The own tables' parameters (``step_tables``): residuals, then grid log-weights, then start shifts."""
        return [p for own in (self.own_residual, self.own_grid, self.own_start) for p in own.values()]

    def own_table(self, kind: str, num_steps: int) -> torch.Tensor | None:
        """K's own ``residual`` (K, m - 1), ``grid`` log-weights (K,) or ``start`` shift (scalar); None where
        K has none (not in ``step_tables``, or the policy lacks that head)."""
        own = {"residual": self.own_residual, "grid": self.own_grid, "start": self.own_start}[kind]
        return own[str(num_steps)] if str(num_steps) in own else None

    # Coefficients --------------------------------------------------------------------------

    def base_table(self, grid: TimeGrid) -> torch.Tensor:
        """The base rule on ``grid``, zero-padded to (K, m), float64."""
        return pad_table(rule_table(self.base, grid), self.order)

    def residual_mean(self, grid: TimeGrid) -> torch.Tensor:
        """Mean residual a (K, m - 1), float32, zero on dims that are not free."""
        x = step_features(grid, self.order, self.features).to(self.log_std.device)
        mask = free_mask(grid.num_steps, self.order).to(x.device)
        return self.residual_on(x, grid.num_steps) * mask

    def residual_on(self, x: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The coefficient head on step features ``x`` (K, F) plus K's own residual if it has one; unmasked."""
        own = self.own_table("residual", num_steps)
        return self.net(x) if own is None else self.net(x) + own

    def compose(self, grid: TimeGrid, residual: torch.Tensor) -> torch.Tensor:
        """w = base + residual, with the last used coefficient absorbing -sum(a) so sum w = 1. (K, m) float64.

        Differentiable in ``residual`` (for fitting coefficients by gradient descent).
        """
        num_steps, m = grid.num_steps, self.order
        a = residual.to(torch.float64).cpu() * free_mask(num_steps, m)
        last = nn.functional.one_hot(history_lengths(num_steps, m) - 1, m).to(torch.float64)
        delta = nn.functional.pad(a, (0, 1)) - last * a.sum(1, keepdim=True)
        return self.base_table(grid) + delta

    def mean_table(self, grid: TimeGrid) -> torch.Tensor:
        """Deterministic coefficients (K, m) float64, differentiable; not cached."""
        return self.compose(grid, self.residual_mean(grid))

    @torch.no_grad()
    def coefficient_table(self, grid: TimeGrid) -> torch.Tensor:
        """Inference coefficients: the mean of the policy, (K, m) float64 on the CPU.

        Computed once per grid and parameter state (cached), so repeated calls return the very same
        values; a sampler then costs one table-row lookup per step.
        """
        key = (
            tuple(grid.timesteps.tolist()),
            tuple(grid.n.tolist()),
            tuple(p._version for p in self.parameters()),
        )
        table = self._cache.get(key)
        if table is None:
            if len(self._cache) > 64:
                self._cache.clear()
            table = self.mean_table(grid).detach()
            self._cache[key] = table
        return table.clone()

    # Training distribution (diagonal Gaussian on the free residual dims) -------------------

    def distribution(self, grid: TimeGrid) -> torch.distributions.Normal:
        mean = self.residual_mean(grid)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def sample_table(
        self, grid: TimeGrid, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw coefficients for one rollout: (table (K, m) float64, actions (K, m - 1), log_prob (K,)).

        ``actions`` are the sampled residuals (zero on dims that are not free); ``log_prob[i]`` sums over
        the free dims of step i only. Noise comes from ``generator`` (CPU) for reproducible rollouts.
        """
        dist = self.distribution(grid)
        mask = free_mask(grid.num_steps, self.order).to(dist.mean.device)
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
        actions = (dist.mean + dist.stddev * noise).detach() * mask
        log_prob = (dist.log_prob(actions) * mask).sum(1)
        return self.compose(grid, actions), actions, log_prob

    def log_prob(self, grid: TimeGrid, actions: torch.Tensor) -> torch.Tensor:
        """Re-score stored ``actions`` (K, m - 1) under the current policy: (K,), free dims only."""
        dist = self.distribution(grid)
        mask = free_mask(grid.num_steps, self.order).to(dist.mean.device)
        if actions.shape != dist.mean.shape:
            raise ValueError(f"actions must have shape {tuple(dist.mean.shape)}, got {tuple(actions.shape)}")
        return (dist.log_prob(actions.to(dist.mean)) * mask).sum(1)

    def entropy(self, grid: TimeGrid) -> torch.Tensor:
        """Entropy per step (K,), summed over the free dims only."""
        dist = self.distribution(grid)
        mask = free_mask(grid.num_steps, self.order).to(dist.mean.device)
        return (dist.entropy() * mask).sum(1)

    # Learned time grid (optional head) -----------------------------------------------------

    def grid_mean(self, default: TimeGrid) -> torch.Tensor:
        """The grid head's deterministic log-weights g (K,) of the K increments of ``default``."""
        assert self.grid_net is not None
        u = _squash(default.lam)
        x = torch.stack([u[:-1], u[1:]], dim=1).to(torch.float32).to(self.log_std.device)
        g = self.grid_net(x).squeeze(1)  # (K,) log-weights of the K increments
        own = self.own_table("grid", default.num_steps)
        return g if own is None else g + own

    def default_grid(self, schedule: Schedule, num_steps: int) -> TimeGrid:
        """The grid the heads move: the schedule's own grid, ending at ``final`` on a VP schedule."""
        if getattr(schedule, "kind", "vp") == "vp":
            return schedule.grid(num_steps, final=self.final)
        return schedule.grid(num_steps)

    def start_mean(self, num_steps: int) -> torch.Tensor | None:
        """The start head's shift u (scalar): t_0 = default t_0 - START_SCALE u. None without the head."""
        if self.start_net is None:
            return None
        x = torch.tensor([[4.0 / num_steps]], dtype=torch.float32, device=self.log_std.device)
        u = self.start_net(x).reshape(())
        own = self.own_table("start", num_steps)
        return u if own is None else u + own

    def time_grid(self, schedule: Schedule, num_steps: int) -> TimeGrid:
        """The grid to sample on: the default grid, or the learned heads' deterministic grid."""
        default = self.default_grid(schedule, num_steps)
        if self.grid_net is None:
            return default
        with torch.no_grad():
            g = self.grid_mean(default).cpu().to(torch.float64)
            u = self.start_mean(num_steps)
        return reweight_grid(schedule, default, g, start=None if u is None else u.cpu().to(torch.float64))

    def relaxed_time_grid(self, schedule: Schedule, num_steps: int) -> TimeGrid:
        """The deterministic grid with real-valued timesteps, differentiable in the grid (and start) heads'
        parameters (see :func:`reweight_grid`); :meth:`time_grid` is this grid rounded. Without the
        head: the default grid."""
        default = self.default_grid(schedule, num_steps)
        if self.grid_net is None:
            return default
        g = self.grid_mean(default).cpu().to(torch.float64)
        u = self.start_mean(num_steps)
        return reweight_grid(schedule, default, g, relaxed=True, start=None if u is None else u.cpu().to(torch.float64))

    def sample_time_grid(
        self, schedule: Schedule, num_steps: int, generator: torch.Generator | None = None
    ) -> tuple[TimeGrid, torch.Tensor, torch.Tensor]:
        """Draw a grid for one rollout: (grid, actions (K,), log_prob scalar). Needs ``time_grid=True``.
        The start, if learned, is the start head's deterministic value (it is trained by distillation)."""
        if self.grid_net is None:
            raise ValueError("time_grid: this policy was built without the time-grid head (time_grid=False)")
        default = self.default_grid(schedule, num_steps)
        mean = self.grid_mean(default)
        std = self.grid_log_std.exp()
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        actions = (mean + std * noise).detach()
        log_prob = torch.distributions.Normal(mean, std).log_prob(actions).sum()
        with torch.no_grad():
            u = self.start_mean(num_steps)
        grid = reweight_grid(schedule, default, actions.cpu().to(torch.float64),
                             start=None if u is None else u.cpu().to(torch.float64))
        return grid, actions, log_prob

    def time_grid_log_prob(self, schedule: Schedule, num_steps: int, actions: torch.Tensor) -> torch.Tensor:
        """Re-score stored grid ``actions`` (K,) under the current head (scalar)."""
        if self.grid_net is None:
            raise ValueError("time_grid: this policy was built without the time-grid head (time_grid=False)")
        mean = self.grid_mean(self.default_grid(schedule, num_steps))
        return torch.distributions.Normal(mean, self.grid_log_std.exp()).log_prob(actions.to(mean)).sum()

    # Checkpoints ---------------------------------------------------------------------------

    def config_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "order": self.order,
            "base": self.base,
            "features": list(self.features),
            "hidden": self.hidden,
            "init_log_std": self.init_log_std,
            "time_grid": self.learn_time_grid,
            "start": self.learn_start,
            "final": self.final,
            "lambda_scale": LAMBDA_SCALE,
        } | ({} if self.schedule_family is None else {"schedule_family": self.schedule_family}) \
          | ({"step_tables": list(self.step_tables)} if self.step_tables else {})

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``policy.safetensors`` (weights) and ``policy_config.json`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"schema_version": str(SCHEMA_VERSION)})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def _from_config(cls, config: dict) -> "ConsistencyPolicy":
        """A zero-headed policy of the shape :meth:`config_dict` describes."""
        return cls(
            order=config["order"],
            base=config["base"],
            features=config["features"],
            hidden=config["hidden"],
            init_log_std=config["init_log_std"],
            time_grid=config["time_grid"],
            schedule_family=config.get("schedule_family"),
            start=bool(config.get("start", False)),
            final=config.get("final"),
            step_tables=config.get("step_tables", ()),
        )

    def with_step_tables(self, step_tables: Sequence[int]) -> "ConsistencyPolicy":
        """This policy with own tables for ``step_tables`` too: the new ones start at zero, so every K's
        coefficients and grid are unchanged until they are trained."""
        steps = check_step_tables(sorted(set(self.step_tables) | set(step_tables)))
        policy = type(self)._from_config(dict(self.config_dict(), step_tables=list(steps)))
        missing, extra = policy.load_state_dict(self.state_dict(), strict=False)
        assert not extra and all(k.startswith("own_") for k in missing), (missing, extra)
        return policy.to(self.log_std.device)

    @classmethod
    def load(cls, directory: str | os.PathLike, order: int | None = None) -> "ConsistencyPolicy":
        """Read a policy saved by :meth:`save`; ``order``, if given, must match the checkpoint's."""
        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"directory {str(directory)!r} holds no policy checkpoint ({os.path.basename(path)} missing)")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version of {config_path!r} is {config.get('schema_version')!r}; this code reads {SCHEMA_VERSION}"
            )
        if config.get("lambda_scale") != LAMBDA_SCALE:
            raise ValueError(f"lambda_scale of {config_path!r} is {config.get('lambda_scale')!r}; expected {LAMBDA_SCALE}")
        if order is not None and config["order"] != order:
            raise ValueError(f"order {order} was asked for but the checkpoint in {str(directory)!r} has order {config['order']}")
        policy = cls._from_config(config)
        state = load_file(weights_path)
        expected = set(policy.state_dict())
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            what = "; ".join(part for part in (f"missing tensor(s) {', '.join(missing)}" if missing else "",
                                               f"extra tensor(s) {', '.join(extra)}" if extra else "") if part)
            raise ValueError(f"weights in {weights_path!r} do not match its config: {what}")
        try:
            policy.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"weights in {weights_path!r} do not match its config: {err}") from None
        return policy


def reweight_grid(schedule: Schedule, default: TimeGrid, g: torch.Tensor, relaxed: bool = False,
                  start: torch.Tensor | None = None) -> TimeGrid:
    """Move the interior points of ``default`` by scaling its K increments by exp(g) (renormalized).

    The end point stays, and so does the first timestep unless ``start`` (a scalar u) is given: then
    t_0 = default t_0 - START_SCALE u, kept within [K - 1, T - 1] (VP), and the K increments share the span
    from that t_0. On a VP schedule timesteps stay integers: every increment keeps at least one train step,
    so the grid stays strictly decreasing. g = 0 and u = 0 return ``default`` exactly.

    ``relaxed``: keep the timesteps real (no rounding) and take alpha, sigma from the schedule's
    continuous interpolation, so the grid is differentiable in ``g`` and ``u`` (distillation); rounding that
    grid gives the sampling grid.
    """
    moved = start is not None and bool(start.detach().ne(0).any())
    if not relaxed and not bool(g.any()) and not moved:
        return default
    ts = default.timesteps.to(torch.float64)
    if getattr(schedule, "kind", "vp") == "vp":
        top = ts[:1]
        if start is not None:
            top = (ts[:1] - START_SCALE * start.reshape(1)).clamp(default.num_steps - 1.0,
                                                                 schedule.num_train_timesteps - 1.0)
            if not relaxed:
                top = torch.round(top)
        ends = torch.cat([top, ts[1:], ts.new_tensor([-1.0])])  # trailing grids end one below t = 0
        spare = ends[0] - ends[-1] - default.num_steps
        d = torch.cat([ts, ts.new_tensor([-1.0])])
        d = d[:-1] - d[1:] - 1.0  # spare train steps per increment of the default grid
        q = d * torch.exp(g)
        q = q / q.sum() if float(q.sum().detach()) > 0 else d
        positions = (ends[0] - torch.cumsum(1.0 + spare * q, 0)[:-1]).clamp_min(0.0)  # float error below t = 0
        new_ts = torch.cat([top, positions]) if relaxed else torch.cat([top, torch.round(positions)]).to(torch.long)
    else:
        if moved:
            raise ValueError("start: a learned start is wired for VP schedules only")
        ends = torch.cat([ts, ts.new_tensor([0.0])])
        d = ends[:-1] - ends[1:]
        q = d * torch.exp(g)
        new_ts = torch.cat([ts[:1], ends[0] - torch.cumsum(ends[0] * q / q.sum(), 0)[:-1]])
    alpha, sigma = schedule.alpha_sigma_continuous(new_ts) if relaxed else schedule.alpha_sigma(new_ts)
    return TimeGrid(
        timesteps=new_ts,
        alpha=torch.cat([alpha.to(torch.float64), default.alpha[-1:]]),
        sigma=torch.cat([sigma.to(torch.float64), default.sigma[-1:]]),
    )


def grid_actions_for(schedule: Schedule, default: TimeGrid, target: torch.Tensor,
                     with_start: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, u) that :func:`reweight_grid` turns ``default`` into the VP timesteps ``target`` (K,) with: u from
    the first timestep (needs ``with_start`` unless it is the default's), g = log of the spare-step ratios
    (an increment with no spare steps gets g = -30, i.e. none after rounding). For warm starts."""
    ts = default.timesteps.to(torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    if target.shape != ts.shape:
        raise ValueError(f"target grid has {target.shape[0]} timesteps, the default {ts.shape[0]}")
    u = None
    if with_start:
        u = ((ts[0] - target[0]) / START_SCALE).reshape(())
    elif float(target[0]) != float(ts[0]):
        raise ValueError(f"target grid starts at t = {float(target[0]):g}, not {float(ts[0]):g}; it needs a learned start")
    d_default = torch.cat([ts, ts.new_tensor([-1.0])])
    d_default = d_default[:-1] - d_default[1:] - 1.0
    d_target = torch.cat([target, target.new_tensor([-1.0])])
    d_target = d_target[:-1] - d_target[1:] - 1.0
    if bool((d_target < 0).any()):
        raise ValueError(f"target timesteps {target.tolist()} are not strictly decreasing to 0 or above")
    g = torch.where(d_target > 0, torch.log(d_target.clamp_min(1e-300) / d_default.clamp_min(1e-300)),
                    torch.full_like(d_target, -30.0))
    if bool(((d_default <= 0) & (d_target > 0)).any()):
        raise ValueError("target grid needs spare steps where the default grid has none")
    return g - g[d_target > 0].mean() if bool((d_target > 0).any()) else g, u
