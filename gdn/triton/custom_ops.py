"""gdn's ops as torch.library custom ops: what torch.compile (fullgraph=True included) traces instead of the
Python entry points, whose eager fast path (cached plans, direct kernel launches) it cannot follow.

Each public function calls its op here only under torch.compiler.is_compiling(); eager calls keep their few-µs
host path (a custom op's dispatcher costs about 21 µs of CPU per call: 23.7 µs through the op against 2.4 µs for
the same Python function, measured on the CPU build of torch 2.13). An op's fake (meta) implementation gives its
outputs' shapes, dtypes and strides without running a kernel; an op that updates an input in place declares it
in mutates_args and returns nothing aliasing it. gdn has no backward yet: a backward through an op that returns
new tensors raises "gdn: <name> has no backward" (torch.compile with inputs that require grad fails with it when
it builds the backward graph), and the in-place ops refuse inputs that require grad before they are called.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch

from gdn.common import spec
from gdn.triton import chunk_o, decode
from gdn.triton.arrays import refuse_grad


def _no_backward(name: str, ctx: Any, *grads: torch.Tensor) -> None:
    raise NotImplementedError(f"gdn: {name} has no backward")


def _save_nothing(ctx: Any, inputs: tuple, output: Any) -> None:
    del ctx, inputs, output


def register(name: str, impl: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()):
    """The custom op gdn::<name> running impl, with fake as its fake implementation and, unless it mutates an
    input (torch registers no autograd formula for those), a backward that raises. impl's type hints give the
    schema (torch.Tensor | None for an optional array): real annotations, so no `from __future__ import
    annotations` in a module that defines one."""
    op = torch.library.custom_op(f"gdn::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    if not mutates_args:
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


chunk_fwd_o_op = register("chunk_fwd_o", _chunk_fwd_o, _chunk_fwd_o_fake)
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
