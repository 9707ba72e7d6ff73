"""What the engine does differently for a GPU (issue 23), checked on the CPU: no padded row is ever decoded,
text is encoded at one fixed batch size (and so to the same bits in any grid), and the K-step loop never
asks the device whether a value is finite (one check after the last step)."""

from __future__ import annotations

import os

import pytest
import torch
from engine_models import TinyUNetDenoiser, store  # noqa: F401 - fixtures
from tiny_sd import save_tiny_sd

from models.registry import load_model
from preview.batching import TEXT_BATCH
from preview.engine import PreviewEngine
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker
from solver.sampling import iter_lmm
from solver.schedules import VPSchedule
from solver.coefficients import RULES


def test_only_real_rows_are_decoded(store, one_torch_thread):
    model = TinyUNetDenoiser(size=16)
    decoded: list[int] = []
    decode = model.decode
    model.decode = lambda z: (decoded.append(z.shape[0]), decode(z))[1]
    with DeviceWorker(model) as worker:
        results = list(PreviewEngine(worker, store, chunk_size=4).run(
            PreviewRequest(prompts=["a red circle"], seeds=[0, 1, 2, 3, 4], steps=2, solver="ddim")))
    assert len(results) == 5
    assert model.calls == [8] * 4  # the UNet: 2 chunks x 2 steps at the fixed chunk of 4 (x2 for guidance)
    assert sum(decoded) == 5  # the decoder: the 5 real rows, never the 3 padded ones


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield load_model(str(save_tiny_sd(tmp_path_factory.mktemp("gpu") / "tiny", "epsilon", seed=0)), device="cpu")
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def test_text_is_encoded_at_one_fixed_batch_and_previews_do_not_depend_on_the_grid(sd, store, one_torch_thread):
    sizes: list[int] = []
    encode = sd.encode_prompts
    sd.encode_prompts = lambda prompts, negative="": (sizes.append(len(prompts)), encode(prompts, negative))[1]
    try:
        settings = dict(steps=2, solver="ddim", guidance=3.0)
        with DeviceWorker(sd) as worker:
            alone = list(PreviewEngine(worker, store, chunk_size=4).run(
                PreviewRequest(prompts=["a cat"], seeds=[7], **settings)))
            grid = list(PreviewEngine(worker, store, chunk_size=4).run(
                PreviewRequest(prompts=["the dog", "a cat", "th"], seeds=[3, 7], **settings)))
    finally:
        sd.encode_prompts = encode
    assert sizes == [TEXT_BATCH, TEXT_BATCH]  # one call per engine (fresh cache), three prompts in one call
    (same,) = [r for r in grid if (r.prompt, r.seed) == ("a cat", 7)]
    assert torch.equal(alone[0].pixels, same.pixels)


def test_no_finiteness_check_inside_the_k_step_loop():
    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    grid = VPSchedule.from_config(sd).grid(4)
    x = torch.randn(1, 4, 8, 8)
    bad = torch.full_like(x, float("nan"))
    steps = iter_lmm(lambda x, t: bad, x, grid, RULES["ab2"](grid))
    for _ in range(3):  # the first K - 1 steps run on without asking the device about the values
        next(steps)
    with pytest.raises(ValueError, match="model_output contains NaN"):
        next(steps)  # the last step checks the final state once
