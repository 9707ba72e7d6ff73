"""The offline dataset: (prompt, seed, noise, full-step target latent), built with refine's full-step sampler.

Layout of a dataset folder::

    index.json                 model id, reference sampler + steps, guidance, size, prompt-file sha256,
                               the (prompt, seed) list and the shards
    shard-00000.safetensors    noise (N, C, h, w) and target (N, C, h, w) float32; metadata: its rows

Pairs are every prompt x every seed, in that order (``pairing="product"``), or prompt i with seed i
(``pairing="zip"``: as many distinct noises as rows, which a solver trained on few seeds would otherwise
overfit to), cut into shards of ``shard_size`` rows. A shard is
written to a temporary name and renamed when complete, so an interrupted build resumes by skipping the
shards that exist (their rows are checked against the index). With ``accelerate launch`` every process
builds the shards ``i % num_processes == process_index``; the main process writes the index and the
store row once all shards exist. Noise comes from ``store.noise.make_noise`` (one CPU generator per
seed), the target from ``refine.full_step.sample_full_step``: the very sampler refine uses.

Command line::

    python -m training.dataset --prompts FILE --seeds 0-63 --out DIR [--model NAME] [--guidance W] [--pairing zip]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.cli import add_db_option, add_model_options

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SCHEMA_VERSION = 1
MAX_SEED_RANGE = 100_000


class DatasetMismatch(ValueError):
    """A dataset built with another model, reference sampler or step count than the one asked for."""


# ------------------------------------------------------------------------------------------------
# Input parsing (shared with training.evaluate)
# ------------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike, max_prompts: int | None = None) -> list[str]:
    """Non-empty, non-comment lines of a UTF-8 prompt file (the first ``max_prompts`` of them, if given);
    a ValueError naming the file or the limit otherwise."""
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompts: cannot read prompt file {str(path)!r}: {err}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts: prompt file {str(path)!r} holds no prompt (one per line)")
    return prompts if max_prompts is None else prompts[:max_prompts]


def parse_int_list(text: str, name: str, low: int, high: int) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; every value in low..high, else a ValueError naming ``name``."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        a, sep, b = part.partition("-")
        try:
            lo, hi = (int(a), int(b)) if sep else (int(a), int(a))
        except ValueError:
            raise ValueError(f"{name}: cannot parse {part!r} (expected N, N-M or a comma list)") from None
        if lo > hi or hi - lo > MAX_SEED_RANGE:
            raise ValueError(f"{name}: bad range {part!r}")
        values.extend(range(lo, hi + 1))
    if not values:
        raise ValueError(f"{name}: empty list {text!r}")
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise ValueError(f"{name} must be in {low}..{high}, got {bad[0]}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: repeated values in {text!r}")
    return values


def sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Index
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetIndex:
    """What a dataset was built from; training checks it before spending any compute."""

    model_id: str
    reference_solver: str
    reference_steps: int
    guidance: float
    height: int
    width: int
    negative_prompt: str
    latent_shape: list[int]
    prompt_file_sha256: str
    prompts: list[str]
    seeds: list[int]
    shard_size: int
    shards: list[str] = field(default_factory=list)
    complete: bool = False
    schema_version: int = SCHEMA_VERSION
    pairing: str = "product"  # "product": every prompt x every seed; "zip": prompt i with seed i

    @property
    def num_pairs(self) -> int:
        return len(self.prompts) if self.pairing == "zip" else len(self.prompts) * len(self.seeds)

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def pairs(self, shard: int) -> list[tuple[str, int]]:
        """The (prompt, seed) rows of shard ``shard``: prompt-major over prompts x seeds, or zipped."""
        lo, hi = shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_pairs)
        if self.pairing == "zip":
            return list(zip(self.prompts[lo:hi], self.seeds[lo:hi]))
        return [(self.prompts[k // len(self.seeds)], self.seeds[k % len(self.seeds)]) for k in range(lo, hi)]

    def write(self, folder: Path) -> None:
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, folder / INDEX_NAME)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "DatasetIndex":
        path = Path(folder) / INDEX_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"dataset: {str(folder)!r} is not a dataset folder ({INDEX_NAME} unreadable: {err})") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"dataset: {str(path)!r} has schema_version {data.get('schema_version')!r}; this code reads {SCHEMA_VERSION}")
        return cls(**data)

    def check_compatible(self, model_id: str, reference_solver: str, reference_steps: int | None = None) -> None:
        """Raise DatasetMismatch unless this dataset's targets come from the same model and sampler."""
        if self.model_id != model_id:
            raise DatasetMismatch(f"dataset was built with model {self.model_id!r}, but the model being trained is {model_id!r}")
        if self.reference_solver != reference_solver:
            raise DatasetMismatch(f"dataset targets come from reference sampler {self.reference_solver!r}, "
                                  f"but refine's full-step sampler is {reference_solver!r}; rebuild the dataset")
        if reference_steps is not None and self.reference_steps != reference_steps:
            raise DatasetMismatch(f"dataset targets use {self.reference_steps} reference steps, expected {reference_steps}")
        if not self.complete:
            raise ValueError("dataset is incomplete (its build was interrupted); rerun the same build command to finish it")


def check_pairing(prompts: Sequence[str], seeds: Sequence[int], pairing: str) -> None:
    """A ValueError unless ``pairing`` is known and, for 'zip', there is one seed per prompt."""
    if pairing not in ("product", "zip"):
        raise ValueError(f"pairing must be 'product' or 'zip', got {pairing!r}")
    if pairing == "zip" and len(seeds) != len(prompts):
        raise ValueError(f"seeds: pairing 'zip' gives prompt i seed i, so it needs one seed per prompt "
                         f"({len(prompts)} prompts), got {len(seeds)} seeds")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _shard_rows(path: Path) -> list[list[Any]] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("rows", "null"))
    except Exception:  # a truncated or foreign file is rebuilt
        return None


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------
def check_build_arguments(model: Any, prompts: Sequence[str], seeds: Sequence[int], shard_size: int,
                          batch_size: int, pairing: str, guidance: float | None) -> float:
    """:func:`build_dataset`'s arguments checked before anything is written (a ValueError naming the field);
    returns the guidance to use (the model's default when ``guidance`` is None)."""
    from store.noise import check_seed

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not prompts:
        raise ValueError("prompts: no prompt given")
    for s in seeds:
        check_seed(s)
    check_pairing(prompts, seeds, pairing)
    if guidance is None:
        guidance = float(getattr(model, "default_guidance", 5.0))
    if not (isinstance(guidance, (int, float)) and 0 <= guidance < float("inf")):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    return guidance


def open_dataset_folder(folder: Path, index: DatasetIndex, write_index: bool) -> None:
    """Create ``folder`` for ``index`` (writing the index when ``write_index`` and none is there), or reuse
    it to finish a build: a folder whose index has other settings is refused."""
    if (folder / INDEX_NAME).exists():
        old = DatasetIndex.read(folder)
        same = {k: v for k, v in asdict(old).items() if k not in ("shards", "complete")}
        if same != {k: v for k, v in asdict(index).items() if k not in ("shards", "complete")}:
            raise ValueError(f"out: {str(folder)!r} holds a dataset built with other settings; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    if write_index and not (folder / INDEX_NAME).exists():
        index.write(folder)


def write_shard(folder: Path, i: int, pairs: Sequence[Sequence[Any]], noise: torch.Tensor, targets: torch.Tensor) -> None:
    """Shard ``i`` (noise, targets, and its (prompt, seed) rows as metadata), written to a temporary file
    and renamed into place, so an interrupted build never leaves half a shard."""
    tmp = folder / (shard_name(i) + ".tmp")
    save_file({"noise": noise.contiguous(), "target": targets.contiguous()}, str(tmp),
              metadata={"rows": json.dumps([list(p) for p in pairs])})
    os.replace(tmp, folder / shard_name(i))


def build_dataset(
    model: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    *,
    prompt_file_sha256: str,
    guidance: float | None = None,
    reference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    shard_size: int = 32,
    batch_size: int = 16,
    store: Any = None,
    name: str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    wait: Any = None,
    progress: bool = True,
    pairing: str = "product",
) -> DatasetIndex:
    """Build (or finish) the dataset in ``out``; returns its index. See the module docstring.

    ``wait`` is called between the shard phase and the index phase (``accelerator.wait_for_everyone``).
    """
    from tqdm.auto import tqdm

    from refine.full_step import DEFAULT_STEPS, FULL_STEP_SOLVER, check_full_steps, sample_full_step
    from store.noise import make_noise

    reference_steps = check_full_steps(DEFAULT_STEPS if reference_steps is None else reference_steps, "reference_steps")
    guidance = check_build_arguments(model, prompts, seeds, shard_size, batch_size, pairing, guidance)
    height, width = height or model.default_size[0], width or model.default_size[1]
    model.check_size(height, width)
    shape = list(model.latent_shape(height, width))

    folder = Path(out)
    index = DatasetIndex(
        model_id=model.model_id, reference_solver=FULL_STEP_SOLVER, reference_steps=reference_steps,
        guidance=float(guidance), height=height, width=width, negative_prompt=negative_prompt, latent_shape=shape,
        prompt_file_sha256=prompt_file_sha256, prompts=list(prompts), seeds=[int(s) for s in seeds], shard_size=shard_size,
        pairing=pairing,
    )
    open_dataset_folder(folder, index, write_index=process_index == 0)

    mine = [i for i in range(index.num_shards) if i % num_processes == process_index]
    todo = [i for i in mine if _shard_rows(folder / shard_name(i)) != [list(p) for p in index.pairs(i)]]
    logger.info("dataset %s: %d shards, %d already built, %d to build", folder, len(mine), len(mine) - len(todo), len(todo))
    bar = tqdm(total=sum(len(index.pairs(i)) for i in todo), desc="targets", unit="img", disable=not progress)
    for i in todo:
        pairs = index.pairs(i)
        noise = torch.stack([make_noise(seed, shape) for _, seed in pairs])
        targets = []
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo : lo + batch_size]
            cond = model.encode_prompts([p for p, _ in chunk], negative_prompt)
            x0 = sample_full_step(model, cond, noise[lo : lo + len(chunk)], guidance, reference_steps)
            targets.append(x0.float().cpu())
            bar.update(len(chunk))
        write_shard(folder, i, pairs, noise, torch.cat(targets))
    bar.close()
    if wait is not None:
        wait()
    index.shards = [shard_name(i) for i in range(index.num_shards)]
    index.complete = all((folder / s).exists() for s in index.shards)
    if process_index == 0:
        index.write(folder)
        if store is not None and index.complete:
            _register(store, index, folder, name)
    return index


def _register(store: Any, index: DatasetIndex, folder: Path, name: str | None) -> None:
    from store.errors import NotFoundError

    name = name or str(folder.resolve())
    try:
        store.get_dataset(name)
        return  # already indexed by an earlier run of the same build
    except NotFoundError:
        pass
    config = {k: v for k, v in asdict(index).items() if k not in ("prompts", "shards")}
    config["num_pairs"] = index.num_pairs
    store.add_dataset(name, model_id=index.model_id,
                      reference_sampler=f"{index.reference_solver}:{index.reference_steps}",
                      prompt_file_sha256=index.prompt_file_sha256,
                      shard_paths=[str((folder / s).resolve()) for s in index.shards], config=config)


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------
@dataclass
class OfflineDataset:
    """A loaded dataset: rows i = (prompts[i], seeds[i], noise[i], target[i])."""

    index: DatasetIndex
    prompts: list[str]
    seeds: list[int]
    noise: torch.Tensor  # (N, C, h, w) float32
    target: torch.Tensor  # (N, C, h, w) float32, the full-step final latents

    def __len__(self) -> int:
        return len(self.prompts)


def load_dataset(
    folder: str | os.PathLike,
    *,
    model_id: str | None = None,
    reference_solver: str | None = None,
    reference_steps: int | None = None,
) -> OfflineDataset:
    """Read a complete dataset; with ``model_id``/``reference_solver`` given, refuse a mismatch first."""
    index = DatasetIndex.read(folder)
    if model_id is not None or reference_solver is not None:
        index.check_compatible(model_id or index.model_id, reference_solver or index.reference_solver, reference_steps)
    elif not index.complete:
        raise ValueError("dataset is incomplete (its build was interrupted); rerun the same build command to finish it")
    noise, target, rows = [], [], []
    for i, name in enumerate(index.shards):
        path = Path(folder) / name
        with safe_open(str(path), "pt") as f:
            shard_rows = json.loads((f.metadata() or {}).get("rows", "null"))
            if shard_rows != [list(p) for p in index.pairs(i)]:
                raise ValueError(f"dataset: shard {str(path)!r} does not hold the rows its index lists")
            noise.append(f.get_tensor("noise"))
            target.append(f.get_tensor("target"))
        rows.extend(shard_rows)
    return OfflineDataset(index=index, prompts=[r[0] for r in rows], seeds=[int(r[1]) for r in rows],
                          noise=torch.cat(noise), target=torch.cat(target))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", required=True, help="prompt file, one prompt per line")
    parser.add_argument("--seeds", default="0-3", help="seeds, e.g. 0-63 or 0,5,9 (every prompt gets every seed)")
    parser.add_argument("--pairing", choices=("product", "zip"), default="product",
                        help="product: every prompt x every seed; zip: prompt i with seed i (one seed per prompt)")
    parser.add_argument("--out", required=True, help="dataset folder (resumed if it exists)")
    add_model_options(parser)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--reference-steps", type=int, default=None, help="full-step sampler steps (default: refine's 40)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    add_db_option(parser, dest="store", help="SQLite store for the dataset index ('' = none; default path if omitted)")
    parser.add_argument("--name", default=None, help="dataset name in the store (default: the folder's absolute path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    prompts = read_prompts(args.prompts)  # bad input fails before any model is loaded
    seeds = parse_int_list(args.seeds, "seeds", 0, 2**32 - 1)
    check_pairing(prompts, seeds, args.pairing)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if model is None:
        from runtime.cli import model_from_args

        model = model_from_args(args, device=accelerator.device if torch.cuda.is_available() else None)
    store = _open_store(args.store) if accelerator.is_main_process else None
    index = build_dataset(
        model, prompts, seeds, args.out, prompt_file_sha256=sha256_file(args.prompts), guidance=args.guidance,
        reference_steps=args.reference_steps, negative_prompt=args.negative_prompt, shard_size=args.shard_size,
        batch_size=args.batch_size, store=store, name=args.name, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, wait=accelerator.wait_for_everyone,
        progress=accelerator.is_local_main_process, pairing=args.pairing,
    )
    if accelerator.is_main_process:
        print(json.dumps({"out": str(args.out), "pairs": index.num_pairs, "shards": len(index.shards),
                          "complete": index.complete, "model": index.model_id,
                          "reference": f"{index.reference_solver}:{index.reference_steps}"}))
    return 0


def _open_store(path: str | None) -> Any:
    if path == "":
        return None
    from store import open_store

    return open_store(path)


if __name__ == "__main__":
    sys.exit(main())
