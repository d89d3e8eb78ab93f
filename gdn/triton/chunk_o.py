"""chunk_fwd_o for PyTorch: one Triton kernel, tile height CHUNK_SIZE, tiling from gdn.common.spec.

Glossary (FLA's naming): i_ program ids, o_ offsets, m_ masks, b_ register tiles; BT = CHUNK_SIZE rows of a
chunk, BK/BV the K/V tile widths, NV the number of V tiles. Math and layouts: gdn.common.spec.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn.common import contract, spec, tilings
from gdn.triton.arrays import host_cu_seqlens, planned, tensor_keys
from gdn.triton.launcher import KernelLaunch, cached_plan


@triton.jit
def chunk_span(i_tg, cu_seqlens, chunk_indices, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token row, end row) of global chunk i_tg (a row of h) in the packed T axis, int64. Varlen: from
    chunk_indices and cu_seqlens, and a PAD_CHUNK row (sequence < 0) gets an empty span, so every load and
    store of its program is masked off; dense: batch row i_tg // NT, chunk i_tg % NT."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_tg * 2)
        i_t = tl.maximum(tl.load(chunk_indices + i_tg * 2 + 1), 0)
        bos = tl.load(cu_seqlens + tl.maximum(i_n, 0)).to(tl.int64)
        eos = tl.where(i_n < 0, bos, tl.load(cu_seqlens + tl.maximum(i_n, 0) + 1).to(tl.int64))
    else:
        NT = tl.cdiv(T, BT)
        bos = (i_tg // NT).to(tl.int64) * T
        eos = bos + T
        i_t = i_tg % NT
    return bos + i_t * BT, eos


@triton.jit(do_not_specialize=["T"])
def chunk_fwd_o_kernel(
    q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, QK_L2NORM: tl.constexpr, QK_L2NORM_EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk, value head, V tile), V tile fastest, then value head: the programs that read
    # the same q/k chunk run side by side and share it through L2.
    i_flat = tl.program_id(0)
    i_v = i_flat % NV
    i_hv = (i_flat // NV) % HV
    i_tg = i_flat // (NV * HV)  # global chunk number = row of h
    i_h = i_hv // (HV // H)  # the q/k head this value head reads
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_t = t0 + tl.arange(0, BT)  # [BT] token rows of the packed T axis (int64)
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_qk_rows = (o_t * H + i_h) * K  # [BT] row starts in q and k
    p_h = h + (i_tg.to(tl.int64) * HV + i_hv) * (K * V)

    # v and g first: every load of the program is in flight before the first dot waits on q, k and h
    p_v_rows = (o_t * HV + i_hv) * V  # [BT] row starts in v and o
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + p_v_rows[:, None] + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
    if USE_G:
        b_g = tl.load(g + o_t * HV + i_hv, mask=m_t, other=0)  # [BT]

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_q_sq = tl.zeros([BT], dtype=tl.float32)  # Σ_k q², Σ_k k² per row (QK_L2NORM)
    b_k_sq = tl.zeros([BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_qk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + p_qk_rows[:, None] + o_k[None, :], mask=m_qk, other=0)  # [BT, BK]
        b_k = tl.load(k + p_qk_rows[:, None] + o_k[None, :], mask=m_qk, other=0)  # [BT, BK]
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
        b_A = tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf"))), 0)
    else:
        b_A = tl.where(m_A, b_A, 0)

    # [BT, BT] @ [BT, BV] -> [BT, BV]: the intra-chunk part, scale folded in before the cast to v's dtype
    b_o = b_o * scale + tl.dot((b_A * scale).to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    tl.store(o + p_v_rows[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


ARG_NAMES = ("q", "k", "v", "h", "g", "cu_seqlens", "chunk_indices")


def chunk_fwd_o(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of chunked Gated DeltaNet: o [B, T, HV, V] in v's dtype.

    q, k [B, T, H, K]; v [B, T, HV, V]; h [B, NT, HV, K, V]; g [B, T, HV] float32 chunk-local cumulative
    log-gate or None; scale defaults to K**-0.5. Varlen: B = 1, cu_seqlens [N + 1] int32/int64 on q's
    device, chunk_indices [NT, 2] from gdn.common.spec.prepare_chunk_indices on q's device. Without
    chunk_indices, cu_seqlens is copied to the host once (a device sync) to build them and check its values;
    pass chunk_indices to avoid that (the values of a device cu_seqlens are then not checked). Under
    torch.compile the call is the custom op gdn::chunk_fwd_o (gdn.triton.custom_ops).
    """
    if torch.compiler.is_compiling():
        return torch.ops.gdn.chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens, chunk_indices)
    problem, run, cu_values = call_plan(q, k, v, h, g, cu_seqlens, chunk_indices)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(cu_values)).to(q.device)
    o = torch.empty_like(v)
    if run is not None:
        scale = spec.default_scale(problem.K) if scale is None else float(scale)
        run(q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, problem.T)
    return o


def call_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None,
              cu_seqlens: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
              ) -> tuple[contract.ChunkOProblem, KernelLaunch | None, tuple[int, ...] | None]:
    """(problem, launch, host cu_seqlens values or None) of a chunk_fwd_o call: the contract check and plan()
    of its call signature, cached (one lookup for a repeated signature)."""
    keys = tensor_keys(ARG_NAMES, (q, k, v, h, g, cu_seqlens, chunk_indices))
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices)
    problem, run = planned(contract.validate_chunk_o_inputs, plan, keys, cu_values)
    return problem, run, cu_values


def plan(problem: contract.ChunkOProblem) -> KernelLaunch | None:
    """chunk_fwd_o's plan for a validated problem: its launch with the problem's tiling
    (tilings.chunk_o_tiling), None when it has no programs. Fixed signature (gdn.triton.launcher.KernelLaunch):
    a plan belongs to one call signature."""
    return kernel_launch(problem, problem.tiling, fixed_signature=True)


def kernel_launch(problem: contract.ChunkOProblem, tiling: tilings.Tiling,
                  fixed_signature: bool = False) -> KernelLaunch | None:
    """The kernel launch of a validated problem with a tiling, None when it has no programs."""
    num_v_tiles = -(-problem.V // tiling.block_v)
    num_programs = problem.num_chunks_total * problem.HV * num_v_tiles
    if num_programs == 0:
        return None
    return KernelLaunch(
        chunk_fwd_o_kernel, (num_programs,), tiling, fixed_signature=fixed_signature,
        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V,
        BT=spec.CHUNK_SIZE, BK=tiling.block_k, BV=tiling.block_v, NV=num_v_tiles,
        USE_G=problem.gated, IS_VARLEN=problem.varlen, QK_L2NORM=problem.qk_l2norm,
        QK_L2NORM_EPS=spec.QK_L2NORM_EPS, DOT_PRECISION=tilings.dot_precision(problem.dtype),
    )


@cached_plan
def shared_launch(problem: contract.ChunkOProblem, tiling: tilings.Tiling) -> KernelLaunch | None:
    """kernel_launch cached per (problem, tiling), shared by calls with other h dtypes (the problem does not fix
    it), so each launch is matched in full."""
    return kernel_launch(problem, tiling)


def launch(problem: contract.ChunkOProblem, tiling: tilings.Tiling, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None, o: torch.Tensor, scale: float,
           cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None) -> None:
    """Launch the kernel for a validated problem with the given tiling, writing o: the forward's stage 3, and
    the tiling sweeps of benchmarks/tune_chunk_o.py."""
    run = shared_launch(problem, tiling)
    if run is not None:
        run(q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, problem.T)


def warmup(
    dtype: torch.dtype,
    K: int,
    V: int,
    *,
    HV: int,
    H: int,
    gated: bool = True,
    varlen: bool = False,
    state_dtype: torch.dtype | None = None,
    device: str | torch.device = "cuda",
) -> None:
    """Compile everything a later chunk_fwd_o call with these dtypes, sizes and flags needs, for any T.

    One call at T = CHUNK_SIZE with exactly the dtypes and flags of real calls (state_dtype defaults to
    dtype: pass h's dtype if it differs, e.g. float32 states). The tiling comes from the static table in
    gdn.common.spec, never from timing this shape, so a warmup at T = CHUNK_SIZE serves T = 1 and T = 64k alike.
    """
    call = spec.warmup_arguments(spec.CHUNK_SIZE, H, HV, K, V, gated, varlen)
    q = torch.zeros(call["q"], dtype=dtype, device=device)
    v = torch.zeros(call["v"], dtype=dtype, device=device)
    h = torch.zeros(call["h"], dtype=state_dtype or dtype, device=device)
    g = torch.zeros(call["g"], dtype=torch.float32, device=device) if gated else None
    cu_seqlens, chunk_indices = (None if call[n] is None else torch.from_numpy(call[n]).to(device)
                                 for n in ("cu_seqlens", "chunk_indices"))
    chunk_fwd_o(q, q, v, h, g, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
