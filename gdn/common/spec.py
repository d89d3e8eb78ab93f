"""The one specification both gdn backends are built from.

Op: ``chunk_fwd_o`` — the output stage of chunked Gated DeltaNet.

Layouts (FLA's):
    q, k   [B, T, H, K]          queries / keys, H query-key heads
    v      [B, T, HV, V]         values, HV = m·H value heads; value head hv reads q/k head hv // m
    g      [B, T, HV] float32    chunk-local cumulative log-gate in natural-log units (g ≤ 0 for a real gate);
                                 None means no gating. (FLA 0.6 kernels use exp2: pass them g·log2(e).)
    h      [B, NT, HV, K, V]     state at the start of each chunk; with varlen, B = 1 and NT is the total
                                 number of chunks over all sequences, in order
    o      [B, T, HV, V]         in v's dtype; accumulation in float32
    cu_seqlens [N + 1] int       varlen boundaries into the packed T axis (B must be 1)
    chunk_indices [NT, 2] int32  (sequence index, chunk index within the sequence) for each chunk

Math, per sequence, value head and chunk c of CHUNK_SIZE positions (rows i, columns j of the chunk):
    o_c = scale·(q_c h[c]) ⊙ exp(g_c)[:, None] + tril((scale·q_c k_cᵀ) ⊙ exp(g_i − g_j)) v_c
The decay matrix is formed as exp(where(i ≥ j, g_i − g_j, −∞)): for a real gate g_i − g_j ≤ 0 on the lower
triangle, so no intermediate can overflow however negative g gets, and exp(−g) is never formed alone.

Every kernel's tile height is CHUNK_SIZE. Nothing that varies with the sequence length (T, NT, cu_seqlens)
selects a tiling or a compiled Triton variant: one compiled kernel per (dtypes, H, HV, K, V, gated, varlen).
JAX specializes every program on its input shapes, so the Pallas backend compiles once per shape on top of
that; gdn.pallas.bucketing pads T to a few buckets to bound it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

CHUNK_SIZE = 64
"""BT of every gdn kernel: the chunk length of the chunked GDN algorithm and the tile height."""

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
"""Supported range of K and V (any integer in it; tiles are masked to the next power of two)."""

MAX_GRID_ROWS = 2**31 - 1
"""Programs in one launch: both backends launch a 1-D grid of (chunk, value head, V tile) programs."""

FLOAT32_DOT_PRECISION = "tf32x3"
"""How float32 inputs are multiplied: three TF32 tensor-core passes (split-precision, about float32 accuracy:
relative error ~1e-6). Measured on an H100 at B=1 T=8192 H=16 K=V=128: IEEE float32 dots run on the FMA units
at 0.9–11 ms whatever the tiling, far from the 134 µs memory floor (benchmarks/RESULTS.md). Interpreters
compute float32 dots exactly."""

INPUT_DTYPES = ("float32", "float16", "bfloat16")
STATE_DTYPES = INPUT_DTYPES
INDEX_DTYPES = ("int32", "int64")


@dataclasses.dataclass(frozen=True)
class ChunkOTiling:
    """Block sizes and launch parameters of the chunk_fwd_o kernel (the tile height is always CHUNK_SIZE).

    block_k: K columns per step of the K loop (power of two ≥ 16, masked when K is not a multiple).
    block_v: V columns per program (power of two ≥ 16, masked likewise).
    num_warps, num_stages: Triton launch parameters, shared by the Triton and Pallas-Triton backends.
    """

    block_k: int
    block_v: int
    num_warps: int
    num_stages: int


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tiling_for(K: int, V: int, dtype: str) -> ChunkOTiling:
    """The static tiling of chunk_fwd_o for head sizes K, V and input dtype name.

    Rows of the table, and the measurement behind each, are in benchmarks/RESULTS.md. T never enters:
    the same tiling serves a 1-token prefill and a 64k one.
    """
    # Measured on an H100, bf16 K = V = 128 (benchmarks/RESULTS.md, tiling sweep): all 128 V columns in one
    # program (q and k read once per chunk), K in two 64-column steps that the 2-stage pipeline overlaps
    # (the second half's loads fly during the first half's dots): 79 µs at T = 8192 against 87 µs for one
    # 128-column K step, 537 µs (the copy floor) at T = 65536. 8 warps halve the rows per warp but double
    # the layout conversions: 124 µs.
    # float32 (tf32x3 dots, 4-byte tiles): 64 V columns, 328 µs against 496 µs for 128 at T = 8192.
    block_k = min(_next_power_of_2(max(K, MIN_HEAD_DIM)), 64)
    block_v = min(_next_power_of_2(max(V, MIN_HEAD_DIM)), 64 if dtype == "float32" else 128)
    return ChunkOTiling(block_k=block_k, block_v=block_v, num_warps=4, num_stages=2)


def num_chunks(T: int) -> int:
    """Number of CHUNK_SIZE chunks covering a sequence of T tokens (0 for T = 0)."""
    return -(-int(T) // CHUNK_SIZE)


PAD_CHUNK = (-1, -1)
"""A chunk_indices row that names no chunk: its programs load and store nothing (static-length padding)."""


def prepare_chunk_indices(cu_seqlens: Sequence[int] | np.ndarray, num_rows: int | None = None) -> np.ndarray:
    """(sequence index, chunk index within the sequence) for every chunk of a packed varlen batch.

    cu_seqlens: host array [N + 1]. Returns int32 [NT, 2] with NT = Σ num_chunks(len_n); empty sequences
    contribute no rows. With ``num_rows`` (≥ NT) the result is padded to that static length with PAD_CHUNK
    rows, so a jitted caller can keep one shape for every batch: h then has num_rows chunk rows, the padded
    ones ignored. Pure numpy: build it where cu_seqlens is on the host and pass it as ``chunk_indices`` to
    avoid a device→host copy inside the op.
    """
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    chunk_counts = -(-(bounds[1:] - bounds[:-1]) // CHUNK_SIZE)
    total = int(chunk_counts.sum())
    sequence = np.repeat(np.arange(len(chunk_counts), dtype=np.int32), chunk_counts)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
    indices = np.stack([sequence, within.astype(np.int32)], axis=1).reshape(-1, 2)
    if num_rows is None:
        return indices
    if num_rows < total:
        raise ValueError(f"prepare_chunk_indices: num_rows: expected at least the {total} chunks of "
                         f"cu_seqlens; got {num_rows}")
    padding = np.full((num_rows - total, 2), PAD_CHUNK, dtype=np.int32)
    return np.concatenate([indices, padding])


def warmup_arguments(T: int, H: int, HV: int, K: int, V: int, gated: bool, varlen: bool) -> dict:
    """A one-sequence chunk_fwd_o call of T tokens for the backends' warmup: the shapes of q (also k), v, h
    and g (None when not gated), and host cu_seqlens / chunk_indices (None when not varlen)."""
    return {
        "q": (1, T, H, K), "v": (1, T, HV, V), "h": (1, num_chunks(T), HV, K, V),
        "g": (1, T, HV) if gated else None,
        "cu_seqlens": np.array([0, T], np.int32) if varlen else None,
        "chunk_indices": prepare_chunk_indices([0, T]) if varlen else None,
    }


def default_scale(K: int) -> float:
    """The default query scale, K**-0.5."""
    return float(K) ** -0.5


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """What the contract needs to know about one array, in framework-neutral terms."""

    shape: tuple[int, ...]
    dtype: str
    device: str


@dataclasses.dataclass(frozen=True)
class ChunkOProblem:
    """A validated chunk_fwd_o call: sizes and flags that select the kernel and its grid."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    num_chunks_total: int
    gated: bool
    varlen: bool
    dtype: str
    tiling: ChunkOTiling

    @property
    def num_v_tiles(self) -> int:
        return -(-self.V // self.tiling.block_v)

    @property
    def num_programs(self) -> int:
        """Programs of the 1-D grid: one per (chunk, value head, V tile)."""
        return self.num_chunks_total * self.HV * self.num_v_tiles


def _fail(arg: str, expected: str, got: object, error: type[Exception] = ValueError) -> None:
    raise error(f"chunk_fwd_o: {arg}: expected {expected}; got {got}")


def _check_rank(name: str, info: ArrayInfo, rank: int, layout: str) -> None:
    if len(info.shape) != rank:
        _fail(name, f"a rank-{rank} array {layout}", f"shape {info.shape}")


def _check_dtype(name: str, info: ArrayInfo, allowed: Sequence[str]) -> None:
    if info.dtype not in allowed:
        _fail(name, f"dtype in {tuple(allowed)}", info.dtype, TypeError)


def _check_dim(name: str, axis_name: str, actual: int, expected: int, why: str) -> None:
    if actual != expected:
        _fail(name, f"{axis_name} = {expected} ({why})", f"{axis_name} = {actual}")


def check_cu_seqlens_values(cu_seqlens: np.ndarray, T: int) -> None:
    """Value checks of a host cu_seqlens: starts at 0, non-decreasing, ends at T."""
    values = np.asarray(cu_seqlens)
    if values[0] != 0:
        _fail("cu_seqlens", "cu_seqlens[0] = 0", f"cu_seqlens[0] = {int(values[0])}")
    steps = np.diff(values)
    if (steps < 0).any():
        where = int(np.argmax(steps < 0))
        _fail("cu_seqlens", "non-decreasing values",
              f"cu_seqlens[{where}] = {int(values[where])} > cu_seqlens[{where + 1}] = {int(values[where + 1])}")
    if values[-1] != T:
        _fail("cu_seqlens", f"cu_seqlens[-1] = T = {T}", f"cu_seqlens[-1] = {int(values[-1])}")


def validate_chunk_o_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    h: ArrayInfo,
    g: ArrayInfo | None,
    cu_seqlens: ArrayInfo | None,
    chunk_indices: ArrayInfo | None,
    cu_seqlens_values: np.ndarray | None = None,
) -> ChunkOProblem:
    """The shape, dtype and device contract of chunk_fwd_o, shared by every backend.

    ``cu_seqlens_values`` is the host copy of cu_seqlens when one is at hand (the backends pass it when
    cu_seqlens is a host array or when they had to read it anyway to build chunk_indices); its values are
    then checked too. Raises ValueError (shapes, values, devices) or TypeError (dtypes) naming the argument
    with the expected and the actual value. Returns the problem sizes with the tiling to use.
    """
    _check_rank("q", q, 4, "[B, T, H, K]")
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_rank("v", v, 4, "[B, T, HV, V]")
    _check_rank("h", h, 5, "[B, NT, HV, K, V]")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if k.shape != q.shape:
        _fail("k", f"the shape of q {q.shape}", f"shape {k.shape}")
    _check_dim("v", "v.shape[:2] (B, T)", v.shape[:2], (B, T), "q is [B, T, H, K]")
    for name, size in (("K (q.shape[3])", K), ("V (v.shape[3])", V)):
        if not MIN_HEAD_DIM <= size <= MAX_HEAD_DIM:
            _fail(name, f"a head size in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]", size)
    if H == 0 or HV % H != 0:
        _fail("v", f"HV = v.shape[2] a positive multiple of H = q.shape[2] = {H}", f"HV = {HV}")
    _check_dtype("q", q, INPUT_DTYPES)
    for name, info in (("k", k), ("v", v)):
        if info.dtype != q.dtype:
            _fail(name, f"the dtype of q ({q.dtype})", info.dtype, TypeError)
    _check_dtype("h", h, STATE_DTYPES)

    if g is not None:
        _check_rank("g", g, 3, "[B, T, HV]")
        _check_dtype("g", g, ("float32",))
        _check_dim("g", "g.shape", g.shape, (B, T, HV), "[B, T, HV] from q and v")

    if cu_seqlens is None:
        if chunk_indices is not None:
            _fail("chunk_indices", "None when cu_seqlens is None", f"shape {chunk_indices.shape}")
        chunks_per_row = num_chunks(T)
    else:
        _check_rank("cu_seqlens", cu_seqlens, 1, "[N + 1]")
        _check_dtype("cu_seqlens", cu_seqlens, INDEX_DTYPES, )
        if cu_seqlens.shape[0] < 2:
            _fail("cu_seqlens", "at least 2 entries [0, ..., T]", f"shape {cu_seqlens.shape}")
        if B != 1:
            _fail("q", "B = 1 when cu_seqlens is given (varlen packs sequences along T)", f"B = {B}")
        if cu_seqlens_values is not None:
            check_cu_seqlens_values(cu_seqlens_values, T)
        if chunk_indices is not None:
            _check_rank("chunk_indices", chunk_indices, 2, "[NT, 2]")
            _check_dtype("chunk_indices", chunk_indices, INDEX_DTYPES)
            if chunk_indices.shape[1] != 2:
                _fail("chunk_indices", "shape [NT, 2]", f"shape {chunk_indices.shape}")
            chunks_per_row = chunk_indices.shape[0]
        elif cu_seqlens_values is not None:
            chunks_per_row = int(sum(num_chunks(n) for n in np.diff(np.asarray(cu_seqlens_values))))
        else:
            raise ValueError("chunk_fwd_o: chunk_indices: expected chunk_indices or host cu_seqlens values; "
                             "got neither")

    _check_dim("h", "h.shape[0]", h.shape[0], B, "B of q")
    _check_dim("h", "h.shape[1] (NT)", h.shape[1], chunks_per_row,
               f"chunks of {CHUNK_SIZE} tokens per batch row, over all sequences when varlen")
    total_chunks = B * chunks_per_row
    _check_dim("h", "h.shape[2:] (HV, K, V)", h.shape[2:], (HV, K, V), "from q and v")

    arrays = [("q", q), ("k", k), ("v", v), ("h", h), ("g", g), ("cu_seqlens", cu_seqlens),
              ("chunk_indices", chunk_indices)]
    for name, info in arrays[1:]:
        if info is not None and info.device != q.device:
            _fail(name, f"the device of q ({q.device})", info.device)

    tiling = tiling_for(K, V, q.dtype)
    problem = ChunkOProblem(B=B, T=T, H=H, HV=HV, K=K, V=V, num_chunks_total=total_chunks,
                            gated=g is not None, varlen=cu_seqlens is not None, dtype=q.dtype, tiling=tiling)
    if problem.num_programs > MAX_GRID_ROWS:
        _fail("q", f"at most {MAX_GRID_ROWS} (chunk, value head, V tile) programs",
              f"{problem.num_programs} ({total_chunks} chunks × {HV} heads × {problem.num_v_tiles} V tiles)")
    return problem
