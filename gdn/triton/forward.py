"""chunk_gated_delta_rule for PyTorch: the whole chunked Gated DeltaNet forward in three Triton kernels.

prepare (g_c, w, u per chunk) → states (h, v_new, final state, walking each sequence's chunks) → chunk_fwd_o;
one long dense sequence runs them segment by segment on three CUDA streams (pipelined).
Math, layouts and the stage list: gdn.common.spec (chunk_gated_delta_rule); tilings: tilings.prepare_tiling,
tilings.state_tiling, tilings.tiling_for. Glossary as in gdn.triton.chunk_o (i_ program ids, o_ offsets, m_ masks,
b_ register tiles, BT = CHUNK_SIZE).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gdn.common import contract, spec, tilings
from gdn.triton.arrays import host_cu_seqlens, planned, tensor_keys
from gdn.triton.chunk_o import chunk_span
from gdn.triton.chunk_o import launch as launch_chunk_o
from gdn.triton.launcher import KernelLaunch


@triton.jit(do_not_specialize=["T"])
def chunk_prepare_kernel(
    k, v, g, beta, g_cum, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk, value head), value head fastest: the value heads of one q/k head share k via L2.
    i_flat = tl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i  # [BT] token rows (int64)
    m_t = o_t < eos
    p_k_rows = (o_t * H + i_h) * K
    p_g = o_t * HV + i_hv

    # g_c: chunk-local cumulative sum of the log-gates (padding rows add 0)
    b_g = tl.cumsum(tl.load(g + p_g, mask=m_t, other=0), axis=0)  # [BT]
    tl.store(g_cum + p_g, b_g, mask=m_t)
    b_beta = tl.load(beta + p_g, mask=m_t, other=0).to(tl.float32)  # [BT]

    # A = strictly lower (beta_i·k_i·k_j·exp(g_i − g_j)): [BT, BK] @ [BK, BT] summed over K steps
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_k = tl.load(k + p_k_rows[:, None] + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    m_lower = o_i[:, None] > o_i[None, :]
    b_A = b_A * b_beta[:, None] * tl.exp(tl.where(m_lower, b_g[:, None] - b_g[None, :], float("-inf")))

    # (I + A)⁻¹. D⁻¹ first, D = I + the NB = BT/BS diagonal BS×BS blocks of A, as [NB, BS, BS] blocks side by
    # side: column-oriented forward substitution on all blocks at once, exact float32. At step j, row j of every
    # block is final, and every later row i of its block takes X[i] -= A[i, j]·X[j].
    NB: tl.constexpr = BT // BS
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
    b_Ai = tl.dot(b_M, b_Dinv, input_precision=DOT_PRECISION)  # [BT, BT] float32

    # w = (I + A)⁻¹·(beta·exp(g)·k), u = (I + A)⁻¹·(beta·v): in k's dtype on the tensor cores, as FLA does
    b_Ai_in = b_Ai.to(k.dtype.element_ty)
    b_kscale = b_beta * tl.exp(b_g)
    for k0 in tl.static_range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_k_rows[:, None] + o_k[None, :], mask=m_tk, other=0)
        b_w = tl.dot(b_Ai_in, (b_k * b_kscale[:, None]).to(b_k.dtype), input_precision=DOT_PRECISION)
        tl.store(w + (p_g * K)[:, None] + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_tk)
    for v0 in tl.static_range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (p_g * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_u = tl.dot(b_Ai_in, (b_v * b_beta[:, None]).to(b_v.dtype), input_precision=DOT_PRECISION)
        tl.store(u + (p_g * V)[:, None] + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T"])
def chunk_states_kernel(
    k, w, u, g_cum, initial_state, h, v_new, final_state, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (V tile, sequence·value head) walks the sequence's chunks in order with its [BK, BV]
    # float32 slice of S in registers: the V columns of S never mix.
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
    p_state = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]  # [BK, BV] in initial/final state

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s += tl.load(initial_state + p_state, mask=m_kv, other=0)
    for i_t in range(0, NT):
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        p_rows = o_t * HV + i_hv  # [BT] rows of w, u, v_new, g_cum
        # h[c] = S, the state the chunk starts from
        p_h = h + ((first_chunk + i_t) * HV + i_hv) * (K * V)
        tl.store(p_h + o_k[:, None] * V + o_v[None, :], b_s.to(h.dtype.element_ty), mask=m_kv)
        # v_new = u − w·S: [BT, BK] @ [BK, BV]
        b_w = tl.load(w + (p_rows * K)[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        m_tv = m_t[:, None] & m_v[None, :]
        b_u = tl.load(u + (p_rows * V)[:, None] + o_v[None, :], mask=m_tv, other=0)
        b_v = b_u.to(tl.float32) - tl.dot(b_w, b_s.to(b_w.dtype), input_precision=DOT_PRECISION)
        tl.store(v_new + (p_rows * V)[:, None] + o_v[None, :], b_v.to(v_new.dtype.element_ty), mask=m_tv)
        # S = exp(g_last)·S + kᵀ·(exp(g_last − g)·v_new): [BK, BT] @ [BT, BV]
        b_g = tl.load(g_cum + p_rows, mask=m_t, other=0)
        b_g_last = tl.load(g_cum + (tl.minimum(bos + (i_t + 1) * BT, eos) - 1) * HV + i_hv)
        b_v = b_v * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]
        b_k = tl.load(k + ((o_t * H + i_h) * K)[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0)
        b_s = b_s * tl.exp(b_g_last) + tl.dot(tl.trans(b_k), b_v.to(b_k.dtype), input_precision=DOT_PRECISION)
    if STORE_FINAL_STATE:
        tl.store(final_state + p_state, b_s, mask=m_kv)


_ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "chunk_indices")


@functools.lru_cache(maxsize=1024)
def prepare_launch(problem: contract.ForwardProblem, tiling: tilings.Tiling) -> KernelLaunch:
    """The prepare kernel's launch for a validated problem with chunks, cached per (problem, tiling)."""
    return KernelLaunch(
        chunk_prepare_kernel, (problem.num_chunks_total * problem.HV,), tiling,
        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, BS=spec.SUBBLOCK, IS_VARLEN=problem.varlen, DOT_PRECISION=tilings.dot_precision(problem.dtype),
    )


@functools.lru_cache(maxsize=1024)
def states_launch(problem: contract.ForwardProblem, tiling: tilings.Tiling) -> KernelLaunch:
    """The states kernel's launch for a validated problem with sequences, cached per (problem, tiling)."""
    return KernelLaunch(
        chunk_states_kernel, problem.state_grid(tiling), tiling,
        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, USE_INITIAL_STATE=problem.use_initial_state,
        STORE_FINAL_STATE=problem.output_final_state, IS_VARLEN=problem.varlen,
        DOT_PRECISION=tilings.dot_precision(problem.dtype),
    )


def prepare_outputs(problem: contract.ForwardProblem, k: torch.Tensor, v: torch.Tensor,
                    g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (g_c, w, u) of stage 1 for the whole problem."""
    return (torch.empty_like(g), torch.empty((problem.B, problem.T, problem.HV, problem.K), dtype=k.dtype,
                                             device=k.device), torch.empty_like(v))


def state_outputs(problem: contract.ForwardProblem, k: torch.Tensor,
                  u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Empty (h, v_new, final_state or None) of stage 2 for the whole problem."""
    B, HV, K, V = problem.B, problem.HV, problem.K, problem.V
    return (torch.empty((B, problem.chunks_per_row, HV, K, V), dtype=k.dtype, device=k.device), torch.empty_like(u),
            torch.empty((problem.N, HV, K, V), dtype=torch.float32, device=k.device) if problem.output_final_state
            else None)


def prepare(problem: contract.ForwardProblem, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
            beta: torch.Tensor, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None,
            tiling: tilings.Tiling | None = None,
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 for a validated problem: (g_c [B, T, HV] float32, w [B, T, HV, K], u [B, T, HV, V]), w and u
    in k's dtype, written into out when given. tiling defaults to tilings.prepare_tiling's (benchmarks pass
    others)."""
    g_cum, w, u = out or prepare_outputs(problem, k, v, g)
    if problem.num_chunks_total * problem.HV == 0:
        return g_cum, w, u
    run = prepare_launch(problem, tiling or problem.prepare)
    run(k, v, g, beta, g_cum, w, u, cu_seqlens, chunk_indices, problem.T)
    return g_cum, w, u


def states(problem: contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
           g_cum: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
           tiling: tilings.Tiling | None = None,
           out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stage 2 for a validated problem: (h [B, NT, HV, K, V] in k's dtype, v_new like u, final_state
    [N, HV, K, V] float32 or None), written into out when given. With cu_seqlens, h has the chunk rows of
    prepare_chunk_indices. tiling defaults to tilings.state_tiling's (benchmarks pass others)."""
    h, v_new, final_state = out or state_outputs(problem, k, u)
    chunk_offsets = None
    if problem.varlen:  # first h row of each sequence, on the device: no host sync
        counts = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + spec.CHUNK_SIZE - 1, spec.CHUNK_SIZE,
                           rounding_mode="floor")
        chunk_offsets = torch.cumsum(counts, 0) - counts
    if problem.N * problem.HV == 0:
        return h, v_new, final_state
    run = states_launch(problem, tiling or problem.state)
    run(k, w, u, g_cum, initial_state, h, v_new, final_state, cu_seqlens, chunk_offsets, problem.T)
    return h, v_new, final_state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked Gated DeltaNet forward (prefill): (o [B, T, HV, V] in v's dtype, final_state or None).

    q, k [B, T, H, K] (k L2-normalized by the model, as for FLA); v [B, T, HV, V]; g [B, T, HV] float32
    per-token log-gate (≤ 0, natural-log units, not cumulative); beta [B, T, HV] float32 or q's dtype;
    initial_state [N, HV, K, V] float32 (zeros when None); final_state [N, HV, K, V] float32 when
    output_final_state. scale defaults to K**-0.5. Varlen: B = 1, cu_seqlens [N + 1] and chunk_indices as
    for gdn.triton.chunk_fwd_o (without chunk_indices, cu_seqlens is read on the host once).
    """
    keys = tensor_keys(_ARG_NAMES, (q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices), op=spec.FORWARD_OP)
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices)
    problem, chunk_o = planned(contract.validate_forward_inputs, contract.ForwardProblem.chunk_o, keys, cu_values,
                               bool(output_final_state))
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(cu_values)).to(q.device)
    scale = spec.default_scale(problem.K) if scale is None else float(scale)
    if problem.segment_chunks is not None:
        return pipelined(problem, problem.segment_chunks, q, k, v, g, beta, scale, initial_state)
    g_cum, w, u = prepare(problem, k, v, g, beta, cu_seqlens, chunk_indices)
    h, v_new, final_state = states(problem, k, w, u, g_cum, initial_state, cu_seqlens)
    o = torch.empty_like(v)
    launch_chunk_o(chunk_o, chunk_o.tiling, q, k, v_new, h, g_cum, o, scale, cu_seqlens, chunk_indices)
    return o, final_state


def pipelined(problem: contract.ForwardProblem, segment_chunks: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
              initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward of one dense sequence (B = 1) in segments of segment_chunks chunks (contract.ForwardProblem
    .segments): on a GPU, prepare, the states walk and chunk_fwd_o each on its own stream, segment s's walk
    overlapping prepare(s + 1) and chunk_fwd_o(s − 1); elsewhere one segment after the other. Same bits as one
    pass; returns (o, final_state or None), ready on the caller's stream."""
    segments = problem.segments(segment_chunks)
    # Every buffer is allocated here on the caller's stream, which waits for the pipeline's streams before it
    # returns, so the caching allocator never hands one out while a pipeline stream still uses it.
    g_cum, w, u = prepare_outputs(problem, k, v, g)
    h, v_new, final_state = state_outputs(problem, k, u)
    o = torch.empty_like(v)
    # the state each segment but the last ends with, which the next one starts from
    carried = torch.empty((len(segments) - 1, problem.HV, problem.K, problem.V), dtype=torch.float32,
                          device=k.device)
    pipeline = _Pipeline(q.device) if q.is_cuda else None
    state = initial_state
    try:
        for i, (t0, t1, segment) in enumerate(segments):
            # views of the segment's tokens and chunks (narrow: a cheaper call than indexing)
            q_s, k_s, v_s, g_s, beta_s, g_cum_s, w_s, u_s, v_new_s, o_s = (
                x.narrow(1, t0, t1 - t0) for x in (q, k, v, g, beta, g_cum, w, u, v_new, o))
            h_s = h.narrow(1, t0 // spec.CHUNK_SIZE, segment.chunks_per_row)
            end = carried[i:i + 1] if i < len(segments) - 1 else final_state
            _switch(pipeline, _PREPARE)
            prepare(segment, k_s, v_s, g_s, beta_s, None, None, out=(g_cum_s, w_s, u_s))
            _switch(pipeline, _WALK, after=_PREPARE)
            states(segment, k_s, w_s, u_s, g_cum_s, state, None, out=(h_s, v_new_s, end))
            _switch(pipeline, _OUTPUT, after=_WALK)
            chunk_o = segment.chunk_o()
            launch_chunk_o(chunk_o, chunk_o.tiling, q_s, k_s, v_new_s, h_s, g_cum_s, o_s, scale, None, None)
            state = end
    finally:
        if pipeline is not None:
            pipeline.join()
    return o, final_state


_PREPARE, _WALK, _OUTPUT = range(3)


@functools.cache
def _pipeline_streams(device: torch.device) -> tuple[torch.cuda.Stream, ...]:
    """The (prepare, walk, output) streams of pipelined forwards on a CUDA device; the walk's has a higher
    priority, so its programs take the SMs first (without it, measured, the pipeline is slower than one pass)."""
    return torch.cuda.Stream(device), torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device)


class _Pipeline:
    """One pipelined forward: its streams (forked from the caller's), the one launches go to now, and the last
    event recorded on each."""

    def __init__(self, device: torch.device) -> None:
        self.caller = torch.cuda.current_stream(device)
        self.streams = _pipeline_streams(device)
        self.current: int | None = None
        self.events: list[torch.cuda.Event | None] = [None] * len(self.streams)
        for stream in self.streams:
            stream.wait_stream(self.caller)

    def switch(self, index: int, after: int | None) -> None:
        """Record the end of the current stream's work, then launch on stream index, after the last work
        recorded on stream `after`."""
        if self.current is not None:
            self.events[self.current] = self.streams[self.current].record_event()
        stream = self.streams[index]
        if after is not None:
            stream.wait_event(self.events[after])
        torch.cuda.set_stream(stream)
        self.current = index

    def join(self) -> None:
        """Back on the caller's stream, which waits for every stream of the pipeline."""
        torch.cuda.set_stream(self.caller)
        for stream in self.streams:
            self.caller.wait_stream(stream)


def _switch(pipeline: _Pipeline | None, index: int, after: int | None = None) -> None:
    """pipeline.switch(index, after); nothing without a pipeline (the current stream, in order)."""
    if pipeline is not None:
        pipeline.switch(index, after)


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
    any T and any batch: calls at T = CHUNK_SIZE (all three kernels, chunk_fwd_o included), one per states
    tiling size class (tilings.state_warmup_sequence_counts: the batch sizes that select each V-tile width), and
    without varlen a pipelined call of three one-chunk segments (tilings.pipeline_segment_chunks: a segment
    after the first starts from a state, one before the last stores its final state). Every tiling comes from
    the static tables in gdn.common.spec, never from timing these shapes."""
    def zeros(call: dict) -> tuple[torch.Tensor, ...]:
        """q (also k), v, g, beta and the initial state (or None) of a warmup call, zeros."""
        state = torch.zeros(call["state"], dtype=torch.float32, device=device) if initial_state else None
        return (torch.zeros(call["q"], dtype=dtype, device=device), torch.zeros(call["v"], dtype=dtype, device=device),
                torch.zeros(call["g"], dtype=torch.float32, device=device),
                torch.zeros(call["beta"], dtype=beta_dtype, device=device), state)

    for num_sequences in tilings.state_warmup_sequence_counts(HV, V):
        call = spec.warmup_arguments(spec.CHUNK_SIZE, H, HV, K, V, True, varlen, num_sequences)
        q, v, g, beta, state = zeros(call)
        cu_seqlens, chunk_indices = (None if call[n] is None else torch.from_numpy(call[n]).to(device)
                                     for n in ("cu_seqlens", "chunk_indices"))
        chunk_gated_delta_rule(q, q, v, g, beta, initial_state=state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    if not varlen:
        q, v, g, beta, state = zeros(spec.warmup_arguments(3 * spec.CHUNK_SIZE, H, HV, K, V, True, False))
        keys = tensor_keys(_ARG_NAMES, (q, q, v, g, beta, state, None, None), op=spec.FORWARD_OP)
        problem, _ = planned(contract.validate_forward_inputs, contract.ForwardProblem.chunk_o, keys, None,
                             bool(output_final_state))
        pipelined(problem, 1, q, q, v, g, beta, spec.default_scale(K), state)
