"""gdn's ops as torch.library custom ops: what torch.compile (fullgraph=True included) traces instead of the
Python entry points, whose eager fast path (cached plans, direct kernel launches) it cannot follow.

Each public function calls its op here only under torch.compiler.is_compiling(); eager calls keep their few-µs
host path (a custom op's dispatcher costs about 21 µs of CPU per call: 23.7 µs through the op against 2.4 µs for
the same Python function, measured on the CPU build of torch 2.13). An op's fake (meta) implementation gives its
outputs' shapes, dtypes and strides without running a kernel; an op that updates an input in place declares it
in mutates_args and returns nothing aliasing it. gdn::chunk_gated_delta_rule has its backward registered
(gdn::chunk_gated_delta_rule_backward); a backward through any other op that returns new tensors raises "gdn:
<name> has no backward" (torch.compile with inputs that require grad fails with it when it builds the backward
graph), and the in-place ops refuse inputs that require grad before they are called.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch

from gdn.common import spec
from gdn.triton import backward, chunk_o, decode, forward
from gdn.triton.arrays import refuse_grad


def _no_backward(name: str, ctx: Any, *grads: torch.Tensor) -> None:
    raise NotImplementedError(f"gdn: {name} has no backward")


def _save_nothing(ctx: Any, inputs: tuple, output: Any) -> None:
    del ctx, inputs, output


def register(name: str, impl: Callable, fake: Callable, mutates_args: tuple[str, ...] = (),
             autograd: tuple[Callable, Callable] | None = None):
    """The custom op gdn::<name> running impl, with fake as its fake implementation and, unless it mutates an
    input (torch registers no autograd formula for those), autograd = (backward, setup_context) or a backward
    that raises. impl's type hints give the schema (torch.Tensor | None for an optional array): real
    annotations, so no `from __future__ import annotations` in a module that defines one."""
    op = torch.library.custom_op(f"gdn::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    if autograd is not None:
        op.register_autograd(autograd[0], setup_context=autograd[1])
    elif not mutates_args:
        op.register_autograd(functools.partial(_no_backward, name), setup_context=_save_nothing)
    return op


def _chunk_fwd_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None,
                 scale: float | None, cu_seqlens: torch.Tensor | None,
                 chunk_indices: torch.Tensor | None) -> torch.Tensor:
    """chunk_fwd_o: o (without chunk_indices, cu_seqlens is read on the host at run time: no CUDA graph then)."""
    return chunk_o.run(q, k, v, h, g, scale, cu_seqlens, chunk_indices)


def _chunk_fwd_o_fake(q, k, v, h, g, scale, cu_seqlens, chunk_indices) -> torch.Tensor:
    return torch.empty_like(v, memory_format=torch.contiguous_format)  # o is dense whatever v's layout


def _decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                 beta: torch.Tensor | None, state: torch.Tensor, scale: float, cu_seqlens: torch.Tensor | None,
                 use_qk_l2norm_in_kernel: bool, a: torch.Tensor | None, b: torch.Tensor | None,
                 A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, softplus_beta: float,
                 softplus_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_step with a dense state: (o, new_state), state not modified."""
    return decode.run(q, k, v, g, beta, state, scale, None, cu_seqlens, None, use_qk_l2norm_in_kernel, a, b, A_log,
                      dt_bias, softplus_beta, softplus_threshold)


def _decode_step_fake(q, k, v, g, beta, state, scale, cu_seqlens, use_qk_l2norm_in_kernel, a, b, A_log, dt_bias,
                      softplus_beta, softplus_threshold) -> tuple[torch.Tensor, torch.Tensor]:
    return v.new_empty(v.shape), state.new_empty_strided(state.shape, state.stride())


def _decode_step_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                      beta: torch.Tensor | None, state: torch.Tensor, scale: float, state_indices: torch.Tensor,
                      cu_seqlens: torch.Tensor | None, num_accepted_tokens: torch.Tensor | None,
                      use_qk_l2norm_in_kernel: bool, a: torch.Tensor | None, b: torch.Tensor | None,
                      A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, softplus_beta: float,
                      softplus_threshold: float) -> torch.Tensor:
    """decode_step on a pool of states, updated in place: o."""
    return decode.run(q, k, v, g, beta, state, scale, state_indices, cu_seqlens, num_accepted_tokens,
                      use_qk_l2norm_in_kernel, a, b, A_log, dt_bias, softplus_beta, softplus_threshold)[0]


def _decode_step_pool_fake(q, k, v, g, beta, state, scale, state_indices, cu_seqlens, num_accepted_tokens,
                           use_qk_l2norm_in_kernel, a, b, A_log, dt_bias, softplus_beta,
                           softplus_threshold) -> torch.Tensor:
    return v.new_empty(v.shape)


def no_tensor(like: torch.Tensor) -> torch.Tensor:
    """A new empty float32 tensor on like's device: "no final state" / "no initial state" in an op's results,
    which cannot be None."""
    return like.new_empty((0,), dtype=torch.float32)


def _chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            scale: float, initial_state: torch.Tensor | None, output_final_state: bool,
                            cu_seqlens: torch.Tensor | None,
                            chunk_indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_gated_delta_rule's forward, differentiable (its autograd registered below): (o, the final state or
    no_tensor)."""
    o, final_state = forward.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                    cu_seqlens, chunk_indices)
    return o, no_tensor(q) if final_state is None else final_state


def _final_state_fake(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                      output_final_state: bool) -> torch.Tensor:
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if not output_final_state:
        return no_tensor(q)
    return q.new_empty((N, v.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)


def _chunk_gated_delta_rule_fake(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_indices) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(v), _final_state_fake(q, v, cu_seqlens, output_final_state)


def input_gradients(saved: tuple[torch.Tensor | None, ...], scale: float | None, do: torch.Tensor | None,
                    final_state_gradient: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The backward of chunk_gated_delta_rule's autograd (the eager torch.autograd.Function's and the op's):
    saved = (q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices), do and final_state_gradient None or
    empty when no gradient flows in; returns (dq, dk, dv, dg, dbeta, d initial_state or None)."""
    q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices = saved
    do = torch.zeros_like(v) if do is None else do.contiguous()
    if final_state_gradient is not None:
        final_state_gradient = final_state_gradient.contiguous() if final_state_gradient.numel() else None
    return backward.backward(q, k, v, g, beta, do, final_state_gradient, scale, initial_state, cu_seqlens,
                             chunk_indices)


def _chunk_gated_delta_rule_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None,
    do: torch.Tensor, final_state_gradient: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, dbeta, d initial_state or no_tensor)."""
    *gradients, dh0 = input_gradients((q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices), scale, do,
                                      final_state_gradient)
    return *gradients, no_tensor(q) if dh0 is None else dh0


def _chunk_gated_delta_rule_backward_fake(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_indices, do,
                                          final_state_gradient) -> tuple[torch.Tensor, ...]:
    dh0 = no_tensor(q) if initial_state is None else torch.empty_like(initial_state)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)


def _save_inputs(ctx, inputs, output) -> None:
    q, k, v, g, beta, scale, initial_state, _, cu_seqlens, chunk_indices = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices)
    ctx.scale = scale


def _gradients_of_op(ctx, do, final_state_gradient):
    q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do
    dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_backward_op(
        q, k, v, g, beta, ctx.scale, initial_state, cu_seqlens, chunk_indices, do, final_state_gradient)
    return dq, dk, dv, dg, dbeta, None, dh0 if initial_state is not None else None, None, None, None


def _chunk_gated_delta_rule_serving(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    scale: float, initial_state: torch.Tensor | None, output_final_state: bool, cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None, state_indices: torch.Tensor | None, use_qk_l2norm_in_kernel: bool,
    a: torch.Tensor | None, b: torch.Tensor | None, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
    softplus_beta: float, softplus_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_gated_delta_rule with its serving arguments, no gradient: (o, the final state or no_tensor); with
    state_indices the pool (initial_state) is updated in place and the final state is no_tensor."""
    o, final_state = forward.chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_indices,
        state_indices=state_indices, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, a=a, b=b, A_log=A_log,
        dt_bias=dt_bias, softplus_beta=softplus_beta, softplus_threshold=softplus_threshold)
    return o, no_tensor(q) if final_state is None or state_indices is not None else final_state


def _chunk_gated_delta_rule_serving_fake(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                         chunk_indices, state_indices, use_qk_l2norm_in_kernel, a, b, A_log, dt_bias,
                                         softplus_beta, softplus_threshold) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(v), _final_state_fake(q, v, cu_seqlens, output_final_state and state_indices is None)


chunk_fwd_o_op = register("chunk_fwd_o", _chunk_fwd_o, _chunk_fwd_o_fake)
chunk_gated_delta_rule_backward_op = register("chunk_gated_delta_rule_backward", _chunk_gated_delta_rule_backward,
                                              _chunk_gated_delta_rule_backward_fake)
chunk_gated_delta_rule_op = register("chunk_gated_delta_rule", _chunk_gated_delta_rule,
                                     _chunk_gated_delta_rule_fake, autograd=(_gradients_of_op, _save_inputs))
# initial_state declared mutated: with state_indices it is the pool, updated in place
chunk_gated_delta_rule_serving_op = register("chunk_gated_delta_rule_serving", _chunk_gated_delta_rule_serving,
                                             _chunk_gated_delta_rule_serving_fake, mutates_args=("initial_state",))
decode_step_op = register("decode_step", _decode_step, _decode_step_fake)
decode_step_pool_op = register("decode_step_pool", _decode_step_pool, _decode_step_pool_fake, mutates_args=("state",))


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                beta: torch.Tensor | None, state: torch.Tensor, scale: float | None,
                state_indices: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                num_accepted_tokens: torch.Tensor | None, use_qk_l2norm_in_kernel: bool, a: torch.Tensor | None,
                b: torch.Tensor | None, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
                softplus_beta: float, softplus_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gdn.triton.decode_step through its custom ops (what it calls under torch.compile): gdn::decode_step for
    a dense state, gdn::decode_step_pool, which updates the pool in place, with state_indices."""
    refuse_grad(spec.DECODE_OP, ("q", "k", "v", "g", "beta", "state", "a", "b", "A_log", "dt_bias"),
                (q, k, v, g, beta, state, a, b, A_log, dt_bias))
    scale = spec.default_scale(q.shape[-1]) if scale is None else float(scale)
    if state_indices is None:
        return decode_step_op(q, k, v, g, beta, state, scale, cu_seqlens, bool(use_qk_l2norm_in_kernel), a, b, A_log,
                              dt_bias, float(softplus_beta), float(softplus_threshold))
    o = decode_step_pool_op(q, k, v, g, beta, state, scale, state_indices, cu_seqlens, num_accepted_tokens,
                            bool(use_qk_l2norm_in_kernel), a, b, A_log, dt_bias, float(softplus_beta),
                            float(softplus_threshold))
    return o, state
