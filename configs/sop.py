"""The paper's recipe with Stanford Online Products (SOP) as the target domain.

Usage, the :ARG keys and the files expected under DATA and CKPT: configs/README.md.
"""
from infusing_jax.training import config as config_lib
from infusing_jax.training import recipes


def get_config(arg=None):
    arg = recipes.parse_arg(arg, method=recipes.METHODS, family=recipes.FAMILIES,
                            data="/data", checkpoints="/checkpoints", tests=recipes.ALL_TESTS)
    c = config_lib.default_config()
    recipes.set_image_tower(c, arg.family, arg.checkpoints)  # B/16 at 224 px, its tokenizer

    # The target domain: SOP, UnED's splits; its val split's classes are not in train.
    # NormFace (s=16) on its classes.
    c.domains.sop = config_lib.domain(
        f"uned:{arg.data}/uned/sop", role="target", val_split="val",
        losses=dict(normface=dict(scale=16.0)))
    train_examples = 48_942

    if recipes.paper_losses(arg.method):
        # Anchoring (x1e5) to the pretrained weights, and the generic domain: ImageNet-1k's
        # train split less a seeded 20% held out as its val, its features distilled (feature
        # MSE x1000) to the pretrained model's, precomputed once.
        c.domains.sop.losses.anchoring = config_lib.loss("anchoring", weight=1e5)
        c.domains.imagenet = config_lib.domain(
            "tfds:imagenet2012", role="generic", holdout_fraction=0.2, val_seed=42,
            losses=dict(feature_mse=dict(weight=1000.0, teacher="precomputed"),
                        anchoring=dict(weight=1e5)))
        train_examples += recipes.IMAGENET_TRAIN_KEPT

    # AdamW(0.9, 0.999), weight decay 1e-6, constant LR 1e-3 for the heads, 1e-5 for the backbone.
    c.optim.update(lr=1e-3, backbone_lr_mult=1e-2, weight_decay=1e-6, schedule="constant")
    # Batches of 128 images, each from one domain, the domains in turn; 3 epochs over all
    # domains' train images, counted as the authors do (ImageNet's 80% has no size until read).
    c.data.update(data_dir=recipes.tfds_dir(arg.data), batch_size=128, mix="round_robin",
                  one_domain_per_batch=True)
    c.train.num_steps = 3 * (train_examples // c.data.batch_size)
    # method= l2sp: L2-SP's ||theta - theta0||^2 on the target; spd / ftp: SPD's or FTP's
    # projection around the backbone's AdamW; lp_ft: the
    # first of the three epochs trains the heads alone; lora: rank-8 adapters at LR 2e-4, the
    # tower frozen; lipsum: Lipsum-FT's energy gap on the target (docs/method.md).
    recipes.set_method(c, arg.method, "sop", linear_probe_steps=c.train.num_steps // 3,
                       lora_lr_mult=0.2)
    # Validation (kNN mAP@20 on the val splits) before training and every 2000 steps; the
    # best weights are kept, by both domains' mean (full) or the target's (naive).
    c.train.update(eval_at_start=True, eval_every=2000, checkpoint_every=1000,
                   select_by="all" if recipes.paper_losses(arg.method) else "in-domain")

    # Tested at the end (tests= keeps some): the target's test split, ImageNet val, Flickr30k
    # and COCO image<->text, ImageNet zero-shot.
    recipes.add_test_sets(c, arg.tests, arg.data, target="sop")
    return c
