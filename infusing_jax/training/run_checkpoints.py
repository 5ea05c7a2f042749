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
import sys
import uuid
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from etils import epath

from infusing_jax import errors
from infusing_jax.models import lora
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


# Step folders are made before save() returns, so that a folder that cannot be made fails
# there (orbax's asynchronous making of them hangs on a failure until its 20-minute timeout).
_ASYNC = ocp.AsyncOptions(create_directories_asynchronously=False)


def manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """Periodic checkpoints of state + data, the last `keep` kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           async_options=_ASYNC)
    return ocp.CheckpointManager(os.path.join(absolute(workdir), "checkpoints"),
                                 options=options, item_names=("state", "data"))


def best_manager(workdir: str) -> ocp.CheckpointManager:
    """The best parameters by the validation score (metrics {'score': ...}, higher is better)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           best_fn=lambda m: m["score"], best_mode="max",
                                           async_options=_ASYNC)
    return ocp.CheckpointManager(os.path.join(absolute(workdir), "best"),
                                 options=options, item_names=("params", "metrics"))


# What a run keeps in its workdir, and whether each is a folder.
WORKDIR_ENTRIES = {"checkpoints": True, "best": True, "tensorboard": True, "teacher": True,
                   "config.json": False, "metrics.jsonl": False, "train_summary.json": False,
                   "results.json": False}


def check_workdir(workdir: str) -> None:
    """Before a run or an evaluation touches `workdir`: one UserError for an entry it would
    trip over (a file where it keeps a folder or the reverse, a broken link, a config.json
    or metrics.jsonl that is not JSON)."""
    for name, folder in WORKDIR_ENTRIES.items():
        path = os.path.join(workdir, name)
        if not paths.is_remote(path) and os.path.islink(path) and not os.path.exists(path):
            raise errors.UserError(f"{path}: a broken symbolic link; remove it, or give a new "
                                   "--workdir")
        if tf.io.gfile.exists(path) and tf.io.gfile.isdir(path) != folder:
            kind, other = ("folder", "file") if folder else ("file", "folder")
            raise errors.UserError(f"{path}: a {other}, where runs keep their {name} {kind}; "
                                   "move it away, or give a new --workdir")
    read_json(os.path.join(workdir, "config.json"))
    path = os.path.join(workdir, "metrics.jsonl")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    json.loads(line)
                except ValueError:
                    raise errors.UserError(f"{path}: line {number} is not JSON; delete the "
                                           "line (or the file), or give a new --workdir") from None


def read_json(path: str):
    """The JSON at `path` (local or gs://), None where there is no file; one UserError
    where it is not JSON."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as e:
        raise errors.UserError(f"{path}: not JSON ({e}); delete it, or give a new "
                               "--workdir") from None


class Unreadable(Exception):
    """A checkpoint step whose files cannot be read: `path` (its folder), the reason."""

    def __init__(self, path, step: int, error: Exception):
        why = str(getattr(error, "message", error)).strip().splitlines()
        super().__init__(f"checkpoint step {step} is unreadable "
                         f"({why[0][:200] if why else type(error).__name__})")
        self.path = path


class Mismatch(Exception):
    """A checkpoint that does not fit the run: other arrays (model, heads, optimiser) or
    another input pipeline; the message says what."""


def _quiet_closed_event_loops() -> None:
    """Where a read fails, tensorstore's reads still under way complete into orbax's
    closed event loop, and each prints 'RuntimeError: Event loop is closed' (through
    sys.excepthook or as an unraisable exception) around the one-line error: drop those.
    Set once, before the first read."""
    if getattr(sys.excepthook, "quiet_closed_loops", False):
        return

    def closed_loop(error) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_excepthook(kind, error, tb):
        if not closed_loop(error):
            excepthook(kind, error, tb)

    quiet_excepthook.quiet_closed_loops = True
    sys.excepthook = quiet_excepthook
    sys.unraisablehook = lambda u: None if closed_loop(u.exc_value) else unraisable(u)


def _step_path(mngr: ocp.CheckpointManager, step: int):
    return epath.Path(mngr.directory) / str(step)


def _array_shapes(tree) -> dict:
    """{'a/b/0/c': shape} of a tree's arrays: a saved tree's metadata (dicts, lists) and a
    state's abstract arrays (dataclasses, named tuples) alike."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves}


def _check_fits(mngr: ocp.CheckpointManager, step: int, abstract_state) -> None:
    """Mismatch where the saved state's arrays (by its metadata) are not the run's;
    Unreadable where its metadata cannot be read."""
    try:
        saved = ocp.StandardCheckpointHandler().metadata(_step_path(mngr, step) / "state")
    except Exception as e:  # pylint: disable=broad-except  # any way the files are bad
        raise Unreadable(_step_path(mngr, step), step, e) from None
    saved, wanted = _array_shapes(saved), _array_shapes(abstract_state)
    if saved != wanted:
        only = sorted(set(saved) ^ set(wanted))
        key = only[0] if only else next(k for k in sorted(saved) if saved[k] != wanted[k])
        raise Mismatch(f"e.g. {key}: " + (
            f"saved {saved[key]}, this run {wanted[key]}" if key in saved and key in wanted
            else "only in the checkpoint" if key in saved else "not in the checkpoint"))


def save(mngr: ocp.CheckpointManager, step: int, state, iterator, counter) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataIteratorSave(iterator, counter)))


def restore(mngr: ocp.CheckpointManager, abstract_state, iterator, counter,
            step: Optional[int] = None):
    """-> the state at `step` (default: the latest), into `abstract_state`'s shardings;
    the iterator and counter are restored in place. Mismatch where the checkpoint holds
    other arrays or another input pipeline than the run's; Unreadable where its files
    cannot be read."""
    step = mngr.latest_step() if step is None else step
    _quiet_closed_event_loops()
    _check_fits(mngr, step, abstract_state)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=DataIteratorRestore(iterator, counter)))
    except pipeline.StateMismatch as e:
        raise Mismatch(f"its input pipeline: {e}") from None
    except Exception as e:  # pylint: disable=broad-except  # the arrays fit: reading failed
        raise Unreadable(_step_path(mngr, step), step, e) from None
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
    """One item ('state', 'params') of a step as it was saved, onto this host's first
    device whatever devices saved it (an FSDP run's shards included), for evaluation
    outside a run; the input pipeline is not touched. Unreadable where its files cannot
    be read."""
    _quiet_closed_event_loops()
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        saved = ocp.StandardCheckpointHandler().metadata(_step_path(mngr, step) / item)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                              saved)
        return mngr.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(target)}))[item]
    except Exception as e:  # pylint: disable=broad-except  # any way the files are bad
        raise Unreadable(_step_path(mngr, step), step, e) from None


def write_json(path: str, obj) -> None:
    """Process 0 writes `obj` as JSON (atomically: a reader never sees half a file);
    local paths and gs:// alike (tf.io.gfile). The temporary file is this writer's own, so
    that two processes writing one path (a sweep's workers starting together) do not rename
    each other's away."""
    if jax.process_index() != 0:
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def kept_backbone(cfg, workdir: str, pretrained):
    """-> (step, image tower as numpy) that the run in `workdir` keeps: best/ (as
    train.select_by kept it), else its last checkpoint (the EMA weights where
    config.uses_ema, as the run tested them; LoRA adapters merged with the run's own
    model.lora, from its config.json). pretrained: the tower, for its structure."""
    best, last = best_manager(workdir), manager(workdir, 1, False)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pretrained)
    try:
        if cfg.train.select_by != "last" and best.best_step() is not None:
            step = best.best_step()
            return step, _restored(restore_item(best, step, "params")["backbone"], like)
        step = last.latest_step()
        if step is None:
            raise errors.UserError(f"--workdir {workdir}: no checkpoint (neither best/ nor "
                                   "checkpoints/); train first, or pass --checkpoint to "
                                   "evaluate a pretrained model")
        state = restore_item(last, step, "state")
    except Unreadable as e:
        raise errors.UserError(f"--workdir={workdir}: {e}; delete {e.path} to evaluate the "
                               "run's other checkpoints, or train again") from None
    weights = "ema" if config_lib.uses_ema(cfg) else "params"
    if state.get(weights) is None:
        raise errors.UserError(f"--workdir {workdir}: the run kept no EMA weights; evaluate "
                               "with the run's own config (or --config.train.eval_ema=False)")
    own = read_json(os.path.join(workdir, "config.json")) or {}
    settings = own.get("model", {}).get("lora") or cfg.model.get("lora")
    if isinstance(settings, dict):
        settings = ml_collections.ConfigDict(settings)
    return step, _restored(lora.merged_params(state[weights], settings)["backbone"], like)


def _restored(params, like):
    out = jax.tree.map(np.asarray, params)
    if jax.tree.structure(out) != jax.tree.structure(like):
        raise errors.UserError("--workdir: the run's checkpoint does not match model.checkpoint's "
                         "image tower; evaluate with the run's own config")
    return out


def read_headlines(workdir: str):
    """{model: headline} of WORKDIR/results.json (the kept weights' and the pretrained
    model's test numbers), or None where the run has not tested."""
    results = read_json(os.path.join(workdir, "results.json"))
    return None if results is None else {name: m["headline"]
                                         for name, m in results["models"].items()}
