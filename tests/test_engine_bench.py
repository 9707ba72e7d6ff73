"""``python -m preview.bench --against diffusers`` on a tiny random-weight SD model: the report's shape, not its timings."""

from __future__ import annotations

import json
import os

import pytest
import torch
from engine_models import TinyUNetDenoiser
from tiny_sd import save_tiny_sd

from preview import bench


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield save_tiny_sd(tmp_path_factory.mktemp("bench") / "tiny", "epsilon", seed=0)
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def test_against_diffusers_reports_every_figure(tiny_dir, capsys, one_torch_thread):
    code = bench.main(["--model", str(tiny_dir), "--against", "diffusers", "--seeds-list", "1,2", "--seeds", "2",
                       "--repeats", "1", "--warmup", "0", "--refine-steps", "40", "--chunk-size", "2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("grid_s", "diffusers_s", "floor_s", "first_tile_s", "vs_diffusers", "overhead", "contention"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["vs_diffusers"] == pytest.approx(report["grid_s"] / report["diffusers_s"], rel=0.01)
    assert report["overhead"] == pytest.approx(report["grid_s"] / report["floor_s"], rel=0.01)
    assert report["first_tile_s"] <= report["grid_s"]
    assert report["peak_gpu_mem_mib"] is None and report["device"] == "cpu"  # null on the CPU
    assert set(report["per_seeds"]) == {"1", "2"}
    one = report["per_seeds"]["1"]
    assert one["chunk_size"] == 2 and one["padded_rows"] == 1 and one["diffusers_s"] > 0
    assert isinstance(report["decode_batch_invariant"], bool)
    parts, grid_ms = report["per_seeds"]["2"]["grid_parts_ms"], report["per_seeds"]["2"]["grid_s"] * 1e3
    assert set(parts) == {"encode", "sample", "decode", "last_decoded", "host"}
    assert parts["last_decoded"] + parts["host"] == pytest.approx(grid_ms, rel=0.01)  # one repeat: exactly its grid
    assert 0 < parts["sample"] and parts["encode"] + parts["sample"] + parts["decode"] <= parts["last_decoded"] + 0.1


def test_against_a_model_without_a_diffusers_pipeline_is_one_clear_error():
    with pytest.raises(bench.BenchError, match="no diffusers pipeline"):
        bench.diffusers_pipeline(TinyUNetDenoiser(size=16))


@pytest.mark.parametrize("argv, message", [
    (["--seeds-list", "1,x"], "--seeds-list"),
    (["--seeds-list", "0"], "--seeds-list"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_arguments_name_the_option(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_speed_settings_refuse_what_the_model_cannot_take():
    model = TinyUNetDenoiser(size=16)
    with pytest.raises(bench.BenchError, match="--compile"):
        bench.apply_speed_settings(model, compile=True, channels_last=False, sdpa="default")
    if not torch.cuda.is_available():
        with pytest.raises(bench.BenchError, match="--sdpa"):
            bench.apply_speed_settings(model, compile=False, channels_last=False, sdpa="math")
