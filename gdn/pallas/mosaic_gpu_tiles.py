"""What gdn's Pallas Mosaic GPU kernels (Hopper, sm_90) share: the inputs they take, SMEM tiles for TMA and
wgmma, register loads in the WGMMA layout and tensor-core products, each with its Mosaic GPU interpret-mode
stand-in.

Interpret mode. JAX 0.10's Mosaic GPU interpreter has no rules for layout hints (plgpu.load with a layout,
plgpu.broadcasted_iota), transposed SMEM views, nor wgmma with a transposed or register operand; there the
helpers below read and write SMEM plainly and multiply with jnp.dot in float32 (the values a wgmma accumulates).
Everything else — TMA copies and their barriers, warpgroup threads, offsets, masks, staged stores — runs as
compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

HEAD_DIMS = (64, 128)
"""K and V the Mosaic GPU kernels take (those of jla's Mosaic GPU kernels, measured on H100/H200): one
128-byte-swizzled 16-bit tile row of 64 or 128 elements, a whole tile per TMA copy and per wgmma."""
DTYPES = ("float16", "bfloat16")
"""wgmma's 16-bit inputs; float32 needs the three-pass TF32 dots of the Triton lowering (tilings)."""

LOWERING = "lowering='mosaic_gpu'"
"""How the error messages name this path."""

WGMMA = plgpu.Layout.WGMMA
ROWS = WGMMA.reduce(1)  # one value per row of a WGMMA tile
COLS = WGMMA.reduce(0)  # one value per column

# Mosaic GPU interpret mode's parameters: jax.experimental.pallas.mosaic_gpu.InterpretGPUParams from JAX 0.11,
# only under jax._src before. The one place that knows both.
try:
    InterpretGPUParams = plgpu.InterpretGPUParams
except AttributeError:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401 (used by importers)


def device_reason(interpret: bool) -> str | None:
    """Why the default device cannot run a compiled Mosaic GPU kernel of gdn's (not an sm_90 GPU), or None."""
    if interpret:
        return None
    device = jax.devices()[0]
    if device.platform != "gpu" or getattr(device, "compute_capability", None) != "9.0":
        return f"device: expected an sm_90 GPU (wgmma) or interpret=True with {LOWERING}; got {device.device_kind}"
    return None


def smem_tile(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
    """An SMEM tile (or a stack of them along the leading axes) tiled and swizzled for TMA and wgmma (the widest
    swizzle its rows allow)."""
    dtype = jnp.dtype(dtype)
    swizzle = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def load(ref, layout, interpret: bool) -> jax.Array:
    """An SMEM ref's values in registers, in the given layout (a plain read in interpret mode)."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def load_transposed(ref, interpret: bool) -> jax.Array:
    """The transpose of a 2-D SMEM tile [R, C] in registers, [C, R] in the WGMMA layout."""
    return ref[...].T if interpret else plgpu.load(ref.T, (), layout=WGMMA)


def store_transposed(ref, x: jax.Array, interpret: bool) -> None:
    """Write xᵀ into a 2-D SMEM tile (x [C, R] into ref [R, C])."""
    if interpret:
        ref[...] = x.T
    else:
        ref.T[...] = x


def iota(shape: tuple[int, int], dim: int, interpret: bool) -> jax.Array:
    """Row (dim 0) or column (dim 1) index of every element of a WGMMA-layout tile."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def dot(a, b, shape: tuple[int, int], interpret: bool, transpose_b: bool = False,
        init: jax.Array | None = None) -> jax.Array:
    """init + a·b (a·bᵀ with transpose_b) accumulated in float32 on the tensor cores; a an SMEM tile or 16-bit
    registers in the WGMMA layout, b an SMEM tile; init (float32, WGMMA layout) or zeros."""
    if interpret:
        a = a if isinstance(a, jax.Array) else a[...]
        b = b[...]
        product = jnp.dot(a, b.T if transpose_b else b, preferred_element_type=jnp.float32)
        return product if init is None else init + product
    b = b.T if transpose_b else b

    def accumulate(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    if init is None:
        out = pl.run_scoped(accumulate, plgpu.ACC(shape, jnp.float32))
    else:
        out = pl.run_state(lambda acc: plgpu.wgmma(acc, a, b))(plgpu.ACC.init(init))
    # The barrier keeps LLVM from scheduling arithmetic on the accumulator before the wgmma wait (which has no
    # data dependency on the registers); jla's _common.matmul saw stale, zeroed products without it.
    return lax.optimization_barrier(out)
