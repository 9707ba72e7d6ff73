"""The offline dataset: (prompt, seed, noise, full-step target latent), built with refine's full-step sampler.

Layout of a dataset folder::

    index.json                 model id, reference sampler + steps, guidance, size, prompt-file sha256,
                               the (prompt, seed) list and the shards
    shard-00000.safetensors    noise (N, C, h, w) and target (N, C, h, w) float32; metadata: its rows
    images/<sha256>.png        editing datasets only: each distinct input image once, named by the
                               sha256 of its PNG bytes

An editing model (``model.takes_image``, FLUX.1 Kontext) is trained on (input image, instruction, seed)
rows: ``images`` is a folder of input images (read by ``runtime.images.as_input_image``, the app's rules:
modes, pixel limit), the prompt file holds the instructions, and every image crosses every instruction
(image-major); ``pairing`` then crosses those (image, instruction) items with the seeds exactly as it
crosses prompts with seeds. Files with the same pixels are one image (stored once; ``image_sources``
maps each file name to its hash). A row is (instruction, seed, image sha256); its target is the
full-step sample conditioned on its image (``model.image_conditioning``). A dataset has ONE output size:
``--height/--width`` if given, else ``model.default_size_for(image, keep_image_size)``, which must be
the same for every image (a clear error otherwise; rows of different sizes could not share a batch).

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
    python -m training.dataset --model KONTEXT_DIR --images FOLDER --instructions FILE --seeds 0-7 --out DIR \
        [--keep-image-size | --height H --width W]
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
from runtime.images import DEFAULT_MAX_INPUT_PIXELS

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SCHEMA_VERSION = 1
MAX_SEED_RANGE = 100_000
IMAGES_DIR = "images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
# Input images (editing datasets)
# ------------------------------------------------------------------------------------------------
def png_bytes(image: Any) -> bytes:
    """An RGB image's PNG encoding (no metadata): the bytes a dataset stores and names by their sha256."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class InputImages:
    """The distinct input images of an image folder: ``hashes`` in order of first appearance (file names
    sorted), ``images``/``png`` by hash, and ``sources``: every file name -> its image's hash."""

    hashes: list[str]
    images: dict[str, Any]
    png: dict[str, bytes]
    sources: dict[str, str]


def images_from_args(args: Any, sized: str) -> InputImages | None:
    """``--images`` read (:func:`read_image_folder`), or None; without it the edit-size flags (``--keep-image-size``,
    ``--height``, ``--width``) are refused naming the flag (``sized``: what they would size, for the message)."""
    if args.images is not None:
        return read_image_folder(args.images)
    for flag, value in (("keep_image_size", args.keep_image_size), ("height", args.height), ("width", args.width)):
        if value:
            raise ValueError(f"{flag}: sets {sized}; it needs --images")
    return None


def read_image_folder(folder: str | os.PathLike, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> InputImages:
    """Every file of ``folder`` with an image suffix (sorted by name), read by the app's rules
    (``runtime.images.as_input_image``); files with the same pixels are one image. A ValueError naming
    the field ``images`` and the file otherwise."""
    from runtime.images import InputImageError, as_input_image

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"images: {str(folder)!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"images: folder {str(folder)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    out = InputImages(hashes=[], images={}, png={}, sources={})
    for f in files:
        try:
            image = as_input_image(f, max_pixels)
        except InputImageError as err:
            reason = str(err).removeprefix("image: ")
            raise ValueError(f"images: {f.name}: {reason}") from None
        data = png_bytes(image)
        sha = hashlib.sha256(data).hexdigest()
        out.sources[f.name] = sha
        if sha not in out.images:
            out.hashes.append(sha)
            out.images[sha], out.png[sha] = image, data
    if len(out.hashes) < len(files):
        logger.info("images: %d files hold %d distinct images (each stored once)", len(files), len(out.hashes))
    return out


def check_images_for_model(model: Any, images: InputImages | None) -> None:
    """An editing model needs input images, a text-to-image model refuses them (a ValueError naming ``images``)."""
    takes_image = bool(getattr(model, "takes_image", False))
    if takes_image and images is None:
        raise ValueError(f"images: {model.model_id} is an editing model; give a folder of input images "
                         "(--images FOLDER), each edited by every instruction")
    if not takes_image and images is not None:
        raise ValueError(f"images: {model.model_id} is a text-to-image model and takes no input image; "
                         "drop --images (or load an editing model)")


def edit_size(model: Any, images: InputImages, height: int | None, width: int | None,
              keep_image_size: bool = False) -> tuple[int, int]:
    """The one output size of an editing dataset: (height, width) if given (both), else
    ``model.default_size_for(image, keep_image_size)``, which must agree for every image."""
    if (height is None) != (width is None):
        raise ValueError("height: give both height and width, or neither (the size then follows the images)")
    if height is not None and width is not None:
        model.check_size(height, width)
        return height, width
    sizes = {sha: model.default_size_for(images.images[sha], keep_image_size) for sha in images.hashes}
    if len(set(sizes.values())) > 1:
        names = {sha: name for name, sha in reversed(images.sources.items())}
        listed = ", ".join(f"{names[sha]} -> {h}x{w}" for sha, (h, w) in sizes.items())
        raise ValueError(f"images: a dataset has one output size, but these images give different sizes ({listed}); "
                         "pass --height and --width, or use images of one aspect ratio (and one size with "
                         "--keep-image-size)")
    return sizes[images.hashes[0]]


def condition_on_images(model: Any, cond: Any, images: Sequence[Any], height: int, width: int) -> Any:
    """Row j of ``cond`` conditioned on ``images[j]`` (``model.image_conditioning`` per row, then
    ``Conditioning.cat``; the model caches each image's encoding)."""
    from models.base import Conditioning

    if len(images) != len(cond):
        raise ValueError(f"images: {len(images)} images for {len(cond)} conditioning rows")
    return Conditioning.cat([model.image_conditioning(cond.select([j]), image, height, width)
                             for j, image in enumerate(images)])


def write_images(folder: Path, images: InputImages) -> None:
    """``images/<sha256>.png`` for every distinct input image not yet there (temporary name, then renamed)."""
    target = folder / IMAGES_DIR
    target.mkdir(exist_ok=True)
    for sha in images.hashes:
        path = target / f"{sha}.png"
        if path.exists() and sha256_file(path) == sha:
            continue
        tmp = target / f"{sha}.png.tmp"
        tmp.write_bytes(images.png[sha])
        os.replace(tmp, path)


def read_dataset_images(folder: str | os.PathLike, hashes: Sequence[str]) -> dict[str, Any]:
    """The stored input images of a dataset by hash, each checked against its sha256."""
    import io

    from PIL import Image

    out = {}
    for sha in hashes:
        path = Path(folder) / IMAGES_DIR / f"{sha}.png"
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"dataset: input image {str(path)!r} is missing ({err})") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise ValueError(f"dataset: input image {str(path)!r} does not match its sha256 (the file was changed)")
        out[sha] = Image.open(io.BytesIO(data)).convert("RGB")
    return out


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
    images: list[str] = field(default_factory=list)  # editing: the distinct input images' sha256; prompts = instructions
    image_sources: dict[str, str] = field(default_factory=dict)  # editing: file name in the image folder -> sha256

    @property
    def items(self) -> list[tuple[Any, ...]]:
        """What pairing crosses with the seeds: (prompt,) each, or for an editing dataset (instruction,
        image sha256) for every image x every instruction, image-major."""
        if self.images:
            return [(p, sha) for sha in self.images for p in self.prompts]
        return [(p,) for p in self.prompts]

    @property
    def num_pairs(self) -> int:
        n = len(self.images or [None]) * len(self.prompts)
        return n if self.pairing == "zip" else n * len(self.seeds)

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def pairs(self, shard: int) -> list[tuple[Any, ...]]:
        """The rows of shard ``shard``: (prompt, seed), or (instruction, seed, image sha256) for an editing
        dataset; item-major over items x seeds, or zipped."""
        lo, hi = shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_pairs)
        items = self.items
        if self.pairing == "zip":
            return [(it[0], self.seeds[k], *it[1:]) for k, it in enumerate(items[lo:hi], start=lo)]
        n = len(self.seeds)
        return [(items[k // n][0], self.seeds[k % n], *items[k // n][1:]) for k in range(lo, hi)]

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


def check_pairing(prompts: Sequence[Any], seeds: Sequence[int], pairing: str, what: str = "prompt") -> None:
    """A ValueError unless ``pairing`` is known and, for 'zip', there is one seed per prompt (``what``:
    how the items are called, e.g. "(image, instruction) item" for an editing dataset)."""
    if pairing not in ("product", "zip"):
        raise ValueError(f"pairing must be 'product' or 'zip', got {pairing!r}")
    if pairing == "zip" and len(seeds) != len(prompts):
        raise ValueError(f"seeds: pairing 'zip' gives {what} i seed i, so it needs one seed per {what} "
                         f"({len(prompts)} {what}s), got {len(seeds)} seeds")


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
                          batch_size: int, pairing: str, guidance: float | None,
                          images: InputImages | None = None) -> float:
    """:func:`build_dataset`'s arguments checked before anything is written (a ValueError naming the field);
    returns the guidance to use (the model's default when ``guidance`` is None)."""
    from store.noise import check_seed

    check_images_for_model(model, images)

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not prompts:
        raise ValueError("prompts: no prompt given")
    for s in seeds:
        check_seed(s)
    if images is None:
        check_pairing(prompts, seeds, pairing)
    else:
        check_pairing([(p, h) for h in images.hashes for p in prompts], seeds, pairing, "(image, instruction) item")
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
    images: InputImages | None = None,
    keep_image_size: bool = False,
) -> DatasetIndex:
    """Build (or finish) the dataset in ``out``; returns its index. See the module docstring.

    ``wait`` is called between the shard phase and the index phase (``accelerator.wait_for_everyone``).
    ``images`` (:func:`read_image_folder`): an editing dataset, ``prompts`` then being the instructions;
    its size is :func:`edit_size`'s (``keep_image_size`` as ``model.default_size_for``'s ``keep_size``).
    """
    from tqdm.auto import tqdm

    from refine.full_step import DEFAULT_STEPS, FULL_STEP_SOLVER, check_full_steps, sample_full_step
    from store.noise import make_noise

    reference_steps = check_full_steps(DEFAULT_STEPS if reference_steps is None else reference_steps, "reference_steps")
    guidance = check_build_arguments(model, prompts, seeds, shard_size, batch_size, pairing, guidance, images)
    if images is not None:
        height, width = edit_size(model, images, height, width, keep_image_size)
    height, width = height or model.default_size[0], width or model.default_size[1]
    model.check_size(height, width)
    shape = list(model.latent_shape(height, width))

    folder = Path(out)
    index = DatasetIndex(
        model_id=model.model_id, reference_solver=FULL_STEP_SOLVER, reference_steps=reference_steps,
        guidance=float(guidance), height=height, width=width, negative_prompt=negative_prompt, latent_shape=shape,
        prompt_file_sha256=prompt_file_sha256, prompts=list(prompts), seeds=[int(s) for s in seeds], shard_size=shard_size,
        pairing=pairing, images=list(images.hashes) if images is not None else [],
        image_sources=dict(images.sources) if images is not None else {},
    )
    open_dataset_folder(folder, index, write_index=process_index == 0)
    if images is not None and process_index == 0:
        write_images(folder, images)

    mine = [i for i in range(index.num_shards) if i % num_processes == process_index]
    todo = [i for i in mine if _shard_rows(folder / shard_name(i)) != [list(p) for p in index.pairs(i)]]
    logger.info("dataset %s: %d shards, %d already built, %d to build", folder, len(mine), len(mine) - len(todo), len(todo))
    bar = tqdm(total=sum(len(index.pairs(i)) for i in todo), desc="targets", unit="img", disable=not progress)
    for i in todo:
        pairs = index.pairs(i)
        noise = torch.stack([make_noise(row[1], shape) for row in pairs])
        targets = []
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo : lo + batch_size]
            cond = model.encode_prompts([row[0] for row in chunk], negative_prompt)
            size = None
            if images is not None:  # each row on its own input image; the time grid of the dataset's size
                cond = condition_on_images(model, cond, [images.images[row[2]] for row in chunk], height, width)
                size = (height, width)
            x0 = sample_full_step(model, cond, noise[lo : lo + len(chunk)], guidance, reference_steps, size=size)
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
    config = {k: v for k, v in asdict(index).items() if k not in ("prompts", "shards", "image_sources")}
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
    """A loaded dataset: rows i = (prompts[i], seeds[i], noise[i], target[i]); an editing dataset's row i
    is also conditioned on the input image ``images[image_ids[i]]`` (PIL RGB, by sha256)."""

    index: DatasetIndex
    prompts: list[str]
    seeds: list[int]
    noise: torch.Tensor  # (N, C, h, w) float32
    target: torch.Tensor  # (N, C, h, w) float32, the full-step final latents
    image_ids: list[str] | None = None  # editing: row i's input image sha256
    images: dict[str, Any] = field(default_factory=dict)  # editing: sha256 -> PIL RGB image

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def takes_image(self) -> bool:
        return self.image_ids is not None

    def row_images(self, rows: Sequence[int]) -> list[Any]:
        """The input image of each row (editing datasets)."""
        assert self.image_ids is not None
        return [self.images[self.image_ids[r]] for r in rows]


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
    ds = OfflineDataset(index=index, prompts=[r[0] for r in rows], seeds=[int(r[1]) for r in rows],
                        noise=torch.cat(noise), target=torch.cat(target))
    if index.images:
        ds.image_ids = [r[2] for r in rows]
        ds.images = read_dataset_images(folder, index.images)
    return ds


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, model: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", "--instructions", dest="prompts", required=True,
                        help="prompt file, one prompt per line (for an editing model: the instructions)")
    parser.add_argument("--images", default=None,
                        help="editing models only: folder of input images; every image x every instruction")
    parser.add_argument("--keep-image-size", action="store_true",
                        help="editing: output size = the input's own size (rounded to the model's multiple) "
                             "instead of the model's preferred resolution for its aspect ratio")
    parser.add_argument("--height", type=int, default=None, help="editing: output height (with --width)")
    parser.add_argument("--width", type=int, default=None, help="editing: output width (with --height)")
    parser.add_argument("--seeds", default="0-3", help="seeds, e.g. 0-63 or 0,5,9 (every prompt gets every seed)")
    parser.add_argument("--pairing", choices=("product", "zip"), default="product",
                        help="product: every prompt (editing: every image x instruction item) x every seed; "
                             "zip: item i with seed i (one seed per item)")
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
    images = images_from_args(args, "an editing dataset's size (a text-to-image dataset has the model's default size)")
    if images is None:
        check_pairing(prompts, seeds, args.pairing)
    else:
        check_pairing([(p, h) for h in images.hashes for p in prompts], seeds, args.pairing, "(image, instruction) item")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if model is None:
        from runtime.cli import model_from_args

        model = model_from_args(args, device=accelerator.device if torch.cuda.is_available() else None)
    check_images_for_model(model, images)  # before the store is opened: nothing is written on bad input
    if images is not None:
        edit_size(model, images, args.height, args.width, args.keep_image_size)
    store = _open_store(args.store) if accelerator.is_main_process else None
    index = build_dataset(
        model, prompts, seeds, args.out, prompt_file_sha256=sha256_file(args.prompts), guidance=args.guidance,
        reference_steps=args.reference_steps, negative_prompt=args.negative_prompt, shard_size=args.shard_size,
        batch_size=args.batch_size, store=store, name=args.name, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, wait=accelerator.wait_for_everyone,
        progress=accelerator.is_local_main_process, pairing=args.pairing, images=images,
        height=args.height, width=args.width, keep_image_size=args.keep_image_size,
    )
    if accelerator.is_main_process:
        print(json.dumps({"out": str(args.out), "pairs": index.num_pairs, "shards": len(index.shards),
                          "complete": index.complete, "model": index.model_id, "images": len(index.images),
                          "size": [index.height, index.width],
                          "reference": f"{index.reference_solver}:{index.reference_steps}"}))
    return 0


def _open_store(path: str | None) -> Any:
    if path == "":
        return None
    from store import open_store

    return open_store(path)


if __name__ == "__main__":
    sys.exit(main())
