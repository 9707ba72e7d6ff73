"""Preview engine: validation writes nothing, one guided call per step per chunk, streaming, storage."""

from __future__ import annotations

import io
import math

import pytest
import torch
from engine_models import TinyUNetDenoiser, one_cpu_thread, row_counts, store  # noqa: F401 - fixtures
from PIL import Image

from preview.engine import PreviewEngine
from runtime.request import PreviewRequest, parse_seeds
from runtime.worker import DeviceWorker
from store.png import read_png_parameters


@pytest.fixture
def model():
    return TinyUNetDenoiser(size=16)


@pytest.fixture
def worker(model):
    w = DeviceWorker(model)
    yield w
    w.close()


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9") == [1, 5, 9]
    assert parse_seeds("7, 0-2,10") == [7, 0, 1, 2, 10]
    for bad in ("", "a", "3-1", "1,,2", "-4"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["ok", "  "]}, r"prompts\[1\]"),
        ({"seeds": list(range(65))}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"height": 18}, "height"),
        ({"width": 128}, "width"),
        ({"guidance": -1.0}, "guidance"),
        ({"guidance": math.nan}, "guidance"),
        ({"solver": "no-such-solver"}, "solver"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(worker, store, changes, field):
    engine = PreviewEngine(worker, store, chunk_size=4)
    request = dict(prompts=["a red circle"], seeds=[0, 1], steps=4)
    request.update(changes)
    before = row_counts(store)
    with pytest.raises(ValueError, match=field):
        engine.run(PreviewRequest(**request))
    assert row_counts(store) == before


def test_one_guided_call_per_step_per_chunk_and_everything_stored(worker, model, store):
    engine = PreviewEngine(worker, store, chunk_size=4)
    request = PreviewRequest(prompts=["a red circle", "a blue square"], seeds=[3, 4, 5], steps=3, solver="ddim", guidance=2.0)
    results = list(engine.run(request))
    # 6 pairs in chunks of 4 -> 2 chunks x 3 steps, each call one batch of [uncond; cond] x chunk size
    assert model.calls == [8] * 6
    assert [(r.prompt, r.seed) for r in results] == request.pairs
    assert [r.chunk_index for r in results] == [0, 0, 0, 0, 1, 1]
    for r in results:
        stored = store.get_preview(r.preview_id)
        assert (stored.solver, stored.steps, stored.generation.seed, stored.generation.prompt) == ("ddim", 3, r.seed, r.prompt)
        assert stored.generation.guidance == 2.0 and stored.generation.noise_id == r.noise_id
        assert {"encode", "sample", "decode", "latency"} <= set(stored.timings_ms)
        png = Image.open(io.BytesIO(stored.png))
        assert png.size == (16, 16)
        assert torch.equal(torch.from_numpy(__import__("numpy").asarray(png)).permute(2, 0, 1),
                           (r.pixels * 255).round().to(torch.uint8))
        params = read_png_parameters(stored.png)
        assert params["prompt"] == r.prompt and int(params["seed"]) == r.seed and int(params["steps"]) == 3
    # noise comes from the store: one row per seed, reused by the second prompt and by a second run
    assert row_counts(store)["noise"] == 3
    again = list(engine.run(PreviewRequest(prompts=["a red circle"], seeds=[4], steps=3, solver="ddim", guidance=2.0)))
    assert row_counts(store)["noise"] == 3 and again[0].noise_id == results[1].noise_id
    noise = store.get_noise(results[1].noise_id)
    assert noise.shape == (3, 16, 16)


def test_results_stream_chunk_by_chunk(store):
    slow = TinyUNetDenoiser(size=16, delay=0.05)
    with DeviceWorker(slow) as worker:
        engine = PreviewEngine(worker, store, chunk_size=2)
        stream = engine.run(PreviewRequest(prompts=["a red circle"], seeds=[0, 1, 2, 3, 4, 5], steps=4, solver="ddim"))
        first = next(stream)
        calls_at_first = len(slow.calls)
        rest = list(stream)
    assert first.seed == 0 and len(rest) == 5
    assert calls_at_first < 12  # the first preview arrived before the last chunk's steps ran


def test_consistency_solver_resolution(worker, store, monkeypatch):
    """No checkpoint for this model: the zero-init policy, which is exactly its base rule (DPM-Solver-2 in
    eq. 10 form); the shipped checkpoint is the embedded model's, so it is not used here. An active
    checkpoint in the store for this model wins and is recorded."""
    import preview.solvers
    from solver.policy import ConsistencyPolicy

    engine = PreviewEngine(worker, store, chunk_size=4)
    base = dict(prompts=["a red circle"], seeds=[0, 1], steps=4, guidance=3.0)
    shipped = preview.solvers.shipped_checkpoint_dir()
    assert shipped is not None, "the repository ships a default ConsistencySolver checkpoint"
    from_shipped = list(engine.run(PreviewRequest(**base)))  # ... for the embedded model, not this one
    assert from_shipped[0].checkpoint_id is None
    assert "not yet trained for this model" in read_png_parameters(
        store.get_preview(from_shipped[0].preview_id).png)["Preview solver"]

    monkeypatch.setattr(preview.solvers, "SHIPPED_CHECKPOINT_DIRS", ())
    zero = list(engine.run(PreviewRequest(**base)))
    rule = list(engine.run(PreviewRequest(**base, solver="rule:dpm2m")))
    assert zero[0].solver == "consistency" and zero[0].checkpoint_id is None
    assert "not yet trained for this model: runs DPM-Solver-2" in read_png_parameters(
        store.get_preview(zero[0].preview_id).png)["Preview solver"]
    for a, b in zip(zero, rule):
        assert torch.equal(a.pixels, b.pixels)

    policy = ConsistencyPolicy()
    with torch.no_grad():
        policy.net[-1].bias.fill_(0.3)  # a trained-looking checkpoint that differs from the base rule
    from preview.identity import model_identity

    ckpt = store.add_checkpoint("test-policy", config=policy.config_dict(), weights=policy.state_dict(), activate=True,
                                identity=model_identity(worker.model).to_dict())
    learned = list(engine.run(PreviewRequest(**base)))
    assert learned[0].checkpoint_id == ckpt
    assert store.get_preview(learned[0].preview_id).checkpoint_id == ckpt
    assert not torch.equal(learned[0].pixels, zero[0].pixels)


def test_failing_chunk_reaches_the_caller_and_worker_survives(store):
    class Broken(TinyUNetDenoiser):
        def model_output(self, x, t, context, mask):
            raise RuntimeError("out of memory (simulated)")

    with DeviceWorker(Broken(size=16)) as worker:
        engine = PreviewEngine(worker, store, chunk_size=2)
        with pytest.raises(RuntimeError, match="simulated"):
            list(engine.run(PreviewRequest(prompts=["x"], seeds=[0], steps=2, solver="ddim")))
        assert row_counts(store)["previews"] == 0
        assert worker.submit(lambda m: "alive").result(5) == "alive"


def test_default_chunk_size_is_a_fixed_power_of_two_that_shrinks_with_size(model):
    from preview.batching import CPU_CHUNK, default_chunk_size

    sizes = [default_chunk_size(model, s, s) for s in (16, 32, 64)]
    assert all(n >= 1 and n & (n - 1) == 0 and n <= CPU_CHUNK for n in sizes)
    assert sizes == sorted(sizes, reverse=True)
    assert default_chunk_size(model, 16, 16) == default_chunk_size(model, 16, 16)  # never from free memory
