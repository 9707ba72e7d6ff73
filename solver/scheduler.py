"""ConsistencySolver as a diffusers scheduler: a thin adapter over paper eq. 10.

Usable wherever diffusers takes a scheduler::

    pipe.scheduler = ConsistencySolverScheduler.from_config(pipe.scheduler.config)   # base rule
    pipe.scheduler = ConsistencySolverScheduler.from_pretrained(directory)         # + trained policy

``set_timesteps`` computes the (K, m) coefficient table once (the policy's deterministic mean) and
folds it with the grid into per-step constants, so ``step`` is one table-row lookup, one copy of
the new epsilon into a ring buffer and one fused ``addmv`` over the buffer:

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} (n_{i+1} - n_i) sum_j w_j eps_{i+1-j}

which is eq. 10 multiplied by alpha_{i+1} (y = x / alpha). The model output is converted to
epsilon at its own timestep before it enters the history (paper.md N3). Timesteps use trailing
spacing and n_{i+1} is always read from the grid (N1). No prints, no sampling, no RL bookkeeping.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from solver.outputs import to_epsilon
from solver.policy import FEATURES, WEIGHTS_NAME, ConsistencyPolicy, check_order
from solver.schedules import TimeGrid, VPSchedule


class ConsistencySolverScheduler(SchedulerMixin, ConfigMixin):
    """Linear-multistep sampler with learned (or classic) coefficients in (y, n) coordinates.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, set_alpha_to_one:
            the model's noise schedule, read as diffusers' ``DDIMScheduler`` reads them; the last step
            lands on ``final_alpha_cumprod`` exactly as DDIM's does.
        prediction_type: what the model predicts (``epsilon``, ``v_prediction`` or ``sample``).
        solver_order: m, the number of past epsilons a step combines (1..8).
        base_rule: the analytic rule an untrained (zero) policy reproduces.
        policy: the coefficient network (not part of the config; saved beside it in safetensors).
            ``None`` builds the zero policy, i.e. exactly ``base_rule``.
    """

    ignore_for_config = ["policy"]
    order = 1  # one model evaluation per step

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        set_alpha_to_one: bool = True,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
        solver_order: int = 4,
        base_rule: str = "dpm2m",
        policy: ConsistencyPolicy | None = None,
    ) -> None:
        check_order(solver_order)
        if policy is None:
            policy = ConsistencyPolicy(order=solver_order, base=base_rule, features=FEATURES)
        self._use_policy(policy)
        schedule_config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            "trained_betas": trained_betas,
            "set_alpha_to_one": set_alpha_to_one,
            "prediction_type": prediction_type,
        }
        try:
            self.schedule = VPSchedule.from_config(schedule_config)
        except NotImplementedError as err:  # diffusers' reply to an unknown beta_schedule
            raise ValueError(f"beta_schedule {beta_schedule!r} is unknown: {err}") from None
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.grid: TimeGrid | None = None
        self.table: torch.Tensor | None = None
        self._reset()

    def _use_policy(self, policy: ConsistencyPolicy) -> None:
        if policy.order != self.config.solver_order:
            raise ValueError(f"solver_order is {self.config.solver_order} but the policy has order {policy.order}")
        if policy.base != self.config.base_rule:
            raise ValueError(f"base_rule is {self.config.base_rule!r} but the policy's base is {policy.base!r}")
        self.policy = policy

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``; ``policy=`` is accepted too, and sets solver_order/base_rule to match it."""
        policy = kwargs.pop("policy", None)
        if isinstance(config, dict) and "FlowMatch" in str(config.get("_class_name", "")):
            raise ValueError(
                f"config is a flow-matching scheduler config ({config['_class_name']}); this scheduler is for VP "
                "(DDPM-family) schedules: sample flow models with solver.sampling on a FlowSchedule grid"
            )
        if policy is not None:
            kwargs.setdefault("solver_order", policy.order)
            kwargs.setdefault("base_rule", policy.base)
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if policy is not None:
            (out[0] if return_unused_kwargs else out)._use_policy(policy)
        return out

    def _reset(self) -> None:
        self._step_index: int | None = None
        self._eps_buffer: torch.Tensor | None = None  # (m, numel) ring buffer of past eps, float32
        self._nonfinite: torch.Tensor | None = None

    def _check_finite(self, eps: torch.Tensor, i: int) -> None:
        """ValueError on NaN/inf in the model output (any NaN or inf makes the sum non-finite).

        On the CPU every step is checked; on an accelerator the flag is kept on the device and read
        at the last step, so the check never stalls the pipeline's asynchronous launches.
        """
        total = eps.sum()
        if total.device.type == "cpu":
            if not math.isfinite(float(total)):
                raise ValueError(f"model_output contains NaN or inf (step {i}, timestep {int(self.timesteps[i])})")
            return
        flag = ~torch.isfinite(total)
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite | flag
        if i == self.num_inference_steps - 1 and bool(self._nonfinite):
            raise ValueError("model_output contained NaN or inf during this sampling run")

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the trailing grid (or the policy's learned grid) and the per-step constants; reset history."""
        limit = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= limit:
            raise ValueError(f"num_inference_steps must be in 1..{limit}, got {num_inference_steps}")
        grid = self.policy.time_grid(self.schedule, num_inference_steps)
        table = self.policy.coefficient_table(grid)  # (K, m) float64, w_j in column j - 1
        alpha, n = grid.alpha, grid.n
        m = self.config.solver_order
        # Fold eq. 10 into x-space constants: x_{i+1} = c_x[i] x_i + sum_j c_eps[i, j] eps_{i+1-j}.
        c_eps = table * (alpha[1:] * (n[1:] - n[:-1])).unsqueeze(1)
        # The history lives in a ring buffer: eps_{i+1-j} sits in slot (i - j + 1) mod m, so the
        # coefficients are permuted once here and a step is one copy plus one addmv.
        steps = torch.arange(num_inference_steps).unsqueeze(1)
        slots = (steps - torch.arange(m).unsqueeze(0)) % m
        self._slot_coef = torch.zeros(num_inference_steps, m, dtype=torch.float64).scatter_(1, slots, c_eps)
        self._slot_coef = self._slot_coef.to(torch.float32)
        self._c_x = (alpha[1:] / alpha[:-1]).tolist()
        self._alpha = alpha.tolist()
        self._sigma = grid.sigma.tolist()
        self.grid, self.table = grid, table
        self.num_inference_steps = num_inference_steps
        self.timesteps = grid.timesteps.to(device=device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: the model sees x_t itself."""
        return sample

    def _init_step_index(self, timestep: int | torch.Tensor) -> None:
        t = int(timestep)
        matches = (self.timesteps.cpu() == t).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        if int(matches[0]) != 0:
            # Row i of the table expects the history of steps 0..i-1; starting mid-grid (img2img) would
            # silently drop those terms, so it is refused.
            raise ValueError(f"timestep {t} is not the first of this run's timesteps; sampling must start at {int(self.timesteps[0])}")
        self._step_index = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Advance x_i -> x_{i+1} with eq. 10; the state and model output are upcast to float32.

        ``timestep`` locates the first step; later steps follow the grid in order.
        """
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step (num_inference_steps is None)")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"step called {i + 1} times for num_inference_steps={self.num_inference_steps}")
        if self.config.prediction_type == "epsilon":
            eps = model_output
            self._check_finite(eps, i)
        else:
            eps = to_epsilon(model_output, sample, self._alpha[i], self._sigma[i], self.config.prediction_type)
        m = self.config.solver_order
        if self._eps_buffer is None or self._eps_buffer.shape[1:] != (sample.numel(),) or self._eps_buffer.device != sample.device:
            self._eps_buffer = torch.zeros(m, sample.numel(), dtype=torch.float32, device=sample.device)
            self._slot_coef = self._slot_coef.to(sample.device)
        self._eps_buffer[i % m].copy_(eps.reshape(-1))
        prev_sample = torch.addmv(
            sample.reshape(-1).float(), self._eps_buffer.t(), self._slot_coef[i], beta=self._c_x[i]
        ).view(sample.shape).to(sample.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at integer ``timesteps`` (one per sample)."""
        abar = self.alphas_cumprod.to(original_samples.device)[timesteps.to(original_samples.device).long()]
        abar = abar.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1.0 - abar).sqrt() * noise

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``scheduler_config.json`` and the policy (``policy.safetensors`` + ``policy_config.json``)."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        self.policy.save(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Read the config with diffusers, then the policy saved beside it (local directories)."""
        out = super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=return_unused_kwargs, **kwargs
        )
        scheduler = out[0] if return_unused_kwargs else out
        directory = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            scheduler._use_policy(ConsistencyPolicy.load(directory, order=scheduler.config.solver_order))
        return out

    def __len__(self) -> int:
        return self.config.num_train_timesteps
