"""One framework per install: ``gdn`` and ``gdn.common`` need neither framework, ``gdn.triton`` runs without JAX and
``gdn.pallas`` without torch and triton, and a backend whose framework is missing raises an ImportError naming the
extra to install.

Each install is a fresh interpreter in which the frameworks outside it cannot be found (every import finder is
wrapped to report them absent, as if they were not installed); it runs ``python -m gdn`` on a tiny varlen batch,
whose backends report their error against the float64 reference or the ImportError that skipped them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = {"triton": ("torch", "triton"), "pallas": ("jax", "jaxlib")}
"""The top-level packages each backend imports."""
EXTRAS = {"triton": "torch", "pallas": "jax"}
ALL_PACKAGES = tuple(sorted(p for packages in FRAMEWORKS.values() for p in packages))

_HIDE_PACKAGES = '''
import importlib.abc
import sys

HIDDEN = set(sys.argv[1].split(",")) - {""}


class HiddenPackages(importlib.abc.MetaPathFinder):
    """A finder that reports the hidden top-level packages as absent and defers to the one it wraps otherwise."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [HiddenPackages(finder) for finder in sys.meta_path]
'''

_RUN_CLI = _HIDE_PACKAGES + '''
import gdn
import gdn.common.contract
import gdn.common.example
import gdn.common.reference
import gdn.common.spec
import gdn.common.tilings
from gdn.__main__ import main

code = main(["--dtype", "float32", "--seqlens", "65,1,0", "--heads", "1", "--value-heads", "2",
             "--head-k", "16", "--head-v", "16", "--repeats", "1"])
print("exit code", code)
print("frameworks loaded", ",".join(sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "triton", "jax",
                                                                                         "jaxlib"})))
'''

_IMPORT_ONLY = '''
import importlib
import sys

importlib.import_module(sys.argv[1])
print("frameworks loaded", ",".join(sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "triton", "jax",
                                                                                         "jaxlib"})))
'''


def _run_python(code: str, *args: str) -> str:
    """stdout of a fresh interpreter running code (from the repository root, on the CPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("installed", [(), ("triton",), ("pallas",)], ids=["numpy-only", "torch-only", "jax-only"])
def test_each_install_runs_its_backend_and_names_the_missing_extra(installed: tuple[str, ...]) -> None:
    hidden = [p for backend, packages in FRAMEWORKS.items() if backend not in installed for p in packages]
    out = _run_python(_RUN_CLI, ",".join(hidden))
    for backend in FRAMEWORKS:
        if backend in installed:
            errors = re.findall(rf"^ *{backend}: device .* max abs err ([0-9.e+-]+)", out, re.MULTILINE)
            assert len(errors) == 1 and float(errors[0]) < 1e-4, out
        else:
            needs = rf"^ *{backend}: skipped: gdn\.{backend} needs .*: pip install 'gdn\[{EXTRAS[backend]}\]'$"
            assert re.search(needs, out, re.MULTILINE), out
    assert f"exit code {0 if installed else 1}" in out, out
    loaded = sorted(p for backend in installed for p in FRAMEWORKS[backend])
    assert f"frameworks loaded {','.join(loaded)}\n" in out, out


@pytest.mark.parametrize("backend", sorted(FRAMEWORKS))
def test_a_backend_never_imports_the_other_framework(backend: str) -> None:
    """With both frameworks installed, importing one backend loads its own framework only."""
    out = _run_python(_IMPORT_ONLY, f"gdn.{backend}")
    assert f"frameworks loaded {','.join(sorted(FRAMEWORKS[backend]))}\n" in out, out


def test_the_base_install_depends_on_numpy_and_ml_dtypes_only() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ ;\[]", requirement)[0] for requirement in project["dependencies"]]
    assert sorted(names) == ["ml_dtypes", "numpy"]
    extras = project["optional-dependencies"]
    assert [re.split(r"[<>=!~ ;\[]", r)[0] for r in extras["torch"]] == ["torch", "triton"]
    assert [re.split(r"[<>=!~ ;\[]", r)[0] for r in extras["jax"]] == ["jax", "jaxlib", "absl-py"]
    assert extras["all"] == ["gdn[torch,jax]"]
    assert "gdn[all]" in extras["test"] and "gdn[all]" in extras["bench"]


@pytest.mark.parametrize("module", ["chunk_o", "forward"])
def test_the_shared_triton_kernels_import_triton_only(module: str) -> None:
    """gdn.triton_kernels (launched by gdn.triton and by gdn.pallas.triton_call) needs neither torch nor JAX."""
    out = _run_python(_IMPORT_ONLY, f"gdn.triton_kernels.{module}")
    assert "frameworks loaded triton\n" in out, out


_TRITON_CALL = _HIDE_PACKAGES + '''
import jax.numpy as jnp

from gdn.pallas import chunk_fwd_o, chunk_gated_delta_rule

q, v, h, g = jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 1, 1, 16, 16)), jnp.zeros((1, 8, 1))
for call in (lambda: chunk_fwd_o(q, q, v, h, lowering="triton_call"),
             lambda: chunk_gated_delta_rule(q, q, v, g, g, lowering="triton_call")):
    try:
        call()
    except ImportError as error:
        print("ImportError:", str(error).splitlines()[0])
'''


def test_lowering_triton_call_without_triton_names_it() -> None:
    """A JAX-only install runs every lowering but triton_call, which says that it needs Triton."""
    out = _run_python(_TRITON_CALL, "torch,triton")
    needs = "ImportError: gdn.pallas.triton_call (lowering='triton_call') needs Triton: pip install triton\n"
    assert out.count(needs) == 2, out
