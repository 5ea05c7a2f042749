"""What training takes from the frozen text tower (training/frozen_text.py): Lipsum-FT's
energy gap by hand, its random texts, zero-shot classifier heads."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from infusing_jax import errors
from infusing_jax import tokenizers
from infusing_jax.evaluation import text_retrieval
from infusing_jax.evaluation import zero_shot
from infusing_jax.losses import retention
from infusing_jax.training import config as config_lib
from infusing_jax.training import frozen_text
from infusing_jax.training import loop
from infusing_jax.training import run_checkpoints
from infusing_jax.training import suite
from tests.helpers import train_world


def test_lipsum_is_the_energy_gap_against_the_texts():
    rng = np.random.default_rng(0)
    f, f0 = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    texts = rng.normal(size=(5, 6))
    want = np.mean([0.5 * np.mean([((f[b] - f0[b]) @ t) ** 2 for t in texts]) for b in range(4)])
    got = retention.lipsum(jnp.asarray(f), jnp.asarray(f0), jnp.asarray(texts))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # = (f - f0)^T (T^T T / 2K) (f - f0), averaged; 0 where the features agree
    d = f - f0
    np.testing.assert_allclose(got, np.mean(np.einsum("bi,ij,bj->b", d, texts.T @ texts / 10,
                                                      d)), rtol=1e-5)
    assert float(retention.lipsum(jnp.asarray(f), jnp.asarray(f), jnp.asarray(texts))) == 0
    mask = jnp.asarray([True, False, False, True])
    np.testing.assert_allclose(retention.lipsum(jnp.asarray(f), jnp.asarray(f0),
                                                jnp.asarray(texts), mask),
                               retention.lipsum(jnp.asarray(f[[0, 3]]), jnp.asarray(f0[[0, 3]]),
                                                jnp.asarray(texts)), rtol=1e-6)


def test_random_texts_are_wrapped_as_texts_and_avoid_special_ids(world):
    tokenize = tokenizers.load_tokenizer(os.path.join(world, "spm.model"), "siglip", 12)
    rows = frozen_text.random_rows(tokenize, 50, 8, seed=3)
    assert rows.shape == (50, 12)
    np.testing.assert_array_equal(rows, frozen_text.random_rows(tokenize, 50, 8, seed=3))
    assert not np.isin(rows[:, :8], tokenize.special_ids).any()
    assert (rows[:, 8] == tokenize.eos_id).all() and (rows[:, 9:] == tokenize.pad_value).all()
    assert len(np.unique(rows[:, :8])) > 10  # the vocabulary is used


def test_random_texts_for_clip_start_and_end_like_a_text():
    class Fake:  # CLIPTokenizer's wrapping without its vocabulary files
        sot_id, eot_id, pad_value, seq_len, vocab_size = 6, 7, 0, 12, 8
        special_ids = property(tokenizers.CLIPTokenizer.special_ids.fget)
        _with_specials = tokenizers.CLIPTokenizer._with_specials
        wrap = tokenizers.CLIPTokenizer.wrap
        rows = tokenizers.CLIPTokenizer.rows
    rows = frozen_text.random_rows(Fake(), 20, 5, seed=0)
    assert (rows[:, 0] == 6).all() and (rows[:, 6] == 7).all() and (rows[:, 7:] == 0).all()
    assert set(np.unique(rows[:, 1:6])) <= {1, 2, 3, 4, 5}


def _config(world, **domain):
    c = train_world.world_config(world, "naive")
    c.eval.tokenizer = os.path.join(world, "spm.model")
    c.domains.target.update(domain)
    return c


def test_a_zero_shot_head_is_the_class_names_through_the_text_tower(world):
    c = _config(world, head_init="zero_shot", templates=("a {} glyph",))
    config_lib.validate(c)
    heads = frozen_text.zero_shot_heads(c, ["target"], {"target": 10})
    names = sorted(os.listdir(os.path.join(world, "target", "train")) +
                   os.listdir(os.path.join(world, "target", "val")) +
                   os.listdir(os.path.join(world, "target", "test")))
    params, model_cfg = suite.load_text_checkpoint(c)
    tokenize = tokenizers.load_tokenizer(c.eval.tokenizer, "siglip", model_cfg.text.seq_len)
    embed = text_retrieval.text_embedder(model_cfg, params, tokenize)
    want = zero_shot.class_embeddings(embed, names, ("a {} glyph",)).T
    np.testing.assert_allclose(heads["target"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(heads["target"], axis=0), 1.0, rtol=1e-5)


def test_zero_shot_heads_name_what_is_missing(world, tmp_path):
    short = tmp_path / "names.txt"
    short.write_text("a\nb\n")
    c = _config(world, head_init="zero_shot", class_names=str(short))
    with pytest.raises(errors.UserError, match=r"config.domains.target.class_names: 2 names, "
                                               r"but the train split has 10 classes"):
        frozen_text.zero_shot_heads(c, ["target"], {"target": 10})
    c = _config(world, head_init="zero_shot")
    c.domains.target.losses = config_lib.domain("folder:x", losses=dict(
        feature_mse=dict())).losses
    with pytest.raises(errors.UserError, match="head_init: 'zero_shot' initialises a classifier"):
        config_lib.validate(c)
    c = _config(world, head_init="zero_shot")
    c.eval.tokenizer = ""
    with pytest.raises(errors.UserError, match="config.eval.tokenizer: domains.target.head_init"):
        config_lib.validate(c)
    c = _config(world)
    c.eval.tokenizer = ""
    c.domains.target.losses.lipsum = config_lib.loss("lipsum")
    with pytest.raises(errors.UserError, match="config.eval.tokenizer: domains.target.losses."
                                               "lipsum embeds its random texts"):
        config_lib.validate(c)


def test_lipsum_banks_embed_the_random_texts(world):
    c = _config(world)
    c.domains.target.losses.lipsum = config_lib.loss("lipsum", texts=16, tokens=4)
    banks = frozen_text.lipsum_banks(c, ["target"])
    assert banks["target"].shape == (16, 32)
    params, _ = suite.load_text_checkpoint(c)
    scale = np.exp(float(params["t"][0]))  # the energies are the pretrained model's logits
    assert abs(scale - 1) > 1e-2  # so the check below tells scaled from unscaled
    np.testing.assert_allclose(np.linalg.norm(banks["target"], axis=1), scale, rtol=1e-5)
    assert frozen_text.lipsum_banks(_config(world), ["target"]) == {}


def test_a_run_starts_its_classifier_at_the_zero_shot_head(world, tmp_path):
    c = _config(world, head_init="zero_shot")
    c.optim.lr = 1e-9  # two steps that leave the head where it started
    c.train.update(num_steps=2, log_every=1, checkpoint_every=2, eval_every=0,
                   select_by="last")
    loop.train_and_evaluate(c, str(tmp_path))
    mngr = run_checkpoints.manager(str(tmp_path), 1, False)
    state = run_checkpoints.restore_item(mngr, 2, "state")
    want = frozen_text.zero_shot_heads(c, ["target"], {"target": 10})["target"]
    np.testing.assert_allclose(state["params"]["heads"]["target"]["classifier"], want,
                               atol=1e-6)
