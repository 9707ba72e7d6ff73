"""The app's backend (webui.backend.EngineBackend) on tiny SDXL / FLUX / SD3 folders: preview, then refine."""

import time

import pytest

from tests.tiny_flux import save_tiny_flux
from tests.tiny_sd3 import save_tiny_sd3
from tests.tiny_sdxl import save_tiny_sdxl
from webui.inputs import ExploreSettings

SAVERS = {"sdxl": save_tiny_sdxl, "flux": save_tiny_flux, "sd3": save_tiny_sd3}


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_app_backend_previews_and_refines(family, tmp_path):
    from webui.backend import EngineBackend

    folder = SAVERS[family](tmp_path / f"tiny-{family}")
    backend = EngineBackend.open(model=str(folder), db=tmp_path / "app.db", exports=tmp_path / "exports", devices="cpu")
    try:
        settings = ExploreSettings(prompts=["a red cat"], negative_prompt="", seeds=[0, 1], steps=3,
                                   solver="consistency", guidance=backend.default_guidance, width=32, height=32)
        tiles = [t for group in backend.preview(settings, "alice") for t in group]
        assert [t.seed for t in tiles] == [0, 1] and all(t.path.is_file() for t in tiles)
        (job,) = backend.refine([tiles[0].preview_id], 4, "alice")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            view = next(v for v in backend.jobs("alice") if v.job_id == job)
            if view.state in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
        assert view.state == "done", view.error
        assert view.final_path is not None and view.final_path.is_file()
    finally:
        backend.close()
