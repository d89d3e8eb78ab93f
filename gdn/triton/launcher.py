"""Launching gdn's Triton kernels with little host time.

``kernel[grid](*args, **constexprs)`` binds and specializes every argument in Python on every call: 18 µs of
CPU per launch on the H100 machine (Triton 3.6), more than chunk_fwd_o's device time at T = 512. Once Triton
has compiled the variant a call needs, that variant's C launcher (``CompiledKernel.run``, what Triton calls
after the binding; 5.8 µs there) can be called directly: ``launch_kernel`` costs 12.9 µs with its key.
It does that when the call provably selects a variant it has launched before — same kernel, device,
constexprs and tiling; same dtypes and the same arguments None; every tensor 16-byte aligned; every int in
int32 range (Triton specializes pointers on 16-byte alignment and ints on their range, on 1 and on
divisibility by 16: ints enter the key by those properties). Every other call takes Triton's own path, and so
does every call while the kernel has pre-run hooks, while a launch hook is set (profilers), or under
TRITON_INTERPRET. Triton options read from the environment at compile time (TRITON_DEBUG and the like) are
not part of the key: a variant cached before they change keeps being launched.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from gdn.common import spec

_INT32 = range(-(2**31), 2**31)
# CompiledKernel.run(grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook,
# *all arguments, constexprs included) is the launch call of Triton 3.6 (checked on the GPU) through 3.9
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
_DIRECT_LAUNCH = _TRITON_VERSION >= (3, 6) and hasattr(triton, "knobs")

_compiled: dict[tuple, tuple[Any, tuple]] = {}


def _argument_key(x: Any) -> Any:
    """What Triton's specialization can see of a runtime argument, or False when the call must go through
    Triton (an unaligned tensor, an int out of int32 range, another type)."""
    if isinstance(x, torch.Tensor):
        return x.dtype if x.data_ptr() % 16 == 0 else False
    if x is None or isinstance(x, float):
        return type(x)
    if isinstance(x, int) and not isinstance(x, bool) and x in _INT32:
        return int, x == 1, x % 16 == 0
    return False


def _launch_hooks_set() -> bool:
    """Whether a launch enter/exit hook is set (None, or an empty HookChain on Triton ≥ 3.9, means none)."""
    runtime = triton.knobs.runtime
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def launch_kernel(kernel: Any, grid: tuple[int, ...], args: tuple, tiling: spec.Tiling, **constexprs: Any) -> None:
    """``kernel[grid](*args, **constexprs)`` with the tiling's launch options (num_warps, num_stages, maxnreg),
    through the compiled kernel when a launch with the same specialization compiled it before. args: the
    kernel's runtime arguments in order; constexprs: its constexpr parameters by name."""
    key = None
    if _DIRECT_LAUNCH and isinstance(kernel, JITFunction) and not kernel.pre_run_hooks and not _launch_hooks_set():
        arguments = tuple(_argument_key(x) for x in args)
        if False not in arguments:
            key = (kernel, driver.active.get_current_device(), tiling, tuple(constexprs.items()), arguments)
    cached = _compiled.get(key) if key is not None else None
    if cached is not None:
        compiled, constexpr_values = cached
        grid = grid + (1,) * (3 - len(grid))
        compiled.run(*grid, driver.active.get_current_stream(key[1]), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *constexpr_values)
        return
    options = {} if tiling.max_registers is None else {"maxnreg": tiling.max_registers}
    compiled = kernel[grid](*args, **constexprs, num_warps=tiling.num_warps, num_stages=tiling.num_stages, **options)
    names = getattr(kernel, "arg_names", ())
    if key is not None and compiled is not None and set(names[len(args):]) == set(constexprs):
        _compiled[key] = compiled, tuple(constexprs[name] for name in names[len(args):])
