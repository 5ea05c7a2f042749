"""The configs/ files: each loads, validates, and follows the paper's recipe (docs/method.md)."""
import glob
import os
import subprocess
import sys

import importlib.util

import pytest

from infusing_jax.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
PAPER_CONFIGS = [p for p in CONFIGS if not os.path.basename(p).startswith("toy")]


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
@pytest.mark.parametrize("arg", ["", "method=naive", "family=clip,data=/d,checkpoints=/c"])
def test_every_config_validates(path, arg):
    c = _load(path, arg)
    config_lib.validate(c)
    names = config_lib.ordered_domains(c)
    target = c.domains[names[0]]
    assert target.role == "target" and target.losses.normface.scale == 16.0
    assert c.optim.lr == 1e-3 and c.optim.backbone_lr_mult == 1e-2
    assert c.optim.weight_decay == 1e-6 and c.optim.schedule == "constant"
    assert c.data.batch_size == 128 and c.data.mix == "round_robin"
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


@pytest.mark.parametrize("method", ["full", "naive"])
def test_the_toy_configs_validate(method):
    c = _load(os.path.join(REPO, "configs", "toy.py"), f"method={method},world=/w,steps=7")
    config_lib.validate(c)
    assert c.train.num_steps == 7 and c.model.checkpoint == "/w/vlm/pretrained.npz:img"
    assert set(config_lib.ordered_domains(c)) == ({"target", "generic"} if method == "full"
                                                  else {"target"})
    p = _load(os.path.join(REPO, "configs", "toy_pretrain.py"), "world=/w,steps=9")
    assert "pretrain" in p and p.train.num_steps == 9 and p.pretrain.tokenizer == "/w/spm.model"


def test_a_bad_argument_and_missing_files_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="config argument 'methd=naive'"):
        _load(CONFIGS[0], "methd=naive")
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
