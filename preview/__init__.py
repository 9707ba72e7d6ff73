"""Batched few-step previews of prompts x seeds (no device of its own: work goes to ``runtime.worker``).

- :mod:`runtime.request`: ``PreviewRequest`` and its validation (one ValueError naming the field), ``parse_seeds``.
- :mod:`preview.engine`: ``PreviewEngine(executor, store).run(request)`` -> stream of ``PreviewResult``.
- :mod:`preview.batching`: the fixed, measured UNet chunk and text batch (bit-identical previews whatever the
  batch); real rows only are decoded.
- :mod:`preview.solvers`: what the name ``consistency`` resolves to (active / shipped / zero-init policy).
- ``python -m preview`` (the CLI) and ``python -m preview.bench`` (grid vs diffusers' pipeline,
  vs the honest floor, first tile, contention; ``scripts/gpu_bench.sh`` runs it on a GPU).
"""
