"""Ours-Distill: gradients reach the coefficients through the unrolled sampler and the model's epsilon."""

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
    policy, log = distill(DistillConfig(dataset=str(tmp_path / "ds"), num_updates=30, min_steps=3, max_steps=3,
                                        learning_rate=3e-3), model, ds, progress=False)
    first, last = log[0]["psnr_latent"], sum(r["psnr_latent"] for r in log[-5:]) / 5
    assert last > first + 1.0, (first, last)
    with pytest.raises(ValueError, match="max_steps"):
        DistillConfig(dataset="x", max_steps=51).validate()
    rc = main(["--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--num-updates", "1"], model=model)
    assert rc == 0 and (tmp_path / "out" / "final" / "policy.safetensors").is_file()
