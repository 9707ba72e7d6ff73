"""The options every command line shares (runtime.cli): one definition, one database flag, and a
single-file checkpoint loaded by ``python -m preview --model x.safetensors --config DIR``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil

import pytest

from runtime.cli import add_db_option, add_model_options, load_options

SHARED = ["--model", "--config", "--fp16", "--device", "--cpu-offload", "--attention-slicing", "--vae-tiling", "--db"]
# every CLI that opens a store has --db; training.distill writes only files and has none
CLIS = ["preview.__main__", "refine.__main__", "preview.bench", "training.dataset", "training.train",
        "training.distill", "training.evaluate", "training.recipe"]


def _help(main) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    return buffer.getvalue()


def _option_lines(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, joined across wrapped lines."""
    found, current = {}, None
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("--"):
            current = words[0].rstrip(",")
            found[current] = " ".join(words[1:])
        elif current and line.startswith(" " * 10) and words:
            found[current] += " " + " ".join(words)
        else:
            current = None
    return found


def test_every_cli_and_the_app_share_the_model_options_and_db():
    from webui.app import parse_args

    helps = {name: _option_lines(_help(importlib.import_module(name).main)) for name in CLIS}
    helps["webui.app"] = _option_lines(_help(parse_args))
    reference = helps["preview.__main__"]
    for name, options in helps.items():
        missing = [flag for flag in SHARED if flag not in options and (flag, name) != ("--db", "training.distill")]
        assert not missing, f"{name} lacks {missing}"
        for flag in ("--model", "--config", "--fp16", "--cpu-offload", "--attention-slicing", "--vae-tiling"):
            assert options[flag] == reference[flag], (name, flag)  # the same definition, word for word
        assert "--store" not in options  # the old name is hidden


def test_store_is_a_deprecated_alias_of_db(caplog):
    parser = argparse.ArgumentParser()
    add_db_option(parser, dest="store", default="")
    assert parser.parse_args([]).store == ""
    with caplog.at_level(logging.WARNING, logger="runtime.cli"):
        assert parser.parse_args(["--db", "a.db"]).store == "a.db"
        assert not caplog.records
        assert parser.parse_args(["--store", "b.db"]).store == "b.db"
    assert [r.getMessage() for r in caplog.records] == ["--store is deprecated: use --db"]


def test_load_options_follow_the_flags():
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    opts = load_options(parser.parse_args(["--config", "cfg", "--no-fp16", "--attention-slicing", "--vae-tiling"]))
    assert (opts.config, opts.fp16, opts.attention_slicing, opts.vae_tiling, opts.cpu_offload) == ("cfg", False, True, True, False)
    assert load_options(parser.parse_args([])).fp16 is None


@pytest.mark.slow
def test_preview_cli_loads_a_single_file_checkpoint(tmp_path, capsys):
    from tiny_sd import save_ldm_single_file, save_tiny_sd

    from preview.__main__ import main as preview_main
    from store import open_store

    folder = save_tiny_sd(tmp_path / "tiny", "epsilon", seed=0)
    ckpt = save_ldm_single_file(folder, tmp_path / "tiny-sd15.safetensors")
    config = tmp_path / "config-only"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    db = tmp_path / "s.db"
    argv = ["--prompt", "a cat", "--seeds", "0", "--steps", "2", "--solver", "ddim", "--db", str(db),
            "--out", str(tmp_path / "out"), "--model", str(ckpt), "--config", str(config), "--device", "cpu"]
    assert preview_main(argv) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    with open_store(db) as s:
        assert s.get_generation(record["generation_id"]).model_id == "tiny-sd15.safetensors"
    assert record["size"] == [32, 32]
    # the same flags without --config: one error line, exit 1 (a single file needs its configs locally)
    capsys.readouterr()
    assert preview_main(argv[:-4] + ["--device", "cpu"]) == 1
    assert capsys.readouterr().err.startswith("error:")


def test_the_apps_training_jobs_get_the_same_model_options(tmp_path):
    """Admin starts training CLIs in a child process: model_argv gives them the app's model and how it loads
    (local paths made absolute, the first of several devices), so a single-file checkpoint loads there too."""
    from runtime.cli import model_argv
    from webui.app import parse_args

    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "cfg").mkdir()
    app = parse_args(["--model", str(tmp_path / "m.safetensors"), "--config", str(tmp_path / "cfg"), "--no-fp16",
                      "--device", "cuda:0,cuda:1", "--vae-tiling", "--attention-slicing"])
    words = model_argv(app)
    child = argparse.ArgumentParser()
    add_model_options(child)
    job = child.parse_args(words)
    assert job.model == str(tmp_path / "m.safetensors") and job.config == str(tmp_path / "cfg")
    assert job.device == "cuda:0" and job.fp16 is False and job.vae_tiling and job.attention_slicing
    assert load_options(job) == load_options(app)
    assert model_argv(parse_args([])) == []
