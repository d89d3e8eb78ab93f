"""chunk_gated_delta_rule with lowering="mosaic_gpu" (gdn.pallas.forward_mosaic_gpu: the walk with o computed in
it, in Pallas Mosaic GPU, after triton_call's prepare on a GPU and the Pallas one in interpret mode): against the
float64 recurrence on the edge shapes at the head sizes it takes (T = 1, 63, 64, 65, 300, varlen with empty and
1-token sequences, grouped heads, with and without an initial state or the final state, sequences of 0 to 5
chunks at K = 128, −∞ and −80 gates), in pieces (the context-parallel path), with the raw gates and the in-kernel
L2 norm, close to the Pallas walk's o; the same bits run to run; its gradient is the Pallas backward's, bit for
bit; tokens without chunk rows; the calls it refuses; the default path (dense inputs on sm_90). Mosaic GPU
interpret mode on CPU (one thread runs the three warpgroups' roles in order); compiled on an sm_90 GPU, where the
model-sized cases run too (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec
from tests.backends import BACKENDS, MosaicGpuBackend
from tests.cases import LARGE_FORWARD_CASES, ForwardCase, forward_varlen, seed_of, with_raw_inputs
from tests.helpers import assert_close, case_params, forward_reference

OP = spec.FORWARD_OP
MOSAIC = MosaicGpuBackend()

MOSAIC_CASES: list[ForwardCase] = [
    ForwardCase(1, 1, 2, 64, 64),
    ForwardCase(63, 1, 2, 64, 128, B=2, initial_state=False),
    ForwardCase(64, 2, 2, 128, 64),
    ForwardCase(65, 1, 2, 64, 64, B=2),
    ForwardCase(300, 1, 1, 64, 64),
    forward_varlen((0, 1, 64, 100, 1, 0, 70), 1, 2, 64, 64),
    forward_varlen((65, 0, 1), 2, 4, 64, 128, initial_state=False),
    ForwardCase(300, 1, 1, 128, 64),  # K = 128: two input stages, refilled over 5 chunks
    forward_varlen((0, 1, 64, 129, 192, 320), 1, 2, 128, 128),  # 0, 1, 1, 3, 3 and 5 chunks per sequence
]
QUICK_MOSAIC_CASES = (0, 5, 8)
"""The quick selection on a GPU: T = 1 with grouped heads, the varlen batch, and sequences of 0 to 5 chunks at K = 128
(every input stage refilled: the warpgroups' hand-offs over many chunks)."""


def _gpu_only():
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("model-sized cases run compiled on an sm_90 GPU only")


def _assert_matches_reference(case: ForwardCase, dtype: str) -> None:
    inputs = case.inputs(dtype, seed=seed_of(case.id))
    o, state = MOSAIC.forward(inputs)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, OP, dtype, "o")
    assert_close(state, state_ref, OP, dtype, "final state")


@pytest.mark.parametrize("case", case_params(MOSAIC_CASES, QUICK_MOSAIC_CASES))
def test_matches_recurrent_reference(case: ForwardCase) -> None:
    _assert_matches_reference(case, "float16")


@pytest.mark.parametrize("case", [MOSAIC_CASES[3], MOSAIC_CASES[6]], ids=lambda c: c.id)
def test_matches_recurrent_reference_bf16(case: ForwardCase) -> None:
    _assert_matches_reference(case, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_FORWARD_CASES, ids=lambda c: c.id)
def test_model_sized_cases(case: ForwardCase) -> None:
    """Model-sized heads, a ragged batch and one long sequence (cut into pieces on the GPU), bf16."""
    _gpu_only()
    _assert_matches_reference(case, "bfloat16")


@pytest.mark.parametrize("pieces", [2, 4])
def test_in_pieces(pieces: int) -> None:
    """Each sequence cut into pieces walked from their true starts (the Pallas map walk and combine), one of
    them shorter than the pieces (the empty pieces walk no chunk and pass their start on)."""
    case = forward_varlen((300, 3, 0, 129), 1, 2, 64, 64)
    inputs = case.inputs("float16", seed=seed_of(case.id))
    o, state = MOSAIC.forward_in_pieces(inputs, pieces)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, OP, "float16", "o")
    assert_close(state, state_ref, OP, "float16", "final state")


def test_with_raw_gates_and_in_kernel_l2_norm() -> None:
    case = MOSAIC_CASES[5]
    inputs = with_raw_inputs(case.inputs("float16", seed=41), 42, raw_qk=True, raw_gates=True)
    o, state = MOSAIC.forward(inputs, use_qk_l2norm_in_kernel=True)
    o_pallas, state_pallas = BACKENDS["pallas"].forward(inputs, use_qk_l2norm_in_kernel=True)
    assert_close(o, o_pallas, OP, "float16", "o vs the Pallas kernels'")
    assert_close(state, state_pallas, OP, "float16", "final state vs the Pallas kernels'")


def test_close_to_the_pallas_walk() -> None:
    """The same prepare, the same walk math: o and the final state within float16 rounding of the Pallas
    kernels' (wgmma's float32 sums in their own order), the final state nearly equal."""
    case = MOSAIC_CASES[4]
    inputs = case.inputs("float16", seed=43)
    o, state = MOSAIC.forward(inputs)
    o_pallas, state_pallas = BACKENDS["pallas"].forward(inputs)
    np.testing.assert_allclose(o, o_pallas, rtol=0, atol=4e-3 * np.abs(o_pallas).max())
    np.testing.assert_allclose(state, state_pallas, rtol=0, atol=1e-3 * np.abs(state_pallas).max())


def test_gradients_are_the_pallas_backwards() -> None:
    """The forward keeps its inputs only and the backward recomputes with the Pallas kernels: the same
    gradients, bit for bit, as lowering='triton'."""
    case = MOSAIC_CASES[6]
    inputs = case.inputs("float16", seed=44)
    rng = np.random.default_rng(45)
    do = rng.standard_normal((case.B, case.T, case.HV, case.V)).astype(np.float32)
    dht = rng.standard_normal((case.N, case.HV, case.K, case.V)).astype(np.float32)
    grads = MOSAIC.gradients(inputs, do, dht)
    expected = BACKENDS["pallas"].gradients(inputs, do, dht)
    assert grads.keys() == expected.keys()
    for name in grads:
        np.testing.assert_array_equal(grads[name], expected[name], err_msg=name)


def test_same_bits_run_to_run() -> None:
    """Sequences of 0 to 5 chunks at K = 128 (STAGES = 2: every stage refilled), twice: the same bits."""
    inputs = MOSAIC_CASES[8].inputs("float16", seed=46)
    first, second = MOSAIC.forward(inputs), MOSAIC.forward(inputs)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def _call(**options):
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule

    dtype = options.pop("dtype", jnp.float16)
    K, V = options.pop("K", 64), 64
    q = jnp.zeros((1, 64, 1, K), dtype)
    v = jnp.zeros((1, 64, 1, V), dtype)
    g = jnp.zeros((1, 64, 1), jnp.float32)
    return chunk_gated_delta_rule(q, q, v, g, g, lowering="mosaic_gpu", **options)


@pytest.mark.parametrize("options, message", [
    (dict(dtype="float32"), r"q: expected dtype in \('float16', 'bfloat16'\) with lowering='mosaic_gpu'"),
    (dict(K=32), r"K, V: expected each in \(64, 128\) with lowering='mosaic_gpu'; got K = 32, V = 64"),
    (dict(axis_name="seq"), r"axis_name: expected None with lowering='mosaic_gpu'"),
    (dict(initial_state=np.zeros((2, 1, 64, 64), np.float32), state_indices=np.zeros(1, np.int32)),
     r"state_indices: expected None with lowering='mosaic_gpu'"),
], ids=["float32", "K32", "axis_name", "state_pool"])
def test_refusals(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{OP}: {message}"):
        _call(**options)


def test_off_an_sm90_gpu_it_says_so() -> None:
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("JAX's default device is a GPU")
    with pytest.raises(ValueError, match=rf"^{OP}: device: expected an sm_90 GPU \(wgmma\) or interpret=True"):
        _call(interpret=False)


# The default path (lowering=None, gdn.pallas.forward.default_forward_lowering): where triton_call runs, the Mosaic
# GPU walk for dense inputs it takes. Off a GPU both answers are stood in for here.
_PLAIN_CALL = {"interpret": None, "scale": 0.5, "softplus_beta": spec.SOFTPLUS_BETA,
               "softplus_threshold": spec.SOFTPLUS_THRESHOLD, "axis_name": None, "state_indices": None}


@pytest.mark.parametrize("triton_call_runs, mosaic_takes, dense, expected", [
    (True, True, True, "mosaic_gpu"),
    (True, True, False, "triton_call"),
    (True, False, True, "triton_call"),
    (False, True, True, "triton"),
], ids=["dense", "varlen", "not-taken", "no-triton_call"])
def test_the_default_takes_the_mosaic_walk_for_dense_inputs(monkeypatch: pytest.MonkeyPatch, triton_call_runs: bool,
                                                             mosaic_takes: bool, dense: bool, expected: str) -> None:
    from gdn.pallas import chunk_o, forward_mosaic_gpu
    from gdn.pallas.forward import default_forward_lowering

    monkeypatch.setattr(chunk_o, "default_lowering",
                        lambda interpret, scale: "triton_call" if triton_call_runs else "triton")
    monkeypatch.setattr(forward_mosaic_gpu, "takes", lambda dtype, K, V: mosaic_takes)
    dense_inputs = ("bfloat16", 128, 128) if dense else None
    assert default_forward_lowering(**_PLAIN_CALL, dense_inputs=dense_inputs) == expected


@pytest.mark.gpu
def test_the_default_on_an_sm90_gpu() -> None:
    """Dense bf16 inputs: the default call has lowering='mosaic_gpu''s bits, and a call padded to its bucket
    (gdn.pallas.pad_forward_to_bucket) gives the same bits on the real rows and the same final state; a varlen
    call keeps triton_call's."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule, pad_forward_to_bucket
    from gdn.pallas.forward_mosaic_gpu import takes

    if jax.default_backend() != "gpu" or not takes("bfloat16", 64, 64):
        pytest.skip("needs an sm_90 GPU")
    case = ForwardCase(100, 1, 2, 64, 64)
    inputs = case.inputs("bfloat16", seed=47)
    a = MOSAIC.convert(inputs)
    names = ("q", "k", "v", "g", "beta")
    o, state = chunk_gated_delta_rule(*(a[n] for n in names), initial_state=a["initial_state"],
                                      output_final_state=True)
    o_mosaic, state_mosaic = chunk_gated_delta_rule(*(a[n] for n in names), initial_state=a["initial_state"],
                                                    output_final_state=True, lowering="mosaic_gpu")
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_mosaic))
    np.testing.assert_array_equal(np.asarray(state), np.asarray(state_mosaic))
    padded = pad_forward_to_bucket(*(np.asarray(inputs.arrays[n]).astype(inputs.dtypes[n]) for n in names))
    o_padded, state_padded = chunk_gated_delta_rule(*(jnp.asarray(x) for x in padded),
                                                    initial_state=a["initial_state"], output_final_state=True)
    np.testing.assert_array_equal(np.asarray(o_padded)[:, :case.T], np.asarray(o))
    np.testing.assert_array_equal(np.asarray(state_padded), np.asarray(state))

    varlen = forward_varlen((40, 60), 1, 2, 64, 64).inputs("bfloat16", seed=48)
    v = MOSAIC.convert(varlen)
    args = [v[n] for n in names]
    kwargs = dict(initial_state=v["initial_state"], output_final_state=True, cu_seqlens=varlen.arrays["cu_seqlens"])
    o_default, _ = chunk_gated_delta_rule(*args, **kwargs)
    o_call, _ = chunk_gated_delta_rule(*args, **kwargs, lowering="triton_call")
    np.testing.assert_array_equal(np.asarray(o_default), np.asarray(o_call))


def test_without_the_final_state() -> None:
    inputs = MOSAIC_CASES[3].inputs("float16", seed=49)
    o, state = MOSAIC.forward(inputs, output_final_state=False)
    assert state is None
    assert_close(o, forward_reference(inputs)[0], OP, "float16", "o")


def test_gates_at_their_extremes() -> None:
    """−∞ gates (a reset: the state starts over) and −80 (everything before decays to nothing) inside chunks and
    on a chunk's last row: the float64 recurrence's o and final state."""
    case = ForwardCase(130, 1, 2, 64, 64)
    inputs = case.inputs("float16", seed=50)
    g = inputs.arrays["g"].copy()
    g[:, 10] = -np.inf
    g[:, 63] = -np.inf
    g[:, 100] = -80.0
    inputs = inputs.replace(g=g)
    o, state = MOSAIC.forward(inputs)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, OP, "float16", "o")
    assert_close(state, state_ref, OP, "float16", "final state")


def test_tokens_without_chunk_rows() -> None:
    """A device cu_seqlens with an empty chunk_indices (the contract allows it under a caller's jit): no chunk is
    walked, o is zero and the final state is the initial one, as with the Pallas kernels."""
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule

    inputs = forward_varlen((5, 3), 1, 2, 64, 64).inputs("float16", seed=51)
    a = MOSAIC.convert(inputs)
    calls = {lowering: chunk_gated_delta_rule(
        *(a[n] for n in ("q", "k", "v", "g", "beta")), initial_state=a["initial_state"], output_final_state=True,
        cu_seqlens=jnp.asarray(inputs.arrays["cu_seqlens"]), chunk_indices=jnp.zeros((0, 2), jnp.int32),
        lowering=lowering) for lowering in ("mosaic_gpu", "triton")}
    for got, expected in zip(calls["mosaic_gpu"], calls["triton"]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
