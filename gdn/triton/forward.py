"""chunk_gated_delta_rule for PyTorch: the chunked Gated DeltaNet forward in Triton kernels.

prepare (g_c, w and u per chunk, all chunks in parallel) → walk (per sequence, value head and V tile, the chunks
in order with S in registers: v_new and the next S, storing h and v_new) → chunk_fwd_o (all chunks in
parallel). When walks are few (tilings.context_pieces), each sequence is cut into pieces: a map walk gives
each piece's affine state map S_out = M·S_in + N, the combine turns them into every piece's true initial state,
and the walk runs all pieces in parallel. The walk can also compute o itself (tilings.FUSED_WALK: measured
slower on Triton 3.6, kept for that measurement). The kernels and their launch plans live in
gdn.triton_kernels.forward (shared with JAX's lowering='triton_call'). Math, layouts and the stages:
gdn.common.spec (chunk_gated_delta_rule); tilings: tilings.prepare_tiling, tilings.walk_tiling,
tilings.context_pieces, tilings.SCAN_TILING.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from gdn.common import checks, forward_contract, spec, tilings
from gdn.common.contract import ArrayInfo
from gdn.triton.arrays import (
    check_device,
    first_chunk_rows,
    host_cu_seqlens,
    layout_keys,
    planned,
    refuse_grad,
    tensor_keys,
)
from gdn.triton.chunk_o import launch as launch_chunk_o
from gdn.triton.launcher import KernelLaunch, cached_plan
from gdn.triton_kernels import forward as forward_kernels
from gdn.triton_kernels.forward import chunk_combine_kernel, chunk_prepare_kernel, chunk_walk_kernel

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
def prepare_launch(problem: forward_contract.ForwardProblem, tiling: tilings.Tiling) -> KernelLaunch:
    """The prepare kernel's launch for a validated problem with chunks, cached per (problem, tiling)."""
    return KernelLaunch(chunk_prepare_kernel, forward_kernels.prepare_grid(problem), tiling,
                        **forward_kernels.prepare_constants(problem, tiling))


@cached_plan
def walk_launch(problem: forward_contract.ForwardProblem, tiling: tilings.Tiling, pieces: int, *, initial: bool,
                final: bool, output_o: bool, store_h: bool, mapped: int = 0) -> KernelLaunch:
    """The walk kernel's launch for a validated problem in that many pieces, cached. mapped > 0: the map walk
    of the first `mapped` pieces over [M | N]'s K + V columns."""
    return KernelLaunch(chunk_walk_kernel, forward_kernels.walk_grid(problem, tiling, pieces, mapped), tiling,
                        **forward_kernels.walk_constants(problem, tiling, pieces, initial=initial, final=final,
                                                         output_o=output_o, store_h=store_h, mapped=mapped))


@cached_plan
def combine_launch(problem: forward_contract.ForwardProblem, initial: bool) -> KernelLaunch:
    """The combine kernel's launch for a validated problem, cached."""
    return KernelLaunch(chunk_combine_kernel, forward_kernels.combine_grid(problem), tilings.SCAN_TILING,
                        **forward_kernels.combine_constants(problem, initial))


def prepare(problem: forward_contract.ForwardProblem, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
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
            k, v, g, beta, gating.A_log, gating.dt_bias, cu_seqlens, chunk_indices, g_cum, w, u, gating.softplus_beta,
            gating.softplus_threshold, problem.T, problem.N)
    return g_cum, w, u


def piece_maps(problem: forward_contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
               g_cum: torch.Tensor, cu_seqlens: torch.Tensor | None, pieces: int, mapped: int,
               tiling: tilings.Tiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine state maps S_out = M·S_in + N of the first `mapped` of `pieces` pieces of every sequence:
    (M [N·mapped, HV, K, K], N [N·mapped, HV, K, V]) float32, from the map walk."""
    N, HV, K, V = problem.N, problem.HV, problem.K, problem.V
    map_m = torch.empty((N * mapped, HV, K, K), dtype=torch.float32, device=k.device)
    map_n = torch.empty((N * mapped, HV, K, V), dtype=torch.float32, device=k.device)
    walk_launch(problem, tiling or problem.walk, pieces, initial=False, final=False, output_o=False, store_h=False,
                mapped=mapped)(None, k, w, u, g_cum, None, cu_seqlens, None, None, None, None, None, None, map_m,
                               map_n, 1.0, problem.T, pieces, mapped, 0, 0)
    return map_m, map_n


def combine(problem: forward_contract.ForwardProblem, map_m: torch.Tensor, map_n: torch.Tensor,
            initial_state: torch.Tensor | None, pieces: int,
            state_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Every piece's true initial state [N·pieces, HV, K, V] float32 from the maps of all pieces but the last
    ([N·(pieces − 1), HV, K, K] and [N·(pieces − 1), HV, K, V]) and each sequence's initial state (or 0; with a
    pool, its row state_indices[n])."""
    starts = torch.empty((problem.N * pieces, problem.HV, problem.K, problem.V), dtype=torch.float32,
                         device=map_m.device)
    combine_launch(problem, initial_state is not None)(map_m, map_n, initial_state, state_indices, starts, pieces,
                                                       problem.pool_rows)
    return starts


def piece_starts(problem: forward_contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                 g_cum: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 pieces: int, tiling: tilings.Tiling | None = None,
                 state_indices: torch.Tensor | None = None) -> torch.Tensor:
    """The true initial state of every piece of every sequence, [N·pieces, HV, K, V] float32 (pieces ≥ 2): the
    map walk of the pieces but the last, then the combine."""
    map_m, map_n = piece_maps(problem, k, w, u, g_cum, cu_seqlens, pieces, pieces - 1, tiling)
    return combine(problem, map_m, map_n, initial_state, pieces, state_indices)


def walk(problem: forward_contract.ForwardProblem, q: torch.Tensor | None, k: torch.Tensor, w: torch.Tensor,
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
        if problem.varlen:
            chunk_offsets = first_chunk_rows(cu_seqlens)
    if N * HV == 0:
        return o, final_state, h, v_new
    walk_launch(problem, tiling or problem.walk, pieces, initial=initial_state is not None,
                final=final_state is not None, output_o=q is not None, store_h=store_h)(
        q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_offsets, state_indices, o, final_state, h, v_new, None,
        None, scale, problem.T, pieces, 0, problem.num_chunks_total if store_h else 0, problem.pool_rows)
    return o, final_state, h, v_new


def states(problem: forward_contract.ForwardProblem, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
           g_cum: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The states of every chunk for the backward: (h [B, NT, HV, K, V] in k's dtype, the state each chunk starts
    from; v_new like u; final_state or None): the walk with its states stored and no o."""
    _, final_state, h, v_new = walk(problem, None, k, w, u, g_cum, initial_state, cu_seqlens, 1.0, store_h=True)
    return h, v_new, final_state


def forward(problem: forward_contract.ForwardProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            g: torch.Tensor, beta: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
            cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None, pieces: int = 1,
            fused: bool = tilings.FUSED_WALK, prepare_tiling: tilings.Tiling | None = None,
            walk_tiling: tilings.Tiling | None = None, state_indices: torch.Tensor | None = None,
            gating: RawGating | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None) of a validated problem: prepare, then forward_after_prepare. The tilings default
    to the problem's (benchmarks pass others); state_indices (a pool in initial_state) and gating (the raw
    gates' parameters, g and beta holding a and b) as the problem's flags say."""
    g_cum, w, u = prepare(problem, k, v, g, beta, cu_seqlens, chunk_indices, prepare_tiling, gating)
    return forward_after_prepare(problem, q, k, v, g_cum, w, u, scale, initial_state, cu_seqlens, chunk_indices,
                                 pieces, fused, walk_tiling, state_indices)


def forward_after_prepare(problem: forward_contract.ForwardProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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
def context_pieces(problem: forward_contract.ForwardProblem, device: torch.device) -> int:
    """problem.pieces on that device, cached per call signature."""
    return problem.pieces(multiprocessors(device))


def _no_plan(problem: forward_contract.ForwardProblem) -> None:
    """The forward plans nothing beyond its problem: its launches are cached per (problem, tiling, flags)."""


def validate(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, g: ArrayInfo | None, beta: ArrayInfo | None,
             initial_state: ArrayInfo | None, cu_seqlens: ArrayInfo | None, chunk_indices: ArrayInfo | None,
             state_indices: ArrayInfo | None, a: ArrayInfo | None, b: ArrayInfo | None, A_log: ArrayInfo | None,
             dt_bias: ArrayInfo | None, cu_seqlens_values: tuple[int, ...] | None, output_final_state: bool,
             use_qk_l2norm_in_kernel: bool) -> forward_contract.ForwardProblem:
    """forward_contract.validate_forward_inputs on the arrays in _ARG_NAMES' order, then the options (what
    arrays.planned calls it with), and the check that the kernels can run on q's device."""
    check_device(torch.device(q.device), spec.FORWARD_OP)
    return forward_contract.validate_forward_inputs(
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
