"""FLUX.1 (dev and schnell) through diffusers' FluxPipeline parts: a flow-matching model.

- The solver's latents are the VAE's (B, C, h, w); ``model_output`` packs them into FLUX's 2 x 2
  patch tokens with their position ids (``pipe._pack_latents``, ``pipe._prepare_latent_image_ids``)
  and unpacks the velocity (``pipe._unpack_latents``), so packing never reaches the solver.
- Prompts: CLIP's pooled embedding and T5's hidden states (``pipe.encode_prompt``), text ids zeros.
- Guidance: FLUX.1-dev is guidance-distilled: ``guidance`` goes into the transformer's guidance
  embedding and there is no unconditional pass. FLUX.1-schnell has no guidance embedding and
  ignores it. Optional true CFG (``LoadOptions.true_cfg_scale`` > 1 with a non-empty negative prompt):
  a second pass on the negative prompt, v = v_neg + s (v - v_neg), as the pipeline's ``true_cfg_scale``.
- Schedule: FLUX's resolution-dependent shift ``mu`` (``calculate_shift`` of the pipeline on the
  image's token count) and its sigmas ``linspace(1, 1/K, K)``; see :meth:`scheduler_config_for`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from models.base import Conditioning
from models.errors import UnsupportedModelError
from models.flow_common import FlowPipelineDenoiser, pooled_conditioning, prompt_lists
from models.sd import LoadOptions
from solver.schedules import FlowSchedule


class FluxDenoiser(FlowPipelineDenoiser):
    """Any FluxPipeline-compatible text-to-image model (FLUX.1 dev / schnell and fine-tunes)."""

    pipeline_class = "FluxPipeline"
    family_name = "FLUX"

    def __init__(self, pipe: Any, model_id: str, *, device: Any = None, options: LoadOptions | None = None) -> None:
        for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise UnsupportedModelError(f"{model_id} has no {part}; it is not a FLUX model")
        self._setup(pipe, model_id, device, options)
        self.true_cfg_scale = float(self.options.true_cfg_scale)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.default_guidance = 3.5 if self.guidance_embeds else 0.0
        self.max_sequence_length = 512
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.size_multiple = self.vae_scale_factor * 2  # 2 x 2 patches of latents
        self.default_size = (pipe.default_sample_size * self.vae_scale_factor,) * 2
        self.scheduler_config = self.scheduler_config_for(*self.default_size)
        self.schedule = FlowSchedule.from_config(self.scheduler_config)

    def png_params(self) -> dict[str, Any]:
        return {"True CFG scale": self.true_cfg_scale} if self.true_cfg_scale > 1.0 else {}

    def scheduler_config_for(self, height: int, width: int) -> dict[str, Any]:
        """The scheduler config plus FLUX's ``mu`` for an H x W image and its ``"sigmas": "linear"``,
        as FluxPipeline computes them (its ``calculate_shift`` and defaults)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = dict(self.pipe.scheduler.config)
        config.setdefault("_class_name", type(self.pipe.scheduler).__name__)  # a scheduler built in memory has none
        f = self.vae_scale_factor
        image_seq_len = (height // f // 2) * (width // f // 2)
        config["mu"] = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        config["sigmas"] = "linear"
        return config

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return (int(self.transformer.config.in_channels) // 4, height // f, width // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str = "") -> Conditioning:
        """CLIP pooled + T5 states for each distinct prompt (negatives too, used only by true CFG)."""
        prompts, negatives = prompt_lists(prompts, negative_prompts)

        def encode(texts: list[str]) -> list[torch.Tensor]:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=texts, prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            return [embeds.to(self.dtype), pooled.to(self.dtype)]

        return pooled_conditioning(prompts, negatives, encode)

    @torch.no_grad()
    def model_output(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The velocity for unpacked latents x (B, C, h, w): pack, one transformer call, unpack.

        ``extra``: ``pooled_projections`` (B, D) and, for a guidance-distilled model, ``guidance`` (B,).
        """
        if extra is None or "pooled_projections" not in extra:
            raise ValueError("FLUX needs the pooled CLIP embedding (extra['pooled_projections']) from encode_prompts")
        b, _, h, w = x.shape
        f = self.vae_scale_factor
        x = x.to(self.device, self.dtype)
        tokens, img_ids = self._tokens(x, extra)
        txt_ids = torch.zeros(context.shape[1], 3, device=self.device, dtype=self.dtype)
        t = torch.as_tensor(t, device=self.device)
        t = (t.expand(b) if t.ndim == 0 else t).to(tokens.dtype)
        guidance = extra.get("guidance")
        out = self.transformer(
            hidden_states=tokens,
            timestep=t / 1000,
            guidance=None if guidance is None else guidance.to(self.device, torch.float32),
            pooled_projections=extra["pooled_projections"].to(self.device, self.dtype),
            encoder_hidden_states=context.to(self.device, self.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.pipe._unpack_latents(out[:, : (h // 2) * (w // 2)], h * f, w * f, f)

    def _tokens(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's image tokens for latents x (B, C, h, w): 2 x 2 patches, and their position ids.
        An editing backend appends its input image's tokens (``models.kontext``); the velocity of the first
        (h / 2) (w / 2) tokens is x's."""
        b, c, h, w = x.shape
        return self.pipe._pack_latents(x, b, c, h, w), self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: torch.Tensor | int | float, cond: Conditioning, guidance: float) -> torch.Tensor:
        """eps (x0_hat at t = 1) from one conditional pass with the distilled guidance embedding
        (dev; none for schnell), plus the negative pass when true CFG is on."""
        if len(cond) != x.shape[0]:
            raise ValueError(f"conditioning has {len(cond)} rows but x has batch {x.shape[0]}")
        alpha, sigma, t, _ = self._time_inputs(x, t)
        x32 = x.to(self.device, torch.float32)
        xin = x32.to(self.dtype)
        g = torch.full((x.shape[0],), float(guidance), dtype=torch.float32) if self.guidance_embeds else None

        def output(context: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
            extra = dict(extra) | ({} if g is None else {"guidance": g})  # pooled embedding (and input image)
            return self.solver_output(self.model_output(xin, t, context, None, extra=extra), x32, alpha, sigma)

        out = output(cond.cond, cond.cond_extra)
        if self.true_cfg_scale > 1.0 and any(n.strip() for n in cond.negative_prompts):
            neg = output(cond.uncond, cond.uncond_extra)
            out = neg + self.true_cfg_scale * (out - neg)
        return out.to(x.device)


__all__ = ["FluxDenoiser"]
