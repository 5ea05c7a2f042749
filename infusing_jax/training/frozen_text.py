"""What training takes from the frozen text tower, computed once before the first step,
so the train step runs no text tower.

    banks = frozen_text.lipsum_banks(cfg, names)                # {domain: (K, E) float32}
    heads = frozen_text.zero_shot_heads(cfg, names, classes)    # {domain: (E, C) float32}

Lipsum-FT's bank: each text is `tokens` ids drawn uniformly from the tokenizer's
vocabulary less its special ids (CLIP's start / end of text, SigLIP's EOS and padding),
wrapped as the tokenizer wraps a text (CLIP: SOT ... EOT; SigLIP: ... EOS, padded),
seeded by `text_seed`. Each embedding is L2-normalised and multiplied by the pretrained
model's logit scale s = exp(t), so <f, t_k> is the pretrained model's logit, as in the
authors' energies, and the loss weight means the same (the authors' 1) on every backbone.
The authors draw 80 new texts every step; a bank of K >= E fixed texts gives the same
expected penalty, (f - f0)^T E[t t^T] (f - f0) / 2, without the sampling noise.

Zero-shot heads (a domain's head_init='zero_shot'): class c's column is its class
embedding from the prompt templates (evaluation/zero_shot.classifier: normalise each
prompt's embedding, average, renormalise), so the cosine classifier starts as the
pretrained model's zero-shot classifier. Names: the domain's class_names file, else the
source's (TFDS metadata, a folder source's class folders).
"""
import numpy as np
from absl import logging

from infusing_jax import errors
from infusing_jax import tokenizers
from infusing_jax.evaluation import prompts
from infusing_jax.evaluation import text_retrieval
from infusing_jax.evaluation import zero_shot
from infusing_jax.models import two_towers
from infusing_jax.training import config as config_lib
from infusing_jax.training import suite


def random_rows(tokenize, count: int, length: int, seed: int) -> np.ndarray:
    """(count, seq_len) token rows of `length` random non-special ids each."""
    specials = set(tokenize.special_ids)
    allowed = np.array([i for i in range(tokenize.vocab_size) if i not in specials])
    rng = np.random.default_rng(seed)
    ids = rng.choice(allowed, size=(count, length))
    return tokenize.rows([tokenize.wrap(row.tolist()) for row in ids])


def _text_tower(cfg, needed_by: str):
    """-> (texts -> (M, E) embedder with .tokens, its tokenizer, the logit scale exp(t))."""
    params, model_cfg = suite.load_text_checkpoint(cfg)
    if model_cfg.get("text") is None:
        raise errors.UserError(f"config.model.checkpoint: {suite.text_checkpoint(cfg)} has no "
                               f"text tower, which {needed_by} needs; name one with "
                               "eval.text_checkpoint")
    try:
        tokenize = tokenizers.load_tokenizer(cfg.eval.tokenizer, tokenizers.convention(model_cfg),
                                             model_cfg.text.seq_len)
        embed = text_retrieval.text_embedder(model_cfg, params, tokenize, cfg.eval.batch_size)
    except (errors.UserError, OSError) as e:
        raise errors.UserError(f"config.eval.tokenizer: {e}") from None
    if "t" not in params and "temperature" not in params:
        raise errors.UserError(f"config.model.checkpoint: {suite.text_checkpoint(cfg)} has no "
                               f"logit scale (t), which {needed_by} needs; name a two-tower "
                               "checkpoint with eval.text_checkpoint")
    return embed, tokenize, two_towers.logit_scale(params)


def lipsum_banks(cfg, names) -> dict:
    """{domain: (K, E) text embeddings, L2-normalised x the logit scale} for the domains
    with a lipsum loss."""
    wanted = {n: cfg.domains[n].losses.lipsum for n in names
              if "lipsum" in cfg.domains[n].losses}
    if not wanted:
        return {}
    embed, tokenize, scale = _text_tower(cfg, "lipsum")
    banks = {}
    for name, s in wanted.items():
        rows = random_rows(tokenize, s.texts, s.tokens, s.text_seed)
        banks[name] = scale * embed.tokens(rows)
        logging.info("lipsum: %d random texts of %d tokens for domain %s, logit scale %.4g",
                     s.texts, s.tokens, name, scale)
    return banks


def class_names(cfg, name: str, num_classes: int) -> list:
    """Domain `name`'s class names, label i = name i (module doc)."""
    d = cfg.domains[name]
    field = f"config.domains.{name}.class_names"
    if d.class_names:
        try:
            names = prompts.read_class_names(d.class_names)
        except errors.UserError as e:
            raise errors.UserError(f"{field}: {e}") from None
    else:
        try:
            names = prompts.source_class_names(d.source, config_lib.data_dir(cfg, d)).get("fine")
        except (errors.UserError, ValueError) as e:
            raise errors.UserError(f"{field}: {e}") from None
        if not names:
            raise errors.UserError(f"{field}: {d.source} has no fine class names; give a file "
                                   "with one name per line (line i = class i)")
    if len(names) != num_classes:
        raise errors.UserError(f"{field}: {len(names)} names, but the train split has "
                               f"{num_classes} classes; give one per class, line i = class i")
    return [n.replace("_", " ") for n in names]


def zero_shot_heads(cfg, names, num_classes: dict) -> dict:
    """{domain: (E, C) classifier} for the domains with head_init='zero_shot'."""
    wanted = [n for n in names if cfg.domains[n].head_init == "zero_shot"]
    if not wanted:
        return {}
    embed, _, _ = _text_tower(cfg, "head_init='zero_shot'")
    heads = {}
    for name in wanted:
        d = cfg.domains[name]
        templates = (prompts.check_templates(d.templates) if d.templates else
                     prompts.templates(d.source.partition(":")[2].split(":")[0]))
        classes = zero_shot.class_embeddings(embed, class_names(cfg, name, num_classes[name]),
                                             templates)
        heads[name] = classes.T.astype(np.float32)
        logging.info("domain %s: classifier initialised from %d class names x %d templates",
                     name, classes.shape[0], len(templates))
    return heads
