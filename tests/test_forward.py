"""chunk_gated_delta_rule, one test body for every backend: the token-by-token float64 reference (o and final
state), each stage against its float64 reference, prefill followed by decode steps, the two backends against
each other, jax.jit, determinism and the input contract."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import reference, spec
from tests import helpers
from tests.backends import BACKENDS
from tests.cases import (
    FORWARD_CASES,
    LARGE_FORWARD_CASES,
    QUICK_FORWARD_CASES,
    ForwardCase,
    OpInputs,
    forward_varlen,
    seed_of,
)
from tests.helpers import assert_refused, case_params, dtype_params, forward_reference, skip_unsupported

OP = spec.FORWARD_OP


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str, what: str) -> None:
    helpers.assert_close(out, ref, OP, dtype, what)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(FORWARD_CASES, QUICK_FORWARD_CASES))
def test_matches_recurrent_reference(backend, case: ForwardCase, dtype: str) -> None:
    skip_unsupported(backend, dtype)
    inputs = case.inputs(dtype, seed=seed_of(case.id))
    o, final_state = backend.forward(inputs)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, dtype, "o")
    assert_close(final_state, state_ref, dtype, "final_state")


@pytest.mark.slow  # float32 stage by stage: the interpreters check the algorithm, the bf16 matrix the GPU kernels
@pytest.mark.parametrize("case", [FORWARD_CASES[3], FORWARD_CASES[6]], ids=lambda c: c.id)
def test_stages_match_their_references(backend, case: ForwardCase) -> None:
    """prepare (g_c, w, u: (I + A)⁻¹ against a dense float64 solve) and states (h, v_new, final state) on
    the reference's own inputs, so each stage is checked alone."""
    inputs = case.inputs("float32", seed=5)
    a = inputs.arrays
    out = backend.stages(inputs)
    g_cum, w, u = reference.chunk_prepare(a["k"], a["v"], a["g"], a["beta"], a["cu_seqlens"])
    h, v_new, final_state = reference.chunk_states(a["k"], out["w"], out["u"], out["g_cum"],
                                                   a["initial_state"], a["cu_seqlens"])
    for name, ref in (("g_cum", g_cum), ("w", w), ("u", u), ("h", h), ("v_new", v_new),
                      ("final_state", final_state)):
        assert_close(out[name], ref, "float32", name)


@pytest.mark.slow
def test_inverse_is_exact_for_equal_keys(backend) -> None:
    """All keys equal, beta = 1, no decay: A is the all-ones strictly lower matrix, whose (I + A)⁻¹ is
    I − (the ones just below the diagonal) — so w_t = k − k = 0 for t > 0 within a chunk and u_t = v_t − v_{t−1}.
    The kernels' blocked substitution must reproduce it across the sub-block boundaries (rows 16, 32, 48)."""
    case = ForwardCase(128, 1, 1, 16, 16)
    inputs = case.inputs("float32", seed=6)
    a = inputs.arrays
    k = np.zeros_like(a["k"])
    k[..., 0] = 1.0
    inputs = inputs.replace(k=k, g=np.zeros_like(a["g"]), beta=np.ones_like(a["beta"]))
    out = backend.stages(inputs)
    v = inputs.arrays["v"][0, :, 0]
    expected_u = v.copy()
    for t0 in range(0, case.T, spec.CHUNK_SIZE):
        expected_u[t0 + 1:t0 + spec.CHUNK_SIZE] -= v[t0:t0 + spec.CHUNK_SIZE - 1]
    np.testing.assert_allclose(out["u"][0, :, 0], expected_u, atol=1e-5)
    expected_w = np.zeros((case.T, case.K))
    expected_w[::spec.CHUNK_SIZE, 0] = 1.0
    np.testing.assert_allclose(out["w"][0, :, 0], expected_w, atol=1e-5)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("seqlens", [(1, 64, 65, 129), pytest.param((2, 63), marks=pytest.mark.slow)], ids=str)
def test_prefill_then_decode_equals_forward(backend, seqlens: tuple[int, ...], dtype: str) -> None:
    """Prefill every sequence but its last token (one packed varlen call), then decode_step those last tokens
    from the prefill's final states: their o and the states after them match the forward over all tokens (a
    padded tail chunk must not leak into the state: transformers #46190). A 1-token sequence prefills nothing."""
    skip_unsupported(backend, dtype)
    case = ForwardCase(sum(seqlens), 2, 4, 32, 32, seqlens=seqlens)
    full = case.inputs(dtype, seed=seed_of(str(seqlens)))
    last = case.cu_seqlens[1:] - 1  # each sequence's last token
    prefix_rows = np.setdiff1d(np.arange(case.T), last)
    per_token = ("q", "k", "v", "g", "beta")
    prefix = full.replace(**{n: full.arrays[n][:, prefix_rows] for n in per_token},
                          cu_seqlens=(case.cu_seqlens - np.arange(len(seqlens) + 1)).astype(np.int32))
    o_full, state_full = backend.forward(full)
    _, prefill_state = backend.forward(prefix)
    step = OpInputs({**{n: full.arrays[n][0, last] for n in per_token}, "state": prefill_state.astype(np.float32)},
                    {**full.dtypes, "state": "float32"})
    o_step, state_step = backend.decode_step(step)
    assert_close(o_step, o_full[0, last], dtype, "o of the decoded tokens")
    assert_close(state_step, state_full, dtype, "final state after decode")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params([FORWARD_CASES[4], FORWARD_CASES[6]], quick=(1,)))
def test_backends_agree(case: ForwardCase, dtype: str) -> None:
    """Triton and Pallas on the same inputs: o and final state within the dtype's tolerance of each other."""
    triton, pallas = BACKENDS["triton"], BACKENDS["pallas"]
    if not triton.supports(dtype):
        pytest.skip(f"triton does not run {dtype} on this machine")
    inputs = case.inputs(dtype, seed=7)
    o_t, s_t = triton.forward(inputs)
    o_p, s_p = pallas.forward(inputs)
    assert_close(o_t, o_p, dtype, "o, triton vs pallas")
    assert_close(s_t, s_p, dtype, "final_state, triton vs pallas")


def test_without_final_state_and_deterministic(backend) -> None:
    inputs = FORWARD_CASES[6].inputs("float16", seed=8)
    o, state = backend.forward(inputs, output_final_state=False)
    assert state is None
    assert np.array_equal(o, backend.forward(inputs, output_final_state=False)[0])


@pytest.mark.slow
def test_pallas_under_jit_with_padded_chunk_indices() -> None:
    """jax.jit over a varlen batch: chunk_indices padded to a static length (PAD_CHUNK rows) and traced
    cu_seqlens give the eager result, bit for bit."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule

    case = FORWARD_CASES[6]
    inputs = case.inputs("float32", seed=9)
    args = {n: None if x is None else jnp.asarray(x, inputs.dtypes[n]) for n, x in inputs.arrays.items()}
    eager_o, eager_state = chunk_gated_delta_rule(**args, output_final_state=True)
    chunk_indices = jnp.asarray(spec.prepare_chunk_indices(case.cu_seqlens, num_rows=len(
        spec.prepare_chunk_indices(case.cu_seqlens)) + 3))
    jitted = jax.jit(lambda q, k, v, g, beta, s0, cu, ci: chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_indices=ci))
    o, state = jitted(args["q"], args["k"], args["v"], args["g"], args["beta"], args["initial_state"],
                      args["cu_seqlens"], chunk_indices)
    assert np.array_equal(np.asarray(o), np.asarray(eager_o))
    assert np.array_equal(np.asarray(state), np.asarray(eager_state))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_FORWARD_CASES, ids=lambda c: c.id)
def test_large_bf16_matches_recurrent_reference(backend, case: ForwardCase) -> None:
    inputs = case.inputs("bfloat16", seed=10)
    o, final_state = backend.forward(inputs)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, "bfloat16", "o")
    assert_close(final_state, state_ref, "bfloat16", "final_state")
    print(f"{backend.name} {case.id} bf16: o rel err {np.abs(o - o_ref).max() / np.abs(o_ref).max():.3g}, "
          f"state rel err {np.abs(final_state - state_ref).max() / np.abs(state_ref).max():.3g}")


# The input contract of the forward: what chunk_fwd_o's contract tests do not already cover through the
# shared checks (contract._check_heads, contract._check_varlen), each mutation with the error and the argument named.
_BASE = ForwardCase(70, 2, 4, 16, 16)
_VARLEN_BASE = ForwardCase(70, 2, 4, 16, 16, seqlens=(30, 40))


def _mutations() -> list[tuple[str, ForwardCase, dict, dict, type[Exception], str]]:
    """(id, base case, array replacements, dtype replacements, error, message regex)."""
    a = _BASE.inputs("float32").arrays
    return [
        ("k-shape", _BASE, {"k": a["k"][:, :69]}, {}, ValueError, r"k: expected the shape of q"),
        ("HV-not-multiple", _BASE, {n: a[n][:, :, :3] for n in ("v", "g", "beta")}
         | {"initial_state": a["initial_state"][:, :3]}, {}, ValueError, r"v: expected HV = v.shape\[2\]"),
        ("g-missing", _BASE, {"g": None}, {}, TypeError,
         r"g: expected an array \(or the raw gates a, b with A_log and dt_bias\); got None"),
        ("g-not-fp32", _BASE, {}, {"g": "float16"}, TypeError, r"g: expected dtype in \('float32',\)"),
        ("beta-shape", _BASE, {"beta": a["beta"][:, :, :2]}, {}, ValueError, r"beta: expected beta.shape"),
        ("beta-int", _BASE, {}, {"beta": "int32"}, TypeError, r"beta: expected dtype in"),
        ("initial-state-fp16", _BASE, {}, {"initial_state": "float16"}, TypeError,
         r"initial_state: expected dtype in \('float32',\)"),
        ("initial-state-per-sequence", _VARLEN_BASE, {"initial_state": a["initial_state"]}, {}, ValueError,
         r"initial_state: expected initial_state.shape = \(2, 4, 16, 16\)"),
        ("cu-end", _VARLEN_BASE, {"cu_seqlens": np.array([0, 30, 60], np.int32)}, {}, ValueError,
         r"cu_seqlens: expected cu_seqlens\[-1\] = T = 70"),
    ]


@pytest.mark.parametrize("mutation", _mutations(), ids=lambda m: m[0])
def test_contract_errors(backend, mutation) -> None:
    assert_refused(backend.forward, mutation, OP)


def test_no_tokens_returns_the_initial_state(backend) -> None:
    """T = 0 (B = 2 empty rows): o is empty and every final state is the initial one, unchanged."""
    inputs = ForwardCase(0, 1, 2, 16, 16, B=2).inputs("float32", seed=11)
    o, final_state = backend.forward(inputs)
    assert o.shape == (2, 0, 2, 16)
    assert np.array_equal(final_state, inputs.arrays["initial_state"])


@pytest.mark.parametrize("gates", ["zero", "minus80", "alternating", "beta-extremes"])
def test_extreme_gates_and_beta(backend, gates: str) -> None:
    """No decay at all (g = 0: cumulative gates stay 0, S only grows by the delta rule), full decay within a
    token (g = −80: exp(g_c) underflows to 0 inside the chunk), the two alternating between neighbours, and
    beta at its ends (0: the token writes nothing; 1: it replaces its key's value): finite and within
    tolerance of the float64 recurrence. exp is only ever taken of g_i − g_j ≤ 0 or g_c ≤ 0, so nothing
    overflows however negative the gates get."""
    case = ForwardCase(150, 1, 2, 32, 32, B=2)
    inputs = case.inputs("float32", seed=12)
    g, beta = inputs.arrays["g"], inputs.arrays["beta"]
    if gates == "zero":
        g = np.zeros_like(g)
    elif gates == "minus80":
        g = np.full_like(g, -80.0)
    elif gates == "alternating":
        g = np.where(np.arange(case.T)[None, :, None] % 2 == 0, 0.0, -80.0).astype(np.float32) + 0 * g
    else:
        beta = (np.arange(case.T)[None, :, None] % 2 + 0 * beta).astype(np.float32)
    inputs = inputs.replace(g=g, beta=beta)
    o, final_state = backend.forward(inputs)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, "float32", f"o, {gates}")
    assert_close(final_state, state_ref, "float32", f"final_state, {gates}")


@pytest.mark.slow
def test_beta_in_the_input_dtype(backend) -> None:
    """beta may come in q's dtype (a model's sigmoid output in fp16/bf16): the same result as beta rounded to
    that dtype and passed as float32, bit for bit (the kernels read beta into float32)."""
    inputs = FORWARD_CASES[6].inputs("float16", seed=13)
    rounded = inputs.replace(beta=inputs.arrays["beta"].astype(np.float16).astype(np.float32))
    as_fp16 = rounded.replace()
    as_fp16.dtypes["beta"] = "float16"
    o_32, state_32 = backend.forward(rounded)
    o_16, state_16 = backend.forward(as_fp16)
    assert np.array_equal(o_16, o_32) and np.array_equal(state_16, state_32)


@pytest.mark.slow
def test_triton_reads_non_contiguous_inputs_as_their_values() -> None:
    """A transposed view is read as the tensor it is (copied once), never with the wrong strides: the same bits
    as its contiguous copy."""
    import torch

    from gdn.triton import chunk_gated_delta_rule

    inputs = BACKENDS["triton"].convert(FORWARD_CASES[2].inputs("float32", seed=14))
    v_view = inputs["v"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, strides of [B, T, V, HV]
    assert torch.equal(v_view, inputs["v"]) and not v_view.is_contiguous()
    o_view, _ = chunk_gated_delta_rule(inputs["q"], inputs["k"], v_view, inputs["g"], inputs["beta"])
    o, _ = chunk_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"])
    assert torch.equal(o_view, o)


# The context-parallel path, forced on small inputs: every sequence cut into P pieces (more pieces than chunks
# included: empty pieces pass their start state on), against the reference and run to run. The cases share
# their shapes with the poison and reset tests below, so the Pallas interpreter compiles each program once.
_PIECE_CASE = ForwardCase(200, 1, 2, 32, 32)
_PIECE_VARLEN_CASE = forward_varlen((130, 0, 1, 257, 64), 1, 2, 32, 16)


@pytest.mark.parametrize("case, pieces", [(_PIECE_CASE, 2), (_PIECE_CASE, 8), (_PIECE_VARLEN_CASE, 3)],
                         ids=lambda x: x.id if isinstance(x, ForwardCase) else f"P{x}")
def test_context_parallel_path_matches_the_reference(backend, case: ForwardCase, pieces: int) -> None:
    inputs = case.inputs("float32", seed=21)
    o, state = backend.forward_in_pieces(inputs, pieces)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, "float32", f"o, {pieces} pieces")
    assert_close(state, state_ref, "float32", f"final state, {pieces} pieces")
    o_again, state_again = backend.forward_in_pieces(inputs, pieces)
    assert np.array_equal(o, o_again) and np.array_equal(state, state_again), "not bit-identical run to run"


@pytest.mark.slow  # the measured alternative to the default walk
@pytest.mark.parametrize("pieces", [1, 3])
def test_fused_walk_matches_the_reference(backend, pieces: int) -> None:
    """The walk that computes o itself (tilings.FUSED_WALK, the measured alternative to storing h for
    chunk_fwd_o), in one piece and three, against the reference."""
    inputs = _PIECE_VARLEN_CASE.inputs("float32", seed=26)
    o, state = backend.forward_in_pieces(inputs, pieces, fused=True)
    o_ref, state_ref = forward_reference(inputs)
    assert_close(o, o_ref, "float32", "o")
    assert_close(state, state_ref, "float32", "final state")


@pytest.mark.slow
def test_context_parallel_path_in_16_bit(backend) -> None:
    """fp16 in 3 pieces of uneven length, without the final state, against the reference."""
    skip_unsupported(backend, "float16")
    inputs = _PIECE_VARLEN_CASE.inputs("float16", seed=22)
    o, state = backend.forward_in_pieces(inputs, 3, output_final_state=False)
    assert state is None
    assert_close(o, forward_reference(inputs)[0], "float16", "o")


_POISONED = ("v", "k", "g", "beta", "q")


@pytest.mark.parametrize("pieces", [1, 2])
def test_a_non_finite_token_never_reaches_earlier_tokens(backend, pieces: int) -> None:
    """NaN in one token's inputs (serving engines pad with uninitialized memory), batch row b poisoned in
    _POISONED[b]: every earlier token's o is the reference's, finite; from that token on o is NaN wherever
    the reference's is (for q: that row alone), and the final state is NaN where the reference's is. Through
    the plain walk and the context-parallel path."""
    case = ForwardCase(200, 1, 2, 32, 32, B=len(_POISONED))
    inputs = case.inputs("float32", seed=23)
    bad = 120
    poisoned = {}
    for row, name in enumerate(_POISONED):
        poisoned[name] = poisoned.get(name, inputs.arrays[name]).copy()
        poisoned[name][row, bad] = np.nan
    inputs = inputs.replace(**poisoned)
    o_ref, state_ref = forward_reference(inputs)
    o, state = backend.forward_in_pieces(inputs, pieces)
    assert_close(o[:, :bad], o_ref[:, :bad], "float32", "o before the NaN token")
    assert np.isnan(o[:, bad:][np.isnan(o_ref[:, bad:])]).all()
    assert np.isnan(state[np.isnan(state_ref)]).all()
    assert np.isfinite(o[-1, bad + 1:]).all() and np.isfinite(state[-1]).all(), "q poisons its own row only"


@pytest.mark.parametrize("pieces", [1, 2])
def test_minus_infinity_gate_is_a_reset(backend, pieces: int) -> None:
    """Gates of −inf (exp(g) = 0: the state is wiped) at three tokens, two of them adjacent: finite, and the
    reference's o and final state, through the plain walk and the context-parallel path."""
    inputs = _PIECE_CASE.inputs("float32", seed=24)
    g = inputs.arrays["g"].copy()
    g[:, 70] = -np.inf
    g[:, 150:152] = -np.inf
    inputs = inputs.replace(g=g)
    o_ref, state_ref = forward_reference(inputs)
    o, state = backend.forward_in_pieces(inputs, pieces)
    assert_close(o, o_ref, "float32", "o")
    assert_close(state, state_ref, "float32", "final state")


@pytest.mark.gpu
@pytest.mark.slow
def test_large_context_parallel_forward_matches_the_plain_walk_closely() -> None:
    """One long sequence with few heads, where tilings.context_pieces cuts it on a GPU: the public call (in
    pieces) against the plain walk (one piece) and the reference, in bf16."""
    case = ForwardCase(16384, 2, 8, 128, 128)
    triton = BACKENDS["triton"]
    inputs = case.inputs("bfloat16", seed=25)
    o, state = triton.forward(inputs)
    o_one, state_one = triton.forward_in_pieces(inputs, 1)
    assert_close(o, o_one, "bfloat16", "o, pieces vs one walk")
    assert_close(state, state_one, "bfloat16", "final state, pieces vs one walk")


def test_untrusted_device_index_values_stay_in_bounds(backend) -> None:
    """cu_seqlens values that were never checked on the host (device arrays) are clamped into [0, T] by the
    kernels, and h rows past its end are not written: a cu_seqlens running past T, with the states stored (the
    backward's recompute), reads and writes nothing outside the arrays (the GPU run under compute-sanitizer
    checks the bytes; here, that it runs and leaves the good first sequence exact)."""
    case = forward_varlen((70, 64, 30), 1, 2, 16, 16)
    inputs = case.inputs("float32", seed=27)
    good = backend.stages(inputs)
    out = backend.stages(inputs, kernel_cu_seqlens=np.array([0, 70, 200, 4 * case.T], np.int32))
    np.testing.assert_array_equal(out["h"][:, :2], good["h"][:, :2])  # the first sequence, untouched
    assert out["h"].shape == good["h"].shape
