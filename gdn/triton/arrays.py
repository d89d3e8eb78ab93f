"""torch tensors as the spec's contract sees them: the adapters both gdn.triton ops share."""

from __future__ import annotations

import os
from collections.abc import Callable, Container, Hashable, Sequence
from typing import TypeVar

import torch
import triton

from gdn.common import checks, contract, spec
from gdn.triton.launcher import cached_plan

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.int32: "int32", torch.int64: "int64"}

TensorKey = tuple | None
"""(shape, dtype, device) of a tensor argument, with its strides appended for a strided view; None for None."""


def tensor_keys(names: Sequence[str], args: Sequence[torch.Tensor | None],
                op: str = spec.CHUNK_O_OP) -> tuple[TensorKey, ...]:
    """(shape, dtype, device) of each argument, None for None, after the per-call checks that a key cannot
    carry: each is a torch.Tensor and contiguous."""
    keys = []
    for name, x in zip(names, args):
        if x is None:
            keys.append(None)
        elif isinstance(x, torch.Tensor) and x.is_contiguous():
            keys.append((x.shape, x.dtype, x.device))
        elif not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name}: expected a torch.Tensor; got {type(x).__name__}")
        else:
            raise ValueError(f"{op}: {name}: expected a contiguous tensor (call .contiguous()); "
                             f"got strides {tuple(x.stride())} for shape {tuple(x.shape)}")
    return tuple(keys)


StridedKey = tuple[torch.Size, torch.dtype, torch.device, tuple[int, ...]] | None


def strided_keys(names: Sequence[str], args: Sequence[torch.Tensor | None], op: str) -> tuple[StridedKey, ...]:
    """(shape, dtype, device, strides) of each argument, None for None, after checking each is a torch.Tensor:
    the key of an op that passes strides to its kernel and copies only what its layout rules refuse."""
    keys = []
    for name, x in zip(names, args):
        if x is None:
            keys.append(None)
        elif isinstance(x, torch.Tensor):
            keys.append((x.shape, x.dtype, x.device, x.stride()))
        else:
            raise TypeError(f"{op}: {name}: expected a torch.Tensor; got {type(x).__name__}")
    return tuple(keys)


def layout_keys(names: Sequence[str], args: Sequence[torch.Tensor | None], strided: Container[str],
                op: str = spec.CHUNK_O_OP) -> tuple[list[torch.Tensor | None], tuple[TensorKey, ...]]:
    """(arguments as the kernels read them, their keys), for an op whose kernels take strides for the arguments
    named in strided: a view of those in a layout checks.row_strides accepts (the q, k, v slices of one fused
    projection) stays in place, keyed (shape, dtype, device, strides); every other non-contiguous tensor is
    copied once with .contiguous() (one read and one write of it) and keyed as the copy; contiguous tensors cost
    one is_contiguous() call."""
    keys: list[TensorKey] = []
    arrays = list(args)
    for i, (name, x) in enumerate(zip(names, args)):
        if x is None:
            keys.append(None)
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name}: expected a torch.Tensor; got {type(x).__name__}")
        if not x.is_contiguous():
            if name in strided and x.dim() == 4 and checks.row_strides(x.shape, x.stride()) is not None:
                keys.append((x.shape, x.dtype, x.device, x.stride()))
                continue
            arrays[i] = x = x.contiguous()
        keys.append((x.shape, x.dtype, x.device))
    return arrays, tuple(keys)


def array_info(key: TensorKey | StridedKey) -> contract.ArrayInfo:
    """The spec's framework-neutral view of a (shape, dtype, device[, strides]) key."""
    shape, dtype, device, *strides = key
    return contract.ArrayInfo(tuple(shape), DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")), str(device),
                              tuple(strides[0]) if strides else None)


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(device: torch.device, op: str, name: str = "q") -> None:
    """Refuse CPU tensors unless Triton runs interpreted: compiled Triton kernels need a GPU (else Triton's
    "0 active drivers"). Called once per call signature (the ops' cached plans)."""
    if device.type == "cpu" and not _interpreting():
        raise ValueError(f"{op}: {name}: expected a CUDA tensor (CPU tensors run only in the Triton interpreter: "
                         f"set TRITON_INTERPRET=1 before importing triton); got a tensor on {device}")


def refuse_grad(op: str, names: Sequence[str], args: Sequence[torch.Tensor | None]) -> None:
    """Refuse inputs that require grad while grad mode is on: the op has no backward, and a detached output
    would silently backpropagate zero."""
    if torch.is_grad_enabled():
        for i, x in enumerate(args):
            if x is not None and x.requires_grad:
                raise RuntimeError(f"gdn: {op} has no backward; {names[i]} requires grad (call it under "
                                   "torch.no_grad() or pass detached tensors)")


Problem = TypeVar("Problem")
Plan = TypeVar("Plan")


@cached_plan
def planned(contract: Callable[..., Problem], plan: Callable[[Problem], Plan], keys: tuple[TensorKey, ...],
            *options: Hashable) -> tuple[Problem, Plan]:
    """(problem, plan(problem)): a spec contract (validate_chunk_o_inputs, validate_forward_inputs) on the
    arrays of keys, then its further positional arguments (host cu_seqlens values as a tuple, flags), and the
    op's kernel launches for that problem (its plan function); cached, so a repeated call signature costs one
    lookup (gdn.triton.reset_plans empties the cache)."""
    problem = contract(*(None if key is None else array_info(key) for key in keys), *options)
    return problem, plan(problem)


def first_chunk_rows(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] each sequence's first row of h (or dh) in a varlen batch, on the device (no host sync): the exclusive
    cumulative sum of the sequences' chunk counts ceil((cu_seqlens[n + 1] − cu_seqlens[n]) / CHUNK_SIZE)."""
    counts = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + spec.CHUNK_SIZE - 1, spec.CHUNK_SIZE, rounding_mode="floor")
    return torch.cumsum(counts, 0) - counts


def host_cu_seqlens(cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None) -> tuple[int, ...] | None:
    """The values of cu_seqlens for the contract check and for building chunk_indices: read when it is on the
    host, or when chunk_indices is missing (then a device→host copy, a sync); None when not read."""
    if cu_seqlens is None or cu_seqlens.dim() != 1:
        return None
    if chunk_indices is None or cu_seqlens.device.type == "cpu":
        return tuple(cu_seqlens.tolist())
    return None
