"""training.pool: evaluations of disjoint prompt sets pooled into the evaluation of their union; inputs that
describe different comparisons refused, naming the field."""

import json

import pytest

from solver.policy import ConsistencyPolicy
from tests.training_fakes import GaussianDenoiser
from training.evaluate import evaluate, resolve_solvers
from training.pool import main, pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _judge(images, prompts):  # a stand-in analyzer whose verdict turns on small differences, so solvers disagree
    return (images.mean((1, 2, 3)) * 1000).floor() % 2 == 0


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    ConsistencyPolicy(base="ab2").save(folder / "ab2")
    model = GaussianDenoiser()
    solvers = resolve_solvers([f"consistency:{folder / 'ab2'}", "ddim", "dpmpp2m"], model)

    def run(prompts):
        return evaluate(model, prompts, [0, 1, 2], [2, 3], solvers, reference_steps=8, judge=_judge, progress=False)

    return run(["a", "b"]), run(["c", "d", "e"]), run(["a", "b", "c", "d", "e"]), f"consistency:{folder / 'ab2'}"


def test_pooling_two_disjoint_evaluations_gives_the_evaluation_of_their_union(docs):
    first, second, union, ours = docs
    pooled = pool([first, second], ["first", "second"])
    rows = {(r["solver"], r["steps"]): r for r in pooled["results"]}
    want = {(r["solver"], r["steps"]): r for r in union["results"]}
    assert set(rows) == set(want) and pooled["pairs"] == 15
    for key, r in rows.items():
        assert r["pairs"] == 15
        for m in ("psnr", "ssim", "gms", "adherence", "verdict_agreement"):
            assert r[m] == pytest.approx(want[key][m], abs=1e-4), (key, m)
    for k in (2, 3):
        r, w = rows[(ours, k)], want[(ours, k)]
        for b in ("ddim", "dpmpp2m"):
            assert r["verdict_paired"][b]["by_seed"] == w["verdict_paired"][b]["by_seed"]
            assert {m: v for m, v in r["verdict_paired"][b].items() if m != "by_seed"} == \
                pytest.approx({m: v for m, v in w["verdict_paired"][b].items() if m != "by_seed"})
            for m in ("psnr", "ssim"):
                assert r["paired"][b][m]["mean_diff"] == pytest.approx(w["paired"][b][m]["mean_diff"], abs=1e-4)
                assert r["paired"][b][m]["ci95"] == pytest.approx(w["paired"][b][m]["ci95"], abs=1e-4)
    first_ours = [x for x in first["results"] if x["solver"] == ours]  # the counts say something: discordant pairs
    assert sum(v["only_ours"] + v["only_baseline"] for x in first_ours for v in x["verdict_paired"].values()) > 0
    # the pooled counts say something: the two sets alone give other agreements than their union
    assert any(first_row["verdict_agreement"] != rows[(first_row["solver"], first_row["steps"])]["verdict_agreement"]
               for first_row in first["results"])


def test_the_command_writes_the_pooled_json_and_prints_the_table(docs, tmp_path, capsys):
    first, second, _, ours = docs
    for name, doc in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(doc))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "pooled.json"),
                 "--baseline", "ddim"]) == 0
    assert json.loads((tmp_path / "pooled.json").read_text())["inputs"] == [str(tmp_path / "a.json"),
                                                                             str(tmp_path / "b.json")]
    out = capsys.readouterr().out
    assert f"| 3 | {ours} |" in out and "only ours" in out


def test_inputs_that_are_not_one_comparison_are_refused_naming_the_field(docs, tmp_path):
    first, second, _, _ = docs
    with pytest.raises(ValueError, match="pairs: .*in both"):
        pool([first, first], ["x", "y"])
    other_ref = {**second, "reference": {**second["reference"], "steps": 40}}
    with pytest.raises(ValueError, match="reference: 'y'"):
        pool([first, other_ref], ["x", "y"])
    retuned = json.loads(json.dumps(second))
    retuned["results"][2]["config"] = "ddim[timestep_spacing=leading]"
    first_tuned = json.loads(json.dumps(first))
    first_tuned["results"][2]["config"] = "ddim"
    with pytest.raises(ValueError, match="config: ddim at K=2"):
        pool([first_tuned, retuned], ["x", "y"])
    stripped = json.loads(json.dumps(second))
    del stripped["results"][0]["per_pair"]
    with pytest.raises(ValueError, match="results: 'y' has no per-pair values"):
        pool([first, stripped], ["x", "y"])
    with pytest.raises(SystemExit, match="reference"):
        (tmp_path / "a.json").write_text(json.dumps(first))
        (tmp_path / "b.json").write_text(json.dumps(other_ref))
        main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
