"""decode_step for JAX: one Pallas kernel (Triton lowering on GPU), the same algorithm as gdn.triton.decode.

Glossary (FLA's naming, as in the Triton kernel): i_ program ids, o_ offsets, m_ masks, b_ register tiles; BK
the whole K (masked to a power of two), BV the V tile width. S is the [K, V] state of one sequence and value
head. Math and layouts: gdn.common.spec (decode_step); tiling: gdn.common.tilings.decode_tiling.

The refs are whole arrays, viewed with (sequence, value head) flattened: v, o [N·HV, V]; g, beta [N·HV];
state, new_state [N·HV, K, V]; q, k stay [N, H, K]. Tiles are read with masked ``plgpu.load(ref.at[...])`` as
in gdn.pallas.chunk_o. The products with S are matrix-vector products, written as an elementwise product and
a sum over K, as in the Triton kernel (a dot would waste a tensor-core tile on one row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gdn.common import contract, spec
from gdn.pallas.arrays import array_info, compiler_params, resolve_interpret


def decode_step_kernel(
    q, k, v, g, beta, state, scale, o, new_state, *,
    H: int, HV: int, K: int, V: int, BK: int, BV: int,
):
    # The Triton kernel's arguments, outputs last (Pallas passes outputs after inputs); scale is a [1] ref, a
    # runtime value like Triton's scalar argument, so a new scale compiles nothing.
    # One program per (sequence·value head, V tile): the V columns of S never mix, so each program updates its
    # [BK, BV] slice of S alone.
    i_nh = pl.program_id(0)  # row of v, g, beta, o and the state
    i_v = pl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)  # the q/k head this value head reads

    o_k = jnp.arange(BK, dtype=jnp.int32)
    m_k = o_k < K
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    scale = scale[0]

    b_s = plgpu.load(state.at[i_nh, o_k[:, None], o_v[None, :]], mask=m_kv, other=0)  # [BK, BV] float32
    b_q = plgpu.load(q.at[i_n, i_h, o_k], mask=m_k, other=0).astype(jnp.float32)  # [BK]
    b_k = plgpu.load(k.at[i_n, i_h, o_k], mask=m_k, other=0).astype(jnp.float32)  # [BK]
    b_v = plgpu.load(v.at[i_nh, o_v], mask=m_v, other=0).astype(jnp.float32)  # [BV]
    b_g = g[i_nh]
    b_beta = beta[i_nh]

    # S ← exp(g)·S
    b_s = b_s * jnp.exp(b_g)
    # u = beta·(v − Sᵀk): [BK, BV] * [BK, 1] summed over K -> [BV]
    b_u = b_beta * (b_v - jnp.sum(b_s * b_k[:, None], axis=0))
    # S ← S + k ⊗ u: [BK, 1] * [1, BV] -> [BK, BV]
    b_s = b_s + b_k[:, None] * b_u[None, :]
    # o = Sᵀ(scale·q): [BK, BV] * [BK, 1] summed over K -> [BV]
    b_o = jnp.sum(b_s * (b_q * scale)[:, None], axis=0)

    plgpu.store(o.at[i_nh, o_v], b_o.astype(o.dtype), mask=m_v)
    plgpu.store(new_state.at[i_nh, o_k[:, None], o_v[None, :]], b_s, mask=m_kv)


@functools.partial(jax.jit, static_argnames=("problem", "interpret"))
def launch(q, k, v, g, beta, state, scale, *, problem: contract.DecodeProblem, interpret: bool):
    N, HV, K, V = problem.N, problem.HV, problem.K, problem.V
    tiling = problem.tiling
    kernel = functools.partial(decode_step_kernel, H=problem.H, HV=HV, K=K, V=V,
                               BK=tiling.block_k, BV=tiling.block_v)
    # Every element of o and new_state is stored by exactly one program (the grid covers N·HV rows and V
    # tiles cover V), so the outputs need no initialization, like torch.empty_like in the Triton backend.
    o, new_state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((N * HV, V), v.dtype), jax.ShapeDtypeStruct((N * HV, K, V), jnp.float32)),
        grid=problem.grid(),
        interpret=interpret,
        name="decode_step_kernel",
        compiler_params=compiler_params(tiling),
    )(q, k, v.reshape(N * HV, V), g.reshape(N * HV), beta.reshape(N * HV), state.reshape(N * HV, K, V),
      jnp.asarray(scale, jnp.float32).reshape(1))
    return o.reshape(N, HV, V), new_state.reshape(N, HV, K, V)


@functools.partial(jax.jit, static_argnames=("interpret",))
def decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    scale: float | jax.Array | None = None,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding token of Gated DeltaNet for N sequences: (o [N, HV, V] in v's dtype, new_state).

    q, k [N, H, K]; v [N, HV, V]; g [N, HV] float32 per-token log-gate (not cumulative); beta [N, HV]
    float32; state [N, HV, K, V] float32, S before the token. new_state is S after it, a new float32 array;
    scale (a Python float or a traced scalar) defaults to K**-0.5. Every array argument may be traced.
    interpret=None runs the Pallas interpreter unless the default backend is a GPU. Jitted (the contract is
    checked when a shape is traced): a call outside jax.jit costs one jit dispatch.
    """
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "state": state}
    problem = contract.validate_decode_inputs(*(array_info(name, x, op=spec.DECODE_OP) for name, x in args.items()))
    if problem.N == 0:
        return jnp.zeros(v.shape, v.dtype), jnp.zeros(state.shape, jnp.float32)
    if scale is None:
        scale = spec.default_scale(problem.K)
    return launch(q, k, v, g, beta, state, scale, problem=problem, interpret=resolve_interpret(interpret))
