"""The input contract of gdn's ops, shared by every backend: one framework-neutral check per op
(validate_chunk_o_inputs and validate_decode_inputs here, validate_forward_inputs and validate_backward_inputs
in gdn.common.forward_contract; made of gdn.common.checks) that raises ``ValueError`` / ``TypeError("<op>:
<argument>: expected …; got …")`` before anything is launched, and returns the validated problem (sizes, flags,
tilings) that selects the kernels and their grids.

Input rules, the same for every op and backend (README, "Input rules"):
  - dtypes: q, k, v one of INPUT_DTYPES, all three the same; the per-token gates of chunk_gated_delta_rule and
    decode_step (checks.gates): g float32 (its exp decays the state over many tokens), beta and the raw gates
    a, b, A_log, dt_bias float32 or q's dtype (the kernels compute with them in float32); chunk_fwd_o's g, a
    chunk-local cumulative sum, float32 (16 bits would round the decay of a chunk's late tokens); states
    (initial_state, decode_step's state) float32; chunk_fwd_o's h any of STATE_DTYPES; index arrays
    (cu_seqlens, chunk_indices, state_indices) one of INDEX_DTYPES. Outputs: o in v's dtype, states float32.
  - layouts (torch; JAX arrays are always dense): chunk_fwd_o reads q, k, v in place at any strides that keep
    their last axis contiguous and their batch and token axes one packed row axis (checks.row_strides: B = 1, or
    batch stride = T·token stride), e.g. the q, k, v slices of one fused projection; any other layout of them,
    and every other non-contiguous array of its call, is copied once (.contiguous()) before the launch;
    decode_step reads its token arrays at any token stride and its state pool in two layouts (gdn.triton.decode)
    and copies other layouts once; chunk_gated_delta_rule copies non-contiguous token arrays (q, k, v and the
    gates) once and refuses other non-contiguous arrays (a pool is updated in place, never copied).
  - devices: every array on q's device (torch: CUDA, or CPU under TRITON_INTERPRET=1; JAX: where the call runs).
  - index arrays: cu_seqlens [N + 1] starts at 0, never decreases, ends at T; chunk_indices is
    spec.prepare_chunk_indices(cu_seqlens), optionally padded with PAD_CHUNK rows at the end. Whenever both are
    on the host their values are checked before the launch (checks.cu_seqlens_bounds, checks.chunk_indices_rows);
    device values are not read (no sync), and the kernels bound every index they dereference instead: a
    chunk_indices row naming no real chunk reads and writes nothing, cu_seqlens values are clamped into [0, T].
    Outputs at tokens that no valid row names are then left unwritten.
  - autograd: chunk_gated_delta_rule is differentiable (torch.autograd, jax.custom_vjp; not with a state pool
    or across devices); the other ops have no backward: torch refuses inputs that require grad (with grad mode
    on), JAX raises under jax.grad / jax.jvp — never a silently detached output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gdn.common import checks
from gdn.common.spec import (
    CHUNK_O_OP,
    CHUNK_SIZE,
    DECODE_OP,
    INDEX_DTYPES,
    MAX_GRID_ROWS,
    STATE_DTYPES,
)
from gdn.common.tilings import (
    Tiling,
    chunk_o_tiling,
    decode_tiling,
)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """What the contract needs to know about one array, in framework-neutral terms. strides: the element strides
    at which a backend reads it in place (checks.layouts: which an op accepts), or None for a dense row-major
    array."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    strides: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ChunkOProblem:
    """A validated chunk_fwd_o call: sizes, flags and layouts that select the kernel and its grid;
    num_sequences: B, or N when varlen."""

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
    num_sequences: int
    strides: tuple[int, int, int, int, int, int]
    """Token-row and head strides, in elements, of q, k and v (contiguous_strides for dense arrays)."""
    qk_l2norm: bool = False
    """q and k rows L2-normalized in the kernel (the forward's use_qk_l2norm_in_kernel; not a chunk_fwd_o
    argument)."""

    @property
    def num_v_tiles(self) -> int:
        return -(-self.V // self.tiling.block_v)

    @property
    def num_programs(self) -> int:
        """Programs of the 1-D grid: one per (chunk, value head, V tile)."""
        return self.num_chunks_total * self.HV * self.num_v_tiles


def contiguous_strides(H: int, K: int, HV: int, V: int) -> tuple[int, int, int, int, int, int]:
    """(token-row, head) strides of dense q, k [B, T, H, K] and v [B, T, HV, V], the layout of ChunkOProblem.strides."""
    return H * K, K, H * K, K, HV * V, V


def token_strides(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo) -> tuple[int, int, int, int, int, int]:
    """(token-row, head) strides, in elements, with which the kernels read q, k and v: their own for strided
    views (checks.row_strides; checked by checks.layouts), the dense ones otherwise."""
    H, K, HV, V = q.shape[2], q.shape[3], v.shape[2], v.shape[3]
    dense = contiguous_strides(H, K, HV, V)
    return tuple(x for i, info in enumerate((q, k, v))
                 for x in (checks.row_strides(info.shape, info.strides) if info.strides else dense[2 * i:2 * i + 2]))


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
    """The shape, dtype, layout and device contract of chunk_fwd_o, shared by every backend.

    q, k and v may be strided views (ArrayInfo.strides, in a layout checks.row_strides accepts); every other array is
    dense. ``cu_seqlens_values`` is the host copy of cu_seqlens when one is at hand (the backends pass it when
    cu_seqlens is a host array or when they had to read it anyway to build chunk_indices); its values are
    then checked too. Raises ValueError (shapes, values, devices) or TypeError (dtypes) naming the argument
    with the expected and the actual value. Returns the problem sizes with the tiling to use.
    """
    B, T, H, K, HV, V = checks.token_arrays(q, k, v, op=CHUNK_O_OP)
    checks.rank("h", h, 5, "[B, NT, HV, K, V]", op=CHUNK_O_OP)
    checks.dtype("h", h, STATE_DTYPES, op=CHUNK_O_OP)

    if g is not None:
        checks.rank("g", g, 3, "[B, T, HV]", op=CHUNK_O_OP)
        checks.dtype("g", g, ("float32",), op=CHUNK_O_OP)
        checks.dim("g", "g.shape", g.shape, (B, T, HV), "[B, T, HV] from q and v", op=CHUNK_O_OP)

    chunks_per_row = checks.varlen(B, T, cu_seqlens, chunk_indices, cu_seqlens_values, op=CHUNK_O_OP)

    checks.dim("h", "h.shape[0]", h.shape[0], B, "B of q", op=CHUNK_O_OP)
    checks.dim("h", "h.shape[1] (NT)", h.shape[1], chunks_per_row,
               f"chunks of {CHUNK_SIZE} tokens per batch row, over all sequences when varlen", op=CHUNK_O_OP)
    total_chunks = B * chunks_per_row
    checks.dim("h", "h.shape[2:] (HV, K, V)", h.shape[2:], (HV, K, V), "from q and v", op=CHUNK_O_OP)

    arrays = [("q", q), ("k", k), ("v", v), ("h", h), ("g", g), ("cu_seqlens", cu_seqlens),
              ("chunk_indices", chunk_indices)]
    checks.devices(arrays, op=CHUNK_O_OP)
    checks.layouts(arrays, ("q", "k", "v"), op=CHUNK_O_OP)

    tiling = chunk_o_tiling(K, V, q.dtype)
    strides = token_strides(q, k, v)
    problem = ChunkOProblem(B=B, T=T, H=H, HV=HV, K=K, V=V, num_chunks_total=total_chunks,
                            gated=g is not None, varlen=cu_seqlens is not None, dtype=q.dtype, tiling=tiling,
                            num_sequences=B if cu_seqlens is None else cu_seqlens.shape[0] - 1, strides=strides)
    if problem.num_programs > MAX_GRID_ROWS:
        checks.fail("q", f"at most {MAX_GRID_ROWS} (chunk, value head, V tile) programs",
              f"{problem.num_programs} ({total_chunks} chunks × {HV} heads × {problem.num_v_tiles} V tiles)",
              op=CHUNK_O_OP)
    return problem


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """A validated decode_step call: sizes and flags that select the kernel and its grid."""

    N: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    dtype: str
    tiling: Tiling
    varlen: bool = False
    pool_rows: int | None = None
    index_columns: int = 0
    token_states: bool = False
    accepted: bool = False
    qk_l2norm: bool = False
    raw_gates: bool = False

    @property
    def pool(self) -> bool:
        """Whether the state is a pool read and updated in place through state_indices."""
        return self.pool_rows is not None

    def grid(self, tiling: Tiling | None = None) -> tuple[int, int]:
        """The 2-D launch grid of both backends: (sequence·value head, V tile), with this problem's tiling
        unless another is given."""
        return self.N * self.HV, -(-self.V // (tiling or self.tiling).block_v)


def validate_decode_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    g: ArrayInfo | None,
    beta: ArrayInfo | None,
    state: ArrayInfo,
    state_indices: ArrayInfo | None = None,
    cu_seqlens: ArrayInfo | None = None,
    num_accepted_tokens: ArrayInfo | None = None,
    a: ArrayInfo | None = None,
    b: ArrayInfo | None = None,
    A_log: ArrayInfo | None = None,
    dt_bias: ArrayInfo | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> DecodeProblem:
    """The shape, dtype and device contract of decode_step, shared by every backend (index values:
    validate_decode_index_values).

    Raises ValueError (shapes, devices) or TypeError (dtypes, a missing array) naming the argument with the
    expected and the actual value. Returns the problem sizes and flags with the tiling to use.
    """
    op = DECODE_OP
    arrays = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state),
              ("state_indices", state_indices), ("cu_seqlens", cu_seqlens),
              ("num_accepted_tokens", num_accepted_tokens), ("a", a), ("b", b), ("A_log", A_log),
              ("dt_bias", dt_bias)]
    checks.present([("q", q), ("k", k), ("v", v), ("state", state)], op=op)
    checks.rank("q", q, 3, "[T, H, K]", op=op)
    checks.rank("k", k, 3, "[T, H, K]", op=op)
    checks.rank("v", v, 3, "[T, HV, V]", op=op)
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    checks.dim("v", "v.shape[0] (T)", v.shape[0], T, "q is [T, H, K]", op=op)
    checks.heads(q, k, v, op=op)
    raw_gates = checks.gates(q, (T,), "[T, HV]", HV, g, beta, a, b, A_log, dt_bias, op=op)
    N = T
    if cu_seqlens is not None:
        checks.rank("cu_seqlens", cu_seqlens, 1, "[N + 1]", op=op)
        checks.dtype("cu_seqlens", cu_seqlens, INDEX_DTYPES, op=op)
        if cu_seqlens.shape[0] < 1:
            checks.fail("cu_seqlens", "at least 1 entry [0, ...]", f"shape {cu_seqlens.shape}", op=op)
        N = cu_seqlens.shape[0] - 1
    columns = checks.state_indices(state_indices, num_accepted_tokens, N, token_slots=True, op=op)
    checks.rank("state", state, 4, "[N, HV, K, V] (or a pool [P, HV, K, V] with state_indices)", op=op)
    checks.dtype("state", state, ("float32",), op=op)
    if state_indices is None:
        checks.dim("state", "state.shape", state.shape, (N, HV, K, V), "[N, HV, K, V] from q and v", op=op)
    else:
        checks.dim("state", "state.shape[1:]", state.shape[1:], (HV, K, V), "a pool [P, HV, K, V] from q and v",
                   op=op)
    checks.devices(arrays, op=op)

    problem = DecodeProblem(
        N=N, T=T, H=H, HV=HV, K=K, V=V, dtype=q.dtype, tiling=decode_tiling(K, V, q.dtype),
        varlen=cu_seqlens is not None, pool_rows=None if state_indices is None else state.shape[0],
        index_columns=columns, token_states=state_indices is not None and len(state_indices.shape) == 2,
        accepted=num_accepted_tokens is not None, qk_l2norm=bool(use_qk_l2norm_in_kernel), raw_gates=raw_gates)
    if problem.grid()[0] > MAX_GRID_ROWS:
        checks.fail("q", f"N·HV <= {MAX_GRID_ROWS} (programs along the grid's first axis)",
                    f"N·HV = {N} × {HV} = {problem.grid()[0]}", op=op)
    return problem


def validate_decode_index_values(problem: DecodeProblem, state_indices: np.ndarray | None = None,
                                 cu_seqlens: np.ndarray | None = None,
                                 num_accepted_tokens: np.ndarray | None = None) -> None:
    """Value checks of decode_step's index arrays that are on the host (None: not at hand, bounds-masked in the
    kernel instead): cu_seqlens starts at 0, never decreases, ends at most at T (and with [N, S] state_indices
    gives at most S tokens per sequence); state_indices as in checks.state_index_values; num_accepted_tokens at
    most S (below 1: a skipped sequence)."""
    op = DECODE_OP
    if cu_seqlens is not None:
        checks.cu_seqlens_bounds(cu_seqlens, problem.T, op=op, exact=False)
        lengths = np.diff(np.asarray(cu_seqlens))
        if problem.token_states and lengths.size and lengths.max() > problem.index_columns:
            n = int(np.argmax(lengths))
            checks.fail("cu_seqlens", f"at most S = {problem.index_columns} tokens per sequence (state_indices' "
                        "columns: one state slot per token)", f"{int(lengths[n])} tokens in sequence {n}", op=op)
    if state_indices is not None:
        checks.state_index_values(state_indices, problem.pool_rows, op=op)
    if num_accepted_tokens is not None:
        values = np.asarray(num_accepted_tokens)
        if values.size and values.max() > problem.index_columns:
            n = int(np.argmax(values))
            checks.fail("num_accepted_tokens", f"at most S = {problem.index_columns} (state_indices' columns)",
                        f"num_accepted_tokens[{n}] = {int(values[n])}", op=op)
