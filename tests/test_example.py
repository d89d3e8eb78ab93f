"""examples/serve_gdn.py: the serving example runs in both frameworks and matches the float64 layer."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve_gdn.py"


@pytest.mark.parametrize("backend", ["triton", "pallas"])
def test_serving_example_matches_the_float64_layer(backend: str, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("serve_gdn", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_gdn", example)  # its dataclasses look their module up
    spec.loader.exec_module(example)
    assert example.main(["--backend", backend]) == 0
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"max error vs the float64 layer ([0-9.e+-]+)", out)]
    assert len(errors) == 1 and errors[0] < 5e-4, out
