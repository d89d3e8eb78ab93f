"""``python -m benchmarks.profile_chunk_o``: chunk_fwd_o's kernels launched a few times at the benchmark shapes,
for Nsight Compute, plus a host-time breakdown, cold first calls and the Pallas grid sweep.

    ncu --clock-control none --kernel-name regex:chunk_fwd_o --metrics gpu__time_duration.sum,... \\
        python -m benchmarks.profile_chunk_o
    python -m benchmarks.profile_chunk_o --host      # where the Triton call's CPU time goes
    python -m benchmarks.profile_chunk_o --cold      # first-call compile times from an empty Triton cache
    python -m benchmarks.profile_chunk_o --pallas-grids   # under ncu: the grids of tilings.persistent_programs

Order of launches: per shape, triton (warm-up, profiled) then pallas (warm-up, profiled).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ARGS = ("q", "k", "v", "h", "g", "scale", "cu_seqlens", "chunk_indices")


def profile_launches() -> None:
    """Per shape of benchmarks.shapes.SHAPES: two Triton launches, then two Pallas launches."""
    import jax
    import torch

    import gdn.pallas
    import gdn.triton
    from benchmarks import shapes

    for shape in shapes.SHAPES:
        t = dict(shapes.chunk_o_inputs(shape, seed=0), scale=None)
        j = shapes.to_jax(t)
        for _ in range(2):
            gdn.triton.chunk_fwd_o(*(t[n] for n in ARGS))
        torch.cuda.synchronize()
        for _ in range(2):
            jax.block_until_ready(gdn.pallas.chunk_fwd_o(*(j[n] for n in ARGS)))
        print(f"launched {shape.name}", flush=True)


def _c_launcher_only(run, runtime_args: tuple) -> Callable[[], None]:
    """The launch a KernelLaunch ends in, alone: its recorded variant's launch function (Triton internals: the C
    launch function on Triton 3.6, else CompiledKernel.run) on the current device, looked up once here."""
    from triton.runtime.driver import driver

    device = driver.active.get_current_device()
    variant = run._variants[device]
    return lambda: variant.launch(*run.grid, driver.active.get_current_stream(device), *variant.launch_head,
                                  *runtime_args, *variant.constexpr_values)


def host_breakdown(repeats: int = 9, calls: int = 300) -> None:
    """CPU µs per call of each layer of the Triton path at T = 512 (no synchronization inside the loop), and
    of whole chunk_gated_delta_rule (T = 512) and decode_step (N = 64) calls: per layer, after a warm-up,
    the median and the least of `repeats` loops of `calls` calls back to back."""
    import torch

    from benchmarks import shapes
    from gdn.common import spec
    from gdn.triton import chunk_gated_delta_rule, chunk_o, decode_step

    t = shapes.chunk_o_inputs(shapes.HOST_SHAPE, seed=0)
    q, k, v, h, g = (t[n] for n in "qkvhg")
    o = torch.empty_like(v)
    problem, run, *_ = chunk_o.call_plan(q, k, v, h, g)  # chunk_fwd_o's plan of this call signature
    chunk_o.chunk_fwd_o(q, k, v, h, g)  # compiles the variant and records it in run
    runtime_args = (q, k, v, h, g, None, None, o, spec.default_scale(problem.K), problem.T, problem.num_sequences)
    f = shapes.forward_inputs(shapes.HOST_SHAPE, seed=0)
    d = shapes.decode_inputs(64, seed=0)
    layers = {
        "chunk_fwd_o (all)": lambda: chunk_o.chunk_fwd_o(q, k, v, h, g),
        "contract check + plan (cached)": lambda: chunk_o.call_plan(q, k, v, h, g),
        "torch.empty_like": lambda: torch.empty_like(v),
        "triton kernel[grid](...)": lambda: run.kernel[run.grid](*runtime_args, **run.constexprs,
                                                                 **run.launch_options),
        "KernelLaunch (recorded variant)": lambda: run(*runtime_args),
        "the variant's launch function alone": _c_launcher_only(run, runtime_args),
        "chunk_gated_delta_rule T512": lambda: chunk_gated_delta_rule(f["q"], f["k"], f["v"], f["g"], f["beta"],
                                                                      output_final_state=True),
        "decode_step N64 HV32": lambda: decode_step(*(d[n] for n in ("q", "k", "v", "g", "beta", "state"))),
    }
    for name, fn in layers.items():
        us = []
        for _ in range(repeats + 1):  # the first loop warms up
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            us.append((time.perf_counter() - start) / calls * 1e6)
        print(f"host µs/call  {name:<34} median {np.median(us[1:]):7.2f}  least {min(us[1:]):7.2f}", flush=True)


def cold_compile() -> None:
    """First-call times from an empty TRITON_CACHE_DIR: Triton's one-time start (driver utilities, launcher
    build) through a trivial kernel, then gdn.triton.warmup for two new (dtype, K, V) in the same process."""
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gdn-cold-")
    import torch
    import triton
    import triton.language as tl

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()

    @triton.jit
    def touch(x):
        tl.store(x, 1.0)

    start = time.perf_counter()
    touch[(1,)](torch.zeros(1, device="cuda"))
    torch.cuda.synchronize()
    print(f"cold  triton start-up + trivial kernel      {time.perf_counter() - start:6.3f} s", flush=True)
    import gdn.triton

    for dtype, K, V in ((torch.bfloat16, 128, 128), (torch.float16, 64, 64)):
        start = time.perf_counter()
        gdn.triton.warmup(dtype, K, V, HV=16, H=16)
        torch.cuda.synchronize()
        print(f"cold  gdn.triton first call {str(dtype):>15} K={K} V={V}  {time.perf_counter() - start:6.3f} s "
              f"(variants {gdn.triton.compiled_variants()})", flush=True)


PALLAS_GRID_SHAPES = [(1, 2048, 16, 16), (1, 4096, 16, 16), (1, 8192, 16, 16), (1, 16384, 16, 16), (1, 65536, 16, 16),
                      (1, 8192, 2, 8), (1, 16384, 2, 8), (8, 2048, 16, 32)]


def pallas_grids() -> None:
    """The measurement behind tilings.persistent_programs: gdn's Pallas chunk_fwd_o at each shape (and a varlen
    batch of 64 sequences, 65536 tokens) with the spec's grid, one program per work item, and persistent grids of
    1 and 2 programs per SM, each launched once to warm up and three times for Nsight Compute; every grid's
    output is checked bit for bit against the spec grid's. Prints the launch order."""
    import jax.numpy as jnp

    from benchmarks.shapes import varlen_seqlens
    from gdn.common import example, spec, tilings
    from gdn.pallas.arrays import as_index, multiprocessor_count
    from gdn.pallas.chunk_o import checked_problem, launch

    sms = multiprocessor_count()
    lengths = varlen_seqlens(64, 4000, 65536)
    shapes = [shape + (None,) for shape in PALLAS_GRID_SHAPES] + [(1, sum(lengths), 16, 16, lengths)]
    for B, T, H, HV, seqlens in shapes:
        cu = None if seqlens is None else np.cumsum((0,) + seqlens).astype(np.int32)
        a = example.random_inputs(B, T, H, HV, 128, 128, "bfloat16", True, cu, seed=0)
        q, k, v, h = (jnp.asarray(a[n], jnp.bfloat16) for n in "qkvh")
        g = jnp.asarray(a["g"])
        cu_seqlens = as_index(cu)
        chunk_indices = None if cu is None else as_index(spec.prepare_chunk_indices(cu))
        problem = checked_problem(q, k, v, h, g, cu_seqlens, chunk_indices)
        items = problem.num_programs
        name = f"B{B}-T{T}-H{H}-HV{HV}" + ("" if seqlens is None else f"-varlen{len(seqlens)}")
        spec_grid = None
        for label, programs in [("spec", None), ("one per item", items), ("1 per SM", sms), ("2 per SM", 2 * sms)]:
            if programs is not None and programs > items:
                continue
            for _ in range(4):
                o = launch(q, k, v, h, g, spec.default_scale(128), cu_seqlens, chunk_indices, problem=problem,
                           interpret=False, programs=programs).block_until_ready()
            spec_grid = o if spec_grid is None else spec_grid
            print(f"launched 4x {name} {label} (items {items}, spec grid {tilings.persistent_programs(items, sms)}): "
                  f"bit-equal to the spec grid {bool(jnp.array_equal(o, spec_grid))}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_chunk_o", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", action="store_true", help="print the host-time breakdown instead")
    parser.add_argument("--cold", action="store_true", help="print cold first-call times (empty Triton cache)")
    parser.add_argument("--pallas-grids", action="store_true",
                        help="launch the Pallas kernel on the grids behind tilings.persistent_programs (for ncu)")
    args = parser.parse_args(argv)
    if args.host:
        host_breakdown()
    elif args.cold:
        cold_compile()
    elif args.pallas_grids:
        pallas_grids()
    else:
        profile_launches()


if __name__ == "__main__":
    main()
