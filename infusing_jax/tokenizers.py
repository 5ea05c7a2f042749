"""Text tokenizers for the SigLIP and CLIP text towers.

Both return fixed-length int32 arrays of shape (N, seq_len), ready for
`models.build(cfg).apply(..., tokens)`:

* `SigLIPTokenizer`: a sentencepiece `.model` file, big_vision's convention
  (ASCII lowercasing, EOS appended and kept when truncating, padded with 1);
  for SigLIP 2, Gemma's 256k-piece model, padded with its `<pad>` (0).
* `CLIPTokenizer`: OpenAI's byte-level BPE, from open_clip's
  `bpe_simple_vocab_16e6.txt.gz` or a Hugging Face `vocab.json` + `merges.txt`;
  `<|startoftext|>` text `<|endoftext|>`, zero-padded (OpenAI / open_clip).

`load_tokenizer(path, convention(model_cfg), seq_len)` picks the class and its
settings.
"""
import gzip
import json
import os
import string

import numpy as np
import sentencepiece
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from infusing_jax import errors
from infusing_jax import paths

SIGLIP_SEQ_LEN = 64
CLIP_SEQ_LEN = 77
# SigLIP 2's text tower: Gemma's sentencepiece vocabulary, whose '<pad>' is id 0.
GEMMA_VOCAB = 256_000
GEMMA_PAD = 0
CONVENTIONS = ("siglip", "siglip2", "clip", "tips")

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
# Merges open_clip / OpenAI read from the .gz file (the rest are ignored):
# 49408 ids = 256 bytes + 256 bytes with "</w>" + 48894 merges + SOT + EOT.
OPENAI_NUM_MERGES = 49152 - 256 - 2
# OpenAI CLIP's word split (after lowercasing): contractions, letter runs,
# single digits, runs of anything else except whitespace.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _existing(path) -> str:
    path = os.fspath(path)
    if not paths.exists(path):
        raise errors.UserError(f"{path}: no such tokenizer file")
    return path


def _texts(texts) -> list:
    return [texts] if isinstance(texts, str) else list(texts)


class SigLIPTokenizer:
    """big_vision's SigLIP text preprocessing on a sentencepiece model.

    Reproduces big_vision's `tokenize(max_len=seq_len, eos="sticky",
    pad_value=1)` op (pp/ops_text.py), the one SigLIP's configs and demo use:

    * lowercase first (the op's default `lower=True`, i.e. `tf.strings.lower`,
      which lowercases ASCII A-Z only: "ÉCOLE" -> "École");
    * sentencepiece ids with EOS appended (no BOS);
    * "sticky" EOS: a text longer than seq_len is cut to seq_len - 1 ids + EOS;
    * padded with `pad_value` (1, which is `</s>` in the T5 c4_en / mc4 vocabs).

    With eos=False (TIPS): no EOS, a longer text cut to seq_len ids; TIPS pads with 0.

    Differs from transformers' `SiglipTokenizer`, which also strips
    punctuation and collapses whitespace (big_vision does that only to class
    names in its zero-shot prompts) and lowercases all of Unicode.

    `path`: the `.model` file (local or remote, e.g. gs://), or a local directory
    holding `spiece.model` or `tokenizer.model`.
    """

    def __init__(self, path, seq_len: int = SIGLIP_SEQ_LEN, *, lowercase: bool = True,
                 pad_value: int = 1, eos: bool = True):
        path = _existing(path)
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in ("spiece.model", "tokenizer.model")
                     if os.path.isfile(os.path.join(path, n))]
            if not found:
                raise errors.UserError(f"no spiece.model or tokenizer.model in directory: {path}")
            path = found[0]
        if seq_len < 1:
            raise errors.UserError(f"seq_len must be >= 1, got {seq_len}")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            with paths.open_binary(path) as f:
                self.sp.LoadFromSerializedProto(f.read())
        except (OSError, RuntimeError) as e:
            raise errors.UserError(f"not a sentencepiece .model file: {path} ({e})") from None
        if eos and self.sp.eos_id() < 0:
            raise errors.UserError(f"sentencepiece model has no EOS token: {path}")
        self.path, self.seq_len = path, seq_len
        self.lowercase, self.pad_value, self.eos = lowercase, pad_value, eos
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str) -> list:
        """Ids of one text, EOS included (with `eos`), before truncation and padding."""
        if self.lowercase:
            text = text.translate(_ASCII_LOWER)
        return self.sp.encode(text, add_eos=self.eos)

    def __call__(self, texts) -> np.ndarray:
        """list of N strings (or one string) -> (N, seq_len) int32."""
        return self.rows([self.encode(text) for text in _texts(texts)])

    @property
    def special_ids(self) -> tuple:
        """EOS, the pad value, and BOS where the model has one (Gemma's, not T5's)."""
        bos = self.sp.bos_id()
        return ((self.eos_id,) if self.eos else ()) + (self.pad_value,) + (
            (bos,) if bos >= 0 else ())

    def wrap(self, ids: list) -> list:
        """Token ids of a text's content -> with EOS (with `eos`), as `encode` gives them."""
        return list(ids) + ([self.eos_id] if self.eos else [])

    def rows(self, encoded: list) -> np.ndarray:
        """Encoded texts (each as `encode` gives it) -> (N, seq_len) int32, cut and padded."""
        out = np.full((len(encoded), self.seq_len), self.pad_value, np.int32)
        for i, ids in enumerate(encoded):
            if len(ids) > self.seq_len:
                ids = ids[:self.seq_len - 1] + [self.eos_id] if self.eos else ids[:self.seq_len]
            out[i, :len(ids)] = ids
        return out


def byte_alphabet() -> list:
    """The 256 byte -> printable-character map of GPT-2 / CLIP, in CLIP's vocab order.

    Entry k is the character of the vocab's id k: printable latin-1 bytes
    first, as themselves, then the other bytes in order as chr(256 + n).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return [chars[b] for b in keep + rest]


def _read_openai_merges(path):
    """open_clip's .gz merges file -> (vocab, merges) in OpenAI's id layout."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise errors.UserError(f"not a gzip CLIP merges file: {path} ({e})") from None
    merges = [tuple(line.split()) for line in lines[1:1 + OPENAI_NUM_MERGES] if line]
    if any(len(m) != 2 for m in merges):
        raise errors.UserError(f"not a CLIP merges file (want 'a b' per line): {path}")
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_tokenizer_json(path):
    """A Hugging Face tokenizer.json with a BPE model -> (vocab, merges)."""
    try:
        with open(path, encoding="utf-8") as f:
            model = json.load(f)["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"not a Hugging Face tokenizer.json: {path} ({e})") from None
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise errors.UserError(f"not a CLIP BPE tokenizer (BPE with '</w>' suffix): {path}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _read_clip_bpe(path, merges_path=None):
    """Any supported CLIP vocab source -> (vocab, merges)."""
    if paths.is_remote(path):
        raise errors.UserError(f"CLIP tokenizer files are read from local paths only: copy {path} "
                         "to a local folder")
    path = _existing(path)
    name = os.path.basename(path)
    if os.path.isdir(path):
        vocab_json, merges_txt = (os.path.join(path, n) for n in ("vocab.json", "merges.txt"))
        if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
            path, merges_path = vocab_json, merges_txt
        elif os.path.isfile(os.path.join(path, "tokenizer.json")):
            return _read_tokenizer_json(os.path.join(path, "tokenizer.json"))
        else:
            raise errors.UserError(f"no vocab.json + merges.txt or tokenizer.json in directory: {path}")
    elif name.endswith(".gz"):
        return _read_openai_merges(path)
    elif name == "tokenizer.json":
        return _read_tokenizer_json(path)
    elif name.endswith(".txt") and merges_path is None:  # merges.txt given: vocab.json beside it
        path, merges_path = os.path.join(os.path.dirname(path), "vocab.json"), path
    elif not name.endswith(".json"):
        raise errors.UserError(f"not a CLIP vocab (want .txt.gz, vocab.json, merges.txt, "
                         f"tokenizer.json or a directory): {path}")
    if merges_path is None:
        merges_path = os.path.join(os.path.dirname(path), "merges.txt")
    _existing(path)
    _existing(merges_path)
    try:
        return BPE.read_file(path, merges_path)
    except Exception as e:  # the Rust reader raises plain Exception
        raise errors.UserError(f"not a CLIP vocab.json + merges.txt pair: {path}, {merges_path} "
                         f"({e})") from None


class CLIPTokenizer:
    """OpenAI CLIP's byte-level BPE, run by the `tokenizers` library.

    Output rows: SOT, the text's ids, EOT, then `pad_value` (0) up to seq_len;
    a longer text keeps its first seq_len - 2 ids and still ends with EOT
    (open_clip's truncation). Text cleaning, the same as transformers'
    `CLIPTokenizer` (identical ids): NFC, every whitespace run -> one space,
    Unicode lowercase. OpenAI / open_clip also run `ftfy.fix_text` and
    `html.unescape` twice; that is not done here (ftfy is not a dependency),
    so mojibake, HTML entities like "&amp;" and control characters tokenize
    differently; so do a word-final Greek "Σ" (Python lowercases it to "ς",
    Rust to "σ") and U+001C-U+001F (whitespace to Python's regex, not to Rust's).
    The literal strings `<|startoftext|>` / `<|endoftext|>` in a text map to
    their special ids (as in OpenAI's and transformers' tokenizers).

    `path`: open_clip's `bpe_simple_vocab_16e6.txt.gz` (first 48894 merges,
    vocab of 49408, as OpenAI), a Hugging Face directory (`vocab.json` +
    `merges.txt`, else `tokenizer.json`), or a `vocab.json` / `merges.txt`
    file with its partner beside it (or given as `merges_path`).
    """

    def __init__(self, path, seq_len: int = CLIP_SEQ_LEN, *, merges_path=None,
                 pad_value: int = 0):
        if seq_len < 2:
            raise errors.UserError(f"seq_len must be >= 2 (SOT and EOT), got {seq_len}")
        vocab, merges = _read_clip_bpe(path, merges_path)
        missing = [t for t in (SOT, EOT) if t not in vocab]
        if missing:
            raise errors.UserError(f"CLIP vocab lacks {missing}: {path}")
        self.path, self.seq_len, self.pad_value = os.fspath(path), seq_len, pad_value
        self.sot_id, self.eot_id = vocab[SOT], vocab[EOT]
        self.vocab_size = len(vocab)

        tok = Tokenizer(BPE(vocab, merges, unk_token=EOT, fuse_unk=False,
                            continuing_subword_prefix="", end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.add_special_tokens([SOT, EOT])  # so these strings in a text get their ids
        self.tokenizer = tok

    def _with_specials(self, ids: list) -> list:
        return [self.sot_id] + ids + [self.eot_id]

    def encode(self, text: str) -> list:
        """Ids of one text, SOT and EOT included, before truncation and padding."""
        return self._with_specials(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def __call__(self, texts) -> np.ndarray:
        """list of N strings (or one string) -> (N, seq_len) int32."""
        texts = _texts(texts)
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        return self.rows([self._with_specials(enc.ids) for enc in encoded])

    @property
    def special_ids(self) -> tuple:
        return (self.sot_id, self.eot_id, self.pad_value)

    def wrap(self, ids: list) -> list:
        """Token ids of a text's content -> with SOT and EOT, as `encode` gives them."""
        return self._with_specials(list(ids))

    def rows(self, encoded: list) -> np.ndarray:
        """Encoded texts (each as `encode` gives it) -> (N, seq_len) int32, cut and padded."""
        out = np.full((len(encoded), self.seq_len), self.pad_value, np.int32)
        for i, ids in enumerate(encoded):
            if len(ids) > self.seq_len:
                ids = ids[:self.seq_len - 1] + [self.eot_id]
            out[i, :len(ids)] = ids
        return out


def convention(model_cfg) -> str:
    """The text convention of a model config: 'siglip2' for a SigLIP text tower with Gemma's
    vocabulary (SigLIP 2: the same towers as SigLIP), else its family."""
    text = model_cfg.get("text")
    if model_cfg.family == "siglip" and text is not None and text.vocab_size == GEMMA_VOCAB:
        return "siglip2"
    return model_cfg.family


def load_tokenizer(path, family: str, seq_len: int | None = None):
    """The tokenizer of a text convention (CONVENTIONS; `convention(model_cfg)`) from `path`;
    seq_len defaults 64 / 77.

    siglip2 is big_vision's SigLIP 2 text preprocessing, `lower | tok(length=64,
    model='gemma', bos='no', eos='sticky')`: SigLIP's, padded with Gemma's '<pad>'.
    tips is TIPS's: lowercased (ASCII), no BOS or EOS, cut to 64 ids, padded with 0 (the
    text tower masks id 0). TIPS's own tokenizer marks no padding at all in a batch where
    any text is longer than 64 ids; here padding is always padding.
    """
    family = family.lower()
    if family == "siglip":
        return SigLIPTokenizer(path, seq_len or SIGLIP_SEQ_LEN)
    if family == "siglip2":
        return SigLIPTokenizer(path, seq_len or SIGLIP_SEQ_LEN, pad_value=GEMMA_PAD)
    if family == "clip":
        return CLIPTokenizer(path, seq_len or CLIP_SEQ_LEN)
    if family == "tips":
        return SigLIPTokenizer(path, seq_len or SIGLIP_SEQ_LEN, pad_value=0, eos=False)
    raise errors.UserError(f"unknown tokenizer family {family!r} for {path}: use one of "
                           f"{', '.join(CONVENTIONS)}")
