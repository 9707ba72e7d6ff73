"""Evaluation CLI: the JSON schema, NFE accounting, the zero-initialised policy equals its base rule, the
summary (adherence K, step saving K'), the plot, and bad input refused before any model call."""

import json
import math

import pytest
import torch

from solver.policy import ConsistencyPolicy
from tests.training_fakes import GaussianDenoiser, write_prompts
from training.evaluate import evaluate, main, resolve_solvers, summarize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_command_line_json_table_and_plot(tmp_path, capsys):
    write_prompts(tmp_path / "p.txt", 2)
    ConsistencyPolicy().save(tmp_path / "zero")
    rc = main(["--prompts", str(tmp_path / "p.txt"), "--seeds", "0-1", "--steps", "3,4", "--reference-steps", "12",
               "--solvers", f"consistency:{tmp_path / 'zero'},rule:dpm2m,ddim,plms", "--db", "",
               "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "out.png")], model=GaussianDenoiser())
    assert rc == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["model"] == "fake-gaussian" and doc["reference"] == {"solver": "dpm2m", "steps": 12}
    assert "--db '' --json" in doc["command"]  # the command re-runs as recorded, empty arguments included
    rows = {(r["solver"], r["steps"]): r for r in doc["results"]}
    assert len(rows) == 8 and {"psnr", "ssim", "gms", "nfe"} <= set(rows[("ddim", 3)])
    assert rows[("plms", 3)]["nfe"] == 4 and rows[("ddim", 3)]["nfe"] == 3  # PNDM repeats one timestep
    zero = rows[(f"consistency:{tmp_path / 'zero'}", 4)]
    assert zero["psnr"] == pytest.approx(rows[("rule:dpm2m", 4)]["psnr"], abs=1e-4)  # zero-init = base rule
    assert rows[("rule:dpm2m", 4)]["psnr"] > rows[("ddim", 4)]["psnr"]  # a second-order rule beats DDIM here
    assert (tmp_path / "out.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| solver | K | NFE | psnr | ssim | gms |" in out


def test_summary_adherence_k_and_step_saving():
    def row(s, k, psnr, adh):
        return {"solver": s, "steps": k, "nfe": k, "psnr": psnr, "ssim": 0.5, "gms": 0.5, "adherence": adh,
                "verdict_agreement": 90.0}

    doc = {"reference": {"solver": "dpm2m", "steps": 40, "adherence": 90.0}, "results": [
        row("consistency", 3, 20.0, 85.0), row("consistency", 4, 24.0, 88.5), row("consistency", 6, 27.0, 90.0),
        row("unipc", 3, 18.0, 70.0), row("unipc", 4, 21.0, 80.0), row("unipc", 6, 24.5, 89.0),
        row("ddim", 3, 15.0, 60.0), row("ddim", 4, 17.0, 70.0), row("ddim", 6, 20.0, 80.0)]}
    s = summarize(doc)
    assert s["adherence_within_2_points"] == {"consistency": 4, "unipc": 6, "ddim": None}
    psnr = s["step_saving"]["psnr"]
    assert psnr["k_prime"] == 6 and psnr["per_baseline"] == {"unipc": 6, "ddim": None}
    assert psnr["step_saving"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["vs_best_baseline"]["4"]["psnr"]["margin"] == pytest.approx(3.0)


def test_judge_gives_adherence_and_verdict_agreement():
    model = GaussianDenoiser()
    solvers = resolve_solvers(["ddim"], model)
    calls = []

    def judge(images, prompts):  # a stand-in analyzer: bright is "right"; 0.286 splits prompt "b"'s references
        ok = images.mean((1, 2, 3)) > 0.286  # (0.285..0.288) from its 2-step previews (0.276..0.277)
        calls.append(ok)
        return ok

    doc = evaluate(model, ["a", "b", "c"], [0, 1, 2], [2], solvers, reference_steps=8, judge=judge, progress=False)
    r = doc["results"][0]
    ref, prev = calls  # the references are judged once, then each (solver, K)'s previews
    assert int(ref.sum()) != int(prev.sum()) and bool((ref != prev).any())  # the counts below say something
    assert doc["reference"]["adherence"] == pytest.approx(100 * float(ref.float().mean()))
    assert r["adherence"] == pytest.approx(100 * float(prev.float().mean()))
    assert r["verdict_agreement"] == pytest.approx(100 * float((ref == prev).float().mean()))
    assert r["verdict_flips"] == {"lost": int((ref & ~prev).sum()), "gained": int((~ref & prev).sum())}


def test_paired_verdicts_count_discordant_pairs_and_test_them():
    from training.evaluate import paired_verdicts

    ours = torch.tensor([True] * 12 + [False] * 2 + [True] * 6)
    theirs = torch.tensor([False] * 12 + [True] * 2 + [True] * 6)
    out = paired_verdicts(ours, theirs)
    assert (out["only_ours"], out["only_baseline"]) == (12, 2)
    assert out["p_value"] == pytest.approx(2 * sum(math.comb(14, i) for i in range(3)) / 2**14)  # 0.0129
    tie = paired_verdicts(ours, ours)
    assert (tie["only_ours"], tie["only_baseline"], tie["p_value"]) == (0, 0, 1.0)


def test_consistency_rows_carry_the_paired_comparison_with_each_baseline(tmp_path):
    ConsistencyPolicy().save(tmp_path / "zero")
    model = GaussianDenoiser()
    solvers = resolve_solvers([f"consistency:{tmp_path / 'zero'}", "ddim", "rule:dpm2m"], model)
    judge = lambda images, prompts: images.mean((1, 2, 3)) > 0.5  # noqa: E731  a stand-in analyzer
    doc = evaluate(model, ["a", "b", "c"], [0, 1, 2], [2, 3], solvers, reference_steps=8, judge=judge, progress=False)
    rows = {(r["solver"], r["steps"]): r for r in doc["results"]}
    for k in (2, 3):
        paired = rows[(f"consistency:{tmp_path / 'zero'}", k)]["verdict_paired"]
        assert set(paired) == {"ddim", "rule:dpm2m"}
        for b, v in paired.items():  # the discordant split is the difference of the two agreements, in pairs
            diff = 9 * (rows[(f"consistency:{tmp_path / 'zero'}", k)]["verdict_agreement"] - rows[(b, k)]["verdict_agreement"]) / 100
            assert v["only_ours"] - v["only_baseline"] == round(diff)
        for v in paired.values():  # each seed's discordant pairs add up to the totals
            assert set(v["by_seed"]) == {"0", "1", "2"}
            assert [sum(c[i] for c in v["by_seed"].values()) for i in (0, 1)] == [v["only_ours"], v["only_baseline"]]
        zero = {"0": [0, 0], "1": [0, 0], "2": [0, 0]}  # the zero policy is its base rule
        assert paired["rule:dpm2m"] == {"only_ours": 0, "only_baseline": 0, "p_value": 1.0, "by_seed": zero}
    assert "verdict_paired" not in rows[("ddim", 2)]


def test_verdict_flips_count_each_way_and_the_fields_that_changed():
    from training.evaluate import verdict_flips

    ref_ok, ok = torch.tensor([True, True, False, False, True]), torch.tensor([True, False, True, False, False])
    read = lambda c, s, b: {"main_colour": c, "main_shape": s, "background": b}  # noqa: E731
    ref = [read("red", "star", "blue"), read("red", "star", "blue"), read("red", "disc", "blue"),
           read("red", "star", "blue"), read("green", "square", "white")]
    prev = [read("red", "circle", "blue"),  # not flipped: its shape change is not counted
            read("red", "circle", "blue"),  # lost: shape
            read("red", "star", "blue"),  # gained: shape
            read("blue", "star", "blue"),  # not flipped
            read("red", "square", "black")]  # lost: colour and background
    assert verdict_flips(ref_ok, ok, ref, prev) == {"lost": 2, "gained": 1, "main_colour": 1, "main_shape": 2,
                                                    "background": 1}
    assert verdict_flips(ref_ok, ok, None, None) == {"lost": 2, "gained": 1}


def test_the_analyzer_judge_reports_what_it_read():
    from models.embedded import analyzer
    from models.embedded.scenes import Scene, SceneObject, render
    from training.evaluate import analyzer_judge

    img = torch.tensor(render(Scene("blue", (SceneObject("star", "red", 0.62, 0.5, 0.5),)))).permute(2, 0, 1) / 255.0
    ok, readings = analyzer_judge(analyzer)(torch.stack([img, img]), ["a red star on a blue background",
                                                                     "a red circle on a blue background"])
    assert ok.tolist() == [True, False]
    assert readings == [{"main_colour": "red", "main_shape": "star", "background": "blue"}] * 2


def test_bad_input_before_any_model_call(tmp_path):
    write_prompts(tmp_path / "p.txt", 2)
    (tmp_path / "empty.txt").write_text("")
    model = GaussianDenoiser()
    base = ["--seeds", "0", "--json", str(tmp_path / "o.json"), "--db", ""]
    cases = [
        (["--prompts", str(tmp_path / "empty.txt")], "prompts"),
        (["--prompts", str(tmp_path / "p.txt"), "--steps", "0,4"], "steps must be in 1..50"),
        (["--prompts", str(tmp_path / "p.txt"), "--steps", "4,51"], "steps must be in 1..50"),
        (["--prompts", str(tmp_path / "p.txt"), "--solvers", "ddim,heun9"], "unknown solver"),
        (["--prompts", str(tmp_path / "p.txt"), "--measures", "depth", "--reward-weights", f"depth={tmp_path}/x"], "depth"),
        (["--prompts", str(tmp_path / "p.txt"), "--solvers", f"consistency:{tmp_path}/nowhere"], "no policy checkpoint"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            main(base + extra, model=model)
    assert model.calls == 0 and not (tmp_path / "o.json").exists()


def _write_tuned(path, model_id: str, steps=(3, 4)):
    from solver.registry import scheduler_identity
    from tests.training_fakes import SCHEDULER_CONFIG

    names = {"unipc": "unipc[solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]",
             "ddim": "ddim[timestep_spacing=leading]"}
    best = {f: {str(k): {"name": n, "psnr": 30.0 - i, "ssim": 0.9} for k in steps} for i, (f, n) in enumerate(names.items())}
    best["best"] = {str(k): {"family": "unipc", **best["unipc"][str(k)]} for k in steps}
    path.write_text(json.dumps({"model": model_id, "scheduler": scheduler_identity(SCHEDULER_CONFIG),
                                "steps": list(steps), "best": best}))
    return path


def test_comparison_row_is_the_best_tuned_baseline_with_paired_intervals(tmp_path, capsys):
    write_prompts(tmp_path / "p.txt", 3)
    ConsistencyPolicy().save(tmp_path / "zero")
    tuned = _write_tuned(tmp_path / "tuned.json", "fake-gaussian")
    rc = main(["--prompts", str(tmp_path / "p.txt"), "--seeds", "0-2", "--steps", "3,4", "--reference-steps", "12",
               "--solvers", f"consistency:{tmp_path / 'zero'},tuned,ddim,unipc[solver_order=1,timestep_spacing=leading]",
               "--tuned-file", str(tuned), "--store", "", "--json", str(tmp_path / "out.json")], model=GaussianDenoiser())
    assert rc == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["solver"], r["steps"]): r for r in doc["results"]}
    assert {"tuned:best", "tuned:unipc", "tuned:ddim", "unipc[solver_order=1,timestep_spacing=leading]"} <= {s for s, _ in rows}
    assert rows[("tuned:best", 4)]["config"] == "unipc[solver_order=1,timestep_spacing=leading,final_sigmas_type=sigma_min]"
    ours = rows[(f"consistency:{tmp_path / 'zero'}", 4)]
    p = ours["paired"]["tuned:best"]["psnr"]
    assert p["n"] == 9 and p["ci95"][0] <= p["mean_diff"] <= p["ci95"][1]
    assert p["mean_diff"] == pytest.approx(ours["psnr"] - rows[("tuned:best", 4)]["psnr"], abs=1e-4)
    assert doc["summary"]["vs_best_tuned"]["4"]["psnr"]["mean_diff"] == p["mean_diff"]
    assert "vs best tuned (unipc[" in capsys.readouterr().out


def test_a_tuned_file_for_another_model_or_k_range_is_refused_before_any_model_call(tmp_path):
    write_prompts(tmp_path / "p.txt", 2)
    model = GaussianDenoiser()
    base = ["--prompts", str(tmp_path / "p.txt"), "--seeds", "0", "--json", str(tmp_path / "o.json"), "--store", "",
            "--solvers", "ddim,tuned"]
    with pytest.raises(ValueError, match="tuned for model 'another'"):
        main(base + ["--steps", "3", "--tuned-file", str(_write_tuned(tmp_path / "a.json", "another"))], model=model)
    with pytest.raises(ValueError, match="not K = \\[5\\]"):
        main(base + ["--steps", "3,5", "--tuned-file", str(_write_tuned(tmp_path / "b.json", "fake-gaussian"))], model=model)
    with pytest.raises(ValueError, match="no file"):
        main(base + ["--steps", "3", "--tuned-file", str(tmp_path / "missing.json")], model=model)
    assert model.calls == 0 and not (tmp_path / "o.json").exists()


def test_a_built_dataset_is_evaluated_against_its_stored_targets(tmp_path):
    """--dataset: the dataset's rows are the pairs and its stored full-step targets the references, so the
    full-step sampler itself at the dataset's step count matches them exactly, and a row's target changed on
    disk shows in that row's per-pair measure only."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from training.dataset import build_dataset, read_prompts, shard_name

    prompts = read_prompts(write_prompts(tmp_path / "p.txt", 2))
    build_dataset(GaussianDenoiser(), prompts, [3, 4, 5], tmp_path / "ds", prompt_file_sha256="0" * 64,
                  reference_steps=6, shard_size=8, progress=False, pairing="product")
    argv = ["--dataset", str(tmp_path / "ds"), "--steps", "3,6", "--solvers", "dpm2m,ddim", "--db", "",
            "--json", str(tmp_path / "out.json")]
    assert main(argv, model=GaussianDenoiser()) == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["pairs"] == [[p, s] for p in prompts for s in (3, 4, 5)] and doc["reference"]["steps"] == 6
    rows = {(r["solver"], r["steps"]): r for r in doc["results"]}
    assert min(rows[("dpm2m", 6)]["per_pair"]["psnr"]) > 60 and rows[("ddim", 3)]["psnr"] < 60
    shard = tmp_path / "ds" / shard_name(0)
    tensors = load_file(str(shard))
    tensors["target"][4] += 0.5
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(shard), metadata=metadata)
    assert main(argv, model=GaussianDenoiser()) == 0
    rows = {(r["solver"], r["steps"]): r for r in json.loads((tmp_path / "out.json").read_text())["results"]}
    per_pair = rows[("dpm2m", 6)]["per_pair"]["psnr"]
    assert per_pair[4] < 40 and min(per_pair[:4] + per_pair[5:]) > 60
    with pytest.raises(ValueError, match="prompts: give a prompt .* or a dataset"):
        main(["--dataset", str(tmp_path / "ds"), "--prompts", str(tmp_path / "p.txt"), "--json", "x.json"])
    with pytest.raises(ValueError, match="reference_steps: the dataset fixes it"):
        main(["--dataset", str(tmp_path / "ds"), "--reference-steps", "5", "--json", "x.json"])
