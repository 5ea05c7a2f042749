"""The sweep (python -m infusing_jax.sweep) on the tiny world: its trials and reports, a
worker killed mid-trial, two workers on one study (SQLite, and a real PostgreSQL server),
a worker of two processes, and bad sweep configs."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from infusing_jax import errors
from infusing_jax import sweep
from infusing_jax.hpo import config as hpo_config
from infusing_jax.hpo import space
from infusing_jax.training import recipes
from tests.helpers import REPO
from tests.helpers import processes

CONFIG = "tests/helpers/sweep_config.py"


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **extra)


def _env_of_a_user():
    """_env() without the tests' shared compilation cache (tests/conftest.py)."""
    return {k: v for k, v in _env().items() if not k.startswith(("JAX_COMPILATION_CACHE",
                                                                  "JAX_PERSISTENT_CACHE"))}


def _command(workdir, arg, *flags, module="infusing_jax.sweep"):
    return [sys.executable, "-m", module, f"--config={CONFIG}:{arg}", f"--workdir={workdir}",
            *flags]


def _run(workdir, arg, *flags, timeout=900, env=None):
    done = subprocess.run(_command(workdir, arg, *flags), cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _start(workdir, arg, *flags):
    return processes.start(_command(workdir, arg, *flags), _env())


def _finish(proc, timeout=900):
    return processes.finish(proc, timeout)[1]


def _rows(workdir):
    with open(os.path.join(workdir, "trials.jsonl")) as f:
        return [json.loads(line) for line in f]


def _counted(rows):
    """The trials that count: all but those a retry replaced."""
    return [r for r in rows if r["retried_as"] is None]


def _distinct_runs(rows):
    """Each counted trial ran under its own parameters and in its own folder."""
    counted = _counted(rows)
    assert len({json.dumps(r["params"], sort_keys=True) for r in counted}) == len(counted)
    assert len({r["workdir"] for r in counted}) == len(counted)


def test_a_sweep_runs_its_trials_and_writes_its_reports(world, tmp_path):
    out = str(tmp_path / "sweep")
    done = _run(out, f"root={world},trials=3,tests=true", env=_env_of_a_user())
    # The trials share their compiled programs through JAX's cache in the sweep's folder.
    assert os.listdir(os.path.join(out, "compile_cache"))
    rows = _rows(out)
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert all(r["state"] == "complete" for r in rows)
    for r in rows:
        p = r["params"]
        assert 1.0 <= p["domains.generic.losses.feature_mse.weight"] <= 1e3
        assert p["domains.target.losses.anchoring.weight"] == \
            p["domains.generic.losses.anchoring.weight"]  # one value tied to both fields
        assert r["step"] == p["train.num_steps"] in (2, 4)
        assert r["values"] == {"all": r["val"]["all"]} and 0 <= r["val"]["retention"] <= 1
        assert r["seconds"] > 0 and r["test"]["fine-tuned"] and r["test"]["pretrained"]
        with open(os.path.join(r["workdir"], "config.json")) as f:
            trained = json.load(f)
        assert trained["domains"]["generic"]["losses"]["feature_mse"]["weight"] == \
            p["domains.generic.losses.feature_mse.weight"]
        assert trained["train"]["num_steps"] == p["train.num_steps"]
    _distinct_runs(rows)
    assert done.stderr.count("sweep: trial ") == 3 and "3/3 done" in done.stderr
    with open(os.path.join(out, "best.json")) as f:
        best = json.load(f)
    assert best["trial"] == max(rows, key=lambda r: r["val"]["all"])["number"]
    assert best["test"] == rows[best["trial"]]["test"] and best["baseline"]["test"]
    with open(os.path.join(out, "reference.json")) as f:
        reference = json.load(f)
    assert 0 < reference["pretrained"]["val"]["retention"] <= 1.0 + 1e-6
    assert [p["alpha"] for p in reference["baseline"]["wise_ft"]] == [0.25, 0.5, 0.75, 1.0]
    with open(os.path.join(out, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "table.md")) as f:
        table = [[c.strip() for c in line.strip().strip("|").split("|")] for line in f]
    head, body = table[0], table[2:]
    assert [r[0] for r in body] == ["pretrained", "baseline", *(
        f"**{n}**" if n == best["trial"] else str(n) for n in range(3))]
    trial = body[2 + best["trial"]]
    assert float(trial[head.index("val all")]) == pytest.approx(best["val"]["all"], abs=1e-3)
    (column,) = [c for c in head if c.startswith("test in mAP@")]
    key = f"in_domain_map{column.split('@')[1].split()[0]}"  # eval.k's headline
    change = best["change"][key]
    assert float(trial[head.index(column)]) == pytest.approx(change, abs=1e-3)
    if best["baseline"]["change"][key]:
        assert float(trial[head.index("x baseline")]) == pytest.approx(
            change / best["baseline"]["change"][key], abs=0.01)
    assert float(trial[head.index("distill")]) == pytest.approx(
        best["params"]["domains.generic.losses.feature_mse.weight"], rel=1e-2)
    # Run again: the study is done, nothing more is trained.
    again = _run(out, f"root={world},trials=3,tests=true")
    assert "sweep: trial" not in again.stderr and len(_rows(out)) == 3
    # compare reads a sweep's folder as its baseline and its chosen trial.
    report = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "infusing_jax.compare", out, f"--output={report}"],
                   cwd=REPO, env=_env(), check=True, capture_output=True)
    with open(report / "comparison.json") as f:
        compared = json.load(f)["runs"]
    assert sorted(compared) == ["sweep/baseline", f"sweep/trial {best['trial']}"]
    # and its trials' test changes, for their Pareto front on the plot
    chosen = compared[f"sweep/trial {best['trial']}"]
    assert len(chosen["trials"]) == 3 and chosen["change"] in chosen["trials"]


def test_a_worker_killed_mid_trial_is_resumed_by_the_next(world, tmp_path):
    """kill -9 during trial 0; the next worker retries it once, in trial 0's folder, from
    its checkpoint; the study ends with exactly its 2 trials counted."""
    out = str(tmp_path / "sweep")
    arg = f"root={world},trials=2,steps=8,min_steps=8,heartbeat=1"
    first = _start(out, arg)
    checkpoint = os.path.join(out, "trials", "0", "checkpoints", "3")
    deadline = time.time() + 600
    while not os.path.exists(checkpoint) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, processes.output(first)[1][-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    stderr = _finish(_start(out, arg))
    rows = _rows(out)
    killed = rows[0]
    assert killed["state"] == "fail" and killed["retried_as"] is not None
    retry = rows[killed["retried_as"]]
    assert retry["retry_of"] == 0 and retry["state"] == "complete"
    assert retry["workdir"] == killed["workdir"] and retry["params"] == killed["params"]
    assert "resumed from step" in stderr
    counted = _counted(rows)
    assert len(counted) == 2 and all(r["state"] == "complete" for r in counted)
    _distinct_runs(rows)
    with open(os.path.join(killed["workdir"], "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # no step logged twice


def _two_workers(world, tmp_path, *flags):
    out = str(tmp_path / "sweep")
    arg = f"root={world},trials=4,steps=2"
    workers = [_start(out, arg, *flags, f"--worker={i}") for i in range(2)]
    for w in workers:
        _finish(w)
    rows = _rows(out)
    assert len(rows) == 4 and all(r["state"] == "complete" for r in rows)
    _distinct_runs(rows)
    assert len({r["worker"] for r in rows}) == 2  # both pulled trials


def test_two_workers_share_a_study_in_the_default_storage(world, tmp_path):
    _two_workers(world, tmp_path)


@pytest.fixture
def postgres():
    """A PostgreSQL server of Debian's package (tests/run.sh installs it) on 127.0.0.1."""
    versions = os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []
    bins = sorted(os.path.join("/usr/lib/postgresql", v, "bin") for v in versions
                  if os.path.exists(os.path.join("/usr/lib/postgresql", v, "bin", "initdb")))
    assert bins, "no PostgreSQL server: apt-get install postgresql (tests/run.sh does)"
    home = tempfile.mkdtemp(prefix="sweep_pg_")  # outside pytest's root-only tmp folders
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(home, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(home, "data")
    run = lambda *cmd: subprocess.run([*as_user, os.path.join(bins[-1], cmd[0]), *cmd[1:]],  # noqa
                                      check=True, capture_output=True)
    run("initdb", "-D", data, "-U", "postgres", "-A", "trust")
    run("pg_ctl", "-D", data, "-w", "-l", os.path.join(home, "log"),
        "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sweep")
        yield f"postgresql://postgres@127.0.0.1:{port}/sweep"
    finally:
        run("pg_ctl", "-D", data, "-m", "fast", "stop")
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_share_a_study_on_postgresql(world, tmp_path, postgres):
    _two_workers(world, tmp_path, f"--storage={postgres}")
    assert not os.path.exists(tmp_path / "sweep" / "study.db")


def test_a_two_process_worker_trains_each_trial_on_both_processes(world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "sweep")
    procs = [processes.start(
        [sys.executable, "-m", "tests.helpers.sweep_worker", str(i), "2", str(port),
         f"--config={CONFIG}:root={world},trials=2,steps=2", f"--workdir={out}"],
        _env(XLA_FLAGS="--xla_force_host_platform_device_count=1")) for i in range(2)]
    second = [_finish(p) for p in procs][1]
    rows = _rows(out)
    assert len(rows) == 2 and all(r["state"] == "complete" for r in rows)
    for r in rows:
        assert f"sweep: process 1 trains {r['workdir']}" in second


# ---------------------------------------------------------------------------- bad configs


def _sweep_config(**edits):
    c = recipes.config_from_file(os.path.join(REPO, CONFIG), "root=/nowhere,trials=3")
    for path, value in edits.items():
        node = c
        *parents, leaf = path.split("/")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return sweep.split(c)


@pytest.mark.parametrize("edits,message", [
    (dict(**{"sweep/space/lr": space.log_uniform(1e-4, 1e-2, "optim.lrr")}),
     "config.sweep.space.lr.fields: the run config has no field 'optim.lrr'"),
    (dict(**{"sweep/space/lr": space.uniform(1e-2, 1e-4, "optim.lr")}),
     "config.sweep.space.lr: empty range: low 0.01 > high 0.0001"),
    (dict(**{"sweep/space/lr": space.log_uniform(0.0, 1e-2, "optim.lr")}),
     "config.sweep.space.lr.low: a log range must be positive, got low 0.0"),
    (dict(**{"sweep/space/steps2": space.uniform(2.0, 4.0, "train.num_steps")}),
     "config.sweep.space.steps2.fields: 'train.num_steps' is set by 'steps' too"),
    (dict(**{"sweep/space/b": space.categorical(("x",), "optim.b1")}),
     "config.sweep.space.b: optim.b1 holds a float, not 'x'"),
    (dict(**{"sweep/objectives": ("all", "nope")}), "config.sweep.objectives: 'nope': use"),
    (dict(**{"sweep/objectives": ("in-domain", "retention"), "sweep/pruner": "median"}),
     "config.sweep.pruner: 'median' prunes by one score"),
    (dict(**{"sweep/sampler": "grid"}), "config.sweep.space.anchor: the grid sampler needs"),
    (dict(**{"sweep/num_trials": 0}), "config.sweep.num_trials: must be an int >= 1"),
])
def test_bad_sweep_configs_give_one_line_errors(edits, message):
    run_cfg, sweep_cfg = _sweep_config(**edits)
    with pytest.raises(errors.UserError) as e:
        hpo_config.validate(sweep_cfg, run_cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_the_command_refuses_bad_input_in_one_line(tmp_path):
    cases = [(f"{CONFIG}:root=/nowhere,trials=0", "error: config.sweep.num_trials: must be"),
             ("configs/toy.py", "error: --config: has no `sweep` field")]
    for config, message in cases:
        done = subprocess.run([sys.executable, "-m", "infusing_jax.sweep", f"--config={config}",
                               f"--workdir={tmp_path}"], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
        assert "Traceback" not in done.stderr
