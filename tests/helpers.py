"""What every test module shares: the tolerance table, the comparison, the float64 references on a case's inputs,
the contract-error body, the dtype parameters and the skip for what a backend cannot run here."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import reference, spec
from tests.cases import OpInputs

DTYPES = ("float32", "float16", "bfloat16")

TOLERANCE = {
    # max |x − x_ref| / max |x_ref| per (op, input dtype).
    # chunk_fwd_o: float32 dots run as tf32x3 (~1e-6; exact in the interpreters); 16-bit runs cast h and the
    # decayed score matrix to the input dtype before the tensor-core dots (as FLA does) and round o once.
    (spec.CHUNK_O_OP, "float32"): 2e-5, (spec.CHUNK_O_OP, "float16"): 4e-3, (spec.CHUNK_O_OP, "bfloat16"): 3e-2,
    # chunk_gated_delta_rule, o and the final state against the token-by-token recurrence: the 16-bit paths round
    # w, u, v_new, h and (I + A)⁻¹ to the input dtype before their tensor-core dots, as FLA does.
    (spec.FORWARD_OP, "float32"): 1e-4, (spec.FORWARD_OP, "float16"): 5e-3, (spec.FORWARD_OP, "bfloat16"): 3e-2,
    # decode_step: o rounded to v's dtype once; the state is float32 whatever the input dtype (checked at
    # (DECODE_OP, "float32")).
    (spec.DECODE_OP, "float32"): 2e-5, (spec.DECODE_OP, "float16"): 4e-3, (spec.DECODE_OP, "bfloat16"): 3e-2,
    # chunk_gated_delta_rule's gradients against float64 autodiff of the recurrence: the 16-bit paths round the
    # recomputed w, u, h, v_new and (I + A)⁻¹ and the backward's dv_local, dv_new, dh and dw to the input dtype
    # before their tensor-core dots.
    (spec.BACKWARD_OP, "float32"): 1e-4, (spec.BACKWARD_OP, "float16"): 5e-3, (spec.BACKWARD_OP, "bfloat16"): 5e-2,
}


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a package's version string ("3.6.0", "2.5.0.dev0+abc", "0.11.2")."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def dtype_params(dtypes: tuple[str, ...] = DTYPES) -> list:
    """dtypes as pytest parameters, all but bfloat16 marked slow: on a GPU the default selection
    (-m "not slow") runs a case matrix in bf16, the dtype the CPU interpreters cannot check; a full run takes
    every dtype, as the CPU run does."""
    return [dtype if dtype == "bfloat16" else pytest.param(dtype, marks=pytest.mark.slow) for dtype in dtypes]


def case_params(cases: list, quick: tuple[int, ...]) -> list:
    """cases as pytest parameters (ids: their .id), all but cases[i] for i in quick marked slow: on a GPU the quick
    selection (-m "not slow") runs the few cases that cover the edge list in few compiled variants (every new
    head size or flag set is a kernel compile there); a full run, and every CPU run, takes them all."""
    return [pytest.param(case, id=case.id, marks=() if i in quick else pytest.mark.slow)
            for i, case in enumerate(cases)]


def assert_close(out: np.ndarray, ref: np.ndarray, op: str, dtype: str, what: str = "vs reference") -> None:
    """Same shape, all finite, and max |out − ref| / max |ref| within TOLERANCE[op, dtype]."""
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    assert np.isfinite(out).all(), f"{what}: {np.count_nonzero(~np.isfinite(out))} non-finite outputs"
    if ref.size == 0:  # T = 0: nothing to compare beyond the shape
        return
    tolerance = TOLERANCE[op, dtype]
    rel_err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert rel_err <= tolerance, f"{what}: max abs err / max |ref| = {rel_err:.3g} > {tolerance}"


def assert_state_close(state: np.ndarray, ref: np.ndarray, what: str = "state vs reference") -> None:
    """A decode state or pool, float32 in every input dtype: decode_step's float32 tolerance, relative to
    max |state|."""
    assert_close(state, ref, spec.DECODE_OP, "float32", what)


def skip_unsupported(backend, dtype: str, op: str = spec.CHUNK_O_OP) -> None:
    """Skip what the backend cannot run on this machine (tests/backends.py: bf16 dots under the Triton
    interpreter)."""
    if not backend.supports(dtype, op):
        pytest.skip(f"{backend.name} does not run {op} in {dtype} on this machine (see tests/backends.py)")


def chunk_o_reference(inputs: OpInputs) -> np.ndarray:
    """The float64 chunk_fwd_o of a case's inputs."""
    a = inputs.arrays
    return reference.chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], inputs.scale, a["cu_seqlens"])


def forward_reference(inputs: OpInputs) -> tuple[np.ndarray, np.ndarray]:
    """(o, final state) of the float64 token-by-token recurrence on a forward case's inputs."""
    a = inputs.arrays
    return reference.recurrent_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], inputs.scale,
                                                a["initial_state"], True, a["cu_seqlens"])


def assert_refused(call, mutation: tuple, op: str) -> None:
    """call on the mutated float32 inputs of (id, case, array replacements, dtype replacements, error, message
    regex) raises that error, its message starting with "<op>: " and the regex."""
    _, case, arrays, dtypes, error, message = mutation
    inputs = case.inputs("float32").replace(**arrays)
    inputs.dtypes.update(dtypes)
    with pytest.raises(error, match=f"^{op}: {message}"):
        call(inputs)
