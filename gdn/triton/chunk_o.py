"""chunk_fwd_o for PyTorch: one Triton kernel (gdn.triton_kernels.chunk_o, shared with JAX's triton_call), tile
height CHUNK_SIZE, tiling from gdn.common.tilings."""

from __future__ import annotations

import torch

from gdn.common import checks, contract, spec, tilings
from gdn.triton.arrays import check_device, host_cu_seqlens, layout_keys, planned, refuse_grad
from gdn.triton.launcher import KernelLaunch, cached_plan
from gdn.triton_kernels import chunk_o as chunk_o_kernels
from gdn.triton_kernels.chunk_o import chunk_fwd_o_kernel

ARG_NAMES = ("q", "k", "v", "h", "g", "cu_seqlens", "chunk_indices")
_STRIDED = ("q", "k", "v")
"""The arguments the kernel reads at their own token-row and head strides (checks.row_strides)."""


def chunk_fwd_o(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of chunked Gated DeltaNet: o [B, T, HV, V] in v's dtype (a new dense tensor).

    q, k [B, T, H, K]; v [B, T, HV, V]; h [B, NT, HV, K, V]; g [B, T, HV] float32 chunk-local cumulative
    log-gate (the cumsum of the per-token log-gates within each chunk; −∞ is a reset) or None; scale
    defaults to K**-0.5. Varlen: B = 1, cu_seqlens [N + 1] int32/int64 on q's device, chunk_indices [NT, 2]
    from gdn.common.spec.prepare_chunk_indices on q's device. Without chunk_indices, cu_seqlens is copied to
    the host once (a device sync) to build them and check its values; pass chunk_indices to avoid that (device
    values are then not checked; the kernel bounds them: gdn.common.contract). q, k and v may be strided
    views (the slices of one fused projection) read in place; other layouts are copied once. No backward:
    inputs that require grad are refused while grad mode is on. Under torch.compile the call is the custom op
    gdn::chunk_fwd_o (gdn.triton.custom_ops). Non-finite inputs: gdn.common.spec.
    """
    if torch.compiler.is_compiling():
        return torch.ops.gdn.chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens, chunk_indices)
    return run(q, k, v, h, g, scale, cu_seqlens, chunk_indices)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None,
        scale: float | None, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None) -> torch.Tensor:
    """chunk_fwd_o's eager path, and the implementation of its custom op."""
    problem, launch_o, cu_values, (q, k, v, h, g, cu_seqlens, chunk_indices) = call_plan(
        q, k, v, h, g, cu_seqlens, chunk_indices)
    if q.requires_grad or k.requires_grad or v.requires_grad or h.requires_grad or (g is not None and g.requires_grad):
        refuse_grad(spec.CHUNK_O_OP, ARG_NAMES, (q, k, v, h, g))
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = torch.from_numpy(spec.prepare_chunk_indices(cu_values)).to(q.device)
    elif cu_values is not None and chunk_indices is not None and chunk_indices.device.type == "cpu":
        checks.chunk_indices_rows(cu_values, chunk_indices.numpy())
    # o dense whatever v's layout (empty_like would copy a dense permutation's strides); for a dense v, plain
    # empty_like costs less CPU than asking for the format (2.0 against 3.0 µs, measured on a CPU-only machine)
    o = torch.empty_like(v) if v.is_contiguous() else torch.empty_like(v, memory_format=torch.contiguous_format)
    if launch_o is not None:
        scale = spec.default_scale(problem.K) if scale is None else float(scale)
        launch_o(q, k, v, h, g, cu_seqlens, chunk_indices, o, scale, problem.T, problem.num_sequences)
    return o


def call_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None,
              cu_seqlens: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
              ) -> tuple[contract.ChunkOProblem, KernelLaunch | None, tuple[int, ...] | None,
                         list[torch.Tensor | None]]:
    """(problem, launch, host cu_seqlens values or None, the arguments as the kernel reads them) of a chunk_fwd_o
    call: the contract check and plan() of its call signature, cached (one lookup for a repeated signature).
    q, k and v in a layout checks.row_strides accepts are read in place, every other non-contiguous argument is
    copied once (arrays.layout_keys)."""
    arrays, keys = layout_keys(ARG_NAMES, (q, k, v, h, g, cu_seqlens, chunk_indices), _STRIDED)
    cu_values = host_cu_seqlens(arrays[5], arrays[6])
    problem, launch_o = planned(_validated, plan, keys, cu_values)
    return problem, launch_o, cu_values, arrays


def _validated(q: contract.ArrayInfo, k: contract.ArrayInfo, v: contract.ArrayInfo, h: contract.ArrayInfo,
               g: contract.ArrayInfo | None, cu_seqlens: contract.ArrayInfo | None,
               chunk_indices: contract.ArrayInfo | None,
               cu_seqlens_values: tuple[int, ...] | None) -> contract.ChunkOProblem:
    """contract.validate_chunk_o_inputs after the check that the kernel can run on q's device."""
    check_device(torch.device(q.device), spec.CHUNK_O_OP)
    return contract.validate_chunk_o_inputs(q, k, v, h, g, cu_seqlens, chunk_indices, cu_seqlens_values)


def plan(problem: contract.ChunkOProblem) -> KernelLaunch | None:
    """chunk_fwd_o's plan for a validated problem: its launch with the problem's tiling
    (tilings.chunk_o_tiling), None when it has no programs. Fixed signature (gdn.triton.launcher.KernelLaunch):
    a plan belongs to one call signature."""
    return kernel_launch(problem, problem.tiling, fixed_signature=True)


def kernel_launch(problem: contract.ChunkOProblem, tiling: tilings.Tiling,
                  fixed_signature: bool = False) -> KernelLaunch | None:
    """The kernel launch of a validated problem with a tiling, None when it has no programs."""
    programs = chunk_o_kernels.num_programs(problem, tiling)
    if programs == 0:
        return None
    return KernelLaunch(chunk_fwd_o_kernel, (programs,), tiling, fixed_signature=fixed_signature,
                        **chunk_o_kernels.constants(problem, tiling))


@cached_plan
def shared_launch(problem: contract.ChunkOProblem, tiling: tilings.Tiling) -> KernelLaunch | None:
    """kernel_launch cached per (problem, tiling), shared by calls with other h dtypes (the problem does not fix
    it), so each launch is matched in full."""
    return kernel_launch(problem, tiling)


def launch(problem: contract.ChunkOProblem, tiling: tilings.Tiling, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None, o: torch.Tensor, scale: float,
           cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None) -> None:
    """Launch the kernel for a validated problem with the given tiling, writing o: the forward's stage 3, and
    the tiling sweeps of benchmarks/tune_chunk_o.py."""
    launch_o = shared_launch(problem, tiling)
    if launch_o is not None:
        launch_o(q, k, v, h, g, cu_seqlens, chunk_indices, o, scale, problem.T, problem.num_sequences)


def warmup(
    dtype: torch.dtype,
    K: int,
    V: int,
    *,
    HV: int,
    H: int,
    gated: bool = True,
    varlen: bool = False,
    state_dtype: torch.dtype | None = None,
    device: str | torch.device = "cuda",
) -> None:
    """Compile everything a later chunk_fwd_o call with these dtypes, sizes and flags needs, for any T.

    One call at T = CHUNK_SIZE with exactly the dtypes and flags of real calls (state_dtype defaults to
    dtype: pass h's dtype if it differs, e.g. float32 states). The tiling comes from the static table in
    gdn.common.spec, never from timing this shape, so a warmup at T = CHUNK_SIZE serves T = 1 and T = 64k alike.
    """
    call = spec.warmup_arguments(spec.CHUNK_SIZE, H, HV, K, V, gated, varlen)
    q = torch.zeros(call["q"], dtype=dtype, device=device)
    v = torch.zeros(call["v"], dtype=dtype, device=device)
    h = torch.zeros(call["h"], dtype=state_dtype or dtype, device=device)
    g = torch.zeros(call["g"], dtype=torch.float32, device=device) if gated else None
    cu_seqlens, chunk_indices = (None if call[n] is None else torch.from_numpy(call[n]).to(device)
                                 for n in ("cu_seqlens", "chunk_indices"))
    chunk_fwd_o(q, q, v, h, g, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
