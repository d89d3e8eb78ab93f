"""``python -m gdn``: chunk_fwd_o on a realistic varlen batch in every available backend.

Prints shapes, device, the max error of each backend against the float64 reference, the difference
between backends, and the time per call. Compiled on a GPU; through the Triton interpreter and Pallas
interpret mode on a CPU-only machine, where the default example is small.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Callable

import numpy as np

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


def _run_triton(inputs: dict, dtype: str, repeats: int) -> tuple[np.ndarray, str, float]:
    import torch

    from gdn.triton import chunk_fwd_o

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = {name: torch.from_numpy(inputs[name]).to(device, getattr(torch, dtype)) for name in "qkvh"}
    args["g"] = None if inputs["g"] is None else torch.from_numpy(inputs["g"]).to(device)
    cu = None if inputs["cu_seqlens"] is None else torch.from_numpy(inputs["cu_seqlens"]).to(device)

    def call() -> torch.Tensor:
        return chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], cu_seqlens=cu)

    def sync(_: object) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = _time_per_call(call, sync, repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)"
    return call().float().cpu().numpy(), name, seconds


def _run_pallas(inputs: dict, dtype: str, repeats: int) -> tuple[np.ndarray, str, float]:
    import jax
    import jax.numpy as jnp

    from gdn.common import spec
    from gdn.pallas import chunk_fwd_o

    args = {name: jnp.asarray(inputs[name], dtype=dtype) for name in "qkvh"}
    g = None if inputs["g"] is None else jnp.asarray(inputs["g"])
    cu = inputs["cu_seqlens"]
    chunk_indices = None if cu is None else jnp.asarray(spec.prepare_chunk_indices(cu))
    cu = None if cu is None else jnp.asarray(cu)
    fn = jax.jit(chunk_fwd_o)

    def call() -> jax.Array:
        return fn(args["q"], args["k"], args["v"], args["h"], g, None, cu, chunk_indices)

    seconds = _time_per_call(call, lambda out: out.block_until_ready(), repeats)
    device = jax.devices()[0]
    name = device.device_kind if device.platform == "gpu" else "cpu (Pallas interpret mode)"
    return np.asarray(call().astype(jnp.float32)), name, seconds


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
        B, T, cu_seqlens = 1, sum(seqlens), np.cumsum([0] + seqlens)
    H, HV, K, V = args.heads, args.value_heads, args.head_k, args.head_v
    inputs = example.random_inputs(B, T, H, HV, K, V, args.dtype, not args.no_gate, cu_seqlens, args.seed)
    layout = f"varlen seqlens={seqlens}" if cu_seqlens is not None else f"B={B} T={T}"
    print(f"gdn chunk_fwd_o  {layout}  H={H} HV={HV} K={K} V={V}  dtype={args.dtype}  "
          f"gated={not args.no_gate}  CHUNK_SIZE={spec.CHUNK_SIZE}")
    for name in ("q", "k", "v", "h", "g", "cu_seqlens"):
        if inputs[name] is not None:
            print(f"  {name:<10} {list(inputs[name].shape)}")
    print("  computing the float64 reference ...", flush=True)
    ref = reference.chunk_fwd_o(inputs["q"], inputs["k"], inputs["v"], inputs["h"], inputs["g"],
                                cu_seqlens=cu_seqlens)
    print(f"  o          {list(ref.shape)}  max |o_ref| = {np.abs(ref).max():.3g}")

    runners = {"triton": _run_triton, "pallas": _run_pallas}
    chosen = list(runners) if args.backend == "all" else [args.backend]
    outputs: dict[str, np.ndarray] = {}
    for name in chosen:
        if name == "triton" and args.dtype == "bfloat16" and not on_gpu:
            print(f"{name:>7}: skipped: the Triton CPU interpreter cannot run bf16 dots (use --dtype float32)")
            continue
        print(f"{name:>7}: running ...", flush=True)
        try:
            out, device, seconds = runners[name](inputs, args.dtype, args.repeats)
        except ImportError as error:
            print(f"{name:>7}: skipped: {error}")
            continue
        outputs[name] = out
        err = np.abs(out - ref).max()
        print(f"{name:>7}: device {device}  max abs err {err:.3g}  (rel {err / np.abs(ref).max():.3g})  "
              f"nan-free {bool(np.isfinite(out).all())}  {seconds * 1e6:.1f} µs/call")
    if len(outputs) == 2:
        diff = np.abs(outputs["triton"] - outputs["pallas"]).max()
        print(f"triton vs pallas: max abs diff {diff:.3g}  (rel {diff / np.abs(ref).max():.3g})")
    return 0 if outputs else 1


if __name__ == "__main__":
    sys.exit(main())
