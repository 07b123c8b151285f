"""JAX on an NVIDIA GPU: the Pallas Mosaic GPU flash_attention against the jnp reference and
cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``), bf16, H=32, D=128, B*S=16k.

Usage: python benchmarks/pallas_gpu.py OUT_DIR    (writes bench_mgpu.json and bench_mgpu.md)
Timing: wall clock of jitted calls with block_until_ready, median of 20 after 3 warm-ups (the
calls take milliseconds, so dispatch is a few percent at most); no L2 flush (K/V exceed the L2).
"""
import json
import sys
import traceback

import jax
import jax.numpy as jnp

import lepton_kernels.jax as lj
from _jax_timing import wall_ms
from lepton_kernels.jax.gpu import flash_attention as gfa

out_dir = sys.argv[1]
H, D, DTYPE, TOKENS = 32, 128, jnp.bfloat16, 16384
WARMUP, ITERS = 3, 20


def candidates(causal):
    scale = D ** -0.5
    yield "mgpu", jax.jit(lambda q, k, v: lj.flash_attention(q, k, v, causal=causal, backend="gpu"))
    for name, cfg in (("mgpu_kv64_s3", gfa.GpuFlashConfig(block_kv=64, num_stages=3)),
                      ("mgpu_kv64_s2", gfa.GpuFlashConfig(block_kv=64, num_stages=2))):
        yield name, jax.jit(lambda q, k, v, cfg=cfg: gfa.flash_attention_gpu(
            q, k, v, scale=scale, causal=causal, return_lse=False, config=cfg))
    yield "jnp_ref", jax.jit(lambda q, k, v: lj.flash_attention(q, k, v, causal=causal, backend="reference"))
    yield "cudnn", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"))


rows = []
for S in (1024, 4096):
    B = TOKENS // S
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, S, H, D), jnp.float32).astype(DTYPE) for key in keys)
    for causal in (False, True):
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        row = {"S": S, "B": B, "causal": causal}
        for name, fn in candidates(causal):
            if name == "jnp_ref" and S > 1024:
                row[name] = "skipped (materializes B*H*S*S f32 scores)"
                continue
            try:
                ms = wall_ms(fn, q, k, v, warmup=WARMUP, iters=ITERS)
                row[name] = round(flops / ms / 1e9, 1)  # TFLOP/s
                row[name + "_ms"] = round(ms, 3)
            except Exception as exc:
                traceback.print_exc()
                row[name] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(row, flush=True)

device = jax.devices()[0]
json.dump({"gpu": device.device_kind, "jax": jax.__version__, "unit": "TFLOP/s", "H": H, "D": D, "dtype": "bf16",
           "tokens": TOKENS, "timing": f"median of {ITERS} after {WARMUP} warm-ups", "rows": rows},
          open(f"{out_dir}/bench_mgpu.json", "w"), indent=1)
names = ["mgpu", "mgpu_kv64_s3", "mgpu_kv64_s2", "jnp_ref", "cudnn"]
with open(f"{out_dir}/bench_mgpu.md", "w") as f:
    f.write(f"# flash_attention fwd (JAX), {device.device_kind}, jax {jax.__version__}, bf16 H={H} D={D}, "
            f"B*S={TOKENS}, TFLOP/s\n\n")
    f.write("| S | B | causal | " + " | ".join(names) + " |\n|" + "---|" * (3 + len(names)) + "\n")
    for r in rows:
        f.write(f"| {r['S']} | {r['B']} | {r['causal']} | " + " | ".join(str(r.get(n)) for n in names) + " |\n")
print(open(f"{out_dir}/bench_mgpu.md").read())
