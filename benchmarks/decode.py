"""``python -m benchmarks.decode``: decode_step (one token per sequence) on one CUDA GPU, against FLA and the
memory floor, and the sweep behind tilings.decode_tiling.

Implementations (each skipped with a note when it cannot be imported):
  gdn-triton   gdn.triton.decode_step (torch)
  gdn-pallas   gdn.pallas.decode_step under jax.jit
  fla          fla-core 0.6 fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule with T = 1 (natural-log g,
               state [N, HV, K, V] float32, as gdn's)

A decode step reads and writes the float32 state (2·N·HV·K·V·4 bytes) and little else, so the floor is that
over the bandwidth of a device-to-device copy measured in the same run. Inputs: bf16 unit-norm q, k rows,
v ~ N(0, 1), log-sigmoid gates, sigmoid beta, state ~ N(0, 1) (gdn.common.example); every implementation is
checked against gdn-triton (o and the new state, max |Δ| / max |ref|) before it is timed. torch rows:
triton.testing.do_bench median (L2 flushed); JAX rows: median of jitted calls, 10 per block_until_ready.
Then the gdn Triton kernel with each candidate tiling (BV, warps) at every N.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.harness import progress

H, HV, K, V = 16, 32, 128, 128
"""Qwen3-Next-style heads."""
BATCHES = (1, 16, 64, 256)
TILING_CANDIDATES = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4)]
"""(block_v, num_warps) of the sweep; block_k is always the whole K."""


def _inputs(N: int) -> dict[str, np.ndarray]:
    from gdn.common.example import random_recurrent_inputs

    a = random_recurrent_inputs(N, 1, H, HV, K, V, "bfloat16", seed=N)
    step = {n: a[n][:, 0] for n in ("q", "k", "v", "g", "beta")}
    step["state"] = a["initial_state"]
    return step


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_batch(N: int, impls: list[str], bandwidth: float) -> list[dict]:
    import torch

    from gdn.triton import decode_step

    a = _inputs(N)
    t = {n: torch.from_numpy(x).cuda() for n, x in a.items()}
    for n in ("q", "k", "v"):
        t[n] = t[n].to(torch.bfloat16)
    floor_us = 2 * t["state"].numel() * 4 / bandwidth * 1e6
    calls = {"gdn-triton": lambda: decode_step(t["q"], t["k"], t["v"], t["g"], t["beta"], t["state"])}
    if "fla" in impls:
        try:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            def fla_call():
                o, state = fused_recurrent_gated_delta_rule(
                    t["q"][:, None], t["k"][:, None], t["v"][:, None], g=t["g"][:, None], beta=t["beta"][:, None],
                    initial_state=t["state"], output_final_state=True)
                return o[:, 0], state

            calls["fla"] = fla_call
        except Exception as error:  # noqa: BLE001 - an optional comparison
            progress(f"fla skipped: {type(error).__name__}: {error}")
    reference = [x.float().cpu().numpy() for x in calls["gdn-triton"]()]
    rows = []
    for name, call in calls.items():
        o, state = (x.float().cpu().numpy() for x in call())
        us = harness.time_torch(call).median_us
        rows.append({"impl": name, "N": N, "us": round(us, 2), "floor_us": round(floor_us, 2),
                     "pct_floor": round(100 * floor_us / us, 1), "rel_err_o": f"{_rel(o, reference[0]):.1e}",
                     "rel_err_state": f"{_rel(state, reference[1]):.1e}"})
        progress(str(rows[-1]))
    if "gdn-pallas" in impls:
        import jax
        import jax.numpy as jnp

        from gdn.pallas import decode_step as pallas_decode_step

        j = {n: jnp.asarray(x, "bfloat16" if n in ("q", "k", "v") else None) for n, x in a.items()}
        fn = jax.jit(pallas_decode_step)
        args = (j["q"], j["k"], j["v"], j["g"], j["beta"], j["state"])
        o, state = fn(*args)
        timing = harness.time_jax(fn, [args], batch=10)
        rows.append({"impl": "gdn-pallas", "N": N, "us": round(timing.median_us, 2), "floor_us": round(floor_us, 2),
                     "pct_floor": round(100 * floor_us / timing.median_us, 1),
                     "rel_err_o": f"{_rel(np.asarray(o.astype(jnp.float32)), reference[0]):.1e}",
                     "rel_err_state": f"{_rel(np.asarray(state), reference[1]):.1e}"})
        progress(str(rows[-1]))
    return rows


def sweep_tilings(N: int, bandwidth: float) -> list[dict]:
    """gdn Triton's decode kernel with each candidate tiling at N sequences, checked against the spec's."""
    import torch

    from gdn.common import contract, spec, tilings
    from gdn.triton import decode
    from gdn.triton.arrays import array_info, tensor_keys

    a = _inputs(N)
    t = {n: torch.from_numpy(x).cuda() for n, x in a.items()}
    for n in ("q", "k", "v"):
        t[n] = t[n].to(torch.bfloat16)
    args = [t[n] for n in ("q", "k", "v", "g", "beta", "state")]
    problem = contract.validate_decode_inputs(*(array_info(key) for key in tensor_keys(
        ("q", "k", "v", "g", "beta", "state"), args, op=spec.DECODE_OP)))
    reference = torch.empty_like(t["state"])
    o = torch.empty_like(t["v"])
    decode.launch(problem, problem.tiling, *args, o, reference, K**-0.5)
    floor_us = 2 * t["state"].numel() * 4 / bandwidth * 1e6
    rows = []
    for block_v, warps in TILING_CANDIDATES:
        tiling = tilings.Tiling(problem.tiling.block_k, block_v, warps, 1)
        new_state = torch.empty_like(t["state"])

        def call(tiling: tilings.Tiling = tiling, new_state: torch.Tensor = new_state) -> None:
            decode.launch(problem, tiling, *args, o, new_state, K**-0.5)

        call()
        us = harness.time_torch(call).median_us
        rows.append({"N": N, "BV": block_v, "warps": warps, "us": round(us, 2),
                     "pct_floor": round(100 * floor_us / us, 1), "spec": tiling == problem.tiling,
                     "rel_err_state_vs_spec": f"{_rel(new_state.cpu().numpy(), reference.cpu().numpy()):.1e}"})
        progress(str(rows[-1]))
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
    print(harness.format_header(harness.environment("benchmarks.decode")), flush=True)
    bandwidth, _ = harness.copy_bandwidth()
    progress(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    impls = args.impls.split(",")
    rows = [row for N in BATCHES for row in run_batch(N, impls, bandwidth)]
    print(harness.format_table(rows, [(c, c) for c in rows[0]]), flush=True)
    harness.write_csv(args.out / "decode.csv", rows)
    if not args.no_sweep:
        sweep = [row for N in BATCHES for row in sweep_tilings(N, bandwidth)]
        print(harness.format_table(sweep, [(c, c) for c in sweep[0]]), flush=True)
        harness.write_csv(args.out / "tune_decode.csv", sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
