"""The Stable Diffusion backend on a tiny random-weight pipeline: encode, guided eps, decode, single file, sampling."""

from __future__ import annotations

import logging
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from tiny_sd import MAX_TOKENS, save_ldm_single_file, save_tiny_sd

from models.base import Denoiser
from models.errors import ModelLoadError, UnsupportedModelError
from models.registry import load_model
from models.sd import LoadOptions, StableDiffusionDenoiser, check_sd_compatible


@pytest.fixture(scope="module", autouse=True)
def _offline_single_thread():
    """No hub access; one CPU thread (the tiny model is ~10x faster than with oversubscribed threads)."""
    old, threads = os.environ.get("HF_HUB_OFFLINE"), torch.get_num_threads()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def eps_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-eps", "epsilon", seed=0)


@pytest.fixture(scope="module")
def v_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-v", "v_prediction", seed=1)


@pytest.fixture(scope="module")
def sd(eps_dir) -> StableDiffusionDenoiser:
    return load_model(str(eps_dir), device="cpu")


@pytest.fixture(scope="module")
def sd_v(v_dir) -> StableDiffusionDenoiser:
    return load_model(str(v_dir), device="cpu")


def _noise(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


class _UNetCalls:
    """Record the batch size of every UNet forward."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self._h = unet.register_forward_pre_hook(lambda m, args: self.batches.append(int(args[0].shape[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


def _manual_cfg(model: StableDiffusionDenoiser, x, t: int, cond, w: float) -> torch.Tensor:
    """Two separate UNet calls and the conversion written out from the scheduler's own alphas_cumprod."""
    abar = model.pipe.scheduler.alphas_cumprod[t].double()
    alpha, sigma = abar.sqrt().float(), (1 - abar).sqrt().float()
    ts = torch.tensor(t)

    def eps(context):
        out = model.unet(x, ts, encoder_hidden_states=context).sample
        if model.pipe.scheduler.config.prediction_type == "v_prediction":
            return sigma * x + alpha * out
        return out

    eps_u, eps_c = eps(cond.uncond), eps(cond.cond)
    return eps_u + w * (eps_c - eps_u)


# --- loading and shapes -------------------------------------------------------------------------
def test_load_folder_reads_the_model(sd, sd_v):
    assert isinstance(sd, Denoiser) and isinstance(sd, StableDiffusionDenoiser)
    assert sd.device.type == "cpu" and sd.dtype == torch.float32
    assert sd.size_multiple == 2 and sd.default_size == (32, 32)
    assert sd.latent_shape(32, 48) == (4, 16, 24)
    assert sd.schedule.prediction_type == "epsilon" and sd_v.schedule.prediction_type == "v_prediction"
    assert sd.scheduler_config["_class_name"] == "PNDMScheduler"
    torch.testing.assert_close(sd.schedule.alphas_cumprod, sd.pipe.scheduler.alphas_cumprod.double())
    assert sd.vae.use_slicing and not sd.vae.use_tiling


def test_size_not_a_multiple_of_the_downsampling_factor(sd):
    with pytest.raises(ValueError, match="height must be a multiple of 2"):
        sd.latent_shape(33, 32)
    with pytest.raises(ValueError, match="width must be an integer"):
        sd.latent_shape(32, 32.0)


def test_memory_options_apply_and_keep_the_output(eps_dir, sd):
    lean = load_model(str(eps_dir), device="cpu", options=LoadOptions(attention_slicing=True, vae_tiling=True))
    assert lean.vae.use_tiling
    x, cond = _noise(1), sd.encode_prompts(["a cat"])
    torch.testing.assert_close(lean.guided_eps(x, 500, cond, 5.0), sd.guided_eps(x, 500, cond, 5.0), atol=1e-5, rtol=1e-5)


def test_fp16_on_cpu_and_offload_without_cuda_are_refused(eps_dir):
    with pytest.raises(ValueError, match="not supported on the CPU"):
        load_model(str(eps_dir), device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="cpu_offload needs a CUDA device"):
        load_model(str(eps_dir), device="cpu", options=LoadOptions(cpu_offload=True))


def test_a_cached_hub_id_loads_offline(eps_dir, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(eps_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("tiny-org/tiny-sd", device="cpu")
    assert isinstance(model, StableDiffusionDenoiser) and model.model_id == "tiny-org/tiny-sd"


def test_missing_weights_fail_whole_in_one_sentence(eps_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(eps_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match=f"could not load {broken}") as err:
        load_model(str(broken), device="cpu")
    assert "\n" not in str(err.value)


def _fake_pipe(**unet):
    config = {"in_channels": 4, "addition_embed_type": None, **unet}
    return SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(**config)),
        vae=SimpleNamespace(config=SimpleNamespace(latent_channels=4)),
        text_encoder=object(), tokenizer=object(), scheduler=SimpleNamespace(config={"prediction_type": "epsilon"}),
    )


def test_pipelines_that_are_not_sd_shaped_are_refused():
    check_sd_compatible(_fake_pipe(), "ok")
    with pytest.raises(UnsupportedModelError, match="looks like SDXL"):
        check_sd_compatible(_fake_pipe(addition_embed_type="text_time"), "m")
    with pytest.raises(UnsupportedModelError, match="takes 9 channels but its VAE makes 4"):
        check_sd_compatible(_fake_pipe(in_channels=9), "m")
    no_vae = _fake_pipe()
    no_vae.vae = None
    with pytest.raises(UnsupportedModelError, match="m has no vae"):
        check_sd_compatible(no_vae, "m")


# --- prompts ------------------------------------------------------------------------------------
def test_encode_matches_the_pipeline_and_encodes_each_text_once(sd):
    calls: list[int] = []
    hook = sd.pipe.text_encoder.register_forward_pre_hook(lambda m, args: calls.append(int(args[0].shape[0])))
    try:
        cond = sd.encode_prompts(["a cat", "the dog", "a cat"], "")
    finally:
        hook.remove()
    assert sum(calls) == 3  # "a cat", "the dog", "": three texts, not six
    assert cond.cond.shape == (3, MAX_TOKENS, 32) and cond.uncond.shape == (3, MAX_TOKENS, 32)
    assert cond.prompts == ["a cat", "the dog", "a cat"] and cond.negative_prompts == [""] * 3
    ref_c, ref_u = sd.pipe.encode_prompt(["a cat", "the dog", "a cat"], "cpu", 1, True, negative_prompt=None)
    torch.testing.assert_close(cond.cond, ref_c)
    torch.testing.assert_close(cond.uncond, ref_u)  # the empty negative is diffusers' unconditional input
    assert not torch.equal(cond.cond[0], cond.cond[1])


def test_negative_prompts_per_row(sd):
    cond = sd.encode_prompts(["a cat", "a cat"], ["blurry", ""])
    torch.testing.assert_close(cond.uncond[0], sd.encode_prompts(["blurry"]).cond[0])
    torch.testing.assert_close(cond.uncond[1], sd.encode_prompts(["a cat"]).uncond[0])
    with pytest.raises(ValueError, match="negative_prompt has 1 entries for 2 prompts"):
        sd.encode_prompts(["a", "b"], ["x"])


def test_empty_prompt_is_refused(sd):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sd.encode_prompts(["a cat", "  "])
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
        sd.encode_prompts([])
    with pytest.raises(ValueError, match="prompt 0 must be a string"):
        sd.encode_prompts([3])


def test_over_long_prompt_is_truncated_with_one_warning(sd, caplog):
    long = " ".join(["cat"] * 100)
    with caplog.at_level(logging.WARNING, logger="models.sd"):
        a = sd.encode_prompts([long])
    warnings = [r for r in caplog.records if r.name == "models.sd"]
    assert len(warnings) == 1  # "cat" is 3 tokens here (c, a, t</w>): 300 + start + end
    assert warnings[0].getMessage().startswith("prompt is 302 tokens, over the text encoder's limit of 77")
    b = sd.encode_prompts([long + " and a dog"])  # the words past the limit change nothing
    torch.testing.assert_close(a.cond, b.cond)


# --- guided epsilon and decode ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd", "sd_v"])
def test_guided_eps_is_one_batched_call_equal_to_two_call_cfg(which, request):
    model = request.getfixturevalue(which)
    x, cond = _noise(2), model.encode_prompts(["a cat", "the dog"], "blurry")
    with _UNetCalls(model.unet) as calls:
        got = model.guided_eps(x, 700, cond, 7.5)
    assert calls.batches == [4]  # [uncond; cond] together
    assert got.dtype == torch.float32 and got.shape == x.shape
    with torch.no_grad():
        want = _manual_cfg(model, x, 700, cond, 7.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["sd", "sd_v"])
def test_guidance_one_skips_the_unconditional_half(which, request):
    model = request.getfixturevalue(which)
    x, cond = _noise(2), model.encode_prompts(["a cat", "the dog"], "blurry")
    with _UNetCalls(model.unet) as calls:
        got = model.guided_eps(x, 300, cond, 1.0)
    assert calls.batches == [2]
    with torch.no_grad():
        want = _manual_cfg(model, x, 300, cond, 1.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_is_the_vae_in_unit_range(sd):
    z = _noise(3)
    images = sd.decode(z)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        want = (sd.vae.decode(z / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="latents must have shape"):
        sd.decode(z[0])


def test_a_half_precision_vae_that_overflows_is_rerun_in_float32(eps_dir, caplog):
    model = load_model(str(eps_dir), device="cpu")
    model.vae.to(torch.bfloat16)  # stands in for a float16 VAE on CUDA
    decode = model.vae.decode

    def overflowing(z):
        if z.dtype != torch.float32:
            return SimpleNamespace(sample=torch.full((z.shape[0], 3, 32, 32), float("nan"), dtype=z.dtype))
        return decode(z)

    model.vae.decode = overflowing
    z = _noise(2)
    with caplog.at_level(logging.WARNING, logger="models.sd"):
        images = model.decode(z)
    assert model.vae.dtype == torch.float32 and any("decoding in float32" in r.getMessage() for r in caplog.records)
    with torch.no_grad():  # the rerun: the same (rounded) weights, now in float32
        want = (decode(z / model.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, want, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_defaults_to_fp16_and_offload_works(eps_dir, sd, offload):
    model = load_model(str(eps_dir), device="cuda", options=LoadOptions(cpu_offload=offload))
    assert model.dtype == torch.float16 and model.device.type == "cuda"
    x = _noise(2)
    cond, ref_cond = model.encode_prompts(["a cat", "the dog"]), sd.encode_prompts(["a cat", "the dog"])
    eps = model.guided_eps(x, 500, cond, 5.0)
    assert eps.dtype == torch.float32 and eps.device == x.device  # the solver's state stays where it was
    torch.testing.assert_close(eps, sd.guided_eps(x, 500, ref_cond, 5.0), atol=3e-2, rtol=3e-2)
    images = model.decode(x)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    torch.testing.assert_close(images, sd.decode(x), atol=2e-2, rtol=2e-2)


# --- single-file checkpoint -----------------------------------------------------------------------
def test_single_file_reload_gives_the_same_model(eps_dir, sd, tmp_path):
    ckpt = save_ldm_single_file(eps_dir, tmp_path / "tiny-sd15.safetensors")
    config = tmp_path / "config-only"  # the configs of the architecture, no weights
    shutil.copytree(eps_dir, config, ignore=shutil.ignore_patterns("*.safetensors"))
    one = load_model(str(ckpt), device="cpu", options=LoadOptions(config=config))
    assert isinstance(one, StableDiffusionDenoiser) and one.model_id == "tiny-sd15.safetensors"
    x = _noise(2)
    cond_a, cond_b = sd.encode_prompts(["a cat", "the dog"], "blurry"), one.encode_prompts(["a cat", "the dog"], "blurry")
    torch.testing.assert_close(cond_b.cond, cond_a.cond, atol=0, rtol=0)
    torch.testing.assert_close(one.guided_eps(x, 600, cond_b, 4.0), sd.guided_eps(x, 600, cond_a, 4.0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one.decode(x), sd.decode(x), atol=1e-6, rtol=1e-6)
    assert one.scheduler_config == sd.scheduler_config


# --- sampling through the backend -------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd", "sd_v"])
def test_diffusers_baseline_through_the_backend_equals_the_pipeline(which, request):
    """get_solver('ddim') on guided_eps reproduces StableDiffusionPipeline's own DDIM loop."""
    from diffusers import DDIMScheduler

    from solver.registry import get_solver

    model = request.getfixturevalue(which)
    noise, w, steps = _noise(2, seed=3), 3.0, 4
    cond = model.encode_prompts(["a cat", "the dog"], "")
    ours = get_solver("ddim", model.scheduler_config).sample(lambda x, t: model.guided_eps(x, t, cond, w), noise, steps)

    pipe = model.pipe
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing", clip_sample=False, thresholding=False)
    try:
        with _UNetCalls(model.unet) as calls:
            ref = pipe(
                prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, latents=noise.clone(),
                num_inference_steps=steps, guidance_scale=w, output_type="latent",
            ).images
    finally:
        pipe.scheduler = original
    assert calls.batches == [4] * steps
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_consistency_solver_samples_through_the_backend(sd):
    from solver.policy import ConsistencyPolicy
    from solver.registry import get_solver

    noise, steps = _noise(2, seed=4), 4
    cond = sd.encode_prompts(["a cat", "the dog"], "blurry")
    eps_fn = lambda x, t: sd.guided_eps(x, t, cond, 5.0)  # noqa: E731
    policy = ConsistencyPolicy(order=2, base="dpm2m")
    solver = get_solver("consistency", sd.scheduler_config, policy=policy)
    with _UNetCalls(sd.unet) as calls:
        x0 = solver.sample(eps_fn, noise, steps)
    assert calls.batches == [4] * steps and torch.isfinite(x0).all()
    # a zero-initialized policy is its base rule, whatever the backend
    torch.testing.assert_close(x0, get_solver("rule:dpm2m", sd.scheduler_config).sample(eps_fn, noise, steps))
    # batching never changes a sample: each row alone gives the same result
    alone = solver.sample(lambda x, t: sd.guided_eps(x, t, cond.select([1]), 5.0), noise[1:], steps)
    torch.testing.assert_close(alone, x0[1:], atol=1e-4, rtol=1e-4)  # CPU kernels differ by batch at ~1e-5
    images = sd.decode(x0)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
