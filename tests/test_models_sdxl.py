"""SDXL backend on a tiny random-weight pipeline (tests/tiny_sdxl.py): the pipeline's own numbers."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from models.registry import load_model
from models.sdxl import StableDiffusionXLDenoiser
from solver.registry import get_solver
from tests.tiny_sdxl import save_tiny_sdxl

GUIDANCE = 5.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def pipe(folder):
    return StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)


def capture_guided(pipe, module, **kwargs):
    """The pipeline's first guided model output and its inputs, read from a forward hook."""
    seen = {}

    def hook(mod, args, kw, out):
        if "out" not in seen:
            seen.update(x=(kw.get("sample", args[0] if args else None)), t=(args[1] if len(args) > 1 else kw["timestep"]),
                        out=out[0] if isinstance(out, tuple) else out.sample)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(**kwargs)
    finally:
        handle.remove()
    uncond, cond = seen["out"].chunk(2)
    return seen["x"][:1], seen["t"], uncond + kwargs["guidance_scale"] * (cond - uncond)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_guided_output_equals_the_pipeline(model, pipe, negative):
    assert isinstance(model, StableDiffusionXLDenoiser)
    kwargs = dict(prompt="a red cat", negative_prompt=negative or None, num_inference_steps=1, guidance_scale=GUIDANCE,
                  height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    x, t, ref = capture_guided(pipe, pipe.unet, **kwargs)
    cond = model.encode_prompts(["a red cat"], negative)
    if not negative:  # force_zeros_for_empty_prompt: the empty negative is zeros, as the pipeline's default
        assert not cond.uncond.any() and not cond.uncond_extra["text_embeds"].any()
    ours = model.guided_eps(x, t, cond, GUIDANCE)
    diff = (ours - ref).abs().max().item()
    print(f"sdxl guided output max diff ({negative or 'no negative'}): {diff:.2e}")
    assert diff < 1e-4


def test_ten_ddim_steps_equal_the_pipeline_loop(model, pipe):
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    pipe.scheduler = DDIMScheduler.from_config(model.scheduler_config, timestep_spacing="trailing", clip_sample=False)
    ref = pipe(prompt=["a red cat", "a dog"], num_inference_steps=10, guidance_scale=GUIDANCE, height=32, width=32,
               latents=x_T.clone(), output_type="latent").images
    cond = model.encode_prompts(["a red cat", "a dog"])
    ours = get_solver("rule:ddim", model.scheduler_config).sample(lambda x, t: model.guided_eps(x, t, cond, GUIDANCE), x_T, 10)
    diff = (ours - ref).abs().max().item()
    print(f"sdxl 10-step DDIM max diff: {diff:.2e}")
    assert diff < 1e-3


def test_time_ids_follow_the_image_size(model):
    assert model.time_ids(32, 48, 2).tolist() == [[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]] * 2
    assert model.latent_shape(32, 48) == (4, 16, 24)


def test_determinism_across_grid_sizes(model):
    """A row's result does not depend on the other rows of its batch: alone or in a grid of 3, the same
    sample up to CPU kernels' batch-dependent rounding (as tests/test_models_sd.py allows)."""
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    cond = model.encode_prompts(["a cat", "a dog", "a tree"], "blurry")
    solver = get_solver("rule:ab2", model.scheduler_config)
    full = solver.sample(lambda x, t: model.guided_eps(x, t, cond, GUIDANCE), x, 4)
    alone = solver.sample(lambda x, t: model.guided_eps(x, t, cond.select([1]), GUIDANCE), x[1:2], 4)
    assert (full[1:2] - alone).abs().max().item() < 1e-4
    other = solver.sample(lambda x, t: model.guided_eps(x, t, cond.select([0]), GUIDANCE), x[1:2], 4)
    assert (other - alone).abs().max().item() > 1e-3  # the prompt does reach the sample
