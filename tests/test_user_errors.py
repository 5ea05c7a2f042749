"""Bad input gets one line, never a traceback or a hang: every config field's rule, and
mistakes a new user makes through `python -m infusing_jax.main` and the other commands."""
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

from infusing_jax.training import config as config_lib
from infusing_jax import errors
from infusing_jax import fields
from infusing_jax.training import optim
from tests.helpers import REPO
from tests.helpers import train_world

CANDIDATES = (-7, "bogus", 1.5, None, float("nan"), 3, ("x",), True, "")


def _bad_value(rule: fields.Rule):
    """A value the rule refuses (every rule refuses one of CANDIDATES)."""
    return next(v for v in CANDIDATES if not rule.ok(v))


def _untyped(c):
    """The config as a ConfigDict that takes values of any type (a user's file can)."""
    return ml_collections.ConfigDict(c.to_dict(), type_safe=False)


def _field_cases():
    groups = dict(model=config_lib.MODEL, data=config_lib.DATA, train=config_lib.TRAIN,
                  eval=config_lib.EVAL, optim=optim.RULES,
                  **{"domains.target": config_lib.DOMAIN})
    for group, rules in groups.items():
        for name, rule in rules.items():
            if rule.want != "anything":
                yield group, name, _bad_value(rule)
    for name in ("weight", "scale", "trainable_scale"):
        yield "domains.target.losses.normface", name, _bad_value(config_lib.LOSS_SETTINGS[name])
    for name in ("weight", "teacher"):
        yield "domains.generic.losses.feature_mse", name, _bad_value(
            config_lib.LOSS_SETTINGS[name])
    for name in ("weight", "reduction", "exclude"):
        yield "domains.generic.losses.anchoring", name, _bad_value(
            config_lib.LOSS_SETTINGS[name])


@pytest.mark.parametrize("group,name,value", list(_field_cases()))
def test_every_field_has_a_rule_that_names_it(group, name, value):
    c = _untyped(train_world.world_config("/nowhere"))
    config_lib.validate(c)
    node = c
    for part in group.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(errors.UserError) as e:
        config_lib.validate(c)
    assert str(e.value).startswith(f"config.{group}.{name}: "), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("loss,settings,field", [
    ("arcface", dict(margin=2.0), "margin"),
    ("arcface", dict(fallback="wrap"), "fallback"),
    ("supcon", dict(temperature=0.0), "temperature"),
    ("multi_similarity", dict(epsilon=-0.1), "epsilon"),
    ("multi_similarity", dict(beta=-1.0), "beta"),
    ("triplet", dict(margin=-0.5), "margin"),
    ("proxy_anchor", dict(alpha=0.0), "alpha"),
    ("logit_kl", dict(student_temperature=0.0), "student_temperature"),
    ("ewc", dict(fisher_batches=0), "fisher_batches"),
])
def test_loss_settings_have_ranges(loss, settings, field):
    c = train_world.world_config("/nowhere")
    c.domains.target.losses[loss] = config_lib.loss(loss, **settings)
    with pytest.raises(errors.UserError, match=rf"^config\.domains\.target\.losses\.{loss}\."
                                               rf"{field}: must be "):
        config_lib.validate(c)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.domains.target.update(val_classes_fraction=0.2),
     "config.domains.target: val_split and val_classes_fraction each choose"),
    (lambda c: c.train.update(select_by="out-of-domain") or c.domains.generic.update(
        holdout_fraction=0.0), "config.train.select_by: 'out-of-domain' keeps the best"),
    (lambda c: c.domains.target.losses.update(
        logit_kl=config_lib.loss("logit_kl")) or c.domains.target.losses.update(
        cosface=config_lib.loss("cosface")),
     "config.domains.target.losses.logit_kl: logit_kl distils the logits of the domain's "
     "classifier; give the domain exactly one classifier loss"),
    (lambda c: c.data.update(resize=8), "config.data.resize: 8 is smaller than the random crop"),
    (lambda c: c.model.update(checkpoint="", variant="mu/16", image_size=40),
     "config.model.image_size: 40 is not a multiple of the patch size 16"),
    (lambda c: c.model.update(checkpoint="", variant="Q/16"), "config.model.variant: must be"),
    (lambda c: c.eval.update(validate_text=True), "config.eval.validate_text: no eval"),
    (lambda c: c.optim.update(schedule="warmup_cosine", warmup_steps=5, total_steps=5),
     "config.optim.total_steps: must be > warmup_steps"),
])
def test_settings_that_cannot_work_together_are_refused(edit, message):
    c = train_world.world_config("/nowhere")
    edit(c)
    with pytest.raises(errors.UserError, match="^" + message.replace(".", r"\.")
                       .replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(c)


# ------------------------------------------------------------------ through the commands


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return train_world.make_world(str(tmp_path_factory.mktemp("world")))


def _command(module, *args, cwd=REPO):
    run = subprocess.run([sys.executable, "-m", f"infusing_jax.{module}", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    return run.returncode, lines, run.stderr


def _assert_one_line(result, *words):
    rc, lines, stderr = result
    assert rc == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_main_refuses_bad_input_in_one_line(world, tmp_path):
    config = f"--config={train_world.CONFIG_FILE}:{world}"
    work = f"--workdir={tmp_path}/run"
    (tmp_path / "a_file").write_text("x")
    truncated = tmp_path / "truncated.npz"
    data = open(os.path.join(world, "pretrained.npz"), "rb").read()
    truncated.write_bytes(data[:len(data) // 2])
    broken = tmp_path / "broken_target"
    shutil.copytree(os.path.join(world, "target"), broken)
    for root, _, files in os.walk(broken / "train"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"not an image")
    cases = [
        ((f"--config={train_world.CONFIG_FILE}", work), [f"--config={train_world.CONFIG_FILE}"]),
        (("--config=configs/nope.py", work), ["cannot load the config file", "nope.py"]),
        (("--config=configs/toy.py:method=bogus", work), ["method 'bogus'"]),
        ((config, f"--workdir={tmp_path}/a_file"), ["--workdir=", "is a file"]),
        ((config, f"--workdir={tmp_path}/a_file/run"), ["--workdir=", "cannot create"]),
        ((config, work, "--config.nothing=1"), ["--config.nothing=1", "no field 'nothing'"]),
        ((config, work, "--config.train.num_steps=abc"), ["--config.train.num_steps=abc"]),
        ((config, work, "--config.model.dtype=float16"), ["config.model.dtype: must be one"]),
        ((config, work, f"--config.model.checkpoint={truncated}:img"),
         ["config.model.checkpoint:", "truncated.npz"]),
        ((config, work, f"--config.domains.target.source=folder:{tmp_path}/none"),
         ["config.domains.target.source:", "no such directory"]),
        ((config, work, f"--config.domains.target.source=folder:{broken}"),
         ["config.domains.target.source: none of the 48 train images tried"]),
        ((config, work, "--config.model.image_size=20", "--config.data.resize=0"),
         ["config.model.image_size: 20 is not a multiple", "patch size 8"]),
    ]
    for args, words in cases:
        _assert_one_line(_command("main", *args), *words)
    assert not os.path.exists(f"{tmp_path}/run/checkpoints")  # refused before any work


def test_other_commands_refuse_bad_input_in_one_line(world, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.npz").write_bytes(b"junk")
    ckpt = os.path.join(world, "pretrained.npz")
    config = f"--config={train_world.CONFIG_FILE}:{world}"
    cases = [
        (("evaluate", config, f"--workdir={tmp_path}/untrained"), ["no checkpoint"]),
        (("evaluate", config, f"--workdir={tmp_path}/w", "--wise_ft=0.5,abc"), ["--wise_ft"]),
        (("embed", f"--checkpoint={ckpt}", f"--images={tmp_path}/empty",
          f"--output={tmp_path}/e.npz"), ["--images", "no image in"]),
        (("embed", f"--checkpoint={tmp_path}/junk.npz", f"--images={tmp_path}/empty",
          f"--output={tmp_path}/e.npz"), ["junk.npz"]),
        (("convert", f"{tmp_path}/nothing.npz", f"{tmp_path}/out.npz"), ["nothing.npz"]),
        (("convert", ckpt, f"{tmp_path}/out", "--to=onnx"), ["--to"]),
        (("retrieval", f"--queries={tmp_path}/junk.npz", f"--output={tmp_path}/m.json"),
         ["junk.npz", "not a readable .npz"]),
        (("compare", str(tmp_path / "empty"), f"--output={tmp_path}/report"), ["no results"]),
        (("toy.world", f"--root={tmp_path}/tw", "--target_classes=1,2"), ["--target_classes"]),
    ]
    for (module, *args), words in cases:
        _assert_one_line(_command(module, *args), *words)
