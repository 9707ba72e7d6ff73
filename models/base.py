"""The one interface every base model keeps: encode prompts, guided epsilon, decode.

Solver, preview, refine and training talk to a model only through :class:`Denoiser`, so Stable
Diffusion, the embedded default model and later SDXL / flow-matching backends are interchangeable.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from solver.outputs import to_epsilon
from solver.schedules import Schedule

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
        """The raw network output (its own prediction type) for a batch at timestep t."""

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

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning, guidance: float) -> torch.Tensor:
        """Classifier-free-guided epsilon, eps_u + w (eps_c - eps_u), in one batched model call.

        ``t`` is one timestep for the whole batch, or one per row (B,) (a learned time grid gives each
        rollout its own). ``guidance`` <= 1 with 1 meaning "conditional only" skips the unconditional
        half. Returns float32 on ``x``'s device.
        """
        if len(cond) != x.shape[0]:
            raise ValueError(f"conditioning has {len(cond)} rows but x has batch {x.shape[0]}")
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"t must be one timestep or one per row ({x.shape[0]}), got shape {tuple(t.shape)}")
        alpha, sigma = self.schedule.alpha_sigma(t)
        if t.ndim == 0:
            alpha, sigma, t_pair = alpha.item(), sigma.item(), t
        else:
            view = (-1,) + (1,) * (x.ndim - 1)
            alpha = alpha.to(torch.float32).view(view).to(self.device)
            sigma = sigma.to(torch.float32).view(view).to(self.device)
            t = t.to(self.device)
            t_pair = torch.cat([t, t])
        x32 = x.to(self.device, torch.float32)  # the state, full precision, beside the model output
        xin = x32.to(self.dtype)
        if guidance == 1.0:
            out = self.model_output(xin, t, cond.cond, cond.cond_mask)
            return to_epsilon(out, x32, alpha, sigma, self.schedule.prediction_type).to(x.device)
        context = torch.cat([cond.uncond, cond.cond])
        mask = None if cond.cond_mask is None else torch.cat([cond.uncond_mask, cond.cond_mask])  # type: ignore[list-item]
        out = self.model_output(torch.cat([xin, xin]), t_pair, context, mask)
        pair = (lambda v: v) if t.ndim == 0 else (lambda v: torch.cat([v, v]))  # noqa: E731
        eps = to_epsilon(out, torch.cat([x32, x32]), pair(alpha), pair(sigma), self.schedule.prediction_type)
        eps_u, eps_c = eps.chunk(2)
        return (eps_u + guidance * (eps_c - eps_u)).to(x.device)
