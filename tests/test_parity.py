"""Cross-framework parity: identical numpy inputs through gdn.triton (torch) and gdn.pallas (JAX)."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec
from tests.backends import BACKENDS
from tests.cases import CASES, LARGE_CASES, QUICK_CASES, Case, seed_of
from tests.helpers import TOLERANCE, assert_close, case_params, chunk_o_reference, dtype_params

OP = spec.CHUNK_O_OP


def _both(case: Case, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    triton, pallas = BACKENDS["triton"], BACKENDS["pallas"]
    if not triton.supports(dtype):
        pytest.skip(f"triton does not run {dtype} on this machine")
    inputs = case.inputs(dtype, seed=seed_of(case.id) + 7)
    return triton.run(inputs), pallas.run(inputs), chunk_o_reference(inputs)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(CASES, QUICK_CASES))
def test_triton_equals_pallas(case: Case, dtype: str) -> None:
    out_triton, out_pallas, ref = _both(case, dtype)
    assert_close(out_triton, ref, OP, dtype, "triton vs reference")
    assert_close(out_pallas, ref, OP, dtype, "pallas vs reference")
    # Both round o to the input dtype once; the two may differ by a few of its ulps, never by more than the
    # tolerance each has to the reference.
    assert_close(out_pallas, out_triton, OP, dtype, "pallas vs triton")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: c.id)
def test_large_bf16_parity(case: Case) -> None:
    out_triton, out_pallas, ref = _both(case, "bfloat16")
    diff = np.abs(out_pallas - out_triton)
    print(f"{case.id} bf16 triton vs pallas: max abs {diff.max():.3g}, max rel {diff.max() / np.abs(ref).max():.3g}, "
          f"identical elements {np.mean(out_pallas == out_triton):.4f}")
    assert_close(out_pallas, out_triton, OP, "bfloat16", "pallas vs triton")
    assert diff.max() / np.abs(ref).max() <= TOLERANCE[OP, "bfloat16"]
