"""Device workers, refine jobs and the full-step sampler.

- :mod:`runtime.worker`: ``DeviceWorker`` (one thread owns the model; previews outrank refine steps) and ``WorkerPool``.
- :mod:`refine.full_step`: THE full-step sampler (DPM-Solver-2M, 40 steps), shared with training.
- :mod:`refine.jobs`: ``RefineService`` (queue, run step by step, progress/ETA, cancel, resume after restart).
- :mod:`refine.consistency`: preview-vs-final PSNR, SSIM, SCC (and MS-SSIM where the size allows).
- ``python -m refine`` (the CLI).
"""
