"""``python -m benchmarks.decode``: decode_step (one token per sequence) on one CUDA GPU against FLA and the
memory floor, at benchmarks.shapes.DECODE_BATCHES sequences of Qwen3-Next's heads (H16 HV32 K = V = 128), and
the tiling sweep behind tilings.decode_tiling.

Implementations (a peer that is not installed is a "not installed" row):
  gdn-triton   gdn.triton.decode_step (torch)
  gdn-pallas   gdn.pallas.decode_step, called as users call it (the op jits itself)
  fla          fla-core 0.6 fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule with T = 1 (natural-log g,
               state [N, HV, K, V] float32, as gdn's)

A decode step reads and writes the float32 state (2·N·HV·K·V·4 bytes) and little else, so the floor is that
over the bandwidth of a device-to-device copy measured in the same run. Inputs: benchmarks.shapes.decode_inputs
(bf16 unit-norm q, k rows, v ~ N(0, 1), log-sigmoid gates, sigmoid beta, state ~ N(0, 1)); every implementation
is checked against gdn-triton (o and the new state, max |Δ| / max |ref|) before it is timed. torch rows:
triton.testing.do_bench median (L2 flushed); JAX rows: 10 calls per block_until_ready.
The sweep times the gdn Triton kernel with each candidate tiling (BV, warps) at every N.

Writes decode.csv and tune_decode.csv (with .env.json and .txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness, shapes
from benchmarks.harness import progress

TILING_CANDIDATES = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4)]
"""(block_v, num_warps) of the sweep; block_k is always the whole K."""
ARGS = ("q", "k", "v", "g", "beta", "state")


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def calls(N: int, impls: list[str]) -> dict[str, tuple[str, Callable[[], Any]]]:
    """(framework, call) of each available implementation at N sequences; a missing peer is skipped with a line."""
    from gdn.triton import decode_step

    t = shapes.decode_inputs(N, seed=N)
    found: dict[str, tuple[str, Callable[[], Any]]] = {
        "gdn-triton": ("torch", lambda: decode_step(*(t[n] for n in ARGS)))}
    if "fla" in impls:
        try:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            def fla_call() -> tuple[Any, Any]:
                o, state = fused_recurrent_gated_delta_rule(
                    t["q"][:, None], t["k"][:, None], t["v"][:, None], g=t["g"][:, None], beta=t["beta"][:, None],
                    initial_state=t["state"], output_final_state=True)
                return o[:, 0], state

            found["fla"] = ("torch", fla_call)
        except Exception as error:  # noqa: BLE001 - a peer that is not installed is a row
            progress(f"fla: not installed ({type(error).__name__}: {error})")
    if "gdn-pallas" in impls:
        try:
            from gdn.pallas import decode_step as pallas_decode_step

            j = shapes.to_jax(t)
            found["gdn-pallas"] = ("jax", lambda: pallas_decode_step(*(j[n] for n in ARGS)))
        except Exception as error:  # noqa: BLE001
            progress(f"gdn-pallas: not installed ({type(error).__name__}: {error})")
    return found


def run_batch(N: int, impls: list[str], bandwidth: float) -> list[dict[str, Any]]:
    floor_us = 2 * N * shapes.DECODE_HEADS["HV"] * shapes.DECODE_HEADS["K"] * shapes.DECODE_HEADS["V"] * 4 \
        / bandwidth * 1e6
    rows = []
    reference = None
    for name, (framework, call) in calls(N, impls).items():
        o, state = (harness.to_numpy(x) for x in call())
        reference = reference or (o, state)
        if framework == "torch":
            timing = harness.time_torch(call)
        else:
            timing = harness.time_jax(call, [()], batch=10)
        rows.append({"impl": name, "N": N, "us": timing.median_us, "p10_us": timing.p10_us, "p90_us": timing.p90_us,
                     "floor_us": floor_us, "pct_floor": 100 * floor_us / timing.median_us,
                     "rel_err_o": _rel(o, reference[0]), "rel_err_state": _rel(state, reference[1]),
                     "method": timing.method})
        progress(f"N={N} {name:<11} {timing.median_us:8.2f} µs ({rows[-1]['pct_floor']:.0f} % of the floor)")
    return rows


def sweep_tilings(N: int, bandwidth: float) -> list[dict[str, Any]]:
    """gdn Triton's decode kernel with each candidate tiling at N sequences, checked against the spec's."""
    import torch

    from gdn.common import tilings
    from gdn.triton import decode

    t = shapes.decode_inputs(N, seed=N)
    args = [t[n] for n in ARGS]
    problem = decode.call_plan(*args)[0]
    scale = problem.K ** -0.5
    o = torch.empty_like(t["v"])
    reference = torch.empty_like(t["state"])
    decode.launch(problem, problem.tiling, *args, o, reference, scale)
    floor_us = 2 * t["state"].numel() * 4 / bandwidth * 1e6
    rows = []
    for block_v, warps in TILING_CANDIDATES:
        tiling = tilings.Tiling(problem.tiling.block_k, block_v, warps, 1)
        new_state = torch.empty_like(t["state"])

        def call(tiling: tilings.Tiling = tiling, new_state: torch.Tensor = new_state) -> None:
            decode.launch(problem, tiling, *args, o, new_state, scale)

        call()
        us = harness.time_torch(call).median_us
        rows.append({"N": N, "BV": block_v, "warps": warps, "us": us, "pct_floor": 100 * floor_us / us,
                     "spec": tiling == problem.tiling,
                     "rel_err_state_vs_spec": _rel(new_state.cpu().numpy(), reference.cpu().numpy())})
        progress(f"sweep N={N} BV={block_v} warps={warps}: {us:.2f} µs")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="gdn-triton,gdn-pallas,fla", help="comma-separated, of: "
                        "gdn-triton (always run: the reference), gdn-pallas, fla")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = harness.environment("benchmarks.decode")
    print(harness.format_header(env), flush=True)
    bandwidth, _ = harness.copy_bandwidth()
    env["copy bandwidth"] = f"{bandwidth / 1e12:.3f} TB/s"
    progress(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    rows = [row for N in shapes.DECODE_BATCHES for row in run_batch(N, args.impls.split(","), bandwidth)]
    report = harness.format_table(
        [dict(r, us_s=f"{r['us']:.2f}", pct=f"{r['pct_floor']:.0f}", eo=f"{r['rel_err_o']:.1e}",
              es=f"{r['rel_err_state']:.1e}") for r in rows],
        [("impl", "impl"), ("N", "N"), ("us_s", "µs"), ("pct", "% floor"), ("eo", "rel err o"),
         ("es", "rel err state")])
    print(report, flush=True)
    harness.write_results(args.out, "decode", env, rows, report=report)
    if not args.no_sweep:
        sweep = [row for N in shapes.DECODE_BATCHES for row in sweep_tilings(N, bandwidth)]
        report = harness.format_table(
            [dict(r, us_s=f"{r['us']:.2f}", pct=f"{r['pct_floor']:.0f}") for r in sweep],
            [("N", "N"), ("BV", "BV"), ("warps", "warps"), ("us_s", "µs"), ("pct", "% floor"), ("spec", "spec")])
        print(report, flush=True)
        harness.write_results(args.out, "tune_decode", env, sweep, report=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
