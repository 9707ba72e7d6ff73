"""FLUX backend on tiny random-weight pipelines (tests/tiny_flux.py): the pipeline's own numbers."""

import pytest
import torch
from diffusers import FluxPipeline
from pipeline_hooks import capture

from models.flux import FluxDenoiser
from models.registry import load_model
from models.sd import LoadOptions
from solver.registry import get_solver
from solver.schedules import FlowSchedule
from tests.tiny_flux import save_tiny_flux

SIZE = 32
GUIDANCE = 3.5


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-dev")


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-schnell", guidance_embeds=False)


@pytest.fixture(scope="module")
def dev(dev_folder):
    return load_model(str(dev_folder), device="cpu")


@pytest.fixture(scope="module")
def pipe(dev_folder):
    return FluxPipeline.from_pretrained(str(dev_folder), local_files_only=True)


def pack(model, x):
    b, c, h, w = x.shape
    return model.pipe._pack_latents(x, b, c, h, w)



def test_dev_guided_output_equals_the_pipeline(dev, pipe):
    assert isinstance(dev, FluxDenoiser) and dev.guidance_embeds
    calls = capture(pipe, prompt="a red cat", num_inference_steps=2, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    output_type="latent", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # distilled guidance: one pass per step, no unconditional one
    cond = dev.encode_prompts(["a red cat"])
    for call in calls:
        t = call["t"] * 1000
        x = dev.pipe._unpack_latents(call["x"], SIZE, SIZE, dev.vae_scale_factor)
        ours_v = dev.model_output(x, t, cond.cond, None, extra={"pooled_projections": cond.cond_extra["pooled_projections"],
                                                               "guidance": torch.full((1,), GUIDANCE)})
        assert (pack(dev, ours_v) - call["v"]).abs().max().item() < 1e-5
        eps = dev.guided_eps(x, t, cond, GUIDANCE)
        s = float(t) / 1000
        ref = x - pipe._unpack_latents(call["v"], SIZE, SIZE, dev.vae_scale_factor) if s == 1.0 else \
            x + (1 - s) * pipe._unpack_latents(call["v"], SIZE, SIZE, dev.vae_scale_factor)
        diff = (eps - ref).abs().max().item()
        print(f"flux-dev guided output (t = {s:.3f}) max diff: {diff:.2e}")
        assert diff < 1e-4


def test_true_cfg_with_a_negative_prompt_equals_the_pipeline(dev_folder, pipe):
    model = load_model(str(dev_folder), device="cpu", options=LoadOptions(true_cfg_scale=4.0))
    calls = capture(pipe, prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=1,
                    guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="latent",
                    generator=torch.Generator().manual_seed(1))
    assert len(calls) == 2  # conditional, then negative
    v = calls[1]["v"] + 4.0 * (calls[0]["v"] - calls[1]["v"])
    x = model.pipe._unpack_latents(calls[0]["x"], SIZE, SIZE, model.vae_scale_factor)
    ours = model.guided_eps(x, calls[0]["t"] * 1000, model.encode_prompts(["a red cat"], "blurry"), GUIDANCE)
    diff = (ours - (x - model.pipe._unpack_latents(v, SIZE, SIZE, model.vae_scale_factor))).abs().max().item()
    print(f"flux-dev true CFG guided output max diff: {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_ten_euler_steps_equal_the_pipeline_loop(which, dev, schnell_folder, pipe):
    model = dev if which == "dev" else load_model(str(schnell_folder), device="cpu")
    reference = pipe if which == "dev" else FluxPipeline.from_pretrained(str(schnell_folder), local_files_only=True)
    x_T = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    ref = reference(prompt=["a red cat", "a dog"], num_inference_steps=10, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    latents=pack(model, x_T), output_type="latent").images
    ref = model.pipe._unpack_latents(ref, SIZE, SIZE, model.vae_scale_factor)
    cond = model.encode_prompts(["a red cat", "a dog"])
    config = model.scheduler_config_for(SIZE, SIZE)
    ours = get_solver("rule:ddim", config).sample(lambda x, t: model.guided_eps(x, t, cond, GUIDANCE), x_T, 10)
    diff = (ours - ref).abs().max().item()
    print(f"flux-{which} 10-step Euler (DDIM in y, n) max diff: {diff:.2e}")
    assert diff < 1e-3


def test_the_grid_is_the_pipelines_for_the_image_size(dev, pipe):
    for size in (32, 64):
        calls = capture(pipe, prompt="a", num_inference_steps=4, height=size, width=size, output_type="latent",
                        generator=torch.Generator().manual_seed(0))
        seen = torch.stack([c["t"][0] for c in calls]).double() * 1000
        grid = FlowSchedule.from_config(dev.scheduler_config_for(size, size)).grid(4)
        assert torch.allclose(grid.timesteps, seen, atol=1e-3)
    assert dev.scheduler_config_for(32, 32)["mu"] != dev.scheduler_config_for(64, 64)["mu"]


def test_schnell_ignores_guidance_and_packs_its_latents(schnell_folder):
    model = load_model(str(schnell_folder), device="cpu")
    assert not model.guidance_embeds and model.default_guidance == 0.0
    cond = model.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.guided_eps(x, 500.0, cond, 1.0), model.guided_eps(x, 500.0, cond, 7.0))
    assert model.latent_shape(32, 64) == (4, 16, 32)
    with pytest.raises(ValueError, match="height must be a multiple of 4"):
        model.latent_shape(30, 32)


def test_determinism_across_grid_sizes(dev):
    """A row's result does not depend on the other rows of its batch: alone or in a grid of 3, the same
    sample up to CPU kernels' batch-dependent rounding (as tests/test_models_sd.py allows)."""
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    cond = dev.encode_prompts(["a cat", "a dog", "a tree"])
    solver = get_solver("rule:ab2", dev.scheduler_config_for(SIZE, SIZE))
    full = solver.sample(lambda x, t: dev.guided_eps(x, t, cond, GUIDANCE), x, 4)
    alone = solver.sample(lambda x, t: dev.guided_eps(x, t, cond.select([1]), GUIDANCE), x[1:2], 4)
    assert (full[1:2] - alone).abs().max().item() < 1e-4
    other = solver.sample(lambda x, t: dev.guided_eps(x, t, cond.select([0]), GUIDANCE), x[1:2], 4)
    assert (other - alone).abs().max().item() > 1e-3  # the prompt does reach the sample


def test_previews_and_refines_take_the_grid_of_their_own_image_size(dev, pipe):
    """The preview solver and the full-step sampler are built for the request's size, not the default's:
    at a size other than the default, their grids are the ones FluxPipeline runs at that size."""
    from preview.solvers import resolve_solver
    from refine.full_step import full_step_solver

    size = 2 * dev.default_size[0]
    calls = capture(pipe, prompt="a", num_inference_steps=4, height=size, width=size, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    seen = torch.stack([c["t"][0] for c in calls]).double() * 1000
    preview = resolve_solver("rule:ddim", dev, None, (size, size)).solver
    assert torch.allclose(preview.grid(4).timesteps, seen, atol=1e-3)
    assert not torch.allclose(resolve_solver("rule:ddim", dev, None).solver.grid(4).timesteps, seen, atol=1e-3)
    full = full_step_solver(dev, (size, size))
    default = full_step_solver(dev)
    assert not torch.allclose(full.grid(8).timesteps, default.grid(8).timesteps)
    assert torch.allclose(full.grid(8).timesteps, FlowSchedule.from_config(dev.scheduler_config_for(size, size)).grid(8).timesteps)


def test_true_cfg_from_the_command_line_is_recorded_and_refused_elsewhere(dev_folder, tmp_path, capsys):
    """``--true-cfg-scale`` reaches the FLUX backend, changes the image (with a negative prompt) and is written into
    the PNG parameters; on a model without true CFG it is refused naming the option, with nothing written."""
    import json

    from preview.__main__ import main
    from store.png import read_png_parameters

    def preview(*extra: str, model: str = str(dev_folder), name: str = "a") -> tuple[int, list[dict], str]:
        code = main(["--model", model, "--prompt", "a red cat", "--negative-prompt", "blurry", "--seeds", "0",
                     "--steps", "2", "--out", str(tmp_path / name), "--db", str(tmp_path / f"{name}.sqlite"), *extra])
        out = capsys.readouterr()
        return code, [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err

    code, plain, err = preview()
    assert code == 0, err
    code, cfg, err = preview("--true-cfg-scale", "4", name="b")
    assert code == 0, err
    plain_png, cfg_png = (open(r[0]["path"], "rb").read() for r in (plain, cfg))
    assert float(read_png_parameters(cfg_png)["True CFG scale"]) == 4.0 and "True CFG scale" not in read_png_parameters(plain_png)
    assert plain_png != cfg_png
    from tests.tiny_sd3 import save_tiny_sd3

    code, lines, err = preview("--true-cfg-scale", "4", model=str(save_tiny_sd3(tmp_path / "sd3")), name="c")
    assert code == 1 and lines == [] and "true_cfg_scale: true CFG is for FLUX models" in err
    assert not (tmp_path / "c.sqlite").exists()
