"""The input contract of chunk_gated_delta_rule, forward and backward, on gdn.common.contract's rules and
ArrayInfo: validate_forward_inputs and validate_backward_inputs raise ``ValueError`` / ``TypeError("<op>:
<argument>: expected …; got …")`` before anything is launched and return the validated problem (ForwardProblem,
BackwardProblem: sizes, flags, tilings) that selects the kernels and their grids; check_context_parallel adds
what the context-parallel forward asks of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gdn.common import checks
from gdn.common.contract import ArrayInfo, ChunkOProblem, contiguous_strides, token_strides
from gdn.common.spec import (
    BACKWARD_OP,
    FORWARD_OP,
    MAX_GRID_ROWS,
)
from gdn.common.tilings import (
    Tiling,
    backward_chunk_tiling,
    backward_walk_tiling,
    backward_wy_tiling,
    chunk_o_tiling,
    context_pieces,
    prepare_tiling,
    walk_tiling,
)


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

    def pieces(self, multiprocessors: int | None, walk_block_v: int | None = None) -> int:
        """Pieces per sequence of the context-parallel path on a GPU with that many SMs (tilings.context_pieces;
        1: the plain walk), for a walk of walk_block_v V columns per program (default: the walk tiling's)."""
        walks = self.N * self.HV * -(-self.V // (walk_block_v or self.walk.block_v))
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
