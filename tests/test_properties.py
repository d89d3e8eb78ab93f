"""Property-based tests: random shapes, splits, dtypes and gating through every backend, against the
float64 reference and against each other. GDN_HYPOTHESIS_PROFILE=large (e.g. on a GPU) draws many more."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdn.common import spec
from tests.backends import BACKENDS
from tests.cases import Case, ForwardCase
from tests.helpers import assert_close, chunk_o_reference, forward_reference

pytestmark = pytest.mark.slow  # every example compiles new shapes: long on a GPU

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("large", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("GDN_HYPOTHESIS_PROFILE", "ci"))

HEAD_SIZES = [16, 24, 48, 64, 100, 128]


@st.composite
def problems(draw: st.DrawFn, case_type: type, flag: str, max_sequences: int) -> tuple[Case | ForwardCase, str]:
    """A case_type (Case or ForwardCase) with random heads H, HV = m·H, K, V, its boolean flag, dense B rows
    or up to max_sequences varlen sequences (empty ones included), and a dtype."""
    H = draw(st.integers(1, 3))
    HV, K, V = H * draw(st.integers(1, 3)), draw(st.sampled_from(HEAD_SIZES)), draw(st.sampled_from(HEAD_SIZES))
    flags = {flag: draw(st.booleans())}
    if draw(st.booleans()):
        seqlens = tuple(draw(st.lists(st.integers(0, 150), min_size=1, max_size=max_sequences)))
        case = case_type(T=sum(seqlens), H=H, HV=HV, K=K, V=V, seqlens=seqlens, **flags)
    else:
        case = case_type(T=draw(st.integers(1, 200)), H=H, HV=HV, K=K, V=V, B=draw(st.integers(1, 2)), **flags)
    return case, draw(st.sampled_from(["float32", "float16", "bfloat16"]))


@given(drawn=problems(Case, "gated", 5), seed=st.integers(0, 2**31 - 1))
def test_backends_agree_with_reference_and_each_other(drawn: tuple[Case, str], seed: int) -> None:
    case, dtype = drawn
    inputs = case.inputs(dtype, seed=seed)
    ref = chunk_o_reference(inputs)
    outputs = {name: b.run(inputs) for name, b in BACKENDS.items() if b.supports(dtype)}
    for name, out in outputs.items():
        assert_close(out, ref, spec.CHUNK_O_OP, dtype, f"{name} {case.id} {dtype}")
    if len(outputs) == 2:
        assert_close(outputs["pallas"], outputs["triton"], spec.CHUNK_O_OP, dtype,
                     f"pallas vs triton {case.id} {dtype}")


@settings(max_examples=max(4, settings().max_examples // 2))
@given(drawn=problems(ForwardCase, "initial_state", 4), seed=st.integers(0, 2**31 - 1))
def test_forward_backends_agree_with_recurrence_and_each_other(drawn: tuple[ForwardCase, str], seed: int) -> None:
    """chunk_gated_delta_rule: o and final state against the token-by-token float64 recurrence and across
    backends (half the examples of the chunk_fwd_o property: each draws a new compiled shape)."""
    case, dtype = drawn
    inputs = case.inputs(dtype, seed=seed)
    o_ref, state_ref = forward_reference(inputs)
    outputs = {name: b.forward(inputs) for name, b in BACKENDS.items() if b.supports(dtype)}
    for name, (o, state) in outputs.items():
        assert_close(o, o_ref, spec.FORWARD_OP, dtype, f"{name} {case.id} {dtype}: o")
        assert_close(state, state_ref, spec.FORWARD_OP, dtype, f"{name} {case.id} {dtype}: final_state")
    if len(outputs) == 2:
        for i, what in enumerate(("o", "final_state")):
            assert_close(outputs["pallas"][i], outputs["triton"][i], spec.FORWARD_OP, dtype,
                         f"pallas vs triton {case.id} {dtype}: {what}")
