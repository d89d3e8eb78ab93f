"""chunk_gated_delta_rule for PyTorch: the chunked Gated DeltaNet forward in Triton kernels.

prepare (g_c, w and u per chunk, all chunks in parallel) → walk (per sequence, value head and V tile, the chunks
in order with S in registers: v_new and the next S, storing h and v_new) → chunk_fwd_o (all chunks in
parallel). When walks are few (tilings.context_pieces), each sequence is cut into pieces: a map walk gives
each piece's affine state map S_out = M·S_in + N, the combine turns them into every piece's true initial state,
and the walk runs all pieces in parallel. The walk can also compute o itself (tilings.FUSED_WALK: measured
slower on Triton 3.6, kept for that measurement). Math, layouts and the stages: gdn.common.spec
(chunk_gated_delta_rule); tilings: tilings.prepare_tiling, tilings.walk_tiling, tilings.context_pieces,
tilings.SCAN_TILING. Glossary as in gdn.triton_kernels.chunk_o (i_ program ids, o_ offsets, m_ masks, b_ register
tiles, BT = CHUNK_SIZE).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from gdn.common import checks, contract, spec, tilings
from gdn.common.contract import ArrayInfo
from gdn.triton.arrays import check_device, host_cu_seqlens, layout_keys, planned, refuse_grad, tensor_keys
from gdn.triton.chunk_o import launch as launch_chunk_o
from gdn.triton.launcher import KernelLaunch, cached_plan
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
    k, v, g, beta, A_log, dt_bias, g_cum, w, u, cu_seqlens, chunk_indices, softplus_beta, softplus_threshold, T, N,
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
    q, k, w, u, g_cum, initial_state, o, final_state, h, v_new, map_m, map_n, cu_seqlens, chunk_offsets,
    state_indices, scale, T, NUM_PIECES, MAPPED_PIECES, H_ROWS, POOL_ROWS,
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
    map_m, map_n, initial_state, starts, state_indices, NUM_PIECES, POOL_ROWS,
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


_ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "chunk_indices", "state_indices", "a", "b",
              "A_log", "dt_bias")


@dataclasses.dataclass(frozen=True)
class RawGating:
    """What prepare computes g and beta with from the raw gates a, b (gdn.common.spec, serving arguments):
    A_log and dt_bias [HV], and softplus's beta and threshold."""

    A_log: torch.Tensor | None
    dt_bias: torch.Tensor | None
    softplus_beta: float = spec.SOFTPLUS_BETA
    softplus_threshold: float = spec.SOFTPLUS_THRESHOLD


NO_RAW_GATING = RawGating(None, None)


@cached_plan
def prepare_launch(problem: contract.ForwardProblem, tiling: tilings.Tiling) -> KernelLaunch:
    """The prepare kernel's launch for a validated problem with chunks, cached per (problem, tiling)."""
    return KernelLaunch(
        chunk_prepare_kernel, (problem.num_chunks_total * problem.HV,), tiling,
        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, **dict(zip(STRIDE_NAMES, problem.row_strides)),
        BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, BS=spec.SUBBLOCK, GATE_FLOOR=spec.GATE_FLOOR, IS_VARLEN=problem.varlen,
        RAW_GATES=problem.raw_gates, QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS,
        DOT_PRECISION=tilings.dot_precision(problem.dtype),
    )


@cached_plan
def walk_launch(problem: contract.ForwardProblem, tiling: tilings.Tiling, pieces: int, *, initial: bool,
                final: bool, output_o: bool, store_h: bool, mapped: int = 0) -> KernelLaunch:
    """The walk kernel's launch for a validated problem in that many pieces, cached. mapped > 0: the map walk
    of the first `mapped` pieces over [M | N]'s K + V columns."""
    num_tiles, rows = problem.walk_grid(tiling, mapped or pieces)
    if mapped:
        num_tiles += -(-problem.K // tiling.block_v)
    return KernelLaunch(
        chunk_walk_kernel, (num_tiles, rows), tiling,
        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, **dict(zip(STRIDE_NAMES, problem.row_strides)),
        BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, USE_INITIAL_STATE=initial, STORE_FINAL_STATE=final, OUTPUT_O=output_o, STORE_H=store_h,
        MAP=mapped > 0, IS_VARLEN=problem.varlen, USE_INDICES=problem.pool_rows > 0 and not mapped,
        READ_POOL=problem.pool_rows > 0 and pieces == 1, QK_L2NORM=problem.qk_l2norm,
        QK_L2NORM_EPS=spec.QK_L2NORM_EPS, DOT_PRECISION=tilings.dot_precision(problem.dtype),
    )


@cached_plan
def combine_launch(problem: contract.ForwardProblem, initial: bool) -> KernelLaunch:
    """The combine kernel's launch for a validated problem, cached."""
    tiling = tilings.SCAN_TILING
    return KernelLaunch(
        chunk_combine_kernel, (-(-problem.V // tiling.block_v), problem.N * problem.HV), tiling,
        HV=problem.HV, K=problem.K, V=problem.V, BK=problem.walk.block_k, BV=tiling.block_v,
        USE_INITIAL_STATE=initial, USE_INDICES=problem.pool_rows > 0, DOT_PRECISION=tilings.FLOAT32_DOT_PRECISION,
    )


def prepare(problem: contract.ForwardProblem, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
            beta: torch.Tensor, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None,
            tiling: tilings.Tiling | None = None, gating: RawGating | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 for a validated problem: (g_c [B, T, HV] float32 with NaN on poison rows, w [B, T, HV, K],
    u [B, T, HV, V]), w and u in k's dtype. With problem.raw_gates, g and beta are the raw gates a and b and
    gating holds the rest. tiling defaults to tilings.prepare_tiling's (benchmarks pass others)."""
    B, T, HV = problem.B, problem.T, problem.HV
    g_cum = torch.empty((B, T, HV), dtype=torch.float32, device=k.device)
    w = torch.empty((B, T, HV, problem.K), dtype=k.dtype, device=k.device)
    u = torch.empty_like(v)
    if problem.num_chunks_total * HV > 0:
        gating = gating or NO_RAW_GATING
        prepare_launch(problem, tiling or problem.prepare)(
            k, v, g, beta, gating.A_log, gating.dt_bias, g_cum, w, u, cu_seqlens, chunk_indices, gating.softplus_beta,
            gating.softplus_threshold, problem.T, problem.N)
    return g_cum, w, u


def piece_maps(problem: contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
               g_cum: torch.Tensor, cu_seqlens: torch.Tensor | None, pieces: int, mapped: int,
               tiling: tilings.Tiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine state maps S_out = M·S_in + N of the first `mapped` of `pieces` pieces of every sequence:
    (M [N·mapped, HV, K, K], N [N·mapped, HV, K, V]) float32, from the map walk."""
    N, HV, K, V = problem.N, problem.HV, problem.K, problem.V
    map_m = torch.empty((N * mapped, HV, K, K), dtype=torch.float32, device=k.device)
    map_n = torch.empty((N * mapped, HV, K, V), dtype=torch.float32, device=k.device)
    walk_launch(problem, tiling or problem.walk, pieces, initial=False, final=False, output_o=False, store_h=False,
                mapped=mapped)(None, k, w, u, g_cum, None, None, None, None, None, map_m, map_n, cu_seqlens, None,
                               None, 1.0, problem.T, pieces, mapped, 0, 0)
    return map_m, map_n


def combine(problem: contract.ForwardProblem, map_m: torch.Tensor, map_n: torch.Tensor,
            initial_state: torch.Tensor | None, pieces: int,
            state_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Every piece's true initial state [N·pieces, HV, K, V] float32 from the maps of all pieces but the last
    ([N·(pieces − 1), HV, K, K] and [N·(pieces − 1), HV, K, V]) and each sequence's initial state (or 0; with a
    pool, its row state_indices[n])."""
    starts = torch.empty((problem.N * pieces, problem.HV, problem.K, problem.V), dtype=torch.float32,
                         device=map_m.device)
    combine_launch(problem, initial_state is not None)(map_m, map_n, initial_state, starts, state_indices, pieces,
                                                       problem.pool_rows)
    return starts


def piece_starts(problem: contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                 g_cum: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 pieces: int, tiling: tilings.Tiling | None = None,
                 state_indices: torch.Tensor | None = None) -> torch.Tensor:
    """The true initial state of every piece of every sequence, [N·pieces, HV, K, V] float32 (pieces ≥ 2): the
    map walk of the pieces but the last, then the combine."""
    map_m, map_n = piece_maps(problem, k, w, u, g_cum, cu_seqlens, pieces, pieces - 1, tiling)
    return combine(problem, map_m, map_n, initial_state, pieces, state_indices)


def walk(problem: contract.ForwardProblem, q: torch.Tensor | None, k: torch.Tensor, w: torch.Tensor,
         u: torch.Tensor, g_cum: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
         scale: float, pieces: int = 1, store_h: bool = False, tiling: tilings.Tiling | None = None,
         state_indices: torch.Tensor | None = None, pool: torch.Tensor | None = None,
         ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The walk for a validated problem: (o [B, T, HV, V] like u or None when q is None, final_state
    [N, HV, K, V] float32 or None, h [B, NT, HV, K, V] in k's dtype and v_new like u when store_h, else None).
    initial_state: [N, HV, K, V] for one piece, the pieces' starts [N·pieces, HV, K, V] for more, or None. With
    a pool (problem.pool_rows), each sequence's state is pool[state_indices[n]]: read there in one piece,
    written back there (the pool is the final state returned, updated in place)."""
    B, HV, K, V, N = problem.B, problem.HV, problem.K, problem.V, problem.N
    o = None if q is None else torch.empty_like(u)
    final_state = None
    if problem.output_final_state:
        final_state = pool if pool is not None else torch.empty((N, HV, K, V), dtype=torch.float32, device=k.device)
    h = v_new = chunk_offsets = None
    if store_h:
        h = torch.empty((B, problem.chunks_per_row, HV, K, V), dtype=k.dtype, device=k.device)
        v_new = torch.empty_like(u)
        if problem.varlen:  # first h row of each sequence, on the device: no host sync
            counts = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + spec.CHUNK_SIZE - 1, spec.CHUNK_SIZE,
                               rounding_mode="floor")
            chunk_offsets = torch.cumsum(counts, 0) - counts
    if N * HV == 0:
        return o, final_state, h, v_new
    walk_launch(problem, tiling or problem.walk, pieces, initial=initial_state is not None,
                final=final_state is not None, output_o=q is not None, store_h=store_h)(
        q, k, w, u, g_cum, initial_state, o, final_state, h, v_new, None, None, cu_seqlens, chunk_offsets,
        state_indices, scale, problem.T, pieces, 0, problem.num_chunks_total if store_h else 0, problem.pool_rows)
    return o, final_state, h, v_new


def states(problem: contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, g_cum: torch.Tensor,
           initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The states of every chunk for the backward: (h [B, NT, HV, K, V] in k's dtype, the state each chunk starts
    from; v_new like u; final_state or None): the walk with its states stored and no o."""
    _, final_state, h, v_new = walk(problem, None, k, w, u, g_cum, initial_state, cu_seqlens, 1.0, store_h=True)
    return h, v_new, final_state


def forward(problem: contract.ForwardProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
            beta: torch.Tensor, scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
            chunk_indices: torch.Tensor | None, pieces: int = 1, fused: bool = tilings.FUSED_WALK,
            prepare_tiling: tilings.Tiling | None = None, walk_tiling: tilings.Tiling | None = None,
            state_indices: torch.Tensor | None = None,
            gating: RawGating | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None) of a validated problem: prepare, then forward_after_prepare. The tilings default
    to the problem's (benchmarks pass others); state_indices (a pool in initial_state) and gating (the raw
    gates' parameters, g and beta holding a and b) as the problem's flags say."""
    g_cum, w, u = prepare(problem, k, v, g, beta, cu_seqlens, chunk_indices, prepare_tiling, gating)
    return forward_after_prepare(problem, q, k, v, g_cum, w, u, scale, initial_state, cu_seqlens, chunk_indices,
                                 pieces, fused, walk_tiling, state_indices)


def forward_after_prepare(problem: contract.ForwardProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          g_cum: torch.Tensor, w: torch.Tensor, u: torch.Tensor, scale: float,
                          initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                          chunk_indices: torch.Tensor | None, pieces: int = 1, fused: bool = tilings.FUSED_WALK,
                          walk_tiling: tilings.Tiling | None = None, state_indices: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None) from prepare's (g_c, w, u) and each sequence's start (initial_state, or None for
    zeros; with a pool, its rows state_indices): the walk, in that many pieces per sequence (≥ 2: the
    context-parallel path, through piece_starts); then chunk_fwd_o on the walk's h and v_new, or with fused, o
    from the walk itself (tilings.FUSED_WALK)."""
    pool = initial_state if problem.pool_rows else None
    if pieces > 1 and problem.N * problem.HV > 0:
        initial_state = piece_starts(problem, k, w, u, g_cum, initial_state, cu_seqlens, pieces, walk_tiling,
                                     state_indices)
    else:
        pieces = 1
    o, final_state, h, v_new = walk(problem, q if fused else None, k, w, u, g_cum, initial_state, cu_seqlens, scale,
                                    pieces, store_h=not fused, tiling=walk_tiling, state_indices=state_indices,
                                    pool=pool)
    if not fused:
        chunk_o = problem.chunk_o()
        o = torch.empty_like(v)
        launch_chunk_o(chunk_o, chunk_o.tiling, q, k, v_new, h, g_cum, o, scale, cu_seqlens, chunk_indices)
    return o, final_state


@functools.cache
def multiprocessors(device: torch.device) -> int | None:
    """SMs of a CUDA device (what tilings.context_pieces sizes the pieces by); None elsewhere (interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@cached_plan
def context_pieces(problem: contract.ForwardProblem, device: torch.device) -> int:
    """problem.pieces on that device, cached per call signature."""
    return problem.pieces(multiprocessors(device))


def _no_plan(problem: contract.ForwardProblem) -> None:
    """The forward plans nothing beyond its problem: its launches are cached per (problem, tiling, flags)."""


def validate(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, g: ArrayInfo | None, beta: ArrayInfo | None,
             initial_state: ArrayInfo | None, cu_seqlens: ArrayInfo | None, chunk_indices: ArrayInfo | None,
             state_indices: ArrayInfo | None, a: ArrayInfo | None, b: ArrayInfo | None, A_log: ArrayInfo | None,
             dt_bias: ArrayInfo | None, cu_seqlens_values: tuple[int, ...] | None, output_final_state: bool,
             use_qk_l2norm_in_kernel: bool) -> contract.ForwardProblem:
    """contract.validate_forward_inputs on the arrays in _ARG_NAMES' order, then the options (what
    arrays.planned calls it with), and the check that the kernels can run on q's device."""
    check_device(torch.device(q.device), spec.FORWARD_OP)
    return contract.validate_forward_inputs(
        q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, cu_seqlens_values, output_final_state,
        state_indices=state_indices, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    group: torch.distributed.ProcessGroup | None = None,
    *,
    state_indices: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    softplus_beta: float = spec.SOFTPLUS_BETA,
    softplus_threshold: float = spec.SOFTPLUS_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked Gated DeltaNet forward (prefill): (o [B, T, HV, V] in v's dtype, final_state or None).

    q, k [B, T, H, K] (k L2-normalized by the model, as for FLA, or use_qk_l2norm_in_kernel); v [B, T, HV, V];
    g [B, T, HV] float32 per-token log-gate (≤ 0, natural-log units, not cumulative; −inf is a reset); beta
    [B, T, HV] float32 or q's dtype; initial_state [N, HV, K, V] float32 (zeros when None); final_state
    [N, HV, K, V] float32 when output_final_state. scale defaults to K**-0.5. Varlen: B = 1, cu_seqlens [N + 1]
    and chunk_indices as for gdn.triton.chunk_fwd_o (without chunk_indices, cu_seqlens is read on the host
    once; host chunk_indices are checked against host cu_seqlens). A non-finite value in a token's inputs makes
    the outputs NaN from that token on (its sequence's final state too), never before it. q, k, v slices of one
    fused projection (gdn.common.checks.row_strides) are read in place; q, k, v in another layout and g, beta, a,
    b when not contiguous are copied once (a read and a write of each); the other arrays must be contiguous (a
    pool is updated in place, never copied). No
    backward here (gdn.triton.chunk_gated_delta_rule, gdn.triton.autograd, is the differentiable entry): inputs
    that require grad are refused while grad mode is on.

    Serving arguments (gdn.common.spec; as decode_step's): state_indices [N] int makes initial_state a state pool
    [P, HV, K, V]: sequence n starts from row state_indices[n] (a negative index or one out of range skips the
    sequence: its o rows are 0, nothing is written) and, with output_final_state, ends there: the pool is
    updated in place and returned as the final state. use_qk_l2norm_in_kernel L2-normalizes q and k rows in the
    kernels. The raw gates a, b [B, T, HV] with A_log, dt_bias [HV] (g and beta None) give g = −exp(A_log)·
    softplus(a + dt_bias) and beta = sigmoid(b) in the kernel.

    Context parallel, with a torch.distributed process group (NCCL on GPUs, gloo on CPUs): the arguments are
    this rank's contiguous slice of one dense sequence (B = 1, no cu_seqlens; any length), the slices in the
    group's rank order. initial_state is read on the group's rank 0 only: any other rank's is checked against
    the contract, then ignored (pass the same state everywhere, e.g. the final state an earlier call returned,
    or None), and None on rank 0 is a zero start whatever the others pass (telling the ranks apart would cost
    a host sync per call). The final state of the whole sequence is returned on every rank, the same bits
    everywhere. One all-gather of HV·K·(K + V) float32 per rank (gdn.triton.distributed). Forward only:
    refused when an input requires grad; the serving arguments are refused there.
    """
    # q, k, v views of one fused projection are read in place (the kernels take their strides), any other layout
    # of them and of the gates is copied once; the state (a pool is updated in place) must be dense
    (q, k, v), token_keys = layout_keys(_ARG_NAMES[:3], (q, k, v), _ARG_NAMES[:3], op=spec.FORWARD_OP)
    g, beta, a, b = (x if not isinstance(x, torch.Tensor) or x.is_contiguous() else x.contiguous()
                     for x in (g, beta, a, b))
    arrays = (q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, state_indices, a, b, A_log, dt_bias)
    keys = token_keys + tensor_keys(_ARG_NAMES[3:], arrays[3:], op=spec.FORWARD_OP)
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices)
    problem, _ = planned(validate, _no_plan, keys, cu_values, bool(output_final_state), bool(use_qk_l2norm_in_kernel))
    pieces = context_pieces(problem, q.device)
    scale = spec.default_scale(problem.K) if scale is None else float(scale)
    if group is not None:
        from gdn.triton import distributed  # imports this module: the context-parallel glue around its stages

        return distributed.context_parallel_forward(problem, q, k, v, g, beta, scale, initial_state, group, pieces)
    refuse_grad(spec.FORWARD_OP, _ARG_NAMES, arrays)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(cu_values)).to(q.device)
    elif cu_values is not None and chunk_indices is not None and chunk_indices.device.type == "cpu":
        checks.chunk_indices_rows(cu_values, chunk_indices.numpy(), op=spec.FORWARD_OP)
    if state_indices is not None and state_indices.device.type == "cpu":
        checks.state_index_values(state_indices.numpy(), problem.pool_rows, op=spec.FORWARD_OP)
    gating = RawGating(A_log, dt_bias, float(softplus_beta), float(softplus_threshold)) if problem.raw_gates else None
    return forward(problem, q, k, v, a if problem.raw_gates else g, b if problem.raw_gates else beta, scale,
                   initial_state, cu_seqlens, chunk_indices, pieces, state_indices=state_indices, gating=gating)


def warmup_forward(
    dtype: torch.dtype,
    K: int,
    V: int,
    *,
    HV: int,
    H: int,
    varlen: bool = False,
    initial_state: bool = False,
    output_final_state: bool = True,
    beta_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cuda",
) -> None:
    """Compile everything a later chunk_gated_delta_rule call with these dtypes, sizes and flags needs, for
    any T and any batch: calls at T = CHUNK_SIZE, one per walk tiling size class
    (tilings.walk_warmup_sequence_counts: the batch sizes that select each V-tile width), each once in one
    piece and once in two (the context-parallel path's map walk and combine). Every tiling comes from the
    static tables in gdn.common.tilings, never from timing these shapes."""
    for num_sequences in tilings.walk_warmup_sequence_counts(HV, V):
        call = spec.warmup_arguments(spec.CHUNK_SIZE, H, HV, K, V, True, varlen, num_sequences)
        q = torch.zeros(call["q"], dtype=dtype, device=device)
        v = torch.zeros(call["v"], dtype=dtype, device=device)
        g = torch.zeros(call["g"], dtype=torch.float32, device=device)
        beta = torch.zeros(call["beta"], dtype=beta_dtype, device=device)
        state = torch.zeros(call["state"], dtype=torch.float32, device=device) if initial_state else None
        cu_seqlens, chunk_indices = (None if call[n] is None else torch.from_numpy(call[n]).to(device)
                                     for n in ("cu_seqlens", "chunk_indices"))
        keys = tensor_keys(_ARG_NAMES, (q, q, v, g, beta, state, cu_seqlens, chunk_indices) + (None,) * 5,
                           op=spec.FORWARD_OP)
        cu_values = None if cu_seqlens is None else tuple(call["cu_seqlens"].tolist())
        problem, _ = planned(validate, _no_plan, keys, cu_values, bool(output_final_state), False)
        for pieces in (1, 2):
            forward(problem, q, q, v, g, beta, spec.default_scale(K), state, cu_seqlens, chunk_indices, pieces)
