"""The shared case list of gdn's tests (and the CI subset of the benchmarks): readable ids, numpy inputs.

Inputs are drawn once in numpy, rounded to the case's dtype and kept as float32 arrays, so every backend
sees the same values and the float64 reference is computed from exactly what the kernels read.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from gdn.common import spec
from gdn.common.example import random_decode_inputs, random_inputs, random_recurrent_inputs, round_to


def seed_of(text: str) -> int:
    """A stable seed from a case id (Python's str hash changes between processes)."""
    return zlib.crc32(text.encode())


@dataclasses.dataclass
class OpInputs:
    """Arguments of chunk_fwd_o as numpy arrays, with the dtype each is to have in the backend."""

    arrays: dict[str, np.ndarray | None]
    dtypes: dict[str, str]
    scale: float | None = None

    def replace(self, **arrays: np.ndarray | None) -> "OpInputs":
        return OpInputs({**self.arrays, **arrays}, dict(self.dtypes), self.scale)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Sizes of a chunked problem: B rows of T tokens, or with seqlens, varlen (B = 1, packed along T)."""

    T: int
    H: int
    HV: int
    K: int
    V: int
    B: int = 1
    seqlens: tuple[int, ...] | None = None

    @property
    def shape_id(self) -> str:
        lengths = f"varlen{list(self.seqlens)}".replace(" ", "") if self.seqlens else f"B{self.B}-T{self.T}"
        return f"{lengths}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}"

    @property
    def cu_seqlens(self) -> np.ndarray | None:
        return None if self.seqlens is None else np.cumsum((0,) + self.seqlens).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Case(_Shapes):
    """One chunk_fwd_o problem."""

    gated: bool = True

    @property
    def id(self) -> str:
        return f"{self.shape_id}-{'g' if self.gated else 'nog'}"

    @property
    def state_rows(self) -> int:
        cu = self.cu_seqlens
        return spec.num_chunks(self.T) if cu is None else len(spec.prepare_chunk_indices(cu))

    def inputs(self, dtype: str, seed: int = 0, gate_scale: float = 1.0) -> OpInputs:
        """Random inputs from gdn.common.example.random_inputs, with the dtype each argument has."""
        arrays = random_inputs(self.B, self.T, self.H, self.HV, self.K, self.V, dtype, self.gated,
                               self.cu_seqlens, seed, gate_scale)
        dtypes = {"q": dtype, "k": dtype, "v": dtype, "h": dtype, "g": "float32", "cu_seqlens": "int32",
                  "chunk_indices": "int32"}
        return OpInputs({**arrays, "chunk_indices": None}, dtypes)


def _case(T: int, H: int, HV: int, K: int, V: int, B: int = 1, gated: bool = True) -> Case:
    return Case(T=T, H=H, HV=HV, K=K, V=V, B=B, gated=gated)


def _varlen(seqlens: tuple[int, ...], H: int, HV: int, K: int, V: int, gated: bool = True) -> Case:
    return Case(T=sum(seqlens), H=H, HV=HV, K=K, V=V, gated=gated, seqlens=seqlens)


CASES: list[Case] = [
    # every T of the edge list; B, grouping m = HV / H, K/V (non-powers of two included) and gating rotate
    _case(1, 2, 2, 16, 16),
    _case(2, 4, 8, 48, 64, B=2, gated=False),  # T < H
    _case(4, 2, 4, 64, 48),
    _case(63, 2, 2, 64, 64, B=2),
    _case(64, 1, 2, 128, 128, gated=False),
    _case(65, 2, 4, 48, 48, B=2),
    _case(127, 2, 2, 16, 128),
    _case(128, 1, 2, 64, 16, B=2, gated=False),
    _case(130, 2, 4, 48, 64, B=2),
    _case(300, 2, 2, 128, 48),
    _case(300, 1, 1, 128, 128, gated=False),
    # varlen: empty and 1-token sequences, chunk-boundary lengths, grouped heads
    _varlen((1, 0, 64, 135), 2, 4, 64, 64),
    _varlen((0, 5, 63, 65, 1), 1, 2, 48, 16, gated=False),
    _varlen((130, 1, 0), 2, 2, 16, 48),
]
QUICK_CASES = (0, 3, 4, 11)
"""The CASES of a GPU's quick selection: T = 1, 63, 64 and the varlen batch with an empty and a 1-token sequence,
gated and not, in three head sizes."""

LARGE_CASES: list[Case] = [
    # model-sized heads at the benchmarks' B1 T8192 H16 and a long varlen batch: compiled GPU runs only
    _case(8192, 16, 16, 128, 128),
    _varlen((1, 4000, 63, 2500, 0, 1537), 4, 8, 128, 128),
]


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """decode_step over N sequences, one token per call (the reference's B = N rows of T tokens)."""

    N: int
    H: int
    HV: int
    K: int
    V: int

    @property
    def id(self) -> str:
        return f"N{self.N}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}"

    def tokens(self, dtype: str, T: int, seed: int = 0) -> OpInputs:
        """T tokens per sequence in the reference's layout (q [N, T, H, K], …, initial_state [N, HV, K, V]),
        from gdn.common.example.random_recurrent_inputs."""
        arrays = random_recurrent_inputs(self.N, T, self.H, self.HV, self.K, self.V, dtype, seed)
        dtypes = {"q": dtype, "k": dtype, "v": dtype, "g": "float32", "beta": "float32", "state": "float32"}
        return OpInputs(arrays, dtypes)

    def inputs(self, dtype: str, seed: int = 0) -> OpInputs:
        """decode_step's arguments for one token of every sequence from a random state."""
        tokens = self.tokens(dtype, 1, seed)
        return self.step(tokens, 0, tokens.arrays["initial_state"])

    @staticmethod
    def step(tokens: OpInputs, t: int, state: np.ndarray) -> OpInputs:
        """decode_step's arguments for token t of every sequence, from the given state [N, HV, K, V]."""
        a = tokens.arrays
        return OpInputs({**{n: a[n][:, t] for n in ("q", "k", "v", "g", "beta")}, "state": state},
                        dict(tokens.dtypes), tokens.scale)


DECODE_CASES: list[DecodeCase] = [
    # N ∈ {1, 3}, grouping m = HV / H ∈ {1, 2}, K and V ∈ {16, 48, 128, 100} (V = 100: a masked last V tile)
    DecodeCase(N=1, H=1, HV=1, K=16, V=16),
    DecodeCase(N=3, H=2, HV=4, K=48, V=16),
    DecodeCase(N=1, H=1, HV=2, K=128, V=48),
    DecodeCase(N=3, H=2, HV=2, K=16, V=128),
    DecodeCase(N=3, H=1, HV=2, K=48, V=100),
    DecodeCase(N=1, H=2, HV=2, K=128, V=128),
]
QUICK_DECODE_CASES = (1, 4)
"""The DECODE_CASES of a GPU's quick selection: N = 3 with grouped heads, and a masked last V tile."""


@dataclasses.dataclass(frozen=True)
class ServingCase:
    """decode_step on a pool of states: N sequences, one token each (lengths None: no cu_seqlens) or lengths[n]
    tokens packed with cu_seqlens; pool_rows P; state_indices [N] or, with slots = S > 0, [N, S] per-token slots
    (accepted: with num_accepted_tokens); the sequences in `padded` have negative indices (skipped)."""

    H: int
    HV: int
    K: int
    V: int
    pool_rows: int
    lengths: tuple[int, ...] | None = None
    N: int = 1
    slots: int = 0
    accepted: bool = False
    padded: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        tokens = f"varlen{list(self.lengths)}".replace(" ", "") if self.lengths else f"N{self.N}"
        slots = f"-S{self.slots}{'acc' if self.accepted else ''}" if self.slots else ""
        padded = f"-pad{list(self.padded)}".replace(" ", "") if self.padded else ""
        return f"{tokens}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}-P{self.pool_rows}{slots}{padded}"

    @property
    def num_sequences(self) -> int:
        return self.N if self.lengths is None else len(self.lengths)

    def inputs(self, dtype: str, seed: int = 0, raw_qk: bool = False, raw_gates: bool = False,
               padding_rows: int = 0) -> OpInputs:
        """Random decode_step arguments (gdn.common.example.random_decode_inputs) with a pool ~ N(0, 1) and
        distinct random pool rows as indices; padding_rows more token rows after the last sequence (no
        sequence's: their o rows must stay zero)."""
        rng = np.random.default_rng(seed + 1)
        N = self.num_sequences
        T = N if self.lengths is None else sum(self.lengths)
        arrays: dict[str, np.ndarray | None] = dict(random_decode_inputs(
            T + padding_rows, self.H, self.HV, self.K, self.V, dtype, seed, raw_qk, raw_gates))
        columns = max(self.slots, 1)
        rows = rng.permutation(self.pool_rows)[:N * columns].reshape(N, columns).astype(np.int32)
        rows[list(self.padded)] = -1
        arrays["state_indices"] = rows if self.slots else rows[:, 0]
        arrays["state"] = rng.standard_normal((self.pool_rows, self.HV, self.K, self.V)).astype(np.float32)
        if self.lengths is not None:
            arrays["cu_seqlens"] = np.cumsum((0,) + self.lengths).astype(np.int32)
        if self.accepted:
            arrays["num_accepted_tokens"] = rng.integers(1, columns + 1, N).astype(np.int32)
        # a dtype for every decode_step array, given or not (a test may add the raw gates or an index array)
        dtypes = {name: dtype for name in ("q", "k", "v", "a", "b")}
        dtypes.update({name: "float32" for name in ("g", "beta", "state", "A_log", "dt_bias")})
        dtypes.update({name: "int32" for name in ("state_indices", "cu_seqlens", "num_accepted_tokens")})
        return OpInputs(arrays, dtypes)


SERVING_CASES: list[ServingCase] = [
    # one token per sequence from a pool, one padded slot; per-token slots with a sequence continuing from an
    # accepted token; a few tokens per sequence (empty and one-token sequences), [N] and [N, S] indices
    ServingCase(H=2, HV=4, K=32, V=48, pool_rows=9, N=4, padded=(2,)),
    ServingCase(H=1, HV=2, K=16, V=100, pool_rows=12, N=3, slots=2, accepted=True, padded=(0,)),
    ServingCase(H=2, HV=2, K=48, V=16, pool_rows=6, lengths=(3, 0, 1, 4)),
    ServingCase(H=1, HV=2, K=16, V=32, pool_rows=16, lengths=(4, 1, 0, 3), slots=4, accepted=True, padded=(2,)),
]


@dataclasses.dataclass(frozen=True)
class ForwardCase(_Shapes):
    """One chunk_gated_delta_rule problem."""

    initial_state: bool = True

    @property
    def id(self) -> str:
        return f"{self.shape_id}-{'s0' if self.initial_state else 'nos0'}"

    @property
    def N(self) -> int:
        return self.B if self.seqlens is None else len(self.seqlens)

    def inputs(self, dtype: str, seed: int = 0) -> OpInputs:
        """Unit-norm q, k rows (models L2-normalize them), log-sigmoid gates, sigmoid beta, from
        gdn.common.example.random_recurrent_inputs; initial_state [N, HV, K, V] ~ N(0, 1) or None."""
        arrays = random_recurrent_inputs(self.B, self.T, self.H, self.HV, self.K, self.V, dtype, seed)
        initial = np.random.default_rng(seed + 1).standard_normal((self.N, self.HV, self.K, self.V))
        arrays["initial_state"] = initial.astype(np.float32) if self.initial_state else None
        arrays.update(cu_seqlens=self.cu_seqlens, chunk_indices=None)
        dtypes = {"q": dtype, "k": dtype, "v": dtype, "g": "float32", "beta": "float32",
                  "initial_state": "float32", "cu_seqlens": "int32", "chunk_indices": "int32"}
        return OpInputs(arrays, dtypes)


def forward_varlen(seqlens: tuple[int, ...], H: int, HV: int, K: int, V: int, **kw) -> ForwardCase:
    return ForwardCase(T=sum(seqlens), H=H, HV=HV, K=K, V=V, seqlens=seqlens, **kw)


def with_raw_inputs(inputs: OpInputs, seed: int, raw_qk: bool, raw_gates: bool) -> OpInputs:
    """inputs with q, k rows ~ N(0, 1) of any norm (raw_qk, for use_qk_l2norm_in_kernel) and, with raw_gates,
    a, b [B, T, HV] ~ N(0, 1) in q's dtype, A_log [HV] = log U(1, 16) and dt_bias [HV] ~ N(0, 1) float32 in
    place of g and beta (as gdn.common.example.random_decode_inputs draws them): chunk_gated_delta_rule's
    serving inputs."""
    rng = np.random.default_rng(seed)
    arrays, dtypes = dict(inputs.arrays), dict(inputs.dtypes)
    dtype, (B, T, HV) = dtypes["q"], arrays["g"].shape
    if raw_qk:
        arrays.update(q=round_to(rng.standard_normal(arrays["q"].shape), dtype),
                      k=round_to(rng.standard_normal(arrays["k"].shape), dtype))
    if raw_gates:
        arrays.update(g=None, beta=None, a=round_to(rng.standard_normal((B, T, HV)), dtype),
                      b=round_to(rng.standard_normal((B, T, HV)), dtype),
                      A_log=np.log(rng.uniform(1.0, 16.0, HV)).astype(np.float32),
                      dt_bias=rng.standard_normal(HV).astype(np.float32))
        dtypes.update(a=dtype, b=dtype, A_log="float32", dt_bias="float32")
    return OpInputs(arrays, dtypes, inputs.scale)


FORWARD_CASES: list[ForwardCase] = [
    # every T of the edge list; B, grouping m = HV / H, K/V (non-powers of two included), initial state rotate
    ForwardCase(1, 2, 4, 32, 32),
    ForwardCase(63, 1, 2, 16, 32, B=2, initial_state=False),
    ForwardCase(64, 2, 2, 32, 16),
    ForwardCase(65, 1, 2, 48, 40, B=2),
    ForwardCase(130, 2, 4, 32, 32, initial_state=False),
    ForwardCase(300, 1, 1, 64, 64),
    # varlen: empty and 1-token sequences, chunk-boundary lengths
    forward_varlen((0, 1, 64, 100, 1, 0, 70), 1, 2, 32, 32),
    forward_varlen((65, 0, 1), 2, 4, 16, 16, initial_state=False),
    # K and V of different tile widths (Triton 3.6 on Hopper has miscompiled dots of 16-bit tiles of unequal
    # widths in one kernel: K = 48, V = 16 and the mirror image)
    ForwardCase(17, 1, 1, 48, 16, initial_state=False),
    ForwardCase(17, 1, 2, 16, 128),
    # batches large enough for the walk's wider V tiles (tilings.walk_tiling's size class): N·HV = 32 selects
    # 32 columns, N·HV = 64 selects 64
    ForwardCase(70, 1, 4, 16, 128, B=8, initial_state=False),
    forward_varlen((1, 9, 64, 2) * 4, 2, 4, 16, 128),
]
QUICK_FORWARD_CASES = (0, 6)
"""The FORWARD_CASES of a GPU's quick selection: T = 1 with grouped heads, and the varlen batch with empty and
1-token sequences and chunk-boundary lengths (one head size: one compiled variant per backend)."""

LARGE_FORWARD_CASES: list[ForwardCase] = [
    # model-sized heads: compiled GPU runs only
    ForwardCase(2048, 4, 8, 128, 128),
    forward_varlen((1, 1000, 63, 700, 0, 300), 2, 4, 128, 128),
    # one long sequence with few heads: cut into pieces on a GPU (tilings.context_pieces)
    ForwardCase(16384, 2, 8, 128, 128),
]


BACKWARD_CASES: list[ForwardCase] = [
    # every T of the edge list; grouping m = HV / H, K/V (non-powers of two included), initial state rotate;
    # small heads: the CPU interpreters run every one
    ForwardCase(1, 1, 2, 16, 16),
    ForwardCase(63, 1, 1, 32, 16, B=2, initial_state=False),
    ForwardCase(64, 2, 2, 16, 32),
    ForwardCase(65, 1, 2, 48, 40),
    ForwardCase(130, 2, 4, 16, 16, initial_state=False),
    ForwardCase(300, 1, 1, 32, 32),
    # varlen: empty and 1-token sequences, chunk-boundary lengths
    forward_varlen((0, 1, 64, 100, 1, 0, 70), 1, 2, 16, 32),
    forward_varlen((65, 0, 1), 2, 4, 16, 16, initial_state=False),
]
QUICK_BACKWARD_CASES = (6,)
"""The BACKWARD_CASES of a GPU's quick selection: the varlen batch with empty and 1-token sequences."""

LARGE_BACKWARD_CASES: list[ForwardCase] = [
    # model-sized heads: compiled GPU runs only (the float64 reference holds every step's state: T stays modest)
    ForwardCase(1024, 2, 4, 128, 128),
    forward_varlen((1, 500, 63, 300, 0, 200), 2, 4, 128, 128),
]
