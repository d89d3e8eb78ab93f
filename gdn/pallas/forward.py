"""chunk_gated_delta_rule for JAX: the whole chunked Gated DeltaNet forward in three Pallas kernels (Triton
lowering on GPU), the same algorithm, names and grids as gdn.triton.forward.

prepare (g_c, w, u per chunk) → states (h, v_new, final state, walking each sequence's chunks) → chunk_fwd_o.
Math, layouts and the stage list: gdn.common.spec (chunk_gated_delta_rule). Refs are whole arrays with the
token axis flattened (k [B·T, H, K]; v, u, v_new [B·T, HV, V]; w [B·T, HV, K]; g, beta, g_c [B·T, HV];
h [B·NT, HV, K, V]; states [N·HV, K, V]), read and written with masked plgpu.load / plgpu.store as in
gdn.pallas.chunk_o.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gdn.common import contract, spec, tilings
from gdn.pallas.arrays import (
    CompilerParams,
    array_info,
    as_index,
    call_device,
    check_token_rows,
    float32_dot_precision,
    host_cu_seqlens,
    index_or_placeholder,
    input_dot_precision,
    resolve_interpret,
)
from gdn.pallas.chunk_o import chunk_span
from gdn.pallas.chunk_o import launch as launch_chunk_o


def chunk_prepare_kernel(
    k, v, g, beta, cu_seqlens, chunk_indices, g_cum, w, u, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int, BS: int, IS_VARLEN: bool,
    DOT_PRECISION, MERGE_PRECISION,
):
    # One program per (chunk, value head), value head fastest: the value heads of one q/k head share k via L2.
    i_flat = pl.program_id(0)
    i_hv = i_flat % HV
    i_tg = i_flat // HV
    i_h = i_hv // (HV // H)
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T=T, BT=BT, IS_VARLEN=IS_VARLEN)
    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_t = t0 + o_i  # [BT] token rows
    m_t = o_t < eos

    def dot(a, b, precision=DOT_PRECISION):
        return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

    # g_c: chunk-local cumulative sum of the log-gates (padding rows add 0)
    b_g = jnp.cumsum(plgpu.load(g.at[o_t, i_hv], mask=m_t, other=0), axis=0)  # [BT]
    plgpu.store(g_cum.at[o_t, i_hv], b_g, mask=m_t)
    b_beta = plgpu.load(beta.at[o_t, i_hv], mask=m_t, other=0).astype(jnp.float32)  # [BT]

    # A = strictly lower (beta_i·k_i·k_j·exp(g_i − g_j)): [BT, BK] @ [BK, BT] summed over K steps
    b_A = jnp.zeros([BT, BT], dtype=jnp.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_t[:, None] & (o_k < K)[None, :], other=0)
        b_A += dot(b_k, b_k.T)
    m_lower = o_i[:, None] > o_i[None, :]
    b_A = b_A * b_beta[:, None] * jnp.exp(jnp.where(m_lower, b_g[:, None] - b_g[None, :], -jnp.inf))

    # (I + A)⁻¹. D⁻¹ first, D = I + the NB = BT/BS diagonal BS×BS blocks of A, as [NB, BS, BS] blocks side by
    # side: column-oriented forward substitution on all blocks at once, exact float32. At step j, row j of every
    # block is final, and every later row i of its block takes X[i] -= A[i, j]·X[j].
    NB = BT // BS
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
    # at most three blocks. The float32 dots run at MERGE_PRECISION: tf32x3 for float32 inputs; TF32 for 16-bit
    # inputs, whose w and u dots round (I + A)⁻¹ to the input dtype anyway.
    m_block = (o_i[:, None] // BS) == (o_i[None, :] // BS)
    b_N = dot(b_Dinv, jnp.where(m_block, 0, b_A), MERGE_PRECISION)
    b_N2 = dot(b_N, b_N, MERGE_PRECISION)
    b_eye = jnp.where(o_i[:, None] == o_i[None, :], 1.0, 0.0).astype(jnp.float32)
    b_M = b_eye - b_N + b_N2 - dot(b_N, b_N2, MERGE_PRECISION)
    b_Ai = dot(b_M, b_Dinv, MERGE_PRECISION)  # [BT, BT] float32

    # w = (I + A)⁻¹·(beta·exp(g)·k), u = (I + A)⁻¹·(beta·v): in k's dtype on the tensor cores, as FLA does
    b_Ai_in = b_Ai.astype(k.dtype)
    b_kscale = b_beta * jnp.exp(b_g)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_tk, other=0)
        b_w = dot(b_Ai_in, (b_k * b_kscale[:, None]).astype(b_k.dtype))
        plgpu.store(w.at[o_t[:, None], i_hv, o_k[None, :]], b_w.astype(w.dtype), mask=m_tk)
    for v0 in range(0, V, BV):
        o_v = v0 + jnp.arange(BV, dtype=jnp.int32)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = plgpu.load(v.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_u = dot(b_Ai_in, (b_v * b_beta[:, None]).astype(b_v.dtype))
        plgpu.store(u.at[o_t[:, None], i_hv, o_v[None, :]], b_u.astype(u.dtype), mask=m_tv)


def chunk_states_kernel(
    k, w, u, g_cum, initial_state, cu_seqlens, chunk_offsets, h, v_new, final_state, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int,
    USE_INITIAL_STATE: bool, STORE_FINAL_STATE: bool, IS_VARLEN: bool, DOT_PRECISION,
):
    # One program per (V tile, sequence·value head) walks the sequence's chunks in order with its [BK, BV]
    # float32 slice of S in registers: the V columns of S never mix.
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

    o_i = jnp.arange(BT, dtype=jnp.int32)
    o_k = jnp.arange(BK, dtype=jnp.int32)
    m_k = o_k < K
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

    def dot(a, b):
        return jnp.dot(a, b, precision=DOT_PRECISION, preferred_element_type=jnp.float32)

    def chunk(i_t, b_s):
        o_t = bos + i_t * BT + o_i
        m_t = o_t < eos
        # h[c] = S, the state the chunk starts from
        plgpu.store(h.at[first_chunk + i_t, i_hv, o_k[:, None], o_v[None, :]], b_s.astype(h.dtype), mask=m_kv)
        # v_new = u − w·S: [BT, BK] @ [BK, BV]
        b_w = plgpu.load(w.at[o_t[:, None], i_hv, o_k[None, :]], mask=m_t[:, None] & m_k[None, :], other=0)
        m_tv = m_t[:, None] & m_v[None, :]
        b_u = plgpu.load(u.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)
        b_v = b_u.astype(jnp.float32) - dot(b_w, b_s.astype(b_w.dtype))
        plgpu.store(v_new.at[o_t[:, None], i_hv, o_v[None, :]], b_v.astype(v_new.dtype), mask=m_tv)
        # S = exp(g_last)·S + kᵀ·(exp(g_last − g)·v_new): [BK, BT] @ [BT, BV]
        b_g = plgpu.load(g_cum.at[o_t, i_hv], mask=m_t, other=0)
        b_g_last = g_cum[jnp.minimum(bos + (i_t + 1) * BT, eos) - 1, i_hv]
        b_v = b_v * jnp.where(m_t, jnp.exp(b_g_last - b_g), 0)[:, None]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_t[:, None] & m_k[None, :], other=0)
        return b_s * jnp.exp(b_g_last) + dot(b_k.T, b_v.astype(b_k.dtype))

    b_s = jnp.zeros([BK, BV], dtype=jnp.float32)
    if USE_INITIAL_STATE:
        b_s += plgpu.load(initial_state.at[i_nh, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)
    b_s = jax.lax.fori_loop(0, NT, chunk, b_s)
    if STORE_FINAL_STATE:
        plgpu.store(final_state.at[i_nh, o_k[:, None], o_v[None, :]], b_s, mask=m_kv)


def prepare(problem: contract.ForwardProblem, k, v, g, beta, cu_seqlens, chunk_indices, *, interpret: bool,
            tiling: tilings.Tiling | None = None):
    """Stage 1 for a validated problem: (g_c [B, T, HV] float32, w [B, T, HV, K], u [B, T, HV, V]), w and u
    in k's dtype. cu_seqlens / chunk_indices: int32 arrays when varlen, else None. tiling defaults to
    tilings.prepare_tiling's (benchmarks pass others)."""
    B, T, H, HV, K, V = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V
    shapes = {"g_cum": ((B, T, HV), jnp.float32), "w": ((B, T, HV, K), k.dtype), "u": ((B, T, HV, V), v.dtype)}
    if problem.num_chunks_total * HV == 0:
        return tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes.values())
    tiling = tiling or problem.prepare
    kernel = functools.partial(
        chunk_prepare_kernel, T=T, H=H, HV=HV, K=K, V=V, BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, BS=spec.SUBBLOCK, IS_VARLEN=problem.varlen,
        DOT_PRECISION=input_dot_precision(problem.dtype, interpret),
        # prepare's float32 merge dots: tilings.dot_precision, as in the Triton kernel
        MERGE_PRECISION=float32_dot_precision(interpret, problem.dtype))
    # Every element of a real token is stored by exactly one program (chunks tile each sequence), as with
    # torch.empty in the Triton backend.
    g_cum, w, u = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((B * T,) + shape[2:], dtype) for shape, dtype in shapes.values()),
        grid=(problem.num_chunks_total * HV,),
        interpret=interpret,
        name="chunk_prepare_kernel",
        compiler_params=CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
    )(k.reshape(B * T, H, K), v.reshape(B * T, HV, V), g.reshape(B * T, HV), beta.reshape(B * T, HV),
      index_or_placeholder(cu_seqlens, (2,)), index_or_placeholder(chunk_indices, (1, 2)))
    return g_cum.reshape(B, T, HV), w.reshape(B, T, HV, K), u.reshape(B, T, HV, V)


def states(problem: contract.ForwardProblem, k, w, u, g_cum, initial_state, cu_seqlens, *, interpret: bool,
           tiling: tilings.Tiling | None = None):
    """Stage 2 for a validated problem: (h [B, NT, HV, K, V] in k's dtype, v_new like u, final_state
    [N, HV, K, V] float32 or None). With cu_seqlens (int32), h has the chunk rows of the problem. tiling
    defaults to tilings.state_tiling's (benchmarks pass others)."""
    B, T, H, HV, K, V, N = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V, problem.N
    rows = problem.num_chunks_total
    if B * T == 0 or N * HV == 0:  # no tokens: the final state is the initial one (zero-size refs cannot be read)
        final = None
        if problem.output_final_state:
            final = jnp.zeros((N, HV, K, V), jnp.float32) if initial_state is None else initial_state
        return jnp.zeros((B, problem.chunks_per_row, HV, K, V), k.dtype), jnp.zeros(u.shape, u.dtype), final
    chunk_offsets = None
    if problem.varlen:  # first h row of each sequence
        counts = (cu_seqlens[1:] - cu_seqlens[:-1] + spec.CHUNK_SIZE - 1) // spec.CHUNK_SIZE
        chunk_offsets = jnp.cumsum(counts) - counts
    tiling = tiling or problem.state
    kernel = functools.partial(
        chunk_states_kernel, T=T, H=H, HV=HV, K=K, V=V, BT=spec.CHUNK_SIZE, BK=tiling.block_k,
        BV=tiling.block_v, USE_INITIAL_STATE=problem.use_initial_state,
        STORE_FINAL_STATE=problem.output_final_state, IS_VARLEN=problem.varlen,
        DOT_PRECISION=input_dot_precision(problem.dtype, interpret))
    initial = (jnp.zeros((1, 1, 1), jnp.float32) if initial_state is None
               else initial_state.reshape(N * HV, K, V))
    h, v_new, final_state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((max(rows, 1), HV, K, V), k.dtype),
                   jax.ShapeDtypeStruct((B * T, HV, V), u.dtype),
                   jax.ShapeDtypeStruct((N * HV, K, V) if problem.output_final_state else (1, 1, 1), jnp.float32)),
        grid=problem.state_grid(tiling),
        interpret=interpret,
        name="chunk_states_kernel",
        compiler_params=CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
    )(k.reshape(B * T, H, K), w.reshape(B * T, HV, K), u.reshape(B * T, HV, V), g_cum.reshape(B * T, HV),
      initial, index_or_placeholder(cu_seqlens, (2,)), index_or_placeholder(chunk_offsets, (1,)))
    final_state = final_state.reshape(N, HV, K, V) if problem.output_final_state else None
    return h[:rows].reshape(B, problem.chunks_per_row, HV, K, V), v_new.reshape(B, T, HV, V), final_state


@functools.partial(jax.jit, static_argnames=("problem", "interpret"))
def jitted_forward(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, *,
                   problem: contract.ForwardProblem, interpret: bool):
    """The three stages for a validated problem (cu_seqlens / chunk_indices int32 when varlen, else None)."""
    g_cum, w, u = prepare(problem, k, v, g, beta, cu_seqlens, chunk_indices, interpret=interpret)
    h, v_new, final_state = states(problem, k, w, u, g_cum, initial_state, cu_seqlens, interpret=interpret)
    o = launch_chunk_o(q, k, v_new, h, g_cum, scale, cu_seqlens, chunk_indices, problem=problem.chunk_o(),
                       interpret=interpret)
    return o, final_state


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | np.ndarray | None = None,
    chunk_indices: jax.Array | np.ndarray | None = None,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The chunked Gated DeltaNet forward (prefill): (o [B, T, HV, V] in v's dtype, final_state or None).

    q, k [B, T, H, K] (k L2-normalized by the model, as for FLA); v [B, T, HV, V]; g [B, T, HV] float32
    per-token log-gate (≤ 0, natural-log units, not cumulative); beta [B, T, HV] float32 or q's dtype;
    initial_state [N, HV, K, V] float32 (zeros when None); final_state [N, HV, K, V] float32 when
    output_final_state. scale (a Python float or a traced scalar) defaults to K**-0.5. Varlen: B = 1,
    cu_seqlens [N + 1] and chunk_indices as for gdn.pallas.chunk_fwd_o (under jax.jit chunk_indices must be
    passed). Every array argument may be traced. interpret=None runs the Pallas interpreter unless the
    default backend is a GPU.
    """
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state,
            "cu_seqlens": cu_seqlens, "chunk_indices": chunk_indices}
    device = call_device(*args.values())
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices, op=spec.FORWARD_OP)
    problem = contract.validate_forward_inputs(
        *(array_info(name, x, device, op=spec.FORWARD_OP) for name, x in args.items()),
        cu_seqlens_values=cu_values, output_final_state=output_final_state)
    check_token_rows(problem.B, problem.T, op=spec.FORWARD_OP)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = spec.prepare_chunk_indices(cu_values)
    if scale is None:
        scale = spec.default_scale(problem.K)
    return jitted_forward(q, k, v, g, beta, scale, initial_state, as_index(cu_seqlens),
                          as_index(chunk_indices), problem=problem, interpret=resolve_interpret(interpret))


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
) -> None:
    """Compile the programs that later chunk_gated_delta_rule calls with these dtypes, sizes and flags need:
    one per T in ``lengths`` (B = 1; varlen: one sequence of T tokens), as gdn.pallas.warmup does for
    chunk_fwd_o. Pad real inputs to those lengths with gdn.pallas.pad_forward_to_bucket. Warms calls made
    outside a caller's own jax.jit."""
    for T in lengths:
        call = spec.warmup_arguments(T, H, HV, K, V, True, varlen)
        q = jnp.zeros(call["q"], dtype)
        state = jnp.zeros(call["state"], jnp.float32) if initial_state else None
        o, _ = chunk_gated_delta_rule(
            q, q, jnp.zeros(call["v"], dtype), jnp.zeros(call["g"], jnp.float32), jnp.zeros(call["beta"], beta_dtype),
            initial_state=state, output_final_state=output_final_state, cu_seqlens=call["cu_seqlens"],
            chunk_indices=call["chunk_indices"], interpret=interpret)
        o.block_until_ready()
