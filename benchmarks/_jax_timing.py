"""Timers shared by the JAX benchmark scripts (run as ``python benchmarks/<script>.py``).

``wall_ms``: host wall clock of a jitted call with ``block_until_ready`` (launch and dispatch
included), median after warm-ups. ``cupti_ms``: the GPU time of every kernel the call launches,
from CUPTI through Mosaic GPU's profiler (no host cost), median; None where CUPTI is unavailable.
"""
import statistics
import time

import jax


def wall_ms(fn, *args, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cupti_ms(fn, *args, iters: int = 20):
    try:
        from jax.experimental.mosaic.gpu import profiler
        _, times = profiler.measure(fn, iterations=iters)(*args)
    except Exception as exc:  # CUPTI unavailable (no GPU), or the API moved
        print(f"cupti timing unavailable: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None
    times = [t for t in times if t is not None]
    return statistics.median(times) if times else None
