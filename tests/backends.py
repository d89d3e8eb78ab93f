"""One adapter per backend, so every test body is written once and parametrized over backends.

Each adapter turns OpInputs (numpy) into its framework's arrays, calls chunk_fwd_o and returns numpy float64.
Triton runs compiled on CUDA when torch sees a GPU, else through TRITON_INTERPRET=1 (set in conftest.py).
Pallas runs compiled when JAX's default backend is a GPU, else in interpret mode.
"""

from __future__ import annotations

import functools

import numpy as np

from tests.cases import OpInputs


class TritonBackend:
    name = "triton"

    @functools.cached_property
    def torch(self):
        import torch

        return torch

    @property
    def on_gpu(self) -> bool:
        return self.torch.cuda.is_available()

    def supports(self, dtype: str) -> bool:
        # The Triton 3.9 interpreter returns garbage from tl.dot on bf16 operands: bf16 is covered on the GPU.
        return dtype != "bfloat16" or self.on_gpu

    def convert(self, inputs: OpInputs) -> dict:
        torch = self.torch
        device = "cuda" if self.on_gpu else "cpu"
        converted = {}
        for name, array in inputs.arrays.items():
            converted[name] = None if array is None else torch.from_numpy(np.ascontiguousarray(array)).to(
                device=device, dtype=getattr(torch, inputs.dtypes[name]))
        return converted

    def run(self, inputs: OpInputs) -> np.ndarray:
        from gdn.triton import chunk_fwd_o

        args = self.convert(inputs)
        # Poison the allocator: o is torch.empty_like(v); on CUDA it reuses this freed NaN block, so any row
        # the kernel fails to write stays NaN instead of holding an earlier call's correct answer.
        poison = self.torch.full_like(args["v"], float("nan"))
        del poison
        out = chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], inputs.scale,
                          args["cu_seqlens"], args["chunk_indices"])
        return out.float().cpu().numpy().astype(np.float64)


class PallasBackend:
    name = "pallas"

    def supports(self, dtype: str) -> bool:
        return True

    def convert(self, inputs: OpInputs) -> dict:
        import jax.numpy as jnp

        return {name: None if array is None else jnp.asarray(array, dtype=inputs.dtypes[name])
                for name, array in inputs.arrays.items()}

    def run(self, inputs: OpInputs) -> np.ndarray:
        from gdn.pallas import chunk_fwd_o

        args = self.convert(inputs)
        out = chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], inputs.scale,
                          args["cu_seqlens"], args["chunk_indices"])
        return np.asarray(out.astype("float32"), dtype=np.float64)


BACKENDS = {backend.name: backend for backend in (TritonBackend(), PallasBackend())}
