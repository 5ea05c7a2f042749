"""python -m infusing_jax.retrieval end to end on small .npz files."""
import json
import subprocess
import sys

import numpy as np
import pytest

from infusing_jax.evaluation import metrics


def _run(*args):
    return subprocess.run([sys.executable, "-m", "infusing_jax.retrieval", *args],
                          capture_output=True, text=True, timeout=300)


def _arrays(n, seed, start=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 12, n)
    return dict(embeddings=rng.standard_normal((n, 16)).astype(np.float32),
                labels=np.asarray([f"class{c}" for c in labels]),
                domains=np.where(labels < 6, "cars", "food"),
                coarse_labels=labels // 4,
                ids=np.asarray([f"img{i}" for i in range(start, start + n)]))


def test_queries_as_their_own_index(tmp_path):
    q = _arrays(60, 0)
    np.savez(tmp_path / "q.npz", **q)
    result = _run(f"--queries={tmp_path}/q.npz", "--k=5", f"--output={tmp_path}/m.json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "m.json").read_text())
    assert set(report) == {"recall@1", "mmp@5", "map@5", "map@r", "num_queries",
                           "lone_queries", "domains", "over_queries", "coarse"}
    assert set(report["domains"]) == {"cars", "food"}
    assert set(report["coarse"]) == set(report) - {"coarse"}
    expected = metrics.retrieval_metrics(
        q["embeddings"], q["labels"], k=5, query_ids=q["ids"], query_domains=q["domains"],
        query_coarse_labels=q["coarse_labels"])
    assert report == expected
    assert report["num_queries"] == 60


def test_separate_index_file_merged_and_per_domain(tmp_path):
    q, i = _arrays(40, 1), _arrays(70, 2, start=1000)
    for name, data in (("q", q), ("i", i)):
        np.savez(tmp_path / f"{name}.npz", **{k: v for k, v in data.items() if k != "ids"})
    reports = {}
    for flag in ("--noseparate", "--separate"):
        result = _run(f"--queries={tmp_path}/q.npz", f"--index={tmp_path}/i.npz", "--k=3",
                      flag, f"--output={tmp_path}/m.json")
        assert result.returncode == 0, result.stderr[-3000:]
        reports[flag] = json.loads((tmp_path / "m.json").read_text())
        expected = metrics.retrieval_metrics(
            q["embeddings"], q["labels"], i["embeddings"], i["labels"], k=3,
            query_domains=q["domains"], index_domains=i["domains"],
            query_coarse_labels=q["coarse_labels"], index_coarse_labels=i["coarse_labels"],
            separate=flag == "--separate")
        assert reports[flag] == expected
    assert reports["--separate"]["map@3"] != pytest.approx(reports["--noseparate"]["map@3"])


@pytest.mark.parametrize("problem,message", [
    ("no_labels", "q.npz: no `labels` array"),
    ("short_ids", "q.npz: `ids` has shape (9,); expected (10,)"),
    ("index_without_ids", "i.npz: no `ids` array, but"),
    ("dimension", "i.npz: `embeddings` have dimension 4, "),
])
def test_bad_input_is_one_line_naming_the_file_and_array(tmp_path, problem, message):
    q, i = _arrays(10, 3), _arrays(10, 4)
    if problem == "no_labels":
        del q["labels"]
    if problem == "short_ids":
        q["ids"] = q["ids"][:9]
    if problem == "index_without_ids":
        del i["ids"]
    if problem == "dimension":
        i["embeddings"] = i["embeddings"][:, :4]
    np.savez(tmp_path / "q.npz", **q)
    np.savez(tmp_path / "i.npz", **i)
    result = _run(f"--queries={tmp_path}/q.npz", f"--index={tmp_path}/i.npz",
                  f"--output={tmp_path}/m.json")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "m.json").exists()
