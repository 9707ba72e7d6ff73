"""training.tune_baselines: the coordinate descent, the names it writes, the file the registry reads back."""


import pytest

from tests.training_fakes import GaussianDenoiser, write_prompts
from training.tune_baselines import FAMILIES, config_name, descend, family_axes, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_swept_configuration_is_a_valid_registry_name():
    """Each option set the sweep can try parses back and builds its diffusers scheduler (or is refused by
    diffusers itself, which the sweep records as a failed trial)."""
    from solver.registry import check_name, parse_solver_name

    for family in FAMILIES:
        for k in (3, 4):
            for _, choices in family_axes(family, k):
                for choice in choices:
                    name = config_name(family, choice)
                    assert parse_solver_name(name) == (family, choice)
                    try:
                        check_name(name)
                    except ValueError as exc:  # diffusers' own refusal, which the sweep records as a failed trial
                        assert "refused the options" in str(exc)


def test_descent_keeps_the_best_value_of_each_option_and_skips_refused_ones():
    target = {"timestep_spacing": "leading", "solver_order": 1, "final_sigmas_type": "sigma_min"}
    seen = []

    def score(name, k):
        seen.append(name)
        if "bh1" in name:
            return {"psnr": float("-inf"), "ssim": float("-inf")}
        from solver.registry import parse_solver_name

        opts = parse_solver_name(name)[1]
        return {"psnr": 20.0 + sum(opts.get(key) == v for key, v in target.items()), "ssim": 0.5}

    best, tried = descend("unipc", 3, score)
    assert best == config_name("unipc", target) == \
        "unipc[timestep_spacing=leading,solver_order=1,final_sigmas_type=sigma_min]"
    assert len(tried) == len(set(tried)) and "unipc" in tried
    assert any("bh1" in t for t in tried)
    assert not any("use_karras_sigmas" in t for t in tried)  # sigma families only at K = 4
    assert any("use_karras_sigmas" in t for t in descend("unipc", 4, score)[1])
    full_best, full_tried = descend("unipc", 3, score, full=True)  # every option at every K, spacing again
    assert full_best == best and any("use_karras_sigmas" in t for t in full_tried)
    assert any("predict_x0=false" in t for t in full_tried)
    assert len(full_tried) == len(set(full_tried)) > len(tried)


def test_tuned_file_records_model_and_k_range_and_the_registry_reads_it(tmp_path):
    from solver.registry import read_tuned, tuned_names

    write_prompts(tmp_path / "p.txt", 2)
    model = GaussianDenoiser()
    out = tmp_path / "tuned.json"
    rc = main(["--prompts", str(tmp_path / "p.txt"), "--max-prompts", "2", "--seeds", "0", "--steps", "3",
               "--families", "ddim", "--reference-steps", "8", "--out", str(out), "--reference-cache",
               str(tmp_path / "refs.safetensors")], model=model)
    assert rc == 0
    doc = read_tuned(out)
    assert doc["model"] == "fake-gaussian" and doc["steps"] == [3] and doc["validation"]["pairs"] == 2
    assert doc["best"]["best"]["3"]["name"] == doc["best"]["ddim"]["3"]["name"]
    assert {t["name"] for t in doc["trials"]} == {config_name("ddim", c) for c in family_axes("ddim", 3)[0][1]}
    assert "plms" in doc["left_out"]
    assert tuned_names("fake-gaussian", out) == ["tuned:ddim", "tuned:best"] and tuned_names("other", out) == []
    from solver.registry import tuned_solver

    solver = tuned_solver("tuned:best", model.scheduler_config, out, model.model_id)
    assert solver.config_name(3) == doc["best"]["ddim"]["3"]["name"] and solver.nfe(3) == 3
    with pytest.raises(ValueError, match="not K = 4"):
        solver.nfe(4)
    calls = model.calls
    main(["--prompts", str(tmp_path / "p.txt"), "--max-prompts", "2", "--seeds", "0", "--steps", "3", "--families",
          "ddim", "--reference-steps", "8", "--out", str(tmp_path / "again.json"), "--reference-cache",
          str(tmp_path / "refs.safetensors")], model=model)
    assert model.calls - calls == sum(3 for _ in family_axes("ddim", 3)[0][1])  # references came from the cache


def test_bad_input_before_the_model_is_loaded(tmp_path):
    write_prompts(tmp_path / "heldout_prompts.txt", 2)
    with pytest.raises(ValueError, match="held-out"):
        main(["--prompts", str(tmp_path / "heldout_prompts.txt"), "--out", str(tmp_path / "o.json")])
    write_prompts(tmp_path / "p.txt", 2)
    with pytest.raises(ValueError, match="unknown family 'heun'"):
        main(["--prompts", str(tmp_path / "p.txt"), "--families", "ddim,heun", "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()
