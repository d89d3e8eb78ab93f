"""``python -m benchmarks.profile_forward``: the forward's kernels under Nsight Compute, gdn's beside the peers'.

    python -m benchmarks.profile_forward [--shapes B1-T8192-H16-HV16] [--impls ...] [--out DIR]

Runs ncu over itself (``--launch``: every implementation is warmed up, then each is launched once between
cudaProfilerStart and cudaProfilerStop, a ``spin_kernel`` between two implementations marking where the next
begins), reads ncu's CSV and prints per kernel: its time, the SM cycles it took and those cycles per chunk of
one sequence (T / 64: the walks' sequential steps), achieved and theoretical occupancy, registers per thread, and
the three largest warp stall reasons (cycles per issued instruction). gdn-triton-fused is gdn Triton's forward
with the walk that computes o itself (tilings.FUSED_WALK). Writes forward_profile.csv (+ .env.json, .txt).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import forward, harness, shapes, tune_forward
from gdn.common import spec

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
IMPLS = ("gdn-triton", "gdn-triton-fused", "gdn-mosaic", "flashinfer", "flashinfer-cp", "jla-mosaic")
DEFAULT_SHAPES = "B1-T8192-H16-HV16"
SECTIONS = ("LaunchStats", "Occupancy", "WarpStateStats", "SpeedOfLight")
MARKER_KERNEL = "spin_kernel"
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")


def fused_walk_impl() -> harness.Impl:
    """gdn Triton's forward at the spec's pieces with the fused walk (o computed in the walk, h never stored)."""
    import torch

    from gdn.triton import forward as triton_forward

    def make(shape: shapes.Shape, t: dict) -> Any:
        problem, inputs = tune_forward.forward_problem(shape)
        pieces = problem.pieces(triton_forward.multiprocessors(torch.device("cuda")))
        args = tuple(inputs[n] for n in ("q", "k", "v", "g", "beta")) + (shape.K**-0.5, None, None, None)
        return lambda: triton_forward.forward(problem, *args, pieces, fused=True)

    return harness.Impl("gdn-triton-fused", "torch", make)


def launch(selected: list[shapes.Shape], wanted: list[str]) -> int:
    """Warm every implementation up at each shape, then launch each once inside the profiled range."""
    import torch

    impls = forward.load_impls(wanted)
    if "gdn-triton-fused" in wanted:
        impls["gdn-triton-fused"] = fused_walk_impl()
    for shape in selected:
        torch_inputs = shapes.forward_inputs(shape, seed=0)
        jax_inputs = shapes.to_jax(torch_inputs) if any(i.framework == "jax" for i in impls.values()) else {}
        calls = {}
        for name in wanted:
            impl = impls.get(name)
            if impl is None or impl.make is None:
                harness.progress(f"{shape.name}: {name}: {impl.note if impl else 'unknown'}")
                continue
            calls[name] = impl.make(shape, jax_inputs if impl.framework == "jax" else torch_inputs)
            for _ in range(2):
                harness.synced(impl, calls[name])
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for name, call in calls.items():
            torch.cuda._sleep(1000)  # the marker: the next kernels are name's
            harness.synced(impls[name], call)
        torch.cuda.cudart().cudaProfilerStop()
        print(f"PROFILED {shape.name} {','.join(calls)}", flush=True)
    return 0


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def kernel_rows(ncu_csv: str, shape: shapes.Shape, names: list[str]) -> list[dict[str, Any]]:
    """One row per profiled kernel of ncu's raw CSV (header, units, then one line per kernel), each given to the
    implementation whose marker precedes it."""
    lines = list(csv.reader(io.StringIO(ncu_csv[ncu_csv.index('"ID"'):])))
    header, kernels = lines[0], lines[2:]
    chunks = spec.num_chunks(shape.T if shape.seqlens is None else max(shape.seqlens))
    rows, impl_index = [], -1
    for values in kernels:
        metric = dict(zip(header, values))
        name = metric.get("Kernel Name", "")
        if MARKER_KERNEL in name:
            impl_index += 1
            continue
        if not 0 <= impl_index < len(names):
            continue
        cycles = next((_number(metric[m]) for m in ("sm__cycles_elapsed.max", "gpc__cycles_elapsed.max")
                       if m in metric), None)
        stalls = sorted(((_number(v) or 0.0, STALL.fullmatch(k).group(1)) for k, v in metric.items()
                         if STALL.fullmatch(k)), reverse=True)
        rows.append({
            "shape": shape.name, "label": shape.label, "impl": names[impl_index], "kernel": name,
            "grid": metric.get("Grid Size", ""), "block": metric.get("Block Size", ""),
            "registers": metric.get("launch__registers_per_thread", ""),
            "us": (_number(metric.get("gpu__time_duration.sum", "")) or 0.0) / 1e3,
            "cycles": cycles, "cycles_per_chunk": cycles / chunks if cycles else None,
            "occupancy_pct": _number(metric.get("sm__warps_active.avg.pct_of_peak_sustained_active", "")),
            "theoretical_occupancy_pct": _number(metric.get("sm__maximum_warps_per_active_cycle_pct", "")),
            "stalls": "; ".join(f"{reason} {value:.1f}" for value, reason in stalls[:3]),
        })
    return rows


def profile(selected: list[shapes.Shape], wanted: list[str], ncu: str) -> list[dict[str, Any]]:
    """ncu over `--launch` once per shape; the kernels' rows."""
    rows = []
    for shape in selected:
        command = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "raw",
                   *(arg for section in SECTIONS for arg in ("--section", section)),
                   sys.executable, "-m", "benchmarks.profile_forward", "--launch", "--shapes", shape.name,
                   "--impls", ",".join(wanted)]
        harness.progress(f"{shape.name}: {' '.join(command[:12])} ...")
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        profiled = re.search(r"PROFILED \S+ (\S+)", result.stdout)
        if result.returncode != 0 or profiled is None or '"ID"' not in result.stdout:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", flush=True)
            raise RuntimeError(f"ncu failed at {shape.name} (rc {result.returncode})")
        rows += kernel_rows(result.stdout, shape, profiled.group(1).split(","))
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated shape names or fnmatch patterns")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--ncu", default=shutil.which("ncu") or "ncu", help="the Nsight Compute command line")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--launch", action="store_true", help="only launch the kernels (what ncu runs)")
    args = parser.parse_args(argv)
    selected = shapes.select(shapes.SHAPES, args.shapes)
    wanted = [n for n in IMPLS if n in args.impls.split(",")]
    if args.launch:
        return launch(selected, wanted)
    env = harness.environment("benchmarks.profile_forward")
    print(harness.format_header(env), flush=True)
    rows = profile(selected, wanted, args.ncu)
    columns = [("impl", "impl"), ("kernel", "kernel"), ("grid", "grid"), ("registers", "regs"), ("us", "µs"),
               ("cycles", "cycles"), ("cycles_per_chunk", "cycles / chunk"), ("occupancy_pct", "occupancy %"),
               ("theoretical_occupancy_pct", "theoretical %"), ("stalls", "top stalls (cycles per instruction)")]
    report = harness.format_table([{k: harness.fmt(v, 1) if isinstance(v, float) else v for k, v in row.items()}
                                   for row in rows], columns)
    print("\n" + report, flush=True)
    harness.write_results(args.out, "forward_profile", env, rows, report=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
