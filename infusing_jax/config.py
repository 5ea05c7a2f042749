"""The run config: defaults, builders for configs/ files, and validation.

A run config (an ml_collections ConfigDict; configs/*.py return one):

  seed            int; data order, augmentation and head init follow from it
  model           the image tower: `checkpoint` (big_vision .npz[:img], HF directory
                  or open_clip file; '' = random init from family / variant, for
                  tests and the toy world), image_size (the training resolution;
                  position embeddings are resampled), act (open_clip CLIP only),
                  scan, remat_policy, dtype (compute), param_dtype (master weights)
  data            data_dir (the TFDS data folder, for tfds: sources without their own
                  data_dir), batch_size (global), mix, one_domain_per_batch,
                  shuffle_buffer, resize (train squash size; 0 = size * 256 / 224),
                  num_shards (0 = one per process; fix it to make the batches the
                  same whatever the number of hosts, see data/pipeline.py)
  domains         one ConfigDict per domain, built by `domain(...)`: its source,
                  splits, role and its losses, one ConfigDict per loss (`loss(...)`)
  loss_aggregation  'weighted_sum' | 'weighted_average' of a domain's loss terms
  optim           infusing_jax.optim.default_config()
  train           length, logging, checkpoints, validation, sharding
  eval            test sets: image->image retrieval, image<->text retrieval, zero-shot

Domains train in this order: targets, then generic ones, each by name; the
first is domain 0 (the paper's target). `validate` raises a one-line
ValueError naming the first bad field; it runs before anything is compiled.
"""
import ml_collections

from infusing_jax import errors
from infusing_jax import optim
from infusing_jax.models import transformer

ROLES = ("target", "generic")
AGGREGATIONS = ("weighted_sum", "weighted_average")
TEACHERS = ("precomputed", "online")
SELECT_BY = ("all", "in-domain", "out-of-domain", "last")
MIXES = ("round_robin", "balanced", "dataset_size", "weights")  # data/pipeline.py

# kind -> default settings; every loss has a `weight`.
CLASSIFIERS = {
    "normface": dict(scale=16.0, trainable_scale=False),
    "cosface": dict(scale=16.0, margin=0.1, trainable_scale=False),
    "arcface": dict(scale=16.0, margin=0.1, trainable_scale=False),
}
METRIC = {
    "supcon": dict(temperature=0.1),
    "multi_similarity": dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
    "triplet": dict(margin=0.1),
    "proxy_anchor": dict(alpha=32.0, delta=0.1),
}
DISTILLATION = {
    "feature_mse": dict(teacher="precomputed"),
    "feature_cosine": dict(teacher="precomputed"),
    "relational": dict(teacher="precomputed"),
    "logit_kl": dict(teacher="precomputed", temperature=1.0),
}
PARAMETER = {
    "anchoring": dict(reduction="mean_per_tensor", exclude=()),
    "ewc": dict(exclude=(), fisher_batches=16),
}
LOSSES = {**CLASSIFIERS, **METRIC, **DISTILLATION, **PARAMETER}
NEEDS_LABELS = set(CLASSIFIERS) | set(METRIC)


def loss(kind: str, weight: float = 1.0, **settings) -> ml_collections.ConfigDict:
    """One loss term: ConfigDict(weight=..., <the kind's settings>); key it by kind."""
    if kind not in LOSSES:
        raise errors.UserError(f"loss kind {kind!r}: use one of {sorted(LOSSES)}")
    unknown = set(settings) - set(LOSSES[kind])
    if unknown:
        raise errors.UserError(f"loss {kind!r}: unknown settings {sorted(unknown)}; "
                         f"it has {sorted(LOSSES[kind])}")
    return ml_collections.ConfigDict(dict(LOSSES[kind], weight=weight, **settings))


def domain(source: str, role: str = "target", losses: dict = None, **fields):
    """One training domain.

    source: a data spec (`tfds:NAME`, `uned:DIR`, `folder:DIR`).
    train_split: the split trained on. Validation split, first that applies:
      val_split (an existing split), val_classes_fraction (classes carved from
      train, class-disjoint, seeded by val_seed), holdout_fraction (examples
      held out of train by id hash, seeded by val_seed: the generic 80/20).
    weight: for data.mix 'weights'. teacher_descriptors: a precomputed teacher
      file ('' = extract into WORKDIR/teacher/ before training).
    losses: {kind: loss(kind, ...)}.
    """
    cfg = ml_collections.ConfigDict(dict(
        source=source, role=role, data_dir="", train_split="train", val_split="",
        val_classes_fraction=0.0, holdout_fraction=0.0, val_seed=42, weight=1.0,
        teacher_descriptors=""))
    cfg.update(fields)
    cfg.losses = ml_collections.ConfigDict(
        {k: v if isinstance(v, ml_collections.ConfigDict) else loss(k, **v)
         for k, v in (losses or {}).items()})
    return cfg


def retrieval_test(source: str, role: str = "target", query_split: str = "",
                   index_split: str = "", data_dir: str = ""):
    """An image->image test set: queries against an index (default: the source's roles,
    e.g. InShop's test queries against its gallery; the same split = each query left out)."""
    return ml_collections.ConfigDict(dict(source=source, role=role, query_split=query_split,
                                          index_split=index_split, data_dir=data_dir))


def text_test(source: str, text_embeddings: str = "", data_dir: str = ""):
    """An image<->text test set (`captions:FILE.json`); text embeddings from the frozen text
    tower, or from a file (.npz with `embeddings`, `image_index`)."""
    return ml_collections.ConfigDict(dict(source=source, text_embeddings=text_embeddings,
                                          data_dir=data_dir))


def zero_shot_test(source: str, split: str = "test", class_names: str = "",
                   templates: tuple = (), data_dir: str = ""):
    """A zero-shot classification set: class names from TFDS or a file (one per line),
    prompt templates ('' = evaluation/prompts.py's for the dataset)."""
    return ml_collections.ConfigDict(dict(source=source, split=split, class_names=class_names,
                                          templates=tuple(templates), data_dir=data_dir))


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default; a configs/ file fills in `domains`."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        checkpoint="", family="siglip", variant="B/16", image_size=224, act="",
        scan=False, remat_policy="none", dtype="float32", param_dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(
        data_dir="", batch_size=128, mix="round_robin", one_domain_per_batch=True,
        shuffle_buffer=2048, resize=0, num_shards=0))
    c.domains = ml_collections.ConfigDict()
    c.loss_aggregation = "weighted_sum"
    c.optim = optim.default_config()
    c.train = ml_collections.ConfigDict(dict(
        num_steps=0,            # 0: num_epochs * steps_per_epoch
        num_epochs=3.0,         # over all domains' train examples together
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        async_checkpoints=True,
        eval_every=0,           # 0: validate only at the end
        eval_batch_size=256,
        eval_k=20,
        select_by="all",        # keep-best by val mAP@k of 'in-domain', 'out-of-domain',
                                # their mean 'all', or 'last' (no keep-best)
        fsdp=False,             # shard params / optimiser state / reference over devices
        progress=True))
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=256,
        k=20,
        tokenizer="",          # the checkpoint's tokenizer, for text retrieval / zero-shot
        text_checkpoint="",    # '' = model.checkpoint's text tower (without its ':img')
        validate_text=False,   # text retrieval at every validation too
        retrieval=ml_collections.ConfigDict(),       # name -> retrieval_test(...)
        text_retrieval=ml_collections.ConfigDict(),  # name -> text_test(...)
        zero_shot=ml_collections.ConfigDict()))      # name -> zero_shot_test(...)
    return c


def data_dir(cfg, entry) -> str:
    """Where a domain's or test set's source reads from: its own data_dir (UnED / folder /
    captions image root, or a TFDS folder), else data.data_dir for tfds: sources."""
    if entry.data_dir:
        return entry.data_dir
    return cfg.data.data_dir if entry.source.startswith("tfds:") and cfg.data.data_dir else None


def ordered_domains(cfg) -> list:
    """Domain names in training order: targets, then generic ones, each sorted."""
    return sorted(cfg.domains.keys(), key=lambda n: (ROLES.index(cfg.domains[n].role), n))


def _err(field: str, msg: str):
    raise errors.UserError(f"config.{field}: {msg}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_fields(cfg, known, where: str):
    for k in cfg.keys():
        if k not in known:
            _err(f"{where}.{k}", f"unknown field (known: {', '.join(sorted(known))})")


def _validate_loss(cfg, kind: str, where: str, one_domain_per_batch: bool):
    if kind not in LOSSES:
        _err(where, f"unknown loss kind; use one of {sorted(LOSSES)}")
    l = cfg.losses[kind]
    _check_fields(l, set(LOSSES[kind]) | {"weight"}, where)
    if not _num(l.get("weight")) or l.weight < 0:
        _err(f"{where}.weight", f"must be a number >= 0, got {l.get('weight')!r}")
    if kind in DISTILLATION and l.teacher not in TEACHERS:
        _err(f"{where}.teacher", f"must be one of {TEACHERS}, got {l.teacher!r}")
    if kind in METRIC and not one_domain_per_batch:
        _err(where, "metric losses need whole-domain batches: set "
             "data.one_domain_per_batch=True")
    if kind == "logit_kl" and not set(CLASSIFIERS) & set(cfg.losses.keys()):
        _err(where, "logit_kl distils the logits of the domain's classifier; add a "
             f"classifier loss ({', '.join(CLASSIFIERS)}) to the domain")
    if kind in CLASSIFIERS and (not _num(l.scale) or l.scale <= 0):
        _err(f"{where}.scale", f"must be a number > 0, got {l.scale!r}")
    if kind == "anchoring" and l.reduction not in ("mean_per_tensor", "sum"):
        _err(f"{where}.reduction", f"must be 'mean_per_tensor' or 'sum', got {l.reduction!r}")
    if kind == "ewc" and (not _int(l.fisher_batches) or l.fisher_batches < 1):
        _err(f"{where}.fisher_batches", f"must be an int >= 1, got {l.fisher_batches!r}")
    if "exclude" in l and not all(isinstance(p, str) for p in l.exclude):
        _err(f"{where}.exclude", f"must be a tuple of path prefixes, got {l.exclude!r}")


def _validate_domain(cfg, name: str, one_domain_per_batch: bool):
    where = f"domains.{name}"
    d = cfg.domains[name]
    known = set(domain("x").keys())
    _check_fields(d, known, where)
    if not isinstance(d.get("source"), str) or ":" not in d.source:
        _err(f"{where}.source", f"must be a data spec such as 'tfds:cars196' or "
             f"'uned:/data/sop', got {d.get('source')!r}")
    if d.role not in ROLES:
        _err(f"{where}.role", f"must be one of {ROLES}, got {d.role!r}")
    for k in ("val_classes_fraction", "holdout_fraction"):
        if not _num(d[k]) or not 0 <= d[k] < 1:
            _err(f"{where}.{k}", f"must be in [0, 1), got {d[k]!r}")
    if not _num(d.weight) or d.weight < 0:
        _err(f"{where}.weight", f"must be a number >= 0, got {d.weight!r}")
    if not d.losses.keys():
        _err(f"{where}.losses", "no loss configured; add e.g. losses=dict(normface=dict())")
    for kind in d.losses.keys():
        _validate_loss(d, kind, f"{where}.losses.{kind}", one_domain_per_batch)


def validate(cfg) -> None:
    """One-line ValueError naming the first bad field (`config.<path>: ...`)."""
    _check_fields(cfg, set(default_config().keys()), "")
    for group in ("model", "data", "train"):
        _check_fields(cfg[group], set(default_config()[group].keys()), group)
    m = cfg.model
    if not isinstance(m.checkpoint, str):
        _err("model.checkpoint", f"must be a path or '', got {m.checkpoint!r}")
    if m.family not in ("siglip", "clip"):
        _err("model.family", f"must be 'siglip' or 'clip', got {m.family!r}")
    if not _int(m.image_size) or m.image_size < 1:
        _err("model.image_size", f"must be an int > 0, got {m.image_size!r}")
    if m.act and m.act not in transformer.ACTIVATIONS:
        _err("model.act", f"must be '' or one of {sorted(transformer.ACTIVATIONS)}")
    for k in ("dtype", "param_dtype"):
        if m[k] not in ("float32", "bfloat16"):
            _err(f"model.{k}", f"must be 'float32' or 'bfloat16', got {m[k]!r}")
    d = cfg.data
    if not _int(d.batch_size) or d.batch_size < 1:
        _err("data.batch_size", f"must be an int > 0, got {d.batch_size!r}")
    if d.mix not in MIXES:
        _err("data.mix", f"must be one of {MIXES}, got {d.mix!r}")
    if not _int(d.resize) or d.resize < 0:
        _err("data.resize", f"must be an int >= 0 (0 = image_size * 256 / 224), got {d.resize!r}")
    if not _int(d.num_shards) or d.num_shards < 0:
        _err("data.num_shards", f"must be an int >= 0 (0 = one per process), got {d.num_shards!r}")
    if not cfg.domains.keys():
        _err("domains", "no domain configured; a configs/ file adds them with config.domain(...)")
    for name in cfg.domains.keys():
        _validate_domain(cfg, name, d.one_domain_per_batch)
    if cfg.loss_aggregation not in AGGREGATIONS:
        _err("loss_aggregation", f"must be one of {AGGREGATIONS}, got {cfg.loss_aggregation!r}")
    try:
        optim.validate(cfg.optim)
    except ValueError as e:
        raise errors.UserError(f"config.{e}") from None
    t = cfg.train
    if not _int(t.num_steps) or t.num_steps < 0:
        _err("train.num_steps", f"must be an int >= 0, got {t.num_steps!r}")
    if t.num_steps == 0 and (not _num(t.num_epochs) or t.num_epochs <= 0):
        _err("train.num_epochs", f"must be > 0 when train.num_steps is 0, got {t.num_epochs!r}")
    for k in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "eval_k"):
        if not _int(t[k]) or t[k] < 1:
            _err(f"train.{k}", f"must be an int >= 1, got {t[k]!r}")
    if not _int(t.eval_every) or t.eval_every < 0:
        _err("train.eval_every", f"must be an int >= 0 (0 = at the end), got {t.eval_every!r}")
    if t.select_by not in SELECT_BY:
        _err("train.select_by", f"must be one of {SELECT_BY}, got {t.select_by!r}")
    _validate_eval(cfg.eval)


def _validate_eval(e):
    _check_fields(e, set(default_config().eval.keys()), "eval")
    for k in ("batch_size", "k"):
        if not _int(e[k]) or e[k] < 1:
            _err(f"eval.{k}", f"must be an int >= 1, got {e[k]!r}")
    kinds = dict(retrieval=retrieval_test("x:"), text_retrieval=text_test("x:"),
                 zero_shot=zero_shot_test("x:"))
    for kind, example in kinds.items():
        for name in e[kind].keys():
            t = e[kind][name]
            _check_fields(t, set(example.keys()), f"eval.{kind}.{name}")
            if not isinstance(t.get("source"), str) or ":" not in t.source:
                _err(f"eval.{kind}.{name}.source", f"must be a data spec, got {t.get('source')!r}")
            if kind == "retrieval" and t.role not in ROLES:
                _err(f"eval.{kind}.{name}.role", f"must be one of {ROLES}, got {t.role!r}")
    needs_text = (any(not e.text_retrieval[n].text_embeddings for n in e.text_retrieval.keys())
                  or e.zero_shot.keys())
    if needs_text and not e.tokenizer:
        _err("eval.tokenizer", "text retrieval and zero-shot need the checkpoint's tokenizer "
             "(SigLIP: its sentencepiece .model; CLIP: bpe_simple_vocab_16e6.txt.gz or vocab.json)")
