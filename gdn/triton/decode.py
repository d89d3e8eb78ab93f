"""decode_step for PyTorch: one token of the gated delta rule per sequence, one Triton kernel.

Glossary (FLA's naming): i_ program ids, o_ offsets, m_ masks, p_ pointer offsets, b_ register tiles; BK the
whole K (masked to a power of two), BV the V tile width. S is the [K, V] state of one sequence and value head.
Math and layouts: gdn.common.spec (decode_step); tiling: gdn.common.tilings.decode_tiling.

The products with S are matrix-vector products, written as an elementwise product and a sum over K (no tl.dot):
they would waste a tensor-core tile on one row, and the Triton 3.9 interpreter's tl.dot is wrong for bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn.common import contract, spec, tilings
from gdn.triton.arrays import planned, tensor_keys
from gdn.triton.launcher import KernelLaunch, cached_plan


@triton.jit
def decode_step_kernel(
    q, k, v, g, beta, state, o, new_state, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # One program per (sequence·value head, V tile): the V columns of S never mix, so each program updates its
    # [BK, BV] slice of S alone.
    i_nh = tl.program_id(0).to(tl.int64)  # row of v, g, beta, o and the state: N·HV·K·V may pass 2**31
    i_v = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)  # the q/k head this value head reads

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = (i_nh * K + o_k[:, None]) * V + o_v[None, :]  # [BK, BV] offsets into state and new_state

    b_s = tl.load(state + p_s, mask=m_kv, other=0)  # [BK, BV] float32
    b_q = tl.load(q + (i_n * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
    b_k = tl.load(k + (i_n * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
    b_v = tl.load(v + i_nh * V + o_v, mask=m_v, other=0).to(tl.float32)  # [BV]
    b_g = tl.load(g + i_nh)
    b_beta = tl.load(beta + i_nh)

    # S ← exp(g)·S
    b_s = b_s * tl.exp(b_g)
    # u = beta·(v − Sᵀk): [BK, BV] * [BK, 1] summed over K -> [BV]
    b_u = b_beta * (b_v - tl.sum(b_s * b_k[:, None], axis=0))
    # S ← S + k ⊗ u: [BK, 1] * [1, BV] -> [BK, BV]
    b_s = b_s + b_k[:, None] * b_u[None, :]
    # o = Sᵀ(scale·q): [BK, BV] * [BK, 1] summed over K -> [BV]
    b_o = tl.sum(b_s * (b_q * scale)[:, None], axis=0)

    tl.store(o + i_nh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(new_state + p_s, b_s, mask=m_kv)


ARG_NAMES = ("q", "k", "v", "g", "beta", "state")


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding token of Gated DeltaNet for N sequences: (o [N, HV, V] in v's dtype, new_state).

    q, k [N, H, K]; v [N, HV, V]; g [N, HV] float32 per-token log-gate (not cumulative); beta [N, HV]
    float32; state [N, HV, K, V] float32, S before the token. new_state is S after it, a new float32 tensor
    (state is not modified); scale defaults to K**-0.5.
    """
    problem, run = call_plan(q, k, v, g, beta, state)
    o = torch.empty_like(v)
    new_state = torch.empty_like(state)
    if run is not None:
        scale = spec.default_scale(problem.K) if scale is None else float(scale)
        run(q, k, v, g, beta, state, o, new_state, scale)
    return o, new_state


def call_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor) -> tuple[contract.DecodeProblem, KernelLaunch | None]:
    """(problem, launch) of a decode_step call: the contract check and plan() of its call signature, cached."""
    keys = tensor_keys(ARG_NAMES, (q, k, v, g, beta, state), op=spec.DECODE_OP)
    return planned(contract.validate_decode_inputs, plan, keys)


def plan(problem: contract.DecodeProblem) -> KernelLaunch | None:
    """decode_step's plan for a validated problem: its launch with the problem's tiling
    (tilings.decode_tiling), None when N = 0; fixed signature (gdn.triton.launcher.KernelLaunch)."""
    return kernel_launch(problem, problem.tiling, fixed_signature=True)


def kernel_launch(problem: contract.DecodeProblem, tiling: tilings.Tiling,
                  fixed_signature: bool = False) -> KernelLaunch | None:
    """The kernel launch of a validated problem with a tiling, None when N = 0."""
    if problem.N == 0:
        return None
    return KernelLaunch(decode_step_kernel, problem.grid(tiling), tiling, fixed_signature=fixed_signature,
                        H=problem.H, HV=problem.HV, K=problem.K, V=problem.V, BK=tiling.block_k, BV=tiling.block_v)


@cached_plan
def shared_launch(problem: contract.DecodeProblem, tiling: tilings.Tiling) -> KernelLaunch | None:
    """kernel_launch cached per (problem, tiling), each launch matched in full (callers pass any arguments)."""
    return kernel_launch(problem, tiling)


def launch(problem: contract.DecodeProblem, tiling: tilings.Tiling, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor, o: torch.Tensor, new_state: torch.Tensor,
           scale: float) -> None:
    """Launch the kernel for a validated problem with the given tiling, writing o and new_state: the tiling
    sweep of benchmarks/decode.py."""
    run = shared_launch(problem, tiling)
    if run is not None:
        run(q, k, v, g, beta, state, o, new_state, scale)
