"""Batch composition that cannot change an image: fixed padded chunks.

CPU (and GPU) GEMM/conv kernels pick their blocking from the batch size, so a sample's epsilon can
differ in the last bits between batch sizes (measured here: ~2e-6 between batch 1 and 8 for a small
UNet on CPU; diffusers#2659 on GPUs). Row i of a batch never mixes with row j, so running the model
at ONE fixed batch size -- the chunk size, padding a short chunk with dummy rows -- makes every
preview a function of its own inputs only, whatever else shares its chunk and in what order.
``tests/test_engine_determinism.py`` checks this bit for bit.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from models.base import Conditioning

MAX_CHUNK = 64
CPU_CHUNK = 8  # CPU throughput stops growing past a handful of rows; padding beyond it only costs
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
    """A power of two in 1..64 sized from the device's total memory (a quarter of it for activations).

    Per sample: two rows (unconditional and conditional) of latent elements times a rough activation
    factor, scaled by the model dtype's width. On CPU capped at :data:`CPU_CHUNK`. A pure function of
    (model, size, device), never of free memory, so it cannot vary between two runs.
    """
    c, h, w = model.latent_shape(height, width)
    element_bytes = torch.finfo(model.dtype).bits // 8
    per_sample = 2 * c * h * w * ACTIVATION_BYTES_PER_ELEMENT * element_bytes // 4
    device = torch.device(model.device)
    budget = total_memory_bytes(device) // 4
    n = max(1, min(MAX_CHUNK, budget // max(per_sample, 1)))
    if device.type == "cpu":
        n = min(n, CPU_CHUNK)
    return 1 << (int(n).bit_length() - 1)


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


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` cut into consecutive chunks of at most ``size``."""
    if size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
