"""What every command shares: flags defined the same way and parsed with one-line
errors, the processes' set-up, and the typed user error (errors.UserError) printed as
`error: <field or file>: <what to do>`, exit 1.

    def define_flags():
        cli.define_config_flag("The run's configs/*.py file (and :ARG).")
        cli.define_workdir_flag("Checkpoints, logs and results go here.")

    if __name__ == "__main__":
        cli.run(main, define_flags)

Commands define their flags when they run, not on import: absl keeps one global flag
namespace, and the commands share names (--config, --workdir, --checkpoint, ...). To
run a command's `main` from Python: `define_flags(); app.run(main, argv)`.

A mistake in the flags, in a --config file or its :ARG, or in a --config.FIELD
override is one line too; an exception of any other kind is a bug and keeps its
traceback.
"""
import importlib.machinery
import importlib.util
import os
import sys
import threading
import traceback
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from infusing_jax import errors
from infusing_jax import paths

FLAGS = flags.FLAGS


def fail(message: str):
    """Print `error: message` on stderr, at the start of a line, and exit 1."""
    end_progress_bars()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def end_progress_bars() -> None:
    """Close the tqdm bars still open (a run stopped mid-bar): each ends its line, so what
    is printed next starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def parse_flags(argv):
    """absl's flag parsing, each mistake one line: an unknown or malformed flag, a config
    file that cannot be loaded or fails (_ConfigFileParser), an override of an unknown
    field."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        if isinstance(e.__context__, errors.UserError):  # from a flag's parser
            fail(str(e.__context__))
        message = str(e)
        fail(f"{message.splitlines()[0] if message else ''} (--helpshort lists the flags)")
    except (AttributeError, KeyError) as e:  # an override of a field the config lacks
        missing = str(e).strip("\"'")
        override = next((a for a in argv[1:] if a.startswith("--config.") and
                         missing in a.partition("=")[0].split(".")), "--config.FIELD")
        fail(f"{override}: the config has no field {missing!r}; `--config.FIELD=V` can only "
             "set fields the config file defines")


class _ConfigFileParser(config_flags.ConfigFileFlagParser):
    """config_flags' parser of --config=FILE[:ARG] (the file's get_config(ARG)), with each
    way the file can fail one UserError naming --config=...: the file missing, an error
    while it runs (its last line, and the file's line), no get_config(), a result that is
    not a ConfigDict. An errors.UserError from the file (recipes.parse_arg) as it is."""

    def parse(self, path):
        where = f"--{self.name}={path}"
        file, colon, arg = path.partition(":")
        if not os.path.isfile(file):
            raise errors.UserError(f"{where}: cannot load the config file (no such file); "
                                   "give a configs/*.py file")
        if not file.endswith(".py"):
            raise errors.UserError(f"{where}: not a Python config file; give a configs/*.py "
                                   "file (a run's config.json records its values, it is not "
                                   "one)")
        try:
            loader = importlib.machinery.SourceFileLoader(f"{self.name}_config", file)
            module = importlib.util.module_from_spec(
                importlib.util.spec_from_loader(loader.name, loader))
            sys.modules[loader.name] = module  # as config_flags does
            loader.exec_module(module)
            if not callable(getattr(module, "get_config", None)):
                raise errors.UserError(f"{where}: defines no get_config()")
            config = module.get_config(*([arg] if colon else []))
        except errors.UserError as e:
            raise errors.UserError(str(e) if str(e).startswith(where) else f"{where}: {e}"
                                   ) from None
        except SyntaxError as e:
            raise errors.UserError(f"{where}: {e.filename}, line {e.lineno}: {e.msg}") from None
        except Exception as e:  # pylint: disable=broad-except  # the user's code failed
            lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                     if os.path.abspath(f.filename) == os.path.abspath(file)]
            at = f" (line {lines[-1]})" if lines else ""
            raise errors.UserError(f"{where}: {type(e).__name__}: "
                                   f"{_last_line(e) or 'no message'}{at}") from None
        if not isinstance(config, config_dict.ConfigDict):
            raise errors.UserError(f"{where}: get_config() must return a "
                                   f"ml_collections.ConfigDict, got {type(config).__name__}")
        if self._lock_config:
            config.lock()
        return config


def _last_line(error) -> str:
    """The last non-empty line of an error's message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def define_config_flag(help_text: str, lock: bool = True) -> None:
    """--config: a configs/*.py file, its :ARG, and --config.FIELD=VALUE overrides."""
    config_flags.DEFINE_config_file("config", None, help_text, lock_config=lock)
    FLAGS["config"].parser = _ConfigFileParser("config", lock_config=lock)
    flags.mark_flag_as_required("config")


def define_workdir_flag(help_text: str) -> None:
    flags.DEFINE_string("workdir", None, help_text)
    flags.mark_flag_as_required("workdir")


def define_distributed_flags() -> None:
    """--distributed and, where jax.distributed cannot find them (TPU and SLURM it can),
    --coordinator_address, --num_processes, --process_id; --distributed_timeout."""
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
    flags.DEFINE_integer("distributed_timeout", 300,
                         "Seconds to wait for every process to join (with --distributed).")


def start_processes() -> None:
    """tf.data keeps off the accelerators (they are JAX's); with --distributed, joins
    the other processes (join_processes)."""
    import jax
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    if FLAGS.distributed:
        join_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                       FLAGS.distributed_timeout)
    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())


_PROCESS_FLAGS = ("--coordinator_address (process 0's host:port), --num_processes and "
                  "--process_id")


def join_processes(address: Optional[str], count: Optional[int], index: Optional[int],
                   timeout: int) -> None:
    """jax.distributed.initialize, said on one line; what it refuses is one UserError. Where
    not every process joins within `timeout` seconds jax aborts the process from C++ (no
    exception, a fatal log), so a timer that fires first prints the one line and exits 1."""
    import jax
    if timeout < 1:
        raise errors.UserError(f"--distributed_timeout={timeout}: must be >= 1 (seconds)")
    where = address or "the coordinator jax finds (TPU, SLURM)"
    print(f"waiting up to {timeout} s for {count or 'all the'} processes at {where}",
          file=sys.stderr, flush=True)

    def give_up():
        end_progress_bars()
        print(f"error: --num_processes={count}: not every process joined at {where} within "
              f"{timeout} s (--distributed_timeout); start the same command on every host, "
              f"and check {_PROCESS_FLAGS}", file=sys.stderr, flush=True)
        os._exit(1)  # pylint: disable=protected-access  # jax's connect holds the main thread

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(address, count, index, initialization_timeout=timeout + 30)
    except (ValueError, TypeError) as e:  # what it cannot start with: a missing or bad setting
        raise errors.UserError(f"--distributed: {str(e).rstrip('.')}; where jax finds no "
                               f"cluster (TPU, SLURM) give {_PROCESS_FLAGS}") from None
    finally:
        timer.cancel()


def check_folder(flag: str, path: str) -> None:
    """A local folder to write into, created if missing; one line where it cannot be (it is
    a file or a broken link, lies under one, or is not writable). Remote (gs://) paths are
    left to their filesystem."""
    if not path:
        raise errors.UserError(f"{flag}: required; give a folder")
    if paths.is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise errors.UserError(f"{flag}={path}: is a file, not a folder; give a folder")
    link = _broken_link(path)
    if link:
        raise errors.UserError(f"{flag}={path}: {link} is a broken symbolic link (to "
                               f"{os.readlink(link)}); remove it, or give another folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise errors.UserError(f"{flag}={path}: cannot create the folder ({e.strerror}); "
                               "give a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise errors.UserError(f"{flag}={path}: not writable; give a folder you can write to")


def _broken_link(path: str) -> Optional[str]:
    """`path` or the first of its parents that is a symbolic link to nothing, if one is."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        if os.path.islink(path):
            return path
        path, parent = os.path.dirname(path), path
        if path == parent:
            return None
    return None


def check_output_file(flag: str, path: str, folder: bool = False) -> None:
    """A local file to write (with `folder`, a folder: a Hugging Face export): not a folder
    (a file), in a folder that can be made (check_folder)."""
    if paths.is_remote(path):
        return
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise errors.UserError(f"{flag}={path}: is a file; give a folder name")
    if not folder and os.path.isdir(path):
        raise errors.UserError(f"{flag}={path}: is a folder; give a file name")
    check_folder(f"{flag} (its folder)", os.path.dirname(os.path.abspath(path)))


def run(main: Callable, define_flags: Optional[Callable] = None) -> None:
    """app.run(main) with one-line user errors (module doc)."""
    if define_flags is not None:
        define_flags()

    def guarded(argv):
        try:
            return main(argv)
        except errors.UserError as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)
