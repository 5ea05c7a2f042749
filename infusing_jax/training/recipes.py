"""What the configs/*.py files share: their typed :ARG (`parse_arg`), where the paper's
files lie under DATA and CKPT, and the paper's test sets. Each configs/ file spells out
its own recipe; configs/README.md has the usage.

This lives in the package, not in a configs/common.py: ml_collections' config_flags
loads `--config=configs/sop.py` by its path (importlib's SourceFileLoader) and puts
nothing on sys.path, so `from configs import common` would import only when Python was
started with the repository root as sys.path[0] (`python -m` from there), not from
another folder, a script, or a config file written elsewhere (colab/finetune_siglip.ipynb
writes one into its WORKDIR).
"""
import importlib.util
import os
import types

from infusing_jax import errors
from infusing_jax.training import config as config_lib


def parse_arg(arg, **defaults) -> types.SimpleNamespace:
    """A config file's :ARG, 'key=value,key=value', over `defaults`, as attributes.

    Each value is read as its default's type: a str as given; an int or float as a
    number (steps=400); a bool as true / false; a tuple of strings is a choice, one of
    them, the first the default (method=("full", "naive") gives arg.method == "full").
    An unknown key or a value that does not parse is a one-line errors.UserError naming
    the key.
    """
    values = {key: default[0] if isinstance(default, tuple) else default
              for key, default in defaults.items()}
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if key not in defaults:
            raise errors.UserError(f"config argument {key!r}: unknown; this config takes "
                                   f"{', '.join(k + '=' for k in defaults)}")
        if not sep:
            raise errors.UserError(f"config argument {key!r}: give a value, {key}=VALUE")
        values[key] = _parse_value(key, text, defaults[key])
    return types.SimpleNamespace(**values)


def _parse_value(key: str, text: str, default):
    if isinstance(default, tuple):
        if text not in default:
            raise errors.UserError(f"{key} {text!r}: use one of "
                                   f"{', '.join(repr(choice) for choice in default)}")
        return text
    if isinstance(default, bool):  # before int: a bool is an int
        if text.lower() not in ("true", "false"):
            raise errors.UserError(f"{key} {text!r}: use true or false")
        return text.lower() == "true"
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            return kind(text)
        except ValueError:
            raise errors.UserError(f"{key} {text!r}: give {'a whole' if kind is int else 'a'} "
                                   f"number, e.g. {key}={default}") from None
    return text


# method=: the paper's ('full'), the baseline ('naive': the target's classifier alone), and
# the retention methods of docs/method.md that are settings of the trainer, alone on the
# naive objective or, after 'full+', on top of the paper's.
METHODS = ("full", "naive", "l2sp", "spd", "ftp", "lp_ft", "lora", "lipsum",
           "full+spd", "full+ftp", "full+lp_ft", "full+lora", "full+lipsum")
LORA_RANK = 8  # alpha = rank: s = 1
# L2-SP's (alpha / 2) ||theta - theta0||^2 on the backbone, alpha = 0.1.
L2SP_WEIGHT = 0.05
# Lipsum-FT's weight: the authors' 1 (the energies are the pretrained model's logits).
LIPSUM_WEIGHT = 1.0


def paper_losses(method: str) -> bool:
    """Whether `method` trains with the paper's distillation and anchoring."""
    return method == "full" or method.startswith("full+")


def set_method(c, method: str, target: str, linear_probe_steps: int,
               lora_lr_mult: float) -> None:
    """The trainer's side of `method` (METHODS) on top of the config file's losses: L2-SP's
    plain ||theta - theta0||^2 on the target (the anchoring loss, reduction 'sum'); SPD or
    FTP around the backbone's AdamW (optim.projection); LP-FT's `linear_probe_steps` of
    heads alone before all weights train (optim.freeze_backbone_steps); LoRA adapters of
    rank LORA_RANK on every attention and MLP Dense layer (model.lora), trained at
    `lora_lr_mult` times the heads' learning rate, the tower frozen; or Lipsum-FT's
    energy gap to the frozen model on the target domain `target`'s images."""
    if method not in METHODS:
        raise errors.UserError(f"method {method!r}: use one of {', '.join(METHODS)}")
    extra = method.rpartition("+")[2] if "+" in method else method
    if extra == "l2sp":
        c.domains[target].losses.anchoring = config_lib.loss("anchoring", weight=L2SP_WEIGHT,
                                                             reduction="sum")
    elif extra in ("spd", "ftp"):
        c.optim.projection = extra
    elif extra == "lp_ft":
        c.optim.freeze_backbone_steps = linear_probe_steps
    elif extra == "lora":
        c.model.lora.update(rank=LORA_RANK, alpha=float(LORA_RANK))
        c.optim.backbone_lr_mult = lora_lr_mult
    elif extra == "lipsum":
        c.domains[target].losses.lipsum = config_lib.loss("lipsum", weight=LIPSUM_WEIGHT)


# Under CKPT (checkpoints=): each family's B/16 (TIPS: B/14) at 224 px and its tokenizer.
CHECKPOINTS = {
    "siglip": "webli_en_b16_224_63724782.npz:img",  # big_vision's SigLIP B/16 224
    "siglip2": "siglip2_b16_224.npz:img",           # big_vision's SigLIP 2 B/16 224
    "clip": "clip-vit-base-patch16",                # a Hugging Face save_pretrained folder
    # TIPS B/14 (the authors' second backbone), Scenic's files: its _text.npz beside it
    "tips": "tips_oss_b14_highres_distilled_vision.npz:img",
}
TOKENIZERS = {"siglip": "c4_en.model", "siglip2": "gemma_tokenizer.model",
              "clip": "clip-vit-base-patch16", "tips": "tokenizer.model"}
FAMILIES = tuple(CHECKPOINTS)  # a config's family= choices, the first the default
# SigLIP 2 (fixed resolution) has SigLIP's towers and eval view: model.family 'siglip'; its
# Gemma tokenizer's convention follows from the text tower's vocabulary (tokenizers.convention).
MODEL_FAMILY = {"siglip2": "siglip"}

# 80% of ImageNet-1k's 1,281,167 train images: the generic domain, less its val hold-out.
IMAGENET_TRAIN_KEPT = 1_024_934


def set_image_tower(c, family: str, checkpoints: str) -> None:
    """model.family, model.checkpoint and eval.tokenizer: the family's files under CKPT."""
    c.model.family = MODEL_FAMILY.get(family, family)
    c.model.checkpoint = os.path.join(checkpoints, CHECKPOINTS[family])
    c.eval.tokenizer = os.path.join(checkpoints, TOKENIZERS[family])


def tfds_dir(data: str) -> str:
    """The TFDS data folder under DATA (imagenet2012, food101)."""
    return os.path.join(data, "tfds")


# The paper's test sets, all by default; tests=NAME+NAME keeps some (configs/README.md).
TESTS = ("target", "imagenet", "flickr30k", "coco", "zero_shot")
ALL_TESTS = "+".join(TESTS)


def add_test_sets(c, tests: str, data: str, target: str) -> None:
    """The paper's test sets named in `tests` ('+'-joined TESTS) into c.eval: `target` the
    target domain c.domains[target]'s test split, `imagenet` ImageNet's official val
    (image->image), `flickr30k` and `coco` Karpathy's test splits (image<->text, with the
    frozen text tower), `zero_shot` ImageNet zero-shot classification."""
    names = tests.split("+")
    if not set(names) <= set(TESTS):
        raise errors.UserError(f"tests {tests!r}: '+'-join names from {TESTS}")
    if "target" in names:
        c.eval.retrieval[target] = config_lib.retrieval_test(c.domains[target].source,
                                                             role="target")
    if "imagenet" in names:
        c.eval.retrieval.imagenet = config_lib.retrieval_test("tfds:imagenet2012",
                                                              role="generic")
    if "flickr30k" in names:
        c.eval.text_retrieval.flickr30k = config_lib.text_test(
            f"captions:{data}/flickr30k/dataset_flickr30k.json:test",
            data_dir=f"{data}/flickr30k/flickr30k-images")
    if "coco" in names:
        c.eval.text_retrieval.coco = config_lib.text_test(
            f"captions:{data}/coco/dataset_coco.json:test", data_dir=f"{data}/coco")
    if "zero_shot" in names:
        c.eval.zero_shot.imagenet = config_lib.zero_shot_test("tfds:imagenet2012",
                                                              split="test")


def config_from_file(path: str, arg: str = None):
    """What the config file at `path` returns for `arg` (its :ARG): how one config file
    builds on another (configs/toy_sweep.py on configs/toy.py), since config files are
    loaded by path, not imported."""
    spec = importlib.util.spec_from_file_location(
        "config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
