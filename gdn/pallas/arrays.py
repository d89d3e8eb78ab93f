"""jax arrays as the spec's contract sees them, and the Triton compiler parameters: what both gdn.pallas ops
share."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental.pallas import triton as plgpu

from gdn.common import spec

# Triton launch parameters: jax.experimental.pallas.triton.CompilerParams (older releases:
# TritonCompilerParams). The one place that knows both names.
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def is_tracer(x) -> bool:
    """Whether x is an abstract value of a jax transformation (under jax.jit: no values, no device)."""
    return isinstance(x, jax.core.Tracer)


def device_of(x) -> str | None:
    """Devices of a concrete jax array; None for a tracer or a host numpy array, which go wherever the call runs."""
    if isinstance(x, jax.Array) and not is_tracer(x):
        return ",".join(sorted(str(d) for d in x.devices()))
    return None


def call_device(*arrays) -> str:
    """The device a call runs on: that of the first concrete jax array; "traced" when there is none (a tracer
    or a host numpy array has no device of its own: it takes the one the call runs on)."""
    devices = [d for d in map(device_of, arrays) if d is not None]
    return devices[0] if devices else "traced"


def array_info(name: str, x, device: str, op: str = spec.CHUNK_O_OP) -> spec.ArrayInfo | None:
    """The spec's framework-neutral view of argument x (None stays None); a tracer or numpy array takes the
    call's device."""
    if x is None:
        return None
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise TypeError(f"{op}: {name}: expected a jax.Array or numpy.ndarray; got {type(x).__name__}")
    return spec.ArrayInfo(tuple(x.shape), np.dtype(x.dtype).name, device_of(x) or device)


def resolve_interpret(interpret: bool | None) -> bool:
    """interpret=None: the Pallas interpreter unless JAX's default backend is a GPU (compiled Triton lowering)."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)
