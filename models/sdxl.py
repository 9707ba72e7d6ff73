"""SDXL through diffusers' StableDiffusionXLPipeline parts (a VP model: epsilon or v-prediction).

What SDXL adds to Stable Diffusion, each taken from the pipeline itself:

- two text encoders: ``pipe.encode_prompt`` concatenates their penultimate hidden states and takes
  the pooled embedding from the second (``text_embeds``);
- ``added_cond_kwargs``: ``text_embeds`` and ``time_ids`` = (original size, crop top-left, target
  size), here (H, W, 0, 0, H, W) for an H x W image, as the pipeline's defaults give
  (``pipe._get_add_time_ids``);
- ``force_zeros_for_empty_prompt``: an empty negative prompt is all zeros (embeddings and pooled),
  exactly as the pipeline does when no negative prompt is given;
- the VAE's ``force_upcast``: a half-precision VAE with that flag decodes in float32.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from models.base import Conditioning
from models.errors import UnsupportedModelError
from models.sd import StableDiffusionDenoiser, _as_prompt_list, _quiet

logger = logging.getLogger(__name__)


class StableDiffusionXLDenoiser(StableDiffusionDenoiser):
    """Any StableDiffusionXLPipeline-compatible text-to-image model (SDXL base, its fine-tunes)."""

    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, pipe: Any, model_id: str, **kwargs: Any) -> None:
        super().__init__(pipe, model_id, **kwargs)
        self.force_zeros_for_empty_prompt = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        if self.vae.config.get("force_upcast", False) and self.vae.dtype != torch.float32:
            self.vae.to(torch.float32)  # the pipeline upcasts such a VAE for every decode

    @staticmethod
    def check_compatible(pipe: Any, model_id: str) -> None:
        for part in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise UnsupportedModelError(f"{model_id} has no {part}; it is not an SDXL model")
        unet = pipe.unet.config
        if getattr(unet, "addition_embed_type", None) != "text_time":
            raise UnsupportedModelError(f"{model_id}'s UNet has no SDXL text-time conditioning")
        if unet.in_channels != pipe.vae.config.latent_channels:
            raise UnsupportedModelError(
                f"{model_id}'s UNet takes {unet.in_channels} channels but its VAE makes "
                f"{pipe.vae.config.latent_channels} (an inpainting model?); only text-to-image SDXL is supported"
            )
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise UnsupportedModelError(f"{model_id} predicts {prediction!r}; SDXL models predict epsilon or v")

    @classmethod
    def _load_kwargs(cls) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str = "") -> Conditioning:
        """Each distinct prompt once through both encoders; an empty negative prompt is zeros when the
        model says ``force_zeros_for_empty_prompt`` (the pipeline's default negative), else encoded."""
        prompts = _as_prompt_list(prompts, "prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty; describe the image (the unconditional branch uses the negative prompt)")
        negatives = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else _as_prompt_list(negative_prompts, "negative_prompt")
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        cond, pooled = self._encode_xl(prompts)
        uncond, uncond_pooled = self._encode_xl(negatives, zeros_if_empty=self.force_zeros_for_empty_prompt, like=(cond, pooled))
        return Conditioning(
            cond=cond, uncond=uncond, prompts=prompts, negative_prompts=negatives,
            cond_extra={"text_embeds": pooled}, uncond_extra={"text_embeds": uncond_pooled},
        )

    def _encode_xl(
        self, texts: list[str], zeros_if_empty: bool = False, like: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        unique = [t for t in dict.fromkeys(texts) if not (zeros_if_empty and not t.strip())]
        embeds = pooled = None
        if unique:
            for text in unique:
                self._warn_if_truncated(text)
            with _quiet("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"):
                embeds, _, pooled, _ = self.pipe.encode_prompt(unique, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        rows_e, rows_p = [], []
        for text in texts:
            if zeros_if_empty and not text.strip():
                assert like is not None
                rows_e.append(torch.zeros_like(like[0][0]))
                rows_p.append(torch.zeros_like(like[1][0]))
            else:
                i = unique.index(text)
                rows_e.append(embeds[i])  # type: ignore[index]
                rows_p.append(pooled[i])  # type: ignore[index]
        return torch.stack(rows_e).to(self.dtype), torch.stack(rows_p).to(self.dtype)

    def _warn_if_truncated(self, text: str) -> None:
        limit = int(self.tokenizer.model_max_length)
        with _quiet("transformers.tokenization_utils_base"):
            ids = self.tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            logger.warning("a prompt is %d tokens, over the text encoders' limit of %d; the rest was dropped", len(ids), limit)

    def time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size) for an H x W image."""
        projection_dim = int(self.pipe.text_encoder_2.config.projection_dim)
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=self.dtype,
                                          text_encoder_projection_dim=projection_dim)
        return ids.to(self.device).repeat(batch, 1)

    @torch.no_grad()
    def model_output(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One UNet call with ``added_cond_kwargs`` (pooled ``text_embeds``, ``time_ids`` from x's size)."""
        if extra is None or "text_embeds" not in extra:
            raise ValueError("SDXL needs the pooled text embeddings (extra['text_embeds']) from encode_prompts")
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t.to(self.device)
        f = self.vae_scale_factor
        added = {
            "text_embeds": extra["text_embeds"].to(self.device, self.dtype),
            "time_ids": self.time_ids(x.shape[-2] * f, x.shape[-1] * f, x.shape[0]),
        }
        return self.unet(
            x.to(self.device, self.dtype), t, encoder_hidden_states=context.to(self.device, self.dtype),
            added_cond_kwargs=added,
        ).sample


__all__ = ["StableDiffusionXLDenoiser"]
