"""The benchmark scripts on a machine without a GPU: their command lines parse, a peer that is not installed is a
row (never an error), and benchmarks.report renders RESULTS.md from the committed results."""

from __future__ import annotations

import importlib

import pytest

SCRIPTS = ("chunk_o", "forward", "backward", "decode", "distributed", "layouts", "warmup", "tune_chunk_o",
           "tune_forward", "profile_chunk_o", "profile_forward", "report")


@pytest.mark.parametrize("script", SCRIPTS)
def test_command_line_parses(script: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m benchmarks.{script}" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["forward", "backward"])
def test_missing_peers_are_rows(script: str) -> None:
    """Every implementation of the forward and backward benchmarks gets a row; what is absent here says
    "not installed"."""
    module = importlib.import_module(f"benchmarks.{script}")
    impls = module.load_impls(list(module.IMPLS))
    assert list(impls) == list(module.IMPLS)
    for impl in impls.values():
        assert impl.make is not None or impl.note.startswith("not installed"), impl


def test_shapes_are_the_benchmark_problems() -> None:
    from benchmarks import shapes

    names = [s.name for s in shapes.SHAPES]
    assert names == ["B1-T512-H16-HV16", "B1-T8192-H16-HV16", "B1-T8192-H2-HV8", "B1-T8192-H16-HV32",
                     "B8-T2048-H16-HV32", "B1-T65536-H16-HV16", "varlen16-T16384-H4-HV8"]
    varlen = shapes.SHAPES[-1]
    assert len(varlen.seqlens) == 16 and sum(varlen.seqlens) == varlen.T == 16384
    assert shapes.select(shapes.SHAPES, "B1-T8192-*") == shapes.SHAPES[1:4]
    with pytest.raises(ValueError, match="match no shape"):
        shapes.select(shapes.SHAPES, "B3-*")


def test_report_renders_the_committed_results() -> None:
    from benchmarks import report

    text = report.render()
    for title in ("## Environment", "## chunk_fwd_o", "## chunk_gated_delta_rule (the forward)", "## decode_step",
                  "## Targets"):
        assert title in text


def test_report_shows_the_decode_serving_rows(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows as benchmarks.decode --serving writes them (harness.write_results) give RESULTS.md their section and
    the serving targets."""
    from benchmarks import harness, report

    def row(case: str, impl: str, x_floor: float, bits: bool | None = None) -> dict:
        return {"case": case, "impl": impl, "N": 256, "pool": 1024, "tokens": 4 if case.startswith("spec") else 1,
                "us": 100 * x_floor, "p10_us": 99 * x_floor, "p90_us": 101 * x_floor, "floor_us": 100.0,
                "x_floor": x_floor, "rel_err_o": 0.0, "rel_err_pool": 0.0, "method": "do_bench",
                "graph_bits_equal": bits}

    rows = [row("decode-g-beta", "gdn-triton", 1.02), row("decode-g-beta", "gdn-triton-cuda-graph", 1.01, True),
            row("decode-g-beta", "gdn-pallas", 1.08), row("spec4-fused", "gdn-triton", 1.15)]
    harness.write_results(tmp_path, "decode_serving", {"date": "today", "copy bandwidth": "4.000 TB/s"}, rows)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.render()
    assert "## decode_step from a state pool (serving)" in text
    assert "| decode-g-beta | gdn-triton-cuda-graph | 101.00 (99.99–102.01) | 100.00 | 1.010 |" in text
    targets = {target: met for _, target, _, met in report.targets()}
    assert targets["decode_step from a pool, decode-g-beta, gdn-triton ≤ 1.05× the floor"]
    assert not targets["decode_step from a pool, decode-g-beta, gdn-pallas ≤ 1.05× the floor"]
    assert targets["decode_step from a pool, spec4-fused, gdn-triton ≤ 1.2× the floor"]
    assert targets["decode_step from a pool: a CUDA graph's replay gives the eager call's bits (every case)"]


def test_report_shows_the_layouts_rows(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.layouts' rows, as the script writes them, become the report's input-layouts table."""
    from benchmarks import harness, layouts, report, shapes

    shape = shapes.select(shapes.SHAPES, "B1-T512-*")[0]
    timing = harness.Timing(12.5, 12.0, 13.0, 10, "test")
    rows = [layouts.layout_row(shape, "fused", timing, timing, host_us=9.0),
            layouts.layout_row(shape, "the 3 copies alone", timing, None, floor_us=4.0)]
    harness.write_results(tmp_path, "layouts", {"date": "today"}, rows)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.section_layouts()
    assert "| B1 T512 H16 | fused | 12.5 (12.0–13.0) | 12.5 | 9.0 | — |" in text
    assert "| B1 T512 H16 | the 3 copies alone | 12.5 (12.0–13.0) | — | — | 4.0 |" in text


def test_profile_rows_come_from_ncu_csv_by_marker() -> None:
    """benchmarks.profile_forward reads ncu's raw CSV (header, units, one line per kernel): each kernel goes to the
    implementation whose marker kernel precedes it, its cycles are divided by the sequence's chunks, and the three
    largest stall reasons are named."""
    from benchmarks import profile_forward, shapes

    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name", "Grid Size", "gpu__time_duration.sum", "sm__cycles_elapsed.max",
              "sm__warps_active.avg.pct_of_peak_sustained_active"] + [stall.format(r) for r in ("wait", "barrier",
                                                                                                  "math", "misc")]
    lines = [header, ["", "", "", "ns", "cycle", "%"] + ["inst"] * 4,
             ["0", "spin_kernel", "1", "10", "1", "1", "0", "0", "0", "0"],
             ["1", "chunk_walk_kernel", "(8, 16, 1)", "2,000", "12800", "6.1", "1.5", "9", "0.5", "2"],
             ["2", "spin_kernel", "1", "10", "1", "1", "0", "0", "0", "0"],
             ["3", "fused_fwd", "(132, 1, 1)", "1000", "6400", "12", "3", "0", "1", "0"]]
    text = "==PROF== noise\n" + "\n".join(",".join(f'"{v}"' for v in line) for line in lines) + "\n"
    shape = shapes.Shape(1, 8192, 16, 16)
    rows = profile_forward.kernel_rows(text, shape, ["gdn-triton", "jla-mosaic"])
    assert [(r["impl"], r["kernel"]) for r in rows] == [("gdn-triton", "chunk_walk_kernel"),
                                                         ("jla-mosaic", "fused_fwd")]
    assert rows[0]["us"] == 2.0 and rows[0]["cycles_per_chunk"] == 12800 / 128
    assert rows[0]["stalls"] == "barrier 9.0; misc 2.0; wait 1.5"
