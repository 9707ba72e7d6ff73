"""What the engine does differently for a GPU (issue 23), checked on the CPU: no padded row is ever decoded,
text is encoded at one fixed batch size (and so to the same bits in any grid), and the K-step loop never
asks the device whether a value is finite (one check after the last step)."""

from __future__ import annotations

import os
import threading

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


def test_rows_decoded_at_once_keep_their_bits_and_order_and_each_is_still_decoded_alone(sd, store, one_torch_thread):
    settings = {"prompts": ["a cat", "the dog"], "seeds": [3, 7, 9], "steps": 2, "solver": "ddim", "guidance": 3.0}
    batches: list[tuple[int, str]] = []
    decode = sd.decode
    sd.decode = lambda z: (batches.append((z.shape[0], threading.current_thread().name[:14])), decode(z))[1]
    try:
        with DeviceWorker(sd) as worker:
            one = list(PreviewEngine(worker, store, chunk_size=4).run(PreviewRequest(**settings)))
            many = list(PreviewEngine(worker, store, chunk_size=4, decode_streams=3).run(PreviewRequest(**settings)))
    finally:
        sd.decode = decode
    assert [n for n, _ in batches] == [1] * 12  # 6 rows each time, every one alone
    assert {name for _, name in batches[6:]} == {"preview-decode"}  # the second time from the decode threads
    assert [(r.prompt, r.seed) for r in many] == [(r.prompt, r.seed) for r in one]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(one, many))
    assert all(r.timings_ms["decode"] >= 0 for r in many)


def test_a_row_whose_concurrent_decode_fails_is_decoded_again_alone():
    from preview.engine import decode_rows

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    failed: list[float] = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        if float(z[0, 0, 0, 0]) == 2.0 and not failed:  # row 2, the first time only
            failed.append(2.0)
            raise RuntimeError("float16 overflow switched the VAE to float32 mid-flight")
        return z * 10

    rows = list(decode_rows(decode, x, 4, streams=2))
    assert failed == [2.0] and [row for row, _ in rows] == [0, 1, 2, 3]
    assert all(torch.equal(pixels, x[row] * 10) for row, pixels in rows)
    with pytest.raises(RuntimeError, match="always"):
        list(decode_rows(lambda z: (_ for _ in ()).throw(RuntimeError("always")), x, 4, streams=2))


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_decode_streams_must_be_a_positive_integer(store, bad):
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker, pytest.raises(ValueError, match="decode_streams"):
        PreviewEngine(worker, store, decode_streams=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_decoded_on_their_own_cuda_streams_have_the_bits_of_one_by_one(tmp_path):
    from preview.engine import decode_rows

    model = load_model(str(save_tiny_sd(tmp_path / "tiny", "epsilon", seed=0)), device="cuda")
    x = torch.randn(6, *model.latent_shape(64, 64), generator=torch.Generator().manual_seed(0)).to("cuda")
    one = dict(decode_rows(model.decode, x, 6, streams=1))
    many = dict(decode_rows(model.decode, x, 6, streams=4))
    assert all(torch.equal(one[row], many[row]) for row in range(6))
