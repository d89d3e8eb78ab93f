"""Test setup: the Triton interpreter on CPU-only machines, JAX without GPU-memory preallocation, the markers,
and NaN-poisoned outputs."""

import os
import sys

import pytest
import torch

# Must be set before triton is imported anywhere: CPU-only machines run the Triton kernel interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Both frameworks share the GPU in one process: JAX must not grab 75 % of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from tests.backends import BACKENDS  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (compiled kernels); skipped elsewhere")
    config.addinivalue_line("markers", "slow: long on a GPU (large shapes and float64 references, many compiled "
                            "shapes, every dtype of a case matrix); a GPU's quick run is -m 'not slow'")
    config.addinivalue_line("markers", "unpoisoned: gdn's torch allocations are not NaN-filled (outputs of GiBs "
                            "that the test reads only a slice of)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _nan_filled(allocate):
    """torch.empty / torch.empty_like whose floating-point tensors are NaN-filled when a gdn module calls it."""
    def allocate_poisoned(*args, **kwargs):
        x = allocate(*args, **kwargs)
        if x.is_floating_point() and sys._getframe(1).f_globals.get("__name__", "").startswith("gdn."):
            x.fill_(float("nan"))
        return x
    return allocate_poisoned


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output and intermediate a gdn.triton op allocates starts as NaN on every machine, so an element
    no kernel writes fails the test instead of reading whatever the allocator left there. (The Pallas
    interpreter fills outputs with NaN itself; on a GPU the Pallas adapter poisons JAX's allocator.)"""
    if "unpoisoned" not in request.keywords:
        monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
        monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))


@pytest.fixture(params=sorted(BACKENDS), ids=str)
def backend(request: pytest.FixtureRequest):
    return BACKENDS[request.param]
