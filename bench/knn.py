r"""Exact kNN against faiss-cpu in one run: every index row is a query, itself left out.

    python bench/knn.py [--num_rows=100000] [--dim=768] [--k=20] [--chunks=1]

Data: `num_rows` x `dim` float32 standard normal rows, L2-normalised, seed 0.
Ours: `evaluation.knn.knn` with the row numbers as ids, in a subprocess that
does nothing else, so that its peak resident set (getrusage ru_maxrss: the data,
JAX, XLA's buffers) is ours alone. faiss: `IndexFlatIP` (inner product = cosine
on normalised rows), search for k + 1, then each query's own row dropped.

The queries go in `chunks` parts (whole multiples of 1024 queries, our default
block), ours and faiss taking turns, so that both see the same load on a shared
machine; each part is a whole call (ours: index upload and, the first time,
compilation; faiss: index build and search). With one part (the default) ours is
called with the index as its queries, `knn(x, x)`, as the retrieval evaluation
calls it: the self-kNN, which scores each pair of rows once (evaluation/knn.py);
with more, each part is a set of queries of its own (the general path, every
pair scored from both sides, as faiss does). The last line
is JSON: `our_seconds`, `faiss_seconds`, `speed_vs_faiss` (faiss / ours),
`peak_memory_gb` (ours), `same_neighbours` (fraction of queries whose k
neighbours equal faiss's, in order; float32 near-ties may swap), and, as the
machine may be shared, each side's CPU seconds and the 1-minute load average.

faiss-cpu's wheels bundle an OpenBLAS that picks its kernels by CPU model, and one
too old for the host falls back to its generic "Prescott" kernels (on an Emerald
Rapids host, faiss-cpu 1.15.1's OpenBLAS 0.3.15 did: 6x slower). The bench then
sets OPENBLAS_CORETYPE for faiss to the newest kernels the host's instructions allow
(SkylakeX with AVX-512, Haswell with AVX2) and says so in `faiss_blas`.
"""
import ctypes
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

_ROWS = flags.DEFINE_integer("num_rows", 100_000, "Index rows, each also a query.")
_DIM = flags.DEFINE_integer("dim", 768, "Embedding dimension.")
_K = flags.DEFINE_integer("k", 20, "Neighbours per query.")
_CHUNKS = flags.DEFINE_integer("chunks", 1, "Query parts, ours and faiss taking turns; 1: "
                               "ours is the self-kNN.")
_PROBE = flags.DEFINE_bool("print_openblas_core", False,
                            "Internal: print the kernels faiss's OpenBLAS picks.")
_SERVE = flags.DEFINE_string("serve_ours_to", None,
                             "Internal: run ours on the 'start stop' lines of stdin, "
                             "saving neighbours in this folder.")


def data(rows: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def serve_ours(x, k, folder):
    """For each 'start stop' line of stdin: our kNN of x[start:stop] in x; prints its wall
    and CPU seconds."""
    from infusing_jax.evaluation import knn  # pylint: disable=import-outside-toplevel
    ids = np.arange(len(x))
    for line in sys.stdin:
        start, stop = map(int, line.split())
        begin, begin_cpu = time.perf_counter(), time.process_time()
        queries = x if (start, stop) == (0, len(x)) else x[start:stop]  # x: the self-kNN
        _, neighbours = knn.knn(queries, x, k, query_ids=ids[start:stop], index_ids=ids)
        seconds, cpu = time.perf_counter() - begin, time.process_time() - begin_cpu
        np.save(os.path.join(folder, f"{start}.npy"), neighbours)
        print(seconds, cpu, flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    print(json.dumps(dict(peak_memory_gb=peak_gb)), flush=True)


def openblas_core() -> str:
    """The kernels faiss's bundled OpenBLAS picked in this process ('' if it has none)."""
    import faiss  # pylint: disable=import-outside-toplevel
    libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), os.pardir, "faiss_cpu.libs",
                                  "libopenblas*"))
    if not libs:
        return ""
    lib = ctypes.CDLL(libs[0])  # faiss's own copy, already loaded
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()


def faiss_blas() -> str:
    """faiss's OpenBLAS kernels, set to the host's best where OpenBLAS fell back to its
    generic ones (OPENBLAS_CORETYPE is read when faiss loads: call before importing it)."""
    core = subprocess.run([sys.executable, __file__, "--print_openblas_core"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if core != "Prescott" or "OPENBLAS_CORETYPE" in os.environ:
        return core
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        cpu_flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    best = "SkylakeX" if "avx512f" in cpu_flags else "Haswell" if "avx2" in cpu_flags else None
    if not best:
        return core
    os.environ["OPENBLAS_CORETYPE"] = best
    return f"{best} (OPENBLAS_CORETYPE; OpenBLAS fell back to {core}: CPU unknown to it)"


def faiss_knn(x, start, stop, k):
    """-> (wall seconds, CPU seconds, neighbours of x[start:stop]) by faiss IndexFlatIP, own
    rows dropped."""
    import faiss  # pylint: disable=import-outside-toplevel
    begin, begin_cpu = time.perf_counter(), time.process_time()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x[start:stop], k + 1)
    own = found == np.arange(start, stop)[:, None]
    own[~own.any(axis=1), -1] = True  # the query is not among them: drop the last instead
    neighbours = found[~own].reshape(stop - start, k)
    return time.perf_counter() - begin, time.process_time() - begin_cpu, neighbours


def main(argv):
    del argv
    if _PROBE.value:
        print(openblas_core())
        return
    x = data(_ROWS.value, _DIM.value)
    if _SERVE.value:
        serve_ours(x, _K.value, _SERVE.value)
        return
    ours_s, faiss_s, ours_cpu, faiss_cpu, same = 0.0, 0.0, 0.0, 0.0, 0
    with tempfile.TemporaryDirectory() as folder:
        child = subprocess.Popen(
            [sys.executable, __file__, f"--num_rows={_ROWS.value}", f"--dim={_DIM.value}",
             f"--k={_K.value}", f"--serve_ours_to={folder}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        blas = faiss_blas()  # after starting ours: OPENBLAS_CORETYPE is faiss's alone
        print(f"faiss's BLAS kernels: {blas}", flush=True)
        step = 1024 * -(-len(x) // (1024 * _CHUNKS.value))
        for start in range(0, len(x), step):
            stop = min(start + step, len(x))
            child.stdin.write(f"{start} {stop}\n")
            child.stdin.flush()
            reply = child.stdout.readline()
            if not reply:
                sys.exit(f"error: our run ended early (exit status {child.wait()})")
            seconds, cpu = map(float, reply.split())
            ours_s, ours_cpu = ours_s + seconds, ours_cpu + cpu
            seconds, cpu, theirs = faiss_knn(x, start, stop, _K.value)
            faiss_s, faiss_cpu = faiss_s + seconds, faiss_cpu + cpu
            same += int(np.sum(np.all(np.load(os.path.join(folder, f"{start}.npy")) == theirs,
                                      axis=1)))
            print(f"queries {start}-{stop}: ours {ours_s:.1f} s, faiss {faiss_s:.1f} s so far",
                  flush=True)
        child.stdin.close()
        peak_gb = json.loads(child.stdout.read().strip().splitlines()[-1])["peak_memory_gb"]
        child.wait()
    print(json.dumps(dict(our_seconds=round(ours_s, 2), faiss_seconds=round(faiss_s, 2),
                          speed_vs_faiss=round(faiss_s / ours_s, 3),
                          peak_memory_gb=round(peak_gb, 3),
                          same_neighbours=round(same / len(x), 5),
                          our_cpu_seconds=round(ours_cpu, 2),
                          faiss_cpu_seconds=round(faiss_cpu, 2),
                          load_average=round(os.getloadavg()[0], 2), faiss_blas=blas,
                          self_knn=_CHUNKS.value == 1)))


if __name__ == "__main__":
    app.run(main)
