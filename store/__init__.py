"""The SQLite store: every prompt, seed, noise tensor, preview, refine job, final, solver
checkpoint and training run of the app, in one database file (images included, as PNG bytes).

Start with :func:`open_store`; everything else is a method of the returned :class:`Store`::

    s = open_store()                                   # default: user data folder, never a served one
    noise_id, x_T = s.get_or_create_noise(seed, (4, 64, 64))
    gen = s.add_generation(model_id=..., prompt=..., seed=seed, height=512, width=512,
                           guidance=7.5, noise_id=noise_id)
    pid = s.add_preview(gen, solver="consistency", steps=4, image=pil, timings_ms={"total": 80.0})
    job = s.enqueue_job(gen, steps=50, solver="ddim", preview_id=pid)
    # worker: s.recover_interrupted() once at start, then claim_next_job (or claim_job(job)) /
    # update_job_progress / finish_job(job_id, "done", image=final_pil) (stores the final in the same
    # transaction); interrupt_job(job_id) re-queues a running job on a clean shutdown

Modules: ``connection`` (file checks, pragmas, lock, ``transaction()``), ``migrations``, ``noise``,
``input_images`` (the input image of an edit, stored once per owner by content hash),
``png`` (A1111 ``parameters``), ``history`` (prompts, generations, previews, finals,
consistency), ``jobs`` (refine job state machine), ``training`` (checkpoints, runs, datasets),
``db`` (:func:`open_store`).
"""

from store.connection import default_store_path
from store.db import Store, open_store
from store.errors import BlobIntegrityError, JobStateError, NoiseIntegrityError, NotFoundError, StoreError
from store.history import Consistency, Final, Generation, Preview
from store.input_images import InputImage
from store.jobs import JOB_STATES, TRANSITIONS, Job, JobEvent, JobStamp
from store.migrations import MIGRATIONS
from store.noise import NoiseRecord, check_seed, make_noise, tensor_sha256
from store.png import encode_png, format_parameters, parse_parameters, read_png_parameters
from store.training import Checkpoint, Dataset, TrainingMetric, TrainingRun

__all__ = [
    "BlobIntegrityError", "Checkpoint", "Consistency", "Dataset", "Final", "Generation", "InputImage", "JOB_STATES", "Job",
    "JobEvent", "JobStamp", "JobStateError", "MIGRATIONS", "NoiseIntegrityError", "NoiseRecord", "NotFoundError", "Preview",
    "Store", "StoreError", "TRANSITIONS", "TrainingMetric", "TrainingRun", "check_seed", "default_store_path",
    "encode_png", "format_parameters", "make_noise", "open_store", "parse_parameters", "read_png_parameters",
    "tensor_sha256",
]
