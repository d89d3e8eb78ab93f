"""decode_step for PyTorch: the gated delta rule token by token for N sequences, one Triton kernel.

Glossary (FLA's naming): i_ program ids, o_ offsets, m_ masks, p_ pointer offsets, b_ register tiles; BK the
whole K (masked to a power of two), BV the V tile width. S is the [K, V] state of one sequence and value head.
Math, layouts and the serving arguments (state pools, per-token state slots, q/k normalization, raw gates):
gdn.common.spec (decode_step); tiling: gdn.common.tilings.decode_tiling.

The products with S are matrix-vector products, written as an elementwise product and a sum over K (no tl.dot):
they would waste a tensor-core tile on one row, and the Triton 3.9 interpreter's tl.dot is wrong for bf16.

Layouts the kernel reads in place (gdn.triton.arrays.strided_keys; anything else is copied once, costing a
read and a write of that array): q, k [T, H, K] and v [T, HV, V] with any token stride (slices of one fused
projection); g, beta (or a, b) [T, HV] likewise; the state [N or P, HV, K, V] with any row stride and its
[HV, K, V] axes contiguous, or their (V, K) transpose (state_v_first: vLLM's [P, HV, V, K] pools, passed as
pool.transpose(-1, -2)). A dense state in another layout is copied; a pool never is (refused instead).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from gdn.common import contract, spec, tilings
from gdn.triton.arrays import array_info, check_device, refuse_grad, strided_keys
from gdn.triton.launcher import KernelLaunch, cached_plan

QK_L2NORM_EPS: tl.constexpr = tl.constexpr(spec.QK_L2NORM_EPS)


@triton.jit(do_not_specialize=["T", "P"])
def decode_step_kernel(
    q, k, v, g, beta, A_log, dt_bias,  # inputs; under RAW_GATES g and beta hold the raw gates a and b
    state, new_state, o,  # new_state is state itself for a pool
    state_indices, cu_seqlens, num_accepted_tokens,
    scale, softplus_beta, softplus_threshold,
    T, P, stride_q, stride_k, stride_v, stride_g, stride_beta, stride_state,  # rows and row strides
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    S: tl.constexpr, IS_VARLEN: tl.constexpr, USE_INDICES: tl.constexpr, TOKEN_STATES: tl.constexpr,
    USE_ACCEPTED: tl.constexpr, QK_L2NORM: tl.constexpr, RAW_GATES: tl.constexpr, STATE_V_FIRST: tl.constexpr,
):
    # One program per (sequence·value head, V tile): the V columns of S never mix, so each program carries its
    # [BK, BV] slice of S alone across the sequence's tokens.
    i_nh = tl.program_id(0).to(tl.int64)  # N·HV·K·V may pass 2**31
    i_v = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)  # the q/k head this value head reads

    # the sequence's token rows [bos, eos), clamped into [0, T]; with per-token slots, at most S tokens
    if IS_VARLEN:
        bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), T)
        eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), T)
    else:
        bos = i_n
        eos = i_n + 1
    if TOKEN_STATES:
        eos = tl.minimum(eos, bos + S)

    # the state row read: the sequence's own, or a pool row (state_indices[n, num_accepted_tokens[n] − 1]);
    # an index out of range skips the sequence (m_seq false: o rows zero, nothing read or written)
    if USE_INDICES:
        if USE_ACCEPTED:
            i_col = tl.load(num_accepted_tokens + i_n).to(tl.int64) - 1
        else:
            i_col = i_n * 0
        m_col = (i_col >= 0) & (i_col < S)
        i_row = tl.load(state_indices + i_n * S + tl.where(m_col, i_col, 0)).to(tl.int64)
        m_seq = m_col & (i_row >= 0) & (i_row < P)
        i_row = tl.where(m_seq, i_row, 0)
    else:
        i_row = i_n
        m_seq = i_n >= 0

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # the state tile's mask, empty for a skipped sequence (a scalar flag folded into the K bound: the Triton 3.9
    # interpreter turns a scalar comparison broadcast into a mask into int64)
    m_kv = (o_k < tl.where(m_seq, K, 0))[:, None] & m_v[None, :]
    if STATE_V_FIRST:
        p_kv = o_v[None, :] * K + o_k[:, None]  # [BK, BV] offsets of S in a [V, K] state
    else:
        p_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV] offsets of S in a [K, V] state
    p_head = i_hv * (K * V) + p_kv

    b_s = tl.load(state + i_row * stride_state + p_head, mask=m_kv, other=0)  # [BK, BV] float32
    if RAW_GATES:
        b_decay_rate = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))  # −exp(A_log)
        b_dt_bias = tl.load(dt_bias + i_hv).to(tl.float32)

    for i_t in range(bos, eos):
        b_q = tl.load(q + i_t * stride_q + i_h * K + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        b_k = tl.load(k + i_t * stride_k + i_h * K + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        b_v = tl.load(v + i_t * stride_v + i_hv * V + o_v, mask=m_v, other=0).to(tl.float32)  # [BV]
        b_g = tl.load(g + i_t * stride_g + i_hv).to(tl.float32)
        b_beta = tl.load(beta + i_t * stride_beta + i_hv).to(tl.float32)
        if RAW_GATES:
            # g = −exp(A_log)·softplus(a + dt_bias), softplus(x) = log(1 + exp(β·x))/β up to the threshold
            b_x = b_g + b_dt_bias
            b_bx = softplus_beta * b_x
            b_g = b_decay_rate * tl.where(b_bx <= softplus_threshold, tl.log(1 + tl.exp(b_bx)) / softplus_beta, b_x)
            # beta = sigmoid(b)
            b_beta = 1 / (1 + tl.exp(-b_beta))
        if QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + QK_L2NORM_EPS)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + QK_L2NORM_EPS)

        # S ← exp(g)·S
        b_s = b_s * tl.exp(b_g)
        # u = beta·(v − Sᵀk): [BK, BV] * [BK, 1] summed over K -> [BV]
        b_u = b_beta * (b_v - tl.sum(b_s * b_k[:, None], axis=0))
        # S ← S + k ⊗ u: [BK, 1] * [1, BV] -> [BK, BV]
        b_s = b_s + b_k[:, None] * b_u[None, :]
        # o = Sᵀ(scale·q): [BK, BV] * [BK, 1] summed over K -> [BV]
        b_o = tl.sum(b_s * (b_q * scale)[:, None], axis=0)
        tl.store(o + (i_t * HV + i_hv) * V + o_v, tl.where(m_seq, b_o, 0).to(o.dtype.element_ty), mask=m_v)
        if TOKEN_STATES:
            # the state after this token goes to its slot state_indices[n, t − bos] (none when out of range)
            i_slot = tl.load(state_indices + i_n * S + (i_t - bos)).to(tl.int64)
            m_slot = m_seq & (i_slot >= 0) & (i_slot < P)
            m_skv = (o_k < tl.where(m_slot, K, 0))[:, None] & m_v[None, :]
            tl.store(new_state + tl.where(m_slot, i_slot, 0) * stride_state + p_head, b_s, mask=m_skv)
    if not TOKEN_STATES:
        tl.store(new_state + i_row * stride_state + p_head, b_s, mask=m_kv)


ARG_NAMES = ("q", "k", "v", "g", "beta", "state", "state_indices", "cu_seqlens", "num_accepted_tokens", "a", "b",
             "A_log", "dt_bias")
_TOKEN_ARRAYS = ("q", "k", "v", "g", "beta", "a", "b")
"""Arrays read with a runtime token stride: [T, heads, size] with the last two axes contiguous, or [T, HV]."""


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What one call signature of decode_step needs: the validated problem; which arguments to copy into a
    contiguous layout first (a tuple of bools in ARG_NAMES order) and whether any is; the kernel's row strides
    (q, k, v, g or a, beta or b, state) of the arrays as launched; whether the state's last two axes are
    (V, K); whether the arrays are on the host (their index values are then checked before launch); its launch
    (None when there is nothing to run)."""

    problem: contract.DecodeProblem
    copies: tuple[bool, ...]
    any_copy: bool
    strides: tuple[int, ...]
    state_v_first: bool
    host: bool
    launch: KernelLaunch | None


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor,
    scale: float | None = None,
    *,
    state_indices: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    softplus_beta: float = spec.SOFTPLUS_BETA,
    softplus_threshold: float = spec.SOFTPLUS_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoding tokens of Gated DeltaNet for N sequences: (o [T, HV, V] in v's dtype, the states after).

    q, k [T, H, K]; v [T, HV, V]; g [T, HV] float32 per-token log-gate (not cumulative); beta [T, HV] float32
    or q's dtype: one token per sequence (T = N), or with cu_seqlens [N + 1] a few per sequence, packed. state
    [N, HV, K, V] float32, each sequence's S before its first token: returns S after its last as a new tensor
    (state is not modified). With state_indices, state is a pool [P, HV, K, V] updated in place (no copy of
    it) and returned itself: [N] reads and writes back row state_indices[n]; [N, S] keeps the state after each
    token in its slot, the sequence continuing from slot num_accepted_tokens[n] − 1 (speculative decoding);
    a negative index is a padded slot, skipped (o rows zero). use_qk_l2norm_in_kernel normalizes raw q, k; a, b
    with A_log, dt_bias replace g, beta (raw gates). scale defaults to K**-0.5. Meaning of every argument and
    the index rules: gdn.common.spec (decode_step); layouts read in place: this module's docstring.

    Index arrays on the host (CPU tensors, the interpreter) are checked before launch; device ones are bounds-
    masked in the kernel. Nothing here reads a device value, so a call can be captured in a CUDA graph; under
    torch.compile the call is the custom op gdn::decode_step (gdn.triton.custom_ops).
    """
    if torch.compiler.is_compiling():
        from gdn.triton import custom_ops

        return custom_ops.decode_step(q, k, v, g, beta, state, scale, state_indices, cu_seqlens, num_accepted_tokens,
                                      use_qk_l2norm_in_kernel, a, b, A_log, dt_bias, softplus_beta, softplus_threshold)
    return run(q, k, v, g, beta, state, scale, state_indices, cu_seqlens, num_accepted_tokens, use_qk_l2norm_in_kernel,
               a, b, A_log, dt_bias, softplus_beta, softplus_threshold)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
        state: torch.Tensor, scale: float | None, state_indices: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
        num_accepted_tokens: torch.Tensor | None, use_qk_l2norm_in_kernel: bool, a: torch.Tensor | None,
        b: torch.Tensor | None, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, softplus_beta: float,
        softplus_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_step's eager path, its arguments all positional (what the custom op calls)."""
    args = (q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias)
    signature = plan(strided_keys(ARG_NAMES, args, spec.DECODE_OP), bool(use_qk_l2norm_in_kernel))
    refuse_grad(spec.DECODE_OP, ARG_NAMES, args)
    if signature.any_copy:
        args = tuple(x.contiguous() if copy else x for x, copy in zip(args, signature.copies))
        q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias = args
    problem = signature.problem
    if signature.host:  # host index values: checked before launch (on a GPU the kernel masks them)
        contract.validate_decode_index_values(problem, *(None if x is None else x.numpy()
                                                         for x in (state_indices, cu_seqlens, num_accepted_tokens)))
    o = (torch.zeros if problem.varlen else torch.empty)(v.shape, dtype=v.dtype, device=v.device)
    new_state = state if problem.pool else torch.empty_strided(state.shape, state.stride(), dtype=state.dtype,
                                                               device=state.device)
    if signature.launch is not None:
        scale = spec.default_scale(problem.K) if scale is None else float(scale)
        signature.launch(q, k, v, a if problem.raw_gates else g, b if problem.raw_gates else beta, A_log, dt_bias,
                         state, new_state, o, state_indices, cu_seqlens, num_accepted_tokens, scale,
                         float(softplus_beta), float(softplus_threshold), problem.T, problem.pool_rows or problem.N,
                         *signature.strides)
    return o, new_state


def call_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
              state: torch.Tensor, state_indices: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              num_accepted_tokens: torch.Tensor | None = None, a: torch.Tensor | None = None,
              b: torch.Tensor | None = None, A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
              use_qk_l2norm_in_kernel: bool = False) -> DecodePlan:
    """The DecodePlan of a decode_step call (problem, copies, strides, launch): plan() of its call signature,
    cached (one lookup for a repeated signature)."""
    args = (q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias)
    return plan(strided_keys(ARG_NAMES, args, spec.DECODE_OP), bool(use_qk_l2norm_in_kernel))


def _rows_in_place(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether an array of token rows [T, ...] has its axes after the first contiguous (axes of size 1 aside):
    the kernel then reads it in place with its token stride."""
    expected = 1
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _state_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool | None:
    """True when a state [rows, HV, K, V]'s last two axes are (V, K) in memory, False when (K, V), None when its
    [HV, K, V] axes are in neither layout (HV's stride aside when HV = 1)."""
    _, HV, K, V = shape
    _, stride_h, stride_k, stride_v = strides
    if HV != 1 and stride_h != K * V:
        return None
    if (stride_k, stride_v) == (V, 1):
        return False
    return True if (stride_k, stride_v) == (1, K) else None


@cached_plan
def plan(keys: tuple, use_qk_l2norm_in_kernel: bool) -> DecodePlan:
    """decode_step's plan for one call signature (strided_keys of its arguments in ARG_NAMES order): the
    contract check, the layout rules (what the kernel reads in place, what is copied first) and the launch
    (kernel_launch with the problem's tiling, fixed signature: a plan belongs to one call signature); cached,
    so a repeated signature costs one lookup (gdn.triton.reset_plans empties the cache)."""
    op = spec.DECODE_OP
    problem = contract.validate_decode_inputs(*(None if key is None else array_info(key) for key in keys),
                                              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    check_device(keys[0][2], op)
    named = dict(zip(ARG_NAMES, keys))
    copies = {}
    for name, key in named.items():
        if key is None:
            copies[name] = False
        elif name in _TOKEN_ARRAYS:
            copies[name] = not _rows_in_place(tuple(key[0]), key[3])
        elif name != "state":
            copies[name] = not _rows_in_place((1,) + tuple(key[0]), (0,) + key[3])  # small index and bias arrays
    state_shape, state_strides = tuple(named["state"][0]), named["state"][3]
    state_v_first = _state_layout(state_shape, state_strides)
    copies["state"] = state_v_first is None
    if state_v_first is None and problem.pool:
        raise ValueError(f"{op}: state: expected a pool whose [HV, K, V] axes are contiguous, or whose last two "
                         "axes are transposed (a [P, HV, V, K] pool's transpose(-1, -2)); a pool is never copied; "
                         f"got strides {state_strides} for shape {state_shape}")
    state_v_first = bool(state_v_first)

    def row_stride(name: str) -> int:
        shape, _, _, strides = named[name]
        return math.prod(shape[1:]) if copies[name] else strides[0]

    gate, strength = ("a", "b") if problem.raw_gates else ("g", "beta")
    strides = tuple(row_stride(name) for name in ("q", "k", "v", gate, strength, "state"))
    copy_flags = tuple(copies[name] for name in ARG_NAMES)
    return DecodePlan(problem, copy_flags, any(copy_flags), strides, state_v_first, keys[0][2].type == "cpu",
                      kernel_launch(problem, problem.tiling, state_v_first, fixed_signature=True))


def kernel_launch(problem: contract.DecodeProblem, tiling: tilings.Tiling, state_v_first: bool = False,
                  fixed_signature: bool = False) -> KernelLaunch | None:
    """The kernel launch of a validated problem (its flags as constexprs) with a tiling, None when N·HV = 0."""
    if problem.N * problem.HV == 0:
        return None
    return KernelLaunch(
        decode_step_kernel, problem.grid(tiling), tiling, fixed_signature=fixed_signature,
        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, BK=tiling.block_k, BV=tiling.block_v,
        S=max(problem.index_columns, 1), IS_VARLEN=problem.varlen, USE_INDICES=problem.pool,
        TOKEN_STATES=problem.token_states, USE_ACCEPTED=problem.accepted, QK_L2NORM=problem.qk_l2norm,
        RAW_GATES=problem.raw_gates, STATE_V_FIRST=state_v_first)


@cached_plan
def shared_launch(problem: contract.DecodeProblem, tiling: tilings.Tiling) -> KernelLaunch | None:
    """kernel_launch cached per (problem, tiling), each launch matched in full (callers pass any arguments)."""
    return kernel_launch(problem, tiling)


def launch(problem: contract.DecodeProblem, tiling: tilings.Tiling, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor, o: torch.Tensor, new_state: torch.Tensor,
           scale: float) -> None:
    """Launch the kernel for a validated dense one-token problem (no serving flags) with contiguous inputs and
    the given tiling, writing o and new_state: the tiling sweep of benchmarks/decode.py."""
    run_launch = shared_launch(problem, tiling)
    if run_launch is not None:
        K, V, HV, H = problem.K, problem.V, problem.HV, problem.H
        run_launch(q, k, v, g, beta, None, None, state, new_state, o, None, None, None, scale, spec.SOFTPLUS_BETA,
                   spec.SOFTPLUS_THRESHOLD, problem.T, problem.N, H * K, H * K, HV * V, HV, HV, HV * K * V)
