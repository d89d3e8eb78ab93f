"""The benchmark scripts on a machine without a GPU: their command lines parse, a peer that is not installed is a
row (never an error), and benchmarks.report renders RESULTS.md from the committed results."""

from __future__ import annotations

import importlib

import pytest

SCRIPTS = ("chunk_o", "forward", "decode", "distributed", "warmup", "tune_chunk_o", "tune_forward", "profile_chunk_o",
           "report")


@pytest.mark.parametrize("script", SCRIPTS)
def test_command_line_parses(script: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m benchmarks.{script}" in capsys.readouterr().out


def test_missing_peers_are_rows() -> None:
    """Every implementation of the forward benchmark gets a row; what is absent here says "not installed"."""
    from benchmarks import forward

    impls = forward.load_impls(list(forward.IMPLS))
    assert list(impls) == list(forward.IMPLS)
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
