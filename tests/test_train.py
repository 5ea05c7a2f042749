"""The trainer: config validation, the objective's invariants, end-to-end runs on a tiny world."""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infusing_jax.training import config as config_lib
from infusing_jax import errors
from infusing_jax.data import pipeline
from infusing_jax.training import feed as feed_lib
from infusing_jax.training import objective
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import step as step_lib
from infusing_jax.training import loop
from tests.helpers import REPO
from tests.helpers import tiny
from tests.helpers import train_world


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c, "domains", config_lib.ml_collections.ConfigDict()),
     "config.domains: no domain configured"),
    (lambda c: setattr(c.domains.target.losses, "focal", config_lib.loss("normface")),
     "config.domains.target.losses.focal: unknown loss kind"),
    (lambda c: setattr(c.domains.generic.losses.feature_mse, "teacher", "offline"),
     "config.domains.generic.losses.feature_mse.teacher: must be one of"),
    (lambda c: setattr(c.domains.target, "role", "main"), "config.domains.target.role"),
    (lambda c: setattr(c.train, "select_by", "best"), "config.train.select_by"),
    (lambda c: setattr(c.optim, "lr", -1.0), "config.optim.lr: must be a number > 0"),
    (lambda c: setattr(c.domains.target, "source", "/data/sop"), "config.domains.target.source"),
])
def test_validate_names_the_bad_field(edit, message):
    c = train_world.world_config("/nowhere")
    config_lib.validate(c)
    with c.unlocked():
        edit(c)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config_lib.validate(c)


def test_every_data_term_on_a_mixed_batch_equals_the_term_on_its_domain_alone():
    c, names, embed, backbone, heads, batch = _tiny_setup("full", "precomputed")
    with c.unlocked():
        c.data.one_domain_per_batch = False  # metric losses on mixed batches: allowed now
        for kind in ("supcon", "multi_similarity", "triplet", "proxy_anchor", "cosface",
                     "arcface"):
            c.domains.target.losses[kind] = config_lib.loss(kind)
        c.domains.generic.losses.relational = config_lib.loss("relational")
        c.domains.generic.losses.feature_cosine = config_lib.loss("feature_cosine")
    config_lib.validate(c)
    heads = objective.init_heads(c.domains, names, {"target": 8, "generic": 4}, 32,
                                 jax.random.PRNGKey(0))
    batch = dict(batch, label=np.array([1, 1, 2, 3, 0, 2]), domain=np.array([0, 1, 0, 0, 1, 0]))
    params = jax.tree.map(lambda p: p * 1.01, backbone)
    f = embed(params, batch["image"])
    for i, name in enumerate(names):
        mask = batch["domain"] == i
        alone = {k: v[mask] for k, v in batch.items()}
        terms = objective.domain_terms(c.domains[name].losses, heads.get(name, {}), f, batch,
                                       jnp.asarray(mask), backbone, embed)
        own = objective.domain_terms(c.domains[name].losses, heads.get(name, {}), f[mask],
                                     alone, jnp.ones(mask.sum(), bool), backbone, embed)
        assert terms.keys() == own.keys() and len(terms) >= 2
        for kind in terms:
            np.testing.assert_allclose(float(terms[kind]), float(own[kind]), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}/{kind}")


def test_each_classifier_loss_keeps_its_own_trainable_scale():
    c, names, embed, backbone, heads, batch = _tiny_setup("full", "precomputed")
    with c.unlocked():
        c.domains.target.losses.normface = config_lib.loss("normface", scale=16.0,
                                                           trainable_scale=True)
        c.domains.target.losses.arcface = config_lib.loss("arcface", scale=30.0, margin=0.2,
                                                          trainable_scale=True)
        c.domains.target.losses.cosface = config_lib.loss("cosface", scale=8.0)
    heads = objective.init_heads(c.domains, names, {"target": 8, "generic": 4}, 32,
                                 jax.random.PRNGKey(0))
    scales = {k: float(np.exp(v)) for k, v in heads["target"]["log_scale"].items()}
    assert scales == pytest.approx({"normface": 16.0, "arcface": 30.0})
    from infusing_jax.losses import classification
    f = embed(backbone, batch["image"])
    labels = jnp.asarray(batch["label"])
    terms = objective.domain_terms(c.domains.target.losses, heads["target"], f, batch,
                                   jnp.ones(6, bool), backbone, embed)
    w = heads["target"]["classifier"]
    for kind, scale, margin in (("normface", 16.0, 0.0), ("arcface", 30.0, 0.2),
                                ("cosface", 8.0, 0.1)):
        expected = classification.cosine_classifier_loss(f, w, labels, kind, scale, margin)
        np.testing.assert_allclose(float(terms[kind]), float(expected), rtol=1e-5)
    # Each scale gets the gradient of its own loss only.
    grads = jax.grad(lambda h: objective.domain_terms(
        c.domains.target.losses, h, f, batch, jnp.ones(6, bool), backbone, embed)["arcface"])(
        heads["target"])
    assert float(grads["log_scale"]["normface"]) == 0.0 != float(grads["log_scale"]["arcface"])


def test_missing_data_and_checkpoint_name_the_field(world, tmp_path):
    c = train_world.world_config(world)
    c.domains.target.source = f"folder:{tmp_path}/none"
    with pytest.raises(ValueError, match=r"config\.domains\.target\.source: folder:.*no such"):
        loop.train_and_evaluate(c, str(tmp_path / "a"))
    c = train_world.world_config(world)
    c.model.checkpoint = str(tmp_path / "none.npz")
    with pytest.raises(ValueError, match=r"config\.model\.checkpoint: .*none\.npz"):
        loop.train_and_evaluate(c, str(tmp_path / "b"))


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_load_image_tower_abstract_gives_the_materialised_shapes(tmp_path, from_checkpoint):
    c = config_lib.default_config()
    c.model.variant = "mu/16"
    if from_checkpoint:
        model_cfg = tiny.tiny_config("siglip", text=False)
        c.model.checkpoint = str(tmp_path / "tiny.npz")
        from infusing_jax import checkpoints
        checkpoints.save(tiny.random_params(model_cfg), model_cfg, c.model.checkpoint)
    _, real, real_cfg = backbone_lib.load_image_tower(c.model)
    _, abstract, abstract_cfg = backbone_lib.load_image_tower(c.model, abstract=True)
    assert abstract_cfg.to_dict() == real_cfg.to_dict()
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), real)


# ---------------------------------------------------------------------------- objective


def _tiny_setup(method="full", teacher="online", aggregation="weighted_sum"):
    c = train_world.world_config("/nowhere", method, teacher)
    c.loss_aggregation = aggregation
    names = config_lib.ordered_domains(c)
    model_cfg = tiny.tiny_config("siglip", text=False)
    from infusing_jax import models
    model = models.build(model_cfg)
    backbone = tiny.random_params(model_cfg)["img"]
    embed = backbone_lib.embed_fn(model)
    heads = objective.init_heads(c.domains, names, {"target": 8, "generic": 4}, 32,
                                 jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = dict(image=tiny.random_images(6), label=rng.integers(0, 4, 6),
                 domain=np.array([0, 0, 0, 1, 1, 1]),
                 teacher=rng.normal(size=(6, 32)).astype(np.float32),
                 has_teacher=np.ones(6, bool))
    return c, names, embed, backbone, heads, batch


def test_online_distillation_and_anchoring_are_zero_at_the_pretrained_weights():
    c, names, embed, backbone, heads, batch = _tiny_setup()
    loss_fn = objective.make_loss_fn(c.domains, names, c.loss_aggregation, embed)
    params = {"backbone": backbone, "heads": heads}
    _, terms = loss_fn(params, backbone, None, batch)
    assert float(terms["generic/feature_mse"]) < 1e-12  # two compiled forwards: rounding only
    assert float(terms["generic/anchoring"]) == 0.0 == float(terms["target/anchoring"])
    moved = jax.tree.map(lambda p: p + 0.01, backbone)
    _, terms = loss_fn({"backbone": moved, "heads": heads}, backbone, None, batch)
    assert float(terms["generic/feature_mse"]) > 1e-6
    # The authors' anchoring: the sum over tensors of the mean squared change.
    n_tensors = len(jax.tree.leaves(backbone))
    np.testing.assert_allclose(float(terms["target/anchoring"]), n_tensors * 1e-4, rtol=1e-4)


@pytest.mark.parametrize("aggregation", ["weighted_sum", "weighted_average"])
def test_domains_count_by_their_share_of_the_batch(aggregation):
    c, names, embed, backbone, heads, batch = _tiny_setup("full", "precomputed", aggregation)
    loss_fn = objective.make_loss_fn(c.domains, names, c.loss_aggregation, embed)
    params = {"backbone": jax.tree.map(lambda p: p * 1.01, backbone), "heads": heads}
    loss, t = loss_fn(params, backbone, None, batch)
    w = {name: {k: c.domains[name].losses[k].weight for k in c.domains[name].losses.keys()}
         for name in names}

    def agg(name):
        total = sum(w[name][k] * float(t[f"{name}/{k}"]) for k in w[name])
        return total / sum(w[name].values()) if aggregation == "weighted_average" else total

    np.testing.assert_allclose(float(loss), 0.5 * agg("target") + 0.5 * agg("generic"), rtol=1e-5)
    # One domain per batch: the other domain's terms are not computed (zero), its share is 0.
    only_target = dict(batch, domain=np.zeros(6, int))
    loss, t = loss_fn(params, backbone, None, only_target)
    assert float(t["generic/present"]) == 0 and float(t["generic/feature_mse"]) == 0
    np.testing.assert_allclose(float(loss), agg("target"), rtol=1e-5)  # agg reads the new t
    # The classifier term on the whole batch is the mean cross-entropy of every example.
    from infusing_jax.losses import classification
    f = embed(params["backbone"], batch["image"])
    expected = classification.cosine_classifier_loss(
        f, heads["target"]["classifier"], batch["label"], "normface", 16.0)
    np.testing.assert_allclose(float(t["target/normface"]), float(expected), rtol=1e-5)


# ---------------------------------------------------------------------------- runs


def test_a_run_learns_the_target_and_reports_skipped_images(world, tmp_path):
    c = train_world.world_config(world, "naive")
    c.train.num_steps = 40
    c.train.log_every = 10
    c.train.eval_every = 0
    summary = loop.train_and_evaluate(c, str(tmp_path))
    metrics = train_world.read_metrics(str(tmp_path))
    losses = [m["target/normface"] for m in metrics if "target/normface" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    # 2 broken files in 48 target examples, over 40 * 8 / 46 ~ 7 passes: each pass counts them.
    assert summary["skipped"]["target"] >= 2 * 5 and summary["skipped"].get("generic", 0) == 0
    logged = [m["skipped/target"] for m in metrics if "skipped/target" in m]
    assert logged[-1] == summary["skipped"]["target"]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 40
    assert os.listdir(tmp_path / "tensorboard")
    assert summary["best_step"] == 40


def test_an_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(world, tmp_path,
                                                                            monkeypatch):
    real_step = step_lib.train_step

    def nan_from_step_7(state, batch, reference, **kw):
        new, metrics = real_step(state, batch, reference, **kw)
        bad = state.step >= 6
        metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
        params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
        return new.replace(params=params), metrics

    monkeypatch.setattr(step_lib, "train_step", nan_from_step_7)
    c = train_world.world_config(world)
    with pytest.raises(loop.NonFiniteLoss, match="at step 7; .*last good checkpoint is step 4"):
        loop.train_and_evaluate(c, str(tmp_path))
    monkeypatch.setattr(step_lib, "train_step", real_step)
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "4" / "state")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_the_feed_reads_ahead_only_as_far_as_it_is_let_and_counts_what_steps_take():
    read = []

    def next_host():
        read.append(len(read))
        return dict(domain=np.zeros(2, np.int64), position=np.full(2, read[-1]))

    counter = pipeline.SkipCounter(["target"])
    feed = feed_lib.Feed(next_host, lambda host: host["position"][0], counter, depth=2)
    taken = [feed.next(ahead=a) for a in (5, 5, 1, 0, 3)]
    assert taken == [0, 1, 2, 3, 4] and feed.held == 2 and len(read) == 7
    assert counter.seen == [10] and counter.last == [4]  # the 5 batches taken, not the 7 read
    held = []
    feed = feed_lib.Feed(next_host, lambda host: host["position"][0], counter, depth=2)
    for a in (5, 1, 0):
        feed.next(ahead=a)
        held.append(feed.held)
    assert held == [2, 1, 0]


def test_a_preempted_run_trains_the_batches_it_read_saves_and_resumes_bit_identical(
        world, tmp_path, monkeypatch):
    """Preempted at step 5 with 2 batches on the devices: it trains them, saves step 7, and
    the resumed run ends as an uninterrupted one, each step logged once."""
    import orbax.checkpoint as ocp
    c = train_world.world_config(world)
    c.train.update(num_steps=12, checkpoint_every=10, eval_every=0, log_every=1)
    c.data.device_prefetch = 2
    straight = loop.train_and_evaluate(c, str(tmp_path / "straight"))
    asked = []
    monkeypatch.setattr(ocp.CheckpointManager, "reached_preemption",
                        lambda self, step: asked.append(step) or step == 5)
    summary = loop.train_and_evaluate(c, str(tmp_path / "preempted"))
    assert summary["step"] == 7 and asked[:5] == [1, 2, 3, 4, 5] and 6 not in asked
    assert sorted(os.listdir(tmp_path / "preempted" / "checkpoints")) == ["7"]
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(c, str(tmp_path / "preempted"))
    assert resumed["skipped"] == straight["skipped"] and straight["skipped"]["target"] > 0
    step_a, a = _final_params(str(tmp_path / "straight"))
    step_b, b = _final_params(str(tmp_path / "preempted"))
    assert step_a == step_b == 12
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    logged = [[(m["step"], m["loss"]) for m in train_world.read_metrics(str(tmp_path / d))
               if "loss" in m] for d in ("straight", "preempted")]
    assert logged[0] == logged[1] and [s for s, _ in logged[0]] == list(range(1, 13))


def _main(workdir, root, *overrides, devices=1, **popen):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "infusing_jax.main", f"--config={train_world.CONFIG_FILE}:{root}",
           f"--workdir={workdir}", "--config.train.progress=False", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _run(*args, **kw):
    proc = _main(*args, **kw)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _final_params(workdir):
    import orbax.checkpoint as ocp
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    state = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(steps[-1]), "state"))
    return steps[-1], {k: np.asarray(v) for k, v in
                       jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def test_the_same_global_batch_gives_the_same_losses_on_1_and_8_devices(world, tmp_path):
    common = ("--config.train.num_steps=6", "--config.train.log_every=1",
              "--config.train.eval_every=0")
    _run(str(tmp_path / "one"), world, *common)
    _run(str(tmp_path / "eight"), world, *common, "--config.train.fsdp=True", devices=8)
    train_world.assert_same_losses(str(tmp_path / "one"), str(tmp_path / "eight"), 6)


def test_kill_9_and_resume_ends_bit_identical_to_an_uninterrupted_run(world, tmp_path):
    common = ("--config.train.num_steps=40", "--config.train.checkpoint_every=5",
              "--config.train.eval_every=0", "--config.train.log_every=5")
    _run(str(tmp_path / "straight"), world, *common)
    killed = str(tmp_path / "killed")
    proc = _main(killed, world, *common)
    first = os.path.join(killed, "checkpoints", "10")
    while proc.poll() is None and not os.path.isdir(first):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "train_summary.json")), "finished before kill"
    _run(killed, world, *common)
    step_a, a = _final_params(str(tmp_path / "straight"))
    step_b, b = _final_params(killed)
    assert step_a == step_b == 40 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    # The log of the resumed run reads as one run: each step once, the same losses.
    logged = [[(m["step"], m.get("loss")) for m in train_world.read_metrics(d)]
              for d in (str(tmp_path / "straight"), killed)]
    assert logged[0] == logged[1]


def test_ewc_ema_bfloat16_and_remat_run_together(world, tmp_path):
    c = train_world.world_config(world)
    c.domains.generic.losses.ewc = config_lib.loss("ewc", weight=1.0, fisher_batches=2)
    c.optim.ema_decay = 0.9
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "nothing_saveable"
    c.train.num_steps = 4
    c.train.eval_every = 0
    loop.train_and_evaluate(c, str(tmp_path))
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "4" / "state")
    fisher = jax.tree.leaves(state["fisher"])
    assert fisher and all(np.all(f >= 0) for f in fisher) and any(np.any(f > 0) for f in fisher)
    params, ema = jax.tree.leaves(state["params"]), jax.tree.leaves(state["ema"])
    assert all(p.dtype == np.float32 for p in params)  # float32 master weights
    assert any(not np.array_equal(p, e) for p, e in zip(params, ema))
    logged = [m for m in train_world.read_metrics(str(tmp_path)) if "generic/ewc" in m]
    assert logged and all(np.isfinite(m["loss"]) for m in logged)


def test_ewc_refuses_a_zero_fisher(world, tmp_path):
    c = train_world.world_config(world, "full", "online")
    c.domains.generic.losses.ewc = config_lib.loss("ewc", fisher_batches=1)
    c.domains.generic.losses.__delattr__("anchoring")
    with pytest.raises(ValueError, match="losses.ewc: the Fisher is zero"):
        loop.train_and_evaluate(c, str(tmp_path))


def test_workdir_files_work_on_non_local_filesystems():
    """gs:// workdirs: everything but Orbax goes through tf.io.gfile; TF's ram:// stands in."""
    import tensorflow as tf
    from infusing_jax.training import run_checkpoints
    from infusing_jax.data import teacher
    root = "ram://workdir_test"
    run_checkpoints.write_json(f"{root}/config.json", {"a": 1})
    with tf.io.gfile.GFile(f"{root}/config.json") as f:
        assert json.loads(f.read()) == {"a": 1}
    d = teacher.Descriptors(np.array(["x", "y"]), np.eye(2, dtype=np.float32), "m")
    teacher.save(f"{root}/teacher/t.npz", d)  # (ram://'s exists() matches prefixes: no parts)
    back = teacher.load(f"{root}/teacher/t.npz")
    assert back.ids.tolist() == ["x", "y"] and back.model == "m"
    np.testing.assert_array_equal(back.embeddings, d.embeddings)
    assert run_checkpoints.absolute("gs://bucket/run") == "gs://bucket/run"



def test_resuming_with_another_config_is_one_line_naming_what_changed(world, tmp_path):
    c = train_world.world_config(world)
    c.train.num_steps, c.train.eval_every = 2, 0
    loop.train_and_evaluate(c, str(tmp_path))
    other = train_world.world_config(world, "naive")
    other.train.num_steps = 4
    with pytest.raises(errors.UserError, match=r"were written with another config \(changed: "
                       r"config\.domains\.generic \(gone\), config\.domains\.target\.losses\."
                       r"anchoring \(gone\)"):
        loop.train_and_evaluate(other, str(tmp_path))
    with open(tmp_path / "config.json") as f:  # the run's own config is kept
        assert "generic" in json.load(f)["domains"]
