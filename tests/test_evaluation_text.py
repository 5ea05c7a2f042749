"""Image<->text retrieval and zero-shot classification with the frozen text tower.

Metrics against a brute-force reference (a full sort per query, ties to the lower
index) on constructed embeddings, and end to end through a tiny SigLIP two-tower
model and a sentencepiece tokenizer trained here, whose text head is solved so
that caption j lands exactly on its image's embedding.
"""
import json
import os

import jax
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from infusing_jax import models
from infusing_jax import tokenizers
from infusing_jax.data import tf_views
from infusing_jax.data.sources import load_source
from infusing_jax.evaluation import prompts
from infusing_jax.evaluation import text_retrieval as tr
from infusing_jax.evaluation import zero_shot as zs
from tests.helpers.assertions import one_line_error
from tests.helpers.tiny import TEXT_LEN, random_params, tiny_config

WORDS = ("a photo of the dog cat bird car tree house red blue green small large two "
         "sitting on under near with at night street man woman child playing pet food "
         "flower type").split()


# ---------------------------------------------------------------- references


def _unit64(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_ranks(queries, keys, query_owner, key_owner):
    """Sort all keys per query (score descending, then index) -> rank of the first positive."""
    scores = _unit64(queries) @ _unit64(keys).T
    ranks = []
    for i, row in enumerate(scores):
        order = np.lexsort((np.arange(len(keys)), -row))
        ranks.append(np.flatnonzero(np.asarray(key_owner)[order] == query_owner[i])[0])
    return np.array(ranks)


def _ref_recalls(images, texts, owner, ks=(1, 5, 10)):
    ids = np.arange(len(images))
    i2t, t2i = _ref_ranks(images, texts, ids, owner), _ref_ranks(texts, images, owner, ids)
    out = {f"i2t_r{k}": np.mean(i2t < k) for k in ks}
    out.update({f"t2i_r{k}": np.mean(t2i < k) for k in ks})
    return dict(out, num_images=len(images), num_texts=len(texts))


def _tied(n, pool, dim=16, seed=0):
    """n unit rows drawn from `pool` distinct rows of +-1/4 entries: every cosine is exact."""
    rng = np.random.default_rng(seed)
    rows = rng.choice([-0.25, 0.25], (pool, dim)).astype(np.float32)
    return rows[rng.integers(0, pool, n)]


def _captioned(num_images, seed=0, most=4):
    """image_index for 1..most captions per image, the texts in shuffled order."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(num_images), rng.integers(1, most + 1, num_images))
    return rng.permutation(owner)



# ---------------------------------------------------------------- retrieval metrics


@pytest.mark.parametrize("pool", [5, 1000])  # heavy ties / almost none
def test_recalls_match_brute_force(pool):
    owner = _captioned(40, seed=pool)
    images = _tied(40, pool, seed=1)
    texts = _tied(len(owner), pool, seed=2) * np.float32(3.0)  # scale does not matter
    got = tr.recalls(images, texts, owner, ks=(1, 2, 5, 10))
    want = _ref_recalls(images, texts, owner, ks=(1, 2, 5, 10))
    assert got == pytest.approx(want, abs=0)
    assert 0 < got["i2t_r5"] < 1 and 0 < got["t2i_r5"] < 1


def test_gaussian_recalls_match_brute_force():
    rng = np.random.default_rng(3)
    owner = _captioned(60, seed=3, most=6)
    images = rng.normal(size=(60, 12)).astype(np.float32)
    texts = (images[owner] + rng.normal(0, 1.5, (len(owner), 12))).astype(np.float32)
    got = tr.recalls(images, texts, owner)
    assert got == pytest.approx(_ref_recalls(images, texts, owner), abs=0)
    assert 0.1 < got["i2t_r1"] < 0.9


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_blockwise_equals_dense(block_size):
    owner = _captioned(50, seed=4)
    images, texts = _tied(50, 7, seed=5), _tied(len(owner), 7, seed=6)
    ids = np.arange(50)
    for args in [(images, texts, ids, owner), (texts, images, owner, ids)]:
        dense = tr.first_positive_ranks(*args, block_size=len(args[0]))
        np.testing.assert_array_equal(tr.first_positive_ranks(*args, block_size=block_size), dense)
        np.testing.assert_array_equal(dense, _ref_ranks(*args))


def test_ties_go_to_the_lower_index():
    # Every cosine equal: a query's rank is the lowest index among its positives.
    owner = np.array([2, 0, 1, 2, 0, 1, 1])
    images, texts = np.ones((3, 4), np.float32), np.ones((7, 4), np.float32)
    ids = np.arange(3)
    np.testing.assert_array_equal(tr.first_positive_ranks(images, texts, ids, owner), [1, 2, 0])
    np.testing.assert_array_equal(tr.first_positive_ranks(texts, images, owner, ids), owner)


def test_perfect_match_gives_recall_one():
    rng = np.random.default_rng(7)
    owner = _captioned(30, seed=7)
    images = rng.normal(size=(30, 8)).astype(np.float32)
    texts = images[owner] * rng.uniform(0.5, 2, (len(owner), 1)).astype(np.float32)
    got = tr.recalls(images, texts, owner)
    assert all(got[k] == 1.0 for k in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10"))
    assert (got["num_images"], got["num_texts"]) == (30, len(owner))


def test_shuffled_match_gives_chance_values():
    # One-hot embeddings; each text is the NEXT image's embedding: its own image scores 0
    # and the wrong one 1, so no query finds its partner first.
    n = 12
    images = np.eye(n, dtype=np.float32)
    got = tr.recalls(images, np.roll(images, -1, axis=0), np.arange(n))
    assert got["i2t_r1"] == got["t2i_r1"] == 0.0
    # Uninformative texts (all equal) against images ranked 0, 1, 2, ... by score, three
    # captions each, text j of image j mod n: T->I R@K = K / n (chance); I->T all tie, so
    # image i's first caption (text i) ranks i: R@K = K / n as well.
    angles = np.linspace(0, 1, n)
    images = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    texts = np.tile([[1.0, 0.0]], (3 * n, 1)).astype(np.float32)
    got = tr.recalls(images, texts, np.arange(3 * n) % n)
    for k in (1, 5, 10):
        assert got[f"t2i_r{k}"] == got[f"i2t_r{k}"] == k / n


def test_recall_errors():
    images, texts = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    one_line_error(lambda: tr.recalls(images, texts, [0, 1, 1]), "image_index", "no text",
                    "[2]")
    one_line_error(lambda: tr.recalls(images, texts, [0, 1, 3]), "image_index", "3 images")
    one_line_error(lambda: tr.recalls(images, texts, [0, 1]), "image_index", "(3,)")
    one_line_error(lambda: tr.recalls(images, texts[:, :2], [0, 1, 2]), "(3, 2)")


def test_default_block_size_bounds_the_slab():
    block = tr.default_block_size(125_000)  # texts as keys of a 25k x 125k problem
    assert block == 512 and block * 125_000 * 4 <= tr.SLAB_BYTES
    assert tr.default_block_size(10) == 4096 and tr.default_block_size(10 ** 9) == 8


def test_load_text_embeddings(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, embeddings=np.ones((4, 3)), image_index=np.array([0, 0, 1, 2]))
    embeddings, image_index = tr.load_text_embeddings(path)
    assert embeddings.shape == (4, 3) and embeddings.dtype == np.float32
    assert image_index.tolist() == [0, 0, 1, 2]
    np.savez(tmp_path / "bad.npz", embeddings=np.ones((4, 3)))
    one_line_error(lambda: tr.load_text_embeddings(tmp_path / "bad.npz"), "bad.npz",
                    "image_index")
    np.savez(tmp_path / "bad.npz", embeddings=np.ones((4, 3)), image_index=np.zeros(3, int))
    one_line_error(lambda: tr.load_text_embeddings(tmp_path / "bad.npz"), "bad.npz", "(M,)")
    (tmp_path / "x.npz").write_text("nope")
    one_line_error(lambda: tr.load_text_embeddings(tmp_path / "x.npz"), "x.npz", "not an .npz")


# ---------------------------------------------------------------- zero-shot metrics


def test_prompt_averaging_normalises_each_prompt_first():
    # Class 0: prompts (3, 4, 0) and (0, 0, 2) -> units (.6, .8, 0), (0, 0, 1) -> mean
    # (.3, .4, .5), norm sqrt(.5). Class 1: (1, 0, 0) twice -> (1, 0, 0).
    got = zs.classifier([[[3, 4, 0], [0, 0, 2]], [[1, 0, 0], [5, 0, 0]]])
    np.testing.assert_allclose(got[0], np.array([0.3, 0.4, 0.5]) / np.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(got[1], [1, 0, 0])
    raw_mean = np.array([1.5, 2, 1]) / np.linalg.norm([1.5, 2, 1])  # averaging before normalising
    assert np.abs(got[0] - raw_mean).max() > 0.1


def test_class_embeddings_layout():
    seen = []
    vectors = {"a dog.": [1, 0, 0], "the dog!": [0, 2, 0],
               "a cat.": [0, 0, 1], "the cat!": [0, 0, 3]}

    def embed(texts):
        seen.extend(texts)
        return np.array([vectors[t] for t in texts], np.float32)
    got = zs.class_embeddings(embed, ["dog", "cat"], ["a {}.", "the {}!"])
    assert seen == ["a dog.", "the dog!", "a cat.", "the cat!"]
    np.testing.assert_allclose(got, [[0.5 ** 0.5, 0.5 ** 0.5, 0], [0, 0, 1]], rtol=1e-6)
    one_line_error(lambda: zs.class_embeddings(embed, ["dog"], ["a photo"]), "a photo", "{}")


@pytest.mark.parametrize("num_classes", [3, 9])
def test_top_k_matches_brute_force(num_classes):
    rng = np.random.default_rng(num_classes)
    classes = _tied(num_classes, 4, seed=num_classes)  # duplicate classes: ties
    images = _tied(70, 6, seed=11)
    labels = rng.integers(0, num_classes, 70)
    got = zs.accuracy(images, labels, classes, ks=(1, 2, 5), block_size=16)
    ranks = _ref_ranks(images, classes, labels, np.arange(num_classes))
    assert got == {"top1": np.mean(ranks < 1), "top2": np.mean(ranks < 2),
                   "top5": np.mean(ranks < 5), "num_images": 70}
    if num_classes <= 5:
        assert got["top5"] == 1.0


def test_top_k_errors():
    one_line_error(lambda: zs.accuracy(np.eye(3), [0, 1, 3], np.eye(3)), "labels", "[0, 3)")
    one_line_error(lambda: zs.accuracy(np.eye(3), [0, 1, -1], np.eye(3)), "labels")
    one_line_error(lambda: zs.accuracy(np.eye(3), [0, 1], np.eye(3)), "labels")


# ---------------------------------------------------------------- prompts and class names


def test_tfds_class_names_offline():
    got = {name: prompts.tfds_class_names(name) for name in
           ("imagenet2012", "cars196", "food101", "oxford_flowers102", "oxford_iiit_pet")}
    assert {n: {g: len(v) for g, v in d.items()} for n, d in got.items()} == {
        "imagenet2012": {"fine": 1000}, "cars196": {"fine": 196}, "food101": {"fine": 101},
        "oxford_flowers102": {"fine": 102}, "oxford_iiit_pet": {"fine": 37, "coarse": 2}}
    imagenet = got["imagenet2012"]["fine"]
    assert imagenet[:3] == ["tench", "goldfish", "great white shark"]
    assert len(set(imagenet)) == 1000  # the two 'maillot' classes keep their full lemma lists
    assert got["food101"]["fine"][0] == "apple pie"
    assert got["oxford_iiit_pet"]["coarse"] == ["Cat", "Dog"]
    assert got["cars196"]["fine"][0] == "AM General Hummer SUV 2000"
    assert prompts.tfds_class_names("imagenet_v2") == got["imagenet2012"]
    assert prompts.tfds_class_names("stanford_online_products")["coarse"][3] == "coffee maker"
    one_line_error(lambda: prompts.tfds_class_names("caltech_birds2011"), "caltech_birds2011",
                    "class names file")


def test_templates_and_class_name_files(tmp_path):
    for name in ("imagenet2012", "imagenet_sketch", "cars196", "food101", "oxford_flowers102",
                 "oxford_iiit_pet", "unknown"):
        assert 3 <= len(prompts.check_templates(prompts.templates(name))) <= 6
    assert prompts.templates("imagenet_sketch") == prompts.templates("imagenet2012")
    (tmp_path / "names.txt").write_text("red car\n  blue bird \n\n")
    assert prompts.read_class_names(tmp_path / "names.txt") == ["red car", "blue bird"]
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    one_line_error(lambda: prompts.read_class_names(tmp_path / "gap.txt"), "gap.txt", "line")
    one_line_error(lambda: prompts.read_class_names(tmp_path / "none.txt"), "none.txt")


# ---------------------------------------------------------------- end to end, tiny model


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 48-piece sentencepiece model, T5's ids (pad 0, eos 1, unk 2), for the 100-token model."""
    d = tmp_path_factory.mktemp("sp")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(2000)]
    (d / "corpus.txt").write_text("\n".join(lines))
    with open(os.devnull, "w") as log:
        sentencepiece.SentencePieceTrainer.train(
            input=str(d / "corpus.txt"), model_prefix=str(d / "spm"), vocab_size=48,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, logstream=log)
    return str(d / "spm.model")


@pytest.fixture(scope="module")
def tiny():
    """A tiny SigLIP two-tower model: cfg, params, jitted encoders, module."""
    cfg = tiny_config("siglip")
    model = models.build(cfg)
    encode_images = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                     method=model.encode_images))
    encode_texts = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_texts))
    pooled = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                              method=lambda m, t: m.txt(t)[1]["pooled"]))
    return dict(cfg=cfg, params=random_params(cfg), model=model, encode_images=encode_images,
                encode_texts=encode_texts, pooled=pooled)


def _image_embeddings(tiny, files):
    """The model's embeddings of image files, preprocessed one by one (eager TF)."""
    view = tf_views.eval_fn("siglip", tiny["cfg"].image_size)
    x = np.stack([view(tf.constant(open(f, "rb").read())).numpy() for f in files])
    return np.asarray(tiny["encode_images"](tiny["params"], x))


def _matched_head(tiny, tokens, targets):
    """Params whose text head maps each token row exactly to its target (least squares on
    [pooled, 1], exact for <= width + 1 rows)."""
    pooled = np.asarray(tiny["pooled"](tiny["params"], tokens), np.float64)
    design = np.concatenate([pooled, np.ones((len(pooled), 1))], 1)
    solution = np.linalg.lstsq(design, np.asarray(targets, np.float64), rcond=None)[0]
    params = jax.tree_util.tree_map(np.array, tiny["params"])
    params["txt"]["head"]["kernel"] = solution[:-1].astype(np.float32)
    params["txt"]["head"]["bias"] = solution[-1].astype(np.float32)
    return params


def _write_png(path, seed, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def caption_set(tmp_path):
    """6 images (1-3 captions each) and a broken file with captions, as captions:FILE.json."""
    rng = np.random.default_rng(1)
    records = []
    for i in range(6):
        _write_png(tmp_path / f"img{i}.png", seed=i)
        records.append({"image": f"img{i}.png", "captions": [
            " ".join(rng.choice(WORDS, 4)) for _ in range(rng.integers(1, 4))]})
    (tmp_path / "img3b.png").write_bytes(b"\x89PNG broken")
    records.append({"image": "img3b.png", "captions": ["a broken file", "never seen"]})
    (tmp_path / "set.json").write_text(json.dumps(records))
    return tmp_path, records


def test_text_retrieval_end_to_end(tiny, sp_model, caption_set, tmp_path):
    root, records = caption_set
    tokenize = tokenizers.SigLIPTokenizer(sp_model, TEXT_LEN)
    good = sorted((r for r in records if r["image"] != "img3b.png"), key=lambda r: r["image"])
    captions = [c for r in good for c in r["captions"]]
    owner = np.repeat(np.arange(6), [len(r["captions"]) for r in good])
    images = _image_embeddings(tiny, [root / r["image"] for r in good])
    split = load_source(f"captions:{root / 'set.json'}").split("test")
    view = tf_views.eval_fn("siglip", tiny["cfg"].image_size)

    matched = _matched_head(tiny, tokenize(captions), images[owner])
    for params in (tiny["params"], matched):
        texts = np.asarray(tiny["encode_texts"](params, tokenize(captions)))
        got = tr.evaluate_split(
            lambda x: tiny["encode_images"](params, x), split, view, batch_size=4,
            embed_texts=tr.text_embedder(tiny["cfg"], params, tokenize, batch_size=4))
        assert got == pytest.approx(_ref_recalls(images, texts, owner), abs=1e-12)
        assert (got["num_images"], got["num_texts"]) == (6, len(captions))
    assert got["i2t_r1"] == got["t2i_r1"] == 1.0  # the matched head: caption j on its image

    # The same texts from a file; positions count the broken image (sorted: img3b is 4th).
    position = np.array([0, 1, 2, 3, 5, 6])[owner]
    np.savez(tmp_path / "texts.npz", embeddings=np.concatenate([texts, texts[:2]]),
             image_index=np.concatenate([position, [4, 4]]))
    from_file = tr.evaluate_split(lambda x: tiny["encode_images"](matched, x), split, view,
                                  text_file=tmp_path / "texts.npz", batch_size=4)
    assert from_file == got
    one_line_error(lambda: tr.evaluate_split(lambda x: x, split, view), "exactly one")


def test_text_embedder_checks_the_tokenizer(tiny, sp_model):
    long = tokenizers.SigLIPTokenizer(sp_model, 16)
    one_line_error(lambda: tr.text_embedder(tiny["cfg"], tiny["params"], long), "seq_len 16",
                    "seq_len=8")
    no_text = tiny_config("siglip", text=False)
    one_line_error(lambda: tr.text_embedder(no_text, tiny["params"], long), "model.text")


def _ref_zero_shot(tiny, params, tokenize, images, labels, names, templates):
    texts = [t.replace("{}", n) for n in names for t in templates]
    u = _unit64(np.asarray(tiny["encode_texts"](params, tokenize(texts))))
    m = u.reshape(len(names), len(templates), -1).mean(1)
    ranks = _ref_ranks(images, m, labels, np.arange(len(names)))
    return {"top1": np.mean(ranks < 1), "top5": np.mean(ranks < 5), "num_images": len(images)}


def test_zero_shot_end_to_end_with_a_class_names_file(tiny, sp_model, tmp_path):
    names = ["red car", "blue bird", "small dog", "green tree"]
    for label, sub in enumerate(["a", "b", "c", "d"]):  # folder classes sort as labels 0..3
        for i in range(2):
            _write_png(tmp_path / "data" / sub / f"{i}.png", seed=10 * label + i)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    split = load_source(f"folder:{tmp_path / 'data'}").split("train")
    files = sorted((tmp_path / "data").rglob("*.png"))
    images, labels = _image_embeddings(tiny, files), np.repeat(np.arange(4), 2)
    tokenize = tokenizers.SigLIPTokenizer(sp_model, TEXT_LEN)
    templates = ["a photo of a {}.", "the {} at night."]
    # Every prompt of class c lands on the embedding of class c's first image.
    prompts_ = [t.replace("{}", n) for n in names for t in templates]
    matched = _matched_head(tiny, tokenize(prompts_), np.repeat(images[::2], 2, axis=0))
    view = tf_views.eval_fn("siglip", tiny["cfg"].image_size)

    for params in (tiny["params"], matched):
        got = zs.evaluate_split(
            lambda x: tiny["encode_images"](params, x),
            tr.text_embedder(tiny["cfg"], params, tokenize, batch_size=3), split, view,
            {"fine": prompts.read_class_names(tmp_path / "names.txt")}, templates, batch_size=3)
        assert got == {"fine": pytest.approx(_ref_zero_shot(tiny, params, tokenize, images,
                                                            labels, names, templates))}
    assert got["fine"]["top1"] >= 0.5  # the first image of each class is exactly on its class
    one_line_error(lambda: zs.evaluate_split(None, None, split, view, {"fine": names[:3]},
                                              templates), "3 names", "4 classes")


def test_zero_shot_on_tfds_pets_both_granularities(tiny, sp_model):
    tokenize = tokenizers.SigLIPTokenizer(sp_model, TEXT_LEN)
    names = prompts.tfds_class_names("oxford_iiit_pet")
    templates = prompts.templates("oxford_iiit_pet")
    view = tf_views.eval_fn("siglip", tiny["cfg"].image_size)
    params = tiny["params"]
    with tfds.testing.mock_data(num_examples=12):
        split = load_source("tfds:oxford_iiit_pet").split("test")
        examples = list(split.dataset(0, 1).as_numpy_iterator())
        got = zs.evaluate_split(lambda x: tiny["encode_images"](params, x),
                                tr.text_embedder(tiny["cfg"], params, tokenize), split, view,
                                names, templates, batch_size=5)
    x = np.stack([view(tf.constant(ex["image"])).numpy() for ex in examples])
    images = np.asarray(tiny["encode_images"](params, x))
    for granularity, field in (("fine", "label"), ("coarse", "coarse_label")):
        labels = np.array([ex[field] for ex in examples])
        want = _ref_zero_shot(tiny, params, tokenize, images, labels, names[granularity],
                              templates)
        assert got[granularity] == pytest.approx(want)
    assert got["coarse"]["top5"] == 1.0  # two classes
