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
import os
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags import config_flags

from infusing_jax import errors
from infusing_jax import paths

FLAGS = flags.FLAGS


def fail(message: str):
    """Print `error: message` on stderr and exit 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _last_line(text: str) -> str:
    """The last line of a message that may hold a formatted traceback, without the
    exception's type: what config_flags makes of an error inside get_config()."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else ""
    last = lines[-1]
    kind, sep, rest = last.partition(": ")
    return rest if sep and kind.replace(".", "").replace("_", "").isalnum() else last


def parse_flags(argv):
    """absl's flag parsing, each mistake one line: an unknown or malformed flag, a config
    file that is missing or fails in get_config(), an override of an unknown field."""
    try:
        rest = FLAGS(argv)
        for name in FLAGS:  # config_flags defers a config file's OSError until first use
            flag = FLAGS[name]
            if isinstance(flag.parser, config_flags.ConfigFileFlagParser) and flag.present:
                getattr(flag.value, "keys", None)
    except flags.Error as e:
        message = str(e)
        head = message.splitlines()[0] if message else ""
        if "Error whilst parsing config file" in message:
            flag = head.split(": Error whilst parsing")[0].removeprefix("flag ")
            fail(f"{flag}: {_last_line(message)}")
        fail(f"{head} (--helpshort lists the flags)")
    except OSError as e:
        fail(f"{_config_argument(argv)}: cannot load the config file ({_last_line(e)})")
    except (AttributeError, KeyError) as e:  # an override of a field the config lacks
        missing = str(e).strip("\"'")
        override = next((a for a in argv[1:] if a.startswith("--config.") and
                         missing in a.partition("=")[0].split(".")), "--config.FIELD")
        fail(f"{override}: the config has no field {missing!r}; `--config.FIELD=V` can only "
             "set fields the config file defines")
    except SyntaxError as e:
        fail(f"{_config_argument(argv)}: {e.filename}, line {e.lineno}: {e.msg}")
    return rest


def _config_argument(argv) -> str:
    """The --config=... argument as given (for a message)."""
    return next((a for a in argv if a.startswith("--config=")), "--config")


def define_config_flag(help_text: str, lock: bool = True) -> None:
    """--config: a configs/*.py file, its :ARG, and --config.FIELD=VALUE overrides."""
    config_flags.DEFINE_config_file("config", None, help_text, lock_config=lock)
    flags.mark_flag_as_required("config")


def define_workdir_flag(help_text: str) -> None:
    flags.DEFINE_string("workdir", None, help_text)
    flags.mark_flag_as_required("workdir")


def define_distributed_flags() -> None:
    """--distributed and, where jax.distributed cannot find them (TPU and SLURM it can),
    --coordinator_address, --num_processes, --process_id."""
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def start_processes() -> None:
    """tf.data keeps off the accelerators (they are JAX's); with --distributed, joins
    the other processes (jax.distributed.initialize)."""
    import jax
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    if FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())


def check_folder(flag: str, path: str) -> None:
    """A local folder to write into, created if missing; one line where it cannot be (it is
    a file, lies under one, or is not writable). Remote (gs://) paths are left to their
    filesystem."""
    if not path:
        raise errors.UserError(f"{flag}: required; give a folder")
    if paths.is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise errors.UserError(f"{flag}={path}: is a file, not a folder; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise errors.UserError(f"{flag}={path}: cannot create the folder ({e.strerror}); "
                               "give a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise errors.UserError(f"{flag}={path}: not writable; give a folder you can write to")


def check_output_file(flag: str, path: str) -> None:
    """A local file to write: not a folder, in a folder that can be made (check_folder)."""
    if paths.is_remote(path):
        return
    if os.path.isdir(path):
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
