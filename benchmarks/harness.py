"""Shared benchmark helpers: environment header, timing (torch, CUDA graphs and JAX), copy bandwidth, tables,
the result files every script writes (CSV, text report, environment JSON), plots, and Triton JIT-cache
introspection.

Nothing here imports jax at module level, and torch / triton only inside the functions that time them, so
``--help`` works anywhere.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

_T0 = time.perf_counter()

DEFAULT_L2_BYTES = 50 * 2**20
"""H100 L2; used when torch does not report the device's."""


# ------------------------------------------------------------------------------------------------ output

def progress(message: str) -> None:
    """A progress line with the seconds since the benchmark process started, flushed at once."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def version(dist: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def flashinfer_bundle_version() -> str:
    """FlashInfer's GDN prefill as the fi_gdn bundle provides it (a benchmark peer put on PYTHONPATH, never
    installed), or "not installed"."""
    try:
        import fi_gdn
    except Exception:  # noqa: BLE001 - any import failure means the peer is absent
        return "not installed"
    return str(getattr(fi_gdn, "__version__", "fi_gdn bundle"))


def _nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else out.stderr.strip()
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        return f"nvidia-smi failed: {error}"


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10)
        head = rev.stdout.strip() if rev.returncode == 0 else "no commit"
        return head + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(module: str, cuda: bool = True) -> dict[str, str]:
    """GPU, driver, library versions, date and the command line, for the header of every result."""
    env = {
        "command": " ".join([Path(sys.executable).name, "-m", module] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "nvidia-smi (name, driver, memory, max SM clock)": _nvidia_smi(),
        "torch": version("torch"),
        "triton": version("triton"),
        "jax": version("jax"),
        "jaxlib": version("jaxlib"),
        "jax-cuda plugin": version("jax-cuda13-plugin") if version("jax-cuda13-plugin") != "not installed"
        else version("jax-cuda12-plugin"),
        "fla-core": version("fla-core"),
        "jax-linear-attention": version("jax-linear-attention"),
        "flashinfer": flashinfer_bundle_version(),
        "gdn git revision": _git_revision(),
    }
    if cuda:
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                env["gpu (torch)"] = (f"{props.name}, {props.multi_processor_count} SMs, "
                                      f"{props.total_memory / 2**30:.0f} GiB, L2 {l2_bytes() / 2**20:.0f} MiB")
                env["torch cuda"] = str(torch.version.cuda)
            else:
                env["gpu (torch)"] = "torch sees no CUDA device"
        except Exception as error:  # noqa: BLE001 - the header must not stop the benchmark
            env["gpu (torch)"] = f"unknown ({type(error).__name__}: {error})"
    for var in ("CUDA_VISIBLE_DEVICES", "TRITON_CACHE_DIR", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env



def selection_parser(prog: str, doc: str | None, shape_list: Sequence[Any], impls: Sequence[str], cold_shape: str,
                     first: str, cold_only_help: str) -> argparse.ArgumentParser:
    """The command line a benchmark of implementations at shapes with cold first runs starts from: --shapes,
    --impls, --no-cold / --cold-only, --cold-shape, --cold-timeout (the caller adds its own options)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="shapes:\n  " + "\n  ".join(s.name for s in shape_list))
    parser.add_argument("--shapes", default="", help="comma-separated shape names or fnmatch patterns; default all")
    parser.add_argument("--impls", default=",".join(impls), help=f"comma-separated subset of {','.join(impls)}")
    cold = parser.add_mutually_exclusive_group()
    cold.add_argument("--no-cold", action="store_true", help=f"skip the fresh-process first {first}")
    cold.add_argument("--cold-only", action="store_true", help=cold_only_help)
    parser.add_argument("--cold-shape", default=cold_shape, help=f"shape of the first {first} (default {cold_shape})")
    parser.add_argument("--cold-timeout", type=float, default=300, help="seconds per cold subprocess")
    return parser


def parse_selection(parser: argparse.ArgumentParser, argv: list[str] | None, impls: Sequence[str],
                    shape_list: Sequence[Any]) -> argparse.Namespace:
    """parser's arguments with --impls checked against impls and args.selected, the shapes --shapes picks."""
    from benchmarks import shapes

    args = parser.parse_args(argv)
    unknown = [n for n in args.impls.split(",") if n and n not in impls]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; expected a subset of {list(impls)}")
    try:
        args.selected = shapes.select(list(shape_list), args.shapes)
    except ValueError as error:
        parser.error(str(error))
    return args

def format_header(env: dict[str, str]) -> str:
    width = max(map(len, env))
    return "\n".join(f"# {key:<{width}} : {value}" for key, value in env.items())


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A fixed-width text table; columns are (key, title). Floats are shown as given (format them first)."""
    cells = [[title for _, title in columns]]
    for row in rows:
        cells.append(["" if row.get(key) is None else str(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def fmt(x: float | None, digits: int = 1) -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_results(out: Path, name: str, env: dict[str, str], rows: Sequence[dict[str, Any]],
                  fields: Sequence[str] | None = None, report: str | None = None) -> None:
    """The files a benchmark leaves in out for benchmarks.report: name.csv (rows), name.env.json (the
    environment header) and, with report, name.txt (what the script printed: header and tables)."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{name}.csv", rows, fields)
    (out / f"{name}.env.json").write_text(json.dumps(env, indent=1) + "\n")
    if report is not None:
        (out / f"{name}.txt").write_text(format_header(env) + "\n\n" + report.rstrip() + "\n")
    progress(f"wrote {out / name}.csv, .env.json" + (", .txt" if report is not None else ""))


# -------------------------------------------------------------------------------------- implementations

@dataclasses.dataclass
class Impl:
    """One implementation a benchmark compares: make(shape, inputs) returns a call of no arguments (anything it
    converts once, such as layouts or a jit, done outside that call); make is None, with a note, when the
    implementation is absent here."""

    name: str
    framework: str  # "torch" or "jax"
    make: Callable[..., Callable[[], Any]] | None
    note: str = ""


def not_installed(name: str, framework: str, error: BaseException) -> Impl:
    """The row of an implementation that cannot be imported here."""
    first_line = str(error).splitlines()[0][:120] if str(error) else ""
    return Impl(name, framework, None, f"not installed ({type(error).__name__}: {first_line})")


def jax_gpu_impls(names: Sequence[str], impls: dict[str, Impl]) -> list[str]:
    """names when JAX's default backend is a GPU; else none of them, each recorded in impls as not installed
    (with the reason)."""
    if not names:
        return []
    try:
        import jax

        if jax.default_backend() != "gpu":
            raise RuntimeError(f"jax default backend is {jax.default_backend()!r}, not gpu")
    except Exception as error:  # noqa: BLE001 - an optional framework: its rows say why they are missing
        for name in names:
            impls[name] = not_installed(name, "jax", error)
        return []
    return list(names)


def jla_linear_attention() -> Callable[..., Any]:
    """jax-linear-attention's jla.ops.linear_attention when it has its Mosaic GPU gated_deltanet here; else an
    ImportError or RuntimeError, which the caller turns into a not-installed row."""
    from jla.ops import available, linear_attention

    if "mosaic_gpu" not in available("gated_deltanet"):
        raise RuntimeError(f"jla has no mosaic_gpu gated_deltanet here ({available('gated_deltanet')})")
    return linear_attention


def synced(impl: Impl, call: Callable[[], Any]) -> Any:
    """call() (torch: without autograd), waited for on the device."""
    if impl.framework == "torch":
        import torch

        with torch.no_grad():
            out = call()
        torch.cuda.synchronize()
        return out
    import jax

    return jax.block_until_ready(call())


def to_numpy(x: Any) -> Any:
    """A torch tensor or jax array as float32 numpy (None stays None)."""
    import numpy as np

    if x is None:
        return None
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x.astype("float32"))


def gpu_run(env: dict[str, str], impls: dict[str, Impl]) -> float | None:
    """The start of a GPU benchmark run: None (with a message) without a CUDA device, else the device-to-device
    copy bandwidth in bytes/s, recorded in env; each implementation's availability printed."""
    import torch

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; this benchmark needs one", file=sys.stderr)
        return None
    bandwidth, _ = copy_bandwidth()
    env["copy bandwidth"] = f"{bandwidth / 1e12:.3f} TB/s"
    progress(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    for impl in impls.values():
        progress(f"{impl.name}: {'available' if impl.make else impl.note}")
    return bandwidth


def failure_note(error: BaseException) -> str:
    """A row's note for an implementation that failed at a shape."""
    message = str(error).strip()
    return f"failed: {type(error).__name__}" + (f": {message.splitlines()[0][:200]}" if message else "")


def ratio_columns(rows: list[dict[str, Any]]) -> None:
    """Per row: each gdn implementation's device time over the row's, within the same shape of the same run."""
    for row in rows:
        for gdn in ("gdn-triton", "gdn-pallas"):
            mine = next((r.get("device_us") for r in rows if r["impl"] == gdn and r["shape"] == row["shape"]), None)
            if mine and row.get("device_us"):
                row[f"{gdn}_ratio"] = mine / row["device_us"]


# ---------------------------------------------------------------------------------------------- timings

@dataclasses.dataclass
class Timing:
    """Per-call times in microseconds: median with the 10th and 90th percentiles over n samples."""

    median_us: float
    p10_us: float
    p90_us: float
    n: int
    method: str

    @classmethod
    def from_samples(cls, samples_us: Sequence[float], method: str) -> "Timing":
        s = sorted(samples_us)
        return cls(statistics.median(s), _quantile(s, 0.1), _quantile(s, 0.9), len(s), method)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def time_torch(fn: Callable[[], Any], warmup_ms: float = 50, rep_ms: float = 200) -> Timing:
    """Device time of fn: triton.testing.do_bench (CUDA events around each call, L2 cleared before each by
    a 256 MB memset), all samples kept."""
    from triton.testing import do_bench

    try:
        samples_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except (AssertionError, TypeError, ValueError):  # a triton without return_mode="all"
        samples_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.1, 0.5, 0.9])
        return Timing(samples_ms[1] * 1e3, samples_ms[0] * 1e3, samples_ms[2] * 1e3, 0,
                      "do_bench quantiles (CUDA events, L2 cleared)")
    return Timing.from_samples([t * 1e3 for t in samples_ms], "do_bench (CUDA events, L2 cleared each call)")


def cuda_graph(fn: Callable[[], Any]) -> Any:
    """fn captured in a CUDA graph (after two calls on a side stream, which compile and autotune): its replay
    runs the same kernels without any host time."""
    import torch

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


def time_torch_call(fn: Callable[[], Any]) -> tuple[Timing | None, Timing, str]:
    """(device time, wall time, note) of a torch callable: device = fn captured in a CUDA graph and replayed
    under do_bench (no host time), None with a note when fn cannot be captured (a host sync inside it);
    wall = do_bench of the plain Python call (the GPU waits on the host when the host is slower)."""
    import torch

    wall = time_torch(fn)
    try:
        graph = cuda_graph(fn)
        device = time_torch(graph.replay)
        return dataclasses.replace(device, method="CUDA graph replay, " + device.method), wall, ""
    except Exception as error:  # noqa: BLE001 - no graph for this callable: wall time only
        torch.cuda.synchronize()
        return None, wall, f"no CUDA graph ({type(error).__name__}: {str(error).splitlines()[0][:80]})"


def time_jax(fn: Callable[..., Any], arg_sets: Sequence[tuple], runs: int = 100, warmup: int = 10,
             batch: int = 1) -> Timing:
    """Wall time per call of a jitted fn: ``batch`` back-to-back calls over rotating argument sets, then
    block_until_ready, divided by batch. batch = 1 is the synchronized per-call time (host dispatch
    included); batch > 1 pipelines dispatch behind execution and approaches device time. fn may return an
    array or any pytree of arrays (e.g. ``(o, final_state)``)."""
    from jax import block_until_ready

    for i in range(warmup):
        block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    samples = []
    call = 0
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(batch):
            out = fn(*arg_sets[call % len(arg_sets)])
            call += 1
        block_until_ready(out)
        samples.append((time.perf_counter() - start) * 1e6 / batch)
    method = ("jit wall, block_until_ready each call" if batch == 1
              else f"jit wall, {batch} pipelined calls per block_until_ready")
    return Timing.from_samples(samples, method + f", {len(arg_sets)} rotating input sets")


def host_time_per_call(fn: Callable[[], Any], sync: Callable[[], None], calls: int = 1000) -> float:
    """Host (CPU) µs per call: `calls` back-to-back calls with no synchronization in between (Python
    wrapper + argument checks + launch / dispatch), after one synchronized warm call. Valid as a host
    cost when the device finishes each call faster than the host issues the next (small shapes)."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    sync()
    return host * 1e6 / calls


def fresh_process_env(triton_cache_dir: str | os.PathLike) -> dict[str, str]:
    """os.environ for a cold-start child process: the given (empty) TRITON_CACHE_DIR, no JAX persistent
    compilation cache, no XLA preallocation, FLA's shipped-config lookup off (it autotunes), unbuffered
    output, and the repository first on PYTHONPATH."""
    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = str(triton_cache_dir)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("FLA_CACHE_MODE", None)
    env["PYTHONUNBUFFERED"] = "1"
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def l2_bytes() -> int:
    try:
        import torch

        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or DEFAULT_L2_BYTES
    except Exception:  # noqa: BLE001 - any failure means: use the default
        return DEFAULT_L2_BYTES


def rotating_sets(bytes_per_set: int, max_sets: int = 16) -> int:
    """Input sets to rotate through so that consecutive calls do not find their inputs in L2 (≥ 3× L2)."""
    return max(1, min(max_sets, math.ceil(3 * l2_bytes() / max(bytes_per_set, 1))))


def copy_bandwidth(num_bytes: int = 2**30, warmup_ms: float = 50, rep_ms: float = 300) -> tuple[float, Timing]:
    """Device-to-device copy bandwidth in bytes/s (read + write counted) of a num_bytes torch copy_."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    timing = time_torch(functools.partial(dst.copy_, src), warmup_ms, rep_ms)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / (timing.median_us * 1e-6), timing


# ---------------------------------------------------------------------------------------- Triton caches

def _unwrap_jit(fn: Any) -> Any:
    """The triton JITFunction under Autotuner / Heuristics wrappers (each keeps the wrapped one in .fn)."""
    from triton.runtime.jit import JITFunction

    for _ in range(16):
        if isinstance(fn, JITFunction) or not hasattr(fn, "fn"):
            break
        fn = fn.fn
    return fn


def count_compiled_variants(jit_fn: Any) -> int:
    """Number of compiled variants held in a triton JIT function's in-process kernel cache, over all devices.

    jit_fn may be wrapped in triton.autotune / triton.heuristics. Triton ≥ 3.2 (3.6, 3.9, ...) keeps
    ``device_caches: {device: (kernel_cache, ...)}`` with the kernel cache first (a 4-tuple in 3.6, a
    5-tuple in 3.9); older Triton kept ``cache: {device: {key: kernel}}``. Entries still compiling
    asynchronously count too. Raises TypeError for anything else (e.g. the interpreter's function).
    """
    fn = _unwrap_jit(jit_fn)
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in list(caches.values()))
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict):
        return sum(len(kernels) for kernels in cache.values())
    raise TypeError(f"count_compiled_variants: expected a triton JITFunction (possibly autotuned); got "
                    f"{type(jit_fn).__name__}")


def find_autotuner(fn: Any) -> Any | None:
    """The triton Autotuner in a chain of .fn wrappers, or None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(16):
        if isinstance(fn, Autotuner):
            return fn
        if not hasattr(fn, "fn"):
            return None
        fn = fn.fn
    return None


def count_tuning_benchmarks(autotuner: Any) -> list[int]:
    """Wrap an Autotuner's per-config benchmark so every config it times is counted; returns the live counter
    (a one-element list). Configs served from Triton's on-disk autotune cache are not benchmarked, so not
    counted."""
    counter = [0]
    bench = autotuner._bench

    def counting_bench(*args, **kwargs):
        counter[0] += 1
        return bench(*args, **kwargs)

    autotuner._bench = counting_bench
    return counter


def dir_size(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes, files) under path."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
                files += 1
            except OSError:
                pass
    return total, files


# ------------------------------------------------------------------------------------------------ plots

def plot_lines(path: Path, series: dict[str, Iterable[tuple[float, float]]], title: str, xlabel: str,
               ylabel: str, dashed: Iterable[str] = (), second: dict[str, Iterable[tuple[float, float]]] | None = None,
               second_ylabel: str = "") -> None:
    """Log-log lines, one per series; with `second`, a second panel (linear y) below. matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if second else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.5 * panels), squeeze=False)
    dashed = set(dashed)
    names = list(dict.fromkeys(list(series) + list(second or {})))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one color per series in both panels
    for ax, data, log_y, label in ((axes[0][0], series, True, ylabel),) + (
            ((axes[1][0], second, False, second_ylabel),) if second else ()):
        for name, points in data.items():
            points = sorted(points)
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", linestyle="--" if name in dashed else "-", color=colors[name], label=name)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
