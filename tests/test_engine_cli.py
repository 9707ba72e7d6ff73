"""The two command lines, run in-process on a tiny model (the embedded default is the same path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_models import TinyUNetDenoiser, one_cpu_thread, row_counts  # noqa: F401 - fixtures

from store import open_store
from store.png import read_png_parameters


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_preview_then_refine_cli(tmp_path, capsys):
    from preview.__main__ import main as preview_main
    from refine.__main__ import main as refine_main

    db, out = str(tmp_path / "cli.db"), tmp_path / "out"
    argv = ["--prompt", "a red circle", "--prompt", "a blue square", "--seeds", "0-1,7", "--steps", "2",
            "--solver", "ddim", "--db", db, "--out", str(out), "--chunk-size", "4"]
    assert preview_main(argv, model=TinyUNetDenoiser(size=16)) == 0
    records = _lines(capsys)
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, s) for p in ("a red circle", "a blue square") for s in (0, 1, 7)]
    for r in records:
        assert r["steps"] == 2 and r["solver"] == "ddim"
        params = read_png_parameters(Path(r["path"]).read_bytes())
        assert params["prompt"] == r["prompt"] and int(params["seed"]) == r["seed"]

    assert refine_main(["--preview-id", str(records[4]["preview_id"]), "--steps", "3", "--db", db, "--out", str(out)],
                       model=TinyUNetDenoiser(size=16)) == 0
    (final,) = _lines(capsys)
    assert (final["prompt"], final["seed"], final["steps"], final["solver"]) == ("a blue square", 1, 3, "dpm2m")
    assert final["preview_id"] == records[4]["preview_id"] and "psnr" in final["consistency"]
    assert int(read_png_parameters(Path(final["path"]).read_bytes())["steps"]) == 3

    assert refine_main(["--prompt", "a blue square", "--seed", "1", "--steps", "3", "--guidance", "3",
                        "--db", db, "--out", str(out)], model=TinyUNetDenoiser(size=16)) == 0
    (fresh,) = _lines(capsys)
    assert Path(fresh["path"]).read_bytes() != b"" and "consistency" not in fresh


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--seeds", "0-99", "--steps", "2"], "seeds"),
    (["--prompt", "x", "--seeds", "3-1"], "seeds"),
    (["--prompt", "x", "--steps", "60"], "steps"),
    (["--prompt", "x", "--solver", "magic"], "solver"),
])
def test_preview_cli_bad_input(tmp_path, capsys, argv, message):
    from preview.__main__ import main as preview_main

    db = tmp_path / "bad.db"
    code = preview_main(argv + ["--db", str(db), "--out", str(tmp_path / "o")], model=TinyUNetDenoiser(size=16))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    if db.exists():
        with open_store(db) as s:
            assert not any(row_counts(s).values())


def test_refine_cli_unknown_preview(tmp_path, capsys):
    from refine.__main__ import main as refine_main

    code = refine_main(["--preview-id", "42", "--db", str(tmp_path / "r.db"), "--out", str(tmp_path)],
                       model=TinyUNetDenoiser(size=16))
    assert code == 2 and "preview_id 42 does not exist" in capsys.readouterr().err


def test_refine_cli_runs_only_its_own_job(tmp_path, capsys):
    """An older queued job of another process in the same database is left queued, not run first."""
    from refine.__main__ import main as refine_main

    db, model = tmp_path / "shared.db", TinyUNetDenoiser(size=16)
    with open_store(db) as s:  # a job some other process queued earlier, runnable by this very model
        noise_id, _ = s.get_or_create_noise(5, model.latent_shape(16, 16))
        gen = s.add_generation(model_id=model.model_id, prompt="older", seed=5, height=16, width=16, guidance=3.0,
                               noise_id=noise_id)
        older = s.enqueue_job(gen, steps=2, solver="dpm2m")
    assert refine_main(["--prompt", "a blue square", "--seed", "1", "--steps", "2", "--db", str(db),
                        "--out", str(tmp_path / "out")], model=model) == 0
    (record,) = _lines(capsys)
    with open_store(db) as s:
        assert record["job_id"] != older and s.get_job(record["job_id"]).state == "done"
        assert [(e.from_state, e.to_state) for e in s.job_history(older)] == [(None, "queued")]
        assert s.get_final_for_job(older) is None and row_counts(s)["finals"] == 1
