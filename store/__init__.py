"""The SQLite store: every prompt, seed, noise tensor, preview, refine job, final, solver
checkpoint and training run of the app, in one database file (images included, as PNG bytes).

Start with :func:`open_store`; everything else is a method of the returned :class:`Store`.
"""

from store.connection import default_store_path
from store.db import Store, open_store
from store.errors import (
    BlobIntegrityError,
    JobStateError,
    NoiseIntegrityError,
    NotFoundError,
    StoreError,
)
from store.history import Consistency, Final, Generation, Preview
from store.jobs import JOB_STATES, TRANSITIONS, Job, JobEvent
from store.migrations import MIGRATIONS
from store.noise import NoiseRecord, check_seed, make_noise, tensor_sha256
from store.png import encode_png, format_parameters, parse_parameters, read_png_parameters
from store.training import Checkpoint, Dataset, TrainingMetric, TrainingRun

__all__ = [
    "BlobIntegrityError", "Checkpoint", "Consistency", "Dataset", "Final", "Generation", "JOB_STATES", "Job",
    "JobEvent", "JobStateError", "MIGRATIONS", "NoiseIntegrityError", "NoiseRecord", "NotFoundError", "Preview",
    "Store", "StoreError", "TRANSITIONS", "TrainingMetric", "TrainingRun", "check_seed", "default_store_path",
    "encode_png", "format_parameters", "make_noise", "open_store", "parse_parameters", "read_png_parameters",
    "tensor_sha256",
]
