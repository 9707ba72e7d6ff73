"""Training and evaluation for editing (FLUX.1 Kontext): (image, instruction, seed, full-step target) datasets,
PPO and evaluation conditioned on each row's input image, on a tiny random-weight Kontext at 32 x 32."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.registry import load_model
from refine.full_step import sample_full_step
from store.noise import make_noise
from tests.tiny_flux import save_tiny_kontext
from tests.training_fakes import GaussianDenoiser
from training.dataset import build_dataset, load_dataset, main, read_image_folder, read_prompts

SIZE = 32
INSTRUCTIONS = "make the sky purple\nadd a hat\n"


def picture(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return save_tiny_kontext(tmp_path_factory.mktemp("kontext") / "tiny-kontext")


@pytest.fixture(scope="module")
def model(kontext_dir):
    return load_model(str(kontext_dir), device="cpu")


@pytest.fixture()
def inputs(tmp_path):
    """Two distinct 32 x 32 images and a third file with the first one's pixels (BMP, so other bytes)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(picture(0)).save(folder / "a.png")
    Image.fromarray(picture(1)).save(folder / "b.png")
    Image.fromarray(picture(0)).save(folder / "c-same-as-a.bmp")
    (folder / "notes.txt").write_text("not an image")  # files without an image suffix are not read
    instructions = tmp_path / "instructions.txt"
    instructions.write_text(INSTRUCTIONS)
    return folder, instructions


def test_editing_dataset_stores_each_image_once_and_targets_are_full_step_edits(model, inputs, tmp_path):
    folder, instructions = inputs
    images = read_image_folder(folder)
    index = build_dataset(model, read_prompts(instructions), [0, 1], tmp_path / "ds", prompt_file_sha256="0" * 64,
                          images=images, keep_image_size=True, reference_steps=3, shard_size=8, batch_size=8,
                          progress=False)
    assert (index.height, index.width) == (SIZE, SIZE) and index.num_pairs == 2 * 2 * 2
    assert len(index.images) == 2 and index.image_sources["c-same-as-a.bmp"] == index.image_sources["a.png"]
    stored = sorted((tmp_path / "ds" / "images").iterdir())
    assert [p.name for p in stored] == sorted(f"{sha}.png" for sha in index.images)
    for p in stored:  # each named by the sha256 of its PNG bytes
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.stem

    ds = load_dataset(tmp_path / "ds")
    assert ds.takes_image and ds.image_ids == [index.images[0]] * 4 + [index.images[1]] * 4
    assert ds.prompts[:4] == ["make the sky purple"] * 2 + ["add a hat"] * 2 and ds.seeds[:4] == [0, 1, 0, 1]
    by_name = {"a.png": Image.fromarray(picture(0)), "b.png": Image.fromarray(picture(1))}
    for i in range(len(ds)):  # every row of the one mixed batch: its own image, at the dataset's size
        image = by_name["a.png" if ds.image_ids[i] == index.image_sources["a.png"] else "b.png"]
        cond = model.image_conditioning(model.encode_prompts([ds.prompts[i]]), image, SIZE, SIZE)
        noise = make_noise(ds.seeds[i], model.latent_shape(SIZE, SIZE))[None]
        assert torch.equal(ds.noise[i], noise[0])
        direct = sample_full_step(model, cond, noise, index.guidance, 3, size=(SIZE, SIZE))[0]
        assert (ds.target[i] - direct).abs().max().item() < 1e-5
    assert (ds.target[0] - ds.target[4]).abs().max().item() > 1e-3  # same instruction and seed, other image

    (tmp_path / "ds" / "images" / stored[0].name).write_bytes(b"changed")
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_dataset(tmp_path / "ds")


def test_bad_editing_inputs_name_the_field_and_write_nothing(model, inputs, tmp_path):
    folder, instructions = inputs
    out = tmp_path / "out"

    def build(argv, with_model=model):
        return main(["--instructions", str(instructions), "--seeds", "0", "--out", str(out), "--db", "", *argv],
                    model=with_model)

    with pytest.raises(ValueError, match="images: fake-gaussian is a text-to-image model"):
        build(["--images", str(folder)], with_model=GaussianDenoiser())
    with pytest.raises(ValueError, match="images: .* is an editing model; give a folder of input images"):
        build([])
    with pytest.raises(ValueError, match="keep_image_size: .* needs --images"):
        build(["--keep-image-size"], with_model=GaussianDenoiser())
    with pytest.raises(ValueError, match="height: give both"):
        build(["--images", str(folder), "--height", "32"])
    with pytest.raises(ValueError, match="seeds: pairing 'zip' .*\\(4 \\(image, instruction\\) items"):
        main(["--instructions", str(instructions), "--images", str(folder), "--seeds", "0", "--pairing", "zip",
              "--out", str(out)])  # before any model is loaded
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(picture(0)).save(wide / "square.png")
    Image.fromarray(picture(2, SIZE, 2 * SIZE)).save(wide / "wide.png")
    with pytest.raises(ValueError, match="images: a dataset has one output size.*square.png -> 32x32.*wide.png -> 32x64"):
        build(["--images", str(wide), "--keep-image-size"])
    cmyk = tmp_path / "cmyk"
    cmyk.mkdir()
    Image.new("CMYK", (SIZE, SIZE)).save(cmyk / "print.jpg")
    with pytest.raises(ValueError, match="images: print.jpg: mode CMYK is refused"):
        build(["--images", str(cmyk)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="images: .* holds no image"):
        build(["--images", str(tmp_path / "empty")])
    assert not out.exists()


def test_ppo_and_evaluation_on_an_editing_dataset(model, kontext_dir, inputs, tmp_path, capsys):
    """The training CLIs end to end: an editing dataset, two PPO updates whose rollouts are conditioned on each
    row's image (checked against a direct computation), and the evaluation JSON and plot."""
    from solver.sampling import sample_lmm
    from training import evaluate as evaluate_cli
    from training import train as train_cli
    from training.config import TrainConfig
    from training.rewards import get_similarity
    from training.train import prepare

    folder, instructions = inputs
    common = ["--model", str(kontext_dir), "--db", ""]
    assert main(["--instructions", str(instructions), "--images", str(folder), "--seeds", "0", "--keep-image-size",
                 "--out", str(tmp_path / "data"), "--reference-steps", "4", *common], model=model) == 0
    capsys.readouterr()
    assert train_cli.main(["--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "ppo"), "--num-updates", "2",
                           "--group-size", "2", "--groups-per-update", "2", "--min-steps", "2", "--max-steps", "3",
                           "--reward", "psnr", *common], model=model) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["deterministic_reward"]) == {"2", "3"} and out["update"] == 1  # 0-based index of the last update
    assert (tmp_path / "ppo" / "checkpoint-00002" / "trainer_state.json").is_file()
    assert (tmp_path / "ppo" / "final" / "train_config.json").is_file()

    # the trainer's deterministic reward = the policy's few-step edit of each row's own image, at the dataset's
    # size (its time grid), against the row's target
    trainer = prepare(TrainConfig(dataset=str(tmp_path / "data"), out=str(tmp_path / "x"), reward="psnr",
                                  init_from=out["final_dir"], min_steps=2, max_steps=3, store=""), model=model)
    rows = torch.arange(len(trainer.ds))
    got = trainer.deterministic_reward(rows, [3])["3"]
    schedule = trainer._schedule_for_size(model, trainer.ds)
    assert schedule.grid(3).timesteps.tolist() != model.schedule.grid(3).timesteps.tolist()  # 32x32 is not 256x256
    grid = trainer.policy.time_grid(schedule, 3)
    sim = get_similarity("psnr")
    want = []
    for r in rows.tolist():
        cond = model.image_conditioning(model.encode_prompts([trainer.ds.prompts[r]]), trainer.ds.row_images([r])[0],
                                        SIZE, SIZE)
        x = sample_lmm(lambda x, t, cond=cond: model.guided_eps(x, t, cond, trainer.guidance), trainer.ds.noise[r : r + 1], grid,
                       trainer.policy.coefficient_table(grid))
        want.append(sim.compare(sim.features(model.decode(trainer.ds.target[r : r + 1])),
                                sim.features(model.decode(x))))
    assert abs(got - float(torch.cat(want).mean())) < 1e-3
    with torch.no_grad():  # rollouts of a policy with (almost) no noise are the deterministic edits above
        trainer.policy.log_std.fill_(-30.0)
    bucket = trainer.rollout(3, rows, update=0)
    per_row = bucket.rewards.view(len(rows), trainer.cfg.group_size).mean(1)
    assert (per_row - torch.cat(want)).abs().max().item() < 1e-2

    assert evaluate_cli.main(["--instructions", str(instructions), "--images", str(folder), "--seeds", "0",
                              "--keep-image-size", "--steps", "2,4", "--reference-steps", "4",
                              "--solvers", f"consistency:{out['final_dir']},dpm2m,euler", "--json",
                              str(tmp_path / "eval.json"), "--plot", str(tmp_path / "eval.png"), *common],
                             model=model) == 0
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["size"] == [SIZE, SIZE] and doc["num_images"] == 2 and len(doc["pairs"]) == 4
    assert {p[2] for p in doc["pairs"]} == set(doc["images"]["sha256"])
    rows = {(r["solver"].split(":")[0], r["steps"]): r for r in doc["results"]}
    assert set(rows) == {(s, k) for s in ("consistency", "dpm2m", "euler") for k in (2, 4)}
    assert all(len(r["per_pair"]["psnr"]) == 4 and r["psnr"] > 5 for r in rows.values())
    # dpm2m at K = the reference's steps IS the reference: same solver, same per-size grid, same images
    assert rows[("dpm2m", 4)]["psnr"] > 60 and rows[("euler", 4)]["psnr"] < rows[("dpm2m", 4)]["psnr"]
    assert (tmp_path / "eval.png").stat().st_size > 0

    # on the built dataset: its rows are the pairs, its stored targets the references
    assert evaluate_cli.main(["--dataset", str(tmp_path / "data"), "--steps", "4", "--solvers", "dpm2m,euler",
                              "--json", str(tmp_path / "eval-ds.json"), *common], model=model) == 0
    doc = json.loads((tmp_path / "eval-ds.json").read_text())
    ds = load_dataset(tmp_path / "data")
    assert doc["pairs"] == [[p, s, sha] for p, s, sha in zip(ds.prompts, ds.seeds, ds.image_ids)]
    assert doc["reference"] == {"solver": "dpm2m", "steps": 4} and doc["size"] == [SIZE, SIZE]
    rows = {r["solver"]: r for r in doc["results"]}
    assert rows["dpm2m"]["psnr"] > 60 and rows["euler"]["psnr"] < rows["dpm2m"]["psnr"]
    with pytest.raises(ValueError, match="seeds: the dataset fixes it"):
        evaluate_cli.main(["--dataset", str(tmp_path / "data"), "--seeds", "0", "--json", str(tmp_path / "no.json")])
    assert not (tmp_path / "no.json").exists()
