"""``python -m benchmarks.distributed``: the context-parallel forward over 2 GPUs of one host against 1 GPU.

One dense sequence (default B1 T131072 H16 HV32 K = V = 128 bf16, with an initial state and the final state;
inputs from benchmarks.shapes.forward_inputs, the same values on every rank, JAX's through DLPack):
  torch   gdn.triton.chunk_gated_delta_rule on the whole sequence on 1 GPU, and with group= over 2 GPUs: one
          process per GPU, each its half of the sequence, NCCL. This script launches the 2 ranks torchrun-style
          (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; env:// rendezvous); under torchrun itself,
          ``torchrun --nproc-per-node 2 -m benchmarks.distributed --role torch-rank`` runs the same ranks.
  jax     gdn.pallas.chunk_gated_delta_rule's Pallas kernels (lowering="triton") under jax.jit on 1 device, and in
          one process over 2 devices inside jax.shard_map(check_vma=False) with axis_name, the sequence axis
          sharded over a 1-D mesh.
Measured: the median time per call with its 10th–90th percentiles (torch: CUDA events around each call after a
barrier, the slower rank's time; JAX: wall time per call, 10 pipelined calls per block_until_ready), the
speed-up of 2 GPUs over 1, and the exchange — all-gather of the maps and the combine,
gdn.{triton,pallas}.distributed.exchange, timed alone (same sizes, after a barrier) — as a share of the 2-GPU
call. Correctness: o and the final state of the 2-GPU call against the 1-GPU call, max|Δ| / max|1-GPU|.
Every process it starts has NVLink multicast off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1. Results: results/distributed.csv, .env.json and .txt (benchmarks.report renders them).

--smoke runs the script end to end on a CPU in a few minutes (a small problem; torch: gloo ranks with
interpreted Triton, host timers; JAX: 2 host devices, Pallas interpreter): a check of the script before a GPU
run, its times meaningless, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness, shapes
from benchmarks.harness import fmt, progress
from gdn.common import example, forward_contract, spec

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WORLD_SIZE = 2
SEED = 0


def bounds(shape: shapes.Shape, rank: int) -> tuple[int, int]:
    """The tokens [start, end) of rank's slice: WORLD_SIZE contiguous slices, the sequence in rank order."""
    return shape.T * rank // WORLD_SIZE, shape.T * (rank + 1) // WORLD_SIZE


def local_problem(shape: shapes.Shape, rank: int) -> forward_contract.ForwardProblem:
    """The forward's problem of rank's slice as the public call validates it: the exchange's sizes."""
    start, end = bounds(shape, rank)
    return forward_contract.ForwardProblem(B=1, T=end - start, H=shape.H, HV=shape.HV, K=shape.K, V=shape.V, N=1,
                                   chunks_per_row=spec.num_chunks(end - start), varlen=False, dtype=shape.dtype,
                                   use_initial_state=True, output_final_state=False)


def forward_inputs(shape: shapes.Shape) -> dict[str, Any]:
    """The whole sequence as torch tensors, the same on every rank (one seed): benchmarks.shapes.forward_inputs
    on the current GPU; with --smoke on a CPU, gdn.common.example's (the same distributions)."""
    import torch

    if torch.cuda.is_available():
        return shapes.forward_inputs(shape, SEED)
    arrays = example.random_recurrent_inputs(1, shape.T, shape.H, shape.HV, shape.K, shape.V, shape.dtype, SEED)
    return {n: torch.from_numpy(x).to(getattr(torch, shape.dtype) if n in ("q", "k", "v") else torch.float32)
            for n, x in arrays.items()}


def relative_error(x, reference) -> float:
    """max|x − reference| / max|reference| of two float32 torch tensors or jax arrays, on their device."""
    return float(abs(x - reference).max()) / max(float(abs(reference).max()), 1e-30)


def result_row(impl: str, shape: shapes.Shape, one: harness.Timing, two: harness.Timing,
               exchange: harness.Timing, error_o: float, error_state: float) -> dict[str, Any]:
    return {
        "impl": impl, "shape": shape.name, "label": shape.label, "gpus_1_ms": one.median_us / 1e3,
        "gpus_1_p10_ms": one.p10_us / 1e3, "gpus_1_p90_ms": one.p90_us / 1e3, "gpus_2_ms": two.median_us / 1e3,
        "gpus_2_p10_ms": two.p10_us / 1e3, "gpus_2_p90_ms": two.p90_us / 1e3,
        "speedup": one.median_us / two.median_us, "exchange_us": exchange.median_us,
        "exchange_share_pct": 100 * exchange.median_us / two.median_us, "error_o": error_o,
        "error_state": error_state, "method": two.method,
    }


# ------------------------------------------------------------------------------------------------- torch

def time_ranks(call, group, device, reps: int, warmup: int = 3) -> harness.Timing:
    """CUDA events around each call (host timers on a CPU), every call after a barrier of the ranks; per call
    the slowest rank's time (an all-reduce of the samples), so a context-parallel call counts until its last
    rank is done."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        call()
    samples = []
    for _ in range(reps):
        dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            begin = time.perf_counter()
            call()
            samples.append((time.perf_counter() - begin) * 1e6)
    slowest = torch.tensor(samples, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    method = "CUDA events" if device.type == "cuda" else "host timer (CPU)"
    return harness.Timing.from_samples(slowest.tolist(), f"{method} after a barrier, slowest rank")


def torch_rank(shape: shapes.Shape, reps: int, result_file: Path | None) -> None:
    """One NCCL rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment): the 1-GPU call
    on the whole sequence (every rank, on its own GPU), the context-parallel call on its slice, the exchange."""
    import torch
    import torch.distributed as dist

    from gdn.triton import chunk_gated_delta_rule, distributed

    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:  # --smoke
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    group = dist.group.WORLD
    torch.set_grad_enabled(False)
    a = forward_inputs(shape)
    start, end = bounds(shape, rank)
    piece = {n: a[n][:, start:end].contiguous() for n in ("q", "k", "v", "g", "beta")}

    def one_gpu():
        return chunk_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], initial_state=a["initial_state"],
                                      output_final_state=True)

    def two_gpus():
        return chunk_gated_delta_rule(piece["q"], piece["k"], piece["v"], piece["g"], piece["beta"],
                                      initial_state=a["initial_state"], output_final_state=True, group=group)

    progress(f"rank {rank}: correctness")
    o_one, state_one = one_gpu()
    o_two, state_two = two_gpus()
    errors = torch.tensor([relative_error(o_two.float(), o_one[:, start:end].float()),
                           relative_error(state_two, state_one)], device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=group)
    del o_one, state_one, o_two, state_two
    progress(f"rank {rank}: timing 1 GPU, 2 GPUs, the exchange")
    one = time_ranks(one_gpu, group, device, reps)
    two = time_ranks(two_gpus, group, device, reps)
    local = local_problem(shape, rank)
    map_m = torch.randn((1, shape.HV, shape.K, shape.K), device=device) * 0.01
    map_n = torch.randn((1, shape.HV, shape.K, shape.V), device=device)
    exchange = time_ranks(lambda: distributed.exchange(local, map_m, map_n, a["initial_state"], group), group,
                          device, reps)
    if rank == 0 and result_file is not None:
        result_file.write_text(json.dumps(result_row(f"gdn-triton ({dist.get_backend(group)})", shape, one, two,
                                                     exchange, *errors.tolist())))
    dist.destroy_process_group()


def run_torch(shape: shapes.Shape, reps: int, workdir: Path, smoke_env: dict[str, str]) -> dict[str, Any]:
    """Launch WORLD_SIZE ranks of this script (one per GPU) and return rank 0's row."""
    with socket.socket() as probe:  # a free port for the env:// rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result_file = workdir / "torch.json"
    ranks = []
    for rank in range(WORLD_SIZE):
        env = {**os.environ, **smoke_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, "-m", "benchmarks.distributed", "--role", "torch-rank",
                                       *shape_arguments(shape, reps), "--result-file", str(result_file)],
                                      env=env))
    codes = [process.wait() for process in ranks]
    if any(codes):
        raise RuntimeError(f"torch ranks exited with {codes}")
    return json.loads(result_file.read_text())


# --------------------------------------------------------------------------------------------------- JAX

def jax_process(shape: shapes.Shape, reps: int, result_file: Path) -> None:
    """One process, 2 devices: the 1-device call, the shard_map call over a 1-D mesh of both, the exchange."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gdn.pallas import chunk_gated_delta_rule, distributed

    devices = jax.devices()[:WORLD_SIZE]
    if len(devices) < WORLD_SIZE:
        raise RuntimeError(f"needs {WORLD_SIZE} devices; JAX sees {jax.devices()}")
    a = forward_inputs(shape)
    a = shapes.to_jax(a) if jax.default_backend() == "gpu" else {n: jnp.asarray(x.numpy()) for n, x in a.items()}
    names = ("q", "k", "v", "g", "beta", "initial_state")
    mesh = jax.make_mesh((WORLD_SIZE,), ("seq",), devices=devices)
    specs = (P(None, "seq"),) * 5 + (P(),)
    sharded = [jax.device_put(a[n], NamedSharding(mesh, spec)) for n, spec in zip(names, specs)]

    def call(q, k, v, g, beta, initial_state, axis_name=None):
        # the Pallas kernels on 1 device too: those the axis_name path runs (the 1-device default on a CUDA GPU is
        # triton_call)
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                                      axis_name=axis_name, lowering="triton")

    one_device = jax.jit(call)
    two_devices = jax.jit(jax.shard_map(lambda *args: call(*args, axis_name="seq"), mesh=mesh, in_specs=specs,
                                        out_specs=(P(None, "seq"), P()), check_vma=False))
    progress("jax: correctness")
    o_one, state_one = one_device(*(a[n] for n in names))
    o_two, state_two = two_devices(*sharded)
    error_o = relative_error(o_two.astype(jnp.float32), o_one.astype(jnp.float32))
    error_state = relative_error(state_two, state_one)
    del o_one, state_one, o_two, state_two
    progress("jax: timing 1 device, 2 devices, the exchange")
    one = harness.time_jax(one_device, [tuple(a[n] for n in names)], runs=reps, batch=10)
    two = harness.time_jax(two_devices, [tuple(sharded)], runs=reps, batch=10)
    local = local_problem(shape, 0)
    key_m, key_n = jax.random.split(jax.random.key(SEED))
    HV, K, V = shape.HV, shape.K, shape.V
    maps = (jax.device_put(jax.random.normal(key_m, (WORLD_SIZE, HV, K, K)) * 0.01, NamedSharding(mesh, P("seq"))),
            jax.device_put(jax.random.normal(key_n, (WORLD_SIZE, HV, K, V)), NamedSharding(mesh, P("seq"))))
    interpret = jax.default_backend() != "gpu"  # --smoke
    exchange = jax.jit(jax.shard_map(
        lambda m, n, s0: distributed.exchange(local, m, n, s0, "seq", interpret=interpret), mesh=mesh,
        in_specs=(P("seq"), P("seq"), P()), out_specs=P(), check_vma=False))
    exchange_time = harness.time_jax(exchange, [(*maps, sharded[-1])], runs=reps, batch=10)
    result_file.write_text(json.dumps(result_row("gdn-pallas (shard_map)", shape, one, two, exchange_time,
                                                 error_o, error_state)))


def run_jax(shape: shapes.Shape, reps: int, workdir: Path, smoke_env: dict[str, str]) -> dict[str, Any]:
    result_file = workdir / "jax.json"
    subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--role", "jax",
                    *shape_arguments(shape, reps), "--result-file", str(result_file)],
                   env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **smoke_env}, check=True)
    return json.loads(result_file.read_text())


# ---------------------------------------------------------------------------------------------- command

def shape_arguments(shape: shapes.Shape, reps: int) -> list[str]:
    return ["--T", str(shape.T), "--H", str(shape.H), "--HV", str(shape.HV), "--K", str(shape.K),
            "--V", str(shape.V), "--dtype", shape.dtype, "--reps", str(reps)]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=131072, help="tokens of the sequence (default 131072)")
    parser.add_argument("--H", type=int, default=16, help="q/k heads (default 16)")
    parser.add_argument("--HV", type=int, default=32, help="value heads (default 32)")
    parser.add_argument("--K", type=int, default=128, help="key head size (default 128)")
    parser.add_argument("--V", type=int, default=128, help="value head size (default 128)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--backends", default="torch,jax", help="comma-separated: torch, jax (default both)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per measurement (default 20)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="the script end to end on a CPU, a small problem")
    parser.add_argument("--role", choices=("torch-rank", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


COLUMNS = [("impl", "implementation"), ("label", "problem"), ("gpus_1", "1 GPU ms (p10–p90)"),
           ("gpus_2", "2 GPUs ms (p10–p90)"), ("speedup_x", "speed-up"), ("exchange", "exchange µs"),
           ("share", "exchange share"), ("errors", "max|Δ|/max|ref| o, state")]


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "gpus_1": f"{row['gpus_1_ms']:.2f} ({row['gpus_1_p10_ms']:.2f}–{row['gpus_1_p90_ms']:.2f})",
            "gpus_2": f"{row['gpus_2_ms']:.2f} ({row['gpus_2_p10_ms']:.2f}–{row['gpus_2_p90_ms']:.2f})",
            "speedup_x": f"{row['speedup']:.2f}x", "exchange": fmt(row["exchange_us"]),
            "share": f"{row['exchange_share_pct']:.2f} %",
            "errors": f"{row['error_o']:.2g}, {row['error_state']:.2g}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    os.environ.update(MULTICAST_OFF)  # before torch, NCCL or XLA start, here and in every process launched
    shape = shapes.Shape(1, args.T, args.H, args.HV, args.K, args.V, args.dtype)
    smoke_env = {}
    if args.smoke:
        shape, args.reps = shapes.Shape(1, 2 * (64 + 37), 1, 2, 32, 32, "float32"), 2
        smoke_env = {"TRITON_INTERPRET": "1", "XLA_FLAGS": f"--xla_force_host_platform_device_count={WORLD_SIZE}"}
    if args.role == "torch-rank":
        torch_rank(shape, args.reps, args.result_file)
        return 0
    if args.role == "jax":
        jax_process(shape, args.reps, args.result_file)
        return 0
    env = {**harness.environment("benchmarks.distributed", cuda=False), **MULTICAST_OFF}
    print(harness.format_header(env), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backends.split(","):
            progress(f"{backend}: {shape.label}, 1 GPU and {WORLD_SIZE} GPUs")
            rows.append((run_torch if backend == "torch" else run_jax)(shape, args.reps, Path(workdir), smoke_env))
    table = harness.format_table([table_row(row) for row in rows], COLUMNS)
    print(table, flush=True)
    if not args.smoke:
        harness.write_results(args.out, "distributed", env, rows, report=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
