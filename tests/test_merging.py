"""Post-hoc weight-space methods (evaluation/merging.py) by hand on small trees, and in
`evaluate` over two runs of the tiny world: soups, Model Stock, LiNeS, their export."""
import json
import os

import numpy as np
import pytest

from infusing_jax import checkpoints
from infusing_jax import compare
from infusing_jax import errors
from infusing_jax import evaluate
from infusing_jax.evaluation import merging
from infusing_jax.training import loop
from infusing_jax.training import run_checkpoints
from tests.helpers import train_world


def _tree(*values):
    return {"a": np.array(values[:2], np.float32), "b": {"c": np.array(values[2:], np.float32)}}


def test_uniform_soup_is_the_mean():
    soup = merging.uniform_soup([_tree(1, 2, 3), _tree(3, 4, 5), _tree(2, 0, 1)])
    np.testing.assert_allclose(soup["a"], [2, 2])
    np.testing.assert_allclose(soup["b"]["c"], [3])


def test_greedy_soup_takes_runs_best_first_while_val_strictly_improves():
    """Val score -|theta - 2| on one number: runs 1, 3, 10, 2.5 score -1, -1, -8, -0.5.
    Best first, 2.5; + 1 -> 1.75 (-0.25, kept); + 3 -> 2.17 (-0.17, kept); + 10 -> 4.1 (no)."""
    runs = [{"x": np.float32(v)} for v in (1.0, 3.0, 10.0, 2.5)]
    score = lambda t: -abs(float(t["x"]) - 2.0)
    soup, kept, best = merging.greedy_soup(runs, score)
    assert kept == [3, 0, 1]
    np.testing.assert_allclose(soup["x"], (2.5 + 1 + 3) / 3, rtol=1e-6)
    assert best == pytest.approx(-abs((2.5 + 1 + 3) / 3 - 2))
    # a tie does not enter: the soup of 2 and 2 scores the same as 2 alone
    _, kept, _ = merging.greedy_soup([{"x": np.float32(2)}, {"x": np.float32(2)}], score)
    assert kept == [0]


@pytest.mark.parametrize("d1,d2,t", [
    ((1, 0), (0, 1), 0.0),                                    # orthogonal: theta0
    ((1, 0), (2, 0), 1.0),                                    # aligned: the runs' mean
    ((1, 0), (1, 1), 2 * 0.5 ** 0.5 / (1 + 0.5 ** 0.5)),      # 45 degrees: 2c / (1 + c)
    ((1, 0), (-1, 0.2), 0.0),                                 # apart: clipped, theta0
])
def test_model_stock_ratio_from_the_angle_of_two_updates(d1, d2, t):
    theta0 = {"w": np.array([0.5, -0.5], np.float32)}
    runs = [{"w": theta0["w"] + np.array(d, np.float32)} for d in (d1, d2)]
    merged, ratios = merging.model_stock(theta0, runs)
    assert ratios == {"w": pytest.approx(t, abs=1e-6)}
    mean = (runs[0]["w"] + runs[1]["w"]) / 2
    np.testing.assert_allclose(merged["w"], t * mean + (1 - t) * theta0["w"], rtol=1e-6)


def test_model_stock_with_three_runs_uses_the_mean_pairwise_cosine():
    theta0 = {"w": np.zeros(3, np.float32)}
    runs = [{"w": np.eye(3, dtype=np.float32)[i] + 1} for i in range(3)]  # pairwise cos 5/6
    _, ratios = merging.model_stock(theta0, runs)
    assert ratios["w"] == pytest.approx(3 * (5 / 6) / (1 + 2 * (5 / 6)))
    with pytest.raises(errors.UserError, match="needs >= 2"):
        merging.model_stock(theta0, runs[:1])


def _tower(value, scan=False):
    block = {"Dense_0": {"kernel": np.full((2, 2), value, np.float32)}}
    t = {"embedding": {"kernel": np.full((2,), value, np.float32)},
         "pos_embedding": np.full((1, 2), value, np.float32),
         "MAPHead_0": {"probe": np.full((2,), value, np.float32)},
         "Transformer": {"encoder_norm": {"scale": np.full((2,), value, np.float32)}}}
    if scan:
        t["Transformer"]["encoderblock"] = {"Dense_0": {"kernel": np.full((3, 2, 2), value,
                                                                          np.float32)}}
    else:
        t["Transformer"].update({f"encoderblock_{i}": block for i in range(3)})
    return t


@pytest.mark.parametrize("scan", [False, True])
def test_lines_scales_the_update_by_depth(scan):
    """alpha 0.2, beta 1 - alpha: blocks 0.2, 0.6, 1.0; the input side 0.2, the output 1.0."""
    out = merging.lines(_tower(1.0, scan), _tower(2.0, scan), depth=3, alpha=0.2)
    assert out["embedding"]["kernel"][0] == pytest.approx(1.2)
    assert out["pos_embedding"][0, 0] == pytest.approx(1.2)
    assert out["MAPHead_0"]["probe"][0] == pytest.approx(2.0)
    assert out["Transformer"]["encoder_norm"]["scale"][0] == pytest.approx(2.0)
    if scan:
        np.testing.assert_allclose(out["Transformer"]["encoderblock"]["Dense_0"]["kernel"][:, 0, 0],
                                   [1.2, 1.6, 2.0], rtol=1e-6)
    else:
        for i, want in enumerate((1.2, 1.6, 2.0)):
            assert out["Transformer"][f"encoderblock_{i}"]["Dense_0"]["kernel"][0, 0] == \
                pytest.approx(want)
    same = merging.lines(_tower(1.0, scan), _tower(2.0, scan), depth=3, alpha=1.0)
    np.testing.assert_allclose(same["embedding"]["kernel"], 2.0)


def test_merging_refuses_towers_of_other_shapes():
    with pytest.raises(errors.UserError, match="differ in shape"):
        merging.uniform_soup([{"w": np.zeros(2)}, {"w": np.zeros(3)}])
    with pytest.raises(errors.UserError, match="differ in structure"):
        merging.uniform_soup([{"w": np.zeros(2)}, {"v": np.zeros(2)}])


# ---------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def two_runs(world, tmp_path_factory):
    dirs = []
    for seed in (0, 1):
        c = train_world.world_config(world, "naive", tests="yes")
        c.seed = seed
        c.train.update(num_steps=12, eval_every=0, select_by="in-domain")
        workdir = str(tmp_path_factory.mktemp(f"run{seed}"))
        loop.train_and_evaluate(c, workdir)
        dirs.append(workdir)
    return c, dirs


def test_evaluate_makes_soups_model_stock_and_lines_and_exports_them(world, two_runs,
                                                                     tmp_path):
    c, (first, second) = two_runs
    export = str(tmp_path / "soup.npz")
    results = evaluate.evaluate(c, first, lines_alphas=[0.5], runs=[second], export=export,
                                export_model="greedy_soup")
    assert {"uniform_soup", "greedy_soup", "model_stock", "lines@0.5"} <= set(results["models"])
    assert [p["alpha"] for p in results["lines"]] == [0.5]
    original = checkpoints.load(os.path.join(world, "pretrained.npz"))[0]
    runs = [run_checkpoints.kept_backbone(c, d, original["img"])[1] for d in (first, second)]
    score = evaluate.val_scorer(c, evaluate.backbone_lib.embed_fn(
        evaluate.backbone_lib.load_image_tower(c.model)[0]), original["img"])
    singles = [score(r) for r in runs]
    soup = results["greedy_soup"]
    assert soup["val_score"] >= max(singles)
    kept = [runs[[first, second].index(d)] for d in soup["runs"]]
    expected = merging.uniform_soup(kept)
    flat = checkpoints.to_flat(checkpoints.load(export)[0])
    for k, v in checkpoints.to_flat({"img": expected}).items():
        np.testing.assert_allclose(flat[k], v, rtol=1e-6, err_msg=k)
    ratios = np.array(list(results["model_stock"]["ratios"].values()))
    assert ((0 <= ratios) & (ratios <= 1)).all() and 0 < ratios.mean() < 1
    with open(os.path.join(first, "results.json")) as f:
        assert set(json.load(f)["models"]) == set(results["models"])
    # compare draws them beside the run, as changes from the pretrained model
    run = compare.comparison([first])["runs"][os.path.basename(first)]
    assert set(run["post_hoc"]) == {"lines@0.5", "uniform_soup", "greedy_soup", "model_stock"}
    pretrained = results["models"]["pretrained"]["headline"]
    for model, change in run["post_hoc"].items():
        for key, value in change.items():
            if value is not None:
                assert value == pytest.approx(
                    results["models"][model]["headline"][key] - pretrained[key])
    compare.plot(compare.comparison([first]), str(tmp_path / "tradeoff.png"))


def test_evaluate_names_a_model_it_cannot_export(two_runs, tmp_path):
    c, (first, _) = two_runs
    with pytest.raises(errors.UserError, match="--export_model=model_stock: not a model"):
        evaluate.evaluate(c, first, export=str(tmp_path / "x.npz"), export_model="model_stock",
                          run_tests=False)


@pytest.mark.parametrize("name, runs, want", [
    ("fine-tuned", False, "fine-tuned"), ("wise_ft@.50", False, "wise_ft@0.5"),
    ("wise_ft@1", False, "fine-tuned"), ("lines@0.30", False, "lines@0.3"),
    ("greedy_soup", True, "greedy_soup"), ("model_stock", True, "model_stock"),
])
def test_export_model_names_are_read_as_results_names_them(name, runs, want):
    assert evaluate.export_model_name(name, runs) == want


@pytest.mark.parametrize("name, runs, words", [
    ("greedy_soup", False, "--export_model=greedy_soup: needs --runs"),
    ("wise_ft", False, "--export_model=wise_ft: unknown; give fine-tuned"),
    ("lines@", False, "--export_model=lines@: give one alpha"),
    ("lines@2", False, r"--export_model: \[2.0\] not in \[0, 1\]"),
    ("wise_ft@0", False, "that is the pretrained model"),
    ("soup", True, "--export_model=soup: unknown"),
])
def test_bad_export_model_names_are_one_line(name, runs, words):
    with pytest.raises(errors.UserError, match=words):
        evaluate.export_model_name(name, runs)
