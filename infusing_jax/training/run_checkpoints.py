"""Orbax checkpoints of a run: the train state and the input pipeline, saved together.

    WORKDIR/checkpoints/<step>/state   the TrainState (sharded arrays; async where allowed)
    WORKDIR/checkpoints/<step>/data    each process's tf.data iterator and skip counts
    WORKDIR/best/<step>/params         the parameters that scored best on validation

A restarted run restores the latest step of both, so it goes on with exactly
the batches an uninterrupted run would have seen.
"""
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from infusing_jax import errors
from infusing_jax import paths
from infusing_jax.data import pipeline
from infusing_jax.training import config as config_lib


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves / restores this process's tf.data iterator (tf.train.Checkpoint) and skip counts."""

    def save(self, directory, args: "DataIteratorSave"):
        pipeline.save_iterator(args.iterator, args.counter, os.fspath(directory),
                               jax.process_index())

    def restore(self, directory, args: "DataIteratorRestore"):
        pipeline.restore_iterator(args.iterator, args.counter, os.fspath(directory),
                                  jax.process_index())
        return args.counter

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any
    counter: pipeline.SkipCounter


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any
    counter: pipeline.SkipCounter


def absolute(path: str) -> str:
    """A local path made absolute; a URL (gs://bucket/run) as it is."""
    return path if paths.is_remote(path) else os.path.abspath(path)


def manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """Periodic checkpoints of state + data, the last `keep` kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(absolute(workdir), "checkpoints"),
                                 options=options, item_names=("state", "data"))


def best_manager(workdir: str) -> ocp.CheckpointManager:
    """The best parameters by the validation score (metrics {'score': ...}, higher is better)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           best_fn=lambda m: m["score"], best_mode="max")
    return ocp.CheckpointManager(os.path.join(absolute(workdir), "best"),
                                 options=options, item_names=("params", "metrics"))


def save(mngr: ocp.CheckpointManager, step: int, state, iterator, counter) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataIteratorSave(iterator, counter)))


def restore(mngr: ocp.CheckpointManager, abstract_state, iterator, counter,
            step: Optional[int] = None):
    """-> the state at `step` (default: the latest), into `abstract_state`'s shardings;
    the iterator and counter are restored in place."""
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=DataIteratorRestore(iterator, counter)))
    return restored.state


def save_best(mngr: ocp.CheckpointManager, step: int, params, metrics: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            metrics=ocp.args.JsonSave(metrics)),
              metrics={"score": float(metrics["score"])})


def restore_best(mngr: ocp.CheckpointManager, step: int, abstract_params):
    """The parameters saved by `save_best` at `step`, into `abstract_params`' shardings."""
    return mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params


def restore_item(mngr: ocp.CheckpointManager, step: int, item: str):
    """One item ('state', 'params') of a step as it was saved (arrays on this host), for
    evaluation outside a run; the input pipeline is not touched."""
    return mngr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore()}))[item]


def write_json(path: str, obj) -> None:
    """Process 0 writes `obj` as JSON (atomically: a reader never sees half a file);
    local paths and gs:// alike (tf.io.gfile)."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def kept_backbone(cfg, workdir: str, pretrained):
    """-> (step, image tower as numpy) that the run in `workdir` keeps: best/ (as
    train.select_by kept it), else its last checkpoint (the EMA weights where
    config.uses_ema, as the run tested them). pretrained: the tower, for its structure."""
    best, last = best_manager(workdir), manager(workdir, 1, False)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pretrained)
    if cfg.train.select_by != "last" and best.best_step() is not None:
        step = best.best_step()
        return step, _restored(restore_item(best, step, "params")["backbone"], like)
    step = last.latest_step()
    if step is None:
        raise errors.UserError(f"--workdir {workdir}: no checkpoint (neither best/ nor checkpoints/); "
                         "train first, or pass --checkpoint to evaluate a pretrained model")
    state = restore_item(last, step, "state")
    weights = "ema" if config_lib.uses_ema(cfg) else "params"
    if state.get(weights) is None:
        raise errors.UserError(f"--workdir {workdir}: the run kept no EMA weights; evaluate "
                               "with the run's own config (or --config.train.eval_ema=False)")
    return step, _restored(state[weights]["backbone"], like)


def _restored(params, like):
    out = jax.tree.map(np.asarray, params)
    if jax.tree.structure(out) != jax.tree.structure(like):
        raise errors.UserError("--workdir: the run's checkpoint does not match model.checkpoint's "
                         "image tower; evaluate with the run's own config")
    return out


def read_headlines(workdir: str):
    """{model: headline} of WORKDIR/results.json (the kept weights' and the pretrained
    model's test numbers), or None where the run has not tested."""
    path = os.path.join(workdir, "results.json")
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return {name: m["headline"] for name, m in json.loads(f.read())["models"].items()}
