"""Timing of the Mosaic GPU paged decode against the jnp reference (same paged data) and cuDNN
through jax (the same K/V laid out contiguous).

Usage: python3 benchmarks/pallas_gpu_paged.py OUT_DIR   (writes bench_paged_mgpu.json and .md)

Decode, bf16, Hq=32, Hkv=8, D=128, every sequence L tokens, pages at random places of the
cache. GB/s counts the K/V bytes read once (2 * B * L * Hkv * D * 2). Times: median over
ITERS calls after WARMUP; "gpu" is the summed kernel time per call from CUPTI (Mosaic GPU's
profiler.measure) when it works, "wall" the host wall clock of the jitted call with
block_until_ready (includes launch overhead).
"""
import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import lepton_kernels.jax as lj
from _jax_timing import cupti_ms, wall_ms
from lepton_kernels.jax.gpu import paged_attention as gpa

out_dir = sys.argv[1]
HQ, HKV, D, DTYPE = 32, 8, 128, jnp.bfloat16
SHAPES = [(1, 32768), (16, 4096), (64, 4096), (128, 2048)]
BLOCK_SIZES = (16, 128)
WARMUP, ITERS = 3, 30
SCALE = D ** -0.5


def timed(row, name, fn, args, kv_bytes):
    try:
        wall = wall_ms(fn, *args, warmup=WARMUP, iters=ITERS)
        gpu = cupti_ms(fn, *args, iters=ITERS)
        best = gpu if gpu is not None else wall
        row[name] = round(kv_bytes / best / 1e6, 1)  # GB/s
        row[name + "_us"] = round(best * 1e3, 1)
        row[name + "_wall_us"] = round(wall * 1e3, 1)
    except Exception as exc:
        traceback.print_exc()
        row[name] = f"error: {type(exc).__name__}: {str(exc)[:200]}"


def paged(batch, length, block_size, seed=0):
    rng = np.random.default_rng(seed)
    pages = length // block_size
    num_blocks = batch * pages + 7
    key = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(key[0], (batch, HQ, D), jnp.float32).astype(DTYPE)
    kc = jax.random.normal(key[1], (num_blocks, block_size, HKV, D), jnp.float32).astype(DTYPE)
    vc = jax.random.normal(key[2], (num_blocks, block_size, HKV, D), jnp.float32).astype(DTYPE)
    table = jnp.asarray(rng.permutation(num_blocks)[:batch * pages].reshape(batch, pages).astype(np.int32))
    lens = jnp.full((batch,), length, jnp.int32)
    return q, kc, vc, table, lens


mgpu = jax.jit(lambda *a: lj.paged_attention(*a, backend="gpu"))
variants = {"mgpu_kv128_s2": gpa.GpuPagedConfig(block_kv=128, num_stages=2)}
reference = jax.jit(lambda *a: lj.paged_attention(*a, backend="reference"))
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, scale=SCALE, implementation="cudnn"))

def write(rows):
    device = jax.devices()[0]
    names = ["mgpu", *variants, "jnp_ref", "cudnn"]
    json.dump({"gpu": device.device_kind, "jax": jax.__version__, "unit": "GB/s of K/V bytes (and us)",
               "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bf16",
               "timing": f"median of {ITERS} after {WARMUP} warm-ups; CUPTI kernel time where available",
               "rows": rows}, open(f"{out_dir}/bench_paged_mgpu.json", "w"), indent=1)
    with open(f"{out_dir}/bench_paged_mgpu.md", "w") as f:
        f.write(f"# paged_attention decode (JAX), {device.device_kind}, jax {jax.__version__}, bf16 Hq={HQ} "
                f"Hkv={HKV} D={D}: GB/s of K/V (us)\n\n")
        f.write("| B | L | block | splits | " + " | ".join(names) + " | max_err |\n|" + "---|" * (5 + len(names)) + "\n")
        for r in rows:
            cells = [f"{r.get(n)} ({r.get(n + '_us')})" if isinstance(r.get(n), float) else str(r.get(n)) for n in names]
            f.write(f"| {r['B']} | {r['L']} | {r['block_size']} | {r['splits']} | " + " | ".join(cells)
                    + f" | {r.get('max_err')} |\n")


rows = []
for batch, length in SHAPES:
    kv_bytes = 2 * batch * length * HKV * D * 2
    cudnn_row = {}
    for block_size in BLOCK_SIZES:
        args = paged(batch, length, block_size)
        q, kc, vc, table, _ = args
        row = {"B": batch, "L": length, "block_size": block_size,
               "splits": gpa.choose_num_splits(batch * HKV, -(-length // gpa.default_config(D, DTYPE).block_kv),
                                               gpa.num_sms())}
        timed(row, "mgpu", mgpu, args, kv_bytes)
        for name, config in variants.items():
            fn = jax.jit(lambda *a, config=config: gpa.paged_attention_gpu(*a, scale=SCALE, config=config))
            timed(row, name, fn, args, kv_bytes)
        timed(row, "jnp_ref", reference, args, kv_bytes)
        try:  # the kernel's error against the f32 reference on these inputs, as a sanity check
            out = mgpu(*args)
            ref = lj.paged_attention_reference(q.astype(jnp.float32), *args[1:])
            row["max_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
        except Exception as exc:
            row["max_err"] = f"error: {type(exc).__name__}"
        if not cudnn_row:  # the same contiguous K/V for both page sizes: time it once
            k = kc[table].reshape(batch, length, HKV, D)
            v = vc[table].reshape(batch, length, HKV, D)
            timed(cudnn_row, "cudnn", cudnn, (q, k, v), kv_bytes)
            del k, v
        row.update(cudnn_row)
        rows.append(row)
        print(row, flush=True)
        write(rows)  # partial results survive a timeout
        del args, q, kc, vc, table

print(open(f"{out_dir}/bench_paged_mgpu.md").read())
