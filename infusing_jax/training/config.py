"""The run config: defaults, builders for configs/ files, and validation.

A run config (an ml_collections ConfigDict; configs/*.py return one):

  seed            int; data order, augmentation and head init follow from it
  model           the image tower: `checkpoint` (big_vision .npz[:img], HF directory
                  or open_clip file; '' = random init from family / variant, for
                  tests and the toy world), image_size (the training resolution;
                  position embeddings are resampled), act (CLIP files that
                  record none: open_clip, big_vision),
                  scan, remat_policy, dtype (compute), param_dtype (master weights),
                  lora (rank, alpha, layers: models/lora.py; rank 0 = off, every
                  weight trains)
  data            data_dir (the TFDS data folder, for tfds: sources without their own
                  data_dir), batch_size (global), mix, one_domain_per_batch,
                  shuffle_buffer, resize (train squash size; 0 = size * 256 / 224),
                  num_shards (0 = one per process; fix it to make the batches the
                  same whatever the number of hosts, see data/pipeline.py),
                  device_prefetch (batches placed on the devices ahead of the step),
                  keep_decoded_mb (host memory per process, in MiB, for keeping the
                  decoded train images of domains the run reads more than once;
                  0 = off; see pipeline.memory_plan)
  domains         one ConfigDict per domain, built by `domain(...)`: its source,
                  splits, role and its losses, one ConfigDict per loss (`loss(...)`)
  loss_aggregation  'weighted_sum' | 'weighted_average' of a domain's loss terms
  optim           infusing_jax.training.optim.default_config()
  train           length, logging, checkpoints, validation, sharding
  eval            test sets: image->image retrieval, image<->text retrieval, zero-shot

Domains train in this order: targets, then generic ones, each by name; the
first is domain 0 (the paper's target). `validate` raises a one-line
errors.UserError naming the first bad field; it runs before anything is loaded
or compiled. Every field has a range or a set of choices (fields.py).
"""
import math

import jax
import ml_collections

from infusing_jax import errors
from infusing_jax import fields
from infusing_jax.data import mixing
from infusing_jax.training import optim
from infusing_jax.losses import classification
from infusing_jax.models import lora
from infusing_jax.models import transformer

ROLES = ("target", "generic")
AGGREGATIONS = ("weighted_sum", "weighted_average")
TEACHERS = ("precomputed", "online")
SELECT_BY = ("all", "in-domain", "out-of-domain", "retention", "last")

# kind -> default settings; every loss has a `weight`.
CLASSIFIERS = {
    "normface": dict(scale=16.0, trainable_scale=False),
    "cosface": dict(scale=16.0, margin=0.1, trainable_scale=False),
    "arcface": dict(scale=16.0, margin=0.1, trainable_scale=False, fallback="linear"),
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
    "logit_kl": dict(teacher="precomputed", student_temperature=1.0, teacher_temperature=1.0,
                     scale_by_t2=True),
    # Lipsum-FT: K random texts of `tokens` random token ids each, through the frozen text
    # tower once (frozen_text.py); the authors' teacher is the frozen model on the same images.
    "lipsum": dict(teacher="online", texts=1024, tokens=8, text_seed=0),
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
    cfg = ml_collections.ConfigDict(dict(LOSSES[kind], weight=weight))
    unknown = set(settings) - set(LOSSES[kind])
    if unknown:
        raise errors.UserError(f"loss {kind!r}: unknown settings {sorted(unknown)}; "
                               f"it has {sorted(LOSSES[kind])}")
    cfg.update(settings)
    return cfg


def domain(source: str, role: str = "target", losses: dict = None, **fields):
    """One training domain.

    source: a data spec (`tfds:NAME`, `uned:DIR`, `folder:DIR`, or `images:DIR_OR_LIST`,
      unlabelled: for a generic domain's distillation, validated by retention).
    train_split: the split trained on. Validation split, first that applies:
      val_split (an existing split), val_classes_fraction (classes carved from
      train, class-disjoint, seeded by val_seed), holdout_fraction (examples
      held out of train by id hash, seeded by val_seed: the generic 80/20).
    weight: for data.mix 'weights'. teacher_descriptors: a precomputed teacher
      file ('' = extract into WORKDIR/teacher/ before training).
    train: False for a domain only validated on (no losses; its val split counts in
      train.select_by's score), e.g. the generic hold-out for a method that trains on
      the target alone, so that every method is selected by the same protocol.
    head_init: the classifier's start, 'random' or 'zero_shot' (the frozen text tower's
      class embeddings of class_names, a file with one name per line ('' = the
      source's: TFDS metadata or a folder's class folders), in `templates` (() = the
      dataset's prompts); training/frozen_text.py).
    losses: {kind: loss(kind, ...)}.
    """
    cfg = ml_collections.ConfigDict(dict(
        source=source, role=role, data_dir="", train_split="train", val_split="",
        val_classes_fraction=0.0, holdout_fraction=0.0, val_seed=42, weight=1.0,
        teacher_descriptors="", head_init="random", class_names="", templates=(),
        train=True))
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
        scan=False, remat_policy="none", dtype="float32", param_dtype="float32",
        lora=lora.default_config()))
    c.data = ml_collections.ConfigDict(dict(
        data_dir="", batch_size=128, mix="round_robin", one_domain_per_batch=True,
        shuffle_buffer=2048, resize=0, num_shards=0, device_prefetch=2,
        keep_decoded_mb=2048))
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
        eval_at_start=False,    # also validate the pretrained weights, before step 1 (the
                                # authors do): with select_by, they may be the ones kept
        eval_retention=False,   # also the generic val images' cosine to the pretrained
                                # model's embedding ('retention', validation.py)
        eval_batch_size=256,
        eval_k=20,
        select_by="all",        # keep-best by val mAP@k of 'in-domain', 'out-of-domain',
                                # their mean 'all', or 'last' (no keep-best)
        eval_ema=True,          # with optim.ema_decay: validate, keep, test and export
                                # the EMA weights (False: the raw weights)
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
    """Domain names in training order: targets, then generic ones, each sorted; the
    validation-only ones (train=False) included."""
    return sorted(cfg.domains.keys(), key=lambda n: (ROLES.index(cfg.domains[n].role), n))


def trained_domains(cfg) -> list:
    """The domains the run trains on (ordered_domains less the train=False ones)."""
    return [n for n in ordered_domains(cfg) if cfg.domains[n].train]


LABELLED = ("tfds", "folder", "uned")  # data/sources.py's kinds whose images have classes
DTYPES = ("float32", "bfloat16")


def _remat_policy(name) -> bool:
    return name == "none" or (isinstance(name, str) and not name.startswith("_")
                              and callable(getattr(jax.checkpoint_policies, name, None)))


def _variant(name) -> bool:
    if not isinstance(name, str):
        return False
    family, _, patch = name.partition("/")
    return family in transformer.VARIANTS and (not patch or patch.isdigit() and int(patch) > 0)


def _source(*kinds) -> fields.Rule:
    return fields.Rule(lambda x: isinstance(x, str) and x.partition(":")[0] in kinds
                       and bool(x.partition(":")[2]),
                       " or ".join(f"'{k}:...'" for k in kinds) + " (a data spec, e.g. "
                       "'tfds:cars196', 'uned:/data/sop', 'folder:/photos')")


MODEL = dict(
    checkpoint=fields.text(), family=fields.one_of("siglip", "clip", "tips"),
    variant=fields.Rule(_variant, f"a variant such as 'B/16' (one of {sorted(transformer.VARIANTS)}"
                                  ", '/' and the patch size)"),
    image_size=fields.integer(1), act=fields.one_of("", *sorted(transformer.ACTIVATIONS)),
    scan=fields.boolean(),
    remat_policy=fields.Rule(_remat_policy, "'none' or a jax.checkpoint_policies name, e.g. "
                                            "'nothing_saveable'"),
    dtype=fields.one_of(*DTYPES), param_dtype=fields.one_of(*DTYPES), lora=fields.anything())
DATA = dict(
    data_dir=fields.text(), batch_size=fields.integer(1), mix=fields.one_of(*mixing.MIXES),
    one_domain_per_batch=fields.boolean(), shuffle_buffer=fields.integer(1),
    resize=fields.integer(0), num_shards=fields.integer(0), device_prefetch=fields.integer(0),
    keep_decoded_mb=fields.integer(0))
TEMPLATES = fields.Rule(lambda t: isinstance(t, (tuple, list)) and all(
    isinstance(s, str) and s.count("{}") == 1 for s in t),
    "a tuple of prompt templates, each with one '{}' for the class name ((): the dataset's)")
DOMAIN = dict(
    source=_source(*LABELLED, "images"), role=fields.one_of(*ROLES), data_dir=fields.text(),
    train_split=fields.text(nonempty=True), val_split=fields.text(),
    val_classes_fraction=fields.fraction(), holdout_fraction=fields.fraction(),
    val_seed=fields.integer(0), weight=fields.number(at_least=0),
    teacher_descriptors=fields.text(), head_init=fields.one_of("random", "zero_shot"),
    class_names=fields.text(), templates=TEMPLATES, train=fields.boolean(),
    losses=fields.anything())
LOSS_SETTINGS = dict(
    weight=fields.number(at_least=0), scale=fields.number(above=0),
    trainable_scale=fields.boolean(), margin=fields.number(at_least=0),
    fallback=fields.one_of(*classification.ARCFACE_FALLBACKS),
    temperature=fields.number(above=0), alpha=fields.number(above=0),
    beta=fields.number(above=0), base=fields.number(),
    epsilon=fields.optional(fields.number(at_least=0)), delta=fields.number(),
    teacher=fields.one_of(*TEACHERS), student_temperature=fields.number(above=0),
    teacher_temperature=fields.number(above=0), scale_by_t2=fields.boolean(),
    reduction=fields.one_of("mean_per_tensor", "sum"), exclude=fields.strings(),
    fisher_batches=fields.integer(1), texts=fields.integer(1), tokens=fields.integer(1),
    text_seed=fields.integer(0))
TRAIN = dict(
    num_steps=fields.integer(0), num_epochs=fields.number(at_least=0),
    log_every=fields.integer(1), checkpoint_every=fields.integer(1),
    keep_checkpoints=fields.integer(1), async_checkpoints=fields.boolean(),
    eval_every=fields.integer(0), eval_at_start=fields.boolean(),
    eval_retention=fields.boolean(),
    eval_batch_size=fields.integer(1), eval_k=fields.integer(1),
    select_by=fields.one_of(*SELECT_BY), eval_ema=fields.boolean(), fsdp=fields.boolean(),
    progress=fields.boolean())
EVAL = dict(
    batch_size=fields.integer(1), k=fields.integer(1), tokenizer=fields.text(),
    text_checkpoint=fields.text(), validate_text=fields.boolean(),
    retrieval=fields.anything(), text_retrieval=fields.anything(), zero_shot=fields.anything())
TESTS = dict(
    retrieval=dict(source=_source(*LABELLED, "captions"), role=fields.one_of(*ROLES),
                   query_split=fields.text(), index_split=fields.text(), data_dir=fields.text()),
    text_retrieval=dict(source=_source("captions"), text_embeddings=fields.text(),
                        data_dir=fields.text()),
    zero_shot=dict(source=_source(*LABELLED, "captions"), split=fields.text(nonempty=True),
                   class_names=fields.text(), templates=TEMPLATES, data_dir=fields.text()))


def _err(field: str, msg: str):
    fields.fail(f"config.{field}", msg)


def _validate_loss(cfg, losses, kind: str, where: str):
    if kind not in LOSSES:
        _err(where, f"unknown loss kind; use one of {sorted(LOSSES)}")
    rules = {k: LOSS_SETTINGS[k] for k in ("weight", *LOSSES[kind])}
    fields.check(losses[kind], f"config.{where}", rules)
    s = losses[kind]
    if kind == "arcface" and not s.margin < math.pi / 2:
        _err(f"{where}.margin", f"must be < pi/2 for arcface, got {s.margin!r}")
    if kind == "lipsum" and not cfg.eval.tokenizer:
        _err("eval.tokenizer", f"{where} embeds its random texts with the frozen text tower; "
             "give the checkpoint's tokenizer (SigLIP: its sentencepiece .model; CLIP: "
             "bpe_simple_vocab_16e6.txt.gz or vocab.json)")
    classifiers = [k for k in losses.keys() if k in CLASSIFIERS]
    if kind == "logit_kl" and len(classifiers) != 1:
        _err(where, "logit_kl distils the logits of the domain's classifier; give the domain "
             f"exactly one classifier loss ({', '.join(CLASSIFIERS)}), it has {classifiers}")


def _validate_domain(cfg, name: str):
    where = f"domains.{name}"
    d = cfg.domains[name]
    fields.check(d, f"config.{where}", DOMAIN)
    carved = [k for k in ("val_split", "val_classes_fraction", "holdout_fraction") if d[k]]
    if len(carved) > 1:
        _err(where, f"{' and '.join(carved)} each choose the validation split; keep one")
    if not d.train:
        if d.losses.keys():
            _err(f"{where}.losses", "the domain is only validated on (train=False), so its "
                 f"losses {sorted(d.losses.keys())} would never run; drop them or set "
                 "train=True")
        if not carved:
            _err(f"{where}.train", "False: the domain is only validated on, and it has no val "
                 "split; give val_split, val_classes_fraction or holdout_fraction")
        if d.head_init != "random":
            _err(f"{where}.head_init", f"{d.head_init!r}: the domain is only validated on "
                 "(train=False) and has no classifier; leave it 'random'")
        return
    if not d.losses.keys():
        _err(f"{where}.losses", "no loss configured; add e.g. losses=dict(normface=dict())")
    if d.head_init == "zero_shot":
        if not any(k in CLASSIFIERS for k in d.losses.keys()):
            _err(f"{where}.head_init", "'zero_shot' initialises a classifier, and the domain "
                 f"has none ({', '.join(CLASSIFIERS)}); add one or use 'random'")
        if not cfg.eval.tokenizer:
            _err("eval.tokenizer", f"{where}.head_init 'zero_shot' embeds the class names with "
                 "the frozen text tower; give the checkpoint's tokenizer")
    for kind in d.losses.keys():
        _validate_loss(cfg, d.losses, kind, f"{where}.losses.{kind}")
    if (cfg.loss_aggregation == "weighted_average"
            and not sum(d.losses[k].weight for k in d.losses.keys())):
        _err(f"{where}.losses", "all weights are 0, and loss_aggregation 'weighted_average' "
             "divides by their sum; give one a weight > 0")


def uses_ema(cfg) -> bool:
    """Whether the EMA weights (optim.ema_decay) are the ones validated, kept as best,
    tested and exported (train.eval_ema); else the raw weights are."""
    return cfg.optim.ema_decay is not None and cfg.train.eval_ema


def validated_by_domain(domain) -> bool:
    """Whether a domain (config.domains.<name>) has a validation split (val_split or a
    carved one)."""
    return bool(domain.val_split or domain.val_classes_fraction or domain.holdout_fraction)


def validated_by(cfg, role: str) -> bool:
    """Whether a domain of `role` has a validation split."""
    return any(cfg.domains[n].role == role and validated_by_domain(cfg.domains[n])
               for n in cfg.domains.keys())


def validate(cfg) -> None:
    """One-line errors.UserError naming the first bad field (`config.<path>: ...`)."""
    top = dict(seed=fields.integer(0), model=fields.anything(), data=fields.anything(),
               domains=fields.anything(), loss_aggregation=fields.one_of(*AGGREGATIONS),
               optim=fields.anything(), train=fields.anything(), eval=fields.anything())
    fields.check(cfg, "config", top)
    fields.check(cfg.model, "config.model", MODEL)
    m = cfg.model
    fields.check(m.lora, "config.model.lora", lora.RULES)
    if m.lora.rank and m.scan:
        _err("model.lora.rank", "LoRA needs the unrolled layout; set model.scan=False")
    if not m.checkpoint:
        patch = transformer.decode_variant(m.variant).get("patch_size")
        if patch and m.image_size % patch:
            _err("model.image_size", f"{m.image_size} is not a multiple of the patch size "
                 f"{patch} of model.variant {m.variant!r}")
    fields.check(cfg.data, "config.data", DATA)
    d = cfg.data
    if d.resize and d.resize < m.image_size:
        _err("data.resize", f"{d.resize} is smaller than the random crop, model.image_size "
             f"{m.image_size}; give a size >= {m.image_size}, or 0 for image_size * 256 / 224")
    if d.num_shards and d.batch_size % d.num_shards:
        _err("data.num_shards", f"{d.num_shards} does not divide data.batch_size "
             f"{d.batch_size}")
    if not cfg.domains.keys():
        _err("domains", "no domain configured; a configs/ file adds them with config.domain(...)")
    for name in cfg.domains.keys():
        _validate_domain(cfg, name)
    if not trained_domains(cfg):
        _err("domains", "every domain has train=False; train on at least one")
    try:
        optim.validate(cfg.optim)
    except errors.UserError as e:
        raise errors.UserError(f"config.{e}") from None
    if cfg.optim.layer_decay is not None and cfg.optim.freeze_backbone_epochs != -1 and m.scan:
        _err("optim.layer_decay", "needs model.scan=False (its per-block learning rates need "
             "the unrolled encoderblock_N layout)")
    fields.check(cfg.train, "config.train", TRAIN)
    t = cfg.train
    if t.num_steps == 0 and t.num_epochs <= 0:
        _err("train.num_epochs", f"must be > 0 when train.num_steps is 0, got {t.num_epochs!r}")
    if t.select_by == "retention" and not t.eval_retention:
        _err("train.select_by", "'retention' needs train.eval_retention=True")
    if t.select_by != "last":
        needs = {"in-domain": ("target",), "out-of-domain": ("generic",),
                 "retention": ("generic",), "all": ("target", "generic")}[t.select_by]
        if not any(validated_by(cfg, role) for role in needs):
            _err("train.select_by", f"{t.select_by!r} keeps the best checkpoint by validation, "
                 f"but no {' or '.join(needs)} domain has a val split (val_split, "
                 "val_classes_fraction or holdout_fraction); give one, or select_by='last'")
    _validate_eval(cfg.eval)


def _validate_eval(e):
    fields.check(e, "config.eval", EVAL)
    for kind, rules in TESTS.items():
        for name in e[kind].keys():
            fields.check(e[kind][name], f"config.eval.{kind}.{name}", rules)
    needs_text = (any(not e.text_retrieval[n].text_embeddings for n in e.text_retrieval.keys())
                  or e.zero_shot.keys())
    if needs_text and not e.tokenizer:
        _err("eval.tokenizer", "text retrieval and zero-shot need the checkpoint's tokenizer "
             "(SigLIP: its sentencepiece .model; CLIP: bpe_simple_vocab_16e6.txt.gz or vocab.json)")
    if e.validate_text and not e.text_retrieval.keys():
        _err("eval.validate_text", "no eval.text_retrieval set to validate on; add one or set "
             "it to False")


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def describe_changes(old: dict, new: dict, limit: int = 6) -> str:
    """The fields in which two configs (as JSON dicts) differ, as one phrase:
    'config.optim.lr, config.domains.generic (gone), ...'; a group only one side has is
    named once."""
    old, new = _flat(old), _flat(new)
    changed = []
    for key in sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)):
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            group = ".".join(parts[:depth])
            on_both = [any(k == group or k.startswith(group + ".") for k in side)
                       for side in (old, new)]
            if not all(on_both):
                key = group + (" (new)" if on_both[1] else " (gone)")
                break
        if key not in changed:
            changed.append(key)
    return (", ".join("config." + k for k in changed[:limit]) or "none") + \
        (", ..." if len(changed) > limit else "")
