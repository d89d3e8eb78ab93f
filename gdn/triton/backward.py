"""The backward of chunk_gated_delta_rule for PyTorch: four Triton kernels after the forward's recompute.

prepare and the walk of gdn.triton.forward recompute g_c, w, u, h and v_new from the saved inputs; then
dv_local → the backward walk (dh, dv_new, initial_state's gradient) → dqkwg (dq, dk's inter/intra part, dw, dg_c)
→ WY (dk, dv, dbeta, dg through (I + A)⁻¹ and the chunk-local cumsum). Math: gdn.common.spec (the backward of
chunk_gated_delta_rule); tilings: tilings.backward_chunk_tiling, tilings.backward_wy_tiling,
tilings.backward_walk_tiling. Glossary as in gdn.triton.chunk_o (i_ program ids, o_ offsets, m_ masks, p_
pointers, b_ register tiles, BT = CHUNK_SIZE).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from gdn.common import forward_contract, spec, tilings
from gdn.triton import forward
from gdn.triton.arrays import first_chunk_rows, host_cu_seqlens, planned, tensor_keys
from gdn.triton.launcher import KernelLaunch
from gdn.triton_kernels.chunk_o import chunk_span
from gdn.triton_kernels.forward import unit_lower_inverse


@triton.jit
def chunk_last_row(t0, eos, BT: tl.constexpr):
    """The chunk's last token row (int64), clamped to row 0 for a PAD_CHUNK program (empty span), so loads
    through it stay in bounds."""
    return tl.maximum(tl.minimum(t0 + BT, eos) - 1, 0)


@triton.jit(do_not_specialize=["T", "N"])
def chunk_bwd_dv_local_kernel(
    q, k, g_cum, do, dv_local, cu_seqlens, chunk_indices, scale, T, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk, value head, V tile), V tile fastest, as chunk_fwd_o.
    i_flat = tl.program_id(0)
    i_v = i_flat % NV
    i_hv = (i_flat // NV) % HV
    i_tg = i_flat // (NV * HV)
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, N, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    m_t = o_t < eos
    p_qk_rows = (o_t * H + i_h) * K

    # Sᵀ[j, i] = k_j·q_i: [BT, BK] @ [BK, BT] summed over K steps
    b_St = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_qk = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + p_qk_rows[:, None] + o_k[None, :], mask=m_qk, other=0)
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_qk, other=0)
        b_St += tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
    # Pᵀ[j, i] = scale·(q_i·k_j)·exp(g_i − g_j) for j ≤ i, i a real row
    b_g = tl.load(g_cum + o_t * HV + i_hv, mask=m_t, other=0)
    m_Pt = (o_i[:, None] <= o_i[None, :]) & m_t[None, :]
    b_Pt = b_St * scale * tl.exp(tl.where(m_Pt, b_g[None, :] - b_g[:, None], float("-inf")))

    # dv_loc = Pᵀ·do: [BT, BT] @ [BT, BV]
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    p_rows = (o_t * HV + i_hv) * V
    b_do = tl.load(do + p_rows[:, None] + o_v[None, :], mask=m_tv, other=0)
    b_dv = tl.dot(b_Pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    tl.store(dv_local + p_rows[:, None] + o_v[None, :], b_dv.to(dv_local.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T"])
def chunk_bwd_states_kernel(
    q, k, w, g_cum, do, dv_local, final_state_gradient, dh, dv_new, initial_state_gradient, cu_seqlens,
    chunk_offsets, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (V tile, sequence·value head) walks the sequence's chunks last to first with its [BK, BV]
    # float32 slice of dS in registers, as chunk_states_kernel walks S forwards.
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        first_chunk = i_n.to(tl.int64) * tl.cdiv(T, BT)
    NT = tl.cdiv(eos - bos, BT)

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]  # [BK, BV] in the state gradients

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(final_state_gradient + p_state, mask=m_kv, other=0)
    for i_rev in range(0, NT):
        i_t = NT - 1 - i_rev
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_rows = o_t * HV + i_hv  # [BT] rows of w, g_cum, do, dv_local, dv_new
        p_qk_rows = (o_t * H + i_h) * K
        # dh[c] = dS, the gradient of the state the chunk ends with
        p_dh = dh + ((first_chunk + i_t) * HV + i_hv) * (K * V)
        tl.store(p_dh + o_k[:, None] * V + o_v[None, :], b_dh.to(dh.dtype.element_ty), mask=m_kv)
        b_g = tl.load(g_cum + p_rows, mask=m_t, other=0)
        b_g_last = tl.load(g_cum + (tl.minimum(bos + (i_t + 1) * BT, eos) - 1) * HV + i_hv)
        # dv_new = dv_loc + (exp(g_last − g) ⊙ k)·dS: [BT, BK] @ [BK, BV]
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_dv = tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=DOT_PRECISION)
        b_dv = b_dv * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]
        b_dv += tl.load(dv_local + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0).to(tl.float32)
        tl.store(dv_new + (p_rows * V)[:, None] + o_v[None, :], b_dv.to(dv_new.dtype.element_ty), mask=m_tv)
        # dS = exp(g_last)·dS + scale·(exp(g) ⊙ q)ᵀ·do − wᵀ·dv_new: [BK, BT] @ [BT, BV]
        b_q = tl.load(q + p_qk_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_q = (b_q * (scale * tl.exp(b_g))[:, None]).to(b_q.dtype)
        b_do = tl.load(do + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_w = tl.load(w + (p_rows * K)[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_dh = (b_dh * tl.exp(b_g_last) + tl.dot(tl.trans(b_q), b_do, input_precision=DOT_PRECISION)
                - tl.dot(tl.trans(b_w), b_dv.to(b_w.dtype), input_precision=DOT_PRECISION))
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(initial_state_gradient + p_state, b_dh, mask=m_kv)


@triton.jit(do_not_specialize=["T", "N"])
def chunk_bwd_dqkwg_kernel(
    q, k, v_new, g_cum, h, do, dh, dv_new, dq, dk, dw, dg_c, cu_seqlens, chunk_indices, scale, T, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk, value head), value head fastest: the value heads of one q/k head share q, k via L2.
    i_flat = tl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, N, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    m_t = o_t < eos
    p_rows = o_t * HV + i_hv  # [BT] rows of g_cum, do, v_new, dv_new and of the per-value-head gradients
    p_qk_rows = (o_t * H + i_h) * K
    p_state = (i_tg.to(tl.int64) * HV + i_hv) * (K * V)  # this chunk's S = h[c] and dS = dh[c]
    b_g = tl.load(g_cum + p_rows, mask=m_t, other=0)
    b_g_last = tl.load(g_cum + chunk_last_row(t0, eos, BT) * HV + i_hv)
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]  # causal, on the chunk's real rows

    # dP = scale·(do·v_newᵀ) ⊙ Γ: [BT, BV] @ [BV, BT] summed over V steps
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in tl.static_range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_vn = tl.load(v_new + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_dP += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PRECISION)
    b_dP = b_dP * scale * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))

    b_dg = tl.zeros([BT], dtype=tl.float32)
    b_dg_state = 0.0  # Σ S ⊙ dS
    b_dg_last = 0.0  # Σ dk_inter ⊙ k
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for v0 in tl.static_range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            p_kv = o_k[:, None] * V + o_v[None, :]
            b_do = tl.load(do + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
            b_vn = tl.load(v_new + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
            b_dvn = tl.load(dv_new + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
            b_h = tl.load(h + p_state + p_kv, mask=m_k[:, None] & m_v[None, :], other=0)  # [BK, BV]
            b_dh = tl.load(dh + p_state + p_kv, mask=m_k[:, None] & m_v[None, :], other=0)  # [BK, BV]
            # [BT, BV] @ [BV, BK] -> [BT, BK]: do·Sᵀ, v_new·dSᵀ, dv_new·Sᵀ
            b_dq += tl.dot(b_do, tl.trans(b_h).to(b_do.dtype), input_precision=DOT_PRECISION)
            b_dk += tl.dot(b_vn, tl.trans(b_dh).to(b_vn.dtype), input_precision=DOT_PRECISION)
            b_dw += tl.dot(b_dvn, tl.trans(b_h).to(b_dvn.dtype), input_precision=DOT_PRECISION)
            b_dg_state += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32))
        tl.store(dw + (p_rows * K)[:, None] + o_k[None, :], (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
        b_q = tl.load(q + p_qk_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        # the inter-chunk parts: o ∋ scale·exp(g) ⊙ q·S, S_next ∋ (exp(g_last − g) ⊙ k)ᵀ·v_new
        b_dq = b_dq * (scale * tl.exp(b_g))[:, None]
        b_dk = b_dk * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]
        b_dg += tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        b_dg_last += tl.sum(b_dk * b_k.to(tl.float32))
        # the intra-chunk parts: [BT, BT] @ [BT, BK] -> [BT, BK]
        b_dq += tl.dot(b_dP.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
        b_dk += tl.dot(tl.trans(b_dP).to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
        tl.store(dq + (p_rows * K)[:, None] + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + (p_rows * K)[:, None] + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
        # the decays Γ of the scores: rowsum − colsum of dP ⊙ q kᵀ, this K step's share of q kᵀ
        b_dPqk = b_dP * tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_dg += tl.sum(b_dPqk, axis=1) - tl.sum(b_dPqk, axis=0)
    # exp(g_last) on S and in every exp(g_last − g_j): on the chunk's last row
    b_dg = tl.where(o_t == chunk_last_row(t0, eos, BT), b_dg + tl.exp(b_g_last) * b_dg_state + b_dg_last, b_dg)
    tl.store(dg_c + p_rows, b_dg, mask=m_t)


@triton.jit(do_not_specialize=["T", "N"])
def chunk_bwd_wy_kernel(
    k, v, g, beta, g_cum, dw, du, dk_c, dg_c, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, T, N,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
    GATE_FLOOR: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk, value head), value head fastest, as chunk_prepare_kernel.
    i_flat = tl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, N, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    m_t = o_t < eos
    p_rows = o_t * HV + i_hv
    p_qk_rows = (o_t * H + i_h) * K
    b_g = tl.load(g_cum + p_rows, mask=m_t, other=0)
    b_beta = tl.load(beta + p_rows, mask=m_t, other=0).to(tl.float32)
    b_kscale = b_beta * tl.exp(b_g)  # row scale of k in w = T_c·(beta·exp(g)·k)
    m_lower = (o_i[:, None] > o_i[None, :]) & m_t[:, None]

    # A = strictly lower (beta_i·k_i·k_j·Γ_ij) and T_c = (I + A)⁻¹, as in the forward's prepare
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_A = b_kk * b_beta[:, None] * tl.exp(tl.where(m_lower, b_g[:, None] - b_g[None, :], float("-inf")))
    # T_c in k's dtype for the tensor-core dots below, as w = T_c·(beta·exp(g)·k) rounds it in the forward
    b_Ti = unit_lower_inverse(b_A, BT, BS, DOT_PRECISION).to(k.dtype.element_ty)

    # dT = dw·(beta·exp(g) ⊙ k)ᵀ + du·(beta ⊙ v)ᵀ: [BT, BK] @ [BK, BT] and [BT, BV] @ [BV, BT]
    # dv = beta ⊙ T_cᵀ·du: [BT, BT] @ [BT, BV]
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_dw = tl.load(dw + (p_rows * K)[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_dT += tl.dot(b_dw, tl.trans((b_k * b_kscale[:, None]).to(b_k.dtype)), input_precision=DOT_PRECISION)
    for v0 in tl.static_range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_du = tl.load(du + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_dT += tl.dot(b_du, tl.trans((b_v * b_beta[:, None]).to(b_v.dtype)), input_precision=DOT_PRECISION)
        b_dvb = tl.dot(tl.trans(b_Ti), b_du.to(b_Ti.dtype), input_precision=DOT_PRECISION)
        b_dbeta += tl.sum(b_dvb * b_v.to(tl.float32), axis=1)
        tl.store(dv + (p_rows * V)[:, None] + o_v[None, :], (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty),
                 mask=m_tv)

    # dA = −T_cᵀ·dT·T_cᵀ on the strictly lower part: [BT, BT] @ [BT, BT] twice
    b_dT = tl.where(m_lower, b_dT, 0).to(b_Ti.dtype)
    b_dA = tl.dot(b_dT, tl.trans(b_Ti), input_precision=DOT_PRECISION)
    b_dA = -tl.dot(tl.trans(b_Ti), b_dA.to(b_Ti.dtype), input_precision=DOT_PRECISION)
    b_dA = tl.where(m_lower, b_dA, 0)
    # through A = beta_i·(k_i·k_j)·Γ_ij (Γ formed again rather than kept live across the inverse): the k_i·k_j
    # products get dA ⊙ beta_i·Γ, beta_i gets rowsum(dA ⊙ Γ ⊙ k kᵀ), g_i gets rowsum(dA ⊙ A) − colsum(dA ⊙ A)
    b_dA = b_dA * tl.exp(tl.where(m_lower, b_g[:, None] - b_g[None, :], float("-inf")))
    b_dAkk = b_dA * b_kk
    b_dbeta += tl.sum(b_dAkk, axis=1)
    b_dAA = b_dAkk * b_beta[:, None]
    b_dg = tl.load(dg_c + p_rows, mask=m_t, other=0) + tl.sum(b_dAA, axis=1) - tl.sum(b_dAA, axis=0)
    b_dkk = (b_dA * b_beta[:, None]).to(k.dtype.element_ty)

    # dk = dk_c + (beta·exp(g)) ⊙ T_cᵀ·dw + dkk·k + dkkᵀ·k: [BT, BT] @ [BT, BK]
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_dw = tl.load(dw + (p_rows * K)[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_dkb = tl.dot(tl.trans(b_Ti), b_dw.to(b_Ti.dtype), input_precision=DOT_PRECISION)
        b_kg = b_k.to(tl.float32) * tl.exp(b_g)[:, None]
        b_dbeta += tl.sum(b_dkb * b_kg, axis=1)
        b_dg += tl.sum(b_dkb * b_kg * b_beta[:, None], axis=1)
        b_dk = tl.load(dk_c + (p_rows * K)[:, None] + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        b_dk += b_dkb * b_kscale[:, None]
        b_dk += tl.dot(b_dkk, b_k, input_precision=DOT_PRECISION)
        b_dk += tl.dot(tl.trans(b_dkk), b_k, input_precision=DOT_PRECISION)
        tl.store(dk + (p_rows * K)[:, None] + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)

    # through g_c = chunk-local cumsum(max(g, GATE_FLOOR)): dg_t = Σ_{s ≥ t in the chunk} dg_c[s] where the gate
    # is above the floor, 0 where the floor replaced it
    b_dg = tl.sum(tl.where(o_i[None, :] >= o_i[:, None], b_dg[None, :], 0), axis=1)
    b_dg = tl.where(tl.load(g + p_rows, mask=m_t, other=0) >= GATE_FLOOR, b_dg, 0)
    tl.store(dg + p_rows, b_dg, mask=m_t)
    tl.store(dbeta + p_rows, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


@dataclasses.dataclass(frozen=True)
class BackwardLaunches:
    """The four kernel launches of one backward problem (None when it has no chunks)."""

    dv_local: KernelLaunch
    states: KernelLaunch
    dqkwg: KernelLaunch
    wy: KernelLaunch


def new_launches(problem: forward_contract.BackwardProblem) -> BackwardLaunches | None:
    """The backward's launches for a validated problem, None when it has no chunk or no sequence."""
    f = problem.forward
    if f.num_chunks_total * f.HV == 0 or f.N * f.HV == 0 or f.B * f.T == 0:
        return None
    chunk, wy, walk = problem.chunk, problem.wy, problem.walk
    sizes = dict(H=f.H, HV=f.HV, K=f.K, V=f.V, BT=spec.CHUNK_SIZE, DOT_PRECISION=tilings.dot_precision(f.dtype))
    num_v_tiles = -(-f.V // chunk.block_v)
    return BackwardLaunches(
        dv_local=KernelLaunch(chunk_bwd_dv_local_kernel, (f.num_chunks_total * f.HV * num_v_tiles,), chunk,
                              BK=chunk.block_k, BV=chunk.block_v, NV=num_v_tiles, IS_VARLEN=f.varlen, **sizes),
        states=KernelLaunch(chunk_bwd_states_kernel, f.walk_grid(walk), walk, BK=walk.block_k, BV=walk.block_v,
                            USE_FINAL_STATE_GRADIENT=problem.final_state_gradient,
                            STORE_INITIAL_STATE_GRADIENT=f.use_initial_state, IS_VARLEN=f.varlen, **sizes),
        dqkwg=KernelLaunch(chunk_bwd_dqkwg_kernel, (f.num_chunks_total * f.HV,), chunk, BK=chunk.block_k,
                           BV=chunk.block_v, IS_VARLEN=f.varlen, **sizes),
        wy=KernelLaunch(chunk_bwd_wy_kernel, (f.num_chunks_total * f.HV,), wy, BK=wy.block_k,
                        BV=wy.block_v, BS=spec.SUBBLOCK, GATE_FLOOR=spec.GATE_FLOOR, IS_VARLEN=f.varlen,
                        **sizes),
    )


_ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "chunk_indices", "do", "final_state_gradient")


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    final_state_gradient: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of chunk_gated_delta_rule: (dq, dk, dv, dg, dbeta, d initial_state or None).

    The forward's arguments as gdn.triton.chunk_gated_delta_rule takes them (contiguous), do [B, T, HV, V] the
    gradient of o (v's dtype), final_state_gradient [N, HV, K, V] float32 that of the final state (None: zero).
    dq, dk, dv, dbeta come in their inputs' dtypes, dg [B, T, HV] float32 (of the per-token gates), d
    initial_state [N, HV, K, V] float32 when initial_state is given.
    """
    args = (q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, do, final_state_gradient)
    keys = tensor_keys(_ARG_NAMES, args, op=spec.BACKWARD_OP)
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices)
    problem, launches = planned(forward_contract.validate_backward_inputs, new_launches, keys, cu_values)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(cu_values)).to(q.device)
    scale = spec.default_scale(problem.forward.K) if scale is None else float(scale)
    return gradients(problem, launches, q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, do,
                     final_state_gradient)


def gradients(problem: forward_contract.BackwardProblem, launches: BackwardLaunches | None, q: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
              initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
              chunk_indices: torch.Tensor | None, do: torch.Tensor, final_state_gradient: torch.Tensor | None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of a validated problem: recompute, then the four kernels; what backward() returns."""
    f = problem.forward
    B, T, HV, K = f.B, f.T, f.HV, f.K
    if launches is None:  # no token: every gradient is zero, the initial state's is the final state's
        dh0 = None
        if f.use_initial_state:
            dh0 = torch.zeros_like(initial_state) if final_state_gradient is None else final_state_gradient.clone()
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(g),
                torch.zeros_like(beta), dh0)
    g_cum, w, u = forward.prepare(f, k, v, g, beta, cu_seqlens, chunk_indices)
    # h and v_new as the forward walked them: in pieces from their true initial states where the forward would cut
    # each sequence into pieces (tilings.context_pieces)
    pieces = forward.context_pieces(f, q.device)
    starts = (forward.piece_starts(f, k, w, u, g_cum, initial_state, cu_seqlens, pieces) if pieces > 1
              else initial_state)
    _, _, h, v_new = forward.walk(f, None, k, w, u, g_cum, starts, cu_seqlens, 1.0, pieces, store_h=True)
    del u, starts

    dv_local = torch.empty_like(v)
    launches.dv_local(q, k, g_cum, do, dv_local, cu_seqlens, chunk_indices, scale, T, f.N)

    chunk_offsets = None
    if f.varlen:
        chunk_offsets = first_chunk_rows(cu_seqlens)
    dh = torch.empty_like(h)
    dv_new = torch.empty_like(v)
    dh0 = torch.empty_like(initial_state) if f.use_initial_state else None
    launches.states(q, k, w, g_cum, do, dv_local, final_state_gradient, dh, dv_new, dh0, cu_seqlens, chunk_offsets,
                    scale, T)
    del dv_local

    # per value head; with m = 1 they are the q/k head's gradients themselves, in the inputs' dtypes
    grouped = problem.group > 1
    dq = torch.empty((B, T, HV, K), dtype=torch.float32 if grouped else q.dtype, device=q.device)
    dk_c = torch.empty((B, T, HV, K), dtype=torch.float32, device=q.device)
    dw = torch.empty_like(w)
    dg_c = torch.empty_like(g)
    launches.dqkwg(q, k, v_new, g_cum, h, do, dh, dv_new, dq, dk_c, dw, dg_c, cu_seqlens, chunk_indices, scale, T,
                   f.N)
    del h, dh, v_new

    dk = dk_c if grouped else torch.empty_like(k)  # in place: each program reads its dk_c tile before writing it
    dv, dg, dbeta = torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
    launches.wy(k, v, g, beta, g_cum, dw, dv_new, dk_c, dg_c, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, T, f.N)
    if grouped:
        dq = sum_value_heads(dq, f.H).to(q.dtype)
        dk = sum_value_heads(dk, f.H).to(k.dtype)
    return dq, dk, dv, dg, dbeta, dh0


def sum_value_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, T, HV, K] per value head → [B, T, H, K]: q/k head h sums its m = HV/H value heads (a torch reduction:
    the same order every run)."""
    B, T, HV, K = x.shape
    return x.view(B, T, H, HV // H, K).sum(3)
