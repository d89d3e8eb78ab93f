"""chunk_fwd_o with lowering="triton_call" (gdn.pallas.triton_call): gdn.triton's kernel launched from JAX through
jaxlib's Triton custom call.

CPU: the lowering for sm_90 in a fresh interpreter without TRITON_INTERPRET — Triton compiles the kernel for
sm_90 and the call is built against a stand-in for jaxlib's bindings (they exist with JAX's CUDA plugin only),
which records what it is given: the PTX entry takes the kernel's runtime arguments and Triton's two hidden
pointers, the custom call takes the given inputs and returns o, the parameters are those inputs and o, then scale,
T and N. And the refusals. GPU: o bit-identical to gdn.triton's on the same inputs (the same kernel, compiled
alike), close to the float64 reference and to the Pallas-Triton lowering."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec, tilings
from tests import triton_call_stand_in
from tests.backends import BACKENDS, TritonCallBackend
from tests.cases import CASES, LARGE_CASES, QUICK_CASES, Case, seed_of
from tests.helpers import assert_close, case_params, chunk_o_reference, dtype_params

OP = spec.CHUNK_O_OP
TRITON_CALL = TritonCallBackend()

_LOWER = '''
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gdn.common import spec
from gdn.pallas import chunk_fwd_o
from tests import triton_call_stand_in

triton_call_stand_in.install(90)
B, T, H, HV, K, V, dtype, h_dtype, gated, seqlens, scale = json.loads(sys.argv[1])
cu_seqlens = None if seqlens is None else np.cumsum([0] + seqlens).astype(np.int32)
NT = -(-T // spec.CHUNK_SIZE) if cu_seqlens is None else len(spec.prepare_chunk_indices(cu_seqlens))
args = [jnp.zeros((B, T, H, K), dtype), jnp.zeros((B, T, H, K), dtype), jnp.zeros((B, T, HV, V), dtype),
        jnp.zeros((B, NT, HV, K, V), h_dtype), jnp.zeros((B, T, HV), jnp.float32) if gated else None]
index = None if cu_seqlens is None else (cu_seqlens, spec.prepare_chunk_indices(cu_seqlens))


def call(q, k, v, h, g):
    return chunk_fwd_o(q, k, v, h, g, scale, *(index or (None, None)), lowering="triton_call")


text = jax.jit(call).lower(*args).as_text()
[launch] = triton_call_stand_in.launches
print(json.dumps(dict(launch, custom_calls=triton_call_stand_in.custom_calls(text))))
'''


def _lowered(case: Case, dtype: str, h_dtype: str, scale: float | None) -> dict:
    """What the stand-in for jaxlib recorded while chunk_fwd_o(lowering="triton_call") was lowered for sm_90."""
    return triton_call_stand_in.lowered(_LOWER, [case.B, case.T, case.H, case.HV, case.K, case.V, dtype, h_dtype,
                                                 case.gated, None if case.seqlens is None else list(case.seqlens),
                                                 scale])


@pytest.mark.parametrize("lowering", [
    (Case(T=130, H=2, HV=4, K=128, V=128), "bfloat16", "bfloat16", None),
    (Case(T=131, H=1, HV=2, K=64, V=32, seqlens=(0, 65, 1, 65), gated=False), "float16", "float32", 0.37),
], ids=["dense-g-bf16", "varlen-fp16-h32-scale"])
def test_lowers_to_the_triton_custom_call_for_sm90(lowering) -> None:
    case, dtype, h_dtype, scale = lowering
    recorded = _lowered(case, dtype, h_dtype, scale)
    tiling = tilings.chunk_o_tiling(case.K, case.V, dtype)
    operands = ["q", "k", "v", "h"] + ["g"] * case.gated + ["cu_seqlens", "chunk_indices"] * bool(case.seqlens)
    name, num_warps, num_ctas, shared_bytes, capability, scratch = recorded["kernel"]
    assert (name, num_warps, num_ctas, capability, scratch) == ("chunk_fwd_o_kernel", tiling.num_warps, 1, 90, {})
    assert shared_bytes > 0
    # the PTX entry: the present pointers and o, scale, T and N, and Triton's global and profile scratch pointers
    assert recorded["ptx"] == ["sm_90a", "chunk_fwd_o_kernel", len(operands) + 1 + 3 + 2]
    num_chunks = (len(spec.prepare_chunk_indices(case.cu_seqlens)) if case.seqlens
                  else case.B * -(-case.T // spec.CHUNK_SIZE))
    assert recorded["grid"] == [num_chunks * case.HV * -(-case.V // tiling.block_v), 1, 1]
    expected_scale = spec.default_scale(case.K) if scale is None else scale
    num_sequences = len(case.seqlens) if case.seqlens else case.B
    assert recorded["parameters"] == [["array", 0, 16]] * (len(operands) + 1) + [
        ["scalar", expected_scale, "fp32"], ["scalar", case.T, "i32"], ["scalar", num_sequences, "i32"]]
    [custom_call] = recorded["custom_calls"]
    assert "@triton_kernel_call_ffi(" in custom_call
    signature = custom_call.rsplit(" : ", 1)[1]
    assert signature.count("tensor<") == len(operands) + 1
    o_type = f"tensor<{case.B}x{case.T}x{case.HV}x{case.V}x{'bf16' if dtype == 'bfloat16' else 'f16'}>"
    assert signature.endswith(f"-> {o_type}")


_SUPPORTED = Case(T=70, H=1, HV=2, K=32, V=32)


def _jax_args(case: Case) -> dict:
    return TRITON_CALL.convert(case.inputs("float32"))


def test_a_traced_scale_is_refused() -> None:
    import jax

    from gdn.pallas import chunk_fwd_o

    a = _jax_args(_SUPPORTED)
    call = jax.jit(lambda q, k, v, h, g, s: chunk_fwd_o(q, k, v, h, g, s, lowering="triton_call"))
    with pytest.raises(ValueError, match=rf"^{OP}: scale: expected a Python float or a concrete scalar with "
                                         r"lowering='triton_call' \(it is baked into the compiled call\); got a "
                                         "traced value"):
        call(a["q"], a["k"], a["v"], a["h"], a["g"], 0.5)


def test_the_interpreter_is_refused() -> None:
    from gdn.pallas import chunk_fwd_o

    a = _jax_args(_SUPPORTED)
    with pytest.raises(ValueError, match=rf"^{OP}: interpret: expected None or False with lowering='triton_call' "
                                         r"\(compiled kernels only\); got True$"):
        chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], interpret=True, lowering="triton_call")


def test_the_contract_comes_first() -> None:
    from gdn.pallas import chunk_fwd_o

    a = _jax_args(_SUPPORTED)
    with pytest.raises(ValueError, match=rf"^{OP}: q: expected a rank-4"):
        chunk_fwd_o(a["q"][0], a["k"], a["v"], a["h"], a["g"], lowering="triton_call")


def test_without_a_cuda_gpu_it_says_so() -> None:
    import jax

    from gdn.pallas import chunk_fwd_o

    if jax.default_backend() == "gpu":
        pytest.skip("JAX's default device is a GPU")
    a = _jax_args(_SUPPORTED)
    with pytest.raises(ValueError, match=rf"^{OP}: lowering='triton_call' runs compiled Triton kernels on a CUDA "
                                         f"GPU; JAX's default device is {jax.default_backend()}"):
        chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], lowering="triton_call")


def test_the_default_is_the_triton_lowering_where_triton_call_cannot_run() -> None:
    """The interpreter (a CPU backend, or interpret=True) and a traced scale take the Pallas-Triton lowering."""
    import jax

    from gdn.pallas.chunk_o import default_lowering

    assert default_lowering(True, None) == "triton"
    if jax.default_backend() != "gpu":
        assert default_lowering(None, 0.5) == "triton"
    chosen = []
    jax.jit(lambda scale: chosen.append(default_lowering(False, scale)))(0.5)
    assert chosen == ["triton"]


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_the_default_on_a_cuda_gpu_is_triton_call() -> None:
    """With no lowering named, a compiled call on a CUDA GPU with triton installed runs triton_call: gdn.triton's
    bits."""
    from gdn.pallas import chunk_fwd_o
    from gdn.pallas.chunk_o import default_lowering

    assert default_lowering(None, None) == "triton_call"
    inputs = CASES[3].inputs("bfloat16", seed=seed_of(CASES[3].id))
    a = TRITON_CALL.convert(inputs)
    out = chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], inputs.scale, a["cu_seqlens"], a["chunk_indices"])
    assert np.array_equal(TRITON_CALL.numpy(out), BACKENDS["triton"].run(inputs))


def _assert_triton_bits(inputs, dtype: str) -> np.ndarray:
    """o by triton_call: the bits of gdn.triton on the same inputs, and close to the float64 reference and to the
    Pallas-Triton lowering."""
    out = TRITON_CALL.run(inputs)
    assert np.array_equal(out, BACKENDS["triton"].run(inputs)), "triton_call vs gdn.triton: other bits"
    assert_close(out, chunk_o_reference(inputs), OP, dtype)
    assert_close(out, BACKENDS["pallas"].run(inputs), OP, dtype, "triton_call vs the Pallas-Triton lowering")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(CASES, QUICK_CASES))
def test_the_bits_of_gdn_triton(case: Case, dtype: str) -> None:
    _assert_triton_bits(case.inputs(dtype, seed=seed_of(case.id)), dtype)


@pytest.mark.gpu
def test_explicit_scale_float32_states_and_padded_chunk_indices() -> None:
    """scale 0.37, bf16 inputs with float32 h, chunk_indices padded with PAD_CHUNK rows whose h rows are NaN."""
    case = Case(T=131, H=2, HV=4, K=128, V=64, seqlens=(130, 1, 0))
    inputs = case.inputs("bfloat16", seed=21)
    inputs.scale = 0.37
    inputs.dtypes["h"] = "float32"
    extra = 2
    h = inputs.arrays["h"]
    padded = inputs.replace(
        chunk_indices=spec.prepare_chunk_indices(case.cu_seqlens, num_rows=case.state_rows + extra),
        h=np.concatenate([h, np.full((1, extra) + h.shape[2:], np.nan, np.float32)], axis=1))
    out = TRITON_CALL.run(padded)
    assert np.array_equal(out, BACKENDS["triton"].run(padded))
    assert_close(out, chunk_o_reference(inputs), OP, "bfloat16")


@pytest.mark.gpu
def test_the_bits_of_gdn_triton_on_non_finite_inputs_and_resets() -> None:
    """NaN and ±inf in q, k, v, g and h, and a −∞ gate (a reset), as in tests/test_safety.py: non-finite exactly
    where gdn.triton's o is, the same bits elsewhere, so the input rules hold here as they hold there."""
    inputs = Case(T=300, H=1, HV=2, K=32, V=32).inputs("bfloat16", seed=23)
    a = {n: inputs.arrays[n].copy() for n in ("q", "k", "v", "g", "h")}
    a["q"][0, 10, 0, 3] = np.nan
    a["k"][0, 70, 0, 5] = np.inf
    a["v"][0, 140, 1, 3] = np.nan
    a["v"][0, 150, 0, 5] = -np.inf
    a["g"][0, 200, 1] = np.nan
    a["g"][0, 230:256, 0] = -np.inf
    a["h"][0, 4, 0, 2, 7] = np.nan
    garbage = inputs.replace(**a)
    out = TRITON_CALL.run(garbage)
    assert np.array_equal(out, BACKENDS["triton"].run(garbage), equal_nan=True)
    assert np.isfinite(out[0, 230:256, 0]).all() and not np.isfinite(out).all()


@pytest.mark.gpu
def test_differentiation_raises_a_clear_error() -> None:
    import jax

    from gdn.pallas import chunk_fwd_o

    a = _jax_args(_SUPPORTED)
    with pytest.raises(TypeError, match=f"^gdn: {OP} has no backward"):
        jax.grad(lambda q: chunk_fwd_o(q, a["k"], a["v"], a["h"], a["g"], lowering="triton_call").sum())(a["q"])


@pytest.mark.gpu
def test_deterministic_and_the_same_under_a_callers_jit() -> None:
    import jax

    from gdn.pallas import chunk_fwd_o

    inputs = CASES[5].inputs("bfloat16", seed=22)
    first = TRITON_CALL.run(inputs)
    assert np.array_equal(first, TRITON_CALL.run(inputs))
    a = TRITON_CALL.convert(inputs)
    jitted = jax.jit(lambda q, k, v, h, g: chunk_fwd_o(q, k, v, h, g, inputs.scale, lowering="triton_call"))
    assert np.array_equal(first, TRITON_CALL.numpy(jitted(a["q"], a["k"], a["v"], a["h"], a["g"])))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: c.id)
def test_large_bf16_the_bits_of_gdn_triton(case: Case) -> None:
    _assert_triton_bits(case.inputs("bfloat16", seed=4), "bfloat16")
