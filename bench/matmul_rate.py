"""Matmul rates to hold a step's FLOP/s against: (m, k) @ (k, n) products timed in JAX
and in PyTorch. One product is 2 * m * k * n FLOPs.

Timings are named 'MxKxN' (JAX) and 'torch_MxKxN' (PyTorch); `flops(name)` reads
the product's FLOPs back from the name.
"""
import time

import numpy as np

BIG_N = 4096  # the square product timed beside every step sample


def sweep_shapes(tokens: int, width: int, mlp_dim: int) -> tuple:
    """(m, k, n, repeats) of the sweep: 1024^3, 2048^3 and a step's own MLP products
    (tokens = batch * patches: forward (T, D) @ (D, M), weight gradient (D, T) @ (T, M),
    forward (T, M) @ (M, D)); smaller ones often block better in cache than 4096^3."""
    return ((1024, 1024, 1024, 16), (2048, 2048, 2048, 2), (tokens, width, mlp_dim, 4),
            (width, tokens, mlp_dim, 4), (tokens, mlp_dim, width, 4))


def name(m: int, k: int, n: int, framework: str = "jax") -> str:
    return f"{m}x{k}x{n}" if framework == "jax" else f"{framework}_{m}x{k}x{n}"


def flops(timing_name: str) -> int:
    """2 * m * k * n of a name as `name` writes it."""
    return 2 * int(np.prod([int(x) for x in timing_name.split("_")[-1].split("x")]))


def jax_matmul(m: int, k: int, n: int, repeats: int = 1, dtype: str = "float32"):
    """-> run() -> seconds per product of `repeats` jnp products dispatched back to back
    (float32 at precision 'highest')."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
    precision = "highest" if dtype == "float32" else None
    product = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            out = product(a, b)
        out.block_until_ready()
        return (time.perf_counter() - start) / repeats
    return run


def torch_matmul(m: int, k: int, n: int, repeats: int = 1):
    """-> run() -> seconds per product of `repeats` float32 torch products (MKL's sgemm
    on x86)."""
    import torch
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b  # pylint: disable=pointless-statement
        return (time.perf_counter() - start) / repeats
    return run
