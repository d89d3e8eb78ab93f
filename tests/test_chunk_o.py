"""chunk_fwd_o, one test body for every backend: the float64 reference, determinism, the input contract."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec, tilings
from tests.backends import BACKENDS
from tests.cases import CASES, LARGE_CASES, QUICK_CASES, Case, seed_of
from tests.helpers import assert_close, assert_refused, case_params, chunk_o_reference, dtype_params, skip_unsupported

OP = spec.CHUNK_O_OP


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(CASES, QUICK_CASES))
def test_matches_reference(backend, case: Case, dtype: str) -> None:
    skip_unsupported(backend, dtype)
    inputs = case.inputs(dtype, seed=seed_of(case.id))
    assert_close(backend.run(inputs), chunk_o_reference(inputs), OP, dtype)


@pytest.mark.parametrize("case", case_params([c for c in CASES if c.seqlens], quick=(0,)))
def test_varlen_with_given_and_padded_chunk_indices(backend, case: Case) -> None:
    """chunk_indices passed by the caller, and padded to a static length with PAD_CHUNK rows (h padded too)."""
    inputs = case.inputs("float32", seed=1)
    ref = chunk_o_reference(inputs)
    given = inputs.replace(chunk_indices=spec.prepare_chunk_indices(case.cu_seqlens))
    assert_close(backend.run(given), ref, OP, "float32", "given chunk_indices")
    extra = 3
    h = inputs.arrays["h"]
    padded = inputs.replace(
        chunk_indices=spec.prepare_chunk_indices(case.cu_seqlens, num_rows=case.state_rows + extra),
        h=np.concatenate([h, np.full((1, extra) + h.shape[2:], np.nan, np.float32)], axis=1))
    assert_close(backend.run(padded), ref, OP, "float32", "padded chunk_indices")


def test_explicit_scale(backend) -> None:
    inputs = CASES[8].inputs("float32", seed=2)
    inputs.scale = 0.37
    assert_close(backend.run(inputs), chunk_o_reference(inputs), OP, "float32")


@pytest.mark.parametrize("case", case_params([CASES[5], CASES[11]], quick=(1,)))
def test_deterministic(backend, case: Case) -> None:
    inputs = case.inputs("float16", seed=3)
    first = backend.run(inputs)
    assert np.array_equal(first, backend.run(inputs))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: c.id)
def test_large_bf16_matches_reference(backend, case: Case) -> None:
    inputs = case.inputs("bfloat16", seed=4)
    out, ref = backend.run(inputs), chunk_o_reference(inputs)
    assert_close(out, ref, OP, "bfloat16")
    print(f"{backend.name} {case.id} bf16: max abs err {np.abs(out - ref).max():.3g}, "
          f"rel {np.abs(out - ref).max() / np.abs(ref).max():.3g}, "
          f"rel-l2 {np.linalg.norm(out - ref) / np.linalg.norm(ref):.3g}")


# The input contract: each mutation of a valid call, the error type and the argument the message must name.
_BASE = Case(T=70, H=2, HV=4, K=16, V=16)
_VARLEN_BASE = Case(T=70, H=2, HV=4, K=16, V=16, seqlens=(30, 40))


def _mutations() -> list[tuple[str, Case, dict, dict, type[Exception], str]]:
    """(id, base case, array replacements, dtype replacements, error, message regex)."""
    a = _BASE.inputs("float32").arrays
    va = _VARLEN_BASE.inputs("float32").arrays
    return [
        ("q-rank", _BASE, {"q": a["q"][0]}, {}, ValueError, r"q: expected a rank-4"),
        ("k-shape", _BASE, {"k": a["k"][:, :69]}, {}, ValueError, r"k: expected the shape of q"),
        ("v-T", _BASE, {"v": a["v"][:, :69]}, {}, ValueError, r"v: expected v.shape\[:2\]"),
        ("HV-not-multiple", _BASE, {"v": a["v"][:, :, :3], "h": a["h"][:, :, :3], "g": a["g"][:, :, :3]}, {},
         ValueError, r"v: expected HV = v.shape\[2\] a positive multiple of H = q.shape\[2\] = 2; got HV = 3"),
        ("K-too-small", _BASE, {"q": a["q"][..., :8], "k": a["k"][..., :8], "h": a["h"][:, :, :, :8]}, {},
         ValueError, r"K \(q.shape\[3\]\): expected a head size in \[16, 256\]; got 8"),
        ("V-too-large", _BASE, {"v": np.zeros((1, 70, 4, 320), np.float32),
                                "h": np.zeros((1, 2, 4, 16, 320), np.float32)}, {},
         ValueError, r"V \(v.shape\[3\]\): expected a head size in \[16, 256\]; got 320"),
        ("q-int", _BASE, {}, {"q": "int32"}, TypeError, r"q: expected dtype in"),
        ("v-dtype-mismatch", _BASE, {}, {"v": "float16"}, TypeError, r"v: expected the dtype of q \(float32\)"),
        ("g-not-fp32", _BASE, {}, {"g": "float16"}, TypeError, r"g: expected dtype in \('float32',\)"),
        ("g-shape", _BASE, {"g": a["g"][:, :, :2]}, {}, ValueError, r"g: expected g.shape"),
        ("h-chunks", _BASE, {"h": a["h"][:, :1]}, {}, ValueError, r"h: expected h.shape\[1\] \(NT\) = 2"),
        ("h-heads", _BASE, {"h": a["h"][:, :, :2]}, {}, ValueError, r"h: expected h.shape\[2:\]"),
        ("cu-float", _VARLEN_BASE, {}, {"cu_seqlens": "float32"}, TypeError, r"cu_seqlens: expected dtype"),
        ("cu-start", _VARLEN_BASE, {"cu_seqlens": np.array([5, 30, 70], np.int32)}, {}, ValueError,
         r"cu_seqlens: expected cu_seqlens\[0\] = 0; got cu_seqlens\[0\] = 5"),
        ("cu-decreasing", _VARLEN_BASE, {"cu_seqlens": np.array([0, 40, 30, 70], np.int32)}, {}, ValueError,
         r"cu_seqlens: expected non-decreasing values; got cu_seqlens\[1\] = 40 > cu_seqlens\[2\] = 30"),
        ("cu-end", _VARLEN_BASE, {"cu_seqlens": np.array([0, 30, 60], np.int32)}, {}, ValueError,
         r"cu_seqlens: expected cu_seqlens\[-1\] = T = 70; got cu_seqlens\[-1\] = 60"),
        ("cu-with-B2", _VARLEN_BASE, {n: np.concatenate([va[n]] * 2) for n in ("q", "k", "v", "g", "h")}, {},
         ValueError, r"q: expected B = 1 when cu_seqlens is given"),
        ("chunk-indices-without-cu", _BASE, {"chunk_indices": np.zeros((2, 2), np.int32)}, {}, ValueError,
         r"chunk_indices: expected None when cu_seqlens is None"),
        ("chunk-indices-shape", _VARLEN_BASE, {"chunk_indices": np.zeros((2, 3), np.int32)}, {}, ValueError,
         r"chunk_indices: expected shape \[NT, 2\]"),
    ]


@pytest.mark.parametrize("mutation", _mutations(), ids=lambda m: m[0])
def test_contract_errors(backend, mutation) -> None:
    assert_refused(backend.run, mutation, OP)


# Pallas-only: the grid size (tilings.persistent_programs) never changes a bit of o.
def _assert_grid_sizes_agree(case: Case, dtype: str) -> None:
    """Persistent programs that loop over the work items (with a last step past the end) equal one program per
    item bit for bit, and so does the spec's own choice (persistent for long inputs on a GPU)."""
    pallas = BACKENDS["pallas"]
    inputs = case.inputs(dtype, seed=13)
    spec_choice, items = pallas.run_on_grid(inputs, programs=None)
    assert_close(spec_choice, chunk_o_reference(inputs), OP, dtype)
    for programs in (1, 3, tilings.PERSISTENT_PROGRAMS_PER_SM * 132, items):
        if programs <= items:
            assert np.array_equal(pallas.run_on_grid(inputs, programs)[0], spec_choice), f"{programs} programs"


@pytest.mark.parametrize("case", [Case(T=300, H=2, HV=4, K=48, V=32),
                                  Case(T=200, H=1, HV=2, K=64, V=64, seqlens=(1, 0, 70, 129))], ids=lambda c: c.id)
def test_pallas_persistent_grid_gives_the_same_bits(case: Case) -> None:
    _assert_grid_sizes_agree(case, "float16")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: c.id)
def test_pallas_persistent_grid_gives_the_same_bits_large(case: Case) -> None:
    _assert_grid_sizes_agree(case, "bfloat16")


# Pallas-only: the public ops are jitted internally, and say what to do under a caller's jit.
def test_pallas_eager_calls_hit_the_internal_jit_cache() -> None:
    """chunk_fwd_o called outside jax.jit compiles once per shape (later eager calls of that shape reuse the
    program) and gives the bits of the same call under a caller's jax.jit."""
    import jax
    import jax.numpy as jnp

    import gdn.pallas

    inputs = Case(T=70, H=1, HV=2, K=16, V=32).inputs("float16", seed=18)
    a = {n: None if x is None else jnp.asarray(x, inputs.dtypes[n]) for n, x in inputs.arrays.items()}
    args = (a["q"], a["k"], a["v"], a["h"], a["g"])
    first = gdn.pallas.chunk_fwd_o(*args)
    compiled = gdn.pallas.compiled_variants()
    again = gdn.pallas.chunk_fwd_o(*args)
    assert gdn.pallas.compiled_variants() == compiled
    assert np.array_equal(np.asarray(again), np.asarray(first))
    assert np.array_equal(np.asarray(jax.jit(gdn.pallas.chunk_fwd_o)(*args)), np.asarray(first))


@pytest.mark.parametrize("op", ["chunk_fwd_o", "chunk_gated_delta_rule"])
def test_pallas_traced_cu_seqlens_needs_chunk_indices(op: str) -> None:
    """Under a caller's jax.jit cu_seqlens has no values to build chunk_indices from: a ValueError says how to
    build them on the host."""
    import jax
    import jax.numpy as jnp

    import gdn.pallas

    case = Case(T=70, H=1, HV=2, K=16, V=16, seqlens=(30, 40))
    a = {n: None if x is None else jnp.asarray(x, case.inputs("float32").dtypes[n])
         for n, x in case.inputs("float32").arrays.items()}
    if op == "chunk_fwd_o":
        call = jax.jit(lambda cu: gdn.pallas.chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], cu_seqlens=cu))
    else:
        beta = jnp.ones(a["g"].shape, jnp.float32)
        call = jax.jit(lambda cu: gdn.pallas.chunk_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], beta,
                                                                    cu_seqlens=cu))
    with pytest.raises(ValueError, match=rf"^{op}: chunk_indices: expected chunk_indices when cu_seqlens is traced"):
        call(a["cu_seqlens"])
