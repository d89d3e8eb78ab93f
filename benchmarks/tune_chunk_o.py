"""Sweep chunk_fwd_o tilings on the GPU: the measurement behind the static table in gdn/common/spec.py.

    python -m benchmarks.tune_chunk_o [--out DIR]

Times the gdn Triton kernel with each candidate tiling (BK, BV, warps, stages) at bf16 K = V = 128 on the
issue's shapes, cold L2 (triton.testing.do_bench flushes it), median; prints µs and % of the copy floor.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
import triton

from gdn.common import example, tilings
from gdn.triton import chunk_o

Tiling = tilings.Tiling
BF16_SHAPES = [(1, 512, 16, 16), (1, 8192, 16, 16), (1, 65536, 16, 16), (8, 2048, 16, 32), (1, 8192, 2, 8)]
BF16_CANDIDATES = [
    Tiling(64, 128, 4, 2), Tiling(64, 128, 4, 3), Tiling(32, 128, 4, 3), Tiling(32, 128, 4, 4),
    Tiling(64, 128, 8, 2), Tiling(128, 128, 4, 1), Tiling(64, 64, 4, 3),
]
FP32_CANDIDATES = [Tiling(64, 128, 4, 2), Tiling(32, 128, 4, 2), Tiling(32, 64, 4, 2), Tiling(64, 64, 4, 2),
                   Tiling(32, 128, 8, 2), Tiling(16, 128, 4, 3)]
SWEEPS = [("bfloat16", BF16_SHAPES[:2] + BF16_SHAPES[3:], BF16_CANDIDATES),
          ("float32", [(1, 8192, 16, 16)], FP32_CANDIDATES)]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def sweep(dtype: str, B: int, T: int, H: int, HV: int, candidates: list[tilings.Tiling],
          bandwidth: float) -> list[dict]:
    """Time every candidate tiling at one shape; the default tiling's output is the check for the others."""
    K = V = 128
    arrays = example.random_inputs(B, T, H, HV, K, V, dtype, True, None, seed=0)
    t = {n: torch.from_numpy(a).cuda() for n, a in arrays.items() if a is not None}
    q, k, v, h = (t[n].to(getattr(torch, dtype)) for n in "qkvh")
    g = t["g"]
    problem = chunk_o.call_plan(q, k, v, h, g)[0]
    moved = sum(x.numel() * x.element_size() for x in (q, k, v, h, g)) + v.numel() * v.element_size()
    floor_us = moved / bandwidth * 1e6
    reference = torch.empty_like(v)
    chunk_o.launch(problem, problem.tiling, q, k, v, h, g, reference, K**-0.5, None, None)
    rows = []
    for tiling in candidates:
        o = torch.empty_like(v)
        try:
            fn = lambda: chunk_o.launch(problem, tiling, q, k, v, h, g, o, K**-0.5, None, None)  # noqa: E731
            fn()
            max_diff = (o.float() - reference.float()).abs().max().item()
            us = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
        except Exception as error:  # a tiling that does not compile (shared memory) is reported, not fatal
            print(f"{dtype} B{B}-T{T}-H{H}-HV{HV} {tiling}: failed: {type(error).__name__}: {error}"[:300])
            continue
        row = {"dtype": dtype, "shape": f"B{B}-T{T}-H{H}-HV{HV}", "BK": tiling.block_k, "BV": tiling.block_v,
               "warps": tiling.num_warps, "stages": tiling.num_stages, "us": round(us, 2),
               "floor_us": round(floor_us, 2), "pct_floor": round(100 * floor_us / us, 1),
               "max_diff_vs_default": max_diff}
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    rows = []
    for dtype, shapes, candidates in SWEEPS:
        for B, T, H, HV in shapes:
            rows += sweep(dtype, B, T, H, HV, candidates, bandwidth)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_chunk_o.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
