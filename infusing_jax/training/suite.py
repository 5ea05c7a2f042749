"""Every configured test of one image tower: image->image retrieval (per test set and
the merged UnED index), image<->text retrieval and zero-shot through the frozen text
tower, and the headline numbers the trade-off is read from.

    results = evaluate(cfg, encode_images, texts)

encode_images: (B, S, S, 3) -> (B, E), the tower under test; texts: a `TextSide`
(the frozen text tower of the original checkpoint) or None. Runs in this process
on its devices (the caller gathers FSDP-sharded parameters first).

Result (fractions in [0, 1]; K = eval.k):
  retrieval       {test: retrieval_metrics(...)}           each set's own index
  universal       retrieval_metrics over all target sets   hit = same test and class;
                  each metric the unweighted mean over the sets (the authors' figure),
                  'over_queries' the mean over all queries
  text_retrieval  {test: {'i2t_r1', ..., 't2i_r10'}}
  zero_shot       {test: {'fine': {'top1', 'top5'}, 'coarse': ...}}
  headline        in_domain_r1, in_domain_mapK (mean over target sets), generic_r1,
                  generic_mapK (generic sets), image_to_text_r1, text_to_image_r1
                  (mean over text sets), zero_shot_top1 (mean, fine labels)
"""
import dataclasses
from typing import Callable, Optional

import jax
import numpy as np

from infusing_jax import errors
from infusing_jax import checkpoints
from infusing_jax.training import config as config_lib
from infusing_jax import tokenizers
from infusing_jax.data import pipeline
from infusing_jax.data import tf_views
from infusing_jax.data import sources
from infusing_jax.evaluation import embedding
from infusing_jax.evaluation import metrics as metrics_lib
from infusing_jax.evaluation import prompts
from infusing_jax.evaluation import text_retrieval
from infusing_jax.evaluation import zero_shot


@dataclasses.dataclass(frozen=True)
class TextSide:
    embed_texts: Callable  # texts -> (M, E), L2-normalised


def text_checkpoint(cfg) -> str:
    """The checkpoint whose text tower is used: eval.text_checkpoint, or model.checkpoint
    without a ':img' sub-tree suffix."""
    if cfg.eval.text_checkpoint:
        return cfg.eval.text_checkpoint
    path = cfg.model.checkpoint
    return path[:-len(":img")] if path.endswith(":img") else path


def load_text_checkpoint(cfg, image_size: int = None):
    """-> (params, model config) of text_checkpoint(cfg) (with model.act); errors name the
    config field."""
    try:
        return checkpoints.load(text_checkpoint(cfg), image_size=image_size,
                                act=cfg.model.act or None)
    except checkpoints.ArgumentError as err:
        raise errors.UserError(f"config.model.{err.argument}: {err}") from None
    except (errors.UserError, OSError) as err:
        field = "eval.text_checkpoint" if cfg.eval.text_checkpoint else "model.checkpoint"
        raise errors.UserError(f"config.{field}: {err}") from None


def load_text_side(cfg) -> Optional[TextSide]:
    """The frozen text tower and tokenizer, where a configured test needs them."""
    e = cfg.eval
    if not (e.zero_shot.keys() or any(not e.text_retrieval[n].text_embeddings
                                      for n in e.text_retrieval.keys())):
        return None
    path = text_checkpoint(cfg)
    params, model_cfg = load_text_checkpoint(cfg)
    if model_cfg.get("text") is None:
        raise errors.UserError(f"config.eval.text_checkpoint: {path} has no text tower; name one "
                         "with eval.text_checkpoint or give text_embeddings files")
    try:
        tokenize = tokenizers.load_tokenizer(e.tokenizer, tokenizers.convention(model_cfg),
                                             model_cfg.text.seq_len)
        return TextSide(text_retrieval.text_embedder(model_cfg, params, tokenize, e.batch_size))
    except (errors.UserError, OSError) as err:
        raise errors.UserError(f"config.eval.tokenizer: {err}") from None


def check(cfg) -> None:
    """Every configured test set before any work (a run's first step, an evaluation): its
    source and splits, that their first images decode, its files (class names, text
    embeddings), the text tower and the tokenizer; one UserError naming the config field."""
    view = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)

    def decodes(split, where):
        pipeline.check_decodable(split, view.decode, f"config.eval.{where}.source", split.name)

    for name in cfg.eval.retrieval.keys():
        t, where = cfg.eval.retrieval[name], f"retrieval.{name}"
        source = source_of(t, cfg, where)
        decodes(split_of(source, t.query_split or source.roles.query, where + ".query_split"),
                where)
        decodes(split_of(source, t.index_split or source.roles.index, where + ".index_split"),
                where)
    for name in cfg.eval.text_retrieval.keys():
        t, where = cfg.eval.text_retrieval[name], f"text_retrieval.{name}"
        split = text_split_of(t, cfg, where)
        decodes(split, where)
        if t.text_embeddings:
            _text_embeddings(t.text_embeddings, split, where)
    for name in cfg.eval.zero_shot.keys():
        t, where = cfg.eval.zero_shot[name], f"zero_shot.{name}"
        split = split_of(source_of(t, cfg, where), t.split, where + ".split")
        decodes(split, where)
        _class_names(t, cfg, split, where)
    load_text_side(cfg)


def source_of(test, cfg, where: str):
    """The source of test set config.eval.<where>; errors name its field."""
    try:
        return sources.load_source(test.source, config_lib.data_dir(cfg, test))
    except (errors.UserError, OSError) as err:
        raise errors.UserError(f"config.eval.{where}.source: {err}") from None


def split_of(source, name: str, where: str):
    """Split `name` of a test set's source; errors name config.eval.<where>."""
    if name not in source.splits:
        raise errors.UserError(f"config.eval.{where}: {source.name} has no split {name!r}; it has "
                         f"{', '.join(source.splits)}")
    return source.split(name)


def embedded(encode, split, cfg, desc) -> dict:
    """A test split's embeddings (N, E) with its labels, coarse labels and ids, each (N,),
    in the eval view; undecodable images skipped, none decodable an error."""
    view = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)
    out = embedding.embed_split(encode, split, view, batch_size=cfg.eval.batch_size,
                                columns=("label", "coarse_label", "id"), desc=desc)
    if not len(out.embeddings):
        raise errors.UserError(f"split {split.name}: no image could be decoded")
    emb, cols = out.embeddings, out.columns
    return dict(embeddings=emb, labels=cols["label"], coarse=cols["coarse_label"],
                ids=cols["id"], has_coarse=split.num_coarse_classes > 0)


def _retrieval(encode, cfg) -> tuple:
    """-> ({test: metrics}, universal metrics or None)."""
    k, out, merged = cfg.eval.k, {}, []
    for name in sorted(cfg.eval.retrieval.keys()):
        t = cfg.eval.retrieval[name]
        where = f"retrieval.{name}"
        source = source_of(t, cfg, where)
        q_name = t.query_split or source.roles.query
        i_name = t.index_split or source.roles.index
        q = embedded(encode, split_of(source, q_name, where + ".query_split"), cfg, name)
        i = q if i_name == q_name else embedded(
            encode, split_of(source, i_name, where + ".index_split"), cfg, f"{name} index")
        coarse = q["has_coarse"] and i["has_coarse"]
        out[name] = metrics_lib.retrieval_metrics(
            q["embeddings"], q["labels"], i["embeddings"], i["labels"], k,
            query_ids=q["ids"], index_ids=i["ids"],
            query_coarse_labels=q["coarse"] if coarse else None,
            index_coarse_labels=i["coarse"] if coarse else None)
        if t.role == "target":
            merged.append((name, q, i))
    if len(merged) < 2:
        return out, None
    return out, _universal(merged, k)


def _universal(merged, k: int) -> dict:
    """The UnED merged index: every target set's queries against all their index splits;
    a hit needs the same set (domain) and class. Ids are prefixed by the set's name.
    Its metrics are the unweighted means over the sets (per set under 'domains', the
    mean over all queries under 'over_queries')."""
    def side(j: int) -> dict:
        parts = [(name, sets[j]) for name, *sets in merged]
        return dict(embeddings=np.concatenate([p["embeddings"] for _, p in parts]),
                    labels=np.concatenate([p["labels"] for _, p in parts]),
                    ids=np.concatenate([np.char.add(f"{n}/", p["ids"].astype(str))
                                        for n, p in parts]),
                    domains=np.concatenate([np.full(len(p["labels"]), n) for n, p in parts]))
    q, i = side(0), side(1)
    return metrics_lib.retrieval_metrics(
        q["embeddings"], q["labels"], i["embeddings"], i["labels"], k,
        query_ids=q["ids"], index_ids=i["ids"], query_domains=q["domains"],
        index_domains=i["domains"])


def text_split_of(t, cfg, where: str):
    """The split of image<->text test set config.eval.<where>: its source's query split."""
    source = source_of(t, cfg, where)
    return source.split(source.roles.query)


def _text_embeddings(path: str, split, where: str) -> None:
    """A text_embeddings file that can be read and whose image_index fits the split."""
    field = f"config.eval.{where}.text_embeddings"
    try:
        _, image_index = text_retrieval.load_text_embeddings(path)
    except errors.UserError as e:
        raise errors.UserError(f"{field}: {e}") from None
    if split.num_examples is not None and len(image_index) and (
            image_index.min() < 0 or image_index.max() >= split.num_examples):
        raise errors.UserError(f"{field}: {path}: image_index holds {image_index.min()} .. "
                               f"{image_index.max()}, but the split has {split.num_examples} "
                               "images; make it for this split")


def _class_names(t, cfg, split, where: str) -> dict:
    """{'fine': names[, 'coarse': names]} of a zero-shot set: its class_names file, else
    the source's (TFDS metadata, class folders); as many as the split has classes."""
    field = f"config.eval.{where}.class_names"
    if t.class_names:
        try:
            names = {"fine": prompts.read_class_names(t.class_names)}
        except errors.UserError as e:
            raise errors.UserError(f"{field}: {e}") from None
    else:
        try:
            names = prompts.source_class_names(t.source, config_lib.data_dir(cfg, t))
        except errors.UserError as e:
            raise errors.UserError(f"{field}: {e}") from None
    sizes = {"fine": split.num_classes, "coarse": split.num_coarse_classes}
    for granularity, listed in names.items():
        if sizes[granularity] and len(listed) != sizes[granularity]:
            raise errors.UserError(f"{field}: {len(listed)} names, but {t.source} has "
                                   f"{sizes[granularity]} classes; give one per class, line i "
                                   "= class i")
    return names


def text_retrieval_sets(cfg, encode, texts) -> dict:
    """{set: I->T / T->I recalls} over eval.text_retrieval."""
    out = {}
    for name in sorted(cfg.eval.text_retrieval.keys()):
        t = cfg.eval.text_retrieval[name]
        split = text_split_of(t, cfg, f"text_retrieval.{name}")
        view = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)
        kw = dict(text_file=t.text_embeddings) if t.text_embeddings else dict(
            embed_texts=texts.embed_texts)
        out[name] = text_retrieval.evaluate_split(encode, split, view,
                                                  batch_size=cfg.eval.batch_size, **kw)
    return out


def _zero_shot(encode, texts, cfg) -> dict:
    out = {}
    for name in sorted(cfg.eval.zero_shot.keys()):
        t = cfg.eval.zero_shot[name]
        where = f"zero_shot.{name}"
        source = source_of(t, cfg, where)
        split = split_of(source, t.split, where + ".split")
        names = _class_names(t, cfg, split, where)
        templates = prompts.check_templates(t.templates) if t.templates else prompts.templates(
            t.source.partition(":")[2].split(":")[0])
        view = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)
        out[name] = zero_shot.evaluate_split(encode, texts.embed_texts, split, view, names,
                                             templates, cfg.eval.batch_size)
    return out


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def headline(results: dict, cfg) -> dict:
    k = cfg.eval.k
    roles = {n: cfg.eval.retrieval[n].role for n in results["retrieval"]}
    by_role = lambda role, key: _mean(  # noqa: E731
        [m[key] for n, m in results["retrieval"].items() if roles[n] == role])
    text = results["text_retrieval"].values()
    return {"in_domain_r1": by_role("target", "recall@1"),
            f"in_domain_map{k}": by_role("target", f"map@{k}"),
            "generic_r1": by_role("generic", "recall@1"),
            f"generic_map{k}": by_role("generic", f"map@{k}"),
            "image_to_text_r1": _mean([m["i2t_r1"] for m in text]),
            "text_to_image_r1": _mean([m["t2i_r1"] for m in text]),
            "zero_shot_top1": _mean([m["fine"]["top1"] for m in results["zero_shot"].values()
                                     if "fine" in m])}


def evaluate(cfg, encode_images: Callable, texts: Optional[TextSide]) -> dict:
    """All of eval's test sets for one image tower (module doc)."""
    retrieval, universal = _retrieval(encode_images, cfg)
    results = dict(retrieval=retrieval, universal=universal,
                   text_retrieval=text_retrieval_sets(cfg, encode_images, texts),
                   zero_shot=_zero_shot(encode_images, texts, cfg))
    results["headline"] = headline(results, cfg)
    return results


def evaluate_models(cfg, embed: Callable, backbones: dict) -> dict:
    """{model name: image tower params} -> {model name: evaluate(...)}, with one text side.

    embed(params, images) -> (B, E); the parameters go in as jit arguments."""
    texts = load_text_side(cfg)
    encode = jax.jit(embed)
    out = {}
    for name, params in backbones.items():
        params = jax.device_put(params, jax.local_devices()[0])
        out[name] = evaluate(cfg, lambda images, p=params: encode(p, images), texts)
    return out


def has_tests(cfg) -> bool:
    e = cfg.eval
    return bool(e.retrieval.keys() or e.text_retrieval.keys() or e.zero_shot.keys())
