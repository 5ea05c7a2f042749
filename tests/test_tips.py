"""TIPS image towers: the forward pass re-derived by hand, both file layouts, round trips.

TIPS is on no package registry, so the reference here is written from the
structure of its code (scenic/models/vit.py, pytorch/image_encoder.py) in NumPy:
a Scenic ViT (patch conv, a (1, G, G, W) position grid resized bilinearly to the
patch grid and added to the patches, two cls tokens without position in front,
pre-LN blocks with tanh GELU or SwiGLU, a final LayerNorm, cls token 0) and the
DINOv2-style PyTorch one (fused qkv, LayerScale, the first cls token's own
position, a register token, exact GELU).
"""
import json
import logging
import os

import jax
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import models
from infusing_jax import tokenizers
from infusing_jax.checkpoints import tips
from infusing_jax.checkpoints import tree
from tests.helpers.tiny import randomize

WIDTH, HEADS = 384, 6  # TIPS S/14's width and heads (its PyTorch layout names neither)


def _config(variant="S/14", image_size=56, grid=16):
    cfg = models.model_config("tips", variant, image_size, None)
    mlp = 64 if variant.startswith("S") else 48  # g/14's act stays its SwiGLU
    cfg.image.update(width=WIDTH, num_heads=HEADS, depth=2, mlp_dim=mlp, posemb_grid=grid)
    return cfg


def _params(cfg, seed=0):
    return randomize(models.init_params(cfg, jax.random.PRNGKey(seed)), seed, std=0.05)


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _attention(x, q, k, v, out, heads):
    """x (N, L, W); q, k, v: (W, 3W)-style (kernel (W, W), bias (W,)); out the same."""
    n, length, width = x.shape
    d = width // heads
    split = lambda t: t.reshape(n, length, heads, d).transpose(0, 2, 1, 3)
    qh, kh, vh = (split(x @ w + b) for w, b in (q, k, v))
    logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    merged = (weights @ vh).transpose(0, 2, 1, 3).reshape(n, length, width)
    return merged @ out[0] + out[1]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1 + np.exp(-x))


def _patches(images, kernel, bias):
    """Non-overlapping p x p patches, (N, S, S, 3) -> (N, g*g, W)."""
    p = kernel.shape[0]
    n, s = images.shape[:2]
    g = s // p
    x = images.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
    return x @ kernel.reshape(-1, kernel.shape[-1]) + bias


def scenic_reference(theirs: dict, images, heads, swiglu=False):
    """TIPS's Scenic VisionEncoder, from a Scenic-layout flat dict -> cls token 0, normed."""
    t = {k: np.asarray(v, np.float64) for k, v in theirs.items()}
    tok = "encoder/ToTokenSequence_0/"
    x = _patches(images.astype(np.float64), t[tok + "embedding/kernel"],
                 t[tok + "embedding/bias"])
    n, length, width = x.shape
    g = int(np.sqrt(length))
    table = t[tok + "posembed_input"]
    if table.shape[1] != g:  # Scenic's own call: jax.image.resize, bilinear, antialiased
        table = np.asarray(jax.image.resize(table.astype(np.float32), (1, g, g, width),
                                            "bilinear"), np.float64)
    x = x + table.reshape(1, g * g, width)
    x = np.concatenate([np.repeat(t[tok + "cls"], n, axis=0), x], axis=1)
    depth = len({k.split("/")[2] for k in t if "/encoderblock_" in k})
    for i in range(depth):
        b = f"encoder/transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_0/"
        dense = lambda name: (t[a + name + "/kernel"].reshape(width, -1),
                              t[a + name + "/bias"].reshape(-1))
        y = _layer_norm(x, t[b + "LayerNorm_0/scale"], t[b + "LayerNorm_0/bias"])
        out = (t[a + "out/kernel"].reshape(-1, width), t[a + "out/bias"])
        x = x + _attention(y, dense("query"), dense("key"), dense("value"), out, heads)
        y = _layer_norm(x, t[b + "LayerNorm_1/scale"], t[b + "LayerNorm_1/bias"])
        m = b + ("FFNSwiGluFused_0/" if swiglu else "MlpBlock_0/")
        lin = lambda j, z: z @ t[f"{m}Dense_{j}/kernel"] + t[f"{m}Dense_{j}/bias"]
        if swiglu:
            x = x + lin(2, _silu(lin(0, y)) * lin(1, y))
        else:
            x = x + lin(1, _gelu_tanh(lin(0, y)))
    x = _layer_norm(x, t["encoder/encoder_norm/scale"], t["encoder/encoder_norm/bias"])
    cls = x[:, 0]
    return cls / np.linalg.norm(cls, axis=-1, keepdims=True)


def pytorch_reference(t: dict, images, heads):
    """TIPS's PyTorch VisionTransformer (block_chunks=0, one register token) -> cls 0."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    kernel = t["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    x = _patches(images.astype(np.float64), kernel, t["patch_embed.proj.bias"])
    n, _, width = x.shape
    x = np.concatenate([np.repeat(t["cls_token"], n, axis=0), x], axis=1) + t["pos_embed"]
    x = np.concatenate([x[:, :1], np.repeat(t["register_tokens"], n, axis=0), x[:, 1:]], 1)
    depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        y = _layer_norm(x, t[b + "norm1.weight"], t[b + "norm1.bias"])
        qkv = [(t[b + "attn.qkv.weight"][j * width:(j + 1) * width].T,
                t[b + "attn.qkv.bias"][j * width:(j + 1) * width]) for j in range(3)]
        out = (t[b + "attn.proj.weight"].T, t[b + "attn.proj.bias"])
        x = x + _attention(y, *qkv, out, heads) * t[b + "ls1.gamma"]
        y = _layer_norm(x, t[b + "norm2.weight"], t[b + "norm2.bias"])
        h = y @ t[b + "mlp.fc1.weight"].T + t[b + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # nn.GELU(): exact
        x = x + (h @ t[b + "mlp.fc2.weight"].T + t[b + "mlp.fc2.bias"]) * t[b + "ls2.gamma"]
    x = _layer_norm(x, t["norm.weight"], t["norm.bias"])
    cls = x[:, 0]
    return cls / np.linalg.norm(cls, axis=-1, keepdims=True)


def _ours(params, cfg, images):
    return np.asarray(models.build(cfg).apply({"params": params}, images)[0])


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("variant, size, grid", [
    ("S/14", 56, 16),    # v1's 16 x 16 grid, resized down to 4 x 4
    ("S/14", 224, 16),   # v1 at 224 px: the grid as it is
    ("S/14", 112, 32),   # v2's 32 x 32 grid
    ("g/14", 56, 16),    # g/14: the SwiGLU MLP
])
def test_the_scenic_file_loads_and_runs_as_tips_own_forward_pass(tmp_path, variant, size, grid):
    cfg = _config(variant, size, grid)
    params = _params(cfg)
    path = str(tmp_path / "tips_vision.npz")
    checkpoints.save(params, cfg, path, "tips_scenic")
    theirs = dict(np.load(path))
    swiglu = variant.startswith("g")
    assert "encoder/ToTokenSequence_0/posembed_input" in theirs
    assert theirs["encoder/ToTokenSequence_0/posembed_input"].shape == (1, grid, grid, WIDTH)
    assert theirs["encoder/ToTokenSequence_0/cls"].shape == (1, 2, WIDTH)
    assert any("FFNSwiGluFused_0" in k for k in theirs) == swiglu

    loaded, loaded_cfg = checkpoints.load(path, image_size=size)
    assert loaded_cfg.family == "tips" and loaded_cfg.image.num_cls == 2
    assert loaded_cfg.image.posemb == "learn_2d" and loaded_cfg.image.posemb_grid == grid
    assert (loaded_cfg.image.get("act") == "swiglu") == swiglu
    images = _images(3, size)
    want = scenic_reference(theirs, images, HEADS, swiglu)
    np.testing.assert_allclose(_ours(loaded, loaded_cfg, images), want, atol=2e-5)
    # The embedding is cls token 0: not token 1, not the patches' mean.
    _, _, out = models.build(loaded_cfg).apply({"params": loaded}, images)
    encoded = np.asarray(out["img"]["encoded"])
    assert encoded.shape == (3, 2 + (size // 14) ** 2, WIDTH)
    np.testing.assert_array_equal(np.asarray(out["img"]["pooled"]), encoded[:, 0])
    assert not np.allclose(encoded[:, 0], encoded[:, 1], atol=1e-3)
    # Round trip: the same keys and bytes.
    checkpoints.save(loaded, loaded_cfg, str(tmp_path / "again.npz"), "tips_scenic")
    again = dict(np.load(tmp_path / "again.npz"))
    assert set(again) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(again[k], theirs[k], err_msg=k)


def test_a_pytorch_file_loads_with_layerscale_and_cls_position_folded(tmp_path):
    cfg = _config("S/14", 56)
    params = _params(cfg, seed=1)
    path = str(tmp_path / "tips_pytorch.npz")
    checkpoints.save(params, cfg, path, "tips_pytorch")
    theirs = dict(np.load(path))
    assert theirs["pos_embed"].shape == (1, 1 + 16 * 16, WIDTH)
    assert theirs["blocks.0.attn.qkv.weight"].shape == (3 * WIDTH, WIDTH)
    # As trained in PyTorch: LayerScale gammas and a first position that are not 1 and 0.
    rng = np.random.default_rng(0)
    for k in theirs:
        if k.endswith(".gamma"):
            theirs[k] = rng.uniform(0.5, 1.5, theirs[k].shape).astype(np.float32)
    theirs["pos_embed"][:, 0] = rng.normal(0, 0.1, WIDTH)
    np.savez(path, **theirs)
    # At 224 px the 16 x 16 grid is used as it is. (Elsewhere their PyTorch code resizes
    # it with torch's interpolate, Scenic and we with jax.image.resize.)
    loaded, loaded_cfg = checkpoints.load(path, image_size=224)
    assert loaded_cfg.family == "tips" and loaded_cfg.image.act == "gelu"  # their nn.GELU
    assert loaded_cfg.image.num_heads == HEADS
    images = _images(2, 224, seed=2)
    np.testing.assert_allclose(_ours(loaded, loaded_cfg, images),
                               pytorch_reference(theirs, images, HEADS), atol=2e-5)


def test_pytorch_and_scenic_files_of_one_tower_round_trip_bit_exactly(tmp_path):
    cfg = _config("g/14", 56)
    params = _params(cfg, seed=2)
    want = tree.flatten(params)
    for fmt in ("tips_pytorch", "tips_scenic", "big_vision"):
        path = str(tmp_path / f"{fmt}.npz")
        checkpoints.save(params, cfg, path, fmt)
        first = dict(np.load(path))
        loaded, loaded_cfg = checkpoints.load(path)
        got = checkpoints.to_flat(loaded)
        assert set(got) == set(want) and loaded_cfg.family == "tips"
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{fmt} {k}")
        checkpoints.save(loaded, loaded_cfg, str(tmp_path / f"again_{fmt}.npz"), fmt)
        again = dict(np.load(tmp_path / f"again_{fmt}.npz"))
        assert set(again) == set(first)
        for k in first:
            np.testing.assert_array_equal(again[k], first[k], err_msg=f"{fmt} {k}")


def test_onnx_export_of_a_tips_tower(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = _config("g/14", 56, grid=32)
    params = _params(cfg, seed=3)
    path = str(tmp_path / "tips.onnx")
    checkpoints.save(params, cfg, path)
    images = _images(3, 56, seed=3)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["embedding"], {"images": images})[0],
                               _ours(params, cfg, images), atol=1e-5)


def test_wrong_pairings_are_refused_in_one_line(tmp_path):
    cfg = _config("S/14", 56)
    params = _params(cfg)
    with pytest.raises(errors.UserError, match="a tips model cannot be written as hf"):
        checkpoints.save(params, cfg, str(tmp_path / "hf"), "hf")
    siglip = models.model_config("siglip", "mu/8", 32, None)
    with pytest.raises(errors.UserError, match="a siglip model cannot be written as tips_"):
        checkpoints.save(models.init_params(siglip, jax.random.PRNGKey(0)), siglip,
                         str(tmp_path / "x.npz"), "tips_scenic")
    odd = _config("S/14", 56)
    odd.image.num_heads = 4
    with pytest.raises(errors.UserError, match="would load back with 6; use tips_scenic"):
        checkpoints.save(_params(odd), odd, str(tmp_path / "odd.npz"), "tips_pytorch")
    np.savez(tmp_path / "tips_text.npz", **{"token_emb/emb_var": np.zeros((8, 4), np.float32)})
    with pytest.raises(errors.UserError, match="a TIPS text tower; give the _vision.npz"):
        checkpoints.load(str(tmp_path / "tips_text.npz"))
    pair = _pair_config()
    with pytest.raises(errors.UserError, match="name this one FILE_vision.npz"):
        checkpoints.save(_params(pair), pair, str(tmp_path / "tips.npz"), "tips_scenic")
    assert tips.layout(["cls_token", "pos_embed", "patch_embed.proj.weight"]) == "pytorch"


def test_a_tips_tower_fine_tunes_with_the_method_and_exports_to_scenic(world, tmp_path):
    from infusing_jax.training import loop
    from tests.helpers import train_world
    import sentencepiece
    cfg = models.model_config("tips", "S/14", 28, "S")
    cfg.image.update(width=48, num_heads=4, depth=2, mlp_dim=64)
    vocab = sentencepiece.SentencePieceProcessor(model_file=f"{world}/spm.model").vocab_size()
    cfg.text.update(width=48, num_heads=4, depth=2, mlp_dim=64, vocab_size=vocab)
    path = str(tmp_path / "tips_tiny_vision.npz")
    checkpoints.save(_params(cfg), cfg, path, "tips_scenic")  # and tips_tiny_text.npz
    c = train_world.world_config(world, "full", "precomputed", "yes")  # text tests too
    c.model.update(checkpoint=path, family="tips", image_size=28)
    c.train.select_by = "in-domain"
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    with open(f"{workdir}/results.json") as f:
        results = json.load(f)
    losses = [m["loss"] for m in train_world.read_metrics(workdir) if "loss" in m]
    assert np.isfinite(losses).all() and len(losses) >= 2
    tested = results["models"]["fine-tuned"]["retrieval"]["target"]
    headline = results["models"]["fine-tuned"]["headline"]
    assert tested["num_queries"] == 16
    for key in ("in_domain_r1", "image_to_text_r1", "text_to_image_r1", "zero_shot_top1"):
        assert 0 <= headline[key] <= 1, key
    from infusing_jax import convert
    out = str(tmp_path / "finetuned_vision.npz")
    convert.export_run(workdir, out, "tips_scenic")
    theirs = dict(np.load(out))
    assert tips.layout(theirs) == "scenic"
    text = dict(np.load(tmp_path / "finetuned_text.npz"))  # the frozen text tower, as it was
    for k, v in dict(np.load(tmp_path / "tips_tiny_text.npz")).items():
        np.testing.assert_array_equal(text[k], v, err_msg=k)
    loaded, _ = checkpoints.load(out)
    assert not np.array_equal(checkpoints.to_flat(loaded)["img/cls"],
                              dict(np.load(path))["encoder/ToTokenSequence_0/cls"])



# ---------------------------------------------------------------- the text tower

VOCAB, TEXT_LEN = 40, 8


def _pair_config():
    cfg = models.model_config("tips", "S/14", 28, "S")
    cfg.image.update(depth=1)
    cfg.text.update(depth=2, mlp_dim=64, vocab_size=VOCAB, seq_len=TEXT_LEN)
    return cfg


def _sinusoid(length, width):
    n = width // 2
    inv = np.exp(np.arange(n) * -np.log(1e4) / max(n - 1, 1))
    angles = np.arange(length)[:, None] * inv[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def text_reference(t: dict, tokens, heads, layout="scenic"):
    """TIPS's TextEncoder (Scenic's, or their PyTorch one: eps 1e-5) -> normed embeddings."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    scenic = layout == "scenic"
    emb = t["token_emb/emb_var" if scenic else "token_embedding.weight"]
    width = emb.shape[1]
    x = emb[tokens] * np.sqrt(width) + _sinusoid(tokens.shape[1], width)
    keep = (tokens != 0).astype(np.float64)
    eps = 1e-6 if scenic else 1e-5
    depth = len({k.split(".")[2] if not scenic else k.split("/")[1] for k in t
                 if k.startswith("transformer")})
    n, length = tokens.shape
    d = width // heads
    for i in range(depth):
        if scenic:
            b = f"transformer/encoderblock_{i}/"
            a = b + "MultiHeadDotProductAttention_0/"
            proj = [(t[f"{a}{m}/kernel"].reshape(width, width), t[f"{a}{m}/bias"].reshape(-1))
                    for m in ("query", "key", "value")]
            out = (t[a + "out/kernel"].reshape(width, width), t[a + "out/bias"])
            ln = [(t[f"{b}LayerNorm_{j}/scale"], t[f"{b}LayerNorm_{j}/bias"]) for j in (0, 1)]
            fc = [(t[f"{b}MlpBlock_0/Dense_{j}/kernel"], t[f"{b}MlpBlock_0/Dense_{j}/bias"])
                  for j in (0, 1)]
        else:
            b = f"transformer.resblocks.{i}."
            w, bias = t[b + "attn.in_proj_weight"], t[b + "attn.in_proj_bias"]
            proj = [(w[j * width:(j + 1) * width].T, bias[j * width:(j + 1) * width])
                    for j in range(3)]
            out = (t[b + "attn.out_proj.weight"].T, t[b + "attn.out_proj.bias"])
            ln = [(t[f"{b}ln_{j}.weight"], t[f"{b}ln_{j}.bias"]) for j in (1, 2)]
            fc = [(t[f"{b}mlp.{m}.weight"].T, t[f"{b}mlp.{m}.bias"]) for m in ("c_fc", "c_proj")]
        y = _layer_norm(x, *ln[0], eps)
        q, k, v = ((y @ m + c).reshape(n, length, heads, d).transpose(0, 2, 1, 3)
                   for m, c in proj)
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
        logits = np.where(keep[:, None, None, :] > 0, logits, -1e30)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + (weights @ v).transpose(0, 2, 1, 3).reshape(n, length, width) @ out[0] + out[1]
        y = _layer_norm(x, *ln[1], eps)
        h = np.maximum(y @ fc[0][0] + fc[0][1], 0) * keep[..., None]
        x = x + (h @ fc[1][0] + fc[1][1]) * keep[..., None]
    norm = ("text_encoder_norm/scale", "text_encoder_norm/bias") if scenic else (
        "ln_final.weight", "ln_final.bias")
    x = _layer_norm(x, t[norm[0]], t[norm[1]], eps)
    pooled = (x * keep[..., None]).sum(1) / (keep.sum(1)[:, None] + 1e-8)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _tokens():
    return np.array([[5, 9, 12, 3, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0],
                     [4, 8, 15, 16, 23, 39, 2, 11]], np.int32)


@pytest.mark.parametrize("fmt", ["tips_scenic", "tips_pytorch"])
def test_the_text_file_beside_the_vision_file_loads_and_runs_as_tips_text_encoder(tmp_path, fmt):
    cfg = _pair_config()
    params = _params(cfg, seed=4)
    params["temperature"] = np.float32(0.0123)
    vision = str(tmp_path / "tips_tiny_vision.npz")
    checkpoints.save(params, cfg, vision, fmt)
    text_file = tmp_path / "tips_tiny_text.npz"
    theirs = dict(np.load(text_file))
    layout = "scenic" if fmt == "tips_scenic" else "pytorch"
    assert tips.text_layout(theirs) == layout
    # The names their code reads: Scenic's restore and their PyTorch demo's pop.
    name = "temperature_contrastive" if layout == "scenic" else "temperature"
    assert float(theirs[name]) == np.float32(0.0123)
    loaded, loaded_cfg = checkpoints.load(vision)
    assert loaded_cfg.text.seq_len == 64 and loaded_cfg.text.width == WIDTH
    assert tokenizers.convention(loaded_cfg) == "tips"
    model = models.build(dict_cfg(loaded_cfg, TEXT_LEN))
    tokens = _tokens()
    _, ztxt, _ = model.apply({"params": loaded}, None, tokens)
    want = text_reference(theirs, tokens, HEADS, layout)
    np.testing.assert_allclose(np.asarray(ztxt), want, atol=2e-5)
    # Padding never reaches the tokens that are not: a longer pad tail changes nothing.
    longer = np.concatenate([tokens, np.zeros((3, 4), np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(model.apply({"params": loaded}, None, longer)[1]),
                               np.asarray(ztxt), atol=1e-5)
    # logits = similarity / temperature
    zimg, ztxt, out = model.apply({"params": loaded}, _images(2, 28), tokens)
    np.testing.assert_allclose(np.asarray(out["logits"]),
                               np.asarray(zimg @ ztxt.T) / np.float32(0.0123), rtol=1e-5)
    # The pair round-trips bit-exactly.
    again = str(tmp_path / "again_vision.npz")
    checkpoints.save(loaded, loaded_cfg, again, fmt)
    for name in ("vision", "text"):
        first = dict(np.load(tmp_path / f"tips_tiny_{name}.npz"))
        second = dict(np.load(tmp_path / f"again_{name}.npz"))
        assert set(first) == set(second)
        for k in first:
            np.testing.assert_array_equal(first[k], second[k], err_msg=f"{name} {k}")
    image_only, image_cfg = checkpoints.load(vision + ":img")
    assert "txt" not in image_only and image_cfg.get("text") is None


def dict_cfg(cfg, seq_len):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.text.seq_len = seq_len
    return cfg


def test_the_tips_tokenizer(tmp_path):
    import sentencepiece
    words = ["a", "photo", "of", "the", "red", "car", "dog", "sedan", "coupe", "bird"]
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words, 6)) for _ in range(500)))
    with open(os.devnull, "w") as log:
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tok"),
            vocab_size=30, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
            logstream=log)
    path = str(tmp_path / "tok.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    tok = tokenizers.load_tokenizer(path, "tips", 8)
    rows = tok(["A Photo of the RED car", "dog " * 20, ""])
    ids = sp.encode("a photo of the red car")
    assert rows[0].tolist() == (ids + [0] * 8)[:8]  # lowercased, no EOS, padded with 0
    assert rows[1].tolist() == sp.encode("dog " * 20)[:8]  # cut, no EOS kept
    assert rows[2].tolist() == [0] * 8
    assert 1 not in rows and tok.special_ids == (0,)
    assert tokenizers.load_tokenizer(path, "tips").seq_len == 64


def test_what_a_file_cannot_hold_or_lacks_is_refused_in_one_line(tmp_path, caplog):
    cfg = _pair_config()
    params = _params(cfg, seed=5)
    params["temperature"] = np.float32(0.02)
    vision = str(tmp_path / "pt_vision.npz")
    checkpoints.save(params, cfg, vision, "tips_pytorch")
    loaded, loaded_cfg = checkpoints.load(vision)  # exact GELU, text eps 1e-5
    with pytest.raises(errors.UserError, match="a big_vision .npz does not record"):
        checkpoints.save(loaded, loaded_cfg, str(tmp_path / "bv.npz"))
    checkpoints.save(loaded, loaded_cfg, str(tmp_path / "again_vision.npz"), "tips_pytorch")
    # Scenic's layout is allowed (round trips through it are exact), with a warning.
    with caplog.at_level(logging.WARNING):
        checkpoints.save(loaded, loaded_cfg, str(tmp_path / "sc_vision.npz"), "tips_scenic")
    assert "their Scenic code runs the file with tanh GELU and eps 1e-6" in caplog.text
    # Their Scenic code pads an image that is not a multiple of 14; their PyTorch code
    # refuses it, as we do.
    with pytest.raises(errors.UserError, match="230 is not a multiple of the patch size 14"):
        checkpoints.load(vision, image_size=230)
    # An image-only export beside an old text file would be paired with it.
    image_only, image_cfg = checkpoints.load(vision + ":img")
    with pytest.raises(errors.UserError, match="pt_text.npz is beside it"):
        checkpoints.save(image_only, image_cfg, vision, "tips_pytorch")
    # Broken files.
    scenic = str(tmp_path / "s_vision.npz")
    checkpoints.save(params, cfg, scenic, "tips_scenic")
    arrays = dict(np.load(scenic))
    del arrays["encoder/ToTokenSequence_0/posembed_input"]
    np.savez(tmp_path / "broken_vision.npz", **arrays)
    with pytest.raises(errors.UserError, match="'encoder/ToTokenSequence_0/posembed_input' is "
                                               "missing"):
        checkpoints.load(str(tmp_path / "broken_vision.npz:img"))
    arrays = dict(np.load(vision))
    arrays["pos_embed"] = arrays["pos_embed"][:, :-3]
    np.savez(tmp_path / "odd_vision.npz", **arrays)
    with pytest.raises(errors.UserError, match="odd_vision.npz:img: pos_embed has shape"):
        checkpoints.load(str(tmp_path / "odd_vision.npz:img"))
    # open_clip's text tower has token_embedding.weight too, and a positional_embedding.
    assert tips.text_layout(["token_embedding.weight", "ln_final.weight",
                             "positional_embedding"]) == ""


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_their_pytorch_state_dict_saved_by_torch_loads_as_their_npz(tmp_path, suffix):
    cfg = _pair_config()
    params = _params(cfg, seed=6)
    params["temperature"] = np.float32(0.03)
    checkpoints.save(params, cfg, str(tmp_path / "m_vision.npz"), "tips_pytorch")
    checkpoints.save(params, cfg, str(tmp_path / f"m_vision{suffix}"), "tips_pytorch")
    if suffix == ".pth":
        import torch
        state = torch.load(tmp_path / "m_vision.pth", weights_only=True)
        assert "blocks.0.attn.qkv.weight" in state and "cls_token" in state
    from_npz, npz_cfg = checkpoints.load(str(tmp_path / "m_vision.npz"))
    from_torch, torch_cfg = checkpoints.load(str(tmp_path / f"m_vision{suffix}"))
    assert torch_cfg.to_dict() == npz_cfg.to_dict()
    a, b = checkpoints.to_flat(from_npz), checkpoints.to_flat(from_torch)
    assert set(a) == set(b) and "temperature" in b and "txt/Embed_0/embedding" in b
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(errors.UserError, match="a TIPS text tower; give the _vision file"):
        checkpoints.load(str(tmp_path / f"m_text{suffix}"))
