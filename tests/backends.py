"""One adapter per backend, so every test body is written once and parametrized over backends.

Each adapter turns OpInputs (numpy) into its framework's arrays, calls chunk_fwd_o (run), decode_step,
chunk_gated_delta_rule (forward), its first two stages (stages), its gradients through the framework's autodiff
(gradients) or its backward directly (backward), and returns numpy float64.
Triton runs compiled on CUDA when torch sees a GPU, else through TRITON_INTERPRET=1 (set in conftest.py); its
outputs start as NaN (conftest.nan_poisoned_outputs). Pallas runs compiled when JAX's default backend is a GPU,
else in interpret mode, whose outputs start as NaN.
"""

from __future__ import annotations

import functools

import numpy as np

from gdn.common import forward_contract, spec
from tests.cases import OpInputs

DECODE_ARGS = ("q", "k", "v", "g", "beta", "state", "state_indices", "cu_seqlens", "num_accepted_tokens", "a", "b",
               "A_log", "dt_bias")
"""decode_step's array arguments: the first six positional, the rest keywords."""
SOFTPLUS = (spec.SOFTPLUS_BETA, spec.SOFTPLUS_THRESHOLD)
INDEX_ARGS = ("state_indices", "cu_seqlens", "num_accepted_tokens")
"""decode_step's index arrays, whose host values are checked before a call."""


class TritonBackend:
    name = "triton"

    @functools.cached_property
    def torch(self):
        import torch

        return torch

    @property
    def on_gpu(self) -> bool:
        return self.torch.cuda.is_available()

    @property
    def interpreted(self) -> bool:
        return not self.on_gpu

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
            # a copy, never a view of the numpy array: a pool is updated in place
            converted[name] = None if array is None else torch.from_numpy(np.ascontiguousarray(array)).to(
                device=device, dtype=getattr(torch, inputs.dtypes[name]), copy=True)
        return converted

    @staticmethod
    def numpy(x) -> np.ndarray:
        return x.float().cpu().numpy().astype(np.float64)

    def run(self, inputs: OpInputs) -> np.ndarray:
        from gdn.triton import chunk_fwd_o

        args = self.convert(inputs)
        out = chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], inputs.scale,
                          args["cu_seqlens"], args["chunk_indices"])
        return self.numpy(out)

    def decode_step(self, inputs: OpInputs, use_qk_l2norm_in_kernel: bool = False,
                    softplus: tuple[float, float] = SOFTPLUS) -> tuple[np.ndarray, np.ndarray]:
        """decode_step on the arrays of inputs named as its arguments (absent ones None): (o, the states after:
        the new state, or the pool updated in place)."""
        from gdn.triton import decode_step

        a = self.convert(inputs)
        args = {n: a.get(n) for n in DECODE_ARGS}
        o, state = decode_step(*(args[n] for n in DECODE_ARGS[:6]), inputs.scale,
                               **{n: args[n] for n in DECODE_ARGS[6:]}, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                               softplus_beta=softplus[0], softplus_threshold=softplus[1])
        assert a.get("state_indices") is None or state is a["state"], "the pool is updated in place and returned"
        return self.numpy(o), self.numpy(state)

    def forward(self, inputs: OpInputs, output_final_state: bool = True,
                use_qk_l2norm_in_kernel: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """chunk_gated_delta_rule on the arrays of inputs named as its arguments (the serving ones of
        FORWARD_SERVING_ARGS when present): (o, the final state: with state_indices, the pool updated in place)."""
        from gdn.triton import chunk_gated_delta_rule

        a = self.convert(inputs)
        o, state = chunk_gated_delta_rule(**{n: a[n] for n in FORWARD_ARGS}, scale=inputs.scale,
                                          output_final_state=output_final_state,
                                          **{n: a.get(n) for n in FORWARD_SERVING_ARGS},
                                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        if a.get("state_indices") is not None and output_final_state:
            assert state is a["initial_state"], "the pool is updated in place and returned"
        return self.numpy(o), None if state is None else self.numpy(state)

    def gradients(self, inputs: OpInputs, do: np.ndarray, final_state_gradient: np.ndarray | None,
                  use_qk_l2norm_in_kernel: bool = False) -> dict[str, np.ndarray]:
        """Gradients of chunk_gated_delta_rule through its autograd, do and final_state_gradient (None: the final
        state is not output) as the outputs' gradients: {name: float64} for every differentiable input given (the
        raw gates and state_indices, when inputs hold them, passed as keywords)."""
        from gdn.triton import chunk_gated_delta_rule

        torch = self.torch
        a = self.convert(inputs)
        wrt = [n for n in DIFFERENTIABLE_ARGS if a.get(n) is not None]
        for n in wrt:
            a[n].requires_grad_(True)
        o, state = chunk_gated_delta_rule(**{n: a.get(n) for n in FORWARD_ARGS + FORWARD_SERVING_ARGS},
                                          scale=inputs.scale, output_final_state=final_state_gradient is not None,
                                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
        outputs, grads = [o], [torch.from_numpy(np.ascontiguousarray(do)).to(o.device, o.dtype)]
        if state is not None:
            outputs.append(state)
            grads.append(torch.from_numpy(np.ascontiguousarray(final_state_gradient)).to(state.device))
        torch.autograd.backward(outputs, grads)
        return {n: self.numpy(a[n].grad) for n in wrt}

    def backward(self, inputs: OpInputs, do: np.ndarray, final_state_gradient: np.ndarray | None,
                 do_dtype: str | None = None) -> tuple:
        """gdn.triton.backward.backward called directly (dq, dk, dv, dg, dbeta, d initial_state or None); do in
        do_dtype (default: v's)."""
        from gdn.triton.backward import backward

        torch = self.torch
        a = self.convert(inputs)
        do_t = torch.from_numpy(np.ascontiguousarray(do)).to(a["v"].device,
                                                             getattr(torch, do_dtype or inputs.dtypes["v"]))
        dht = (None if final_state_gradient is None
               else torch.from_numpy(np.ascontiguousarray(final_state_gradient)).to(a["v"].device))
        return backward(a["q"], a["k"], a["v"], a["g"], a["beta"], do_t, dht, inputs.scale, a["initial_state"],
                        a["cu_seqlens"], a["chunk_indices"])

    def forward_in_pieces(self, inputs: OpInputs, pieces: int, output_final_state: bool = True,
                          fused: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The forward with each sequence cut into that many pieces (the context-parallel path from 2 on),
        whatever tilings.context_pieces would choose; fused: o from the walk (tilings.FUSED_WALK); with
        lowering="mosaic_gpu", the Mosaic GPU walk."""
        from gdn.triton import forward

        a = self.convert(inputs)
        problem = self._forward_problem(a, inputs.arrays["cu_seqlens"], output_final_state)
        scale = spec.default_scale(problem.K) if inputs.scale is None else inputs.scale
        o, state = forward.forward(problem, a["q"], a["k"], a["v"], a["g"], a["beta"], scale, a["initial_state"],
                                   a["cu_seqlens"], self._chunk_indices(inputs, a), pieces, fused,
                                   state_indices=a.get("state_indices"))
        return self.numpy(o), None if state is None else self.numpy(state)

    def _chunk_indices(self, inputs: OpInputs, a: dict):
        cu = inputs.arrays["cu_seqlens"]
        return None if cu is None else self.torch.from_numpy(spec.prepare_chunk_indices(cu)).to(a["cu_seqlens"].device)

    @staticmethod
    def _forward_problem(a: dict, cu_seqlens_values: np.ndarray | None,
                         output_final_state: bool) -> forward_contract.ForwardProblem:
        """The spec's forward problem of converted arguments, as chunk_gated_delta_rule checks them."""
        from gdn.triton.arrays import array_info, tensor_keys

        names = FORWARD_ARGS + ("state_indices",)
        keys = tensor_keys(names, [a.get(n) for n in names])
        infos = [None if key is None else array_info(key) for key in keys]
        return forward_contract.validate_forward_inputs(*infos[:-1], cu_seqlens_values=cu_seqlens_values,
                                                        output_final_state=output_final_state, state_indices=infos[-1])

    def stages(self, inputs: OpInputs, kernel_cu_seqlens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """prepare and the walk storing its states; kernel_cu_seqlens: what the kernels read instead of the
        (checked) cu_seqlens of inputs."""
        from gdn.triton import forward

        a = self.convert(inputs)
        problem = self._forward_problem(a, inputs.arrays["cu_seqlens"], True)
        cu = a["cu_seqlens"] if kernel_cu_seqlens is None else self.torch.from_numpy(kernel_cu_seqlens).to(
            a["cu_seqlens"].device)
        g_cum, w, u = forward.prepare(problem, a["k"], a["v"], a["g"], a["beta"], cu, self._chunk_indices(inputs, a))
        h, v_new, final_state = forward.states(problem, a["k"], w, u, g_cum, a["initial_state"], cu)
        return {name: self.numpy(x) for name, x in zip(STAGE_OUTPUTS, (g_cum, w, u, h, v_new, final_state))}


FORWARD_ARGS = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "chunk_indices")
FORWARD_SERVING_ARGS = ("state_indices", "a", "b", "A_log", "dt_bias")
"""chunk_gated_delta_rule's serving arguments (keywords), passed when inputs holds them."""
DIFFERENTIABLE_ARGS = ("q", "k", "v", "g", "beta", "initial_state", "a", "b", "A_log", "dt_bias")
STAGE_OUTPUTS = ("g_cum", "w", "u", "h", "v_new", "final_state")


class PallasBackend:
    name = "pallas"
    lowering = "triton"
    """The lowering argument of gdn.pallas.chunk_fwd_o and chunk_gated_delta_rule: pinned to the Pallas kernels, whose
    bits every call of this backend then has (the ops' default, None, runs triton_call on a CUDA GPU, and the Pallas
    kernels for a state pool)."""

    @property
    def interpreted(self) -> bool:
        from gdn.pallas.arrays import resolve_interpret

        return resolve_interpret(None)

    def supports(self, dtype: str, op: str = "chunk_fwd_o") -> bool:
        return True

    def convert(self, inputs: OpInputs) -> dict:
        import jax
        import jax.numpy as jnp

        # copies (jnp.array), never views of the numpy arrays: a pool is donated and updated in place
        converted = {name: None if array is None else jnp.array(array, dtype=inputs.dtypes[name])
                     for name, array in inputs.arrays.items()}
        if jax.default_backend() == "gpu":
            # NaN arrays the size of the outputs (o and the state are v- and state-sized), freed at once: XLA's
            # allocator hands their blocks to the next program's outputs, so an element the kernel fails to
            # write most likely reads NaN. The interpreter fills its outputs with NaN itself.
            for name in ("v", "state", "initial_state"):
                if converted.get(name) is not None:
                    jnp.full(converted[name].shape, jnp.nan, converted[name].dtype).block_until_ready()
        return converted

    @staticmethod
    def numpy(x) -> np.ndarray:
        return np.asarray(x.astype("float32"), dtype=np.float64)

    def run(self, inputs: OpInputs) -> np.ndarray:
        from gdn.pallas import chunk_fwd_o

        args = self.convert(inputs)
        out = chunk_fwd_o(args["q"], args["k"], args["v"], args["h"], args["g"], inputs.scale,
                          args["cu_seqlens"], args["chunk_indices"], lowering=self.lowering)
        return self.numpy(out)

    def run_on_grid(self, inputs: OpInputs, programs: int | None) -> tuple[np.ndarray, int]:
        """chunk_fwd_o with a grid of ``programs`` programs (None: the spec's choice), and its work items."""
        from gdn.pallas.arrays import as_index, resolve_interpret
        from gdn.pallas.chunk_o import checked_problem, launch

        a = self.convert(inputs)
        cu = inputs.arrays["cu_seqlens"]
        chunk_indices = None if cu is None else as_index(spec.prepare_chunk_indices(cu))
        problem = checked_problem(*(a[n] for n in ("q", "k", "v", "h", "g", "cu_seqlens")), chunk_indices)
        scale = spec.default_scale(problem.K) if inputs.scale is None else inputs.scale
        out = launch(a["q"], a["k"], a["v"], a["h"], a["g"], scale, as_index(a["cu_seqlens"]), chunk_indices,
                     problem=problem, interpret=resolve_interpret(None), programs=programs)
        return self.numpy(out), problem.num_programs

    def decode_step(self, inputs: OpInputs, use_qk_l2norm_in_kernel: bool = False,
                    softplus: tuple[float, float] = SOFTPLUS, host_indices: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """decode_step on the arrays of inputs named as its arguments (absent ones None): (o, the states after:
        the new state, or the updated pool); host_indices: the index arrays passed as numpy."""
        from gdn.pallas import decode_step

        a = self.convert(inputs)
        if host_indices:  # numpy index arrays: values checked before the call on any device
            a.update({n: inputs.arrays[n] for n in INDEX_ARGS if inputs.arrays.get(n) is not None})
        args = {n: a.get(n) for n in DECODE_ARGS}
        o, state = decode_step(*(args[n] for n in DECODE_ARGS[:6]), inputs.scale,
                               **{n: args[n] for n in DECODE_ARGS[6:]}, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                               softplus_beta=softplus[0], softplus_threshold=softplus[1])
        return self.numpy(o), self.numpy(state)

    def forward(self, inputs: OpInputs, output_final_state: bool = True,
                use_qk_l2norm_in_kernel: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """chunk_gated_delta_rule on the arrays of inputs named as its arguments (the serving ones of
        FORWARD_SERVING_ARGS when present): (o, the final state: with state_indices, the updated pool)."""
        from gdn.pallas import chunk_gated_delta_rule

        a = self.convert(inputs)
        if inputs.arrays.get("state_indices") is not None:  # host values, checked before the call on any device
            a["state_indices"] = inputs.arrays["state_indices"]
        o, state = chunk_gated_delta_rule(**{n: a[n] for n in FORWARD_ARGS}, scale=inputs.scale,
                                          output_final_state=output_final_state,
                                          **{n: a.get(n) for n in FORWARD_SERVING_ARGS},
                                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, lowering=self.lowering)
        return self.numpy(o), None if state is None else self.numpy(state)

    def gradients(self, inputs: OpInputs, do: np.ndarray, final_state_gradient: np.ndarray | None,
                  use_qk_l2norm_in_kernel: bool = False) -> dict[str, np.ndarray]:
        """Gradients of chunk_gated_delta_rule through jax.vjp, do and final_state_gradient (None: the final
        state is not output) as the outputs' cotangents: {name: float64} for every differentiable input given (the
        raw gates and state_indices, when inputs hold them, passed as keywords)."""
        import jax
        import jax.numpy as jnp

        from gdn.pallas import chunk_gated_delta_rule

        a = self.convert(inputs)
        wrt = [n for n in DIFFERENTIABLE_ARGS if a.get(n) is not None]

        def forward(*xs):
            args = {**{n: a.get(n) for n in FORWARD_ARGS + FORWARD_SERVING_ARGS}, **dict(zip(wrt, xs))}
            return chunk_gated_delta_rule(**args, scale=inputs.scale,
                                          output_final_state=final_state_gradient is not None,
                                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, lowering=self.lowering)

        (o, _), vjp = jax.vjp(forward, *(a[n] for n in wrt))
        cotangents = (jnp.asarray(do, o.dtype),
                      None if final_state_gradient is None else jnp.asarray(final_state_gradient, jnp.float32))
        return {n: self.numpy(x) for n, x in zip(wrt, vjp(cotangents))}

    def backward(self, inputs: OpInputs, do: np.ndarray, final_state_gradient: np.ndarray | None,
                 do_dtype: str | None = None) -> tuple:
        """gdn.pallas.backward.backward called directly (dq, dk, dv, dg, dbeta, d initial_state or None); do in
        do_dtype (default: v's)."""
        import jax.numpy as jnp

        from gdn.pallas.backward import backward

        a = self.convert(inputs)
        dht = None if final_state_gradient is None else jnp.asarray(final_state_gradient, jnp.float32)
        return backward(a["q"], a["k"], a["v"], a["g"], a["beta"], jnp.asarray(do, do_dtype or inputs.dtypes["v"]),
                        dht, inputs.scale, a["initial_state"], a["cu_seqlens"], a["chunk_indices"])

    def _forward_problem(self, a: dict, cu_seqlens_values: np.ndarray | None,
                         output_final_state: bool) -> forward_contract.ForwardProblem:
        from gdn.pallas import forward

        return forward.checked_problem(*(a[n] for n in FORWARD_ARGS), output_final_state, cu_seqlens_values,
                                       a.get("state_indices"))

    def forward_in_pieces(self, inputs: OpInputs, pieces: int, output_final_state: bool = True,
                          fused: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The forward with each sequence cut into that many pieces (the context-parallel path from 2 on),
        whatever tilings.context_pieces would choose; fused: o from the walk (tilings.FUSED_WALK); with
        lowering="mosaic_gpu", the Mosaic GPU walk."""
        from gdn.pallas import forward
        from gdn.pallas.arrays import as_index, resolve_interpret

        a = self.convert(inputs)
        cu = inputs.arrays["cu_seqlens"]
        problem = self._forward_problem(a, cu, output_final_state)
        scale = spec.default_scale(problem.K) if inputs.scale is None else inputs.scale
        o, state = forward.jitted_forward(
            a["q"], a["k"], a["v"], a["g"], a["beta"], scale, a["initial_state"], as_index(a["cu_seqlens"]),
            None if cu is None else as_index(spec.prepare_chunk_indices(cu)), as_index(a.get("state_indices")),
            problem=problem, pieces=pieces, interpret=resolve_interpret(None), fused=fused,
            walk_lowering="mosaic_gpu" if self.lowering == "mosaic_gpu" else "triton")
        return self.numpy(o), None if state is None else self.numpy(state)

    def stages(self, inputs: OpInputs, kernel_cu_seqlens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """prepare and the walk storing its states; kernel_cu_seqlens: what the kernels read instead of the
        (checked) cu_seqlens of inputs."""
        from gdn.pallas import forward
        from gdn.pallas.arrays import as_index, resolve_interpret

        a = self.convert(inputs)
        cu_values = inputs.arrays["cu_seqlens"]
        problem = self._forward_problem(a, cu_values, True)
        cu = as_index(a["cu_seqlens"] if kernel_cu_seqlens is None else kernel_cu_seqlens)
        ci = None if cu is None else as_index(spec.prepare_chunk_indices(cu_values))
        interpret = resolve_interpret(None)
        g_cum, w, u = forward.prepare(problem, a["k"], a["v"], a["g"], a["beta"], cu, ci, interpret=interpret)
        h, v_new, final_state = forward.states(problem, a["k"], w, u, g_cum, a["initial_state"], cu,
                                               interpret=interpret)
        return {name: self.numpy(x) for name, x in zip(STAGE_OUTPUTS, (g_cum, w, u, h, v_new, final_state))}


class MosaicGpuBackend(PallasBackend):
    """gdn.pallas.chunk_fwd_o and chunk_gated_delta_rule with lowering="mosaic_gpu" (tests/test_chunk_o_mosaic_gpu.py,
    tests/test_forward_mosaic_gpu.py): Mosaic GPU interpret mode on CPU, compiled on an sm_90 GPU; it takes a
    subset of the shapes."""

    name = "pallas-mosaic_gpu"
    lowering = "mosaic_gpu"

    @staticmethod
    def supports_case(case, dtype: str) -> bool:
        from gdn.pallas.mosaic_gpu_tiles import DTYPES, HEAD_DIMS

        return dtype in DTYPES and case.K in HEAD_DIMS and case.V in HEAD_DIMS


class TritonCallBackend(PallasBackend):
    """chunk_fwd_o and chunk_gated_delta_rule with lowering="triton_call" (each its own test file): gdn.triton's
    kernels launched from JAX, compiled on a CUDA GPU only."""

    name = "pallas-triton_call"
    lowering = "triton_call"


BACKENDS = {backend.name: backend for backend in (TritonBackend(), PallasBackend())}
