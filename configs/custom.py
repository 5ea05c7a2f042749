"""The paper's recipe for your own target domain (and, optionally, your own generic images).

    python -m infusing_jax.main --workdir=runs/mine_full --config=configs/custom.py:\
target=folder:/photos,generic=images:/generic,family=siglip,\
checkpoint=/ckpt/webli_en_b16_224_63724782.npz:img,tokenizer=/ckpt/c4_en.model

The :ARG keys and what each test set needs: configs/README.md. The target and generic
sources are read here, once, for their splits and sizes: the schedule is counted from
them, as the paper counts its epochs.
"""
from infusing_jax import errors
from infusing_jax.data import sources
from infusing_jax.data import splits
from infusing_jax.training import config as config_lib
from infusing_jax.training import recipes


def get_config(arg=None):
    arg = recipes.parse_arg(
        arg, target="", target_root="", generic="", generic_root="", tfds_dir="",
        method=recipes.METHODS, family=recipes.FAMILIES, checkpoint="", tokenizer="",
        image_size=224, batch_size=128, epochs=3.0, steps=0, evals=5, keep=("best", "last"),
        val_classes=0.2, holdout=0.2, distill=1000.0, anchor=1e5,
        target_test=True, generic_test="", captions="", captions_root="", zero_shot="",
        class_names="")
    for key, example in (("target", "folder:/photos"), ("checkpoint", "/ckpt/model.npz:img")):
        if not getattr(arg, key):
            raise errors.UserError(f"config argument {key}: required, e.g. {key}={example}")
    for key, ok, want in (("image_size", arg.image_size >= 1, ">= 1"),
                          ("batch_size", arg.batch_size >= 1, ">= 1"),
                          ("epochs", arg.epochs > 0, "> 0"), ("steps", arg.steps >= 0, ">= 0"),
                          ("evals", arg.evals >= 0, ">= 0"),
                          ("val_classes", 0 < arg.val_classes < 1, "between 0 and 1"),
                          ("holdout", 0 < arg.holdout < 1, "between 0 and 1"),
                          ("distill", arg.distill >= 0, ">= 0"),
                          ("anchor", arg.anchor >= 0, ">= 0")):
        if not ok:
            raise errors.UserError(f"config argument {key}: {getattr(arg, key)} is not {want}")
    c = config_lib.default_config()
    c.model.update(family=recipes.MODEL_FAMILY.get(arg.family, arg.family),
                   checkpoint=arg.checkpoint, image_size=arg.image_size)
    c.eval.tokenizer = arg.tokenizer
    c.data.update(data_dir=arg.tfds_dir, batch_size=arg.batch_size, mix="round_robin",
                  one_domain_per_batch=True)

    # The target domain, NormFace (s=16) on its classes. Its val split: the source's own
    # 'val' (e.g. DIR/{train,val,test}/<class>), else a seeded fraction of its train
    # classes, class-disjoint from the classes it trains on.
    c.domains.target = config_lib.domain(arg.target, role="target", data_dir=arg.target_root,
                                         losses=dict(normface=dict()))
    target = _source("target", c, c.domains.target)
    if arg.target_test and target.roles.query == "train":
        raise errors.UserError(f"config argument target_test: {arg.target} has no test split; "
                               "lay it out as DIR/{train,test}/<class> (val too, if you like), "
                               "or give target_test=false")
    if "val" in target.splits:
        c.domains.target.val_split = "val"
    else:
        c.domains.target.val_classes_fraction = arg.val_classes
    trained = {"target": _train_size(target, c.domains.target)}

    # The generic domain: its images less a seeded hold-out (its val), distilled to the
    # pretrained model's features (precomputed once) by the paper's methods, and anchoring
    # on both domains. The other methods validate on its hold-out only (train=False), so
    # that every method is kept by the same protocol.
    paper = recipes.paper_losses(arg.method)
    if paper and not arg.generic:
        raise errors.UserError(f"config argument generic: method={arg.method} distils on "
                               "generic images; give generic=images:DIR (or folder:, tfds:, "
                               "uned:), or method=naive")
    if arg.generic:
        losses = dict(feature_mse=dict(weight=arg.distill, teacher="precomputed"),
                      anchoring=dict(weight=arg.anchor))
        c.domains.generic = config_lib.domain(
            arg.generic, role="generic", data_dir=arg.generic_root, holdout_fraction=arg.holdout,
            **(dict(losses=losses) if paper else dict(train=False)))
        generic = _source("generic", c, c.domains.generic)
        if "train" not in generic.splits:
            raise errors.UserError(f"config argument generic: {arg.generic} has no train "
                                   f"split; it has {', '.join(generic.splits)}")
        if paper:
            c.domains.target.losses.anchoring = config_lib.loss("anchoring", weight=arg.anchor)
            trained["generic"] = _kept_size(generic.split("train"), arg.holdout,
                                            c.domains.generic.val_seed)

    # AdamW as the paper's: LR 1e-3 for the heads, 1e-5 for the backbone, constant, weight
    # decay 1e-6; `epochs` times the steps of one pass over all trained domains' train
    # images (the authors' count).
    c.optim.update(lr=1e-3, backbone_lr_mult=1e-2, weight_decay=1e-6, schedule="constant")
    steps = arg.steps or int(arg.epochs * (sum(trained.values()) // arg.batch_size))
    if steps < 1:
        raise errors.UserError(f"config argument epochs: {arg.epochs} epochs of "
                               f"{sum(trained.values())} images in batches of {arg.batch_size} "
                               "is no step; give more epochs or steps=N")
    c.train.num_steps = steps
    recipes.set_method(c, arg.method, "target", linear_probe_steps=steps // 3,
                       lora_lr_mult=0.2)
    # Validated before training and `evals` times during it; the best weights are kept by
    # the mean of both domains' scores (the target's alone for the naive baseline, as the
    # paper's), or the last ones with keep=last. A generic domain without classes (images:)
    # scores by retention.
    by = "in-domain" if arg.method == "naive" or not arg.generic else "all"
    every = max(steps // arg.evals, 1) if arg.evals else 0
    c.train.update(eval_at_start=True, eval_every=every, checkpoint_every=every or steps,
                   select_by=by if arg.keep == "best" else "last")

    # Tested at the end, each when asked for: the target's test split (its classes unseen in
    # training), image retrieval on a labelled generic set, image<->text on a captions file
    # and zero-shot classification (both with the frozen text tower and `tokenizer`).
    if arg.target_test:
        c.eval.retrieval.target = config_lib.retrieval_test(arg.target, role="target",
                                                            data_dir=arg.target_root)
    if arg.generic_test:
        c.eval.retrieval.generic = config_lib.retrieval_test(arg.generic_test, role="generic")
    if arg.captions:
        spec = arg.captions if arg.captions.startswith("captions:") else f"captions:{arg.captions}"
        c.eval.text_retrieval.captions = config_lib.text_test(spec, data_dir=arg.captions_root)
    if arg.zero_shot:
        c.eval.zero_shot.classes = config_lib.zero_shot_test(arg.zero_shot,
                                                             class_names=arg.class_names)
    return c


def _source(key: str, c, domain):
    """The source of `domain` (config.domains.<key>), read from where the run will read it
    (config_lib.data_dir), or one line naming the :ARG key."""
    try:
        return sources.load_source(domain.source, config_lib.data_dir(c, domain))
    except (errors.UserError, OSError) as e:
        raise errors.UserError(f"config argument {key}: {e}") from None


def _train_size(target, domain) -> int:
    """The target's train images, less the val classes `domain` carves from them (as
    training/domains.py does): exact where the labels are known (files), else counted as
    (1 - val_classes_fraction) of them (TFDS)."""
    if "train" not in target.splits:
        raise errors.UserError(f"config argument target: {domain.source} has no train split; "
                               f"it has {', '.join(target.splits)}")
    train, fraction = target.split("train"), domain.val_classes_fraction
    if not fraction or not train.num_classes:
        return train.num_examples or 0
    carved = splits.carve_val(train, fraction, domain.val_seed)[0]
    if carved.num_examples is not None:
        return carved.num_examples
    return round((1 - fraction) * (train.num_examples or 0))


def _kept_size(split, held_out: float, seed: int) -> int:
    """A split's images less the `held_out` fraction splits.holdout keeps back with `seed`:
    exact where its ids are known (files), else counted as (1 - held_out) of them (TFDS)."""
    if split.ids is not None:
        return splits.holdout(split, held_out, seed)[0].num_examples
    return round((1 - held_out) * (split.num_examples or 0))
