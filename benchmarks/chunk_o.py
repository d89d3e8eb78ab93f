"""``python -m benchmarks.chunk_o``: chunk_fwd_o time per call against the memory floor, on one CUDA GPU.

Implementations (each skipped with a note when it cannot be imported or fails):
  gdn-triton    gdn.triton.chunk_fwd_o (torch)
  gdn-pallas    gdn.pallas.chunk_fwd_o under jax.jit
  fla           fla.ops.common.chunk_o.chunk_fwd_o of fla-core 0.6 (exp2 gates: given g·log2(e), computed
                outside the timed call; its own autotuner picks BK/BV/warps on the first call of each key)
  jnp           benchmarks.formulations.chunk_fwd_o_jnp under jax.jit (plain jax.numpy einsums)
  torch-eager   benchmarks.formulations.chunk_fwd_o_torch (plain torch einsums, no compilation)
  memory-floor  bytes moved / device-to-device copy bandwidth measured in the same run

Bytes moved: q, k, v, g, h read once and o written once; q and k counted once even when HV > H.

Timing. torch: triton.testing.do_bench, CUDA events around every call with L2 cleared before it; median,
10th and 90th percentile over all calls. JAX: wall time of each jitted call followed by block_until_ready
(median over --jax-runs calls after warm-up, rotating through enough input sets to exceed 3× L2 when one set
would fit in it): this includes JAX's dispatch and sync, tens of µs at small shapes. The column
"pipelined" gives JAX per-call wall time with 10 calls per block_until_ready, dispatch overlapped with
execution: closer to device time, comparable to the torch rows when the kernel outlasts dispatch.

Host overhead: µs of host time per call for 1000 back-to-back unsynchronized calls at T=512 (Python wrapper,
argument checks, launch or jit dispatch), next to the device time of the same call.

Startup: the jnp and torch formulations are checked against gdn.common.reference on tiny float32 CPU inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gc
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import harness
from benchmarks.harness import fmt, progress
from gdn.common import spec

LOG2E = math.log2(math.e)
DEVICE = "cuda"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
IMPLS = ("gdn-triton", "gdn-pallas", "fla", "jnp", "torch-eager")
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


# ------------------------------------------------------------------------------------------------ shapes

@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: str
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    seqlens: tuple[int, ...] | None = None  # varlen (B = 1, T = sum)

    @property
    def name(self) -> str:
        layout = f"B{self.B}" if self.seqlens is None else f"varlen{len(self.seqlens)}"
        return f"{_SHORT[self.dtype]}-{layout}-T{self.T}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}"

    @property
    def cu_seqlens(self) -> np.ndarray | None:
        return None if self.seqlens is None else np.cumsum((0,) + self.seqlens).astype(np.int32)

    @property
    def state_rows(self) -> int:
        """Chunk rows of h per batch row (all sequences' chunks when varlen)."""
        if self.seqlens is None:
            return spec.num_chunks(self.T)
        return sum(spec.num_chunks(n) for n in self.seqlens)

    def bytes_moved(self) -> int:
        e = _ITEMSIZE[self.dtype]
        qk = 2 * self.B * self.T * self.H * self.K * e
        vo = 2 * self.B * self.T * self.HV * self.V * e
        g = self.B * self.T * self.HV * 4
        h = self.B * self.state_rows * self.HV * self.K * self.V * e
        return qk + vo + g + h


def varlen_seqlens(count: int = 64, longest: int = 4000, total: int = 65536, seed: int = 0) -> tuple[int, ...]:
    """`count` sequence lengths in [1, longest], one of each extreme, summing to `total` (fixed seed)."""
    rng = np.random.default_rng(seed)
    rest = rng.exponential(1.0, count - 2)
    rest = np.clip(np.round(rest / rest.sum() * (total - 1 - longest)), 1, longest).astype(int)
    lengths = np.concatenate([[1, longest], rest])
    for i in rng.permutation(np.arange(2, count)):  # spread the rounding remainder over the free lengths
        lengths[i] = np.clip(lengths[i] + (total - lengths.sum()), 1, longest)
    rng.shuffle(lengths)
    return tuple(int(n) for n in lengths)


def all_shapes() -> list[Shape]:
    K = V = 128
    shapes = [Shape("bfloat16", B, T, H, HV, K, V)
              for B, T, H, HV in [(1, 512, 16, 16), (1, 8192, 16, 16), (1, 65536, 16, 16), (8, 2048, 16, 32),
                                  (1, 8192, 2, 8)]]
    lengths = varlen_seqlens()
    shapes.append(Shape("bfloat16", 1, sum(lengths), 16, 16, K, V, lengths))
    shapes += [Shape(dtype, 1, 8192, 16, 16, K, V) for dtype in ("float16", "float32")]
    return shapes


HOST_SHAPE = Shape("bfloat16", 1, 512, 16, 16, 128, 128)


# ----------------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Inputs:
    """One input set of a shape in both frameworks (jax side filled only when a JAX impl runs)."""

    torch: dict[str, Any]
    jax: dict[str, Any] | None = None


def make_inputs(shape: Shape, sets: int, want_jax: bool) -> list[Inputs]:
    """`sets` independent input sets. The distributions of gdn.common.example.random_inputs (q, v ~ N(0, 1),
    k ~ N(0, 1/K), h ~ N(0, 1), g the chunk-local cumsum of log-sigmoid gates), but q, k, v, h are drawn on
    the GPU (numpy takes tens of seconds at T = 65536) and shared with JAX through DLPack (zero copy)."""
    import torch

    from benchmarks import formulations
    from gdn.common import example

    tdtype = getattr(torch, shape.dtype)
    cu = shape.cu_seqlens
    B, T, H, HV, K, V = shape.B, shape.T, shape.H, shape.HV, shape.K, shape.V
    out = []
    for s in range(sets):
        gen = torch.Generator(device=DEVICE).manual_seed(1000 + s)

        def normal(*size, std=1.0):
            return (torch.randn(*size, generator=gen, device=DEVICE) * std).to(tdtype)

        t = {"q": normal(B, T, H, K), "k": normal(B, T, H, K, std=K ** -0.5), "v": normal(B, T, HV, V),
             "h": normal(B, shape.state_rows, HV, K, V)}
        rng = np.random.default_rng(s)
        log_gates = -np.log1p(np.exp(-rng.normal(2.5, 1.0, (B, T, HV))))
        t["g"] = torch.from_numpy(example.chunk_local_cumsum(log_gates, cu).astype(np.float32)).to(DEVICE)
        t["g_log2"] = t["g"] * LOG2E
        if cu is not None:
            chunk_indices = spec.prepare_chunk_indices(cu)
            token_index, token_slot = formulations.varlen_index(cu)
            t["cu_seqlens"] = torch.from_numpy(cu).to(DEVICE)
            t["cu_seqlens_i64"] = t["cu_seqlens"].long()
            t["chunk_indices"] = torch.from_numpy(chunk_indices).to(DEVICE)
            t["token_index"] = torch.from_numpy(token_index).to(DEVICE).long()
            t["token_slot"] = torch.from_numpy(token_slot).to(DEVICE).long()
        inputs = Inputs(t)
        if want_jax:
            import jax.numpy as jnp

            torch.cuda.synchronize()
            j = {n: _to_jax(t[n]) for n in "qkvhg"}
            if cu is not None:
                j["cu_seqlens"] = jnp.asarray(cu)
                j["chunk_indices"] = jnp.asarray(chunk_indices)
                j["token_index"] = jnp.asarray(token_index)
                j["token_slot"] = jnp.asarray(token_slot)
            inputs.jax = j
        out.append(inputs)
    torch.cuda.synchronize()
    return out


def _to_jax(x):
    """A torch tensor as a jax array: DLPack (zero copy) or, failing that, through the host."""
    import jax.dlpack
    import jax.numpy as jnp

    try:
        return jax.dlpack.from_dlpack(x)
    except Exception:  # noqa: BLE001 - any DLPack refusal: copy through the host (exact: float32 holds them)
        return jnp.asarray(x.float().cpu().numpy(), dtype=str(x.dtype).removeprefix("torch."))


# ------------------------------------------------------------------------------------------------ impls

@dataclasses.dataclass
class Impl:
    name: str
    framework: str  # "torch" or "jax"
    make: Callable[[Shape], Callable[..., Any]] | None  # shape -> call(inputs dict) -> output
    note: str = ""


def load_impls(wanted: list[str]) -> dict[str, Impl]:
    """Import what is asked for; an implementation that cannot be imported gets make=None and a note."""
    impls: dict[str, Impl] = {}

    if "gdn-triton" in wanted:
        from gdn.triton import chunk_fwd_o as gdn_triton

        def make_gdn_triton(shape: Shape):
            return lambda t: gdn_triton(t["q"], t["k"], t["v"], t["h"], t["g"], None, t.get("cu_seqlens"),
                                        t.get("chunk_indices"))

        impls["gdn-triton"] = Impl("gdn-triton", "torch", make_gdn_triton)

    if "fla" in wanted:
        try:
            progress("importing fla.ops.common.chunk_o (fla-core imports all of fla.ops) ...")
            from fla.ops.common.chunk_o import chunk_fwd_o as fla_chunk_fwd_o

            def make_fla(shape: Shape):
                def call(t):
                    return fla_chunk_fwd_o(q=t["q"], k=t["k"], v=t["v"], h=t["h"], g=t["g_log2"], scale=None,
                                           cu_seqlens=t.get("cu_seqlens_i64"), chunk_size=spec.CHUNK_SIZE,
                                           chunk_indices=t.get("chunk_indices"))
                return call

            impls["fla"] = Impl("fla", "torch", make_fla, f"fla-core {harness._version('fla-core')}")
        except Exception as error:  # noqa: BLE001 - any import failure skips FLA
            impls["fla"] = Impl("fla", "torch", None, f"skipped: import failed: {type(error).__name__}: {error}")

    if "torch-eager" in wanted:
        from benchmarks.formulations import chunk_fwd_o_torch

        def make_eager(shape: Shape):
            return lambda t: chunk_fwd_o_torch(t["q"], t["k"], t["v"], t["h"], t["g"], None,
                                               t.get("token_index"), t.get("token_slot"))

        impls["torch-eager"] = Impl("torch-eager", "torch", make_eager)

    jax_wanted = [n for n in ("gdn-pallas", "jnp") if n in wanted]
    if jax_wanted:
        try:
            import jax
        except Exception as error:  # noqa: BLE001
            for n in jax_wanted:
                impls[n] = Impl(n, "jax", None, f"skipped: jax import failed: {error}")
            jax_wanted = []
        else:
            if jax.default_backend() != "gpu":
                note = f"skipped: jax default backend is {jax.default_backend()!r}, not gpu"
                for n in jax_wanted:
                    impls[n] = Impl(n, "jax", None, note)
                jax_wanted = []

    if "gdn-pallas" in jax_wanted:
        try:
            from gdn.pallas import chunk_fwd_o as gdn_pallas

            def make_pallas(shape: Shape):
                if shape.seqlens is None:
                    return jax.jit(lambda q, k, v, h, g: gdn_pallas(q, k, v, h, g))
                # varlen under jit: cu_seqlens and chunk_indices traced, as a jitted caller would pass them
                return jax.jit(lambda q, k, v, h, g, cu, ci: gdn_pallas(q, k, v, h, g, None, cu, ci))

            impls["gdn-pallas"] = Impl("gdn-pallas", "jax", make_pallas)
        except Exception as error:  # noqa: BLE001 - the Pallas backend may be mid-rewrite
            impls["gdn-pallas"] = Impl("gdn-pallas", "jax", None,
                                       f"skipped: gdn.pallas import failed: {type(error).__name__}: {error}")

    if "jnp" in jax_wanted:
        from benchmarks.formulations import chunk_fwd_o_jnp

        def make_jnp(shape: Shape):
            if shape.seqlens is None:
                return jax.jit(lambda q, k, v, h, g: chunk_fwd_o_jnp(q, k, v, h, g))
            return jax.jit(lambda q, k, v, h, g, ti, ts: chunk_fwd_o_jnp(q, k, v, h, g, None, ti, ts))

        impls["jnp"] = Impl("jnp", "jax", make_jnp)
    return {n: impls[n] for n in IMPLS if n in impls}


def jax_args(impl: str, shape: Shape, j: dict) -> tuple:
    base = (j["q"], j["k"], j["v"], j["h"], j["g"])
    if shape.seqlens is None:
        return base
    if impl == "gdn-pallas":
        return base + (j["cu_seqlens"], j["chunk_indices"])
    return base + (j["token_index"], j["token_slot"])


def to_numpy_f32(out: Any) -> np.ndarray:
    if hasattr(out, "detach"):  # torch
        return out.detach().float().cpu().numpy()
    import jax.numpy as jnp

    return np.asarray(out.astype(jnp.float32))


# ------------------------------------------------------------------------------------------------- main

def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in all_shapes()]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunk_o", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="shapes:\n  " + "\n  ".join(names))
    parser.add_argument("--shapes", default="",
                        help="comma-separated shape names or fnmatch patterns (e.g. 'bf16-B1-*'); default all")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--jax-runs", type=int, default=None, help="timed JAX calls per shape (default 100, "
                        "30 with --quick)")
    parser.add_argument("--host-calls", type=int, default=None, help="calls for the host-overhead loop "
                        "(default 1000, 200 with --quick)")
    parser.add_argument("--list", action="store_true", help="print the shape names and exit")
    args = parser.parse_args(argv)
    unknown = [n for n in args.impls.split(",") if n and n not in IMPLS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; expected a subset of {list(IMPLS)}")
    if args.shapes:
        patterns = [p for p in args.shapes.split(",") if p]
        missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if missing:
            parser.error(f"--shapes: {missing} match no shape; shapes are: {names}")
    return args


def select_shapes(pattern_list: str) -> list[Shape]:
    shapes = all_shapes()
    if not pattern_list:
        return shapes
    patterns = [p for p in pattern_list.split(",") if p]
    return [s for s in shapes if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU
    args = _parse(argv)
    shapes = select_shapes(args.shapes)
    if args.list:
        print("\n".join(s.name for s in shapes))
        return 0
    wanted = [n for n in args.impls.split(",") if n]
    warmup_ms, rep_ms = (10, 40) if args.quick else (50, 200)
    jax_runs = args.jax_runs or (30 if args.quick else 100)
    host_calls = args.host_calls or (200 if args.quick else 1000)

    env = harness.environment("benchmarks.chunk_o")
    env["CHUNK_SIZE"] = str(spec.CHUNK_SIZE)
    header = harness.format_header(env)
    print(header, flush=True)
    report = [header]

    progress("checking the jnp and torch formulations against gdn.common.reference (float32, CPU) ...")
    from benchmarks.formulations import check_formulations

    check_lines = check_formulations()
    for line in check_lines:
        print("  " + line, flush=True)
    report += ["# formulation check (float32, CPU, vs gdn.common.reference):"] + ["#   " + s for s in check_lines]

    import torch

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; this benchmark needs one", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the default, stated: fp32 eager matmuls are IEEE

    progress("measuring device-to-device copy bandwidth (1 GiB torch copy_) ...")
    copy_bw, copy_timing = harness.copy_bandwidth(rep_ms=100 if args.quick else 300)
    copy_line = (f"copy bandwidth: {copy_bw / 1e12:.3f} TB/s (2 GiB moved per copy of 1 GiB, median "
                 f"{copy_timing.median_us:.0f} µs over {copy_timing.n} copies)")
    progress(copy_line)
    report.append("# " + copy_line)

    impls = load_impls(wanted)
    for impl in impls.values():
        progress(f"{impl.name}: {'available' if impl.make else impl.note}" + (
            f" ({impl.note})" if impl.make and impl.note else ""))
    if "gdn-triton" not in impls:
        progress("note: gdn-triton not selected: the max|Δ| column is empty")
    want_jax = any(i.framework == "jax" and i.make for i in impls.values())

    rows: list[dict[str, Any]] = []
    for shape in shapes:
        rows += run_shape(shape, impls, want_jax, copy_bw, warmup_ms, rep_ms, jax_runs)
        gc.collect()
        torch.cuda.empty_cache()

    host_rows = run_host_overhead(impls, want_jax, host_calls, rows)  # cheap: always, at HOST_SHAPE

    # ---- report
    columns = [("impl", "impl"), ("shape", "shape"), ("us_s", "µs median"), ("spread", "p10–p90"),
               ("mb", "MB moved"), ("tbps_s", "TB/s"), ("pct_s", "% copy BW"), ("vs_fla_s", "vs FLA"),
               ("diff_s", "max|Δ| vs gdn-triton"), ("pipe_s", "pipelined µs")]
    table_rows = []
    for r in rows:
        table_rows.append(dict(
            r, us_s=fmt(r["us_median"], 1), spread=(f"{r['us_p10']:.1f}–{r['us_p90']:.1f}"
                                                   if r.get("us_p10") is not None else None),
            mb=fmt(r["mb_moved"], 1), tbps_s=fmt(r.get("tb_per_s"), 2), pct_s=fmt(r.get("pct_copy_bw"), 0),
            vs_fla_s=None if r.get("speedup_vs_fla") is None else f"{r['speedup_vs_fla']:.2f}x",
            diff_s=None if r.get("max_abs_diff_vs_gdn_triton") is None else f"{r['max_abs_diff_vs_gdn_triton']:.2e}",
            pipe_s=fmt(r.get("us_pipelined"), 1), us_median=r["us_median"]))
    table = harness.format_table(table_rows, columns)
    notes = [
        "notes:",
        "  torch rows: do_bench device time (CUDA events, L2 cleared before each call);",
        "  jax rows: wall time per call with block_until_ready (dispatch + sync included); 'pipelined' = 10 calls"
        " per sync;",
        "  memory-floor = bytes moved / copy bandwidth; % copy BW = floor time / time; vs FLA = FLA time / time;",
        "  fla gets g·log2(e) (exp2 gates), precomputed; fp32: gdn uses tf32x3 dots (tilings.FLOAT32_DOT_PRECISION),"
        " FLA and XLA's default TF32, torch-eager IEEE.",
    ]
    failures = [f"  {r['impl']} {r['shape']}: {r['note']}" for r in rows
                if r.get("us_median") is None and r.get("note")]
    print()
    print(table)
    print("\n".join(notes))
    report += ["", table, *notes]
    if failures:
        print("skipped or failed:")
        print("\n".join(failures))
        report += ["skipped or failed:", *failures]
    if host_rows:
        host_table = harness.format_table(
            [dict(r, host_s=fmt(r["host_us_per_call"], 1), dev_s=fmt(r.get("device_us_median"), 1)) for r in host_rows],
            [("impl", "impl"), ("shape", "shape"), ("host_s", "host µs/call"), ("dev_s", "device µs (median)"),
             ("calls", "calls")])
        host_note = ("host µs/call: perf_counter over back-to-back calls without synchronization (wrapper + "
                     "checks + launch / jit dispatch); device µs from the table above when that shape was run "
                     "(jax: synchronized wall per call)")
        print()
        print(host_table)
        print(host_note)
        report += ["", host_table, host_note]

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    fields = ["impl", "shape", "dtype", "B", "T", "H", "HV", "K", "V", "varlen_sequences", "us_median", "us_p10",
              "us_p90", "samples", "us_pipelined", "mb_moved", "tb_per_s", "pct_copy_bw", "speedup_vs_fla",
              "max_abs_diff_vs_gdn_triton", "copy_bw_tb_per_s", "method", "note"]
    harness.write_csv(out / "chunk_o.csv", rows, fields)
    if host_rows:
        harness.write_csv(out / "chunk_o_host.csv", host_rows)
    plotted = plot(out / "chunk_o.png", rows, env)
    (out / "chunk_o.txt").write_text("\n".join(report) + "\n")
    written = ["chunk_o.csv", "chunk_o.txt"] + (["chunk_o_host.csv"] if host_rows else []) + (
        ["chunk_o.png"] if plotted else [])
    progress(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def run_shape(shape: Shape, impls: dict[str, Impl], want_jax: bool, copy_bw: float, warmup_ms: float,
              rep_ms: float, jax_runs: int) -> list[dict[str, Any]]:
    import torch

    mb = shape.bytes_moved() / 1e6
    sets = harness.rotating_sets(shape.bytes_moved())
    progress(f"{shape.name}: {mb:.1f} MB moved; generating {sets} input set(s) ...")
    base = dict(shape=shape.name, dtype=shape.dtype, B=shape.B, T=shape.T, H=shape.H, HV=shape.HV, K=shape.K,
                V=shape.V, varlen_sequences=None if shape.seqlens is None else len(shape.seqlens), mb_moved=mb,
                copy_bw_tb_per_s=copy_bw / 1e12)
    try:
        inputs = make_inputs(shape, sets, want_jax)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: skip the shape
        progress(f"{shape.name}: input generation failed: {type(error).__name__}: {error}")
        return [dict(base, impl=n, us_median=None, note=f"inputs failed: {error}") for n in impls]

    floor_us = shape.bytes_moved() / copy_bw * 1e6
    rows = [dict(base, impl="memory-floor", us_median=floor_us, tb_per_s=copy_bw / 1e12, pct_copy_bw=100.0,
                 method="bytes moved / copy bandwidth")]
    reference = None  # gdn-triton output of input set 0, float32 numpy
    for impl in impls.values():
        row = dict(base, impl=impl.name, us_median=None)
        rows.append(row)
        if impl.make is None:
            row["note"] = impl.note
            continue
        try:
            fn = impl.make(shape)
            if impl.framework == "torch":
                t0 = inputs[0].torch
                with torch.no_grad():
                    out = fn(t0)
                    torch.cuda.synchronize()
                    result = to_numpy_f32(out)
                    del out
                    timing = harness.time_torch(lambda: fn(t0), warmup_ms, rep_ms)
            else:
                arg_sets = [jax_args(impl.name, shape, s.jax) for s in inputs]
                out = fn(*arg_sets[0])
                out.block_until_ready()
                result = to_numpy_f32(out)
                del out
                timing = harness.time_jax(fn, arg_sets, runs=jax_runs)
                pipelined = harness.time_jax(fn, arg_sets, runs=max(10, jax_runs // 5), warmup=2, batch=10)
                row["us_pipelined"] = pipelined.median_us
            row.update(us_median=timing.median_us, us_p10=timing.p10_us, us_p90=timing.p90_us,
                       samples=timing.n, method=timing.method)
            row["tb_per_s"] = shape.bytes_moved() / (timing.median_us * 1e-6) / 1e12
            row["pct_copy_bw"] = 100.0 * floor_us / timing.median_us
            if impl.name == "gdn-triton":
                reference = result
            if reference is not None:
                row["max_abs_diff_vs_gdn_triton"] = float(np.abs(result - reference).max())
            finite = bool(np.isfinite(result).all())
            if not finite:
                row["note"] = "output has non-finite values"
            extra = f"  pipelined {row['us_pipelined']:.1f} µs" if "us_pipelined" in row else ""
            diff = row.get("max_abs_diff_vs_gdn_triton")
            progress(f"{shape.name}: {impl.name:<12} {timing.median_us:9.1f} µs  "
                     f"({row['pct_copy_bw']:.0f}% of copy BW){extra}"
                     + ("" if diff is None or impl.name == "gdn-triton" else f"  max|Δ| vs gdn-triton {diff:.2e}")
                     + ("" if finite else "  NON-FINITE OUTPUT"))
            if impl.name == "fla" and diff is not None:
                progress(f"{shape.name}: FLA 0.6 chunk_fwd_o vs gdn-triton: max |Δ| = {diff:.3e} "
                         f"(max |o| = {float(np.abs(reference).max()):.3g})")
            del result
        except Exception as error:  # noqa: BLE001 - report, skip, carry on
            row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            progress(f"{shape.name}: {impl.name} failed:")
            traceback.print_exc(limit=4)
            sys.stdout.flush()
    fla_us = next((r["us_median"] for r in rows if r["impl"] == "fla" and r.get("us_median")), None)
    if fla_us:
        for r in rows:
            if r.get("us_median"):
                r["speedup_vs_fla"] = fla_us / r["us_median"]
    del inputs
    return rows


def run_host_overhead(impls: dict[str, Impl], want_jax: bool, calls: int,
                      rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import torch

    shape = HOST_SHAPE
    progress(f"host overhead at {shape.name}: {calls} back-to-back calls per implementation ...")
    inputs = make_inputs(shape, 1, want_jax)[0]
    device = {r["impl"]: r.get("us_median") for r in rows if r["shape"] == shape.name}
    out_rows = []
    for impl in impls.values():
        if impl.make is None:
            continue
        try:
            fn = impl.make(shape)
            if impl.framework == "torch":
                t = inputs.torch
                with torch.no_grad():
                    host_us = harness.host_time_per_call(lambda: fn(t), torch.cuda.synchronize, calls)
            else:
                args = jax_args(impl.name, shape, inputs.jax)
                last = [None]

                def call():
                    last[0] = fn(*args)

                call()
                last[0].block_until_ready()
                host_us = harness.host_time_per_call(call, lambda: last[0].block_until_ready(), calls)
            out_rows.append(dict(impl=impl.name, shape=shape.name, host_us_per_call=host_us,
                                 device_us_median=device.get(impl.name), calls=calls))
            progress(f"host overhead: {impl.name:<12} {host_us:7.1f} µs/call")
        except Exception as error:  # noqa: BLE001
            progress(f"host overhead: {impl.name} failed: {type(error).__name__}: {error}")
    return out_rows


def plot(path: Path, rows: list[dict[str, Any]], env: dict[str, str]) -> bool:
    """Time vs T for the bf16 B=1 H=HV=16 dense shapes, one line per implementation; % of copy BW below."""
    picked = [r for r in rows if r["dtype"] == "bfloat16" and r["B"] == 1 and r["H"] == 16 and r["HV"] == 16
              and r.get("varlen_sequences") is None and r.get("us_median")]
    if len({r["T"] for r in picked}) < 2:
        progress("plot skipped: fewer than two T values among the bf16 B=1 H=HV=16 shapes")
        return False
    series: dict[str, list] = {}
    pct: dict[str, list] = {}
    for r in picked:
        series.setdefault(r["impl"], []).append((r["T"], r["us_median"]))
        if r["impl"] != "memory-floor":
            pct.setdefault(r["impl"], []).append((r["T"], r["pct_copy_bw"]))
    gpu = env.get("gpu (torch)", "").split(",")[0]
    try:
        harness.plot_lines(path, series, f"chunk_fwd_o, bf16, B=1, H=HV=16, K=V=128 — {gpu}\n"
                           "torch: do_bench device time; jax: jit wall per call (synchronized)",
                           "T (tokens)", "µs per call (median)", dashed=["memory-floor"], second=pct,
                           second_ylabel="% of copy bandwidth")
        return True
    except Exception as error:  # noqa: BLE001 - a plot failure must not lose the CSV
        progress(f"plot failed: {type(error).__name__}: {error}")
        return False


if __name__ == "__main__":
    sys.exit(main())
