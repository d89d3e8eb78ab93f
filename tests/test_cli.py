"""``python -m gdn``: both ops run end to end in both backends and report errors within tolerance."""

from __future__ import annotations

import re

import pytest

from gdn.__main__ import main


@pytest.mark.parametrize("op", ["chunk_fwd_o", "forward"])
def test_cli_runs_and_reports_small_errors(op: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["--op", op, "--dtype", "float32", "--seqlens", "70,1,0", "--heads", "1", "--value-heads", "2",
                 "--head-k", "16", "--head-v", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"max abs err ([0-9.e+-]+)", out)]
    assert len(errors) == (2 if op == "chunk_fwd_o" else 4), out  # o (and final_state) per backend
    assert max(errors) < 1e-4, out
    assert "nan-free True" in out and "nan-free False" not in out
