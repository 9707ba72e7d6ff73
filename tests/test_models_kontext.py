"""FLUX.1 Kontext backend on a tiny random-weight pipeline (tests/tiny_flux.py): the pipeline's own numbers."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from pipeline_hooks import capture

from models.kontext import FluxKontextDenoiser, fit_image
from models.registry import load_model
from solver.registry import get_solver
from tests.tiny_flux import save_tiny_kontext

SIZE = 32
GUIDANCE = 2.5


def picture(seed: int, height: int = SIZE, width: int = SIZE) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_kontext(tmp_path_factory.mktemp("kontext") / "tiny-kontext")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def pipe(folder):
    return FluxKontextPipeline.from_pretrained(str(folder), local_files_only=True)


def run_pipe(pipe, image, **kwargs):
    """The pipeline at SIZE x SIZE with the input image kept at its size (no preferred-resolution resize)."""
    return pipe(image=image, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
                guidance_scale=GUIDANCE, output_type="latent", **kwargs)


def test_guided_output_equals_the_pipeline(model, pipe):
    assert isinstance(model, FluxKontextDenoiser) and model.takes_image and model.guidance_embeds
    image = picture(0)
    calls = capture(pipe, image=image, prompt="make the sky purple", num_inference_steps=2, height=SIZE, width=SIZE,
                    max_area=SIZE * SIZE, _auto_resize=False, guidance_scale=GUIDANCE, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2
    n = (SIZE // model.vae_scale_factor // 2) ** 2  # target tokens; the input image's follow them
    assert calls[0]["x"].shape[1] == 2 * n
    cond = model.image_conditioning(model.encode_prompts(["make the sky purple"]), image, SIZE, SIZE)
    for call in calls:
        t = call["t"] * 1000
        x = model.pipe._unpack_latents(call["x"][:, :n], SIZE, SIZE, model.vae_scale_factor)
        image_tokens = model.pipe._pack_latents(cond.cond_extra["image_latents"], 1, 4, SIZE // 2, SIZE // 2)
        assert (image_tokens - call["x"][:, n:]).abs().max().item() < 1e-6  # the same encoded input image
        eps = model.guided_eps(x, t, cond, GUIDANCE)
        s = float(t) / 1000
        v = pipe._unpack_latents(call["v"][:, :n], SIZE, SIZE, model.vae_scale_factor)
        ref = x - v if s == 1.0 else x + (1 - s) * v
        diff = (eps - ref).abs().max().item()
        print(f"kontext guided output (t = {s:.3f}) max diff: {diff:.2e}")
        assert diff < 1e-4


def test_ten_euler_steps_equal_the_pipeline_loop(model, pipe):
    image = picture(1)
    x_T = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    prompts = ["make the sky purple", "add a hat"]
    packed = model.pipe._pack_latents(x_T, 2, 4, SIZE // 2, SIZE // 2)
    ref = run_pipe(pipe, image, prompt=prompts, num_inference_steps=10, latents=packed).images
    ref = model.pipe._unpack_latents(ref, SIZE, SIZE, model.vae_scale_factor)
    cond = model.image_conditioning(model.encode_prompts(prompts), image, SIZE, SIZE)
    config = model.scheduler_config_for(SIZE, SIZE)
    ours = get_solver("rule:ddim", config).sample(lambda x, t: model.guided_eps(x, t, cond, GUIDANCE), x_T, 10)
    diff = (ours - ref).abs().max().item()
    print(f"kontext 10-step Euler edit (DDIM in y, n) max diff: {diff:.2e}")
    assert diff < 1e-3


def test_the_input_image_reaches_the_sample(model):
    x = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(["add a hat"])
    a = model.guided_eps(x, 500.0, model.image_conditioning(cond, picture(0), SIZE, SIZE), GUIDANCE)
    b = model.guided_eps(x, 500.0, model.image_conditioning(cond, picture(2), SIZE, SIZE), GUIDANCE)
    assert (a - b).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="^image: .* editing model"):
        model.guided_eps(x, 500.0, cond, GUIDANCE)


def test_sizes_of_an_edit(model):
    wide = picture(0, 40, 70)
    assert model.default_size_for(wide, keep_size=True) == (40, 68)  # rounded down to the 2 x 2 patch multiple
    h, w = model.default_size_for(wide)
    assert h % model.size_multiple == 0 and w % model.size_multiple == 0 and w > h  # the nearest preferred aspect
    with pytest.raises(ValueError, match="^image: .* too small"):
        model.default_size_for(picture(0, 3, 3), keep_size=True)
    fitted = fit_image(wide, 32, 32)
    assert fitted.size == (32, 32)
    same = picture(5)
    assert np.array_equal(np.asarray(fit_image(same, SIZE, SIZE)), np.asarray(same))


def test_a_text_to_image_model_refuses_an_input_image(tmp_path):
    from tests.tiny_flux import save_tiny_flux

    flux = load_model(str(save_tiny_flux(tmp_path / "tiny-flux")), device="cpu")
    assert not flux.takes_image
    with pytest.raises(ValueError, match="^image: .* text-to-image model"):
        flux.image_conditioning(flux.encode_prompts(["a"]), picture(0), SIZE, SIZE)


def test_a_kontext_transformer_file_loads_with_a_kontext_config_folder(folder, model, tmp_path):
    """A FLUX.1 Kontext transformer single file has FLUX's key layout; with a Kontext config folder it loads as Kontext."""
    import shutil

    from models.sd import LoadOptions
    from tests.tiny_flux import converter_at_tiny_width, save_flux_single_file

    ckpt = save_flux_single_file(folder, tmp_path / "kontext.safetensors", "")
    config = tmp_path / "config-only"
    shutil.copytree(folder, config)
    for weights in (config / "transformer").glob("*.safetensors"):
        weights.unlink()
    with converter_at_tiny_width():
        one = load_model(str(ckpt), device="cpu", options=LoadOptions(config=config))
    assert isinstance(one, FluxKontextDenoiser)
    x = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    a = one.guided_eps(x, 600.0, one.image_conditioning(one.encode_prompts(["add a hat"]), picture(0), SIZE, SIZE), GUIDANCE)
    b = model.guided_eps(x, 600.0, model.image_conditioning(model.encode_prompts(["add a hat"]), picture(0), SIZE, SIZE), GUIDANCE)
    assert (a - b).abs().max().item() < 1e-5
