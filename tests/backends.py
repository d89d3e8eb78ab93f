"""One adapter per backend, so every test body is written once and parametrized over backends.

Each adapter turns OpInputs (numpy) into its framework's arrays, calls chunk_fwd_o (run) or decode_step and
returns numpy float64.
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

    def supports(self, dtype: str, op: str = "chunk_fwd_o") -> bool:
        # The Triton 3.9 interpreter returns garbage from tl.dot on bf16 operands: bf16 is covered on the GPU.
        # decode_step has no tl.dot and runs bf16 interpreted too (the interpreter's float32 → bf16 store
        # truncates instead of rounding to nearest: within one bf16 ulp).
        return dtype != "bfloat16" or self.on_gpu or op == "decode_step"

    def convert(self, inputs: OpInputs) -> dict:
        torch = self.torch
        device = "cuda" if self.on_gpu else "cpu"
        converted = {}
        for name, array in inputs.arrays.items():
            converted[name] = None if array is None else torch.from_numpy(np.ascontiguousarray(array)).to(
                device=device, dtype=getattr(torch, inputs.dtypes[name]))
        return converted

    def poison(self, *like) -> None:
        """Poison the allocator: outputs are torch.empty_like(these); on CUDA they reuse the freed NaN blocks,
        so anything the kernel fails to write stays NaN instead of holding an earlier call's correct answer."""
        poison = [self.torch.full_like(x, float("nan")) for x in like]
        del poison

    @staticmethod
    def numpy(x) -> np.ndarray:
        return x.float().cpu().numpy().astype(np.float64)

    def run(self, inputs: OpInputs) -> np.ndarray:
        from gdn.triton import chunk_fwd_o

        args = self.convert(inputs)
        self.poison(args["v"])
        out = chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], inputs.scale,
                          args["cu_seqlens"], args["chunk_indices"])
        return self.numpy(out)

    def decode_step(self, inputs: OpInputs) -> tuple[np.ndarray, np.ndarray]:
        from gdn.triton import decode_step

        a = self.convert(inputs)
        self.poison(a["v"], a["state"])
        o, state = decode_step(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], inputs.scale)
        return self.numpy(o), self.numpy(state)


class PallasBackend:
    name = "pallas"

    def supports(self, dtype: str, op: str = "chunk_fwd_o") -> bool:
        return True

    def convert(self, inputs: OpInputs) -> dict:
        import jax.numpy as jnp

        return {name: None if array is None else jnp.asarray(array, dtype=inputs.dtypes[name])
                for name, array in inputs.arrays.items()}

    @staticmethod
    def numpy(x) -> np.ndarray:
        return np.asarray(x.astype("float32"), dtype=np.float64)

    def run(self, inputs: OpInputs) -> np.ndarray:
        from gdn.pallas import chunk_fwd_o

        args = self.convert(inputs)
        out = chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], inputs.scale,
                          args["cu_seqlens"], args["chunk_indices"])
        return self.numpy(out)

    def decode_step(self, inputs: OpInputs) -> tuple[np.ndarray, np.ndarray]:
        from gdn.pallas import decode_step

        a = self.convert(inputs)
        o, state = decode_step(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], inputs.scale)
        return self.numpy(o), self.numpy(state)


BACKENDS = {backend.name: backend for backend in (TritonBackend(), PallasBackend())}
