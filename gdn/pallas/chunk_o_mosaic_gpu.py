"""chunk_fwd_o for JAX with Pallas Mosaic GPU (Hopper, sm_90): the same math and contract as gdn.pallas.chunk_o,
chosen with ``gdn.pallas.chunk_fwd_o(..., lowering="mosaic_gpu")`` (the default is chunk_o.default_lowering's).

Status: checked against the float64 reference in Mosaic GPU interpret mode (CPU) and compiled on an H200, and
measured there (benchmarks/RESULTS.md): faster than triton_call on the dense 16-bit shapes it reads in place,
slower where it gathers, so it is opt-in (gdn.pallas.chunk_o.default_lowering says why). Index arrays are bounded
and −∞ gates read as spec.CUMULATIVE_GATE_FLOOR as in the Triton kernels; of gdn.common.spec's non-finite rule, a
NaN or ±inf in v reaches this chunk's earlier rows too (0·NaN in A·v: the Triton kernels' count of non-finite v is
not here).

Glossary (as in the Triton-lowered kernel): i_ program ids, o_ offsets, m_ masks, b_ register tiles, _s shared
memory (SMEM) tiles; BT = CHUNK_SIZE rows of a chunk. Math and layouts: gdn.common.spec.

Structure. One CTA (one warpgroup, 128 threads) per (chunk, value head) on a 1-D grid, value head fastest, so
the CTAs of a chunk's grouped value heads run side by side and share its q/k tiles through L2. The whole K and
V of the head are one tile (K, V in HEAD_DIMS), so q·kᵀ is formed once per (chunk, value head) rather than once
per V tile. The CTA
  1. issues every load at once with TMA into swizzled SMEM tiles: q, k [BT, K] (barrier 1), h [K, V], v [BT, V]
     and the chunk's gates g [BT] (barrier 2), so the first product starts while h and v are in flight;
  2. multiplies on the tensor cores (wgmma, float32 accumulators): A = q·kᵀ, o = q·h, then o += A·v;
  3. writes o [BT, V] through a swizzled SMEM staging tile with one TMA copy.

Chunk slots. A TMA copy between GMEM and a tiled SMEM tile addresses GMEM in whole tiles, so its row offset
must be a multiple of the tile's 8 rows (JAX ≥ 0.11 rejects a copy it cannot prove aligned; an unaligned one
would read the wrong rows). The kernel therefore reads and writes chunk c of the flattened token axis at row
c·BT ("slots"): q, k [slots, H, K], v, o [slots, HV, V], h [B·NT, HV, K, V], the gates transposed to
[HV, slots] (a chunk of one head's gates is one 256-byte TMA row). Dense inputs with T a multiple of BT are
already in slots (no copy); otherwise launch gathers each chunk's tokens into its slot (slot_tokens), rows past
the chunk's sequence zero, and scatters o back, so no row of another sequence is ever read or written.

Interpret mode: gdn.pallas.mosaic_gpu_tiles (the helpers that stand in for layout hints and wgmma there).

Next steps, once measured against the Triton lowering (benchmarks/chunk_o.py): a persistent grid whose CTAs
pipeline the next item's TMA loads under this item's wgmmas (jla's scalar_gate_fused.py streams its inputs
from a producer warpgroup into 2–4 SMEM stages, as gdn.pallas.forward_mosaic_gpu does) and q·kᵀ shared by the
grouped value heads of a chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gdn.common import contract, spec
from gdn.pallas.chunk_o import chunk_span
from gdn.pallas.mosaic_gpu_tiles import (
    COLS,
    DTYPES,
    HEAD_DIMS,
    LOWERING,
    ROWS,
    InterpretGPUParams,
    device_reason,
    dot,
    iota,
    load,
    smem_tile,
)


def unsupported_reason(problem: contract.ChunkOProblem, h_dtype: str, interpret: bool) -> str | None:
    """Why this kernel cannot run a validated chunk_fwd_o problem ("<argument>: expected …; got …"), or None when
    it can."""
    if problem.dtype not in DTYPES:
        return f"q: expected dtype in {DTYPES} with {LOWERING} (16-bit wgmma); got {problem.dtype}"
    if h_dtype != problem.dtype:
        return f"h: expected the dtype of q ({problem.dtype}) with {LOWERING}; got {h_dtype}"
    if problem.K not in HEAD_DIMS or problem.V not in HEAD_DIMS:
        return f"K, V: expected each in {HEAD_DIMS} with {LOWERING}; got K = {problem.K}, V = {problem.V}"
    return device_reason(interpret)


def chunk_fwd_o_kernel(q, k, v, h, g, scale, o, q_s, k_s, h_s, v_s, g_row_s, g_col_s, o_s, qk_ready, hvg_ready, *,
                       H: int, HV: int, V: int, BT: int, USE_G: bool, INTERPRET: bool):
    i_item = lax.axis_index("item")
    i_hv = lax.rem(i_item, HV)
    i_tg = lax.div(i_item, HV)  # global chunk number = row of h = chunk slot
    i_h = lax.div(i_hv, HV // H)  # the q/k head this value head reads
    # the slot's BT rows: a tile-aligned offset, as a TMA copy into (or out of) tiled SMEM needs
    o_t = pl.ds(pl.multiple_of(i_tg * BT, BT), BT)

    plgpu.copy_gmem_to_smem(q.at[o_t, i_h], q_s, qk_ready)
    plgpu.copy_gmem_to_smem(k.at[o_t, i_h], k_s, qk_ready)
    plgpu.copy_gmem_to_smem(h.at[i_tg, i_hv], h_s, hvg_ready)
    plgpu.copy_gmem_to_smem(v.at[o_t, i_hv], v_s, hvg_ready)
    if USE_G:  # twice: one SMEM copy per register layout (one ref read in both would be one load, in one layout)
        plgpu.copy_gmem_to_smem(g.at[i_hv, o_t], g_row_s, hvg_ready)
        plgpu.copy_gmem_to_smem(g.at[i_hv, o_t], g_col_s, hvg_ready)

    plgpu.barrier_wait(qk_ready)
    b_A = dot(q_s, k_s, (BT, BT), INTERPRET, transpose_b=True)  # [BT, K] @ [K, BT] -> [BT, BT]: q_c k_cᵀ
    plgpu.barrier_wait(hvg_ready)
    b_o = dot(q_s, h_s, (BT, V), INTERPRET)  # [BT, K] @ [K, V] -> [BT, V]: the inter-chunk part q_c h[c]

    m_A = iota((BT, BT), 0, INTERPRET) >= iota((BT, BT), 1, INTERPRET)  # causal: j <= i
    if USE_G:
        b_g_row, b_g_col = load(g_row_s, ROWS, INTERPRET), load(g_col_s, COLS, INTERPRET)  # [BT] g_i, g_j
        # o_inter_i *= exp(g_i); A[i, j] *= exp(g_i − g_j) for j <= i, formed inside exp so nothing overflows
        b_o = b_o * lax.broadcast_in_dim(jnp.exp(b_g_row), (BT, V), [0])
        b_gap = lax.broadcast_in_dim(b_g_row, (BT, BT), [0]) - lax.broadcast_in_dim(b_g_col, (BT, BT), [1])
        b_A = jnp.where(m_A, b_A * jnp.exp(jnp.where(m_A, b_gap, -jnp.inf)), 0)
    else:
        b_A = jnp.where(m_A, b_A, 0)

    # [BT, BT] @ [BT, V] -> [BT, V]: the intra-chunk part, scale folded in before the cast to v's dtype
    b_scale = scale[0]
    b_o = b_o * b_scale + dot((b_A * b_scale).astype(v_s.dtype), v_s, (BT, V), INTERPRET)
    o_s[...] = b_o.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o.at[o_t, i_hv])
    plgpu.wait_smem_to_gmem(0)


def slot_tokens(problem: contract.ChunkOProblem, cu_seqlens, chunk_indices) -> tuple[jax.Array, jax.Array]:
    """Two [num_chunks_total · BT] int32 maps from chunk slot rows to token rows (of the packed B·T axis): the
    token each slot row holds, B·T for a row past its chunk's sequence (or of a row naming no chunk: chunk_span
    gives it an empty span); and the token whose gate it holds, the chunk's last token for a row past the
    sequence (B·T for a chunk with no tokens), so that a partial chunk's last gate row is its true last gate."""
    BT = spec.CHUNK_SIZE
    t0, eos = chunk_span(jnp.arange(problem.num_chunks_total), cu_seqlens, chunk_indices, T=problem.T, BT=BT,
                         IS_VARLEN=problem.varlen)  # [NC] each
    token = t0[:, None] + jnp.arange(BT)[None, :]  # [NC, BT]
    past = problem.B * problem.T
    gate_token = jnp.where(eos[:, None] > t0[:, None], jnp.minimum(token, eos[:, None] - 1), past)
    return jnp.where(token < eos[:, None], token, past).reshape(-1), gate_token.reshape(-1)


@functools.partial(jax.jit, static_argnames=("problem", "interpret"))
def launch(q, k, v, h, g, scale, cu_seqlens, chunk_indices, *, problem: contract.ChunkOProblem, interpret: bool):
    """o for a validated problem this kernel supports (unsupported_reason is None); cu_seqlens / chunk_indices
    int32 when varlen, else None."""
    B, T, H, HV, K, V = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V
    if problem.num_chunks_total == 0 or B * T == 0:
        return jnp.zeros(v.shape, v.dtype)
    BT = spec.CHUNK_SIZE
    rows = B * T
    dtype = v.dtype
    q, k, v = q.reshape(rows, H, K), k.reshape(rows, H, K), v.reshape(rows, HV, V)
    if problem.gated:  # −∞ (a reset) read as spec.CUMULATIVE_GATE_FLOOR, as the Triton kernels read it (NaN stays)
        g = jnp.maximum(g.reshape(rows, HV), spec.CUMULATIVE_GATE_FLOOR)
    # The kernel reads chunk c's rows at c·BT (chunk slots): the token rows themselves when every chunk starts
    # there (dense, T a multiple of BT), else gathered into slots, a slot's rows past its sequence zero.
    in_slots = not problem.varlen and T % BT == 0
    if not in_slots:
        token, _ = slot_tokens(problem, cu_seqlens, chunk_indices)
        q, k, v = (x.at[token].get(mode="fill", fill_value=0) for x in (q, k, v))
        if problem.gated:
            g = g.at[token].get(mode="fill", fill_value=0)
    # gates [HV, slots]: a chunk of one head's gates is one contiguous 256-byte TMA row
    g = g.T if problem.gated else jnp.zeros((1, BT), jnp.float32)
    slots = problem.num_chunks_total * BT
    kernel = functools.partial(chunk_fwd_o_kernel, H=H, HV=HV, V=V, BT=BT, USE_G=problem.gated,
                               INTERPRET=interpret)
    # A NaN for every unspecified read in interpret mode (none is expected): a leak into o fails the tests.
    o = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((slots, HV, V), dtype),
        scratch_types=dict(
            q_s=smem_tile((BT, K), dtype), k_s=smem_tile((BT, K), dtype), h_s=smem_tile((K, V), dtype),
            v_s=smem_tile((BT, V), dtype), o_s=smem_tile((BT, V), dtype),
            g_row_s=plgpu.SMEM((BT,), jnp.float32), g_col_s=plgpu.SMEM((BT,), jnp.float32),
            qk_ready=plgpu.Barrier(num_arrivals=2), hvg_ready=plgpu.Barrier(num_arrivals=4 if problem.gated else 2)),
        grid=(problem.num_chunks_total * HV,),
        grid_names=("item",),
        interpret=InterpretGPUParams(out_of_bounds_reads="uninitialized") if interpret else None,
        kernel_name="chunk_fwd_o_kernel",
    )(q, k, v, h.reshape(problem.num_chunks_total, HV, K, V), g, jnp.asarray(scale, jnp.float32).reshape(1))
    if not in_slots:  # each token's row from its slot; slot rows past a sequence are dropped
        o = jnp.zeros((rows, HV, V), dtype).at[token].set(o, mode="drop")
    return o.reshape(B, T, HV, V)
