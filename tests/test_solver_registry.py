"""The solver registry: every name runs, NFE is what was used, baselines are diffusers' own and trailing."""

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from solver.policy import ConsistencyPolicy
from solver.registry import BASELINES, get_solver, solver_names
from solver.sampling import iter_diffusers

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False}
SD_CONFIG = dict(PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1).config)
ABAR = DDIMScheduler(**SD).alphas_cumprod.double()


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact denoiser of N(0, 0.25 I) data, made nonlinear in x."""
    abar = ABAR[int(round(float(t)))]
    return float((1 - abar).sqrt() / (0.25 * abar + (1 - abar))) * x * (1 + 0.1 * torch.tanh(x))


def counting(eps_fn):
    seen = []

    def wrapped(x, t):
        seen.append(float(t))
        return eps_fn(x, t)

    return wrapped, seen


@pytest.mark.parametrize("name", [n for n in solver_names() if n != "consistency"] + ["consistency"])
def test_every_solver_runs_and_reports_its_nfe(name):
    policy = ConsistencyPolicy() if name == "consistency" else None
    solver = get_solver(name, SD_CONFIG, policy=policy)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_fn, seen = counting(toy_eps)
    records = list(solver.iterate(eps_fn, noise, 5))
    assert len(records) == len(seen) == solver.nfe(5)
    assert seen[0] == 999.0  # trailing spacing everywhere
    assert [r.i for r in records] == list(range(len(records))) and records[-1].num_steps == len(records)
    final = records[-1].x
    assert torch.isfinite(final).all() and final.shape == noise.shape
    assert torch.equal(solver.sample(toy_eps, noise, 5), final)
    # a 5-step sample of N(0, 0.25) data: std roughly 0.5, and so is the last x0 estimate
    assert 0.3 < final.std() < 0.8 and 0.3 < records[-1].denoised.std() < 0.8


def test_plms_costs_one_extra_evaluation():
    solver = get_solver("plms", SD_CONFIG)
    eps_fn, seen = counting(toy_eps)
    solver.sample(eps_fn, torch.randn(1, 4, 8, 8), 4)
    assert solver.nfe(4) == 5 and seen == [999.0, 749.0, 749.0, 499.0, 249.0]


def test_rule_dpm2m_matches_diffusers_dpm2m():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (4, 7):
        ours = get_solver("rule:dpm2m", SD_CONFIG).sample(toy_eps, noise, steps)
        theirs = get_solver("dpm2m", SD_CONFIG).sample(toy_eps, noise, steps)
        assert (ours - theirs).abs().max() < 1e-4


def test_zero_policy_consistency_equals_its_base_rule(tmp_path):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ConsistencyPolicy(base="ab3").save(tmp_path)
    loaded = get_solver(f"consistency:{tmp_path}", SD_CONFIG).sample(toy_eps, noise, 6)
    assert torch.equal(loaded, get_solver("rule:ab3", SD_CONFIG).sample(toy_eps, noise, 6))


def test_iter_diffusers_denoised_is_ddims_x0():
    scheduler = get_solver("ddim", SD_CONFIG).make_scheduler()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    records = list(iter_diffusers(toy_eps, noise, scheduler, 4))
    reference = get_solver("ddim", SD_CONFIG).make_scheduler()
    reference.set_timesteps(4)
    x = noise
    for record, t in zip(records, reference.timesteps):
        out = reference.step(toy_eps(x, t), t, x)
        assert (record.denoised - out.pred_original_sample).abs().max() < 1e-5
        x = out.prev_sample


def test_baselines_use_the_models_betas_and_final_alpha():
    for name in BASELINES:
        scheduler = get_solver(name, SD_CONFIG).make_scheduler()
        assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.prediction_type == "epsilon"
        assert torch.allclose(scheduler.alphas_cumprod, ABAR.float())
    assert get_solver("ddim", SD_CONFIG).make_scheduler().final_alpha_cumprod == ABAR.float()[0]


def test_ipndm_is_the_fixed_step_adams_table():
    from solver.coefficients import adams_bashforth_table, ipndm_table

    solver = get_solver("ipndm", SD_CONFIG)
    assert solver.nfe(5) == 5  # no repeated timestep, unlike plms
    grid = solver.schedule.grid(6)
    table = ipndm_table(grid)
    assert table[3].tolist() == pytest.approx([55 / 24, -59 / 24, 37 / 24, -9 / 24])
    assert table[1].tolist() == pytest.approx([1.5, -0.5, 0.0, 0.0]) and table[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(table.sum(dim=1), torch.ones(6, dtype=torch.float64))
    # on a non-uniform n-grid the fixed weights differ from the variable-step Adams weights
    assert not torch.allclose(table, adams_bashforth_table(grid, 4))


def test_bad_names_are_refused_with_the_valid_list():
    with pytest.raises(ValueError, match=r"name must be one of .*dpmpp2m.*'bogus'"):
        get_solver("bogus", SD_CONFIG)
    with pytest.raises(ValueError, match="policy"):
        get_solver("consistency", SD_CONFIG)
    with pytest.raises(ValueError, match="no policy checkpoint"):
        get_solver("consistency:/nonexistent/dir", SD_CONFIG)
    with pytest.raises(ValueError, match="no flow-matching version"):
        get_solver("deis", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


# Baselines with options: NAME[key=value,...] -----------------------------------------------------


def test_bracket_options_override_the_registry_defaults_and_match_diffusers():
    from diffusers import UniPCMultistepScheduler

    name = "unipc[solver_type=bh2,solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]"
    solver = get_solver(name, SD_CONFIG)
    assert solver.name == name
    eps_fn, seen = counting(toy_eps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = solver.sample(eps_fn, noise, 4)
    assert seen[0] < 999.0  # leading spacing, not the registry's forced trailing
    config = {k: v for k, v in SD_CONFIG.items() if not k.startswith("_")}
    config.update(prediction_type="epsilon", thresholding=False, solver_type="bh2", solver_order=1,
                  timestep_spacing="leading", final_sigmas_type="sigma_min")
    theirs_scheduler = UniPCMultistepScheduler.from_config(config)
    theirs = None
    for record in iter_diffusers(toy_eps, noise, theirs_scheduler, 4):
        theirs = record.x
    assert torch.equal(ours, theirs)


def test_option_values_are_typed():
    from solver.registry import parse_solver_name

    base, options = parse_solver_name("dpmpp2m[solver_order=3,lower_order_final=false,final_sigmas_type=sigma_min,"
                                      "sigma_min=0.5,variance_type=none]")
    assert base == "dpmpp2m"
    assert options == {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min",
                       "sigma_min": 0.5, "variance_type": None}
    assert type(options["solver_order"]) is int and type(options["sigma_min"]) is float


def test_commas_inside_brackets_do_not_split_the_solver_list():
    from solver.registry import split_solver_list
    from training.evaluate import parse_solvers

    text = "ddim, unipc[solver_order=1,timestep_spacing=leading],deis[steps_offset=1]"
    assert split_solver_list(text) == ["ddim", "unipc[solver_order=1,timestep_spacing=leading]", "deis[steps_offset=1]"]
    assert parse_solvers(text) == split_solver_list(text)
    with pytest.raises(ValueError, match="unclosed"):
        split_solver_list("ddim,unipc[solver_order=1")


@pytest.mark.parametrize("name, field", [
    ("unipc[solver_typo=bh2]", "solver_typo"),
    ("ddim[solver_order=2]", "solver_order"),
    ("unipc[solver_type=bh3]", "bh3"),
    ("unipc[prediction_type=v_prediction]", "prediction_type"),
    ("unipc[solver_order]", "solver_order"),
    ("unipc[solver_order=1", "malformed"),
    ("unipc[solver_order=1]x", "malformed"),
    ("unipc[]", "empty"),
    ("rule:ddim[a=1]", "only diffusers baselines"),
    ("unipc[solver_order=1,solver_order=2]", "twice"),
])
def test_bad_options_are_one_clear_error_naming_them(name, field):
    from solver.registry import check_name
    from training.evaluate import parse_solvers

    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        get_solver(name, SD_CONFIG)
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        check_name(name)
    with pytest.raises(ValueError, match="solvers"):
        parse_solvers(f"ddim,{name}")
