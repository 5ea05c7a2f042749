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
from tests.helpers.assertions import one_line_error

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
    (tmp_path / "config.json").write_text('{"train": {"num_steps": 4}}')
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
        ((f"--config={tmp_path}/config.json", work), ["config.json: not a Python config file; "
                                                      "give a configs/*.py"]),
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
    moved_run = tmp_path / "moved_run"  # a run whose pretrained checkpoint is elsewhere
    (moved_run / "checkpoints").mkdir(parents=True)
    (moved_run / "config.json").write_text('{"model": {"checkpoint": "gone/pretrained.npz"}}')
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
        (("convert", ckpt, f"{tmp_path}/out", "--to=tflite"), ["--to"]),
        (("convert", f"{tmp_path}/model.onnx", f"{tmp_path}/out.npz"),
         ["model.onnx: an ONNX file is an export"]),
        (("convert", str(moved_run), f"{tmp_path}/out.onnx"),
         ["model.checkpoint in its config.json", "not found from here"]),
        (("retrieval", f"--queries={tmp_path}/junk.npz", f"--output={tmp_path}/m.json"),
         ["junk.npz", "not a readable .npz"]),
        (("compare", str(tmp_path / "empty"), f"--output={tmp_path}/report"), ["no results"]),
        (("toy.world", f"--root={tmp_path}/tw", "--target_classes=1,2"), ["--target_classes"]),
    ]
    for (module, *args), words in cases:
        _assert_one_line(_command(module, *args), *words)


# ------------------------------------------------------------------ issue 14, item 7: the audit


def test_config_file_failures_are_one_line_naming_the_file(tmp_path):
    from infusing_jax import cli
    parser = cli._ConfigFileParser("config")  # pylint: disable=protected-access
    cases = {
        "raises.py": ("def get_config():\n    raise RuntimeError('boom')\n",
                      "RuntimeError: boom (line 2)"),
        "imports.py": ("import nothere_module_xyz\n", "ModuleNotFoundError: No module named"),
        "empty.py": ("x = 1\n", "defines no get_config()"),
        "keyerror.py": ("def get_config():\n    return {}['missing']\n", "KeyError: 'missing'"),
        "none.py": ("def get_config():\n    return None\n",
                    "get_config() must return a ml_collections.ConfigDict, got NoneType"),
        "dict.py": ("def get_config():\n    return {'model': 1}\n",
                    "get_config() must return a ml_collections.ConfigDict, got dict"),
        "syntax.py": ("def get_config(:\n", "line 1: "),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        message = one_line_error(lambda: parser.parse(str(tmp_path / name)), words)
        assert message.startswith(f"--config={tmp_path / name}: "), message
    one_line_error(lambda: parser.parse(str(tmp_path / "nope.py")),
                   "nope.py: cannot load the config file")
    one_line_error(lambda: parser.parse("configs/toy.py:steps=abc"),
                   "--config=configs/toy.py:steps=abc: steps 'abc': give a whole number")
    assert parser.parse(f"{train_world.CONFIG_FILE}:/nowhere").model.image_size == 32


def test_workdir_entries_a_run_would_trip_over_are_refused_up_front(tmp_path):
    from infusing_jax.training import run_checkpoints

    def workdir(name, make):
        path = tmp_path / name
        path.mkdir()
        make(path)
        return str(path)

    cases = [
        (lambda w: (w / "checkpoints").write_text("x"), "checkpoints: a file, where runs keep"),
        (lambda w: (w / "best").write_text("x"), "best: a file"),
        (lambda w: (w / "tensorboard").write_text("x"), "tensorboard: a file"),
        (lambda w: (w / "teacher").write_text("x"), "teacher: a file"),
        (lambda w: (w / "metrics.jsonl").mkdir(), "metrics.jsonl: a folder"),
        (lambda w: (w / "results.json").mkdir(), "results.json: a folder"),
        (lambda w: (w / "config.json").write_text("{not json"), "config.json: not JSON"),
        (lambda w: (w / "metrics.jsonl").write_text('{"step": 1}\n{"ste'),
         "metrics.jsonl: line 2 is not JSON"),
        (lambda w: os.symlink(tmp_path / "nothing", w / "best"), "best: a broken symbolic link"),
    ]
    for i, (make, words) in enumerate(cases):
        one_line_error(lambda: run_checkpoints.check_workdir(workdir(f"w{i}", make)), words)
    run_checkpoints.check_workdir(str(tmp_path / "new"))  # none of it there: fine


def test_a_checkpoint_folder_that_cannot_be_made_fails_at_once_not_after_a_hang(tmp_path):
    import time
    import numpy as np
    import orbax.checkpoint as ocp
    from infusing_jax.training import run_checkpoints
    (tmp_path / "best").write_text("x")  # what check_workdir refuses, past it
    mngr = run_checkpoints.best_manager(str(tmp_path))
    start = time.time()
    with pytest.raises(OSError):
        mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"a": np.zeros(2)}),
                                             metrics=ocp.args.JsonSave({"score": 1.0})),
                  metrics={"score": 1.0})
        mngr.wait_until_finished()
    assert time.time() - start < 60


def test_unreadable_checkpoint_files_are_one_line_naming_the_file(tmp_path):
    import numpy as np
    from infusing_jax import checkpoints
    from infusing_jax import paths
    from infusing_jax.data import teacher
    from tests.helpers import tiny
    random = np.random.default_rng(0).bytes(500)
    for name in ("junk.safetensors", "junk.npz", "junk.bin"):
        (tmp_path / name).write_bytes(random)
        message = one_line_error(lambda: checkpoints.load(str(tmp_path / name)), name,
                                 "not a readable")
        assert "allow_pickle" not in message, message
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    one_line_error(lambda: checkpoints.load(str(tmp_path / "hf")), "hf/config.json: not a "
                   "readable JSON file")
    cfg = tiny.tiny_config("siglip")
    checkpoints.save(tiny.random_params(cfg), cfg, str(tmp_path / "m.npz"))
    with pytest.raises(checkpoints.ArgumentError, match="whose activation is") as e:
        checkpoints.load(str(tmp_path / "m.npz"), act="gelu")
    assert e.value.argument == "act"
    with pytest.raises(checkpoints.ArgumentError, match="4 is smaller than the patch "
                       "size 8") as e:
        checkpoints.load(str(tmp_path / "m.npz"), image_size=4)
    assert e.value.argument == "image_size"
    teacher.save(str(tmp_path / "t.npz"), teacher.Descriptors(
        np.array(["a"]), np.ones((1, 2), np.float32), "m"))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[:len(data) // 2])
    one_line_error(lambda: teacher.load(str(tmp_path / "t.npz")), "t.npz: not a readable .npz")
    one_line_error(lambda: paths.read_npz(str(tmp_path / "junk.npz")), "not a zip file")


def test_folders_and_outputs_that_cannot_be_written_name_the_flag(tmp_path):
    from infusing_jax import cli
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    one_line_error(lambda: cli.check_folder("--workdir", str(tmp_path / "dangling")),
                   "--workdir=", "is a broken symbolic link")
    one_line_error(lambda: cli.check_folder("--workdir", str(tmp_path / "dangling" / "run")),
                   "dangling is a broken symbolic link")
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: cli.check_output_file("DST", str(tmp_path / "file"), folder=True),
                   "DST=", "is a file; give a folder name")
    one_line_error(lambda: cli.check_output_file("DST", str(tmp_path / "file" / "out.npz")),
                   "is a file, not a folder")
    cli.check_output_file("DST", str(tmp_path / "new" / "hf"), folder=True)


def test_a_non_finite_loss_names_the_term_or_the_learning_rate():
    from infusing_jax.training import loop
    c = train_world.world_config("/nowhere")
    ok = {"target/normface": 1.0, "target/present": 1.0, "generic/feature_mse": 2.0,
          "generic/present": 0.0, "loss": float("nan"), "grad_norm": float("nan")}
    message = loop._non_finite(c, ok, 3, None, "/w")  # pylint: disable=protected-access
    assert message.startswith("config.optim.lr: non-finite loss nan") and "\n" not in message
    assert "there is no checkpoint yet" in message and "None" not in message
    bad = dict(ok, **{"target/normface": float("inf")})
    message = loop._non_finite(c, bad, 7, 4, "/w")  # pylint: disable=protected-access
    assert message.startswith("config.domains.target.losses.normface.weight: "), message
    assert "at step 7; stopped, the last good checkpoint is step 4 in /w/checkpoints" in message


def test_an_error_after_a_progress_bar_starts_its_own_line():
    code = ("import sys, tqdm\nfrom infusing_jax import cli\n"
            "bar = tqdm.tqdm(total=10, file=sys.stderr)\nbar.update(3)\ncli.fail('x: y')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "error: x: y" in run.stderr.splitlines(), run.stderr


def test_test_sets_are_checked_before_any_work(world, tmp_path):
    from infusing_jax.training import suite
    (tmp_path / "junk.npz").write_bytes(b"junk")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(world, "generic"), broken)
    for root, _, files in os.walk(broken / "test"):
        for name in files:
            (broken / "test" / os.path.relpath(os.path.join(root, name), broken / "test")
             ).write_bytes(b"not an image")
    cases = [
        (lambda e: e.retrieval.target.update(source=f"folder:{tmp_path}/none"),
         "config.eval.retrieval.target.source: folder:"),
        (lambda e: e.retrieval.generic.update(source=f"folder:{broken}"),
         "config.eval.retrieval.generic.source: none of the"),
        (lambda e: e.zero_shot.colours.update(class_names=f"{tmp_path}/none.txt"),
         "config.eval.zero_shot.colours.class_names: "),
        (lambda e: e.zero_shot.colours.update(class_names=f"{tmp_path}/three.txt"),
         "config.eval.zero_shot.colours.class_names: 3 names, but"),
        (lambda e: e.update(tokenizer=f"{tmp_path}/none.model"),
         "config.eval.tokenizer: "),
        (lambda e: e.update(tokenizer=str(tmp_path / "three.txt")), "config.eval.tokenizer: "),
        (lambda e: e.text_retrieval.captions.update(text_embeddings=f"{tmp_path}/junk.npz"),
         "config.eval.text_retrieval.captions.text_embeddings: "),
        (lambda e: e.text_retrieval.captions.update(source=f"captions:{tmp_path}/three.txt"),
         "config.eval.text_retrieval.captions.source: "),
    ]
    for edit, words in cases:
        c = train_world.world_config(world, tests="yes")
        edit(c.eval)
        assert one_line_error(lambda: suite.check(c), words).startswith(words)
    suite.check(train_world.world_config(world, tests="yes"))


def _val_world(world, tmp_path, broken=False, singles=False):
    """A copy of the world's target domain whose val images are all broken, or one per class."""
    root = tmp_path / "target"
    shutil.copytree(os.path.join(world, "target"), root)
    for cls in os.listdir(root / "val"):
        for i, name in enumerate(sorted(os.listdir(root / "val" / cls))):
            if broken:
                (root / "val" / cls / name).write_bytes(b"not an image")
            elif singles and i:
                os.remove(root / "val" / cls / name)
    return root


def _validator(c):
    from infusing_jax import sharding
    from infusing_jax.training import domains as domains_lib
    from infusing_jax.training import validation
    names = config_lib.ordered_domains(c)
    splits = {n: domains_lib.load(c, n) for n in names}
    return validation.Validator(c, names, splits, lambda p, x: x, sharding.make_mesh())


def test_val_splits_that_cannot_score_are_refused_before_training(world, tmp_path, caplog):
    c = train_world.world_config(world, "naive")
    c.domains.target.source = f"folder:{_val_world(world, tmp_path / 'a', broken=True)}"
    one_line_error(lambda: _validator(c), "config.domains.target.val_split: none of the 16 "
                   "val images tried can be decoded; the first, val/")
    c.domains.target.source = f"folder:{_val_world(world, tmp_path / 'b', singles=True)}"
    one_line_error(lambda: _validator(c), "config.domains.target.val_split: each class of its "
                   "2 val images has one image", "train.select_by")
    c = train_world.world_config(world)  # select_by 'all': the generic val still scores
    c.domains.target.source = f"folder:{_val_world(world, tmp_path / 'c', singles=True)}"
    c.train.eval_k = 100
    with caplog.at_level("WARNING"):
        _validator(c)
    assert "each class of its 2 val images has one image" in caplog.text
    assert "config.train.eval_k: 100 is not less than" in caplog.text


def test_data_settings_the_splits_cannot_take(world, caplog):
    from infusing_jax.training import domains as domains_lib
    from infusing_jax.training import loop
    c = train_world.world_config(world)
    splits = {n: domains_lib.load(c, n) for n in config_lib.ordered_domains(c)}
    c.data.batch_size, c.data.num_shards = 200, 40  # target: 48 train images, generic ~24
    one_line_error(lambda: loop.check_inputs(c, splits), "config.data.num_shards: the train "
                   "split of domain generic has fewer examples than the data shards")
    c.data.num_shards = 0
    with caplog.at_level("WARNING"):
        loop.check_inputs(c, splits)
    assert "config.data.batch_size: 200 is more than the" in caplog.text


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A run of 4 steps on the world: checkpoints/ at steps 2 and 4, best/, no test sets."""
    from infusing_jax.training import loop
    workdir = str(tmp_path_factory.mktemp("trained"))
    c = train_world.world_config(world)
    c.train.update(num_steps=4, checkpoint_every=2, eval_every=2, log_every=2)
    loop.train_and_evaluate(c, workdir)
    return workdir


def _corrupt(trained, tmp_path, edit):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    edit(workdir)
    return workdir


def _truncate_state(workdir):
    for root, _, files in os.walk(workdir / "checkpoints" / "4" / "state"):
        for name in files:
            if "/d" in root or name.endswith(".ocdbt"):
                os.truncate(os.path.join(root, name), 10)


def test_resuming_a_broken_or_other_checkpoint_is_one_line(world, trained, tmp_path):
    from infusing_jax.training import loop
    c = train_world.world_config(world)
    c.train.update(num_steps=4, checkpoint_every=2, eval_every=2, log_every=2)
    other = train_world.world_config(world)
    other.train.update(num_steps=4, checkpoint_every=2, eval_every=2, log_every=2)
    other.data.batch_size = 16
    work = _corrupt(trained, tmp_path / "batch", lambda w: None)
    one_line_error(lambda: loop.train_and_evaluate(other, str(work)), "were written with "
                   "another config (changed: config.data.batch_size)")
    for name, edit in [
            ("manifest", lambda w: os.remove(w / "checkpoints" / "4" / "state" / "manifest.ocdbt")),
            ("metadata", lambda w: os.remove(w / "checkpoints" / "4" / "state" / "_METADATA")),
            ("data", lambda w: (w / "checkpoints" / "4" / "data" / "data_process_0.skips.json"
                                ).write_text("junk"))]:
        work = _corrupt(trained, tmp_path / name, edit)
        one_line_error(lambda: loop.train_and_evaluate(c, str(work)),
                       "checkpoint step 4 is unreadable (",
                       f"delete {work}/checkpoints/4 to resume from an earlier step")


def test_commands_on_a_broken_run_are_one_line(world, trained, tmp_path):
    config = f"--config={train_world.CONFIG_FILE}:{world}"
    truncated = _corrupt(trained, tmp_path / "state", _truncate_state)
    best = _corrupt(trained, tmp_path / "best", lambda w: [
        os.truncate(os.path.join(root, name), 10)
        for root, _, files in os.walk(w / "best") for name in files if "/d" in root])
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text('{"models": ')
    no_tests = f"--config={train_world.CONFIG_FILE}:{world},full,precomputed,"
    cases = [
        (("main", config, f"--workdir={truncated}", "--config.train.num_steps=4",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
          "--config.train.log_every=2"), ["checkpoint step 4 is unreadable"]),
        (("evaluate", f"--config={train_world.CONFIG_FILE}:{world},full,precomputed,yes",
          f"--workdir={best}"), ["--workdir=", "is unreadable", "delete"]),
        (("evaluate", no_tests, f"--workdir={_corrupt(trained, tmp_path / 'ok', print)}"),
         ["config.eval: no test set configured"]),
        (("compare", str(results), f"--output={tmp_path}/report"), ["results.json: cannot read"]),
    ]
    for (module, *args), words in cases:
        _assert_one_line(_command(module, *args), *words)


def test_main_refuses_what_it_would_find_only_later_in_one_line(world, tmp_path):
    config = f"--config={train_world.CONFIG_FILE}:{world}"
    tests = f"--config={train_world.CONFIG_FILE}:{world},full,precomputed,yes"
    (tmp_path / "w1").mkdir()
    (tmp_path / "w1" / "checkpoints").write_text("x")
    broken_val = _val_world(world, tmp_path, broken=True)
    (tmp_path / "cfg.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    cases = [
        ((config, f"--workdir={tmp_path}/w1"), ["checkpoints: a file"]),
        ((tests, f"--workdir={tmp_path}/w2", f"--config.eval.tokenizer={tmp_path}/none.model"),
         ["config.eval.tokenizer: "]),
        ((config, f"--workdir={tmp_path}/w3", f"--config.domains.target.source=folder:{broken_val}"),
         ["config.domains.target.val_split: none of the 16 val images"]),
        ((config, f"--workdir={tmp_path}/w4", "--config.model.act=gelu"),
         ["config.model.act: ", "whose activation is"]),
        ((config, f"--workdir={tmp_path}/w5", f"--config.domains.generic.teacher_descriptors="
          f"{tmp_path}/none.npz"), ["config.domains.generic.teacher_descriptors: "]),
        ((f"--config={tmp_path}/cfg.py", f"--workdir={tmp_path}/w6"),
         ["--config=", "RuntimeError: boom (line 2)"]),
        ((config, f"--workdir={tmp_path}/w7", "--distributed"),
         ["--distributed: coordinator_address", "--coordinator_address"]),
        ((config, f"--workdir={tmp_path}/w8", "--distributed", "--coordinator_address=127.0.0.1:"
          f"{_free_port()}", "--num_processes=2", "--process_id=0", "--distributed_timeout=3"),
         ["--num_processes=2: not every process joined", "within 3 s"]),
    ]
    for args, words in cases:
        _assert_one_line(_command("main", *args), *words)
    for i in range(2, 9):
        assert not os.path.exists(f"{tmp_path}/w{i}/checkpoints")  # refused before any work


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_convert_and_embed_refuse_bad_input_in_one_line(world, tmp_path):
    ckpt = os.path.join(world, "pretrained.npz")
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 50)
    (tmp_path / "images").mkdir()
    (tmp_path / "texts.txt").write_text("a red image\n")
    cases = [
        (("convert", ckpt, f"{tmp_path}/file/out.npz"), ["DST", "is a file"]),
        (("convert", ckpt, f"{tmp_path}/o.npz", "--image_size=33"),
         ["--image_size=33: not a multiple of", "patch size 8"]),
        (("convert", ckpt, f"{tmp_path}/o.npz", "--image_size=0"), ["--image_size=0: must be"]),
        (("convert", ckpt, f"{tmp_path}/o.npz", "--image_size=-8"), ["--image_size=-8: must be"]),
        (("convert", f"{tmp_path}/junk.safetensors", f"{tmp_path}/o.npz"),
         ["junk.safetensors: not a readable .safetensors file"]),
        (("embed", f"--checkpoint={ckpt}", f"--images={tmp_path}/images",
          f"--output={tmp_path}/e.npz", f"--texts={tmp_path}/texts.txt",
          f"--tokenizer={tmp_path}/none.model"), ["--tokenizer: ", "none.model"]),
        (("embed", f"--checkpoint={ckpt}", f"--images={tmp_path}/images",
          f"--output={tmp_path}/e.npz", "--act=gelu"), ["--act: ", "whose activation is"]),
        (("embed", f"--checkpoint={ckpt}", f"--images={tmp_path}/images",
          f"--output={tmp_path}/e.npz", "--image_size=33"),
         ["--image_size=33: not a multiple of", "patch size 8"]),
        (("embed", f"--checkpoint={ckpt}", f"--images={tmp_path}/images",
          f"--output={tmp_path}/e.npz", "--image_size=0"), ["--image_size=0: must be"]),
    ]
    for (module, *args), words in cases:
        _assert_one_line(_command(module, *args), *words)
    assert not os.path.exists(tmp_path / "o.npz")
