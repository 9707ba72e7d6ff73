"""A FLUX.1-dev-shaped random-weight model: our preview grid against FluxPipeline at the same K, one run.

The transformer has FLUX.1-dev's shape (19 double + 38 single blocks, 24 heads x 128 = 3072 hidden,
guidance embedding; about 12B parameters), built directly on the device in bfloat16 with random
weights; the VAE has FLUX's shape (16 latent channels); CLIP-L's shape for the pooled prompt.
T5-XXL is NOT used: a 2-layer T5 encoder with FLUX's 4096-wide output stands in (the text encoders
run once per grid in both pipelines, so this changes both timings alike and little).

Measured, medians over ``--repeats`` alternating rounds after one warm-up each:
- ours: ``PreviewEngine.run`` for 1 prompt x ``--seeds`` seeds at K = ``--steps`` (noise from the
  store, encode, K solver steps, decode, PNG + store writes), one chunk of all seeds;
- FluxPipeline: ``pipe(prompt, num_inference_steps=K, latents=..., output_type="pil")`` for the same
  batch (encode, K Euler steps, decode, PIL images), the same parts on the same device.
The ratio ours / pipeline is printed last as one JSON line. ``--small``: a tiny model on the CPU (dry run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SMALL_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
PROMPT = "a red circle on a blue background"


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer from a small local vocabulary (no download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def build_pipeline(small: bool, device: torch.device, dtype: torch.dtype, tmp: Path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = SMALL_TRANSFORMER if small else DEV_TRANSFORMER
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype, on the device
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**cfg).eval()
            clip_width = cfg["pooled_projection_dim"]
            text_encoder = CLIPTextModel(CLIPTextConfig(
                bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=clip_width,
                intermediate_size=4 * clip_width, num_attention_heads=12 if not small else 2,
                num_hidden_layers=12 if not small else 1, vocab_size=49408 if not small else 64,
                max_position_embeddings=77, projection_dim=clip_width)).eval()
            t5 = T5EncoderModel(T5Config(
                vocab_size=384, d_model=cfg["joint_attention_dim"], d_kv=64 if not small else 8, d_ff=1024 if not small else 37,
                num_layers=2, num_heads=8 if not small else 2, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1)).eval()
            blocks = (128, 256, 512, 512) if not small else (8, 8, 16, 16)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=blocks, layers_per_block=2 if not small else 1,
                latent_channels=16, norm_num_groups=32 if not small else 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False).eval()
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(tmp / "clip"),
                        text_encoder_2=t5, tokenizer_2=ByT5Tokenizer(), transformer=transformer)


@torch.no_grad()
def finite_output(pipe, size: int, device: torch.device, dtype: torch.dtype) -> bool:
    """One transformer call at t = 1 on one random row: are the random weights' outputs finite?"""
    tr = pipe.transformer
    f = pipe.vae_scale_factor
    h = w = size // f
    x = torch.randn(1, tr.config.in_channels // 4, h, w, device=device, dtype=dtype)
    packed = pipe._pack_latents(x, 1, x.shape[1], h, w)
    ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
    ctx = torch.randn(1, 512, tr.config.joint_attention_dim, device=device, dtype=dtype)
    out = tr(hidden_states=packed, timestep=torch.ones(1, device=device, dtype=dtype),
             guidance=torch.full((1,), 3.5, device=device), pooled_projections=torch.randn(1, tr.config.pooled_projection_dim, device=device, dtype=dtype),
             encoder_hidden_states=ctx, txt_ids=torch.zeros(512, 3, device=device, dtype=dtype), img_ids=ids, return_dict=False)[0]
    return bool(torch.isfinite(out).all())


@torch.no_grad()
def small_normal_init(module: torch.nn.Module, std: float = 0.006) -> None:
    for q in module.parameters():
        if q.ndim >= 2:  # weight matrices; norms and biases keep their init
            q.normal_(0.0, std)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny FLUX-shaped model on the CPU (a dry run)")
    p.add_argument("--size", type=int, default=None, help="image height = width in pixels (default 1024; 64 with --small)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--solver", default="consistency", help="our solver (default: consistency, zero-init when untrained)")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from models.flux import FluxDenoiser
    from models.sd import LoadOptions
    from preview.engine import PreviewEngine
    from runtime.request import PreviewRequest
    from runtime.worker import DeviceWorker
    from store import open_store

    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = args.size or (64 if args.small else 1024)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    pipe = build_pipeline(args.small, device, dtype, tmp)
    sync(device)
    build_s = time.perf_counter() - t0
    params = sum(q.numel() for q in pipe.transformer.parameters())
    reinit = False
    if not finite_output(pipe, size, device, dtype):  # default random init can overflow bfloat16 through 57 blocks
        small_normal_init(pipe.transformer)
        reinit = True
        if not finite_output(pipe, size, device, dtype):
            print("error: the random transformer gives non-finite outputs even with a small init", file=sys.stderr)
            return 1
    print(f"built a FLUX.1-dev-shaped pipeline ({params / 1e9:.2f}B transformer parameters, {dtype}) on {device} "
          f"in {build_s:.1f} s", file=sys.stderr, flush=True)
    model = FluxDenoiser(pipe, "flux-dev-shaped-random", options=LoadOptions())
    model.max_size = max(model.max_size, size)

    store = open_store(tmp / "bench.db")
    worker = DeviceWorker(model)
    engine = PreviewEngine(worker, store, chunk_size=args.seeds)
    request = PreviewRequest(prompts=[PROMPT], seeds=list(range(args.seeds)), steps=args.steps, solver=args.solver,
                             guidance=args.guidance, height=size, width=size)
    latents = torch.randn(args.seeds, *model.latent_shape(size, size), generator=torch.Generator().manual_seed(0))
    b, c, h, w = latents.shape
    packed = pipe._pack_latents(latents, b, c, h, w).to(device, dtype)

    parts: list[dict] = []

    def ours() -> float:
        sync(device)
        start = time.perf_counter()
        results = list(engine.run(request))
        sync(device)
        assert len(results) == args.seeds
        parts.append(results[0].timings_ms)  # the chunk's encode / sample / decode / device times
        return time.perf_counter() - start

    def theirs() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            images = pipe(prompt=[PROMPT] * args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          height=size, width=size, latents=packed.clone(), output_type="pil").images
        sync(device)
        assert len(images) == args.seeds
        return time.perf_counter() - start

    pipe.set_progress_bar_config(disable=True)
    warm = (ours(), theirs())  # kernels, allocator, encoder cache
    print(f"warm-up: ours {warm[0]:.2f} s, FluxPipeline {warm[1]:.2f} s", file=sys.stderr, flush=True)
    ours_s, theirs_s = [], []
    for _ in range(args.repeats):
        ours_s.append(ours())
        theirs_s.append(theirs())
    worker.close()
    store.close()
    t_ours, t_theirs = statistics.median(ours_s), statistics.median(theirs_s)
    report = {
        "model": "FLUX.1-dev-shaped random weights" + (" (small)" if args.small else ""), "transformer_params": params,
        "t5": "2-layer stand-in (no T5-XXL)", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "size": [size, size], "seeds": args.seeds, "steps": args.steps,
        "solver": args.solver, "repeats": args.repeats, "ours_s": round(t_ours, 3), "flux_pipeline_s": round(t_theirs, 3),
        "ratio_ours_over_pipeline": round(t_ours / t_theirs, 3), "ours_all_s": [round(v, 3) for v in ours_s],
        "pipeline_all_s": [round(v, 3) for v in theirs_s], "build_s": round(build_s, 1),
        "transformer_reinit_small_normal": reinit,
        "ours_parts_ms_last": {k: round(v, 1) for k, v in parts[-1].items()},
    }
    print(f"{args.seeds} seeds at {size}x{size}, K={args.steps}: ours {t_ours:.3f} s, FluxPipeline {t_theirs:.3f} s "
          f"-> ratio {t_ours / t_theirs:.3f}")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
