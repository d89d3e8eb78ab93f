"""chunk_gated_delta_rule's serving arguments (gdn.common.spec, as decode_step's): a state pool read at
state_indices and written back (torch in place, JAX donated), padded sequences, the raw gates computed in the
kernels and q/k L2-normalized in them — against the float64 recurrence fed the same raw inputs, in one piece and
in the context-parallel path's pieces, over both backends; the errors."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import reference, spec
from tests import helpers
from tests.cases import ForwardCase, OpInputs, forward_varlen, seed_of
from tests.helpers import case_params, dtype_params, skip_unsupported

OP = spec.FORWARD_OP

POOL_CASES = [
    # varlen with an empty, a padded and a 1-token sequence, a chunk boundary crossed
    (forward_varlen((70, 0, 130, 5, 1), 2, 4, 16, 16), (3, 0, -1, 6, 7)),
    # dense rows, grouped heads
    (ForwardCase(65, 1, 2, 32, 32, B=2), (5, 1)),
]


def pool_inputs(case: ForwardCase, indices: tuple[int, ...], dtype: str, rows: int = 9) -> OpInputs:
    """case's inputs with initial_state a pool of `rows` N(0, 1) states read at state_indices."""
    inputs = case.inputs(dtype, seed=seed_of(case.id))
    pool = np.random.default_rng(7).standard_normal((rows, case.HV, case.K, case.V)).astype(np.float32)
    inputs = inputs.replace(initial_state=pool, state_indices=np.array(indices, np.int32))
    inputs.dtypes["state_indices"] = "int32"
    return inputs


def raw_gate_inputs(inputs: OpInputs, qk_scale: float = 1.0) -> OpInputs:
    """inputs with g, beta replaced by raw gates a, b [B, T, HV] and A_log, dt_bias [HV] (q and k scaled by
    qk_scale: raw rows for use_qk_l2norm_in_kernel)."""
    a = inputs.arrays
    rng = np.random.default_rng(11)
    HV = a["v"].shape[2]
    raw = {"a": rng.standard_normal(a["g"].shape).astype(np.float32),
           "b": rng.standard_normal(a["g"].shape).astype(np.float32),
           "A_log": (0.5 * rng.standard_normal(HV)).astype(np.float32),
           "dt_bias": rng.standard_normal(HV).astype(np.float32)}
    out = inputs.replace(g=None, beta=None, q=a["q"] * qk_scale, k=a["k"] * qk_scale, **raw)
    out.dtypes.update({n: "float32" for n in raw})
    return out


def reference_forward(inputs: OpInputs, use_qk_l2norm_in_kernel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    a = inputs.arrays
    return reference.recurrent_gated_delta_rule(
        a["q"], a["k"], a["v"], a["g"], a["beta"], inputs.scale, a["initial_state"], True, a["cu_seqlens"],
        state_indices=a.get("state_indices"), a=a.get("a"), b=a.get("b"), A_log=a.get("A_log"),
        dt_bias=a.get("dt_bias"), use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def sequence_rows(inputs: OpInputs, n: int) -> tuple[int, slice]:
    """(batch row, token rows) of sequence n."""
    cu = inputs.arrays["cu_seqlens"]
    return (n, slice(None)) if cu is None else (0, slice(int(cu[n]), int(cu[n + 1])))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case, indices", POOL_CASES, ids=lambda x: getattr(x, "id", str(x)))
def test_pool_matches_reference(backend, case: ForwardCase, indices: tuple[int, ...], dtype: str) -> None:
    """Each sequence starts from its pool row and ends there; rows no index names stay bit-identical; a padded
    sequence (negative index) has o rows zero and touches no row."""
    skip_unsupported(backend, dtype)
    inputs = pool_inputs(case, indices, dtype)
    o, pool = backend.forward(inputs)
    o_ref, pool_ref = reference_forward(inputs)
    helpers.assert_close(o, o_ref, OP, dtype, "o")
    helpers.assert_close(pool, pool_ref, OP, dtype, "pool")
    pool_in = inputs.arrays["initial_state"]
    untouched = np.setdiff1d(np.arange(len(pool_in)), [i for i in indices if i >= 0])
    assert np.array_equal(pool[untouched], pool_in[untouched]), "pool rows no sequence names are bit-identical"
    for n, index in enumerate(indices):
        if index < 0:
            assert not o[sequence_rows(inputs, n)].any(), f"padded sequence {n}: o rows zero"


@pytest.mark.parametrize("pieces", [1, 2])
def test_pool_in_pieces(backend, pieces: int) -> None:
    """The context-parallel path reads each sequence's start from the pool and writes its end back, as one
    piece does."""
    case, indices = POOL_CASES[0]
    inputs = pool_inputs(case, indices, "float32")
    o, pool = backend.forward_in_pieces(inputs, pieces)
    o_ref, pool_ref = reference_forward(inputs)
    helpers.assert_close(o, o_ref, OP, "float32", "o")
    helpers.assert_close(pool, pool_ref, OP, "float32", "pool")


def test_pool_without_final_state_is_read_only(backend) -> None:
    case, indices = POOL_CASES[0]
    inputs = pool_inputs(case, indices, "float32")
    o, state = backend.forward(inputs, output_final_state=False)
    helpers.assert_close(o, reference_forward(inputs)[0], OP, "float32", "o")
    assert state is None


@pytest.mark.parametrize("l2norm", [pytest.param(False, marks=pytest.mark.slow), True], ids=["gates", "gates+l2norm"])
@pytest.mark.parametrize("case", case_params([forward_varlen((70, 1, 0, 64), 2, 4, 32, 16),
                                              ForwardCase(130, 1, 2, 16, 32)], quick=(0,)))
def test_raw_gates_and_l2norm_match_reference(backend, case: ForwardCase, l2norm: bool) -> None:
    """g = −exp(A_log)·softplus(a + dt_bias), beta = sigmoid(b) computed in the kernels, and with
    use_qk_l2norm_in_kernel raw q, k rows (norm 3) normalized there: the reference fed the same raw inputs."""
    inputs = raw_gate_inputs(case.inputs("float32", seed=seed_of(case.id)), qk_scale=3.0 if l2norm else 1.0)
    o, state = backend.forward(inputs, use_qk_l2norm_in_kernel=l2norm)
    o_ref, state_ref = reference_forward(inputs, use_qk_l2norm_in_kernel=l2norm)
    helpers.assert_close(o, o_ref, OP, "float32", "o")
    helpers.assert_close(state, state_ref, OP, "float32", "final_state")


@pytest.mark.parametrize("dtype", dtype_params())
def test_every_serving_argument_at_once(backend, dtype: str) -> None:
    """A pool, raw gates and in-kernel normalization together (what a serving engine's prefill passes)."""
    skip_unsupported(backend, dtype)
    case, indices = POOL_CASES[0]
    inputs = raw_gate_inputs(pool_inputs(case, indices, dtype), qk_scale=2.0)
    o, pool = backend.forward(inputs, use_qk_l2norm_in_kernel=True)
    o_ref, pool_ref = reference_forward(inputs, use_qk_l2norm_in_kernel=True)
    helpers.assert_close(o, o_ref, OP, dtype, "o")
    helpers.assert_close(pool, pool_ref, OP, dtype, "pool")


SERVING_ERRORS = [
    ("pool-without-state", {"initial_state": None}, TypeError,
     r"initial_state: expected the state pool \[P, HV, K, V\] that state_indices names; got None"),
    ("index-out-of-range", {"state_indices": np.array((3, 0, -1, 9, 7), np.int32)}, ValueError,
     r"state_indices"),
    ("indices-per-sequence", {"state_indices": np.array((3, 0, -1), np.int32)}, ValueError, r"state_indices"),
    ("raw-gates-half", {"a": np.zeros((1, 206, 4), np.float32), "beta": None}, TypeError,
     r"b: expected an array; got None"),
]


@pytest.mark.parametrize("mutation", SERVING_ERRORS, ids=lambda m: m[0])
def test_serving_errors(backend, mutation: tuple) -> None:
    name, arrays, error, message = mutation
    if name == "index-out-of-range" and backend.name == "triton" and backend.on_gpu:
        pytest.skip("torch index arrays are on q's device on a GPU: masked in the kernel, not checked")
    case, indices = POOL_CASES[0]
    inputs = pool_inputs(case, indices, "float32")
    if "a" in arrays:
        inputs = inputs.replace(g=None)
        inputs.dtypes["a"] = "float32"
    inputs = inputs.replace(**arrays)
    with pytest.raises(error, match=f"^{OP}: {message}"):
        backend.forward(inputs)


def test_jax_pool_donated_under_jit() -> None:
    """Under a caller's jax.jit with the pool donated, the updated pool is the output aliased to it."""
    jax = pytest.importorskip("jax")
    from gdn.pallas import chunk_gated_delta_rule

    case, indices = POOL_CASES[0]
    inputs = pool_inputs(case, indices, "float32")
    a = {n: None if x is None else jax.numpy.asarray(x) for n, x in inputs.arrays.items()}
    chunk_indices = spec.prepare_chunk_indices(inputs.arrays["cu_seqlens"])

    def prefill(pool, q, k, v, g, beta, cu_seqlens, state_indices):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, output_final_state=True,
                                      cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
                                      state_indices=state_indices)

    o, pool = jax.jit(prefill, donate_argnums=0)(*(a[n] for n in ("initial_state", "q", "k", "v", "g", "beta",
                                                                    "cu_seqlens", "state_indices")))
    o_ref, pool_ref = reference_forward(inputs)
    helpers.assert_close(np.asarray(o, np.float64), o_ref, OP, "float32", "o")
    helpers.assert_close(np.asarray(pool, np.float64), pool_ref, OP, "float32", "pool")
