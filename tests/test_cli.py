"""``python -m gdn``: every op (chunk_fwd_o, the forward, decode) runs end to end in both backends and reports
errors within tolerance."""

from __future__ import annotations

import re

import pytest

from gdn.__main__ import main


@pytest.mark.parametrize("op", ["chunk_fwd_o", "forward", "decode"])
def test_cli_runs_and_reports_small_errors(op: str, capsys: pytest.CaptureFixture) -> None:
    seqlens = "3,1,0,2" if op == "decode" else "70,1,0"  # decode: tokens per sequence, at most 4
    assert main(["--op", op, "--dtype", "float32", "--seqlens", seqlens, "--heads", "1", "--value-heads", "2",
                 "--head-k", "16", "--head-v", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"max abs err ([0-9.e+-]+)", out)]
    assert len(errors) == (2 if op == "chunk_fwd_o" else 4), out  # o (and final_state / pool) per backend
    assert max(errors) < 1e-4, out
    assert "nan-free True" in out and "nan-free False" not in out
