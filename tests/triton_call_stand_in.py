"""A stand-in for jaxlib's Triton custom-call bindings (jax._src.lib.gpu_triton, which exist with JAX's CUDA plugin
only), so that gdn.pallas.triton_call lowers its launches for sm_90 on a CPU machine: Triton compiles the real
kernels, and the stand-in records what each launch hands jaxlib. lowered() runs a lowering script in a fresh
interpreter without TRITON_INTERPRET; the script calls install() and prints what it recorded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

launches: list[dict] = []
"""Per launch, in order: kernel [name, num_warps, num_ctas, shared bytes, capability, scratch keywords], ptx
[target, entry name, entry parameter count], grid [x, y, z] and parameters (["array", bytes to zero,
divisibility] per pointer, ["scalar", value, type] per scalar)."""


class StandIn:
    """jaxlib's gpu_triton bindings as gdn.pallas.triton_call calls them."""

    class TritonKernel:
        def __init__(self, *args, **kwargs):
            entry = re.search(r"\.entry (\w+)\(([^)]*)\)", args[4])
            launches.append({"kernel": list(args[:4]) + [args[6], kwargs],
                             "ptx": [re.search(r"\.target (\w+)", args[4]).group(1), entry.group(1),
                                     entry.group(2).count(".param")]})

    class TritonKernelCall:
        def __init__(self, kernel, *grid_and_parameters):
            launches[-1].update(grid=list(grid_and_parameters[:3]), parameters=grid_and_parameters[3])

        def to_proto(self, name, metadata):
            return b"call " + name.encode()

    @staticmethod
    def create_array_parameter(bytes_to_zero, divisibility):
        return ["array", bytes_to_zero, divisibility]

    @staticmethod
    def create_scalar_parameter(value, dtype):
        return ["scalar", value, dtype]


def install(capability: int = 90) -> None:
    """Make gdn.pallas.triton_call compile for sm_<capability> and build its calls against the stand-in."""
    from gdn.pallas import triton_call

    triton_call.kernel_call_library = lambda: StandIn
    triton_call.device_capability = lambda op: capability


def custom_calls(hlo_text: str) -> list[str]:
    """The stablehlo.custom_call lines of a lowered program."""
    return [line.strip() for line in hlo_text.splitlines() if "stablehlo.custom_call" in line]


def lowered(script: str, setup: list) -> dict:
    """The JSON that script (Python source) prints last, run in a fresh interpreter on the CPU without
    TRITON_INTERPRET (Triton compiles for real), with json.dumps(setup) as its argument."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, json.dumps(setup)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])
