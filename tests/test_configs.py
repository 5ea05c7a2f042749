"""The configs/ files: each loads, validates, and follows the paper's recipe (docs/method.md);
the six paper configs agree on it; :ARG is typed; configs/README.md lists every key."""
import glob
import json
import os
import re
import subprocess
import sys

import importlib.util
import shutil

import pytest
import tensorflow_datasets as tfds

from infusing_jax import errors
from infusing_jax.data import sources
from infusing_jax.data import splits as splits_lib
from infusing_jax.training import config as config_lib
from infusing_jax.training import domains
from infusing_jax.training import recipes
from tests.helpers import train_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
PAPER_CONFIGS = [p for p in CONFIGS if not os.path.basename(p).startswith(("toy", "custom"))]
CUSTOM = os.path.join(REPO, "configs", "custom.py")


def _load(path, arg):
    """What config_flags does with --config=PATH:ARG."""
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def test_there_are_the_papers_targets():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert {"sop", "cars196", "inshop", "inat2021", "food2k", "food101"} <= names


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: os.path.basename(p))
@pytest.mark.parametrize("arg", ["", "method=naive", "family=clip,data=/d,checkpoints=/c",
                                 "family=siglip2,checkpoints=/c", "family=tips,checkpoints=/c"])
def test_every_config_validates(path, arg):
    c = _load(path, arg)
    config_lib.validate(c)
    names = config_lib.ordered_domains(c)
    target = c.domains[names[0]]
    assert target.role == "target" and target.losses.normface.scale == 16.0
    assert c.optim.lr == 1e-3 and c.optim.backbone_lr_mult == 1e-2
    assert c.optim.weight_decay == 1e-6 and c.optim.schedule == "constant"
    assert c.data.batch_size == 128 and c.data.mix == "round_robin"
    assert c.train.eval_at_start  # the authors validate the pretrained weights (do_knn_at_start)
    if "naive" in arg:
        assert names == names[:1] and "anchoring" not in target.losses
        assert c.train.select_by == "in-domain"
    else:
        generic = c.domains.imagenet
        assert generic.role == "generic" and generic.holdout_fraction == 0.2
        assert generic.val_seed == 42 and generic.losses.feature_mse.weight == 1000
        assert target.losses.anchoring.weight == generic.losses.anchoring.weight == 1e5
        assert c.train.select_by == "all"
    assert set(c.eval.retrieval.keys()) == {names[0], "imagenet"}
    assert c.eval.retrieval.imagenet.role == "generic" and c.eval.tokenizer
    assert set(c.eval.text_retrieval.keys()) == {"flickr30k", "coco"}
    if "family=clip" in arg:
        assert c.model.family == "clip" and c.model.checkpoint.startswith("/c/")
    if "family=tips" in arg:
        assert c.model.family == "tips" and c.model.image_size % 14 == 0
        assert c.model.checkpoint == "/c/tips_oss_b14_highres_distilled_vision.npz:img"
        assert c.eval.tokenizer == "/c/tokenizer.model"
    if "family=siglip2" in arg:  # SigLIP's towers and view, SigLIP 2's files
        assert c.model.family == "siglip"
        assert c.model.checkpoint == "/c/siglip2_b16_224.npz:img"
        assert c.eval.tokenizer == "/c/gemma_tokenizer.model"


@pytest.mark.parametrize("method", recipes.METHODS)
def test_the_toy_configs_validate(method):
    c = _load(os.path.join(REPO, "configs", "toy.py"), f"method={method},world=/w,steps=8")
    config_lib.validate(c)
    assert c.train.num_steps == 8 and c.model.checkpoint == "/w/vlm/pretrained.npz:img"
    assert set(config_lib.ordered_domains(c)) == (
        {"target", "generic"} if method.startswith("full") else {"target"})
    extra = method.rpartition("+")[2]
    assert c.optim.projection == (extra if extra in ("spd", "ftp") else "none")
    assert c.optim.freeze_backbone_steps == (2 if extra == "lp_ft" else 0)
    assert c.model.lora.rank == (recipes.LORA_RANK if extra == "lora" else 0)
    assert ("lipsum" in c.domains.target.losses) == (extra == "lipsum")
    anchoring = c.domains.target.losses.get("anchoring")
    assert (anchoring is not None) == (method.startswith("full") or extra == "l2sp")
    if extra == "l2sp":
        assert anchoring.reduction == "sum" and anchoring.weight == recipes.L2SP_WEIGHT
    p = _load(os.path.join(REPO, "configs", "toy_pretrain.py"), "world=/w,steps=9")
    assert "pretrain" in p and p.train.num_steps == 9 and p.pretrain.tokenizer == "/w/spm.model"
    assert not c.train.eval_at_start


@pytest.mark.parametrize("method", recipes.METHODS)
def test_the_toy_sweep_searches_every_method_under_one_protocol(method):
    from infusing_jax import sweep
    from infusing_jax.hpo import config as hpo_config
    c, search = sweep.split(_load(os.path.join(REPO, "configs", "toy_sweep.py"),
                                  f"method={method},world=/w"))
    hpo_config.validate(search, c)
    assert c.train.select_by == "all" and c.domains.generic.holdout_fraction == 0.05
    assert c.domains.generic.train == method.startswith("full")
    own = set(search.space.keys()) - {"backbone_lr_mult", "steps", "distill", "anchor"}
    assert len(own) == (0 if method in ("full", "naive") else 1), own
    assert list(search.baseline.domains.keys()) == ["target"]


def _all_but_the_target(c) -> dict:
    """The config as a dict, less what a paper config's target decides: its domain, its test
    set and the run's length (3 epochs over its train images and ImageNet's 80%)."""
    d = c.to_dict()
    target = config_lib.ordered_domains(c)[0]
    del d["domains"][target], d["train"]["num_steps"]
    assert d["optim"].pop("freeze_backbone_steps") in (0, c.train.num_steps // 3)
    d["eval"]["retrieval"].pop(target, None)
    return d


@pytest.mark.parametrize("arg", ["", "method=naive", "method=full+lp_ft", "method=spd",
                                 "method=lipsum", "method=full+lora",
                                 "family=clip,data=/d,checkpoints=/c,tests=target+coco"])
def test_the_paper_configs_agree_on_all_but_their_target(arg):
    """Each paper config spells the recipe out; a change meant for all must reach all six."""
    sop = _load(os.path.join(REPO, "configs", "sop.py"), arg)
    for path in PAPER_CONFIGS:
        c = _load(path, arg)
        assert _all_but_the_target(c) == _all_but_the_target(sop), os.path.basename(path)
        target = c.domains[config_lib.ordered_domains(c)[0]]
        assert target.losses.to_dict() == sop.domains.sop.losses.to_dict()
        assert target.val_split == "val" or target.val_classes_fraction == 0.1


def test_the_paper_length_is_counted_as_the_authors_do():
    """3 epochs of floor(train images / 128) steps: SOP's 48,942 and ImageNet's 80%."""
    sop = os.path.join(REPO, "configs", "sop.py")
    assert _load(sop, "").train.num_steps == 3 * (1_073_876 // 128) == 25_167
    assert _load(sop, "method=naive").train.num_steps == 3 * (48_942 // 128)


def test_the_argument_is_typed():
    toy = os.path.join(REPO, "configs", "toy.py")
    c = _load(toy, "method=naive,world=W,steps=7")
    assert c.train.num_steps == 7 and isinstance(c.train.num_steps, int)
    arg = recipes.parse_arg("on=False,n=3,x=0.5,s=a=b", on=True, n=1, x=1.0, s="", m=("a", "b"))
    assert vars(arg) == dict(on=False, n=3, x=0.5, s="a=b", m="a")
    for bad, words in [("steps=4OO", "steps '4OO': give a whole number"),
                       ("method=bogus", "method 'bogus': use one of 'full', 'naive'"),
                       ("methd=naive", "config argument 'methd': unknown; this config takes "
                                       "method=, world=, steps="),
                       ("steps", "config argument 'steps': give a value")]:
        with pytest.raises(errors.UserError, match=re.escape(words)) as e:
            _load(toy, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(errors.UserError, match="on 'yes': use true or false"):
        recipes.parse_arg("on=yes", on=False)
    with pytest.raises(errors.UserError,
                       match="family 'vit': use one of 'siglip', 'siglip2', 'clip', 'tips'"):
        _load(PAPER_CONFIGS[0], "family=vit")


def test_the_readme_lists_every_key():
    """configs/README.md has each file's :ARG keys (a file's unknown-key error lists them)."""
    readme = open(os.path.join(REPO, "configs", "README.md")).read()
    for path in CONFIGS:
        with pytest.raises(errors.UserError) as e:
            _load(path, "no_such_key=1")
        keys = str(e.value).split("this config takes ")[1].split(", ")
        assert f"`{os.path.basename(path)}`" in readme
        assert all(f"`{key[:-1]}`" in readme for key in keys), (path, keys)


def test_missing_files_give_one_line_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "infusing_jax.main", f"--workdir={tmp_path}",
         f"--config=configs/sop.py:data={tmp_path}/none,checkpoints={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.model.checkpoint: ") and str(tmp_path) in last


def test_tests_argument_keeps_only_the_named_test_sets():
    c = _load(os.path.join(REPO, "configs", "cars196.py"), "data=/d,tests=target+coco")
    config_lib.validate(c)
    assert set(c.eval.retrieval.keys()) == {"cars196"} and not c.eval.zero_shot.keys()
    assert set(c.eval.text_retrieval.keys()) == {"coco"}
    c = _load(os.path.join(REPO, "configs", "cars196.py"), "tests=imagenet")
    assert set(c.eval.retrieval.keys()) == {"imagenet"} and not c.eval.text_retrieval.keys()
    with pytest.raises(ValueError, match=r"tests 'target\+cocoa'"):
        _load(os.path.join(REPO, "configs", "cars196.py"), "tests=target+cocoa")


def test_data_dir_reaches_only_tfds_sources():
    c = _load(os.path.join(REPO, "configs", "sop.py"), "data=/d")
    assert config_lib.data_dir(c, c.domains.imagenet) == "/d/tfds"
    assert config_lib.data_dir(c, c.domains.sop) is None  # uned: its images are beside it
    assert config_lib.data_dir(c, c.eval.text_retrieval.flickr30k) == "/d/flickr30k/flickr30k-images"


def _custom_world(root):
    """A target with train / val / test class folders, one with train / test only, one
    flat, and a folder of unlabelled generic images (with a broken one)."""
    train_world.make_world(str(root))
    shutil.copytree(root / "target", root / "no_val", ignore=shutil.ignore_patterns("val"))
    shutil.copytree(root / "target" / "train", root / "flat")
    shutil.copytree(root / "generic" / "train", root / "photos")
    (root / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _images(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))


def test_custom_recipe_on_your_own_folders(tmp_path):
    root = _custom_world(tmp_path)
    base = f"checkpoint={root}/pretrained.npz:img,batch_size=8,generic=images:{root}/photos"
    c = _load(CUSTOM, f"target=folder:{root}/target,{base},captions={root}/captions.json,"
                      f"tokenizer={root}/spm.model,zero_shot=folder:{root}/generic,"
                      f"generic_test=folder:{root}/generic")
    config_lib.validate(c)
    assert config_lib.ordered_domains(c) == ["target", "generic"]
    assert c.domains.target.val_split == "val" and c.domains.generic.holdout_fraction == 0.2
    assert c.domains.generic.losses.feature_mse.weight == 1000.0
    assert c.domains.target.losses.anchoring.weight == c.domains.generic.losses.anchoring.weight
    # 3 epochs of both domains' train images: the target's 48, the generic's less its hold-out
    generic = sources.load_source(f"images:{root}/photos").split("train")
    kept = splits_lib.holdout(generic, 0.2, 42)[0].num_examples
    assert len(_images(root / "photos")) == generic.num_examples == 33 and 0 < kept < 33
    assert c.train.num_steps == 3 * ((6 * 8 + kept) // 8) and c.train.select_by == "all"
    assert set(c.eval.retrieval.keys()) == {"target", "generic"}
    assert c.eval.retrieval.generic.role == "generic"
    assert c.eval.text_retrieval.captions.source == f"captions:{root}/captions.json"
    assert c.eval.zero_shot.classes.source == f"folder:{root}/generic"

    # No val split: 20% of the train classes are carved (class-disjoint) and not counted.
    c = _load(CUSTOM, f"target=folder:{root}/no_val,{base},method=naive")
    config_lib.validate(c)
    assert c.domains.target.val_classes_fraction == 0.2 and not c.domains.target.val_split
    carved = splits_lib.carve_val(sources.load_source(f"folder:{root}/no_val").split("train"),
                                  0.2, 42)[0].num_examples
    assert carved < 48 and c.train.num_steps == 3 * (carved // 8)
    # naive: the generic hold-out is validated on only; kept by the target's score
    assert not c.domains.generic.train and not c.domains.generic.losses.keys()
    assert c.train.select_by == "in-domain"
    c = _load(CUSTOM, f"target=folder:{root}/flat,{base},target_test=false,steps=5,evals=0")
    assert c.train.num_steps == 5 and c.train.eval_every == 0 and not c.eval.retrieval.keys()


def test_custom_recipe_on_tfds_sets_counts_what_tfds_says():
    """tfds: target and generic domains: no ids or labels up front, so the carved val
    classes and the hold-out are counted as fractions of TFDS's sizes."""
    with tfds.testing.mock_data(num_examples=50):
        c = _load(CUSTOM, "target=tfds:cars196,generic=tfds:imagenette,tfds_dir=/d/tfds,"
                          "checkpoint=/c/m.npz:img,batch_size=10,epochs=2,holdout=0.1")
    config_lib.validate(c)
    assert c.domains.target.val_classes_fraction == 0.2 and c.data.data_dir == "/d/tfds"
    assert c.train.num_steps == 2 * ((round(0.8 * 50) + round(0.9 * 50)) // 10)
    assert c.eval.retrieval.target.source == "tfds:cars196"


def test_custom_recipe_on_uned_files_reads_images_from_target_root(tmp_path):
    """A uned: target (its val.json the val split, test.json against index.json), its
    images under target_root; a generic domain from a text file of paths."""
    root = _custom_world(tmp_path)
    photos = sorted((root / "target").rglob("*.jpg"))
    records = {split: [{"path": str(p.relative_to(root)), "class_id": int(p.parent.name[1])}
                       for p in photos if f"/{split}/" in str(p)]
               for split in ("train", "val", "test")}
    records["index"] = records["test"]
    (root / "info").mkdir()
    for split, rows in records.items():
        (root / "info" / f"{split}.json").write_text(json.dumps(rows))
    (root / "generic.txt").write_text("\n".join(_images(root / "photos")) + "\n")
    c = _load(CUSTOM, f"target=uned:{root}/info,target_root={root},generic=images:"
                      f"{root}/generic.txt,generic_root={root}/photos,batch_size=8,"
                      f"checkpoint={root}/pretrained.npz:img")
    config_lib.validate(c)
    assert c.domains.target.val_split == "val" and c.domains.target.data_dir == str(root)
    assert c.eval.retrieval.target.data_dir == str(root)
    assert c.domains.generic.data_dir == f"{root}/photos"
    splits = {n: domains.load(c, n) for n in ("target", "generic")}
    assert splits["target"].train.num_examples == 48 and splits["target"].val.num_examples == 16
    generic = sources.load_source(f"images:{root}/generic.txt", f"{root}/photos")
    kept = splits_lib.holdout(generic.split("train"), 0.2, 42)[0].num_examples
    assert generic.split("train").num_examples == 33
    assert c.train.num_steps == 3 * ((48 + kept) // 8)


def test_custom_recipe_refuses_bad_arguments_in_one_line(tmp_path):
    root = _custom_world(tmp_path)
    ckpt = f"checkpoint={root}/pretrained.npz:img"
    for arg, words in [
            (ckpt, "config argument target: required, e.g. target=folder:/photos"),
            (f"target=folder:{root}/target", "config argument checkpoint: required"),
            (f"target=folder:{root}/target,{ckpt}", "config argument generic: method=full "
             "distils on generic images; give generic=images:DIR"),
            (f"target=folder:{root}/flat,{ckpt},method=naive", "config argument target_test: "
             f"folder:{root}/flat has no test split"),
            (f"target=folder:{root}/nowhere,{ckpt},method=naive",
             f"config argument target: folder:{root}/nowhere: no such directory"),
            (f"target=folder:{root}/target,{ckpt},generic=images:{root}/none",
             f"config argument generic: images:{root}/none: no such folder or file"),
            (f"target=folder:{root}/target,{ckpt},method=naive,epochs=0.01",
             "config argument epochs: 0.01 epochs of 48 images in batches of 128 is no step"),
            (f"target=folder:{root}/target,{ckpt},method=nice", "method 'nice': use one of"),
            (f"target=folder:{root}/target,{ckpt},batch_size=0", "config argument batch_size: "
             "0 is not >= 1"),
            (f"target=folder:{root}/no_val,{ckpt},val_classes=0", "config argument val_classes: "
             "0.0 is not between 0 and 1"),
            (f"target=folder:{root}/target,{ckpt},holdout=1.5", "config argument holdout: 1.5 "
             "is not between 0 and 1"),
            (f"target=folder:{root}/target,{ckpt},evals=-1", "config argument evals: -1 is not "
             ">= 0"),
            (f"target=folder:{root}/target,{ckpt},generic=captions:{root}/captions.json",
             f"config argument generic: captions:{root}/captions.json has no train split; "
             "it has test")]:
        with pytest.raises(errors.UserError, match=re.escape(words)) as e:
            _load(CUSTOM, arg)
        assert "\n" not in str(e.value)
    # an unlabelled source cannot be the target, nor have classes carved from it
    c = _load(CUSTOM, f"target=images:{root}/photos,{ckpt},method=naive,target_test=false,"
                      "batch_size=8")
    with pytest.raises(errors.UserError, match=re.escape(
            "config.domains.target.val_classes_fraction: images:")):
        domains.load(c, "target")
    c.domains.target.val_classes_fraction, c.domains.target.holdout_fraction = 0.0, 0.2
    with pytest.raises(errors.UserError, match=re.escape(
            "config.domains.target.losses: ['normface'] need class labels")):
        domains.load(c, "target")
    c.eval.retrieval.photos = config_lib.retrieval_test(f"images:{root}/photos")
    with pytest.raises(errors.UserError, match=re.escape("config.eval.retrieval.photos.source")):
        config_lib.validate(c)
