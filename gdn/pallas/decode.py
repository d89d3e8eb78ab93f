"""decode_step for JAX: one Pallas kernel (Triton lowering on GPU), the same algorithm as gdn.triton.decode.

Glossary (FLA's naming, as in the Triton kernel): i_ program ids, o_ offsets, m_ masks, b_ register tiles; BK
the whole K (masked to a power of two), BV the V tile width. S is the [K, V] state of one sequence and value
head. Math, layouts and the serving arguments: gdn.common.spec (decode_step); tiling:
gdn.common.tilings.decode_tiling.

The refs are whole arrays, viewed with the head axis flattened into the rows: v, o [T·HV, V]; g, beta (or a, b)
[T·HV]; state, new_state [rows·HV, K, V]; state_indices [N·S]; q, k stay [T, H, K]. Tiles are read with masked
``plgpu.load(ref.at[...])`` as in gdn.pallas.chunk_o. The products with S are matrix-vector products, written
as an elementwise product and a sum over K, as in the Triton kernel. A pool is aliased to the updated pool
(input_output_aliases): under jax.jit with the pool donated, it is updated in place, without a copy; called
outside a jit, decode_step donates it itself (jitted_decode_step_pool).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gdn.common import contract, spec
from gdn.pallas.arrays import (
    array_info,
    as_index,
    compiler_params,
    host_values,
    index_or_placeholder,
    no_backward,
    resolve_interpret,
)

MAX_STATE_ELEMENTS = 2**31 - 1
"""Elements of the state (a pool: all its rows) the kernel addresses with the Pallas Triton lowering's int32
offsets."""

ARG_NAMES = ("q", "k", "v", "g", "beta", "state", "state_indices", "cu_seqlens", "num_accepted_tokens", "a", "b",
             "A_log", "dt_bias")


def decode_step_kernel(
    q, k, v, g, beta, A_log, dt_bias, state, state_indices, cu_seqlens, num_accepted_tokens, params, o_zeros,
    o, new_state, *,
    T: int, P: int, H: int, HV: int, K: int, V: int, BK: int, BV: int, S: int, IS_VARLEN: bool,
    USE_INDICES: bool, TOKEN_STATES: bool, USE_ACCEPTED: bool, QK_L2NORM: bool, RAW_GATES: bool,
):
    # The Triton kernel's arguments, outputs last (Pallas passes outputs after inputs; o_zeros is aliased to o,
    # new_state to state for a pool). params = (scale, softplus β, softplus threshold), runtime values like
    # Triton's scalar arguments. Under RAW_GATES g and beta hold the raw gates a and b.
    # One program per (sequence·value head, V tile): the V columns of S never mix, so each program carries its
    # [BK, BV] slice of S alone across the sequence's tokens.
    del o_zeros
    i_nh = pl.program_id(0)
    i_v = pl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)  # the q/k head this value head reads
    scale, softplus_beta, softplus_threshold = params[0], params[1], params[2]

    # the sequence's token rows [bos, eos), clamped into [0, T]; with per-token slots, at most S tokens
    if IS_VARLEN:
        bos = jnp.minimum(jnp.maximum(cu_seqlens[i_n], 0), T)
        eos = jnp.minimum(jnp.maximum(cu_seqlens[i_n + 1], bos), T)
    else:
        bos = i_n
        eos = i_n + 1
    if TOKEN_STATES:
        eos = jnp.minimum(eos, bos + S)

    # the state row read: the sequence's own, or a pool row (state_indices[n, num_accepted_tokens[n] − 1]);
    # an index out of range skips the sequence (m_seq false: o rows zero, nothing read or written)
    if USE_INDICES:
        i_col = num_accepted_tokens[i_n] - 1 if USE_ACCEPTED else 0
        m_col = (i_col >= 0) & (i_col < S)
        # (clipped into range and masks from integer products, never a jnp.where of two literals, which the
        # Triton lowering of jax 0.11 types as bool; a clipped row is read and written under m_seq's mask only)
        i_row = state_indices[i_n * S + jnp.clip(i_col, 0, S - 1)]
        m_seq = m_col & (i_row >= 0) & (i_row < P)
        i_row = jnp.clip(i_row, 0, P - 1)
    else:
        i_row = i_n
        m_seq = True

    o_k = jnp.arange(BK, dtype=jnp.int32)
    m_k = o_k < K
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_v = o_v < V
    m_kv = (o_k < K * jnp.asarray(m_seq, jnp.int32))[:, None] & m_v[None, :]  # the state tile; empty: skipped

    b_s = plgpu.load(state.at[i_row * HV + i_hv, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)  # [BK, BV]
    if RAW_GATES:
        b_decay_rate = -jnp.exp(A_log[i_hv].astype(jnp.float32))  # −exp(A_log)
        b_dt_bias = dt_bias[i_hv].astype(jnp.float32)

    def token(i_t, b_s):
        b_q = plgpu.load(q.at[i_t, i_h, o_k], mask=m_k, other=0).astype(jnp.float32)  # [BK]
        b_k = plgpu.load(k.at[i_t, i_h, o_k], mask=m_k, other=0).astype(jnp.float32)  # [BK]
        b_v = plgpu.load(v.at[i_t * HV + i_hv, o_v], mask=m_v, other=0).astype(jnp.float32)  # [BV]
        b_g = g[i_t * HV + i_hv].astype(jnp.float32)
        b_beta = beta[i_t * HV + i_hv].astype(jnp.float32)
        if RAW_GATES:
            # g = −exp(A_log)·softplus(a + dt_bias), softplus(x) = log(1 + exp(β·x))/β up to the threshold
            b_x = b_g + b_dt_bias
            b_bx = softplus_beta * b_x
            b_g = b_decay_rate * jnp.where(b_bx <= softplus_threshold, jnp.log(1 + jnp.exp(b_bx)) / softplus_beta,
                                           b_x)
            # beta = sigmoid(b)
            b_beta = 1 / (1 + jnp.exp(-b_beta))
        if QK_L2NORM:
            b_q = b_q / jnp.sqrt(jnp.sum(b_q * b_q) + spec.QK_L2NORM_EPS)
            b_k = b_k / jnp.sqrt(jnp.sum(b_k * b_k) + spec.QK_L2NORM_EPS)

        # S ← exp(g)·S
        b_s = b_s * jnp.exp(b_g)
        # u = beta·(v − Sᵀk): [BK, BV] * [BK, 1] summed over K -> [BV]
        b_u = b_beta * (b_v - jnp.sum(b_s * b_k[:, None], axis=0))
        # S ← S + k ⊗ u: [BK, 1] * [1, BV] -> [BK, BV]
        b_s = b_s + b_k[:, None] * b_u[None, :]
        # o = Sᵀ(scale·q): [BK, BV] * [BK, 1] summed over K -> [BV]
        b_o = jnp.sum(b_s * (b_q * scale)[:, None], axis=0)
        plgpu.store(o.at[i_t * HV + i_hv, o_v], jnp.where(m_seq, b_o, 0).astype(o.dtype), mask=m_v)
        if TOKEN_STATES:
            # the state after this token goes to its slot state_indices[n, t − bos] (none when out of range)
            i_slot = state_indices[i_n * S + (i_t - bos)]
            m_slot = m_seq & (i_slot >= 0) & (i_slot < P)
            m_skv = (o_k < K * m_slot.astype(jnp.int32))[:, None] & m_v[None, :]
            plgpu.store(new_state.at[jnp.where(m_slot, i_slot, 0) * HV + i_hv, o_k[:, None], o_v[None, :]], b_s,
                        mask=m_skv)
        return b_s

    b_s = jax.lax.fori_loop(bos, eos, token, b_s)
    if not TOKEN_STATES:
        plgpu.store(new_state.at[i_row * HV + i_hv, o_k[:, None], o_v[None, :]], b_s, mask=m_kv)


def launch(q, k, v, g, beta, A_log, dt_bias, state, state_indices, cu_seqlens, num_accepted_tokens, params, *,
           problem: contract.DecodeProblem, interpret: bool):
    """o and the states after for a validated problem with programs to run (g, beta: the raw a, b under raw
    gates; index arrays int32 or None; params = (scale, softplus β, softplus threshold)); traced inside
    jitted_decode_step."""
    q, k, v, g, beta, A_log, dt_bias, state, params = no_backward(spec.DECODE_OP, (q, k, v, g, beta, A_log, dt_bias,
                                                                                  state, params))
    N, T, HV, K, V = problem.N, problem.T, problem.HV, problem.K, problem.V
    rows = state.shape[0]
    S = max(problem.index_columns, 1)
    tiling = problem.tiling
    kernel = functools.partial(
        decode_step_kernel, T=T, P=rows, H=problem.H, HV=HV, K=K, V=V, BK=tiling.block_k, BV=tiling.block_v, S=S,
        IS_VARLEN=problem.varlen, USE_INDICES=problem.pool, TOKEN_STATES=problem.token_states,
        USE_ACCEPTED=problem.accepted, QK_L2NORM=problem.qk_l2norm, RAW_GATES=problem.raw_gates)
    # o starts as zeros (rows of skipped sequences and of no sequence stay zero); the pool is updated in place
    aliases = {12: 0, 7: 1} if problem.pool else {12: 0}
    o, new_state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((T * HV, V), v.dtype), jax.ShapeDtypeStruct((rows * HV, K, V), jnp.float32)),
        grid=problem.grid(),
        input_output_aliases=aliases,
        interpret=interpret,
        name="decode_step_kernel",
        compiler_params=compiler_params(tiling),
    )(q, k, v.reshape(T * HV, V), g.reshape(T * HV), beta.reshape(T * HV),
      jnp.zeros((1,), jnp.float32) if A_log is None else A_log, jnp.zeros((1,), jnp.float32) if dt_bias is None
      else dt_bias, state.reshape(rows * HV, K, V), index_or_placeholder(state_indices, (N * S,)).reshape(-1),
      index_or_placeholder(cu_seqlens, (2,)), index_or_placeholder(num_accepted_tokens, (1,)), params,
      jnp.zeros((T * HV, V), v.dtype))
    return o.reshape(T, HV, V), new_state.reshape(rows, HV, K, V)


def decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    beta: jax.Array | None,
    state: jax.Array,
    scale: float | jax.Array | None = None,
    *,
    state_indices: jax.Array | None = None,
    cu_seqlens: jax.Array | None = None,
    num_accepted_tokens: jax.Array | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    A_log: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    softplus_beta: float | jax.Array = spec.SOFTPLUS_BETA,
    softplus_threshold: float | jax.Array = spec.SOFTPLUS_THRESHOLD,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decoding tokens of Gated DeltaNet for N sequences: (o [T, HV, V] in v's dtype, the states after).

    q, k [T, H, K]; v [T, HV, V]; g [T, HV] float32 per-token log-gate (not cumulative); beta [T, HV] float32
    or q's dtype: one token per sequence (T = N), or with cu_seqlens [N + 1] a few per sequence, packed. state
    [N, HV, K, V] float32, each sequence's S before its first token: returns S after its last as a new array.
    With state_indices, state is a pool [P, HV, K, V] and the updated pool is returned, aliased to the input:
    under jax.jit with the pool donated (donate_argnums) it is updated without a copy; outside a jit this call
    donates it (the array passed in is consumed: use the returned one). [N] indices read and write back row
    state_indices[n]; [N, S] keep the state after each token in its slot, the sequence continuing from slot
    num_accepted_tokens[n] − 1 (speculative decoding); a negative index is a padded slot, skipped (o rows
    zero). use_qk_l2norm_in_kernel normalizes raw q, k; a, b with A_log, dt_bias replace g, beta (raw gates).
    scale (a Python float or a traced scalar) defaults to K**-0.5. Meaning of every argument and the index
    rules: gdn.common.spec (decode_step).

    Every array may be traced; use_qk_l2norm_in_kernel is static. Index arrays on the host (numpy, or jax
    arrays on the CPU) are checked before the jitted body runs; device and traced ones are bounds-masked in the
    kernel. No backward: jax.grad raises. interpret=None runs the Pallas interpreter unless the default backend
    is a GPU. Jitted internally (jitted_decode_step, jitted_decode_step_pool; the contract is checked when a
    shape is traced): a call outside jax.jit costs one jit dispatch.
    """
    arrays = (q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias)
    indices = tuple(None if x is None else host_values(x) for x in (state_indices, cu_seqlens, num_accepted_tokens))
    if any(x is not None for x in indices):  # index values at hand: checked before anything runs
        contract.validate_decode_index_values(checked_problem(*arrays, use_qk_l2norm_in_kernel), *indices)
    body = jitted_decode_step if state_indices is None else jitted_decode_step_pool
    return body(*arrays, scale, softplus_beta, softplus_threshold, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                interpret=interpret)


def _decode_step_body(q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias,
                      scale, softplus_beta, softplus_threshold, *, use_qk_l2norm_in_kernel: bool,
                      interpret: bool | None):
    """decode_step's body: the contract check at trace time (on shapes and dtypes), then the kernel."""
    problem = checked_problem(q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log,
                              dt_bias, use_qk_l2norm_in_kernel)
    if problem.N * problem.HV == 0:
        return jnp.zeros(v.shape, v.dtype), jnp.asarray(state, jnp.float32)
    if scale is None:
        scale = spec.default_scale(problem.K)
    params = jnp.stack([jnp.asarray(x, jnp.float32) for x in (scale, softplus_beta, softplus_threshold)])
    gate, strength = (a, b) if problem.raw_gates else (g, beta)
    return launch(q, k, v, gate, strength, A_log, dt_bias, state, as_index(state_indices), as_index(cu_seqlens),
                  as_index(num_accepted_tokens), params, problem=problem, interpret=resolve_interpret(interpret))


_STATIC = ("use_qk_l2norm_in_kernel", "interpret")
jitted_decode_step = jax.jit(_decode_step_body, static_argnames=_STATIC)
"""decode_step's jitted body with a dense state (not modified)."""

jitted_decode_step_pool = jax.jit(_decode_step_body, static_argnames=_STATIC, donate_argnames=("state",))
"""decode_step's jitted body with a pool, donated: outside a caller's jit the pool is updated in place (a jit of
the caller's governs donation within it)."""


def checked_problem(q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias,
                    use_qk_l2norm_in_kernel: bool) -> contract.DecodeProblem:
    """decode_step's contract check on shapes and dtypes: the validated problem."""
    arrays = (q, k, v, g, beta, state, state_indices, cu_seqlens, num_accepted_tokens, a, b, A_log, dt_bias)
    problem = contract.validate_decode_inputs(*(array_info(name, x, op=spec.DECODE_OP)
                                                for name, x in zip(ARG_NAMES, arrays)),
                                              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    if state.size > MAX_STATE_ELEMENTS:
        raise ValueError(f"{spec.DECODE_OP}: state: expected at most {MAX_STATE_ELEMENTS} elements (the Pallas "
                         f"kernel's int32 offsets); got {state.size} in shape {tuple(state.shape)}")
    return problem
