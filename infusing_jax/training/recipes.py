"""The paper's recipes (docs/method.md), shared by the configs/ files.

    paper_config("sop", method="full", family="siglip", data="/data", checkpoints="/ckpt")

method 'full': target domain (NormFace s=16 + anchoring 1e5) and ImageNet's 80%
  as the generic domain (feature MSE 1000 to the precomputed teacher + anchoring
  1e5), round-robin batches of 128 from one domain, best checkpoint by 'all'.
method 'naive': the target domain with NormFace only, best by 'in-domain'.
Both: AdamW(0.9, 0.999, wd 1e-6), constant LR 1e-3 heads / 1e-5 backbone, 3
epochs over all domains' train examples. CLIP uses the same settings (the
authors ran SigLIP and TIPS only).

Where the files go (DATA and CKPT are the `data` and `checkpoints` arguments):
  DATA/uned/<name>/{train,val,test[,index]}.json + images   UnED splits (the authors')
  DATA/tfds/                                               TFDS data_dir (imagenet2012, food101)
  DATA/flickr30k/dataset_flickr30k.json, flickr30k-images/  Karpathy's test split (text)
  DATA/coco/dataset_coco.json, val2014/                    Karpathy's COCO test split (text)
  CKPT/webli_en_b16_224_63724782.npz                       SigLIP B/16 (gs://big_vision)
  CKPT/c4_en.model                                         its sentencepiece tokenizer
  CKPT/clip-vit-base-patch16/                              CLIP B/16 (HF save_pretrained dir,
                                                           with vocab.json + merges.txt)
Test sets (eval), all by default, a subset with tests=NAME+NAME... (e.g.
tests=target+imagenet where Flickr30k and COCO are not at hand): `target` its own
test split (UnED: its test queries against its index / gallery), `imagenet`
ImageNet's official val (generic, image->image), `flickr30k` and `coco`
image<->text with the frozen text tower, `zero_shot` ImageNet zero-shot.
"""
import os

import ml_collections

from infusing_jax import errors
from infusing_jax.training import config as config_lib

# name -> (source spec relative to DATA, domain fields, train examples); the UnED
# sizes the authors used. Food101 (TFDS) has no class-disjoint val: 10% of its classes.
TARGETS = {
    "sop": ("uned:{data}/uned/sop", dict(val_split="val"), 48_942),
    "cars196": ("uned:{data}/uned/cars", dict(val_split="val"), 6_346),
    "inshop": ("uned:{data}/uned/inshop", dict(val_split="val"), 20_897),
    "inat2021": ("uned:{data}/uned/inat", dict(val_split="val"), 273_929),
    "food2k": ("uned:{data}/uned/food2k", dict(val_split="val"), 472_349),
    "food101": ("tfds:food101", dict(val_classes_fraction=0.1), 68_175),
}
IMAGENET_KEPT = 1_024_934  # 80% of ImageNet-1k train (1,281,167)
CHECKPOINTS = {
    "siglip": "webli_en_b16_224_63724782.npz:img",
    "clip": "clip-vit-base-patch16",
}
TOKENIZERS = {"siglip": "c4_en.model", "clip": "clip-vit-base-patch16"}
TESTS = ("target", "imagenet", "flickr30k", "coco", "zero_shot")
BATCH, EPOCHS = 128, 3
LAMBDA_DISTILL, LAMBDA_ANCHOR = 1000.0, 1e5


def parse_arg(arg, **defaults) -> dict:
    """'k=v,k2=v2' (a config file's :ARG) over the defaults; unknown keys are an error."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise errors.UserError(f"config argument {item!r}: use k=v with k in {sorted(defaults)}")
        out[key] = value
    return out


def paper_config(target: str, method: str = "full", family: str = "siglip",
                 data: str = "/data", checkpoints: str = "/checkpoints", tests=TESTS):
    """The recipe (module doc); tests: names from TESTS, or a '+'-joined string of them."""
    tests = tests.split("+") if isinstance(tests, str) else list(tests)
    if not set(tests) <= set(TESTS):
        raise errors.UserError(f"tests {'+'.join(tests)!r}: '+'-join names from {TESTS}")
    if target not in TARGETS:
        raise errors.UserError(f"target {target!r}: use one of {sorted(TARGETS)}")
    if method not in ("full", "naive"):
        raise errors.UserError(f"method {method!r}: use 'full' or 'naive'")
    if family not in CHECKPOINTS:
        raise errors.UserError(f"family {family!r}: use one of {sorted(CHECKPOINTS)}")
    c = config_lib.default_config()
    c.model.family = family
    c.model.checkpoint = os.path.join(checkpoints, CHECKPOINTS[family])
    c.data.data_dir = os.path.join(data, "tfds")
    c.data.batch_size = BATCH
    spec, fields, size = TARGETS[target]
    target_losses = dict(normface=dict(scale=16.0))
    if method == "full":
        target_losses["anchoring"] = dict(weight=LAMBDA_ANCHOR)
    setattr(c.domains, target, config_lib.domain(spec.format(data=data), role="target",
                                                 losses=target_losses, **fields))
    examples = size
    if method == "full":
        c.domains.imagenet = config_lib.domain(
            "tfds:imagenet2012", role="generic", holdout_fraction=0.2, val_seed=42,
            losses=dict(feature_mse=dict(weight=LAMBDA_DISTILL, teacher="precomputed"),
                        anchoring=dict(weight=LAMBDA_ANCHOR)))
        examples += IMAGENET_KEPT
    # ImageNet's 80% is a filtered TFDS split (its size unknown without a pass): fix the length.
    c.train.num_steps = round(EPOCHS * examples / BATCH)
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.train.select_by = "all" if method == "full" else "in-domain"
    add_test_sets(c, target, spec.format(data=data), data, tests)
    c.eval.tokenizer = os.path.join(checkpoints, TOKENIZERS[family])
    return c


def add_test_sets(c, target: str, target_spec: str, data: str, tests=TESTS) -> None:
    """The paper's test sets named in `tests` (module doc) into c.eval."""
    if "target" in tests:
        c.eval.retrieval[target] = config_lib.retrieval_test(target_spec, role="target")
    if "imagenet" in tests:
        c.eval.retrieval.imagenet = config_lib.retrieval_test("tfds:imagenet2012",
                                                              role="generic")
    if "flickr30k" in tests:
        c.eval.text_retrieval.flickr30k = config_lib.text_test(
            f"captions:{data}/flickr30k/dataset_flickr30k.json:test",
            data_dir=f"{data}/flickr30k/flickr30k-images")
    if "coco" in tests:
        c.eval.text_retrieval.coco = config_lib.text_test(
            f"captions:{data}/coco/dataset_coco.json:test", data_dir=f"{data}/coco")
    if "zero_shot" in tests:
        c.eval.zero_shot.imagenet = config_lib.zero_shot_test("tfds:imagenet2012",
                                                              split="test")


def config_file(target: str, arg) -> ml_collections.ConfigDict:
    """What a configs/<target>.py returns for its :ARG (method, family, data, checkpoints,
    tests)."""
    a = parse_arg(arg, method="full", family="siglip", data="/data", checkpoints="/checkpoints",
                  tests="+".join(TESTS))
    return paper_config(target, **a)


# The toy world's weights, tuned there (configs/toy.py): its tensors are ~64x smaller
# than B/16's, so the per-tensor-mean anchoring pulls each weight far harder at the
# paper's 1e5; its 96-d features need a stronger distillation than 768-d ones.
TOY_DISTILL, TOY_ANCHOR, TOY_BACKBONE_LR_MULT = 1e4, 300.0, 0.3


def toy_config(method: str, world: str, steps: int) -> ml_collections.ConfigDict:
    """The recipe on the toy world (toy_world.py): the paper's losses and round-robin
    batches, with weights, learning rate and length for a tiny model and a few CPU
    minutes."""
    if method not in ("full", "naive"):
        raise errors.UserError(f"method {method!r}: use 'full' or 'naive'")
    c = config_lib.default_config()
    c.model.checkpoint = f"{world}/vlm/pretrained.npz:img"
    c.model.image_size = 32
    c.data.batch_size = 64
    c.data.resize = 32  # no random crop: the glyph is aligned to the patch grid
    c.data.shuffle_buffer = 1024
    target_losses = dict(normface=dict(scale=16.0))
    if method == "full":
        target_losses["anchoring"] = dict(weight=TOY_ANCHOR)
    c.domains.target = config_lib.domain(f"folder:{world}/target", role="target",
                                         val_split="val", losses=target_losses)
    if method == "full":
        c.domains.generic = config_lib.domain(
            f"folder:{world}/generic", role="generic", holdout_fraction=0.05,
            losses=dict(feature_mse=dict(weight=TOY_DISTILL, teacher="precomputed"),
                        anchoring=dict(weight=TOY_ANCHOR)))
    c.optim.lr = 1e-3
    c.optim.backbone_lr_mult = TOY_BACKBONE_LR_MULT
    c.train.num_steps = steps
    c.train.log_every = 25
    c.train.checkpoint_every = steps
    c.train.eval_every = 0
    c.train.eval_batch_size = 256
    c.train.select_by = "last"
    c.eval.batch_size = 256
    c.eval.tokenizer = f"{world}/spm.model"
    c.eval.retrieval.target = config_lib.retrieval_test(f"folder:{world}/target")
    c.eval.retrieval.generic = config_lib.retrieval_test(f"folder:{world}/generic",
                                                         role="generic")
    c.eval.text_retrieval.captions = config_lib.text_test(
        f"captions:{world}/captions_test.json")
    c.eval.zero_shot.generic = config_lib.zero_shot_test(
        f"folder:{world}/generic", class_names=f"{world}/classes.txt", templates=("a {}",))
    return c
