"""Contract 1: a preview is a pure function of (model, prompt, negative prompt, seed, size, guidance,
solver, steps) on one device and dtype, whatever the batch composition and order -- bit for bit."""

from __future__ import annotations

import pytest
import torch
from engine_models import TinyUNetDenoiser, one_cpu_thread, store  # noqa: F401 - fixtures

from preview.engine import PreviewEngine
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker


@pytest.fixture
def engine(store):
    with DeviceWorker(TinyUNetDenoiser(size=16)) as worker:
        yield PreviewEngine(worker, store, chunk_size=4)


def _by_key(results):
    return {(r.prompt, r.seed): r.pixels for r in results}


@pytest.mark.parametrize("solver", ["consistency", "ddim"])
def test_bit_identical_whatever_the_batch(engine, solver):
    settings = dict(steps=3, solver=solver, guidance=3.0, negative_prompt="blurry")
    alone = _by_key(engine.run(PreviewRequest(prompts=["a red circle"], seeds=[5], **settings)))
    grid = _by_key(engine.run(PreviewRequest(prompts=["a blue square", "a red circle"], seeds=[0, 5, 9], **settings)))
    shuffled = _by_key(engine.run(PreviewRequest(prompts=["a red circle", "a blue square"], seeds=[9, 5, 0, 1, 2], **settings)))
    key = ("a red circle", 5)
    # alone: row 0 of a padded chunk; grid: row 1 of chunk 1; shuffled: row 1 of chunk 0
    assert torch.equal(alone[key], grid[key])
    assert torch.equal(alone[key], shuffled[key])
    for k in grid:
        assert torch.equal(grid[k], shuffled[k]), k
    # the same inputs with one thing changed give another image (the comparison above can fail)
    other_neg = _by_key(engine.run(PreviewRequest(prompts=["a red circle"], seeds=[5], **{**settings, "negative_prompt": ""})))
    assert not torch.equal(alone[key], other_neg[key])


def test_unpadded_batches_are_why_chunks_are_padded():
    """The raw model call at different batch sizes: a row's epsilon may differ only by kernel rounding
    (float32: within 1e-5 of the output's scale; a row mixed with others, or a lower-precision path
    for big batches, lands far outside), and padding a chunk never alters a row, bit for bit."""
    model = TinyUNetDenoiser(size=16)
    cond = model.encode_prompts(["a red circle"] * 8, "")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700)
    full = model.guided_eps(x, t, cond, 3.0)
    one = model.guided_eps(x[:1], t, cond.select([0]), 3.0)
    rounding = (one - full[:1]).abs().max().item()
    assert rounding <= 1e-5 * full.abs().max().item(), f"batch 1 vs batch 8: max |diff| = {rounding:.3g}"
    from preview.batching import pad_conditioning, pad_rows

    padded = model.guided_eps(pad_rows(x[:3], 8), t, pad_conditioning(cond.select([0, 1, 2]), 8), 3.0)
    assert torch.equal(padded[:3], full[:3])
