"""The ONNX export of the image tower: onnxruntime against our JAX forward pass."""
import os

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import models
from infusing_jax.checkpoints import onnx_graph

TOWERS = {
    # SigLIP: MAP head, tanh GELU, patch bias, learned positions.
    "siglip": lambda: models.model_config("siglip", "mu/8", 32, None),
    # CLIP: class token with its position, pre-norm, quick GELU, a head without bias.
    "clip": lambda: models.model_config("clip", "mu/8", 32, None, embed_dim=24),
    # Mean pooling, sin-cos positions, exact GELU, a head with bias, 3 layers.
    "gap_sincos": lambda: models.model_config(
        "siglip", "mu/8", 32, None, image=dict(
            patch_size=8, width=32, depth=3, mlp_dim=64, num_heads=4, posemb="sincos2d",
            pool_type="gap", out_dim=16, act="gelu")),
}


def _model(name, seed=0):
    cfg = TOWERS[name]()
    params = models.init_params(cfg, jax.random.PRNGKey(seed))
    # Not the initialisers' near-zero biases and heads: every parameter matters.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [v + 0.2 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves), cfg


def _ours(params, cfg, images):
    zimg, _, out = models.build(cfg).apply({"params": params}, images)
    return np.asarray(zimg), np.asarray(out["img"]["embedding"])


def _run(path, images):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["embedding", "features"], {"images": images})


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_onnxruntime_equals_our_forward_pass(tmp_path, name):
    params, cfg = _model(name)
    path = str(tmp_path / "tower.onnx")
    checkpoints.save(params, cfg, path)
    onnx.checker.check_model(path, full_check=True)
    for batch in (1, 3, 5):  # one file, a dynamic batch axis
        images = np.random.RandomState(batch).uniform(-1, 1, (batch, 32, 32, 3))
        images = images.astype(np.float32)
        embedding, features = _run(path, images)
        want_embedding, want_features = _ours(params, cfg, images)
        assert embedding.shape == want_embedding.shape == (batch, want_features.shape[-1])
        np.testing.assert_allclose(features, want_features, atol=1e-5, rtol=0)
        np.testing.assert_allclose(embedding, want_embedding, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-5)


def test_a_two_tower_model_exports_its_image_tower_and_scan_layouts_unroll(tmp_path):
    cfg = models.model_config("siglip", "mu/8", 32, "mu", vocab_size=64, seq_len=8)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    path = str(tmp_path / "two_towers.onnx")
    checkpoints.save(params, cfg, path)
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(path, images)[0], _ours(params, cfg, images)[0],
                               atol=1e-5)
    model = onnx.load(path)
    assert not any(t.name.startswith("txt/") for t in model.graph.initializer)

    checkpoints.save(params, cfg, str(tmp_path / "bv.npz"))
    scanned, scan_cfg = checkpoints.load(str(tmp_path / "bv.npz"), scan=True)
    checkpoints.save(scanned, scan_cfg, str(tmp_path / "from_scan.onnx"))
    np.testing.assert_allclose(_run(str(tmp_path / "from_scan.onnx"), images)[0],
                               _ours(params, cfg, images)[0], atol=1e-5)


def test_past_the_protobuf_limit_weights_go_to_one_sidecar_rewritten_each_time(tmp_path):
    params, cfg = _model("siglip")
    flat = {k: v for k, v in checkpoints.to_flat(params).items() if k.startswith("img/")}
    model = onnx_graph.image_tower(flat, cfg)
    path = str(tmp_path / "big.onnx")
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    for _ in range(2):  # the second export must not append to the first's sidecar
        written = onnx_graph.write(model, path, limit=0)
        assert written == [path, path + ".data"]
        # every tensor of >= 1 KiB, once (tiny ones stay in the graph)
        assert 0.9 < os.path.getsize(path + ".data") / onnx_graph.weight_bytes(model) <= 1
        np.testing.assert_allclose(_run(path, images)[0], _ours(params, cfg, images)[0],
                                   atol=1e-5)
    onnx_graph.write(model, path)  # small again: one file, no sidecar left behind
    assert not os.path.exists(path + ".data")


def test_weight_bytes_count_float32_whatever_the_params_dtype():
    params, cfg = _model("siglip")
    bf16 = jax.tree.map(lambda v: v.astype(jax.numpy.bfloat16), params)
    flat = {k: np.asarray(v, np.float32) for k, v in checkpoints.to_flat(bf16).items()}
    model = onnx_graph.image_tower(flat, cfg)
    want = 4 * sum(v.size for v in flat.values())
    assert onnx_graph.weight_bytes(model) >= want


def test_a_remote_path_is_written_there_not_beside_the_working_folder(tmp_path, monkeypatch):
    import tensorflow as tf
    monkeypatch.chdir(tmp_path)
    params, cfg = _model("clip")
    checkpoints.save(params, cfg, "ram://exports/tower.onnx")
    assert tf.io.gfile.exists("ram://exports/tower.onnx")
    assert not os.path.exists(tmp_path / "ram:")
    local = str(tmp_path / "copy.onnx")
    tf.io.gfile.copy("ram://exports/tower.onnx", local)
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(local, images)[0], _ours(params, cfg, images)[0],
                               atol=1e-5)


def test_an_onnx_file_is_refused_as_a_checkpoint_in_one_line(tmp_path):
    params, cfg = _model("siglip")
    path = str(tmp_path / "tower.onnx")
    checkpoints.save(params, cfg, path)
    with pytest.raises(errors.UserError, match="tower.onnx: an ONNX file is an export"):
        checkpoints.load(path)
