"""``python -m gdn``: chunk_fwd_o (or, with ``--op forward``, the whole chunk_gated_delta_rule forward; with
``--op decode``, a speculative decode step from a state pool) on a realistic varlen batch in every available
backend.

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

_INPUT_DTYPE_ARRAYS = ("q", "k", "v", "h", "a", "b")
"""The arrays converted to --dtype; the others keep their own (float32 gates and beta, int32 indices)."""

GPU_SEQLENS = "4000,1,777,2048,63,1200,0,3000"
CPU_SEQLENS = "100,1,37,0,70"
GPU_DECODE_SEQLENS = ",".join(["4", "1", "3", "2"] * 16)
CPU_DECODE_SEQLENS = "4,1,3,2"
"""--op decode: tokens per sequence of the speculative step (at most 4: the state slots per sequence)."""
DECODE_ARRAYS = ("q", "k", "v", "g", "beta", "state", "state_indices", "cu_seqlens", "num_accepted_tokens", "a",
                 "b", "A_log", "dt_bias")


def _has_gpu() -> bool:
    """Whether the installed framework sees a CUDA GPU: torch's view when torch is installed, else JAX's."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        return torch.cuda.is_available()
    if importlib.util.find_spec("jax") is not None:
        import jax

        return jax.default_backend() == "gpu"
    return False


def _parse(argv: list[str] | None, on_gpu: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gdn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["chunk_fwd_o", "forward", "decode"], default="chunk_fwd_o",
                        help="forward: chunk_gated_delta_rule from raw q, k, v, g, beta (no gate flag); decode: "
                        "decode_step from a state pool, the tokens of --seqlens per sequence, each token's state "
                        "in its own slot, q/k normalized and the gates computed in the kernel")
    parser.add_argument("--backend", choices=["all", "triton", "pallas"], default="all")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--seqlens", default=None, help="comma-separated sequence lengths packed varlen (B = 1); "
                        f"default {GPU_SEQLENS if on_gpu else CPU_SEQLENS}, for --op decode "
                        f"{'16 x 4,1,3,2' if on_gpu else CPU_DECODE_SEQLENS}")
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

    from gdn.triton import chunk_fwd_o, chunk_gated_delta_rule, decode_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {name: getattr(torch, dtype) if name in _INPUT_DTYPE_ARRAYS else None for name in inputs}
    args = {name: None if x is None else torch.from_numpy(x).to(device, dtypes[name]) for name, x in inputs.items()}

    def decode(state: torch.Tensor) -> list[torch.Tensor]:
        """decode_step on a pool, updated in place."""
        named = {**args, "state": state}
        return list(decode_step(*(named[n] for n in DECODE_ARRAYS[:6]), **{n: named[n] for n in DECODE_ARRAYS[6:]},
                                use_qk_l2norm_in_kernel=True))

    def call() -> list[torch.Tensor]:
        if op == "decode":  # the timed calls keep updating one copy of the pool
            return decode(working_pool)
        if op == "forward":
            return list(chunk_gated_delta_rule(args["q"], args["k"], args["v"], args["g"], args["beta"],
                                               output_final_state=True, cu_seqlens=args["cu_seqlens"]))
        return [chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], cu_seqlens=args["cu_seqlens"])]

    def sync(_: object) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)"
    if op == "decode":  # the outputs of one call on the pool as given
        outputs = [x.float().cpu().numpy() for x in decode(args["state"].clone())]
        working_pool = args["state"].clone()
        return outputs, name, _time_per_call(call, sync, repeats)
    seconds = _time_per_call(call, sync, repeats)
    return [x.float().cpu().numpy() for x in call()], name, seconds


def _run_pallas(inputs: dict, dtype: str, repeats: int, op: str) -> tuple[list[np.ndarray], str, float]:
    import jax
    import jax.numpy as jnp

    from gdn.common import spec
    from gdn.pallas import chunk_fwd_o, chunk_gated_delta_rule, decode_step

    dtypes = {name: dtype if name in _INPUT_DTYPE_ARRAYS else None for name in inputs}
    args = {name: None if x is None else jnp.asarray(x, dtype=dtypes[name]) for name, x in inputs.items()}
    cu = inputs["cu_seqlens"]
    chunk_indices = None if cu is None or op == "decode" else jnp.asarray(spec.prepare_chunk_indices(cu))
    if op == "decode":
        def step(*arrays):
            named = dict(zip(DECODE_ARRAYS, arrays))
            return decode_step(*(named[n] for n in DECODE_ARRAYS[:6]), **{n: named[n] for n in DECODE_ARRAYS[6:]},
                               use_qk_l2norm_in_kernel=True)

        fn = jax.jit(step, donate_argnums=DECODE_ARRAYS.index("state"))  # the pool updated in place

        def run(pool):
            return fn(*(pool if n == "state" else args.get(n) for n in DECODE_ARRAYS))

        outputs, name, _ = _time_and_fetch(lambda: run(jnp.array(args["state"])), 0)  # on the pool as given
        pool = [jnp.array(args["state"])]  # the timed calls keep updating one copy of the pool

        def decode():
            o, pool[0] = run(pool[0])
            return o

        return outputs, name, _time_per_call(decode, jax.block_until_ready, repeats)
    if op == "forward":
        fn = jax.jit(lambda q, k, v, g, beta, cu, ci: chunk_gated_delta_rule(
            q, k, v, g, beta, output_final_state=True, cu_seqlens=cu, chunk_indices=ci))
        operands = [args[name] for name in ("q", "k", "v", "g", "beta")]
    else:
        fn = jax.jit(lambda q, k, v, h, g, cu, ci: (chunk_fwd_o(q, k, v, h, g, None, cu, ci),))
        operands = [args[name] for name in ("q", "k", "v", "h", "g")]

    def call() -> tuple[jax.Array, ...]:
        return fn(*operands, args["cu_seqlens"], chunk_indices)

    return _time_and_fetch(call, repeats)


def _time_and_fetch(call: Callable[[], tuple], repeats: int) -> tuple[list[np.ndarray], str, float]:
    """A jitted JAX call's outputs as float32 numpy, the device's name and the time per call (0 when repeats
    is 0: one call, untimed)."""
    import jax
    import jax.numpy as jnp

    seconds = _time_per_call(call, jax.block_until_ready, repeats) if repeats else 0.0
    device = jax.devices()[0]
    name = device.device_kind if device.platform == "gpu" else "cpu (Pallas interpret mode)"
    return [np.asarray(x.astype(jnp.float32)) for x in call()], name, seconds


def _decode_inputs(seqlens: list[int], H: int, HV: int, K: int, V: int, dtype: str, seed: int) -> dict:
    """A speculative decode step's arguments: raw q, k and gates for the packed tokens of seqlens, a pool with
    4 slots per sequence and a few spare rows, each sequence continuing from a random accepted token."""
    from gdn.common import example

    slots = 4
    if max(seqlens) > slots:
        raise SystemExit(f"--op decode: at most {slots} tokens per sequence (one state slot each); got {max(seqlens)}")
    N, rng = len(seqlens), np.random.default_rng(seed + 1)
    inputs = example.random_decode_inputs(sum(seqlens), H, HV, K, V, dtype, seed, raw_qk=True, raw_gates=True)
    rows = slots * N + 8
    inputs.update(g=None, beta=None, state=rng.standard_normal((rows, HV, K, V)).astype(np.float32),
                  state_indices=rng.permutation(rows)[:N * slots].reshape(N, slots).astype(np.int32),
                  cu_seqlens=np.cumsum([0] + seqlens).astype(np.int32),
                  num_accepted_tokens=rng.integers(1, slots + 1, N).astype(np.int32))
    return inputs


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts its backend
    on_gpu = _has_gpu()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    args = _parse(argv, on_gpu)

    from gdn.common import example, reference, spec

    default_seqlens = {True: GPU_DECODE_SEQLENS, False: CPU_DECODE_SEQLENS} if args.op == "decode" else \
        {True: GPU_SEQLENS, False: CPU_SEQLENS}
    seqlens = [int(n) for n in (args.seqlens or default_seqlens[on_gpu]).split(",")]
    if args.batch > 0:
        B, T, cu_seqlens = args.batch, seqlens[0], None
    else:
        B, T, cu_seqlens = 1, sum(seqlens), np.cumsum([0] + seqlens).astype(np.int32)
    H, HV, K, V = args.heads, args.value_heads, args.head_k, args.head_v
    layout = f"varlen seqlens={seqlens}" if cu_seqlens is not None else f"B={B} T={T}"
    if args.op == "decode":
        inputs = _decode_inputs(seqlens, H, HV, K, V, args.dtype, args.seed)
        print(f"gdn decode_step  {len(seqlens)} sequences of {seqlens[:8]}{'...' if len(seqlens) > 8 else ''} "
              f"tokens from a pool of {inputs['state'].shape[0]} states, a slot per token  H={H} HV={HV} K={K} V={V}"
              f"  dtype={args.dtype}  raw q/k and gates (in-kernel norm and gating)")
    elif args.op == "forward":
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
    if args.op == "decode":
        refs = list(reference.decode_step(*(inputs[n] for n in DECODE_ARRAYS[:6]),
                                          **{n: inputs[n] for n in DECODE_ARRAYS[6:]}, use_qk_l2norm_in_kernel=True))
        names = ["o", "pool"]
    elif args.op == "forward":
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
            importlib.import_module(f"gdn.{name}")  # without its framework: an ImportError naming the extra
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
