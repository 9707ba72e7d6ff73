"""ConsistencySolverScheduler inside real diffusers pipelines (a tiny random-weight Stable Diffusion built
here): text-to-image and image-to-image at strength 0.6, deterministic and finite; the zero-initialised
policy equals the same pipeline with its base rule's diffusers scheduler (multistep DPM-Solver-2, eps
form) within 1e-4; a zero-terminal-SNR v-prediction config; a save/load round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline
from tiny_sd import build_tiny_sd

from solver.policy import ConsistencyPolicy
from solver.scheduler import ConsistencySolverScheduler

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    pipe = build_tiny_sd(tmp_path_factory.mktemp("tiny"))
    pipe.base_config = dict(pipe.scheduler.config)  # SD 1.5's scheduler config; tests swap pipe.scheduler
    return pipe


def _dpm2(config):
    """The base rule's diffusers scheduler: multistep DPM-Solver-2 in eps form, as rule:dpm2m is."""
    config = {k: v for k, v in dict(config).items() if k not in ("set_alpha_to_one", "skip_prk_steps")}
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver", solver_order=2,
                                                   final_sigmas_type="sigma_min", timestep_spacing="trailing")


def _ours(config, policy=None):
    return ConsistencySolverScheduler.from_config(config, timestep_spacing="trailing", policy=policy)


def _txt2img(pipe, scheduler, steps=5, seed=0):
    pipe.scheduler = scheduler
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.0, generator=g, output_type="latent",
                height=32, width=32).images


def _img2img(pipe, scheduler, steps=5, seed=0):
    i2i = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(seed)
    return i2i(PROMPT, image=image, strength=0.6, num_inference_steps=steps, guidance_scale=3.0, generator=g,
               output_type="latent").images


@pytest.mark.parametrize("run", [_txt2img, _img2img], ids=["txt2img", "img2img-strength-0.6"])
def test_zero_policy_in_a_pipeline_equals_its_base_rule_scheduler(pipe, run):
    config = pipe.base_config
    ours = run(pipe, _ours(config))
    again = run(pipe, _ours(config))
    reference = run(pipe, _dpm2(config))
    assert torch.equal(ours, again) and bool(torch.isfinite(ours).all())
    assert float((ours - reference).abs().max()) < 1e-4
    learned = run(pipe, _ours(config, policy=_perturbed()))
    assert float((learned - reference).abs().max()) > 1e-3  # the comparison can tell solvers apart


def _perturbed() -> ConsistencyPolicy:
    policy = ConsistencyPolicy()
    with torch.no_grad():
        policy.net[-1].bias.fill_(0.3)
    return policy


@pytest.mark.parametrize("steps", [4, 5])
def test_zero_snr_v_prediction_config_in_a_pipeline(pipe, steps):
    """From alpha = 0 exactly (the data-prediction first step): the eq.-10 DDIM rule equals diffusers'
    DDIMScheduler within 1e-4 (at K dividing 1000, where DDIM's t - T // K is the grid's next point);
    DPM-Solver-2 stays close to diffusers', which starts from abar = 2^-24."""
    from diffusers import DDIMScheduler

    config = {**pipe.base_config, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    ddim_rule = ConsistencySolverScheduler.from_config(config, timestep_spacing="trailing", base_rule="ddim",
                                                       solver_order=1)
    ours = _txt2img(pipe, ddim_rule, steps=steps)
    reference = _txt2img(pipe, DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False),
                         steps=steps)
    assert bool(torch.isfinite(ours).all()) and bool(torch.isfinite(reference).all())
    assert float((ours - reference).abs().max()) < 1e-4
    dpm2 = _txt2img(pipe, _ours(config), steps=steps)
    assert bool(torch.isfinite(dpm2).all())
    assert float((dpm2 - _txt2img(pipe, _dpm2(config), steps=steps)).abs().max()) < 2e-3


def test_save_load_round_trip_in_a_pipeline(pipe, tmp_path):
    scheduler = _ours(pipe.base_config, policy=_perturbed())
    scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = ConsistencySolverScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert torch.equal(_txt2img(pipe, loaded), _txt2img(pipe, scheduler))
    assert torch.equal(_img2img(pipe, loaded), _img2img(pipe, scheduler))
