#!/usr/bin/env bash
# compute-sanitizer memcheck over the robustness tests, on a CUDA GPU: every kernel launch of the tests that
# feed gdn's ops garbage (NaN/inf, bad chunk_indices and cu_seqlens values that nothing checks on the host,
# strided views, poisoned memory past T) must access only memory inside its arrays.
#
#   tests/sanitize.sh                 # both backends (the JAX ones are slow under memcheck)
#   tests/sanitize.sh -k triton       # further pytest arguments select tests
#
# Every allocation is made exact, so that an access past an array's end lands outside any allocation, which is
# what memcheck sees: torch without its caching allocator, JAX/XLA with the platform allocator instead of its
# BFC pool. Exits non-zero when memcheck reports an error (--error-exitcode) or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export XLA_PYTHON_CLIENT_ALLOCATOR=platform
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec compute-sanitizer --tool memcheck --target-processes all --error-exitcode 99 --print-limit 20 \
    python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_safety.py tests/test_robustness.py \
    --deselect tests/test_robustness.py::test_offsets_beyond_int32_elements "$@"
