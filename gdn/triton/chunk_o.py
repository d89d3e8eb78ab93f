"""chunk_fwd_o for PyTorch: one Triton kernel, tile height CHUNK_SIZE, tiling from gdn.common.spec.

Glossary (FLA's naming): i_ program ids, o_ offsets, m_ masks, b_ register tiles; BT = CHUNK_SIZE rows of a
chunk, BK/BV the K/V tile widths, NV the number of V tiles. Math and layouts: gdn.common.spec.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn.common import checks, contract, spec, tilings
from gdn.triton.arrays import check_device, host_cu_seqlens, layout_keys, planned, refuse_grad
from gdn.triton.launcher import KernelLaunch, cached_plan


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
    q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, T, N,
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

    # v's non-finite entries leave the dot below, where the zeros of later tokens would turn them into NaN for
    # earlier rows, and come back after it where the causal sum reads them
    m_v_finite = (b_v - b_v) == 0  # [BT, BV]: false for NaN and ±inf
    # [BT, BT] @ [BT, BV] -> [BT, BV]: the intra-chunk part, scale folded in before the cast to v's dtype
    b_o = b_o * scale + tl.dot((b_A * scale).to(b_v.dtype), tl.where(m_v_finite, b_v, 0),
                               input_precision=DOT_PRECISION)
    if tl.min(m_v_finite.to(tl.int32)) == 0:  # this tile of v holds NaN or ±inf: rare, hence the branch
        # [BT, BT] @ [BT, BV] -> [BT, BV]: how many non-finite v[j, c] with j <= i each o[i, c] sums over
        b_reach = tl.dot(tl.where(m_A, 1.0, 0.0).to(b_v.dtype), tl.where(m_v_finite, 0.0, 1.0).to(b_v.dtype),
                         input_precision=DOT_PRECISION)
        b_o = tl.where(b_reach > 0, float("nan"), b_o)
    tl.store(o + ((o_t * HV + i_hv) * V)[:, None] + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


ARG_NAMES = ("q", "k", "v", "h", "g", "cu_seqlens", "chunk_indices")
_STRIDED = ("q", "k", "v")
"""The arguments the kernel reads at their own token-row and head strides (checks.row_strides)."""
STRIDE_NAMES = ("STRIDE_QT", "STRIDE_QH", "STRIDE_KT", "STRIDE_KH", "STRIDE_VT", "STRIDE_VH")
"""The kernel's constexpr stride arguments, in the order of ChunkOProblem.strides."""


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
    """Output of chunked Gated DeltaNet: o [B, T, HV, V] in v's dtype (a new dense tensor).

    q, k [B, T, H, K]; v [B, T, HV, V]; h [B, NT, HV, K, V]; g [B, T, HV] float32 chunk-local cumulative
    log-gate (the cumsum of the per-token log-gates within each chunk; −∞ is a reset) or None; scale
    defaults to K**-0.5. Varlen: B = 1, cu_seqlens [N + 1] int32/int64 on q's device, chunk_indices [NT, 2]
    from gdn.common.spec.prepare_chunk_indices on q's device. Without chunk_indices, cu_seqlens is copied to
    the host once (a device sync) to build them and check its values; pass chunk_indices to avoid that (device
    values are then not checked; the kernel bounds them: gdn.common.contract). q, k and v may be strided
    views (the slices of one fused projection) read in place; other layouts are copied once. No backward:
    inputs that require grad are refused while grad mode is on. Under torch.compile the call is the custom op
    gdn::chunk_fwd_o (gdn.triton.custom_ops). Non-finite inputs: gdn.common.spec.
    """
    if torch.compiler.is_compiling():
        return torch.ops.gdn.chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens, chunk_indices)
    return run(q, k, v, h, g, scale, cu_seqlens, chunk_indices)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None,
        scale: float | None, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None) -> torch.Tensor:
    """chunk_fwd_o's eager path, and the implementation of its custom op."""
    problem, launch_o, cu_values, (q, k, v, h, g, cu_seqlens, chunk_indices) = call_plan(
        q, k, v, h, g, cu_seqlens, chunk_indices)
    if q.requires_grad or k.requires_grad or v.requires_grad or h.requires_grad or (g is not None and g.requires_grad):
        refuse_grad(spec.CHUNK_O_OP, ARG_NAMES, (q, k, v, h, g))
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(cu_values)).to(q.device)
    elif cu_values is not None and chunk_indices is not None and chunk_indices.device.type == "cpu":
        checks.chunk_indices_rows(cu_values, chunk_indices.numpy())
    # o dense whatever v's layout (empty_like would copy a dense permutation's strides); for a dense v, plain
    # empty_like costs less CPU than asking for the format (2.0 against 3.0 µs, measured on a CPU-only machine)
    o = torch.empty_like(v) if v.is_contiguous() else torch.empty_like(v, memory_format=torch.contiguous_format)
    if launch_o is not None:
        scale = spec.default_scale(problem.K) if scale is None else float(scale)
        launch_o(q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, problem.T, problem.num_sequences)
    return o


def call_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None,
              cu_seqlens: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
              ) -> tuple[contract.ChunkOProblem, KernelLaunch | None, tuple[int, ...] | None,
                         list[torch.Tensor | None]]:
    """(problem, launch, host cu_seqlens values or None, the arguments as the kernel reads them) of a chunk_fwd_o
    call: the contract check and plan() of its call signature, cached (one lookup for a repeated signature).
    q, k and v in a layout checks.row_strides accepts are read in place, every other non-contiguous argument is
    copied once (arrays.layout_keys)."""
    arrays, keys = layout_keys(ARG_NAMES, (q, k, v, h, g, cu_seqlens, chunk_indices), _STRIDED)
    cu_values = host_cu_seqlens(arrays[5], arrays[6])
    problem, launch_o = planned(_validated, plan, keys, cu_values)
    return problem, launch_o, cu_values, arrays


def _validated(q: contract.ArrayInfo, k: contract.ArrayInfo, v: contract.ArrayInfo, h: contract.ArrayInfo,
               g: contract.ArrayInfo | None, cu_seqlens: contract.ArrayInfo | None,
               chunk_indices: contract.ArrayInfo | None,
               cu_seqlens_values: tuple[int, ...] | None) -> contract.ChunkOProblem:
    """contract.validate_chunk_o_inputs after the check that the kernel can run on q's device."""
    check_device(torch.device(q.device), spec.CHUNK_O_OP)
    return contract.validate_chunk_o_inputs(q, k, v, h, g, cu_seqlens, chunk_indices, cu_seqlens_values)


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
        **dict(zip(STRIDE_NAMES, problem.strides)),
        BT=spec.CHUNK_SIZE, BK=tiling.block_k, BV=tiling.block_v, NV=num_v_tiles,
        USE_G=problem.gated, IS_VARLEN=problem.varlen,
        DOT_PRECISION=tilings.dot_precision(problem.dtype), G_FLOOR=spec.CUMULATIVE_GATE_FLOOR,
        QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS,
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
    launch_o = shared_launch(problem, tiling)
    if launch_o is not None:
        launch_o(q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, problem.T, problem.num_sequences)


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
