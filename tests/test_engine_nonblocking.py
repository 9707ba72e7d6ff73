"""Contract 3: a running refine does not block a preview (embedded model architecture, random weights)."""

from __future__ import annotations

import time

import pytest

from engine_models import one_cpu_thread, store  # noqa: F401 - fixtures
from preview.engine import PreviewEngine
from preview.request import PreviewRequest
from refine.jobs import RefineService
from refine.worker import DeviceWorker


@pytest.fixture(scope="module")
def embedded_architecture():
    """The embedded model exactly as shipped (PatchUNet + frozen MiniLM), with random UNet weights."""
    import torch

    from models.embedded.config import PATCH, SCHEDULER_CONFIG, UNET_CONFIG
    from models.embedded.model import EmbeddedDenoiser
    from models.embedded.network import PatchUNet
    from models.embedded.text import TextEncoder

    torch.manual_seed(0)
    return EmbeddedDenoiser(PatchUNet(UNET_CONFIG, PATCH), TextEncoder("cpu"), SCHEDULER_CONFIG, "cpu")


def test_preview_completes_while_a_refine_is_still_running(embedded_architecture, store):
    model = embedded_architecture
    with DeviceWorker(model) as worker:
        service = RefineService(worker, store)
        engine = PreviewEngine(worker, store, chunk_size=4)
        request = PreviewRequest(prompts=["a red circle on a blue background"], seeds=[0, 1, 2, 3], steps=4)
        list(engine.run(request))  # warm-up (encoder, kernels), so the timing below is the steady state

        job = service.refine_new("a green star on a white background", 7, steps=200)
        while service.progress(job).step < 2:
            time.sleep(0.005)
        t0 = time.perf_counter()
        results = list(engine.run(request))
        latency = time.perf_counter() - t0
        during = service.progress(job)
        service.cancel(job)
        end = service.wait(job, 60)
    assert len(results) == 4
    assert during.state == "running" and 2 <= during.step < during.steps  # the refine was still under way
    assert end.state == "cancelled"
    print(f"preview grid latency during a refine: {latency:.3f} s, refine at step {during.step}/{during.steps}")
