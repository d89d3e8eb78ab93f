"""chunk_gated_delta_rule with gradients for PyTorch: the public entry of gdn.triton.

Three paths, chosen per call: the forward alone (gdn.triton.forward, no autograd bookkeeping, every serving
argument in the kernels) when no gradient is wanted; a torch.autograd.Function when grad is enabled and an input
requires grad; the torch.library custom ops of gdn.triton.custom_ops under torch.compile
(gdn::chunk_gated_delta_rule with its registered autograd, gdn::chunk_gated_delta_rule_serving for a call with
serving arguments and no gradient), so fullgraph=True traces a layer that calls it. The backward saves the inputs
only and recomputes the rest (gdn.triton.backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gdn.common import checks, spec
from gdn.triton import custom_ops, forward
from gdn.triton.arrays import array_info, strided_keys

_SERVING_NAMES = ("q", "k", "v", "g", "beta", "a", "b", "A_log", "dt_bias")


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
    """gdn.triton.forward.chunk_gated_delta_rule (arguments, layouts and results there), differentiable in q, k,
    v, g, beta and initial_state, and in the raw gates a, b, A_log, dt_bias when given; the final state's gradient
    flows in when output_final_state. With group (context parallel) the forward alone, which refuses inputs that
    require grad; a state pool (state_indices), updated in place, is refused when a gradient is wanted.

    When a gradient is wanted, use_qk_l2norm_in_kernel and the raw gates are applied by differentiable torch ops
    before the kernels (differentiable_inputs), not inside them: the forward then reads normalized copies of q
    and k (one more read and write of each, kept for the backward) and g, beta [B, T, HV] float32 formed from
    a, b; autograd carries the gradients of those copies back to the raw inputs.
    """
    wanted = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad
        for x in (q, k, v, g, beta, initial_state, a, b, A_log, dt_bias))
    compiling = torch.compiler.is_compiling()
    serving = state_indices is not None or use_qk_l2norm_in_kernel or a is not None
    if group is not None or not (wanted or compiling):
        return forward.chunk_gated_delta_rule(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, group,
            state_indices=state_indices, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, a=a, b=b, A_log=A_log,
            dt_bias=dt_bias, softplus_beta=softplus_beta, softplus_threshold=softplus_threshold)
    if serving and not wanted:  # compiling: the kernels apply every serving argument, the pool in place
        scale = spec.default_scale(q.shape[-1]) if scale is None else float(scale)
        o, final_state = custom_ops.chunk_gated_delta_rule_serving_op(
            q, k, v, g, beta, scale, initial_state, bool(output_final_state), cu_seqlens, chunk_indices,
            state_indices, bool(use_qk_l2norm_in_kernel), a, b, A_log, dt_bias, float(softplus_beta),
            float(softplus_threshold))
        if not output_final_state:
            return o, None
        return o, initial_state if state_indices is not None else final_state
    if serving:
        check_serving_inputs(q, k, v, g, beta, state_indices, a, b, A_log, dt_bias)
        q, k, g, beta = differentiable_inputs(q, k, g, beta, use_qk_l2norm_in_kernel, a, b, A_log, dt_bias,
                                              softplus_beta, softplus_threshold)
    # the backward reads its saved inputs dense: other layouts copied once here, as the forward would copy them
    q, k, v, g, beta = (x.contiguous() if isinstance(x, torch.Tensor) else x for x in (q, k, v, g, beta))
    if compiling:
        scale = spec.default_scale(q.shape[-1]) if scale is None else float(scale)
        o, final_state = custom_ops.chunk_gated_delta_rule_op(q, k, v, g, beta, scale, initial_state,
                                                              bool(output_final_state), cu_seqlens, chunk_indices)
        return o, final_state if output_final_state else None
    return ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                     chunk_indices)


def check_serving_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                         beta: torch.Tensor | None, state_indices: torch.Tensor | None, a: torch.Tensor | None,
                         b: torch.Tensor | None, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None) -> None:
    """The forward's checks that differentiable_inputs needs before its torch ops (the forward's contract checks
    everything after them): no state pool, q, k, v as token arrays, the gates (g, beta or the raw a, b, A_log,
    dt_bias). Reads no device value, so torch.compile traces it."""
    op = spec.FORWARD_OP
    if state_indices is not None:
        checks.fail("state_indices", "None when a gradient is wanted (a state pool is updated in place, which has "
                    "no gradient)", "a tensor", op=op)
    keys = strided_keys(_SERVING_NAMES, (q, k, v, g, beta, a, b, A_log, dt_bias), op)
    q_, k_, v_, g_, beta_, a_, b_, A_log_, dt_bias_ = (None if key is None else array_info(key) for key in keys)
    B, T, _, _, HV, _ = checks.token_arrays(q_, k_, v_, op=op)
    checks.gates(q_, (B, T), "[B, T, HV]", HV, g_, beta_, a_, b_, A_log_, dt_bias_, op=op)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σ x² + QK_L2NORM_EPS) over the last axis in float32, back in x's dtype (use_qk_l2norm_in_kernel,
    as the kernels normalize)."""
    x32 = x.float()
    return (x32 * torch.rsqrt((x32 * x32).sum(-1, keepdim=True) + spec.QK_L2NORM_EPS)).to(x.dtype)


def differentiable_inputs(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool, a: torch.Tensor | None, b: torch.Tensor | None, A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None, softplus_beta: float, softplus_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, g, beta) as the kernels take them without serving flags, by differentiable torch ops: q and k
    L2-normalized when use_qk_l2norm_in_kernel; with the raw gates, g = −exp(A_log)·softplus(a + dt_bias)
    (softplus β and threshold as torch's) and beta = sigmoid(b), [B, T, HV] float32."""
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    if a is not None:
        rate = F.softplus(a.float() + dt_bias.float(), beta=softplus_beta, threshold=softplus_threshold)
        g = -torch.exp(A_log.float()) * rate
        beta = torch.sigmoid(b.float())
    return q, k, g, beta


class ChunkGatedDeltaRule(torch.autograd.Function):
    """The eager autograd path: saves the inputs."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices):
        o, final_state = forward.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                        cu_seqlens, chunk_indices)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, final_state

    @staticmethod
    def backward(ctx, do, final_state_gradient):
        dq, dk, dv, dg, dbeta, dh0 = custom_ops.input_gradients(ctx.saved_tensors, ctx.scale, do,
                                                                final_state_gradient)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None
