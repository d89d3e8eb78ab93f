"""torch.compile(fullgraph=True) through gdn's torch.library custom ops (gdn.triton.custom_ops): a function
calling the ops compiles without a graph break and gives the eager bits. On CPU the aot_eager backend (dynamo,
fake tensors, functionalization; Inductor's C++ build takes 10-50 s on 2 cores, the custom ops run their eager
implementation either way), on a GPU Inductor."""

from __future__ import annotations

import pytest

from tests.backends import BACKENDS
from tests.cases import BACKWARD_CASES, CASES, SERVING_CASES, with_raw_inputs


def _compile_backend() -> str:
    """Inductor on a GPU; on CPU aot_eager (dynamo, fake tensors and functionalization, no C++ build): the
    custom ops run their eager implementation either way."""
    return "inductor" if BACKENDS["triton"].on_gpu else "aot_eager"


@pytest.mark.slow
def test_torch_compile_fullgraph_traces_decode() -> None:
    """A layer step calling decode_step twice (a dense state, then a pool in place) compiles with
    fullgraph=True (no graph break: gdn::decode_step and gdn::decode_step_pool) and gives the eager bits."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import decode_step

    inputs = SERVING_CASES[0].inputs("float32", seed=17, raw_gates=True, raw_qk=True)

    def step(q, k, v, a, b, A_log, dt_bias, pool, state_indices):
        q = q * 2.0  # something for the compiler around the op
        o_pool, pool = decode_step(q, k, v, None, None, pool, state_indices=state_indices, a=a, b=b, A_log=A_log,
                                   dt_bias=dt_bias, use_qk_l2norm_in_kernel=True)
        o_dense, state = decode_step(q, k, v, None, None, pool[:4], a=a, b=b, A_log=A_log, dt_bias=dt_bias,
                                     use_qk_l2norm_in_kernel=True)
        return o_pool + o_dense, state

    names = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state", "state_indices")
    eager_args = [BACKENDS["triton"].convert(inputs)[n] for n in names]
    compiled_args = [x.clone() for x in eager_args]
    o_eager, state_eager = step(*eager_args)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=_compile_backend())
    o, state = compiled(*compiled_args)
    assert o.equal(o_eager) and state.equal(state_eager)
    assert compiled_args[7].equal(eager_args[7]), "the pool updated in place inside the compiled graph"
    assert not compiled_args[7].equal(BACKENDS["triton"].convert(inputs)["state"])


def test_torch_compile_fullgraph_traces_chunk_fwd_o() -> None:
    """chunk_fwd_o inside a compiled function (dense, then varlen with chunk_indices): gdn::chunk_fwd_o."""
    torch = BACKENDS["triton"].torch
    from gdn.common import spec
    from gdn.triton import chunk_fwd_o

    for case in (CASES[5], CASES[11]):
        t = BACKENDS["triton"].convert(case.inputs("float32", seed=21))
        if t["cu_seqlens"] is not None:
            t["chunk_indices"] = torch.from_numpy(spec.prepare_chunk_indices(case.cu_seqlens)).to(t["q"].device)

        def layer(q, k, v, h, g, cu_seqlens, chunk_indices):
            return chunk_fwd_o(q * 0.5, k, v, h, g, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices) + 1.0

        args = [t[n] for n in ("q", "k", "v", "h", "g", "cu_seqlens", "chunk_indices")]
        eager = layer(*args)
        torch._dynamo.reset()
        assert torch.compile(layer, fullgraph=True, backend=_compile_backend())(*args).equal(eager), case.id


def test_torch_compile_fullgraph_traces_the_forward_from_a_pool() -> None:
    """chunk_gated_delta_rule from a state pool with in-kernel q/k norm and raw gates, no gradient wanted:
    gdn::chunk_gated_delta_rule_serving (declared as mutating the pool), the eager bits and the pool updated in
    place inside the compiled graph."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_gated_delta_rule

    inputs = with_raw_inputs(BACKWARD_CASES[6].inputs("float32", seed=26), 27, True, True)
    t = BACKENDS["triton"].convert(inputs)
    pool = torch.randn((9,) + t["initial_state"].shape[1:], generator=torch.Generator().manual_seed(28))
    state_indices = torch.tensor([8, -1, 0, 3, 5, 1, 2], dtype=torch.int32)

    def prefill(q, k, v, a, b, A_log, dt_bias, pool, state_indices, cu_seqlens):
        o, final_state = chunk_gated_delta_rule(q * 2.0, k, v, None, None, initial_state=pool, output_final_state=True,
                                                cu_seqlens=cu_seqlens, state_indices=state_indices,
                                                use_qk_l2norm_in_kernel=True, a=a, b=b, A_log=A_log, dt_bias=dt_bias)
        return o + 1.0, final_state

    device = t["q"].device
    args = [t[n] for n in ("q", "k", "v", "a", "b", "A_log", "dt_bias")]
    args += [pool.to(device, copy=True), state_indices.to(device), t["cu_seqlens"]]
    compiled_args = [x.clone() for x in args]
    o_eager, state_eager = prefill(*args)
    torch._dynamo.reset()
    o, state = torch.compile(prefill, fullgraph=True, backend=_compile_backend())(*compiled_args)
    assert o.equal(o_eager) and state.equal(state_eager)
    assert compiled_args[7].equal(args[7]) and not args[7].equal(pool.to(device)), "the pool in place"


@pytest.mark.slow
def test_torch_compile_fullgraph_gradients_of_raw_inputs() -> None:
    """A compiled loss over chunk_gated_delta_rule with use_qk_l2norm_in_kernel and the raw gates (the norm and
    the gates as torch ops before gdn::chunk_gated_delta_rule and its registered autograd): the eager gradients
    of q, k, v, a, b, A_log, dt_bias and the initial state, on a varlen batch with chunk_indices given."""
    torch = BACKENDS["triton"].torch
    from gdn.common import spec
    from gdn.triton import chunk_gated_delta_rule

    case = BACKWARD_CASES[6]
    inputs = with_raw_inputs(case.inputs("float32", seed=29), 30, True, True)
    t = BACKENDS["triton"].convert(inputs)
    chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(case.cu_seqlens)).to(t["q"].device)
    names = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "initial_state")

    def loss(q, k, v, a, b, A_log, dt_bias, initial_state):
        o, final_state = chunk_gated_delta_rule(q, k, v, None, None, initial_state=initial_state,
                                                output_final_state=True, cu_seqlens=t["cu_seqlens"],
                                                chunk_indices=chunk_indices, use_qk_l2norm_in_kernel=True, a=a,
                                                b=b, A_log=A_log, dt_bias=dt_bias)
        return (o * o).sum() + final_state.sum()

    def gradients(fn):
        args = [t[n].clone().requires_grad_(True) for n in names]
        return torch.autograd.grad(fn(*args), args)

    eager = gradients(loss)
    torch._dynamo.reset()
    compiled = gradients(torch.compile(loss, fullgraph=True, backend=_compile_backend()))
    # Inductor on a GPU fuses and reorders the float32 sums of the norm's and the gates' backward (dA_log and
    # ddt_bias sum over every token, where terms of both signs cancel): a few float32 ulps of the terms apart
    # from eager, so the absolute tolerance scales with the gradient's largest entry
    rtol = 1e-4 if t["q"].is_cuda else 1e-5
    for name, x, y in zip(names, compiled, eager):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()) + 1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
