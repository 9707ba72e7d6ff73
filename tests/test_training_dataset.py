"""Offline dataset: targets are refine's full-step sampler output, shards resume, mismatches are refused."""

import json

import pytest
import torch

from refine.full_step import sample_full_step
from store import open_store
from store.noise import make_noise
from tests.training_fakes import GaussianDenoiser, write_prompts
from training.dataset import (
    DatasetMismatch,
    build_dataset,
    load_dataset,
    main,
    parse_int_list,
    read_prompts,
    shard_name,
)


def _build(model, tmp_path, store=None, **kw):
    prompts = read_prompts(write_prompts(tmp_path / "p.txt", 3))
    return build_dataset(model, prompts, [0, 1], tmp_path / "ds", prompt_file_sha256="0" * 64, shard_size=4,
                         reference_steps=kw.pop("reference_steps", 10), store=store, progress=False, **kw)


def test_targets_are_refines_full_step_output_and_indexed_in_store(tmp_path):
    model = GaussianDenoiser()
    store = open_store(tmp_path / "db.sqlite")
    index = _build(model, tmp_path, store=store)
    assert index.complete and index.num_pairs == 6 and index.shards == [shard_name(0), shard_name(1)]
    ds = load_dataset(tmp_path / "ds", model_id=model.model_id, reference_solver="dpm2m", reference_steps=10)
    assert ds.prompts[:2] == ["a test scene number 0"] * 2 and ds.seeds == [0, 1, 0, 1, 0, 1]
    i = 3
    noise = make_noise(ds.seeds[i], (3, 12, 12))
    assert torch.equal(ds.noise[i], noise)
    cond = model.encode_prompts([ds.prompts[i]])
    expected = sample_full_step(model, cond, noise[None], index.guidance, 10)[0]
    assert torch.allclose(ds.target[i], expected, atol=1e-5)
    row = store.get_dataset(str((tmp_path / "ds").resolve()))
    assert row.model_id == model.model_id and row.reference_sampler == "dpm2m:10" and len(row.shard_paths) == 2


def test_interrupted_build_resumes_skipping_finished_shards(tmp_path):
    model = GaussianDenoiser()
    _build(model, tmp_path)
    first = load_dataset(tmp_path / "ds")
    (tmp_path / "ds" / shard_name(1)).unlink()  # as if killed before the last shard was renamed
    (tmp_path / "ds" / (shard_name(1) + ".tmp")).write_bytes(b"partial")
    model.calls = 0
    index = _build(model, tmp_path)
    assert index.complete and model.calls == 10  # one batch of the 2 missing rows x 10 steps, not 2 shards
    again = load_dataset(tmp_path / "ds")
    assert torch.equal(first.target, again.target) and torch.equal(first.noise, again.noise)


def test_dataset_of_another_model_or_sampler_is_refused(tmp_path):
    _build(GaussianDenoiser(), tmp_path)
    with pytest.raises(DatasetMismatch, match="model 'fake-gaussian'.*'other-model'"):
        load_dataset(tmp_path / "ds", model_id="other-model", reference_solver="dpm2m")
    with pytest.raises(DatasetMismatch, match="reference sampler 'dpm2m'"):
        load_dataset(tmp_path / "ds", model_id="fake-gaussian", reference_solver="unipc")
    with pytest.raises(DatasetMismatch, match="10 reference steps, expected 40"):
        load_dataset(tmp_path / "ds", model_id="fake-gaussian", reference_solver="dpm2m", reference_steps=40)
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    index["complete"] = False
    (tmp_path / "ds" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="incomplete"):
        load_dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match="other settings"):  # same folder, other seeds
        build_dataset(GaussianDenoiser(), ["x"], [5], tmp_path / "ds", prompt_file_sha256="0" * 64, progress=False)


def test_bad_input_fails_before_compute(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n# only a comment\n")
    with pytest.raises(ValueError, match="prompts: .*holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="prompts: cannot read"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="prompts: cannot read"):
        read_prompts(tmp_path / "bin.txt")
    assert parse_int_list("0-3,7", "seeds", 0, 10) == [0, 1, 2, 3, 7]
    for bad in ("", "3-1", "a", "0,0", "11"):
        with pytest.raises(ValueError, match="seeds"):
            parse_int_list(bad, "seeds", 0, 10)
    model = GaussianDenoiser()
    with pytest.raises(ValueError, match="reference_steps"):
        build_dataset(model, ["x"], [0], tmp_path / "d2", prompt_file_sha256="0" * 64, reference_steps=0)
    assert not (tmp_path / "d2").exists() and model.calls == 0


def test_command_line(tmp_path, capsys):
    write_prompts(tmp_path / "p.txt", 2)
    rc = main(["--prompts", str(tmp_path / "p.txt"), "--seeds", "0-1", "--out", str(tmp_path / "ds"),
               "--reference-steps", "5", "--db", ""], model=GaussianDenoiser())
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["pairs"] == 4 and out["complete"] and out["reference"] == "dpm2m:5"


def test_zip_pairing_gives_each_prompt_its_own_seed_and_noise(tmp_path):
    model = GaussianDenoiser()
    prompts = read_prompts(write_prompts(tmp_path / "p.txt", 5))
    index = build_dataset(model, prompts, [10, 11, 12, 13, 14], tmp_path / "ds", prompt_file_sha256="0" * 64,
                          shard_size=2, reference_steps=5, progress=False, pairing="zip")
    assert index.num_pairs == 5 and len(index.shards) == 3
    ds = load_dataset(tmp_path / "ds")
    assert ds.prompts == prompts and ds.seeds == [10, 11, 12, 13, 14]
    assert torch.equal(ds.noise[4], make_noise(14, (3, 12, 12)))
    assert not torch.equal(ds.noise[0], ds.noise[1])  # a distinct noise per row
    model.calls = 0
    with pytest.raises(ValueError, match="seeds: pairing 'zip'.*5 prompts.*2 seeds"):
        build_dataset(model, prompts, [0, 1], tmp_path / "d2", prompt_file_sha256="0" * 64, pairing="zip")
    with pytest.raises(ValueError, match="pairing"):
        build_dataset(model, prompts, [0], tmp_path / "d3", prompt_file_sha256="0" * 64, pairing="outer")
    assert model.calls == 0 and not (tmp_path / "d2").exists() and not (tmp_path / "d3").exists()
    with pytest.raises(ValueError, match="seeds: pairing 'zip'"):  # before the model is loaded
        main(["--prompts", str(tmp_path / "p.txt"), "--seeds", "0-1", "--pairing", "zip", "--out", str(tmp_path / "d4")])
