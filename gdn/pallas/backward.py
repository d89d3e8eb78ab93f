"""The backward of chunk_gated_delta_rule for JAX: four Pallas kernels (Triton lowering on GPU) after the
forward's recompute, the same algorithm, names and grids as gdn.triton.backward.

prepare and the walk of gdn.pallas.forward recompute g_c, w, u, h and v_new from the saved inputs; then
dv_local → the backward walk (dh, dv_new, initial_state's gradient) → dqkwg (dq, dk's inter/intra part, dw, dg_c)
→ WY (dk, dv, dbeta, dg through (I + A)⁻¹ and the chunk-local cumsum). Math: gdn.common.spec (the backward of
chunk_gated_delta_rule). Refs are whole arrays with the token axis flattened, as in gdn.pallas.forward (q, k
[B·T, H, K]; v, do, v_new, dv_new, dv [B·T, HV, V]; w, dw, dq, dk [B·T, HV, K]; g_c, beta and their gradients
[B·T, HV]; h, dh [B·NT, HV, K, V]; states [N·HV, K, V]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gdn.common import forward_contract, spec
from gdn.pallas import forward
from gdn.pallas.arrays import (
    accumulating_dot,
    array_info,
    as_index,
    check_token_rows,
    compiler_params,
    first_chunk_rows,
    float32_dot_precision,
    host_cu_seqlens,
    index_or_placeholder,
    input_dot_precision,
    multiprocessor_count,
    resolve_interpret,
)
from gdn.pallas.chunk_o import chunk_span


def chunk_last_row(t0, eos, BT: int):
    """The chunk's last token row, clamped to row 0 for a PAD_CHUNK program (empty span), so loads through it
    stay in bounds."""
    return jnp.maximum(jnp.minimum(t0 + BT, eos) - 1, 0)


def chunk_bwd_dv_local_kernel(
    q, k, g_cum, do, cu_seqlens, chunk_indices, scale, dv_local, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int, NV: int, IS_VARLEN: bool, DOT_PRECISION,
):
    # One program per (chunk, value head, V tile), V tile fastest, as chunk_fwd_o.
    i_flat = pl.program_id(0)
    i_v = i_flat % NV
    i_hv = (i_flat // NV) % HV
    i_tg = i_flat // (NV * HV)
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T=T, BT=BT, IS_VARLEN=IS_VARLEN)
    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_t = t0 + o_i
    m_t = o_t < eos

    dot = accumulating_dot(DOT_PRECISION)

    # Sᵀ[j, i] = k_j·q_i: [BT, BK] @ [BK, BT] summed over K steps
    b_St = jnp.zeros([BT, BT], dtype=jnp.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        m_qk = m_t[:, None] & (o_k < K)[None, :]
        b_q = plgpu.load(q.at[o_t[:, None], i_h, o_k[None, :]], mask=m_qk, other=0)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_qk, other=0)
        b_St += dot(b_k, b_q.T)
    # Pᵀ[j, i] = scale·(q_i·k_j)·exp(g_i − g_j) for j ≤ i, i a real row
    b_g = plgpu.load(g_cum.at[o_t, i_hv], mask=m_t, other=0)
    m_Pt = (o_i[:, None] <= o_i[None, :]) & m_t[None, :]
    b_Pt = b_St * scale[0] * jnp.exp(jnp.where(m_Pt, b_g[None, :] - b_g[:, None], -jnp.inf))

    # dv_loc = Pᵀ·do: [BT, BT] @ [BT, BV]
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_do = plgpu.load(do.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
    b_dv = dot(b_Pt.astype(b_do.dtype), b_do)
    plgpu.store(dv_local.at[o_t[:, None], i_hv, o_v[None, :]], b_dv.astype(dv_local.dtype), mask=m_tv)


def chunk_bwd_states_kernel(
    q, k, w, g_cum, do, dv_local, final_state_gradient, cu_seqlens, chunk_offsets, scale, dh, dv_new,
    initial_state_gradient, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int,
    USE_FINAL_STATE_GRADIENT: bool, STORE_INITIAL_STATE_GRADIENT: bool, IS_VARLEN: bool, DOT_PRECISION,
):
    # One program per (V tile, sequence·value head) walks the sequence's chunks last to first with its [BK, BV]
    # float32 slice of dS in registers, as chunk_states_kernel walks S forwards.
    i_v = pl.program_id(0)
    i_nh = pl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos, eos, first_chunk = cu_seqlens[i_n], cu_seqlens[i_n + 1], chunk_offsets[i_n]
    else:
        bos = i_n * T
        eos = bos + T
        first_chunk = i_n * pl.cdiv(T, BT)
    NT = pl.cdiv(eos - bos, BT) if IS_VARLEN else pl.cdiv(T, BT)
    scale = scale[0]

    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_k = jnp.arange(BK, dtype=jnp.int32)
    m_k = o_k < K
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

    dot = accumulating_dot(DOT_PRECISION)

    def chunk(i_rev, b_dh):
        i_t = NT - 1 - i_rev
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # dh[c] = dS, the gradient of the state the chunk ends with
        plgpu.store(dh.at[first_chunk + i_t, i_hv, o_k[:, None], o_v[None, :]], b_dh.astype(dh.dtype), mask=m_kv)
        b_g = plgpu.load(g_cum.at[o_t, i_hv], mask=m_t, other=0)
        b_g_last = g_cum[jnp.minimum(bos + (i_t + 1) * BT, eos) - 1, i_hv]
        # dv_new = dv_loc + (exp(g_last − g) ⊙ k)·dS: [BT, BK] @ [BK, BV]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        b_dv = dot(b_k, b_dh.astype(b_k.dtype))
        b_dv = b_dv * jnp.where(m_t, jnp.exp(b_g_last - b_g), 0)[:, None]
        b_dv += plgpu.load(dv_local.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0).astype(jnp.float32)
        plgpu.store(dv_new.at[o_t[:, None], i_hv, o_v[None, :]], b_dv.astype(dv_new.dtype), mask=m_tv)
        # dS = exp(g_last)·dS + scale·(exp(g) ⊙ q)ᵀ·do − wᵀ·dv_new: [BK, BT] @ [BT, BV]
        b_q = plgpu.load(q.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        b_q = (b_q * (scale * jnp.exp(b_g))[:, None]).astype(b_q.dtype)
        b_do = plgpu.load(do.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_w = plgpu.load(w.at[o_t[:, None], i_hv, o_k[None, :]], mask=m_tk, other=0)
        return b_dh * jnp.exp(b_g_last) + dot(b_q.T, b_do) - dot(b_w.T, b_dv.astype(b_w.dtype))

    b_dh = jnp.zeros([BK, BV], dtype=jnp.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += plgpu.load(final_state_gradient.at[i_nh, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)
    b_dh = jax.lax.fori_loop(0, NT, chunk, b_dh)
    if STORE_INITIAL_STATE_GRADIENT:
        plgpu.store(initial_state_gradient.at[i_nh, o_k[:, None], o_v[None, :]], b_dh, mask=m_kv)


def chunk_bwd_dqkwg_kernel(
    q, k, v_new, g_cum, h, do, dh, dv_new, cu_seqlens, chunk_indices, scale, dq, dk, dw, dg_c, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int, IS_VARLEN: bool, DOT_PRECISION,
):
    # One program per (chunk, value head), value head fastest: the value heads of one q/k head share q, k via L2.
    i_flat = pl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T=T, BT=BT, IS_VARLEN=IS_VARLEN)
    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_t = t0 + o_i
    m_t = o_t < eos
    scale = scale[0]
    b_g = plgpu.load(g_cum.at[o_t, i_hv], mask=m_t, other=0)
    b_g_last = g_cum[chunk_last_row(t0, eos, BT), i_hv]
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]  # causal, on the chunk's real rows

    dot = accumulating_dot(DOT_PRECISION)

    # dP = scale·(do·v_newᵀ) ⊙ Γ: [BT, BV] @ [BV, BT] summed over V steps
    b_dP = jnp.zeros([BT, BT], dtype=jnp.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + jnp.arange(BV, dtype=jnp.int32)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = plgpu.load(do.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_vn = plgpu.load(v_new.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_dP += dot(b_do, b_vn.T)
    b_dP = b_dP * scale * jnp.exp(jnp.where(m_A, b_g[:, None] - b_g[None, :], -jnp.inf))

    b_dg = jnp.zeros([BT], dtype=jnp.float32)
    b_dg_state = 0.0  # Σ S ⊙ dS
    b_dg_last = 0.0  # Σ dk_inter ⊙ k
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_dq = jnp.zeros([BT, BK], dtype=jnp.float32)
        b_dk = jnp.zeros([BT, BK], dtype=jnp.float32)
        b_dw = jnp.zeros([BT, BK], dtype=jnp.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + jnp.arange(BV, dtype=jnp.int32)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            b_do = plgpu.load(do.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
            b_vn = plgpu.load(v_new.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
            b_dvn = plgpu.load(dv_new.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
            b_h = plgpu.load(h.at[i_tg, i_hv, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)  # [BK, BV]
            b_dh = plgpu.load(dh.at[i_tg, i_hv, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)  # [BK, BV]
            # [BT, BV] @ [BV, BK] -> [BT, BK]: do·Sᵀ, v_new·dSᵀ, dv_new·Sᵀ
            b_dq += dot(b_do, b_h.T.astype(b_do.dtype))
            b_dk += dot(b_vn, b_dh.T.astype(b_vn.dtype))
            b_dw += dot(b_dvn, b_h.T.astype(b_dvn.dtype))
            b_dg_state += jnp.sum(b_h.astype(jnp.float32) * b_dh.astype(jnp.float32))
        plgpu.store(dw.at[o_t[:, None], i_hv, o_k[None, :]], (-b_dw).astype(dw.dtype), mask=m_tk)
        b_q = plgpu.load(q.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        # the inter-chunk parts: o ∋ scale·exp(g) ⊙ q·S, S_next ∋ (exp(g_last − g) ⊙ k)ᵀ·v_new
        b_dq = b_dq * (scale * jnp.exp(b_g))[:, None]
        b_dk = b_dk * jnp.where(m_t, jnp.exp(b_g_last - b_g), 0)[:, None]
        b_dg += jnp.sum(b_dq * b_q.astype(jnp.float32), axis=1) - jnp.sum(b_dk * b_k.astype(jnp.float32), axis=1)
        b_dg_last += jnp.sum(b_dk * b_k.astype(jnp.float32))
        # the intra-chunk parts: [BT, BT] @ [BT, BK] -> [BT, BK]
        b_dq += dot(b_dP.astype(b_k.dtype), b_k)
        b_dk += dot(b_dP.T.astype(b_q.dtype), b_q)
        plgpu.store(dq.at[o_t[:, None], i_hv, o_k[None, :]], b_dq.astype(dq.dtype), mask=m_tk)
        plgpu.store(dk.at[o_t[:, None], i_hv, o_k[None, :]], b_dk.astype(dk.dtype), mask=m_tk)
        # the decays Γ of the scores: rowsum − colsum of dP ⊙ q kᵀ, this K step's share of q kᵀ
        b_dPqk = b_dP * dot(b_q, b_k.T)
        b_dg += jnp.sum(b_dPqk, axis=1) - jnp.sum(b_dPqk, axis=0)
    # exp(g_last) on S and in every exp(g_last − g_j): on the chunk's last row
    b_dg = jnp.where(o_t == chunk_last_row(t0, eos, BT), b_dg + jnp.exp(b_g_last) * b_dg_state + b_dg_last, b_dg)
    plgpu.store(dg_c.at[o_t, i_hv], b_dg, mask=m_t)


def chunk_bwd_wy_kernel(
    k, v, g, beta, g_cum, dw, du, dk_c, dg_c, cu_seqlens, chunk_indices, dk, dv, dbeta, dg, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int, BS: int, GATE_FLOOR: float,
    IS_VARLEN: bool, DOT_PRECISION, INVERSE_PRECISION,
):
    # One program per (chunk, value head), value head fastest, as chunk_prepare_kernel.
    i_flat = pl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T=T, BT=BT, IS_VARLEN=IS_VARLEN)
    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_t = t0 + o_i
    m_t = o_t < eos
    b_g = plgpu.load(g_cum.at[o_t, i_hv], mask=m_t, other=0)
    b_beta = plgpu.load(beta.at[o_t, i_hv], mask=m_t, other=0).astype(jnp.float32)
    b_kscale = b_beta * jnp.exp(b_g)  # row scale of k in w = T_c·(beta·exp(g)·k)
    m_lower = (o_i[:, None] > o_i[None, :]) & m_t[:, None]

    dot = accumulating_dot(DOT_PRECISION)

    # A = strictly lower (beta_i·k_i·k_j·Γ_ij) and T_c = (I + A)⁻¹, as in the forward's prepare
    b_kk = jnp.zeros([BT, BT], dtype=jnp.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_t[:, None] & (o_k < K)[None, :], other=0)
        b_kk += dot(b_k, b_k.T)
    b_A = b_kk * b_beta[:, None] * jnp.exp(jnp.where(m_lower, b_g[:, None] - b_g[None, :], -jnp.inf))
    # T_c in k's dtype for the tensor-core dots below, as w = T_c·(beta·exp(g)·k) rounds it in the forward
    b_Ti = forward.unit_lower_inverse(b_A, BT=BT, BS=BS, PRECISION=INVERSE_PRECISION).astype(k.dtype)

    # dT = dw·(beta·exp(g) ⊙ k)ᵀ + du·(beta ⊙ v)ᵀ: [BT, BK] @ [BK, BT] and [BT, BV] @ [BV, BT]
    # dv = beta ⊙ T_cᵀ·du: [BT, BT] @ [BT, BV]
    b_dT = jnp.zeros([BT, BT], dtype=jnp.float32)
    b_dbeta = jnp.zeros([BT], dtype=jnp.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        b_dw = plgpu.load(dw.at[o_t[:, None], i_hv, o_k[None, :]], mask=m_tk, other=0)
        b_dT += dot(b_dw, (b_k * b_kscale[:, None]).astype(b_k.dtype).T)
    for v0 in range(0, V, BV):
        o_v = v0 + jnp.arange(BV, dtype=jnp.int32)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = plgpu.load(v.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_du = plgpu.load(du.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_dT += dot(b_du, (b_v * b_beta[:, None]).astype(b_v.dtype).T)
        b_dvb = dot(b_Ti.T, b_du.astype(b_Ti.dtype))
        b_dbeta += jnp.sum(b_dvb * b_v.astype(jnp.float32), axis=1)
        plgpu.store(dv.at[o_t[:, None], i_hv, o_v[None, :]], (b_dvb * b_beta[:, None]).astype(dv.dtype), mask=m_tv)

    # dA = −T_cᵀ·dT·T_cᵀ on the strictly lower part: [BT, BT] @ [BT, BT] twice
    b_dT = jnp.where(m_lower, b_dT, 0).astype(b_Ti.dtype)
    b_dA = dot(b_dT, b_Ti.T)
    b_dA = -dot(b_Ti.T, b_dA.astype(b_Ti.dtype))
    b_dA = jnp.where(m_lower, b_dA, 0)
    # through A = beta_i·(k_i·k_j)·Γ_ij (Γ formed again rather than kept live across the inverse): the k_i·k_j
    # products get dA ⊙ beta_i·Γ, beta_i gets rowsum(dA ⊙ Γ ⊙ k kᵀ), g_i gets rowsum(dA ⊙ A) − colsum(dA ⊙ A)
    b_dA = b_dA * jnp.exp(jnp.where(m_lower, b_g[:, None] - b_g[None, :], -jnp.inf))
    b_dAkk = b_dA * b_kk
    b_dbeta += jnp.sum(b_dAkk, axis=1)
    b_dAA = b_dAkk * b_beta[:, None]
    b_dg = plgpu.load(dg_c.at[o_t, i_hv], mask=m_t, other=0) + jnp.sum(b_dAA, axis=1) - jnp.sum(b_dAA, axis=0)
    b_dkk = (b_dA * b_beta[:, None]).astype(k.dtype)

    # dk = dk_c + (beta·exp(g)) ⊙ T_cᵀ·dw + dkk·k + dkkᵀ·k: [BT, BT] @ [BT, BK]
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        b_dw = plgpu.load(dw.at[o_t[:, None], i_hv, o_k[None, :]], mask=m_tk, other=0)
        b_dkb = dot(b_Ti.T, b_dw.astype(b_Ti.dtype))
        b_kg = b_k.astype(jnp.float32) * jnp.exp(b_g)[:, None]
        b_dbeta += jnp.sum(b_dkb * b_kg, axis=1)
        b_dg += jnp.sum(b_dkb * b_kg * b_beta[:, None], axis=1)
        b_dk = plgpu.load(dk_c.at[o_t[:, None], i_hv, o_k[None, :]], mask=m_tk, other=0).astype(jnp.float32)
        b_dk += b_dkb * b_kscale[:, None]
        b_dk += dot(b_dkk, b_k)
        b_dk += dot(b_dkk.T, b_k)
        plgpu.store(dk.at[o_t[:, None], i_hv, o_k[None, :]], b_dk.astype(dk.dtype), mask=m_tk)

    # through g_c = chunk-local cumsum(max(g, GATE_FLOOR)): dg_t = Σ_{s ≥ t in the chunk} dg_c[s] where the gate
    # is above the floor, 0 where the floor replaced it
    b_dg = jnp.sum(jnp.where(o_i[None, :] >= o_i[:, None], b_dg[None, :], 0), axis=1)
    b_dg = jnp.where(plgpu.load(g.at[o_t, i_hv], mask=m_t, other=0) >= GATE_FLOOR, b_dg, 0)
    plgpu.store(dg.at[o_t, i_hv], b_dg, mask=m_t)
    plgpu.store(dbeta.at[o_t, i_hv], b_dbeta.astype(dbeta.dtype), mask=m_t)


@functools.partial(jax.jit, static_argnames=("problem", "pieces", "interpret"))
def jitted_backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, do, final_state_gradient, *,
                    problem: forward_contract.BackwardProblem, pieces: int, interpret: bool):
    """(dq, dk, dv, dg, dbeta, d initial_state or None) for a validated problem (cu_seqlens / chunk_indices int32
    when varlen, else None): the forward's recompute (its walk in `pieces` pieces per sequence, as the forward
    ran it), then the four kernels."""
    f = problem.forward
    B, T, H, HV, K, V, N = f.B, f.T, f.H, f.HV, f.K, f.V, f.N
    if f.num_chunks_total * HV == 0 or N * HV == 0 or B * T == 0:  # no token: zero, or the final state's gradient
        dh0 = None
        if f.use_initial_state:
            dh0 = jnp.zeros_like(initial_state) if final_state_gradient is None else final_state_gradient
        return (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(g), jnp.zeros_like(beta),
                dh0)
    g_cum, w, u = forward.prepare(f, k, v, g, beta, cu_seqlens, chunk_indices, interpret=interpret)
    starts = (forward.piece_starts(f, k, w, u, g_cum, initial_state, cu_seqlens, pieces, interpret=interpret)
              if pieces > 1 else initial_state)
    _, _, h, v_new = forward.walk(f, None, k, w, u, g_cum, starts, cu_seqlens, 1.0, pieces, store_h=True,
                                  interpret=interpret)

    chunk, wy, walk = problem.chunk, problem.wy, problem.walk
    rows = f.num_chunks_total
    sizes = dict(T=T, H=H, HV=HV, K=K, V=V, BT=spec.CHUNK_SIZE, IS_VARLEN=f.varlen,
                 DOT_PRECISION=input_dot_precision(f.dtype, interpret))
    tokens = B * T
    flat = {"q": q.reshape(tokens, H, K), "k": k.reshape(tokens, H, K), "v": v.reshape(tokens, HV, V),
            "do": do.reshape(tokens, HV, V), "w": w.reshape(tokens, HV, K), "g_cum": g_cum.reshape(tokens, HV),
            "beta": beta.reshape(tokens, HV), "v_new": v_new.reshape(tokens, HV, V),
            "h": h.reshape(rows, HV, K, V)}
    cu = index_or_placeholder(cu_seqlens, (2,))
    indices = index_or_placeholder(chunk_indices, (1, 2))
    scale = jnp.asarray(scale, jnp.float32).reshape(1)

    def call(kernel, grid, tiling, out_shape, *args, input_output_aliases=None, **constants):
        return pl.pallas_call(
            functools.partial(kernel, **sizes, **constants), out_shape=out_shape, grid=grid, interpret=interpret,
            name=kernel.__name__, input_output_aliases=input_output_aliases or {},
            compiler_params=compiler_params(tiling))(*args)

    # Every element of a real token's gradients is stored by exactly one program, as with torch.empty in the
    # Triton backend; dh rows of PAD_CHUNK rows are never written, and never read by a real token.
    num_v_tiles = -(-V // chunk.block_v)
    dv_local = call(chunk_bwd_dv_local_kernel, (rows * HV * num_v_tiles,), chunk,
                    jax.ShapeDtypeStruct((tokens, HV, V), v.dtype),
                    flat["q"], flat["k"], flat["g_cum"], flat["do"], cu, indices, scale,
                    BK=chunk.block_k, BV=chunk.block_v, NV=num_v_tiles)

    chunk_offsets = None
    if f.varlen:
        chunk_offsets = first_chunk_rows(cu_seqlens)
    dht = (jnp.zeros((1, 1, 1), jnp.float32) if final_state_gradient is None
           else final_state_gradient.reshape(N * HV, K, V))
    dh, dv_new, dh0 = call(
        chunk_bwd_states_kernel, f.walk_grid(walk), walk,
        (jax.ShapeDtypeStruct((rows, HV, K, V), h.dtype), jax.ShapeDtypeStruct((tokens, HV, V), v.dtype),
         jax.ShapeDtypeStruct((N * HV, K, V) if f.use_initial_state else (1, 1, 1), jnp.float32)),
        flat["q"], flat["k"], flat["w"], flat["g_cum"], flat["do"], dv_local, dht, cu,
        index_or_placeholder(chunk_offsets, (1,)), scale,
        BK=walk.block_k, BV=walk.block_v, USE_FINAL_STATE_GRADIENT=problem.final_state_gradient,
        STORE_INITIAL_STATE_GRADIENT=f.use_initial_state)

    # per value head; with m = 1 they are the q/k head's gradients themselves, in the inputs' dtypes
    grouped = problem.group > 1
    dq, dk_c, dw, dg_c = call(
        chunk_bwd_dqkwg_kernel, (rows * HV,), chunk,
        (jax.ShapeDtypeStruct((tokens, HV, K), jnp.float32 if grouped else q.dtype),
         jax.ShapeDtypeStruct((tokens, HV, K), jnp.float32), jax.ShapeDtypeStruct((tokens, HV, K), w.dtype),
         jax.ShapeDtypeStruct((tokens, HV), jnp.float32)),
        flat["q"], flat["k"], flat["v_new"], flat["g_cum"], flat["h"], flat["do"], dh, dv_new, cu, indices, scale,
        BK=chunk.block_k, BV=chunk.block_v)

    dk, dv, dbeta, dg = call(
        chunk_bwd_wy_kernel, (rows * HV,), wy,
        (jax.ShapeDtypeStruct((tokens, HV, K), jnp.float32 if grouped else k.dtype),
         jax.ShapeDtypeStruct((tokens, HV, V), v.dtype), jax.ShapeDtypeStruct((tokens, HV), beta.dtype),
         jax.ShapeDtypeStruct((tokens, HV), jnp.float32)),
        flat["k"], flat["v"], g.reshape(tokens, HV), flat["beta"], flat["g_cum"], dw, dv_new, dk_c, dg_c, cu, indices,
        # in place when grouped: each program reads its dk_c tile before writing it
        input_output_aliases={7: 0} if grouped else None,
        BK=wy.block_k, BV=wy.block_v, BS=spec.SUBBLOCK, GATE_FLOOR=spec.GATE_FLOOR,
        INVERSE_PRECISION=float32_dot_precision(interpret, f.dtype))
    dq, dk = dq.reshape(B, T, HV, K), dk.reshape(B, T, HV, K)
    if grouped:
        dq, dk = sum_value_heads(dq, H).astype(q.dtype), sum_value_heads(dk, H).astype(k.dtype)
    return (dq, dk, dv.reshape(B, T, HV, V), dg.reshape(B, T, HV), dbeta.reshape(B, T, HV),
            dh0.reshape(N, HV, K, V) if f.use_initial_state else None)


def sum_value_heads(x: jax.Array, H: int) -> jax.Array:
    """[B, T, HV, K] per value head → [B, T, H, K]: q/k head h sums its m = HV/H value heads, added one after the
    other in head order (elementwise adds: the same bits every run)."""
    B, T, HV, K = x.shape
    heads = x.reshape(B, T, H, HV // H, K)
    total = heads[:, :, :, 0]
    for i in range(1, HV // H):
        total = total + heads[:, :, :, i]
    return total


def vjp(problem: forward_contract.ForwardProblem, pieces: int, interpret: bool, inputs: tuple,
        cotangents: tuple) -> tuple:
    """The vjp rule of gdn.pallas.forward.differentiable_forward: the cotangents of its inputs (q, k, v, g, beta,
    scale, initial_state, cu_seqlens, chunk_indices, gating) from those of (o, final_state), its inputs being all
    it kept. The index arrays get none; scale, which o depends on through scale·q only, gets Σ q ⊙ dq / scale.
    With problem.qk_l2norm or problem.raw_gates, the kernels' plain inputs are recomputed from the raw ones by
    kernel_inputs, and their gradients pulled back through it (jax.vjp) to q, k, the raw gates a, b (in g, beta)
    and gating's A_log, dt_bias (and softplus β, threshold)."""
    q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, gating = inputs
    do, final_state_gradient = cotangents
    serving = problem.qk_l2norm or problem.raw_gates
    if serving:
        (q, k, g, beta), pull_back = jax.vjp(
            functools.partial(kernel_inputs, problem.qk_l2norm, problem.raw_gates), q, k, g, beta, gating)
    plain = dataclasses.replace(problem, output_final_state=False, qk_l2norm=False, raw_gates=False)
    backward_problem = forward_contract.BackwardProblem(forward=plain,
                                                        final_state_gradient=final_state_gradient is not None)
    dq, dk, dv, dg, dbeta, dh0 = jitted_backward(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, do.astype(v.dtype), final_state_gradient,
        problem=backward_problem, pieces=pieces, interpret=interpret)
    dscale = jnp.sum(q.astype(jnp.float32) * dq.astype(jnp.float32)) / scale
    dgating = None
    if serving:
        dq, dk, dg, dbeta, dgating = pull_back((dq, dk, dg, dbeta))
    return dq, dk, dv, dg, dbeta, dscale, dh0, None, None, dgating


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / sqrt(Σ x² + QK_L2NORM_EPS) over the last axis in float32, back in x's dtype (as the kernels
    normalize)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + spec.QK_L2NORM_EPS)).astype(x.dtype)


def kernel_inputs(qk_l2norm: bool, raw_gates: bool, q, k, g, beta, gating):
    """(q, k, g, beta) as the kernels take them without serving flags, by jnp ops the backward differentiates:
    q and k L2-normalized (x / sqrt(Σ x² + QK_L2NORM_EPS) in float32, back in x's dtype) with qk_l2norm; with
    raw_gates, g and beta hold a and b and gating = (A_log, dt_bias, softplus β, softplus threshold):
    g = −exp(A_log)·softplus(a + dt_bias), beta = sigmoid(b), float32."""
    if qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    if raw_gates:
        A_log, dt_bias, softplus_beta, softplus_threshold = gating
        x = g.astype(jnp.float32) + dt_bias
        scaled = softplus_beta * x
        # softplus(x) = log(1 + exp(β·x))/β up to the threshold, x above it
        rate = jnp.where(scaled <= softplus_threshold, jnp.logaddexp(0.0, scaled) / softplus_beta, x)
        g, beta = -jnp.exp(A_log) * rate, jax.nn.sigmoid(beta.astype(jnp.float32))
    return q, k, g, beta


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    do: jax.Array,
    final_state_gradient: jax.Array | None = None,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    cu_seqlens: jax.Array | np.ndarray | None = None,
    chunk_indices: jax.Array | np.ndarray | None = None,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Gradients of chunk_gated_delta_rule: (dq, dk, dv, dg, dbeta, d initial_state or None), as
    gdn.triton.backward.backward computes them (arguments, dtypes and results there). Every array may be traced;
    under jax.jit chunk_indices must be passed, as for the forward."""
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state, "cu_seqlens": cu_seqlens,
            "chunk_indices": chunk_indices, "do": do, "final_state_gradient": final_state_gradient}
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices, op=spec.BACKWARD_OP)
    problem = forward_contract.validate_backward_inputs(
        *(array_info(name, x, op=spec.BACKWARD_OP) for name, x in args.items()), cu_seqlens_values=cu_values)
    check_token_rows(problem.forward.B, problem.forward.T, op=spec.BACKWARD_OP)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = spec.prepare_chunk_indices(cu_values)
    if scale is None:
        scale = spec.default_scale(problem.forward.K)
    interpret = resolve_interpret(interpret)
    return jitted_backward(q, k, v, g, beta, scale, initial_state, as_index(cu_seqlens), as_index(chunk_indices), do,
                           final_state_gradient, problem=problem,
                           pieces=problem.forward.pieces(None if interpret else multiprocessor_count()),
                           interpret=interpret)
