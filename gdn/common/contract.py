"""The input contract of gdn's ops, shared by every backend: one framework-neutral check per op
(validate_chunk_o_inputs, validate_decode_inputs, validate_forward_inputs, validate_backward_inputs, made of
gdn.common.checks) that raises ``ValueError`` / ``TypeError("<op>: <argument>: expected …; got …")`` before
anything is launched, and returns the validated problem (sizes, flags, tilings) that selects the kernels and
their grids.

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
    BACKWARD_OP,
    CHUNK_O_OP,
    CHUNK_SIZE,
    DECODE_OP,
    FORWARD_OP,
    INDEX_DTYPES,
    MAX_GRID_ROWS,
    STATE_DTYPES,
)
from gdn.common.tilings import (
    Tiling,
    backward_chunk_tiling,
    backward_walk_tiling,
    backward_wy_tiling,
    chunk_o_tiling,
    context_pieces,
    decode_tiling,
    prepare_tiling,
    walk_tiling,
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
    pool_rows: int = 0
    """Rows P of the state pool initial_state [P, HV, K, V] that state_indices names (0: no pool)."""
    qk_l2norm: bool = False
    """use_qk_l2norm_in_kernel: q and k L2-normalized in the kernels."""
    raw_gates: bool = False
    """g and beta computed in the kernels from the raw gates a, b, A_log, dt_bias."""
    strides: tuple[int, ...] = ()
    """Token-row and head strides of q, k and v as ChunkOProblem.strides (torch views of a fused projection;
    () for dense arrays): see row_strides."""

    @property
    def row_strides(self) -> tuple[int, int, int, int, int, int]:
        """The strides the kernels read q, k and v at: ForwardProblem.strides, or the dense ones."""
        return self.strides or contiguous_strides(self.H, self.K, self.HV, self.V)

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
        """chunk_fwd_o on (q, k, v_new, h, g_c): its problem, without a second contract check (q and k at their
        strides, v_new dense)."""
        return ChunkOProblem(B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V,
                             num_chunks_total=self.num_chunks_total, gated=True, varlen=self.varlen,
                             dtype=self.dtype, tiling=chunk_o_tiling(self.K, self.V, self.dtype),
                             num_sequences=self.N, strides=self.row_strides[:4] + (self.HV * self.V, self.V),
                             qk_l2norm=self.qk_l2norm)

    def pieces(self, multiprocessors: int | None) -> int:
        """Pieces per sequence of the context-parallel path on a GPU with that many SMs (tilings.context_pieces;
        1: the plain walk)."""
        walks = self.N * self.HV * -(-self.V // self.walk.block_v)
        return context_pieces(walks, self.K, self.num_chunks_total / max(self.N, 1), multiprocessors)


def validate_forward_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    g: ArrayInfo | None,
    beta: ArrayInfo | None,
    initial_state: ArrayInfo | None,
    cu_seqlens: ArrayInfo | None,
    chunk_indices: ArrayInfo | None,
    cu_seqlens_values: Sequence[int] | np.ndarray | None = None,
    output_final_state: bool = False,
    state_indices: ArrayInfo | None = None,
    a: ArrayInfo | None = None,
    b: ArrayInfo | None = None,
    A_log: ArrayInfo | None = None,
    dt_bias: ArrayInfo | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> ForwardProblem:
    """The shape, dtype and device contract of chunk_gated_delta_rule, shared by every backend.

    cu_seqlens_values as in validate_chunk_o_inputs. Serving arguments (gdn.common.spec, as decode_step's):
    state_indices [N] makes initial_state the state pool [P, HV, K, V] (required), read at row
    state_indices[n] and, with output_final_state, written back there; the raw gates a, b [B, T, HV] with
    A_log, dt_bias [HV] replace g and beta; use_qk_l2norm_in_kernel. Raises ValueError (shapes, values,
    devices) or TypeError (dtypes, a missing array) naming the argument with the expected and the actual value.
    """
    op = FORWARD_OP
    checks.present([("q", q), ("k", k), ("v", v)], op=op)
    B, T, H, K, HV, V = checks.token_arrays(q, k, v, op=op)
    raw_gates = checks.gates(q, (B, T), "[B, T, HV]", HV, g, beta, a, b, A_log, dt_bias, op=op)
    chunks_per_row = checks.varlen(B, T, cu_seqlens, chunk_indices, cu_seqlens_values, op=op)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    pool = checks.state_indices(state_indices, None, N, token_slots=False, op=op) > 0
    if pool and initial_state is None:
        checks.fail("initial_state", "the state pool [P, HV, K, V] that state_indices names", None, TypeError, op=op)
    if initial_state is not None:
        layout = "[P, HV, K, V]: the state pool" if pool else "[N, HV, K, V]"
        checks.rank("initial_state", initial_state, 4, layout, op=op)
        checks.dtype("initial_state", initial_state, ("float32",), op=op)
        rows = initial_state.shape[0] if pool else N
        checks.dim("initial_state", "initial_state.shape", initial_state.shape, (rows, HV, K, V),
                   f"{layout}: one state per {'pool row' if pool else 'sequence'}", op=op)
    checks.devices([("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("a", a), ("b", b), ("A_log", A_log),
                    ("dt_bias", dt_bias), ("initial_state", initial_state), ("state_indices", state_indices),
                    ("cu_seqlens", cu_seqlens), ("chunk_indices", chunk_indices)], op=op)
    checks.layouts([("q", q), ("k", k), ("v", v)], ("q", "k", "v"), op=op)
    strided = any(info.strides for info in (q, k, v))
    problem = ForwardProblem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, chunks_per_row=chunks_per_row,
                             varlen=cu_seqlens is not None, dtype=q.dtype,
                             use_initial_state=initial_state is not None,
                             output_final_state=bool(output_final_state),
                             pool_rows=initial_state.shape[0] if pool else 0,
                             qk_l2norm=bool(use_qk_l2norm_in_kernel), raw_gates=raw_gates,
                             strides=token_strides(q, k, v) if strided else ())
    if problem.num_chunks_total * HV > MAX_GRID_ROWS:
        checks.fail("q", f"at most {MAX_GRID_ROWS} (chunk, value head) programs", f"{problem.num_chunks_total * HV}",
                    op=op)
    return problem


def check_context_parallel(problem: ForwardProblem, argument: str) -> None:
    """What the context-parallel forward (one sequence split over devices: gdn.triton's group, gdn.pallas's
    axis_name) asks of a validated problem on each device: its slice of one dense sequence, B = 1, no
    cu_seqlens (a varlen batch is not split across devices), no serving arguments."""
    op = FORWARD_OP
    why = f"with {argument} (each device holds a slice of one dense sequence)"
    if problem.pool_rows or problem.raw_gates or problem.qk_l2norm:
        checks.fail(argument, f"no serving arguments (state_indices, raw gates, use_qk_l2norm_in_kernel) {why}",
                    "some", op=op)
    if problem.varlen:
        checks.fail("cu_seqlens", f"None {why}", "an array", op=op)
    if problem.B != 1:
        checks.fail("q", f"B = 1 {why}", f"B = {problem.B}", op=op)


@dataclasses.dataclass(frozen=True)
class BackwardProblem:
    """A validated backward of chunk_gated_delta_rule: the forward's problem (its recompute stores no final state)
    and whether a final-state gradient flows in; the tilings of the backward's kernels."""

    forward: ForwardProblem
    final_state_gradient: bool

    @property
    def chunk(self) -> Tiling:
        """Tiling of the per-chunk kernels dv_local and dqkwg."""
        f = self.forward
        return backward_chunk_tiling(f.K, f.V, f.dtype)

    @property
    def wy(self) -> Tiling:
        """Tiling of the per-chunk WY kernel."""
        f = self.forward
        return backward_wy_tiling(f.K, f.V, f.dtype)

    @property
    def walk(self) -> Tiling:
        """Tiling of the backward walk."""
        f = self.forward
        return backward_walk_tiling(f.K, f.V, f.dtype, f.N * f.HV)

    @property
    def group(self) -> int:
        """m = HV / H, the value heads of one q/k head."""
        return self.forward.HV // self.forward.H


def validate_backward_inputs(
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    g: ArrayInfo,
    beta: ArrayInfo,
    initial_state: ArrayInfo | None,
    cu_seqlens: ArrayInfo | None,
    chunk_indices: ArrayInfo | None,
    do: ArrayInfo,
    final_state_gradient: ArrayInfo | None,
    cu_seqlens_values: Sequence[int] | np.ndarray | None = None,
) -> BackwardProblem:
    """The contract of chunk_gated_delta_rule's backward: the forward's inputs as validate_forward_inputs checks
    them, do shaped and typed as o ([B, T, HV, V], v's dtype), final_state_gradient None or [N, HV, K, V]
    float32. Raises ValueError / TypeError naming the argument."""
    op = BACKWARD_OP
    forward = validate_forward_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, cu_seqlens_values)
    checks.present([("do", do)], op=op)
    checks.dim("do", "do.shape", do.shape, v.shape, "the shape of o, [B, T, HV, V]", op=op)
    if do.dtype != v.dtype:
        checks.fail("do", f"the dtype of o, v's ({v.dtype})", do.dtype, TypeError, op=op)
    if final_state_gradient is not None:
        shape = (forward.N, forward.HV, forward.K, forward.V)
        checks.dim("final_state_gradient", "final_state_gradient.shape", final_state_gradient.shape, shape,
                   "[N, HV, K, V], the final state's", op=op)
        checks.dtype("final_state_gradient", final_state_gradient, ("float32",), op=op)
    checks.devices([("q", q), ("do", do), ("final_state_gradient", final_state_gradient)], op=op)
    return BackwardProblem(forward=forward, final_state_gradient=final_state_gradient is not None)
