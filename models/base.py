"""The one interface every base model keeps: encode prompts, guided epsilon, decode.

Solver, preview, refine and training talk to a model only through :class:`Denoiser`, so Stable
Diffusion (``models.sd``), SDXL (``models.sdxl``), the flow-matching SD3 (``models.sd3``) and FLUX
(``models.flux``) backends and the embedded default model are interchangeable.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from solver.outputs import start_denoised, to_epsilon
from solver.schedules import Schedule, schedule_family

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Encoded prompts for a batch: one row per sample, conditional and unconditional halves.

    ``cond`` / ``uncond`` are (B, L, D) token states; ``cond_mask`` / ``uncond_mask`` are optional
    (B, L) attention masks (1 = keep). ``prompts`` / ``negative_prompts`` keep the text for metadata.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    prompts: list[str]
    negative_prompts: list[str]
    cond_mask: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None
    cond_extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row extras (pooled embeds...)
    uncond_extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def select(self, index: Sequence[int] | torch.Tensor) -> "Conditioning":
        """The rows ``index`` (for chunking a grid of prompts x seeds)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.cond.device)
        pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        return Conditioning(
            cond=pick(self.cond),
            uncond=pick(self.uncond),
            prompts=[self.prompts[i] for i in idx.tolist()],
            negative_prompts=[self.negative_prompts[i] for i in idx.tolist()],
            cond_mask=pick(self.cond_mask),
            uncond_mask=pick(self.uncond_mask),
            cond_extra={k: pick(v) for k, v in self.cond_extra.items()},
            uncond_extra={k: pick(v) for k, v in self.uncond_extra.items()},
        )

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        def cat_opt(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(t is None for t in ts) else torch.cat(ts)  # type: ignore[arg-type]

        return Conditioning(
            cond=torch.cat([p.cond for p in parts]),
            uncond=torch.cat([p.uncond for p in parts]),
            prompts=[s for p in parts for s in p.prompts],
            negative_prompts=[s for p in parts for s in p.negative_prompts],
            cond_mask=cat_opt([p.cond_mask for p in parts]),
            uncond_mask=cat_opt([p.uncond_mask for p in parts]),
            cond_extra={k: torch.cat([p.cond_extra[k] for p in parts]) for k in parts[0].cond_extra},
            uncond_extra={k: torch.cat([p.uncond_extra[k] for p in parts]) for k in parts[0].uncond_extra},
        )


class Denoiser(ABC):
    """A base model seen by the solver: guided epsilon in, images out.

    Subclasses set the attributes below and implement the four abstract methods. ``guided_eps``
    is implemented here once: one batched model call on [uncond; cond], conversion to epsilon at
    the edge (``solver.outputs.to_epsilon``), classifier-free guidance, float32 out.
    """

    model_id: str
    schedule: Schedule
    scheduler_config: dict[str, Any]  # the model's training scheduler config (for diffusers baselines)
    device: torch.device
    dtype: torch.dtype
    size_multiple: int  # height and width must be multiples of this (the downsampling factor)
    default_size: tuple[int, int]  # (height, width) in pixels
    max_size: int = 2048
    takes_image: bool = False  # an editing model (FLUX.1 Kontext): every sample is conditioned on an input image

    # --- what a backend implements -------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the initial noise for an image of height x width pixels."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str = "") -> Conditioning:
        """Encode each prompt and its negative prompt once. Empty prompt = the unconditional input."""

    @abstractmethod
    def model_output(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The raw network output (its own prediction type) for a batch at timestep t.

        A backend whose conditioning has extras (``Conditioning.cond_extra``: pooled embeddings, time ids)
        also takes ``extra=`` (a dict of (B, ...) tensors, rows matching ``x``)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W), float32 in [0, 1] on the CPU."""

    # --- shared ----------------------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
            if value <= 0 or value > self.max_size:
                raise ValueError(f"{name} must be in 1..{self.max_size} pixels, got {value}")
            if value % self.size_multiple:
                raise ValueError(
                    f"{name} must be a multiple of {self.size_multiple} for {self.model_id}, got {value}"
                )

    def png_params(self) -> dict[str, Any]:
        """Settings of the loaded model that change its images beyond the generation row (FLUX's true CFG scale),
        written into every preview's and final's PNG ``parameters``."""
        return {}

    def image_conditioning(self, cond: Conditioning, image: Any, height: int, width: int) -> Conditioning:
        """``cond`` conditioned on an input image as well (editing models override this; ``models.kontext``)."""
        raise ValueError(f"image: {self.model_id} is a text-to-image model and takes no input image")

    def default_size_for(self, image: Any, keep_size: bool = False) -> tuple[int, int]:
        """(height, width) of an edit of ``image`` when none is asked (editing models override this)."""
        raise ValueError(f"image: {self.model_id} is a text-to-image model and takes no input image")

    def scheduler_config_for(self, height: int, width: int) -> dict[str, Any]:
        """The scheduler config for images of height x width (FLUX's shift depends on the size)."""
        return self.scheduler_config

    @property
    def schedule_family(self) -> str:
        """``"vp"`` or ``"flow"`` (``solver.schedules.schedule_family``)."""
        return schedule_family(self.schedule)

    def solver_output(self, out: torch.Tensor, x: torch.Tensor, alpha: Any, sigma: Any) -> torch.Tensor:
        """The raw model output as the solver takes it: eps, except at alpha = 0 (the flow start t = 1, or
        the first point of a zero-terminal-SNR VP schedule), where eps = x carries no model information and
        the denoised x0_hat is returned instead (``solver.outputs.start_denoised``; the solver's first step
        is derived from it in ``solver.schedules.FlowSchedule``). float32."""
        prediction_type = self.schedule.prediction_type
        eps = to_epsilon(out, x, alpha, sigma, prediction_type)
        if not torch.is_tensor(alpha):
            return start_denoised(out, x, prediction_type) if alpha == 0.0 else eps
        start = alpha == 0.0
        return torch.where(start, start_denoised(out, x, prediction_type), eps) if bool(start.any()) else eps

    def _time_inputs(self, x: torch.Tensor, t: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        """(alpha, sigma, t, t for the [uncond; cond] pair): floats for one t, (B, 1, ...) tensors per row."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"t must be one timestep or one per row ({x.shape[0]}), got shape {tuple(t.shape)}")
        alpha, sigma = self.schedule.alpha_sigma(t)
        if t.ndim == 0:
            return alpha.item(), sigma.item(), t, t
        view = (-1,) + (1,) * (x.ndim - 1)
        alpha = alpha.to(torch.float32).view(view).to(self.device)
        sigma = sigma.to(torch.float32).view(view).to(self.device)
        t = t.to(self.device)
        return alpha, sigma, t, torch.cat([t, t])

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning, guidance: float) -> torch.Tensor:
        """Classifier-free-guided epsilon, eps_u + w (eps_c - eps_u), in one batched model call.

        ``t`` is one timestep for the whole batch, or one per row (B,) (a learned time grid gives each
        rollout its own). ``guidance`` <= 1 with 1 meaning "conditional only" skips the unconditional
        half. Returns float32 on ``x``'s device. On a flow schedule at t = 1 (alpha = 0) the guided
        x0_hat is returned instead of eps (see :meth:`solver_output`).
        """
        if len(cond) != x.shape[0]:
            raise ValueError(f"conditioning has {len(cond)} rows but x has batch {x.shape[0]}")
        alpha, sigma, t, t_pair = self._time_inputs(x, t)
        x32 = x.to(self.device, torch.float32)  # the state, full precision, beside the model output
        xin = x32.to(self.dtype)
        if guidance == 1.0:
            extra = {"extra": cond.cond_extra} if cond.cond_extra else {}
            out = self.model_output(xin, t, cond.cond, cond.cond_mask, **extra)
            return self.solver_output(out, x32, alpha, sigma).to(x.device)
        context = torch.cat([cond.uncond, cond.cond])
        mask = None if cond.cond_mask is None else torch.cat([cond.uncond_mask, cond.cond_mask])  # type: ignore[list-item]
        extra = {}
        if cond.cond_extra:
            extra = {"extra": {k: torch.cat([cond.uncond_extra[k], v]) for k, v in cond.cond_extra.items()}}
        out = self.model_output(torch.cat([xin, xin]), t_pair, context, mask, **extra)
        pair = (lambda v: v) if not torch.is_tensor(alpha) else (lambda v: torch.cat([v, v]))  # noqa: E731
        eps = self.solver_output(out, torch.cat([x32, x32]), pair(alpha), pair(sigma))
        eps_u, eps_c = eps.chunk(2)
        return (eps_u + guidance * (eps_c - eps_u)).to(x.device)
