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
half the multiply-adds of the general path are done. Both sides pick groups by their
maxima before pairs are left out, as the general path does (a pass over the (B, tile)
scores to mask them first costs as much as a third of the tile's matmul): whole groups
(rows before the block's first, padding) are left out at the group level, and a row or
column has at most own + 1 groups holding a pair left out (equal ids, one group straddling
the padding), so k + own + 1 groups hold the k best; the pairs are left out from those.
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
# Self-kNN: tiles of at most SELF_TILE rows, and query blocks of one tile's rows, whose
# (B, tile) float32 scores take up to 256 MB. Each top_k costs ~1.5 us per row besides
# its ~10 ns per element (XLA:CPU), and a tile has B + tile rows to select for on its
# two sides: larger blocks and tiles spread that over more multiply-adds (O(B * tile)).
# Blocks that start on tiles waste no rows before the block's first.
SELF_TILE = 8192
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
        return _self_knn(index, iids, k, own=own, block_size=block_size, mesh=mesh)
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


def _self_knn(x, ids, k: int, *, own: int, block_size, mesh):
    """knn(x, x, k) with ids (N,) int32 for both sides, each pair of rows scored once (the
    module doc); own: the most rows sharing an id, whose pairs are left out (0: none)."""
    devices = mesh.devices.size
    tile, tiles = tiling(len(x), devices, k, SELF_TILE)
    rows = tile * tiles * devices
    index, index_ids = _sharded_index(x, ids, rows, mesh)
    # Blocks of a tile's rows start on tiles: the first tile of each is the block's own.
    block = GROUP * math.ceil(min(block_size, len(x)) / GROUP) if block_size else tile
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
            index, index_ids, *running, k=k, own=own, tile=tile, mesh=mesh)
        direct.append([a[:stop - start] for a in jax.device_get((scores, found))])
    gathered = jax.jit(lambda *a: a, out_shardings=replicated)(*running)  # from every host
    running_scores, running_rows = (a[:len(x)] for a in jax.device_get(gathered))
    scores = np.concatenate([running_scores, np.concatenate([d[0] for d in direct])], axis=1)
    found = np.concatenate([running_rows, np.concatenate([d[1] for d in direct])], axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # running's rows are the lower
    scores = np.take_along_axis(scores, best, axis=1)
    found = np.take_along_axis(found, best, axis=1).astype(np.int64)
    return scores, np.where(np.isneginf(scores), -1, found)


@functools.partial(jax.jit, static_argnames=("k", "own", "tile", "mesh"),
                   donate_argnames=("running_scores", "running_rows"))
def _self_block(q, qid, start, x, ids, running_scores, running_rows, *, k, own, tile, mesh):
    """Query rows [start, start + B) of a self-kNN: -> their k best among rows >= start
    (B, k) scores and rows, and the running top-k with this block's rows merged in for
    the rows after the block."""
    axis = mesh.axis_names[0]
    shards = jax.shard_map(
        functools.partial(_self_shard, k=k, own=own, tile=tile, axis=axis),
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


def _top_groups_of_columns(scores, k, left_out_groups=None):
    """_top_groups(scores.T, k, left_out_groups) without transposing the (R, C) scores:
    (C, m) candidate scores and rows of each column, rows ascending; left_out_groups
    (R / GROUP,) bool."""
    r, c = scores.shape
    if k * GROUP >= r or r % GROUP:
        return scores.T, jnp.broadcast_to(jnp.arange(r), (c, r))
    maxima = scores.reshape(r // GROUP, GROUP, c).max(axis=1).T  # (C, R / GROUP)
    if left_out_groups is not None:
        maxima = jnp.where(left_out_groups[None, :], -jnp.inf, maxima)
    top = jnp.sort(lax.top_k(maxima, k)[1], axis=1)
    rows = (top[:, :, None] * GROUP + jnp.arange(GROUP)).reshape(c, k * GROUP)
    return scores[rows, jnp.arange(c)[:, None]], rows


def _merge(scores, rows, more_scores, more_rows, k):
    """The k best of two candidate lists (R, .), the first's on ties."""
    scores, best = lax.top_k(jnp.concatenate([scores, more_scores], axis=1), k)
    return scores, jnp.take_along_axis(jnp.concatenate([rows, more_rows], axis=1), best, axis=1)


def _self_shard(q, qid, start, x, ids, running_scores, running_rows, *, k, own, tile, axis):
    """One device's part of _self_block: its rows from `start` on, tile by tile."""
    b, n = q.shape[0], x.shape[0]
    offset = lax.axis_index(axis) * n  # the global row of this shard's first row
    groups = k + own + 1
    padded_query_groups = qid[::GROUP] < 0  # padding comes last

    def one_tile(t, carry):
        scores, rows, run_scores, run_rows = carry
        lo = t * tile
        tile_ids = lax.dynamic_slice_in_dim(ids, lo, tile)
        global_rows = offset + lo + jnp.arange(tile)
        s = jnp.matmul(q, lax.dynamic_slice_in_dim(x, lo, tile).T,
                       precision=lax.Precision.HIGHEST)  # (B, tile)
        # The block's queries against rows >= start (a multiple of GROUP, as is lo).
        left_out_groups = (tile_ids[::GROUP] < 0) | (global_rows[::GROUP] < start)
        cand, cols = _top_groups(s, groups, left_out_groups)
        left_out = (tile_ids[cols] < 0) | (global_rows[cols] < start) | (qid[:, None] < 0)
        if own:
            left_out |= tile_ids[cols] == qid[:, None]
        scores, rows = _merge(scores, rows, jnp.where(left_out, -jnp.inf, cand),
                              global_rows[cols], k)
        # Rows after the block as queries against the block's rows.
        cand, block_rows = _top_groups_of_columns(s, groups, padded_query_groups)  # (tile, m)
        left_out = qid[block_rows] < 0
        if own:
            left_out |= qid[block_rows] == tile_ids[:, None]
        old = (lax.dynamic_slice_in_dim(run_scores, lo, tile),
               lax.dynamic_slice_in_dim(run_rows, lo, tile))
        merged = _merge(*old, jnp.where(left_out, -jnp.inf, cand), start + block_rows, k)
        later = (global_rows >= start + b)[:, None]
        run_scores = lax.dynamic_update_slice_in_dim(
            run_scores, jnp.where(later, merged[0], old[0]), lo, 0)
        run_rows = lax.dynamic_update_slice_in_dim(
            run_rows, jnp.where(later, merged[1], old[1]), lo, 0)
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
