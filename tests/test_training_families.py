"""Training on the new families: distillation's differentiable guided epsilon is the model's own."""

import pytest
import torch

from models.registry import load_model
from tests.tiny_flux import save_tiny_flux
from tests.tiny_sd3 import save_tiny_sd3
from tests.tiny_sdxl import save_tiny_sdxl
from training.distill import differentiable_guided_eps


@pytest.mark.parametrize("save, t", [(save_tiny_sdxl, 700), (save_tiny_sd3, 1000), (save_tiny_sd3, 612)])
def test_the_differentiable_guided_eps_is_the_models_own(tmp_path, save, t):
    """With the pooled embeddings and time ids passed (SDXL, SD3) and x0_hat at t = 1 (flow), the graph-keeping
    guided epsilon that distillation differentiates equals Denoiser.guided_eps."""
    model = load_model(str(save(tmp_path / "m")), device="cpu")
    cond = model.encode_prompts(["a red cat", "a dog"], "blurry")
    h, w = model.default_size
    x = torch.randn(2, *model.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
    want = model.guided_eps(x, t, cond, 4.0)
    got = differentiable_guided_eps(model, x, torch.tensor(t), cond, 4.0)
    assert (got - want).abs().max().item() < 1e-5


def test_flux_is_refused_by_distillation_with_a_reason(tmp_path):
    model = load_model(str(save_tiny_flux(tmp_path / "flux")), device="cpu")
    cond = model.encode_prompts(["a red cat"])
    x = torch.randn(1, *model.latent_shape(*model.default_size))
    with pytest.raises(ValueError, match="model: distillation .* PPO"):
        differentiable_guided_eps(model, x, torch.tensor(500), cond, 3.5)


def test_a_flow_model_builds_a_dataset_trains_with_ppo_and_evaluates(tmp_path):
    """The training CLIs end to end on a tiny FLUX (flow matching from t = 1): full-step targets, two PPO
    updates (rollouts take the sampler's first step from t = 1), and the evaluation of the trained policy."""
    import json
    import subprocess
    import sys

    folder = save_tiny_flux(tmp_path / "flux")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    common = ["--model", str(folder), "--db", "", "--device", "cpu"]

    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", *argv, *common], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    run("training.dataset", "--prompts", str(prompts), "--seeds", "0-1", "--out", str(tmp_path / "data"),
        "--reference-steps", "6")
    out = json.loads(run("training.train", "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "ppo"),
                         "--num-updates", "2", "--group-size", "2", "--groups-per-update", "2", "--min-steps", "2",
                         "--max-steps", "3", "--reward", "psnr", "--threads", "1").strip().splitlines()[-1])
    assert set(out["deterministic_reward"]) == {"2", "3"}
    run("training.evaluate", "--prompts", str(prompts), "--seeds", "0-1", "--steps", "2,3", "--reference-steps", "6",
        "--solvers", f"consistency:{out['final_dir']},euler", "--threads", "1", "--json", str(tmp_path / "eval.json"))
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert {(r["solver"].split(":")[0], r["steps"]) for r in rows} >= {("consistency", 2), ("euler", 3)}
    assert all(r["psnr"] > 10 for r in rows)
