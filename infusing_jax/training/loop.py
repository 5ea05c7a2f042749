"""Fine-tuning: the training loop around the jitted step (step.build).

    train_and_evaluate(config, workdir)

The step is one `jax.jit` over a 1-D device mesh (sharding.py): the batch split
over devices, parameters replicated or FSDP-sharded. `reference` is the frozen
pretrained backbone: the anchor of the parameter terms and the online teacher.
It is not checkpointed (it is reloaded from model.checkpoint).
"""
import contextlib
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging
from flax.metrics import tensorboard
from jax.experimental import multihost_utils

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import sharding
from infusing_jax.data import mixing
from infusing_jax.data import pipeline
from infusing_jax.data import teacher as teacher_lib
from infusing_jax.data import tf_views
from infusing_jax.losses import retention
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.models import lora
from infusing_jax.training import frozen_text
from infusing_jax.training import config as config_lib
from infusing_jax.training import domains as domains_lib
from infusing_jax.training import feed as feed_lib
from infusing_jax.training import objective
from infusing_jax.training import optim
from infusing_jax.training import run_checkpoints
from infusing_jax.training import step as step_lib
from infusing_jax.training import suite
from infusing_jax.training import validation

DEVICE_FIELDS = ("image", "label", "domain", "teacher", "has_teacher")


class NonFiniteLoss(errors.UserError):
    """The loss or the gradient norm went NaN / inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------- set-up


def _precomputed(cfg, name) -> bool:
    losses = cfg.domains[name].losses
    return any(k in config_lib.DISTILLATION and losses[k].teacher == "precomputed"
               for k in losses.keys())


def teacher_descriptors(cfg, split, name: str, encode, fingerprint: str, workdir: str):
    """The domain's precomputed teacher: its file, or extracted once into WORKDIR/teacher/."""
    given = cfg.domains[name].teacher_descriptors
    where = f"config.domains.{name}.teacher_descriptors"
    path = given or os.path.join(workdir, "teacher", f"{name}.npz")
    if not given:
        if not tf.io.gfile.exists(path) and not tf.io.gfile.exists(teacher_lib.part_path(
                path, jax.process_index(), jax.process_count())):
            family, size = cfg.model.family, cfg.model.image_size
            desc, skipped = teacher_lib.extract(
                encode, split, tf_views.eval_fn(family, size), fingerprint,
                batch_size=cfg.train.eval_batch_size // jax.process_count(),
                process_index=jax.process_index(), process_count=jax.process_count())
            if skipped:
                logging.warning("teacher %s: %d undecodable images skipped: %s%s", name,
                                len(skipped), ", ".join(skipped[:10]),
                                " ..." if len(skipped) > 10 else "")
            teacher_lib.save(teacher_lib.part_path(path, jax.process_index(),
                                                   jax.process_count()), desc)
        _barrier("teacher_" + name)
    try:
        descriptors = teacher_lib.load(path)
    except errors.UserError as e:
        raise errors.UserError(f"{where}: {e}" if given else
                               f"{e}; delete it, and it is extracted again") from None
    ids = split.ids if split.ids is not None else descriptors.ids
    teacher_lib.check(descriptors, ids, fingerprint, where)
    return descriptors


def _barrier(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def schedule_length(cfg, splits) -> tuple:
    """-> (steps_per_epoch, num_steps); an epoch covers every domain's train examples once."""
    sizes = [s.train.num_examples for s in splits.values()]
    if None in sizes:
        if not cfg.train.num_steps:
            unknown = [n for n, s in splits.items() if s.train.num_examples is None]
            raise errors.UserError(f"config.train.num_steps: the sizes of {unknown} are unknown "
                             "(filtered TFDS splits); set train.num_steps")
        return max(1, cfg.train.num_steps), cfg.train.num_steps
    steps_per_epoch = max(1, sum(sizes) // cfg.data.batch_size)
    num_steps = cfg.train.num_steps or int(round(cfg.train.num_epochs * steps_per_epoch))
    return steps_per_epoch, max(1, num_steps)


_ZERO_FISHER = ("config.domains.{}.losses.ewc: the Fisher is zero at the pretrained weights "
                "(an online teacher on the student's own view has no gradient there); use "
                "teacher='precomputed' or add a classifier loss")


def estimate_fisher(cfg, split, loss_domain: str, embed, backbone, heads, view,
                    descriptors, seed: int, texts=None):
    """EWC's diagonal empirical Fisher at the pretrained weights, per example, on
    `fisher_batches` batches of the domain `loss_domain` (its `split`) under its own data
    losses (objective.per_example_loss_fn)."""
    losses = cfg.domains[loss_domain].losses
    data_losses = objective.data_losses(losses)
    if not data_losses:
        raise errors.UserError(f"config.domains.{loss_domain}.losses.ewc: the Fisher needs a data "
                         "loss in the same domain (e.g. feature_mse or a classifier)")
    if all(k in config_lib.DISTILLATION and data_losses[k].teacher == "online"
           for k in data_losses):
        raise errors.UserError(_ZERO_FISHER.format(loss_domain))
    ds = pipeline.train_dataset(
        [pipeline.Domain(loss_domain, split, descriptors=descriptors.get(loss_domain))],
        view, global_batch_size=cfg.data.batch_size, seed=seed + 1,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_shards=cfg.data.num_shards)
    per_example = objective.per_example_loss_fn(losses, heads.get(loss_domain, {}),
                                                cfg.loss_aggregation, embed, reference=backbone,
                                                texts=texts)
    batches = ({k: np.asarray(v) for k, v in b.items() if k in DEVICE_FIELDS}
               for b in ds.take(losses.ewc.fisher_batches))
    fisher = retention.estimate_fisher(per_example, backbone, batches)
    if not any(np.any(np.asarray(x) > 0) for x in jax.tree.leaves(fisher)):
        raise errors.UserError(_ZERO_FISHER.format(loss_domain))
    return fisher


# ---------------------------------------------------------------------------- the loop


class _Log:
    """Averages step metrics over a logging window; domain terms over the steps they ran."""

    def __init__(self, names):
        self.names = names
        self.reset()

    def reset(self):
        self.sums, self.counts, self.images, self.start = {}, {}, 0, time.perf_counter()

    def add(self, metrics: dict, images: int):
        self.images += images
        for k, v in metrics.items():
            if k.endswith("/present"):
                continue
            domain = k.split("/")[0] if "/" in k else None
            if domain is not None and not metrics.get(f"{domain}/present", 1.0):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def scalars(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        out["images_per_s"] = self.images / max(time.perf_counter() - self.start, 1e-9)
        return out


def _host_batch(batch) -> dict:
    return {k: v.numpy() for k, v in batch.items()}


def _next_batch(iterator, splits, view):
    """The next batch; a domain whose images fail to decode is one UserError naming it and
    the first failing image (pipeline.stream_failure); other errors are bugs."""
    try:
        return next(iterator)
    except tf.errors.InvalidArgumentError as e:
        failure = pipeline.stream_failure(e)
        if failure is None:
            raise
        name, reason = failure
        if reason.startswith(pipeline.EMPTY_SHARD):
            raise errors.UserError(_empty_shard(name)) from None
        first = pipeline.first_decode_error(splits[name].train, view.decode)
        detail = f"; the first, {first[0]}: {first[1]}" if first else ""
        raise errors.UserError(f"config.domains.{name}.source: {reason}{detail}") from None


def _empty_shard(name: str) -> str:
    return (f"config.data.num_shards: the train split of domain {name} has fewer examples "
            "than the data shards (data.num_shards, 0: one per process), so a shard is empty; "
            "lower data.num_shards or run fewer processes")


def check_inputs(cfg, splits) -> None:
    """What the run's data settings cannot do with these splits, before any work: a data
    shard with no example is one UserError; a batch larger than a domain's train split
    (its images repeat within a batch) a one-line warning."""
    shards = cfg.data.num_shards or jax.process_count()
    for name, s in splits.items():
        size = s.train.num_examples
        if size is not None and size < shards:
            raise errors.UserError(_empty_shard(name))
        if size is not None and size < cfg.data.batch_size:
            logging.warning("config.data.batch_size: %d is more than the %d train examples of "
                            "domain %s; its batches repeat examples", cfg.data.batch_size,
                            size, name)


def kept_in_memory(cfg, domains, view, num_steps: int):
    """The domains, with `in_memory` set by pipeline.memory_plan for the whole run
    (num_steps, whether resumed or not, so a resumed run's input pipeline is the same);
    each domain's choice logged."""
    reads = num_steps * cfg.data.batch_size * mixing.weights(domains, cfg.data.mix)
    domains, lines = pipeline.memory_plan(
        domains, reads, image_bytes=int(np.prod(view.decoded_shape)),
        budget_bytes=cfg.data.keep_decoded_mb * 2**20, process_count=jax.process_count())
    for line in lines:
        logging.info("input pipeline: %s", line)
    return domains


def train_and_evaluate(cfg, workdir: str, on_validation: Optional[Callable] = None) -> dict:
    """Train (or resume) the run in `workdir`; -> the run summary (also train_summary.json):
    step, num_steps, steps_per_epoch, skipped, best_step, domains, stopped_early, and `val`,
    the validation metrics of the weights the run keeps (train.select_by; on process 0).

    on_validation(step, val) -> bool, called on every process after each validation: True
    stops the run there (a sweep's pruner), without the final test.
    """
    config_lib.validate(cfg)
    run_checkpoints.check_workdir(workdir)
    tf.io.gfile.makedirs(workdir)
    config_json = json.loads(cfg.to_json_best_effort())
    previous = run_checkpoints.read_json(os.path.join(workdir, "config.json"))
    names = config_lib.trained_domains(cfg)
    mesh = sharding.make_mesh()
    if cfg.data.batch_size % mesh.size:
        raise errors.UserError(f"config.data.batch_size: {cfg.data.batch_size} is not divisible by "
                         f"the {mesh.size} devices")

    if cfg.train.eval_batch_size % mesh.size:
        raise errors.UserError(f"config.train.eval_batch_size: {cfg.train.eval_batch_size} is "
                               f"not divisible by the {mesh.size} devices")
    model, backbone, model_cfg = backbone_lib.load_image_tower(cfg.model)
    lora_cfg = cfg.model.lora
    embed = backbone_lib.embed_fn(model, lora.scale(lora_cfg) if lora_cfg.rank else 1.0)
    validated = config_lib.ordered_domains(cfg)  # the trained ones and the val-only ones
    splits = {n: domains_lib.load(cfg, n) for n in validated}
    view = tf_views.train_fn(cfg.model.family, cfg.model.image_size, cfg.data.resize or None)
    inputs = [pipeline.Domain(n, splits[n].train, cfg.domains[n].weight) for n in names]
    pipeline.check_views(inputs, view)
    check_inputs(cfg, {n: splits[n] for n in names})
    mixing.weights(inputs, cfg.data.mix)  # a mix that cannot work fails before any work
    validator = validation.Validator(cfg, validated, splits, embed, mesh, pretrained=backbone)
    if suite.has_tests(cfg):
        suite.check(cfg)
    fingerprint = teacher_lib.fingerprint(checkpoints.to_flat({"img": backbone}), model_cfg)
    encode = jax.jit(lambda images: embed(backbone, images))
    descriptors = {n: teacher_descriptors(cfg, splits[n].train, n, encode, fingerprint, workdir)
                   for n in names if _precomputed(cfg, n)}

    steps_per_epoch, num_steps = schedule_length(cfg, {n: splits[n] for n in names})
    try:  # a warm-up that leaves nothing of the run to decay over
        optim.schedule_steps(cfg.optim, num_steps)
    except errors.UserError as e:
        raise errors.UserError(f"config.{e}") from None
    num_classes = {n: splits[n].train.num_classes for n in names}
    dim = jax.eval_shape(embed, backbone, np.zeros((1, cfg.model.image_size,
                                                    cfg.model.image_size, 3))).shape[-1]
    heads = jax.device_get(objective.init_heads(cfg.domains, names, num_classes, dim,
                                                jax.random.PRNGKey(cfg.seed)))
    for name, classifier in frozen_text.zero_shot_heads(cfg, names, num_classes).items():
        heads[name]["classifier"] = classifier
    adapters = None
    if lora_cfg.rank:
        adapters = jax.device_get(lora.init(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1),
                                            backbone, lora_cfg))
    banks = frozen_text.lipsum_banks(cfg, names)
    ewc_domains = [n for n in names if "ewc" in cfg.domains[n].losses]
    built = step_lib.build(cfg, names, embed, backbone, heads, depth=model_cfg.image.depth,
                           steps_per_epoch=steps_per_epoch, num_steps=num_steps, mesh=mesh,
                           ewc=bool(ewc_domains), adapters=adapters, text_banks=banks)
    reference = built.place_reference(backbone)

    ds = pipeline.train_dataset(
        kept_in_memory(cfg, [pipeline.Domain(n, splits[n].train, cfg.domains[n].weight,
                                             descriptors.get(n)) for n in names],
                       view, num_steps),
        view, global_batch_size=cfg.data.batch_size, seed=cfg.seed, mix=cfg.data.mix,
        one_domain_per_batch=cfg.data.one_domain_per_batch,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle_buffer=cfg.data.shuffle_buffer, num_shards=cfg.data.num_shards)
    iterator = iter(ds)
    counter = pipeline.SkipCounter(
        names, shards=(cfg.data.num_shards or jax.process_count()) // jax.process_count())
    mngr = run_checkpoints.manager(workdir, cfg.train.keep_checkpoints,
                                   cfg.train.async_checkpoints)
    best = run_checkpoints.best_manager(workdir)

    if mngr.latest_step() is not None:
        try:
            state = run_checkpoints.restore(mngr, built.abstract_state, iterator, counter)
        except run_checkpoints.Mismatch as e:
            raise errors.UserError(_resume_mismatch(workdir, previous, config_json, e)) from None
        except run_checkpoints.Unreadable as e:
            raise errors.UserError(f"--workdir={workdir}: {e}; delete {e.path} to resume from "
                                   "an earlier step, or give a new --workdir") from None
        _forget_logs_after(workdir, int(state.step))
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    else:
        fisher = None
        if ewc_domains:
            generic = [n for n in names if cfg.domains[n].role == "generic"]
            name = (generic or ewc_domains)[0]
            fisher = estimate_fisher(cfg, splits[name].train, name, embed, backbone, heads,
                                     view, descriptors, cfg.seed, banks.get(name))
        state = built.init(backbone, heads, fisher=fisher, adapters=adapters)

    run_checkpoints.write_json(os.path.join(workdir, "config.json"), config_json)
    is_main = jax.process_index() == 0
    writer = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
    log, step = _Log(names), int(state.step)

    def validate(state, step: int) -> dict:
        """Validation of the evaluated weights at `step`; the best kept by train.select_by."""
        params = evaluated_params(cfg, state)
        val = validator.run(params["backbone"])
        _write_scalars(writer, workdir, step, {f"val/{k}": v for k, v in val.items()})
        if cfg.train.select_by != "last" and "score" in val:
            with _writing(best):
                run_checkpoints.save_best(best, step, params, val)
        return bool(on_validation and on_validation(step, val))

    stopped = validator.active and cfg.train.eval_at_start and step == 0 and validate(state, 0)
    bar = tqdm.tqdm(total=num_steps, initial=step, desc="train", unit="step", file=sys.stderr,
                    disable=not (cfg.train.progress and is_main), dynamic_ncols=True)
    feed = feed_lib.Feed(
        lambda: _host_batch(_next_batch(iterator, splits, view)),
        lambda host: sharding.global_batch({k: v for k, v in host.items()
                                            if k in DEVICE_FIELDS}, mesh),
        counter, depth=cfg.data.device_prefetch)
    unchecked = []  # (step, metrics on the devices) since the last check

    def check_finite():
        """Fetch the unchecked steps' metrics (one host sync) into the log; a non-finite
        loss stops the run, before any checkpoint of its weights is written."""
        for at, metrics in zip([s for s, _ in unchecked],
                               jax.device_get([m for _, m in unchecked])):
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                with _writing(mngr):
                    mngr.wait_until_finished()
                raise NonFiniteLoss(_non_finite(cfg, metrics, at, mngr.latest_step(), workdir))
            log.add(metrics, cfg.data.batch_size)
        unchecked.clear()

    save_at = None  # the step a preempted run saves at: once the batches read are trained
    while step < num_steps and not stopped:
        every = cfg.train.checkpoint_every
        next_save = min(num_steps, (step // every + 1) * every, save_at or num_steps)
        batch = feed.next(ahead=next_save - step - 1)
        state, metrics = built.step(state, batch, reference)
        step += 1
        unchecked.append((step, metrics))
        bar.update(1)
        if save_at is None and mngr.reached_preemption(step):
            save_at = step + feed.held
        preempted = step == save_at
        log_now = step % cfg.train.log_every == 0 or step == num_steps
        save_now = step % every == 0 or step == num_steps or preempted
        eval_now = validator.active and (
            (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == num_steps)
        if log_now or save_now or eval_now:
            check_finite()
        if log_now:
            scalars = log.scalars()
            scalars.update({f"lr/{k}": float(s(step - 1))
                            for k, s in built.learning_rates.items()})
            scalars.update({f"skipped/{k}": v for k, v in counter.skipped().items()})
            _write_scalars(writer, workdir, step, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
            log.reset()
        if save_now:
            with _writing(mngr):
                run_checkpoints.save(mngr, step, state, iterator, counter)
        if preempted:
            with _writing(mngr):
                mngr.wait_until_finished()
            logging.warning("preempted: saved step %d; run the same command to resume", step)
            break
        if eval_now:
            stopped = validate(state, step)
    bar.close()
    with _writing(mngr):
        mngr.wait_until_finished()
    with _writing(best):
        best.wait_until_finished()
    if step >= num_steps and not stopped and suite.has_tests(cfg):
        test(cfg, workdir, embed, backbone, state, best, writer)
    kept = best.best_step() if cfg.train.select_by != "last" else None
    summary = dict(step=step, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
                   skipped=counter.skipped(), best_step=best.best_step(), domains=names,
                   stopped_early=bool(stopped), val=_validation(workdir, kept))
    run_checkpoints.write_json(os.path.join(workdir, "train_summary.json"), summary)
    skipped = {k: v for k, v in counter.skipped().items() if v}
    if skipped:
        logging.warning("undecodable images skipped (per domain): %s", skipped)
    if writer is not None:
        writer.flush()
    return summary


def evaluated_params(cfg, state):
    """The weights a run validates, keeps, tests and exports: the EMA's where
    config_lib.uses_ema, else the raw ones ({'backbone', 'heads'}), LoRA merged in."""
    params = state.ema if config_lib.uses_ema(cfg) else state.params
    return lora.merged_params(params, cfg.model.lora)


def selected_backbone(cfg, state, best):
    """-> (step, image tower params on this host): the best checkpoint's where one was
    kept (train.select_by), else the state's (its EMA with config_lib.uses_ema)."""
    step = best.best_step()
    if cfg.train.select_by == "last" or step is None:
        return int(state.step), multihost_utils.process_allgather(
            evaluated_params(cfg, state)["backbone"], tiled=True)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                            jax.eval_shape(lambda: evaluated_params(cfg, state)))
    return step, jax.device_get(run_checkpoints.restore_best(best, step, abstract)["backbone"])


def test(cfg, workdir: str, embed, pretrained, state, best, writer) -> None:
    """The selected checkpoint and the pretrained model on eval's test sets ->
    WORKDIR/results.json (and TensorBoard 'test/<model>/<number>'), by process 0."""
    step, finetuned = selected_backbone(cfg, state, best)
    if jax.process_index() == 0:
        models = suite.evaluate_models(cfg, embed, {"pretrained": pretrained,
                                                    "fine-tuned": finetuned})
        curve = [dict(alpha=a, **models[m]["headline"])
                 for a, m in ((0.0, "pretrained"), (1.0, "fine-tuned"))]
        run_checkpoints.write_json(os.path.join(workdir, "results.json"), dict(
            step=step, selected_by=cfg.train.select_by, models=models, wise_ft=curve,
            weights="ema" if config_lib.uses_ema(cfg) else "raw"))
        _write_scalars(writer, workdir, int(state.step), {
            f"test/{name}/{k}": v for name, r in models.items()
            for k, v in r["headline"].items() if v is not None})
    _barrier("test")


@contextlib.contextmanager
def _writing(mngr):
    """A checkpoint write (or a wait for the asynchronous ones) into mngr's folder; one line
    where the disk refuses it."""
    try:
        yield
    except OSError as e:
        raise errors.UserError(f"{mngr.directory}: cannot write a checkpoint there "
                               f"({e.strerror or e}); check its disk space and permissions, "
                               "then run the same command to resume") from None


def _non_finite(cfg, metrics: dict, step: int, last: Optional[int], workdir: str) -> str:
    """The one line of a non-finite loss: the loss term that went non-finite (its weight),
    else config.optim.lr; where the last good checkpoint is."""
    field, term = "config.optim.lr", ""
    for key, value in metrics.items():
        domain, _, kind = key.partition("/")
        if kind and kind != "present" and metrics.get(f"{domain}/present", 1.0):
            weight = cfg.domains[domain].losses[kind].weight
            if not (np.isfinite(value) and np.isfinite(weight * value)):
                field, term = f"config.domains.{domain}.losses.{kind}.weight", f", {key} {value}"
                break
    saved = (f"the last good checkpoint is step {last} in {os.path.join(workdir, 'checkpoints')}"
             if last is not None else "there is no checkpoint yet")
    return (f"{field}: non-finite loss {metrics['loss']} (grad norm {metrics['grad_norm']}"
            f"{term}) at step {step}; stopped, {saved}; lower "
            f"{'this weight or ' if term else ''}config.optim.lr, or check the data")


def _resume_mismatch(workdir: str, previous, current, error) -> str:
    """The one line for a workdir whose checkpoint does not fit this run."""
    where = f"--workdir={workdir}"
    changes = "none" if previous is None else config_lib.describe_changes(previous, current)
    if changes == "none":
        return (f"{where}: its checkpoints/ do not fit this run ({error}); resume with the "
                "run's own config and number of processes, or give a new --workdir")
    return (f"{where}: its checkpoints/ were written with another config (changed: "
            f"{changes}); resume with the run's own config (WORKDIR/config.json), or give a "
            "new --workdir")


def _validation(workdir: str, step: Optional[int]):
    """{metric: value} of the validation at `step` (None: the last one) in metrics.jsonl, or
    None where there is none (or on processes other than 0, which write no logs)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not tf.io.gfile.exists(path):
        return None
    found = None
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            record = json.loads(line)
            val = {k[len("val/"):]: v for k, v in record.items() if k.startswith("val/")}
            if val and (step is None or record["step"] == step):
                found = val
    return found


def _forget_logs_after(workdir: str, step: int):
    """Drop metrics.jsonl lines past `step` (written after the checkpoint a run resumes from)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        lines = [line for line in f if json.loads(line)["step"] <= step]
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(lines))


def _write_scalars(writer, workdir: str, step: int, scalars: dict):
    """TensorBoard and WORKDIR/metrics.jsonl (one JSON object per line), process 0 only."""
    if writer is None:
        return
    for k, v in scalars.items():
        writer.scalar(k, v, step)
    writer.flush()
    with tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=step, **{k: float(v) for k, v in scalars.items()})) + "\n")
