"""``flash_attention`` forward for Hopper GPUs: a Pallas Mosaic GPU kernel and its wrapper.

Kernel outline (one CUDA block per ``(batch, q tile, q head)``, three warpgroups):

* warpgroup 2 is the producer: it TMA-copies K/V blocks of the head's kv head (GQA: ``h //
  (Hq/Hkv)``, so K/V are never repeated) into ``num_stages`` shared-memory slots, re-filling a
  slot once both consumers have released it;
* warpgroups 0 and 1 each own ``block_q`` query rows of the tile. Per KV block: ``S = Q K^T``
  with wgmma into registers, online softmax in base 2 (the softmax scale is folded into the
  ``log2(e)`` factor, one FMA per score), ``O += P V`` with P straight from registers.
  A shared "schedule" barrier staggers the two consumers by half a step, so that one runs
  its softmax while the other keeps the tensor cores busy (FlashAttention-3's ping-pong).

Masking is bottom-right aligned, per sequence: with ``kv_lens[b]`` keys (default Sk), query
``i`` sits at key ``i + kv_lens[b] - Sq`` and a ``(left, right)`` window (causal: right 0)
around it is visible. All three warpgroups derive the block's KV block range from the same
rows, so the producer loads exactly the blocks that the two consumers step through. Each
consumer computes only the KV blocks its rows can see, masks only those some row sees in part
(window edges, the diagonal, the end of the keys), and releases the others (keeping the
producer and the barrier counts in step); causal q tiles run heaviest first. A row that sees
no key gets 0 and lse -inf. ``softcap`` c turns the base-2 scores into
``tanh(s * scale / c) * c * log2(e)``.

Sequences that are not multiples of the tile sizes are zero-padded on the host (q to
``2*block_q`` rows, k/v to ``block_kv`` keys; padded keys are masked) and the output sliced.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _mosaic

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CONSUMERS = 2  # compute warpgroups per block
SMEM_BYTES = 227 * 1024  # opt-in shared memory per block on H100/H200
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class GpuFlashConfig:
    """Tile sizes of the Mosaic GPU kernel.

    ``block_q`` query rows per consumer warpgroup (a block holds ``2*block_q``), ``block_kv``
    keys per pipeline stage, ``num_stages`` K/V slots in flight. Registers bound the tiles: a
    consumer keeps the f32 ``block_q x D`` output and ``block_q x block_kv`` scores plus their
    16-bit copy in its (at most 232) registers per lane, i.e. ``(D + 1.5*block_kv) / 2`` per
    lane at block_q 64; shared memory holds ``2*block_q*D`` of Q/O and
    ``2*num_stages*block_kv*D`` of K/V, in 16-bit elements.
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}")
        if self.block_kv <= 0 or self.block_kv % 64:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")

    def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        tiles = CONSUMERS * self.block_q * head_dim + 2 * self.num_stages * self.block_kv * head_dim
        return tiles * itemsize + 4096  # lse staging, barriers and Mosaic's own scratch (~3.2 KiB)


# (D + 1.5*block_kv)/2 registers: 160 at D=128/bkv=128, 176 at D=256/bkv=64, 128 at D=64/bkv=128.
DEFAULT_CONFIGS = {
    64: GpuFlashConfig(block_kv=128, num_stages=3),
    128: GpuFlashConfig(block_kv=128, num_stages=2),
    256: GpuFlashConfig(block_kv=64, num_stages=2),
}


def unavailable_reason(q, k, *, causal: bool, window, softcap: float, scale: float, kv_lens, varlen: bool,
                       check_device: bool = True) -> Optional[str]:
    """None when :func:`flash_attention_gpu` serves this call, else a sentence saying why not."""
    if varlen:
        return "varlen (cu_seqlens_q/k) is not served by the Mosaic GPU kernel yet"
    if jnp.dtype(q.dtype) not in DTYPES:
        return f"the Mosaic GPU kernel takes float16/bfloat16 (wgmma), got {jnp.dtype(q.dtype).name}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the Mosaic GPU kernel takes head dims {HEAD_DIMS}, got {q.shape[-1]}"
    sq, sk = q.shape[1], k.shape[1]
    if sq == 0 or sk == 0 or q.shape[0] == 0:
        return "empty sequence or batch"
    if scale <= 0:
        return f"the Mosaic GPU kernel needs softmax_scale > 0, got {scale}"
    reason = _mosaic.device_reason() if check_device else _mosaic.bindings_reason()
    block_kv = DEFAULT_CONFIGS[q.shape[-1]].block_kv
    if reason is None and _needs_mask(sk, block_kv, causal=causal, window=window, has_kv_lens=kv_lens is not None):
        reason = _mosaic.masked_kernel_reason()
    return reason


def _needs_mask(sk, block_kv, *, causal, window, has_kv_lens) -> bool:
    """Whether some KV block can be partly visible to a row (else the kernel has no mask code)."""
    return causal or tuple(window) != (-1, -1) or has_kv_lens or sk % block_kv != 0


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Which keys rows see: bottom-right aligned (query ``i`` sits at key ``i + kv_len - sq``),
    ``left``/``right`` window sizes (-1 = unbounded; causal is ``right = 0``)."""

    sq: int
    left: int
    right: int
    block_kv: int

    def key_span(self, r0, r1, kv_len):
        """For rows ``[r0, r1]`` (real rows only): keys some row sees ``[lo, hi]`` and keys every
        row sees ``[all_lo, all_hi]``; ``hi < lo`` when none."""
        off = kv_len - self.sq
        hi = all_hi = kv_len - 1
        lo = all_lo = jnp.int32(0)
        if self.right >= 0:
            hi = jnp.minimum(hi, r1 + off + self.right)
            all_hi = jnp.minimum(all_hi, r0 + off + self.right)
        if self.left >= 0:
            lo = jnp.maximum(lo, r0 + off - self.left)
            all_lo = jnp.maximum(all_lo, r1 + off - self.left)
        hi = jnp.where(r1 >= r0, hi, -1)
        return lo, hi, all_lo, all_hi

    def blocks(self, r0, r1, kv_len):
        """KV blocks ``[first, end)`` holding a key some row of ``[r0, r1]`` sees, and the blocks
        ``[full_first, full_end)`` whose every key every row sees (possibly empty, unclamped)."""
        bkv = jnp.int32(self.block_kv)
        lo, hi, all_lo, all_hi = self.key_span(r0, r1, kv_len)
        # Operands of the divisions are >= 0, so truncating division is floor division.
        first = lax.div(lo, bkv)
        end = jnp.where(hi >= lo, lax.div(jnp.maximum(hi, 0), bkv) + 1, first)
        full_first = lax.div(all_lo + (bkv - 1), bkv)
        full_end = lax.div(jnp.maximum(all_hi + 1, 0), bkv)
        return first, end, full_first, full_end


def _attention_kernel(q_ref, k_ref, v_ref, *refs, plgpu, scale, softcap, causal, geometry, sk, has_kv_lens,
                      group, block_q, block_kv, num_stages, num_q_tiles, has_lse, masked_kernel, compiled):
    """One block: ``CONSUMERS*block_q`` query rows of one q head against all visible keys."""
    if has_kv_lens:
        kv_lens_ref, *refs = refs
    if has_lse:
        out_ref, lse_ref, *scratch = refs
    else:
        (out_ref, *scratch), lse_ref = refs, None
    qo_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready, k_free, v_free, schedule = scratch
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    sq = geometry.sq
    bkv = jnp.int32(block_kv)

    batch = lax.axis_index("batch")
    head = lax.axis_index("head")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_tile")
    if causal:  # the tiles with the most visible keys go first
        tile = num_q_tiles - 1 - tile
    tile_base = tile * (CONSUMERS * block_q)
    kv_len = jnp.clip(kv_lens_ref[batch], 0, sk) if has_kv_lens else jnp.int32(sk)

    # The block's KV blocks [tile_first, tile_first + tile_steps): every warpgroup agrees on
    # them (the producer loads them all; each consumer computes or releases every one).
    tile_first, tile_end, _, _ = geometry.blocks(tile_base, jnp.minimum(tile_base + CONSUMERS * block_q, sq) - 1,
                                                 kv_len)
    tile_steps = tile_end - tile_first

    def layout(x, kind):  # register layouts only matter to the compiler; the interpreter lacks them
        return plgpu.layout_cast(x, kind) if compiled else x

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA if compiled else None)

    def rendezvous():  # both consumers arrive, then both go on
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        if compiled:
            plgpu.set_max_registers(232, action="increase")
        q_smem = qo_smem.at[wg]
        q_base = tile_base + wg * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, block_q), head], q_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        # This consumer computes blocks [first, end) of the tile's, masking all but
        # [full_first, full_end), and releases the others.
        first, end, full_first, full_end = geometry.blocks(q_base, jnp.minimum(q_base + block_q, sq) - 1, kv_len)
        first = jnp.clip(first, tile_first, tile_end)
        end = jnp.clip(end, first, tile_end)
        full_first = jnp.clip(full_first, first, end)
        full_end = jnp.clip(full_end, full_first, end)
        diag = q_base + (kv_len - sq)  # the key position of this consumer's row 0
        if softcap:  # scores in base 2: tanh(s * pre) * post
            pre, post = scale / softcap, softcap * LOG2E
        coef = scale * LOG2E

        def zero_v_tail(v_tile, key0):
            """Zero the V rows at or past kv_len of the block that holds the end of the keys:
            NaN there would survive P = 0. Both consumers may write the same zeros; each does
            so before its own wgmma reads the tile, and before it frees the slot."""
            @pl.when(key0 + bkv > kv_len)
            def _():
                v = v_tile[...]
                v_tile[...] = jnp.where(iota(v.shape, 0) < kv_len - key0, v, jnp.zeros_like(v))
                plgpu.commit_smem()  # the wgmma reads the tile through the async proxy

        def step(i, carry, *, masked):
            acc, m, l = carry
            slot = lax.rem(i - tile_first, jnp.int32(num_stages))
            key0 = i * bkv
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                rendezvous()  # the other consumer's softmax overlaps this wgmma
                return acc_ref[...]

            if compiled:
                s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            else:  # the interpreter cannot transpose a wgmma operand
                s = lax.dot_general(q_smem[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
                rendezvous()
            plgpu.barrier_arrive(k_free.at[slot])
            if softcap:
                s = jnp.tanh(s * pre) * post
            if masked:  # in block coordinates: column c is key i*block_kv + c, row r query q_base + r
                cols = iota(s.shape, 1)
                ok = cols < kv_len - key0
                if geometry.right >= 0 or geometry.left >= 0:
                    rel = cols - iota(s.shape, 0)  # key minus the row's diagonal, less diag - key0
                    if geometry.right >= 0:
                        ok = ok & (rel <= diag - key0 + geometry.right)
                    if geometry.left >= 0:
                        ok = ok & (rel >= diag - key0 - geometry.left)
                s = jnp.where(ok, s, -jnp.inf)
            row_max = s.max(axis=1) if softcap else s.max(axis=1) * coef
            m_new = jnp.maximum(m, row_max)
            # Unmasked blocks give every row a finite score; a masked one may leave a row with
            # no visible key yet (m = -inf), whose exponentials must come out 0, not NaN.
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m - m_use)
            m_rows = lax.broadcast_in_dim(m_use, s.shape, [0])
            p = jnp.exp2(s - m_rows) if softcap else jnp.exp2(s * coef - m_rows)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            if masked and has_kv_lens:
                zero_v_tail(v_smem.at[slot], key0)
            plgpu.barrier_wait(schedule)  # the tensor cores are ours again

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            if compiled:
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:  # the interpreter has no run_state nor register wgmma operands
                acc = acc + lax.dot_general(p16, v_smem.at[slot][...], (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        def release(i, carry):
            """A block the other consumer needs but this one does not: free it, keep step.

            Waiting for its copies (which the other consumer waits for anyway) keeps every
            barrier phase observed by every thread that uses the barrier."""
            slot = lax.rem(i - tile_first, jnp.int32(num_stages))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            rendezvous()
            rendezvous()
            return carry

        carry = (
            layout(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA),
            layout(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            layout(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        )
        pl.when(wg == 1)(rendezvous)  # consumer 1 starts half a step behind
        if masked_kernel:
            if geometry.left >= 0:  # without a left window, every row sees key 0 or no key
                lax.fori_loop(tile_first, first, release, None)
                carry = lax.fori_loop(first, full_first, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(full_first, full_end, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(full_end, end, functools.partial(step, masked=True), carry)
            lax.fori_loop(end, tile_end, release, None)
        else:  # every block is fully visible to every row
            carry = lax.fori_loop(tile_first, tile_end, functools.partial(step, masked=False), carry)
        pl.when(wg == 0)(rendezvous)
        acc, m, l = carry

        seen = l > 0.0  # rows that see no key get 0 and lse -inf
        inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0) if masked_kernel else 1.0 / l
        q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        if has_lse:
            lse = m * LN2 + jnp.log(l)
            lse_smem.at[wg][...] = jnp.where(seen, lse, -jnp.inf) if masked_kernel else lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(q_base, block_q), head])
        if has_lse:
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_base, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        if compiled:
            plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.int32(group))

        def load(i, slot):
            rows = (batch, pl.ds((tile_first + i) * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        for i in range(num_stages):
            if masked_kernel:  # an unconsumed copy would still be landing when the block exits
                pl.when(i < tile_steps)(functools.partial(load, i, i))
            else:
                load(i, i)

        @pl.loop(num_stages, tile_steps)
        def _refill(i):
            slot = lax.rem(i, jnp.int32(num_stages))
            rows = (batch, pl.ds((tile_first + i) * block_kv, block_kv), kv_head)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        @pl.loop(jnp.maximum(tile_steps - num_stages, 0), tile_steps)
        def _drain(i):  # wait for the last releases too: no barrier phase goes unobserved
            slot = lax.rem(i, jnp.int32(num_stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _pad_seq(x, length):
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def flash_attention_gpu(q, k, v, kv_lens=None, *, scale: float, causal: bool, return_lse: bool,
                        window=(-1, -1), softcap: float = 0.0, config: Optional[GpuFlashConfig] = None,
                        interpret=None):
    """q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` (float16/bfloat16) -> out (and lse ``[B, Hq, Sq]``).

    ``kv_lens`` (int32 ``[B]`` or None), ``window`` and ``softcap`` as
    :func:`~lepton_kernels.jax.flash_attention`. The caller checks :func:`unavailable_reason`
    first; this only traces the kernel. ``interpret``: Pallas' Mosaic GPU interpreter
    parameters, to run on a CPU (slow; tests).
    """
    plgpu = _mosaic.plgpu()
    batch, sq, hq, head_dim = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    config = config or DEFAULT_CONFIGS[head_dim]
    block_q, block_kv = config.block_q, config.block_kv
    left, right = window
    right = 0 if causal else right
    causal = right == 0
    rows_per_block = CONSUMERS * block_q
    num_q_tiles = pl.cdiv(sq, rows_per_block)
    num_kv_blocks = pl.cdiv(sk, block_kv)
    num_stages = min(config.num_stages, num_kv_blocks)
    if config.smem_bytes(head_dim) > SMEM_BYTES:
        raise ValueError(f"{config} needs {config.smem_bytes(head_dim)} bytes of shared memory at D={head_dim}; "
                         f"the limit is {SMEM_BYTES}")
    sq_pad, sk_pad = num_q_tiles * rows_per_block, num_kv_blocks * block_kv
    inputs = [_pad_seq(q, sq_pad), _pad_seq(k, sk_pad), _pad_seq(v, sk_pad)]
    if kv_lens is not None:
        inputs.append(kv_lens.astype(jnp.int32))

    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = lambda shape: plgpu.SMEM(shape, q.dtype, transforms=tiles)  # noqa: E731
    scratch = (
        smem((CONSUMERS, block_q, head_dim)),
        smem((num_stages, block_kv, head_dim)),
        smem((num_stages, block_kv, head_dim)),
        plgpu.SMEM((CONSUMERS, block_q), jnp.float32) if return_lse else None,
        plgpu.Barrier(num_barriers=CONSUMERS),  # q_ready
        plgpu.Barrier(num_barriers=num_stages),  # k_ready
        plgpu.Barrier(num_barriers=num_stages),  # v_ready
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages),  # k_free
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=num_stages),  # v_free
        plgpu.Barrier(num_arrivals=CONSUMERS),  # schedule
    )
    out_type = [jax.ShapeDtypeStruct((batch, sq_pad, hq, head_dim), q.dtype)]
    if return_lse:
        out_type.append(jax.ShapeDtypeStruct((batch, hq, sq_pad), jnp.float32))
    body = functools.partial(
        _attention_kernel, plgpu=plgpu, scale=scale, softcap=softcap, causal=causal,
        geometry=_Geometry(sq=sq, left=left, right=right, block_kv=block_kv), sk=sk,
        has_kv_lens=kv_lens is not None, group=hq // hkv, block_q=block_q, block_kv=block_kv,
        num_stages=num_stages, num_q_tiles=num_q_tiles, has_lse=return_lse,
        masked_kernel=_needs_mask(sk, block_kv, causal=causal, window=(left, right),
                                  has_kv_lens=kv_lens is not None),
        compiled=interpret is None)
    results = plgpu.kernel(
        body,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(batch, num_q_tiles, hq),  # heads fastest: a GQA group's blocks share K/V in L2
        grid_names=("batch", "q_tile", "head"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else dict(interpret=interpret)),
    )(*inputs)
    out = results[0][:, :sq]
    if return_lse:
        return out, results[1][:, :, :sq]
    return out
