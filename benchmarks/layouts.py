"""``python -m benchmarks.layouts``: what the input layout costs gdn.triton.chunk_fwd_o on one CUDA GPU.

Layouts of q, k, v (h and g dense; the layout rule is gdn.common.checks.row_strides):
  dense    each its own contiguous tensor (benchmarks.shapes.chunk_o_inputs)
  fused    column slices of one [B, T, 2·H·K + HV·V] projection, read in place at their strides
  copied   head-transposed views ([B, T, K, H] storage seen as [B, T, H, K]), which no kernel reads in place:
           copied once with .contiguous() inside the call
At the dense bf16 shapes of benchmarks.shapes (--shapes selects), with the same values in every layout (each
output is checked bit for bit against the dense one): device time (the call captured in a CUDA graph and
replayed under triton.testing.do_bench, L2 flushed), wall time (do_bench of the Python call) and host µs per
call (back-to-back calls, no sync); then the three .contiguous() copies of the copied layout alone against the
copy-bandwidth floor of their bytes (read and written once).

Writes layouts.csv (with .env.json and .txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import harness, shapes
from benchmarks.harness import fmt, progress

DEFAULT_SHAPES = "B1-T512-H16-HV16,B1-T8192-H16-HV32,B8-T2048-H16-HV32"
"""A short prefill (host time dominates), a long one and a batch, grouped heads in the long ones."""


def layouts(t: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    """q, k, v of chunk_o_inputs t in each layout, with the same values."""
    import torch

    q, k, v = t["q"], t["k"], t["v"]
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    fused = torch.cat([q.reshape(B, T, H * K), k.reshape(B, T, H * K), v.reshape(B, T, HV * V)], dim=-1)
    views = (fused[..., :H * K].view(B, T, H, K), fused[..., H * K:2 * H * K].view(B, T, H, K),
             fused[..., 2 * H * K:].view(B, T, HV, V))
    copied = tuple(x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    return {"dense": (q, k, v), "fused": views, "copied": copied}


def layout_row(shape: shapes.Shape, layout: str, device: harness.Timing | None, wall: harness.Timing | None,
               host_us: float | None = None, floor_us: float | None = None, note: str = "") -> dict[str, Any]:
    """One row of layouts.csv (what benchmarks.report reads)."""
    return {"shape": shape.name, "label": shape.label, "layout": layout,
            "device_us": device and device.median_us, "device_p10_us": device and device.p10_us,
            "device_p90_us": device and device.p90_us, "wall_us": wall and wall.median_us, "host_us": host_us,
            "floor_us": floor_us, "note": note}


def run_shape(shape: shapes.Shape, bandwidth: float) -> list[dict[str, Any]]:
    import torch

    from gdn.triton import chunk_fwd_o

    t = shapes.chunk_o_inputs(shape, seed=2000)
    h, g = t["h"], t["g"]
    arranged = layouts(t)
    reference = chunk_fwd_o(*arranged["dense"], h, g)
    rows = []
    for name, (q, k, v) in arranged.items():
        def call(q=q, k=k, v=v):
            return chunk_fwd_o(q, k, v, h, g)

        equal = torch.equal(call(), reference)
        with torch.no_grad():
            device, wall, note = harness.time_torch_call(call)
            host_us = harness.host_time_per_call(call, torch.cuda.synchronize, calls=300)
        rows.append(layout_row(shape, name, device, wall, host_us,
                               note="; ".join(n for n in (note, "" if equal else "output differs from dense") if n)))
        progress(f"{shape.name} {name}: device {fmt(device and device.median_us)} µs, wall {fmt(wall.median_us)} µs, "
                 f"host {fmt(host_us)} µs")
    q, k, v = arranged["copied"]
    copy_bytes = 2 * sum(x.numel() * x.element_size() for x in (q, k, v))
    copies = harness.time_torch(lambda: (q.contiguous(), k.contiguous(), v.contiguous()))
    rows.append(layout_row(shape, "the 3 copies alone", copies, None, floor_us=copy_bytes / bandwidth * 1e6))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layouts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated fnmatch patterns of "
                        "benchmarks.shapes names (dense shapes; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    selected = shapes.select(shapes.SHAPES, args.shapes)
    env = harness.environment("benchmarks.layouts")
    print(harness.format_header(env), flush=True)
    bandwidth = harness.gpu_run(env, {})
    if bandwidth is None:
        return 1
    rows = [row for shape in selected if shape.seqlens is None for row in run_shape(shape, bandwidth)]
    report = harness.format_table(
        [dict(r, device=fmt(r["device_us"]), wall=fmt(r["wall_us"]), host=fmt(r["host_us"]),
              floor=fmt(r["floor_us"])) for r in rows],
        [("label", "shape"), ("layout", "layout"), ("device", "device µs"), ("wall", "wall µs"),
         ("host", "host µs"), ("floor", "copy floor µs"), ("note", "note")])
    print(report, flush=True)
    harness.write_results(args.out, "layouts", env, rows, report=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
