"""SigLIP 2 at fixed resolution: SigLIP's towers with Gemma's 256k vocabulary and tokenizer.

Tiny random models written as big_vision writes SigLIP 2 (`params/` root, scanned
blocks) and as transformers' SiglipModel; parity against transformers; the
So400m/16 and g-opt/16 variants inferred from their tensors' shapes.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import sentencepiece
import torch
import transformers

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import models
from infusing_jax import tokenizers
from infusing_jax.checkpoints import infer
from infusing_jax.checkpoints import state_dict
from infusing_jax.checkpoints import tree
from tests.helpers.tiny import random_images, randomize

SEQ_LEN = 16


def _config():
    cfg = models.model_config("siglip", "mu/8", 32, "mu", vocab_size=tokenizers.GEMMA_VOCAB,
                              seq_len=SEQ_LEN)
    cfg.image.depth = cfg.text.depth = 2
    return cfg


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    """(params, cfg, path of its big_vision .npz): params/ root, scanned blocks."""
    cfg = _config()
    params = randomize(models.init_params(cfg, jax.random.PRNGKey(0)), seed=0, std=0.2)
    flat = tree.roll_scan(tree.flatten(params))
    path = str(tmp_path_factory.mktemp("bv") / "siglip2_mu8_32.npz")
    np.savez(path, **{f"params/{k}": v for k, v in flat.items()})
    return params, cfg, path


@pytest.fixture(scope="module")
def gemma_spm(tmp_path_factory):
    """A small sentencepiece model with Gemma's special ids: pad 0, eos 1, bos 2, unk 3."""
    d = tmp_path_factory.mktemp("gemma")
    words = ["a", "photo", "of", "the", "red", "car", "dog", "sedan", "coupe", "bird"]
    rng = np.random.default_rng(0)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(500)))
    with open(os.devnull, "w") as log:
        sentencepiece.SentencePieceTrainer.train(
            input=str(d / "corpus.txt"), model_prefix=str(d / "gemma"), vocab_size=30,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, logstream=log)
    return str(d / "gemma.model")


def test_the_npz_loads_as_siglip_with_gemma_text_convention(siglip2):
    params, cfg, path = siglip2
    loaded, loaded_cfg = checkpoints.load(path)
    assert loaded_cfg.family == "siglip" and loaded_cfg.text.vocab_size == 256_000
    assert tokenizers.convention(loaded_cfg) == "siglip2"
    assert tokenizers.convention(models.model_config("siglip", "B/16")) == "siglip"
    assert tokenizers.convention(models.model_config("siglip", "B/16", text_variant=None)) \
        == "siglip"
    for k, v in tree.flatten(params).items():
        np.testing.assert_array_equal(checkpoints.to_flat(loaded)[k], v, err_msg=k)


def test_gemma_tokenizer_follows_big_vision_siglip2_convention(gemma_spm):
    tok = tokenizers.load_tokenizer(gemma_spm, "siglip2", SEQ_LEN)
    sp = sentencepiece.SentencePieceProcessor(model_file=gemma_spm)
    rows = tok(["A Photo of the RED car", "dog " * 40, ""])
    # lowercased (ASCII), no BOS, EOS appended, padded with Gemma's <pad> 0
    ids = sp.encode("a photo of the red car")
    assert rows[0].tolist() == ids + [1] + [0] * (SEQ_LEN - len(ids) - 1)
    assert 2 not in rows  # never a BOS
    # too long: cut to SEQ_LEN - 1 ids, EOS kept at the end ("sticky")
    assert rows[1].tolist() == sp.encode("dog " * 40)[:SEQ_LEN - 1] + [1]
    assert rows[2].tolist() == [1] + [0] * (SEQ_LEN - 1)
    assert set(tok.special_ids) == {0, 1, 2}
    assert tokenizers.load_tokenizer(gemma_spm, "siglip2").seq_len == 64


def test_transformers_siglipmodel_matches_ours(siglip2, gemma_spm, tmp_path):
    params, cfg, _ = siglip2
    out_dir = str(tmp_path / "hf")
    checkpoints.save(params, cfg, out_dir, "hf")
    with open(os.path.join(out_dir, "config.json")) as f:
        text_config = json.load(f)["text_config"]
    assert text_config["vocab_size"] == 256_000
    assert [text_config[f"{t}_token_id"] for t in ("pad", "eos", "bos")] == [0, 1, 2]  # Gemma's
    hf, info = transformers.SiglipModel.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    tokens = tokenizers.load_tokenizer(gemma_spm, "siglip2", SEQ_LEN)(
        ["a photo of a red sedan", "the dog", "a bird"])
    images = random_images(2)
    zimg, ztxt, _ = models.build(cfg).apply({"params": params}, images, tokens)
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(zimg), ref.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ztxt), ref.text_embeds.numpy(), atol=1e-5)


@pytest.mark.parametrize("dst", ["hf", "siglip2.safetensors", "again.npz"])
def test_round_trips_are_bit_exact(siglip2, tmp_path, dst):
    params, cfg, path = siglip2
    loaded, loaded_cfg = checkpoints.load(path)
    out = str(tmp_path / dst)
    checkpoints.save(loaded, loaded_cfg, out)
    back, back_cfg = checkpoints.load(out)
    assert back_cfg.text.vocab_size == 256_000 and tokenizers.convention(back_cfg) == "siglip2"
    want, got = tree.flatten(params), checkpoints.to_flat(back)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("variant, text, size", [("So400m/16", "So400m", 256),
                                                 ("g-opt/16", "So400m", 384)])
def test_the_new_variants_are_inferred_from_their_shapes(variant, text, size):
    want = models.model_config("siglip", variant, size, text, vocab_size=256_000)
    # The tensors' shapes only (a g-opt/16 is 1.1B parameters): zero-stride arrays.
    flat = {k: np.broadcast_to(np.float32(0), s)
            for k, s in infer.expected_shapes(want).items()}
    got = infer.infer_config(flat, {}, where=variant)
    for tower in ("image", "text"):
        for field in ("width", "depth", "mlp_dim", "num_heads"):
            assert got[tower][field] == want[tower][field], (tower, field)
    assert got.image.patch_size == 16 and got.image_size == size
    assert got.text.vocab_size == 256_000 and got.text.out_dim == want.image.width
    assert tokenizers.convention(got) == "siglip2"


def test_naflex_checkpoints_are_refused_in_one_line(tmp_path):
    width = 32
    np.savez(tmp_path / "naflex.npz", **{
        "params/img/embedding/kernel": np.zeros((16 * 16 * 3, width), np.float32),
        "params/img/pos_embedding": np.zeros((16, 16, width), np.float32)})
    with pytest.raises(errors.UserError, match="naflex.npz: a NaFlex image tower"):
        checkpoints.load(str(tmp_path / "naflex.npz"))
    hf_dir = tmp_path / "hf_naflex"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(errors.UserError, match="SigLIP 2's NaFlex"):
        checkpoints.load(str(hf_dir))
    open_clip_file = str(tmp_path / "open_clip_naflex.safetensors")  # timm's NaFlexVit trunk
    state_dict.write(open_clip_file, {
        "visual.trunk.embeds.proj.weight": np.zeros((width, 16 * 16 * 3), np.float32),
        "visual.trunk.embeds.pos_embed": np.zeros((1, 16, 16, width), np.float32)})
    with pytest.raises(errors.UserError, match="open_clip_naflex.safetensors: an open_clip "
                                               "NaFlex image tower"):
        checkpoints.load(open_clip_file)


def test_a_text_side_loads_the_gemma_convention(siglip2, gemma_spm):
    """suite / frozen_text / embed pick the tokenizer by the text tower's vocabulary."""
    _, cfg, _ = siglip2
    tok = tokenizers.load_tokenizer(gemma_spm, tokenizers.convention(cfg), cfg.text.seq_len)
    assert tok.pad_value == 0 and tok.seq_len == SEQ_LEN
    clip = ml_collections.ConfigDict(dict(family="clip", text=dict(vocab_size=256_000)))
    assert tokenizers.convention(clip) == "clip"
