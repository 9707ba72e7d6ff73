"""Batched few-step previews of prompts x seeds (no device of its own: work goes to ``runtime.worker``).

- :mod:`runtime.request`: ``PreviewRequest`` and its validation (one ValueError naming the field), ``parse_seeds``.
- :mod:`preview.engine`: ``PreviewEngine(executor, store).run(request)`` -> stream of ``PreviewResult``.
- :mod:`preview.batching`: fixed padded chunks (bit-identical previews whatever the batch).
- :mod:`preview.solvers`: what the name ``consistency`` resolves to (active / shipped / zero-init policy).
- ``python -m preview`` (the CLI) and ``python -m preview.bench`` (overhead and contention figures).
"""
