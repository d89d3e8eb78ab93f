"""``python -m benchmarks.warmup``: the cold-start cost of chunk_fwd_o's compile policy against the policies gdn
does not use, each policy from cold.

Every policy runs in a fresh subprocess with a fresh, empty TRITON_CACHE_DIR (JAX: no persistent compilation
cache), so no in-process JIT state and no on-disk kernel or autotune cache survives from another policy.
Problem: B=1, H=HV=16, K=V=128, bf16, gated, dense (not varlen); inputs from gdn.common.example (same seed
in every process).

Policies:
  gdn           gdn.triton.chunk_fwd_o: BT = CHUNK_SIZE always, static tiling. Warmed once, at T = CHUNK_SIZE.
  gdn-pallas    gdn.pallas.chunk_fwd_o, first call at T = CHUNK_SIZE (trace + lower + compile + run). JAX
                specializes on shapes: every new T is a new compilation, counted and timed too.
  fla           fla-core 0.6 fla.ops.common.chunk_o.chunk_fwd_o (g·log2(e)), first call at T = CHUNK_SIZE
                (compile + autotune of its configs), when installed.
  pow2-autotune and pow2-static measure a policy gdn does not use, for comparison (this benchmark is why it
  is not used): a tile height that follows T, BT = min(CHUNK_SIZE, max(16, next_pow2(T))), with
    pow2-autotune  a runtime autotuner over fla-core 0.6's chunk_fwd_o configs for NVIDIA non-Blackwell GPUs,
                   (BK, BV, warps, stages) = (128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 2, 3), keyed like FLA's
                   on (H, HV, K, V, BT) and the tensors' dtypes, timings cached on disk like FLA's;
    pow2-static    gdn's static tiling (tilings.chunk_o_tiling): the cost of the BT switch without the autotuner;
  both warmed over T = 16, 32, CHUNK_SIZE. They launch gdn's own kernel (gdn.triton_kernels.chunk_o.chunk_fwd_o_kernel,
  BT is a constexpr) with another BT: with BT < CHUNK_SIZE the kernel cuts T into BT-row chunks, so h must
  have cdiv(T, BT) rows, one row for T ≤ CHUNK_SIZE as gdn's; for T ≥ CHUNK_SIZE both pick BT = CHUNK_SIZE, so
  outputs are comparable bit for bit at T = CHUNK_SIZE, CHUNK_SIZE + 1 and 8192; at T = 16 and 32 only the max
  difference is meaningful (different BT, different tiles).

Measured per policy: compiled variants (entries in the kernel's in-process JIT cache, after warm-up and after
all calls; JAX: the jitted function's cache size), tuning configs benchmarked, warm-up wall time (each call
synchronized), the first-call time at every T, the size of TRITON_CACHE_DIR, and the outputs' bits at
T = 16, 32, CHUNK_SIZE, CHUNK_SIZE + 1, 8192: bit-equality with the gdn policy at the last three and max |Δ|
at the first two, and each policy's max |Δ| against the float64 reference. Writes warmup.csv (with .env.json
and .txt) for benchmarks.report.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import progress
from gdn.common import contract, spec, tilings

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
LOG2E = math.log2(math.e)
PROBLEM = dict(B=1, H=16, HV=16, K=128, V=128, dtype="bfloat16")
MIN_POW2_BT = 16
POW2_WARM_TS = (16, 32, spec.CHUNK_SIZE)
EQUAL_TS = (spec.CHUNK_SIZE, spec.CHUNK_SIZE + 1, 8192)  # both policies pick BT = CHUNK_SIZE here
ALL_TS = tuple(sorted(set(POW2_WARM_TS) | set(EQUAL_TS)))
POLICIES = ("pow2-autotune", "pow2-static", "gdn", "gdn-pallas", "fla")
WARM_TS = {"pow2-autotune": POW2_WARM_TS, "pow2-static": POW2_WARM_TS, "gdn": (spec.CHUNK_SIZE,),
           "gdn-pallas": (spec.CHUNK_SIZE,), "fla": (spec.CHUNK_SIZE,)}
# fla-core 0.6 fla/ops/common/chunk_o.py _O_CONFIGS on NVIDIA outside Blackwell: (BK, BV, num_warps, num_stages)
FLA_06_CONFIGS = ((128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 2, 3))


def pow2_bt(T: int) -> int:
    """The tile height of the pow2 policies: the next power of two of T, clamped to [16, CHUNK_SIZE]."""
    return min(spec.CHUNK_SIZE, max(MIN_POW2_BT, 1 << max(0, T - 1).bit_length()))


def inputs_for(T: int, seed: int = 0) -> dict[str, np.ndarray]:
    from gdn.common import example

    p = PROBLEM
    return example.random_inputs(p["B"], T, p["H"], p["HV"], p["K"], p["V"], p["dtype"], True, None, seed=seed)


# ------------------------------------------------------------------------------------- pow2-policy launcher

class Pow2PolicyLauncher:
    """Launches gdn's chunk_fwd_o_kernel as the library wrapper does (same arguments, grid order and
    precision), except that BT follows pow2_bt(T) and, with autotune, BK/BV/warps/stages come from a
    triton.autotune over FLA_06_CONFIGS instead of tilings.chunk_o_tiling. Dense (non-varlen) inputs only."""

    def __init__(self, autotune: bool):
        import triton

        from gdn.triton import chunk_o

        self.kernel = chunk_o.chunk_fwd_o_kernel
        self.autotune = autotune
        self._tuners: dict[int, Any] = {}  # V -> autotuner (NV = cdiv(V, BV) is part of each config)
        self.bench_counters: list[list[int]] = []
        self._cache_kwargs = ({"cache_results": True}
                              if "cache_results" in inspect.signature(triton.autotune).parameters else {})

    def tuner(self, V: int):
        if V not in self._tuners:
            import triton

            configs = [triton.Config({"BK": bk, "BV": bv, "NV": triton.cdiv(V, bv)}, num_warps=w, num_stages=s)
                       for bk, bv, w, s in FLA_06_CONFIGS]
            tuner = triton.autotune(configs=configs, key=["H", "HV", "K", "V", "BT"], **self._cache_kwargs)(
                self.kernel)
            self.bench_counters.append(harness.count_tuning_benchmarks(tuner))
            self._tuners[V] = tuner
        return self._tuners[V]

    @property
    def configs_benchmarked(self) -> int:
        return sum(c[0] for c in self.bench_counters)

    def chosen_configs(self) -> dict[str, str]:
        return {str(key): str(cfg) for tuner in self._tuners.values() for key, cfg in tuner.cache.items()}

    def __call__(self, q, k, v, h, g=None, scale=None):
        import torch
        import triton

        from gdn.triton_kernels.chunk_o import STRIDE_NAMES

        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        BT = pow2_bt(T)
        NT = triton.cdiv(T, BT)
        if tuple(h.shape) != (B, NT, HV, K, V):
            raise ValueError(f"pow2-policy launcher: h: expected shape {(B, NT, HV, K, V)} (NT = cdiv(T, BT) "
                             f"with BT = {BT}); got {tuple(h.shape)}")
        o = torch.empty_like(v)
        scale = spec.default_scale(K) if scale is None else float(scale)
        dtype_name = str(q.dtype).removeprefix("torch.")
        strides = dict(zip(STRIDE_NAMES, contract.contiguous_strides(H, K, HV, V)))  # dense q, k, v
        common = dict(H=H, HV=HV, K=K, V=V, **strides, BT=BT, USE_G=g is not None, IS_VARLEN=False,
                      DOT_PRECISION="ieee" if dtype_name == "float32" else "tf32", G_FLOOR=spec.CUMULATIVE_GATE_FLOOR,
                      QK_L2NORM=False, QK_L2NORM_EPS=spec.QK_L2NORM_EPS)
        args = (q, k, v, h, g, None, None, o, scale, T, B)
        if self.autotune:
            self.tuner(V)[lambda meta: (B * NT * HV * meta["NV"],)](*args, **common)
        else:
            tiling = tilings.chunk_o_tiling(K, V, dtype_name)
            NV = triton.cdiv(V, tiling.block_v)
            self.kernel[(B * NT * HV * NV,)](*args, **common, BK=tiling.block_k, BV=tiling.block_v, NV=NV,
                                             num_warps=tiling.num_warps, num_stages=tiling.num_stages)
        return o


# ------------------------------------------------------------------------------------------------- child

def _child(policy: str, result_path: Path) -> int:
    """Runs in a fresh process: cold calls of one policy; writes a JSON summary and the output bits."""
    t_start = time.perf_counter()
    result: dict[str, Any] = {"policy": policy, "warm_ts": list(WARM_TS[policy])}
    bits: dict[str, np.ndarray] = {}
    cache_dir = os.environ.get("TRITON_CACHE_DIR", "")
    host_inputs = {T: inputs_for(T) for T in ALL_TS}

    if policy == "gdn-pallas":
        t0 = time.perf_counter()
        import jax
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()  # backend and device up before any timer below
        result["framework_init_s"] = time.perf_counter() - t0
        result["device"] = str(jax.devices()[0].device_kind)
        if jax.default_backend() != "gpu":
            raise RuntimeError(f"jax default backend is {jax.default_backend()!r}, not gpu")
        t0 = time.perf_counter()
        from gdn.pallas import chunk_fwd_o

        result["import_s"] = time.perf_counter() - t0
        fn = jax.jit(lambda q, k, v, h, g: chunk_fwd_o(q, k, v, h, g))
        args = {T: tuple(jnp.asarray(x[n], dtype=PROBLEM["dtype"]) for n in "qkvh") + (jnp.asarray(x["g"]),)
                for T, x in host_inputs.items()}
        jax.block_until_ready(args)

        def call(T):
            return fn(*args[T])

        def sync(out):
            out.block_until_ready()

        def to_bits(out):
            return np.asarray(jax.lax.bitcast_convert_type(out, jnp.int16))

        def variants():
            size = getattr(fn, "_cache_size", None)
            return size() if callable(size) else None

        def configs_tried():
            return 0
    else:
        t0 = time.perf_counter()
        import torch

        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()  # CUDA context up before any timer below
        result["framework_init_s"] = time.perf_counter() - t0
        result["device"] = torch.cuda.get_device_name()
        t0 = time.perf_counter()
        if policy == "fla":
            from fla.ops.common import chunk_o as fla_chunk_o

            result["import_s"] = time.perf_counter() - t0
            kernel = fla_chunk_o.chunk_fwd_kernel_o
            tuner = harness.find_autotuner(kernel)
            counter = harness.count_tuning_benchmarks(tuner) if tuner is not None else [0]

            def launch(q, k, v, h, g):
                return fla_chunk_o.chunk_fwd_o(q=q, k=k, v=v, h=h, g=g * LOG2E,
                                               chunk_size=spec.CHUNK_SIZE)

            def configs_tried():
                return counter[0]
        else:
            from gdn.triton import chunk_o as gdn_chunk_o

            result["import_s"] = time.perf_counter() - t0
            kernel = gdn_chunk_o.chunk_fwd_o_kernel
            if policy == "gdn":
                launch = gdn_chunk_o.chunk_fwd_o

                def configs_tried():
                    return 0
            else:
                launcher = Pow2PolicyLauncher(autotune=policy == "pow2-autotune")
                launch = launcher

                def configs_tried():
                    return launcher.configs_benchmarked

        args = {T: tuple(torch.from_numpy(x[n]).to("cuda", torch.bfloat16) for n in "qkvh")
                + (torch.from_numpy(x["g"]).to("cuda"),) for T, x in host_inputs.items()}
        torch.cuda.synchronize()

        def call(T):
            return launch(*args[T])

        def sync(out):
            torch.cuda.synchronize()

        def to_bits(out):
            return out.view(torch.int16).cpu().numpy()

        def variants():
            return harness.count_compiled_variants(kernel)

    # warm-up: each warm T once, synchronized, from cold
    first_call_s: dict[int, float] = {}
    outs = {}
    for T in WARM_TS[policy]:
        t0 = time.perf_counter()
        out = call(T)
        sync(out)
        first_call_s[T] = time.perf_counter() - t0
        outs[T] = out
        print(f"  first call at T={T}: {first_call_s[T]:.3f} s  (variants {variants()}, configs tried "
              f"{configs_tried()})", flush=True)
    result["warmup_s"] = sum(first_call_s.values())
    result["variants_after_warmup"] = variants()
    result["configs_tried_after_warmup"] = configs_tried()
    result["cache_bytes_after_warmup"], result["cache_files_after_warmup"] = (
        harness.dir_size(cache_dir) if cache_dir else (None, None))
    # every other T: first call after the warm-up (a compile here is a warm-up miss)
    for T in ALL_TS:
        if T in first_call_s:
            continue
        t0 = time.perf_counter()
        out = call(T)
        sync(out)
        first_call_s[T] = time.perf_counter() - t0
        outs[T] = out
        print(f"  first call at T={T}: {first_call_s[T]:.3f} s  (variants {variants()})", flush=True)
    # a second call at CHUNK_SIZE: warm time, for scale
    t0 = time.perf_counter()
    sync(call(spec.CHUNK_SIZE))
    result["warm_call_s"] = time.perf_counter() - t0
    result["first_call_s"] = {str(T): first_call_s[T] for T in ALL_TS}
    result["serve_16_32_64_s"] = sum(first_call_s[T] for T in POW2_WARM_TS)
    result["variants_after_all"] = variants()
    result["configs_tried_after_all"] = configs_tried()
    result["cache_bytes_after_all"], result["cache_files_after_all"] = (
        harness.dir_size(cache_dir) if cache_dir else (None, None))
    if policy == "pow2-autotune":
        result["chosen_configs"] = launcher.chosen_configs()
    if policy == "fla" and tuner is not None:
        result["chosen_configs"] = {str(key): str(cfg) for key, cfg in tuner.cache.items()}
    for T, out in outs.items():
        bits[f"T{T}"] = to_bits(out)
    result["process_s"] = time.perf_counter() - t_start
    np.savez(result_path.with_suffix(".npz"), **bits)
    result_path.write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ parent

def _run_child(policy: str, workdir: Path, timeout_s: float) -> tuple[dict | None, dict | None, str]:
    cache_dir = workdir / f"triton-cache-{policy}"
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    result_path = workdir / f"result-{policy}.json"
    env = harness.fresh_process_env(cache_dir)
    cmd = [sys.executable, "-m", "benchmarks.warmup", "--child", policy, "--result", str(result_path)]
    progress(f"{policy}: fresh subprocess, TRITON_CACHE_DIR={cache_dir}")
    t0 = time.perf_counter()
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout_s, proc.kill)  # kills this child only, by its own handle
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-30:]
            print(f"    [{policy}] {line}", flush=True)
        rc: Any = proc.wait()
    finally:
        timed_out = not watchdog.is_alive() and proc.returncode not in (0, None) and \
            time.perf_counter() - t0 >= timeout_s
        watchdog.cancel()
    if timed_out:
        rc = f"killed after the {timeout_s:.0f} s timeout"
    wall = time.perf_counter() - t0
    if rc != 0 or not result_path.exists():
        return None, None, f"failed (rc {rc}, {wall:.0f} s): " + " | ".join(
            line for line in tail[-3:] if line.strip())
    result = json.loads(result_path.read_text())
    result["subprocess_wall_s"] = wall
    with np.load(result_path.with_suffix(".npz")) as data:
        bits = {k: data[k] for k in data.files}
    return result, bits, ""


def _bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (int16) -> float32 values (exact)."""
    return (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warmup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"subset of {','.join(POLICIES)}")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per policy subprocess (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (caches, outputs)")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.result)
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"--policies: unknown {unknown}; expected a subset of {list(POLICIES)}")
    if "gdn" not in policies:
        policies.insert(0, "gdn")  # the baseline of the bit-equality columns

    env = harness.environment("benchmarks.warmup")
    env["CHUNK_SIZE"] = str(spec.CHUNK_SIZE)
    header = harness.format_header(env)
    print(header, flush=True)
    for T in ALL_TS:  # the premise of comparing outputs: same h for both policies
        assert -(-T // pow2_bt(T)) == spec.num_chunks(T), T

    from gdn.common import reference

    progress("float64 reference outputs at T = " + ", ".join(map(str, ALL_TS)) + " ...")
    refs = {}
    for T in ALL_TS:
        x = inputs_for(T)
        refs[T] = reference.chunk_fwd_o(x["q"], x["k"], x["v"], x["h"], x["g"])

    workdir = Path(tempfile.mkdtemp(prefix="gdn-warmup-"))
    results: dict[str, dict] = {}
    bits: dict[str, dict] = {}
    failures: dict[str, str] = {}
    try:
        for policy in policies:
            result, out_bits, error = _run_child(policy, workdir, args.timeout)
            if result is None:
                failures[policy] = error
                progress(f"{policy}: {error}")
                continue
            results[policy], bits[policy] = result, out_bits
    finally:
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    base = bits.get("gdn")
    for policy in policies:
        row: dict[str, Any] = {"policy": policy}
        rows.append(row)
        if policy not in results:
            row["note"] = failures.get(policy, "not run")
            continue
        r = results[policy]
        row.update({
            "bt_by_t": " ".join(f"{T}:{pow2_bt(T) if policy.startswith('pow2') else spec.CHUNK_SIZE}"
                                for T in ALL_TS) if policy != "gdn-pallas" else f"all:{spec.CHUNK_SIZE}",
            "warm_ts": " ".join(map(str, r["warm_ts"])),
            "variants_after_warmup": r["variants_after_warmup"],
            "variants_after_all": r["variants_after_all"],
            "configs_tried": r["configs_tried_after_all"],
            "warmup_s": r["warmup_s"],
            "serve_16_32_64_s": r["serve_16_32_64_s"],
            "warm_call_ms": r["warm_call_s"] * 1e3,
            "import_s": r["import_s"],
            "framework_init_s": r["framework_init_s"],
            "subprocess_wall_s": r["subprocess_wall_s"],
            "cache_kib_after_warmup": None if r["cache_bytes_after_warmup"] is None
            else r["cache_bytes_after_warmup"] / 1024,
            "cache_files_after_warmup": r["cache_files_after_warmup"],
            "cache_kib_after_all": None if r["cache_bytes_after_all"] is None else r["cache_bytes_after_all"] / 1024,
            "first_call_s": json.dumps({T: round(s, 4) for T, s in r["first_call_s"].items()}),
            "chosen_configs": json.dumps(r.get("chosen_configs")) if r.get("chosen_configs") else None,
            "device": r.get("device"),
        })
        errors = []
        for T in ALL_TS:
            o = _bits_to_f32(bits[policy][f"T{T}"])
            errors.append(float(np.abs(o - refs[T]).max()))
            if base is not None:
                same = bool(np.array_equal(bits[policy][f"T{T}"], base[f"T{T}"]))
                diff = float(np.abs(o - _bits_to_f32(base[f"T{T}"])).max())
                row[f"bit_equal_T{T}"] = same
                row[f"max_abs_diff_T{T}"] = diff
        row["max_abs_err_vs_reference"] = max(errors)
        row["bit_equal_at_64_65_8192"] = (None if base is None else
                                          all(row[f"bit_equal_T{T}"] for T in EQUAL_TS))

    def yn(v):
        return None if v is None else ("yes" if v else "NO")

    table_rows = [dict(r,
                       v=(f"{r['variants_after_warmup']} / {r['variants_after_all']}"
                          if "variants_after_all" in r else None),
                       cfg=r.get("configs_tried"),
                       warm=harness.fmt(r.get("warmup_s"), 2), serve=harness.fmt(r.get("serve_16_32_64_s"), 2),
                       imp=harness.fmt(r.get("import_s"), 2), disk=harness.fmt(r.get("cache_kib_after_warmup"), 0),
                       eq=" ".join(f"{yn(r.get(f'bit_equal_T{T}'))}" for T in EQUAL_TS) if "warmup_s" in r else None,
                       d16=(f"{r['max_abs_diff_T16']:.1e} {r['max_abs_diff_T32']:.1e}"
                            if r.get("max_abs_diff_T16") is not None else None),
                       err=(f"{r['max_abs_err_vs_reference']:.1e}" if r.get("max_abs_err_vs_reference") is not None
                            else None))
                  for r in rows]
    columns = [("policy", "policy"), ("warm_ts", "warm T"), ("v", "variants warm/all"), ("cfg", "configs tried"),
               ("warm", "warm-up s"), ("serve", "T" + "+".join(map(str, POW2_WARM_TS)) + " first calls s"),
               ("imp", "import s"), ("disk", "cache KiB"),
               ("eq", "bit-equal gdn @" + " ".join(map(str, EQUAL_TS))), ("d16", "max|Δ| gdn @16 32"),
               ("err", "max|Δ| vs f64 ref")]
    table = harness.format_table(table_rows, columns)
    notes = [
        "notes:",
        "  variants: compiled kernels in the in-process JIT cache after the warm-up / after calls at T = "
        + ", ".join(map(str, ALL_TS)) + " (gdn-pallas: jax.jit cache entries; one per input shape);",
        "  configs tried: autotuner benchmarks run (FLA-0.6-like configs for pow2-autotune, FLA's own for fla);",
        "  warm-up s: the warm T calls, each synchronized, compile + tuning included; T" + "+".join(
            map(str, POW2_WARM_TS)) + ": first calls at those T from cold, in warm-up order (for gdn: warm at "
        f"{spec.CHUNK_SIZE}, then 16 and 32, which must not compile);",
        "  import s: importing the implementation after torch / jax is up; cache KiB: TRITON_CACHE_DIR after the "
        "warm-up (XLA compiles gdn-pallas in-process: no Triton disk cache);",
        "  bit-equal: identical output bits to the gdn policy (same inputs; both use BT = CHUNK_SIZE there); "
        "at T = 16, 32 the tile heights differ, so only max|Δ| is shown.",
    ]
    extra = []
    for r in rows:
        if r.get("chosen_configs"):
            extra.append(f"  {r['policy']} chosen configs: {r['chosen_configs']}")
        if r.get("first_call_s"):
            extra.append(f"  {r['policy']} first call s by T: {r['first_call_s']}  warm call at T={spec.CHUNK_SIZE}: "
                         f"{r['warm_call_ms']:.2f} ms  process {r['subprocess_wall_s']:.1f} s "
                         f"(framework init {r['framework_init_s']:.1f} s)")
        if r.get("note"):
            extra.append(f"  {r['policy']}: {r['note']}")
    print()
    print(table)
    print("\n".join(notes + extra))
    harness.write_results(args.out, "warmup", env, rows, report="\n".join([table] + notes + extra))
    return 0 if "gdn" in results else 1


if __name__ == "__main__":
    sys.exit(main())
