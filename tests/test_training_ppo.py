"""PPO trainer: batched rollouts equal the solver, the PPO bookkeeping avoids paper.md T1-T6, the policy
learns on a small analytic model, checkpoints resume bit-exactly, bad input stops before compute."""

import json

import pytest
import torch

from solver.policy import ConsistencyPolicy
from solver.sampling import sample_lmm
from tests.training_fakes import GaussianDenoiser
from training.config import TrainConfig
from training.dataset import build_dataset, load_dataset
from training.ppo import PPOTrainer, group_advantages, step_log_probs
from training.rewards import RewardWeightsMissing, get_similarity
from training.rollout import lmm_rollouts
from training.train import main, prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    build_dataset(GaussianDenoiser(), [f"scene {i}" for i in range(4)], [0, 1], root / "ds",
                  prompt_file_sha256="0" * 64, reference_steps=20, shard_size=8, progress=False)
    return root / "ds"


def _config(dataset_dir, tmp_path, **kw):
    base = dict(dataset=str(dataset_dir), out=str(tmp_path / "out"), store="", group_size=4, groups_per_update=2,
                min_steps=3, max_steps=4, num_updates=2, checkpoint_every=100, learning_rate=3e-3, reward="psnr")
    base.update(kw)
    return TrainConfig(**base)


def _trainer(dataset_dir, tmp_path, model=None, **kw):
    model = model or GaussianDenoiser()
    return PPOTrainer(_config(dataset_dir, tmp_path, **kw), model, load_dataset(dataset_dir), get_similarity("psnr"),
                      progress=False)


def test_batched_rollouts_equal_the_solver_table_by_table():
    model = GaussianDenoiser()
    policy = ConsistencyPolicy(order=4, init_log_std=-1.0)
    grid = model.schedule.grid(5)
    gen = torch.Generator().manual_seed(0)
    tables = torch.stack([policy.sample_table(grid, gen)[0] for _ in range(3)])
    noise = torch.randn(3, 3, 12, 12, generator=gen)
    cond = model.encode_prompts(["a", "b", "c"])
    eps_fn = lambda x, t: model.guided_eps(x, t, cond, 2.0)  # noqa: E731
    batched = lmm_rollouts(eps_fn, noise, grid, tables)
    for r in range(3):
        one = sample_lmm(lambda x, t: model.guided_eps(x, t, cond.select([r]), 2.0), noise[r : r + 1], grid, tables[r])
        assert torch.allclose(batched[r : r + 1], one, atol=1e-5)
    # groups sharing x_T: the identical first steps are evaluated once per group, with the same result
    same = cond.select([0, 0, 0])
    batch_sizes = []

    def eps_grouped(x, t, index=None):
        batch_sizes.append(x.shape[0])
        return model.guided_eps(x, t, same if index is None else same.select(index), 2.0)

    grouped = lmm_rollouts(eps_grouped, noise[:1].repeat(3, 1, 1, 1), grid, tables, group_size=3)
    assert batch_sizes == [1, 1, 3, 3, 3]  # steps 0 and 1 (no free coefficient yet) once per group
    ungrouped = lmm_rollouts(lambda x, t: model.guided_eps(x, t, same, 2.0), noise[:1].repeat(3, 1, 1, 1), grid, tables)
    assert torch.allclose(grouped, ungrouped, atol=1e-6)
    # the per-sample-timestep path (learned time grid) gives the same result on equal grids
    per_sample = lmm_rollouts(lambda x, t: model.guided_eps(x, t, cond, 2.0), noise, [grid] * 3, tables)
    assert torch.allclose(per_sample, batched, atol=1e-5)
    with pytest.raises(ValueError, match="one per row"):
        model.guided_eps(noise, torch.zeros(2), cond, 2.0)  # 2 timesteps for 3 rows
    with pytest.raises(ValueError, match="epsilons available"):
        lmm_rollouts(eps_fn, noise, grid, torch.ones(3, 5, 4, dtype=torch.float64))


def test_group_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4, 1e-6)
    assert torch.allclose(a[:4].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(a[:4].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(a[4:], torch.zeros(4))  # a group with one reward gives no signal, not a NaN


def test_one_update_ratio_starts_at_one_clip_binds_unused_dims_ignored(dataset_dir, tmp_path):
    trainer = _trainer(dataset_dir, tmp_path, update_epochs=4, learning_rate=3e-2)
    bucket = trainer.rollout(4, torch.tensor([0, 3]), update=0)
    assert bucket.actions.shape == (8, 4, 3) and torch.isfinite(bucket.rewards).all()
    before = step_log_probs(trainer.policy, bucket, torch.arange(8), trainer.model.schedule)
    assert torch.equal(before[:, 0], torch.zeros(8))  # step 0 uses one epsilon: no action, no log-prob
    # coefficients a step cannot use do not enter its log-prob (paper.md T2)
    poked = bucket.actions.clone()
    poked[:, 0, :] += 5.0
    poked[:, 1, 1:] += 5.0
    bucket_poked = type(bucket)(**{**bucket.__dict__, "actions": poked})
    assert torch.equal(step_log_probs(trainer.policy, bucket_poked, torch.arange(8), trainer.model.schedule), before)
    stats = trainer.optimise([bucket], update=0)
    assert torch.equal(bucket.old_log_prob, before)  # old log-probs: the same fp32 computation (T6)
    assert stats["epochs"] == 4 and stats["clip_frac_last_epoch"] > 0  # the clip binds after the first epoch (T1)
    assert stats["approx_kl"] > 0


def test_ppo_improves_the_deterministic_policy_on_a_small_run(dataset_dir, tmp_path):
    trainer = _trainer(dataset_dir, tmp_path, num_updates=20, group_size=8, learning_rate=1e-2)
    rows = torch.arange(8)
    before = trainer.deterministic_reward(rows, [3, 4])
    for u in range(20):
        trainer.train_step(u)
    after = trainer.deterministic_reward(rows, [3, 4])
    assert after["3"] > before["3"] + 1.0 and after["4"] > before["4"] + 1.0, (before, after)


def test_checkpoints_resume_bit_exactly_and_log_to_the_store(dataset_dir, tmp_path):
    from store import open_store

    straight = _trainer(dataset_dir, tmp_path / "a", num_updates=3, checkpoint_every=1)
    straight.train()
    store = open_store(tmp_path / "db.sqlite")
    first = PPOTrainer(_config(dataset_dir, tmp_path / "b", num_updates=2, checkpoint_every=1), GaussianDenoiser(),
                       load_dataset(dataset_dir), get_similarity("psnr"), store=store, progress=False)
    first.train()
    resumed = PPOTrainer(_config(dataset_dir, tmp_path / "b", num_updates=3, checkpoint_every=1, activate=True),
                         GaussianDenoiser(), load_dataset(dataset_dir), get_similarity("psnr"), store=store, progress=False)
    resumed.train()
    for k, v in straight.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k]), k
    saved = json.loads((tmp_path / "b" / "out" / "final" / "train_config.json").read_text())
    assert saved["values"]["num_updates"] == 3 and "clipped surrogate" in saved["docs"]["update_epochs"]
    assert ConsistencyPolicy.load(tmp_path / "b" / "out" / "final").order == 4
    runs = store.list_training_runs()
    assert [r.state for r in runs] == ["done", "done"]
    logged = [m.metrics for r in runs for m in store.training_metrics(r.id)]
    assert sorted(m["update"] for m in logged) == [0, 1, 2]
    assert {"reward_mean", "reward_std", "approx_kl", "clip_frac", "entropy", "coefficient_tables"} <= set(logged[0])
    active = store.get_active_checkpoint()
    assert active is not None and active.name.endswith("-u00003") and active.config["order"] == 4


def test_bad_input_is_refused_before_any_model_call(dataset_dir, tmp_path):
    for kw, field in [(dict(min_steps=0), "min_steps"), (dict(min_steps=1), "no free coefficient"), (dict(max_steps=51), "max_steps"),
                      (dict(update_epochs=1), "update_epochs"), (dict(group_size=1), "group_size"),
                      (dict(learning_rate=float("inf")), "learning_rate"), (dict(clip_coef=True), "clip_coef")]:
        with pytest.raises(ValueError, match=field):
            _config(dataset_dir, tmp_path, **kw).validate()
    model = GaussianDenoiser(model_id="another-model")
    with pytest.raises(ValueError, match="built with model 'fake-gaussian'"):
        prepare(_config(dataset_dir, tmp_path), model=model)
    model = GaussianDenoiser()
    with pytest.raises(RewardWeightsMissing, match="depth"):
        prepare(_config(dataset_dir, tmp_path, reward="depth", reward_weights={"depth": str(tmp_path / "none")}), model=model)
    with pytest.raises(ValueError, match="reward: readings .* 'fake-gaussian' is not the embedded model"):
        prepare(_config(dataset_dir, tmp_path, reward="psnr+3*readings"), model=model)
    ConsistencyPolicy(order=2).save(tmp_path / "order2")
    with pytest.raises(ValueError, match="order 4 was asked for"):
        prepare(_config(dataset_dir, tmp_path, init_from=str(tmp_path / "order2")), model=model)
    cfg = json.loads((tmp_path / "order2" / "policy_config.json").read_text())
    (tmp_path / "order2" / "policy_config.json").write_text(json.dumps(dict(cfg, schema_version=99)))
    with pytest.raises(ValueError, match="schema_version"):
        prepare(_config(dataset_dir, tmp_path, order=2, init_from=str(tmp_path / "order2")), model=model)
    assert model.calls == 0


def test_command_line_trains_and_writes_a_checkpoint(dataset_dir, tmp_path, capsys):
    rc = main(["--dataset", str(dataset_dir), "--out", str(tmp_path / "cli"), "--db", "", "--num-updates", "1",
               "--group-size", "2", "--groups-per-update", "2", "--min-steps", "3", "--max-steps", "3",
               "--reward", "psnr+10*gms", "--seed", "3"], model=GaussianDenoiser())
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["update"] == 0 and (tmp_path / "cli" / "final" / "policy.safetensors").is_file()


def test_learned_time_grid_rollouts_and_update(dataset_dir, tmp_path):
    trainer = _trainer(dataset_dir, tmp_path, time_grid=True, init_log_std=-1.0)
    bucket = trainer.rollout(4, torch.tensor([1]), update=0)
    assert bucket.grid_actions.shape == (4, 4)
    assert len({tuple(g.timesteps.tolist()) for g in bucket.grids}) > 1  # each rollout its own grid
    before = [p.detach().clone() for p in trainer.policy.grid_net.parameters()]
    stats = trainer.optimise([bucket], update=0)
    assert stats["epochs"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.grid_net.parameters()))


def test_tables_only_trains_the_own_tables_of_its_steps_and_leaves_every_other_k_exact(dataset_dir, tmp_path):
    """``tables_only`` adds K = 4's own table to a policy that has K = 3's, trains that table alone at the
    exploration noise ``explore_log_std`` sets, and leaves K = 3's coefficients, grid, the shared heads and the
    noise bit-exact; a checkpoint of such a run resumes."""
    start = ConsistencyPolicy(order=4, time_grid=True, start=True, step_tables=(3,))
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    start.save(tmp_path / "start")
    trainer = _trainer(dataset_dir, tmp_path, min_steps=4, max_steps=4, time_grid=True, tables_only=True,
                       explore_log_std=-1.5, learning_rate=3e-2, init_from=str(tmp_path / "start"))
    policy, schedule = trainer.policy, trainer.model.schedule
    assert policy.step_tables == (3, 4) and torch.equal(policy.log_std, torch.full((3,), -1.5))
    assert float(policy.grid_log_std) == -1.5
    fixed = {k: v.clone() for k, v in policy.state_dict().items()}
    k3 = policy.coefficient_table(policy.time_grid(schedule, 3)), policy.time_grid(schedule, 3).timesteps
    assert torch.equal(policy.coefficient_table(policy.time_grid(schedule, 4)),  # the new table starts at zero
                       start.coefficient_table(start.time_grid(schedule, 4)))
    for u in range(2):
        trainer.train_step(u)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, fixed[k])}
    assert changed and changed <= {"own_residual.4", "own_grid.4", "own_start.4"}, changed
    # the frozen parameters take no gradient, so the gradient-norm clip is over the trained tables alone (PPO's
    # actions do not move the start, so its own shift takes none either)
    assert {n for n, p in policy.named_parameters() if p.grad is not None} == {"own_residual.4", "own_grid.4"}
    assert torch.equal(policy.coefficient_table(policy.time_grid(schedule, 3)), k3[0])
    assert torch.equal(policy.time_grid(schedule, 3).timesteps, k3[1])
    trainer.save(tmp_path / "out" / "checkpoint-00002", {})
    again = _trainer(dataset_dir, tmp_path, min_steps=4, max_steps=4, time_grid=True, tables_only=True,
                     explore_log_std=-1.5, learning_rate=3e-2, init_from=str(tmp_path / "start"))
    again.resume(tmp_path / "out" / "checkpoint-00002")
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in again.policy.state_dict().items())
    with pytest.raises(ValueError, match="explore_log_std"):
        _config(dataset_dir, tmp_path, explore_log_std=float("nan")).validate()


def test_resume_refuses_a_checkpoint_of_another_order(dataset_dir, tmp_path):
    _trainer(dataset_dir, tmp_path, num_updates=1, checkpoint_every=1).train()
    model = GaussianDenoiser()
    other = PPOTrainer(_config(dataset_dir, tmp_path, num_updates=2, order=3), model, load_dataset(dataset_dir),
                       get_similarity("psnr"), progress=False)
    with pytest.raises(ValueError, match="order 3 was asked for"):
        other.train()
    assert model.calls == 0


def test_recipe_installs_the_best_scoring_checkpoint_not_the_last(dataset_dir, tmp_path):
    from training.recipe import select_checkpoint

    trainer = _trainer(dataset_dir, tmp_path, base="dpm2m")
    out = tmp_path / "out"
    trainer.save(out / "checkpoint-00010", {})  # zero-init: the dpm2m rule itself
    with torch.no_grad():  # a wrecked policy: huge coefficient residuals
        for p in trainer.policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 3.0)
    trainer.save(out / "checkpoint-00020", {})
    trainer.save(out / "final", {})
    wrecked = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    best, scores = select_checkpoint(trainer, out, rows=4)
    assert best == out / "checkpoint-00010" and set(scores) == {"checkpoint-00010", "checkpoint-00020", "final"}
    assert scores["checkpoint-00010"] > scores["final"] == scores["checkpoint-00020"]
    for k, v in trainer.policy.state_dict().items():  # the trainer's own policy is left as it was
        assert torch.equal(v, wrecked[k])


def test_recipe_selection_keeps_to_its_deadline(dataset_dir, tmp_path):
    """Past the deadline only the first candidate (the distilled policy, else ``final``) is scored; the rest are
    left unscored, so a loaded machine cannot stretch the recipe past its budget."""
    import time

    from training.recipe import select_checkpoint

    trainer = _trainer(dataset_dir, tmp_path, base="dpm2m")
    out = tmp_path / "out"
    for name in ("checkpoint-00010", "checkpoint-00020", "final"):
        trainer.save(out / name, {})
    trainer.save(tmp_path / "distill" / "final", {})
    extra = [tmp_path / "distill" / "final"]
    best, scores = select_checkpoint(trainer, out, rows=2, extra=extra, deadline=time.perf_counter() - 1.0)
    assert list(scores) == ["distill/final"] and best == extra[0]
    _, scores = select_checkpoint(trainer, out, rows=2, extra=extra, deadline=time.perf_counter() + 600)
    assert list(scores) == ["distill/final", "final", "checkpoint-00020", "checkpoint-00010"]


def test_ppo_stops_before_an_update_that_would_end_past_max_minutes(dataset_dir, tmp_path, monkeypatch):
    """With updates of 0.4 s and a 0.6 s budget, the second update (ending near 0.8 s) is not started."""
    import time

    trainer = _trainer(dataset_dir, tmp_path, num_updates=5, max_minutes=0.6 / 60)
    trainer.initial_reward = {}  # no evaluation before training: the budget is the updates' alone here
    step = trainer.train_step

    def slow(update):
        time.sleep(0.4)
        return step(update)

    monkeypatch.setattr(trainer, "train_step", slow)
    trainer.train()
    assert trainer.update == 1
