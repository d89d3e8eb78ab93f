"""``python -m benchmarks.report``: benchmarks/RESULTS.md, assembled from what the benchmark scripts left in
benchmarks/results/ (name.csv rows and name.env.json environment headers; chunk_o.png).

Run it after any of the scripts below; a result that is not there leaves its section out:

    python -m benchmarks.chunk_o        # chunk_o.csv, chunk_o_host.csv, chunk_o.png
    python -m benchmarks.forward        # forward.csv, forward_host.csv, forward_cold.csv
    python -m benchmarks.backward       # backward.csv, backward_cold.csv
    python -m benchmarks.decode         # decode.csv, tune_decode.csv
    python -m benchmarks.decode --serving   # decode_serving.csv
    python -m benchmarks.layouts        # layouts.csv
    python -m benchmarks.warmup         # warmup.csv
    python -m benchmarks.tune_chunk_o   # tune_chunk_o.csv
    python -m benchmarks.tune_forward   # forward_stages.csv, tune_walk.csv, tune_fused.csv, tune_prepare.csv
    python -m benchmarks.profile_forward   # forward_profile.csv (Nsight Compute)

Every table says what each number is; the reading lines under a table are computed from its rows, so they stay
true after a refresh. The targets at the end are evaluated on the same rows; a target that is not met carries
the profiler's reason from REASONS below (update it with the profile that explains a new result).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
OUT = Path(__file__).resolve().parent / "RESULTS.md"
ENV_KEYS = ("gpu (torch)", "nvidia-smi (name, driver, memory, max SM clock)", "torch cuda", "torch", "triton", "jax",
            "jaxlib", "fla-core", "jax-linear-attention", "flashinfer", "python")
GDN = ("gdn-triton", "gdn-pallas")
PROFILE_MIN_US = 10
"""Kernels shorter than this (µs) are left out of the forward's profile table (layout copies, small fusions)."""

REASONS = {
    # The profiler's reason for each target not met, keyed as in targets(); shown only while it is not met.
    "chunk_o_t8192_triton": "the timed call includes the launch and event overhead; Nsight Compute kernel time on an "
                            "H100 71.5–72.2 µs (ncu ... python -m benchmarks.profile_chunk_o)",
    "chunk_o_t512": "the timed call includes the launch and event overhead; Nsight Compute kernel time on an H100 "
                    "8.8–9.2 µs (Triton), 9.0–9.1 µs (Pallas)",
    "chunk_o_pallas_floor": "the pipelined JAX calls leave dispatch gaps between programs; Nsight Compute kernel time "
                            "on an H100 537.6–541 µs at B1 T65536 (99–100 % of the floor), 243–245 µs at B8 T2048 HV32 "
                            "(92 %)",
    "chunk_o_t8192_pallas": "same bytes and occupancy as the Triton kernel (2 blocks of 4 warps per SM, "
                            "register-bound; Nsight Compute: 13.4 cycles between a warp's issued instructions "
                            "against Triton's 10.6, 6.5 of them waiting on global loads): jaxlib's Triton schedules "
                            "the loads later, and the Pallas-Triton lowering exposes no register cap or load-order "
                            "control; every tiling and grid measured runs at 73–77 µs of kernel time on an H100",
    "chunk_o_few_heads": "212–223 registers per thread cap the kernel at 2 blocks per SM; 1024 programs are 3.9 "
                         "waves with a partial last one (Nsight Compute: every byte read once, q and k through L2; "
                         "kernel time 30.5–33.4 µs, 76–83 % of the floor, on an H100); a cap at 168 registers "
                         "spills and loses",
    "chunk_o_host": "CPython calls into torch and Triton: the C launcher 4.9 µs, the per-call tensor checks 2.6, "
                    "torch.empty_like 1.8, gdn's launch checks 1.2 (python -m benchmarks.profile_chunk_o --host)",
    "forward_vs_peer": "Nsight Compute at B1 T8192 H16 (forward_profile.csv): gdn's sequential part matches the "
                       "fastest peer's, its parallel parts do not. gdn's walk (138 µs: 128 programs of 4 warps, 6 % "
                       "achieved occupancy, 1 944 cycles per chunk, stalled on fixed-latency dependencies) against "
                       "FlashInfer CP's segment maps, fix-up and segment walks (53 + 37 + 51 µs; 8 segments of 16 "
                       "chunks, 5 739 cycles per chunk of a full 128-column state with o); but gdn's prepare "
                       "(81 µs: w and u for every chunk, 168 registers, 18 % occupancy, long-scoreboard stalls) "
                       "and its separate chunk_fwd_o pass (65 µs: h and v_new back from HBM) against FlashInfer's "
                       "21 µs factor kernel, which leaves w, u and o to the walk. Fusing o into gdn's walk in "
                       "Triton 3.6 takes 4 724 cycles per chunk over all 128 chunks (the fused row: 353 µs, 226 "
                       "registers), and cutting it into pieces does not pay at 128 walks (tune_forward --only "
                       "walk, tilings.FUSED_WALK): what the peers add is warp-specialized warpgroup-MMA walks "
                       "over segments, each chunk's o computed beside the state update",
    "jax_host_chunk_fwd_o": "JAX's own dispatch of a jitted program: the same chunk_fwd_o inside the caller's "
                            "jax.jit (chunk_o_host.csv) costs about as much CPU per call on this host; the eager call "
                            "adds only its host-side argument checks",
    "jax_host_chunk_gated_delta_rule": "JAX's dispatch of a jitted program of several kernels: jla's jitted "
                                       "forward costs about as much CPU per call on this host (forward_host.csv)",
    "chunk_o_triton_floor": "not profiled on the H200: the kernel moves its bytes at about 3.6 TB/s there, 85 % of "
                            "the 4.2 TB/s copy (on an H100 profile, python -m benchmarks.profile_chunk_o, it read "
                            "every byte once at its 3.0 TB/s copy rate)",
    "forward_pallas": "the same kernels through jaxlib's Triton (the Pallas-Triton lowering exposes no register cap "
                      "or load order; chunk_fwd_o alone takes about 1.5x gdn Triton's time there, benchmarks."
                      "chunk_o); gdn Triton's own kernels launched from JAX (gdn-jax-triton, lowering='triton_call') "
                      "take 1.00-1.04x of gdn Triton's device time at every shape but B1 T512, where JAX's "
                      "dispatch of five custom calls dominates",
    "jax_default_chunk_o": "the same compiled kernel as gdn-triton (gdn-jax-triton gives its bits): JAX's device "
                           "time is the jit wall of pipelined calls, which keeps XLA's dispatch between programs "
                           "(see chunk_o_pallas_floor), where gdn-triton's is a CUDA graph's replay; not profiled "
                           "through triton_call on the H200",
    "jax_default_forward": "at B1 T512 the JAX calls' dispatch gaps dominate: gdn-jax-triton runs gdn-triton's very "
                           "kernels and takes 3.2x its time there, the Mosaic GPU path 2.3x; from 8192 tokens on the "
                           "Mosaic GPU walk beats gdn Triton's walk plus chunk_fwd_o (Nsight Compute at B1 T8192 "
                           "H16, forward_profile.csv: the map walk and combine 127 µs and the walk with o 57 µs "
                           "over 128 CTAs of 4 pieces, against 137 + 65 µs), and its prepare is gdn Triton's (82 µs)",
    "backward_vs_jla": "not yet profiled. The step runs the forward's three kernels, the recompute of g_c, w, u, h "
                       "and v_new, then four backward kernels. The WY kernel runs on 2 warps "
                       "(tilings.backward_wy_tiling): on 4, Triton 3.6 miscompiles it in bf16. The same step with "
                       "4 warps timed 1217 µs (gdn Triton) and 1036 µs (gdn Pallas), but its bf16 gradients are "
                       "wrong, so 2 warps cost about 430 and 360 µs of this step",
    "serving_decode": "gdn Triton's pool step streams the states at its dense step's rate (decode.csv at N = 256: "
                      "88 % of the copy bandwidth, the pool step 92 %), so the kernel's streaming, not the pool's "
                      "indexing, sets the gap; gdn Pallas's kernel (the same tiling through the Pallas-Triton "
                      "lowering) reaches 76-79 % (not yet profiled)",
    "serving_spec": "not yet profiled: the speculative step walks its 4 tokens one after another per program and "
                    "writes a state per token; with the fused q/k norm and gates each token adds a reduction over "
                    "K and the gate math to that chain",
    "serving_prefill": "not yet profiled: the pool forward gathers the 16 initial states by index in the walk and "
                       "writes the final states back to their rows, where the dense forward reads contiguous rows",
}


def read_rows(name: str) -> list[dict[str, Any]] | None:
    """The rows of results/name.csv with numbers parsed, or None when the script has not run."""
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return None
    with path.open() as f:
        return [{key: _value(text) for key, text in row.items()} for row in csv.DictReader(f)]


def _value(text: str) -> Any:
    if text in ("", None):
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_env(name: str) -> dict[str, str]:
    path = RESULTS / f"{name}.env.json"
    return json.loads(path.read_text()) if path.exists() else {}


def num(x: Any, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}".replace(",", " ")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def measured_line(env: dict[str, str]) -> str:
    """Where and when a result was measured: GPU, date, gdn commit and the copy bandwidth of that run."""
    gpu = env.get("gpu (torch)", env.get("nvidia-smi (name, driver, memory, max SM clock)", "unknown GPU"))
    parts = [gpu.split(",")[0], env.get("date", "unknown date"), f"gdn {env.get('gdn git revision', 'unknown')}"]
    if "copy bandwidth" in env:
        parts.append(f"copy bandwidth {env['copy bandwidth']}")
    return "Measured: " + ", ".join(parts) + "." + (f" ({env['note']}.)" if env.get("note") else "")


def environment_header(envs: dict[str, dict[str, str]]) -> str:
    """One environment table for every result file: a column per distinct environment."""
    distinct: list[tuple[dict[str, str], list[str]]] = []
    for name, env in envs.items():
        key = {k: env.get(k) for k in ENV_KEYS}
        for known, names in distinct:
            if {k: known.get(k) for k in ENV_KEYS} == key:
                names.append(name)
                break
        else:
            distinct.append((env, [name]))
    header = ["", *(", ".join(names) for _, names in distinct)]
    rows = [[key, *(env.get(key) or "—" for env, _ in distinct)] for key in ENV_KEYS]
    return table(header, rows)


# -------------------------------------------------------------------------------------------- sections

def timing_table(rows: list[dict[str, Any]], floor_column: bool, wall: bool) -> str:
    """One row per (shape, implementation): device µs (p10–p90), wall µs, % of the floor, the gdn
    implementations' time over this row's; the shape's MB moved and floor µs on its first row."""
    header = ["shape", "MB moved", "floor µs", "implementation", "µs (p10–p90)"] + (["wall µs"] if wall else []) \
        + ["% of floor", "gdn Triton ÷ this", "gdn Pallas ÷ this"]
    out, seen = [], set()
    for r in rows:
        first = r["shape"] not in seen
        seen.add(r["shape"])
        if r.get("device_us") is not None:
            spread = f" ({num(r.get('device_p10_us'))}–{num(r.get('device_p90_us'))})" \
                if r.get("device_p10_us") is not None else ""
            time = num(r["device_us"]) + spread + (" MISMATCH" if r.get("check") == "MISMATCH" else "")
        else:
            note = r.get("note") or "not run"
            time = "— (not installed)" if note.startswith("not installed") else f"— ({note})"
        cells = [r.get("label") or r["shape"] if first else "", num(r.get("mb_moved"), 0) if first else "",
                 num(r.get("floor_us")) if first and floor_column else "", r["impl"], time]
        if wall:
            cells.append(num(r.get("wall_us")))
        cells += [num(r.get("pct_floor"), 0), num(r.get("gdn-triton_ratio"), 2), num(r.get("gdn-pallas_ratio"), 2)]
        out.append(cells)
    return table(header, out)


def timing_methods(rows: list[dict[str, Any]]) -> str:
    """How each implementation's device time was taken, from the rows' device_method."""
    by_method: dict[str, list[str]] = {}
    for r in rows:
        if r.get("device_method"):
            names = by_method.setdefault(r["device_method"], [])
            if r["impl"] not in names:
                names.append(r["impl"])
    return "Device time — " + "; ".join(f"{', '.join(names)}: {method}" for method, names in by_method.items()) + "."


def best_peer(rows: list[dict[str, Any]], shape: str) -> dict[str, Any] | None:
    peers = [r for r in rows if r["shape"] == shape and not r["impl"].startswith("gdn-") and r.get("device_us")
             and r.get("check") != "MISMATCH"]
    return min(peers, key=lambda r: r["device_us"]) if peers else None


def section_chunk_o() -> str | None:
    rows = read_rows("chunk_o")
    if rows is None:
        return None
    env = read_env("chunk_o")
    lines = ["## chunk_fwd_o", "", "`python -m benchmarks.chunk_o` — " + measured_line(env) + " K = V = 128, gated. "
             + timing_methods(rows) + " Wall: one Python call (torch: do_bench of the call; JAX: one call per sync). "
             "Floor = q, k, v, g, h read once and o written once at the copy bandwidth.", "",
             timing_table(rows, True, True)]
    if (RESULTS / "chunk_o.png").exists():
        lines += ["", "![chunk_fwd_o time and % of the floor against T](results/chunk_o.png)"]
    triton = [r for r in rows if r["impl"] == "gdn-triton" and r.get("pct_floor")]
    reading = []
    if triton:
        low, high = min(triton, key=lambda r: r["pct_floor"]), max(triton, key=lambda r: r["pct_floor"])
        reading.append(f"gdn Triton runs at {num(low['pct_floor'], 0)} % ({low['label']}) to "
                       f"{num(high['pct_floor'], 0)} % ({high['label']}) of the copy-bandwidth floor.")
        ratios = [(r["label"], r["device_us"] / peer["device_us"]) for r in triton
                  if (peer := best_peer(rows, r["shape"]))]
        if ratios:
            reading.append("Against the fastest other implementation at each shape gdn Triton takes "
                           f"{num(min(x for _, x in ratios), 2)}–{num(max(x for _, x in ratios), 2)}× its time.")
    host = read_rows("chunk_o_host")
    if host:
        lines += ["", "Host time per call at " + host[0]["label"] + " (1000 calls back to back, no sync; "
                  "`chunk_o_host.csv`):", "",
                  table(["implementation", "CPU µs per call"], [[r["impl"], num(r["host_us"])] for r in host])]
        eager = next((r for r in host if r["impl"] == "gdn-pallas"), None)
        jitted = next((r for r in host if r["impl"].startswith("gdn-pallas (")), None)
        if eager and jitted:
            reading.append(f"An eager gdn.pallas call costs {num(eager['host_us'])} µs of CPU, inside a caller's "
                           f"jax.jit {num(jitted['host_us'])} µs.")
    return "\n".join(lines + [""] + reading[:3])


def kernel_label(name: str) -> str:
    """A profiled kernel's short name: the class of a CuTe DSL kernel (FlashInfer: ``kernel_cutlass_kernel_<module
    path><Class>_object_at_…``), a Mosaic GPU kernel's name without its suffix, or a Triton kernel's name."""
    if name.startswith("kernel_cutlass_kernel_"):
        classes = re.findall(r"[A-Z]+[a-z][A-Za-z0-9]*", name)
        return classes[0] if classes else name.removeprefix("kernel_cutlass_kernel_")[:60]
    return name.split("_mosaic_gpu")[0][:60]


def section_forward() -> str | None:
    rows = read_rows("forward")
    if rows is None:
        return None
    env = read_env("forward")
    lines = ["## chunk_gated_delta_rule (the forward)", "",
             "`python -m benchmarks.forward` — " + measured_line(env) + " bf16, K = V = 128, log-sigmoid gates, "
             "final state returned; dense shapes from an N(0, 1) initial state. " + timing_methods(rows) +
             " Wall: one Python call (torch: do_bench of the call; JAX: one call per sync). Floor = q, k, v, g, beta, "
             "initial state in and o, final state out at the copy bandwidth.", "", timing_table(rows, True, True)]
    reading = []
    triton = [r for r in rows if r["impl"] == "gdn-triton" and r.get("device_us")]
    ratios = [(r["label"], r["device_us"] / peer["device_us"], peer["impl"]) for r in triton
              if (peer := best_peer(rows, r["shape"]))]
    if ratios:
        worst = max(ratios, key=lambda x: x[1])
        reading.append(f"gdn Triton takes {num(min(x for _, x, _ in ratios), 2)}–{num(worst[1], 2)}× the best "
                       f"peer's device time (the widest gap: {worst[0]}, against {worst[2]}).")
    pallas = {r["shape"]: r["device_us"] for r in rows if r["impl"] == "gdn-pallas" and r.get("device_us")}
    over = [pallas[r["shape"]] / r["device_us"] for r in triton if r["shape"] in pallas]
    if over:
        reading.append(f"gdn Pallas takes {num(min(over), 2)}–{num(max(over), 2)}× gdn Triton's time.")
    default = [(r, d) for r in triton if (d := _row(rows, jax_default_forward(r["shape"]), r["shape"]))
               and d.get("device_us")]
    if default:
        ratios = [d["device_us"] / r["device_us"] for r, d in default]
        reading.append(f"The JAX default (gdn-mosaic on dense inputs, gdn-jax-triton on varlen batches: "
                       f"gdn.pallas.forward.default_forward_lowering) takes {num(min(ratios), 2)}–"
                       f"{num(max(ratios), 2)}× gdn Triton's time.")
    host = read_rows("forward_host")
    if host:
        lines += ["", "Host time per call at " + host[0]["label"] + " (1000 calls back to back, no sync; "
                  "gdn-pallas called eagerly; `forward_host.csv`):", "",
                  table(["implementation", "CPU µs per call"], [[r["impl"], num(r["host_us"])] for r in host])]
    profile = read_rows("forward_profile")
    if profile:
        lines += ["", "Nsight Compute, one call of each at " + profile[0]["label"] + " (`python -m "
                  "benchmarks.profile_forward`, `forward_profile.csv`, " + measured_line(read_env("forward_profile")) +
                  "): per kernel its time, cycles, cycles per chunk of the sequence (T / 64; a context-parallel walk "
                  "takes fewer), achieved occupancy and the largest warp stall reasons (cycles per issued "
                  "instruction); gdn-triton-fused is gdn Triton with the walk that computes o. jla's XLA layout "
                  "kernels of a few µs each are left out.", "",
                  table(["implementation", "kernel", "grid", "registers", "µs", "cycles per chunk", "occupancy %",
                         "largest stalls"],
                        [[r["impl"], kernel_label(r["kernel"]), r["grid"], str(r["registers"]),
                          num(r["us"]), num(r["cycles_per_chunk"], 0), num(r["occupancy_pct"], 1), r["stalls"]]
                         for r in profile if r["us"] >= PROFILE_MIN_US])]
    cold = read_rows("forward_cold")
    if cold:
        lines += ["", "Cold first call (fresh process, empty Triton cache, no JAX compilation cache; compile, "
                  "autotune and run; `forward_cold.csv`, " + measured_line(read_env("forward_cold")) + "):", "",
                  table(["implementation", "shape", "first call s", "import s"],
                        [[r["impl"], r.get("label") or r["shape"], num(r.get("first_call_s"), 2),
                          num(r.get("import_s"), 2)] for r in cold])]
    return "\n".join(lines + [""] + reading[:3])


def section_backward() -> str | None:
    rows = read_rows("backward")
    if rows is None:
        return None
    env = read_env("backward")
    lines = ["## chunk_gated_delta_rule forward + backward (a training step)", "",
             "`python -m benchmarks.backward` — " + measured_line(env) + " bf16, K = V = 128, log-sigmoid gates: the "
             "forward, then the gradients of q, k, v, g, beta and the initial state (dense shapes from an N(0, 1) "
             "initial state, the final state's gradient flowing in; varlen without states). " + timing_methods(rows) +
             " Wall: one Python step. Peak: torch, MiB allocated at the step's peak beyond its inputs; JAX, XLA's "
             "temporaries + outputs of the jitted step. Saved: MiB the forward keeps for the backward beyond its "
             "outputs.", ""]
    cells, seen = [], set()
    for r in rows:
        first = r["shape"] not in seen
        seen.add(r["shape"])
        if r.get("device_us") is not None:
            time = num(r["device_us"]) + (f" ({num(r.get('device_p10_us'))}–{num(r.get('device_p90_us'))})"
                                          if r.get("device_p10_us") is not None else "")
            time += " MISMATCH" if r.get("check") == "MISMATCH" else ""
        else:
            time = f"— ({r.get('note') or 'not run'})"
        cells.append([r.get("label") or r["shape"] if first else "", r["impl"], time, num(r.get("wall_us")),
                      num(r.get("peak_mib"), 0), num(r.get("saved_mib"), 0), num(r.get("gdn-triton_ratio"), 2),
                      num(r.get("gdn-pallas_ratio"), 2)])
    lines.append(table(["shape", "implementation", "µs (p10–p90)", "wall µs", "peak MiB", "saved MiB",
                        "gdn Triton ÷ this", "gdn Pallas ÷ this"], cells))
    notes = [f"{r['impl']} at {r.get('label') or r['shape']}: {r['note']}." for r in rows
             if r.get("device_us") is not None and r.get("note")]
    lines += ["", " ".join(notes)] if notes else []
    cold = read_rows("backward_cold")
    if cold:
        lines += ["", "Cold first step (fresh process, empty Triton cache, no JAX compilation cache; compile, "
                  "autotune and run; `backward_cold.csv`, " + measured_line(read_env("backward_cold")) + "):", "",
                  table(["implementation", "shape", "first step s", "import s"],
                        [[r["impl"], r.get("label") or r["shape"], num(r.get("first_call_s"), 2),
                          num(r.get("import_s"), 2)] for r in cold])]
    return "\n".join(lines)


def section_decode() -> str | None:
    rows = read_rows("decode")
    if rows is None:
        return None
    lines = ["## decode_step", "", "`python -m benchmarks.decode` — " + measured_line(read_env("decode")) +
             " H16 HV32 K = V = 128, bf16 inputs, float32 state; floor = reading and writing the state at the copy "
             "bandwidth. torch: do_bench of the call; JAX: 10 calls per sync.", "",
             table(["N", "implementation", "µs", "% of floor"],
                   [[str(r["N"]), r["impl"], num(r["us"], 2), num(r["pct_floor"], 0)] for r in rows])]
    sweep = read_rows("tune_decode")
    if sweep:
        lines += ["", "The tiling sweep behind `tilings.decode_tiling` (`tune_decode.csv`, " +
                  measured_line(read_env("tune_decode")) + "), µs (% of floor), the spec's row in bold:", "",
                  _pivot(sweep, "N", lambda r: f"BV {r['BV']}, {r['warps']} warps",
                         lambda r: f"{num(r['us'])} ({num(r['pct_floor'], 0)} %)")]
    triton = [r for r in rows if r["impl"] == "gdn-triton"]
    reading = [f"gdn Triton reaches {num(triton[-1]['pct_floor'], 0)} % of the floor at N = {triton[-1]['N']}; "
               f"at small N every implementation is launch-bound."] if triton else []
    return "\n".join(lines + [""] + reading)


def section_decode_serving() -> str | None:
    rows = read_rows("decode_serving")
    if rows is None:
        return None
    lines = ["## decode_step from a state pool (serving)", "",
             "`python -m benchmarks.decode --serving` — " + measured_line(read_env("decode_serving")) +
             " N = 256 sequences from a 1024-row pool updated in place, H16 HV32 K = V = 128, bf16 inputs, float32 "
             "states. decode: one token per sequence (floor: reading and writing the 256 states); spec4: a 4-token "
             "speculative step keeping each token's state in its slot (floor: reading 256 states and writing "
             "4 × 256); g-beta: g and beta given; fused: raw q, k normalized and the gates computed in the kernel; "
             "prefill-pool: chunk_gated_delta_rule over 16 sequences × 1024 tokens reading and writing their pool "
             "rows (floor: the same prefill on dense initial states, timed alike). "
             "torch: do_bench of the call or of its CUDA graph's replay; JAX: 10 calls per sync, the pool donated; "
             "errors against gdn Triton's eager call.", "",
             table(["case", "implementation", "µs (p10–p90)", "floor µs", "× floor", "rel err o", "rel err pool",
                    "graph bits equal"],
                   [[r["case"], r["impl"], f"{num(r['us'], 2)} ({num(r.get('p10_us'), 2)}–{num(r.get('p90_us'), 2)})",
                     num(r["floor_us"], 2), num(r["x_floor"], 3), f"{r['rel_err_o']:.1e}", f"{r['rel_err_pool']:.1e}",
                     "—" if r.get("graph_bits_equal") is None else ("yes" if r["graph_bits_equal"] else "**no**")]
                    for r in rows])]
    reading = []
    for impl in GDN:
        mine = [r for r in rows if r["impl"] == impl]
        if mine:
            worst = max(mine, key=lambda r: r["x_floor"])
            reading.append(f"{impl} takes {num(min(r['x_floor'] for r in mine), 2)}–{num(worst['x_floor'], 2)}× "
                           f"the floor (the most: {worst['case']}).")
    return "\n".join(lines + [""] + reading)


def section_distributed() -> str | None:
    rows = read_rows("distributed")
    if rows is None:
        return None
    return "\n".join([
        "## Context parallel over 2 GPUs", "", "`python -m benchmarks.distributed` — " +
        measured_line(read_env("distributed")) + " One dense sequence from an N(0, 1) initial state, final state "
        "returned; on 2 GPUs each holds half of it (torch: 2 NCCL ranks, CUDA events after a barrier, the slower "
        "rank; JAX: jax.shard_map over 2 devices, 10 pipelined calls per sync). Exchange: the all-gather of the "
        "maps and the combine, timed alone; errors: the 2-GPU o and final state against the 1-GPU call.", "",
        table(["implementation", "problem", "1 GPU ms (p10–p90)", "2 GPUs ms (p10–p90)", "speed-up", "exchange µs",
               "exchange share", "error o, state"],
              [[r["impl"], r["label"], f"{num(r['gpus_1_ms'], 2)} ({num(r['gpus_1_p10_ms'], 2)}–"
                f"{num(r['gpus_1_p90_ms'], 2)})", f"{num(r['gpus_2_ms'], 2)} ({num(r['gpus_2_p10_ms'], 2)}–"
                f"{num(r['gpus_2_p90_ms'], 2)})", f"{num(r['speedup'], 2)}×", num(r["exchange_us"]),
                f"{num(r['exchange_share_pct'], 1)} %", f"{r['error_o']:.2g}, {r['error_state']:.2g}"]
               for r in rows])])


def section_layouts() -> str | None:
    rows = read_rows("layouts")
    if rows is None:
        return None
    return "\n".join(["## Input layouts", "", "`python -m benchmarks.layouts` — " + measured_line(read_env("layouts")) +
                      " gdn Triton chunk_fwd_o, bf16, with q, k, v dense, as slices of one fused projection (read in "
                      "place) and in a layout copied once inside the call; last per shape, those three copies alone "
                      "against their copy floor.", "",
                      table(["shape", "layout", "device µs (p10–p90)", "wall µs", "host µs", "copy floor µs"],
                            [[r["label"], r["layout"], f"{num(r['device_us'])} ({num(r['device_p10_us'])}–"
                              f"{num(r['device_p90_us'])})", num(r["wall_us"]), num(r["host_us"]), num(r["floor_us"])]
                             for r in rows])])


def _pivot(rows: list[dict[str, Any]], column: str, row_label: Callable[[dict], str],
           cell: Callable[[dict], str]) -> str:
    """A table with one row per row_label and one column per value of `column`; spec rows in bold."""
    columns = list(dict.fromkeys(str(r[column]) for r in rows))
    labels = list(dict.fromkeys(row_label(r) for r in rows))
    cells: dict[tuple[str, str], str] = {}
    for r in rows:
        text = cell(r)
        cells[row_label(r), str(r[column])] = f"**{text}**" if r.get("spec") else text
    return table(["", *columns], [[label, *(cells.get((label, c), "—") for c in columns)] for label in labels])


def section_warmup() -> str | None:
    rows = read_rows("warmup")
    if rows is None:
        return None
    lines = ["## Warm-up and compile cost", "", "`python -m benchmarks.warmup` — " + measured_line(read_env("warmup")) +
             " chunk_fwd_o at B1 H16 K = V = 128 bf16, each policy in a fresh process with an empty Triton cache; "
             "pow2-* are the tile-height policy gdn does not use (BT follows T), measured for comparison.", "",
             table(["policy", "warm T", "compiled variants (warm-up / all T)", "configs timed", "warm-up s",
                    "Triton cache KiB", "bit-equal to gdn at T = 64, 65, 8192"],
                   [[r["policy"], str(r.get("warm_ts") or "—"),
                     f"{r.get('variants_after_warmup')} / {r.get('variants_after_all')}",
                     "—" if r.get("configs_tried") is None else str(r["configs_tried"]), num(r.get("warmup_s"), 2),
                     num(r.get("cache_kib_after_warmup"), 0),
                     " ".join("yes" if r.get(f"bit_equal_T{T}") else "no" for T in (64, 65, 8192))] for r in rows])]
    gdn = next((r for r in rows if r["policy"] == "gdn"), None)
    if gdn:
        lines += ["", f"gdn compiles one variant in {num(gdn['warmup_s'], 2)} s (Triton's one-time start-up "
                  "included) and nothing for any later T."]
    return "\n".join(lines)


def _best_table(rows: list[dict[str, Any]], spec_rows: list[dict[str, Any]] | None = None) -> str:
    """Per shape: the spec's row (of spec_rows when given) and the fastest row, µs with (BV, warps, stages,
    pieces)."""
    def described(r: dict[str, Any]) -> str:
        return f"{num(r['us'])} (BV {r['BV']}, {r['warps']} warps, {r['stages']} stages, {r['pieces']} pieces)"

    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        spec_row = next((r for r in (spec_rows or rows) if r["shape"] == shape and r.get("spec")), None)
        best = min(mine, key=lambda r: r["us"])
        out.append([mine[0].get("label") or shape, described(spec_row) if spec_row else "—", described(best)])
    return table(["shape", "the spec's choice", "fastest measured"], out)


def section_tilings() -> str | None:
    parts = []
    sweep = read_rows("tune_chunk_o")
    if sweep:
        parts += ["`python -m benchmarks.tune_chunk_o` (`tune_chunk_o.csv`, " + measured_line(read_env("tune_chunk_o"))
                  + "), chunk_fwd_o µs by tiling (BK, BV, warps, stages), `tilings.chunk_o_tiling`'s row in bold:", "",
                  _pivot(sweep, "label", lambda r: f"({r['BK']}, {r['BV']}, {r['warps']}, {r['stages']})",
                         lambda r: num(r["us"]))]
    walk = read_rows("tune_walk")
    if walk:
        parts += ["", "`python -m benchmarks.tune_forward --only walk` (`tune_walk.csv`, " +
                  measured_line(read_env("tune_walk")) + "), the whole forward by CUDA-graph replay with every walk "
                  "tiling in 1, 2, 4 and 8 pieces per sequence: the spec's choice (`tilings.walk_tiling`, "
                  "`tilings.context_pieces`) against the fastest measured:", "", _best_table(walk)]
    fused = read_rows("tune_fused")
    if fused:
        parts += ["", "`python -m benchmarks.tune_forward --only fused` (`tune_fused.csv`, " +
                  measured_line(read_env("tune_fused")) + "), the walk that computes o itself "
                  "(`tilings.FUSED_WALK`), its fastest tiling and piece count against the spec's forward:", "",
                  _best_table(fused, walk)]
    prepare = read_rows("tune_prepare")
    if prepare:
        parts += ["", "`python -m benchmarks.tune_forward --only prepare` (`tune_prepare.csv`, " +
                  measured_line(read_env("tune_prepare")) + "), the prepare kernel's µs by tiling (BK, warps, "
                  "register cap), `tilings.prepare_tiling`'s row in bold:", "",
                  _pivot(prepare, "label", lambda r: f"({r['BK']}, {r['warps']}, {r.get('maxnreg') or '—'})",
                         lambda r: num(r["us"]))]
    stages = read_rows("forward_stages")
    if stages:
        parts += ["", "`python -m benchmarks.tune_forward --only stages` (`forward_stages.csv`, " +
                  measured_line(read_env("forward_stages")) + "), µs of each kernel of the Triton forward (CUDA-graph "
                  "replay):", "",
                  table(["shape", "pieces", "whole call", "prepare", "piece starts", "walk", "chunk_fwd_o"],
                        [[r.get("label") or r["shape"], str(r.get("pieces")), num(r.get("total_us")),
                          num(r.get("prepare_us")), num(r.get("piece_starts_us")), num(r.get("walk_us")),
                          num(r.get("chunk_fwd_o_us"))] for r in stages])]
    if not parts:
        return None
    return "\n".join(["## Tilings", "", "The sweeps behind the static tables of `gdn/common/tilings.py` (each row "
                      "there cites its measurement):", "", *parts])


# ---------------------------------------------------------------------------------------------- targets

def jax_default_forward(shape: str) -> str:
    """The benchmark row of chunk_gated_delta_rule's JAX default at a benchmark shape on an H200 (bf16, K = V =
    128): the Mosaic GPU walk for dense inputs, triton_call for varlen batches."""
    return "gdn-jax-triton" if shape.startswith("varlen") else "gdn-mosaic"


def _row(rows: list[dict[str, Any]] | None, impl: str, shape: str) -> dict[str, Any] | None:
    return next((r for r in rows or [] if r["impl"] == impl and r["shape"] == shape), None)


def targets() -> list[tuple[str, str, str, bool]]:
    """(reason key, target, measured, met) of every target the current results can judge."""
    chunk_o, forward = read_rows("chunk_o"), read_rows("forward")
    found: list[tuple[str, str, str, bool]] = []

    def judge(rows, impl: str, shape: str, column: str, limit: float, key: str, text: str) -> None:
        """A target on one row's column: at most limit (a time), or at least limit (pct_floor)."""
        r = _row(rows, impl, shape)
        if r and r.get(column) is not None:
            value = r[column]
            measured = f"{num(value, 0)} %" if column == "pct_floor" else f"{num(value)} µs"
            found.append((key, text, measured, value >= limit if column == "pct_floor" else value <= limit))

    t8192, t512 = "B1-T8192-H16-HV16", "B1-T512-H16-HV16"
    judge(chunk_o, "gdn-triton", t8192, "device_us", 72, "chunk_o_t8192_triton", "chunk_fwd_o B1 T8192 H16, gdn Triton "
          "≤ 72 µs")
    judge(chunk_o, "gdn-pallas", t8192, "device_us", 72, "chunk_o_t8192_pallas", "chunk_fwd_o B1 T8192 H16, gdn Pallas "
          "≤ 72 µs")
    for impl, floor_key in (("gdn-triton", "chunk_o_triton_floor"), ("gdn-pallas", "chunk_o_pallas_floor")):
        judge(chunk_o, impl, "B1-T65536-H16-HV16", "pct_floor", 93, floor_key, f"chunk_fwd_o B1 T65536 H16, {impl} "
              "≥ 93 % of the floor")
        judge(chunk_o, impl, "B8-T2048-H16-HV32", "pct_floor", 90, floor_key, f"chunk_fwd_o B8 T2048 H16 HV32, {impl} "
              "≥ 90 % of the floor")
        judge(chunk_o, impl, "B1-T8192-H2-HV8", "pct_floor", 85, "chunk_o_few_heads", f"chunk_fwd_o B1 T8192 H2 HV8, "
              f"{impl} ≥ 85 % of the floor")
    judge(chunk_o, "gdn-triton", t512, "device_us", 10, "chunk_o_t512", "chunk_fwd_o B1 T512 H16, gdn Triton ≤ 10 µs")
    for r in chunk_o or []:
        default = _row(chunk_o, "gdn-jax-triton", r["shape"])
        if r["impl"] == "gdn-triton" and r.get("device_us") and default and default.get("device_us"):
            found.append(("jax_default_chunk_o", f"chunk_fwd_o {r['label']}, the JAX default (gdn-jax-triton) ≤ 1.0× "
                          "gdn Triton", f"{num(default['device_us'] / r['device_us'], 2)}×",
                          default["device_us"] <= r["device_us"]))
    host = {r["impl"]: r["host_us"] for r in read_rows("chunk_o_host") or []}
    forward_host = {r["impl"]: r["host_us"] for r in read_rows("forward_host") or []}
    if "gdn-triton" in host:
        found.append(("chunk_o_host", "chunk_fwd_o host time, gdn Triton ≤ 15 µs per call",
                      f"{num(host['gdn-triton'])} µs", host["gdn-triton"] <= 15))
    for op, times in (("chunk_fwd_o", host), ("chunk_gated_delta_rule", forward_host)):
        if "gdn-pallas" in times:
            found.append((f"jax_host_{op}", f"{op}: an eager gdn.pallas call ≤ 30 µs of CPU "
                          "at B1 T512",
                          f"{num(times['gdn-pallas'])} µs", times["gdn-pallas"] <= 30))
    for r in forward or []:
        if r["impl"] != "gdn-triton" or r.get("device_us") is None:
            continue
        peer = best_peer(forward, r["shape"])
        if peer:
            found.append(("forward_vs_peer", f"forward {r['label']}, gdn Triton ≤ 0.9× the best peer",
                          f"{num(r['device_us'] / peer['device_us'], 2)}× {peer['impl']}",
                          r["device_us"] <= 0.9 * peer["device_us"]))
        pallas = _row(forward, "gdn-pallas", r["shape"])
        if pallas and pallas.get("device_us") is not None:
            found.append(("forward_pallas", f"forward {r['label']}, gdn Pallas ≤ 1.25× gdn Triton",
                          f"{num(pallas['device_us'] / r['device_us'], 2)}×",
                          pallas["device_us"] <= 1.25 * r["device_us"]))
        default = _row(forward, jax_default_forward(r["shape"]), r["shape"])
        if default and default.get("device_us") is not None:
            found.append(("jax_default_forward", f"forward {r['label']}, the JAX default ({default['impl']}) ≤ 1.0× "
                          "gdn Triton", f"{num(default['device_us'] / r['device_us'], 2)}×",
                          default["device_us"] <= r["device_us"]))
        if r.get("wall_us") is not None and "graph" in (r.get("device_method") or ""):
            found.append(("", f"forward {r['label']}, gdn Triton wall − device ≤ 25 µs",
                          f"{num(r['wall_us'] - r['device_us'])} µs", r["wall_us"] - r["device_us"] <= 25))
    serving = read_rows("decode_serving") or []
    for r in serving:
        if r["impl"] in GDN:
            kind = r["case"].split("-")[0].rstrip("0123456789")  # decode, spec or prefill
            limit = {"spec": 1.2, "prefill": 1.02}.get(kind, 1.05)
            op = "chunk_gated_delta_rule" if kind == "prefill" else "decode_step"
            found.append((f"serving_{kind}", f"{op} from a pool, {r['case']}, {r['impl']} ≤ {limit}× the floor",
                          f"{num(r['x_floor'], 3)}×", r["x_floor"] <= limit))
    replays = [r for r in serving if r.get("graph_bits_equal") is not None]
    if replays:
        found.append(("", "decode_step from a pool: a CUDA graph's replay gives the eager call's bits (every case)",
                      f"{sum(bool(r['graph_bits_equal']) for r in replays)} of {len(replays)} cases",
                      all(r["graph_bits_equal"] for r in replays)))
    for r in read_rows("forward_cold") or []:
        if r["impl"] in GDN and r.get("first_call_s") is not None:
            found.append(("", f"forward cold first call, {r['impl']} ≤ 6 s", f"{num(r['first_call_s'], 2)} s",
                          r["first_call_s"] <= 6))
    for r in read_rows("distributed") or []:
        found.append(("", f"context parallel {r['label']}, {r['impl']}: 2 GPUs ≥ 1.8× one GPU",
                      f"{num(r['speedup'], 2)}×", r["speedup"] >= 1.8))
        found.append(("", f"context parallel {r['label']}, {r['impl']}: the exchange ≤ 5 % of the 2-GPU call",
                      f"{num(r['exchange_share_pct'], 1)} %", r["exchange_share_pct"] <= 5))
    backward = read_rows("backward")
    for r in backward or []:
        jla = _row(backward, "jla-mosaic", r["shape"])
        if r["impl"] in GDN and r.get("device_us") is not None and jla and jla.get("device_us"):
            limit = 0.8 if r["impl"] == "gdn-triton" else 1.0
            found.append(("backward_vs_jla", f"forward + backward {r['label']}, {r['impl']} ≤ {limit}× jla-mosaic",
                          f"{num(r['device_us'] / jla['device_us'], 2)}×", r["device_us"] <= limit * jla["device_us"]))
    for r in read_rows("backward_cold") or []:
        if r["impl"] in GDN and r.get("first_call_s") is not None:
            found.append(("", f"forward + backward cold first step, {r['impl']} < 10 s",
                          f"{num(r['first_call_s'], 2)} s", r["first_call_s"] < 10))
    return found


def section_targets() -> str | None:
    found = targets()
    if not found:
        return None
    rows = [[text, measured, "yes" if met else "**no**", "" if met else REASONS.get(key, "—")]
            for key, text, measured, met in found]
    return "\n".join(["## Targets", "", "Each target judged on the tables above; where one is not met, the profiler's "
                      "reason.", "", table(["target", "measured", "met", "why not"], rows)])


SECTIONS = (section_chunk_o, section_forward, section_backward, section_decode, section_decode_serving,
            section_distributed, section_layouts, section_warmup, section_tilings, section_targets)


def render() -> str:
    envs = {path.name.removesuffix(".env.json"): json.loads(path.read_text())
            for path in sorted(RESULTS.glob("*.env.json"))}
    parts = ["# gdn benchmark results", "",
             "The current numbers, one snapshot: each section names the command that produced it, and "
             "`python -m benchmarks.report` rebuilds this file from `benchmarks/results/` after the scripts ran. "
             "Every comparison is within one run of one script, unless a note under its table says otherwise.", "",
             "## Environment", "",
             environment_header(envs)]
    for section in SECTIONS:
        text = section()
        if text:
            parts += ["", text]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"the markdown file to write (default {OUT})")
    args = parser.parse_args(argv)
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
