"""Exact cosine k-nearest neighbours, in tiles, with the index sharded over devices.

score(i, j) = <q_i, x_j> / (|q_i| |x_j|): rows are L2-normalised here (the index
on the host, shard by shard), so any embeddings may be passed. Matmuls run in
true float32 (precision HIGHEST).

Queries go `block_size` at a time; the index is split by rows over a 1-D device
mesh, and each device scores its shard one tile of at most TILE rows at a time,
a (B, TILE) matrix, keeping candidates from each; then the candidates of all
tiles and devices are merged by top-k. The (Q, N) matrix never exists: memory
per device is its index shard, a (B, TILE) tile of scores and the candidates.

Candidates of a tile: its columns are cut into groups of GROUP consecutive rows.
A group holding one of the tile's k best scores has its maximum among the k best
too, so the k groups with the largest maxima hold them. Maxima are taken before
rows are left out, so a group may rank too high for holding a left-out row: one
per index row sharing a query's id (`own`), and one for the padding after the
last row. k + own + 1 groups hold the k best, exactly.

Ties go to the lowest index row. A query never retrieves an index row with the
same id (itself, when the queries are in the index), whatever its rank.

Self-kNN (the queries are the index: the same array, the same ids or none) uses
score(i, j) = score(j, i) and computes each pair once: query block a (rows
[s, s + B)) is scored against the rows from s on only. Its scores serve twice:
row by row for the block's own queries (rows >= s), and column by column for the
later rows as queries, whose candidates among the block's rows are merged into a
running (N, k) top-k kept on the devices, sharded like the index. A query's k
best are then the k best of its running top-k (rows < s) and its own block's
(rows >= s): every row is scored once for it, so the result is exact, and about
half the multiply-adds of the general path are done. Here the group maxima are
taken after rows are left out, so k groups hold the k best.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

GROUP = 16
TILE = 16384  # most index rows a device scores at once
# Self-kNN: query blocks and tiles whose (B, tile) float32 scores take 128 MB. Larger
# blocks spread the per-tile cost of selecting candidates for the tile's rows (O(tile))
# over more multiply-adds (O(B * tile)); smaller tiles waste less of the tile that
# straddles the block's first row.
SELF_BLOCK, SELF_TILE = 4096, 8192
BLOCK_BYTES = 2 ** 28  # float32 (B, TILE) scores or (B, candidates); sets the default block_size
_NO_ID = -2  # query id when there is nothing to leave out; index padding rows have id -1
_EPS = 1e-12


def shared_ids(query_ids, index_ids):
    """Ids of any dtype (str, int) -> (query (Q,), index (N,)) int32, equal ids -> equal ints."""
    query_ids, index_ids = np.asarray(query_ids), np.asarray(index_ids)
    _, codes = np.unique(np.concatenate([query_ids, index_ids]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int32)
    return codes[:len(query_ids)], codes[len(query_ids):]


def default_mesh() -> Mesh:
    """All devices on one axis."""
    return Mesh(np.asarray(jax.devices()), ("index",))


def tiling(index_rows: int, devices: int, k: int, most: int = None):
    """-> (tile, tiles): each device scores `tiles` tiles of `tile` rows (a multiple of
    GROUP, at most `most`, default TILE)."""
    rows = max(math.ceil(index_rows / devices), k)
    tiles = math.ceil(rows / (most or TILE))
    return GROUP * math.ceil(rows / tiles / GROUP), tiles


def default_block_size(num_queries: int, floats_per_query: int) -> int:
    """Queries per block: a power of two in [8, 1024] within BLOCK_BYTES, not above Q."""
    block = 2 ** int(math.log2(max(BLOCK_BYTES // (4 * floats_per_query), 8)))
    return int(min(block, 1024, 8 * math.ceil(num_queries / 8)))


def knn(queries, index, k: int, *, query_ids=None, index_ids=None, block_size: int = None,
        mesh: Mesh = None):
    """The k index rows most similar (cosine) to each query.

    queries (Q, D), index (N, D): host arrays; `queries is index` is a self-kNN (each
    pair scored once, see the module doc) when the ids are the same or none.
    query_ids (Q,), index_ids (N,): optional ids of any dtype; index row j is never a
    neighbour of query i if their ids are equal.
    mesh: a 1-D mesh to shard the index over (default: all devices).
    Returns scores (Q, k) float32, descending, and neighbours (Q, k) int64 rows of
    `index`, ties to the lowest row; -1 with score -inf where fewer than k rows qualify.
    """
    queries, index = np.asarray(queries), np.asarray(index)
    if queries.ndim != 2 or index.ndim != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"knn: queries {queries.shape} and index {index.shape} must be "
                         "(Q, D) and (N, D)")
    if not len(queries) or not len(index) or k < 1:
        raise ValueError(f"knn: {len(queries)} queries, {len(index)} index rows, k={k}: "
                         "each must be positive")
    if (query_ids is None) != (index_ids is None):
        raise ValueError("knn: give query_ids and index_ids together, or neither")
    if query_ids is None:
        qids, iids = np.full(len(queries), _NO_ID, np.int32), np.arange(len(index), dtype=np.int32)
        own = 0
    else:
        qids, iids = shared_ids(query_ids, index_ids)
        own = int(np.bincount(iids, minlength=qids.max() + 1)[qids].max())
    mesh = mesh or default_mesh()
    if len(mesh.axis_names) != 1:
        raise ValueError(f"knn: mesh axes {mesh.axis_names}: give a 1-D mesh")
    if queries is index and (query_ids is None or np.array_equal(qids, iids)):
        return _self_knn(index, iids, k, exclude_own=query_ids is not None,
                         block_size=block_size, mesh=mesh)
    devices = mesh.devices.size
    tile, tiles = tiling(len(index), devices, k)
    x, ids = _sharded_index(index, iids, tile * tiles * devices, mesh)
    candidates = tiles * min(tile, (k + own + 1) * GROUP)
    block = block_size or default_block_size(len(queries), max(tile, candidates))

    replicated = NamedSharding(mesh, P())
    scores, rows = [], []
    for start in range(0, len(queries), block):
        q = np.zeros((block, queries.shape[1]), np.float32)
        qid = np.full(block, _NO_ID, np.int32)
        q[:len(queries) - start] = queries[start:start + block]
        qid[:len(queries) - start] = qids[start:start + block]
        s, r = jax.device_get(_block_knn(jax.device_put(q, replicated),
                                         jax.device_put(qid, replicated), x, ids,
                                         k=k, own=own, tile=tile, mesh=mesh))
        scores.append(s)
        rows.append(r)
    scores = np.concatenate(scores)[:len(queries)]
    rows = np.concatenate(rows)[:len(queries)].astype(np.int64)
    return scores, np.where(np.isneginf(scores), -1, rows)


def _self_knn(x, ids, k: int, *, exclude_own: bool, block_size, mesh):
    """knn(x, x, k) with ids (N,) int32 for both sides (leaving out equal ids when
    exclude_own), each pair of rows scored once (the module doc)."""
    devices = mesh.devices.size
    tile, tiles = tiling(len(x), devices, k, SELF_TILE)
    rows = tile * tiles * devices
    index, index_ids = _sharded_index(x, ids, rows, mesh)
    block = block_size or min(SELF_BLOCK, GROUP * math.ceil(len(x) / GROUP))
    sharded = NamedSharding(mesh, P(mesh.axis_names[0]))
    running = (jax.device_put(np.full((rows, k), -np.inf, np.float32), sharded),
               jax.device_put(np.full((rows, k), -1, np.int32), sharded))
    replicated = NamedSharding(mesh, P())
    direct = []
    for start in range(0, len(x), block):
        stop = min(start + block, len(x))
        q = np.zeros((block, x.shape[1]), np.float32)
        q[:stop - start] = _normalised(x[start:stop])
        qid = np.full(block, -1, np.int32)
        qid[:stop - start] = ids[start:stop]
        scores, found, *running = _self_block(
            jax.device_put(q, replicated), jax.device_put(qid, replicated), np.int32(start),
            index, index_ids, *running, k=k, tile=tile, exclude_own=exclude_own, mesh=mesh)
        direct.append([a[:stop - start] for a in jax.device_get((scores, found))])
    gathered = jax.jit(lambda *a: a, out_shardings=replicated)(*running)  # from every host
    running_scores, running_rows = (a[:len(x)] for a in jax.device_get(gathered))
    scores = np.concatenate([running_scores, np.concatenate([d[0] for d in direct])], axis=1)
    found = np.concatenate([running_rows, np.concatenate([d[1] for d in direct])], axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # running's rows are the lower
    scores = np.take_along_axis(scores, best, axis=1)
    found = np.take_along_axis(found, best, axis=1).astype(np.int64)
    return scores, np.where(np.isneginf(scores), -1, found)


@functools.partial(jax.jit, static_argnames=("k", "tile", "exclude_own", "mesh"),
                   donate_argnames=("running_scores", "running_rows"))
def _self_block(q, qid, start, x, ids, running_scores, running_rows, *, k, tile, exclude_own,
                mesh):
    """Query rows [start, start + B) of a self-kNN: -> their k best among rows >= start
    (B, k) scores and rows, and the running top-k with this block's rows merged in for
    the rows after the block."""
    axis = mesh.axis_names[0]
    shards = jax.shard_map(
        functools.partial(_self_shard, k=k, tile=tile, exclude_own=exclude_own, axis=axis),
        mesh=mesh, in_specs=(P(), P(), P(), P(axis), P(axis), P(axis), P(axis)),
        out_specs=(P(None, axis), P(None, axis), P(axis), P(axis)))
    scores, rows, running_scores, running_rows = shards(q, qid, start, x, ids, running_scores,
                                                        running_rows)
    return (*_merge_devices(scores, rows, k, mesh), running_scores, running_rows)


def _top_groups(scores, k, left_out_groups=None):
    """(R, C) scores -> (R, m) candidate scores and columns, columns ascending: the k groups
    with the largest maxima (the module doc's groups; all columns if few). They hold each
    row's k best where left-out entries are -inf; left_out_groups (C / GROUP,) bool:
    groups never taken (the padding)."""
    r, c = scores.shape
    if k * GROUP >= c or c % GROUP:
        return scores, jnp.broadcast_to(jnp.arange(c), scores.shape)
    maxima = scores.reshape(r, c // GROUP, GROUP).max(axis=2)
    if left_out_groups is not None:
        maxima = jnp.where(left_out_groups[None, :], -jnp.inf, maxima)
    top = jnp.sort(lax.top_k(maxima, k)[1], axis=1)
    cols = (top[:, :, None] * GROUP + jnp.arange(GROUP)).reshape(r, k * GROUP)
    return jnp.take_along_axis(scores, cols, axis=1), cols


def _top_groups_of_columns(scores, k):
    """_top_groups(scores.T, k) without transposing the (R, C) scores: (C, m) candidate
    scores and rows of each column, rows ascending."""
    r, c = scores.shape
    if k * GROUP >= r or r % GROUP:
        return scores.T, jnp.broadcast_to(jnp.arange(r), (c, r))
    maxima = scores.reshape(r // GROUP, GROUP, c).max(axis=1).T  # (C, R / GROUP)
    top = jnp.sort(lax.top_k(maxima, k)[1], axis=1)
    rows = (top[:, :, None] * GROUP + jnp.arange(GROUP)).reshape(c, k * GROUP)
    return scores[rows, jnp.arange(c)[:, None]], rows


def _merge(scores, rows, more_scores, more_rows, k):
    """The k best of two candidate lists (R, .), the first's on ties."""
    scores, best = lax.top_k(jnp.concatenate([scores, more_scores], axis=1), k)
    return scores, jnp.take_along_axis(jnp.concatenate([rows, more_rows], axis=1), best, axis=1)


def _self_shard(q, qid, start, x, ids, running_scores, running_rows, *, k, tile, exclude_own,
                axis):
    """One device's part of _self_block: its rows from `start` on, tile by tile."""
    b, n = q.shape[0], x.shape[0]
    offset = lax.axis_index(axis) * n  # the global row of this shard's first row
    real_queries = qid >= 0

    def one_tile(t, carry):
        scores, rows, run_scores, run_rows = carry
        lo = t * tile
        tile_ids = lax.dynamic_slice_in_dim(ids, lo, tile)
        global_rows = offset + lo + jnp.arange(tile)
        s = jnp.matmul(q, lax.dynamic_slice_in_dim(x, lo, tile).T,
                       precision=lax.Precision.HIGHEST)  # (B, tile)
        keep = real_queries[:, None] & (tile_ids[None, :] >= 0)
        if exclude_own:
            keep &= tile_ids[None, :] != qid[:, None]
        # The block's queries against rows >= start.
        direct = jnp.where(keep & (global_rows[None, :] >= start), s, -jnp.inf)
        cand, cols = _top_groups(direct, k)
        scores, rows = _merge(scores, rows, cand, global_rows[cols], k)
        # Rows after the block as queries against the block's rows.
        later = keep & (global_rows[None, :] >= start + b)
        cand, cols = _top_groups_of_columns(jnp.where(later, s, -jnp.inf), k)  # (tile, m)
        merged = _merge(lax.dynamic_slice_in_dim(run_scores, lo, tile),
                        lax.dynamic_slice_in_dim(run_rows, lo, tile), cand, start + cols, k)
        run_scores = lax.dynamic_update_slice_in_dim(run_scores, merged[0], lo, 0)
        run_rows = lax.dynamic_update_slice_in_dim(run_rows, merged[1], lo, 0)
        return scores, rows, run_scores, run_rows

    first = jnp.clip((start - offset) // tile, 0, n // tile)  # tiles below start: skipped
    init = (jnp.full((b, k), -jnp.inf, q.dtype), jnp.full((b, k), -1, jnp.int32))
    init = (*lax.pcast(init, (axis,), to="varying"), running_scores, running_rows)
    scores, rows, running_scores, running_rows = lax.fori_loop(first, n // tile, one_tile, init)
    return scores, rows, running_scores, running_rows


def _normalised(rows):
    """float32 (R, D) rows / their L2 norms (zero rows stay zero)."""
    out = np.asarray(rows, np.float32).copy()
    out /= np.maximum(np.sqrt(np.einsum("nd,nd->n", out, out)), _EPS)[:, None]
    return out


def _sharded_index(index, ids, rows, mesh):
    """The L2-normalised index (zero rows past N) and its ids (-1 past N), `rows` rows
    split over the mesh, built one shard at a time."""
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))

    def embeddings(part):
        start, stop, _ = part[0].indices(rows)
        out = np.zeros((stop - start, index.shape[1]), np.float32)
        out[:len(index[start:stop])] = _normalised(index[start:stop])
        return out

    def index_ids(part):
        start, stop, _ = part[0].indices(rows)
        out = np.full(stop - start, -1, np.int32)
        out[:len(ids[start:stop])] = ids[start:stop]
        return out

    return (jax.make_array_from_callback((rows, index.shape[1]), sharding, embeddings),
            jax.make_array_from_callback((rows,), sharding, index_ids))


@functools.partial(jax.jit, static_argnames=("k", "own", "tile", "mesh"))
def _block_knn(q, qid, x, ids, *, k, own, tile, mesh):
    """(B, D) queries -> (B, k) scores and global index rows, merged over the mesh."""
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), _EPS)
    axis = mesh.axis_names[0]
    shards = jax.shard_map(
        functools.partial(_shard_top_k, k=k, own=own, tile=tile, axis=axis), mesh=mesh,
        in_specs=(P(), P(), P(axis), P(axis)), out_specs=P(None, axis))
    return _merge_devices(*shards(q, qid, x, ids), k, mesh)


def _merge_devices(scores, rows, k, mesh):
    """(B, devices * k) scores and rows, devices in row order -> the (B, k) best, replicated;
    top_k is stable, so equal scores keep the lower row first."""
    scores, best = lax.top_k(scores, k)
    rows = jnp.take_along_axis(rows, best, axis=1)
    return lax.with_sharding_constraint((scores, rows), NamedSharding(mesh, P()))


def _shard_top_k(q, qid, x, ids, *, k, own, tile, axis):
    """The k best of this device's rows: (B, k) scores, descending, and global rows."""
    b, n = q.shape[0], x.shape[0]
    groups = k + own + 1

    def candidates(start):
        """(B, C) scores and rows of one tile's candidates, rows ascending."""
        scores = jnp.matmul(q, lax.dynamic_slice_in_dim(x, start, tile).T,
                            precision=lax.Precision.HIGHEST)
        padding = lax.dynamic_slice_in_dim(ids, start, tile)[::GROUP] < 0  # padding comes last
        scores, cols = _top_groups(scores, groups, padding)
        return scores, start + cols

    scores, rows = lax.map(candidates, jnp.arange(0, n, tile))  # (tiles, B, C)
    scores = scores.transpose(1, 0, 2).reshape(b, -1)
    rows = rows.transpose(1, 0, 2).reshape(b, -1)
    left_out = (ids[rows] == qid[:, None]) | (ids[rows] < 0)
    scores, best = lax.top_k(jnp.where(left_out, -jnp.inf, scores), k)
    return scores, jnp.take_along_axis(rows, best, axis=1) + lax.axis_index(axis) * n
