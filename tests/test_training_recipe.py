"""The one-command recipe: training prompts stay out of the held-out split; the pipeline installs a policy."""

import json

import pytest
import torch

from solver.policy import ConsistencyPolicy
from tests.training_fakes import GaussianDenoiser
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


def test_recipe_runs_end_to_end_and_installs_the_policy(tmp_path, capsys):
    rc = main(["--out", str(tmp_path / "run"), "--num-prompts", "3", "--seeds", "0", "--num-updates", "2",
               "--group-size", "2", "--groups-per-update", "2", "--min-steps", "3", "--max-steps", "3",
               "--install", str(tmp_path / "installed"), "--threads", "1", "--reward", "psnr"], model=GaussianDenoiser())
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["updates"] == 2 and out["base"] in out["base_scores"]
    policy = ConsistencyPolicy.load(tmp_path / "installed")
    assert policy.base == out["base"]
