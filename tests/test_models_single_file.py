"""Single-file checkpoints of SDXL, SD3 and FLUX in their original key layouts, with ``--config FOLDER``.

Each checkpoint is written by a test helper (the inverse of diffusers' single-file converters) from a tiny
folder; the config folder holds no weights for what the file carries, so those can only come from the file.
The model loaded from the file must give the folder model's guided output (same weights) within 1e-5.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import ModelLoadError
from models.registry import load_model
from models.sd import LoadOptions
from tests.tiny_flux import converter_at_tiny_width, save_flux_single_file, save_tiny_flux
from tests.tiny_sd3 import save_sd3_single_file, save_tiny_sd3
from tests.tiny_sdxl import save_sgm_single_file, save_tiny_sdxl

PROMPTS, NEGATIVE = ["a red cat", "the dog"], "blurry"


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def without_weights(folder: Path, dest: Path, parts: tuple[str, ...] | None = None) -> Path:
    """A copy of ``folder`` without the weights of ``parts`` (all of them when None): only configs remain."""
    shutil.copytree(folder, dest)
    for part in parts if parts is not None else [p.name for p in dest.iterdir() if p.is_dir()]:
        for weights in (dest / part).glob("*.safetensors"):
            weights.unlink()
    return dest


def max_guided_difference(one, other, t: float, guidance: float = 4.0) -> float:
    x = torch.randn(2, *one.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    a = one.guided_eps(x, t, one.encode_prompts(PROMPTS, NEGATIVE), guidance)
    b = other.guided_eps(x, t, other.encode_prompts(PROMPTS, NEGATIVE), guidance)
    return float((a - b).abs().max())


# --- SDXL: the whole model from one sgm-layout file -------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    folder = save_tiny_sdxl(tmp / "tiny-sdxl", hidden_2=48)  # OpenCLIP wider than CLIP-L, as in SDXL
    ckpt = save_sgm_single_file(folder, tmp / "tiny-sdxl.safetensors")
    return folder, ckpt, without_weights(folder, tmp / "config-only")


def test_sdxl_single_file_equals_the_folder_model(sdxl):
    from models.sdxl import StableDiffusionXLDenoiser

    folder, ckpt, config = sdxl
    keys = load_file(str(ckpt)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP layout
    one = load_model(str(ckpt), device="cpu", options=LoadOptions(config=config))
    ref = load_model(str(folder), device="cpu")
    assert isinstance(one, StableDiffusionXLDenoiser) and one.model_id == "tiny-sdxl.safetensors"
    c1, c2 = one.encode_prompts(PROMPTS, NEGATIVE), ref.encode_prompts(PROMPTS, NEGATIVE)
    torch.testing.assert_close(c1.cond, c2.cond, atol=0, rtol=0)  # both text encoders
    torch.testing.assert_close(c1.cond_extra["text_embeds"], c2.cond_extra["text_embeds"], atol=0, rtol=0)
    assert max_guided_difference(one, ref, 600) < 1e-5
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(one.decode(x), ref.decode(x), atol=1e-6, rtol=0)  # the VAE
    assert one.scheduler_config == ref.scheduler_config


def test_sdxl_single_file_previews_through_the_cli(sdxl, tmp_path, capsys):
    from preview.__main__ import main

    _, ckpt, config = sdxl
    argv = ["--model", str(ckpt), "--config", str(config), "--seeds", "0-1", "--steps", "2", "--prompt", "a red cat",
            "--out", str(tmp_path / "out"), "--db", str(tmp_path / "s.sqlite"), "--device", "cpu"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    assert [r["seed"] for r in records] == [0, 1] and all(Path(r["path"]).is_file() for r in records)


# --- FLUX and SD3: the transformer from the file, the rest from the config folder --------------------
@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    folders = {ge: save_tiny_flux(tmp / f"tiny-flux-{'dev' if ge else 'schnell'}", guidance_embeds=ge) for ge in (True, False)}
    configs = {ge: without_weights(f, tmp / f"config-{f.name}", ("transformer",)) for ge, f in folders.items()}
    return tmp, folders, configs


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])  # as BFL ships it, as ComfyUI saves it
def test_flux_single_file_transformer_equals_the_folder_model(flux, prefix):
    from models.flux import FluxDenoiser

    tmp, folders, configs = flux
    ckpt = save_flux_single_file(folders[True], tmp / f"dev{len(prefix)}.safetensors", prefix)
    assert any(k.startswith(prefix + "double_blocks.") for k in load_file(str(ckpt)))
    with converter_at_tiny_width():
        one = load_model(str(ckpt), device="cpu", options=LoadOptions(config=configs[True]))
    assert isinstance(one, FluxDenoiser) and one.guidance_embeds and one.model_id == ckpt.name
    assert max_guided_difference(one, load_model(str(folders[True]), device="cpu"), 0.6, guidance=3.5) < 1e-5


def test_flux_single_file_of_another_variant_than_its_config(flux):
    """A schnell file with a dev config lacks the guidance embedding; a dev file with a schnell config has
    one the config has no place for (diffusers would only log it and drop it): both refused, naming config."""
    tmp, folders, configs = flux
    dev = save_flux_single_file(folders[True], tmp / "dev.safetensors")
    schnell = save_flux_single_file(folders[False], tmp / "schnell.safetensors")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    cases = [(schnell, configs[True], "no weights for", verbosity), (dev, configs[False], "has no place for", verbosity),
             (dev, configs[False], "has no place for", diffusers_logging.ERROR)]  # diffusers' warnings turned off
    try:
        for ckpt, config, what, level in cases:
            diffusers_logging.set_verbosity(level)
            with converter_at_tiny_width(), pytest.raises(ModelLoadError, match=f"^config: .*{ckpt.name}, which has .*{what}") as err:
                load_model(str(ckpt), device="cpu", options=LoadOptions(config=config))
            assert "\n" not in str(err.value)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def test_flux_single_file_with_a_config_of_another_family(flux, tmp_path):
    tmp, folders, _ = flux
    ckpt = save_flux_single_file(folders[True], tmp / "dev-other.safetensors")
    sd3 = save_tiny_sd3(tmp_path / "tiny-sd3")
    with pytest.raises(ModelLoadError, match="^config: .* describes a StableDiffusion3Pipeline .* is a checkpoint of FLUX; "
                                             "pass a config folder of the same family$"):
        load_model(str(ckpt), device="cpu", options=LoadOptions(config=sd3))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    folder = save_tiny_sd3(tmp / "tiny-sd3")
    return tmp, folder, without_weights(folder, tmp / "config-tiny-sd3", ("transformer",))


def test_sd3_single_file_transformer_equals_the_folder_model(sd3):
    from models.sd3 import StableDiffusion3Denoiser

    tmp, folder, config = sd3
    ckpt = save_sd3_single_file(folder, tmp / "tiny-sd3.safetensors")
    assert any(k.startswith("model.diffusion_model.joint_blocks.") for k in load_file(str(ckpt)))
    one = load_model(str(ckpt), device="cpu", options=LoadOptions(config=config))
    assert isinstance(one, StableDiffusion3Denoiser) and one.model_id == "tiny-sd3.safetensors"
    assert max_guided_difference(one, load_model(str(folder), device="cpu"), 0.6) < 1e-5


def test_sd3_single_file_with_other_parts_loads_its_transformer_and_says_the_rest_comes_from_config(sd3, caplog):
    tmp, folder, config = sd3
    ckpt = save_sd3_single_file(folder, tmp / "with-parts.safetensors", prefix="")
    tensors = load_file(str(ckpt)) | {"first_stage_model.decoder.conv_in.bias": torch.zeros(16),
                                      "text_encoders.clip_l.transformer.text_model.final_layer_norm.bias": torch.zeros(32)}
    save_file(tensors, str(ckpt))
    with caplog.at_level(logging.WARNING, logger="models.flow_common"):
        one = load_model(str(ckpt), device="cpu", options=LoadOptions(config=config))
    assert "with-parts.safetensors also holds weights of the VAE and text encoders; only its transformer" in caplog.text
    assert max_guided_difference(one, load_model(str(folder), device="cpu"), 0.6) < 1e-5
