"""Tokenizers on tiny vocabularies trained here: sentencepiece (SigLIP) and CLIP BPE."""
import gzip
import json
import os
import random
import unicodedata

import numpy as np
import pytest
import regex
import sentencepiece
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from infusing_jax import tokenizers as tk

WORDS = ("a photo of the dog cat bird car tree house red blue green small large two three "
         "sitting on under near with at night day snowy street man woman child playing "
         "zürich café naïve über straße 東京 日本 🙂 don't it's we're they've i'm you'll he'd "
         "1 2 3 42 2024 3.5 , . ! ? ; : - ( ) \" ' & / #").split()

TEXTS = [
    "a photo of a dog",
    "A PHOTO of a Dog!",
    "  extra   whitespace\tand\nnewlines  ",
    "the cat's toy isn't red; it's BLUE.",
    "we're here, they've gone, I'm done, you'll see, he'd go",
    "3.14159 and 2024-01-01, 42 cats",
    "Zürich café naïve ÜBER Straße",
    "e\u0301 decomposed vs \u00e9 composed",
    "東京の写真 🙂🐶",
    "punctuation!!! ??? ... (brackets) [x] {y} #tag @user",
    "",
    "word " * 100,
]


SYLLABLES = "ka to ri mo sun pel dra vik ost lum ber gan che wil thi qua zo ex ing ed".split()


def _corpus(n=3000, seed=0):
    """Lines of known words mixed with made-up ones (enough variety for ~1k pieces)."""
    rng = random.Random(seed)

    def word():
        if rng.random() < 0.5:
            return rng.choice(WORDS)
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    return [" ".join(word() for _ in range(rng.randint(3, 12))) for _ in range(n)]


# ---------------------------------------------------------------- SigLIP

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 200-piece unigram model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    with open(os.devnull, "w") as log:
        sentencepiece.SentencePieceTrainer.train(
            input=str(d / "corpus.txt"), model_prefix=str(d / "spm"), vocab_size=200,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, logstream=log)
    return str(d / "spm.model")


def _sp_expected(sp, text, seq_len, pad, lower=True):
    if lower:
        text = text.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                            "abcdefghijklmnopqrstuvwxyz"))
    ids = sp.encode(text) + [sp.eos_id()]
    if len(ids) > seq_len:
        ids = ids[:seq_len - 1] + [sp.eos_id()]
    return ids + [pad] * (seq_len - len(ids))


@pytest.mark.parametrize("seq_len", [64, 16, 5])
def test_siglip_matches_sentencepiece(sp_model, seq_len):
    tok = tk.SigLIPTokenizer(sp_model, seq_len)
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    out = tok(TEXTS)
    assert out.shape == (len(TEXTS), seq_len) and out.dtype == np.int32
    for row, text in zip(out, TEXTS):
        assert row.tolist() == _sp_expected(sp, text, seq_len, pad=1)


def test_siglip_model_file_on_a_remote_filesystem(sp_model):
    """A gs:// .model file reads through tf.io.gfile (TF's ram:// stands in)."""
    import tensorflow as tf
    tf.io.gfile.makedirs("ram://tokenizers_test")
    tf.io.gfile.copy(sp_model, "ram://tokenizers_test/spm.model", overwrite=True)
    remote = tk.SigLIPTokenizer("ram://tokenizers_test/spm.model", 16)
    np.testing.assert_array_equal(remote(TEXTS), tk.SigLIPTokenizer(sp_model, 16)(TEXTS))
    with pytest.raises(ValueError, match="local paths only"):
        tk.load_tokenizer("ram://tokenizers_test/vocab.json", "clip")


def test_siglip_eos_padding_truncation(sp_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = tk.SigLIPTokenizer(sp_model, 10, pad_value=0)  # pad != eos, to see the EOS
    out = tok(["a dog", "cat " * 50, ""])
    n = len(sp.encode("a dog"))
    assert out[0, n] == 1 and (out[0, n + 1:] == 0).all() and (out[0, :n] > 2).all()
    assert out[1, -1] == 1 and (out[1, :-1] > 2).all()  # truncated: EOS sticks at the end
    assert out[1, :-1].tolist() == sp.encode("cat " * 50)[:9]
    assert out[2].tolist() == [1] + [0] * 9  # empty text: only EOS
    assert tok("a dog").shape == (1, 10)


def test_siglip_lowercases_ascii_only(sp_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = tk.SigLIPTokenizer(sp_model, 32)
    # big_vision's tf.strings.lower (default encoding '') leaves non-ASCII letters alone.
    assert tok.encode("A Dog ÜBER") == sp.encode("a dog Über") + [1]
    assert tk.SigLIPTokenizer(sp_model, 32, lowercase=False).encode("A Dog") == \
        sp.encode("A Dog") + [1]


def test_siglip_directory(sp_model, tmp_path):
    (tmp_path / "spiece.model").write_bytes(open(sp_model, "rb").read())
    a, b = tk.SigLIPTokenizer(tmp_path), tk.SigLIPTokenizer(sp_model)
    assert (a(TEXTS) == b(TEXTS)).all()


# ---------------------------------------------------------------- CLIP

def _ref_byte_map():
    """byte -> character, from CLIP's vocab order (printable latin-1 bytes first)."""
    chars = tk.byte_alphabet()
    kept = [ord(c) for c in chars if ord(c) < 256]
    return dict(zip(kept + [b for b in range(256) if b not in kept], chars))


def _ref_clip_encode(text, vocab, merges):
    """Plain-Python OpenAI CLIP BPE (without ftfy / html.unescape): SOT ids EOT."""
    ranks = {m: i for i, m in enumerate(merges)}
    byte_map = _ref_byte_map()
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids = [vocab[tk.SOT]]
    for word in regex.findall(tk.CLIP_SPLIT, text):
        parts = [byte_map[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            rank, first, second = min((ranks.get(p, len(ranks)), *p)
                                      for p in zip(parts, parts[1:]))
            if rank == len(ranks):
                break
            merged, i = [], 0
            while i < len(parts):
                if parts[i] == first and i + 1 < len(parts) and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return ids + [vocab[tk.EOT]]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """Merges trained here, written as HF vocab.json + merges.txt and as open_clip's .gz."""
    trainer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer.normalizer = normalizers.Lowercase()
    trainer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tk.CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=900, show_progress=False, end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer.to_str())["model"]["merges"]]
    assert len(merges) > 200

    chars = tk.byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [tk.SOT, tk.EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)

    d = tmp_path_factory.mktemp("clip")
    (d / "hf").mkdir()
    (d / "hf" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [f"{a} {b}" for a, b in merges]
    (d / "hf" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n",
                                         encoding="utf-8")
    with gzip.open(d / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(lines) + "\n")
    return dict(hf=d / "hf", gz=d / "bpe_simple_vocab_16e6.txt.gz", vocab=vocab, merges=merges)


def test_byte_alphabet_is_clips():
    chars = tk.byte_alphabet()
    assert len(set(chars)) == 256 and chars[0] == "!"
    assert chars.index("a") + 256 == 320  # OpenAI's id of "a</w>"
    assert _ref_byte_map()[ord(" ")] == "Ġ" and chars.index("Ā") == 188  # byte 0


@pytest.mark.parametrize("seq_len", [77, 12])
def test_clip_matches_transformers(clip_files, seq_len):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(clip_files["hf"]))
    texts = TEXTS + ["a <|endoftext|> inside", "<|startoftext|>twice<|endoftext|>"]
    want = hf(texts, padding="max_length", max_length=seq_len, truncation=True)["input_ids"]
    out = tk.CLIPTokenizer(clip_files["hf"], seq_len, pad_value=hf.pad_token_id)(texts)
    assert out.dtype == np.int32 and out.shape == (len(texts), seq_len)
    assert out.tolist() == want


def test_clip_matches_reference_bpe(clip_files):
    tok = tk.CLIPTokenizer(clip_files["gz"])
    out = tok(TEXTS)
    assert out.shape == (len(TEXTS), 77) and out.dtype == np.int32
    for row, text in zip(out, TEXTS):
        ids = _ref_clip_encode(text, clip_files["vocab"], clip_files["merges"])
        if len(ids) > 77:
            ids = ids[:76] + [tok.eot_id]
        assert row.tolist() == ids + [0] * (77 - len(ids)), text
        assert tok.encode(text) == _ref_clip_encode(text, clip_files["vocab"],
                                                    clip_files["merges"])


def test_clip_sot_eot_padding_truncation(clip_files):
    tok = tk.CLIPTokenizer(clip_files["gz"], 8)
    assert tok.eot_id == tok.vocab_size - 1 and tok.sot_id == tok.vocab_size - 2
    out = tok(["a dog", "cat " * 20, ""])
    assert out[0].tolist() == tok.encode("a dog") + [0] * 4  # SOT a dog EOT, zero-padded
    assert out[1, 0] == tok.sot_id and out[1, -1] == tok.eot_id  # truncated: EOT kept last
    assert out[1, 1:-1].tolist() == tok.encode("cat " * 20)[1:7]
    assert out[2].tolist() == [tok.sot_id, tok.eot_id] + [0] * 6
    assert (out.argmax(-1) == [3, 7, 1]).all()  # the towers pool at argmax: the EOT


def test_clip_file_forms_agree(clip_files):
    hf = clip_files["hf"]
    want = tk.CLIPTokenizer(clip_files["gz"])(TEXTS)
    for path in (hf, hf / "vocab.json", hf / "merges.txt"):
        assert (tk.CLIPTokenizer(path)(TEXTS) == want).all(), path
    # A tokenizer.json alone (transformers writes one next to vocab/merges).
    transformers = pytest.importorskip("transformers")
    saved = hf.parent / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(hf)).save_pretrained(str(saved))
    assert (tk.CLIPTokenizer(saved / "tokenizer.json")(TEXTS) == want).all()


# ---------------------------------------------------------------- load_tokenizer

def test_load_tokenizer(sp_model, clip_files, tmp_path):
    assert isinstance(tk.load_tokenizer(sp_model, "siglip"), tk.SigLIPTokenizer)
    assert tk.load_tokenizer(sp_model, "SigLIP", 16)(["x"]).shape == (1, 16)
    clip = tk.load_tokenizer(clip_files["gz"], "clip")
    assert isinstance(clip, tk.CLIPTokenizer) and clip.seq_len == 77

    missing = str(tmp_path / "nope.model")
    for family in ("siglip", "clip"):
        with pytest.raises(ValueError, match="nope.model: no such tokenizer file"):
            tk.load_tokenizer(missing, family)
    with pytest.raises(ValueError, match="not a sentencepiece.*txt.gz"):
        tk.load_tokenizer(clip_files["gz"], "siglip")
    with pytest.raises(ValueError, match="not a CLIP vocab.*spm.model"):
        tk.load_tokenizer(sp_model, "clip")
    junk = tmp_path / "junk.txt.gz"
    junk.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="junk.txt.gz"):
        tk.load_tokenizer(junk, "clip")
    with pytest.raises(ValueError, match="unknown tokenizer family"):
        tk.load_tokenizer(sp_model, "bert")
