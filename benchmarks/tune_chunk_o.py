"""``python -m benchmarks.tune_chunk_o``: the chunk_fwd_o tiling sweep on one CUDA GPU, the measurement behind
tilings.chunk_o_tiling.

Times the gdn Triton kernel with each candidate tiling (BK, BV, warps, stages) at the bf16 shapes of
benchmarks.shapes.SHAPES (and the fp32 candidates at fp32 B1 T8192 H16), triton.testing.do_bench median with L2
flushed; each candidate's output is compared with the spec tiling's. Writes tune_chunk_o.csv (with .env.json and
.txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import harness, shapes
from gdn.common import tilings

Tiling = tilings.Tiling
BF16_CANDIDATES = [
    Tiling(64, 128, 4, 2), Tiling(64, 128, 4, 3), Tiling(32, 128, 4, 3), Tiling(32, 128, 4, 4),
    Tiling(64, 128, 8, 2), Tiling(128, 128, 4, 1), Tiling(128, 128, 8, 1), Tiling(64, 64, 4, 3),
    Tiling(128, 64, 4, 1), Tiling(128, 32, 4, 1),
]
FP32_CANDIDATES = [Tiling(64, 128, 4, 2), Tiling(32, 128, 4, 2), Tiling(32, 64, 4, 2), Tiling(64, 64, 4, 2),
                   Tiling(32, 128, 8, 2), Tiling(16, 128, 4, 3)]


def sweep(shape: shapes.Shape, candidates: list[Tiling], bandwidth: float) -> list[dict[str, Any]]:
    """Every candidate tiling at one shape; the spec tiling's output is the check for the others."""
    import torch

    from gdn.triton import chunk_o

    t = shapes.chunk_o_inputs(shape, seed=0)
    args = (t["q"], t["k"], t["v"], t["h"], t["g"])
    problem = chunk_o.call_plan(*args, t["cu_seqlens"], t["chunk_indices"])[0]
    scale = problem.K ** -0.5
    floor_us = shape.chunk_o_bytes() / bandwidth * 1e6
    reference = torch.empty_like(t["v"])
    chunk_o.launch(problem, problem.tiling, *args, reference, scale, t["cu_seqlens"], t["chunk_indices"])
    rows = []
    for tiling in candidates:
        o = torch.empty_like(t["v"])
        try:
            def call(tiling: Tiling = tiling, o: torch.Tensor = o) -> None:
                chunk_o.launch(problem, tiling, *args, o, scale, t["cu_seqlens"], t["chunk_indices"])

            call()
            max_diff = (o.float() - reference.float()).abs().max().item()
            us = harness.time_torch(call).median_us
        except Exception as error:  # noqa: BLE001 - a tiling that does not compile (shared memory) is a line
            harness.progress(f"{shape.name} {tiling}: failed: {type(error).__name__}: {error}"[:300])
            continue
        rows.append({"shape": shape.name, "label": shape.label, "BK": tiling.block_k, "BV": tiling.block_v,
                     "warps": tiling.num_warps, "stages": tiling.num_stages, "us": us, "floor_us": floor_us,
                     "pct_floor": 100 * floor_us / us, "spec": tiling == problem.tiling,
                     "max_diff_vs_spec": max_diff})
        harness.progress(f"{shape.name} {tiling}: {us:.1f} µs ({rows[-1]['pct_floor']:.0f} % of the floor)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_chunk_o", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    env = harness.environment("benchmarks.tune_chunk_o")
    print(harness.format_header(env), flush=True)
    bandwidth, _ = harness.copy_bandwidth()
    env["copy bandwidth"] = f"{bandwidth / 1e12:.3f} TB/s"
    rows = [row for shape in shapes.SHAPES for row in sweep(shape, BF16_CANDIDATES, bandwidth)]
    rows += sweep(shapes.select(shapes.DTYPE_SHAPES, "fp32-*")[0], FP32_CANDIDATES, bandwidth)
    report = harness.format_table(
        [dict(r, us_s=f"{r['us']:.1f}", pct=f"{r['pct_floor']:.0f}") for r in rows],
        [("label", "shape"), ("BK", "BK"), ("BV", "BV"), ("warps", "warps"), ("stages", "stages"), ("us_s", "µs"),
         ("pct", "% floor"), ("spec", "spec")])
    print(report, flush=True)
    harness.write_results(args.out, "tune_chunk_o", env, rows, report=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
