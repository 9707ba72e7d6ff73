"""Preview-vs-final consistency metrics, and which policy the name 'consistency' resolves to."""

from __future__ import annotations

import math

import pytest
import torch
from engine_models import TinyUNetDenoiser, one_cpu_thread, store  # noqa: F401 - fixtures

from refine.consistency import measure_consistency


def test_metrics_order_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    final = torch.rand(3, 32, 32, generator=g)
    close = (final + 0.02 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    far = (final + 0.3 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    same = measure_consistency(final, final)
    assert same["psnr"] == pytest.approx(100.0) and same["ssim"] == pytest.approx(1.0) and same["scc"] == pytest.approx(1.0)
    a, b = measure_consistency(close, final), measure_consistency(far, final)
    assert a["psnr"] == pytest.approx(-10 * math.log10(float((close - final).pow(2).mean())), abs=1e-4)
    assert a["psnr"] > b["psnr"] and a["ssim"] > b["ssim"] and a["scc"] > b["scc"]
    assert a["ms_ssim"] is None  # 32 px is below MS-SSIM's five scales
    big = torch.rand(1, 3, 192, 192, generator=g)
    assert 0 < measure_consistency(big * 0.9, big)["ms_ssim"] <= 1
    flat = measure_consistency(torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.5))["scc"]
    assert flat is None or math.isfinite(flat)  # no edges at all: never NaN (the store refuses NaN)
    with pytest.raises(ValueError, match="shape"):
        measure_consistency(final, final[:, :16])


def test_consistency_falls_back_to_shipped_then_zero_init(store, tmp_path, monkeypatch):
    import preview.solvers as solvers
    from solver.policy import ConsistencyPolicy

    model = TinyUNetDenoiser(size=8)
    monkeypatch.setattr(solvers, "SHIPPED_CHECKPOINT_DIRS", (tmp_path / "none",))
    zero = solvers.resolve_solver("consistency", model, store)
    assert zero.checkpoint_id is None and "not yet trained for this model: runs DPM-Solver-2" in zero.description

    from preview.identity import model_identity, write_identity

    shipped = ConsistencyPolicy()
    with torch.no_grad():
        shipped.net[-1].bias.fill_(0.1)
    shipped.save(tmp_path / "shipped")
    monkeypatch.setattr(solvers, "SHIPPED_CHECKPOINT_DIRS", (tmp_path / "none", tmp_path / "shipped"))
    assert solvers.resolve_solver("consistency", model, store).description == zero.description  # the embedded model's
    write_identity(tmp_path / "shipped", model_identity(model))
    picked = solvers.resolve_solver("consistency", model, store)
    assert "shipped" in picked.description and picked.checkpoint_id is None
    grid = picked.solver.grid(4)
    assert torch.equal(picked.solver.table_fn(grid), shipped.eval().coefficient_table(grid))

    active = ConsistencyPolicy()
    ckpt = store.add_checkpoint("active", config=active.config_dict(), weights=active.state_dict(), activate=True,
                                identity=model_identity(model).to_dict())
    assert solvers.resolve_solver("consistency", model, store).checkpoint_id == ckpt  # the store's wins


def test_consistency_path_names_a_saved_policy(store, tmp_path):
    import preview.solvers as solvers
    from solver.policy import ConsistencyPolicy

    model = TinyUNetDenoiser(size=8)
    ConsistencyPolicy().save(tmp_path / "mine")
    picked = solvers.resolve_solver(f"consistency:{tmp_path / 'mine'}", model, store)
    assert picked.label == f"consistency:{tmp_path / 'mine'}"
    with pytest.raises(ValueError, match="solver"):
        solvers.resolve_solver(f"consistency:{tmp_path / 'missing'}", model, store)
