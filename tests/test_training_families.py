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
