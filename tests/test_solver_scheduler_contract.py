"""ConsistencySolverScheduler keeps diffusers' whole scheduler contract: config keys honoured or refused,
the given timestep checked, set_begin_index, custom timesteps, hub loading through the cache (offline
respected), save_pretrained(push_to_hub=True) uploading a complete folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from solver.policy import ConsistencyPolicy
from solver.sampling import iter_lmm
from solver.scheduler import ConsistencySolverScheduler
from solver.schedules import ZERO_SNR_ABAR

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False}
REPO = Path(__file__).resolve().parent.parent


def toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    return 0.8 * x * (1 + 0.1 * torch.tanh(x)) + 0.001 * float(t)


def perturbed(order: int = 4) -> ConsistencyPolicy:
    torch.manual_seed(0)
    policy = ConsistencyPolicy(order=order)
    with torch.no_grad():
        policy.net[-1].bias.fill_(0.2)
    return policy


def run(scheduler, x, timesteps):
    for t in timesteps:
        x = scheduler.step(toy_eps(x, t), t, x).prev_sample
    return x


def test_step_uses_the_timestep_it_is_given_and_refuses_another():
    scheduler = ConsistencySolverScheduler(**SD)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    x = scheduler.step(toy_eps(x, 999), 999, x).prev_sample
    with pytest.raises(ValueError, match="timestep 999 is not the expected timestep 749 of step 1"):
        scheduler.step(toy_eps(x, 999), 999, x)
    with pytest.raises(ValueError, match="timestep 249 is not the expected timestep 749"):
        scheduler.step(toy_eps(x, 249), torch.tensor(249), x)
    scheduler.step(toy_eps(x, 749), torch.tensor(749), x)  # the expected one still works


def test_set_begin_index_runs_the_rest_of_the_grid_with_its_own_table():
    policy = perturbed()
    scheduler = ConsistencySolverScheduler(**SD, policy=policy)
    scheduler.set_timesteps(6)
    full = scheduler.grid
    scheduler.set_begin_index(2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = run(scheduler, x, scheduler.timesteps[2:])
    sub = scheduler.grid
    assert torch.equal(sub.timesteps, full.timesteps[2:]) and torch.equal(sub.n, full.n[2:])
    reference = [r.x for r in iter_lmm(toy_eps, x, sub, policy.coefficient_table(sub))][-1]
    assert (ours - reference).abs().max() < 1e-5
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(6)


def test_custom_timesteps_are_used_and_sigmas_refused():
    scheduler = ConsistencySolverScheduler(**SD)
    scheduler.set_timesteps(timesteps=[999, 700, 400, 100])
    assert scheduler.timesteps.tolist() == [999, 700, 400, 100] and scheduler.num_inference_steps == 4
    x = run(scheduler, torch.randn(1, 4, 8, 8), [999, 700, 400, 100])
    assert bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        scheduler.set_timesteps(timesteps=[400, 700])
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(sigmas=[14.6, 1.0, 0.1])


def test_config_keys_are_honoured():
    zero = ConsistencySolverScheduler.from_config({**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})
    assert float(zero.alphas_cumprod[-1]) == pytest.approx(ZERO_SNR_ABAR)
    zero.set_timesteps(4)
    assert bool(torch.isfinite(zero.grid.n).all())
    leading = ConsistencySolverScheduler.from_config({**SD, "timestep_spacing": "leading", "steps_offset": 1})
    leading.set_timesteps(5)
    ddim = DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    ddim.set_timesteps(5)
    assert leading.timesteps.tolist() == ddim.timesteps.tolist()
    dpm = {k: v for k, v in SD.items() if k != "set_alpha_to_one"}
    to_zero = ConsistencySolverScheduler.from_config(DPMSolverMultistepScheduler(**dpm, final_sigmas_type="zero").config)
    to_zero.set_timesteps(3)
    assert float(to_zero.grid.n[-1]) == 0.0
    to_first = ConsistencySolverScheduler.from_config(DPMSolverMultistepScheduler(**dpm, final_sigmas_type="sigma_min").config)
    to_first.set_timesteps(3)
    assert float(to_first.grid.alpha[-1] ** 2) == pytest.approx(float(to_first.alphas_cumprod[0]))


@pytest.mark.parametrize("key, value", [("use_karras_sigmas", True), ("clip_sample", True), ("thresholding", True),
                                        ("timestep_type", "continuous"), ("mystery_knob", 3),
                                        ("final_sigmas_type", "sigma_max")])
def test_a_config_key_that_cannot_be_honoured_is_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        ConsistencySolverScheduler.from_config({**SD, key: value})


def test_save_then_from_pretrained_local_folder(tmp_path):
    scheduler = ConsistencySolverScheduler(**SD, policy=perturbed())
    scheduler.save_pretrained(tmp_path / "s")
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path / "s")
    scheduler.set_timesteps(4)
    loaded.set_timesteps(4)
    assert torch.equal(loaded.table, scheduler.table)
    (tmp_path / "s" / "policy.safetensors").unlink()
    with pytest.raises(ValueError, match="no policy"):
        ConsistencySolverScheduler.from_pretrained(tmp_path / "s")


def test_push_to_hub_uploads_the_complete_folder(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    class Repo:
        repo_id = "me/consistency-solver"

    def fake_upload(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False):
        seen["files"] = sorted(os.listdir(working_dir))
        seen["repo_id"] = repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(ConsistencySolverScheduler, "_upload_folder", fake_upload)
    ConsistencySolverScheduler(**SD, policy=perturbed()).save_pretrained(tmp_path / "out", push_to_hub=True,
                                                                         repo_id="me/consistency-solver")
    assert seen == {"files": ["policy.safetensors", "policy_config.json", "scheduler_config.json"],
                    "repo_id": "me/consistency-solver"}


def _cached_repo(hub: Path, repo_id: str, source: Path) -> None:
    """Lay out ``source``'s files as huggingface_hub's cache holds a downloaded snapshot."""
    folder = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)


def test_from_pretrained_reads_the_hub_cache_offline_and_says_so_when_uncached(tmp_path):
    ConsistencySolverScheduler(**SD, policy=perturbed()).save_pretrained(tmp_path / "src")
    _cached_repo(tmp_path / "hub", "someone/cached-solver", tmp_path / "src")
    script = textwrap.dedent("""
        import sys, torch
        from solver.scheduler import ConsistencySolverScheduler
        from solver.policy import ConsistencyPolicy
        s = ConsistencySolverScheduler.from_pretrained("someone/cached-solver")
        assert torch.equal(s.policy.net[-1].bias, ConsistencyPolicy.load(sys.argv[1]).net[-1].bias)
        try:
            ConsistencySolverScheduler.from_pretrained("someone/never-downloaded")
        except OSError as e:
            print("REFUSED:", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "src")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED:" in out.stdout and "never-downloaded" in out.stdout and "HF_HUB_OFFLINE=1" in out.stdout
    json.loads((tmp_path / "src" / "scheduler_config.json").read_text())  # untouched
