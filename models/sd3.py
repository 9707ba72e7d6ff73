"""Stable Diffusion 3 / 3.5 through diffusers' StableDiffusion3Pipeline parts: a flow-matching model.

- Prompts: ``pipe.encode_prompt`` runs the two CLIP encoders (penultimate states concatenated,
  pooled embeddings concatenated into ``pooled_projections``) and T5 when the folder has it; without
  T5 the pipeline uses zeros in its place, and so do we (it is the same call). A negative prompt is
  encoded the same way; the empty negative prompt is encoded as "" as the pipeline's default does.
- Guidance: classic CFG on [uncond; cond] in one batched call (``Denoiser.guided_eps``); CFG is
  linear with weights summing to 1, so guiding eps equals the pipeline's guiding of the velocity.
  Skip-layer guidance (SD 3.5 medium's ``skip_guidance_layers``) is not used.
- Schedule: the scheduler config's static ``shift``; with ``use_dynamic_shifting`` the pipeline's
  ``mu`` for the image's patch count (:meth:`scheduler_config_for`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from models.base import Conditioning
from models.errors import UnsupportedModelError
from models.flow_common import FlowPipelineDenoiser, pooled_conditioning, prompt_lists
from models.sd import LoadOptions
from solver.schedules import FlowSchedule


class StableDiffusion3Denoiser(FlowPipelineDenoiser):
    """Any StableDiffusion3Pipeline-compatible text-to-image model (SD 3 medium, SD 3.5 large / medium)."""

    pipeline_class = "StableDiffusion3Pipeline"
    family_name = "Stable Diffusion 3"
    optional_parts = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    default_guidance = 7.0  # the pipeline's default guidance_scale

    def __init__(self, pipe: Any, model_id: str, *, device: Any = None, options: LoadOptions | None = None) -> None:
        for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise UnsupportedModelError(f"{model_id} has no {part}; it is not a Stable Diffusion 3 model")
        self._setup(pipe, model_id, device, options)
        self.max_sequence_length = 256  # the pipeline's default for T5
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.patch_size = int(self.transformer.config.patch_size)
        self.size_multiple = self.vae_scale_factor * self.patch_size
        sample = int(self.transformer.config.sample_size)
        self.default_size = (sample * self.vae_scale_factor,) * 2
        self.scheduler_config = self.scheduler_config_for(*self.default_size)
        self.schedule = FlowSchedule.from_config(self.scheduler_config)

    def scheduler_config_for(self, height: int, width: int) -> dict[str, Any]:
        """The scheduler config; with ``use_dynamic_shifting`` plus the pipeline's ``mu`` for H x W."""
        config = dict(self.pipe.scheduler.config)
        config.setdefault("_class_name", type(self.pipe.scheduler).__name__)  # a scheduler built in memory has none
        if config.get("use_dynamic_shifting"):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            f, p = self.vae_scale_factor, self.patch_size
            config["mu"] = calculate_shift(
                (height // f // p) * (width // f // p),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return config

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return (int(self.transformer.config.in_channels), height // f, width // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str = "") -> Conditioning:
        prompts, negatives = prompt_lists(prompts, negative_prompts)

        def encode(texts: list[str]) -> list[torch.Tensor]:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=texts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            return [embeds.to(self.dtype), pooled.to(self.dtype)]

        return pooled_conditioning(prompts, negatives, encode)

    @torch.no_grad()
    def model_output(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The velocity: one transformer call with the pooled projections."""
        if extra is None or "pooled_projections" not in extra:
            raise ValueError("SD3 needs the pooled text embeddings (extra['pooled_projections']) from encode_prompts")
        x = x.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).to(torch.float32)  # the scheduler's float32 timesteps
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=context.to(self.device, self.dtype),
            pooled_projections=extra["pooled_projections"].to(self.device, self.dtype),
            return_dict=False,
        )[0]


__all__ = ["StableDiffusion3Denoiser"]
