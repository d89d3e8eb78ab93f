"""The problems every gdn benchmark runs: one shape list and one input factory.

SHAPES are the seven prefill problems of the benchmark tables (bf16, K = V = 128): a short prompt, one long
sequence with many, few and grouped heads, a batch, a very long sequence and a packed varlen batch.
DTYPE_SHAPES repeat B1 T8192 H16 in fp16 and fp32 (chunk_fwd_o only); BACKWARD_SHAPES are the training steps'
problems; DECODE_BATCHES are decode_step's sequence counts at Qwen3-Next's heads, DECODE_POOL and SPEC_TOKENS its
serving shape (a state pool, a speculative step).

Inputs follow the distributions of gdn.common.example, the tests' factory: q, v ~ N(0, 1), k ~ N(0, 1/K) and
h ~ N(0, 1) for chunk_fwd_o (g the chunk-local cumsum of log-sigmoid gates); unit-norm q, k rows, v ~ N(0, 1),
per-token log-sigmoid gates and beta = sigmoid(N(0, 1)) for the forward. The large arrays are drawn on the GPU
with torch (numpy needs seconds per input set at T = 65536); JAX gets the same tensors through DLPack.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import numpy as np

from gdn.common import example, spec

SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Shape:
    """B rows of T tokens, or (seqlens) varlen sequences packed along T in B = 1; H query/key heads, HV value
    heads, head sizes K, V, input dtype."""

    B: int
    T: int
    H: int
    HV: int
    K: int = 128
    V: int = 128
    dtype: str = "bfloat16"
    seqlens: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        """The id that --shapes patterns match: B1-T8192-H2-HV8, fp16-B1-T8192-H16-HV16, varlen16-T16384-H4-HV8."""
        layout = f"B{self.B}" if self.seqlens is None else f"varlen{len(self.seqlens)}"
        dtype = "" if self.dtype == "bfloat16" else SHORT_DTYPES[self.dtype] + "-"
        heads = "" if (self.K, self.V) == (128, 128) else f"-K{self.K}-V{self.V}"
        return f"{dtype}{layout}-T{self.T}-H{self.H}-HV{self.HV}{heads}"

    @property
    def label(self) -> str:
        """The row title of the RESULTS.md tables: B1 T8192 H2 HV8, varlen 16 seqs 16384 tokens H4 HV8."""
        layout = f"B{self.B} T{self.T}" if self.seqlens is None else f"varlen {len(self.seqlens)} seqs {self.T} tokens"
        heads = f"H{self.H}" + ("" if self.HV == self.H else f" HV{self.HV}")
        dtype = "" if self.dtype == "bfloat16" else SHORT_DTYPES[self.dtype] + " "
        return f"{dtype}{layout} {heads}" + ("" if (self.K, self.V) == (128, 128) else f" K{self.K} V{self.V}")

    @property
    def cu_seqlens(self) -> np.ndarray | None:
        return None if self.seqlens is None else np.cumsum((0,) + self.seqlens).astype(np.int32)

    @property
    def N(self) -> int:
        """Sequences: B, or the varlen count."""
        return self.B if self.seqlens is None else len(self.seqlens)

    @property
    def state_rows(self) -> int:
        """Chunk rows of h per batch row (every sequence's chunks when varlen)."""
        cu = self.cu_seqlens
        return spec.num_chunks(self.T) if cu is None else len(spec.prepare_chunk_indices(cu))

    def chunk_o_bytes(self) -> int:
        """What chunk_fwd_o must move: q, k, v, g, h read once, o written once (q, k once even when HV > H)."""
        e = ITEMSIZE[self.dtype]
        tokens = self.B * self.T
        return (2 * tokens * self.H * self.K * e + 2 * tokens * self.HV * self.V * e + tokens * self.HV * 4
                + self.B * self.state_rows * self.HV * self.K * self.V * e)

    def forward_bytes(self) -> int:
        """What any forward must move: q, k, v, g, beta and (dense shapes) the initial state in; o and the final
        state out."""
        e = ITEMSIZE[self.dtype]
        tokens = self.B * self.T
        state = self.N * self.HV * self.K * self.V * 4
        initial = state if self.seqlens is None else 0
        return (2 * tokens * self.H * self.K * e + 2 * tokens * self.HV * self.V * e + 2 * tokens * self.HV * 4
                + initial + state)


def varlen_seqlens(count: int, longest: int, total: int, seed: int = 0) -> tuple[int, ...]:
    """count sequence lengths in [1, longest] summing to total, one of 1 token and one of `longest` among them
    (exponentially distributed otherwise, fixed seed)."""
    rng = np.random.default_rng(seed)
    rest = rng.exponential(1.0, count - 2)
    rest = np.clip(np.round(rest / rest.sum() * (total - 1 - longest)), 1, longest).astype(int)
    lengths = np.concatenate([[1, longest], rest])
    for i in rng.permutation(np.arange(2, count)):  # spread the rounding remainder over the free lengths
        lengths[i] = np.clip(lengths[i] + (total - lengths.sum()), 1, longest)
    rng.shuffle(lengths)
    return tuple(int(n) for n in lengths)


_VARLEN = varlen_seqlens(16, 4000, 16384)
SHAPES: list[Shape] = [
    Shape(1, 512, 16, 16),
    Shape(1, 8192, 16, 16),
    Shape(1, 8192, 2, 8),
    Shape(1, 8192, 16, 32),
    Shape(8, 2048, 16, 32),
    Shape(1, 65536, 16, 16),
    Shape(1, sum(_VARLEN), 4, 8, seqlens=_VARLEN),
]
DTYPE_SHAPES: list[Shape] = [Shape(1, 8192, 16, 16, dtype=dtype) for dtype in ("float16", "float32")]
BACKWARD_SHAPES: list[Shape] = [Shape(1, 8192, 16, 16), Shape(4, 4096, 16, 32), Shape(2, 8192, 2, 8), SHAPES[-1]]
"""The forward + backward problems: the three shapes jla's forward + backward was measured at when the backward
was planned (one long sequence with many heads, a batch with grouped heads, few heads), and the varlen batch."""
HOST_SHAPE = SHAPES[0]
"""The shape of the host-time rows: short enough that the device finishes a call before the host issues the next."""

DECODE_HEADS = {"H": 16, "HV": 32, "K": 128, "V": 128}
DECODE_BATCHES = (1, 16, 64, 256)
DECODE_POOL = {"N": 256, "pool_rows": 1024}
"""The serving shape: N sequences decoding from a pool of pool_rows states."""
SPEC_TOKENS = 4
"""Tokens per sequence of the speculative decode step (one state slot each)."""


def select(shapes: list[Shape], patterns: str) -> list[Shape]:
    """The shapes whose name matches one of the comma-separated fnmatch patterns (all for an empty string);
    raises ValueError naming a pattern that matches nothing."""
    wanted = [p for p in patterns.split(",") if p]
    missing = [p for p in wanted if not any(fnmatch.fnmatchcase(s.name, p) for s in shapes)]
    if missing:
        raise ValueError(f"--shapes: {missing} match no shape; shapes are: {[s.name for s in shapes]}")
    return [s for s in shapes if not wanted or any(fnmatch.fnmatchcase(s.name, p) for p in wanted)]


# ----------------------------------------------------------------------------------------------- inputs

def _generator(seed: int):
    import torch

    return torch.Generator(device="cuda").manual_seed(seed)


def _varlen_tensors(shape: Shape) -> dict[str, Any]:
    """cu_seqlens (int32, and int64 for FLA), chunk_indices and their host copies, on the GPU."""
    import torch

    cu = shape.cu_seqlens
    if cu is None:
        return {"cu_seqlens": None, "chunk_indices": None}
    chunk_indices = spec.prepare_chunk_indices(cu)
    return {"cu_seqlens": torch.from_numpy(cu).cuda(), "chunk_indices": torch.from_numpy(chunk_indices).cuda(),
            "cu_seqlens_host": cu, "chunk_indices_host": chunk_indices}


def chunk_o_inputs(shape: Shape, seed: int) -> dict[str, Any]:
    """chunk_fwd_o's arguments on the GPU: q, k, v, h in shape.dtype, g float32, cu_seqlens / chunk_indices
    (None unless varlen)."""
    import torch

    dtype = getattr(torch, shape.dtype)
    gen = _generator(seed)
    B, T, H, HV, K, V = shape.B, shape.T, shape.H, shape.HV, shape.K, shape.V

    def normal(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device="cuda") * std).to(dtype)

    log_gates = example.log_sigmoid_gates(np.random.default_rng(seed), (B, T, HV))
    g = example.chunk_local_cumsum(log_gates, shape.cu_seqlens).astype(np.float32)
    t = {"q": normal(B, T, H, K), "k": normal(B, T, H, K, std=K**-0.5), "v": normal(B, T, HV, V),
         "h": normal(B, shape.state_rows, HV, K, V), "g": torch.from_numpy(g).cuda(), **_varlen_tensors(shape)}
    torch.cuda.synchronize()
    return t


def forward_inputs(shape: Shape, seed: int) -> dict[str, Any]:
    """chunk_gated_delta_rule's arguments on the GPU: q, k (unit rows), v in shape.dtype; g (per-token log
    gates) and beta float32; initial_state ~ N(0, 1) float32 for dense shapes, None for varlen (peers that take
    varlen as segment ids have one initial state per row); cu_seqlens / chunk_indices (None unless varlen)."""
    import torch

    dtype = getattr(torch, shape.dtype)
    gen = _generator(seed)
    rng = np.random.default_rng(seed)
    B, T, H, HV, K, V = shape.B, shape.T, shape.H, shape.HV, shape.K, shape.V

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device="cuda")

    def unit_rows(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=-1).to(dtype)

    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, HV))))
    t = {"q": unit_rows(randn(B, T, H, K)), "k": unit_rows(randn(B, T, H, K)), "v": randn(B, T, HV, V).to(dtype),
         "g": torch.from_numpy(example.log_sigmoid_gates(rng, (B, T, HV)).astype(np.float32)).cuda(),
         "beta": torch.from_numpy(beta.astype(np.float32)).cuda(),
         "initial_state": None if shape.seqlens is not None else randn(shape.N, HV, K, V),
         **_varlen_tensors(shape)}
    torch.cuda.synchronize()
    return t


def decode_inputs(N: int, dtype: str = "bfloat16", seed: int = 0) -> dict[str, Any]:
    """decode_step's arguments at DECODE_HEADS on the GPU (gdn.common.example.random_recurrent_inputs, one
    token): q, k, v in dtype, g, beta and state float32."""
    import torch

    a = example.random_recurrent_inputs(N, 1, **DECODE_HEADS, dtype=dtype, seed=seed)
    step = {n: torch.from_numpy(np.ascontiguousarray(a[n][:, 0])).cuda() for n in ("q", "k", "v", "g", "beta")}
    for n in ("q", "k", "v"):
        step[n] = step[n].to(getattr(torch, dtype))
    step["state"] = torch.from_numpy(a["initial_state"]).cuda()
    return step


def decode_serving_inputs(tokens: int, fused: bool) -> dict[str, np.ndarray]:
    """One serving decode_step call's arguments as numpy arrays (gdn.common.example.random_decode_inputs; each
    framework makes its own copy: a JAX pool is donated): DECODE_POOL's sequences of `tokens` tokens each at
    DECODE_HEADS, bf16-rounded q, k, v (a, b), a pool ~ N(0, 1) float32 with distinct random rows per sequence
    (state_indices [N], or with tokens > 1 [N, tokens] per-token slots with cu_seqlens and random accepted
    counts); fused: raw q, k and raw gates a, b with A_log, dt_bias (vLLM's fused path), else unit-norm q, k with
    g, beta."""
    N, rows = DECODE_POOL["N"], DECODE_POOL["pool_rows"]
    a = example.random_decode_inputs(N * tokens, **DECODE_HEADS, dtype="bfloat16", seed=tokens, raw_qk=fused,
                                     raw_gates=fused)
    rng = np.random.default_rng(tokens + 1)
    slots = rng.permutation(rows)[:N * tokens].astype(np.int32)
    a["state_indices"] = slots if tokens == 1 else slots.reshape(N, tokens)
    a["state"] = rng.standard_normal((rows, DECODE_HEADS["HV"], DECODE_HEADS["K"], DECODE_HEADS["V"])).astype(
        np.float32)
    if tokens > 1:
        a["cu_seqlens"] = (np.arange(N + 1) * tokens).astype(np.int32)
        a["num_accepted_tokens"] = rng.integers(1, tokens + 1, N).astype(np.int32)
    return a


def to_jax(tensors: dict[str, Any]) -> dict[str, Any]:
    """The same arrays as jax arrays: the torch tensors through DLPack (zero copy), host arrays as they are."""
    import jax.dlpack
    import jax.numpy as jnp
    import torch

    out = {}
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor):
            try:
                out[name] = jax.dlpack.from_dlpack(x)
            except Exception:  # noqa: BLE001 - any DLPack refusal: copy through the host (exact in float32)
                out[name] = jnp.asarray(x.float().cpu().numpy(), dtype=str(x.dtype).removeprefix("torch."))
        else:
            out[name] = x
    return out
