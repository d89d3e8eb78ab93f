"""gdn's Triton kernels run from JAX: compiled by Triton for the GPU JAX runs on and launched by jaxlib's Triton
custom call, so a JAX program runs the very kernels of gdn.triton (gdn.triton_kernels), with their bits.

How: ``triton.compile`` turns a kernel specialized as gdn.triton's launches specialize it (the same constexprs,
Triton options and argument types; every pointer 16-byte aligned, as XLA's buffers are) into PTX for the
device's compute capability; jaxlib's bindings (``jax._src.lib.gpu_triton``, which exist with JAX's CUDA plugin
only) wrap it in a ``TritonKernelCall`` whose parameters are the kernel's runtime arguments in order (the next
XLA buffer for a pointer, a value baked into the call for a scalar); and the custom call
``triton_kernel_call_ffi`` carries that call, compressed, as its ``opaque`` attribute. At run time jaxlib
compiles the PTX with its ptxas (once per kernel), hands the custom call's buffers to the pointers — its
operands, then its results — and appends Triton's two hidden scratch pointers as null. So a kernel's result
pointers come after its operand pointers, and its scalars are Python values fixed at trace time.

Needs triton (``pip install triton``; no torch) and a CUDA jaxlib; runs compiled only (no interpreter).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gdn.common import contract, forward_contract, spec, tilings
from gdn.pallas.arrays import first_chunk_rows

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from gdn.triton_kernels import chunk_o as chunk_o_kernels
    from gdn.triton_kernels import forward as forward_kernels
except ModuleNotFoundError as error:
    if error.name != "triton":
        raise
    raise ImportError("gdn.pallas.triton_call (lowering='triton_call') needs Triton: pip install triton") from error

FFI_TARGET = "triton_kernel_call_ffi"
"""jaxlib's FFI custom call that launches a TritonKernelCall."""
POINTER_ALIGNMENT = 16
"""Bytes every pointer is specialized on (tt.divisibility), as Triton does for aligned torch tensors; jaxlib checks
each buffer against it at launch."""
_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32", "int64": "i64"}
_INT32 = range(-(2**31), 2**31)


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A Triton kernel compiled for one specialization and compute capability: what jaxlib's TritonKernel takes."""

    name: str
    num_warps: int
    shared_bytes: int
    ptx: str
    ttir: str
    capability: int
    global_scratch: tuple[int, int] | None
    """(bytes per program, alignment) of the global scratch Triton asks for, or None when it needs none."""


def kernel_call_library():
    """jaxlib's Triton custom-call bindings, which exist only with JAX's CUDA plugin."""
    from jax._src.lib import gpu_triton

    if not hasattr(gpu_triton, "TritonKernelCall"):
        raise RuntimeError("gdn.pallas.triton_call needs jaxlib's CUDA plugin (pip install 'jax[cuda12]')")
    return gpu_triton


def device_capability(op: str) -> int:
    """Compute capability (e.g. 90) of JAX's default device; a ValueError unless it is a CUDA GPU."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability is None:
        raise ValueError(f"{op}: lowering='triton_call' runs compiled Triton kernels on a CUDA GPU; JAX's default "
                         f"device is {device.platform}")
    return int(str(capability).replace(".", ""))


def argument_type(x: Any) -> str | None:
    """Triton's type of a runtime argument: "*bf16" … for an array, "fp32" for a float, "i32" / "i64" for an int
    (as Triton types an unspecialized int), None for an absent pointer (a constexpr None)."""
    if x is None:
        return None
    if isinstance(x, (float, int)) and not isinstance(x, bool):
        return "fp32" if isinstance(x, float) else "i32" if x in _INT32 else "i64"
    return "*" + _TRITON_TYPES[np.dtype(x.dtype).name]


@functools.lru_cache(maxsize=256)
def compile_kernel(kernel: Any, types: tuple[tuple[str, str | None], ...], constants: tuple[tuple[str, Any], ...],
                   options: tuple[tuple[str, int], ...], capability: int) -> CompiledKernel:
    """kernel (a triton.jit function) compiled for sm_<capability>: types gives (name, argument_type) of every
    runtime argument, constants every constexpr's value, options the Triton options (num_warps, …)."""
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{getattr(kernel, '__name__', kernel)}: expected a triton.jit function to compile; got "
                           f"{type(kernel).__name__} (TRITON_INTERPRET is set?)")
    names = kernel.arg_names
    runtime, constexpr_values = dict(types), dict(constants)
    if sorted(runtime.keys() | constexpr_values.keys()) != sorted(names):
        raise ValueError(f"{kernel.__name__}: expected the arguments {sorted(names)}; got "
                         f"{sorted(runtime.keys() | constexpr_values.keys())}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        kind = runtime.get(name)
        signature[name] = kind or "constexpr"
        if kind is None:  # a constexpr argument, or an absent pointer (Triton's constexpr None)
            constexprs[(i,)] = constexpr_values.get(name)
        elif kind.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", POINTER_ALIGNMENT]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                              options=dict(options))
    metadata = compiled.metadata
    scratch = getattr(metadata, "global_scratch_size", 0)
    return CompiledKernel(metadata.name, metadata.num_warps, metadata.shared, compiled.asm["ptx"],
                          str(compiled.asm["ttir"]), capability,
                          (scratch, metadata.global_scratch_align) if scratch else None)


def launch(kernel: Any, grid: tuple[int, int, int], arguments: dict[str, Any], results: dict[str, jax.ShapeDtypeStruct],
           constants: dict[str, Any], options: dict[str, int], capability: int, op: str):
    """The results of one launch of kernel (a triton.jit function) over grid, under a trace or eagerly.

    arguments: every runtime argument that is not a result, by name: a jax.Array (a pointer operand), None (an
    absent pointer: a constexpr None, as Triton specializes it) or a Python float / int (baked into the call);
    results: the result arrays by name, each a pointer argument after every operand pointer; constants: the
    constexpr arguments. Returns one array per result, in the kernel's argument order.
    """
    types = {name: argument_type(x) for name, x in arguments.items()}
    types |= {name: argument_type(x) for name, x in results.items()}
    compiled = compile_kernel(kernel, tuple(types.items()), tuple(constants.items()), tuple(options.items()),
                              capability)
    order = [name for name in kernel.arg_names if name in types and types[name] is not None]
    pointers = [name for name in order if types[name].startswith("*")]
    first_result = min(pointers.index(name) for name in results)
    if any(name not in results for name in pointers[first_result:]):
        raise ValueError(f"{op}: {kernel.__name__}: expected its result pointers {sorted(results)} after every "
                         f"operand pointer (jaxlib hands a custom call its operands, then its results); got {pointers}")
    library = kernel_call_library()
    scratch = {} if compiled.global_scratch is None else dict(zip(("global_scratch_size", "global_scratch_align"),
                                                                 compiled.global_scratch))
    binary = library.TritonKernel(compiled.name, compiled.num_warps, 1, compiled.shared_bytes, compiled.ptx,
                                  compiled.ttir, compiled.capability, **scratch)
    parameters = [library.create_array_parameter(0, POINTER_ALIGNMENT) if types[name].startswith("*")
                  else library.create_scalar_parameter(arguments[name], types[name]) for name in order]
    call = library.TritonKernelCall(binary, *grid, parameters)
    operands = [arguments[name] for name in pointers if name not in results]
    return jax.ffi.ffi_call(FFI_TARGET, [results[name] for name in pointers if name in results])(
        *operands, opaque=zlib.compress(call.to_proto(compiled.name, b"")))


def chunk_fwd_o(q, k, v, h, g, cu_seqlens, chunk_indices, *, problem: contract.ChunkOProblem, scale: float,
                capability: int) -> jax.Array:
    """o of a validated problem by gdn.triton_kernels.chunk_o.chunk_fwd_o_kernel (cu_seqlens / chunk_indices int32
    when varlen, else None), launched as gdn.triton launches it: the problem's tiling and constexprs (JAX arrays are
    dense: problem.strides are contract.contiguous_strides), one program per (chunk, value head, V tile)."""
    tiling = problem.tiling
    programs = chunk_o_kernels.num_programs(problem, tiling)
    if programs == 0:
        return jnp.zeros(v.shape, v.dtype)
    arguments = dict(q=q, k=k, v=v, h=h, g=g, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=float(scale),
                     T=problem.T, N=problem.num_sequences)
    [o] = launch(chunk_o_kernels.chunk_fwd_o_kernel, (programs, 1, 1), arguments,
                 {"o": jax.ShapeDtypeStruct(v.shape, v.dtype)}, chunk_o_kernels.constants(problem, tiling),
                 tiling.triton_options(), capability, spec.CHUNK_O_OP)
    return o


def prepare(problem: forward_contract.ForwardProblem, k, v, g, beta, cu_seqlens, chunk_indices, A_log, dt_bias, *,
            softplus: tuple[float, float], capability: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage 1 of a validated forward problem by gdn.triton_kernels.forward.chunk_prepare_kernel, launched as
    gdn.triton.forward.prepare launches it: (g_c [B, T, HV] float32 with NaN on poison rows, w [B, T, HV, K],
    u [B, T, HV, V]), w and u in k's dtype. With problem.raw_gates, g and beta are the raw gates a and b, with A_log,
    dt_bias and softplus = (β, threshold); else A_log and dt_bias are None."""
    B, T, HV, K = problem.B, problem.T, problem.HV, problem.K
    results = {"g_cum": jax.ShapeDtypeStruct((B, T, HV), jnp.float32),
               "w": jax.ShapeDtypeStruct((B, T, HV, K), k.dtype), "u": jax.ShapeDtypeStruct(v.shape, v.dtype)}
    if problem.num_chunks_total * HV == 0:
        return tuple(jnp.zeros(x.shape, x.dtype) for x in results.values())
    tiling = problem.prepare
    arguments = dict(k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_seqlens,
                     chunk_indices=chunk_indices, softplus_beta=float(softplus[0]),
                     softplus_threshold=float(softplus[1]), T=problem.T, N=problem.N)
    return tuple(launch(forward_kernels.chunk_prepare_kernel, forward_kernels.prepare_grid(problem) + (1, 1),
                        arguments, results, forward_kernels.prepare_constants(problem, tiling),
                        tiling.triton_options(), capability, spec.FORWARD_OP))


def _walk(problem: forward_contract.ForwardProblem, q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_offsets,
          results: dict[str, jax.ShapeDtypeStruct], scale: float, pieces: int, *, store_h: bool, capability: int,
          mapped: int = 0) -> list[jax.Array]:
    """One launch of gdn.triton_kernels.forward.chunk_walk_kernel in a mode (gdn.triton.forward.walk_launch's):
    the results it writes, by name among o, final_state, h, v_new, map_m, map_n (the others absent: None)."""
    tiling = problem.walk
    pointers = ("o", "final_state", "h", "v_new", "map_m", "map_n")
    arguments = dict(q=q, k=k, w=w, u=u, g_cum=g_cum, initial_state=initial_state, cu_seqlens=cu_seqlens,
                     chunk_offsets=chunk_offsets, state_indices=None,
                     **{name: None for name in pointers if name not in results}, scale=float(scale), T=problem.T,
                     NUM_PIECES=pieces, MAPPED_PIECES=mapped, H_ROWS=problem.num_chunks_total if store_h else 0,
                     POOL_ROWS=0)
    constants = forward_kernels.walk_constants(problem, tiling, pieces, initial=initial_state is not None,
                                               final="final_state" in results, output_o="o" in results,
                                               store_h=store_h, mapped=mapped)
    return launch(forward_kernels.chunk_walk_kernel, forward_kernels.walk_grid(problem, tiling, pieces, mapped) + (1,),
                  arguments, results, constants, tiling.triton_options(), capability, spec.FORWARD_OP)


def piece_starts(problem: forward_contract.ForwardProblem, k, w, u, g_cum, initial_state, cu_seqlens, pieces: int, *,
                 capability: int) -> jax.Array:
    """The true initial state of every piece of every sequence, [N·pieces, HV, K, V] float32 (pieces ≥ 2), as
    gdn.triton.forward.piece_starts: the map walk of the pieces but the last, then the combine."""
    N, HV, K, V, mapped = problem.N, problem.HV, problem.K, problem.V, pieces - 1
    map_m, map_n = _walk(problem, None, k, w, u, g_cum, None, cu_seqlens, None,
                         {"map_m": jax.ShapeDtypeStruct((N * mapped, HV, K, K), jnp.float32),
                          "map_n": jax.ShapeDtypeStruct((N * mapped, HV, K, V), jnp.float32)},
                         1.0, pieces, store_h=False, capability=capability, mapped=mapped)
    tiling = tilings.SCAN_TILING
    [starts] = launch(forward_kernels.chunk_combine_kernel, forward_kernels.combine_grid(problem) + (1,),
                      dict(map_m=map_m, map_n=map_n, initial_state=initial_state, state_indices=None,
                           NUM_PIECES=pieces, POOL_ROWS=0),
                      {"starts": jax.ShapeDtypeStruct((N * pieces, HV, K, V), jnp.float32)},
                      forward_kernels.combine_constants(problem, initial_state is not None), tiling.triton_options(),
                      capability, spec.FORWARD_OP)
    return starts


def forward(problem: forward_contract.ForwardProblem, q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, A_log,
            dt_bias, *, scale: float, softplus: tuple[float, float], pieces: int, capability: int,
            fused: bool = tilings.FUSED_WALK, walk_lowering: str = "triton") -> tuple[jax.Array, jax.Array | None]:
    """(o, final_state or None) of a validated forward problem without a state pool by gdn.triton's forward kernels
    (gdn.triton_kernels.forward, chunk_o), launched as gdn.triton.forward.forward launches them: prepare, then in
    that many pieces per sequence (≥ 2: the map walk and the combine first) the walk storing h and v_new, then
    chunk_fwd_o (with fused, o from the walk itself; with walk_lowering="mosaic_gpu", from the Mosaic GPU walk,
    gdn.pallas.forward_mosaic_gpu). cu_seqlens / chunk_indices int32 when varlen, else None; g, beta, A_log,
    dt_bias, softplus as for prepare."""
    B, T, HV, K, V, N = problem.B, problem.T, problem.HV, problem.K, problem.V, problem.N
    if B * T == 0 or N * HV == 0:  # no tokens: the final state is the initial one
        final_state = None
        if problem.output_final_state:
            final_state = jnp.zeros((N, HV, K, V), jnp.float32) if initial_state is None else initial_state
        return jnp.zeros(v.shape, v.dtype), final_state
    g_cum, w, u = prepare(problem, k, v, g, beta, cu_seqlens, chunk_indices, A_log, dt_bias, softplus=softplus,
                          capability=capability)
    if pieces > 1:
        initial_state = piece_starts(problem, k, w, u, g_cum, initial_state, cu_seqlens, pieces,
                                     capability=capability)
    if walk_lowering == "mosaic_gpu":
        from gdn.pallas import forward_mosaic_gpu  # Mosaic GPU is imported only by a call that asks for it

        return forward_mosaic_gpu.fused_walk(problem, q, k, w, u, g_cum, initial_state, cu_seqlens, chunk_indices,
                                             scale, pieces, interpret=False)
    results = {}
    if fused:
        results["o"] = jax.ShapeDtypeStruct(v.shape, v.dtype)
    if problem.output_final_state:
        results["final_state"] = jax.ShapeDtypeStruct((N, HV, K, V), jnp.float32)
    chunk_offsets = None
    if not fused:
        results["h"] = jax.ShapeDtypeStruct((B, problem.chunks_per_row, HV, K, V), k.dtype)
        results["v_new"] = jax.ShapeDtypeStruct(v.shape, v.dtype)
        if problem.varlen:
            chunk_offsets = first_chunk_rows(cu_seqlens)
    walked = dict(zip(results, _walk(problem, q if fused else None, k, w, u, g_cum, initial_state, cu_seqlens,
                                     chunk_offsets, results, scale, pieces, store_h=not fused,
                                     capability=capability)))
    o = walked["o"] if fused else chunk_fwd_o(q, k, walked["v_new"], walked["h"], g_cum, cu_seqlens, chunk_indices,
                                              problem=problem.chunk_o(), scale=scale, capability=capability)
    return o, walked.get("final_state")
