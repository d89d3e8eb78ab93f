"""chunk_gated_delta_rule for JAX: the chunked Gated DeltaNet forward in Pallas kernels (Triton lowering on GPU),
the same algorithm, names and grids as gdn.triton.forward; on a CUDA GPU the default path launches gdn.triton's own
kernels instead where it can (LOWERINGS).

prepare (g_c, w and u per chunk, all chunks in parallel) → walk (per sequence, value head and V tile, the chunks
in order with S in registers, storing h and v_new) → chunk_fwd_o; with few walks, the context-parallel path (map
walk, combine, then the walk over every piece); the walk can also compute o itself (tilings.FUSED_WALK).
Math, layouts and the stages: gdn.common.spec (chunk_gated_delta_rule). Refs are whole arrays with the token
axis flattened (q, k [B·T, H, K]; v, u, o, v_new [B·T, HV, V]; w [B·T, HV, K]; g, beta, g_c [B·T, HV];
h [B·NT, HV, K, V]; states and maps [rows, K, V] / [rows, K, K]), read and written with masked plgpu.load /
plgpu.store as in gdn.pallas.chunk_o.
Outputs a mode does not write are 1-element placeholders.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gdn.common import checks, forward_contract, spec, tilings
from gdn.pallas import chunk_o
from gdn.pallas.arrays import (
    accumulating_dot,
    array_info,
    as_index,
    check_token_rows,
    compiler_params,
    first_chunk_rows,
    float32_dot_precision,
    host_cu_seqlens,
    host_values,
    index_or_placeholder,
    input_dot_precision,
    is_tracer,
    multiprocessor_count,
    resolve_interpret,
)
from gdn.pallas.chunk_o import chunk_span
from gdn.pallas.chunk_o import launch as launch_chunk_o

LOWERINGS = ("triton", "triton_call", "mosaic_gpu")
"""chunk_gated_delta_rule's JAX paths: "triton", the Pallas kernels of this module (Triton lowering on GPU, the
interpreter on CPU), which run every call; "triton_call", gdn.triton's own forward kernels (gdn.triton_kernels.forward
and chunk_o) launched through jaxlib's Triton custom call (gdn.pallas.triton_call); and "mosaic_gpu", prepare and
the piece maps by triton_call where it runs (else by this module), then the walk with o computed in it in Pallas
Mosaic GPU (gdn.pallas.forward_mosaic_gpu: sm_90, 16-bit, K and V of 64 or 128). Without one asked for,
default_forward_lowering chooses from their measurements (benchmarks/RESULTS.md)."""


def rows_finite(b_x):
    """[R] whether every element of each row of b_x [R, C] is finite (x·0 is NaN exactly for NaN and ±inf)."""
    return jnp.sum(b_x.astype(jnp.float32) * 0.0, axis=1) == 0


def gates_from_raw(b_a, b_b, A_log, dt_bias, i_hv, softplus_beta, softplus_threshold):
    """(g, beta) [BT] float32 from the raw gates a, b [BT]: g = −exp(A_log)·softplus(a + dt_bias), softplus(x) =
    log(1 + exp(β·x))/β up to the threshold, beta = sigmoid(b) (gdn.common.spec, serving arguments)."""
    b_x = b_a + dt_bias[i_hv].astype(jnp.float32)
    b_bx = softplus_beta * b_x
    b_softplus = jnp.where(b_bx <= softplus_threshold,
                           jnp.log(1 + jnp.exp(jnp.minimum(b_bx, softplus_threshold))) / softplus_beta, b_x)
    return -jnp.exp(A_log[i_hv].astype(jnp.float32)) * b_softplus, 1 / (1 + jnp.exp(-b_b))


def unit_lower_inverse(b_A, *, BT: int, BS: int, PRECISION):
    """(I + A)⁻¹ [BT, BT] float32 of a strictly lower b_A [BT, BT] float32 (prepare's, and the backward's
    recompute of it), as gdn.triton_kernels.forward.unit_lower_inverse forms it."""
    dot = accumulating_dot(PRECISION)

    # D⁻¹ first, D = I + the NB = BT/BS diagonal BS×BS blocks of A, as [NB, BS, BS] blocks side by side:
    # column-oriented forward substitution on all blocks at once, exact float32. At step j, row j of every block
    # is final, and every later row i of its block takes X[i] -= A[i, j]·X[j].
    NB = BT // BS
    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_b = jnp.arange(NB, dtype=jnp.int32)
    o_r = jnp.arange(BS, dtype=jnp.int32)
    m_diag = o_b[:, None, None, None] == o_b[None, None, :, None]  # [NB, 1, NB, 1]: a diagonal block of [BT, BT]
    b_Ab = jnp.sum(jnp.where(m_diag, b_A.reshape(NB, BS, NB, BS), 0), axis=2)  # [NB, BS, BS]
    b_X = jnp.where(o_r[None, :, None] == o_r[None, None, :], 1.0, 0.0) + jnp.zeros([NB, BS, BS], jnp.float32)
    for j in range(BS - 1):
        b_col = jnp.sum(jnp.where((o_r == j)[None, None, :], b_Ab, 0), axis=2)  # [NB, BS]: A[i, j] per block
        b_row = jnp.sum(jnp.where((o_r == j)[None, :, None], b_X, 0), axis=1)  # [NB, BS]: X[j, :] per block
        b_X -= b_col[:, :, None] * b_row[:, None, :]
    b_Dinv = jnp.where(m_diag, jnp.broadcast_to(b_X[:, :, None, :], (NB, BS, NB, BS)), 0).reshape(BT, BT)
    # merge: (I + A)⁻¹ = (I + N)⁻¹·D⁻¹ with N = D⁻¹·L, L = A below the diagonal blocks; N is strictly
    # block-lower, N⁴ = 0 (NB = 4): (I + N)⁻¹ = I − N + N² − N³ = (I − N)·(I + N²). Every entry is a product of
    # at most three blocks. The float32 dots run at PRECISION: tf32x3 for float32 inputs; TF32 for 16-bit
    # inputs, whose w and u dots round (I + A)⁻¹ to the input dtype anyway.
    m_block = (o_i[:, None] // BS) == (o_i[None, :] // BS)
    b_N = dot(b_Dinv, jnp.where(m_block, 0, b_A))
    b_N2 = dot(b_N, b_N)
    b_eye = jnp.where(o_i[:, None] == o_i[None, :], 1.0, 0.0).astype(jnp.float32)
    b_M = b_eye - b_N + b_N2 - dot(b_N, b_N2)
    return dot(b_M, b_Dinv)


def chunk_prepare_kernel(
    k, v, g, beta, A_log, dt_bias, params, cu_seqlens, chunk_indices, g_cum, w, u, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int, BS: int, GATE_FLOOR: float,
    IS_VARLEN: bool, RAW_GATES: bool, QK_L2NORM: bool, QK_L2NORM_EPS: float, DOT_PRECISION, MERGE_PRECISION,
):
    # RAW_GATES: g and beta hold the raw gates a and b; params = (softplus β, softplus threshold), runtime values.
    # QK_L2NORM: every k row is used divided by its norm.
    # One program per (chunk, value head), value head fastest: the value heads of one q/k head share k via L2.
    i_flat = pl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T=T, BT=BT, IS_VARLEN=IS_VARLEN)
    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_t = t0 + o_i  # [BT] token rows
    m_t = o_t < eos

    dot = accumulating_dot(DOT_PRECISION)

    b_g = plgpu.load(g.at[o_t, i_hv], mask=m_t, other=0).astype(jnp.float32)  # [BT] per-token log-gates
    b_beta = plgpu.load(beta.at[o_t, i_hv], mask=m_t, other=0).astype(jnp.float32)  # [BT]
    if RAW_GATES:
        b_g, b_beta = gates_from_raw(b_g, b_beta, A_log, dt_bias, i_hv, params[0], params[1])
    # A row with a NaN or +inf gate, or a non-finite beta, key or value is poison: zeroed before every dot here
    # (so it reaches no other row: a zero coefficient times NaN would still be NaN) and marked NaN in g_c for
    # the walk, which makes the outputs NaN from that row on. A gate of −inf is a reset, not poison.
    b_bad = (b_g != b_g) | (b_g == jnp.inf) | (b_beta * 0.0 != 0)
    b_k_sq = jnp.zeros([BT], dtype=jnp.float32)  # Σ k² per row
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_t[:, None] & (o_k < K)[None, :], other=0)
        b_bad = b_bad | ~rows_finite(b_k)
        b_k_sq += jnp.sum(b_k.astype(jnp.float32) * b_k.astype(jnp.float32), axis=1)
    for v0 in range(0, V, BV):
        o_v = v0 + jnp.arange(BV, dtype=jnp.int32)
        b_bad = b_bad | ~rows_finite(plgpu.load(v.at[o_t[:, None], i_hv, o_v[None, :]],
                                                mask=m_t[:, None] & (o_v < V)[None, :], other=0))
    m_tb = m_t & ~b_bad  # the rows every load below reads
    # 1 / |k_i| (QK_L2NORM, in float32) scales each k row where it is used; 1 otherwise
    b_k_scale = jnp.where(m_tb, 1 / jnp.sqrt(b_k_sq + QK_L2NORM_EPS) if QK_L2NORM else 1.0, 0)

    # g_c: chunk-local cumulative sum of the floored log-gates (padding and poison rows add 0)
    b_g = jnp.cumsum(jnp.where(m_tb, jnp.maximum(b_g, GATE_FLOOR), 0), axis=0)
    plgpu.store(g_cum.at[o_t, i_hv], jnp.where(b_bad, jnp.nan, b_g), mask=m_t)
    b_beta = jnp.where(m_tb, b_beta, 0)

    # A = strictly lower (beta_i·k_i·k_j·exp(g_i − g_j)): [BT, BK] @ [BK, BT] summed over K steps
    b_A = jnp.zeros([BT, BT], dtype=jnp.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tb[:, None] & (o_k < K)[None, :], other=0)
        b_A += dot(b_k, b_k.T)
    m_lower = o_i[:, None] > o_i[None, :]
    b_A = b_A * (b_beta * b_k_scale)[:, None] * b_k_scale[None, :] * jnp.exp(
        jnp.where(m_lower, b_g[:, None] - b_g[None, :], -jnp.inf))

    b_Ai = unit_lower_inverse(b_A, BT=BT, BS=BS, PRECISION=MERGE_PRECISION)  # [BT, BT] float32

    # w = (I + A)⁻¹·(beta·exp(g)·k), u = (I + A)⁻¹·(beta·v): in k's dtype on the tensor cores, as FLA does
    b_Ai_in = b_Ai.astype(k.dtype)
    b_kscale = b_beta * jnp.exp(b_g) * b_k_scale
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tb[:, None] & (o_k < K)[None, :], other=0)
        b_w = dot(b_Ai_in, (b_k * b_kscale[:, None]).astype(b_k.dtype))
        plgpu.store(w.at[o_t[:, None], i_hv, o_k[None, :]], b_w.astype(w.dtype), mask=m_t[:, None] & (o_k < K)[None, :])
    for v0 in range(0, V, BV):
        o_v = v0 + jnp.arange(BV, dtype=jnp.int32)
        b_v = plgpu.load(v.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tb[:, None] & (o_v < V)[None, :], other=0)
        b_u = dot(b_Ai_in, (b_v * b_beta[:, None]).astype(b_v.dtype))
        plgpu.store(u.at[o_t[:, None], i_hv, o_v[None, :]], b_u.astype(u.dtype), mask=m_t[:, None] & (o_v < V)[None, :])


def pool_row(state_indices, i_n, POOL_ROWS: int):
    """(row, valid) of sequence i_n's state in a pool of POOL_ROWS rows: state_indices[i_n], valid when in
    [0, POOL_ROWS) (a negative index is a padded slot; an index out of range is skipped as one)."""
    i_row = state_indices[i_n]
    m_row = (i_row >= 0) & (i_row < POOL_ROWS)
    # clipped rather than selected (the Triton lowering of jax 0.11 mis-types a scalar jnp.where with a literal)
    return jnp.clip(i_row, 0, POOL_ROWS - 1), m_row


def chunk_walk_kernel(
    q, k, w, u, g_cum, initial_state, pool, state_indices, cu_seqlens, chunk_offsets, scale,
    o, final_state, h, v_new, map_m, map_n, *,
    T: int, NUM_PIECES: int, MAPPED_PIECES: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int,
    USE_INITIAL_STATE: bool, STORE_FINAL_STATE: bool, OUTPUT_O: bool, STORE_H: bool, MAP: bool, IS_VARLEN: bool,
    USE_INDICES: bool, READ_POOL: bool, QK_L2NORM: bool, QK_L2NORM_EPS: float, DOT_PRECISION,
):
    # USE_INDICES: the sequence's state lives in the pool [P, HV, K, V] at row state_indices[n] (final_state is
    # the pool, aliased, when the final state is stored): read there (READ_POOL, one piece) and written back
    # there by the last piece; a sequence without a valid row is skipped: S, h and v_new stay 0 (so
    # chunk_fwd_o's o rows are 0), nothing is written back.
    # The Triton kernel's arguments, outputs last (Pallas passes outputs after inputs); scale is a [1] ref.
    # One program per (V tile, sequence·piece·value head) walks the chunks of its piece of the sequence in order
    # with its [BK, BV] float32 slice of S in registers: the V columns of S never mix. A piece is chunks
    # [p·NT/P, (p + 1)·NT/P) of the sequence's NT (P = NUM_PIECES; one piece: the whole sequence).
    # MAP: the first MAPPED_PIECES pieces walk the augmented state [M | N] from [I | 0], with u = 0 in M's
    # columns: V tiles i_v < NM cover M's K columns, the rest N's V columns; M and N are stored instead of h.
    i_v = pl.program_id(0)
    i_nph = pl.program_id(1)
    i_hv = i_nph % HV
    i_np = i_nph // HV
    grid_pieces = MAPPED_PIECES if MAP else NUM_PIECES
    i_p = i_np % grid_pieces
    i_n = i_np // grid_pieces
    i_h = i_hv // (HV // H)
    if IS_VARLEN:  # the sequence's token rows, clamped into [0, T]: device values are never trusted
        bos = jnp.clip(cu_seqlens[i_n], 0, T)
        eos = jnp.clip(cu_seqlens[i_n + 1], bos, T)
    else:
        bos = i_n * T
        eos = bos + T
    NT = pl.cdiv(eos - bos, BT)
    c_first = i_p * NT // NUM_PIECES
    c_end = (i_p + 1) * NT // NUM_PIECES

    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_k = jnp.arange(BK, dtype=jnp.int32)
    m_k = o_k < K
    NM = (K + BV - 1) // BV  # MAP: V tiles of M's columns
    o_v = ((i_v - NM) if MAP else i_v) * BV + jnp.arange(BV, dtype=jnp.int32)  # (negative in M's tiles: masked)
    m_v = (o_v >= 0) & (o_v < V)
    m_kv = m_k[:, None] & m_v[None, :]
    m_causal = o_i[:, None] >= o_i[None, :]
    scale = scale[0]

    dot = accumulating_dot(DOT_PRECISION)

    if USE_INDICES:
        i_row, m_row = pool_row(state_indices, i_n, pool.shape[0])
    b_s = jnp.zeros([BK, BV], dtype=jnp.float32)
    if MAP:  # M's columns start from the identity
        o_m = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
        b_s = jnp.where((o_k[:, None] == o_m[None, :]) & (o_m < K)[None, :], 1.0, 0.0).astype(jnp.float32)
    elif READ_POOL:  # the sequence's initial state: its pool row
        b_s += plgpu.load(pool.at[i_row, i_hv, o_k[:, None], o_v[None, :]], mask=m_kv & m_row, other=0)
    elif USE_INITIAL_STATE:  # the sequence's initial state, or the piece's start (a skipped sequence's: 0)
        b_s += plgpu.load(initial_state.at[i_np * HV + i_hv, o_k[:, None], o_v[None, :]],
                          mask=m_kv & m_row if USE_INDICES else m_kv, other=0)
    if STORE_H:
        first_chunk = chunk_offsets[i_n] if IS_VARLEN else i_n * pl.cdiv(T, BT)

    def chunk(i_t, b_s):
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        # g_c is NaN on poison rows (prepare): carried into every product, never selected away, it makes S NaN
        # after the chunk (0·NaN is NaN) and, through exp(g_i − g_j) and chunk_fwd_o's scores, o NaN from that
        # row on, while earlier rows never read it (causal where). No reduction over the tile is needed per chunk.
        b_g = plgpu.load(g_cum.at[o_t, i_hv], mask=m_t, other=0)  # [BT]
        b_g_last = g_cum[jnp.minimum(bos + (i_t + 1) * BT, eos) - 1, i_hv]
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)  # [BT, BK]
        if QK_L2NORM:  # k_i / |k_i|, the whole K in the tile
            b_kf = b_k.astype(jnp.float32)
            b_k = (b_kf / jnp.sqrt(jnp.sum(b_kf * b_kf, axis=1) + QK_L2NORM_EPS)[:, None]).astype(b_k.dtype)
        b_w = plgpu.load(w.at[o_t[:, None], i_hv, o_k[None, :]], mask=m_tk, other=0)  # [BT, BK]
        b_u = plgpu.load(u.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_t[:, None] & m_v[None, :], other=0)
        if USE_INDICES:  # a skipped sequence: v_new = 0
            b_u = jnp.where(m_row, b_u, 0)
            b_w = jnp.where(m_row, b_w, 0)
        m_tv = m_t[:, None] & m_v[None, :]
        # v_new = u − w·S: [BT, BK] @ [BK, BV]
        b_vn = b_u.astype(jnp.float32) - dot(b_w, b_s.astype(b_w.dtype))
        if STORE_H:  # h[c] = S, the state the chunk starts from (a row within h), and v_new
            i_chunk_row = first_chunk + i_t
            plgpu.store(h.at[jnp.clip(i_chunk_row, 0, h.shape[0] - 1), i_hv, o_k[:, None], o_v[None, :]],
                        b_s.astype(h.dtype), mask=m_kv & (i_chunk_row >= 0) & (i_chunk_row < h.shape[0]))
            plgpu.store(v_new.at[o_t[:, None], i_hv, o_v[None, :]], b_vn.astype(v_new.dtype), mask=m_tv)
        if OUTPUT_O:
            # o = scale·(q ⊙ exp(g))·S + tril(scale·q·kᵀ ⊙ exp(g_i − g_j))·v_new
            b_q = plgpu.load(q.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)  # [BT, BK]
            if QK_L2NORM:
                b_qf = b_q.astype(jnp.float32)
                b_q = (b_qf / jnp.sqrt(jnp.sum(b_qf * b_qf, axis=1) + QK_L2NORM_EPS)[:, None]).astype(b_q.dtype)
            if USE_INDICES:  # a skipped sequence: o = 0
                b_q = jnp.where(m_row, b_q, 0)
            b_o = dot(b_q, b_s.astype(b_q.dtype)) * jnp.exp(b_g)[:, None]
            b_P = dot(b_q, b_k.T)  # [BT, BK] @ [BK, BT]
            b_P = jnp.where(m_causal, b_P * jnp.exp(jnp.where(m_causal, b_g[:, None] - b_g[None, :], -jnp.inf)), 0)
            b_o = b_o * scale + dot((b_P * scale).astype(b_q.dtype), b_vn.astype(b_q.dtype))
            plgpu.store(o.at[o_t[:, None], i_hv, o_v[None, :]], b_o.astype(o.dtype), mask=m_tv)
        # S = exp(g_last)·S + (k ⊙ exp(g_last − g))ᵀ·v_new: [BK, BT] @ [BT, BV]
        b_vn = b_vn * jnp.where(m_t, jnp.exp(b_g_last - b_g), 0)[:, None]
        return b_s * jnp.exp(b_g_last) + dot(b_k.T, b_vn.astype(b_k.dtype))

    b_s = jax.lax.fori_loop(c_first, c_end, chunk, b_s)
    if MAP:
        p_map = (i_n * MAPPED_PIECES + i_p) * HV + i_hv
        # M's tiles hold the columns o_m < K (in N's tiles o_m ≥ NM·BV ≥ K), N's tiles the columns 0 ≤ o_v < V
        plgpu.store(map_m.at[p_map, o_k[:, None], o_m[None, :]], b_s, mask=m_k[:, None] & (o_m < K)[None, :])
        plgpu.store(map_n.at[p_map, o_k[:, None], o_v[None, :]], b_s, mask=m_kv)
    elif STORE_FINAL_STATE and USE_INDICES:  # back into the sequence's pool row
        plgpu.store(final_state.at[i_row, i_hv, o_k[:, None], o_v[None, :]], b_s,
                    mask=m_kv & m_row & (i_p == NUM_PIECES - 1))
    elif STORE_FINAL_STATE:
        plgpu.store(final_state.at[i_n * HV + i_hv, o_k[:, None], o_v[None, :]], b_s,
                    mask=m_kv & (i_p == NUM_PIECES - 1))


def chunk_combine_kernel(
    map_m, map_n, initial_state, state_indices, starts, *,
    NUM_PIECES: int, HV: int, K: int, V: int, BK: int, BV: int, USE_INITIAL_STATE: bool, USE_INDICES: bool,
    DOT_PRECISION,
):
    # USE_INDICES: each sequence's initial state is the pool row state_indices[n] (0 when it names none).
    # One program per (V tile, sequence·value head): the pieces' true initial states in order,
    # S_0 = the initial state (or 0), S_{p+1} = M_p·S_p + N_p. The columns of S never mix.
    i_v = pl.program_id(0)
    i_nh = pl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    o_k = jnp.arange(BK, dtype=jnp.int32)
    m_k = o_k < K
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_kv = m_k[:, None] & (o_v < V)[None, :]

    b_s = jnp.zeros([BK, BV], dtype=jnp.float32)
    if USE_INITIAL_STATE and USE_INDICES:
        i_row, m_row = pool_row(state_indices, i_n, initial_state.shape[0] // HV)
        b_s += plgpu.load(initial_state.at[i_row * HV + i_hv, o_k[:, None], o_v[None, :]], mask=m_kv & m_row, other=0)
    elif USE_INITIAL_STATE:
        b_s += plgpu.load(initial_state.at[i_nh, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)
    plgpu.store(starts.at[i_n * NUM_PIECES * HV + i_hv, o_k[:, None], o_v[None, :]], b_s, mask=m_kv)

    def piece(i_p, b_s):
        p_map = (i_n * (NUM_PIECES - 1) + i_p) * HV + i_hv
        b_m = plgpu.load(map_m.at[p_map, o_k[:, None], o_k[None, :]], mask=m_k[:, None] & m_k[None, :], other=0)
        b_n = plgpu.load(map_n.at[p_map, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)
        # [BK, BK] @ [BK, BV] -> [BK, BV]
        b_s = jnp.dot(b_m, b_s, precision=DOT_PRECISION, preferred_element_type=jnp.float32) + b_n
        plgpu.store(starts.at[(i_n * NUM_PIECES + i_p + 1) * HV + i_hv, o_k[:, None], o_v[None, :]], b_s, mask=m_kv)
        return b_s

    jax.lax.fori_loop(0, NUM_PIECES - 1, piece, b_s)


def _placeholder(dtype) -> jax.ShapeDtypeStruct:
    """An output a kernel mode never writes."""
    return jax.ShapeDtypeStruct((1, 1, 1), dtype)


def prepare(problem: forward_contract.ForwardProblem, k, v, g, beta, cu_seqlens, chunk_indices, *, interpret: bool,
            tiling: tilings.Tiling | None = None, gating: tuple | None = None):
    """Stage 1 for a validated problem: (g_c [B, T, HV] float32 with NaN on poison rows, w [B, T, HV, K],
    u [B, T, HV, V]), w and u in k's dtype. cu_seqlens / chunk_indices: int32 arrays when varlen, else None.
    With problem.raw_gates, g and beta are the raw gates a and b and gating = (A_log, dt_bias, softplus β,
    softplus threshold). tiling defaults to tilings.prepare_tiling's (benchmarks pass others)."""
    B, T, H, HV, K, V = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V
    shapes = {"g_cum": ((B, T, HV), jnp.float32), "w": ((B, T, HV, K), k.dtype), "u": ((B, T, HV, V), v.dtype)}
    if problem.num_chunks_total * HV == 0:
        return tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes.values())
    tiling = tiling or problem.prepare
    kernel = functools.partial(
        chunk_prepare_kernel, T=T, H=H, HV=HV, K=K, V=V, BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, BS=spec.SUBBLOCK, GATE_FLOOR=spec.GATE_FLOOR, IS_VARLEN=problem.varlen,
        RAW_GATES=problem.raw_gates, QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS,
        DOT_PRECISION=input_dot_precision(problem.dtype, interpret),
        # prepare's float32 merge dots: tilings.dot_precision, as in the Triton kernel
        MERGE_PRECISION=float32_dot_precision(interpret, problem.dtype))
    A_log, dt_bias, softplus_beta, softplus_threshold = gating or (None, None, spec.SOFTPLUS_BETA,
                                                                   spec.SOFTPLUS_THRESHOLD)
    per_head = jnp.zeros((1,), jnp.float32)
    # Every element of a real token is stored by exactly one program (chunks tile each sequence), as with
    # torch.empty in the Triton backend.
    g_cum, w, u = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((B * T,) + shape[2:], dtype) for shape, dtype in shapes.values()),
        grid=(problem.num_chunks_total * HV,),
        interpret=interpret,
        name="chunk_prepare_kernel",
        compiler_params=compiler_params(tiling),
    )(k.reshape(B * T, H, K), v.reshape(B * T, HV, V), g.reshape(B * T, HV), beta.reshape(B * T, HV),
      per_head if A_log is None else A_log, per_head if dt_bias is None else dt_bias,
      jnp.stack([jnp.asarray(softplus_beta, jnp.float32), jnp.asarray(softplus_threshold, jnp.float32)]),
      index_or_placeholder(cu_seqlens, (2,)), index_or_placeholder(chunk_indices, (1, 2)))
    return g_cum.reshape(B, T, HV), w.reshape(B, T, HV, K), u.reshape(B, T, HV, V)


def _walk_call(problem: forward_contract.ForwardProblem, q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_offsets,
               scale, pieces: int, *, output_o: bool, store_h: bool, interpret: bool, tiling: tilings.Tiling,
               mapped: int = 0, state_indices=None, pool=None):
    """One launch of the walk kernel in a mode: its six outputs (o, final_state, h, v_new, map_m, map_n),
    placeholders where the mode writes nothing. mapped > 0: the map walk of the first `mapped` pieces. With a
    pool [P, HV, K, V] (problem.pool_rows), the final state is the pool itself, aliased: only the rows that
    state_indices names are written."""
    use_pool = pool is not None and not mapped
    B, T, H, HV, K, V, N = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V, problem.N
    map_pieces = mapped > 0
    num_tiles, rows = problem.walk_grid(tiling, mapped or pieces)
    if map_pieces:
        num_tiles += -(-K // tiling.block_v)
    maps = N * mapped * HV
    out_shape = (
        jax.ShapeDtypeStruct((B * T, HV, V), u.dtype) if output_o else _placeholder(u.dtype),
        (jax.ShapeDtypeStruct(pool.shape, jnp.float32) if use_pool
         else jax.ShapeDtypeStruct((N * HV, K, V), jnp.float32)) if problem.output_final_state and not map_pieces
        else _placeholder(jnp.float32),
        jax.ShapeDtypeStruct((max(problem.num_chunks_total, 1), HV, K, V), k.dtype) if store_h
        else _placeholder(k.dtype),
        jax.ShapeDtypeStruct((B * T, HV, V), u.dtype) if store_h else _placeholder(u.dtype),
        jax.ShapeDtypeStruct((maps, K, K), jnp.float32) if map_pieces else _placeholder(jnp.float32),
        jax.ShapeDtypeStruct((maps, K, V), jnp.float32) if map_pieces else _placeholder(jnp.float32),
    )
    kernel = functools.partial(
        chunk_walk_kernel, T=T, NUM_PIECES=pieces, MAPPED_PIECES=mapped, H=H, HV=HV, K=K, V=V, BT=spec.CHUNK_SIZE,
        BK=tiling.block_k,
        BV=tiling.block_v, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=problem.output_final_state and not map_pieces, OUTPUT_O=output_o, STORE_H=store_h,
        MAP=map_pieces, IS_VARLEN=problem.varlen, USE_INDICES=use_pool, READ_POOL=use_pool and pieces == 1,
        QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS,
        DOT_PRECISION=input_dot_precision(problem.dtype, interpret))
    placeholder = jnp.zeros((1, 1, 1), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_tiles, rows),
        interpret=interpret,
        name="chunk_walk_kernel",
        compiler_params=compiler_params(tiling),
        # the pool (input 6) is the final state (output 1): a donated pool is updated without a copy
        input_output_aliases={6: 1} if use_pool and problem.output_final_state else {},
    )(placeholder if q is None else q.reshape(B * T, H, K), k.reshape(B * T, H, K), w.reshape(B * T, HV, K),
      u.reshape(B * T, HV, V), g_cum.reshape(B * T, HV),
      placeholder if initial_state is None or (use_pool and pieces == 1) else initial_state.reshape(-1, K, V),
      jnp.zeros((1, 1, 1, 1), jnp.float32) if not use_pool else pool,
      index_or_placeholder(state_indices, (1,)), index_or_placeholder(cu_seqlens, (2,)),
      index_or_placeholder(chunk_offsets, (1,)), jnp.asarray(scale, jnp.float32).reshape(1))


def piece_maps(problem: forward_contract.ForwardProblem, k, w, u, g_cum, cu_seqlens, pieces: int, mapped: int, *,
               interpret: bool, tiling: tilings.Tiling | None = None):
    """The affine state maps S_out = M·S_in + N of the first `mapped` of `pieces` pieces of every sequence:
    (M [N·mapped, HV, K, K], N [N·mapped, HV, K, V]) float32, from the map walk."""
    N, HV, K, V = problem.N, problem.HV, problem.K, problem.V
    *_, map_m, map_n = _walk_call(problem, None, k, w, u, g_cum, None, cu_seqlens, None, 1.0, pieces,
                                  output_o=False, store_h=False, interpret=interpret, tiling=tiling or problem.walk,
                                  mapped=mapped)
    return map_m.reshape(N * mapped, HV, K, K), map_n.reshape(N * mapped, HV, K, V)


def combine(problem: forward_contract.ForwardProblem, map_m, map_n, initial_state, pieces: int, *, interpret: bool,
            state_indices=None):
    """Every piece's true initial state [N·pieces, HV, K, V] float32 from the maps of all pieces but the last
    ([N·(pieces − 1), HV, K, K] and [N·(pieces − 1), HV, K, V]) and each sequence's initial state (or 0; with a
    pool, its row state_indices[n])."""
    N, HV, K, V = problem.N, problem.HV, problem.K, problem.V
    tiling = tilings.SCAN_TILING
    kernel = functools.partial(
        chunk_combine_kernel, NUM_PIECES=pieces, HV=HV, K=K, V=V, BK=problem.walk.block_k, BV=tiling.block_v,
        USE_INITIAL_STATE=initial_state is not None, USE_INDICES=problem.pool_rows > 0,
        DOT_PRECISION=float32_dot_precision(interpret))
    starts = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((N * pieces * HV, K, V), jnp.float32),
        grid=(-(-V // tiling.block_v), N * HV),
        interpret=interpret,
        name="chunk_combine_kernel",
        compiler_params=compiler_params(tiling),
    )(map_m.reshape(-1, K, K), map_n.reshape(-1, K, V), jnp.zeros((1, 1, 1), jnp.float32) if initial_state is None
      else initial_state.reshape(-1, K, V), index_or_placeholder(state_indices, (1,)))
    return starts.reshape(N * pieces, HV, K, V)


def piece_starts(problem: forward_contract.ForwardProblem, k, w, u, g_cum, initial_state, cu_seqlens, pieces: int, *,
                 interpret: bool, tiling: tilings.Tiling | None = None, state_indices=None):
    """The true initial state of every piece of every sequence, [N·pieces, HV, K, V] float32 (pieces ≥ 2): the
    map walk of the pieces but the last, then the combine."""
    map_m, map_n = piece_maps(problem, k, w, u, g_cum, cu_seqlens, pieces, pieces - 1, interpret=interpret,
                              tiling=tiling)
    return combine(problem, map_m, map_n, initial_state, pieces, interpret=interpret, state_indices=state_indices)


def walk(problem: forward_contract.ForwardProblem, q, k, w, u, g_cum, initial_state, cu_seqlens, scale, pieces: int = 1,
         store_h: bool = False, *, interpret: bool, tiling: tilings.Tiling | None = None, state_indices=None,
         pool=None):
    """The walk for a validated problem: (o [B, T, HV, V] like u or None when q is None, final_state
    [N, HV, K, V] float32 or None, h [B, NT, HV, K, V] in k's dtype and v_new like u when store_h, else None).
    initial_state: [N, HV, K, V] for one piece, the pieces' starts [N·pieces, HV, K, V] for more, or None. With
    a pool (problem.pool_rows), each sequence's state is pool[state_indices[n]]: read there in one piece,
    written back there (the final state returned is the updated pool, aliased to it)."""
    B, T, HV, K, V, N = problem.B, problem.T, problem.HV, problem.K, problem.V, problem.N
    if B * T == 0 or N * HV == 0:  # no tokens: the final state is the initial one (zero-size refs cannot be read)
        final = None
        if problem.output_final_state:
            final = pool if pool is not None else (
                jnp.zeros((N, HV, K, V), jnp.float32) if initial_state is None else initial_state)
        h = jnp.zeros((B, problem.chunks_per_row, HV, K, V), k.dtype) if store_h else None
        return (None if q is None else jnp.zeros(u.shape, u.dtype)), final, h, (
            jnp.zeros(u.shape, u.dtype) if store_h else None)
    chunk_offsets = None
    if store_h and problem.varlen:
        chunk_offsets = first_chunk_rows(cu_seqlens)
    o, final_state, h, v_new, _, _ = _walk_call(
        problem, q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_offsets, scale, pieces, output_o=q is not None,
        store_h=store_h, interpret=interpret, tiling=tiling or problem.walk, state_indices=state_indices, pool=pool)
    o = None if q is None else o.reshape(B, T, HV, V)
    final_state = None if not problem.output_final_state else (
        final_state if pool is not None else final_state.reshape(N, HV, K, V))
    if store_h:
        h = h[:problem.num_chunks_total].reshape(B, problem.chunks_per_row, HV, K, V)
        v_new = v_new.reshape(B, T, HV, V)
    return o, final_state, (h if store_h else None), (v_new if store_h else None)


def states(problem: forward_contract.ForwardProblem, k, w, u, g_cum, initial_state, cu_seqlens, *, interpret: bool):
    """The states of every chunk for the backward: (h [B, NT, HV, K, V] in k's dtype, the state each chunk starts
    from; v_new like u; final_state or None): the walk with its states stored and no o."""
    _, final_state, h, v_new = walk(problem, None, k, w, u, g_cum, initial_state, cu_seqlens, 1.0, store_h=True,
                                    interpret=interpret)
    return h, v_new, final_state


@functools.partial(jax.jit, static_argnames=("problem", "pieces", "interpret", "fused", "walk_lowering"))
def jitted_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, state_indices=None,
                   gating=None, *, problem: forward_contract.ForwardProblem, pieces: int, interpret: bool,
                   fused: bool = tilings.FUSED_WALK, walk_lowering: str = "triton"):
    """(o, final_state or None) of a validated problem (cu_seqlens / chunk_indices int32 when varlen, else
    None): prepare, then forward_after_prepare. state_indices (int32, a pool in initial_state) and gating
    ((A_log, dt_bias, softplus β, softplus threshold), g and beta holding the raw gates a and b) as the
    problem's flags say."""
    g_cum, w, u = prepare(problem, k, v, g, beta, cu_seqlens, chunk_indices, interpret=interpret, gating=gating)
    return forward_after_prepare(problem, q, k, v, g_cum, w, u, scale, initial_state, cu_seqlens, chunk_indices,
                                 pieces, interpret=interpret, fused=fused, state_indices=state_indices,
                                 walk_lowering=walk_lowering)


def forward_after_prepare(problem: forward_contract.ForwardProblem, q, k, v, g_cum, w, u, scale, initial_state,
                          cu_seqlens, chunk_indices, pieces: int, *, interpret: bool, fused: bool = tilings.FUSED_WALK,
                          state_indices=None, walk_lowering: str = "triton"):
    """(o, final_state or None) from prepare's (g_c, w, u) and each sequence's start (initial_state, or None for
    zeros; with a pool, its rows state_indices): the walk, in that many pieces per sequence (≥ 2: through
    piece_starts); then chunk_fwd_o on the walk's h and v_new, or with fused, o from the walk itself
    (tilings.FUSED_WALK); with walk_lowering="mosaic_gpu", o from the Mosaic GPU walk (a problem it supports)."""
    pool = initial_state if problem.pool_rows else None
    has_tokens = problem.B * problem.T > 0 and problem.N * problem.HV > 0
    if pieces > 1 and has_tokens:
        initial_state = piece_starts(problem, k, w, u, g_cum, initial_state, cu_seqlens, pieces, interpret=interpret,
                                     state_indices=state_indices)
    else:
        pieces = 1
    if walk_lowering == "mosaic_gpu" and has_tokens:
        from gdn.pallas import forward_mosaic_gpu  # Mosaic GPU is imported only by a call that asks for it

        return forward_mosaic_gpu.fused_walk(problem, q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_indices,
                                             scale, pieces, interpret=interpret)
    o, final_state, h, v_new = walk(problem, q if fused else None, k, w, u, g_cum, initial_state, cu_seqlens, scale,
                                    pieces, store_h=not fused, interpret=interpret, state_indices=state_indices,
                                    pool=pool)
    if not fused:
        o = launch_chunk_o(q, k, v_new, h, g_cum, scale, cu_seqlens, chunk_indices, problem=problem.chunk_o(),
                           interpret=interpret)
    return o, final_state


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    beta: jax.Array | None,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | np.ndarray | None = None,
    chunk_indices: jax.Array | np.ndarray | None = None,
    *,
    interpret: bool | None = None,
    axis_name: str | None = None,
    state_indices: jax.Array | np.ndarray | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    A_log: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    softplus_beta: float | jax.Array = spec.SOFTPLUS_BETA,
    softplus_threshold: float | jax.Array = spec.SOFTPLUS_THRESHOLD,
    lowering: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The chunked Gated DeltaNet forward (prefill): (o [B, T, HV, V] in v's dtype, final_state or None).

    q, k [B, T, H, K] (k L2-normalized by the model, as for FLA, or use_qk_l2norm_in_kernel); v [B, T, HV, V];
    g [B, T, HV] per-token log-gate (≤ 0, natural-log units, not cumulative; −inf is a reset) and beta
    [B, T, HV], float32 or q's dtype; initial_state [N, HV, K, V] float32 (zeros when None); final_state
    [N, HV, K, V] float32 when output_final_state. scale (a Python float or a traced scalar) defaults to
    K**-0.5. Varlen: B = 1, cu_seqlens [N + 1] and chunk_indices as for gdn.pallas.chunk_fwd_o (under jax.jit
    chunk_indices must be passed). Every array argument may be traced. interpret=None runs the Pallas
    interpreter unless the default backend is a GPU. Jitted internally (jitted_chunk_gated_delta_rule): a call
    outside jax.jit costs one jit dispatch.

    Serving arguments (gdn.common.spec; as decode_step's): state_indices [N] int32 makes initial_state a state
    pool [P, HV, K, V]: sequence n starts from row state_indices[n] (a negative index or one out of range skips
    the sequence: its o rows are 0, nothing is written) and, with output_final_state, ends there: the updated
    pool is returned, aliased to the input (donated: under jax.jit with the pool donated it is updated without
    a copy; outside a jit this call consumes the array passed in; without output_final_state the pool is only
    read). Host index values are checked first.
    use_qk_l2norm_in_kernel (static) L2-normalizes q and k rows in the kernels. The raw gates a, b [B, T, HV]
    with A_log, dt_bias [HV] (g and beta None) give g = −exp(A_log)·softplus(a + dt_bias) and beta = sigmoid(b)
    in the kernel.

    Differentiable (jax.custom_vjp) in q, k, v, g, beta, scale, initial_state and the raw gates; the forward runs
    the fused kernels whatever is differentiated, and the backward recomputes the normalized q, k and the gates
    from the raw inputs with jnp ops (one more pass over q, k, a, b) before its kernels, then carries their
    gradients back through those ops (gdn.pallas.backward.vjp). A state pool has no gradient: differentiating a
    call with state_indices raises.

    Context parallel, with axis_name (static): called inside jax.shard_map(..., check_vma=False) with the
    sequence axis of q, k, v, g, beta sharded over that mesh axis (B = 1, no cu_seqlens), initial_state
    replicated; returns this device's slice of o and the whole sequence's final state, the same bits on every
    device of the axis (out_specs=P() holds for it). One jax.lax.all_gather of HV·K·(K + V) float32 per device
    (gdn.pallas.distributed). Pallas kernels declare no varying mesh axes, hence check_vma=False. The serving
    arguments are refused there.

    lowering (static): "triton_call" (gdn.pallas.triton_call: gdn.triton's forward kernels, launch plans and bits
    on a CUDA GPU, compiled only, needs triton), "mosaic_gpu" (the walk with o in Pallas Mosaic GPU after
    triton_call's prepare and piece maps, or this module's where triton_call does not run; sm_90 or interpret
    mode, float16 / bfloat16, K and V of 64 or 128, no state pool, no axis_name), "triton" (the Pallas kernels of
    this module and their bits; the interpreter on CPU), or None, the default: default_forward_lowering, where
    triton_call runs (compiled on a CUDA GPU with triton and jaxlib's Triton custom call, no state pool, no
    axis_name, scale and the softplus scalars not traced) "mosaic_gpu" for dense inputs it takes and "triton_call"
    for the rest, else "triton". Asked for by name, "triton_call" refuses interpret=True, axis_name, state_indices
    and a traced scale, softplus_beta or softplus_threshold (Python floats or concrete scalars, baked into the
    compiled calls). The gradient is the Pallas backward's whatever the lowering (it recomputes from the inputs
    alone).
    """
    if lowering is None:
        arrays = all(isinstance(x, (jax.Array, np.ndarray)) and x.ndim for x in (q, v))  # else the contract says
        dense_inputs = (np.dtype(q.dtype).name, q.shape[-1], v.shape[-1]) if arrays and cu_seqlens is None else None
        lowering = default_forward_lowering(interpret, scale, softplus_beta, softplus_threshold, axis_name=axis_name,
                                            state_indices=state_indices, dense_inputs=dense_inputs)
        # prepare and the piece maps: by triton_call, which runs wherever the default takes the Mosaic GPU walk
        stages_lowering = "triton_call" if lowering == "mosaic_gpu" else lowering
    elif lowering not in LOWERINGS:
        raise ValueError(f"{spec.FORWARD_OP}: lowering: expected None or one of {LOWERINGS}; got {lowering!r}")
    elif lowering == "mosaic_gpu":  # prepare and the piece maps: gdn.triton's kernels where triton_call runs
        if axis_name is not None:
            raise ValueError(f"{spec.FORWARD_OP}: axis_name: expected None with lowering='mosaic_gpu' (the context "
                             f"parallel path across devices runs the Pallas kernels); got {axis_name!r}")
        stages_lowering = default_forward_lowering(interpret, scale, softplus_beta, softplus_threshold,
                                                   axis_name=axis_name, state_indices=state_indices)
    else:
        stages_lowering = lowering
    call_scalars = None
    if stages_lowering == "triton_call":
        call_scalars = triton_call_scalars(scale, softplus_beta, softplus_threshold, interpret=interpret,
                                           axis_name=axis_name, state_indices=state_indices)
    serving = (state_indices, a, b, A_log, dt_bias)
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices, op=spec.FORWARD_OP)
    indices = None if state_indices is None else host_values(state_indices)
    if cu_values is not None or indices is not None:  # host values: check them, build chunk_indices when missing
        problem = checked_problem(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices,
                                  bool(output_final_state), cu_values, *serving, use_qk_l2norm_in_kernel)
        if indices is not None:
            checks.state_index_values(indices, problem.pool_rows, op=spec.FORWARD_OP)
        if cu_values is not None and chunk_indices is None:
            chunk_indices = spec.prepare_chunk_indices(cu_values)
        elif cu_values is not None and isinstance(chunk_indices, np.ndarray):
            checks.chunk_indices_rows(cu_values, chunk_indices, op=spec.FORWARD_OP)
    pool_updated = state_indices is not None and bool(output_final_state)
    body = jitted_chunk_gated_delta_rule_pool if pool_updated else jitted_chunk_gated_delta_rule
    return body(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, *serving, softplus_beta,
                softplus_threshold, output_final_state=bool(output_final_state), interpret=interpret,
                axis_name=axis_name, use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel), call_scalars=call_scalars,
                walk_lowering="mosaic_gpu" if lowering == "mosaic_gpu" else "triton")


def default_forward_lowering(interpret: bool | None, scale, softplus_beta, softplus_threshold, *,
                             axis_name: str | None, state_indices, dense_inputs: tuple[str, int, int] | None = None
                             ) -> str:
    """chunk_gated_delta_rule's path when the caller names none: "triton_call" where chunk_fwd_o's default is
    (chunk_o.default_lowering: compiled on a CUDA GPU, triton and jaxlib's Triton custom call present, scale not
    traced) and the call is one it takes (no state pool, no axis_name, softplus β and threshold not traced: they
    are baked into its compiled calls), and there "mosaic_gpu" for dense inputs (no cu_seqlens) whose (dtype, K, V)
    dense_inputs names and the Mosaic GPU walk takes on this device (gdn.pallas.forward_mosaic_gpu.takes); else
    "triton", the Pallas kernels of this module.

    Measured on an H200 (benchmarks/RESULTS.md, bf16, K = V = 128): on every dense shape the Mosaic GPU walk after
    triton_call's prepare is the fastest JAX path (0.61-0.96x gdn.triton's device time from 8192 tokens on, and
    ahead of triton_call at B1 T512); on the varlen batch it is slower than triton_call (its chunks are gathered
    into tile-aligned slots). Padding (gdn.pallas.pad_forward_to_bucket) keeps a dense call dense and a varlen call
    varlen, so a padded call takes the lowering of the call it stands for (and its bits, unless the padded length
    cuts the sequences into more pieces: tilings.context_pieces, on every path)."""
    if state_indices is not None or axis_name is not None or is_tracer(softplus_beta) or is_tracer(softplus_threshold):
        return "triton"
    lowering = chunk_o.default_lowering(interpret, scale)
    if lowering == "triton_call" and dense_inputs is not None:
        from gdn.pallas import forward_mosaic_gpu  # Mosaic GPU is imported only where triton_call runs

        if forward_mosaic_gpu.takes(*dense_inputs):
            return "mosaic_gpu"
    return lowering


def triton_call_scalars(scale, softplus_beta, softplus_threshold, *, interpret: bool | None, axis_name: str | None,
                        state_indices) -> tuple[float | None, float, float]:
    """(scale or None, softplus β, softplus threshold) as Python floats for lowering='triton_call', which bakes
    them into its compiled calls, after its refusals: interpret=True, axis_name, state_indices, a traced scalar."""
    refusals = (("interpret", bool(interpret), "None or False", "True", "compiled kernels only"),
                ("axis_name", axis_name is not None, "None", repr(axis_name),
                 "the context parallel path across devices runs the Pallas kernels"),
                ("state_indices", state_indices is not None, "None", "an array",
                 "a state pool is updated in place; a custom call's results are new arrays"))
    for name, refused, expected, got, reason in refusals:
        if refused:
            raise ValueError(f"{spec.FORWARD_OP}: {name}: expected {expected} with lowering='triton_call' ({reason}); "
                             f"got {got}")
    values = []
    for name, x in (("scale", scale), ("softplus_beta", softplus_beta), ("softplus_threshold", softplus_threshold)):
        if is_tracer(x):
            raise ValueError(f"{spec.FORWARD_OP}: {name}: expected a Python float or a concrete scalar with "
                             "lowering='triton_call' (it is baked into the compiled calls); got a traced value")
        values.append(None if x is None else float(x))
    return tuple(values)


def _chunk_gated_delta_rule_body(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, state_indices,
                                 a, b, A_log, dt_bias, softplus_beta, softplus_threshold, *,
                                 output_final_state: bool, interpret: bool | None, axis_name: str | None,
                                 use_qk_l2norm_in_kernel: bool, call_scalars: tuple[float | None, float, float] | None,
                                 walk_lowering: str = "triton"):
    """chunk_gated_delta_rule's body: the contract check at trace time (on shapes and dtypes), the pieces of the
    context-parallel path for the default device, then the kernels (with axis_name, across the devices of that
    mesh axis: gdn.pallas.distributed) through differentiable_forward, or pool_forward with a state pool; with
    call_scalars (lowering='triton_call': scale or None, softplus β and threshold as Python floats, checked by
    triton_call_scalars), through triton_call_forward; walk_lowering="mosaic_gpu" (lowering='mosaic_gpu'), with
    the Mosaic GPU walk, after its check (gdn.pallas.forward_mosaic_gpu.unsupported_reason)."""
    problem = checked_problem(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, output_final_state, None,
                              state_indices, a, b, A_log, dt_bias, use_qk_l2norm_in_kernel)
    if call_scalars is not None and call_scalars[0] is None:
        call_scalars = (spec.default_scale(problem.K),) + call_scalars[1:]
    if scale is None:
        scale = spec.default_scale(problem.K)
    interpret = resolve_interpret(interpret)
    walk_block_v = None
    if walk_lowering == "mosaic_gpu":
        from gdn.pallas import forward_mosaic_gpu  # Mosaic GPU is imported only by a call that asks for it

        reason = forward_mosaic_gpu.unsupported_reason(problem, interpret)
        if reason is not None:
            raise ValueError(f"{spec.FORWARD_OP}: {reason}")
        walk_block_v = tilings.MOSAIC_GPU_WALK_BLOCK_V  # pieces enough to fill the GPU with its CTAs
    pieces = problem.pieces(None if interpret else multiprocessor_count(), walk_block_v)
    if axis_name is not None:
        from gdn.pallas import distributed  # imports this module: the context-parallel glue around its stages

        forward_contract.check_context_parallel(problem, "axis_name")
        return distributed.context_parallel_forward(q, k, v, g, beta, scale, initial_state, problem=problem,
                                                    axis_name=axis_name, pieces=pieces, interpret=interpret)
    gating = (A_log, dt_bias, softplus_beta, softplus_threshold) if problem.raw_gates else None
    gate, strength = (a, b) if problem.raw_gates else (g, beta)  # the kernels' convention for the raw gates
    arrays = (q, k, v, gate, strength, scale, initial_state, as_index(cu_seqlens), as_index(chunk_indices), gating)
    if problem.pool_rows:
        return pool_forward(*arrays, as_index(state_indices), problem, pieces, interpret)
    if call_scalars is not None:
        return triton_call_forward(*arrays, problem, pieces, call_scalars, walk_lowering)
    return differentiable_forward(*arrays, problem, pieces, interpret, walk_lowering)


_STATIC = ("output_final_state", "interpret", "axis_name", "use_qk_l2norm_in_kernel", "call_scalars",
           "walk_lowering")
jitted_chunk_gated_delta_rule = jax.jit(_chunk_gated_delta_rule_body, static_argnames=_STATIC)
"""chunk_gated_delta_rule's jitted body (initial_state, when given, not modified)."""

jitted_chunk_gated_delta_rule_pool = jax.jit(_chunk_gated_delta_rule_body, static_argnames=_STATIC,
                                             donate_argnames=("initial_state",))
"""chunk_gated_delta_rule's jitted body with a state pool, donated: outside a caller's jit the pool is updated in
place (a jit of the caller's governs donation within it)."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def differentiable_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating,
                           problem: forward_contract.ForwardProblem, pieces: int, interpret: bool,
                           walk_lowering: str = "triton"):
    """jitted_forward with gdn.pallas.backward.vjp as its vjp: jax.grad, jax.vjp and jax.value_and_grad reach q,
    k, v, g, beta (the raw gates a, b with problem.raw_gates), scale, initial_state and gating's A_log and
    dt_bias; the forward keeps its inputs only (the backward recomputes with the Pallas kernels whichever walk
    the forward ran)."""
    return jitted_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating=gating,
                          problem=problem, pieces=pieces, interpret=interpret, walk_lowering=walk_lowering)


def _forward_keeping_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating, problem,
                            pieces, interpret, walk_lowering):
    out = jitted_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating=gating,
                         problem=problem, pieces=pieces, interpret=interpret, walk_lowering=walk_lowering)
    return out, (q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating)


def _differentiable_backward(problem, pieces, interpret, walk_lowering, inputs, cotangents):
    return _backward(problem, pieces, interpret, inputs, cotangents)


def _backward(problem, pieces, interpret, inputs, cotangents):
    from gdn.pallas import backward  # imports this module: the backward recomputes with its stages

    return backward.vjp(problem, pieces, interpret, inputs, cotangents)


differentiable_forward.defvjp(_forward_keeping_inputs, _differentiable_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def triton_call_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating,
                        problem: forward_contract.ForwardProblem, pieces: int,
                        call_scalars: tuple[float, float, float], walk_lowering: str = "triton"):
    """differentiable_forward with lowering='triton_call': gdn.triton's forward kernels (gdn.pallas.triton_call)
    with call_scalars = (scale, softplus β, softplus threshold) baked in, and the Pallas backward as its vjp, which
    recomputes everything from the inputs it keeps (scale and gating's arrays among them). walk_lowering=
    "mosaic_gpu" (lowering='mosaic_gpu' where triton_call runs): its prepare and piece maps, then the Mosaic GPU
    walk."""
    from gdn.pallas import triton_call  # triton is imported only by a call that asks for it

    A_log, dt_bias = (None, None) if gating is None else gating[:2]
    return triton_call.forward(problem, q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, A_log, dt_bias,
                               scale=call_scalars[0], softplus=call_scalars[1:], pieces=pieces,
                               capability=triton_call.device_capability(spec.FORWARD_OP), walk_lowering=walk_lowering)


def _triton_call_keeping_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating, problem,
                                pieces, call_scalars, walk_lowering):
    inputs = (q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating)
    return triton_call_forward(*inputs, problem, pieces, call_scalars, walk_lowering), inputs


def _triton_call_backward(problem, pieces, call_scalars, walk_lowering, inputs, cotangents):
    return _backward(problem, pieces, False, inputs, cotangents)


triton_call_forward.defvjp(_triton_call_keeping_inputs, _triton_call_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13))
def pool_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating, state_indices,
                 problem: forward_contract.ForwardProblem, pieces: int, interpret: bool):
    """jitted_forward from the state pool initial_state at rows state_indices; differentiating it raises (the
    pool is updated in place: no gradient)."""
    return jitted_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, state_indices, gating,
                          problem=problem, pieces=pieces, interpret=interpret)


def _pool_forward_refused(*arguments):
    checks.fail("state_indices", "None when a gradient is wanted (a state pool is updated in place, which has no "
                "gradient)", "an array", op=spec.FORWARD_OP)


pool_forward.defvjp(_pool_forward_refused, _pool_forward_refused)


def checked_problem(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, output_final_state: bool,
                    cu_seqlens_values: np.ndarray | None = None, state_indices=None, a=None, b=None, A_log=None,
                    dt_bias=None, use_qk_l2norm_in_kernel: bool = False) -> forward_contract.ForwardProblem:
    """chunk_gated_delta_rule's contract check (values of cu_seqlens too when given): the validated problem."""
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state,
            "cu_seqlens": cu_seqlens, "chunk_indices": chunk_indices, "state_indices": state_indices, "a": a,
            "b": b, "A_log": A_log, "dt_bias": dt_bias}
    info = {name: array_info(name, x, op=spec.FORWARD_OP) for name, x in args.items()}
    problem = forward_contract.validate_forward_inputs(
        **info, cu_seqlens_values=cu_seqlens_values, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    check_token_rows(problem.B, problem.T, op=spec.FORWARD_OP)
    return problem


def warmup_forward(
    dtype: str | jnp.dtype,
    K: int,
    V: int,
    *,
    HV: int,
    H: int,
    varlen: bool = False,
    initial_state: bool = False,
    output_final_state: bool = True,
    beta_dtype: str | jnp.dtype = "float32",
    lengths: tuple[int, ...] = (spec.CHUNK_SIZE,),
    interpret: bool | None = None,
    lowering: str | None = None,
) -> None:
    """Compile the programs that later chunk_gated_delta_rule calls with these dtypes, sizes, flags, interpret and
    lowering need (None: the path default_forward_lowering resolves such calls to; scale and the softplus scalars
    at their defaults, which triton_call bakes into its programs): one per T in ``lengths`` (B = 1; varlen: one
    sequence of T tokens), as gdn.pallas.warmup does for chunk_fwd_o. Pad real inputs to those lengths with
    gdn.pallas.pad_forward_to_bucket. Warms calls made outside a caller's own jax.jit."""
    for T in lengths:
        call = spec.warmup_arguments(T, H, HV, K, V, True, varlen)
        q = jnp.zeros(call["q"], dtype)
        state = jnp.zeros(call["state"], jnp.float32) if initial_state else None
        o, _ = chunk_gated_delta_rule(
            q, q, jnp.zeros(call["v"], dtype), jnp.zeros(call["g"], jnp.float32), jnp.zeros(call["beta"], beta_dtype),
            initial_state=state, output_final_state=output_final_state, cu_seqlens=call["cu_seqlens"],
            chunk_indices=call["chunk_indices"], interpret=interpret, lowering=lowering)
        o.block_until_ready()
