"""``--model NAME_OR_PATH`` -> a :class:`~models.base.Denoiser`.

- no name: the embedded default model (``models.embedded.load_embedded``), no network;
- a local diffusers folder (``model_index.json``), dispatched on its pipeline class name;
- a single-file ``.safetensors`` checkpoint, with the configs of a local diffusers folder
  (``LoadOptions.config``): the whole model for SD 1.x/2.x and SDXL, the transformer alone for SD3 and
  FLUX (every other part from that folder); pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused;
- otherwise a Hugging Face hub id, read from the local cache only when HF_HUB_OFFLINE=1 or the hub
  cannot be reached.

Every failure is one :class:`~models.errors.ModelLoadError` sentence, raised before anything is
kept: a model is returned whole or not at all.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from models.base import Denoiser
from models.errors import ModelLoadError, UnsupportedModelError
from models.sd import LoadOptions, resolve_device_dtype

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _load_unet_family(cls: Any, source: str, single_file: Path | None, device: Any, dtype: Any, options: LoadOptions,
                      local_only: bool) -> Denoiser:
    """A Stable Diffusion-family denoiser class from a single file (with ``options.config``) or a folder / hub id."""
    if single_file is not None:
        return cls.from_single_file(single_file, config=options.config, device=device, dtype=dtype, options=options)
    return cls.from_pretrained(source, device=device, dtype=dtype, options=options, local_files_only=local_only)


def _load_sd(source: str, single_file: Path | None, device: Any, dtype: Any, options: LoadOptions, local_only: bool) -> Denoiser:
    from models.sd import StableDiffusionDenoiser

    return _load_unet_family(StableDiffusionDenoiser, source, single_file, device, dtype, options, local_only)


def _load_sdxl(source: str, single_file: Path | None, device: Any, dtype: Any, options: LoadOptions, local_only: bool) -> Denoiser:
    from models.sdxl import StableDiffusionXLDenoiser

    return _load_unet_family(StableDiffusionXLDenoiser, source, single_file, device, dtype, options, local_only)


def _load_flow(kind: str) -> Callable[..., Denoiser]:
    def load(source: str, single_file: Path | None, device: Any, dtype: Any, options: LoadOptions, local_only: bool) -> Denoiser:
        if kind == "flux":
            from models.flux import FluxDenoiser as backend
        elif kind == "kontext":
            from models.kontext import FluxKontextDenoiser as backend  # type: ignore[assignment]
        else:
            from models.sd3 import StableDiffusion3Denoiser as backend  # type: ignore[assignment]
        if single_file is not None:  # the transformer from the file, the rest from options.config
            return backend.from_single_file(single_file, config=options.config, device=device, dtype=dtype, options=options)
        return backend.from_pretrained(source, device=device, dtype=dtype, options=options, local_files_only=local_only)

    return load


# Pipeline class name (model_index.json "_class_name") -> backend loader.
BACKENDS: dict[str, Callable[..., Denoiser]] = {
    "StableDiffusionPipeline": _load_sd,
    "StableDiffusionXLPipeline": _load_sdxl,
    "StableDiffusion3Pipeline": _load_flow("sd3"),
    "FluxPipeline": _load_flow("flux"),
    "FluxKontextPipeline": _load_flow("kontext"),
}
# Known architectures with no backend yet: the name a user recognises.
PLANNED: dict[str, str] = {
    "StableDiffusionXLImg2ImgPipeline": "SDXL refiner",
    "StableDiffusionInpaintPipeline": "Stable Diffusion inpainting",
    "StableDiffusionUpscalePipeline": "Stable Diffusion upscaler",
}
# Markers of single-file checkpoints (original key layouts): pipeline class -> key prefixes, in the order
# they are tried (FLUX before SD3: an all-in-one FLUX file carries text_encoders.* too).
_SINGLE_FILE_MARKERS: dict[str, tuple[str, ...]] = {
    "StableDiffusionXLPipeline": ("conditioner.embedders.",),
    "FluxPipeline": ("double_blocks.", "model.diffusion_model.double_blocks."),
    "StableDiffusion3Pipeline": ("joint_blocks.", "model.diffusion_model.joint_blocks.", "text_encoders."),
}
FAMILY_NAMES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
    "FluxKontextPipeline": "FLUX.1 Kontext",
}
_SD_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# (config folder's pipeline, single file's family) pairs whose transformer has one key layout: a FLUX.1 Kontext
# transformer file reads as FLUX by its keys, and loads into a Kontext config folder.
_SAME_TRANSFORMER = {("FluxKontextPipeline", "FluxPipeline")}


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    options: LoadOptions | None = None,
) -> Denoiser:
    """Resolve ``--model NAME_OR_PATH`` to a loaded backend (see the module docstring)."""
    options = options or LoadOptions()
    _check_true_cfg(options, None if name_or_path is None else "")
    if name_or_path is None:
        return _load_embedded(device, dtype)
    _check_load_arguments(device, dtype, options)
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("model must be a hub id or a path, got an empty name")
    path = Path(name).expanduser()
    if options.config is not None and not (path.is_file() and path.suffix.lower() == ".safetensors"):
        raise ModelLoadError(f"config is only for a single-file .safetensors checkpoint, and {name!r} is not one")
    if path.is_dir():
        class_name = _folder_class_name(path)
        return _build(class_name, name, None, device, dtype, options, True)
    if path.is_file():
        return _load_single_file(path, device, dtype, options)
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise ModelLoadError(f"model {name!r}: no such file or folder, and not a hub id of the form owner/name")
    local_only = _hub_local_only(options)
    class_name = _hub_class_name(name, local_only)
    return _build(class_name, name, None, device, dtype, options, local_only)


def _load_embedded(device: Any, dtype: Any) -> Denoiser:
    try:
        from models.embedded import load_embedded
    except ImportError as e:  # the module, or its entry point, is missing
        if isinstance(e, ModuleNotFoundError) and e.name not in ("models.embedded", "models"):
            raise
        raise ModelLoadError(
            "the embedded default model is not available in this install (models.embedded.load_embedded is "
            "missing); pass --model NAME_OR_PATH"
        ) from e
    kwargs: dict[str, Any] = {"device": device}
    if dtype is not None:
        if "dtype" not in inspect.signature(load_embedded).parameters:
            raise ValueError("dtype cannot be chosen for the embedded default model")
        kwargs["dtype"] = dtype
    try:
        return load_embedded(**kwargs)
    except OSError as e:  # weights missing or unreadable
        text = str(e).strip()
        raise ModelLoadError(
            f"the embedded default model could not be loaded: {text.splitlines()[0] if text else type(e).__name__}"
        ) from e


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith((".safetensors",) + PICKLE_SUFFIXES)
    )


def _folder_class_name(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json); for a single .safetensors checkpoint "
            "pass the file itself"
        )
    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{index} is unreadable or has no _class_name: {e}") from e


def _load_single_file(path: Path, device: Any, dtype: Any, options: LoadOptions) -> Denoiser:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name}: {suffix} checkpoints are pickle files, which can run code when loaded; "
            "use a .safetensors checkpoint"
        )
    if suffix != ".safetensors":
        raise ModelLoadError(f"{path.name}: unknown model file type {suffix!r}; expected a .safetensors checkpoint")
    if options.config is None:
        family = single_file_family(path)
        what = f"of {FAMILY_NAMES[family]}" if family else "whose family cannot be recognised from its keys"
        raise ModelLoadError(
            f"config: {path.name} is a single-file checkpoint {what}: pass config=FOLDER (--config), a local diffusers "
            "folder of the same architecture whose configs describe it (nothing is fetched)"
        )
    config = Path(options.config).expanduser()
    if not config.is_dir():
        raise ModelLoadError(f"config {str(config)!r} is not a folder")
    class_name = _folder_class_name(config)
    family = single_file_family(path)
    if family is None:
        raise UnsupportedModelError(
            f"{path.name} is not a Stable Diffusion 1.x/2.x checkpoint in the original layout (no {_SD_UNET_KEY}), "
            "nor one of SDXL, Stable Diffusion 3 or FLUX"
        )
    if class_name in BACKENDS and class_name != family and (class_name, family) not in _SAME_TRANSFORMER:
        raise ModelLoadError(
            f"config: {config} describes a {class_name} ({FAMILY_NAMES[class_name]}) but {path.name} is a checkpoint "
            f"of {FAMILY_NAMES[family]}; pass a config folder of the same family"
        )
    if family in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        _check_unet_channels(path)
    return _build(class_name, str(path), path, device, dtype, options, True)


def single_file_family(path: Path) -> str | None:
    """The pipeline class a single-file checkpoint's keys belong to, or None when no family matches."""
    keys = _safetensors_keys(path)
    for class_name, prefixes in _SINGLE_FILE_MARKERS.items():
        if any(k.startswith(prefixes) for k in keys):
            return class_name
    return "StableDiffusionPipeline" if _SD_UNET_KEY in keys else None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
        raise ModelLoadError(f"{path.name} is not a readable safetensors file: {e}") from e


def _check_unet_channels(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        in_channels = f.get_slice(_SD_UNET_KEY).get_shape()[1] if _SD_UNET_KEY in f.keys() else 4
    if in_channels != 4:
        raise UnsupportedModelError(
            f"{path.name}'s UNet takes {in_channels} input channels (an inpainting or depth model?); "
            "only text-to-image models are supported"
        )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 2.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_local_only(options: LoadOptions) -> bool:
    if options.local_files_only is not None:
        return options.local_files_only
    if _hub_offline():
        return True
    if not _hub_reachable():
        logger.warning("the Hugging Face hub cannot be reached; using the local cache only")
        return True
    return False


def _hub_class_name(repo_id: str, local_only: bool) -> str:
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(repo_id, local_files_only=local_only)
    except Exception as e:  # huggingface_hub / diffusers raise OSError, HfHubHTTPError, EnvironmentError...
        if local_only:
            raise ModelLoadError(
                f"model {repo_id!r} is not in the local Hugging Face cache and downloads are off "
                "(HF_HUB_OFFLINE=1 or no network); download it once online or pass a local folder"
            ) from e
        raise ModelLoadError(f"model {repo_id!r} was not found on the Hugging Face hub ({type(e).__name__})") from e
    return str(config.get("_class_name", ""))


def _build(
    class_name: str,
    source: str,
    single_file: Path | None,
    device: Any,
    dtype: Any,
    options: LoadOptions,
    local_only: bool,
) -> Denoiser:
    _check_true_cfg(options, class_name)
    if class_name in PLANNED:
        raise UnsupportedModelError(f"{source} is a {class_name} ({PLANNED[class_name]}), which is not supported yet")
    loader = BACKENDS.get(class_name)
    if loader is None:
        raise UnsupportedModelError(
            f"{source} is a {class_name or 'unknown'} model; supported: {', '.join(BACKENDS)}"
        )
    try:
        return loader(source, single_file, device, dtype, options, local_only)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers / transformers / huggingface_hub / safetensors all raise their own types
        gc.collect()  # drop whatever was half-built before telling the user
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        text = str(e).strip()
        raise ModelLoadError(f"could not load {source}: {text.splitlines()[0] if text else type(e).__name__}") from e


TRUE_CFG_FAMILIES = ("FluxPipeline", "FluxKontextPipeline")


def _check_true_cfg(options: LoadOptions, class_name: str | None) -> None:
    """``true_cfg_scale``: a finite number >= 1, and above 1 only for FLUX (``class_name`` "" = not known yet)."""
    if not isinstance(options, LoadOptions):
        return  # refused by _check_load_arguments, naming options
    s = options.true_cfg_scale
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 1.0 <= float(s) <= 50.0:
        raise ValueError(f"true_cfg_scale must be a number in 1..50 (1 = off), got {s!r}")
    if float(s) != 1.0 and class_name != "" and class_name not in TRUE_CFG_FAMILIES:
        what = FAMILY_NAMES.get(class_name or "", "the embedded model" if class_name is None else class_name)
        raise ModelLoadError(f"true_cfg_scale: true CFG is for FLUX models; this is {what}, whose guidance is classic CFG")


def _check_load_arguments(device: Any, dtype: Any, options: LoadOptions) -> None:
    """Argument errors are the caller's, reported as such before anything is loaded."""
    if not isinstance(options, LoadOptions):
        raise ValueError(f"options must be a LoadOptions, got {type(options).__name__}")
    dev, _ = resolve_device_dtype(device, dtype, options.fp16)
    if options.cpu_offload and dev.type != "cuda":
        raise ValueError("cpu_offload needs a CUDA device (device='cuda')")
