"""Launching gdn's Triton kernels with little host time, and the caches of launch plans.

``kernel[grid](*args, **constexprs)`` binds and specializes every argument in Python on every call: 18 µs of
CPU per launch on the H100 machine (Triton 3.6), more than chunk_fwd_o's device time at T = 512. Once Triton
has compiled the variant a call needs, the C function under that variant's launcher (``CompiledKernel.run``,
a ``CudaLauncher`` whose ``launch`` takes the grid, stream, function, metadata and arguments) can be called
directly: 4.9 µs there. That fast path calls Triton internals whose signatures change between releases, so it
is taken only on the Triton versions in VERIFIED_TRITON (checked on a GPU: tests/test_launcher.py compares the
bits of both paths); every other version launches through Triton's own ``kernel[grid](...)``.

A ``KernelLaunch`` fixes everything of a launch but the runtime argument values: kernel, grid, tiling and
constexprs. Each op has one plan function building its launches for a validated problem; the plans are cached
(``cached_plan``) per call signature (chunk_fwd_o: gdn.triton.arrays.planned, together with the contract check;
decode_step: gdn.triton.decode.plan, whose signature holds the strides it reads in place too) or per (problem,
tiling) (the forward's stages, and the launches benchmarks make with other tilings), and ``reset_plans()``
empties every such cache. A launch's first call on a device goes through
Triton and records the compiled variant with the arguments it was specialized for; a later call goes straight
to that variant's C launcher when it provably selects the same one: the same device; every tensor argument a
``torch.Tensor`` of the recorded dtype, 16-byte aligned (Triton specializes pointers on 16-byte alignment);
every other argument of the recorded type, None and ints with the recorded value (stricter than Triton's int
key: ==1, divisibility by 16, int32 range; gdn's int arguments are sizes fixed per problem), or, for a launch
built with fixed_signature, every tensor 16-byte aligned. Every other launch takes Triton's own path, and so
does every launch while the kernel has pre-run hooks, while a launch hook is set (profilers), or under
TRITON_INTERPRET. Triton options read from the environment at compile time (TRITON_DEBUG and the like) are not
part of the record: a variant recorded before they change keeps being launched.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from gdn.common import tilings

_INT32 = range(-(2**31), 2**31)

VERIFIED_TRITON = ((3, 6),)
"""Triton (major, minor) releases whose launch internals the fast path was checked against on a GPU. On them,
CompiledKernel.run is a CudaLauncher: run(grid x, y, z, stream, function, packed metadata, launch metadata,
enter hook, exit hook, *all arguments, constexprs included), whose Python __call__ allocates the global and
profile scratch buffers and then calls its C function launch(grid x, y, z, stream, function, cooperative grid,
PDL, global scratch, profile scratch, packed metadata, launch metadata, enter hook, exit hook, *all arguments);
for a variant that needs no scratch gdn calls that C function itself (1 µs less per launch on the H100
machine). Add a release here only after tests/test_launcher.py's GPU tests pass on it."""


def fast_launch_supported(version: str) -> bool:
    """Whether Triton `version` (e.g. "3.6.0") is one the fast path was verified on (VERIFIED_TRITON)."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return major_minor in VERIFIED_TRITON and hasattr(triton, "knobs")


_PLAN_CACHES: list[Any] = []
Build = TypeVar("Build", bound=Callable[..., Any])


def cached_plan(build: Build) -> Build:
    """build (a plan function: its launches for hashable arguments such as a problem and a tiling) cached per
    arguments; reset_plans() empties the cache."""
    cached = functools.lru_cache(maxsize=1024)(build)
    _PLAN_CACHES.append(cached)
    return cached  # type: ignore[return-value]


def reset_plans() -> None:
    """Drop every cached launch plan (and the compiled variants they recorded), so that the next call of each
    op plans its launches anew: what tests that swap a kernel or a Triton version call."""
    for cache in _PLAN_CACHES:
        cache.cache_clear()


def _argument_key(x: Any) -> Any:
    """What Triton's specialization can see of a runtime argument, or False when no launch may skip Triton's
    binding (an unaligned tensor, an int out of int32 range, another type)."""
    if isinstance(x, torch.Tensor):
        return x.dtype if x.data_ptr() % 16 == 0 else False
    if x is None or isinstance(x, float):
        return type(x)
    if isinstance(x, int) and not isinstance(x, bool) and x in _INT32:
        return int, x == 1, x % 16 == 0
    return False


def _launch_hooks_set() -> bool:
    """Whether a launch enter/exit hook is set (None, or an empty HookChain on Triton ≥ 3.9, means none)."""
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True)))


def _launch_call(compiled: Any) -> tuple[Any, tuple]:
    """(launch function, its arguments between the stream and the kernel's arguments) of a compiled variant
    that has run once, on a VERIFIED_TRITON release: its CudaLauncher's C launch function when the variant
    needs no scratch memory, else CompiledKernel.run."""
    launcher = compiled.run
    if (hasattr(launcher, "launch") and not getattr(launcher, "global_scratch_size", 1)
            and not getattr(launcher, "profile_scratch_size", 1)):
        return launcher.launch, (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None,
                                 None, compiled.packed_metadata, None, None, None)
    return launcher, (compiled.function, compiled.packed_metadata, None, None, None)


@dataclasses.dataclass(frozen=True)
class _Variant:
    """A compiled variant and the arguments its first launch had: (position, dtype) of every tensor, and
    (position, type, value) of every other argument, value None for floats (only their type is specialized);
    launch(grid x, y, z, stream, *launch_head, *arguments, *constexpr_values) launches it."""

    compiled: Any
    constexpr_values: tuple
    tensors: tuple[tuple[int, torch.dtype], ...]
    scalars: tuple[tuple[int, type, Any], ...]
    launch: Any
    launch_head: tuple

    @staticmethod
    def record(compiled: Any, constexpr_values: tuple, args: tuple) -> _Variant | None:
        """The variant compiled for args, or None when args hold something a later launch cannot be matched
        on (an unaligned tensor, an int out of int32 range, another type)."""
        if False in (_argument_key(x) for x in args):
            return None
        tensors = tuple((i, x.dtype) for i, x in enumerate(args) if isinstance(x, torch.Tensor))
        scalars = tuple((i, type(x), None if isinstance(x, float) else x)
                        for i, x in enumerate(args) if not isinstance(x, torch.Tensor))
        return _Variant(compiled, constexpr_values, tensors, scalars, *_launch_call(compiled))

    def matches(self, args: tuple) -> bool:
        """Whether Triton would select this variant for args (see the module docstring)."""
        for i, dtype in self.tensors:
            x = args[i]
            if x.__class__ is not torch.Tensor or x.dtype is not dtype or x.data_ptr() & 15:
                return False
        for i, kind, value in self.scalars:
            x = args[i]
            if x.__class__ is not kind or (value is not None and x != value):
                return False
        return True

    def aligned(self, args: tuple) -> bool:
        """Whether every tensor argument is 16-byte aligned: all a fixed-signature launch checks."""
        for i, _ in self.tensors:
            if args[i].data_ptr() & 15:
                return False
        return True


class KernelLaunch:
    """``kernel[grid](*args, **constexprs)`` with the tiling's launch options (num_warps, num_stages, maxnreg),
    everything but args fixed; calling it launches on the current device and stream, on a VERIFIED_TRITON
    release through the compiled variant's C launcher after the first launch on that device (module
    docstring), else through Triton's launcher every time.

    fixed_signature: the owner promises that every call passes tensors of the same dtypes, None in the same
    places, the same ints and a float where a float was, as an op's plan for one call signature does (its
    cache key holds every input's dtype and shape, and its outputs and ints follow from them); then a launch
    checks only alignment (0.7 µs of CPU on the H200 machine) instead of the full match (1.4 µs).
    """

    def __init__(self, kernel: Any, grid: tuple[int, ...], tiling: tilings.Tiling, *, fixed_signature: bool = False,
                 **constexprs: Any) -> None:
        self.kernel = kernel
        self.fixed_signature = fixed_signature
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.tiling = tiling
        self.constexprs = constexprs
        self.launch_options = tiling.triton_options()
        self._direct = fast_launch_supported(triton.__version__) and isinstance(kernel, JITFunction)
        self._variants: dict[int, _Variant] = {}  # device → the variant its first recordable launch compiled

    def __call__(self, *args: Any) -> None:
        """Launch with the kernel's runtime arguments in order (its constexpr parameters are fixed)."""
        if not self._direct:
            self.kernel[self.grid](*args, **self.constexprs, **self.launch_options)
            return
        device = driver.active.get_current_device()
        variant = self._variants.get(device)
        if (variant is not None and not self.kernel.pre_run_hooks and not _launch_hooks_set()
                and (variant.aligned(args) if self.fixed_signature else variant.matches(args))):
            variant.launch(*self.grid, driver.active.get_current_stream(device), *variant.launch_head, *args,
                           *variant.constexpr_values)
            return
        compiled = self.kernel[self.grid](*args, **self.constexprs, **self.launch_options)
        constexpr_names = self.kernel.arg_names[len(args):]
        if variant is None and compiled is not None and set(constexpr_names) == set(self.constexprs):
            variant = _Variant.record(compiled, tuple(self.constexprs[name] for name in constexpr_names), args)
            if variant is not None:
                self._variants[device] = variant
