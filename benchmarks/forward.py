"""``python -m benchmarks.forward``: the full chunked Gated DeltaNet forward, time per call, on one CUDA GPU.

Implementations (each skipped with a note when it cannot be imported, does not accept a shape, or fails):
  gdn-triton    gdn.triton.chunk_gated_delta_rule (torch)
  gdn-pallas    gdn.pallas.chunk_gated_delta_rule under jax.jit (varlen: cu_seqlens and chunk_indices traced)
  fla           fla-core 0.6 fla.ops.gated_delta_rule.chunk_gated_delta_rule (Triton path; the public entry
                takes natural-log g and converts it to log2 itself, so it gets the same g as gdn; grouped value
                heads HV > H supported; varlen with precomputed chunk_indices and cu_seqlens_cpu)
  jla-mosaic    jax-linear-attention 0.1.0 jla.ops.linear_attention("gated_deltanet", impl="mosaic_gpu") under
                jax.jit (Hopper, bf16/fp16, K, V in {64, 128}, HV a multiple of H; varlen as segment_ids)
  jla-chunked   the same with impl="chunked" (plain JAX, float32, HIGHEST precision; no grouped heads: q, k
                are repeated to HV heads inside the jitted call; varlen as segment_ids)

Inputs (identical values for every implementation, drawn on the GPU and shared with JAX through DLPack):
q, k bf16 with unit-norm rows, v ~ N(0, 1) bf16, g per-token log-sigmoid gates (natural log, not cumulative),
beta = sigmoid(N(0, 1)), both float32; dense shapes start from initial_state ~ N(0, 1) [B, HV, K, V];
varlen starts every sequence from zero (jla's segment_ids form has one initial state per row). Every call
returns the final state.

Correctness gate, before timing: o and the final state of each implementation against the reference
(gdn-triton, else the first implementation that ran), as max|Δ| / max|reference|; above 2e-2 the result
is flagged MISMATCH (still timed). jla's varlen final state is the last sequence's only, compared as such.

Timing: torch rows triton.testing.do_bench (CUDA events, L2 cleared each call, median); JAX rows the wall time
of each jitted call with block_until_ready (median), rotating input sets to exceed 3x L2, and "pipelined":
10 calls per block_until_ready (dispatch overlapped, comparable to device time). The summary table and
its ratios use the torch median and the JAX pipelined median. Cold: the first call (compile, autotune,
run) of each implementation in a fresh process with an empty TRITON_CACHE_DIR and no JAX compilation cache.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.chunk_o import Shape, _to_jax, all_shapes, to_numpy_f32
from benchmarks.harness import fmt, progress

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
IMPLS = ("gdn-triton", "gdn-pallas", "fla", "jla-mosaic", "jla-chunked")
MISMATCH_TOL = 2e-2
COLD_SHAPE = "bf16-B1-T8192-H16-HV16-K128-V128"
COLD_MARK = "COLD-RESULT "


def shapes() -> list[Shape]:
    """The chunk_o benchmark's bf16 shapes (five dense ones and the 64-sequence varlen batch)."""
    return [s for s in all_shapes() if s.dtype == "bfloat16"]


# ----------------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Inputs:
    """One input set in both frameworks (the jax side only when a JAX implementation runs)."""

    torch: dict[str, Any]
    jax: dict[str, Any] | None = None


def make_inputs(shape: Shape, seed: int, want_jax: bool) -> Inputs:
    """q, k unit rows, v ~ N(0, 1) (bf16, drawn on the GPU); g log-sigmoid gates and beta = sigmoid(N(0, 1))
    (float32, numpy); initial_state ~ N(0, 1) float32 for dense shapes, None for varlen."""
    import torch

    from gdn.common import example, spec

    B, T, H, HV, K, V = shape.B, shape.T, shape.H, shape.HV, shape.K, shape.V
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = np.random.default_rng(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device="cuda")

    def unit_rows(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=-1).to(dtype)

    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, HV))))
    t: dict[str, Any] = {
        "q": unit_rows(randn(B, T, H, K)), "k": unit_rows(randn(B, T, H, K)), "v": randn(B, T, HV, V).to(dtype),
        "g": torch.from_numpy(example.log_sigmoid_gates(rng, (B, T, HV)).astype(np.float32)).cuda(),
        "beta": torch.from_numpy(beta.astype(np.float32)).cuda(),
        "h0": None if shape.seqlens is not None else randn(B, HV, K, V),
    }
    cu = shape.cu_seqlens
    if cu is not None:
        chunk_indices = spec.prepare_chunk_indices(cu)
        t["cu_seqlens"] = torch.from_numpy(cu).cuda()
        t["cu_seqlens_i64"] = t["cu_seqlens"].long()
        t["cu_seqlens_cpu"] = torch.from_numpy(cu).long()
        t["chunk_indices"] = torch.from_numpy(chunk_indices).cuda()
        t["chunk_indices_i64"] = t["chunk_indices"].long()
    torch.cuda.synchronize()
    inputs = Inputs(t)
    if want_jax:
        import jax.numpy as jnp

        j: dict[str, Any] = {n: None if t[n] is None else _to_jax(t[n]) for n in ("q", "k", "v", "g", "beta", "h0")}
        if cu is not None:
            j["cu_seqlens"] = jnp.asarray(cu)
            j["chunk_indices"] = jnp.asarray(chunk_indices)
            j["segment_ids"] = jnp.asarray(np.repeat(np.arange(len(shape.seqlens), dtype=np.int32),
                                                     shape.seqlens)[None])
        inputs.jax = j
    return inputs


def set_bytes(shape: Shape) -> int:
    """Bytes of one input set (q, k, v, g, beta, initial state), for the rotating JAX sets."""
    qkv = (2 * shape.H * shape.K + shape.HV * shape.V) * shape.B * shape.T * 2
    return qkv + 8 * shape.B * shape.T * shape.HV + 4 * shape.B * shape.HV * shape.K * shape.V


def stage_bytes(shape: Shape) -> dict[str, int]:
    """Bytes each stage of gdn's staged forward must read and write once (16-bit q, k, v, w, u, v_new, h, o;
    float32 g, g_cum, beta and states; the float32 initial state of dense shapes, as make_inputs draws it),
    and "fused": what any forward must move (q, k, v, g, beta, initial state in; o, final state out)."""
    B, T, H, HV, K, V = shape.B, shape.T, shape.H, shape.HV, shape.K, shape.V
    e = 2
    sequences = B if shape.seqlens is None else len(shape.seqlens)
    k = q = B * T * H * K * e
    v = u = v_new = o = B * T * HV * V * e
    w = B * T * HV * K * e
    g = g_cum = beta = B * T * HV * 4
    h = B * shape.state_rows * HV * K * V * e
    state = sequences * HV * K * V * 4
    initial = state if shape.seqlens is None else 0
    return {"prepare": k + v + g + beta + g_cum + w + u,
            "states": k + w + u + g_cum + initial + h + v_new + state,
            "chunk_fwd_o": q + k + v_new + g_cum + h + o,
            "fused": q + k + v + g + beta + initial + o + state}


def print_floors(bandwidth_tbps: float, csv_path: Path) -> None:
    """Per shape: the memory floor of each stage and of the staged forward at bandwidth_tbps, the floor of any
    forward (fused), and 0.5× FLA's time from a forward.csv of this benchmark (the issue's goal)."""
    fla: dict[str, float] = {}
    if csv_path.exists():
        with csv_path.open() as f:
            fla = {r["shape"]: float(r["us_compare"]) for r in csv.DictReader(f)
                   if r["impl"] == "fla" and r["us_compare"]}
    rows = []
    for shape in shapes():
        us = {stage: n / (bandwidth_tbps * 1e6) for stage, n in stage_bytes(shape).items()}
        staged = us["prepare"] + us["states"] + us["chunk_fwd_o"]
        half_fla = fla[shape.name] / 2 if shape.name in fla else None
        rows.append({"shape": shape.name, **{stage: fmt(t, 1) for stage, t in us.items()}, "staged": fmt(staged, 1),
                     "0.5x FLA": fmt(half_fla, 1),
                     "staged floor / 0.5x FLA": None if half_fla is None else f"{staged / half_fla:.2f}"})
    print(f"memory floors in µs at {bandwidth_tbps} TB/s (read + write once); FLA times from {csv_path}")
    print(harness.format_table(rows, [(c, c) for c in rows[0]]), flush=True)


# ------------------------------------------------------------------------------------------------ impls

@dataclasses.dataclass
class Impl:
    """make(shape) returns a call of one input dict (torch or jax side) returning (o, final_state)."""

    name: str
    framework: str  # "torch" or "jax"
    make: Callable[[Shape], Callable[[dict], Any]] | None
    note: str = ""


def load_impls(wanted: list[str]) -> dict[str, Impl]:
    """Import what is asked for; an implementation that cannot be imported gets make=None and a note."""
    impls: dict[str, Impl] = {}

    def skipped(name: str, framework: str, error: BaseException) -> Impl:
        return Impl(name, framework, None, f"skipped: import failed: {type(error).__name__}: {error}")

    if "gdn-triton" in wanted:
        try:
            from gdn.triton import chunk_gated_delta_rule as gdn_triton

            def make_gdn_triton(shape: Shape) -> Callable[[dict], Any]:
                return lambda t: gdn_triton(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["h0"],
                                            output_final_state=True, cu_seqlens=t.get("cu_seqlens"),
                                            chunk_indices=t.get("chunk_indices"))

            impls["gdn-triton"] = Impl("gdn-triton", "torch", make_gdn_triton)
        except Exception as error:  # noqa: BLE001 - the forward may not exist yet
            impls["gdn-triton"] = skipped("gdn-triton", "torch", error)

    if "fla" in wanted:
        try:
            progress("importing fla.ops.gated_delta_rule (fla-core imports all of fla.ops) ...")
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn

            def make_fla(shape: Shape) -> Callable[[dict], Any]:
                return lambda t: fla_gdn(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["h0"],
                                         output_final_state=True, cu_seqlens=t.get("cu_seqlens_i64"),
                                         cu_seqlens_cpu=t.get("cu_seqlens_cpu"),
                                         chunk_indices=t.get("chunk_indices_i64"))

            impls["fla"] = Impl("fla", "torch", make_fla, f"fla-core {harness._version('fla-core')}")
        except Exception as error:  # noqa: BLE001
            impls["fla"] = skipped("fla", "torch", error)

    jax_wanted = [n for n in IMPLS if n in wanted and n in ("gdn-pallas", "jla-mosaic", "jla-chunked")]
    if jax_wanted:
        try:
            import jax
            import jax.numpy as jnp

            if jax.default_backend() != "gpu":
                raise RuntimeError(f"jax default backend is {jax.default_backend()!r}, not gpu")
        except Exception as error:  # noqa: BLE001
            for n in jax_wanted:
                impls[n] = Impl(n, "jax", None, f"skipped: {type(error).__name__}: {error}")
            jax_wanted = []

    if "gdn-pallas" in jax_wanted:
        try:
            from gdn.pallas import chunk_gated_delta_rule as gdn_pallas

            def make_gdn_pallas(shape: Shape) -> Callable[[dict], Any]:
                return jax.jit(lambda j: gdn_pallas(j["q"], j["k"], j["v"], j["g"], j["beta"], initial_state=j["h0"],
                                                    output_final_state=True, cu_seqlens=j.get("cu_seqlens"),
                                                    chunk_indices=j.get("chunk_indices")))

            impls["gdn-pallas"] = Impl("gdn-pallas", "jax", make_gdn_pallas)
        except Exception as error:  # noqa: BLE001
            impls["gdn-pallas"] = skipped("gdn-pallas", "jax", error)

    jla_wanted = [n for n in jax_wanted if n.startswith("jla-")]
    if jla_wanted:
        try:
            from jla.ops import available, linear_attention

            have = available("gated_deltanet")
        except Exception as error:  # noqa: BLE001
            for n in jla_wanted:
                impls[n] = skipped(n, "jax", error)
            jla_wanted = []

    for name in jla_wanted:
        backend = name.removeprefix("jla-").replace("mosaic", "mosaic_gpu")
        if backend not in have:
            impls[name] = Impl(name, "jax", None, f"skipped: jla has no {backend!r} gated_deltanet here (has {have})")
            continue

        def make_jla(shape: Shape, backend: str = backend) -> Callable[[dict], Any]:
            group = shape.HV // shape.H

            def call(j: dict) -> Any:
                q, k = j["q"], j["k"]
                if backend == "chunked" and group > 1:  # no grouped value heads in jla's chunked op
                    q, k = jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2)
                return linear_attention("gated_deltanet", q, k, j["v"], g=j["g"], beta=j["beta"], impl=backend,
                                        initial_state=j["h0"], output_final_state=True,
                                        segment_ids=j.get("segment_ids"))

            return jax.jit(call)

        note = f"jax-linear-attention {harness._version('jax-linear-attention')}"
        impls[name] = Impl(name, "jax", make_jla, note + ("; q, k repeated to HV heads when HV > H"
                                                           if backend == "chunked" else ""))
    return {n: impls[n] for n in IMPLS if n in impls}


def call_synced(impl: Impl, fn: Callable[[dict], Any], inputs: Inputs) -> Any:
    """One call, waited for: (o, final_state)."""
    if impl.framework == "torch":
        import torch

        with torch.no_grad():
            out = fn(inputs.torch)
        torch.cuda.synchronize()
        return out
    import jax

    return jax.block_until_ready(fn(inputs.jax))


# ----------------------------------------------------------------------------------------------- a shape

def rel_err(x: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    """max|x − ref| / max|ref| (None when either is missing)."""
    if x is None or ref is None:
        return None
    return float(np.abs(x - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def run_shape(shape: Shape, impls: dict[str, Impl], jax_runs: int) -> list[dict[str, Any]]:
    """Correctness check then timing of every implementation at one shape; one row per implementation."""
    import torch

    want_jax = any(i.framework == "jax" and i.make for i in impls.values())
    sets = harness.rotating_sets(set_bytes(shape)) if want_jax else 1
    progress(f"{shape.name}: generating {sets} input set(s) ...")
    base = dict(shape=shape.name, B=shape.B, T=shape.T, H=shape.H, HV=shape.HV, K=shape.K, V=shape.V,
                varlen_sequences=None if shape.seqlens is None else len(shape.seqlens))
    try:
        inputs = [make_inputs(shape, 1000 + s, want_jax) for s in range(sets)]
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: skip the shape
        progress(f"{shape.name}: input generation failed: {type(error).__name__}: {error}")
        return [dict(base, impl=n, note=f"inputs failed: {error}") for n in impls]

    rows: list[dict[str, Any]] = []
    ref_name, ref_o, ref_state = None, None, None
    for impl in impls.values():
        row: dict[str, Any] = dict(base, impl=impl.name, note=impl.note)
        rows.append(row)
        if impl.make is None:
            continue
        try:
            fn = impl.make(shape)
            o, state = call_synced(impl, fn, inputs[0])  # compile / autotune here, outside the timings
            o, state = to_numpy_f32(o), None if state is None else to_numpy_f32(state)
            if ref_o is None:
                ref_name, ref_o, ref_state = impl.name, o, state
                progress(f"{shape.name}: reference for the error columns: {ref_name}")
            ref_s = ref_state
            if impl.name.startswith("jla-") and shape.seqlens is not None and ref_s is not None:
                ref_s = ref_s[-1:]  # segment_ids: the state after the row's last token = last sequence's
            row.update(reference=ref_name, rel_err_o=rel_err(o, ref_o), rel_err_state=rel_err(state, ref_s),
                       finite=bool(np.isfinite(o).all()))
            errors = [e for e in (row["rel_err_o"], row["rel_err_state"]) if e is not None]
            row["check"] = ("MISMATCH" if (errors and max(errors) > MISMATCH_TOL) or not row["finite"]
                            or (state is None) != (ref_s is None) else "ok")
            progress(f"{shape.name}: {impl.name:<12} rel err vs {ref_name}: o {fmt(row['rel_err_o'], 6) or '-'}"
                     f"  state {fmt(row['rel_err_state'], 6) or '-'}  {row['check']}")
            del o, state
            if impl.framework == "torch":
                t0 = inputs[0].torch
                with torch.no_grad():
                    timing = harness.time_torch(lambda fn=fn, t0=t0: fn(t0))
                row["us_compare"] = timing.median_us
            else:
                arg_sets = [(s.jax,) for s in inputs]
                timing = harness.time_jax(fn, arg_sets, runs=jax_runs)
                pipelined = harness.time_jax(fn, arg_sets, runs=max(10, jax_runs // 5), warmup=2, batch=10)
                row["us_pipelined"] = row["us_compare"] = pipelined.median_us
            row.update(us_median=timing.median_us, us_p10=timing.p10_us, us_p90=timing.p90_us, samples=timing.n,
                       method=timing.method)
            extra = f"  pipelined {row['us_pipelined']:.1f} µs" if "us_pipelined" in row else ""
            progress(f"{shape.name}: {impl.name:<12} {timing.median_us:10.1f} µs{extra}")
        except Exception as error:  # noqa: BLE001 - report, skip, carry on
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            row["note"] = f"failed: {type(error).__name__}: {message}"[:300]
            progress(f"{shape.name}: {impl.name} failed:")
            traceback.print_exc(limit=4)
            sys.stdout.flush()
    times = {r["impl"]: r.get("us_compare") for r in rows}
    for r in rows:
        for other in ("fla", "jla-mosaic"):
            if r.get("us_compare") and times.get(other):
                r[f"ratio_vs_{other}"] = r["us_compare"] / times[other]
    del inputs
    return rows


# -------------------------------------------------------------------------------------------- cold start

def cold_child(impl_name: str, shape: Shape) -> int:
    """In a fresh process: framework init, import, inputs, then the first call (timed) and a second one."""
    t0 = time.perf_counter()
    import torch

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    result: dict[str, Any] = {"impl": impl_name, "shape": shape.name}
    framework = "jax" if impl_name in ("gdn-pallas", "jla-mosaic", "jla-chunked") else "torch"
    if framework == "jax":
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()
    result["framework_init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    impl = load_impls([impl_name])[impl_name]
    result["import_s"] = time.perf_counter() - t0
    if impl.make is None:
        raise RuntimeError(impl.note)
    inputs = make_inputs(shape, 0, framework == "jax")
    fn = impl.make(shape)
    for key in ("first_call_s", "second_call_s"):
        t0 = time.perf_counter()
        call_synced(impl, fn, inputs)
        result[key] = time.perf_counter() - t0
    print(COLD_MARK + json.dumps(result), flush=True)
    return 0


def run_cold(impl_name: str, shape: Shape, timeout_s: float) -> dict[str, Any]:
    """cold_child in a fresh subprocess with an empty TRITON_CACHE_DIR; its result, or {"cold_note": why}."""
    with tempfile.TemporaryDirectory(prefix="gdn-forward-cold-") as cache_dir:
        cmd = [sys.executable, "-m", "benchmarks.forward", "--cold-child", impl_name, "--shapes", shape.name]
        progress(f"cold: {impl_name} at {shape.name}: fresh subprocess, empty TRITON_CACHE_DIR ...")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                                  env=harness.fresh_process_env(cache_dir), timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"cold_note": f"cold: killed after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(COLD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(line for line in (proc.stdout + proc.stderr).strip().splitlines()[-3:])
        return {"cold_note": f"cold: failed (rc {proc.returncode}): {tail}"[:300]}
    r = json.loads(lines[-1][len(COLD_MARK):])
    progress(f"cold: {impl_name}: first call {r['first_call_s']:.2f} s (import {r['import_s']:.2f} s, second call "
             f"{r['second_call_s'] * 1e3:.2f} ms, process {time.perf_counter() - t0:.1f} s)")
    return {"cold_first_call_s": r["first_call_s"], "cold_import_s": r["import_s"],
            "cold_framework_init_s": r["framework_init_s"], "cold_second_call_s": r["second_call_s"]}


# ------------------------------------------------------------------------------------------------- main

def _parse(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in shapes()]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="shapes:\n  " + "\n  ".join(names))
    parser.add_argument("--shapes", default="", help="comma-separated shape names or fnmatch patterns "
                        "(e.g. 'bf16-B1-*'); default all")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--no-cold", action="store_true", help="skip the fresh-process first-call timings")
    parser.add_argument("--cold-shape", default=COLD_SHAPE, help=f"shape of the cold first calls (default "
                        f"{COLD_SHAPE}, or the first selected shape when that one is not selected)")
    parser.add_argument("--cold-timeout", type=float, default=600, help="seconds per cold subprocess (default 600)")
    parser.add_argument("--jax-runs", type=int, default=50, help="timed synchronized JAX calls per shape (default 50)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--list", action="store_true", help="print the selected shape names and exit")
    parser.add_argument("--floors", type=float, metavar="TBPS", help="print each shape's memory floors at this "
                        "copy bandwidth (TB/s) against 0.5x FLA's time in --out's forward.csv, and exit (no GPU)")
    parser.add_argument("--cold-child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [n for n in args.impls.split(",") if n and n not in IMPLS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; expected a subset of {list(IMPLS)}")
    patterns = [p for p in args.shapes.split(",") if p]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        parser.error(f"--shapes: {missing} match no shape; shapes are: {names}")
    args.selected = [s for s in shapes() if not patterns or any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    return args


def summary_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    """One line per shape: µs per implementation (MISMATCH appended) and the gdn/FLA, gdn/jla-mosaic ratios."""
    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    lines, columns = [], [("shape", "shape")] + [(n, f"{n} µs") for n in names]
    pairs = [(g, o) for g in ("gdn-triton", "gdn-pallas") for o in ("fla", "jla-mosaic")
             if g in names and o in names]
    columns += [(f"{g}/{o}", f"{g.removeprefix('gdn-')}/{o}") for g, o in pairs]
    for shape, impl_rows in by_shape.items():
        line: dict[str, Any] = {"shape": shape}
        for n in names:
            r = impl_rows.get(n, {})
            cell = fmt(r.get("us_compare"), 1)
            line[n] = None if cell is None else cell + (" MISMATCH" if r.get("check") == "MISMATCH" else "")
        for g, o in pairs:
            ratio = impl_rows.get(g, {}).get(f"ratio_vs_{o}")
            line[f"{g}/{o}"] = None if ratio is None else f"{ratio:.2f}"
        lines.append(line)
    return harness.format_table(lines, columns)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU
    args = _parse(argv)
    if args.cold_child:
        return cold_child(args.cold_child, args.selected[0])
    if args.list:
        print("\n".join(s.name for s in args.selected))
        return 0
    if args.floors:
        print_floors(args.floors, args.out / "forward.csv")
        return 0
    wanted = [n for n in IMPLS if n in args.impls.split(",")]

    env = harness.environment("benchmarks.forward")
    env["jax-linear-attention"] = harness._version("jax-linear-attention")
    header = harness.format_header(env)
    print(header, flush=True)

    import torch

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; this benchmark needs one", file=sys.stderr)
        return 2
    impls = load_impls(wanted)
    for impl in impls.values():
        progress(f"{impl.name}: {'available' if impl.make else impl.note}"
                 + (f" ({impl.note})" if impl.make and impl.note else ""))

    rows: list[dict[str, Any]] = []
    for shape in args.selected:
        rows += run_shape(shape, impls, args.jax_runs)
        gc.collect()
        torch.cuda.empty_cache()

    if not args.no_cold:
        cold = next((s for s in args.selected if s.name == args.cold_shape), args.selected[0])
        for impl in impls.values():
            if impl.make is None:
                continue
            result = run_cold(impl.name, cold, args.cold_timeout)
            row = next(r for r in rows if r["impl"] == impl.name and r["shape"] == cold.name)
            row.update(result)
            if "cold_note" in result:
                progress(f"cold: {impl.name}: {result['cold_note']}")

    names = [n for n in IMPLS if n in impls]
    summary = summary_table(rows, names)
    detail = harness.format_table(
        [dict(r, us_s=fmt(r.get("us_median"), 1), pipe_s=fmt(r.get("us_pipelined"), 1),
              eo=None if r.get("rel_err_o") is None else f"{r['rel_err_o']:.2e}",
              es=None if r.get("rel_err_state") is None else f"{r['rel_err_state']:.2e}",
              cold_s=fmt(r.get("cold_first_call_s"), 2),
              why=r.get("cold_note") or (r.get("note") if not r.get("us_median") else None)) for r in rows],
        [("impl", "impl"), ("shape", "shape"), ("us_s", "µs median"), ("pipe_s", "pipelined µs"),
         ("eo", "rel err o"), ("es", "rel err state"), ("check", "check"), ("reference", "vs"),
         ("cold_s", "cold first call s"), ("why", "note")])
    notes = [
        "notes:",
        ("  summary µs: torch do_bench median (CUDA events, L2 cleared each call); JAX median wall time per call"
         " with 10 calls per block_until_ready (pipelined; the detail table also gives the synchronized time);"),
        ("  a/b ratio = time of gdn a / time of b (< 1: gdn faster); rel err = max|Δ| / max|reference| for o and"
         f" the final state, MISMATCH above {MISMATCH_TOL:g};"),
        ("  dense shapes start from an N(0, 1) initial state, varlen from zero; jla varlen runs as segment_ids"
         " (its final state: the last sequence's only);"),
        ("  cold first call: fresh process, empty TRITON_CACHE_DIR, no JAX compilation cache: compile (+ FLA's"
         " autotune) + run, synchronized."),
    ]
    report = [header, "", summary, "", detail, *notes]
    print("\n" + "\n".join(report[2:]))
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["impl", "shape", "B", "T", "H", "HV", "K", "V", "varlen_sequences", "us_median", "us_p10", "us_p90",
              "samples", "us_pipelined", "us_compare", "ratio_vs_fla", "ratio_vs_jla-mosaic", "reference",
              "rel_err_o", "rel_err_state", "check", "cold_first_call_s", "cold_import_s", "cold_framework_init_s",
              "cold_second_call_s", "cold_note", "method", "note"]
    harness.write_csv(args.out / "forward.csv", rows, fields)
    (args.out / "forward.txt").write_text("\n".join(report) + "\n")
    progress(f"wrote {args.out / 'forward.csv'}, {args.out / 'forward.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
