"""``python -m benchmarks.decode``: decode_step (one token per sequence) on one CUDA GPU against FLA and the
memory floor, at benchmarks.shapes.DECODE_BATCHES sequences of Qwen3-Next's heads (H16 HV32 K = V = 128), and
the tiling sweep behind tilings.decode_tiling.

Implementations (a peer that is not installed is a "not installed" row):
  gdn-triton   gdn.triton.decode_step (torch)
  gdn-pallas   gdn.pallas.decode_step, called as users call it (the op jits itself)
  fla          fla-core 0.6 fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule with T = 1 (natural-log g,
               state [N, HV, K, V] float32, as gdn's)

A decode step reads and writes the float32 state (2·N·HV·K·V·4 bytes) and little else, so the floor is that
over the bandwidth of a device-to-device copy measured in the same run. Inputs: benchmarks.shapes.decode_inputs
(bf16 unit-norm q, k rows, v ~ N(0, 1), log-sigmoid gates, sigmoid beta, state ~ N(0, 1)); every implementation
is checked against gdn-triton (o and the new state, max |Δ| / max |ref|) before it is timed. torch rows:
triton.testing.do_bench median (L2 flushed); JAX rows: 10 calls per block_until_ready.
The sweep times the gdn Triton kernel with each candidate tiling (BV, warps) at every N.

``--serving``: decode from a state pool, in place (benchmarks.shapes.decode_serving_inputs) — N = 256 sequences
from a 1024-row pool at the same heads, bf16 inputs, fp32 states — one token per sequence (state_indices [N];
floor: reading and writing the 256 states once) and a 4-token speculative step keeping every token's state in
its slot (state_indices [N, 4], num_accepted_tokens; floor: reading 256 states and writing 4 × 256), each with
g, beta and with vLLM's fused path (raw q, k normalized in the kernel, raw gates a, b). Implementations:
gdn-triton eager, gdn-triton replaying a CUDA graph of the same call (its bits compared with the eager call's:
graph_bits_equal), gdn-pallas under jax.jit with the pool donated, and for one token with g, beta FLA's
fused_recurrent on the gathered states with the new states scattered back (what an engine without pools does).
Every row is checked against gdn-triton eager (o and the pool rows written). The prefill rows run
chunk_gated_delta_rule over PREFILL_POOL's packed sequences reading and writing their pool rows
(state_indices) against the same prefill from dense initial states (its time is the row's floor): what the pool
costs the forward (torch: CUDA-graph replay; JAX: jitted, the pool donated, 10 calls per sync).

Writes decode.csv and tune_decode.csv, or with --serving decode_serving.csv (each with .env.json and .txt) for
benchmarks.report.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness, shapes
from benchmarks.harness import progress

TILING_CANDIDATES = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4)]
"""(block_v, num_warps) of the sweep; block_k is always the whole K."""
ARGS = ("q", "k", "v", "g", "beta", "state")
PREFILL_POOL = {"N": 16, "tokens": 1024}
"""The prefill-from-a-pool rows: N sequences of `tokens` tokens each at DECODE_HEADS, from DECODE_POOL's pool."""


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def calls(N: int, impls: list[str]) -> dict[str, tuple[str, Callable[[], Any]]]:
    """(framework, call) of each available implementation at N sequences; a missing peer is skipped with a line."""
    from gdn.triton import decode_step

    t = shapes.decode_inputs(N, seed=N)
    found: dict[str, tuple[str, Callable[[], Any]]] = {
        "gdn-triton": ("torch", lambda: decode_step(*(t[n] for n in ARGS)))}
    if "fla" in impls:
        try:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            def fla_call() -> tuple[Any, Any]:
                o, state = fused_recurrent_gated_delta_rule(
                    t["q"][:, None], t["k"][:, None], t["v"][:, None], g=t["g"][:, None], beta=t["beta"][:, None],
                    initial_state=t["state"], output_final_state=True)
                return o[:, 0], state

            found["fla"] = ("torch", fla_call)
        except Exception as error:  # noqa: BLE001 - a peer that is not installed is a row
            progress(f"fla: not installed ({type(error).__name__}: {error})")
    if "gdn-pallas" in impls:
        try:
            from gdn.pallas import decode_step as pallas_decode_step

            j = shapes.to_jax(t)
            found["gdn-pallas"] = ("jax", lambda: pallas_decode_step(*(j[n] for n in ARGS)))
        except Exception as error:  # noqa: BLE001
            progress(f"gdn-pallas: not installed ({type(error).__name__}: {error})")
    return found


def run_batch(N: int, impls: list[str], bandwidth: float) -> list[dict[str, Any]]:
    floor_us = 2 * N * shapes.DECODE_HEADS["HV"] * shapes.DECODE_HEADS["K"] * shapes.DECODE_HEADS["V"] * 4 \
        / bandwidth * 1e6
    rows = []
    reference = None
    for name, (framework, call) in calls(N, impls).items():
        o, state = (harness.to_numpy(x) for x in call())
        reference = reference or (o, state)
        if framework == "torch":
            timing = harness.time_torch(call)
        else:
            timing = harness.time_jax(call, [()], batch=10)
        rows.append({"impl": name, "N": N, "us": timing.median_us, "p10_us": timing.p10_us, "p90_us": timing.p90_us,
                     "floor_us": floor_us, "pct_floor": 100 * floor_us / timing.median_us,
                     "rel_err_o": _rel(o, reference[0]), "rel_err_state": _rel(state, reference[1]),
                     "method": timing.method})
        progress(f"N={N} {name:<11} {timing.median_us:8.2f} µs ({rows[-1]['pct_floor']:.0f} % of the floor)")
    return rows


def sweep_tilings(N: int, bandwidth: float) -> list[dict[str, Any]]:
    """gdn Triton's decode kernel with each candidate tiling at N sequences, checked against the spec's."""
    import torch

    from gdn.common import tilings
    from gdn.triton import decode

    t = shapes.decode_inputs(N, seed=N)
    args = [t[n] for n in ARGS]
    problem = decode.call_plan(*args).problem
    scale = problem.K ** -0.5
    o = torch.empty_like(t["v"])
    reference = torch.empty_like(t["state"])
    decode.launch(problem, problem.tiling, *args, o, reference, scale)
    floor_us = 2 * t["state"].numel() * 4 / bandwidth * 1e6
    rows = []
    for block_v, warps in TILING_CANDIDATES:
        tiling = tilings.Tiling(problem.tiling.block_k, block_v, warps, 1)
        new_state = torch.empty_like(t["state"])

        def call(tiling: tilings.Tiling = tiling, new_state: torch.Tensor = new_state) -> None:
            decode.launch(problem, tiling, *args, o, new_state, scale)

        call()
        us = harness.time_torch(call).median_us
        rows.append({"N": N, "BV": block_v, "warps": warps, "us": us, "pct_floor": 100 * floor_us / us,
                     "spec": tiling == problem.tiling,
                     "rel_err_state_vs_spec": _rel(new_state.cpu().numpy(), reference.cpu().numpy())})
        progress(f"sweep N={N} BV={block_v} warps={warps}: {us:.2f} µs")
    return rows


SERVING_ARGS = ("q", "k", "v", "g", "beta", "state", "state_indices", "cu_seqlens", "num_accepted_tokens", "a", "b",
                "A_log", "dt_bias")
"""decode_step's arrays: the first six positional, the rest keywords."""
INPUT_DTYPE_ARRAYS = ("q", "k", "v", "a", "b")


def serving_rows(bandwidth: float, impls: list[str]) -> list[dict[str, Any]]:
    """The --serving table: one token and a SPEC_TOKENS-token speculative step from the pool, each with g, beta
    and fused (raw q, k and gates), for every implementation."""
    import torch

    from gdn.triton import decode_step

    heads = shapes.DECODE_HEADS
    N = shapes.DECODE_POOL["N"]
    rows = []
    for tokens in (1, shapes.SPEC_TOKENS):
        for fused in (False, True):
            a = shapes.decode_serving_inputs(tokens, fused)
            t = {n: torch.from_numpy(x).cuda() for n, x in a.items()}
            for n in INPUT_DTYPE_ARRAYS:
                if n in t:
                    t[n] = t[n].to(torch.bfloat16)
            flags = {"use_qk_l2norm_in_kernel": fused}
            floor_us = (N + N * tokens) * heads["HV"] * heads["K"] * heads["V"] * 4 / bandwidth * 1e6
            pool0 = t["state"].clone()
            written = torch.from_numpy(np.unique(a["state_indices"])).cuda().long()

            def gdn_call() -> tuple[Any, Any]:
                return decode_step(*(t.get(n) for n in SERVING_ARGS[:6]), **{n: t.get(n) for n in SERVING_ARGS[6:]},
                                   **flags)

            def result(o: Any, pool: Any) -> tuple[np.ndarray, np.ndarray]:
                """o and the pool rows the call writes, as float32 numpy."""
                return harness.to_numpy(o), harness.to_numpy(pool[written])

            t["state"].copy_(pool0)
            reference = result(*gdn_call())
            label = f"{'spec' + str(tokens) if tokens > 1 else 'decode'}-{'fused' if fused else 'g-beta'}"

            def row(impl: str, timing: harness.Timing, outputs: tuple[np.ndarray, np.ndarray],
                    graph_bits_equal: bool | None = None) -> dict[str, Any]:
                """The table row of an implementation at this case (the helpers above and this one are called
                within their iteration)."""
                return _serving_row(label, impl, N, tokens, timing, floor_us, outputs, reference, graph_bits_equal)

            rows.append(row("gdn-triton", harness.time_torch(gdn_call), reference))
            # a CUDA graph of the same call (its outputs: those of the captured call), its replay from the same pool
            # compared with the eager bits
            captured: list[tuple[Any, Any]] = []
            graph = harness.cuda_graph(lambda: captured.append(gdn_call()))
            t["state"].copy_(pool0)
            graph.replay()
            torch.cuda.synchronize()
            replayed = result(*captured[-1])
            bits = bool(np.array_equal(replayed[0], reference[0]) and np.array_equal(replayed[1], reference[1]))
            rows.append(row("gdn-triton-cuda-graph", harness.time_torch(graph.replay), replayed,
                            graph_bits_equal=bits))
            del graph
            if "gdn-pallas" in impls:
                rows.append(_pallas_serving_row(a, flags, row))
            if "fla" in impls and tokens == 1 and not fused:
                fla_row = _fla_gather_scatter_row(t, pool0, result, row)
                if fla_row is not None:
                    rows.append(fla_row)
    return rows


def _serving_row(case: str, impl: str, N: int, tokens: int, timing: harness.Timing, floor_us: float,
                 outputs: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                 graph_bits_equal: bool | None = None) -> dict[str, Any]:
    """A row of the --serving table: an implementation's time at a case against its floor, and its o and pool
    rows against the reference's."""
    out = {"case": case, "impl": impl, "N": N, "pool": shapes.DECODE_POOL["pool_rows"], "tokens": tokens,
           "us": timing.median_us, "p10_us": timing.p10_us, "p90_us": timing.p90_us, "floor_us": floor_us,
           "x_floor": timing.median_us / floor_us, "rel_err_o": _rel(outputs[0], reference[0]),
           "rel_err_pool": _rel(outputs[1], reference[1]), "method": timing.method,
           "graph_bits_equal": graph_bits_equal}
    progress(f"{case} {impl:<21} {timing.median_us:8.2f} µs ({out['x_floor']:.3f}× the floor)")
    return out


def prefill_pool_rows(impls: list[str]) -> list[dict[str, Any]]:
    """The forward reading and writing a pool against the same forward on dense states (the floor)."""
    import torch

    from gdn.triton import chunk_gated_delta_rule

    N, tokens, pool_rows = PREFILL_POOL["N"], PREFILL_POOL["tokens"], shapes.DECODE_POOL["pool_rows"]
    heads = shapes.DECODE_HEADS
    shape = shapes.Shape(1, N * tokens, heads["H"], heads["HV"], heads["K"], heads["V"], seqlens=(tokens,) * N)
    t = shapes.forward_inputs(shape, seed=3)
    rng = np.random.default_rng(3)
    pool0 = torch.from_numpy(rng.standard_normal((pool_rows, heads["HV"], heads["K"], heads["V"]),
                                                 dtype=np.float32)).cuda()
    rows_np = rng.choice(pool_rows, N, replace=False).astype(np.int32)
    rows = torch.from_numpy(rows_np).cuda()
    args = [t[n] for n in ("q", "k", "v", "g", "beta")]
    varlen = {"cu_seqlens": t["cu_seqlens"], "chunk_indices": t["chunk_indices"]}
    dense = pool0[rows.long()].clone()
    pool = pool0.clone()

    def dense_call() -> tuple[Any, Any]:
        return chunk_gated_delta_rule(*args, initial_state=dense, output_final_state=True, **varlen)

    def pool_call() -> tuple[Any, Any]:
        return chunk_gated_delta_rule(*args, initial_state=pool, output_final_state=True, state_indices=rows, **varlen)

    o_ref, state_ref = (harness.to_numpy(x) for x in dense_call())
    o, _ = pool_call()
    outputs = (harness.to_numpy(o), harness.to_numpy(pool[rows.long()]))
    floor = harness.time_torch_call(dense_call)[0]
    timing = harness.time_torch_call(pool_call)[0]

    def row(impl: str, timing: harness.Timing, floor_us: float, outputs: tuple[np.ndarray, np.ndarray]):
        return _serving_row("prefill-pool", impl, N, tokens, timing, floor_us, outputs, (o_ref, state_ref))

    found = [row("gdn-triton", timing, floor.median_us, outputs)]
    if "gdn-pallas" in impls:
        found.append(_pallas_prefill_pool_row(t, pool0, rows_np, row))
    return found


def _pallas_prefill_pool_row(t: dict[str, Any], pool0: Any, rows: np.ndarray,
                             row: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """gdn-pallas: the prefill on dense states and from the pool (donated, fed back call after call)."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule

    j = shapes.to_jax({n: t[n] for n in ("q", "k", "v", "g", "beta", "cu_seqlens", "chunk_indices")})
    inputs = [j[n] for n in ("q", "k", "v", "g", "beta")]
    varlen = {"cu_seqlens": j["cu_seqlens"], "chunk_indices": j["chunk_indices"]}
    pool_np = harness.to_numpy(pool0)
    dense = jnp.asarray(pool_np[rows])
    index = jnp.asarray(rows)

    @jax.jit
    def dense_call(state: Any) -> tuple[Any, Any]:
        # the Pallas kernels, which a pool call runs (the default on dense states is triton_call on a CUDA GPU)
        return chunk_gated_delta_rule(*inputs, initial_state=state, output_final_state=True, **varlen,
                                      lowering="triton")

    @functools.partial(jax.jit, donate_argnums=0)
    def pool_call(pool: Any) -> tuple[Any, Any]:
        return chunk_gated_delta_rule(*inputs, initial_state=pool, output_final_state=True, state_indices=index,
                                      **varlen)

    o, pool = pool_call(jnp.asarray(pool_np))
    outputs = (harness.to_numpy(o), harness.to_numpy(pool)[rows])
    pools = [pool]

    def call() -> Any:
        o, pools[0] = pool_call(pools[0])
        return o

    floor = harness.time_jax(dense_call, [(dense,)], batch=10)
    return row("gdn-pallas", harness.time_jax(call, [()], batch=10), floor.median_us, outputs)


def _pallas_serving_row(a: dict[str, np.ndarray], flags: dict[str, bool], row: Callable[..., dict[str, Any]],
                        ) -> dict[str, Any]:
    """gdn-pallas under jax.jit with the pool donated and fed back call after call (updated in place)."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import decode_step

    j = {n: jnp.asarray(x, "bfloat16" if n in INPUT_DTYPE_ARRAYS else None) for n, x in a.items()}
    names = [n for n in SERVING_ARGS if n in j]

    @functools.partial(jax.jit, donate_argnums=(names.index("state"),))
    def step(*arrays: Any) -> tuple[Any, Any]:
        args = dict(zip(names, arrays))
        return decode_step(*(args.get(n) for n in SERVING_ARGS[:6]), **{n: args.get(n) for n in SERVING_ARGS[6:]},
                           **flags)

    o, pool = step(*(jnp.asarray(a["state"]) if n == "state" else j[n] for n in names))  # on the pool as given
    outputs = (harness.to_numpy(o), harness.to_numpy(pool)[np.unique(a["state_indices"])])
    pools = [pool]  # the timed calls keep updating (and donating) one pool

    def call() -> Any:
        o, pools[0] = step(*(pools[0] if n == "state" else j[n] for n in names))
        return o

    return row("gdn-pallas", harness.time_jax(call, [()], batch=10), outputs)


def _fla_gather_scatter_row(t: dict[str, Any], pool0: Any, result: Callable[..., tuple[np.ndarray, np.ndarray]],
                            row: Callable[..., dict[str, Any]]) -> dict[str, Any] | None:
    """FLA's fused_recurrent on pool[state_indices] with the new states scattered back: two state copies more."""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    except Exception as error:  # noqa: BLE001 - an optional comparison
        progress(f"fla: not installed ({type(error).__name__}: {error})")
        return None
    index = t["state_indices"].long()

    def call() -> tuple[Any, Any]:
        o, state = fused_recurrent_gated_delta_rule(
            t["q"][:, None], t["k"][:, None], t["v"][:, None], g=t["g"][:, None], beta=t["beta"][:, None],
            initial_state=t["state"][index], output_final_state=True)
        t["state"][index] = state
        return o[:, 0], t["state"]

    t["state"].copy_(pool0)
    outputs = result(*call())
    return row("fla-gather-scatter", harness.time_torch(call), outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="gdn-triton,gdn-pallas,fla", help="comma-separated, of: "
                        "gdn-triton (always run: the reference), gdn-pallas, fla")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--serving", action="store_true", help="only the serving rows: in-place decode from a "
                        "state pool, the 4-token speculative step, CUDA-graph replay (decode_serving.csv)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = harness.environment("benchmarks.decode")
    print(harness.format_header(env), flush=True)
    bandwidth, _ = harness.copy_bandwidth()
    env["copy bandwidth"] = f"{bandwidth / 1e12:.3f} TB/s"
    progress(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    if args.serving:
        rows = serving_rows(bandwidth, args.impls.split(",")) + prefill_pool_rows(args.impls.split(","))
        report = harness.format_table(
            [dict(r, us_s=f"{r['us']:.2f}", floor=f"{r['floor_us']:.2f}", x=f"{r['x_floor']:.3f}",
                  eo=f"{r['rel_err_o']:.1e}", ep=f"{r['rel_err_pool']:.1e}") for r in rows],
            [("case", "case"), ("impl", "impl"), ("us_s", "µs"), ("floor", "floor µs"), ("x", "× floor"),
             ("eo", "rel err o"), ("ep", "rel err pool"), ("graph_bits_equal", "graph bits equal")])
        print(report, flush=True)
        harness.write_results(args.out, "decode_serving", env, rows, report=report)
        return 0
    rows = [row for N in shapes.DECODE_BATCHES for row in run_batch(N, args.impls.split(","), bandwidth)]
    report = harness.format_table(
        [dict(r, us_s=f"{r['us']:.2f}", pct=f"{r['pct_floor']:.0f}", eo=f"{r['rel_err_o']:.1e}",
              es=f"{r['rel_err_state']:.1e}") for r in rows],
        [("impl", "impl"), ("N", "N"), ("us_s", "µs"), ("pct", "% floor"), ("eo", "rel err o"),
         ("es", "rel err state")])
    print(report, flush=True)
    harness.write_results(args.out, "decode", env, rows, report=report)
    if not args.no_sweep:
        sweep = [row for N in shapes.DECODE_BATCHES for row in sweep_tilings(N, bandwidth)]
        report = harness.format_table(
            [dict(r, us_s=f"{r['us']:.2f}", pct=f"{r['pct_floor']:.0f}") for r in sweep],
            [("N", "N"), ("BV", "BV"), ("warps", "warps"), ("us_s", "µs"), ("pct", "% floor"), ("spec", "spec")])
        print(report, flush=True)
        harness.write_results(args.out, "tune_decode", env, sweep, report=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
