"""Exact kNN and the retrieval metrics, against brute force and pytorch-metric-learning.

Run as a script, prints the kNN of `_data()` as JSON: the 8-device test runs it
in a subprocess with 8 CPU devices.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from infusing_jax.evaluation import knn as knn_lib
from infusing_jax.evaluation import metrics

K = 5


def _data(n=203, dim=8, seed=0):
    """Random embeddings with exact duplicate pairs under different labels, lone labels,
    classes larger than K, two domains sharing label values, coarse labels, string ids."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    labels = rng.integers(0, 30, n)
    labels[:6] = [100, 101, 102, 103, 104, 105]  # lone: no other row has these labels
    for a, b in [(10, 11), (20, 150), (30, 31)]:
        x[b] = x[a]
        labels[b] = labels[a] + 1  # the twin that ranks first is not a positive
    domains = np.where(np.arange(n) % 3 == 0, "cars", "sop")
    return dict(x=x, labels=labels, domains=domains, coarse=labels // 10,
                ids=np.asarray([f"img{i:04d}" for i in range(n)]))


def _dense_ranking(queries, index, query_ids, index_ids):
    """float64 cosine, rows with the query's id dropped, ties to the lowest row."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    x = index / np.linalg.norm(index, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ x.T.astype(np.float64)
    scores[np.asarray(query_ids)[:, None] == np.asarray(index_ids)[None, :]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), order


def _reference_metrics(order, query_keys, index_keys, query_ids, index_ids, k):
    """The module doc's formulas, one query at a time."""
    out = {"recall@1": [], f"mmp@{k}": [], f"map@{k}": [], "map@r": []}
    lone = 0
    for i, ranking in enumerate(order):
        ranking = [j for j in ranking if index_ids[j] != query_ids[i]]
        rel = [index_keys[j] == query_keys[i] for j in ranking]
        n = sum(index_keys[j] == query_keys[i] and index_ids[j] != query_ids[i]
                for j in range(len(index_keys)))
        lone += n == 0
        hits, ap_k, ap_r = 0, 0.0, 0.0
        for r, hit in enumerate(rel, start=1):
            hits += hit
            if hit and r <= k:
                ap_k += hits / r
            if hit and r <= n:
                ap_r += hits / r
        out["recall@1"].append(float(rel[0]))
        out[f"mmp@{k}"].append(sum(rel[:min(n, k)]) / min(n, k) if n else 0.0)
        out[f"map@{k}"].append(ap_k / min(n, k) if n else 0.0)
        out["map@r"].append(ap_r / n if n else 0.0)
    return {**{m: float(np.mean(v)) for m, v in out.items()},
            "num_queries": len(order), "lone_queries": lone}


def _assert_reports_equal(ours, reference):
    assert set(ours) >= set(reference)
    for name, value in reference.items():
        if isinstance(value, float):
            assert ours[name] == pytest.approx(value, abs=1e-12), name
        else:
            assert ours[name] == value, name


def _pooled(report):
    """The report with its means over all queries where it has them (merged domains)."""
    return dict(report, **report.get("over_queries", {}))


def _keys(*columns):
    return [tuple(str(c[i]) for c in columns) for i in range(len(columns[0]))]


@pytest.mark.parametrize("k,block_size,tile", [(K, 64, None), (K, None, 256), (40, 128, None)])
def test_knn_equals_dense_ranking(k, block_size, tile, monkeypatch):
    # (k + 2) * GROUP < tile rows: the grouped selection; k = 40: top-k on whole tiles.
    monkeypatch.setattr(knn_lib, "TILE", tile or knn_lib.TILE)
    d = _data(n=1001)
    scores, neighbours = knn_lib.knn(d["x"], d["x"], k, query_ids=d["ids"], index_ids=d["ids"],
                                     block_size=block_size)
    ref_scores, order = _dense_ranking(d["x"], d["x"], d["ids"], d["ids"])
    assert scores.dtype == np.float32 and neighbours.dtype == np.int64
    # The dense float64 order, but for rows whose float64 cosines are within float32's
    # rounding of each other (near-ties may swap): each neighbour's exact cosine is the
    # reference's at its rank, and the neighbours are distinct.
    same = neighbours == order[:, :k]
    assert same.mean() > 0.999
    q = d["x"] / np.linalg.norm(d["x"], axis=1, keepdims=True)
    cos = np.einsum("qd,qkd->qk", q.astype(np.float64), q[neighbours].astype(np.float64))
    np.testing.assert_allclose(cos, ref_scores[:, :k], atol=1e-6)
    assert all(len(set(row)) == k for row in neighbours)
    np.testing.assert_allclose(scores, ref_scores[:, :k], atol=1e-6)


@pytest.mark.parametrize("k,block_size,tile,with_ids", [
    (K, 64, None, True), (K, None, 256, True), (40, 128, None, True), (K, 48, 128, False),
    (3, 100, 64, True), (K, 160, 256, False)])
def test_self_knn_equals_the_general_path(k, block_size, tile, with_ids, monkeypatch):
    """knn(x, x): each pair scored once; the same neighbours as queries that are a copy of
    the index (the general path), with duplicate rows, shared ids (crops of one image),
    blocks that do not divide the rows, tiles straddling a block's first row, and no ids
    (each query then finds itself, or its twin, first)."""
    monkeypatch.setattr(knn_lib, "TILE", tile or knn_lib.TILE)
    monkeypatch.setattr(knn_lib, "SELF_TILE", tile or knn_lib.SELF_TILE)
    d = _data(n=1001)
    ids = d["ids"].copy()
    ids[[40, 41, 500]] = ids[40]  # three crops of one image: none is another's neighbour
    kwargs = dict(query_ids=ids, index_ids=ids) if with_ids else {}
    scores, neighbours = knn_lib.knn(d["x"], d["x"], k, block_size=block_size, **kwargs)
    general = knn_lib.knn(d["x"], d["x"].copy(), k, block_size=block_size, **kwargs)
    assert (neighbours == general[1]).mean() > 0.999  # float32 near-ties may swap
    np.testing.assert_allclose(scores, general[0], atol=1e-6)
    if with_ids:
        assert not set(neighbours[40]) & {40, 41, 500}
    else:
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)  # itself, or its twin


def test_knn_leaves_the_query_out_by_id_not_by_rank():
    d = _data()
    _, neighbours = knn_lib.knn(d["x"], d["x"], K, query_ids=d["ids"], index_ids=d["ids"])
    for a, b in [(10, 11), (20, 150), (30, 31)]:  # identical rows: each is the other's first
        assert neighbours[a, 0] == b and neighbours[b, 0] == a
    assert not np.any(neighbours == np.arange(len(d["x"]))[:, None])


def _rows_at_cosines(cosines, towards, away, rng, dim=8):
    """Random unit rows, except row j at cosine cosines[j] to unit vector e_towards."""
    x = np.zeros((len(cosines), dim), np.float32)
    x[:, 3:] = rng.standard_normal((len(cosines), dim - 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    known = ~np.isnan(cosines)
    x[known] = 0
    x[known, towards] = cosines[known]
    x[known, away] = np.sqrt(1 - cosines[known] ** 2)
    return x


def _crowded_by_crops(rows, crops, rng):
    """-> (x, ids, best): K rows (best) at cosines 0.9 .. 0.5 to e_1, in K different groups
    of GROUP rows, and crops of one image (one id) at ~e_1, in other groups."""
    best = np.arange(K) * 2 * knn_lib.GROUP
    cosines = np.full(rows, np.nan)
    cosines[best] = np.linspace(0.9, 0.5, K)
    x = _rows_at_cosines(cosines, 1, 2, rng)
    x[crops] = np.eye(8, dtype=np.float32)[1] + 1e-3 * rng.standard_normal((len(crops), 8))
    ids = np.arange(rows)
    ids[crops] = crops[0]
    return x, ids, best


def test_knn_grouped_selection_survives_crowding_groups():
    # Group maxima are taken before rows are left out: groups holding the query's own
    # rows, or zero padding rows, rank too high. They must not push out the true k best,
    # here placed in K different groups of GROUP rows.
    rng = np.random.default_rng(3)
    # three crops of the query image (row 21), in three other groups
    x, ids, best = _crowded_by_crops(190, [21, 51, 170], rng)
    _, neighbours = knn_lib.knn(x[21:22], x, K, query_ids=[21], index_ids=ids)
    np.testing.assert_array_equal(neighbours[0], best)

    cosines = -rng.uniform(0.5, 0.9, 190)  # all below the padding rows' 0
    cosines[best] = np.linspace(-0.1, -0.3, K)
    x = _rows_at_cosines(cosines, 0, 1, rng)
    _, neighbours = knn_lib.knn(np.eye(8, dtype=np.float32)[:1], x, K)
    np.testing.assert_array_equal(neighbours[0], best)


def test_self_knn_grouped_selection_survives_crowding_groups(monkeypatch):
    # The self-kNN takes group maxima before pairs are left out too, on both sides: rows
    # as queries (the block's own rows) and columns as queries (rows after the block).
    monkeypatch.setattr(knn_lib, "SELF_TILE", 512)  # one tile, grouped on both sides
    rng = np.random.default_rng(3)
    # The best in block 0 (rows 0-255); crop 300 finds them through block 0's columns.
    crops = [21, 51, 300]
    x, ids, best = _crowded_by_crops(400, crops, rng)
    _, neighbours = knn_lib.knn(x, x, K, query_ids=ids, index_ids=ids, block_size=256)
    for crop in crops:
        np.testing.assert_array_equal(neighbours[crop], best)

    cosines = -rng.uniform(0.5, 0.9, 190)  # all below the 2 padding rows' 0 (rows 190-191)
    cosines[0] = 1.0  # the query, which finds itself first (no ids)
    best = knn_lib.GROUP + np.arange(K - 1) * 2 * knn_lib.GROUP
    cosines[best] = np.linspace(-0.1, -0.3, K - 1)
    x = _rows_at_cosines(cosines, 0, 1, rng)
    _, neighbours = knn_lib.knn(x, x, K)
    np.testing.assert_array_equal(neighbours[0], [0, *best])


def test_knn_with_fewer_rows_than_k_pads_with_minus_one():
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    scores, neighbours = knn_lib.knn(x, x, 4, query_ids=np.arange(3), index_ids=np.arange(3))
    assert np.all(neighbours[:, 2:] == -1) and np.all(np.isneginf(scores[:, 2:]))
    assert np.all(neighbours[:, :2] >= 0) and np.all(np.isfinite(scores[:, :2]))


def test_knn_on_eight_devices_equals_one_device(monkeypatch):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = json.loads(run.stdout.strip().splitlines()[-1])
    assert sharded["devices"] == 8
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("index",))
    monkeypatch.setattr(knn_lib, "TILE", SMALL_TILE)
    scores, neighbours, report = _knn_and_metrics(one)
    np.testing.assert_array_equal(np.asarray(sharded["neighbours"]), neighbours)
    np.testing.assert_allclose(np.asarray(sharded["scores"]), scores, atol=1e-6)
    assert sharded["metrics"] == report


SMALL_TILE = 128  # 8 devices: 2 tiles each of the 2003 rows, grouped selection in each


def _knn_and_metrics(mesh=None):
    d = _data(n=2003)
    scores, neighbours = knn_lib.knn(d["x"], d["x"], K, query_ids=d["ids"], index_ids=d["ids"],
                                     block_size=16, mesh=mesh)
    report = metrics.retrieval_metrics(d["x"], d["labels"], k=K, query_ids=d["ids"],
                                       query_domains=d["domains"], mesh=mesh)
    return scores, neighbours, report


def test_metrics_equal_the_definitions_on_a_merged_index_with_domains_and_coarse_labels():
    d = _data()
    ours = metrics.retrieval_metrics(d["x"], d["labels"], k=K, query_ids=d["ids"],
                                     query_domains=d["domains"],
                                     query_coarse_labels=d["coarse"])
    _, order = _dense_ranking(d["x"], d["x"], d["ids"], d["ids"])
    for report, labels in [(ours, d["labels"]), (ours["coarse"], d["coarse"])]:
        keys = _keys(d["domains"], labels)
        _assert_reports_equal(_pooled(report),
                              _reference_metrics(order, keys, keys, d["ids"], d["ids"], K))
        refs = {}
        for name in ("cars", "sop"):
            rows = np.flatnonzero(d["domains"] == name)
            refs[name] = _reference_metrics(order[rows], [keys[i] for i in rows], keys,
                                            d["ids"][rows], d["ids"], K)
            _assert_reports_equal(report["domains"][name], refs[name])
        for m in ("recall@1", f"mmp@{K}", f"map@{K}", "map@r"):  # the headline: per domain
            assert report[m] == pytest.approx((refs["cars"][m] + refs["sop"][m]) / 2, abs=1e-12)
    assert ours["lone_queries"] >= 6 and ours["num_queries"] == len(d["x"])
    # Removing rank 0 instead of the query's id would credit the duplicates' twins.
    _, with_self = _dense_ranking(d["x"], d["x"], d["ids"], np.full(len(d["x"]), ""))
    keys = _keys(d["domains"], d["labels"])
    rank0 = np.mean([keys[row[1]] == keys[i] for i, row in enumerate(with_self)])
    assert rank0 != pytest.approx(ours["over_queries"]["recall@1"])


def test_separate_index_searches_only_the_query_domain():
    d = _data()
    ours = metrics.retrieval_metrics(d["x"], d["labels"], k=K, query_ids=d["ids"],
                                     query_domains=d["domains"], separate=True)
    merged = metrics.retrieval_metrics(d["x"], d["labels"], k=K, query_ids=d["ids"],
                                       query_domains=d["domains"])
    for name in ("cars", "sop"):
        rows = np.flatnonzero(d["domains"] == name)
        alone = metrics.retrieval_metrics(d["x"][rows], d["labels"][rows], k=K,
                                          query_ids=d["ids"][rows])
        _assert_reports_equal(ours["domains"][name], alone)
    # The headline is the domains' unweighted mean; over_queries weighs them by size.
    sizes = {name: ours["domains"][name]["num_queries"] for name in ("cars", "sop")}
    pooled = sum(ours["domains"][n]["map@r"] * s for n, s in sizes.items()) / sum(sizes.values())
    assert ours["over_queries"]["map@r"] == pytest.approx(pooled)
    assert ours["map@r"] == pytest.approx((ours["domains"]["cars"]["map@r"]
                                           + ours["domains"]["sop"]["map@r"]) / 2)
    assert sizes["cars"] != sizes["sop"] and ours["map@r"] != pytest.approx(pooled)
    assert ours["map@r"] != pytest.approx(merged["map@r"])  # other domains' rows interfere


def test_merged_hit_needs_the_domain_too():
    x = np.asarray([[1, 0], [1, 0.01], [1, 0.1], [0, 1]], np.float32)
    labels = np.asarray([7, 7, 7, 3])
    domains = np.asarray(["a", "b", "a", "a"])  # row 1: same label, other domain, nearest
    report = metrics.retrieval_metrics(x, labels, k=2, query_domains=domains)
    # Rows 0 and 2 rank row 1 (other domain) first, then each other (n = 1): R@1 0,
    # mAP@2 = (1/2) / 1. Rows 1 and 3 have no positive: lone, 0.
    assert report["recall@1"] == 0.0
    assert report["over_queries"]["map@2"] == pytest.approx((0.5 + 0.5 + 0 + 0) / 4)
    assert report["map@2"] == pytest.approx(((0.5 + 0.5 + 0) / 3 + 0) / 2)  # a, b
    assert report["lone_queries"] == 2
    assert report["domains"]["a"]["num_queries"] == 3
    assert report["domains"]["b"]["lone_queries"] == 1
    plain = metrics.retrieval_metrics(x, labels, k=2)  # without domains row 1 is a hit
    assert plain["lone_queries"] == 1 and plain["recall@1"] > 0


def test_lone_queries_are_counted_and_score_zero():
    d = _data()
    lone = np.arange(6)  # labels 100..105 occur once
    alone = metrics.retrieval_metrics(d["x"][lone], d["labels"][lone], d["x"], d["labels"],
                                      k=K, query_ids=d["ids"][lone], index_ids=d["ids"])
    assert alone["lone_queries"] == alone["num_queries"] == len(lone)
    assert all(alone[m] == 0.0 for m in ("recall@1", f"mmp@{K}", f"map@{K}", "map@r"))


def test_a_separate_index_and_an_index_holding_the_queries():
    d = _data()
    q, i = np.arange(0, 203, 2), np.arange(1, 203, 2)  # disjoint: nothing to leave out
    ours = metrics.retrieval_metrics(d["x"][q], d["labels"][q], d["x"][i], d["labels"][i], k=K)
    _, order = _dense_ranking(d["x"][q], d["x"][i], q, i)
    ref = _reference_metrics(order, d["labels"][q], d["labels"][i], q, i, K)
    _assert_reports_equal(ours, ref)
    # Queries inside the index: left out by their ids, wherever they sit in it.
    perm = np.random.default_rng(2).permutation(203)
    ours = metrics.retrieval_metrics(d["x"][q], d["labels"][q], d["x"][perm], d["labels"][perm],
                                     k=K, query_ids=d["ids"][q], index_ids=d["ids"][perm])
    _, order = _dense_ranking(d["x"][q], d["x"][perm], d["ids"][q], d["ids"][perm])
    ref = _reference_metrics(order, d["labels"][q], d["labels"][perm], d["ids"][q],
                             d["ids"][perm], K)
    _assert_reports_equal(ours, ref)


def test_map_at_r_is_null_past_max_rank():
    d = _data()
    deepest = int(np.bincount(d["labels"]).max()) - 1
    report = metrics.retrieval_metrics(d["x"], d["labels"], k=K, max_rank=deepest - 1)
    assert report["map@r"] is None and report[f"map@{K}"] > 0
    assert metrics.retrieval_metrics(d["x"], d["labels"], k=K, max_rank=deepest)["map@r"] > 0


def test_metrics_equal_pytorch_metric_learning():
    import torch
    from pytorch_metric_learning.utils import inference
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    def ranked_knn(query, k, reference, ref_includes_query):
        # Dense float64 ranking with our tie rule (the twins tie for their neighbours);
        # PML then drops the query by its row, as its own kNN functions do.
        k += int(ref_includes_query)
        scores, order = _dense_ranking(query.numpy(), reference.numpy(), np.zeros(len(query)),
                                       np.ones(len(reference)))
        return inference.return_results(torch.tensor(scores[:, :k]), torch.tensor(order[:, :k]),
                                        ref_includes_query)

    d = _data()
    # PML skips lone queries, and its mean_average_precision at k divides by n_q: it
    # equals our mAP@k at k = max n_q.
    deepest = int(np.bincount(d["labels"]).max()) - 1
    pml = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r",
                                      "mean_average_precision"), k=deepest,
                             knn_func=ranked_knn, device=torch.device("cpu"))
    theirs = pml.get_accuracy(d["x"], d["labels"])  # the queries are the reference
    ours = metrics.retrieval_metrics(d["x"], d["labels"], k=deepest)
    scale = ours["num_queries"] / (ours["num_queries"] - ours["lone_queries"])
    assert ours["recall@1"] * scale == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert ours["map@r"] * scale == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
    assert ours[f"map@{deepest}"] * scale == pytest.approx(theirs["mean_average_precision"],
                                                           abs=1e-9)


def test_per_query_by_hand():
    relevant = np.asarray([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    out = metrics.per_query(relevant, np.asarray([3, 1, 0]), k=2)
    np.testing.assert_allclose(out["recall@1"], [0, 1, 0])
    np.testing.assert_allclose(out["mmp@2"], [1 / 2, 1, 0])
    np.testing.assert_allclose(out["map@2"], [(1 / 2) / 2, 1, 0])
    np.testing.assert_allclose(out["map@r"], [(1 / 2 + 2 / 3) / 3, 1, 0])


def test_mmp_is_precision_at_min_of_positives_and_k():
    # Hand-written rankings at k = 5 (1 = a positive at that rank) and n_q positives:
    relevant = np.asarray([
        [0, 1, 1, 0, 0],  # few positives, n = 2: judged on ranks 1-2, P@2 = 1/2
        [0, 0, 1, 1, 0],  # n = 2, both hits past rank 2: P@2 = 0, though 2 hits in the top 5
        [0, 1, 0, 0, 0],  # n = 1: P@1 = 0
        [1, 1, 0, 1, 1],  # many positives, n = 10: P@5 = 4/5
        [1, 1, 1, 1, 1],  # n = 5: P@5 = 1
        [0, 0, 0, 0, 0],  # lone, n = 0: 0
    ], bool)
    n = np.asarray([2, 2, 1, 10, 5, 0])
    out = metrics.per_query(relevant, n, k=5)
    np.testing.assert_allclose(out["mmp@5"], [1 / 2, 0, 0, 4 / 5, 1, 0])
    np.testing.assert_allclose(out["map@5"], [(1 / 2 + 2 / 3) / 2, (1 / 3 + 2 / 4) / 2, 1 / 2,
                                              (1 + 1 + 3 / 4 + 4 / 5) / 5, 1, 0])
    np.testing.assert_allclose(out["recall@1"], [0, 0, 0, 1, 1, 0])
    # A ranking shorter than min(n, k) counts the missing ranks as misses.
    short = metrics.per_query(np.asarray([[1, 1]], bool), np.asarray([4]), k=5)
    assert short["mmp@5"][0] == pytest.approx(2 / 4)


def test_mmp_on_small_classes_is_not_a_capped_recall():
    # SOP-like pairs of images per class, on a circle at these angles (radians):
    angles = np.asarray([0.0, 0.10, 0.11, 0.30])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = np.asarray([0, 1, 1, 0])  # pairs: rows 0 and 3, rows 1 and 2
    # Rows 0 and 3 find their twin at rank 3, behind the other pair; rows 1 and 2 at
    # rank 1. n = 1 for all: mMP@5 = P@1, where counting hits in the top 5 would give 1.
    report = metrics.retrieval_metrics(x, labels, k=5)
    assert report["mmp@5"] == pytest.approx((0 + 1 + 1 + 0) / 4)
    assert report["map@5"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 3) / 4)
    assert report["recall@1"] == pytest.approx(0.5)


def test_ties_go_to_the_lowest_index_row():
    # Three identical index rows: the query's ranking is rows 0, 1, 2 in that order.
    q = np.asarray([[1.0, 0.0]], np.float32)
    index = np.asarray([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], np.float32)
    first_negative = metrics.retrieval_metrics(q, [5], index, [4, 5, 5, 5], k=2)
    assert first_negative["recall@1"] == 0.0 and first_negative["mmp@2"] == 0.5
    first_positive = metrics.retrieval_metrics(q, [5], index, [5, 4, 5, 5], k=2)
    assert first_positive["recall@1"] == 1.0 and first_positive["mmp@2"] == 0.5
    # n = 3 positives (rows 1-3 for the first), so mMP@2 = P@2 in both.


def test_merged_index_headline_is_the_mean_over_datasets():
    # Dataset "big": 3 queries, all R@1 hits; dataset "small": 1 query, a miss (its
    # nearest row is of the same label but from "big"). Mean over datasets: (1 + 0) / 2;
    # over queries: 3 / 4.
    x = np.asarray([[1, 0], [1, 0.05], [0, 1], [0, 1.05], [0.7, 0.71], [0.7, 0.7]],
                   np.float32)
    labels = np.asarray([1, 1, 2, 2, 3, 3])
    domains = np.asarray(["big", "big", "big", "big", "small", "big"])
    queries = np.asarray([0, 2, 3, 4])
    report = metrics.retrieval_metrics(
        x[queries], labels[queries], x, labels, k=1, query_ids=queries,
        index_ids=np.arange(6), query_domains=domains[queries], index_domains=domains)
    assert report["domains"]["big"]["recall@1"] == 1.0
    assert report["domains"]["small"]["lone_queries"] == 1
    assert report["recall@1"] == pytest.approx(0.5)
    assert report["over_queries"]["recall@1"] == pytest.approx(0.75)
    assert report["num_queries"] == 4


if __name__ == "__main__":
    knn_lib.TILE = SMALL_TILE
    scores, neighbours, report = _knn_and_metrics()
    print(json.dumps(dict(devices=jax.device_count(), scores=scores.tolist(),
                          neighbours=neighbours.tolist(), metrics=report)))
