"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction) through diffusers' StableDiffusionPipeline.

The pipeline is used only as a container of its parts: its tokenizer and text encoder
(``pipe.encode_prompt``), its UNet (one call per ``model_output``), its VAE (``decode``) and its
scheduler config (the model's training schedule). Sampling is the solver's job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from models.base import Conditioning, Denoiser
from models.errors import UnsupportedModelError
from solver.schedules import VPSchedule

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def place_pipeline(pipe: Any, device: Any, options: "LoadOptions", network: Any) -> torch.device:
    """Put ``pipe`` on ``device`` (or, with ``options.cpu_offload``, keep each part on the CPU until it runs);
    returns the device its ``network`` (UNet or transformer) computes on."""
    requested = torch.device(device) if device is not None else None
    if options.cpu_offload:
        if requested is None or requested.type != "cuda":
            raise ValueError("cpu_offload needs a CUDA device (device='cuda')")
        pipe.enable_model_cpu_offload(device=requested)
        return pipe._execution_device
    if requested is not None:
        pipe.to(requested)
    return network.device


@dataclass(frozen=True)
class LoadOptions:
    """What a user can ask of a loaded model.

    - ``fp16``: None = float16 on CUDA and float32 elsewhere; True / False forces it (True needs CUDA).
    - ``attention_slicing``: compute attention in slices (less memory, a little slower).
    - ``vae_tiling``: decode large images tile by tile.
    - ``cpu_offload``: keep each part on the CPU until it runs (``enable_model_cpu_offload``; needs CUDA).
    - ``config``: a local diffusers folder with the configs of a single-file checkpoint (nothing is fetched);
      for an SD3 / FLUX file, which holds the transformer alone, also the weights of every other part.
    - ``local_files_only``: None = decide from HF_HUB_OFFLINE and the network; True never fetches.
    - ``true_cfg_scale``: FLUX only: > 1 adds a negative-prompt pass (true CFG) when a negative prompt is given.
    """

    fp16: bool | None = None
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    config: str | os.PathLike | None = None
    local_files_only: bool | None = None
    true_cfg_scale: float = 1.0


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None, fp16: bool | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when present) and weight dtype (fp16 on CUDA by default, fp32 on the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if (fp16 or (fp16 is None and dev.type == "cuda")) else torch.float32
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype!r}")
    if fp16 is False and dtype != torch.float32:
        raise ValueError(f"fp16=False contradicts dtype={dtype}")
    if dev.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"dtype {dtype} is not supported on the CPU (fp16 needs a CUDA device); use float32")
    return dev, dtype


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one diffusers logger for a block (we report the same event once, ourselves)."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class StableDiffusionDenoiser(Denoiser):
    """Any StableDiffusionPipeline-compatible model (SD 1.x / 2.x, epsilon or v-prediction).

    Build it with :meth:`from_pretrained` (hub id or local diffusers folder) or :meth:`from_single_file`
    (one ``.safetensors`` checkpoint plus a local config folder), or wrap a pipeline you already have.
    """

    def __init__(
        self,
        pipe: Any,
        model_id: str,
        *,
        device: str | torch.device | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        self.check_compatible(pipe, model_id)
        options = options or LoadOptions()
        self.pipe = pipe
        self.model_id = model_id
        self.options = options
        self.dtype = pipe.unet.dtype
        self.device = place_pipeline(pipe, device, options, pipe.unet)
        if options.attention_slicing:
            pipe.enable_attention_slicing()
        pipe.vae.enable_slicing()  # decode a batch of previews one image at a time
        if options.vae_tiling:
            pipe.vae.enable_tiling()
        self.unet, self.vae, self.tokenizer = pipe.unet, pipe.vae, pipe.tokenizer
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale_factor
        sample = self.unet.config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
        self.default_size = (h * self.vae_scale_factor, w * self.vae_scale_factor)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.schedule = VPSchedule.from_config(self.scheduler_config)
        self.preview_decoder: Any = None  # an AutoencoderTiny for previews (attach_preview_decoder)

    fixed_text_length = True  # encode_prompt pads every prompt to the tokenizer's 77: batching is exact

    pipeline_class = "StableDiffusionPipeline"  # the diffusers pipeline whose parts this backend uses

    @staticmethod
    def check_compatible(pipe: Any, model_id: str) -> None:
        check_sd_compatible(pipe, model_id)

    @classmethod
    def _pipeline_class(cls) -> Any:
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: LoadOptions | None = None,
        local_files_only: bool = True,
    ) -> "StableDiffusionDenoiser":
        """Load a hub id or a local diffusers folder (safetensors weights only; no safety checker)."""
        options = options or LoadOptions()
        dev, dtype = resolve_device_dtype(device, dtype, options.fp16)
        pipe = cls._pipeline_class().from_pretrained(
            str(name_or_path), dtype=dtype, local_files_only=local_files_only, use_safetensors=True,
            **cls._load_kwargs(),
        )
        return cls(pipe, str(name_or_path), device=dev, options=options)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: LoadOptions | None = None,
    ) -> "StableDiffusionDenoiser":
        """Load an A1111 / Civitai style ``.safetensors`` checkpoint with the configs of a local folder."""
        options = options or LoadOptions()
        dev, dtype = resolve_device_dtype(device, dtype, options.fp16)
        pipe = cls._pipeline_class().from_single_file(
            str(path), config=str(config), dtype=dtype, local_files_only=True, **cls._load_kwargs()
        )
        return cls(pipe, Path(path).name, device=dev, options=options)

    @classmethod
    def _load_kwargs(cls) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    # --- the Denoiser interface --------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return (int(self.unet.config.in_channels), height // f, width // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str = "") -> Conditioning:
        """Encode each distinct prompt and negative prompt once with the pipeline's CLIP text encoder.

        A prompt may not be empty (the unconditional branch is the negative prompt, empty by default).
        A prompt over the tokenizer's limit is truncated, with a warning, as diffusers does.
        """
        prompts = _as_prompt_list(prompts, "prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(
                    f"prompt {i} is empty; describe the image (the unconditional branch uses the negative prompt)"
                )
        if isinstance(negative_prompts, str):
            negatives = [negative_prompts] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompts, "negative_prompt", allow_empty_list=False)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        cond = self._encode_unique(prompts, "prompt")
        uncond = self._encode_unique(negatives, "negative_prompt")
        return Conditioning(cond=cond, uncond=uncond, prompts=prompts, negative_prompts=negatives)

    def _encode_unique(self, texts: list[str], field: str) -> torch.Tensor:
        unique = list(dict.fromkeys(texts))
        limit = int(self.tokenizer.model_max_length)
        for text in unique:
            with _quiet("transformers.tokenization_utils_base"):
                ids = self.tokenizer(text, truncation=False, verbose=False).input_ids
            if len(ids) > limit:  # ids include the start and end tokens, as the limit does
                dropped = self.tokenizer.decode(ids[limit - 1 : -1])
                logger.warning(
                    "%s is %d tokens, over the text encoder's limit of %d; this part was dropped: %r",
                    field, len(ids), limit, dropped,
                )
        with _quiet("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"):
            embeds, _ = self.pipe.encode_prompt(unique, self.device, 1, False)
        index = torch.tensor([unique.index(t) for t in texts], device=embeds.device)
        return embeds.index_select(0, index).to(self.dtype)

    @torch.no_grad()
    def model_output(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One UNet call: its raw output (epsilon or v, per the scheduler config)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t.to(self.device)
        kwargs = {} if mask is None else {"encoder_attention_mask": mask.to(self.device)}
        return self.unet(
            x.to(self.device, self.dtype), t, encoder_hidden_states=context.to(self.device, self.dtype), **kwargs
        ).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (float32, CPU), all rows in one ``vae.decode`` call.

        In the model's dtype, as diffusers' Stable Diffusion 1.x/2.x pipelines decode (their VAE config's
        ``force_upcast`` is read only by the SDXL pipelines); a float16 VAE that overflows to NaN is re-run
        in float32, and stays there. VAE slicing (on by default) runs the rows one at a time inside the
        call, which keeps each row's bits independent of the batch.
        """
        if latents.ndim != 4:
            raise ValueError(f"latents must have shape (B, C, h, w), got {tuple(latents.shape)}")
        images = self._vae_decode(latents)
        if not torch.isfinite(images).all() and self.vae.dtype != torch.float32:
            logger.warning("the %s VAE produced NaN/inf for %s; decoding in float32 from now on", self.vae.dtype, self.model_id)
            self.vae.to(torch.float32)
            images = self._vae_decode(latents)
        return (images / 2 + 0.5).clamp(0, 1).cpu()

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents.float() / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae.decode(z.to(self.device, self.vae.dtype)).sample.float()

    @torch.no_grad()
    def preview_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Like :meth:`decode`, through the attached preview decoder when there is one (previews only)."""
        if self.preview_decoder is None:
            return self.decode(latents)
        if latents.ndim != 4:
            raise ValueError(f"latents must have shape (B, C, h, w), got {tuple(latents.shape)}")
        dec = self.preview_decoder
        z = latents.float() / dec.config.scaling_factor + (dec.config.shift_factor or 0.0)
        images = dec.decode(z.to(self.device, dec.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()


def check_preview_decoder(model: Any, decoder: Any, source: str) -> None:
    """Refuse, with one sentence, a preview decoder whose latents do not fit ``model``'s."""
    if not isinstance(model, StableDiffusionDenoiser):
        raise ValueError(f"preview_decoder: {model.model_id} is not a latent diffusion model with a VAE, so a "
                         "fast preview decoder has nothing to replace; leave --preview-decoder out")
    cfg = decoder.config
    channels = int(model.unet.config.in_channels)
    if int(cfg.latent_channels) != channels:
        raise ValueError(f"preview_decoder {source} reads {cfg.latent_channels}-channel latents but {model.model_id} "
                         f"makes {channels}-channel ones; use the TAESD that matches this model family")
    up = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
    if up != model.vae_scale_factor:
        raise ValueError(f"preview_decoder {source} upsamples latents {up}x but {model.model_id}'s VAE does "
                         f"{model.vae_scale_factor}x; use the TAESD that matches this model family")
    if float(cfg.scaling_factor) != 1.0 or float(cfg.shift_factor or 0.0) != 0.0:
        raise ValueError(f"preview_decoder {source} expects latents scaled by {cfg.scaling_factor} and shifted by "
                         f"{cfg.shift_factor}, but a TAESD preview decoder reads the denoiser's latents as they are "
                         "(scaling_factor 1, shift_factor 0)")


def attach_preview_decoder(model: Any, path: str | os.PathLike | Any) -> Any:
    """Load a diffusers ``AutoencoderTiny`` folder (or take a built one) as ``model``'s preview decoder.

    Checked against the model first (:func:`check_preview_decoder`); moved to the model's device and
    dtype. Refines never use it: they call :meth:`StableDiffusionDenoiser.decode`.
    """
    from diffusers import AutoencoderTiny

    if isinstance(path, AutoencoderTiny):
        decoder, source = path, "(given)"
    else:
        source = os.fspath(path)
        if not Path(source).is_dir():
            raise ValueError(f"preview_decoder {source!r}: no such folder (a diffusers AutoencoderTiny folder)")
        try:
            decoder = AutoencoderTiny.from_pretrained(source, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ValueError(f"preview_decoder {source!r} is not a diffusers AutoencoderTiny folder: {exc}") from None
    check_preview_decoder(model, decoder, source)
    model.preview_decoder = decoder.to(model.device, model.vae.dtype).eval()
    return model.preview_decoder


def _as_prompt_list(value: Sequence[str] | str, field: str, allow_empty_list: bool = False) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items and not allow_empty_list:
        raise ValueError(f"{field} must be a string or a non-empty list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{field} {i} must be a string, got {type(item).__name__}")
    return items


def check_sd_compatible(pipe: Any, model_id: str) -> None:
    """Refuse, with one sentence, a pipeline whose parts are not Stable Diffusion 1.x / 2.x shaped."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise UnsupportedModelError(f"{model_id} has no {part}; it is not a Stable Diffusion 1.x/2.x model")
    unet = pipe.unet.config
    if getattr(unet, "addition_embed_type", None) is not None:
        raise UnsupportedModelError(f"{model_id} looks like SDXL (extra text-time conditioning), which is not supported yet")
    if unet.in_channels != pipe.vae.config.latent_channels:
        raise UnsupportedModelError(
            f"{model_id}'s UNet takes {unet.in_channels} channels but its VAE makes {pipe.vae.config.latent_channels}"
            " (an inpainting or depth model?); only text-to-image Stable Diffusion is supported"
        )
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UnsupportedModelError(f"{model_id} predicts {prediction!r}; Stable Diffusion models predict epsilon or v")


__all__ = ["LoadOptions", "StableDiffusionDenoiser", "attach_preview_decoder", "check_preview_decoder",
           "check_sd_compatible", "resolve_device_dtype"]
