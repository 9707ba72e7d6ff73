"""Ours-Distill: gradients reach the coefficients through the unrolled sampler and the model's epsilon."""

import re

import pytest
import torch

from tests.training_fakes import GaussianDenoiser
from training.dataset import build_dataset, load_dataset
from training.distill import DistillConfig, differentiable_guided_eps, distill, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_differentiable_eps_matches_guided_eps_and_carries_gradient():
    model = GaussianDenoiser()
    cond = model.encode_prompts(["a", "b"])
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    eps = differentiable_guided_eps(model, x, torch.tensor(500), cond, 2.0)
    assert torch.allclose(eps, model.guided_eps(x.detach(), torch.tensor(500), cond, 2.0), atol=1e-6)
    eps.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_distillation_improves_the_preview(tmp_path):
    model = GaussianDenoiser()
    build_dataset(model, [f"s{i}" for i in range(4)], [0, 1], tmp_path / "ds", prompt_file_sha256="0" * 64,
                  reference_steps=20, progress=False)
    ds = load_dataset(tmp_path / "ds")
    policy, log, fit = distill(DistillConfig(dataset=str(tmp_path / "ds"), num_updates=30, min_steps=3, max_steps=3,
                                             learning_rate=3e-3, method="policy"), model, ds, progress=False)
    assert fit is None
    first, last = log[0]["psnr_latent"], sum(r["psnr_latent"] for r in log[-5:]) / 5
    assert last > first + 1.0, (first, last)
    with pytest.raises(ValueError, match="max_steps"):
        DistillConfig(dataset="x", max_steps=51).validate()
    rc = main(["--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--num-updates", "1"], model=model)
    assert rc == 0 and (tmp_path / "out" / "final" / "policy.safetensors").is_file()


def test_distillation_learns_the_time_grid_through_real_valued_timesteps(tmp_path):
    """Method 'tables': per-K coefficients and grid weights, then the policy's heads regressed onto them."""
    from training.rollout import lmm_rollouts

    model = GaussianDenoiser()
    build_dataset(model, [f"s{i}" for i in range(4)], [0, 1], tmp_path / "ds", prompt_file_sha256="0" * 64,
                  reference_steps=20, progress=False)
    ds = load_dataset(tmp_path / "ds")
    cfg = DistillConfig(dataset=str(tmp_path / "ds"), num_updates=40, min_steps=3, max_steps=4, learning_rate=3e-3,
                        base="ddim", time_grid=True, fit_iterations=1500)
    policy, log, fit = distill(cfg, model, ds, progress=False)
    assert [r["steps"] for r in log[:4]] == [3, 4, 3, 4]  # round robin over K
    assert fit["coef_max_error"] < 0.05 and fit["grid_max_error"] < 0.05, fit
    cond = model.encode_prompts(ds.prompts)

    def preview_psnr(p, k):
        grid = p.time_grid(model.schedule, k)
        table = p.coefficient_table(grid).to(torch.float32).unsqueeze(0).expand(len(ds), -1, -1)
        x = lmm_rollouts(lambda x, t: model.guided_eps(x, t, cond, ds.index.guidance), ds.noise, grid, table)
        return float(-10 * torch.log10((x - ds.target).pow(2).flatten(1).mean(1)).mean())

    from solver.policy import ConsistencyPolicy

    for k in (3, 4):
        grid = policy.time_grid(model.schedule, k)
        assert not torch.equal(grid.timesteps, model.schedule.grid(k).timesteps)  # the grid moved
        assert grid.timesteps.dtype == torch.long and bool((grid.timesteps[1:] < grid.timesteps[:-1]).all())
        base = ConsistencyPolicy(base="ddim", time_grid=True)  # zero heads: DDIM on the default grid
        assert preview_psnr(policy, k) > preview_psnr(base, k) + 1.0


def test_round_robin_repeats_the_named_step_counts(tmp_path):
    model = GaussianDenoiser()
    build_dataset(model, ["s0", "s1"], [0], tmp_path / "ds", prompt_file_sha256="0" * 64, reference_steps=10,
                  progress=False)
    cfg = DistillConfig(dataset=str(tmp_path / "ds"), num_updates=6, min_steps=3, max_steps=4, repeat_steps="4",
                        batch_size=2, fit_iterations=10)
    _, log, _ = distill(cfg, model, load_dataset(tmp_path / "ds"), progress=False)
    assert [r["steps"] for r in log] == [3, 4, 4, 3, 4, 4]
    for name in ("learning_rate", "fit_learning_rate"):
        for bad in (0.0, float("nan"), True):
            with pytest.raises(ValueError, match=name):
                DistillConfig(dataset="x", **{name: bad}).validate()
    for bad in ("5", "4,x"):
        with pytest.raises(ValueError, match="repeat_steps"):
            DistillConfig(dataset="x", min_steps=3, max_steps=4, repeat_steps=bad).validate()


def _without_and_with(tmp_path, term: str, weight, model_id: str | None = None, **settings) -> list:
    """Two 3-update distillations on the same rows and start, the loss term ``term`` at 0 and at ``weight``
    (``settings`` override the other DistillConfig fields of both)."""
    model = GaussianDenoiser()
    if model_id:
        model.model_id = model_id
    build_dataset(model, ["s0", "s1"], [0, 1], tmp_path / "ds", prompt_file_sha256="0" * 64, reference_steps=10,
                  progress=False, pairing="zip")  # each row its own noise: a preview's row is found by its x_T
    ds = load_dataset(tmp_path / "ds")
    fields = dict(dataset=str(tmp_path / "ds"), num_updates=3, min_steps=3, max_steps=3, batch_size=2,
                  fit_iterations=10)
    return [distill(DistillConfig(**{**fields, **settings, term: w}), model, ds, progress=False)
            for w in ("" if isinstance(weight, str) else 0.0, weight)]


def _record_previews(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_T, preview) of every unrolled sampler call distillation makes, in order."""
    import training.distill as distill_module

    calls, real = [], distill_module.lmm_rollouts

    def recorded(eps_fn, x_T, *args, **kwargs):
        x = real(eps_fn, x_T, *args, **kwargs)
        calls.append((x_T.detach().clone(), x.detach().clone()))
        return x

    monkeypatch.setattr(distill_module, "lmm_rollouts", recorded)
    return calls


def _first_preview_and_target(tmp_path, calls) -> tuple[torch.Tensor, torch.Tensor]:
    """The with-term run's first preview (4th call: 3 updates without the term come first) and its targets,
    found by matching its x_T rows to the dataset's noise."""
    ds = load_dataset(tmp_path / "ds")
    x_T, x = calls[3]
    rows = [int((ds.noise - row).flatten(1).abs().sum(1).argmin()) for row in x_T]
    return x, ds.target[rows]


def _term_changes_the_fit(tmp_path, term: str, weight, logged: str, model_id: str | None = None,
                          monkeypatch=None, expected=None) -> dict:
    """``term`` at ``weight`` logs ``logged``, starts from the same rows and point as without it, and fits
    another table; returns its first update's log entry. Each bad value of ``term`` is refused. With
    ``expected(preview, target)``, the logged value of the term on the first update must equal it."""
    calls = _record_previews(monkeypatch) if expected is not None else []
    (_, plain, plain_fit), (_, with_term, fit) = _without_and_with(tmp_path, term, weight, model_id)
    assert logged not in plain[0] and logged in with_term[0]
    if expected is not None:  # the term's value on this update's actual preview, from its definition
        x, target = _first_preview_and_target(tmp_path, calls)
        mse = (x - target).pow(2).flatten(1).mean(1)
        assert with_term[0]["psnr_latent"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), abs=1e-4)
        assert with_term[0][logged] == pytest.approx(float(expected(x, target)), rel=1e-4, abs=1e-5)
    assert plain[0]["psnr_latent"] == with_term[0]["psnr_latent"]  # same rows and start
    assert plain_fit["tables"]["3"]["residual"] != fit["tables"]["3"]["residual"]  # different gradient
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=term):
            DistillConfig(dataset="x", **{term: bad}).validate()
    return with_term[0]


def test_structure_term_is_the_ssim_of_the_latents_read_as_images_and_changes_the_fit(tmp_path, monkeypatch):
    from training.distill import latent_ssim
    from training.rewards import ssim

    target = torch.rand(3, 3, 16, 16) * 2 - 1
    x = (target + 0.3 * torch.randn_like(target)).requires_grad_(True)
    value = latent_ssim(target, x)
    torch.testing.assert_close(value, ssim((target + 1) / 2, (x.detach() + 1) / 2))
    torch.testing.assert_close(latent_ssim(target, target), torch.ones(3))
    assert bool((value < 0.99).all())
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    from_images = lambda x, t: ssim((t + 1) / 2, (x + 1) / 2).mean()  # noqa: E731
    first = _term_changes_the_fit(tmp_path, "ssim_weight", 2.0, "ssim", monkeypatch=monkeypatch, expected=from_images)
    assert 0 < first["ssim"] < 1


def test_colour_term_is_the_log_mse_of_block_means_and_changes_the_fit(tmp_path, monkeypatch):
    from training.distill import COLOUR_POOL, pooled

    x = torch.randn(2, 3, 16, 16)
    block = x[:, :, :COLOUR_POOL, :COLOUR_POOL].mean((-2, -1))
    torch.testing.assert_close(pooled(x)[:, :, 0, 0], block)
    assert pooled(x).shape == (2, 3, 16 // COLOUR_POOL, 16 // COLOUR_POOL)
    def block_psnr(x, target):  # COLOUR_POOL x COLOUR_POOL block means, written out
        def blocks(v):
            b, c, h, w = v.shape
            h, w = h // COLOUR_POOL * COLOUR_POOL, w // COLOUR_POOL * COLOUR_POOL
            return v[..., :h, :w].reshape(b, c, h // COLOUR_POOL, COLOUR_POOL, w // COLOUR_POOL, COLOUR_POOL).mean((3, 5))

        return (-10 * torch.log10((blocks(x) - blocks(target)).pow(2).flatten(1).mean(1) + 1e-10)).mean()

    first = _term_changes_the_fit(tmp_path, "colour_weight", 1.0, "psnr_colour", monkeypatch=monkeypatch,
                                  expected=block_psnr)
    assert first["psnr_colour"] > first["psnr_latent"]  # block means err less


def test_edge_term_is_the_log_gradient_mse_of_the_latents_read_as_images_and_changes_the_fit(tmp_path, monkeypatch):
    from training.rewards import gradient_mse

    sobel_psnr = lambda x, t: (-10 * torch.log10(gradient_mse((t + 1) / 2, (x + 1) / 2) + 1e-10)).mean()  # noqa: E731
    first = _term_changes_the_fit(tmp_path, "edge_weight", 1.0, "psnr_edges", monkeypatch=monkeypatch,
                                  expected=sobel_psnr)
    assert first["psnr_edges"] > first["psnr_latent"]  # Sobel /8 of a smooth Gaussian target: small gradients


def test_label_term_reads_the_analyzers_colour_names_and_changes_the_fit(tmp_path):
    from models.embedded.analyzer import colour_labels, palette_references
    from models.embedded.scenes import PALETTE
    from training.distill import model_palette, palette_label_ce

    refs, names = (torch.from_numpy(a) for a in palette_references())
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    distances = (((target + 1) / 2).permute(0, 2, 3, 1).unsqueeze(-2) - refs).pow(2).sum(-1)
    assert (names[distances.argmin(-1)][0].numpy() == colour_labels((target[0] + 1) / 2)).mean() > 0.99  # uint8 rounding
    red, blue, orange = (torch.tensor(PALETTE[c], dtype=torch.float32) / 255 * 2 - 1 for c in ("red", "blue", "orange"))
    flat = lambda c: c.view(1, 3, 1, 1).expand(1, 3, 4, 4)  # noqa: E731
    assert float(palette_label_ce(flat(red), flat(red), refs, names)) < 1e-3  # the same name: free
    assert float(palette_label_ce(flat(red), flat(blue), refs, names)) > 10  # another name: dear
    halfway = flat(0.55 * red + 0.45 * orange).clone().requires_grad_(True)  # near the boundary, on red's side
    ce = palette_label_ce(flat(red), halfway, refs, names)
    ce.sum().backward()
    assert 0.1 < float(ce) < 2 and float((halfway.grad * (red - orange).view(1, 3, 1, 1)).sum()) < 0  # pulled to red

    with pytest.raises(ValueError, match="label_weight"):
        model_palette(GaussianDenoiser())
    with pytest.raises(ValueError, match="label_weight"):
        _without_and_with(tmp_path / "fake", "label_weight", 1.0)
    assert _term_changes_the_fit(tmp_path / "embedded", "label_weight", 1.0, "label_ce", "embedded-fake")["label_ce"] > 0


def test_coverage_term_reads_the_main_objects_silhouette_as_the_analyzer_does_and_changes_the_fit(tmp_path):
    from models.embedded.analyzer import analyze, main_region
    from models.embedded.scenes import PALETTE
    from training.distill import main_coverage_mse

    red, blue = (torch.tensor(PALETTE[c], dtype=torch.float32) for c in ("red", "blue"))

    def scene(side: int, holes=()) -> torch.Tensor:  # a red square of ``side`` on blue, latent in [-1, 1]
        img = blue.view(3, 1, 1).expand(3, 32, 32).clone()
        img[:, 4:4 + side, 4:4 + side] = red.view(3, 1, 1)
        for y, x in holes:  # half covered: a rounded corner
            img[:, y, x] = (red + blue) / 2
        return img / 255 * 2 - 1

    small, large = scene(6), scene(20)
    _, area, region = main_region((small + 1) / 2)
    assert region is not None and area == 36 and analyze((small + 1) / 2).main_colour == "red"
    same = main_coverage_mse(torch.stack([small, large]), torch.stack([small, large]))
    assert float(same.abs().max()) < 1e-6  # the target's own coverage: free
    corner = torch.stack([scene(6, [(4, 4)]), scene(20, [(4, 4)])]).requires_grad_(True)  # one corner pixel half lost
    cost = main_coverage_mse(torch.stack([small, large]), corner)
    small_cost, large_cost = (float(c) for c in cost.detach())
    assert large_cost > 0 and small_cost > 5 * large_cost  # the same pixel: dearer on the small object
    cost.sum().backward()
    moved = corner.grad.abs().sum(1)[0].nonzero()
    assert [4, 4] in moved.tolist() and int(moved.max()) <= 4 + 6  # only the object's window, rim included
    flat = torch.zeros(1, 3, 32, 32)  # no object: no cost
    assert float(main_coverage_mse(flat, flat + 0.5)) == 0.0

    with pytest.raises(ValueError, match="coverage_weight"):
        _without_and_with(tmp_path / "fake", "coverage_weight", 1.0)
    with pytest.raises(ValueError, match="coverage_weight"):
        DistillConfig(dataset="x", coverage_weight=-1.0).validate()
    first = _term_changes_the_fit(tmp_path / "embedded", "coverage_weight", 1.0, "coverage_mse", "embedded-fake")
    assert first["coverage_mse"] >= 0 and "label_ce" not in first


def test_label_steps_put_the_label_term_on_the_named_step_counts_only(tmp_path):
    """label_steps '4': K = 4's updates carry the label term and fit another table; K = 3's updates and
    table are those of the run without it."""
    (_, plain, plain_fit), (_, labelled, fit) = _without_and_with(tmp_path, "label_weight", 1.0, "embedded-fake",
                                                                  num_updates=4, max_steps=4, label_steps="4")
    assert [e["steps"] for e in labelled] == [3, 4, 3, 4]
    assert all(("label_ce" in e) == (e["steps"] == 4) for e in labelled) and not any("label_ce" in e for e in plain)
    assert fit["tables"]["3"]["residual"] == plain_fit["tables"]["3"]["residual"]
    assert fit["tables"]["4"]["residual"] != plain_fit["tables"]["4"]["residual"]
    every_k = DistillConfig(dataset="x", label_weight=1.0, max_steps=8).validate()
    assert every_k.labelled_step_counts() == [3, 4, 5, 6, 7, 8]
    assert DistillConfig(dataset="x", label_steps="6", max_steps=8).validate().labelled_step_counts() == []  # weight 0
    for bad in ("7", "x", "2"):
        with pytest.raises(ValueError, match="label_steps"):
            DistillConfig(dataset="x", label_weight=1.0, label_steps=bad).validate()


def test_residual_decay_pulls_the_fitted_coefficients_toward_the_base_rule(tmp_path):
    (_, plain, plain_fit), (_, decayed, decayed_fit) = _without_and_with(tmp_path, "residual_decay", "3:1e4")
    assert plain[0]["psnr_latent"] == decayed[0]["psnr_latent"]  # same rows and start (a = 0: no pull yet)
    norm = lambda fit: float(torch.tensor(fit["tables"]["3"]["residual"]).norm())  # noqa: E731
    assert 0 < norm(decayed_fit) < 0.5 * norm(plain_fit)
    assert DistillConfig(dataset="x", residual_decay="3:3, 5:1").validate().residual_decay_map() == {3: 3.0, 5: 1.0}
    for bad in ("3:-1", "3:nan", "7:1", "3:1,3:2", "3"):
        with pytest.raises(ValueError, match="residual_decay"):
            DistillConfig(dataset="x", residual_decay=bad).validate()


def test_fit_weights_pull_the_regression_toward_the_heavier_step_count():
    from solver.policy import ConsistencyPolicy, free_mask, step_features
    from training.distill import fit_policy

    schedule = GaussianDenoiser().schedule
    gen = torch.Generator().manual_seed(0)
    fitted = {k: (0.5 * torch.randn(k, 3, generator=gen, dtype=torch.float64), None) for k in (3, 6)}

    def errors(weights):
        torch.manual_seed(0)
        policy = ConsistencyPolicy(order=4, base="ddim", hidden=8)
        fit_policy(policy, schedule, fitted, iterations=150, lr=3e-3, weights=weights)
        with torch.no_grad():
            return {k: float(((policy.net(step_features(schedule.grid(k), 4)) - a.float()) * free_mask(k, 4)).abs().mean())
                    for k, (a, _) in fitted.items()}

    favour3, favour6 = errors({3: 1.0, 6: 0.05}), errors({3: 0.05, 6: 1.0})
    assert favour3[3] < favour6[3] and favour6[6] < favour3[6]
    assert DistillConfig(dataset="x", min_steps=3, max_steps=8, fit_weights="7:0.2, 8:0.05").validate().fit_weight_map() \
        == {7: 0.2, 8: 0.05}
    for bad in ("9:1", "7", "7:x", "7:0", "7:1,7:2", "7:nan"):
        with pytest.raises(ValueError, match="fit_weights"):
            DistillConfig(dataset="x", min_steps=3, max_steps=8, fit_weights=bad).validate()


def test_step_tables_hold_their_fitted_table_exactly_and_leave_the_other_k_as_they_were():
    """The regression with step_tables [6]: K = 6's grid, start and coefficients are its fitted table (the
    shared heads alone miss it), and K = 3 is what the regression without own tables gives, bit for bit."""
    from solver.policy import ConsistencyPolicy, reweight_grid
    from training.distill import fit_policy

    schedule = GaussianDenoiser().schedule
    gen = torch.Generator().manual_seed(0)
    fitted = {k: (0.3 * torch.randn(k, 3, generator=gen, dtype=torch.float64),
                  0.5 * torch.randn(k, generator=gen, dtype=torch.float64)) for k in (3, 6)}
    starts = {3: torch.tensor(0.5, dtype=torch.float64), 6: torch.tensor(1.5, dtype=torch.float64)}

    def regressed(step_tables):
        torch.manual_seed(0)
        policy = ConsistencyPolicy(order=4, base="ddim", hidden=8, time_grid=True, start=True, step_tables=step_tables)
        error = fit_policy(policy, schedule, fitted, iterations=150, lr=3e-3, weights={6: 0.05}, starts=starts)
        return policy, error

    (shared, shared_error), (own, own_error) = regressed(()), regressed([6])
    k3 = [(p.time_grid(schedule, 3), p) for p in (shared, own)]
    assert torch.equal(k3[0][0].timesteps, k3[1][0].timesteps)
    assert torch.equal(shared.coefficient_table(k3[0][0]), own.coefficient_table(k3[1][0]))
    a6, g6 = fitted[6]
    target = reweight_grid(schedule, own.default_grid(schedule, 6), g6, start=starts[6])
    exact = own.compose(target, a6)
    grid = own.time_grid(schedule, 6)
    assert torch.equal(grid.timesteps, target.timesteps)
    assert float((own.coefficient_table(grid) - exact).abs().max()) < 1e-5
    missed = shared.time_grid(schedule, 6)
    assert not torch.equal(missed.timesteps, target.timesteps)
    assert float((shared.coefficient_table(missed) - exact).abs().max()) > 1e-2
    assert own_error["start_max_error_steps"] < shared_error["start_max_error_steps"]  # K = 6's start is exact
    assert DistillConfig(dataset="x", max_steps=8, step_tables="6,8").validate().own_step_counts() == [6, 8]
    assert DistillConfig(dataset="x").validate().own_step_counts() == []
    for bad in ("7", "x", "2", "3,3"):
        with pytest.raises(ValueError, match="step_tables"):
            DistillConfig(dataset="x", step_tables=bad).validate()
    with pytest.raises(ValueError, match="step_tables"):
        DistillConfig(dataset="x", step_tables="3", method="policy").validate()


def _tuned_file(path, model, names: dict[int, str], steps=(3, 4)):
    import json

    from solver.registry import scheduler_identity

    best = {"unipc": {str(k): {"name": names[k], "psnr": 30.0, "ssim": 0.9} for k in steps},
            "ddim": {str(k): {"name": "ddim", "psnr": 20.0, "ssim": 0.8} for k in steps}}
    best["best"] = {str(k): {"family": "unipc", **best["unipc"][str(k)]} for k in steps}
    path.write_text(json.dumps({"model": model.model_id, "scheduler": scheduler_identity(model.scheduler_config),
                                "steps": list(steps), "best": best}))
    return path


def test_warm_start_is_the_best_tuned_rule_exactly_grid_start_and_table(tmp_path):
    """The policy's free parameters at the warm start reproduce the tuned rule: its timesteps (a start below T),
    and its coefficient table on that grid; sampling with them equals diffusers' scheduler."""
    from solver.policy import ConsistencyPolicy, reweight_grid
    from solver.registry import get_solver
    from solver.sampling import sample_lmm
    from training.distill import warm_start_tables

    model = GaussianDenoiser()
    name = "unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]"
    tuned = _tuned_file(tmp_path / "tuned.json", model, {3: name, 4: name})
    policy = ConsistencyPolicy(order=8, base="ddim", time_grid=True, start=True, final="first")
    warm = warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3, 4, 5],
                             model_id=model.model_id)
    # UniPC reaches back through its data predictions: at K = 5 it is no order-4 table, the next family is used
    small = warm_start_tables(ConsistencyPolicy(order=4, base="ddim", time_grid=True, start=True, final="first"),
                              model.schedule, model.scheduler_config, str(tuned), [4, 5], model_id=model.model_id)
    assert small[4]["name"] == name and small[5]["name"] == "ddim"
    assert sorted(warm) == [3, 4, 5] and warm[4]["name"] == name == warm[5]["name"]  # K = 5 from the nearest, K = 4
    baseline = get_solver(name, model.scheduler_config)
    noise = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    eps = lambda x, t: model.guided_eps(x, t, model.encode_prompts(["a", "b"]), 2.0)  # noqa: E731
    for k in (3, 4):
        grid = reweight_grid(model.schedule, policy.default_grid(model.schedule, k), warm[k]["g"], start=warm[k]["u"])
        theirs_scheduler = baseline.make_scheduler()
        theirs_scheduler.set_timesteps(k)
        assert grid.timesteps.tolist() == theirs_scheduler.timesteps.tolist() and int(grid.timesteps[0]) < 999
        ours = sample_lmm(eps, noise, grid, policy.compose(grid, warm[k]["residual"]))
        theirs = baseline.sample(eps, noise, k)
        assert float((ours - theirs).abs().max()) < 1e-4 * max(1.0, float(theirs.abs().max()))
    # another model's tuned file: one clear error
    with pytest.raises(ValueError, match="tuned for model"):
        warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3], model_id="another-model")


def test_warm_start_k_starts_every_k_from_the_rule_tuned_at_that_k(tmp_path):
    """``source_k`` (the recipe's --warm-start-k): every K takes the configuration tuned at that K, run at K, where
    each K would otherwise take its own; a K the file does not tune is refused naming warm_start_k."""
    from solver.policy import ConsistencyPolicy
    from training.distill import warm_start_tables

    model = GaussianDenoiser()
    k4 = "unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]"
    tuned = _tuned_file(tmp_path / "tuned.json", model, {3: "ddim[timestep_spacing=leading]", 4: k4, 5: "ddim"}, steps=(3, 4, 5))
    policy = ConsistencyPolicy(order=8, base="ddim", time_grid=True, start=True, final="first")
    own = warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3, 4, 5], model_id=model.model_id)
    assert [own[k]["name"] for k in (3, 4, 5)] == ["ddim[timestep_spacing=leading]", k4, "ddim"]
    from_k4 = warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3, 4, 5],
                                model_id=model.model_id, source_k=4)
    assert [from_k4[k]["name"] for k in (3, 4, 5)] == [k4, k4, k4]
    # a {K: S} map (--warm-start-k 3:4): K = 3 from the K = 4 rule, the others from their own
    spec = DistillConfig(dataset="x", min_steps=3, max_steps=5, warm_start_k="3:4").validate().warm_start_sources()
    mixed = warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3, 4, 5],
                              model_id=model.model_id, source_k=spec)
    assert [mixed[k]["name"] for k in (3, 4, 5)] == [k4, k4, "ddim"]
    assert torch.equal(mixed[3]["g"], from_k4[3]["g"]) and torch.equal(mixed[5]["g"], own[5]["g"])
    with pytest.raises(ValueError, match="warm_start_k"):
        warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3], model_id=model.model_id,
                          source_k=6)
    with pytest.raises(ValueError, match="warm_start_k"):
        warm_start_tables(policy, model.schedule, model.scheduler_config, str(tuned), [3], model_id=model.model_id,
                          source_k={3: 6})


@pytest.mark.parametrize("spec, message", [("0x", "cannot parse '0x'"), ("4,5", "cannot parse '4,5'"),
                                           ("3:9x", "cannot parse '3:9x'"), ("9:4", "'9:4' must name a K in 3..8"),
                                           ("3:4,3:5", "'3:5' must name a K"), ("3:0", "'3:0' must give a step count"),
                                           ("0", "'0' must be a step count")])
def test_warm_start_k_refuses_a_malformed_spec_naming_the_field(spec, message):
    with pytest.raises(ValueError, match="warm_start_k: " + re.escape(message)):
        DistillConfig(dataset="x", min_steps=3, max_steps=8, warm_start_k=spec).validate()


def test_warm_start_k_parses_one_source_or_a_per_k_map():
    def parse(spec):
        return DistillConfig(dataset="x", min_steps=3, max_steps=8, warm_start_k=spec).validate().warm_start_sources()

    assert parse("") is None and parse("4") == 4 and parse(" 3:4, 4:4 ") == {3: 4, 4: 4}
