"""jax arrays as the spec's contract sees them, and the Triton compiler parameters: what both gdn.pallas ops
share."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

from gdn.common import contract, spec, tilings

# Triton launch parameters: jax.experimental.pallas.triton.CompilerParams (older releases:
# TritonCompilerParams). The one place that knows both names.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def compiler_params(tiling: tilings.Tiling):
    """The Pallas-Triton compiler parameters of a tiling: num_warps and num_stages. tiling.max_registers is
    ignored: the Pallas-Triton lowering has no register cap (ptxas maxnreg), so a Pallas kernel compiles
    without the cap its Triton twin may have."""
    return _CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def is_tracer(x) -> bool:
    """Whether x is an abstract value of a jax transformation (under jax.jit: no values, no device)."""
    return isinstance(x, jax.core.Tracer)


def array_info(name: str, x, op: str = spec.CHUNK_O_OP) -> contract.ArrayInfo | None:
    """The spec's framework-neutral view of argument x (None stays None). JAX places every operand of a jitted
    call itself (and refuses operands committed to different devices), so the view carries no device."""
    if x is None:
        return None
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise TypeError(f"{op}: {name}: expected a jax.Array or numpy.ndarray; got {type(x).__name__}")
    return contract.ArrayInfo(tuple(x.shape), np.dtype(x.dtype).name, "jax")


def resolve_interpret(interpret: bool | None) -> bool:
    """interpret=None: the Pallas interpreter unless JAX's default backend is a GPU (compiled Triton lowering)."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


MAX_TOKEN_ROWS = 2**31 - spec.CHUNK_SIZE
"""B·T bound of the kernels' int32 token rows: o_t of the last chunk's padding rows (up to B·T + CHUNK_SIZE − 1)
must not wrap negative, or a masked-off row would pass the mask o_t < eos."""


@functools.cache
def multiprocessor_count() -> int | None:
    """SMs of the default device when it is a GPU (what tilings.persistent_programs sizes a grid by), else None."""
    device = jax.devices()[0]
    return getattr(device, "core_count", None) if device.platform == "gpu" else None


def check_token_rows(B: int, T: int, *, op: str) -> None:
    """Refuse B·T beyond the int32 token rows of the Pallas kernels (the Lowering indexes refs with int32)."""
    if B * T > MAX_TOKEN_ROWS:
        raise ValueError(f"{op}: q: expected B·T <= {MAX_TOKEN_ROWS} (int32 token rows in the Pallas kernels); "
                         f"got B·T = {B * T}")


_FLOAT32_DOTS = {"tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
                 "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
                 "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32}


def float32_dot_precision(interpret: bool, dtype: str = "float32") -> jax.lax.DotAlgorithmPreset | jax.lax.Precision:
    """tilings.dot_precision(dtype) (tilings.FLOAT32_DOT_PRECISION for float32 inputs) as a JAX dot precision;
    XLA:CPU (interpret mode) has no TF32 presets and runs the IEEE float32 dot instead."""
    return jax.lax.Precision.HIGHEST if interpret else _FLOAT32_DOTS[tilings.dot_precision(dtype)]


def accumulating_dot(precision):
    """The kernels' a @ b: jnp.dot of two register tiles at that JAX dot precision, accumulated in float32 (as
    gdn.triton's tl.dot with its input_precision)."""
    def dot(a, b):
        return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)

    return dot


def input_dot_precision(dtype: str, interpret: bool) -> jax.lax.DotAlgorithmPreset | jax.lax.Precision | None:
    """Precision of the dots on input-dtype operands: tilings.FLOAT32_DOT_PRECISION for float32 inputs; None
    (the 16-bit tensor-core dot) for 16-bit ones."""
    return float32_dot_precision(interpret) if dtype == "float32" else None


def host_values(x) -> np.ndarray | None:
    """A host copy of an index array when it is already on the host (numpy, or a jax array on CPU); else None."""
    if isinstance(x, np.ndarray):
        return x
    if is_tracer(x) or any(d.platform != "cpu" for d in x.devices()):
        return None
    return np.asarray(x)


def host_cu_seqlens(cu_seqlens, chunk_indices, *, op: str) -> np.ndarray | None:
    """The host values of cu_seqlens that an op's thin wrapper checks (and builds chunk_indices from) before its
    jitted body: read when cu_seqlens is a numpy array, or when chunk_indices is missing (then a device→host
    copy of a device array, as the Triton backend does); None when neither. Raises when chunk_indices is
    missing and cu_seqlens is traced (under a caller's jax.jit): nothing can be read then."""
    if cu_seqlens is None or (chunk_indices is not None and not isinstance(cu_seqlens, np.ndarray)):
        return None
    if is_tracer(cu_seqlens):
        raise ValueError(
            f"{op}: chunk_indices: expected chunk_indices when cu_seqlens is traced (under jax.jit); got "
            "None. Build them on the host with gdn.common.spec.prepare_chunk_indices(cu_seqlens, "
            "num_rows=upper_bound), which pads with PAD_CHUNK rows to a static length")
    return np.asarray(cu_seqlens)


def as_index(x) -> jax.Array | None:
    """int32 device copy of an index array (numpy int64 included, which jnp would narrow anyway without x64)."""
    return None if x is None else jnp.asarray(x, jnp.int32)


def first_chunk_rows(cu_seqlens: jax.Array) -> jax.Array:
    """[N] each sequence's first row of h (or dh) in a varlen batch, on the device: the exclusive cumulative sum of
    the sequences' chunk counts ceil((cu_seqlens[n + 1] − cu_seqlens[n]) / CHUNK_SIZE)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + spec.CHUNK_SIZE - 1) // spec.CHUNK_SIZE
    return jnp.cumsum(counts) - counts


def index_or_placeholder(x, shape: tuple[int, ...]) -> jax.Array:
    """An int32 index array for a kernel ref, or, for None, an int32 placeholder of the given shape that the
    kernel's static flags never read."""
    return jnp.zeros(shape, jnp.int32) if x is None else x.astype(jnp.int32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def no_backward(op: str, arrays):
    """arrays unchanged; differentiating through them (jax.grad, jax.jvp) raises, naming the op: gdn's kernels
    have no backward, and Pallas would fail with an empty AssertionError instead."""
    return arrays


@no_backward.defjvp
def _no_backward_jvp(op: str, primals, tangents):
    raise TypeError(f"gdn: {op} has no backward (it cannot be differentiated with jax.grad or jax.jvp)")
