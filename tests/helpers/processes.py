"""Subprocesses whose output goes to files, not pipes: a pipe that nobody reads while
the test waits on another process fills up and stalls the process that writes to it
(two workers of one sweep, two processes of one jax.distributed run)."""
import subprocess
import tempfile

from tests.helpers import REPO


def start(command: list, env: dict) -> subprocess.Popen:
    """Starts `command` in REPO; its stdout and stderr are kept in temporary files."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    proc.files = (out, err)
    return proc


def output(proc: subprocess.Popen) -> tuple:
    """-> (stdout, stderr) so far."""
    texts = []
    for f in proc.files:
        f.seek(0)
        texts.append(f.read())
    return tuple(texts)


def finish(proc: subprocess.Popen, timeout: float) -> tuple:
    """Waits for `proc`, checks that it succeeded; -> (stdout, stderr)."""
    proc.wait(timeout=timeout)
    stdout, stderr = output(proc)
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, stderr
