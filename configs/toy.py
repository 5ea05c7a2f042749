"""Fine-tuning the toy world's VLM on its fine-grained domain (the quickstart).

The paper's losses and round-robin batches (configs/sop.py), with weights, learning rate
and length for a tiny model and a few CPU minutes. Usage and the :ARG keys:
configs/README.md.
"""
from infusing_jax.training import config as config_lib
from infusing_jax.training import recipes


def get_config(arg=None):
    arg = recipes.parse_arg(arg, method=recipes.METHODS, world="toy_world", steps=400)
    world = arg.world
    c = config_lib.default_config()
    # The image tower of the two-tower VLM that configs/toy_pretrain.py trained, at 32 px.
    c.model.checkpoint = f"{world}/vlm/pretrained.npz:img"
    c.model.image_size = 32
    c.eval.tokenizer = f"{world}/spm.model"

    # The paper's weights, retuned on the toy world: its tensors are ~64x smaller than B/16's,
    # so the per-tensor-mean anchoring pulls each weight far harder at the paper's 1e5; its
    # 96-d features need a stronger distillation than 768-d ones.
    distill, anchor = 1e4, 300.0

    # The target domain: glyph classes, with a val split of classes not in train. NormFace
    # (s=16) on its classes.
    c.domains.target = config_lib.domain(
        f"folder:{world}/target", role="target", val_split="val",
        losses=dict(normface=dict(scale=16.0)))

    if recipes.paper_losses(arg.method):
        # Anchoring to the pretrained weights, and the generic domain: colour + shape images
        # less a 5% hold-out (its val), distilled to the pretrained model's features.
        c.domains.target.losses.anchoring = config_lib.loss("anchoring", weight=anchor)
        c.domains.generic = config_lib.domain(
            f"folder:{world}/generic", role="generic", holdout_fraction=0.05,
            losses=dict(feature_mse=dict(weight=distill, teacher="precomputed"),
                        anchoring=dict(weight=anchor)))

    # AdamW as the paper's, the backbone's LR multiplier 0.3 (3e-4) for a model this small.
    c.optim.update(lr=1e-3, backbone_lr_mult=0.3)
    # method= l2sp: L2-SP's ||theta - theta0||^2 on the target; spd / ftp: SPD's or FTP's
    # projection around the backbone's AdamW; lp_ft: the
    # heads alone for the first quarter of the run, then all weights; lora: rank-8 adapters
    # at the heads' LR, the tower frozen; lipsum: Lipsum-FT's energy gap on the glyphs.
    recipes.set_method(c, arg.method, "target", linear_probe_steps=arg.steps // 4,
                       lora_lr_mult=1.0)
    # Batches of 64 from one domain, the domains in turn. resize=32: no random crop, the
    # glyph is aligned to the patch grid.
    c.data.update(batch_size=64, mix="round_robin", resize=32, shuffle_buffer=1024)
    c.train.update(num_steps=arg.steps, log_every=25, checkpoint_every=arg.steps,
                   eval_every=0, eval_batch_size=256, select_by="last")

    # Tested at the end: the glyph classes never seen in training (in-domain), generic image
    # retrieval by colour + shape, caption retrieval both ways and zero-shot colour + shape
    # classification with the frozen text tower.
    c.eval.batch_size = 256
    c.eval.retrieval.target = config_lib.retrieval_test(f"folder:{world}/target")
    c.eval.retrieval.generic = config_lib.retrieval_test(f"folder:{world}/generic",
                                                         role="generic")
    c.eval.text_retrieval.captions = config_lib.text_test(
        f"captions:{world}/captions_test.json")
    c.eval.zero_shot.generic = config_lib.zero_shot_test(
        f"folder:{world}/generic", class_names=f"{world}/classes.txt", templates=("a {}",))
    return c
