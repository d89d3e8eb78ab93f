"""The recurrent gated delta rule: the float64 reference against a hand computation and against itself, then
decode_step, one test body for every backend: token by token vs the reference, across backends, the input
contract, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import reference, spec
from gdn.common.example import random_recurrent_inputs
from tests import helpers
from tests.backends import BACKENDS
from tests.cases import DECODE_CASES, QUICK_DECODE_CASES, DecodeCase, seed_of
from tests.helpers import assert_refused, assert_state_close, case_params, dtype_params

OP = spec.DECODE_OP

STEPS = 5
"""Tokens decoded per test: o is checked after each (T = 1 … 5), the state after the first and the last."""


def recurrent(a: dict, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference on a dict of random_recurrent_inputs (or a slice of one)."""
    return reference.recurrent_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], **kwargs)


# The reference: by hand, and against itself.
def test_reference_by_hand() -> None:
    """K = 2, V = 1, two tokens, one q/k head read by two value heads; S₀ = 0, scale = 1.
    t = 0: S = 0.5·0 = 0; u = 0.5·(2 − 0) = 1; S = [1, 0]ᵀ·1; o = Sᵀ[1, 1] = 1.
    t = 1: S = 0.5·[1, 0]ᵀ; u = 1·(4 − Sᵀ[1, 0]) = 3.5; S = [0.5 + 3.5, 0]ᵀ = [4, 0]ᵀ; o = Sᵀ[2, 0] = 8.
    The second value head has v negated: o and S negate (the rule is linear in v and S₀)."""
    q = np.array([[1.0, 1.0], [2.0, 0.0]]).reshape(1, 2, 1, 2)
    k = np.array([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 2, 1, 2)
    v = np.array([[2.0, -2.0], [4.0, -4.0]]).reshape(1, 2, 2, 1)
    g = np.log(np.full((1, 2, 2), 0.5))
    beta = np.array([[0.5, 0.5], [1.0, 1.0]]).reshape(1, 2, 2)
    o, state = reference.recurrent_gated_delta_rule(q, k, v, g, beta, scale=1.0, output_final_state=True)
    np.testing.assert_allclose(o.reshape(2, 2), [[1.0, -1.0], [8.0, -8.0]], rtol=1e-15)
    np.testing.assert_allclose(state.reshape(2, 2), [[4.0, 0.0], [-4.0, 0.0]], rtol=1e-15)
    assert reference.recurrent_gated_delta_rule(q, k, v, g, beta)[1] is None


def test_reference_value_head_reads_query_head_hv_div_m() -> None:
    """HV = 2H equals H = HV with every q/k head repeated for its two value heads, bit for bit."""
    a = random_recurrent_inputs(2, 6, 2, 4, 16, 16, "float32", seed=1)
    o, state = recurrent(a, initial_state=a["initial_state"], output_final_state=True)
    repeated = {**a, "q": np.repeat(a["q"], 2, axis=2), "k": np.repeat(a["k"], 2, axis=2)}
    o_rep, state_rep = recurrent(repeated, initial_state=a["initial_state"], output_final_state=True)
    assert np.array_equal(o, o_rep) and np.array_equal(state, state_rep)


@pytest.mark.parametrize("seqlens", [None, (5, 0, 9, 1)], ids=["dense-B3-T9", "varlen[5,0,9,1]"])
@pytest.mark.parametrize("split", [0, 1, 4, 9])
def test_reference_split_equals_whole(seqlens: tuple[int, ...] | None, split: int) -> None:
    """Each sequence's first `split` tokens, then the rest from their final state == all tokens at once,
    bit for bit (float64, the same operations in the same order); varlen packing == the dense rows."""
    names = ("q", "k", "v", "g", "beta")
    lengths = seqlens or (9, 9, 9)
    dense = random_recurrent_inputs(len(lengths), 9, 2, 4, 16, 32, "float32", seed=2)
    # sequence n is row n of `dense`, cut to its length
    rows = [{name: dense[name][n:n + 1, :length] for name in names} for n, length in enumerate(lengths)]

    def run(parts: list[dict], initial_state: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The reference over `parts` (one per sequence): packed varlen when seqlens, else stacked as B rows."""
        if seqlens is None:
            o, state = recurrent({n: np.concatenate([p[n] for p in parts]) for n in names},
                                 initial_state=initial_state, output_final_state=True)
            return list(o[:, None]), state
        cu = np.cumsum([0] + [p["q"].shape[1] for p in parts])
        o, state = recurrent({n: np.concatenate([p[n] for p in parts], axis=1) for n in names},
                             initial_state=initial_state, output_final_state=True, cu_seqlens=cu)
        return [o[:, s:e] for s, e in zip(cu[:-1], cu[1:])], state

    whole_o, whole_state = run(rows, dense["initial_state"])
    first_o, first_state = run([{n: r[n][:, :split] for n in names} for r in rows], dense["initial_state"])
    rest_o, rest_state = run([{n: r[n][:, split:] for n in names} for r in rows], first_state)
    for n, (whole, first, rest) in enumerate(zip(whole_o, first_o, rest_o)):
        assert np.array_equal(np.concatenate([first, rest], axis=1), whole), f"sequence {n}"
    assert np.array_equal(rest_state, whole_state)
    if seqlens is not None:
        alone = [recurrent(r, initial_state=dense["initial_state"][n:n + 1], output_final_state=True)
                 for n, r in enumerate(rows)]
        assert all(np.array_equal(o, whole) for (o, _), whole in zip(alone, whole_o))
        assert np.array_equal(np.concatenate([s for _, s in alone]), whole_state)


# decode_step in every backend.
def skip_unsupported(backend, dtype: str) -> None:
    helpers.skip_unsupported(backend, dtype, OP)


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str, what: str = "vs reference") -> None:
    helpers.assert_close(out, ref, OP, dtype, what)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(DECODE_CASES, QUICK_DECODE_CASES))
def test_decode_matches_reference(backend, case: DecodeCase, dtype: str) -> None:
    """STEPS tokens decoded one call at a time from a random state, each call fed the last one's new state."""
    skip_unsupported(backend, dtype)
    tokens = case.tokens(dtype, STEPS, seed=seed_of(case.id))
    a = tokens.arrays
    ref_o, ref_state = recurrent(a, initial_state=a["initial_state"], output_final_state=True)
    state = a["initial_state"]
    for t in range(STEPS):
        o, state = backend.decode_step(case.step(tokens, t, state.astype(np.float32)))
        assert_close(o, ref_o[:, t], dtype, f"o of token {t}")
        if t == 0:
            first = recurrent({n: a[n][:, :1] for n in ("q", "k", "v", "g", "beta")},
                              initial_state=a["initial_state"], output_final_state=True)[1]
            assert_state_close(state, first, "state after token 0")
    assert_state_close(state, ref_state, f"state after token {STEPS - 1}")


def test_decode_explicit_scale_and_empty_batch(backend) -> None:
    case = DECODE_CASES[1]
    tokens = case.tokens("float32", 1, seed=3)
    tokens.scale = 0.37
    a = tokens.arrays
    ref_o, ref_state = recurrent(a, scale=0.37, initial_state=a["initial_state"], output_final_state=True)
    o, state = backend.decode_step(case.step(tokens, 0, a["initial_state"]))
    assert_close(o, ref_o[:, 0], "float32")
    assert_state_close(state, ref_state)
    empty = case.step(tokens, 0, a["initial_state"])
    empty = empty.replace(**{n: x[:0] for n, x in empty.arrays.items()})
    o, state = backend.decode_step(empty)
    assert o.shape == (0, case.HV, case.V) and state.shape == (0, case.HV, case.K, case.V)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", DECODE_CASES[1:5], ids=lambda c: c.id)
def test_decode_triton_equals_pallas(case: DecodeCase, dtype: str) -> None:
    triton, pallas = BACKENDS["triton"], BACKENDS["pallas"]
    skip_unsupported(triton, dtype)
    tokens = case.tokens(dtype, 1, seed=seed_of(case.id) + 7)
    step = case.step(tokens, 0, tokens.arrays["initial_state"])
    (o_triton, state_triton), (o_pallas, state_pallas) = triton.decode_step(step), pallas.decode_step(step)
    # Both accumulate in float32 and round o to v's dtype once; they may differ by an ulp of it.
    assert_close(o_pallas, o_triton, dtype, "o: pallas vs triton")
    assert_state_close(state_pallas, state_triton, "state: pallas vs triton")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_deterministic(backend, dtype: str) -> None:
    skip_unsupported(backend, dtype)
    case = DECODE_CASES[4]
    tokens = case.tokens(dtype, 1, seed=4)
    step = case.step(tokens, 0, tokens.arrays["initial_state"])
    first_o, first_state = backend.decode_step(step)
    for _ in range(2):
        o, state = backend.decode_step(step)
        assert np.array_equal(o, first_o) and np.array_equal(state, first_state)


# The input contract: each mutation of a valid call, the error type and the argument the message must name.
_BASE = DecodeCase(N=2, H=2, HV=4, K=16, V=16)


def _mutations() -> list[tuple[str, DecodeCase, dict, dict, type[Exception], str]]:
    """(id, base case, array replacements, dtype replacements, error, message regex)."""
    a = _BASE.inputs("float32").arrays
    return [(name, _BASE, arrays, dtypes, error, message) for name, arrays, dtypes, error, message in [
        ("q-rank", {"q": a["q"][0]}, {}, ValueError, r"q: expected a rank-3 array \[T, H, K\]; got shape \(2, 16\)"),
        ("k-shape", {"k": a["k"][:, :1]}, {}, ValueError, r"k: expected the shape of q"),
        ("v-T", {"v": a["v"][:1]}, {}, ValueError, r"v: expected v.shape\[0\] \(T\) = 2"),
        ("HV-not-multiple", {n: a[n][:, :3] for n in ("v", "g", "beta", "state")}, {}, ValueError,
         r"v: expected HV = v.shape\[1\] a positive multiple of H = q.shape\[1\] = 2; got HV = 3"),
        ("K-too-large", {"q": np.zeros((2, 2, 300), np.float32), "k": np.zeros((2, 2, 300), np.float32)}, {},
         ValueError, r"K \(q.shape\[2\]\): expected a head size in \[16, 256\]; got 300"),
        ("v-dtype-mismatch", {}, {"v": "float16"}, TypeError, r"v: expected the dtype of q \(float32\)"),
        ("g-not-fp32", {}, {"g": "float16"}, TypeError, r"g: expected dtype in \('float32',\)"),
        ("g-missing", {"g": None}, {}, TypeError,
         r"g: expected an array \(or the raw gates a, b with A_log and dt_bias\); got None"),
        ("beta-shape", {"beta": a["beta"][:, :2]}, {}, ValueError, r"beta: expected beta.shape = \(2, 4\)"),
        ("state-bf16", {}, {"state": "bfloat16"}, TypeError, r"state: expected dtype in \('float32',\)"),
        ("state-shape", {"state": a["state"][..., :8]}, {}, ValueError,
         r"state: expected state.shape = \(2, 4, 16, 16\)"),
    ]]


@pytest.mark.parametrize("mutation", _mutations(), ids=lambda m: m[0])
def test_decode_contract_errors(backend, mutation) -> None:
    assert_refused(backend.decode_step, mutation, OP)
