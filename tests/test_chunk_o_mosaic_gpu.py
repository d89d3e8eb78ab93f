"""chunk_fwd_o with lowering="mosaic_gpu" (gdn.pallas.chunk_o_mosaic_gpu), the shared test bodies on the shapes it
takes: the shared cases at its head sizes and edge cases (T = 1, 65, 127, varlen with empty and 1-token
sequences) against the float64 reference, NaN in a neighbouring sequence, −∞ gates, padded chunk indices and
rows naming no chunk, determinism, no derivative, and the inputs it refuses. Mosaic GPU interpret mode on CPU
(unspecified reads are NaN there); compiled on an sm_90 GPU."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec
from tests.backends import BACKENDS, MosaicGpuBackend
from tests.cases import CASES, LARGE_CASES, Case, seed_of
from tests.helpers import assert_close, chunk_o_reference

MOSAIC = MosaicGpuBackend()


EDGE_CASES = [
    Case(T=1, H=1, HV=2, K=64, V=64),
    Case(T=65, H=2, HV=4, K=64, V=128, B=2),
    Case(T=127, H=1, HV=1, K=128, V=64, gated=False),
    Case(T=134, H=1, HV=2, K=64, V=64, seqlens=(0, 5, 63, 65, 1), gated=False),
    Case(T=131, H=2, HV=2, K=128, V=64, seqlens=(130, 1, 0)),
]
CHECKED_CASES = [c for c in CASES if MOSAIC.supports_case(c, "float16")] + EDGE_CASES


@pytest.mark.parametrize("case", CHECKED_CASES, ids=lambda c: c.id)
def test_matches_reference(case: Case) -> None:
    inputs = case.inputs("float16", seed=seed_of(case.id))
    assert_close(MOSAIC.run(inputs), chunk_o_reference(inputs), spec.CHUNK_O_OP, "float16")


@pytest.mark.parametrize("case", [CHECKED_CASES[0], EDGE_CASES[-1]], ids=lambda c: c.id)
def test_matches_reference_bf16(case: Case) -> None:
    inputs = case.inputs("bfloat16", seed=seed_of(case.id))
    assert_close(MOSAIC.run(inputs), chunk_o_reference(inputs), spec.CHUNK_O_OP, "bfloat16")


def test_nan_in_a_neighbouring_sequence_stays_there() -> None:
    """The tail chunk of a sequence reads the next sequence's rows: a NaN there reaches no other sequence."""
    case = Case(T=140, H=1, HV=2, K=64, V=64, seqlens=(70, 30, 40))
    inputs = case.inputs("float16", seed=14)
    clean = chunk_o_reference(inputs)
    poisoned = {name: inputs.arrays[name].copy() for name in ("q", "k", "v", "g")}
    for x in poisoned.values():
        x[:, 70:100] = np.nan
    out = MOSAIC.run(inputs.replace(**poisoned))
    others = np.r_[0:70, 100:140]
    assert_close(out[:, others], clean[:, others], spec.CHUNK_O_OP, "float16", "the sequences around the NaN one")


def test_varlen_with_padded_chunk_indices() -> None:
    """chunk_indices padded with PAD_CHUNK rows, whose h rows are NaN: those programs store nothing."""
    case = EDGE_CASES[-1]
    inputs = case.inputs("float16", seed=15)
    extra = 2
    h = inputs.arrays["h"]
    padded = inputs.replace(
        chunk_indices=spec.prepare_chunk_indices(case.cu_seqlens, num_rows=case.state_rows + extra),
        h=np.concatenate([h, np.full((1, extra) + h.shape[2:], np.nan, np.float32)], axis=1))
    assert_close(MOSAIC.run(padded), chunk_o_reference(inputs), spec.CHUNK_O_OP, "float16")


def test_minus_inf_gate_is_a_reset() -> None:
    """Cumulative gates −∞ from token 20 of chunk 0 and from token 100 of chunk 1 (read as the gate floor, as the
    Triton kernels read them): o finite and equal to the reference."""
    inputs = Case(T=130, H=1, HV=2, K=64, V=64).inputs("float16", seed=24)
    g = inputs.arrays["g"].copy()
    g[:, 20:64], g[:, 100:128] = -np.inf, -np.inf
    inputs = inputs.replace(g=g)
    out = MOSAIC.run(inputs)
    assert np.isfinite(out).all()
    assert_close(out, chunk_o_reference(inputs), spec.CHUNK_O_OP, "float16")


def test_chunk_indices_naming_no_chunk_read_and_write_nothing() -> None:
    """Rows naming a sequence outside [0, N) or a chunk past its sequence's last, passed under a caller's jit (no
    host check): their programs store nothing, and every real chunk's rows are as the reference."""
    import jax

    from gdn.pallas import chunk_fwd_o

    case = Case(T=100, H=1, HV=2, K=64, V=64, seqlens=(60, 40))
    inputs = case.inputs("float16", seed=18)
    rows = spec.prepare_chunk_indices(case.cu_seqlens)
    bad = np.concatenate([rows, [[2, 0], [-5, 0], [0, 1], [1, 7]]]).astype(np.int32)
    h = inputs.arrays["h"]
    inputs = inputs.replace(h=np.concatenate([h, np.full((1, 4) + h.shape[2:], np.nan, h.dtype)], axis=1))
    a = MOSAIC.convert(inputs.replace(chunk_indices=bad))
    call = jax.jit(lambda *x: chunk_fwd_o(*x, lowering="mosaic_gpu"))
    out = MOSAIC.numpy(call(a["q"], a["k"], a["v"], a["h"], a["g"], None, a["cu_seqlens"], a["chunk_indices"]))
    assert_close(out, chunk_o_reference(case.inputs("float16", seed=18)), spec.CHUNK_O_OP, "float16")


def test_differentiation_raises_a_clear_error() -> None:
    import jax

    from gdn.pallas import chunk_fwd_o

    a = MOSAIC.convert(_SUPPORTED.inputs("float16"))
    with pytest.raises(TypeError, match=f"^gdn: {spec.CHUNK_O_OP} has no backward"):
        jax.grad(lambda q: chunk_fwd_o(q, a["k"], a["v"], a["h"], a["g"], lowering="mosaic_gpu").sum())(a["q"])


def test_deterministic() -> None:
    inputs = EDGE_CASES[1].inputs("float16", seed=16)
    assert np.array_equal(MOSAIC.run(inputs), MOSAIC.run(inputs))


_SUPPORTED = Case(T=70, H=1, HV=2, K=64, V=64)


@pytest.mark.parametrize("mutation", [
    ("float32", _SUPPORTED, {}, {n: "float32" for n in "qkvh"}, ValueError,
     r"q: expected dtype in \('float16', 'bfloat16'\) with lowering='mosaic_gpu'"),
    ("h-float32", _SUPPORTED, {}, {"h": "float32"}, ValueError,
     r"h: expected the dtype of q \(float16\) with lowering='mosaic_gpu'; got float32"),
    ("K-48", Case(T=70, H=1, HV=2, K=48, V=64), {}, {}, ValueError,
     r"K, V: expected each in \(64, 128\) with lowering='mosaic_gpu'; got K = 48, V = 64"),
    ("contract-first", _SUPPORTED, {"q": np.zeros((70, 1, 64), np.float32)}, {}, ValueError,
     r"q: expected a rank-4"),
], ids=lambda m: m[0])
def test_refused(mutation) -> None:
    """(id, case, array replacements, dtype replacements, error, message regex) on float16 inputs."""
    _, case, arrays, dtypes, error, message = mutation
    inputs = case.inputs("float16").replace(**arrays)
    inputs.dtypes.update(dtypes)
    with pytest.raises(error, match=f"^{spec.CHUNK_O_OP}: {message}"):
        MOSAIC.run(inputs)


def test_unknown_lowering_is_refused() -> None:
    from gdn.pallas import chunk_fwd_o

    a = MOSAIC.convert(_SUPPORTED.inputs("float16"))
    with pytest.raises(ValueError, match=r"^chunk_fwd_o: lowering: expected None or one of \('triton', 'mosaic_gpu', "
                                         r"'triton_call'\); got 'mosaic'"):
        chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], lowering="mosaic")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: c.id)
def test_large_bf16_matches_reference_and_triton_lowering(case: Case) -> None:
    inputs = case.inputs("bfloat16", seed=4)
    out, ref, triton_lowered = MOSAIC.run(inputs), chunk_o_reference(inputs), BACKENDS["pallas"].run(inputs)
    assert_close(out, ref, spec.CHUNK_O_OP, "bfloat16")
    assert_close(out, triton_lowered, spec.CHUNK_O_OP, "bfloat16", "mosaic_gpu vs triton lowering")


def test_partial_chunks_write_only_their_rows() -> None:
    """The chunks in reverse order (chunk_indices and h rows reversed): a sequence's partial last chunk then runs
    after the next sequence's first chunk, whose rows it must not overwrite (in interpret mode the programs run
    in grid order)."""
    case = Case(T=140, H=1, HV=2, K=64, V=64, seqlens=(70, 30, 40))
    inputs = case.inputs("float16", seed=17)
    order = spec.prepare_chunk_indices(case.cu_seqlens)[::-1].copy()
    reversed_inputs = inputs.replace(chunk_indices=order, h=inputs.arrays["h"][:, ::-1].copy())
    assert_close(MOSAIC.run(reversed_inputs), chunk_o_reference(inputs), spec.CHUNK_O_OP, "float16")
