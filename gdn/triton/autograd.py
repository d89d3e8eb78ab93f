"""chunk_gated_delta_rule with gradients for PyTorch: the public entry of gdn.triton.

Three paths, chosen per call: the forward alone (gdn.triton.forward, no autograd bookkeeping) when no gradient
is wanted; a torch.autograd.Function when grad is enabled and an input requires grad; the torch.library custom
ops gdn::chunk_gated_delta_rule / gdn::chunk_gated_delta_rule_backward (fake implementations, autograd
registered) under torch.compile, so fullgraph=True traces a layer that calls it. The backward saves the inputs
only and recomputes the rest (gdn.triton.backward).
"""

from __future__ import annotations

import torch

from gdn.common import spec
from gdn.triton import backward, forward


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
    group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gdn.triton.forward.chunk_gated_delta_rule (arguments, layouts and results there), differentiable in q, k,
    v, g, beta and initial_state; the final state's gradient flows in when output_final_state. With group
    (context parallel) the forward alone, which refuses inputs that require grad."""
    if group is not None:
        return forward.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                              chunk_indices, group)
    if torch.compiler.is_compiling():
        scale = spec.default_scale(q.shape[-1]) if scale is None else float(scale)
        o, final_state = torch.ops.gdn.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
                                                              output_final_state, cu_seqlens, chunk_indices)
        return o, final_state if output_final_state else None
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in (q, k, v, g, beta, initial_state)):
        return ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                         chunk_indices)
    return forward.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                          chunk_indices)


def _no_tensor(like: torch.Tensor) -> torch.Tensor:
    """A new empty float32 tensor on like's device: "no final state" / "no initial state" in the custom ops'
    results, which cannot be None."""
    return like.new_empty((0,), dtype=torch.float32)


def _gradients(saved: tuple[torch.Tensor | None, ...], scale: float | None, do: torch.Tensor | None,
               final_state_gradient: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The backward of both autograd paths: saved = (q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices);
    returns the gradients of (q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
    chunk_indices), None for the last four but initial_state's."""
    q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices = saved
    do = torch.zeros_like(v) if do is None else do.contiguous()
    if final_state_gradient is not None:
        final_state_gradient = final_state_gradient.contiguous() if final_state_gradient.numel() else None
    dq, dk, dv, dg, dbeta, dh0 = backward.backward(q, k, v, g, beta, do, final_state_gradient, scale, initial_state,
                                                   cu_seqlens, chunk_indices)
    return dq, dk, dv, dg, dbeta, None, dh0, None, None, None


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
        return _gradients(ctx.saved_tensors, ctx.scale, do, final_state_gradient)


@torch.library.custom_op("gdn::chunk_gated_delta_rule", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                scale: float, initial_state: torch.Tensor | None, output_final_state: bool,
                cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    o, final_state = forward.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                    cu_seqlens, chunk_indices)
    return o, _no_tensor(q) if final_state is None else final_state


@_forward_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if not output_final_state:
        return torch.empty_like(v), _no_tensor(q)
    return torch.empty_like(v), q.new_empty((N, v.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)


@torch.library.custom_op("gdn::chunk_gated_delta_rule_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 chunk_indices: torch.Tensor | None, do: torch.Tensor, final_state_gradient: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dg, dbeta, _, dh0, *_ = _gradients((q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices),
                                                   scale, do, final_state_gradient)
    return dq, dk, dv, dg, dbeta, _no_tensor(q) if dh0 is None else dh0


@_backward_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, do, final_state_gradient):
    dh0 = _no_tensor(q) if initial_state is None else torch.empty_like(initial_state)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, beta, scale, initial_state, _, cu_seqlens, chunk_indices = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices)
    ctx.scale = scale


def _backward_of_op(ctx, do, final_state_gradient):
    q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices = ctx.saved_tensors
    if final_state_gradient is not None and final_state_gradient.numel() == 0:
        final_state_gradient = None
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dq, dk, dv, dg, dbeta, dh0 = _backward_op(q, k, v, g, beta, ctx.scale, initial_state, cu_seqlens, chunk_indices,
                                              do, final_state_gradient)
    return dq, dk, dv, dg, dbeta, None, dh0 if initial_state is not None else None, None, None, None


_forward_op.register_autograd(_backward_of_op, setup_context=_setup_context)
