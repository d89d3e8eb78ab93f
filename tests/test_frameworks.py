"""chunk_fwd_o inside the frameworks' machinery: autograd (no backward: a clear error, never a silently detached
output or a zero gradient), torch.compile (a custom op that fullgraph=True traces), and the device a Triton
kernel can run on. Each test is written from a failure seen before: detached outputs for inputs that require
grad, an empty AssertionError from Pallas under jax.grad, an InterpreterError / "function marked as skipped"
under torch.compile, Triton's "0 active drivers" for CPU tensors without TRITON_INTERPRET."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec
from tests import helpers
from tests.backends import BACKENDS
from tests.cases import Case, ForwardCase
from tests.helpers import chunk_o_reference

_CASE = Case(T=70, H=1, HV=2, K=16, V=16)
_NO_BACKWARD = "gdn: chunk_fwd_o has no backward"


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str, what: str = "vs reference") -> None:
    helpers.assert_close(out, ref, spec.CHUNK_O_OP, dtype, what)


def _torch_args(case: Case = _CASE, seed: int = 40) -> dict:
    return BACKENDS["triton"].convert(case.inputs("float32", seed=seed))


@pytest.mark.parametrize("name", ["q", "k", "v", "h", "g"])
def test_torch_inputs_that_require_grad_are_refused(name: str) -> None:
    """A loss through chunk_fwd_o would get zero gradient from it: refused while grad mode is on, run under
    torch.no_grad() (the output then needs no grad, as for any op)."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_fwd_o

    t = _torch_args()
    t[name].requires_grad_(True)
    args = [t[n] for n in ("q", "k", "v", "h", "g")]
    with pytest.raises(RuntimeError, match=rf"^{_NO_BACKWARD}; {name} requires grad \(call it under torch.no_grad\(\)"):
        chunk_fwd_o(*args)
    with torch.no_grad():
        out = chunk_fwd_o(*args)
    assert not out.requires_grad
    assert_close(BACKENDS["triton"].numpy(out), chunk_o_reference(_CASE.inputs("float32", seed=40)), "float32")


@pytest.mark.parametrize("name", ["q", "v", "g", "beta", "initial_state"])
def test_forward_inputs_that_require_grad_get_a_graph(name: str) -> None:
    """chunk_gated_delta_rule gave detached outputs for inputs that require grad (a loss through it got zero
    gradient): its outputs carry the autograd graph (the gradients themselves: tests/test_backward.py), and under
    torch.no_grad() none."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_gated_delta_rule

    t = BACKENDS["triton"].convert(ForwardCase(70, 1, 2, 16, 16).inputs("float32", seed=47))
    t[name].requires_grad_(True)
    args = [t[n] for n in ("q", "k", "v", "g", "beta")] + [None, t["initial_state"], True]
    out, state = chunk_gated_delta_rule(*args)
    assert out.grad_fn is not None and state.grad_fn is not None
    with torch.no_grad():
        out, state = chunk_gated_delta_rule(*args)
    assert not out.requires_grad and not state.requires_grad


def test_jax_differentiation_raises_a_clear_error() -> None:
    """jax.grad (also of a jitted function) and jax.jvp through chunk_fwd_o raise "no backward"; inputs behind
    jax.lax.stop_gradient, or a loss that does not differentiate them, run as usual."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_fwd_o

    a = {n: jnp.asarray(x) for n, x in _CASE.inputs("float32", seed=41).arrays.items() if x is not None}
    other = ("k", "v", "h", "g")

    def loss(q):
        return chunk_fwd_o(q, *(a[n] for n in other)).sum()

    for transform in (jax.grad(loss), jax.grad(jax.jit(loss)), lambda q: jax.jvp(loss, (q,), (q,))):
        with pytest.raises(TypeError, match=f"^{_NO_BACKWARD}"):
            transform(a["q"])
    stopped = jax.grad(lambda x: chunk_fwd_o(jax.lax.stop_gradient(a["q"] * x), *(a[n] for n in other)).sum() + x)
    assert stopped(1.0) == 1.0


def _compiled_call(t: dict, backend: str = "aot_eager"):
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_fwd_o

    def model(q, k, v, h, g):
        return chunk_fwd_o(q * 1.0, k, v, h, g).float().square()  # torch ops on both sides of the custom op

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True)(*(t[n] for n in ("q", "k", "v", "h", "g")))


def test_torch_compile_traces_chunk_fwd_o_in_one_graph() -> None:
    """torch.compile(fullgraph=True) traces chunk_fwd_o as the custom op gdn::chunk_fwd_o (no graph break, no
    Triton inside Dynamo) and computes the eager bits; torch.library.opcheck passes on the op (schema, fake
    implementation, autograd registration, AOT dispatch)."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_fwd_o

    t = _torch_args()
    eager = chunk_fwd_o(*(t[n] for n in ("q", "k", "v", "h", "g"))).float().square()
    assert torch.equal(_compiled_call(t), eager)
    cu = Case(T=100, H=1, HV=2, K=16, V=16, seqlens=(30, 70))
    tv = _torch_args(cu, seed=42)
    torch.library.opcheck(torch.ops.gdn.chunk_fwd_o.default,
                          (tv["q"], tv["k"], tv["v"], tv["h"], tv["g"], 0.5, tv["cu_seqlens"], None))


def test_torch_compile_with_inputs_that_require_grad_fails_clearly() -> None:
    """Compiling a model whose inputs require grad builds its backward graph: it fails with "no backward"."""
    t = _torch_args()
    t["v"].requires_grad_(True)
    with pytest.raises(Exception, match=_NO_BACKWARD):
        _compiled_call(t)


@pytest.mark.gpu
def test_torch_compile_with_inductor_on_gpu() -> None:
    """The default backend (Inductor, generating Triton for the ops around gdn's) with fullgraph=True, bf16."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_fwd_o

    t = BACKENDS["triton"].convert(Case(T=300, H=2, HV=4, K=128, V=128).inputs("bfloat16", seed=43))
    eager = chunk_fwd_o(*(t[n] for n in ("q", "k", "v", "h", "g"))).float().square()
    assert torch.equal(_compiled_call(t, backend="inductor"), eager)


def test_torch_compile_traces_the_forward_in_one_graph() -> None:
    """torch.compile(fullgraph=True) of chunk_gated_delta_rule crashed inside Triton (InterpreterError … KeyError
    (torch.uint64) on CPU) or stopped at "function marked as skipped": it is the custom op
    gdn::chunk_gated_delta_rule under torch.compile."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_gated_delta_rule

    t = BACKENDS["triton"].convert(ForwardCase(70, 1, 2, 16, 16).inputs("float32", seed=44))
    args = [t[n] for n in ("q", "k", "v", "g", "beta")]
    eager = chunk_gated_delta_rule(*args)[0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: chunk_gated_delta_rule(*x)[0], backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), eager)


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                                request: pytest.FixtureRequest) -> None:
    """CPU tensors with Triton compiling (TRITON_INTERPRET unset): refused naming TRITON_INTERPRET, not Triton's
    "0 active drivers"."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import arrays, chunk_fwd_o, reset_plans

    monkeypatch.setattr(arrays, "_interpreting", lambda: False)
    reset_plans()  # the plans check the device once per call signature
    request.addfinalizer(reset_plans)
    a = _CASE.inputs("float32", seed=45).arrays
    t = {n: torch.from_numpy(a[n]) for n in ("q", "k", "v", "h", "g")}
    with pytest.raises(ValueError, match=r"^chunk_fwd_o: q: expected a CUDA tensor \(CPU tensors run only in the "
                                         r"Triton interpreter: set TRITON_INTERPRET=1 before importing triton\)"):
        chunk_fwd_o(t["q"], t["k"], t["v"], t["h"], t["g"])


def test_forward_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                                        request: pytest.FixtureRequest) -> None:
    """The forward, like chunk_fwd_o and decode_step: a gdn message, not Triton's "0 active drivers"."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import arrays, chunk_gated_delta_rule, reset_plans

    monkeypatch.setattr(arrays, "_interpreting", lambda: False)
    reset_plans()
    request.addfinalizer(reset_plans)
    a = ForwardCase(70, 1, 2, 16, 16).inputs("float32", seed=48).arrays
    t = {n: torch.from_numpy(a[n]) for n in ("q", "k", "v", "g", "beta")}
    with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: q: expected a CUDA tensor \(CPU tensors run "):
        chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"])


def test_max_chunk_rows_pads_chunk_indices_for_every_batch() -> None:
    """spec.max_chunk_rows(max_tokens, max_sequences) rows hold the chunk_indices of every batch within those
    bounds, and some batch needs them all: one jitted program serves them (JAX shapes are static)."""
    import jax

    from gdn.pallas import chunk_fwd_o

    rows = spec.max_chunk_rows(200, 3)
    assert rows == (200 + 3 * (spec.CHUNK_SIZE - 1)) // spec.CHUNK_SIZE == 6
    jitted = jax.jit(lambda *args: chunk_fwd_o(*args))  # its own cache (jax.jit(chunk_fwd_o) shares one)
    for seqlens in [(65, 65, 70), (200, 0, 0), (1, 1, 198), (100, 0, 100)]:
        case = Case(T=200, H=1, HV=2, K=16, V=16, seqlens=seqlens)
        inputs = case.inputs("float32", seed=46)
        a = inputs.arrays
        h = np.concatenate([a["h"], np.zeros((1, rows - a["h"].shape[1]) + a["h"].shape[2:], np.float32)], axis=1)
        chunk_indices = spec.prepare_chunk_indices(case.cu_seqlens, num_rows=rows)
        out = jitted(a["q"], a["k"], a["v"], h, a["g"], None, case.cu_seqlens, chunk_indices)
        assert_close(np.asarray(out, np.float64), chunk_o_reference(inputs), "float32", str(seqlens))
    assert len(spec.prepare_chunk_indices(np.cumsum([0, 65, 65, 70]))) == rows  # the bound is reached
    assert jitted._cache_size() == 1
