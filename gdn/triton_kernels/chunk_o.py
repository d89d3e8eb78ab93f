"""chunk_fwd_o's Triton kernel, importing triton only (no torch, no jax): launched from torch by gdn.triton.chunk_o
and from JAX by gdn.pallas.triton_call, one kernel source and the same bits in both.

Glossary (FLA's naming): i_ program ids, o_ offsets, m_ masks, b_ register tiles; BT = CHUNK_SIZE rows of a
chunk, BK/BV the K/V tile widths, NV the number of V tiles. Math and layouts: gdn.common.spec. The pointer
arguments are the inputs, then o: a JAX custom call hands a kernel its operands, then its results.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from gdn.common import contract, spec, tilings


@triton.jit
def chunk_span(i_tg, cu_seqlens, chunk_indices, T, N, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token row, end row) of global chunk i_tg (a row of h) in the packed T axis, int64, with
    0 <= end <= B·T. Varlen: from chunk_indices and cu_seqlens [N + 1]. A row that names no chunk of a sequence
    (PAD_CHUNK, a sequence outside [0, N), a chunk outside [0, the sequence's chunk count)) gets an empty span,
    so every load and store of its program is masked off, and cu_seqlens values are clamped into [0, T]: no
    index array makes a program address memory outside its arrays. Dense: batch row i_tg // NT, chunk i_tg % NT."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_tg * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_tg * 2 + 1).to(tl.int64)
        m_n = (i_n >= 0) & (i_n < N)
        i_n = tl.where(m_n, i_n, 0)
        bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), T)
        eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), T)
        m_chunk = m_n & (i_t >= 0) & (i_t < tl.cdiv(eos - bos, BT))
        t0 = tl.where(m_chunk, bos + i_t * BT, bos)
        eos = tl.where(m_chunk, eos, bos)
    else:
        NT = tl.cdiv(T, BT)
        bos = (i_tg // NT).to(tl.int64) * T
        eos = bos + T
        t0 = bos + (i_tg % NT) * BT
    return t0, eos


@triton.jit(do_not_specialize=["T", "N"])
def chunk_fwd_o_kernel(
    q, k, v, h, g, cu_seqlens, chunk_indices, o, scale, T, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    STRIDE_QT: tl.constexpr, STRIDE_QH: tl.constexpr, STRIDE_KT: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VT: tl.constexpr, STRIDE_VH: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, G_FLOOR: tl.constexpr,
    QK_L2NORM: tl.constexpr, QK_L2NORM_EPS: tl.constexpr,
):
    # One program per (chunk, value head, V tile), V tile fastest, then value head: the programs that read
    # the same q/k chunk run side by side and share it through L2. q, k and v are read at their token-row and
    # head strides (STRIDE_*: the slices of one fused projection in place); o is dense.
    i_flat = tl.program_id(0)
    i_v = i_flat % NV
    i_hv = (i_flat // NV) % HV
    i_tg = i_flat // (NV * HV)  # global chunk number = row of h
    i_h = i_hv // (HV // H)  # the q/k head this value head reads
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, N, BT, IS_VARLEN)
    o_t = t0 + tl.arange(0, BT)  # [BT] token rows of the packed T axis (int64)
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q_rows = o_t * STRIDE_QT + i_h * STRIDE_QH  # [BT] row starts in q
    p_k_rows = o_t * STRIDE_KT + i_h * STRIDE_KH  # [BT] row starts in k
    p_h = h + (i_tg.to(tl.int64) * HV + i_hv) * (K * V)

    # v and g first: every load of the program is in flight before the first dot waits on q, k and h
    m_tv = m_t[:, None] & m_v[None, :]
    p_v_rows = o_t * STRIDE_VT + i_hv * STRIDE_VH  # [BT] row starts in v
    b_v = tl.load(v + p_v_rows[:, None] + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
    if USE_G:
        # −∞ (a reset) read as the finite G_FLOOR (spec.CUMULATIVE_GATE_FLOOR), so g_i − g_j never forms
        # −∞ − (−∞); NaN stays NaN
        b_g = tl.load(g + o_t * HV + i_hv, mask=m_t, other=0)  # [BT]
        b_g = tl.where(b_g < G_FLOOR, G_FLOOR, b_g)

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_q_sq = tl.zeros([BT], dtype=tl.float32)  # Σ_k q², Σ_k k² per row (QK_L2NORM)
    b_k_sq = tl.zeros([BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_qk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + p_q_rows[:, None] + o_k[None, :], mask=m_qk, other=0)  # [BT, BK]
        b_k = tl.load(k + p_k_rows[:, None] + o_k[None, :], mask=m_qk, other=0)  # [BT, BK]
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        # [BT, BK] @ [BK, BV] -> [BT, BV]: the inter-chunk part q_c h[c]
        b_o += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=DOT_PRECISION)
        # [BT, BK] @ [BK, BT] -> [BT, BT]: the intra-chunk scores q_c k_cᵀ
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        if QK_L2NORM:
            b_q_sq += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), axis=1)
            b_k_sq += tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), axis=1)
    if QK_L2NORM:  # q_i/|q_i| and k_j/|k_j|: o_inter_i and A[i, j] scaled after the dots
        b_q_scale = 1 / tl.sqrt(b_q_sq + QK_L2NORM_EPS)
        b_o = b_o * b_q_scale[:, None]
        b_A = b_A * b_q_scale[:, None] * (1 / tl.sqrt(b_k_sq + QK_L2NORM_EPS))[None, :]

    o_i = tl.arange(0, BT)
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]  # causal, on the chunk's real rows
    if USE_G:
        # o_inter_i *= exp(g_i); A[i, j] *= exp(g_i − g_j) for j <= i, formed inside exp so nothing overflows
        b_o = b_o * tl.exp(b_g)[:, None]
        b_A = b_A * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))
    # A[i, j] of a later token j > i selected away, not multiplied by 0: its k_j or g_j may be NaN
    b_A = tl.where(m_A, b_A, 0)

    b_o_inter = b_o * scale
    b_P = (b_A * scale).to(b_v.dtype)  # scale folded in before the cast to v's dtype
    # [BT, BT] @ [BT, BV] -> [BT, BV]: the intra-chunk part, v straight from its load (Triton 3.6 on Hopper
    # miscomputes some 16-column dots whose v operand is built in registers)
    b_o = b_o_inter + tl.dot(b_P, b_v, input_precision=DOT_PRECISION)
    m_v_finite = (b_v - b_v) == 0  # [BT, BV]: false for NaN and ±inf
    if tl.min(m_v_finite.to(tl.int32)) == 0:  # this tile of v holds NaN or ±inf: rare, hence the branch
        # v's non-finite entries leave the dot, where the zeros of later tokens would turn them into NaN for
        # earlier rows, and come back where the causal sum reads them: v is loaded again without them, and
        # their reach is a running count down the rows. (With 4 warps Triton 3.6 on an H200 miscomputes this
        # dot in bf16 for 16- and 32-column tiles: tilings.chunk_o_tiling runs bf16 there on 2.)
        b_v_finite = tl.load(v + p_v_rows[:, None] + o_v[None, :], mask=m_tv & m_v_finite, other=0)
        b_o = b_o_inter + tl.dot(b_P, b_v_finite, input_precision=DOT_PRECISION)
        # reach[i, c] = #{j <= i: v[j, c] non-finite}
        b_reach = tl.cumsum(tl.where(m_v_finite, 0, 1), axis=0)
        b_o = tl.where(b_reach > 0, float("nan"), b_o)
    tl.store(o + ((o_t * HV + i_hv) * V)[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)



STRIDE_NAMES = ("STRIDE_QT", "STRIDE_QH", "STRIDE_KT", "STRIDE_KH", "STRIDE_VT", "STRIDE_VH")
"""The kernel's constexpr stride arguments, in the order of ChunkOProblem.strides."""


def num_programs(problem: contract.ChunkOProblem, tiling: tilings.Tiling) -> int:
    """Programs of chunk_fwd_o_kernel's 1-D grid for a validated problem with a tiling: one per (chunk, value
    head, V tile)."""
    return problem.num_chunks_total * problem.HV * -(-problem.V // tiling.block_v)


def constants(problem: contract.ChunkOProblem, tiling: tilings.Tiling) -> dict[str, Any]:
    """chunk_fwd_o_kernel's constexpr arguments for a validated problem with a tiling: what every launcher of it
    specializes on (with the tiling's Triton options and the dtypes of its arrays)."""
    return dict(H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, **dict(zip(STRIDE_NAMES, problem.strides)),
                BT=spec.CHUNK_SIZE, BK=tiling.block_k, BV=tiling.block_v, NV=-(-problem.V // tiling.block_v),
                USE_G=problem.gated, IS_VARLEN=problem.varlen, DOT_PRECISION=tilings.dot_precision(problem.dtype),
                G_FLOOR=spec.CUMULATIVE_GATE_FLOOR, QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS)
