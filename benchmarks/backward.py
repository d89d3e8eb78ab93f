"""``python -m benchmarks.backward``: one training step of chunk_gated_delta_rule — the forward, then the
gradients of q, k, v, g, beta and the initial state — against its peers on one CUDA GPU, at BACKWARD_SHAPES
(bf16, K = V = 128, log-sigmoid gates): time, peak memory and the memory the forward keeps for the backward.

Implementations (a peer that is not installed is a "not installed" row; nothing stops the run):
  gdn-triton    gdn.triton.chunk_gated_delta_rule, then torch.autograd.grad
  gdn-pallas    gdn.pallas.chunk_gated_delta_rule under jax.jit(jax.vjp) (varlen: cu_seqlens, chunk_indices traced)
  fla           fla-core 0.6 fla.ops.gated_delta_rule.chunk_gated_delta_rule, then torch.autograd.grad; its gated
                backward refuses Hopper with Triton >= 3.4 and < 3.7.1 (FLA #640): the row then reads
                "refused: <its message>"
  jla-mosaic    jax-linear-attention 0.1 jla.ops.linear_attention("gated_deltanet", impl="mosaic_gpu") under
                jax.jit(jax.vjp) (Hopper; varlen as segment_ids)

The step: (o, final state) of the forward, pulled back with do ~ N(0, 1) (o's dtype) and, dense shapes, the
final state's gradient ~ N(0, 1) (float32). Inputs: benchmarks.shapes.forward_inputs (dense shapes start from an
N(0, 1) initial state, varlen from zero states and returns no final state: jla's segment_ids form has one state
per batch row). Before timing, every gradient is compared with gdn-triton's (else the first implementation
that ran): max|Δ| / max|ref|, MISMATCH above 5e-2 (still timed).

Timing as benchmarks.forward: torch device time = the step captured in a CUDA graph and replayed, wall = do_bench
of the Python call; JAX device time = 20 steps back to back per block_until_ready over rotating input sets, wall =
one step per sync. Memory: torch, peak_mib = the most allocated during a step beyond what was allocated before it
(the inputs and cotangents stay), saved_mib = what the forward leaves allocated for the backward beyond o and the
final state; JAX, peak_mib = XLA's temporaries + outputs of the jitted step, saved_mib = the jax.vjp residuals that
are not inputs passed through. Cold: the first step (compile, FLA's autotune, run) in a fresh process with an
empty TRITON_CACHE_DIR and no JAX compilation cache.

Writes backward.csv and backward_cold.csv (with .env.json and .txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import forward, harness, shapes
from benchmarks.harness import fmt, progress

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
IMPLS = ("gdn-triton", "gdn-pallas", "fla", "jla-mosaic")
JAX_IMPLS = ("gdn-pallas", "jla-mosaic")
GRADIENTS = ("q", "k", "v", "g", "beta", "initial_state")
MISMATCH_TOL = 5e-2
PIPELINED_STEPS = 20
COLD_SHAPE = "B1-T8192-H16-HV16"


# ------------------------------------------------------------------------------------------------ steps

def step_inputs(shape: shapes.Shape, seed: int) -> dict[str, Any]:
    """benchmarks.shapes.forward_inputs and the cotangents: do (o's dtype) and, dense shapes, dht (float32)."""
    import torch

    t = shapes.forward_inputs(shape, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    t["do"] = torch.randn(t["v"].shape, generator=gen, device="cuda").to(t["v"].dtype)
    t["dht"] = (None if shape.seqlens is not None
                else torch.randn((shape.N, shape.HV, shape.K, shape.V), generator=gen, device="cuda"))
    torch.cuda.synchronize()
    return t


@dataclasses.dataclass
class Step:
    """An implementation's step on one input set: calling it runs the forward and the backward and returns the
    gradients (GRADIENTS order, those given); forward() is the forward alone, (o, final state or None). JAX
    steps also carry their jitted function, its argument and the forward's call of an input dict, for the
    memory analysis."""

    run: Callable[[], tuple]
    forward: Callable[[], tuple]
    jitted: Any = None
    argument: Any = None
    call: Callable[[dict], tuple] | None = None

    def __call__(self) -> tuple:
        return self.run()


def torch_step(call: Callable[[dict], tuple], t: dict) -> Step:
    """call(t) → (o, final state or None), then torch.autograd.grad with do and dht; the inputs in GRADIENTS
    become leaves that require grad (the same storage)."""
    import torch

    t = {n: x.detach().requires_grad_(True) if n in GRADIENTS and x is not None else x for n, x in t.items()}
    wrt = [t[n] for n in GRADIENTS if t[n] is not None]

    def run() -> tuple:
        o, state = call(t)
        outputs, cotangents = [o], [t["do"]]
        if state is not None:
            outputs.append(state)
            cotangents.append(t["dht"])
        return torch.autograd.grad(outputs, wrt, cotangents)

    return Step(run, lambda: call(t))


def jax_step(call: Callable[[dict], tuple]) -> Callable[[dict], Step]:
    """call(j) → (o, final state or None) made into a jitted step (jax.vjp at the inputs in GRADIENTS, pulled back
    with do and dht), compiled once per shape; returns the maker of the step on one input set."""
    import jax

    def pullback(j: dict) -> tuple:
        names = [n for n in GRADIENTS if j[n] is not None]
        (_, state), vjp = jax.vjp(lambda *xs: call({**j, **dict(zip(names, xs))}), *(j[n] for n in names))
        return vjp((j["do"], None if state is None else j["dht"]))

    jitted = jax.jit(pullback)
    return lambda j: Step(lambda: jitted(j), lambda: call(j), jitted, j, call)


def load_impls(wanted: list[str]) -> dict[str, harness.Impl]:
    """Import what is asked for; whatever cannot be imported becomes a "not installed" row. make(shape, inputs)
    returns the implementation's Step."""
    impls: dict[str, harness.Impl] = {}
    if "gdn-triton" in wanted:
        try:
            from gdn.triton import chunk_gated_delta_rule as gdn_triton

            def call_gdn_triton(t: dict) -> tuple:
                return gdn_triton(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
                                  output_final_state=t["dht"] is not None, cu_seqlens=t["cu_seqlens"],
                                  chunk_indices=t["chunk_indices"])

            impls["gdn-triton"] = harness.Impl("gdn-triton", "torch",
                                               lambda shape, t: torch_step(call_gdn_triton, t))
        except Exception as error:  # noqa: BLE001 - any import failure is reported as a row
            impls["gdn-triton"] = harness.not_installed("gdn-triton", "torch", error)
    if "fla" in wanted:
        try:
            progress("importing fla.ops.gated_delta_rule (fla-core imports all of fla.ops) ...")
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_forward

            def call_fla(t: dict) -> tuple:
                varlen = {} if t["cu_seqlens"] is None else {
                    "cu_seqlens": t["cu_seqlens"].long(), "cu_seqlens_cpu": t["cu_seqlens"].cpu().long(),
                    "chunk_indices": t["chunk_indices"].long()}
                return fla_forward(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
                                   output_final_state=t["dht"] is not None, **varlen)

            impls["fla"] = harness.Impl("fla", "torch", lambda shape, t: torch_step(call_fla, t),
                                        f"fla-core {harness.version('fla-core')}")
        except Exception as error:  # noqa: BLE001
            impls["fla"] = harness.not_installed("fla", "torch", error)
    jax_wanted = harness.jax_gpu_impls([n for n in JAX_IMPLS if n in wanted], impls)
    if "gdn-pallas" in jax_wanted:
        try:
            from gdn.pallas import chunk_gated_delta_rule as gdn_pallas

            step_gdn_pallas = jax_step(lambda j: gdn_pallas(
                j["q"], j["k"], j["v"], j["g"], j["beta"], initial_state=j["initial_state"],
                output_final_state=j["dht"] is not None, cu_seqlens=j["cu_seqlens"], chunk_indices=j["chunk_indices"]))
            impls["gdn-pallas"] = harness.Impl("gdn-pallas", "jax", lambda shape, j: step_gdn_pallas(j))
        except Exception as error:  # noqa: BLE001
            impls["gdn-pallas"] = harness.not_installed("gdn-pallas", "jax", error)
    if "jla-mosaic" in jax_wanted:
        try:
            import jax

            linear_attention = harness.jla_linear_attention()

            step_jla = jax_step(lambda j: linear_attention(
                "gated_deltanet", j["q"], j["k"], j["v"], g=j["g"], beta=j["beta"], impl="mosaic_gpu",
                initial_state=j["initial_state"], output_final_state=j["dht"] is not None,
                segment_ids=j["segment_ids"]))

            def make_jla(shape: shapes.Shape, j: dict) -> Step:
                segment_ids = None if shape.seqlens is None else jax.numpy.asarray(
                    np.repeat(np.arange(shape.N, dtype=np.int32), shape.seqlens)[None])
                return step_jla({**j, "segment_ids": segment_ids})

            impls["jla-mosaic"] = harness.Impl("jla-mosaic", "jax", make_jla,
                                               f"jax-linear-attention {harness.version('jax-linear-attention')}")
        except Exception as error:  # noqa: BLE001
            impls["jla-mosaic"] = harness.not_installed("jla-mosaic", "jax", error)
    return {n: impls[n] for n in IMPLS if n in impls}


def synced_step(impl: harness.Impl, step: Step) -> tuple:
    """One step (torch: with autograd), waited for on the device: the gradients."""
    if impl.framework == "torch":
        import torch

        grads = step()
        torch.cuda.synchronize()
        return grads
    import jax

    return jax.block_until_ready(step())


# ---------------------------------------------------------------------------------------------- memory

def torch_memory(step: Step) -> dict[str, float]:
    """MiB allocated at a step's peak beyond what was allocated before it, and what the forward leaves allocated
    for the backward beyond o and the final state."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    base = torch.cuda.memory_allocated()
    outputs = step.forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base - sum(x.numel() * x.element_size() for x in outputs if x is not None)
    del outputs
    return {"peak_mib": peak / 2**20, "saved_mib": kept / 2**20}


def jax_memory(step: Step) -> dict[str, float]:
    """MiB of XLA's temporaries + outputs for the jitted step, and of the jax.vjp residuals that are not inputs
    passed through (read off the jaxpr of the residuals: outputs that are not input variables)."""
    import jax
    from jax.extend.core import Var

    j = step.argument
    analysis = step.jitted.lower(j).compile().memory_analysis()
    names = [n for n in GRADIENTS if j[n] is not None]

    def residuals(j: dict):
        return jax.vjp(lambda *xs: step.call({**j, **dict(zip(names, xs))}), *(j[n] for n in names))[1]

    jaxpr = jax.make_jaxpr(residuals)(j).jaxpr
    inputs = set(jaxpr.invars)
    kept = sum(v.aval.size * v.aval.dtype.itemsize for v in set(jaxpr.outvars)
               if isinstance(v, Var) and v not in inputs)
    peak = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    return {"peak_mib": peak / 2**20, "saved_mib": kept / 2**20}


# ----------------------------------------------------------------------------------------------- a shape

def run_shape(shape: shapes.Shape, impls: dict[str, harness.Impl]) -> list[dict[str, Any]]:
    """The gradient check, then device and wall time and memory, of every implementation at one shape."""
    progress(f"{shape.name}: inputs ...")
    torch_inputs = step_inputs(shape, seed=2000)
    jax_sets = []
    if any(i.framework == "jax" and i.make for i in impls.values()):  # more sets until they exceed 3x the L2
        sets = harness.rotating_sets(2 * shape.forward_bytes())
        jax_sets = [shapes.to_jax(torch_inputs)] + [shapes.to_jax(step_inputs(shape, 2000 + s)) for s in range(1, sets)]
    rows: list[dict[str, Any]] = []
    reference: tuple[str, list[np.ndarray]] | None = None
    names = [n for n in GRADIENTS if torch_inputs[n] is not None]
    for impl in impls.values():
        row: dict[str, Any] = {"shape": shape.name, "label": shape.label, "impl": impl.name, "note": impl.note}
        rows.append(row)
        if impl.make is None:
            continue
        try:
            steps = [impl.make(shape, j) for j in jax_sets] if impl.framework == "jax" else \
                [impl.make(shape, torch_inputs)]
            grads = [harness.to_numpy(x) for x in synced_step(impl, steps[0])]  # compiles and autotunes here
        except Exception as error:  # noqa: BLE001 - FLA's refusal on Hopper lands here
            row["note"] = harness.failure_note(error).replace("failed", "refused", 1)
            progress(f"{shape.name}: {impl.name} {row['note']}")
            continue
        try:
            if reference is None:
                reference = (impl.name, grads)
            errors = {n: forward.rel_err(x, r) for n, x, r in zip(names, grads, reference[1])}
            bad = not all(np.isfinite(x).all() for x in grads) or any(e is None or e > MISMATCH_TOL
                                                                      for e in errors.values())
            row.update(reference=reference[0], rel_err=max(e or 0 for e in errors.values()),
                       rel_errs=" ".join(f"d{n} {fmt(e, 4)}" for n, e in errors.items()),
                       check="MISMATCH" if bad else "ok")
            progress(f"{shape.name}: {impl.name:<11} vs {reference[0]}: {row['rel_errs']}  {row['check']}")
            if impl.framework == "torch":
                device, wall, note = harness.time_torch_call(steps[0])
                row.update(torch_memory(steps[0]))
            else:  # rotating through the input sets, so that a step does not find its inputs in L2
                indices = [(i,) for i in range(len(steps))]
                device = harness.time_jax(lambda i: steps[i](), indices, runs=20, warmup=2, batch=PIPELINED_STEPS)
                wall = harness.time_jax(lambda i: steps[i](), indices, runs=30, warmup=2)
                note = ""
                row.update(jax_memory(steps[0]))
            forward.store_timing(row, "device", device)
            forward.store_timing(row, "wall", wall)
            if note:
                row["note"] = "; ".join(n for n in (row["note"], note) if n)
            progress(f"{shape.name}: {impl.name:<11} device {fmt(row.get('device_us'), 1) or '-'} µs  wall "
                     f"{fmt(row.get('wall_us'), 1)} µs  peak {fmt(row.get('peak_mib'), 0)} MiB  saved "
                     f"{fmt(row.get('saved_mib'), 0)} MiB")
        except Exception as error:  # noqa: BLE001 - report, carry on
            row["note"] = harness.failure_note(error)
            progress(f"{shape.name}: {impl.name} failed:")
            traceback.print_exc(limit=4)
            sys.stdout.flush()
    del torch_inputs, jax_sets
    return rows


# ------------------------------------------------------------------------------------------------ main

def summary(rows: list[dict[str, Any]]) -> str:
    return harness.format_table(
        [dict(r, dev=fmt(r.get("device_us"), 1),
              spread=(f"{r['device_p10_us']:.1f}–{r['device_p90_us']:.1f}" if r.get("device_p10_us") else None),
              wall=fmt(r.get("wall_us"), 1), peak=fmt(r.get("peak_mib"), 0), saved=fmt(r.get("saved_mib"), 0),
              rt=fmt(r.get("gdn-triton_ratio"), 2), rp=fmt(r.get("gdn-pallas_ratio"), 2),
              err=None if r.get("rel_err") is None else f"{r['rel_err']:.1e}",
              why=None if r.get("device_us") or r.get("wall_us") else r.get("note")) for r in rows],
        [("impl", "impl"), ("label", "shape"), ("dev", "device µs"), ("spread", "p10–p90"), ("wall", "wall µs"),
         ("peak", "peak MiB"), ("saved", "saved MiB"), ("rt", "Triton ÷"), ("rp", "Pallas ÷"),
         ("err", "max rel err"), ("check", "check"), ("why", "note")])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.selection_parser("python -m benchmarks.backward", __doc__, shapes.BACKWARD_SHAPES, IMPLS,
                                      COLD_SHAPE, "steps", "only the fresh-process first steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--cold-child", choices=IMPLS, help=argparse.SUPPRESS)
    return harness.parse_selection(parser, argv, IMPLS, shapes.BACKWARD_SHAPES)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU
    args = _parse(argv)
    if args.cold_child:
        return forward.cold_child(args.cold_child, args.selected[0], load_impls, step_inputs, synced_step)
    env = harness.environment("benchmarks.backward")
    print(harness.format_header(env), flush=True)
    import torch

    impls = load_impls([n for n in IMPLS if n in args.impls.split(",")])
    if harness.gpu_run(env, impls) is None:
        return 2
    rows: list[dict[str, Any]] = []
    for shape in [] if args.cold_only else args.selected:
        rows += run_shape(shape, impls)
        gc.collect()
        torch.cuda.empty_cache()
    harness.ratio_columns(rows)
    cold_rows = []
    if not args.no_cold:
        cold_shape = shapes.select(shapes.BACKWARD_SHAPES, args.cold_shape)[0]
        cold_rows = [forward.run_cold(impl.name, cold_shape, args.cold_timeout, "benchmarks.backward")
                     for impl in impls.values() if impl.make]
    report = summary(rows) if rows else ""
    if cold_rows:
        report += "\n\ncold first step\n" + harness.format_table(
            [dict(r, s=fmt(r.get("first_call_s"), 2)) for r in cold_rows],
            [("impl", "impl"), ("label", "shape"), ("s", "first step s"), ("note", "note")])
    print("\n" + report, flush=True)
    if rows:
        harness.write_results(args.out, "backward", env, rows, report=report)
    if cold_rows:
        harness.write_results(args.out, "backward_cold", env, cold_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
