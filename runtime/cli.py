"""The options every command line shares, defined once: which model to load and how, and the store file.

Every CLI (``python -m preview``, ``python -m refine``, ``python -m preview.bench``, the ``training.*``
CLIs) and the app (``diffusion-preview``) call :func:`add_model_options` and :func:`add_db_option`, so
``--model x.safetensors --config DIR`` loads the same single-file checkpoint everywhere::

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    add_db_option(parser)
    args = parser.parse_args()
    model = model_from_args(args)          # models.registry.load_model with load_options(args)

The database flag is ``--db`` everywhere; ``--store`` (the training CLIs' old name) still works and logs
a deprecation warning.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger(__name__)

MODEL_HELP = "hub id, local diffusers folder or single-file .safetensors checkpoint (default: the embedded model)"
DEVICE_HELP = "torch device (default: CUDA when present, else cpu)"
DB_HELP = ("SQLite store file (default: $DIFFUSION_PREVIEW_HOME/store.sqlite3, "
           "else ~/.local/share/diffusion-preview/store.sqlite3)")


def add_model_options(parser: argparse.ArgumentParser, *, device_help: str = DEVICE_HELP) -> None:
    """``--model`` and how to load it: ``--config``, ``--fp16``, ``--device``, ``--cpu-offload``,
    ``--attention-slicing``, ``--vae-tiling`` (see :class:`models.sd.LoadOptions`)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file "
                   ".safetensors checkpoint; for an SD3 / FLUX transformer file also every other part (nothing is fetched)")
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 weights (default: on CUDA only)")
    g.add_argument("--device", default=None, help=device_help)
    g.add_argument("--cpu-offload", action="store_true", help="keep each part on the CPU until it runs (CUDA)")
    g.add_argument("--attention-slicing", action="store_true", help="less memory, a little slower")
    g.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    g.add_argument("--true-cfg-scale", type=float, default=1.0, metavar="S",
                   help="FLUX only: > 1 adds a negative-prompt pass (true CFG) when a negative prompt is given")


class _DeprecatedStore(argparse.Action):
    """``--store PATH``: the old name of ``--db``; same value, and a deprecation warning."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        logger.warning("%s is deprecated: use --db", option_string)
        setattr(namespace, self.dest, values)


def add_db_option(parser: argparse.ArgumentParser, *, dest: str = "db", default: str | None = None,
                  help: str = DB_HELP) -> None:
    """``--db PATH`` (``--store PATH`` kept as a deprecated alias), stored in ``args.<dest>``."""
    parser.add_argument("--db", dest=dest, default=default, metavar="PATH", help=help)
    parser.add_argument("--store", dest=dest, action=_DeprecatedStore, metavar="PATH", help=argparse.SUPPRESS)


def load_options(args: argparse.Namespace) -> Any:
    """The :class:`models.sd.LoadOptions` the model options ask for."""
    from models.sd import LoadOptions

    return LoadOptions(fp16=args.fp16, attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling,
                       cpu_offload=args.cpu_offload, config=args.config,
                       true_cfg_scale=getattr(args, "true_cfg_scale", 1.0))


def model_from_args(args: argparse.Namespace, *, device: Any = None) -> Any:
    """Load ``args.model`` with the model options; ``--device`` wins over ``device`` (the caller's default)."""
    from models.registry import load_model

    return load_model(args.model, device=args.device or device, options=load_options(args))


def model_argv(args: argparse.Namespace) -> list[str]:
    """The model options of ``args`` as command-line words, for a child command (the app's training jobs) that
    must load the same model the same way. Local paths are made absolute (the child runs elsewhere); of a
    comma list of devices the child gets the first."""
    import os

    def path(value: str) -> str:
        return os.path.abspath(value) if os.path.exists(value) else value

    out: list[str] = []
    if getattr(args, "model", None):
        out += ["--model", path(args.model)]
    if getattr(args, "config", None):
        out += ["--config", path(args.config)]
    if getattr(args, "fp16", None) is not None:
        out.append("--fp16" if args.fp16 else "--no-fp16")
    if getattr(args, "device", None):
        out += ["--device", str(args.device).split(",")[0].strip()]
    if getattr(args, "true_cfg_scale", 1.0) != 1.0:
        out += ["--true-cfg-scale", repr(float(args.true_cfg_scale))]
    for flag in ("cpu_offload", "attention_slicing", "vae_tiling"):
        if getattr(args, flag, False):
            out.append("--" + flag.replace("_", "-"))
    return out
