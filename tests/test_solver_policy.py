"""ConsistencyPolicy: zero-init = base rule, determinism, masking of unused dims, checkpoints."""

import json

import pytest
import torch
from diffusers import DDIMScheduler

from solver.coefficients import RULES, pad_table
from solver.policy import CONFIG_NAME, ConsistencyPolicy, free_mask
from solver.sampling import iter_lmm, sample_lmm
from solver.schedules import FlowSchedule, VPSchedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False}


@pytest.fixture(scope="module")
def schedule() -> VPSchedule:
    return VPSchedule.from_config(DDIMScheduler(**SD).config)


def perturbed(policy: ConsistencyPolicy, seed: int = 0) -> ConsistencyPolicy:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return policy


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A per-sample nonlinear stand-in for a model (elementwise, so batch-free by construction)."""
    return torch.tanh(x) * (0.5 + float(t) / 2000.0)


@pytest.mark.parametrize("base", ["dpm2m", "ab2", "ab3", "ddim"])
@pytest.mark.parametrize("num_steps", [1, 4, 8])
def test_zero_initialized_policy_is_exactly_its_base_rule(schedule, base, num_steps):
    policy = ConsistencyPolicy(order=4, base=base)
    grid = schedule.grid(num_steps)
    assert torch.equal(policy.coefficient_table(grid), pad_table(RULES[base](grid), 4))


def test_trained_rows_keep_sum_one_and_only_free_dims(schedule):
    policy = perturbed(ConsistencyPolicy(order=4))
    grid = schedule.grid(6)
    table = policy.coefficient_table(grid)
    assert torch.allclose(table.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-6)
    assert table[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # one epsilon available: DDIM whatever the policy
    for i in range(6):
        assert not table[i, i + 1 :].any()
    assert not torch.equal(table, policy.base_table(grid))


def test_deterministic_table_is_bit_identical_across_calls_and_instances(schedule, tmp_path):
    policy = perturbed(ConsistencyPolicy(order=4))
    grid = schedule.grid(5)
    first = policy.coefficient_table(grid)
    policy._cache.clear()
    assert torch.equal(first, policy.coefficient_table(grid))
    assert torch.equal(first, policy.coefficient_table(schedule.grid(5)))
    policy.save(tmp_path)
    assert torch.equal(first, ConsistencyPolicy.load(tmp_path).coefficient_table(grid))


def test_cached_table_follows_parameter_updates(schedule):
    policy = ConsistencyPolicy(order=3)
    grid = schedule.grid(5)
    before = policy.coefficient_table(grid)
    with torch.no_grad():
        policy.net[-1].bias.add_(0.25)
    assert not torch.equal(before, policy.coefficient_table(grid))


def test_samples_are_independent_of_batch_size_and_order(schedule):
    policy = perturbed(ConsistencyPolicy(order=4))
    grid = schedule.grid(6)
    table = policy.coefficient_table(grid)
    noise = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = sample_lmm(toy_eps, noise, grid, table)
    alone = torch.cat([sample_lmm(toy_eps, noise[i : i + 1], grid, policy.coefficient_table(grid)) for i in range(5)])
    order = torch.tensor([3, 0, 4, 1, 2])
    shuffled = sample_lmm(toy_eps, noise[order], grid, policy.coefficient_table(grid))
    assert torch.equal(batch, alone)
    assert torch.equal(batch[order], shuffled)
    denoised = [r.denoised for r in iter_lmm(toy_eps, noise, grid, table)]
    assert len(denoised) == 6 and torch.equal(batch, sample_lmm(toy_eps, noise, grid, table))


def test_sampled_tables_log_prob_and_entropy_use_only_free_dims(schedule):
    policy = perturbed(ConsistencyPolicy(order=4, init_log_std=-1.0))
    grid = schedule.grid(5)
    table, actions, log_prob = policy.sample_table(grid, torch.Generator().manual_seed(0))
    mask = free_mask(5, 4)
    assert torch.equal(actions * ~mask, torch.zeros_like(actions))
    assert actions[mask].abs().min() > 0
    assert torch.allclose(table.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(table, policy.compose(grid, actions))
    assert log_prob.shape == (5,) and log_prob[0] == 0
    assert torch.allclose(policy.log_prob(grid, actions), log_prob)
    again = policy.sample_table(grid, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], actions)
    # Step 1 has one free dim: its log-prob and entropy carry no gradient into the other dims' std (T2, T3).
    policy.zero_grad()
    (policy.log_prob(grid, actions)[1] + policy.entropy(grid)[1]).backward()
    assert policy.log_std.grad[0] != 0 and torch.equal(policy.log_std.grad[1:], torch.zeros(2))
    entropy = policy.entropy(grid)
    per_dim = 0.5 + 0.5 * torch.log(torch.tensor(2 * torch.pi)) + policy.log_std.detach()
    assert torch.allclose(entropy, torch.stack([per_dim[:k].sum() for k in [0, 1, 2, 3, 3]]))


def test_mean_table_is_differentiable(schedule):
    policy = ConsistencyPolicy(order=4)
    grid = schedule.grid(4)
    policy.mean_table(grid)[2, 0].backward()
    assert policy.net[-1].bias.grad.abs().sum() > 0


@pytest.mark.parametrize("order", [0, 9, 2.5, True])
def test_order_outside_1_to_8_is_refused(order):
    with pytest.raises(ValueError, match="order"):
        ConsistencyPolicy(order=order)


def test_bad_base_and_features_are_refused():
    with pytest.raises(ValueError, match="base"):
        ConsistencyPolicy(base="plms")
    with pytest.raises(ValueError, match="order 1 is too small for base 'dpm2m'"):
        ConsistencyPolicy(order=1)
    with pytest.raises(ValueError, match="features"):
        ConsistencyPolicy(features=("lam_cur", "snr"))
    assert ConsistencyPolicy(order=1, base="ddim").coefficient_table(VPSchedule.from_config(SD).grid(3)).shape == (3, 1)
    assert ConsistencyPolicy(order=8, base="ab4").coefficient_table(VPSchedule.from_config(SD).grid(9)).shape == (9, 8)


def test_checkpoint_round_trip_and_clear_errors(tmp_path, schedule):
    policy = perturbed(ConsistencyPolicy(order=3, base="ab2", hidden=16, time_grid=True))
    policy.save(tmp_path)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))
    loaded = ConsistencyPolicy.load(tmp_path, order=3)
    assert loaded.config_dict() == policy.config_dict()
    for (k, v), (k2, v2) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="order 4 was asked for .* order 3"):
        ConsistencyPolicy.load(tmp_path, order=4)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version"):
        ConsistencyPolicy.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "hidden": 8}))
    with pytest.raises(ValueError, match="do not match"):
        ConsistencyPolicy.load(tmp_path)
    with pytest.raises(ValueError, match="no policy checkpoint"):
        ConsistencyPolicy.load(tmp_path / "missing")


def test_time_grid_head_zero_init_is_the_default_grid_and_stays_valid(schedule):
    assert torch.equal(ConsistencyPolicy().time_grid(schedule, 6).timesteps, schedule.grid(6).timesteps)
    policy = ConsistencyPolicy(time_grid=True)
    for k in (1, 3, 6, 11):
        grid = policy.time_grid(schedule, k)
        default = schedule.grid(k)
        assert torch.equal(grid.timesteps, default.timesteps) and torch.equal(grid.n, default.n)
    with torch.no_grad():
        torch.nn.init.normal_(policy.grid_net[-1].weight, std=2.0, generator=torch.Generator().manual_seed(1))
    for k in (3, 6, 11, 500, 1000):
        grid = policy.time_grid(schedule, k)
        ts = grid.timesteps
        assert ts.dtype == torch.long and ts[0] == 999 and ts[-1] >= 0 and bool((ts[1:] < ts[:-1]).all())
        assert torch.allclose(grid.alpha[:-1] ** 2, schedule.alphas_cumprod[ts])
    moved = policy.time_grid(schedule, 6)
    assert not torch.equal(moved.timesteps, schedule.grid(6).timesteps)
    sampled, actions, log_prob = policy.sample_time_grid(schedule, 6, torch.Generator().manual_seed(0))
    assert torch.allclose(policy.time_grid_log_prob(schedule, 6, actions), log_prob)
    table = policy.coefficient_table(moved)
    assert table.shape == (6, 4)
    flow = FlowSchedule(shift=3.0)
    fgrid = policy.time_grid(flow, 5)
    assert bool((fgrid.timesteps[1:] < fgrid.timesteps[:-1]).all()) and fgrid.timesteps[0] == flow.timesteps(5)[0]
    with pytest.raises(ValueError, match="time_grid"):
        ConsistencyPolicy().sample_time_grid(schedule, 4)


def test_relaxed_time_grid_is_differentiable_and_rounds_to_the_sampling_grid(schedule):
    policy = ConsistencyPolicy(time_grid=True)
    relaxed, default = policy.relaxed_time_grid(schedule, 5), schedule.grid(5)
    assert relaxed.timesteps.is_floating_point()
    assert torch.equal(relaxed.timesteps, default.timesteps.to(torch.float64))
    assert torch.allclose(relaxed.alpha, default.alpha, rtol=1e-12) and torch.allclose(relaxed.sigma, default.sigma, rtol=1e-12)
    with torch.no_grad():
        torch.nn.init.normal_(policy.grid_net[-1].weight, std=1.0, generator=torch.Generator().manual_seed(2))
    relaxed = policy.relaxed_time_grid(schedule, 5)
    assert not torch.equal(relaxed.timesteps, torch.round(relaxed.timesteps))  # real-valued, not rounded
    assert torch.equal(torch.round(relaxed.timesteps).long(), policy.time_grid(schedule, 5).timesteps)
    # the loss reaches the grid head through n (alpha, sigma) of the real-valued timesteps
    (relaxed.n[1:-1].sum() + policy.mean_table(relaxed).sum()).backward()
    assert policy.grid_net[-1].weight.grad is not None and policy.grid_net[-1].weight.grad.abs().sum() > 0
    assert torch.equal(ConsistencyPolicy().relaxed_time_grid(schedule, 4).timesteps, schedule.grid(4).timesteps)


def test_continuous_alpha_sigma_interpolates_log_abar_and_refuses_t_outside_the_schedule(schedule):
    t = torch.tensor([0.0, 17.0, 999.0], dtype=torch.float64)
    a, s = schedule.alpha_sigma_continuous(t)
    a0, s0 = schedule.alpha_sigma(t.long())
    assert torch.allclose(a, a0, rtol=1e-12) and torch.allclose(s, s0, rtol=1e-12)
    mid, _ = schedule.alpha_sigma_continuous(torch.tensor(17.25, dtype=torch.float64))
    lo, hi = schedule.alphas_cumprod[17].log(), schedule.alphas_cumprod[18].log()
    assert torch.allclose(mid**2, torch.exp(0.75 * lo + 0.25 * hi), rtol=1e-12)
    for bad in (-0.5, 999.5):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
            schedule.alpha_sigma_continuous(torch.tensor(bad, dtype=torch.float64))


# Learned start (the first timestep may lie below T) -------------------------------------------------


def test_start_head_zero_init_is_the_default_grid_and_moves_t0_below_T(schedule, tmp_path):
    policy = ConsistencyPolicy(time_grid=True, start=True, final="first")
    for k in (1, 3, 4, 8):
        grid, default = policy.time_grid(schedule, k), schedule.grid(k, final="first")
        assert torch.equal(grid.timesteps, default.timesteps) and torch.equal(grid.n, default.n)
    with torch.no_grad():
        policy.start_net[-1].bias.fill_(2.5)  # t_0 = 999 - 250
    grid = policy.time_grid(schedule, 4)
    ts = grid.timesteps
    assert int(ts[0]) == 749 and ts.dtype == torch.long and bool((ts[1:] < ts[:-1]).all()) and int(ts[-1]) >= 0
    assert torch.allclose(grid.alpha[:-1] ** 2, schedule.alphas_cumprod[ts])
    assert float(grid.n[-1]) == pytest.approx(float(schedule.grid(4, final="first").n[-1]))
    relaxed = policy.relaxed_time_grid(schedule, 4)
    assert torch.equal(torch.round(relaxed.timesteps).long(), ts)
    relaxed.n[0].backward()  # d n_0 / d start head: the start is learned through the relaxed grid
    assert float(policy.start_net[-1].bias.grad.abs()) > 0
    sampled, _, _ = policy.sample_time_grid(schedule, 4, torch.Generator().manual_seed(0))
    assert int(sampled.timesteps[0]) == 749  # rollouts keep the deterministic start
    with torch.no_grad():
        policy.start_net[-1].bias.fill_(-5.0)  # above T: held at T - 1
    assert int(policy.time_grid(schedule, 4).timesteps[0]) == 999
    policy.save(tmp_path)
    loaded = ConsistencyPolicy.load(tmp_path)
    assert loaded.learn_start and loaded.final == "first"
    assert torch.equal(loaded.time_grid(schedule, 4).timesteps, policy.time_grid(schedule, 4).timesteps)
    with pytest.raises(ValueError, match="time_grid"):
        ConsistencyPolicy(start=True)
    with pytest.raises(ValueError, match="final"):
        ConsistencyPolicy(final="sigma_min")


def test_sampling_from_a_start_below_T_is_diffusers_leading_spacing(schedule):
    """With t_0 below T the initial noise is x at t_0, as diffusers' leading spacing takes it
    (init_noise_sigma = 1): the policy at DDIM's table and the leading grid equals DDIMScheduler(leading)."""
    from solver.policy import grid_actions_for, reweight_grid

    sd = VPSchedule.from_config(DDIMScheduler(**SD).config)
    policy = ConsistencyPolicy(base="ddim", time_grid=True, start=True)
    default = policy.default_grid(sd, 4)
    g, u = grid_actions_for(sd, default, torch.tensor([750, 500, 250, 0]), with_start=True)
    grid = reweight_grid(sd, default, g, start=u)
    assert grid.timesteps.tolist() == [750, 500, 250, 0]
    ddim = DDIMScheduler(**SD, timestep_spacing="leading", clip_sample=False)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    from solver.sampling import iter_diffusers

    theirs = list(iter_diffusers(toy_eps, noise, ddim, 4))[-1].x
    grid_end = reweight_grid(sd, sd.grid(4, final="config"), g, start=u)  # DDIM ends at final_alpha_cumprod
    ours = sample_lmm(toy_eps, noise, grid_end, RULES["ddim"](grid_end))
    assert float((ours - theirs).abs().max()) < 1e-5


def test_own_tables_move_only_their_step_count_and_survive_a_checkpoint(schedule, tmp_path):
    """step_tables [4]: zero, the policy is the shared heads everywhere; set, K = 4's coefficients, grid and start
    move and K = 3 and 5 stay bit for bit; a checkpoint keeps them, and a checkpoint without them still loads."""
    torch.manual_seed(0)
    shared = perturbed(ConsistencyPolicy(order=4, time_grid=True, start=True, final="first"))
    with torch.no_grad():  # start at t = 799 whatever the perturbation, so 100 steps lower is not clamped
        shared.start_net[-1].weight.zero_()
        shared.start_net[-1].bias.fill_(2.0)
    own = ConsistencyPolicy(order=4, time_grid=True, start=True, final="first", step_tables=[4])
    own.load_state_dict(shared.state_dict(), strict=False)

    def sampled(policy, k):
        grid = policy.time_grid(schedule, k)
        return grid.timesteps, policy.coefficient_table(grid)

    for k in (3, 4, 5):
        assert all(torch.equal(a, b) for a, b in zip(sampled(own, k), sampled(shared, k)))
    with torch.no_grad():
        own.own_table("residual", 4).fill_(0.05)
        own.own_table("grid", 4).copy_(torch.tensor([0.0, 0.5, 0.0, -0.5]))
        own.own_table("start", 4).fill_(1.0)  # 100 train steps lower
    (ts, _), (shared_ts, _) = sampled(own, 4), sampled(shared, 4)
    assert int(ts[0]) == int(shared_ts[0]) - 100 and not torch.equal(ts[1:], shared_ts[1:])
    on_one_grid = shared.time_grid(schedule, 4)  # the residual moves K = 4's coefficients on any grid
    assert float((own.coefficient_table(on_one_grid) - shared.coefficient_table(on_one_grid)).abs().max()) > 0.04
    for k in (3, 5):
        assert all(torch.equal(a, b) for a, b in zip(sampled(own, k), sampled(shared, k)))
    own.save(tmp_path / "own")
    assert json.loads((tmp_path / "own" / CONFIG_NAME).read_text())["step_tables"] == [4]
    loaded = ConsistencyPolicy.load(tmp_path / "own")
    assert all(torch.equal(a, b) for a, b in zip(sampled(loaded, 4), sampled(own, 4)))
    shared.save(tmp_path / "shared")
    assert "step_tables" not in json.loads((tmp_path / "shared" / CONFIG_NAME).read_text())
    assert ConsistencyPolicy.load(tmp_path / "shared").step_tables == ()
    for bad in ([0], [-3], [4, 4], [True], ["4"]):
        with pytest.raises(ValueError, match="step_tables"):
            ConsistencyPolicy(order=4, step_tables=bad)
