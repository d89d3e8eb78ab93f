"""The input contract of gdn's ops, shared by every backend: one framework-neutral check per op that raises
``ValueError`` / ``TypeError("<op>: <argument>: expected …; got …")`` before anything is launched, and returns
the validated problem (sizes, flags, tilings) that selects the kernels and their grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gdn.common.spec import (
    CHUNK_O_OP,
    CHUNK_SIZE,
    DECODE_OP,
    FORWARD_OP,
    INDEX_DTYPES,
    INPUT_DTYPES,
    MAX_GRID_ROWS,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    STATE_DTYPES,
    num_chunks,
)
from gdn.common.tilings import (
    Tiling,
    context_pieces,
    decode_tiling,
    prepare_tiling,
    tiling_for,
    walk_tiling,
)


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
    tiling: Tiling

    @property
    def num_v_tiles(self) -> int:
        return -(-self.V // self.tiling.block_v)

    @property
    def num_programs(self) -> int:
        """Programs of the 1-D grid: one per (chunk, value head, V tile)."""
        return self.num_chunks_total * self.HV * self.num_v_tiles


def _fail(arg: str, expected: str, got: object, error: type[Exception] = ValueError, *, op: str) -> None:
    raise error(f"{op}: {arg}: expected {expected}; got {got}")


def _check_rank(name: str, info: ArrayInfo, rank: int, layout: str, *, op: str) -> None:
    if len(info.shape) != rank:
        _fail(name, f"a rank-{rank} array {layout}", f"shape {info.shape}", op=op)


def _check_dtype(name: str, info: ArrayInfo, allowed: Sequence[str], *, op: str) -> None:
    if info.dtype not in allowed:
        _fail(name, f"dtype in {tuple(allowed)}", info.dtype, TypeError, op=op)


def _check_dim(name: str, axis_name: str, actual: int, expected: int, why: str, *, op: str) -> None:
    if actual != expected:
        _fail(name, f"{axis_name} = {expected} ({why})", f"{axis_name} = {actual}", op=op)


def _check_heads(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, *, op: str) -> None:
    """What every op asks of q, k [..., H, K] and v [..., HV, V] (heads and head size the last two axes):
    k shaped as q, K and V in the supported range, HV a multiple of H, one input dtype."""
    H, K = q.shape[-2:]
    HV, V = v.shape[-2:]
    head_axis, size_axis = len(q.shape) - 2, len(q.shape) - 1  # v has q's rank in every op
    if k.shape != q.shape:
        _fail("k", f"the shape of q {q.shape}", f"shape {k.shape}", op=op)
    for name, size in ((f"K (q.shape[{size_axis}])", K), (f"V (v.shape[{size_axis}])", V)):
        if not MIN_HEAD_DIM <= size <= MAX_HEAD_DIM:
            _fail(name, f"a head size in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]", size, op=op)
    if H == 0 or HV % H != 0:
        _fail("v", f"HV = v.shape[{head_axis}] a positive multiple of H = q.shape[{head_axis}] = {H}",
              f"HV = {HV}", op=op)
    _check_dtype("q", q, INPUT_DTYPES, op=op)
    for name, info in (("k", k), ("v", v)):
        if info.dtype != q.dtype:
            _fail(name, f"the dtype of q ({q.dtype})", info.dtype, TypeError, op=op)


def _check_present(arrays: Sequence[tuple[str, ArrayInfo | None]], *, op: str) -> None:
    """Every named array given (a TypeError naming the first missing one)."""
    for name, info in arrays:
        if info is None:
            _fail(name, "an array", None, TypeError, op=op)


def _check_devices(arrays: Sequence[tuple[str, ArrayInfo | None]], *, op: str) -> None:
    """Every given array on the device of the first (q)."""
    (first_name, first), *others = arrays
    for name, info in others:
        if info is not None and info.device != first.device:
            _fail(name, f"the device of {first_name} ({first.device})", info.device, op=op)


def check_cu_seqlens_values(cu_seqlens: Sequence[int] | np.ndarray, T: int, op: str = CHUNK_O_OP) -> None:
    """Value checks of a host cu_seqlens: starts at 0, non-decreasing, ends at T."""
    values = np.asarray(cu_seqlens)
    if values[0] != 0:
        _fail("cu_seqlens", "cu_seqlens[0] = 0", f"cu_seqlens[0] = {int(values[0])}", op=op)
    steps = np.diff(values)
    if (steps < 0).any():
        where = int(np.argmax(steps < 0))
        _fail("cu_seqlens", "non-decreasing values",
              f"cu_seqlens[{where}] = {int(values[where])} > cu_seqlens[{where + 1}] = {int(values[where + 1])}",
              op=op)
    if values[-1] != T:
        _fail("cu_seqlens", f"cu_seqlens[-1] = T = {T}", f"cu_seqlens[-1] = {int(values[-1])}", op=op)


def _check_token_arrays(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, *, op: str) -> tuple[int, ...]:
    """q, k [B, T, H, K] and v [B, T, HV, V] of a chunked op; returns (B, T, H, K, HV, V)."""
    _check_rank("q", q, 4, "[B, T, H, K]", op=op)
    _check_rank("k", k, 4, "[B, T, H, K]", op=op)
    _check_rank("v", v, 4, "[B, T, HV, V]", op=op)
    B, T, H, K = q.shape
    _check_dim("v", "v.shape[:2] (B, T)", v.shape[:2], (B, T), "q is [B, T, H, K]", op=op)
    _check_heads(q, k, v, op=op)
    return B, T, H, K, v.shape[2], v.shape[3]


def _check_varlen(B: int, T: int, cu_seqlens: ArrayInfo | None, chunk_indices: ArrayInfo | None,
                  cu_seqlens_values: Sequence[int] | np.ndarray | None, *, op: str) -> int:
    """The varlen arguments of a [B, T, ...] call; returns the chunks per batch row (over all sequences when
    varlen: chunk_indices' rows, padding included, else counted from the host cu_seqlens values)."""
    if cu_seqlens is None:
        if chunk_indices is not None:
            _fail("chunk_indices", "None when cu_seqlens is None", f"shape {chunk_indices.shape}", op=op)
        return num_chunks(T)
    _check_rank("cu_seqlens", cu_seqlens, 1, "[N + 1]", op=op)
    _check_dtype("cu_seqlens", cu_seqlens, INDEX_DTYPES, op=op)
    if cu_seqlens.shape[0] < 2:
        _fail("cu_seqlens", "at least 2 entries [0, ..., T]", f"shape {cu_seqlens.shape}", op=op)
    if B != 1:
        _fail("q", "B = 1 when cu_seqlens is given (varlen packs sequences along T)", f"B = {B}", op=op)
    if cu_seqlens_values is not None:
        check_cu_seqlens_values(cu_seqlens_values, T, op=op)
    if chunk_indices is not None:
        _check_rank("chunk_indices", chunk_indices, 2, "[NT, 2]", op=op)
        _check_dtype("chunk_indices", chunk_indices, INDEX_DTYPES, op=op)
        if chunk_indices.shape[1] != 2:
            _fail("chunk_indices", "shape [NT, 2]", f"shape {chunk_indices.shape}", op=op)
        return chunk_indices.shape[0]
    if cu_seqlens_values is not None:
        return int(sum(num_chunks(n) for n in np.diff(np.asarray(cu_seqlens_values))))
    raise ValueError(f"{op}: chunk_indices: expected chunk_indices or host cu_seqlens values; got neither")


def validate_chunk_o_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    h: ArrayInfo,
    g: ArrayInfo | None,
    cu_seqlens: ArrayInfo | None,
    chunk_indices: ArrayInfo | None,
    cu_seqlens_values: Sequence[int] | np.ndarray | None = None,
) -> ChunkOProblem:
    """The shape, dtype and device contract of chunk_fwd_o, shared by every backend.

    ``cu_seqlens_values`` is the host copy of cu_seqlens when one is at hand (the backends pass it when
    cu_seqlens is a host array or when they had to read it anyway to build chunk_indices); its values are
    then checked too. Raises ValueError (shapes, values, devices) or TypeError (dtypes) naming the argument
    with the expected and the actual value. Returns the problem sizes with the tiling to use.
    """
    B, T, H, K, HV, V = _check_token_arrays(q, k, v, op=CHUNK_O_OP)
    _check_rank("h", h, 5, "[B, NT, HV, K, V]", op=CHUNK_O_OP)
    _check_dtype("h", h, STATE_DTYPES, op=CHUNK_O_OP)

    if g is not None:
        _check_rank("g", g, 3, "[B, T, HV]", op=CHUNK_O_OP)
        _check_dtype("g", g, ("float32",), op=CHUNK_O_OP)
        _check_dim("g", "g.shape", g.shape, (B, T, HV), "[B, T, HV] from q and v", op=CHUNK_O_OP)

    chunks_per_row = _check_varlen(B, T, cu_seqlens, chunk_indices, cu_seqlens_values, op=CHUNK_O_OP)

    _check_dim("h", "h.shape[0]", h.shape[0], B, "B of q", op=CHUNK_O_OP)
    _check_dim("h", "h.shape[1] (NT)", h.shape[1], chunks_per_row,
               f"chunks of {CHUNK_SIZE} tokens per batch row, over all sequences when varlen", op=CHUNK_O_OP)
    total_chunks = B * chunks_per_row
    _check_dim("h", "h.shape[2:] (HV, K, V)", h.shape[2:], (HV, K, V), "from q and v", op=CHUNK_O_OP)

    _check_devices([("q", q), ("k", k), ("v", v), ("h", h), ("g", g), ("cu_seqlens", cu_seqlens),
                    ("chunk_indices", chunk_indices)], op=CHUNK_O_OP)

    tiling = tiling_for(K, V, q.dtype)
    problem = ChunkOProblem(B=B, T=T, H=H, HV=HV, K=K, V=V, num_chunks_total=total_chunks,
                            gated=g is not None, varlen=cu_seqlens is not None, dtype=q.dtype, tiling=tiling)
    if problem.num_programs > MAX_GRID_ROWS:
        _fail("q", f"at most {MAX_GRID_ROWS} (chunk, value head, V tile) programs",
              f"{problem.num_programs} ({total_chunks} chunks × {HV} heads × {problem.num_v_tiles} V tiles)",
              op=CHUNK_O_OP)
    return problem


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """A validated decode_step call: sizes that select the kernel and its grid."""

    N: int
    H: int
    HV: int
    K: int
    V: int
    dtype: str
    tiling: Tiling

    def grid(self, tiling: Tiling | None = None) -> tuple[int, int]:
        """The 2-D launch grid of both backends: (sequence·value head, V tile), with this problem's tiling
        unless another is given."""
        return self.N * self.HV, -(-self.V // (tiling or self.tiling).block_v)


def validate_decode_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    g: ArrayInfo,
    beta: ArrayInfo,
    state: ArrayInfo,
) -> DecodeProblem:
    """The shape, dtype and device contract of decode_step, shared by every backend.

    Raises ValueError (shapes, devices) or TypeError (dtypes, a missing array) naming the argument with the
    expected and the actual value. Returns the problem sizes with the tiling to use.
    """
    op = DECODE_OP
    arrays = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state)]
    _check_present(arrays, op=op)
    _check_rank("q", q, 3, "[N, H, K]", op=op)
    _check_rank("k", k, 3, "[N, H, K]", op=op)
    _check_rank("v", v, 3, "[N, HV, V]", op=op)
    N, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    _check_dim("v", "v.shape[0] (N)", v.shape[0], N, "q is [N, H, K]", op=op)
    _check_heads(q, k, v, op=op)
    for name, info in (("g", g), ("beta", beta)):
        _check_rank(name, info, 2, "[N, HV]", op=op)
        _check_dtype(name, info, ("float32",), op=op)
        _check_dim(name, f"{name}.shape", info.shape, (N, HV), "[N, HV] from q and v", op=op)
    _check_rank("state", state, 4, "[N, HV, K, V]", op=op)
    _check_dtype("state", state, ("float32",), op=op)
    _check_dim("state", "state.shape", state.shape, (N, HV, K, V), "[N, HV, K, V] from q and v", op=op)
    _check_devices(arrays, op=op)

    problem = DecodeProblem(N=N, H=H, HV=HV, K=K, V=V, dtype=q.dtype, tiling=decode_tiling(K, V, q.dtype))
    if problem.grid()[0] > MAX_GRID_ROWS:
        _fail("q", f"N·HV <= {MAX_GRID_ROWS} (programs along the grid's first axis)",
              f"N·HV = {N} × {HV} = {problem.grid()[0]}", op=op)
    return problem


@dataclasses.dataclass(frozen=True)
class ForwardProblem:
    """A validated chunk_gated_delta_rule call: sizes and flags that select the kernels and their grids."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    chunks_per_row: int
    varlen: bool
    dtype: str
    use_initial_state: bool
    output_final_state: bool

    @property
    def num_chunks_total(self) -> int:
        """Chunk rows over the batch: one per chunk of every sequence (with varlen, chunk_indices' rows)."""
        return self.B * self.chunks_per_row

    @property
    def prepare(self) -> Tiling:
        return prepare_tiling(self.K, self.V, self.dtype)

    @property
    def walk(self) -> Tiling:
        return walk_tiling(self.K, self.V, self.dtype, self.N * self.HV)

    def walk_grid(self, tiling: Tiling, pieces: int = 1) -> tuple[int, int]:
        """The 2-D grid of the walk kernel with this tiling: (V tile, sequence·piece·value head)."""
        return -(-self.V // tiling.block_v), self.N * pieces * self.HV

    def chunk_o(self) -> ChunkOProblem:
        """chunk_fwd_o on (q, k, v_new, h, g_c): its problem, without a second contract check."""
        return ChunkOProblem(B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V,
                             num_chunks_total=self.num_chunks_total, gated=True, varlen=self.varlen,
                             dtype=self.dtype, tiling=tiling_for(self.K, self.V, self.dtype))

    def pieces(self, multiprocessors: int | None) -> int:
        """Pieces per sequence of the context-parallel path on a GPU with that many SMs (tilings.context_pieces;
        1: the plain walk)."""
        walks = self.N * self.HV * -(-self.V // self.walk.block_v)
        return context_pieces(walks, self.K, self.num_chunks_total / max(self.N, 1), multiprocessors)


def validate_forward_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    g: ArrayInfo,
    beta: ArrayInfo,
    initial_state: ArrayInfo | None,
    cu_seqlens: ArrayInfo | None,
    chunk_indices: ArrayInfo | None,
    cu_seqlens_values: Sequence[int] | np.ndarray | None = None,
    output_final_state: bool = False,
) -> ForwardProblem:
    """The shape, dtype and device contract of chunk_gated_delta_rule, shared by every backend.

    cu_seqlens_values as in validate_chunk_o_inputs. Raises ValueError (shapes, values, devices) or
    TypeError (dtypes, a missing array) naming the argument with the expected and the actual value.
    """
    op = FORWARD_OP
    _check_present([("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)], op=op)
    B, T, H, K, HV, V = _check_token_arrays(q, k, v, op=op)
    for name, info, dtypes in (("g", g, ("float32",)), ("beta", beta, ("float32", q.dtype))):
        _check_rank(name, info, 3, "[B, T, HV]", op=op)
        _check_dtype(name, info, dtypes, op=op)
        _check_dim(name, f"{name}.shape", info.shape, (B, T, HV), "[B, T, HV] from q and v", op=op)
    chunks_per_row = _check_varlen(B, T, cu_seqlens, chunk_indices, cu_seqlens_values, op=op)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        _check_rank("initial_state", initial_state, 4, "[N, HV, K, V]", op=op)
        _check_dtype("initial_state", initial_state, ("float32",), op=op)
        _check_dim("initial_state", "initial_state.shape", initial_state.shape, (N, HV, K, V),
                   "[N, HV, K, V]: one state per sequence", op=op)
    _check_devices([("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state),
                    ("cu_seqlens", cu_seqlens), ("chunk_indices", chunk_indices)], op=op)
    problem = ForwardProblem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, chunks_per_row=chunks_per_row,
                             varlen=cu_seqlens is not None, dtype=q.dtype,
                             use_initial_state=initial_state is not None,
                             output_final_state=bool(output_final_state))
    if problem.num_chunks_total * HV > MAX_GRID_ROWS:
        _fail("q", f"at most {MAX_GRID_ROWS} (chunk, value head) programs", f"{problem.num_chunks_total * HV}", op=op)
    return problem
