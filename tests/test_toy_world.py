"""The toy world and the SigLIP pretraining mode: determinism, design invariants, the loss."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infusing_jax import checkpoints
from infusing_jax.toy import pretrain
from infusing_jax.toy import world as toy_world
from infusing_jax.losses import contrastive

SMALL = dict(generic_train=96, generic_test=48, target_classes=(4, 2, 3),
             target_per_class=(3, 2, 2))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    toy_world.make(root, seed=3, **SMALL)
    return root


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".png") or n.endswith(".json"):
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_the_same_seed_writes_the_same_world(world, tmp_path):
    toy_world.make(str(tmp_path), seed=3, **SMALL)
    assert _files(world) == _files(str(tmp_path))
    other = tmp_path / "other"
    toy_world.make(str(other), seed=4, **SMALL)
    assert json.load(open(other / "world.json"))["digest"] != \
        json.load(open(os.path.join(world, "world.json")))["digest"]


def test_target_classes_are_disjoint_glyphs_that_flips_keep(world):
    classes = {s: set(os.listdir(os.path.join(world, "target", s)))
               for s in ("train", "val", "test")}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [4, 2, 3]
    assert not (classes["train"] & classes["val"] or classes["train"] & classes["test"]
                or classes["val"] & classes["test"])
    for code in toy_world.GLYPH_CODES:
        bits = toy_world.glyph_bits(code)
        assert bits.any() and np.array_equal(bits, bits[:, ::-1])
    # Rendered without noise, a glyph image and its mirror differ only by the mirror.
    a = dict(shape="circle", colour="silver", texture="plain", size="large", height="top",
             background="dark")
    rng = np.random.default_rng(0)
    saved, toy_world.NOISE = toy_world.NOISE, 0.0
    try:
        img = toy_world.render(a, rng, glyph=37)
    finally:
        toy_world.NOISE = saved
    ys, xs = np.nonzero(np.all(img == 0, axis=-1))  # the black dots
    assert len(ys) == 4 * int(toy_world.glyph_bits(37).sum())
    centre = (xs.min() + xs.max()) / 2
    assert sorted(xs - centre) == sorted(centre - xs)


def test_captions_name_every_generic_attribute_and_never_a_glyph(world):
    records = json.load(open(os.path.join(world, "captions_train.json")))
    assert len(records) == SMALL["generic_train"]
    words = set(" ".join(c for r in records for c in r["captions"]).split())
    assert "glyph" not in words and "silver" not in words and "dots" not in words
    for r in records[:20]:
        colour, shape = os.path.basename(os.path.dirname(r["image"])).split("_")
        full = r["captions"][0]
        assert f"{colour} " in full and full.split(" at ")[0].split(" in ")[0].endswith(shape)
        assert any(f"on a {b} background" in full for b in toy_world.BACKGROUNDS)
    test = json.load(open(os.path.join(world, "captions_test.json")))
    assert all(len(r["captions"]) == 1 for r in test)
    names = open(os.path.join(world, "classes.txt")).read().split("\n")[:-1]
    folders = sorted(os.listdir(os.path.join(world, "generic", "test")))
    assert [n.replace(" ", "_") for n in names] == folders  # line i = class i
    img = np.asarray(Image.open(os.path.join(world, records[0]["image"])))
    assert img.shape == (toy_world.SIZE, toy_world.SIZE, 3) and img.dtype == np.uint8


def _np_sigmoid_loss(zimg, ztxt, log_t, b):
    logits = zimg @ ztxt.T * np.exp(log_t) + b
    n = len(zimg)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += np.log1p(np.exp(-z * logits[i, j]))
    return total / n


def test_sigmoid_loss_matches_a_loop_and_falls_when_pairs_align():
    rng = np.random.default_rng(0)
    zimg = rng.normal(size=(5, 8)).astype(np.float32)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    ztxt = rng.normal(size=(5, 8)).astype(np.float32)
    ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
    got = float(contrastive.sigmoid_loss(zimg, ztxt, np.log(10.0), -10.0))
    np.testing.assert_allclose(got, _np_sigmoid_loss(zimg, ztxt, np.log(10.0), -10.0),
                               rtol=1e-5)
    assert float(contrastive.sigmoid_loss(zimg, zimg, np.log(10.0), -5.0)) < \
        float(contrastive.sigmoid_loss(zimg, ztxt, np.log(10.0), -5.0))
    g = jax.grad(lambda t: contrastive.sigmoid_loss(zimg, ztxt, t, -10.0))(jnp.log(10.0))
    eps = 1e-3
    fd = (_np_sigmoid_loss(zimg, ztxt, np.log(10.0) + eps, -10.0)
          - _np_sigmoid_loss(zimg, ztxt, np.log(10.0) - eps, -10.0)) / (2 * eps)
    np.testing.assert_allclose(float(g), fd, rtol=1e-3)


def test_pretraining_lowers_the_loss_and_writes_a_loadable_big_vision_npz(world, tmp_path):
    c = pretrain.default_config()
    c.pretrain.captions = f"captions:{world}/captions_train.json:train"
    c.pretrain.tokenizer = f"{world}/spm.model"
    c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.data.batch_size = 32
    c.optim.warmup_steps = 5
    c.train.update(num_steps=60, log_every=10, progress=False)
    path = pretrain.pretrain(c, str(tmp_path))
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in log] == list(range(10, 61, 10))
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    params, cfg = checkpoints.load(path)
    assert set(params) == {"img", "txt", "t", "b"}
    assert cfg.image.width == 32 and cfg.text.seq_len == c.model.text.seq_len
    img_only, _ = checkpoints.load(path + ":img")
    assert set(img_only) == {"img"}


def test_pretraining_config_errors_name_the_field(world):
    c = pretrain.default_config()
    c.pretrain.captions = f"folder:{world}/generic"
    with pytest.raises(ValueError, match=r"^config\.pretrain\.captions: "):
        pretrain.validate(c)
    c.pretrain.captions = f"captions:{world}/captions_train.json"
    c.pretrain.tokenizer = f"{world}/none.model"
    with pytest.raises(ValueError, match=r"^config\.pretrain\.tokenizer: "):
        pretrain.validate(c)
