"""chunk_gated_delta_rule's Triton kernels, importing triton only (no torch, no jax): launched from torch by
gdn.triton.forward and from JAX by gdn.pallas.triton_call, one kernel source and the same bits in both.

prepare (g_c, w and u per chunk, all chunks in parallel), the walk (per sequence·piece, value head and V tile, the
chunks in order with S in registers), the context-parallel combine, and the launch plans every launcher
specializes them by (constexprs and grids from a validated problem and a tiling, with Tiling.triton_options()).
Math, layouts and the stages: gdn.common.spec (chunk_gated_delta_rule); glossary as in gdn.triton_kernels.chunk_o
(i_ program ids, o_ offsets, m_ masks, b_ register tiles, BT = CHUNK_SIZE). Each kernel's pointer arguments are
its inputs, then its outputs: a JAX custom call hands a kernel its operands, then its results. An absent pointer
is None (Triton's constexpr None).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from gdn.common import forward_contract, spec, tilings
from gdn.triton_kernels.chunk_o import STRIDE_NAMES, chunk_span


@triton.jit
def rows_finite(b_x):
    """[R] whether every element of each row of b_x [R, C] is finite (x·0 is NaN exactly for NaN and ±inf)."""
    return tl.sum(b_x.to(tl.float32) * 0.0, axis=1) == 0


@triton.jit
def gates_from_raw(b_a, b_b, A_log, dt_bias, i_hv, softplus_beta, softplus_threshold):
    """(g, beta) [BT] float32 from the raw gates a, b [BT]: g = −exp(A_log)·softplus(a + dt_bias), softplus(x) =
    log(1 + exp(β·x))/β up to the threshold, beta = sigmoid(b) (gdn.common.spec, serving arguments)."""
    b_x = b_a + tl.load(dt_bias + i_hv).to(tl.float32)
    b_bx = softplus_beta * b_x
    b_softplus = tl.where(b_bx <= softplus_threshold, tl.log(1 + tl.exp(tl.minimum(b_bx, softplus_threshold)))
                          / softplus_beta, b_x)
    return -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * b_softplus, 1 / (1 + tl.exp(-b_b))


@triton.jit
def unit_lower_inverse(b_A, BT: tl.constexpr, BS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(I + A)⁻¹ [BT, BT] float32 of a strictly lower b_A [BT, BT] float32 (prepare's, and the backward's
    recompute of it)."""
    # D⁻¹ first, D = I + the NB = BT/BS diagonal BS×BS blocks of A, as [NB, BS, BS] blocks side by side:
    # column-oriented forward substitution on all blocks at once, exact float32. At step j, row j of every block
    # is final, and every later row i of its block takes X[i] -= A[i, j]·X[j].
    NB: tl.constexpr = BT // BS
    o_i = tl.arange(0, BT)
    o_b = tl.arange(0, NB)
    o_r = tl.arange(0, BS)
    m_diag = o_b[:, None, None, None] == o_b[None, None, :, None]  # [NB, 1, NB, 1]: a diagonal block of [BT, BT]
    b_Ab = tl.sum(tl.where(m_diag, tl.reshape(b_A, [NB, BS, NB, BS]), 0), axis=2)  # [NB, BS, BS]
    b_X = tl.where(o_r[None, :, None] == o_r[None, None, :], 1.0, 0.0) + tl.zeros([NB, BS, BS], tl.float32)
    for j in tl.static_range(0, BS - 1):
        b_col = tl.sum(tl.where((o_r == j)[None, None, :], b_Ab, 0), axis=2)  # [NB, BS]: A[i, j] per block
        b_row = tl.sum(tl.where((o_r == j)[None, :, None], b_X, 0), axis=1)  # [NB, BS]: X[j, :] per block
        b_X -= b_col[:, :, None] * b_row[:, None, :]
    b_Dinv = tl.reshape(tl.where(m_diag, tl.broadcast_to(b_X[:, :, None, :], [NB, BS, NB, BS]), 0), [BT, BT])
    # merge: (I + A)⁻¹ = (I + N)⁻¹·D⁻¹ with N = D⁻¹·L, L = A below the diagonal blocks; N is strictly
    # block-lower, N⁴ = 0 (NB = 4): (I + N)⁻¹ = I − N + N² − N³ = (I − N)·(I + N²). Every entry is a product of
    # at most three blocks. The float32 dots run at DOT_PRECISION: tf32x3 for float32 inputs; TF32 for 16-bit
    # inputs, whose w and u dots round (I + A)⁻¹ to the input dtype anyway.
    m_block = (o_i[:, None] // BS) == (o_i[None, :] // BS)
    b_N = tl.dot(b_Dinv, tl.where(m_block, 0, b_A), input_precision=DOT_PRECISION)
    b_N2 = tl.dot(b_N, b_N, input_precision=DOT_PRECISION)
    b_eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    b_M = b_eye - b_N + b_N2 - tl.dot(b_N, b_N2, input_precision=DOT_PRECISION)
    return tl.dot(b_M, b_Dinv, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["T", "N"])
def chunk_prepare_kernel(
    k, v, g, beta, A_log, dt_bias, cu_seqlens, chunk_indices, g_cum, w, u, softplus_beta, softplus_threshold, T, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    STRIDE_QT: tl.constexpr, STRIDE_QH: tl.constexpr, STRIDE_KT: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VT: tl.constexpr, STRIDE_VH: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
    GATE_FLOOR: tl.constexpr, IS_VARLEN: tl.constexpr, RAW_GATES: tl.constexpr, QK_L2NORM: tl.constexpr,
    QK_L2NORM_EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # RAW_GATES: g and beta hold the raw gates a and b. QK_L2NORM: every k row is used divided by its norm.
    # One program per (chunk, value head), value head fastest: the value heads of one q/k head share k via L2.
    i_flat = tl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, N, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i  # [BT] token rows (int64)
    m_t = o_t < eos
    p_k_rows = o_t * STRIDE_KT + i_h * STRIDE_KH  # [BT] row starts in k (STRIDE_*: views read in place)
    p_v_rows = o_t * STRIDE_VT + i_hv * STRIDE_VH  # [BT] row starts in v
    p_g = o_t * HV + i_hv

    b_g = tl.load(g + p_g, mask=m_t, other=0).to(tl.float32)  # [BT] per-token log-gates
    b_beta = tl.load(beta + p_g, mask=m_t, other=0).to(tl.float32)  # [BT]
    if RAW_GATES:
        b_g, b_beta = gates_from_raw(b_g, b_beta, A_log, dt_bias, i_hv, softplus_beta, softplus_threshold)
    # A row with a NaN or +inf gate, or a non-finite beta, key or value is poison: zeroed before every dot here
    # (so it reaches no other row: a zero coefficient times NaN would still be NaN) and marked NaN in g_c for
    # the walk, which makes the outputs NaN from that row on. A gate of −inf is a reset, not poison.
    b_bad = (b_g != b_g) | (b_g == float("inf")) | (b_beta * 0.0 != 0)
    b_k_sq = tl.zeros([BT], dtype=tl.float32)  # Σ k² per row
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_k = tl.load(k + p_k_rows[:, None] + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0)
        b_bad = b_bad | ~rows_finite(b_k)
        b_k_sq += tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), axis=1)
    for v0 in tl.static_range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        b_bad = b_bad | ~rows_finite(tl.load(v + p_v_rows[:, None] + o_v[None, :],
                                             mask=m_t[:, None] & (o_v < V)[None, :], other=0))
    m_tb = m_t & ~b_bad  # the rows every load below reads
    # 1 / |k_i| (QK_L2NORM, in float32) scales each k row where it is used; 1 otherwise
    if QK_L2NORM:
        b_k_scale = tl.where(m_tb, 1 / tl.sqrt(b_k_sq + QK_L2NORM_EPS), 0)
    else:
        b_k_scale = tl.where(m_tb, 1.0, 0)

    # g_c: chunk-local cumulative sum of the floored log-gates (padding and poison rows add 0)
    b_g = tl.cumsum(tl.where(m_tb, tl.maximum(b_g, GATE_FLOOR), 0), axis=0)
    tl.store(g_cum + p_g, tl.where(b_bad, float("nan"), b_g), mask=m_t)
    b_beta = tl.where(m_tb, b_beta, 0)

    # A = strictly lower (beta_i·k_i·k_j·exp(g_i − g_j)): [BT, BK] @ [BK, BT] summed over K steps
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_k = tl.load(k + p_k_rows[:, None] + o_k[None, :], mask=m_tb[:, None] & (o_k < K)[None, :], other=0)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    m_lower = o_i[:, None] > o_i[None, :]
    b_A = b_A * (b_beta * b_k_scale)[:, None] * b_k_scale[None, :] * tl.exp(
        tl.where(m_lower, b_g[:, None] - b_g[None, :], float("-inf")))

    b_Ai = unit_lower_inverse(b_A, BT, BS, DOT_PRECISION)  # [BT, BT] float32

    # w = (I + A)⁻¹·(beta·exp(g)·k), u = (I + A)⁻¹·(beta·v): in k's dtype on the tensor cores, as FLA does
    b_Ai_in = b_Ai.to(k.dtype.element_ty)
    b_kscale = b_beta * tl.exp(b_g) * b_k_scale
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_k = tl.load(k + p_k_rows[:, None] + o_k[None, :], mask=m_tb[:, None] & (o_k < K)[None, :], other=0)
        b_w = tl.dot(b_Ai_in, (b_k * b_kscale[:, None]).to(b_k.dtype), input_precision=DOT_PRECISION)
        tl.store(w + (p_g * K)[:, None] + o_k[None, :], b_w.to(w.dtype.element_ty),
                 mask=m_t[:, None] & (o_k < K)[None, :])
    for v0 in tl.static_range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        b_v = tl.load(v + p_v_rows[:, None] + o_v[None, :], mask=m_tb[:, None] & (o_v < V)[None, :], other=0)
        b_u = tl.dot(b_Ai_in, (b_v * b_beta[:, None]).to(b_v.dtype), input_precision=DOT_PRECISION)
        tl.store(u + (p_g * V)[:, None] + o_v[None, :], b_u.to(u.dtype.element_ty),
                 mask=m_t[:, None] & (o_v < V)[None, :])


@triton.jit
def pool_row(state_indices, i_n, POOL_ROWS):
    """(row, valid) of sequence i_n's state in a pool of POOL_ROWS rows: state_indices[i_n], valid when in
    [0, POOL_ROWS) (a negative index is a padded slot; an index out of range is skipped as one)."""
    i_row = tl.load(state_indices + i_n).to(tl.int64)
    m_row = (i_row >= 0) & (i_row < POOL_ROWS)
    return tl.where(m_row, i_row, 0), m_row


@triton.jit(do_not_specialize=["T", "NUM_PIECES", "MAPPED_PIECES", "H_ROWS", "POOL_ROWS"])
def chunk_walk_kernel(
    q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_offsets, state_indices, o, final_state, h, v_new, map_m,
    map_n, scale, T, NUM_PIECES, MAPPED_PIECES, H_ROWS, POOL_ROWS,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    STRIDE_QT: tl.constexpr, STRIDE_QH: tl.constexpr, STRIDE_KT: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VT: tl.constexpr, STRIDE_VH: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, OUTPUT_O: tl.constexpr,
    STORE_H: tl.constexpr, MAP: tl.constexpr, IS_VARLEN: tl.constexpr, USE_INDICES: tl.constexpr,
    READ_POOL: tl.constexpr, QK_L2NORM: tl.constexpr, QK_L2NORM_EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # USE_INDICES: the sequence's state lives in the pool final_state [POOL_ROWS, HV, K, V] at row
    # state_indices[n], where the last piece writes it back (READ_POOL: initial_state is that pool, read at that
    # row; else it holds the pieces' starts); a sequence without a valid row is skipped: S, h and v_new stay 0
    # (so chunk_fwd_o's o rows are 0), nothing is written back.
    # One program per (V tile, sequence·piece·value head) walks the chunks of its piece of the sequence in order
    # with its [BK, BV] float32 slice of S in registers: the V columns of S never mix. A piece is chunks
    # [p·NT/P, (p + 1)·NT/P) of the sequence's NT (P = NUM_PIECES; one piece: the whole sequence).
    # MAP: the first MAPPED_PIECES pieces walk the augmented state [M | N] from [I | 0], with u = 0 in M's
    # columns: V tiles i_v < NM cover M's K columns, the rest N's V columns; M and N are stored instead of h.
    i_v = tl.program_id(0)
    i_nph = tl.program_id(1)
    i_hv = i_nph % HV
    i_np = i_nph // HV
    if MAP:
        grid_pieces = MAPPED_PIECES
    else:
        grid_pieces = NUM_PIECES
    i_p = i_np % grid_pieces
    i_n = i_np // grid_pieces
    i_h = i_hv // (HV // H)
    if IS_VARLEN:  # the sequence's token rows, clamped into [0, T]: device values are never trusted
        bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), T)
        eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), T)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    NT = tl.cdiv(eos - bos, BT)
    c_first = i_p * NT // NUM_PIECES
    c_end = (i_p + 1) * NT // NUM_PIECES

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    NM: tl.constexpr = (K + BV - 1) // BV  # MAP: V tiles of M's columns
    if MAP:
        o_v = (i_v - NM) * BV + tl.arange(0, BV)  # columns of u and N (negative in M's tiles: masked off)
    else:
        o_v = i_v * BV + tl.arange(0, BV)
    m_v = (o_v >= 0) & (o_v < V)
    m_kv = m_k[:, None] & m_v[None, :]
    m_causal = o_i[:, None] >= o_i[None, :]

    if USE_INDICES:
        i_row, m_row = pool_row(state_indices, i_n, POOL_ROWS)
        # (the row's validity folded into K's bound: the Triton 3.9 interpreter mis-types a scalar test in a mask)
        m_pool = (o_k < tl.where(m_row, K, 0))[:, None] & m_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if MAP:  # M's columns start from the identity
        o_m = i_v * BV + tl.arange(0, BV)
        b_s = tl.where((o_k[:, None] == o_m[None, :]) & (o_m < K)[None, :], 1.0, 0.0)
    elif USE_INITIAL_STATE:  # the sequence's initial state (a pool row), or the piece's start from the combine
        if READ_POOL:
            p_start = ((i_row * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :]
            b_s += tl.load(initial_state + p_start, mask=m_pool, other=0)
        else:  # (a skipped sequence's pieces start from 0 too)
            p_start = ((i_np * HV + i_hv).to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
            b_s += tl.load(initial_state + p_start, mask=m_pool if USE_INDICES else m_kv, other=0)
    if STORE_H:
        if IS_VARLEN:
            first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
        else:
            first_chunk = i_n.to(tl.int64) * tl.cdiv(T, BT)

    for i_t in range(c_first, c_end):
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        p_rows = o_t * HV + i_hv  # [BT] rows of w, u, g_c, o
        # g_c is NaN on poison rows (prepare): carried into every product, never selected away, it makes S NaN
        # after the chunk (0·NaN is NaN) and, through exp(g_i − g_j) and chunk_fwd_o's scores, o NaN from that
        # row on, while earlier rows never read it (causal where). No reduction over the tile is needed per chunk.
        b_g = tl.load(g_cum + p_rows, mask=m_t, other=0)  # [BT]
        b_g_last = tl.load(g_cum + (tl.minimum(bos + (i_t + 1) * BT, eos) - 1) * HV + i_hv)
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + (o_t * STRIDE_KT + i_h * STRIDE_KH)[:, None] + o_k[None, :], mask=m_tk, other=0)
        if QK_L2NORM:  # k_i / |k_i|, the whole K in the tile
            b_kf = b_k.to(tl.float32)
            b_k = (b_kf / tl.sqrt(tl.sum(b_kf * b_kf, axis=1) + QK_L2NORM_EPS)[:, None]).to(b_k.dtype)
        b_w = tl.load(w + (p_rows * K)[:, None] + o_k[None, :], mask=m_tk, other=0)  # [BT, BK]
        b_u = tl.load(u + (p_rows * V)[:, None] + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
        if USE_INDICES:  # a skipped sequence: v_new = 0
            b_u = tl.where(m_row, b_u, 0)
            b_w = tl.where(m_row, b_w, 0)
        m_tv = m_t[:, None] & m_v[None, :]
        # v_new = u − w·S: [BT, BK] @ [BK, BV]
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_s.to(b_w.dtype), input_precision=DOT_PRECISION)
        if STORE_H:  # h[c] = S, the state the chunk starts from (a row within h's H_ROWS), and v_new
            i_chunk_row = first_chunk + i_t
            p_h = h + (tl.minimum(tl.maximum(i_chunk_row, 0), H_ROWS - 1) * HV + i_hv) * (K * V)
            # (the row's bound folded into K's: the Triton 3.9 interpreter mis-types a scalar test in a mask)
            m_h = (o_k < tl.where((i_chunk_row >= 0) & (i_chunk_row < H_ROWS), K, 0))[:, None] & m_v[None, :]
            tl.store(p_h + o_k[:, None] * V + o_v[None, :], b_s.to(h.dtype.element_ty), mask=m_h)
            tl.store(v_new + (p_rows * V)[:, None] + o_v[None, :], b_vn.to(v_new.dtype.element_ty), mask=m_tv)
        if OUTPUT_O:
            # o = scale·(q ⊙ exp(g))·S + tril(scale·q·kᵀ ⊙ exp(g_i − g_j))·v_new
            b_q = tl.load(q + (o_t * STRIDE_QT + i_h * STRIDE_QH)[:, None] + o_k[None, :], mask=m_tk, other=0)
            if QK_L2NORM:
                b_qf = b_q.to(tl.float32)
                b_q = (b_qf / tl.sqrt(tl.sum(b_qf * b_qf, axis=1) + QK_L2NORM_EPS)[:, None]).to(b_q.dtype)
            if USE_INDICES:  # a skipped sequence: o = 0
                b_q = tl.where(m_row, b_q, 0)
            b_o = tl.dot(b_q, b_s.to(b_q.dtype), input_precision=DOT_PRECISION) * tl.exp(b_g)[:, None]
            b_P = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BT, BK] @ [BK, BT]
            b_P = tl.where(m_causal, b_P * tl.exp(tl.where(m_causal, b_g[:, None] - b_g[None, :], float("-inf"))), 0)
            b_o = b_o * scale + tl.dot((b_P * scale).to(b_q.dtype), b_vn.to(b_q.dtype), input_precision=DOT_PRECISION)
            tl.store(o + (p_rows * V)[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
        # S = exp(g_last)·S + (k ⊙ exp(g_last − g))ᵀ·v_new: [BK, BT] @ [BT, BV]
        b_vn = b_vn * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]
        b_s = b_s * tl.exp(b_g_last) + tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype), input_precision=DOT_PRECISION)

    if MAP:
        p_map = ((i_n * MAPPED_PIECES + i_p) * HV + i_hv).to(tl.int64) * K
        # M's tiles hold the columns o_m < K (in N's tiles o_m ≥ NM·BV ≥ K), N's tiles the columns 0 ≤ o_v < V
        tl.store(map_m + (p_map + o_k[:, None]) * K + o_m[None, :], b_s, mask=m_k[:, None] & (o_m < K)[None, :])
        tl.store(map_n + (p_map + o_k[:, None]) * V + o_v[None, :], b_s, mask=m_kv)
    elif STORE_FINAL_STATE:
        if i_p == NUM_PIECES - 1:
            if USE_INDICES:  # back into the sequence's pool row
                p_final = ((i_row * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :]
                tl.store(final_state + p_final, b_s, mask=m_pool)
            else:
                p_final = ((i_n * HV + i_hv).to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
                tl.store(final_state + p_final, b_s, mask=m_kv)


@triton.jit(do_not_specialize=["NUM_PIECES", "POOL_ROWS"])
def chunk_combine_kernel(
    map_m, map_n, initial_state, state_indices, starts, NUM_PIECES, POOL_ROWS,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_INDICES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # USE_INDICES: each sequence's initial state is the pool row state_indices[n] (0 when it names none).
    # One program per (V tile, sequence·value head): the pieces' true initial states in order,
    # S_0 = the initial state (or 0), S_{p+1} = M_p·S_p + N_p. The columns of S never mix.
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV] within one [K, V] state

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        if USE_INDICES:
            i_row, m_row = pool_row(state_indices, i_n, POOL_ROWS)
            m_pool = (o_k < tl.where(m_row, K, 0))[:, None] & (o_v < V)[None, :]
            b_s += tl.load(initial_state + (i_row * HV + i_hv) * (K * V) + p_kv, mask=m_pool, other=0)
        else:
            b_s += tl.load(initial_state + i_nh.to(tl.int64) * (K * V) + p_kv, mask=m_kv, other=0)
    tl.store(starts + ((i_n * NUM_PIECES) * HV + i_hv).to(tl.int64) * (K * V) + p_kv, b_s, mask=m_kv)
    for i_p in range(0, NUM_PIECES - 1):
        p_map = ((i_n * (NUM_PIECES - 1) + i_p) * HV + i_hv).to(tl.int64)
        b_m = tl.load(map_m + p_map * (K * K) + o_k[:, None] * K + o_k[None, :], mask=m_k[:, None] & m_k[None, :],
                      other=0)  # [BK, BK]
        b_n = tl.load(map_n + p_map * (K * V) + p_kv, mask=m_kv, other=0)  # [BK, BV]
        # [BK, BK] @ [BK, BV] -> [BK, BV]
        b_s = tl.dot(b_m, b_s, input_precision=DOT_PRECISION) + b_n
        tl.store(starts + ((i_n * NUM_PIECES + i_p + 1) * HV + i_hv).to(tl.int64) * (K * V) + p_kv, b_s, mask=m_kv)


def prepare_grid(problem: forward_contract.ForwardProblem) -> tuple[int]:
    """chunk_prepare_kernel's 1-D grid for a validated problem: one program per (chunk, value head)."""
    return (problem.num_chunks_total * problem.HV,)


def prepare_constants(problem: forward_contract.ForwardProblem, tiling: tilings.Tiling) -> dict[str, Any]:
    """chunk_prepare_kernel's constexpr arguments for a validated problem with a tiling: what every launcher of it
    specializes on (with the tiling's Triton options and the dtypes of its arrays)."""
    return dict(H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, **dict(zip(STRIDE_NAMES, problem.row_strides)),
                BT=spec.CHUNK_SIZE, BK=tiling.block_k, BV=tiling.block_v, BS=spec.SUBBLOCK, GATE_FLOOR=spec.GATE_FLOOR,
                IS_VARLEN=problem.varlen, RAW_GATES=problem.raw_gates, QK_L2NORM=problem.qk_l2norm,
                QK_L2NORM_EPS=spec.QK_L2NORM_EPS, DOT_PRECISION=tilings.dot_precision(problem.dtype))


def walk_grid(problem: forward_contract.ForwardProblem, tiling: tilings.Tiling, pieces: int, mapped: int = 0,
              ) -> tuple[int, int]:
    """chunk_walk_kernel's 2-D grid (V tile, sequence·piece·value head) for a validated problem in that many pieces;
    mapped > 0: the map walk of the first `mapped` pieces, over [M | N]'s K + V columns."""
    num_tiles, rows = problem.walk_grid(tiling, mapped or pieces)
    return num_tiles + (-(-problem.K // tiling.block_v) if mapped else 0), rows


def walk_constants(problem: forward_contract.ForwardProblem, tiling: tilings.Tiling, pieces: int, *, initial: bool,
                   final: bool, output_o: bool, store_h: bool, mapped: int = 0) -> dict[str, Any]:
    """chunk_walk_kernel's constexpr arguments for a validated problem in that many pieces with a tiling: initial /
    final whether it reads initial_state / stores the final state, output_o whether it computes o, store_h whether
    it stores h and v_new, mapped > 0 the map walk of the first `mapped` pieces (walk_grid)."""
    return dict(H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, **dict(zip(STRIDE_NAMES, problem.row_strides)),
                BT=spec.CHUNK_SIZE, BK=tiling.block_k, BV=tiling.block_v, USE_INITIAL_STATE=initial,
                STORE_FINAL_STATE=final, OUTPUT_O=output_o, STORE_H=store_h, MAP=mapped > 0, IS_VARLEN=problem.varlen,
                USE_INDICES=problem.pool_rows > 0 and not mapped, READ_POOL=problem.pool_rows > 0 and pieces == 1,
                QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS,
                DOT_PRECISION=tilings.dot_precision(problem.dtype))


def combine_grid(problem: forward_contract.ForwardProblem) -> tuple[int, int]:
    """chunk_combine_kernel's 2-D grid (V tile of tilings.SCAN_TILING, sequence·value head)."""
    return -(-problem.V // tilings.SCAN_TILING.block_v), problem.N * problem.HV


def combine_constants(problem: forward_contract.ForwardProblem, initial: bool) -> dict[str, Any]:
    """chunk_combine_kernel's constexpr arguments for a validated problem (its tiling: tilings.SCAN_TILING);
    initial: whether it reads initial_state."""
    return dict(HV=problem.HV, K=problem.K, V=problem.V, BK=problem.walk.block_k,
                BV=tilings.SCAN_TILING.block_v, USE_INITIAL_STATE=initial, USE_INDICES=problem.pool_rows > 0,
                DOT_PRECISION=tilings.FLOAT32_DOT_PRECISION)
