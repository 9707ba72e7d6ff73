#!/usr/bin/env bash
# The preview grid against diffusers' own pipeline on a GPU (issue 23), one shot, no network.
#
#   bash scripts/gpu_bench.sh            # SD 1.5-shaped random-weight model, fp16, 512 px, CUDA
#   bash scripts/gpu_bench.sh --small    # a tiny model on the CPU: a dry run of every step
#
# 1. Installs the wheels under .whl/ if there are any (diffusers, sqlite-utils and what they need
#    beyond the machine's own packages; `bash scripts/gpu_wheels.sh` downloads them) into /tmp/site.
# 2. Builds a Stable Diffusion 1.5-shaped pipeline with random weights from configs (UNet of ~860M
#    parameters, the SD 1.5 VAE, a CLIP ViT-L/14-shaped text tower, a CLIP tokenizer made from files
#    written here) and a TAESD-shaped AutoencoderTiny, and saves them with save_pretrained. Nothing is
#    downloaded.
# 3. Runs `python -m preview.bench --against diffusers` on it (1, 4, 8, 16, 32 seeds) and prints its
#    JSON, then, while the time budget lasts, one short bench per speed setting (rows decoded at once,
#    chunk size, decoder, channels-last, SDPA kernels, torch.compile), each printed as one JSON line.
# Files under $OUT (when set) or /tmp/gpu_bench_out/: main.json, variants.jsonl, bench.log. The output
# ends with one compact VARIANT line per variant, then the whole main report on the MAIN line.
# Budget: GPU_BENCH_BUDGET_S seconds for the whole script (default 360); a variant starts only if
# enough of it is left.
set -uo pipefail
cd "$(dirname "$0")/.."
SMALL=0
for arg in "$@"; do
  case "$arg" in
    --small) SMALL=1 ;;
    *) echo "usage: bash scripts/gpu_bench.sh [--small]" >&2; exit 2 ;;
  esac
done
[ "${GPU_BENCH_SMALL:-0}" = 1 ] && SMALL=1
START=$(date +%s)
DEFAULT_BUDGET=360
[ "$SMALL" = 1 ] && DEFAULT_BUDGET=900  # the slow CPU dry run
BUDGET=${GPU_BENCH_BUDGET_S:-$DEFAULT_BUDGET}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
RESULTS=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/gpu_bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "== $( $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' )" >&2

# --- 2. the random-weight model -------------------------------------------------------------------
$PY - "$WORK" "$SMALL" <<'EOF' || exit 1
import json, sys, time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

work, small = Path(sys.argv[1]), sys.argv[2] == "1"
t0 = time.time()
torch.manual_seed(0)


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer (49408 ids, SD's special tokens) from local files: the 512 byte-level symbols,
    a few merges, filler ids up to 49406, then <|startoftext|> and <|endoftext|>."""
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + k)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + k) for k in range(len(extra))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "o n</w>",
              "b l", "bl u", "blu e</w>", "b a", "ba c", "bac k"]
    for m in merges:
        a, b = m.split()
        vocab.setdefault(a + b, len(vocab))
    while len(vocab) < 49406:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


if small:  # the same parts, a few channels each: a CPU dry run
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=64)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    taesd = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                 num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
else:  # Stable Diffusion 1.5's shapes
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, layers_per_block=2, sample_size=512)
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    taesd = {}  # AutoencoderTiny's defaults are TAESD's
text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                            projection_dim=768, bos_token_id=49406, eos_token_id=49407,
                                            pad_token_id=49407, **text))
scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                               tokenizer=tokenizer(work / "tokenizer_src"), scheduler=scheduler, safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)
if not small:
    pipe.to(torch.float16)  # saved in fp16: half the bytes to write and read
pipe.save_pretrained(work / "sd15", safe_serialization=True)
AutoencoderTiny(**taesd).eval().save_pretrained(work / "taesd", safe_serialization=True)
params = sum(p.numel() for p in unet.parameters()) / 1e6
print(f"== built the random-weight model: UNet {params:.0f}M parameters, in {time.time() - t0:.0f} s", file=sys.stderr)
EOF

# --- 3. the benches -----------------------------------------------------------------------------
if [ "$SMALL" = 1 ]; then
  COMMON=(--model "$WORK/sd15" --size 64 --threads 1)
  MAIN=(--seeds-list 1,2 --seeds 2 --repeats 1 --warmup 1 --refine-steps 60)
  SHORT=(--seeds-list 2 --seeds 2 --repeats 1 --warmup 1 --no-contention)
  VARIANTS=("--decode-streams 2" "--chunk-size 2" "--preview-decoder $WORK/taesd" "--channels-last")
  MIN_LEFT=10
else
  COMMON=(--model "$WORK/sd15" --fp16 --size 512)
  MAIN=(--seeds-list 1,4,8,16,32 --seeds 8 --repeats 3 --warmup 1 --refine-steps 100)
  SHORT=(--seeds-list 8 --seeds 8 --repeats 3 --warmup 1 --no-contention)
  # the settings no GPU run has measured yet first (docs/bench/gpu_h200_variants.jsonl has the others)
  VARIANTS=("--decode-streams 4" "--decode-streams 8" "--decode-streams 4 --preview-decoder $WORK/taesd"
            "--sdpa flash" "--sdpa efficient" "--compile" "--sdpa cudnn"
            "--chunk-size 4 --seeds-list 1,4,8,16" "--preview-decoder $WORK/taesd" "--channels-last"
            "--chunk-size 16 --seeds-list 16,32")
  MIN_LEFT=60
fi

LOG="$RESULTS/bench.log"
: > "$LOG"
: > "$RESULTS/variants.jsonl"
rm -f "$RESULTS"/variant[0-9]*.json
echo "== main: python -m preview.bench ${COMMON[*]} --against diffusers ${MAIN[*]}" >&2
if ! timeout "$((BUDGET + 60))" $PY -m preview.bench "${COMMON[@]}" --against diffusers "${MAIN[@]}" > "$RESULTS/main.json" 2>> "$LOG"; then
  echo "== the main bench failed; the end of its log:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi
grep -h "^[0-9]* seeds:" "$LOG" >&2

i=0
for variant in "${VARIANTS[@]}"; do
  i=$((i + 1))
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -le "$MIN_LEFT" ]; then  # (and so left - 5 > 0: timeout 0 would mean no limit)
    echo "{\"variant\": \"$variant\", \"skipped\": \"time budget\"}" >> "$RESULTS/variants.jsonl"
    continue
  fi
  echo "== variant $i: $variant ($left s of the budget left)" >&2
  # shellcheck disable=SC2086
  timeout "$((left - 5))" $PY -m preview.bench "${COMMON[@]}" --against diffusers "${SHORT[@]}" $variant \
    > "$WORK/variant.json" 2>> "$LOG"
  rc=$?
  if [ "$rc" = 0 ]; then
    echo "{\"variant\": \"$variant\", \"report\": $(cat "$WORK/variant.json")}" >> "$RESULTS/variants.jsonl"
  else
    why="exit $rc"
    [ "$rc" = 124 ] && why="timed out (budget)"
    echo "{\"variant\": \"$variant\", \"failed\": \"$why\"}" >> "$RESULTS/variants.jsonl"
  fi
done
# one compact line per variant, then the whole main report last (a remote run returns the end of the output)
$PY - "$RESULTS/variants.jsonl" <<'PYEOF'
import json, sys
keys = ("grid_s", "diffusers_s", "vs_diffusers", "floor_s", "overhead", "first_tile_s", "chunk_size",
        "peak_gpu_mem_mib", "speed_settings", "errors")
for line in open(sys.argv[1]):
    v = json.loads(line)
    r = v.get("report")
    print("VARIANT", json.dumps({"variant": v["variant"], **({k: r.get(k) for k in keys} if r else v)}))
PYEOF
echo "MAIN $(cat "$RESULTS/main.json")"
echo "== done in $(( $(date +%s) - START )) s; main.json, variants.jsonl and bench.log in $RESULTS" >&2
