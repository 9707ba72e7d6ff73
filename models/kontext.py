"""FLUX.1 Kontext (instruction editing) through diffusers' FluxKontextPipeline parts.

An edit is a FLUX sample conditioned on an input image as well as on the instruction:

- The input image is resized to the output size (:func:`fit_image`: scaled to cover it and centre-cropped,
  so it is never stretched; a no-op when the sizes agree), VAE-encoded with the latent distribution's
  mode and ``(z - shift_factor) * scaling_factor`` (``pipe._encode_vae_image``), and carried in the
  conditioning as the per-row extra ``image_latents`` (B, C, h, w), so the preview engine's chunking,
  padding and caching treat it like a prompt's pooled embedding.
- ``model_output`` packs the noisy latents and the image latents into 2 x 2 patch tokens, concatenates
  them along the sequence with their position ids (the image's first id coordinate set to 1, as
  ``FluxKontextPipeline.prepare_latents`` does), runs one transformer call and keeps the velocity of the
  target tokens only.
- ``mu`` comes from the target token count (the pipeline's ``calculate_shift`` on the noisy latents),
  which :meth:`FluxDenoiser.scheduler_config_for` already computes from the output size.
- Output size: the request's height and width; by default the size :meth:`default_size_for` picks for the
  input: the pipeline's preferred Kontext resolution nearest the input's aspect ratio (scaled to the
  model's default size), or the input's own size rounded down to a multiple of 16 when asked to keep it.

A preview or a refine of an edit is a pure function of (model, instruction, negative prompt, seed, size,
guidance, solver, steps, input image): the stored input image and the output size fix the conditioning.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from PIL import Image, ImageOps

from models.base import Conditioning
from models.errors import UnsupportedModelError
from models.flux import FluxDenoiser

IMAGE_LATENTS = "image_latents"  # the Conditioning extra holding the encoded input image
IMAGE_CACHE_SIZE = 8  # encoded input images kept per model (an editing session uses a few)


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` scaled to cover height x width and centre-cropped to it (aspect kept, never stretched);
    the image itself (a copy) when it already has that size."""
    if image.size == (width, height):
        return image.copy()
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


class FluxKontextDenoiser(FluxDenoiser):
    """Any FluxKontextPipeline-compatible editing model (FLUX.1 Kontext dev and fine-tunes)."""

    pipeline_class = "FluxKontextPipeline"
    family_name = "FLUX.1 Kontext"
    takes_image = True

    def __init__(self, pipe: Any, model_id: str, *, device: Any = None, options: Any = None) -> None:
        if getattr(pipe, "image_processor", None) is None:
            raise UnsupportedModelError(f"{model_id} has no image processor; it is not a FLUX.1 Kontext model")
        super().__init__(pipe, model_id, device=device, options=options)
        self._image_cache: dict[tuple[str, int, int], torch.Tensor] = {}

    # --- the input image ----------------------------------------------------------------------
    def default_size_for(self, image: Image.Image, keep_size: bool = False) -> tuple[int, int]:
        """(height, width) of an edit of ``image`` when the request names none.

        ``keep_size``: the input's own size rounded down to a multiple of :attr:`size_multiple`. Otherwise
        the preferred Kontext resolution (``PREFERRED_KONTEXT_RESOLUTIONS``, the pipeline's
        ``_auto_resize``) nearest the input's aspect ratio, scaled by the model's default size / 1024 (1 for
        FLUX.1 Kontext dev) and rounded down to a multiple of :attr:`size_multiple`.
        """
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        m = self.size_multiple
        w_in, h_in = image.size
        if keep_size:
            h, w = h_in // m * m, w_in // m * m
        else:
            aspect = w_in / h_in
            _, w, h = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
            scale = self.default_size[0] / 1024
            h, w = int(h * scale) // m * m, int(w * scale) // m * m
        if h < m or w < m:
            raise ValueError(f"image: {w_in}x{h_in} is too small for {self.model_id} (at least {m}x{m} pixels)")
        return h, w

    @torch.no_grad()
    def encode_image(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The input image fitted to height x width, VAE-encoded: (1, C, h, w) latents, ``(z - shift) * scale``.

        Cached by the image's pixels and the size, so a grid encodes its input once."""
        self.check_size(height, width)
        key = (hashlib.sha256(image.tobytes()).hexdigest() + image.mode, height, width)
        cached = self._image_cache.get(key)
        if cached is not None:
            return cached
        pixels = self.pipe.image_processor.preprocess(fit_image(image, height, width), height, width)
        latents = self.pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None).to(self.dtype)
        if len(self._image_cache) >= IMAGE_CACHE_SIZE:
            self._image_cache.clear()
        self._image_cache[key] = latents
        return latents

    def image_conditioning(self, cond: Conditioning, image: Image.Image, height: int, width: int) -> Conditioning:
        """``cond`` with the encoded input image as every row's ``image_latents`` extra (both halves)."""
        latents = self.encode_image(image, height, width)
        rows = latents.expand(len(cond), *latents.shape[1:])
        return Conditioning(
            cond=cond.cond, uncond=cond.uncond, prompts=cond.prompts, negative_prompts=cond.negative_prompts,
            cond_mask=cond.cond_mask, uncond_mask=cond.uncond_mask,
            cond_extra={**cond.cond_extra, IMAGE_LATENTS: rows}, uncond_extra={**cond.uncond_extra, IMAGE_LATENTS: rows},
        )

    # --- the model call -------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed tokens and position ids: the noisy latents', then the input image's (first id = 1)."""
        if IMAGE_LATENTS not in extra:
            raise ValueError(f"image: {self.model_id} is an editing model; its conditioning needs the encoded input "
                             "image (image_conditioning)")
        packed, ids = super()._tokens(x, extra)
        image = extra[IMAGE_LATENTS].to(self.device, self.dtype)
        if image.shape[0] != x.shape[0]:
            raise ValueError(f"image_latents has {image.shape[0]} rows but x has batch {x.shape[0]}")
        b, c, h, w = image.shape
        image_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        image_ids[..., 0] = 1
        return torch.cat([packed, self.pipe._pack_latents(image, b, c, h, w)], dim=1), torch.cat([ids, image_ids])


__all__ = ["IMAGE_LATENTS", "FluxKontextDenoiser", "fit_image"]
