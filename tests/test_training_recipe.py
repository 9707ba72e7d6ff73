"""The one-command recipe: training prompts stay out of the held-out split; the pipeline installs a policy."""

import json

import pytest

from solver.policy import ConsistencyPolicy
from tests.training_fakes import GaussianDenoiser
from training.dataset import load_dataset
from training.recipe import main, training_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_prompts_avoid_the_heldout_combinations():
    from models.embedded.captions import HELDOUT_COMBOS
    from models.embedded.parse import parse_prompt

    prompts = training_prompts(40)
    assert len(set(prompts)) == 40 and prompts == training_prompts(40)  # deterministic
    heldout = set(open("models/embedded/heldout_prompts.txt").read().splitlines())
    assert not heldout & set(prompts)
    for p in prompts:
        q = parse_prompt(p)
        assert (q.main_colour, q.main_shape, q.background) not in HELDOUT_COMBOS


def test_validation_prompts_are_the_committed_file_and_leave_training_and_heldout_alone():
    from training.recipe import VALIDATION_PROMPTS, validation_prompts

    prompts = validation_prompts()
    assert prompts == VALIDATION_PROMPTS.read_text().splitlines() and len(set(prompts)) == 300
    heldout = set(open("models/embedded/heldout_prompts.txt").read().splitlines())
    assert not set(prompts) & (heldout | set(training_prompts(160)))


def test_shifted_validation_prompts_are_the_committed_file_of_heldout_combinations_outside_the_heldout_file():
    from models.embedded.captions import HELDOUT_COMBOS
    from models.embedded.parse import parse_prompt
    from training.recipe import SHIFTED_VALIDATION_PROMPTS, shifted_validation_prompts

    prompts = shifted_validation_prompts()
    assert prompts == SHIFTED_VALIDATION_PROMPTS.read_text().splitlines() and len(set(prompts)) == 200
    heldout = set(open("models/embedded/heldout_prompts.txt").read().splitlines())
    assert not set(prompts) & (heldout | set(training_prompts(160)))
    parsed = [parse_prompt(p) for p in prompts]
    assert all((q.main_colour, q.main_shape, q.background) in HELDOUT_COMBOS for q in parsed)


@pytest.mark.parametrize("name, count", [("fresh_heldout", 120), ("second_test", 240), ("third_test", 360),
                                         ("wide_validation", 600), ("fourth_test", 480), ("fifth_test", 600)])
def test_each_test_set_is_its_committed_file_disjoint_from_every_other_split(name, count):
    """Every test set, and the wide validation split of their distribution: the function's captions are the
    committed file, of the held-out combinations, and in no other prompt file (each set in no earlier one
    either; the wide split in no test set)."""
    from models.embedded.captions import HELDOUT_COMBOS
    from models.embedded.parse import parse_prompt
    from training import recipe

    prompts = getattr(recipe, f"{name}_prompts")()
    assert prompts == getattr(recipe, f"{name.upper()}_PROMPTS").read_text().splitlines() and len(set(prompts)) == count
    others = set(open("models/embedded/heldout_prompts.txt").read().splitlines()) | set(training_prompts(160))
    splits = [recipe.VALIDATION_PROMPTS, recipe.SHIFTED_VALIDATION_PROMPTS, recipe.FRESH_HELDOUT_PROMPTS,
              recipe.SECOND_TEST_PROMPTS, recipe.THIRD_TEST_PROMPTS, recipe.WIDE_VALIDATION_PROMPTS,
              recipe.FOURTH_TEST_PROMPTS]
    earlier = {"fresh_heldout": 2, "second_test": 3, "third_test": 4, "wide_validation": 5, "fourth_test": 6,
               "fifth_test": 7}[name]
    for split in splits[:earlier]:
        others |= set(split.read_text().splitlines())
    assert not set(prompts) & others
    parsed = [parse_prompt(p) for p in prompts]
    assert all((q.main_colour, q.main_shape, q.background) in HELDOUT_COMBOS for q in parsed)


def test_recipe_runs_end_to_end_and_installs_the_policy(tmp_path, capsys):
    rc = main(["--out", str(tmp_path / "run"), "--num-prompts", "3", "--num-updates", "2",
               "--group-size", "2", "--groups-per-update", "2", "--min-steps", "3", "--max-steps", "4",
               "--install", str(tmp_path / "installed"), "--threads", "1", "--reward", "psnr",
               "--distill-updates", "3", "--distill-batch-size", "2", "--distill-repeat-steps", "4", "--base", "auto"],
              model=GaussianDenoiser())
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["updates"] == 2 and out["base"] in out["base_scores"]
    assert json.loads((tmp_path / "installed" / "recipe.json").read_text()) == out
    # PPO started from the distilled policy, and the distilled policy itself was a candidate
    assert out["distilled"] == str(tmp_path / "run" / "distill" / "final")
    assert set(out["checkpoint_scores"]) == {"distill/final", "checkpoint-00002", "final"}  # 2 updates, 20 min budget
    distilled = json.loads((tmp_path / "run" / "distill" / "final" / "train_config.json").read_text())
    metrics = json.loads((tmp_path / "run" / "distill" / "final" / "metrics.json").read_text())
    assert len(metrics["updates"]) == 3 and set(metrics["fit"]) == {"coef_max_error", "grid_max_error", "start_max_error_steps", "tables"}
    assert [r["steps"] for r in metrics["updates"]] == [3, 4, 4]  # K = 4 visited twice per round
    assert load_dataset(tmp_path / "run" / "dataset").seeds == [1000, 1001, 1002]  # one noise per row, unseen seeds
    assert distilled["values"]["base"] == out["base"] and distilled["values"]["time_grid"] is True
    assert distilled["values"]["fit_weights"] == ""  # nothing above K = 6 in 3..4
    assert distilled["values"]["residual_decay"] == ""  # the default pull is on K = 5, outside 3..4
    ppo = json.loads((tmp_path / "run" / "ppo" / "final" / "train_config.json").read_text())
    assert ppo["values"]["init_from"] == out["distilled"]
    # the best-scoring candidate is the one chosen and installed, byte for byte
    best = max(out["checkpoint_scores"], key=out["checkpoint_scores"].get)
    chosen = tmp_path / "run" / (best if best == "distill/final" else f"ppo/{best}")
    assert out["chosen"] == str(chosen)
    for name in ("policy.safetensors", "policy_config.json", "train_config.json"):
        assert (tmp_path / "installed" / name).read_bytes() == (chosen / name).read_bytes(), name
    policy = ConsistencyPolicy.load(tmp_path / "installed")
    assert policy.base == out["base"]


def test_recipe_refuses_repeated_step_counts_outside_the_range_before_any_compute(tmp_path):
    model = GaussianDenoiser()
    with pytest.raises(ValueError, match="repeat_steps"):  # the default 4,5 with --max-steps 3
        main(["--out", str(tmp_path / "run"), "--num-prompts", "2", "--min-steps", "3", "--max-steps", "3"], model=model)
    assert model.calls == 0 and not (tmp_path / "run" / "dataset").exists()


def test_recipe_default_warm_start_map_keeps_only_the_step_range():
    """The default --warm-start-k (K = 3 and 4 from the K = 4 rule) names only K the range holds, so a range
    without K = 3 still runs; '0' is each K from its own; a map given on the command line is kept as given."""
    from training.recipe import DEFAULT_WARM_START_K, recipe_warm_start_k

    assert recipe_warm_start_k(DEFAULT_WARM_START_K, 3, 8) == "3:4,4:4"
    assert recipe_warm_start_k(DEFAULT_WARM_START_K, 4, 6) == "4:4"
    assert recipe_warm_start_k(DEFAULT_WARM_START_K, 5, 8) == ""
    assert recipe_warm_start_k("0", 3, 8) == "" and recipe_warm_start_k("4", 5, 8) == "4"
    assert recipe_warm_start_k("3:4", 5, 8) == "3:4"  # refused later, naming warm_start_k


def test_recipe_weighs_long_previews_less_in_the_regression_and_refuses_bad_weights_before_any_compute(tmp_path):
    from training.distill import DistillConfig
    from training.recipe import default_fit_weights, default_residual_decay

    assert default_fit_weights(3, 8) == "7:0.05,8:0.05" and default_fit_weights(3, 7) == "7:0.05"
    assert default_fit_weights(3, 6) == "" and default_fit_weights(8, 8) == "8:0.05"  # always within the range
    assert default_residual_decay(3, 8) == "5:3" and default_residual_decay(5, 5) == "5:3"  # K = 5 alone
    assert default_residual_decay(3, 4) == "" and default_residual_decay(6, 8) == ""  # only where the range holds 5
    assert DistillConfig(dataset="x", residual_decay=default_residual_decay(3, 8)).validate().residual_decay_map() \
        == {5: 3.0}
    model = GaussianDenoiser()
    for bad in ("9:1", "4:-1"):
        with pytest.raises(ValueError, match="fit_weights"):
            main(["--out", str(tmp_path / "run"), "--num-prompts", "2", "--distill-fit-weights", bad], model=model)
        with pytest.raises(ValueError, match="residual_decay"):
            main(["--out", str(tmp_path / "run"), "--num-prompts", "2", "--distill-residual-decay", bad], model=model)
    assert model.calls == 0 and not (tmp_path / "run" / "dataset").exists()


def test_recipe_puts_the_analyzer_terms_on_the_step_counts_it_is_given(tmp_path):
    embedded = GaussianDenoiser()
    embedded.model_id = "embedded-fake"
    main(["--out", str(tmp_path / "ok"), "--num-prompts", "2", "--num-updates", "1", "--group-size", "2",
          "--groups-per-update", "1", "--min-steps", "5", "--max-steps", "6", "--install", "", "--threads", "1",
          "--reward", "psnr", "--distill-updates", "2", "--distill-batch-size", "2", "--distill-repeat-steps", "",
          "--distill-label-weight", "10", "--distill-coverage-weight", "3", "--distill-label-steps", "6"],
         model=embedded)
    run = json.loads((tmp_path / "ok" / "distill" / "final" / "metrics.json").read_text())["updates"]
    assert [("label_ce" in e, "coverage_mse" in e, e["steps"]) for e in run] == [(False, False, 5), (True, True, 6)]
    settings = json.loads((tmp_path / "ok" / "distill" / "final" / "train_config.json").read_text())["values"]
    assert settings["coverage_weight"] == 3.0 and settings["label_weight"] == 10.0
    model = GaussianDenoiser()
    for bad in ("9", "six"):
        with pytest.raises(ValueError, match="label_steps"):
            main(["--out", str(tmp_path / "run"), "--num-prompts", "2", "--distill-label-steps", bad], model=model)
    assert model.calls == 0 and not (tmp_path / "run" / "dataset").exists()


def test_recipe_keeps_the_tables_of_the_step_counts_it_is_given_exactly(tmp_path):
    """--distill-step-tables 6: the distilled policy (and PPO's, which starts from it) holds K = 6's fitted grid
    exactly; a bad value is refused naming step_tables before any compute."""
    from solver.policy import ConsistencyPolicy

    model = GaussianDenoiser()
    main(["--out", str(tmp_path / "ok"), "--num-prompts", "2", "--num-updates", "1", "--group-size", "2",
          "--groups-per-update", "1", "--min-steps", "5", "--max-steps", "6", "--install", "", "--threads", "1",
          "--reward", "psnr", "--distill-updates", "2", "--distill-batch-size", "2", "--distill-repeat-steps", "",
          "--distill-step-tables", "6"], model=model)
    distilled = tmp_path / "ok" / "distill" / "final"
    tables = json.loads((distilled / "metrics.json").read_text())["fit"]["tables"]
    policy = ConsistencyPolicy.load(distilled)
    assert policy.step_tables == (6,) and ConsistencyPolicy.load(tmp_path / "ok" / "ppo" / "final").step_tables == (6,)
    assert policy.time_grid(model.schedule, 6).timesteps.tolist() == tables["6"]["timesteps"]
    for bad in ("9", "six"):
        fresh = GaussianDenoiser()
        with pytest.raises(ValueError, match="step_tables"):
            main(["--out", str(tmp_path / "run"), "--num-prompts", "2", "--distill-step-tables", bad], model=fresh)
        assert fresh.calls == 0 and not (tmp_path / "run" / "dataset").exists()


@pytest.mark.parametrize("term", ["label", "coverage", "readings"])
def test_recipe_refuses_the_analyzer_terms_for_a_model_without_a_palette_before_any_compute(tmp_path, term):
    model = GaussianDenoiser()
    flag = ["--reward", "h1_psnr+3*readings"] if term == "readings" else [f"--distill-{term}-weight", "1"]
    with pytest.raises(ValueError, match="reward: readings" if term == "readings" else f"{term}_weight"):
        main(["--out", str(tmp_path / "run"), "--num-prompts", "2", *flag,
              "--num-updates", "1", "--group-size", "2", "--groups-per-update", "1", "--distill-updates", "1",
              "--install", ""], model=model)
    assert model.calls == 0 and not (tmp_path / "run" / "dataset").exists()


def test_recipe_pulls_k5_toward_the_base_rule_by_default_and_an_empty_flag_turns_it_off(tmp_path, capsys):
    common = ["--num-prompts", "2", "--num-updates", "1", "--group-size", "2", "--groups-per-update", "1",
              "--min-steps", "5", "--max-steps", "5", "--threads", "1", "--reward", "psnr", "--distill-updates", "1",
              "--distill-batch-size", "2", "--distill-repeat-steps", "", "--base", "ddim"]
    decays = {}
    for name, extra in (("default", []), ("off", ["--distill-residual-decay", ""])):
        main(["--out", str(tmp_path / name), "--install", str(tmp_path / name / "installed"), *common, *extra],
             model=GaussianDenoiser())
        config = json.loads((tmp_path / name / "distill" / "final" / "train_config.json").read_text())
        decays[name] = config["values"]["residual_decay"]
    assert decays == {"default": "5:3", "off": ""}


def test_recipe_warm_starts_from_the_tuned_rule_and_refuses_another_models_file(tmp_path, capsys):
    from tests.test_training_distill import _tuned_file

    model = GaussianDenoiser()
    name = "unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]"
    other = _tuned_file(tmp_path / "other.json", GaussianDenoiser(model_id="another"), {3: name, 4: name})
    with pytest.raises(ValueError, match="tuned for model 'another'"):
        main(["--out", str(tmp_path / "bad"), "--num-prompts", "3", "--warm-start", str(other), "--install", ""],
             model=model)
    assert model.calls == 0
    tuned = _tuned_file(tmp_path / "tuned.json", model, {3: name, 4: name})
    for spec in ("3:6", "6", "3:x"):  # a K the file does not tune, or a malformed map: refused before any compute
        with pytest.raises(ValueError, match="warm_start_k"):
            main(["--out", str(tmp_path / "bad"), "--num-prompts", "3", "--warm-start", str(tuned), "--install", "",
                  "--min-steps", "3", "--max-steps", "4", "--distill-repeat-steps", "", "--warm-start-k", spec],
                 model=model)
    assert model.calls == 0 and not (tmp_path / "bad" / "dataset").exists()
    rc = main(["--out", str(tmp_path / "run"), "--num-prompts", "3", "--num-updates", "1", "--base", "ddim", "--order", "8",
               "--group-size", "2", "--groups-per-update", "1", "--min-steps", "3", "--max-steps", "4",
               "--install", "", "--threads", "1", "--reward", "psnr", "--warm-start", str(tuned),
               "--distill-updates", "2", "--distill-batch-size", "2", "--distill-repeat-steps", ""], model=model)
    assert rc == 0
    values = json.loads((tmp_path / "run" / "distill" / "final" / "train_config.json").read_text())["values"]
    assert values["warm_start"] == str(tuned) and values["learn_start"] and values["final"] == "first"
    assert values["warm_start_k"] == "3:4,4:4"
    tables = json.loads((tmp_path / "run" / "distill" / "final" / "metrics.json").read_text())["fit"]["tables"]
    assert tables["4"]["warm_start"] == name and tables["4"]["timesteps"][0] < 999  # starts below T, as leading does


def test_recipe_runs_its_ppo_stage_at_the_exploration_noise_it_is_given_and_refuses_a_bad_one(tmp_path):
    """--ppo-explore-log-std -4.5: PPO's first rollouts draw at that log std, not at the distilled policy's (the
    ppo run records it and starts from it); a value that is not a finite number is refused before any compute."""
    common = ["--num-prompts", "2", "--num-updates", "1", "--group-size", "2", "--groups-per-update", "1",
              "--min-steps", "4", "--max-steps", "4", "--install", "", "--threads", "1", "--reward", "psnr",
              "--distill-updates", "1", "--distill-batch-size", "2", "--distill-repeat-steps", ""]
    main(["--out", str(tmp_path / "ok"), *common, "--ppo-explore-log-std", "-4.5"], model=GaussianDenoiser())
    ppo = tmp_path / "ok" / "ppo"
    assert json.loads((ppo / "final" / "train_config.json").read_text())["values"]["explore_log_std"] == -4.5
    distilled = ConsistencyPolicy.load(tmp_path / "ok" / "distill" / "final")
    assert float(distilled.log_std.detach().max()) > -4.0  # the warm start's own noise is not -4.5
    first = ConsistencyPolicy.load(ppo / "checkpoint-00001")
    assert abs(float(first.log_std.detach().mean()) + 4.5) < 0.05  # one small update away from -4.5
    model = GaussianDenoiser()
    with pytest.raises(ValueError, match="explore_log_std"):
        main(["--out", str(tmp_path / "run"), *common, "--ppo-explore-log-std", "nan"], model=model)
    assert model.calls == 0 and not (tmp_path / "run" / "dataset").exists()
