"""Checkpoint round trips, big_vision file variants, config inference, errors and safety."""
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from infusing_jax import errors
from infusing_jax import checkpoints
from infusing_jax import models
from infusing_jax.checkpoints import tree
from infusing_jax.models.config import resolved_towers

from tests.helpers.tiny import random_images, random_params, tiny_config

FORMATS = [("big_vision", "m.npz"), ("hf", "hf"), ("open_clip", "m.safetensors"),
           ("open_clip", "m.bin")]


def _assert_identical(a, b):
    fa, fb = checkpoints.to_flat(a), checkpoints.to_flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("fmt,name", FORMATS)
@pytest.mark.parametrize("text", [True, False])
def test_round_trip_bit_exact(family, fmt, name, text, tmp_path):
    cfg = tiny_config(family, text=text)
    params = random_params(cfg)
    path = str(tmp_path / name)
    checkpoints.save(params, cfg, path, fmt)
    # open_clip records no CLIP activation: the caller names it.
    act = "quick_gelu" if (fmt, family) == ("open_clip", "clip") else None
    loaded, cfg2 = checkpoints.load(path, act=act)
    _assert_identical(params, loaded)
    assert cfg2.image_size == cfg.image_size and cfg2.family == family
    want, got = resolved_towers(cfg), resolved_towers(cfg2)
    if fmt == "open_clip" and family == "siglip":
        # open_clip runs timm's exact GELU; the loaded config says so.
        assert got[0].pop("act") == "gelu" and want[0].pop("act") == "gelu_tanh"
        if text:
            assert got[1].pop("act") == "gelu" and want[1].pop("act") == "gelu_tanh"
    assert got == want
    if text:
        assert cfg2.text.vocab_size == cfg.text.vocab_size
        assert cfg2.text.seq_len == cfg.text.seq_len


def test_scan_layout_round_trip(family, tmp_path):
    cfg = tiny_config(family)
    params = random_params(cfg)
    scan_params = tree.unflatten(tree.roll_scan(checkpoints.to_flat(params)))
    cfg.scan = True
    checkpoints.save(scan_params, cfg, str(tmp_path / "scan.npz"), "big_vision")
    with np.load(tmp_path / "scan.npz") as npz:
        assert "img/Transformer/encoderblock/LayerNorm_0/scale" in npz.files
        assert npz["img/Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, cfg.image.width)
    loaded, _ = checkpoints.load(str(tmp_path / "scan.npz"))
    _assert_identical(params, loaded)
    loaded_scan, cfg2 = checkpoints.load(str(tmp_path / "scan.npz"), scan=True)
    images = random_images(2)
    a = models.build(tiny_config(family)).apply({"params": params}, images)[0]
    b = models.build(cfg2).apply({"params": loaded_scan}, images)[0]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_big_vision_file_variants(tmp_path):
    """params/ root, bf16 stored as void, and the file.npz:img sub-tree."""
    cfg = tiny_config("siglip")
    flat = checkpoints.to_flat(random_params(cfg))
    bf16 = {f"params/{k}": v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}
    np.savez(tmp_path / "bf16.npz", **bf16)
    with np.load(tmp_path / "bf16.npz") as npz:
        assert npz["params/t"].dtype.kind == "V"  # how numpy stores bfloat16
    loaded, cfg2 = checkpoints.load(str(tmp_path / "bf16.npz:img"))
    assert cfg2.text is None
    got = checkpoints.to_flat(loaded)
    assert set(got) == {k for k in flat if k.startswith("img/")}
    for k, v in got.items():
        np.testing.assert_array_equal(v, flat[k].astype(ml_dtypes.bfloat16).astype(np.float32))
    # A lone ViT file (no img/ root) is the image tower.
    np.savez(tmp_path / "vit.npz", **{k[4:]: v for k, v in flat.items() if k.startswith("img/")})
    lone, _ = checkpoints.load(str(tmp_path / "vit.npz"))
    assert set(checkpoints.to_flat(lone)) == set(got)


def test_big_vision_file_on_a_remote_filesystem(tmp_path):
    """gs://big_vision/...npz:img loads through tf.io.gfile (TF's ram:// stands in)."""
    import tensorflow as tf
    cfg = tiny_config("siglip")
    checkpoints.save(random_params(cfg), cfg, str(tmp_path / "m.npz"))
    url = "ram://checkpoints_test/m.npz"
    tf.io.gfile.makedirs("ram://checkpoints_test")
    tf.io.gfile.copy(str(tmp_path / "m.npz"), url, overwrite=True)
    local, local_cfg = checkpoints.load(str(tmp_path / "m.npz:img"))
    remote, remote_cfg = checkpoints.load(f"{url}:img")
    assert remote_cfg.to_dict() == local_cfg.to_dict()
    want, got = checkpoints.to_flat(local), checkpoints.to_flat(remote)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(errors.UserError, match="ram://checkpoints_test/none.npz"):
        checkpoints.load("ram://checkpoints_test/none.npz")


def test_local_checkpoints_load_without_tensorflow(tmp_path):
    cfg = tiny_config("siglip", text=False)
    checkpoints.save(random_params(cfg), cfg, str(tmp_path / "m.npz"))
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from infusing_jax import checkpoints\n"
            f"checkpoints.load({str(tmp_path / 'm.npz')!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_posemb_resampling(family, tmp_path):
    cfg = tiny_config(family, text=False)
    params = random_params(cfg)
    checkpoints.save(params, cfg, str(tmp_path / "m.npz"), "big_vision")
    same, _ = checkpoints.load(str(tmp_path / "m.npz"), image_size=32)
    _assert_identical(params, same)
    bigger, cfg2 = checkpoints.load(str(tmp_path / "m.npz"), image_size=48)
    assert cfg2.image_size == 48
    pos = bigger["img"]["pos_embedding"]
    n_cls = 1 if family == "clip" else 0
    assert pos.shape == (1, n_cls + 36, cfg.image.width)
    if n_cls:
        np.testing.assert_array_equal(pos[:, 0], params["img"]["pos_embedding"][:, 0])
    # A constant grid stays constant under bilinear resampling.
    flat = checkpoints.to_flat(params)
    flat["img/pos_embedding"][:, n_cls:] = 0.5
    checkpoints.save(tree.unflatten(flat), cfg, str(tmp_path / "c.npz"), "big_vision")
    const, _ = checkpoints.load(str(tmp_path / "c.npz"), image_size=48)
    np.testing.assert_allclose(const["img"]["pos_embedding"][:, n_cls:], 0.5, atol=1e-6)
    models.build(cfg2).apply({"params": bigger}, random_images(1, size=48))


def test_sincos2d_model_round_trip(tmp_path):
    cfg = tiny_config("siglip", text=False)
    cfg.image.posemb = "sincos2d"
    params = random_params(cfg)
    assert "pos_embedding" not in params["img"]
    checkpoints.save(params, cfg, str(tmp_path / "m.npz"), "big_vision")
    loaded, cfg2 = checkpoints.load(str(tmp_path / "m.npz"), image_size=32)
    assert cfg2.image.posemb == "sincos2d"
    _assert_identical(params, loaded)


def test_open_clip_clip_needs_the_activation_named(tmp_path):
    cfg = tiny_config("clip")
    params = random_params(cfg)
    checkpoints.save(params, cfg, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"m.safetensors: open_clip stores no activation; "
                                         r"pass act='quick_gelu'"):
        checkpoints.load(str(tmp_path / "m.safetensors"))
    _, cfg2 = checkpoints.load(str(tmp_path / "m.safetensors"), act="gelu")
    assert resolved_towers(cfg2)[0]["act"] == resolved_towers(cfg2)[1]["act"] == "gelu"


def test_errors_are_one_line(tmp_path):
    cfg = tiny_config("siglip")
    params = random_params(cfg)
    flat = checkpoints.to_flat(params)

    (tmp_path / "weights.xyz").write_text("x")
    with pytest.raises(ValueError, match=r"weights.xyz: unknown checkpoint format"):
        checkpoints.load(str(tmp_path / "weights.xyz"))

    broken = dict(flat)
    del broken["img/Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"]
    np.savez(tmp_path / "missing.npz", **broken)
    with pytest.raises(ValueError, match=r"missing.npz: 1 missing parameters.*Dense_1/bias"):
        checkpoints.load(str(tmp_path / "missing.npz"))

    bad = dict(flat)
    bad["txt/head/bias"] = np.zeros((7,), np.float32)
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(ValueError, match=r"txt/head/bias has shape \(7,\), the model expects "
                                         r"\(32,\)"):
        checkpoints.load(str(tmp_path / "shape.npz"))

    checkpoints.save(params, cfg, str(tmp_path / "oc.safetensors"), "open_clip")
    from safetensors import numpy as st
    state = st.load_file(str(tmp_path / "oc.safetensors"))
    state["visual.trunk.extra.weight"] = np.zeros(3, np.float32)
    st.save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra.safetensors.*1 unexpected keys.*extra.weight"):
        checkpoints.load(str(tmp_path / "extra.safetensors"))

    with pytest.raises(errors.UserError, match=r"nope.npz: no such checkpoint file$"):
        checkpoints.load(str(tmp_path / "nope.npz"))


class _CreatesFile:
    """Unpickling this object would create a file: the attack a loader must refuse."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_refuses_files_that_need_unpickling(tmp_path):
    victim = tmp_path / "pwned.txt"
    arr = np.empty((1,), dtype=object)
    arr[0] = _CreatesFile(str(victim))
    np.savez(tmp_path / "evil.npz", **{"img/embedding/kernel": arr})
    with pytest.raises(ValueError, match=r"evil.npz: refused, it holds pickled Python objects"):
        checkpoints.load(str(tmp_path / "evil.npz"))
    assert not victim.exists()

    torch.save({"visual.conv1.weight": torch.zeros(2), "evil": _CreatesFile(str(victim))},
               tmp_path / "evil.bin")
    with pytest.raises(ValueError, match=r"evil.bin: refused, it needs arbitrary Python objects"):
        checkpoints.load(str(tmp_path / "evil.bin"))
    assert not victim.exists()

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _CreatesFile(str(victim))}, f)
    with pytest.raises(ValueError, match=r"evil.pt: refused"):
        checkpoints.load(str(tmp_path / "evil.pt"))
    assert not victim.exists()
    assert os.listdir(tmp_path) and not victim.exists()


def test_open_clip_export_refuses_head_counts_it_cannot_store(tmp_path):
    cfg = tiny_config("clip")
    cfg.image.num_heads = 4  # 32-wide heads: open_clip's CLIP would read 2
    with pytest.raises(ValueError, match=r"open_clip stores no head count.*image tower "
                                         r"\(4 heads of width 128\) would load back with 2"):
        checkpoints.save(random_params(cfg), cfg, str(tmp_path / "m.safetensors"), "open_clip")
    assert not (tmp_path / "m.safetensors").exists()


def test_posemb_resampling_is_big_vision_zoom(tmp_path):
    """A linear ramp over the grid is resampled exactly, corners to corners."""
    cfg = tiny_config("siglip", text=False)  # 4 x 4 grid of 8 px patches
    flat = checkpoints.to_flat(random_params(cfg))
    i, j = np.mgrid[:4, :4]
    flat["img/pos_embedding"] = np.broadcast_to(
        (i + 2.0 * j).reshape(1, 16, 1), (1, 16, 32)).astype(np.float32).copy()
    checkpoints.save(tree.unflatten(flat), cfg, str(tmp_path / "ramp.npz"))
    params, _ = checkpoints.load(str(tmp_path / "ramp.npz"), image_size=56)  # 7 x 7
    oi, oj = np.mgrid[:7, :7] * (3 / 6)
    np.testing.assert_allclose(params["img"]["pos_embedding"][0, :, 0],
                               (oi + 2 * oj).reshape(-1), atol=1e-5)


def test_image_size_not_a_multiple_of_the_patch(tmp_path):
    """Like So400m/14 at 384 px (a 27 x 27 grid): the size is kept, nothing is resampled."""
    cfg = tiny_config("siglip")
    cfg.image_size = 36  # 4 x 4 patches of 8 px, 4 px dropped as by a VALID conv
    params = random_params(cfg)
    checkpoints.save(params, cfg, str(tmp_path / "hf"))
    _, from_hf = checkpoints.load(str(tmp_path / "hf"))
    assert from_hf.image_size == 36
    checkpoints.save(params, cfg, str(tmp_path / "m.npz"))
    same, from_npz = checkpoints.load(str(tmp_path / "m.npz"), image_size=36)
    assert from_npz.image_size == 36
    _assert_identical(params, same)


def test_hf_config_without_default_values(tmp_path):
    """Older transformers wrote only non-default fields: defaults must be assumed."""
    import json
    cfg = tiny_config("siglip")
    for tower in (cfg.image, cfg.text):
        tower.width, tower.mlp_dim, tower.num_heads = 48, 96, 12  # 12: HF's default
    cfg.text.out_dim = 48
    params = random_params(cfg)
    checkpoints.save(params, cfg, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for tower in ("vision_config", "text_config"):
        for field in ("num_attention_heads", "hidden_act", "layer_norm_eps"):
            del config[tower][field]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    loaded, cfg2 = checkpoints.load(str(tmp_path / "hf"))
    assert cfg2.image.num_heads == cfg2.text.num_heads == 12
    _assert_identical(params, loaded)
    config["vision_config"]["hidden_act"] = "swish"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: hidden_act 'swish' is not supported"):
        checkpoints.load(str(tmp_path / "hf"))


def test_big_vision_files_that_are_not_checkpoints(tmp_path):
    cfg = tiny_config("siglip")
    flat = checkpoints.to_flat(random_params(cfg))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"corrupt.npz: not a readable .npz archive"):
        checkpoints.load(str(tmp_path / "corrupt.npz"))
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(ValueError, match=r"folder.npz: not a readable .npz archive"):
        checkpoints.load(str(tmp_path / "folder.npz"))
    np.save(tmp_path / "single.npy", np.zeros(3))
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    with pytest.raises(ValueError, match=r"single.npz: holds a single array"):
        checkpoints.load(str(tmp_path / "single.npz"))
    no_pos = {k: v for k, v in flat.items() if k != "txt/pos_embedding"}
    np.savez(tmp_path / "no_pos.npz", **no_pos)
    with pytest.raises(ValueError,
                       match=r"no_pos.npz: 1 missing parameters, e.g. \['txt/pos_embedding'\]"):
        checkpoints.load(str(tmp_path / "no_pos.npz"))
    both = dict(flat)
    both.update(tree.roll_scan({k: v for k, v in flat.items() if k.startswith("img/")}))
    np.savez(tmp_path / "both.npz", **both)
    with pytest.raises(ValueError, match=r"both.npz: holds both the scan"):
        checkpoints.load(str(tmp_path / "both.npz"))
    # A training state: parameters under params/, optimiser state beside them.
    state = {f"params/{k}": v for k, v in flat.items()}
    state.update({f"opt/mu/{k}": v for k, v in flat.items()})
    np.savez(tmp_path / "state.npz", **state)
    loaded, _ = checkpoints.load(str(tmp_path / "state.npz"))
    assert set(checkpoints.to_flat(loaded)) == set(flat)
