"""``python -m benchmarks.chunk_o``: chunk_fwd_o time per call against the memory floor, on one CUDA GPU, at
benchmarks.shapes.SHAPES (bf16) and DTYPE_SHAPES (fp16, fp32), K = V = 128, gated.

Implementations (a peer that is not installed is a "not installed" row; a failure at a shape is a row with the
error):
  gdn-triton    gdn.triton.chunk_fwd_o (torch)
  gdn-pallas    gdn.pallas.chunk_fwd_o, called as users call it (the op jits itself; the Triton lowering)
  gdn-mosaic    the same with lowering="mosaic_gpu" (sm_90; 16-bit, K and V in (64, 128): other shapes are rows
                with the reason)
  gdn-jax-triton  the same with lowering="triton_call": gdn-triton's kernel launched from JAX through jaxlib's
                Triton custom call (its output should equal gdn-triton's bit for bit: max |Δ| 0)
  fla           fla-core 0.6 fla.ops.common.chunk_o.chunk_fwd_o (exp2 gates: given g·log2(e), computed outside
                the timed call; its autotuner picks BK/BV/warps on the first call of each key)
  jnp           benchmarks.formulations.chunk_fwd_o_jnp under jax.jit (plain jax.numpy einsums)
  torch-eager   benchmarks.formulations.chunk_fwd_o_torch (plain torch einsums, no compilation)

Bytes moved: q, k, v, g, h read once and o written once (q and k once even when HV > H); the floor is that over
the device-to-device copy bandwidth measured in the same run. torch rows: device time = the call captured in a
CUDA graph and replayed under triton.testing.do_bench (CUDA events, L2 flushed before each replay), wall time =
do_bench of the Python call. JAX rows: device time = 10 calls issued back to back per block_until_ready
(dispatch hidden behind execution), wall time = one call per block_until_ready. Medians with the 10th and 90th
percentiles; every output is compared with gdn-triton's (max |Δ|).

Host rows: CPU µs per call of 1000 back-to-back calls at B1 T512 (wrapper, checks, launch or jit dispatch), with
gdn-pallas both as users call it (eager: the op's own jit) and inside a caller's jax.jit.
Startup: the jnp and torch formulations are checked against gdn.common.reference on tiny float32 CPU inputs.

Writes chunk_o.csv, chunk_o_host.csv (with .env.json and .txt) and chunk_o.png for benchmarks.report.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness, shapes
from benchmarks.harness import fmt, progress
from gdn.common import spec

LOG2E = math.log2(math.e)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
IMPLS = ("gdn-triton", "gdn-pallas", "gdn-mosaic", "gdn-jax-triton", "fla", "jnp", "torch-eager")
PIPELINED_CALLS = 10


def load_impls(wanted: list[str]) -> dict[str, harness.Impl]:
    """Import what is asked for; whatever cannot be imported becomes a "not installed" row."""
    impls: dict[str, harness.Impl] = {}
    if "gdn-triton" in wanted:
        from gdn.triton import chunk_fwd_o as gdn_triton

        impls["gdn-triton"] = harness.Impl("gdn-triton", "torch", lambda shape, t: lambda: gdn_triton(
            t["q"], t["k"], t["v"], t["h"], t["g"], None, t["cu_seqlens"], t["chunk_indices"]))
    if "fla" in wanted:
        try:
            progress("importing fla.ops.common.chunk_o (fla-core imports all of fla.ops) ...")
            from fla.ops.common.chunk_o import chunk_fwd_o as fla_chunk_fwd_o

            def make_fla(shape: shapes.Shape, t: dict) -> Callable[[], Any]:
                g_log2 = t["g"] * LOG2E
                varlen = {} if t["cu_seqlens"] is None else {"cu_seqlens": t["cu_seqlens"].long(),
                                                             "chunk_indices": t["chunk_indices"]}
                return lambda: fla_chunk_fwd_o(q=t["q"], k=t["k"], v=t["v"], h=t["h"], g=g_log2, scale=None,
                                               chunk_size=spec.CHUNK_SIZE, **varlen)

            impls["fla"] = harness.Impl("fla", "torch", make_fla, f"fla-core {harness.version('fla-core')}")
        except Exception as error:  # noqa: BLE001 - any import failure is a row
            impls["fla"] = harness.not_installed("fla", "torch", error)
    if "torch-eager" in wanted:
        from benchmarks.formulations import chunk_fwd_o_torch, varlen_index

        def make_eager(shape: shapes.Shape, t: dict) -> Callable[[], Any]:
            index = _varlen_index(shape, varlen_index, "torch")
            return lambda: chunk_fwd_o_torch(t["q"], t["k"], t["v"], t["h"], t["g"], None, *index)

        impls["torch-eager"] = harness.Impl("torch-eager", "torch", make_eager)
    jax_wanted = harness.jax_gpu_impls(
        [n for n in ("gdn-pallas", "gdn-mosaic", "gdn-jax-triton", "jnp") if n in wanted], impls)
    for name, lowering in (("gdn-pallas", "triton"), ("gdn-mosaic", "mosaic_gpu"), ("gdn-jax-triton", "triton_call")):
        if name in jax_wanted:
            from gdn.pallas import chunk_fwd_o as gdn_pallas

            impls[name] = harness.Impl(name, "jax", lambda shape, j, lowering=lowering: lambda: gdn_pallas(
                j["q"], j["k"], j["v"], j["h"], j["g"], None, j["cu_seqlens"], j["chunk_indices"],
                lowering=lowering))
    if "jnp" in jax_wanted:
        import jax

        from benchmarks.formulations import chunk_fwd_o_jnp, varlen_index

        jnp_chunk_fwd_o = jax.jit(chunk_fwd_o_jnp)

        def make_jnp(shape: shapes.Shape, j: dict) -> Callable[[], Any]:
            index = _varlen_index(shape, varlen_index, "jax")
            return lambda: jnp_chunk_fwd_o(j["q"], j["k"], j["v"], j["h"], j["g"], None, *index)

        impls["jnp"] = harness.Impl("jnp", "jax", make_jnp)
    return {n: impls[n] for n in IMPLS if n in impls}


def _varlen_index(shape: shapes.Shape, varlen_index: Callable, framework: str) -> tuple:
    """(token_index, token_slot) of the formulations for a varlen shape, on the GPU; (None, None) when dense."""
    if shape.seqlens is None:
        return None, None
    token_index, token_slot = varlen_index(shape.cu_seqlens)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(token_index), jnp.asarray(token_slot)
    import torch

    return torch.from_numpy(token_index).cuda().long(), torch.from_numpy(token_slot).cuda().long()


# ----------------------------------------------------------------------------------------------- a shape

def run_shape(shape: shapes.Shape, impls: dict[str, harness.Impl], copy_bw: float) -> list[dict[str, Any]]:
    """One row per implementation at one shape: the check against gdn-triton, then the timings."""
    import torch

    progress(f"{shape.name}: inputs ({shape.chunk_o_bytes() / 1e6:.0f} MB moved per call) ...")
    torch_inputs = shapes.chunk_o_inputs(shape, seed=1000)
    jax_sets = []
    if any(i.framework == "jax" and i.make for i in impls.values()):  # rotated so that no call finds them in L2
        jax_sets = [shapes.to_jax(torch_inputs)] + [shapes.to_jax(shapes.chunk_o_inputs(shape, seed=1000 + s))
                                                    for s in range(1, harness.rotating_sets(shape.chunk_o_bytes()))]
    floor_us = shape.chunk_o_bytes() / copy_bw * 1e6
    base = {"shape": shape.name, "label": shape.label, "dtype": shape.dtype, "mb_moved": shape.chunk_o_bytes() / 1e6,
            "floor_us": floor_us}
    rows = []
    reference = None
    for impl in impls.values():
        row: dict[str, Any] = dict(base, impl=impl.name, note=impl.note)
        rows.append(row)
        if impl.make is None:
            continue
        try:
            calls = [impl.make(shape, j) for j in jax_sets] if impl.framework == "jax" else \
                [impl.make(shape, torch_inputs)]
            call = calls[0]
            result = harness.to_numpy(harness.synced(impl, call))
            if impl.name == "gdn-triton":
                reference = result
            if reference is not None:
                row["max_abs_diff_vs_gdn_triton"] = float(np.abs(result - reference).max())
            if not np.isfinite(result).all():
                row["note"] = "non-finite output"
            note = ""
            if impl.framework == "torch":
                with torch.no_grad():
                    device, wall, note = harness.time_torch_call(call)
            else:
                sets = [(i,) for i in range(len(calls))]
                device = harness.time_jax(lambda i: calls[i](), sets, runs=50, warmup=2, batch=PIPELINED_CALLS)
                wall = harness.time_jax(lambda i: calls[i](), sets, runs=50, warmup=2)
            device = device or wall  # no CUDA graph: the wall time is the best device time there is
            row.update(device_us=device.median_us, device_p10_us=device.p10_us, device_p90_us=device.p90_us,
                       device_method=device.method, wall_us=wall.median_us, pct_floor=100 * floor_us / device.median_us)
            if note:
                row["note"] = "; ".join(n for n in (row["note"], note) if n)
            progress(f"{shape.name}: {impl.name:<12} {device.median_us:9.1f} µs ({row['pct_floor']:.0f} % of the "
                     f"floor)  wall {wall.median_us:.1f} µs")
        except Exception as error:  # noqa: BLE001 - report, carry on
            row["note"] = harness.failure_note(error)
            progress(f"{shape.name}: {impl.name} failed:")
            traceback.print_exc(limit=4)
            sys.stdout.flush()
    harness.ratio_columns(rows)
    return rows


def host_rows(impls: dict[str, harness.Impl], calls: int) -> list[dict[str, Any]]:
    """CPU µs per call at HOST_SHAPE, back to back without synchronization; gdn-pallas also inside a caller's
    jax.jit."""
    import torch

    shape = shapes.HOST_SHAPE
    progress(f"host time at {shape.name}: {calls} back-to-back calls per implementation ...")
    torch_inputs = shapes.chunk_o_inputs(shape, seed=7)
    jax_inputs = shapes.to_jax(torch_inputs) if any(i.framework == "jax" and i.make for i in impls.values()) else {}
    calls_to_time: dict[str, tuple[harness.Impl, Callable[[], Any]]] = {}
    for impl in impls.values():
        if impl.make is not None:
            calls_to_time[impl.name] = (impl, impl.make(shape, jax_inputs if impl.framework == "jax" else torch_inputs))
    if "gdn-pallas" in calls_to_time:
        import jax

        from gdn.pallas import chunk_fwd_o

        fn = jax.jit(chunk_fwd_o)
        j = jax_inputs
        calls_to_time["gdn-pallas (caller's jax.jit)"] = (
            calls_to_time["gdn-pallas"][0], lambda: fn(j["q"], j["k"], j["v"], j["h"], j["g"]))
    rows = []
    for name, (impl, call) in calls_to_time.items():
        try:
            last = [harness.synced(impl, call)]

            def keep(call: Callable[[], Any] = call, last: list = last) -> None:
                last[0] = call()

            def sync(impl: harness.Impl = impl, last: list = last) -> None:
                harness.synced(impl, lambda: last[0])

            with torch.no_grad():
                host_us = harness.host_time_per_call(keep, sync, calls)
            rows.append({"impl": name, "shape": shape.name, "label": shape.label, "host_us": host_us, "calls": calls})
            progress(f"host time: {name:<30} {host_us:7.1f} µs/call")
        except Exception as error:  # noqa: BLE001
            progress(f"host time: {name} failed: {type(error).__name__}: {error}")
    return rows


def plot(path: Path, rows: list[dict[str, Any]], env: dict[str, str]) -> bool:
    """Time against T for the bf16 B1 H16 dense shapes, one line per implementation; % of the floor below."""
    picked = [r for r in rows if r["dtype"] == "bfloat16" and r["shape"].startswith("B1-") and "-H16-HV16" in r["shape"]
              and r.get("device_us")]
    if len({r["shape"] for r in picked}) < 2:
        progress("plot skipped: fewer than two bf16 B1 H16 shapes measured")
        return False
    series: dict[str, list] = {"memory floor": []}
    pct: dict[str, list] = {}
    for r in picked:
        T = int(r["shape"].split("-T")[1].split("-")[0])
        series.setdefault(r["impl"], []).append((T, r["device_us"]))
        pct.setdefault(r["impl"], []).append((T, r["pct_floor"]))
        if (T, r["floor_us"]) not in series["memory floor"]:
            series["memory floor"].append((T, r["floor_us"]))
    gpu = env.get("gpu (torch)", "").split(",")[0]
    try:
        harness.plot_lines(path, series, f"chunk_fwd_o, bf16, B=1, H=HV=16, K=V=128 — {gpu}\n"
                           "torch: CUDA-graph replay; jax: 10 pipelined calls per sync",
                           "T (tokens)", "µs per call (median)", dashed=["memory floor"], second=pct,
                           second_ylabel="% of the copy-bandwidth floor")
        return True
    except Exception as error:  # noqa: BLE001 - a plot failure must not lose the CSV
        progress(f"plot failed: {type(error).__name__}: {error}")
        return False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU
    every_shape = shapes.SHAPES + shapes.DTYPE_SHAPES
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunk_o", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="shapes:\n  " + "\n  ".join(s.name for s in every_shape))
    parser.add_argument("--shapes", default="", help="comma-separated shape names or fnmatch patterns; default all")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--host-calls", type=int, default=1000, help="calls of the host-time loop")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        selected = shapes.select(every_shape, args.shapes)
    except ValueError as error:
        parser.error(str(error))
    env = harness.environment("benchmarks.chunk_o")
    print(harness.format_header(env), flush=True)
    from benchmarks.formulations import check_formulations

    for line in check_formulations():
        progress("formulation check: " + line)
    import torch

    impls = load_impls([n for n in IMPLS if n in args.impls.split(",")])
    copy_bw = harness.gpu_run(env, impls)
    if copy_bw is None:
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the default, stated: fp32 eager matmuls are IEEE

    rows: list[dict[str, Any]] = []
    for shape in selected:
        rows += run_shape(shape, impls, copy_bw)
        gc.collect()
        torch.cuda.empty_cache()
    host = host_rows(impls, args.host_calls)
    report = harness.format_table(
        [dict(r, dev=fmt(r.get("device_us"), 1), wall=fmt(r.get("wall_us"), 1), pct=fmt(r.get("pct_floor"), 0),
              spread=f"{r['device_p10_us']:.1f}–{r['device_p90_us']:.1f}" if r.get("device_p10_us") else None,
              rt=fmt(r.get("gdn-triton_ratio"), 2), rp=fmt(r.get("gdn-pallas_ratio"), 2),
              diff=None if r.get("max_abs_diff_vs_gdn_triton") is None else f"{r['max_abs_diff_vs_gdn_triton']:.1e}",
              why=None if r.get("device_us") else r.get("note")) for r in rows],
        [("impl", "impl"), ("label", "shape"), ("dev", "µs"), ("spread", "p10–p90"), ("wall", "wall µs"),
         ("pct", "% floor"), ("rt", "Triton ÷"), ("rp", "Pallas ÷"), ("diff", "max|Δ| vs Triton"), ("why", "note")])
    report += "\n\nhost µs per call\n" + harness.format_table(
        [dict(r, us=fmt(r["host_us"], 1)) for r in host], [("impl", "impl"), ("label", "shape"), ("us", "µs")])
    print("\n" + report, flush=True)
    harness.write_results(args.out, "chunk_o", env, rows, report=report)
    harness.write_results(args.out, "chunk_o_host", env, host)
    if plot(args.out / "chunk_o.png", rows, env):
        progress(f"wrote {args.out / 'chunk_o.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
