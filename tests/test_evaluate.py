"""Test-set evaluation of runs and checkpoints: results.json, WiSE-FT, export."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from infusing_jax import checkpoints
from infusing_jax import evaluate
from infusing_jax.training import run_checkpoints
from infusing_jax.training import loop
from infusing_jax.evaluation import wise_ft
from tests.helpers import REPO
from tests.helpers import train_world

HEADLINE = {"in_domain_r1", "in_domain_map4", "generic_r1", "generic_map4", "image_to_text_r1",
            "text_to_image_r1", "zero_shot_top1"}


def test_wise_ft_interpolates_leafwise():
    p = {"a": np.array([0.0, 2.0], np.float32), "b": {"c": np.ones((2, 2), np.float32)}}
    f = {"a": np.array([4.0, 2.0], np.float32), "b": {"c": np.zeros((2, 2), np.float32)}}
    mid = wise_ft.interpolate(p, f, 0.25)
    np.testing.assert_array_equal(mid["a"], [1.0, 2.0])
    np.testing.assert_array_equal(mid["b"]["c"], np.full((2, 2), 0.75, np.float32))
    for a, ref in ((0.0, p), (1.0, f)):
        out = wise_ft.interpolate(p, f, a)
        np.testing.assert_array_equal(out["a"], ref["a"])
    with pytest.raises(ValueError, match="alpha 1.5 must be in"):
        wise_ft.interpolate(p, f, 1.5)
    with pytest.raises(ValueError, match=r"--wise_ft: \[2.0\] not in"):
        wise_ft.parse_alphas("0.5,2")


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    c = train_world.world_config(world, "full", "precomputed", "yes")
    c.eval.validate_text = True
    loop.train_and_evaluate(c, workdir)
    return workdir


def _evaluate(*args):
    run = subprocess.run([sys.executable, "-m", "infusing_jax.evaluate", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_run_ends_with_the_test_results_of_its_selected_and_pretrained_models(trained):
    with open(os.path.join(trained, "results.json")) as f:
        results = json.load(f)
    assert results["selected_by"] == "all" and set(results["models"]) == {"pretrained",
                                                                          "fine-tuned"}
    for model in results["models"].values():
        assert set(model["headline"]) == HEADLINE
        assert all(0.0 <= v <= 1.0 for v in model["headline"].values())
        assert model["retrieval"]["target"]["num_queries"] == 16
        assert set(model["zero_shot"]["colours"]) == {"fine"}
        assert model["text_retrieval"]["captions"]["num_texts"] == 64
    with open(os.path.join(trained, "metrics.jsonl")) as f:
        val = [json.loads(line) for line in f if "val/score" in line]
    assert [m["step"] for m in val] == [6, 12]
    assert all(0 <= m["val/text/captions/i2t_r1"] <= 1 for m in val)
    # The last validation and the final test see the same model through the same code.
    final = results["models"]["fine-tuned"]["text_retrieval"]["captions"]
    assert val[-1]["val/text/captions/t2i_r5"] == pytest.approx(final["t2i_r5"])


def test_evaluate_cli_reproduces_the_run_and_the_checkpoint(world, trained, tmp_path):
    config = f"--config={train_world.CONFIG_FILE}:{world},full,precomputed,yes"
    with open(os.path.join(trained, "results.json")) as f:
        at_the_end = json.load(f)
    export = str(tmp_path / "export_hf")
    _evaluate(config, f"--workdir={trained}", "--wise_ft=0.5", f"--export={export}",
              "--export_alpha=0.5")
    with open(os.path.join(trained, "results.json")) as f:
        again = json.load(f)
    assert again["models"]["fine-tuned"] == at_the_end["models"]["fine-tuned"]
    assert again["models"]["pretrained"] == at_the_end["models"]["pretrained"]
    assert [p["alpha"] for p in again["wise_ft"]] == [0.0, 0.5, 1.0]
    alone = str(tmp_path / "pretrained")
    _evaluate(config, f"--workdir={alone}",
              f"--checkpoint={os.path.join(world, 'pretrained.npz:img')}")
    with open(os.path.join(alone, "results.json")) as f:
        assert json.load(f)["models"] == {"pretrained": again["models"]["pretrained"]}
    # The export: the WiSE-FT image tower at 0.5, the original text tower, in HF format.
    exported, _ = checkpoints.load(export)
    original, _ = checkpoints.load(os.path.join(world, "pretrained.npz"))
    cfg = train_world.world_config(world, "full", "precomputed", "yes")
    _, finetuned = run_checkpoints.kept_backbone(cfg, trained, original["img"])
    expected = checkpoints.to_flat({"img": wise_ft.interpolate(original["img"], finetuned, 0.5),
                                    "txt": original["txt"]})
    flat = checkpoints.to_flat(exported)
    for k in expected:
        np.testing.assert_array_equal(flat[k], expected[k], err_msg=k)
    # --notest only exports: the same tensors, results.json untouched.
    before = os.path.getmtime(os.path.join(trained, "results.json"))
    only = str(tmp_path / "only.npz")
    _evaluate(config, f"--workdir={trained}", f"--export={only}", "--export_alpha=0.5",
              "--notest")
    assert os.path.getmtime(os.path.join(trained, "results.json")) == before
    again_flat = checkpoints.to_flat(checkpoints.load(only)[0])
    for k in expected:
        np.testing.assert_array_equal(again_flat[k], expected[k], err_msg=k)


def test_convert_exports_a_run_to_onnx_and_to_a_checkpoint(world, trained, tmp_path):
    import onnxruntime as ort
    from infusing_jax import models
    outputs = {}
    for name in ("run.onnx", "run.npz"):
        outputs[name] = str(tmp_path / name)
        run = subprocess.run([sys.executable, "-m", "infusing_jax.convert", trained,
                              outputs[name]], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"the model the run in {trained} keeps" in run.stdout
    # The checkpoint: the tower the run keeps, with the pretrained text tower.
    original, _ = checkpoints.load(os.path.join(world, "pretrained.npz"))
    cfg = train_world.world_config(world, "full", "precomputed", "yes")
    _, finetuned = run_checkpoints.kept_backbone(cfg, trained, original["img"])
    params, model_cfg = checkpoints.load(outputs["run.npz"])
    flat = checkpoints.to_flat(params)
    for k, v in checkpoints.to_flat({"img": finetuned, "txt": original["txt"]}).items():
        np.testing.assert_array_equal(flat[k], v, err_msg=k)
    # The ONNX graph: that tower's embeddings.
    size = model_cfg.image_size
    images = np.random.RandomState(0).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    session = ort.InferenceSession(outputs["run.onnx"], providers=["CPUExecutionProvider"])
    (embedding,) = session.run(["embedding"], {"images": images})
    want = models.build(model_cfg).apply({"params": params}, images)[0]
    np.testing.assert_allclose(embedding, np.asarray(want), atol=1e-5, rtol=0)


def test_compare_tabulates_and_plots_the_change_from_pretrained(trained, tmp_path):
    other = tmp_path / "other_run"
    other.mkdir()
    with open(os.path.join(trained, "results.json")) as f:
        results = json.load(f)
    (other / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "infusing_jax.compare", trained, str(other),
                          f"--output={out}", "--names=first,second"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "comparison.json").read_text())
    pre, ft = (results["models"][m]["headline"] for m in ("pretrained", "fine-tuned"))
    for name in ("first", "second"):
        change = report["runs"][name]["change"]
        for key in HEADLINE:
            assert change[key] == pytest.approx(ft[key] - pre[key])
        alphas = [p["alpha"] for p in report["runs"][name]["wise_ft"]]
        assert alphas == [p["alpha"] for p in results["wise_ft"]] and alphas[::len(alphas) - 1] == [0, 1]
    table = (out / "comparison.md").read_text()
    assert "| first |" in table and "| second |" in table and "| pretrained |" in table
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, "-m", "infusing_jax.compare", str(tmp_path),
                              f"--output={out}"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 1 and "no results" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("select_by, eval_ema", [("in-domain", True), ("last", True),
                                                 ("last", False)])
def test_with_ema_the_ema_weights_are_validated_kept_tested_and_exported(
        world, tmp_path, select_by, eval_ema):
    import orbax.checkpoint as ocp
    c = train_world.world_config(world, "naive")
    c.optim.ema_decay = 0.5
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 4, 0, 4
    c.train.select_by, c.train.eval_ema = select_by, eval_ema
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "4", "state"))
    ema = checkpoints.to_flat({"img": state["ema"]["backbone"]})
    raw = checkpoints.to_flat({"img": state["params"]["backbone"]})
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)
    expected = ema if eval_ema else raw
    export = str(tmp_path / "export.npz")
    evaluate.evaluate(c, workdir, export=export, run_tests=False)
    flat = checkpoints.to_flat(checkpoints.load(export)[0])
    for k in expected:
        np.testing.assert_array_equal(flat[k], expected[k], err_msg=k)
    if select_by != "last":  # the kept best checkpoint holds the EMA weights too
        best = ocp.StandardCheckpointer().restore(os.path.join(workdir, "best", "4", "params"))
        kept = checkpoints.to_flat({"img": best["backbone"]})
        assert all(np.array_equal(kept[k], ema[k]) for k in ema)
    # The final validation scored the same weights: R@1 of the target val recomputed.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        val = [json.loads(line) for line in f if "val/target/recall@1" in line][-1]
    from infusing_jax import sharding
    from infusing_jax.training import backbone as backbone_lib
    from infusing_jax.training import domains as domains_lib
    from infusing_jax.training import validation
    model, _, _ = backbone_lib.load_image_tower(c.model)
    splits = {"target": domains_lib.load(c, "target")}
    validator = validation.Validator(c, ["target"], splits, backbone_lib.embed_fn(model),
                                     sharding.make_mesh())
    weights = state["ema" if eval_ema else "params"]["backbone"]
    assert validator.run(weights)["target/recall@1"] == pytest.approx(val["val/target/recall@1"])
