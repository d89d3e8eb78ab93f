"""``python -m benchmarks.forward``: the chunked Gated DeltaNet forward (chunk_gated_delta_rule) against its
peers on one CUDA GPU, at benchmarks.shapes.SHAPES (bf16, K = V = 128, log-sigmoid gates, final state on).

Implementations (a peer that is not installed is a "not installed" row; one that fails at a shape is a row with
the error; nothing stops the run):
  gdn-triton        gdn.triton.chunk_gated_delta_rule (its public API only)
  gdn-pallas        gdn.pallas.chunk_gated_delta_rule, called as users call it (the op jits itself)
  gdn-jax-triton    the same with lowering="triton_call": gdn-triton's kernels launched from JAX through jaxlib's
                    Triton custom call (its o and final state should equal gdn-triton's bit for bit: rel err 0)
  gdn-mosaic        the same with lowering="mosaic_gpu": the Pallas prepare and piece maps, then the walk with o
                    computed in it in Pallas Mosaic GPU (gdn.pallas.forward_mosaic_gpu)
  fla               fla-core 0.6 fla.ops.gated_delta_rule.chunk_gated_delta_rule (takes natural-log g)
  flashinfer        FlashInfer's SM90 prefill (fi_gdn bundle: benchmarks/../shared/peers/flashinfer-gdn-sm90)
                    on its fused path (use_cp=False), inputs converted to its layout once, outside the timings
  flashinfer-cp     the same forced onto its context-parallel path (use_cp=True)
  jla-mosaic        jax-linear-attention 0.1 jla.ops.linear_attention("gated_deltanet", impl="mosaic_gpu"),
                    jitted; varlen as segment_ids (its final state: the last sequence's only)

Every implementation gets the same values (benchmarks.shapes.forward_inputs): dense shapes start from an N(0, 1)
initial state, varlen from zero. Before timing, o and the final state are compared with gdn-triton's (else the
first implementation that ran): max|Δ| / max|ref|, MISMATCH above 2e-2 (still timed).

Timing. torch: device time = the call captured in a CUDA graph and replayed (triton.testing.do_bench: CUDA
events, L2 flushed; no host time), wall time = do_bench of the plain Python call (the GPU waits on the host when
the host is slower). JAX: device time = 50 calls issued back to back per block_until_ready (dispatch hidden
behind execution), wall time = one call per block_until_ready. Medians with the 10th and 90th percentiles.
Floor = what any forward must move (q, k, v, g, beta, initial state in; o, final state out) / the copy
bandwidth of the same run. Host rows: CPU µs per call of 1000 back-to-back calls at B1 T512, the JAX ops also
called eagerly (what gdn.pallas costs without a caller's jit). Cold: the first call (compile, autotune, run) of
each implementation in a fresh process with an empty TRITON_CACHE_DIR and no JAX compilation cache.

Writes forward.csv, forward_host.csv, forward_cold.csv (with .env.json and .txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
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

from benchmarks import harness, shapes
from benchmarks.harness import fmt, progress

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
IMPLS = ("gdn-triton", "gdn-pallas", "gdn-jax-triton", "gdn-mosaic", "fla", "flashinfer", "flashinfer-cp", "jla-mosaic")
JAX_IMPLS = ("gdn-pallas", "gdn-jax-triton", "gdn-mosaic", "jla-mosaic")
MISMATCH_TOL = 2e-2
PIPELINED_CALLS = 50
COLD_SHAPE = "B1-T8192-H16-HV16"
COLD_MARK = "COLD-RESULT "


def load_impls(wanted: list[str]) -> dict[str, harness.Impl]:
    """Import what is asked for; whatever cannot be imported becomes a "not installed" row."""
    impls: dict[str, harness.Impl] = {}
    if "gdn-triton" in wanted:
        try:
            from gdn.triton import chunk_gated_delta_rule as gdn_triton

            def make_gdn_triton(shape: shapes.Shape, t: dict) -> Callable[[], Any]:
                return lambda: gdn_triton(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
                                          output_final_state=True, cu_seqlens=t["cu_seqlens"],
                                          chunk_indices=t["chunk_indices"])

            impls["gdn-triton"] = harness.Impl("gdn-triton", "torch", make_gdn_triton)
        except Exception as error:  # noqa: BLE001 - any import failure is reported as a row
            impls["gdn-triton"] = harness.not_installed("gdn-triton", "torch", error)
    if "fla" in wanted:
        try:
            progress("importing fla.ops.gated_delta_rule (fla-core imports all of fla.ops) ...")
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_forward

            def make_fla(shape: shapes.Shape, t: dict) -> Callable[[], Any]:
                varlen = {} if t["cu_seqlens"] is None else {
                    "cu_seqlens": t["cu_seqlens"].long(), "cu_seqlens_cpu": t["cu_seqlens"].cpu().long(),
                    "chunk_indices": t["chunk_indices"].long()}
                return lambda: fla_forward(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
                                           output_final_state=True, **varlen)

            impls["fla"] = harness.Impl("fla", "torch", make_fla, f"fla-core {harness.version('fla-core')}")
        except Exception as error:  # noqa: BLE001
            impls["fla"] = harness.not_installed("fla", "torch", error)
    for name, use_cp in (("flashinfer", False), ("flashinfer-cp", True)):
        if name in wanted:
            try:
                import fi_gdn

                impls[name] = harness.Impl(name, "torch", _flashinfer_maker(fi_gdn, use_cp),
                                           f"{harness.flashinfer_bundle_version()}, use_cp={use_cp}")
            except Exception as error:  # noqa: BLE001
                impls[name] = harness.not_installed(name, "jax" if name in JAX_IMPLS else "torch", error)
    jax_wanted = harness.jax_gpu_impls([n for n in JAX_IMPLS if n in wanted], impls)
    for name, lowering in (("gdn-pallas", "triton"), ("gdn-jax-triton", "triton_call"), ("gdn-mosaic", "mosaic_gpu")):
        if name in jax_wanted:
            try:
                from gdn.pallas import chunk_gated_delta_rule as gdn_pallas

                def make_gdn_pallas(shape: shapes.Shape, j: dict, lowering: str = lowering) -> Callable[[], Any]:
                    return lambda: gdn_pallas(j["q"], j["k"], j["v"], j["g"], j["beta"],
                                              initial_state=j["initial_state"], output_final_state=True,
                                              cu_seqlens=j["cu_seqlens"], chunk_indices=j["chunk_indices"],
                                              lowering=lowering)

                impls[name] = harness.Impl(name, "jax", make_gdn_pallas)
            except Exception as error:  # noqa: BLE001
                impls[name] = harness.not_installed(name, "jax", error)
    if "jla-mosaic" in jax_wanted:
        try:
            import jax

            linear_attention = harness.jla_linear_attention()

            jla_forward = jax.jit(lambda q, k, v, g, beta, s0, ids: linear_attention(
                "gated_deltanet", q, k, v, g=g, beta=beta, impl="mosaic_gpu", initial_state=s0,
                output_final_state=True, segment_ids=ids))

            def make_jla(shape: shapes.Shape, j: dict) -> Callable[[], Any]:
                segment_ids = None if shape.seqlens is None else jax.numpy.asarray(
                    np.repeat(np.arange(shape.N, dtype=np.int32), shape.seqlens)[None])
                return lambda: jla_forward(j["q"], j["k"], j["v"], j["g"], j["beta"], j["initial_state"], segment_ids)

            impls["jla-mosaic"] = harness.Impl("jla-mosaic", "jax", make_jla,
                                               f"jax-linear-attention {harness.version('jax-linear-attention')}")
        except Exception as error:  # noqa: BLE001
            impls["jla-mosaic"] = harness.not_installed("jla-mosaic", "jax", error)
    return {n: impls[n] for n in IMPLS if n in impls}


def _flashinfer_maker(fi_gdn: Any, use_cp: bool) -> Callable[[shapes.Shape, dict], Callable[[], Any]]:
    """FlashInfer's own chunk_gated_delta_rule on its packed layout (q, k, v [T, heads, 128], alpha = exp(g),
    state [N, HV, V, K]), converted once; the call returns (o [B, T, HV, V], final state [N, HV, K, V]) views."""

    def make(shape: shapes.Shape, t: dict) -> Callable[[], Any]:
        import torch

        B, T, HV = shape.B, shape.T, shape.HV
        tokens = B * T
        cu = (torch.arange(B + 1, device="cuda", dtype=torch.int64) * T if t["cu_seqlens"] is None
              else t["cu_seqlens"].long())
        packed = {n: t[n].reshape(tokens, *t[n].shape[2:]).contiguous() for n in ("q", "k", "v")}
        alpha = t["g"].reshape(tokens, HV).exp().contiguous()
        beta = t["beta"].reshape(tokens, HV).contiguous()
        state = None if t["initial_state"] is None else t["initial_state"].transpose(-1, -2).contiguous()
        longest = T if shape.seqlens is None else max(shape.seqlens)

        def call() -> tuple[Any, Any]:
            o, final = fi_gdn.chunk_gated_delta_rule(packed["q"], packed["k"], packed["v"], alpha, beta, None,
                                                     initial_state=state, output_final_state=True, cu_seqlens=cu,
                                                     use_cp=use_cp, max_seqlen=longest)
            return o.reshape(B, T, HV, -1), final.transpose(-1, -2)

        return call

    return make


# ----------------------------------------------------------------------------------------------- a shape

def rel_err(x: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    """max|x − ref| / max|ref| (None when either is missing)."""
    if x is None or ref is None or x.shape != ref.shape:
        return None
    return float(np.abs(x - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def run_shape(shape: shapes.Shape, impls: dict[str, harness.Impl], copy_bw: float) -> list[dict[str, Any]]:
    """The correctness check, then device and wall time, of every implementation at one shape."""
    import torch

    progress(f"{shape.name}: inputs ...")
    torch_inputs = shapes.forward_inputs(shape, seed=1000)
    jax_sets = jax_input_sets(shape, torch_inputs, impls)
    floor_us = shape.forward_bytes() / copy_bw * 1e6
    base = {"shape": shape.name, "label": shape.label, "mb_moved": shape.forward_bytes() / 1e6,
            "floor_us": floor_us}
    rows: list[dict[str, Any]] = []
    reference: tuple[str, np.ndarray, np.ndarray | None] | None = None
    for impl in impls.values():
        row: dict[str, Any] = dict(base, impl=impl.name, note=impl.note)
        rows.append(row)
        if impl.make is None:
            continue
        try:
            calls = [impl.make(shape, j) for j in jax_sets] if impl.framework == "jax" else \
                [impl.make(shape, torch_inputs)]
            call = calls[0]
            o, state = harness.synced(impl, call)  # compiles and autotunes here, outside the timings
            o, state = harness.to_numpy(o), harness.to_numpy(state)
            if reference is None:
                reference = (impl.name, o, state)
            ref_name, ref_o, ref_state = reference
            if impl.name == "jla-mosaic" and shape.seqlens is not None and ref_state is not None:
                ref_state = ref_state[-1:]  # segment_ids: the state after the row's last token
            errors = [rel_err(o, ref_o), rel_err(state, ref_state)]
            bad = not np.isfinite(o).all() or any(e is None or e > MISMATCH_TOL for e in errors)
            row.update(reference=ref_name, rel_err_o=errors[0], rel_err_state=errors[1],
                       check="MISMATCH" if bad else "ok")
            progress(f"{shape.name}: {impl.name:<13} vs {ref_name}: o {fmt(errors[0], 6)}  state "
                     f"{fmt(errors[1], 6)}  {row['check']}")
            if impl.framework == "torch":
                with torch.no_grad():
                    device, wall, note = harness.time_torch_call(call)
            else:  # rotating through the input sets, so that a call does not find its inputs in L2
                sets = [(i,) for i in range(len(calls))]
                device = harness.time_jax(lambda i: calls[i](), sets, runs=20, warmup=2, batch=PIPELINED_CALLS)
                wall = harness.time_jax(lambda i: calls[i](), sets, runs=50, warmup=2)
                note = ""
            store_timing(row, "device", device)
            store_timing(row, "wall", wall)
            if note:
                row["note"] = "; ".join(n for n in (row["note"], note) if n)
            if device is not None:
                row["pct_floor"] = 100 * floor_us / device.median_us
            progress(f"{shape.name}: {impl.name:<13} device {fmt(row.get('device_us'), 1) or '-'} µs  "
                     f"wall {fmt(row.get('wall_us'), 1)} µs")
        except Exception as error:  # noqa: BLE001 - report, carry on
            row["note"] = harness.failure_note(error)
            progress(f"{shape.name}: {impl.name} failed:")
            traceback.print_exc(limit=4)
            sys.stdout.flush()
    del torch_inputs, jax_sets
    return rows


def jax_input_sets(shape: shapes.Shape, torch_inputs: dict, impls: dict[str, harness.Impl]) -> list[dict]:
    """The JAX implementations' input sets (none when none of them runs): the torch inputs through DLPack, and
    more sets until they exceed 3× the L2 cache (torch timings flush the L2 instead)."""
    if not any(i.framework == "jax" and i.make for i in impls.values()):
        return []
    sets = harness.rotating_sets(shape.forward_bytes())
    return [shapes.to_jax(torch_inputs)] + [shapes.to_jax(shapes.forward_inputs(shape, seed=1000 + s))
                                            for s in range(1, sets)]


def store_timing(row: dict[str, Any], what: str, timing: harness.Timing | None) -> None:
    """row's what_us, what_p10_us, what_p90_us and what_method from a timing (nothing for None)."""
    if timing is not None:
        row.update({f"{what}_us": timing.median_us, f"{what}_p10_us": timing.p10_us,
                    f"{what}_p90_us": timing.p90_us, f"{what}_method": timing.method})


# ------------------------------------------------------------------------------------------- host time

def host_rows(impls: dict[str, harness.Impl], calls: int) -> list[dict[str, Any]]:
    """CPU µs per call at HOST_SHAPE: back-to-back calls without synchronization; the JAX ops through their
    benchmark call (jitted) and, for gdn-pallas, the same call again (it is already the eager public op)."""
    import torch

    shape = shapes.HOST_SHAPE
    progress(f"host time at {shape.name}: {calls} back-to-back calls per implementation ...")
    torch_inputs = shapes.forward_inputs(shape, seed=7)
    jax_inputs = shapes.to_jax(torch_inputs) if any(i.framework == "jax" and i.make for i in impls.values()) else {}
    rows = []
    for impl in impls.values():
        if impl.make is None:
            continue
        try:
            call = impl.make(shape, jax_inputs if impl.framework == "jax" else torch_inputs)
            if impl.framework == "torch":
                with torch.no_grad():
                    host_us = harness.host_time_per_call(call, torch.cuda.synchronize, calls)
            else:
                last = [harness.synced(impl, call)]

                def keep(call: Callable[[], Any] = call, last: list = last) -> None:
                    last[0] = call()

                host_us = harness.host_time_per_call(keep, lambda last=last: _block(last[0]), calls)
            rows.append({"impl": impl.name, "shape": shape.name, "label": shape.label, "host_us": host_us,
                         "calls": calls})
            progress(f"host time: {impl.name:<13} {host_us:7.1f} µs/call")
        except Exception as error:  # noqa: BLE001
            progress(f"host time: {impl.name} failed: {type(error).__name__}: {error}")
    return rows


def _block(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


# ------------------------------------------------------------------------------------------ cold start

def cold_child(impl_name: str, shape: shapes.Shape,
               load: Callable[[list[str]], dict[str, harness.Impl]] | None = None,
               inputs_of: Callable[[shapes.Shape, int], dict[str, Any]] = shapes.forward_inputs,
               synced: Callable[[harness.Impl, Callable[[], Any]], Any] = harness.synced) -> int:
    """In a fresh process: framework start, import, inputs, then the first call (timed) and a second one. load
    defaults to this module's load_impls; benchmarks.backward passes its implementations, inputs and steps."""
    start = time.perf_counter()
    import torch

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    result: dict[str, Any] = {"impl": impl_name, "shape": shape.name}
    if impl_name in JAX_IMPLS:
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()
    result["framework_init_s"] = time.perf_counter() - start
    start = time.perf_counter()
    impl = (load or load_impls)([impl_name])[impl_name]
    result["import_s"] = time.perf_counter() - start
    if impl.make is None:
        raise RuntimeError(impl.note)
    inputs = inputs_of(shape, 0)
    call = impl.make(shape, shapes.to_jax(inputs) if impl.framework == "jax" else inputs)
    for key in ("first_call_s", "second_call_s"):
        start = time.perf_counter()
        synced(impl, call)
        result[key] = time.perf_counter() - start
    print(COLD_MARK + json.dumps(result), flush=True)
    return 0


def run_cold(impl_name: str, shape: shapes.Shape, timeout_s: float,
             module: str = "benchmarks.forward") -> dict[str, Any]:
    """The cold child of `python -m module` in a fresh subprocess with an empty TRITON_CACHE_DIR: its result, or
    a note saying why not."""
    row: dict[str, Any] = {"impl": impl_name, "shape": shape.name, "label": shape.label}
    with tempfile.TemporaryDirectory(prefix="gdn-cold-") as cache_dir:
        command = [sys.executable, "-m", module, "--cold-child", impl_name, "--shapes", shape.name]
        progress(f"cold: {impl_name} at {shape.name}: fresh subprocess, empty TRITON_CACHE_DIR ...")
        try:
            proc = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                                  text=True, env=harness.fresh_process_env(cache_dir), timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return dict(row, note=f"killed after {timeout_s:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(COLD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])
        return dict(row, note=f"failed (rc {proc.returncode}): {tail}"[:300])
    result = json.loads(lines[-1][len(COLD_MARK):])
    progress(f"cold: {impl_name}: first call {result['first_call_s']:.2f} s (import {result['import_s']:.2f} s, "
             f"second call {result['second_call_s'] * 1e3:.2f} ms)")
    return dict(row, **{key: result[key] for key in ("first_call_s", "second_call_s", "import_s",
                                                     "framework_init_s")})


# ------------------------------------------------------------------------------------------------ main

def summary(rows: list[dict[str, Any]]) -> str:
    return harness.format_table(
        [dict(r, dev=fmt(r.get("device_us"), 1),
              spread=(f"{r['device_p10_us']:.1f}–{r['device_p90_us']:.1f}" if r.get("device_p10_us") else None),
              wall=fmt(r.get("wall_us"), 1), pct=fmt(r.get("pct_floor"), 0),
              rt=fmt(r.get("gdn-triton_ratio"), 2), rp=fmt(r.get("gdn-pallas_ratio"), 2),
              err=None if r.get("rel_err_o") is None else f"{r['rel_err_o']:.1e}",
              why=None if r.get("device_us") or r.get("wall_us") else r.get("note")) for r in rows],
        [("impl", "impl"), ("label", "shape"), ("dev", "device µs"), ("spread", "p10–p90"), ("wall", "wall µs"),
         ("pct", "% floor"), ("rt", "Triton ÷"), ("rp", "Pallas ÷"), ("err", "rel err o"), ("check", "check"),
         ("why", "note")])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.selection_parser("python -m benchmarks.forward", __doc__, shapes.SHAPES, IMPLS, COLD_SHAPE,
                                      "calls", "only the fresh-process first calls (writes forward_cold.csv alone, "
                                      "e.g. when one command may not take all of it)")
    parser.add_argument("--host-calls", type=int, default=1000, help="calls of the host-time loop")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--cold-child", choices=IMPLS, help=argparse.SUPPRESS)
    return harness.parse_selection(parser, argv, IMPLS, shapes.SHAPES)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU
    args = _parse(argv)
    if args.cold_child:
        return cold_child(args.cold_child, args.selected[0])
    env = harness.environment("benchmarks.forward")
    print(harness.format_header(env), flush=True)
    import torch

    impls = load_impls([n for n in IMPLS if n in args.impls.split(",")])
    copy_bw = harness.gpu_run(env, impls)
    if copy_bw is None:
        return 2

    rows: list[dict[str, Any]] = []
    for shape in [] if args.cold_only else args.selected:
        rows += run_shape(shape, impls, copy_bw)
        gc.collect()
        torch.cuda.empty_cache()
    harness.ratio_columns(rows)
    host = [] if args.cold_only else host_rows(impls, args.host_calls)
    cold_rows = []
    if not args.no_cold:
        cold_shape = shapes.select(shapes.SHAPES, args.cold_shape)[0]
        cold_rows = [run_cold(impl.name, cold_shape, args.cold_timeout) for impl in impls.values() if impl.make]

    report = summary(rows) if rows else ""
    if host:
        report += "\n\nhost µs per call\n" + harness.format_table(
            [dict(r, us=fmt(r["host_us"], 1)) for r in host], [("impl", "impl"), ("label", "shape"), ("us", "µs")])
    if cold_rows:
        report += "\n\ncold first call\n" + harness.format_table(
            [dict(r, s=fmt(r.get("first_call_s"), 2)) for r in cold_rows],
            [("impl", "impl"), ("label", "shape"), ("s", "first call s"), ("note", "note")])
    print("\n" + report, flush=True)
    if rows:
        harness.write_results(args.out, "forward", env, rows, report=report)
    if host:
        harness.write_results(args.out, "forward_host", env, host)
    if cold_rows:
        harness.write_results(args.out, "forward_cold", env, cold_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
