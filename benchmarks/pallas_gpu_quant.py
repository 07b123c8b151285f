"""Timing of the Mosaic GPU quant_matmul against a bf16 jnp.dot (cuBLAS via XLA) and the jnp reference.

Usage: python3 benchmarks/pallas_gpu_quant.py OUT_DIR   (writes bench_quant_mgpu.json / .md, row by row)

Weights rotate through enough copies to exceed L2 (50 MiB), so decode rows measure HBM.
Small M: TB/s of weight (+scale/zero) bytes; large M: TFLOP/s (2MNK). Median of ITERS after WARMUP.
"""
import json
import math
import sys
import traceback

import jax
import jax.numpy as jnp

import lepton_kernels.jax as lj
from _jax_timing import cupti_ms, wall_ms
from lepton_kernels.jax.gpu import quant_matmul as gq

out_dir = sys.argv[1]
WARMUP, ITERS = 3, 20
ROTATE_BYTES = 256 << 20
SHAPES = [(4096, 4096), (14336, 4096)]  # N, K
MS = [1, 16, 4096]
SCHEMES = [("w8a16", -1, True), ("w4a16", 128, True), ("w4a16", 128, False), ("w8a8", -1, True), ("fp8", -1, True)]
only = set(sys.argv[2:])  # optional scheme filter


def median_us(fn, x, weights):
    """GPU time per call: one jitted function calls fn on every weight copy (so each reads its
    weights from HBM), timed by CUPTI (Mosaic GPU's profiler.measure: kernel time, no host
    dispatch); the median over ITERS runs divided by the number of copies. Wall clock if
    CUPTI is unavailable."""
    many = jax.jit(lambda x, ws: tuple(fn(x, w) for w in ws))
    ws = tuple(weights)
    wall = wall_ms(many, x, ws, warmup=WARMUP, iters=ITERS)  # also the warm-up
    gpu = cupti_ms(many, x, ws, iters=ITERS)
    return (wall if gpu is None else gpu) * 1e3 / len(ws)


rows = []
device = jax.devices()[0]


def dump():
    json.dump({"gpu": device.device_kind, "jax": jax.__version__, "sms": gq.num_sms(), "dtype": "bf16 activations",
               "timing": f"CUPTI kernel time, median of {ITERS} runs after {WARMUP} warm-ups, each run calling the op once per weight copy (>= 256 MiB of copies) / copies",
               "rows": rows}, open(f"{out_dir}/bench_quant_mgpu.json", "w"), indent=1)
    with open(f"{out_dir}/bench_quant_mgpu.md", "w") as f:
        f.write(f"# quant_matmul (JAX Mosaic GPU), {device.device_kind}, jax {jax.__version__}, bf16 x\n\n"
                "TB/s = weight (+scales/zeros) bytes / time (M <= 16); TFLOP/s = 2MNK / time (M >= 256)\n\n"
                "| N x K | M | impl | us | TB/s | TFLOP/s | config |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['N']}x{r['K']} | {r['M']} | {r['impl']} | {r.get('us')} | {r.get('TB/s', '')} | "
                    f"{r.get('TFLOP/s', '')} | {r.get('config', r.get('error', ''))} |\n")


def record(n, k, m, impl, fn, x, weights, nbytes, config=None):
    row = {"N": n, "K": k, "M": m, "impl": impl}
    try:
        us = median_us(fn, x, weights)
        row["us"] = round(us, 2)
        row["TB/s"] = round(nbytes / us / 1e6, 3)
        row["TFLOP/s"] = round(2 * m * n * k / us / 1e6, 1)
        if config is not None:
            row["config"] = str(config).replace("GpuQuantConfig", "")
    except Exception as exc:
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    rows.append(row)
    print(row, flush=True)
    dump()


for n, k in SHAPES:
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32).astype(jnp.bfloat16)
    w_bytes = n * k * 2
    dense = [w] + [w + i for i in range(1, math.ceil(ROTATE_BYTES / w_bytes))]
    for m in MS:
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
        record(n, k, m, "bf16 jnp.dot", jax.jit(lambda x, w: jnp.dot(x, w.T)), x, dense, w_bytes)
    for scheme, g, sym in SCHEMES:
        if only and scheme not in only:
            continue
        name = scheme + ("" if g == -1 else f" g{g} {'sym' if sym else 'asym'}")
        qw = lj.quantize_weight(w, scheme, group_size=g, symmetric=sym)
        copies = [qw] + [jax.tree.map(jnp.copy, qw)
                         for _ in range(1, math.ceil(ROTATE_BYTES / qw.nbytes))]
        kernel = jax.jit(lambda x, qw: lj.quant_matmul(x, qw, backend="gpu"))
        reference = jax.jit(lambda x, qw: lj.quant_matmul(x, qw, backend="reference"))
        kp = qw.packed.shape[0] * (8 if scheme == "w4a16" else 1)
        for m in MS:
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
            config = gq.default_config(scheme, m, n, kp, group_size=g, symmetric=sym)
            record(n, k, m, f"mgpu {name}", kernel, x, copies, qw.nbytes, config)
            if m == 1:
                record(n, k, m, f"jnp ref {name}", reference, x, copies[:2], qw.nbytes)
        del copies
    del dense
dump()
print(open(f"{out_dir}/bench_quant_mgpu.md").read())
