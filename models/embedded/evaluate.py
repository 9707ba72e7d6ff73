"""Evaluate the embedded model on the held-out prompts: ``python -m models.embedded.evaluate``.

Reports (printed, and as JSON with ``--json PATH``):
- adherence: fraction of 40-step images (diffusers DPMSolverMultistepScheduler, dpmsolver order 2,
  trailing) whose main colour, main shape and background the scene analyzer reads as the prompt asks;
- few-step hardness: PSNR of DDIM 4-step and of DPM-Solver++ 2M 4-step against the 40-step image,
  same noise and guidance;
- the time of one guided model call (``guided_eps``) for a batch of 16 at the native size.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from models.embedded.analyzer import judge
from models.embedded.captions import HELDOUT_PROMPTS_FILE
from models.metrics import psnr


def load_heldout_prompts(path: str | None = None) -> list[str]:
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), HELDOUT_PROMPTS_FILE)
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def make_scheduler(kind: str, config: dict):
    """A diffusers scheduler for the model's training config: "dpm40" (reference), "ddim", "dpmpp2m"."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg["timestep_spacing"] = "trailing"
    cfg["prediction_type"] = "epsilon"  # the scheduler is fed the guided epsilon, whatever the network predicts
    if kind == "ddim":
        return DDIMScheduler.from_config(cfg)
    if kind == "dpm40":
        # diffusers allows only final_sigmas_type="sigma_min" for the first-order-parameterised "dpmsolver"
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min")
    if kind == "dpmpp2m":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"kind must be 'ddim', 'dpm40' or 'dpmpp2m', got {kind!r}")


@torch.no_grad()
def sample(denoiser, cond, noise: torch.Tensor, scheduler, steps: int, guidance: float) -> torch.Tensor:
    """Drive a diffusers scheduler with the model's guided epsilon; returns decoded images in [0, 1]."""
    scheduler.set_timesteps(steps)
    x = noise.to(torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = denoiser.guided_eps(x, int(t), cond, guidance)
        x = scheduler.step(eps, t, x).prev_sample
    return denoiser.decode(x)


def generate(denoiser, prompts: list[str], seed: int, kind: str, steps: int, guidance: float, batch: int = 48) -> torch.Tensor:
    """Images for prompts, noise from one CPU generator per (seed, prompt index)."""
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"{kind} {steps} steps", leave=False):
        chunk = prompts[i:i + batch]
        noise = torch.stack([torch.randn(denoiser.latent_shape(32, 32), generator=torch.Generator().manual_seed(seed * 100_003 + i + j)) for j in range(len(chunk))])
        cond = denoiser.encode_prompts(chunk)
        out.append(sample(denoiser, cond, noise, make_scheduler(kind, denoiser.scheduler_config), steps, guidance))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="held-out adherence, few-step PSNR and call time of the embedded model")
    ap.add_argument("--weights", default=None, help="weights directory (default: the shipped weights)")
    ap.add_argument("--ema", default=None, help="evaluate a training checkpoint's EMA weights file instead")
    ap.add_argument("--n", type=int, default=None, help="only the first N held-out prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--few-step", action="store_true", help="also DDIM / DPM-Solver++ 2M at 4 steps")
    ap.add_argument("--timing", action="store_true", help="time one guided call at batch 16")
    ap.add_argument("--save-grid", default=None, help="PNG of the first 64 images")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.embedded.model import load_embedded

    if args.ema:  # a training checkpoint's EMA weights with the current configuration
        from safetensors.torch import load_file

        from models.embedded.config import DEFAULT_GUIDANCE, SCHEDULER_CONFIG, UNET_CONFIG
        from models.embedded.model import EmbeddedDenoiser
        from models.embedded.network import PatchUNet
        from models.embedded.text import TextEncoder

        net = PatchUNet(UNET_CONFIG)
        net.load_state_dict(load_file(args.ema))
        den = EmbeddedDenoiser(net, TextEncoder(), SCHEDULER_CONFIG, default_guidance=DEFAULT_GUIDANCE)
    else:
        den = load_embedded(weights_dir=args.weights)
    prompts = load_heldout_prompts()[: args.n]
    results: dict = {"n_prompts": len(prompts), "seed": args.seed, "steps": args.steps}
    for w in args.guidance or [den.default_guidance]:
        t0 = time.time()
        ref = generate(den, prompts, args.seed, "dpm40", args.steps, w)
        verdicts = [judge(img, p) for img, p in zip(ref, prompts)]
        ok = np.array([v.ok for v in verdicts])
        fields = {f: float(np.mean([not any(m.startswith(f) for m in v.mismatches) for v in verdicts]))
                  for f in ("main_colour", "main_shape", "background")}
        r = {"adherence": float(ok.mean()), **fields, "seconds": time.time() - t0}
        print(f"guidance {w}: adherence {ok.mean():.3f} ({ok.sum()}/{len(ok)}) colour {fields['main_colour']:.3f} "
              f"shape {fields['main_shape']:.3f} background {fields['background']:.3f}")
        if args.few_step:
            for kind in ("ddim", "dpmpp2m"):
                few = generate(den, prompts, args.seed, kind, 4, w)
                p = psnr(few, ref)
                r[f"psnr_{kind}_4"] = float(p.mean())
                print(f"  {kind} 4 steps vs {args.steps}-step: PSNR {p.mean():.2f} dB (median {p.median():.2f})")
        results[f"guidance_{w}"] = r
        if args.save_grid:
            from PIL import Image

            g = ref[:64]
            g = torch.cat([g, torch.zeros(64 - len(g), *g.shape[1:])]) if len(g) < 64 else g
            grid = g.reshape(8, 8, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(256, 256, 3)
            Image.fromarray((grid.numpy() * 255 + 0.5).astype(np.uint8)).resize((512, 512), Image.NEAREST).save(
                args.save_grid.replace(".png", f"_w{w}.png"))
    if args.timing:
        cond = den.encode_prompts(prompts[:16] if len(prompts) >= 16 else ["a red circle on a blue background"] * 16)
        x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        den.guided_eps(x, 500, cond, den.default_guidance)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            den.guided_eps(x, 500, cond, den.default_guidance)
            times.append(time.perf_counter() - t0)
        results["guided_call_b16_s"] = float(np.median(times))
        print(f"one guided call, batch 16 at 32x32: median {np.median(times) * 1000:.1f} ms over 5 (torch threads {torch.get_num_threads()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
