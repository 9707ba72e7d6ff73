"""Batch composition that cannot change an image: fixed-size chunks for the UNet, real rows for the rest.

CPU and GPU GEMM/conv kernels pick their blocking from the batch size, so a sample's epsilon can
differ in the last bits between batch sizes (measured here: ~2e-6 between batch 1 and 8 for a small
UNet on CPU; diffusers#2659 on GPUs). Row i of a batch never mixes with row j, so running the model
at ONE fixed batch size -- the chunk size, padding a short chunk with dummy rows -- makes every
preview a function of its own inputs only, whatever else shares its chunk and in what order.
``tests/test_engine_determinism.py`` checks this bit for bit.

What is padded and what is not (contract 9, design.md: padded rows are a choice backed by a measurement):

- **The UNet** sees ``chunk_size`` rows, padded: that is what buys determinism. The waste is kept
  small by choosing the chunk size from measurement, not from memory: on CUDA :data:`CUDA_CHUNK` = 8
  (issue 23, H200, SD 1.5 fp16 512 px, 8 seeds: chunk 32 -> 2.16 s, 16 -> 1.42 s, 8 -> 0.985 s with the
  device work level with diffusers'), so 8- and 16-seed grids run unpadded and stream chunk by chunk.
  ``python -m preview.bench --seeds-list 1,4,8,16,32 --chunk-size N`` measures other choices.
- **The text encoder** sees a fixed :data:`TEXT_BATCH` rows (padded with filler prompts) where the model
  pads every prompt to a fixed length, so several prompts cost one call and each still gets the same bits.
- **The decoder** never sees a padded row: each real row is decoded on its own (the SD backend's VAE
  slicing), which is batch-invariant by construction and lets every tile stream as soon as it exists.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from models.base import Conditioning

MAX_CHUNK = 64
CPU_CHUNK = 8  # CPU throughput stops growing past a handful of rows; padding beyond it only costs
CUDA_CHUNK = 8  # measured (see the module docstring); 8- and 16-seed grids unpadded
TEXT_BATCH = 8  # prompts per text-encoder call where the encoder pads to a fixed length
# Rough peak activation bytes per latent element per row, in fp32 terms. Stable Diffusion 1.5 at 512 px
# in fp16 with SDPA runs about 16 rows (batch 8 with guidance) in 12 GB beside 1.7 GB of weights:
# ~0.6 GB per row / 16384 latent elements ~ 37 KB in fp16, ~ 64 KB in fp32 terms, rounded up.
ACTIVATION_BYTES_PER_ELEMENT = 64_000


def total_memory_bytes(device: torch.device) -> int:
    """Total (not free) memory of ``device``: fixed for a machine, so the chunk size is too."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_chunk_size(model: Any, height: int, width: int) -> int:
    """The UNet's fixed batch: :data:`CUDA_CHUNK` on CUDA, :data:`CPU_CHUNK` elsewhere (a power of two).

    Measured, not sized from memory; memory only bounds it from above for large images: per sample
    two rows (unconditional and conditional) of latent elements times a rough activation factor,
    scaled by the model dtype's width, within a quarter of the device's TOTAL memory. A pure function
    of (model, size, device), never of free memory, so it cannot vary between two runs.
    """
    c, h, w = model.latent_shape(height, width)
    element_bytes = torch.finfo(model.dtype).bits // 8
    per_sample = 2 * c * h * w * ACTIVATION_BYTES_PER_ELEMENT * element_bytes // 4
    device = torch.device(model.device)
    cap = CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK
    n = max(1, min(cap, total_memory_bytes(device) // 4 // max(per_sample, 1)))
    return 1 << (int(n).bit_length() - 1)


# Measured on the 2-core dev machine (store in WAL, synchronous=FULL): one commit ~6 ms (8 rows in their own
# transactions 104-124 ms, in one 16-28 ms); one PNG at zlib level 6: 32 px 0.1 ms, 128 px 1.6 ms,
# 256 px ~30 ms, 512 px ~90 ms (python -m preview.bench reports both levels for the bench's size). Below
# 256 x 256 the commit dominates: a chunk's rows share one transaction. From there the PNG dominates: each
# row is its own (parallel) task, so tiles are encoded side by side and each is shown once it is stored.
PER_ROW_STORE_PIXELS = 256 * 256


def rows_per_commit(height: int, width: int, chunk_size: int) -> int:
    """How many rows one store transaction holds: 1 for large images (parallel PNG encoding), else a chunk."""
    return 1 if height * width >= PER_ROW_STORE_PIXELS else chunk_size


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` (b, ...) padded with zero rows to (size, ...)."""
    b = x.shape[0]
    if b > size:
        raise ValueError(f"a chunk of {b} rows does not fit chunk size {size}")
    if b == size:
        return x
    return torch.cat([x, x.new_zeros((size - b, *x.shape[1:]))])


def pad_conditioning(cond: Conditioning, size: int) -> Conditioning:
    """``cond`` padded to ``size`` rows by repeating its first row (dummy rows' outputs are discarded)."""
    b = len(cond)
    if b > size:
        raise ValueError(f"a chunk of {b} rows does not fit chunk size {size}")
    return cond if b == size else cond.select(list(range(b)) + [0] * (size - b))


def text_fillers(prompts: Sequence[str], size: int) -> list[str]:
    """``prompts`` (distinct) followed by distinct filler prompts up to ``size`` entries.

    Fillers are distinct from each other and from the real prompts, so a backend that encodes each
    distinct text once still runs exactly ``size`` rows.
    """
    if len(prompts) > size:
        raise ValueError(f"{len(prompts)} prompts do not fit a text batch of {size}")
    taken = set(prompts)
    fillers = (f"padding {i}" for i in range(10 * size + len(taken)))
    return list(prompts) + [f for f in fillers if f not in taken][: size - len(prompts)]


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` cut into consecutive chunks of at most ``size``."""
    if size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
