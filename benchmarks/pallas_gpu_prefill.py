"""Chunked-prefill timing: the Mosaic GPU mixed-batch paged kernel vs a batched jnp reference
(gathered pages, f32 softmax) and the Mosaic GPU flash_attention on contiguous K/V.
Usage: python3 benchmarks/pallas_gpu_prefill.py OUT_DIR"""
import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import lepton_kernels.jax as lj
from _jax_timing import cupti_ms, wall_ms
from lepton_kernels.jax.ops.paged_attention import gather_pages

out_dir = sys.argv[1]
B, CACHED, NEW, HQ, HKV, D, BS, DTYPE = 4, 2048, 512, 32, 8, 128, 16, jnp.bfloat16
L = CACHED + NEW
WARMUP, ITERS = 3, 20
FLOPS = 4 * B * HQ * D * sum(CACHED + i + 1 for i in range(NEW))  # causal: QK^T and PV


def timed(name, fn, *args):
    row = {"name": name}
    try:
        row["wall_us"] = round(wall_ms(fn, *args, warmup=WARMUP, iters=ITERS) * 1e3, 1)
        gpu = cupti_ms(fn, *args, iters=ITERS)
        row["gpu_us"] = None if gpu is None else round(gpu * 1e3, 1)
        best = row.get("gpu_us") or row["wall_us"]
        row["TFLOPs"] = round(FLOPS / best / 1e6, 1)
    except Exception as exc:
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(row, flush=True)
    return row


rng = np.random.default_rng(0)
pages = L // BS
num_blocks = B * pages + 7
keys = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(keys[0], (B * NEW, HQ, D), jnp.float32).astype(DTYPE)
kc = jax.random.normal(keys[1], (num_blocks, BS, HKV, D), jnp.float32).astype(DTYPE)
vc = jax.random.normal(keys[2], (num_blocks, BS, HKV, D), jnp.float32).astype(DTYPE)
table = jnp.asarray(rng.permutation(num_blocks)[:B * pages].reshape(B, pages).astype(np.int32))
lens = jnp.full((B,), L, jnp.int32)
cu = jnp.arange(B + 1, dtype=jnp.int32) * NEW

mgpu = jax.jit(lambda q, kc, vc, t, n, cu: lj.paged_attention(q, kc, vc, t, n, cu_seqlens_q=cu, backend="gpu"))


@jax.jit
def jnp_reference(q, kc, vc, t, n, cu):  # the reference's math, batched per sequence (fits in memory)
    k, v = gather_pages(kc, t, None), gather_pages(vc, t, None)  # [B, L, Hkv, D] f32
    qb = q.astype(jnp.float32).reshape(B, NEW, HKV, HQ // HKV, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, k, precision="highest") * D ** -0.5
    mask = jnp.arange(L)[None, :] <= jnp.arange(NEW)[:, None] + CACHED
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, precision="highest")
    return o.reshape(B * NEW, HQ, D).astype(q.dtype)


k = kc[table].reshape(B, L, HKV, D)
v = vc[table].reshape(B, L, HKV, D)
flash = jax.jit(lambda q, k, v: lj.flash_attention(q, k, v, causal=True, backend="gpu"))
args = (q, kc, vc, table, lens, cu)
rows = [timed("mgpu_paged", mgpu, *args), timed("jnp_reference", jnp_reference, *args),
        timed("flash_attention_gpu_contiguous", flash, q.reshape(B, NEW, HQ, D), k, v)]
try:
    out = mgpu(*args).astype(jnp.float32)
    ref = jnp_reference(*[a.astype(jnp.float32) if a.dtype == DTYPE and a.ndim == 3 else a for a in args])
    fa = flash(q.reshape(B, NEW, HQ, D), k, v).reshape(B * NEW, HQ, D).astype(jnp.float32)
    check = {"max_err_vs_f32": float(jnp.max(jnp.abs(out - ref.astype(jnp.float32)))),
             "max_err_flash_vs_f32": float(jnp.max(jnp.abs(fa - ref.astype(jnp.float32))))}
except Exception as exc:
    traceback.print_exc()
    check = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
print(check)
summary = {"gpu": jax.devices()[0].device_kind, "jax": jax.__version__,
           "shape": f"B={B} cached={CACHED} new={NEW} Hq={HQ} Hkv={HKV} D={D} bf16 block={BS}, causal",
           "gflop": round(FLOPS / 1e9, 1), "rows": rows, "check": check}
json.dump(summary, open(f"{out_dir}/bench_paged_prefill.json", "w"), indent=1)
with open(f"{out_dir}/bench_paged_prefill.md", "w") as f:
    f.write(f"# paged chunked prefill, {summary['gpu']}, jax {summary['jax']}: {summary['shape']}\n\n")
    f.write("| impl | gpu us | wall us | TFLOP/s |\n|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['name']} | {r.get('gpu_us')} | {r.get('wall_us')} | {r.get('TFLOPs', r.get('error'))} |\n")
    f.write(f"\n{check}\n")
print(open(f"{out_dir}/bench_paged_prefill.md").read())
