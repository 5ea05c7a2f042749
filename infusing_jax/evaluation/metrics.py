r"""Image->image retrieval metrics with the UnED definitions, from exact kNN rankings.

Query i's neighbours are ranked r = 1, 2, ...; rel_r = 1 when neighbour r is a
positive: same label, and same domain where domains are given. n_i = number of
positives of i in the index, leaving out index rows with i's id (i itself).

    R@1    = rel_1
    mMP@k  = P@min(n_i, k) = sum_{r<=min(n_i, k)} rel_r / min(n_i, k)
    mAP@k  = sum_{r<=k} P@r rel_r / min(n_i, k),     P@r = sum_{s<=r} rel_s / r
    MAP@R  = sum_{r<=R} P@r rel_r / R,   R = n_i     (Musgrave et al., 2020)

mMP@k is UnED's "modified mean precision": precision at rank min(n_i, k), so a
query with 2 positives is judged on its first 2 neighbours, not its first k
(counting hits in the top k over min(n_i, k) would be a capped recall, which
reads far higher where classes are small). docs/method.md has the definitions.

Queries with n_i = 0 ("lone") score 0 in every metric (the authors' way) and are
counted. Metrics are fractions in [0, 1], averaged over queries.

`retrieval_metrics` returns (K = the k used):

    {"recall@1": .., "mmp@K": .., "map@K": .., "map@r": .. or null,
     "num_queries": int, "lone_queries": int,
     "domains": {NAME: {same six keys}, ...},        # when domains are given
     "over_queries": {the four metrics},             # when domains are given
     "coarse": {same keys, "domains": {...}}}        # when coarse labels are given

Without domains the four metrics are means over the queries. With domains they
are UnED's headline: the unweighted mean over the domains of each domain's
mean over its queries (the authors' "average" over datasets), so a large
dataset does not outweigh a small one; the mean over all queries is kept as
"over_queries".

"map@r" is null when some query has more than `max_rank` positives (MAP@R
would need that many neighbours for every query).
"""
import numpy as np

from infusing_jax.evaluation import knn as knn_lib

MAX_RANK = 1000  # deepest ranking fetched for MAP@R
_CHUNK = 8192  # queries per step of the per-query metrics, to bound memory


def per_query(relevant, num_positives, k: int):
    """relevant (Q, M) bool, rank-ordered; num_positives (Q,) -> {metric: (Q,) float64}.

    Ranks past M count as misses. "map@r" is None unless M >= max(num_positives).
    """
    rel = np.asarray(relevant, bool).astype(np.float64)
    n = np.asarray(num_positives)
    ranks = np.arange(1, rel.shape[1] + 1)
    hits = np.cumsum(rel, axis=1)  # hits[:, r - 1] = sum_{s<=r} rel_s
    precision_hits = hits / ranks * rel  # P@r * rel_r
    top = np.maximum(np.minimum(n, k), 1)  # lone queries: every sum below is 0
    hits_at_top = np.take_along_axis(hits, np.minimum(top, rel.shape[1])[:, None] - 1, axis=1)
    out = {"recall@1": rel[:, 0],
           f"mmp@{k}": hits_at_top[:, 0] / top,
           f"map@{k}": precision_hits[:, :k].sum(1) / top,
           "map@r": None}
    if n.max() <= rel.shape[1]:
        within_r = ranks[None, :] <= n[:, None]
        out["map@r"] = (precision_hits * within_r).sum(1) / np.maximum(n, 1)
    return out


def summary(metrics, num_positives, rows=None):
    """Per-query metrics -> their means and the query counts, over `rows` (default all)."""
    rows = np.arange(len(num_positives)) if rows is None else rows
    out = {name: None if values is None else float(np.mean(values[rows]))
           for name, values in metrics.items()}
    out["num_queries"] = int(len(rows))
    out["lone_queries"] = int(np.sum(num_positives[rows] == 0))
    return out


def mean_over_domains(domains: dict, names) -> dict:
    """{metric: unweighted mean over the domains' reports}; None where a domain's is."""
    reports = list(domains.values())
    return {m: None if any(r[m] is None for r in reports)
            else float(np.mean([r[m] for r in reports])) for m in names}


def num_positives(query_keys, index_keys, query_ids=None, index_ids=None):
    """(Q,) number of index rows with the query's key, less those with its id too."""
    n = _count_in(query_keys, index_keys)
    if query_ids is not None:
        width = int(max(query_ids.max(initial=0), index_ids.max(initial=0))) + 1
        n -= _count_in(query_keys * width + query_ids, index_keys * width + index_ids)
    return n


def retrieval_metrics(queries, query_labels, index=None, index_labels=None, k: int = 20, *,
                      query_ids=None, index_ids=None, query_domains=None, index_domains=None,
                      query_coarse_labels=None, index_coarse_labels=None, separate=False,
                      max_rank: int = MAX_RANK, block_size: int = None, mesh=None) -> dict:
    """Exact cosine kNN of queries (Q, D) in index (N, D) -> the module doc's report.

    Labels, ids, domains, coarse labels: (Q,) / (N,) arrays of any dtype. Without an
    index the queries are their own index, each one left out by its id (ids default
    to the row number). With ids, an index row with the query's id is never its
    neighbour. With domains a hit needs domain and label to match; the index is
    merged over domains, or one per domain with `separate`. block_size, mesh: knn's.
    """
    if index is None:
        given = (index_labels, index_ids, index_domains, index_coarse_labels)
        if any(a is not None for a in given):
            raise ValueError("retrieval_metrics: index_* arrays given without an index")
        query_ids = np.arange(len(queries)) if query_ids is None else query_ids
        index, index_labels, index_ids = queries, query_labels, query_ids
        index_domains, index_coarse_labels = query_domains, query_coarse_labels
    queries, index = np.asarray(queries), np.asarray(index)
    pairs = dict(labels=(query_labels, index_labels), ids=(query_ids, index_ids),
                 domains=(query_domains, index_domains),
                 coarse_labels=(query_coarse_labels, index_coarse_labels))
    for name, (q, i) in pairs.items():
        _check(name, q, i, len(queries), len(index), required=name == "labels")
    if separate and query_domains is None:
        raise ValueError("retrieval_metrics: separate=True needs domains")
    if k < 1:
        raise ValueError(f"retrieval_metrics: k={k} must be positive")

    ids = (None, None) if query_ids is None else knn_lib.shared_ids(query_ids, index_ids)
    domains = [pairs["domains"]] if query_domains is not None else []
    granularities = {"fine": pairs["labels"]}
    if query_coarse_labels is not None:
        granularities["coarse"] = pairs["coarse_labels"]
    keys = {name: _codes(*domains, labels) for name, labels in granularities.items()}
    positives = {name: num_positives(*keys[name], *ids) for name in granularities}
    depth = max([k] + [int(n.max()) for n in positives.values() if n.max() <= max_rank])
    neighbours = _neighbours(queries, index, min(depth, len(index)), ids, query_domains,
                             index_domains, separate, block_size, mesh)

    domain_rows = {}
    if query_domains is not None:
        names, which = np.unique(np.asarray(query_domains), return_inverse=True)
        domain_rows = {str(d): np.flatnonzero(which.reshape(-1) == i) for i, d in enumerate(names)}
    out = {}
    for name in granularities:
        metrics = _per_query_chunked(neighbours, *keys[name], positives[name], k)
        report = summary(metrics, positives[name])
        if domain_rows:
            report["domains"] = {d: summary(metrics, positives[name], rows)
                                 for d, rows in domain_rows.items()}
            report["over_queries"] = {m: report[m] for m in metrics}
            report.update(mean_over_domains(report["domains"], metrics))
        if name == "fine":
            out.update(report)
        else:
            out[name] = report
    return out


def _per_query_chunked(neighbours, query_keys, index_keys, positives, k):
    """per_query on the kNN ranking, _CHUNK queries at a time."""
    chunks = []
    for start in range(0, len(neighbours), _CHUNK):
        rows = neighbours[start:start + _CHUNK]
        relevant = (rows >= 0) & (index_keys[rows] == query_keys[start:start + _CHUNK, None])
        chunks.append(per_query(relevant, positives[start:start + _CHUNK], k))
    return {name: None if any(c[name] is None for c in chunks)
            else np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def _neighbours(queries, index, depth, ids, query_domains, index_domains, separate, block_size,
                mesh):
    """(Q, depth) int64 index rows, nearest first, -1 past the end; per domain if separate."""
    query_ids, index_ids = ids
    if not separate:
        return knn_lib.knn(queries, index, depth, query_ids=query_ids, index_ids=index_ids,
                           block_size=block_size, mesh=mesh)[1]
    query_domains, index_domains = np.asarray(query_domains), np.asarray(index_domains)
    out = np.full((len(queries), depth), -1, np.int64)
    for domain in np.unique(query_domains):
        q, i = np.flatnonzero(query_domains == domain), np.flatnonzero(index_domains == domain)
        if len(i):
            sub = knn_lib.knn(queries[q], index[i], depth,
                              query_ids=None if query_ids is None else query_ids[q],
                              index_ids=None if index_ids is None else index_ids[i],
                              block_size=block_size, mesh=mesh)[1]
            out[q] = np.where(sub >= 0, i[sub], -1)
    return out


def _codes(*columns):
    """(query values (Q,), index values (N,)) per column -> int64 keys, equal rows -> equal keys."""
    query_keys, index_keys = 0, 0
    for query_values, index_values in columns:
        q, i = knn_lib.shared_ids(query_values, index_values)
        width = int(max(q.max(), i.max())) + 1
        query_keys = query_keys * width + q.astype(np.int64)
        index_keys = index_keys * width + i.astype(np.int64)
    return query_keys, index_keys


def _count_in(values, population):
    """(len(values),) how many times each value occurs in population."""
    unique, counts = np.unique(population, return_counts=True)
    at = np.searchsorted(unique, values)
    found = at < len(unique)
    found[found] = unique[at[found]] == values[found]
    return np.where(found, np.append(counts, 0)[at], 0)


def _check(name, query_values, index_values, num_queries, num_index, required=False):
    """One-line errors for a missing, one-sided or wrongly sized per-row array."""
    if required and query_values is None:
        raise ValueError(f"retrieval_metrics: query_{name} is required")
    if (query_values is None) != (index_values is None):
        raise ValueError(f"retrieval_metrics: give query_{name} and index_{name} together")
    for side, values, rows in (("query", query_values, num_queries),
                               ("index", index_values, num_index)):
        if values is not None and len(values) != rows:
            raise ValueError(f"retrieval_metrics: {side}_{name} has {len(values)} entries for "
                             f"{rows} {side} rows")
