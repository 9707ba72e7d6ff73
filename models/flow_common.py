"""What the flow-matching backends (SD3, FLUX) share: loading a pipeline's parts (from a folder or hub id,
or a single-file transformer checkpoint with a config folder), prompt checks, decode."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from models.base import Conditioning, Denoiser
from models.errors import ModelLoadError
from models.sd import LoadOptions, _as_prompt_list, place_pipeline, resolve_device_dtype

logger = logging.getLogger(__name__)


def prompt_lists(prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str) -> tuple[list[str], list[str]]:
    """(prompts, negatives), one negative per prompt; an empty prompt is refused naming it."""
    prompts = _as_prompt_list(prompts, "prompt")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty; describe the image (the unconditional branch uses the negative prompt)")
    if isinstance(negative_prompts, str):
        negatives = [negative_prompts] * len(prompts)
    else:
        negatives = _as_prompt_list(negative_prompts, "negative_prompt")
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
    return prompts, negatives


def pooled_conditioning(prompts: list[str], negatives: list[str], encode: Any) -> Conditioning:
    """Conditioning from ``encode(texts) -> [token embeddings, pooled embedding]`` (each distinct text once):
    the token states as context and the pooled embeddings as the ``pooled_projections`` extra (SD3, FLUX)."""
    cond, pooled = unique_rows(prompts, encode)
    uncond, uncond_pooled = unique_rows(negatives, encode)
    return Conditioning(
        cond=cond, uncond=uncond, prompts=prompts, negative_prompts=negatives,
        cond_extra={"pooled_projections": pooled}, uncond_extra={"pooled_projections": uncond_pooled},
    )


def unique_rows(texts: list[str], encode: Any) -> list[torch.Tensor]:
    """``encode(unique_texts)`` -> tensors with one row per unique text; returns them with one row per text."""
    unique = list(dict.fromkeys(texts))
    outs = encode(unique)
    index = torch.tensor([unique.index(t) for t in texts])
    return [o.index_select(0, index.to(o.device)) for o in outs]


class FlowPipelineDenoiser(Denoiser):
    """Base of the flow-matching backends: a diffusers pipeline used as a container of its parts."""

    pipeline_class = ""
    family_name = ""
    optional_parts: tuple[str, ...] = ()  # parts a folder may leave out (null in model_index.json)

    def _setup(self, pipe: Any, model_id: str, device: Any, options: LoadOptions | None) -> None:
        options = options or LoadOptions()
        self.pipe, self.model_id, self.options = pipe, model_id, options
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.dtype = self.transformer.dtype
        self.device = place_pipeline(pipe, device, options, self.transformer)
        self.vae.enable_slicing()
        if options.vae_tiling:
            self.vae.enable_tiling()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: LoadOptions | None = None,
        local_files_only: bool = True,
    ) -> Any:
        """Load a hub id or a local diffusers folder (safetensors weights only)."""
        import diffusers

        options = options or LoadOptions()
        dev, dtype = resolve_device_dtype(device, dtype, options.fp16)
        pipeline = getattr(diffusers, cls.pipeline_class)
        index = pipeline.load_config(str(name_or_path), local_files_only=local_files_only)
        absent = {part: None for part in cls.optional_parts if not _present(index.get(part))}
        pipe = pipeline.from_pretrained(
            str(name_or_path), dtype=dtype, local_files_only=local_files_only, use_safetensors=True, **absent
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
    ) -> Any:
        """A transformer checkpoint in its original layout (one ``.safetensors`` file, as SD3 and FLUX.1
        are distributed) with every other part and every config from the local diffusers folder ``config``.

        The transformer goes through diffusers' own converter (``<Transformer>.from_single_file`` with the
        folder's ``transformer`` config); the pipeline is then the folder's, with that transformer in place.
        Weights of other parts that the file may also carry (a VAE, text encoders) are not used: the
        folder's are, and a warning says so.
        """
        import diffusers

        options = options or LoadOptions()
        dev, dtype = resolve_device_dtype(device, dtype, options.fp16)
        pipeline = getattr(diffusers, cls.pipeline_class)
        index = pipeline.load_config(str(config), local_files_only=True)
        entry = index.get("transformer")
        if not _present(entry):
            raise ModelLoadError(f"config: {config} has no transformer entry in model_index.json")
        transformer_class = getattr(diffusers, entry[1])
        mismatch = (
            f"config: the transformer config in {config} does not describe {Path(path).name}, which has {{}}; "
            "pass a config folder of the same model variant (e.g. FLUX.1 dev for a dev checkpoint)"
        )
        with _unused_weights("diffusers.loaders.single_file_model") as unused:
            try:
                transformer = transformer_class.from_single_file(
                    str(path), config=str(config), subfolder="transformer", dtype=dtype, local_files_only=True
                )
            except NotImplementedError as e:  # parameters the file has no weights for stay on the meta device
                if "meta" not in str(e):
                    raise
                raise ModelLoadError(mismatch.format("no weights for some of the parameters that config describes")) from e
        if unused:
            raise ModelLoadError(mismatch.format(f"weights that config has no place for ({unused[0]}, ...)"))
        _warn_about_unused_parts(Path(path), str(config))
        absent = {part: None for part in cls.optional_parts if not _present(index.get(part))}
        pipe = pipeline.from_pretrained(
            str(config), transformer=transformer, dtype=dtype, local_files_only=True, use_safetensors=True, **absent
        )
        return cls(pipe, Path(path).name, device=dev, options=options)

    def __init__(self, pipe: Any, model_id: str, *, device: Any = None, options: LoadOptions | None = None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images in [0, 1] (float32, CPU): z / scaling_factor + shift_factor."""
        if latents.ndim != 4:
            raise ValueError(f"latents must have shape (B, C, h, w), got {tuple(latents.shape)}")
        cfg = self.vae.config
        z = latents.float() / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        images = self.vae.decode(z.to(self.device, self.vae.dtype)).sample.float()
        if not torch.isfinite(images).all() and self.vae.dtype != torch.float32:
            logger.warning("the %s VAE produced NaN/inf for %s; decoding in float32 from now on", self.vae.dtype, self.model_id)
            self.vae.to(torch.float32)
            images = self.vae.decode(z.to(self.device, torch.float32)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()


def _present(entry: Any) -> bool:
    """A model_index.json entry names a part (["library", "Class"]), not [null, null] or nothing."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


# Original-layout prefixes of parts other than the transformer that a single file may carry.
_OTHER_PARTS = {"first_stage_model.": "VAE", "vae.": "VAE", "text_encoders.": "text encoders"}


def _warn_about_unused_parts(path: Path, config: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        found = sorted({what for key in f.keys() for prefix, what in _OTHER_PARTS.items() if key.startswith(prefix)})
    if found:
        logger.warning(
            "%s also holds weights of the %s; only its transformer is loaded, the %s come from config %s",
            path.name, " and ".join(found), " and ".join(found), config,
        )


@contextmanager
def _unused_weights(logger_name: str) -> Iterator[list[str]]:
    """Collect what diffusers' single-file loader reports as checkpoint weights the model did not use
    (it only logs them; a transformer config of another variant would silently drop them)."""
    found: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "were not used" in text:
                found.extend(k.strip(" []'\n") for k in text.split(":", 1)[-1].split(",") if k.strip(" []'\n"))

    handler = _Catch(logging.WARNING)
    source = logging.getLogger(logger_name)
    level = source.level
    if source.getEffectiveLevel() > logging.WARNING:  # diffusers' verbosity turned down: still hear this one
        source.setLevel(logging.WARNING)
    source.addHandler(handler)
    try:
        yield found
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
