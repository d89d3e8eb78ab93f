"""Sweep chunk_gated_delta_rule's stage tilings on the GPU, and time its stages: the measurements behind
tilings.prepare_tiling / tilings.state_tiling and the stage table of benchmarks/RESULTS.md.

    python -m benchmarks.tune_forward [--out DIR] [--stages-only | --state-batches | --pipeline]

bf16, K = V = 128, unit-norm q/k rows, log-sigmoid gates, sigmoid beta (gdn.common.example). For each shape:
the stage breakdown with the spec's tilings (prepare, states, chunk_fwd_o, and the whole call), then, at
B1 T8192 H16, every candidate tiling of prepare and of states, checked against the spec tiling's output
(max |Δ| / max |ref| of w, u or h, final state) and timed with triton.testing.do_bench (median, L2 flushed).
--state-batches instead times the states kernel with each V-tile width of tilings.STATE_BLOCK_V (4 warps, 3
stages) at batches from N·HV = 16 to 1024 walks: the sweep behind tilings.state_tiling's size class.
--pipeline instead times the forward of one sequence in one pass against the pipeline of segments on CUDA
streams, called from Python and in a CUDA graph: the measurement behind tilings.pipeline_segment_chunks.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton

from benchmarks import harness
from gdn.common import contract, example, spec, tilings
from gdn.triton import chunk_gated_delta_rule, chunk_o, forward
from gdn.triton.arrays import array_info, tensor_keys

SHAPES = [(1, 512, 16, 16), (1, 8192, 16, 16), (1, 65536, 16, 16), (8, 2048, 16, 32), (1, 8192, 2, 8)]
SWEEP_SHAPE = (1, 8192, 16, 16)
STATE_BATCH_SHAPES = [(1, 8192, 16, 16), (2, 4096, 16, 16), (4, 4096, 16, 16), (8, 2048, 16, 16), (8, 2048, 16, 32),
                      (64, 1024, 16, 16)]
K = V = 128
DEVICE = "cuda"
STATE_CANDIDATES = [tilings.Tiling(K, bv, warps, stages)
                    for bv, warps, stages in itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 3))]
PREPARE_CANDIDATES = [tilings.prepare_tiling(K, V, "bfloat16"), tilings.Tiling(64, 64, 4, 1),
                      tilings.Tiling(64, 64, 8, 1), tilings.Tiling(64, 64, 8, 1, 128), tilings.Tiling(128, 128, 4, 1),
                      tilings.Tiling(64, 64, 4, 2), tilings.Tiling(32, 32, 4, 1)]


def _inputs(B: int, T: int, H: int, HV: int) -> tuple[contract.ForwardProblem, dict[str, torch.Tensor]]:
    a = example.random_recurrent_inputs(B, T, H, HV, K, V, "bfloat16", seed=0)
    t = {n: torch.from_numpy(x).to(DEVICE) for n, x in a.items() if n != "initial_state"}
    for n in ("q", "k", "v"):
        t[n] = t[n].to(torch.bfloat16)
    names = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "chunk_indices")
    keys = tensor_keys(names, [t.get(n) for n in names])
    problem = contract.validate_forward_inputs(*(None if key is None else array_info(key) for key in keys),
                                           output_final_state=True)
    return problem, t


def _median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def stage_breakdown(B: int, T: int, H: int, HV: int) -> dict:
    """µs of each stage with the spec's tilings, and of the whole call."""
    problem, t = _inputs(B, T, H, HV)
    q, k, v, g, beta = (t[n] for n in ("q", "k", "v", "g", "beta"))
    g_cum, w, u = forward.prepare(problem, k, v, g, beta, None, None)
    h, v_new, _ = forward.states(problem, k, w, u, g_cum, None, None)
    o = torch.empty_like(v)
    stage_o = problem.chunk_o()
    return {
        "shape": f"B{B}-T{T}-H{H}-HV{HV}",
        "total_us": round(_median_us(lambda: chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)), 1),
        "prepare_us": round(_median_us(lambda: forward.prepare(problem, k, v, g, beta, None, None)), 1),
        "states_us": round(_median_us(lambda: forward.states(problem, k, w, u, g_cum, None, None)), 1),
        "chunk_fwd_o_us": round(_median_us(lambda: chunk_o.launch(stage_o, stage_o.tiling, q, k, v_new, h, g_cum,
                                                                  o, K**-0.5, None, None)), 1),
    }


def sweep(stage: str, candidates: list[tilings.Tiling], shape: tuple[int, int, int, int] = SWEEP_SHAPE) -> list[dict]:
    """Time one stage with every candidate tiling at shape (B, T, H, HV); outputs checked against the spec
    tiling's."""
    problem, t = _inputs(*shape)
    k, v, g, beta = (t[n] for n in ("k", "v", "g", "beta"))
    g_cum, w, u = forward.prepare(problem, k, v, g, beta, None, None)
    if stage == "prepare":
        def run(tiling: tilings.Tiling | None):
            return forward.prepare(problem, k, v, g, beta, None, None, tiling)[1:]  # w, u
    else:
        def run(tiling: tilings.Tiling | None):
            h, _, final_state = forward.states(problem, k, w, u, g_cum, None, None, tiling)
            return h, final_state
    reference = run(None)
    rows = []
    for tiling in candidates:
        try:
            error = max(_rel(x, ref) for x, ref in zip(run(tiling), reference))
            us = _median_us(lambda: run(tiling))
        except Exception as failure:  # a tiling that does not compile (registers, shared memory) is reported
            harness.progress(f"{stage} {tiling}: failed: {type(failure).__name__}: {failure}"[:300])
            continue
        row = {"shape": "B{}-T{}-H{}-HV{}".format(*shape), "stage": stage, "BK": tiling.block_k,
               "BV": tiling.block_v, "warps": tiling.num_warps,
               "stages": tiling.num_stages, "maxnreg": tiling.max_registers, "us": round(us, 1),
               "rel_err_vs_spec": f"{error:.1e}",
               "spec": tiling == (problem.prepare if stage == "prepare" else problem.state)}
        harness.progress("  ".join(f"{key}={value}" for key, value in row.items()))
        rows.append(row)
    return rows


PIPELINE_SHAPES = [(1, 8192, 16, 16), (1, 8192, 2, 8), (1, 16384, 2, 8), (1, 65536, 16, 16)]


def pipeline_rows() -> list[dict]:
    """The measurement behind tilings.pipeline_segment_chunks: the forward of one sequence in one pass against the
    pipeline of segments (the spec's length where it pipelines, else PIPELINE_MIN_SEGMENT_CHUNKS), do_bench µs
    called from Python and replayed from a CUDA graph (no host time), outputs compared bit for bit."""
    rows = []
    for shape in PIPELINE_SHAPES:
        problem, t = _inputs(*shape)
        args = (t["q"], t["k"], t["v"], t["g"], t["beta"], spec.default_scale(K), None)
        segment_chunks = problem.segment_chunks or tilings.PIPELINE_MIN_SEGMENT_CHUNKS
        runs = {"one pass": lambda: forward.pipelined(problem, problem.chunks_per_row, *args),
                "pipelined": lambda: forward.pipelined(problem, segment_chunks, *args)}
        outputs = {name: run() for name, run in runs.items()}
        row = {"shape": "B{}-T{}-H{}-HV{}".format(*shape), "segment_chunks": segment_chunks,
               "spec_pipelines": problem.segment_chunks is not None,
               "bit_equal": all(torch.equal(x, y) for x, y in zip(*outputs.values()))}
        for name, run in runs.items():
            row[f"{name} µs"] = round(_median_us(run), 1)
            row[f"{name} graph µs"] = round(_median_us(_graphed(run).replay), 1)
        harness.progress("  ".join(f"{key}={value}" for key, value in row.items()))
        rows.append(row)
    return rows


def _graphed(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph (after two warm-up calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stages-only", action="store_true", help="the stage breakdown, no tiling sweeps")
    mode.add_argument("--state-batches", action="store_true", help="only the states V-tile sweep over batches")
    mode.add_argument("--pipeline", action="store_true", help="only one pass against the pipelined forward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = harness.environment("benchmarks.tune_forward")
    print(harness.format_header(env), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pipeline:
        rows = pipeline_rows()
        print(harness.format_table(rows, [(c, c) for c in rows[0]]), flush=True)
        harness.write_csv(args.out / "forward_pipeline.csv", rows)
        return 0
    if args.state_batches:
        candidates = [tilings.Tiling(K, width, 4, 3) for width in tilings.STATE_BLOCK_V]
        rows = [row for shape in STATE_BATCH_SHAPES for row in sweep("states", candidates, shape)]
        print(harness.format_table(rows, [(c, c) for c in rows[0]]), flush=True)
        harness.write_csv(args.out / "state_tiling_sweep.csv", rows)
        return 0
    stages = []
    for shape in SHAPES:
        stages.append(stage_breakdown(*shape))
        harness.progress(str(stages[-1]))
    print(harness.format_table(stages, [(c, c) for c in stages[0]]), flush=True)
    harness.write_csv(args.out / "forward_stages.csv", stages)
    if not args.stages_only:
        rows = sweep("prepare", PREPARE_CANDIDATES) + sweep("states", STATE_CANDIDATES)
        print(harness.format_table(rows, [(c, c) for c in rows[0]]), flush=True)
        harness.write_csv(args.out / "tune_forward.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
