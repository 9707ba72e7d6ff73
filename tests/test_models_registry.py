"""``load_model``: every bad name, path or checkpoint is one clear sentence, and nothing is loaded."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from models import registry
from models.errors import ModelLoadError, UnsupportedModelError
from models.registry import load_model
from models.sd import LoadOptions


def _one_sentence(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _folder(tmp_path, class_name: str):
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/folder", "~/nope.safetensors", "a/b/c"])
def test_unknown_path(name):
    with pytest.raises(ModelLoadError, match="no such file or folder") as err:
        load_model(name)
    _one_sentence(err)


@pytest.mark.parametrize("name", ["not a model", "just-a-name", " "])
def test_not_a_hub_id(name):
    with pytest.raises(ModelLoadError):
        load_model(name)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle") as err:
        load_model(str(path))
    _one_sentence(err)


def test_config_is_only_for_single_files(tmp_path):
    folder = _folder(tmp_path, "StableDiffusionPipeline")
    for name in (str(folder), "owner/name"):
        with pytest.raises(ModelLoadError, match="config is only for a single-file .safetensors checkpoint"):
            load_model(name, options=LoadOptions(config=folder))


def test_unknown_file_type(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="unknown model file type '.gguf'"):
        load_model(str(path))


def _sd_like_checkpoint(path, extra: dict[str, torch.Tensor] | None = None, sd: bool = True):
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)} if sd else {}
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


def test_single_file_needs_a_local_config_folder(tmp_path):
    ckpt = _sd_like_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=r"pass config=FOLDER") as err:
        load_model(str(ckpt))
    _one_sentence(err)
    with pytest.raises(ModelLoadError, match="is not a folder"):
        load_model(str(ckpt), options=LoadOptions(config=tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(str(ckpt), options=LoadOptions(config=tmp_path))


MARKERS = [
    ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", "StableDiffusionXLPipeline", "SDXL"),
    ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "StableDiffusion3Pipeline",
     "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.norm.key_norm.scale", "FluxPipeline", "FLUX"),
]


@pytest.mark.parametrize(("key", "class_name", "arch"), MARKERS)
def test_single_file_of_another_family_than_its_config(tmp_path, key, class_name, arch):
    ckpt = _sd_like_checkpoint(tmp_path / "m.safetensors", {key: torch.zeros(2)})
    config = _folder(tmp_path, "StableDiffusionPipeline")
    with pytest.raises(ModelLoadError, match=f"^config: .* but m.safetensors is a checkpoint of {arch}; pass a config") as err:
        load_model(str(ckpt), options=LoadOptions(config=config))
    _one_sentence(err)
    with pytest.raises(ModelLoadError, match=f"^config: m.safetensors is a single-file checkpoint of {arch}: pass config="):
        load_model(str(ckpt))


def test_single_file_of_an_unrecognised_family_needs_config_and_nothing_is_written(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(ckpt))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match="^config: m.safetensors is a single-file checkpoint whose family cannot be "
                                             "recognised from its keys: pass config=FOLDER") as err:
        load_model(str(ckpt))
    _one_sentence(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("key", "class_name", "arch"), MARKERS[1:])
def test_single_file_flow_checkpoint_needs_a_config_folder_with_a_transformer(tmp_path, key, class_name, arch):
    """SD3 / FLUX single files are the transformer alone: the config folder must describe one."""
    ckpt = _sd_like_checkpoint(tmp_path / "m.safetensors", {key: torch.zeros(2)}, sd=False)
    config = _folder(tmp_path, class_name)
    with pytest.raises(ModelLoadError, match=f"^config: {config} has no transformer entry in model_index.json$") as err:
        load_model(str(ckpt), options=LoadOptions(config=config))
    _one_sentence(err)


def test_an_all_in_one_flux_file_is_flux_though_it_carries_text_encoders(tmp_path):
    """ComfyUI's all-in-one FLUX files hold text_encoders.* (also an SD3 marker) beside the transformer."""
    ckpt = _sd_like_checkpoint(tmp_path / "m.safetensors", {
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.bias": torch.zeros(2),
        "vae.decoder.conv_in.bias": torch.zeros(2)}, sd=False)
    assert registry.single_file_family(ckpt) == "FluxPipeline"


def test_single_file_of_an_inpainting_model(tmp_path):
    ckpt = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, str(ckpt))
    with pytest.raises(UnsupportedModelError, match="takes 9 input channels"):
        load_model(str(ckpt), options=LoadOptions(config=_folder(tmp_path, "StableDiffusionPipeline")))


def test_single_file_that_is_not_stable_diffusion(tmp_path):
    ckpt = _sd_like_checkpoint(tmp_path / "m.safetensors", {"encoder.weight": torch.zeros(2)}, sd=False)
    with pytest.raises(UnsupportedModelError, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        load_model(str(ckpt), options=LoadOptions(config=_folder(tmp_path, "StableDiffusionPipeline")))


def test_damaged_safetensors(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_model(str(ckpt), options=LoadOptions(config=_folder(tmp_path, "StableDiffusionPipeline")))


@pytest.mark.parametrize(
    ("class_name", "message"),
    [
        ("StableDiffusionXLImg2ImgPipeline", r"is a StableDiffusionXLImg2ImgPipeline \(SDXL refiner\), which is not supported"),
        ("KandinskyPipeline", "is a KandinskyPipeline model; supported: StableDiffusionPipeline, StableDiffusionXLPipeline"),
    ],
)
def test_folder_of_an_unsupported_architecture(tmp_path, class_name, message):
    with pytest.raises(UnsupportedModelError, match=message) as err:
        load_model(str(_folder(tmp_path, class_name)))
    _one_sentence(err)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(str(tmp_path))


def test_hub_id_not_cached_offline_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=2.0: pytest.fail("offline must not probe the network"))
    with pytest.raises(ModelLoadError, match="is not in the local Hugging Face cache and downloads are off") as err:
        load_model("diffusion-preview-tests/not-a-cached-model")
    assert _one_sentence(err).startswith("model 'diffusion-preview-tests/not-a-cached-model'")
    assert err.value.__cause__ is not None  # the library's exception stays chained for debugging


def test_hub_id_with_no_network_uses_the_cache_only(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=2.0: False)
    with caplog.at_level(logging.WARNING, logger="models.registry"):
        with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
            load_model("diffusion-preview-tests/not-a-cached-model")
    assert any("cannot be reached" in r.getMessage() for r in caplog.records)


def test_default_is_the_embedded_model(monkeypatch):
    seen = {}

    def load_embedded(device=None):
        seen["device"] = device
        return "embedded-denoiser"

    monkeypatch.setitem(sys.modules, "models.embedded", types.SimpleNamespace(load_embedded=load_embedded))
    assert load_model(None, device="cpu") == "embedded-denoiser" and seen == {"device": "cpu"}
    with pytest.raises(ValueError, match="dtype cannot be chosen"):
        load_model(None, dtype=torch.float32)


def test_default_with_missing_weights_is_a_clear_error(monkeypatch):
    def load_embedded(device=None):
        raise FileNotFoundError("embedded model weights not found in /x (train them)")

    monkeypatch.setitem(sys.modules, "models.embedded", types.SimpleNamespace(load_embedded=load_embedded))
    with pytest.raises(ModelLoadError, match="embedded default model could not be loaded: embedded model weights not found"):
        load_model()


def test_default_without_the_embedded_model_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "models.embedded", None)  # import models.embedded fails
    with pytest.raises(ModelLoadError, match="embedded default model is not available") as err:
        load_model()
    _one_sentence(err)


def test_bad_device_dtype_options_before_anything_is_read():
    with pytest.raises(ValueError, match="not supported on the CPU"):
        load_model("/no/such/folder", device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model("/no/such/folder", device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="options must be a LoadOptions"):
        load_model("/no/such/folder", options={"fp16": True})  # type: ignore[arg-type]
