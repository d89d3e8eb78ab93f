"""``python -m gdn``: chunk_fwd_o (or, with ``--op forward``, the whole chunk_gated_delta_rule forward) on a
realistic varlen batch in every available backend.

Prints shapes, device, the max error of each backend against the float64 reference (for the forward: the
token-by-token recurrence, o and the final state), the difference between backends, and the time per call.
Compiled on a GPU; through the Triton interpreter and Pallas interpret mode on a CPU-only machine, where the
default example is small.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Callable

import numpy as np

_INPUT_DTYPE_ARRAYS = ("q", "k", "v", "h")
"""The arrays converted to --dtype; the others keep their own (float32 gates and beta, int32 cu_seqlens)."""

GPU_SEQLENS = "4000,1,777,2048,63,1200,0,3000"
CPU_SEQLENS = "100,1,37,0,70"


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _parse(argv: list[str] | None, on_gpu: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gdn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["chunk_fwd_o", "forward"], default="chunk_fwd_o",
                        help="forward: chunk_gated_delta_rule from raw q, k, v, g, beta (no gate flag)")
    parser.add_argument("--backend", choices=["all", "triton", "pallas"], default="all")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--seqlens", default=GPU_SEQLENS if on_gpu else CPU_SEQLENS,
                        help="comma-separated sequence lengths packed varlen (B = 1)")
    parser.add_argument("--batch", type=int, default=0,
                        help="B > 0: a dense [B, T] batch of T = first of --seqlens instead of varlen")
    parser.add_argument("--heads", type=int, default=16 if on_gpu else 2, help="H, query/key heads")
    parser.add_argument("--value-heads", type=int, default=32 if on_gpu else 4, help="HV, a multiple of H")
    parser.add_argument("--head-k", type=int, default=128 if on_gpu else 48, help="K")
    parser.add_argument("--head-v", type=int, default=128 if on_gpu else 32, help="V")
    parser.add_argument("--no-gate", action="store_true", help="g = None")
    parser.add_argument("--repeats", type=int, default=50 if on_gpu else 2, help="timed calls per backend")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _time_per_call(call: Callable[[], object], sync: Callable[[object], None], repeats: int) -> float:
    """Median wall time of one call in seconds, each call synchronized (after one warm-up call)."""
    sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _run_triton(inputs: dict, dtype: str, repeats: int, op: str) -> tuple[list[np.ndarray], str, float]:
    import torch

    from gdn.triton import chunk_fwd_o, chunk_gated_delta_rule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {name: getattr(torch, dtype) if name in _INPUT_DTYPE_ARRAYS else None for name in inputs}
    args = {name: None if x is None else torch.from_numpy(x).to(device, dtypes[name]) for name, x in inputs.items()}

    def call() -> list[torch.Tensor]:
        if op == "forward":
            return list(chunk_gated_delta_rule(args["q"], args["k"], args["v"], args["g"], args["beta"],
                                               output_final_state=True, cu_seqlens=args["cu_seqlens"]))
        return [chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], cu_seqlens=args["cu_seqlens"])]

    def sync(_: object) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = _time_per_call(call, sync, repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)"
    return [x.float().cpu().numpy() for x in call()], name, seconds


def _run_pallas(inputs: dict, dtype: str, repeats: int, op: str) -> tuple[list[np.ndarray], str, float]:
    import jax
    import jax.numpy as jnp

    from gdn.common import spec
    from gdn.pallas import chunk_fwd_o, chunk_gated_delta_rule

    dtypes = {name: dtype if name in _INPUT_DTYPE_ARRAYS else None for name in inputs}
    args = {name: None if x is None else jnp.asarray(x, dtype=dtypes[name]) for name, x in inputs.items()}
    cu = inputs["cu_seqlens"]
    chunk_indices = None if cu is None else jnp.asarray(spec.prepare_chunk_indices(cu))
    if op == "forward":
        fn = jax.jit(lambda q, k, v, g, beta, cu, ci: chunk_gated_delta_rule(
            q, k, v, g, beta, output_final_state=True, cu_seqlens=cu, chunk_indices=ci))
        operands = [args[name] for name in ("q", "k", "v", "g", "beta")]
    else:
        fn = jax.jit(lambda q, k, v, h, g, cu, ci: (chunk_fwd_o(q, k, v, h, g, None, cu, ci),))
        operands = [args[name] for name in ("q", "k", "v", "h", "g")]

    def call() -> tuple[jax.Array, ...]:
        return fn(*operands, args["cu_seqlens"], chunk_indices)

    seconds = _time_per_call(call, jax.block_until_ready, repeats)
    device = jax.devices()[0]
    name = device.device_kind if device.platform == "gpu" else "cpu (Pallas interpret mode)"
    return [np.asarray(x.astype(jnp.float32)) for x in call()], name, seconds


def main(argv: list[str] | None = None) -> int:
    on_gpu = _has_cuda()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = _parse(argv, on_gpu)

    from gdn.common import example, reference, spec

    seqlens = [int(n) for n in args.seqlens.split(",")]
    if args.batch > 0:
        B, T, cu_seqlens = args.batch, seqlens[0], None
    else:
        B, T, cu_seqlens = 1, sum(seqlens), np.cumsum([0] + seqlens).astype(np.int32)
    H, HV, K, V = args.heads, args.value_heads, args.head_k, args.head_v
    layout = f"varlen seqlens={seqlens}" if cu_seqlens is not None else f"B={B} T={T}"
    if args.op == "forward":
        inputs = example.random_recurrent_inputs(B, T, H, HV, K, V, args.dtype, args.seed)
        del inputs["initial_state"]
        inputs["cu_seqlens"] = cu_seqlens
        print(f"gdn chunk_gated_delta_rule  {layout}  H={H} HV={HV} K={K} V={V}  dtype={args.dtype}  "
              f"CHUNK_SIZE={spec.CHUNK_SIZE}")
    else:
        inputs = example.random_inputs(B, T, H, HV, K, V, args.dtype, not args.no_gate, cu_seqlens, args.seed)
        print(f"gdn chunk_fwd_o  {layout}  H={H} HV={HV} K={K} V={V}  dtype={args.dtype}  "
              f"gated={not args.no_gate}  CHUNK_SIZE={spec.CHUNK_SIZE}")
    for name, x in inputs.items():
        if x is not None:
            print(f"  {name:<10} {list(x.shape)}")
    print("  computing the float64 reference ...", flush=True)
    if args.op == "forward":
        refs = list(reference.recurrent_gated_delta_rule(
            inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], output_final_state=True,
            cu_seqlens=cu_seqlens))
        names = ["o", "final_state"]
    else:
        refs = [reference.chunk_fwd_o(inputs["q"], inputs["k"], inputs["v"], inputs["h"], inputs["g"],
                                      cu_seqlens=cu_seqlens)]
        names = ["o"]
    for name, ref in zip(names, refs):
        print(f"  {name:<10} {list(ref.shape)}  max |{name}_ref| = {np.abs(ref).max():.3g}")

    runners = {"triton": _run_triton, "pallas": _run_pallas}
    chosen = list(runners) if args.backend == "all" else [args.backend]
    outputs: dict[str, list[np.ndarray]] = {}
    for name in chosen:
        if name == "triton" and args.dtype == "bfloat16" and not on_gpu:
            print(f"{name:>7}: skipped: the Triton CPU interpreter cannot run bf16 dots (use --dtype float32)")
            continue
        print(f"{name:>7}: running ...", flush=True)
        try:
            outs, device, seconds = runners[name](inputs, args.dtype, args.repeats, args.op)
        except ImportError as error:
            print(f"{name:>7}: skipped: {error}")
            continue
        outputs[name] = outs
        errors = "  ".join(f"{what} max abs err {np.abs(out - ref).max():.3g} "
                           f"(rel {np.abs(out - ref).max() / np.abs(ref).max():.3g})"
                           for what, out, ref in zip(names, outs, refs))
        finite = all(bool(np.isfinite(out).all()) for out in outs)
        print(f"{name:>7}: device {device}  {errors}  nan-free {finite}  {seconds * 1e6:.1f} µs/call")
    if len(outputs) == 2:
        diffs = "  ".join(f"{what} max abs diff {np.abs(a - b).max():.3g} "
                          f"(rel {np.abs(a - b).max() / np.abs(ref).max():.3g})"
                          for what, a, b, ref in zip(names, outputs["triton"], outputs["pallas"], refs))
        print(f"triton vs pallas: {diffs}")
    return 0 if outputs else 1


if __name__ == "__main__":
    sys.exit(main())
