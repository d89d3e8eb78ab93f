"""``python -m benchmarks.tune_forward``: chunk_gated_delta_rule's tilings, context-parallel pieces and walk kind
swept on one CUDA GPU: the measurements behind tilings.walk_tiling, tilings.context_pieces, tilings.FUSED_WALK
and tilings.prepare_tiling, and the forward's stage times.

    python -m benchmarks.tune_forward [--out DIR] [--only walk|fused|prepare|stages]

The dense shapes of benchmarks.shapes.SHAPES (bf16, K = V = 128, inputs from benchmarks.shapes.forward_inputs
without an initial state), final state on.
walk: at each shape, the whole forward (Triton) with every candidate walk tiling (V tile, warps, stages) in
1, 2, 4 and 8 pieces per sequence, device time by CUDA-graph replay (triton.testing.do_bench_cudagraph), each
output checked against the spec's choice (max |Δ| / max |ref| of o). fused: the same with the walk that
computes o itself (tilings.FUSED_WALK). prepare: the prepare kernel alone with each candidate tiling. stages:
the spec's forward split into its kernels (prepare, map walk + combine, walk, chunk_fwd_o). These call the
forward's kernels one by one (gdn.triton.forward), so they follow its design: a sweep whose functions this
version of gdn does not have says so and exits. Writes tune_walk.csv, tune_fused.csv, tune_prepare.csv and
forward_stages.csv (with .env.json and .txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton

from benchmarks import harness, shapes
from gdn.common import forward_contract, spec, tilings
from gdn.triton import forward
from gdn.triton.arrays import array_info, tensor_keys
from gdn.triton.chunk_o import launch as launch_chunk_o

K = V = 128
DEVICE = "cuda"
SHAPES = [shape for shape in shapes.SHAPES if shape.seqlens is None]
"""The forward benchmark's dense shapes; the walk and fused sweeps skip the first (B1 T512), prepare takes the
two after it."""
WALK_CANDIDATES = [tilings.Tiling(K, block_v, warps, stages)
                   for block_v, warps, stages in itertools.product(tilings.WALK_BLOCK_V, (4, 8), (2, 3))]
FUSED_CANDIDATES = [tilings.Tiling(K, block_v, 4, 2) for block_v in (32, 64)]
"""The fused walk's tilings (16-column tiles miscompile on Triton 3.6)."""
PREPARE_CANDIDATES = [tilings.Tiling(block, block, 4, 1, registers)
                      for block, registers in itertools.product((32, 64), (None, 168, 128))]
PIECES = (1, 2, 4, 8)


def forward_problem(shape: shapes.Shape) -> tuple[forward_contract.ForwardProblem, dict[str, torch.Tensor]]:
    """shape's validated forward problem and its inputs (no initial state), as the sweeps call the stages."""
    t = dict(shapes.forward_inputs(shape, seed=0), initial_state=None)
    names = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "chunk_indices")
    keys = tensor_keys(names, [t.get(n) for n in names], op=spec.FORWARD_OP)
    problem = forward_contract.validate_forward_inputs(*(None if key is None else array_info(key) for key in keys),
                                               output_final_state=True)
    return problem, t


def _graph_us(fn) -> float:
    """Device time of fn in µs: the median of CUDA-graph replays."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def walk_rows(shape: shapes.Shape, fused: bool = False) -> list[dict]:
    """The whole forward at shape with every walk candidate (of the fused walk with fused) in every piece
    count."""
    problem, t = forward_problem(shape)
    args = (t["q"], t["k"], t["v"], t["g"], t["beta"], K**-0.5, None, None, None)
    spec_pieces = problem.pieces(forward.multiprocessors(torch.device(DEVICE)))
    reference, _ = forward.forward(problem, *args, spec_pieces)
    rows = []
    for tiling, pieces in itertools.product(FUSED_CANDIDATES if fused else WALK_CANDIDATES, PIECES):
        if pieces > 1 and K > tilings.MAX_PIECE_K:
            continue
        try:
            o, _ = forward.forward(problem, *args, pieces, fused, walk_tiling=tiling)
            us = _graph_us(lambda: forward.forward(problem, *args, pieces, fused, walk_tiling=tiling))
        except Exception as failure:  # a tiling that does not compile (registers, shared memory) is reported
            harness.progress(f"walk {tiling} P{pieces}: failed: {type(failure).__name__}: {failure}"[:300])
            continue
        row = {"shape": shape.name, "label": shape.label, "fused": fused, "BV": tiling.block_v,
               "warps": tiling.num_warps, "stages": tiling.num_stages, "pieces": pieces, "us": round(us, 1),
               "rel_err_vs_spec": f"{_rel(o, reference):.1e}",
               "spec": tiling == problem.walk and pieces == spec_pieces and fused == tilings.FUSED_WALK}
        harness.progress("  ".join(f"{key}={value}" for key, value in row.items()))
        rows.append(row)
    return rows


def prepare_rows(shape: shapes.Shape) -> list[dict]:
    """The prepare kernel alone at shape with every candidate tiling."""
    problem, t = forward_problem(shape)
    k, v, g, beta = t["k"], t["v"], t["g"], t["beta"]
    reference = forward.prepare(problem, k, v, g, beta, None, None)[1]
    rows = []
    for tiling in PREPARE_CANDIDATES:
        try:
            w = forward.prepare(problem, k, v, g, beta, None, None, tiling)[1]
            us = _graph_us(lambda: forward.prepare(problem, k, v, g, beta, None, None, tiling))
        except Exception as failure:
            harness.progress(f"prepare {tiling}: failed: {type(failure).__name__}: {failure}"[:300])
            continue
        row = {"shape": shape.name, "label": shape.label, "BK": tiling.block_k, "warps": tiling.num_warps,
               "maxnreg": tiling.max_registers,
               "stages": tiling.num_stages, "us": round(us, 1), "rel_err_vs_spec": f"{_rel(w, reference):.1e}",
               "spec": tiling == problem.prepare}
        harness.progress("  ".join(f"{key}={value}" for key, value in row.items()))
        rows.append(row)
    return rows


def stage_row(shape: shapes.Shape) -> dict:
    """µs of each kernel of the spec's forward at shape, and of the whole call."""
    problem, t = forward_problem(shape)
    q, k, v, g, beta = (t[n] for n in ("q", "k", "v", "g", "beta"))
    pieces = problem.pieces(forward.multiprocessors(torch.device(DEVICE)))
    g_cum, w, u = forward.prepare(problem, k, v, g, beta, None, None)
    starts = forward.piece_starts(problem, k, w, u, g_cum, None, None, pieces) if pieces > 1 else None
    _, _, h, v_new = forward.walk(problem, None, k, w, u, g_cum, starts, None, K**-0.5, pieces, store_h=True)
    chunk_o = problem.chunk_o()
    o = torch.empty_like(v)
    row = {"shape": shape.name, "label": shape.label, "pieces": pieces,
           "total_us": round(_graph_us(lambda: forward.forward(problem, q, k, v, g, beta, K**-0.5, None, None, None,
                                                               pieces)), 1),
           "prepare_us": round(_graph_us(lambda: forward.prepare(problem, k, v, g, beta, None, None)), 1),
           "piece_starts_us": 0.0 if pieces == 1 else round(
               _graph_us(lambda: forward.piece_starts(problem, k, w, u, g_cum, None, None, pieces)), 1),
           "walk_us": round(_graph_us(lambda: forward.walk(problem, None, k, w, u, g_cum, starts, None, K**-0.5, pieces,
                                                           store_h=True)), 1),
           "chunk_fwd_o_us": round(_graph_us(lambda: launch_chunk_o(chunk_o, chunk_o.tiling, q, k, v_new, h, g_cum, o,
                                                                    K**-0.5, None, None)), 1)}
    harness.progress(str(row))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", choices=("walk", "fused", "prepare", "stages"), help="one sweep only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = harness.environment("benchmarks.tune_forward")
    print(harness.format_header(env), flush=True)
    sweeps = {
        "stages": ("forward_stages", lambda: [stage_row(shape) for shape in SHAPES]),
        "walk": ("tune_walk", lambda: [row for shape in SHAPES[1:] for row in walk_rows(shape)]),
        "fused": ("tune_fused", lambda: [row for shape in SHAPES[1:] for row in walk_rows(shape, fused=True)]),
        "prepare": ("tune_prepare", lambda: [row for shape in SHAPES[1:3] for row in prepare_rows(shape)]),
    }
    for name, (result, run) in sweeps.items():
        if args.only not in (None, name):
            continue
        try:
            rows = run()
        except AttributeError as error:
            parser.exit(1, f"python -m benchmarks.tune_forward: this version of gdn's forward has no such step "
                           f"({error}); the {name} sweep measured the steps it was written for\n")
        report = harness.format_table(rows, [(c, c) for c in rows[0]])
        print(report, flush=True)
        harness.write_results(args.out, result, env, rows, report=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
