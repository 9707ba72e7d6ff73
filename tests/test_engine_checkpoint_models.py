"""A learned solver belongs to one model (design contract 7): checkpoints keyed by model identity,
explicit labelled transfers within a schedule family, refusals across families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_models import TinyUNetDenoiser, one_cpu_thread, store  # noqa: F401 - fixtures

from preview.engine import PreviewEngine
from preview.identity import model_identity, write_identity
from runtime.request import PreviewRequest
from runtime.worker import DeviceWorker
from solver.policy import ConsistencyPolicy
from store.png import read_png_parameters

BASE = dict(prompts=["a red circle"], seeds=[0, 1], steps=4, guidance=3.0)


def _trained_looking(bias: float = 0.3) -> ConsistencyPolicy:
    policy = ConsistencyPolicy()
    with torch.no_grad():
        policy.net[-1].bias.fill_(bias)  # differs from the base rule
    return policy


def _run(engine, **kw):
    return list(engine.run(PreviewRequest(**{**BASE, **kw})))


def _said(store, result) -> str:
    return read_png_parameters(store.get_preview(result.preview_id).png)["Preview solver"]


@pytest.fixture
def engines(store):
    a, b = DeviceWorker(TinyUNetDenoiser(size=16, seed=0)), DeviceWorker(TinyUNetDenoiser(size=16, seed=1))
    yield PreviewEngine(a, store, chunk_size=4), PreviewEngine(b, store, chunk_size=4)
    a.close()
    b.close()


def test_checkpoint_of_model_a_leaves_model_b_bit_identical_until_assigned(engines, store):
    engine_a, engine_b = engines
    model_a, model_b = engine_a.model, engine_b.model
    b_before = _run(engine_b)
    a_before = _run(engine_a)
    policy = _trained_looking()
    ckpt = store.add_checkpoint("on-a", config=policy.config_dict(), weights=policy.state_dict(), activate=True,
                                identity=model_identity(model_a).to_dict())
    a_after, b_after = _run(engine_a), _run(engine_b)
    assert a_after[0].checkpoint_id == ckpt and "trained for this model" in _said(store, a_after[0])
    assert not torch.equal(a_after[0].pixels, a_before[0].pixels)
    for x, y in zip(b_before, b_after):  # model B: bit-identical, still its base rule
        assert torch.equal(x.pixels, y.pixels)
    assert b_after[0].checkpoint_id is None and "not yet trained for this model" in _said(store, b_after[0])

    identity_b = model_identity(model_b)
    assert store.assign_checkpoint(ckpt, identity_b.key, family=identity_b.family) is True  # "use for this model too"
    b_assigned = _run(engine_b)
    assert b_assigned[0].checkpoint_id == ckpt
    assert "transferred from tiny-unet-0" in _said(store, b_assigned[0])
    assert not torch.equal(b_assigned[0].pixels, b_before[0].pixels)
    assert "transferred" not in _said(store, _run(engine_a)[0])


def test_consistency_path_is_labelled_transferred_and_refused_across_families(engines, store, tmp_path):
    engine_a, engine_b = engines
    folder = tmp_path / "policy-a"
    _trained_looking().save(folder)
    write_identity(folder, model_identity(engine_a.model))
    own = _run(engine_a, solver=f"consistency:{folder}")
    assert _said(store, own[0]).endswith("trained for this model")
    moved = _run(engine_b, solver=f"consistency:{folder}")
    assert "transferred from tiny-unet-0" in _said(store, moved[0])

    v_model = TinyUNetDenoiser(size=16, seed=2)
    v_model.scheduler_config = dict(v_model.scheduler_config, prediction_type="v_prediction")
    worker = DeviceWorker(v_model)
    try:
        count = len(store.query("SELECT id FROM previews"))
        with pytest.raises(ValueError, match=r"solver: .*vp/epsilon.*vp/v_prediction, another schedule family"):
            _run(PreviewEngine(worker, store, chunk_size=4), solver=f"consistency:{folder}")
        assert len(store.query("SELECT id FROM previews")) == count  # nothing written
    finally:
        worker.close()


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_policy_folder_with_a_missing_or_extra_tensor_is_refused_by_name(engines, store, tmp_path, change):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "p"
    ConsistencyPolicy().save(folder)
    tensors = load_file(folder / "policy.safetensors")
    if change == "missing":
        del tensors["net.4.bias"]
    else:
        tensors["net.9.weight"] = torch.zeros(2)
    save_file(tensors, folder / "policy.safetensors")
    count = len(store.query("SELECT id FROM previews"))
    with pytest.raises(ValueError, match=r"solver: .*net\.(4\.bias|9\.weight)"):
        _run(engines[0], solver=f"consistency:{folder}")
    assert len(store.query("SELECT id FROM previews")) == count


def test_cli_consistency_without_a_policy_is_exactly_its_base_rule_on_an_sd_folder(tmp_path, capsys):
    """The bar: no policy trained for the loaded model -> ``--solver consistency`` gives exactly the
    pixels of ``--solver rule:dpm2m``, and its JSON and PNG say so. Two folders with the same weights
    are the same model."""
    import numpy as np
    from PIL import Image
    from tiny_sd import save_tiny_sd

    from preview.__main__ import main

    folder = save_tiny_sd(tmp_path / "sd")
    copy = Path(shutil.copytree(folder, tmp_path / "same-weights"))
    db = str(tmp_path / "p.db")
    common = ["--prompt", "a cat", "--seeds", "0-1", "--steps", "3", "--model", str(folder), "--db", db]
    assert main([*common, "--solver", "consistency", "--out", str(tmp_path / "c")]) == 0
    ours = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert main([*common, "--solver", "rule:dpm2m", "--out", str(tmp_path / "r")]) == 0
    rule = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    for a, b in zip(ours, rule, strict=True):
        assert a["solver_ran"].startswith("ConsistencySolver, not yet trained for this model: runs DPM-Solver-2")
        assert read_png_parameters(Path(a["path"]).read_bytes())["Preview solver"] == a["solver_ran"]
        assert np.array_equal(np.asarray(Image.open(a["path"])), np.asarray(Image.open(b["path"])))

    class Loaded:  # what model_identity reads off a loaded denoiser
        def __init__(self, path):
            self.model_id = str(path)
            self.scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())

    first, second = model_identity(Loaded(folder)), model_identity(Loaded(copy))
    assert first.content_sha256 and first.key == second.key and first.model_id != second.model_id


def test_admin_backend_lists_checkpoints_per_model_and_transfers_only_when_asked(engines, store, tmp_path):
    """The Admin tab's backend: the table says which checkpoint runs for the loaded model and shows the
    shipped default; Activate refuses another model's checkpoint; "Use for this model too" records a
    labelled transfer; another schedule family is refused and nothing is written."""
    from webui.backend import EngineBackend

    engine_a, engine_b = engines
    policy = _trained_looking()
    on_a = store.add_checkpoint("on-a", config=policy.config_dict(), weights=policy.state_dict(), activate=True,
                                identity=model_identity(engine_a.model).to_dict())
    backend_b = EngineBackend(store, engine_b.executor, tmp_path / "exports")
    assert backend_b.solver_status().startswith("ConsistencySolver, not yet trained for this model")
    table = backend_b.checkpoints_table()
    row = table[table["id"] == on_a].iloc[0]
    assert row["model"] == "tiny-unet-0" and row["this model"] == "" and row["family"] == "vp/epsilon"
    assert "shipped" in table["id"].tolist()
    with pytest.raises(ValueError, match="Checkpoint id: #.* was trained for tiny-unet-0, not tiny-unet-1"):
        backend_b.activate_checkpoint(on_a)
    assert backend_b.assign_checkpoint(on_a) == "on-a, transferred from tiny-unet-0"
    assert "transferred from tiny-unet-0" in backend_b.solver_status()
    table = backend_b.checkpoints_table()
    assert table[table["id"] == on_a].iloc[0]["this model"] == "✔ transferred here"

    v_model = TinyUNetDenoiser(size=16, seed=3)
    v_model.scheduler_config = dict(v_model.scheduler_config, prediction_type="v_prediction")
    worker = DeviceWorker(v_model)
    try:
        backend_v = EngineBackend(store, worker, tmp_path / "exports")
        before = store.list_assignments()
        with pytest.raises(ValueError, match="Checkpoint id: .*vp/epsilon.*vp/v_prediction"):
            backend_v.assign_checkpoint(on_a)
        assert store.list_assignments() == before
    finally:
        worker.close()
