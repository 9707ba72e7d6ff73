"""The optional fast preview decoder (a diffusers AutoencoderTiny): previews use it, refines never; a decoder
that does not fit the model is refused at start with one sentence."""

from __future__ import annotations

import os

import pytest
import torch
from engine_models import TinyUNetDenoiser, row_counts, store  # noqa: F401 - fixtures
from tiny_sd import save_tiny_sd

from models.registry import load_model
from preview.engine import PreviewEngine
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker


def _taesd(folder, **overrides):
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    config = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                  num_decoder_blocks=(1, 1), latent_channels=4)  # 2 blocks: 2x upsampling, as the tiny SD VAE
    config.update(overrides)
    AutoencoderTiny(**config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield save_tiny_sd(tmp_path_factory.mktemp("dec") / "tiny", "epsilon", seed=0)
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def test_previews_use_the_tiny_decoder_and_refines_the_vae(sd_dir, tmp_path, store, one_torch_thread):
    from diffusers import AutoencoderTiny

    folder = _taesd(tmp_path / "taesd")
    model = load_model(str(sd_dir), device="cpu")
    request = PreviewRequest(prompts=["a red circle"], seeds=[0, 1], steps=2, solver="ddim", guidance=3.0)
    with DeviceWorker(model) as worker:
        plain = list(PreviewEngine(worker, store, chunk_size=2).run(request))
        engine = PreviewEngine(worker, store, chunk_size=2, preview_decoder=folder)
        fast = list(engine.run(request))
        # the same latents through the decoder by hand: the previews are exactly its images
        taesd = AutoencoderTiny.from_pretrained(folder).eval()
        latents = worker.submit(lambda m: _latents(m, store, request)).result()
        with torch.no_grad():
            want = (taesd.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        for i, r in enumerate(fast):
            torch.testing.assert_close(r.pixels, want[i], atol=1e-6, rtol=1e-6)
            assert not torch.equal(r.pixels, plain[i].pixels)
        # a refine decodes with the model's own VAE, not the preview decoder
        assert model.preview_decoder is not None
        vae_images = model.decode(latents)
        torch.testing.assert_close(vae_images, torch.stack([p.pixels for p in plain]), atol=1e-6, rtol=1e-6)


def _latents(model, store, request):
    from preview.solvers import resolve_solver

    solver = resolve_solver(request.solver, model, store)
    cond = model.encode_prompts([request.prompts[0]], "").select([0, 0])
    noise = torch.stack([store.get_or_create_noise(s, model.latent_shape(32, 32))[1] for s in request.seeds])
    return solver.solver.sample(lambda x, t: model.guided_eps(x, t, cond, request.guidance), noise, request.steps)


@pytest.mark.parametrize("overrides, message", [
    (dict(latent_channels=16), "16-channel"),
    (dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 1, 1),
          num_decoder_blocks=(1, 1, 1)), "upsamples latents 4x"),
    (dict(scaling_factor=0.5), "scaling_factor"),
])
def test_a_decoder_that_does_not_fit_is_refused_at_start(sd_dir, tmp_path, store, overrides, message, one_torch_thread):
    folder = _taesd(tmp_path / "bad", **overrides)
    with DeviceWorker(load_model(str(sd_dir), device="cpu")) as worker:
        before = row_counts(store)
        with pytest.raises(ValueError, match=f"preview_decoder.*{message}"):
            PreviewEngine(worker, store, preview_decoder=folder)
        assert row_counts(store) == before
        assert worker.submit(lambda m: m.preview_decoder).result() is None


def test_a_model_without_a_vae_or_a_missing_folder_is_refused(tmp_path, store):
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        with pytest.raises(ValueError, match="preview_decoder.*nothing to replace"):
            PreviewEngine(worker, store, preview_decoder=_taesd(tmp_path / "ok"))
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        with pytest.raises(ValueError, match="no such folder"):
            PreviewEngine(worker, store, preview_decoder=tmp_path / "missing")
