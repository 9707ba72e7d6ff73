"""Several devices: one worker each (two CPU "devices" here), work spread across them."""

from __future__ import annotations

import torch
from engine_models import TinyUNetDenoiser, one_cpu_thread, store  # noqa: F401 - fixtures

from preview.engine import PreviewEngine
from refine.jobs import RefineService
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker, WorkerPool


def test_pool_spreads_previews_and_refines_over_two_devices(store):
    models = {}

    def factory(device: str) -> TinyUNetDenoiser:
        models[device] = TinyUNetDenoiser(size=16, delay=0.01)  # same seed -> same weights on both
        return models[device]

    request = PreviewRequest(prompts=["a red circle"], seeds=[0, 1, 2, 3], steps=2, solver="ddim", guidance=3.0)
    with WorkerPool.for_devices(["cpu:0", "cpu:1"], factory) as pool:
        pool.wait_ready(30)
        spread = list(PreviewEngine(pool, store, chunk_size=2).run(request))
        assert models["cpu:0"].calls and models["cpu:1"].calls  # each device ran one chunk

        service = RefineService(pool, store)
        jobs = [service.refine_preview(r.preview_id, steps=6) for r in spread[:2]]
        done = [service.wait(j, 60) for j in jobs]
    assert all(p.state == "done" for p in done)
    assert {p.device for p in done} == {"cpu:0", "cpu:1"}

    # the same previews from a single device: bit-identical (same model, same padded chunk size)
    with DeviceWorker(TinyUNetDenoiser(size=16)) as one:
        single = list(PreviewEngine(one, store, chunk_size=2).run(request))
    for a, b in zip(spread, single):
        assert torch.equal(a.pixels, b.pixels)
