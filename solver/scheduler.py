"""ConsistencySolver as a diffusers scheduler: a thin adapter over paper eq. 10 (``solver.lmm.lmm_step``).

Usable wherever diffusers takes a scheduler, text-to-image and image-to-image pipelines included::

    pipe.scheduler = ConsistencySolverScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.scheduler = ConsistencySolverScheduler.from_pretrained("owner/repo-or-folder")  # + trained policy

``set_timesteps`` builds the grid (the config's spacing, the policy's learned grid, or ``timesteps=``)
and the (K, m) coefficient table once (the policy's deterministic mean). ``step`` converts the model
output to epsilon at its own timestep (paper.md N3), pushes it onto the history and takes one step of
eq. 10 in (y, n) coordinates with :func:`solver.lmm.lmm_step` -- the project's single implementation --
x_{i+1} = alpha_{i+1} y_{i+1}. n_{i+1} is always read from the grid (N1).

On a zero-terminal-SNR config a v- or x0-prediction model's first step is taken from alpha = 0 exactly
in data-prediction form (:meth:`ConsistencySolverScheduler._terminal_step`); an epsilon model starts at
abar = 2^-24 as diffusers' multistep solvers do (``VPSchedule.from_config``).

The model's scheduler config is honoured key by key or refused (:data:`HONOURED`, :data:`REFUSED_UNLESS`,
:data:`OTHER_SAMPLER_KEYS`); nothing is silently dropped. Image-to-image pipelines start mid-grid with
:meth:`set_begin_index`: the run is then the K' = K - begin steps of the grid from that point, with the
table computed for that K'-step grid (its first step has one epsilon of history, as any first step).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from solver.lmm import lmm_step
from solver.outputs import to_epsilon
from solver.policy import CONFIG_NAME, FEATURES, WEIGHTS_NAME, ConsistencyPolicy, check_order
from solver.schedules import TimeGrid, VPSchedule

logger = logging.getLogger(__name__)

# Keys of a model's scheduler config this scheduler honours (they are arguments of __init__).
HONOURED = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "set_alpha_to_one",
    "prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "final_sigmas_type",
    "clip_sample", "thresholding", "solver_order", "base_rule",
)
# Keys that change the sampled ODE or its grid in a way eq. 10 on the model's timesteps cannot follow:
# accepted only at the value that leaves the sampler unchanged, refused otherwise (by name).
REFUSED_UNLESS = {
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "timestep_type": "discrete",
    "lambda_min_clipped": -float("inf"), "variance_type": None, "interpolation_type": "linear", "shift_terminal": None,
}
# Settings of the sampler being replaced (its algorithm, its order rules, its clipping range): they
# describe that sampler, not the model, and are reported by name when a config carrying them is read.
OTHER_SAMPLER_KEYS = (
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "skip_prk_steps", "predict_x0",
    "disable_corrector", "solver_p", "clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio",
    "flow_shift", "sigma_min", "sigma_max", "shift", "use_dynamic_shifting", "time_shift_type",
)
_FINAL = {None: None, "zero": "zero", "sigma_min": "first"}
_DDPM_VARIANCES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class ConsistencySolverScheduler(SchedulerMixin, ConfigMixin):
    """Linear-multistep sampler with learned (or classic) coefficients in (y, n) coordinates.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, set_alpha_to_one,
        rescale_betas_zero_snr: the model's noise schedule, read as diffusers' ``DDIMScheduler`` reads
            them (a zero-terminal-SNR schedule starts at abar = 2^-24 as diffusers' multistep solvers
            do, see ``VPSchedule.from_config``).
        prediction_type: what the model predicts (``epsilon``, ``v_prediction`` or ``sample``).
        timestep_spacing, steps_offset: diffusers' spacing of the K timesteps (``trailing`` is the
            few-step choice; ``leading`` / ``linspace`` as in diffusers).
        final_sigmas_type: the end point: ``None`` (``final_alpha_cumprod`` from ``set_alpha_to_one``),
            ``"zero"`` (n = 0) or ``"sigma_min"`` (``alphas_cumprod[0]``).
        clip_sample, thresholding: must be False: eq. 10 integrates the unclipped ODE.
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
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
        final_sigmas_type: str | None = None,
        clip_sample: bool = False,
        thresholding: bool = False,
        solver_order: int = 4,
        base_rule: str = "dpm2m",
        policy: ConsistencyPolicy | None = None,
    ) -> None:
        check_order(solver_order)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
        if clip_sample:
            raise ValueError("clip_sample=True cannot be honoured: eq. 10 integrates the unclipped probability-flow "
                             "ODE; pass clip_sample=False")
        if thresholding:
            raise ValueError("thresholding=True cannot be honoured: eq. 10 integrates the unthresholded "
                             "probability-flow ODE; pass thresholding=False")
        if final_sigmas_type not in _FINAL:
            raise ValueError(f"final_sigmas_type must be None, 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if timestep_spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(f"timestep_spacing must be 'trailing', 'leading' or 'linspace', got {timestep_spacing!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
        if policy is None:
            policy = ConsistencyPolicy(order=solver_order, base=base_rule, features=FEATURES)
        self._use_policy(policy)
        schedule_config = {
            "num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
            "beta_schedule": beta_schedule, "trained_betas": trained_betas, "set_alpha_to_one": set_alpha_to_one,
            "prediction_type": prediction_type, "rescale_betas_zero_snr": rescale_betas_zero_snr,
        }
        try:
            schedule = VPSchedule.from_config(schedule_config, timestep_spacing=timestep_spacing, exact_zero_snr=False)
        except NotImplementedError as err:  # diffusers' reply to an unknown beta_schedule
            raise ValueError(f"beta_schedule {beta_schedule!r} is unknown: {err}") from None
        self.schedule = VPSchedule(
            alphas_cumprod=schedule.alphas_cumprod, final_alpha_cumprod=schedule.final_alpha_cumprod,
            prediction_type=prediction_type, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            final_point=_FINAL[final_sigmas_type] or "config",
        )
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        # A v- or x0-prediction model at the zero-SNR point (alpha = 0) gives x0 itself: step from there exactly.
        self._terminal_t = num_train_timesteps - 1 if rescale_betas_zero_snr and prediction_type != "epsilon" else None
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.grid: TimeGrid | None = None
        self.table: torch.Tensor | None = None
        self._full_grid: TimeGrid | None = None
        self._begin_index: int | None = None
        self._reset()

    def _use_policy(self, policy: ConsistencyPolicy) -> None:
        if policy.order != self.config.solver_order:
            raise ValueError(f"solver_order is {self.config.solver_order} but the policy has order {policy.order}")
        if policy.base != self.config.base_rule:
            raise ValueError(f"base_rule is {self.config.base_rule!r} but the policy's base is {policy.base!r}")
        self.policy = policy.eval()

    # -- config: every key honoured or refused ---------------------------------------------------
    @staticmethod
    def check_config(config: dict[str, Any]) -> list[str]:
        """Refuse (ValueError naming the key) what cannot be honoured; return the other sampler's keys."""
        class_name = str(config.get("_class_name", ""))
        if "FlowMatch" in class_name or config.get("prediction_type") == "flow_prediction":
            raise ValueError(
                f"config is a flow-matching scheduler config ({class_name or 'flow_prediction'}); this scheduler is "
                "for VP (DDPM-family) schedules: sample flow models with solver.sampling on a FlowSchedule grid"
            )
        other = []
        for key, value in config.items():
            if key.startswith("_") or key in HONOURED:
                continue
            if key in REFUSED_UNLESS:
                neutral = REFUSED_UNLESS[key]
                if key == "variance_type" and value in _DDPM_VARIANCES:
                    other.append(key)  # DDPM's ancestral-sampling variance: not part of the ODE
                    continue
                same = value == neutral or (isinstance(neutral, float) and math.isinf(neutral)
                                            and isinstance(value, (int, float)) and math.isinf(value) and value < 0)
                if not same:
                    raise ValueError(f"{key}={value!r} cannot be honoured by ConsistencySolverScheduler (it samples eq. 10 "
                                     f"on the model's own integer timesteps); use {key}={neutral!r} or pass timesteps=")
                continue
            if key in OTHER_SAMPLER_KEYS:
                other.append(key)
                continue
            raise ValueError(f"{key} is a scheduler config key that ConsistencySolverScheduler does not know, so it "
                             "cannot honour it; remove it from the config (nothing was built)")
        return other

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config`` after :meth:`check_config`; ``policy=`` sets solver_order/base_rule to match."""
        policy = kwargs.pop("policy", None)
        merged = {**dict(config or {}), **kwargs}
        other = cls.check_config(merged)
        if other:
            logger.info("ConsistencySolverScheduler replaces the sampler whose settings these are (not used): %s",
                        ", ".join(sorted(other)))
        kept = {k: v for k, v in dict(config or {}).items() if k not in other}
        kwargs = {k: v for k, v in kwargs.items() if k not in other}
        if policy is not None:
            kwargs.setdefault("solver_order", policy.order)
            kwargs.setdefault("base_rule", policy.base)
        out = super().from_config(kept, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if policy is not None:
            (out[0] if return_unused_kwargs else out)._use_policy(policy)
        return out

    # -- the run -----------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._step_index: int | None = None
        self._history: deque[torch.Tensor] = deque(maxlen=self.config.solver_order)
        self._nonfinite: torch.Tensor | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at grid index ``begin_index`` (image-to-image pipelines call this after
        ``set_timesteps``): the table is recomputed for the K - begin_index steps that remain."""
        if self._full_grid is None:
            raise ValueError("set_timesteps must be called before set_begin_index")
        k = self._full_grid.num_steps
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or not 0 <= begin_index < k:
            raise ValueError(f"begin_index must be an integer in 0..{k - 1}, got {begin_index!r}")
        self._begin_index = begin_index
        full = self._full_grid
        self._use_grid(TimeGrid(timesteps=full.timesteps[begin_index:], alpha=full.alpha[begin_index:],
                                sigma=full.sigma[begin_index:]))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | torch.Tensor | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Build the grid (the config's spacing, the policy's learned grid, or custom ``timesteps``)
        and the coefficient table; reset the history and the begin index."""
        limit = self.config.num_train_timesteps
        if sigmas is not None:
            raise ValueError("sigmas= cannot be honoured: this scheduler samples on the model's integer timesteps "
                             "(eq. 10 reads n = sigma / alpha from the schedule); pass timesteps= instead")
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(f"num_inference_steps {num_inference_steps} differs from len(timesteps) {len(timesteps)}; "
                                 "pass one of them")
            ts = torch.as_tensor(timesteps)
            if ts.is_floating_point() and bool((ts != ts.round()).any()):
                raise ValueError(f"timesteps must be integers (the model's own timesteps), got {ts.tolist()}")
            grid = self.schedule.grid_at(ts.to(torch.long))
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
            if not 1 <= num_inference_steps <= limit:
                raise ValueError(f"num_inference_steps must be in 1..{limit}, got {num_inference_steps}")
            grid = self.policy.time_grid(self.schedule, num_inference_steps)
        self._full_grid = grid
        self._begin_index = None
        self._use_grid(grid)
        self.timesteps = grid.timesteps.to(device=device)  # the pipeline slices these itself (img2img)
        self.num_inference_steps = grid.num_steps

    def _use_grid(self, grid: TimeGrid) -> None:
        self.grid = grid
        self.table = self.policy.coefficient_table(grid)  # (K', m) float64, w_j in column j - 1
        self._alpha, self._sigma, self._n = grid.alpha.tolist(), grid.sigma.tolist(), grid.n.tolist()
        self._run_timesteps = grid.timesteps.tolist()
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: the model sees x_t itself."""
        return sample

    def _check_finite(self, eps: torch.Tensor, i: int) -> None:
        """ValueError on NaN/inf in the model output; on an accelerator the flag is read at the last step,
        so the check never stalls the pipeline's asynchronous launches."""
        total = eps.sum()
        if total.device.type == "cpu":
            if not math.isfinite(float(total)):
                raise ValueError(f"model_output contains NaN or inf (step {i}, timestep {self._run_timesteps[i]})")
            return
        flag = ~torch.isfinite(total)
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite | flag
        if i == len(self._run_timesteps) - 1 and bool(self._nonfinite):
            raise ValueError("model_output contained NaN or inf during this sampling run")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Advance x_i -> x_{i+1} with eq. 10 at ``timestep``, which must be the run's next timestep.

        The state and model output are upcast to float32; the result has the sample's dtype.
        """
        if self.num_inference_steps is None or self.grid is None:
            raise ValueError("set_timesteps must be called before step (num_inference_steps is None)")
        i = 0 if self._step_index is None else self._step_index
        run = self._run_timesteps
        if i >= len(run):
            raise ValueError(f"step called {i + 1} times for num_inference_steps={len(run)}")
        t = int(timestep)
        if t != run[i]:
            if self._step_index is None and t in run:
                raise ValueError(f"timestep {t} is not the first of this run's timesteps; sampling must start at "
                                 f"{run[0]} (image-to-image pipelines call set_begin_index)")
            raise ValueError(f"timestep {t} is not the expected timestep {run[i]} of step {i} "
                             f"(this run's timesteps: {run})")
        if t == self._terminal_t:
            prev_sample = self._terminal_step(model_output, sample, i)
        else:
            if self.config.prediction_type == "epsilon":
                eps = model_output.float()
                self._check_finite(eps, i)
            else:
                eps = to_epsilon(model_output, sample, self._alpha[i], self._sigma[i], self.config.prediction_type)
            # y_i from the sample handed in (a pipeline may edit the latents between steps, as inpainting does)
            y = sample.float() / self._alpha[i]
            self._history.appendleft(eps)
            row = self.table[i, : min(i + 1, self.config.solver_order)]
            y_next = lmm_step(y, self._n[i], self._n[i + 1], list(self._history), row)
            prev_sample = (y_next * self._alpha[i + 1]).to(sample.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _terminal_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The first step from a zero-terminal-SNR point (alpha = 0 exactly), in data-prediction form.

        A one-entry history forces w = (1), so eq. 10 reads y_1 = y_0 + (n_1 - n_0) eps_0, and with
        y_0 - n_0 eps_0 = (x_0 - sigma_0 eps_0) / alpha_0 = x0_hat this is y_1 = x0_hat + n_1 eps_0, whose
        limit alpha_0 -> 0 is finite: at alpha_0 = 0, sigma_0 = 1, the state is pure noise (eps_0 = x_0)
        and a v- or x0-prediction gives x0_hat directly (v = alpha eps - sigma x0 = -x0_hat). So
        x_1 = alpha_1 x0_hat + sigma_1 x_0, DDIM's step from alpha = 0; later steps keep eps_0 = x_0
        in the history. (An epsilon model carries no x0 at alpha = 0: it starts at abar = 2^-24 instead.)
        """
        if i != 0 or bool((self.table[i, 1:] != 0).any()):
            raise ValueError("the zero-SNR point can only be the first step of a run")
        out = model_output.float()
        if torch.isnan(out).any():
            raise ValueError(f"model_output contains NaN (step {i}, timestep {self._terminal_t})")
        x0_hat = -out if self.config.prediction_type == "v_prediction" else out
        eps = sample.float()
        self._history.appendleft(eps)
        y_next = x0_hat + self._n[i + 1] * eps
        return (y_next * self._alpha[i + 1]).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at integer ``timesteps`` (one per sample), as in image-to-image."""
        abar = self.alphas_cumprod.to(original_samples.device)[timesteps.to(original_samples.device).long()]
        abar = abar.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1.0 - abar).sqrt() * noise

    # -- files: local folders and the hub, as diffusers loads and saves them -----------------------
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``scheduler_config.json`` and the policy (``policy.safetensors`` + ``policy_config.json``);
        with ``push_to_hub``, upload the complete folder afterwards (diffusers' repo_id/token/private/
        commit_message/create_pr keywords)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder")
        super().save_pretrained(save_directory, push_to_hub=False)
        self.policy.save(save_directory)
        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip(os.sep).split(os.sep)[-1])
            token = kwargs.pop("token", None)
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
            self._upload_folder(save_directory, repo_id, token=token, commit_message=kwargs.pop("commit_message", None),
                                create_pr=kwargs.pop("create_pr", False))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The config through diffusers (hub, cache, ``local_files_only``/``HF_HUB_OFFLINE`` as diffusers
        reads them), then the policy saved beside it, from a local folder or through
        ``huggingface_hub.hf_hub_download`` (the same cache). A folder written by this class must hold
        its policy; a folder of another scheduler gives the base rule on that config."""
        name = str(pretrained_model_name_or_path)
        try:
            config, unused = cls.load_config(name, subfolder=subfolder, return_unused_kwargs=True, **kwargs)
        except OSError as err:
            raise OSError(f"ConsistencySolverScheduler.from_pretrained({name!r}): {_offline_hint(err)}") from err
        out = cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **unused)
        scheduler = out[0] if return_unused_kwargs else out
        files = _policy_files(name, subfolder, kwargs, required=config.get("_class_name") == cls.__name__)
        if files is not None:
            scheduler._use_policy(ConsistencyPolicy.load(files, order=scheduler.config.solver_order))
        return out

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _offline_hint(err: BaseException) -> str:
    from huggingface_hub import constants

    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if constants.HF_HUB_OFFLINE:
        return f"not in the local cache and HF_HUB_OFFLINE=1 (offline), so it cannot be downloaded ({text})"
    return text


def _policy_files(name: str, subfolder: str | None, kwargs: dict, required: bool) -> str | None:
    """A local folder holding ``policy.safetensors`` and ``policy_config.json`` for ``name``, or None
    when there is no policy and none is required."""
    local = os.path.join(name, subfolder or "")
    if os.path.isdir(local):
        have = all(os.path.isfile(os.path.join(local, f)) for f in (WEIGHTS_NAME, CONFIG_NAME))
        if not have and required:
            raise ValueError(f"{local} holds a ConsistencySolverScheduler config but no policy "
                             f"({WEIGHTS_NAME}, {CONFIG_NAME}); save it with save_pretrained")
        return local if have else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    options = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
               if k in kwargs}
    paths = []
    for filename in (WEIGHTS_NAME, CONFIG_NAME):
        try:
            paths.append(hf_hub_download(name, filename, subfolder=subfolder, **options))
        except EntryNotFoundError:
            if required:
                raise ValueError(f"{name} holds a ConsistencySolverScheduler config but no {filename}") from None
            return None
        except LocalEntryNotFoundError as err:
            raise OSError(f"ConsistencySolverScheduler.from_pretrained({name!r}): {filename} is "
                          f"{_offline_hint(err)}") from err
    return os.path.dirname(paths[0])
