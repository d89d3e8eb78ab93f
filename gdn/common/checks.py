"""The argument checks gdn's input contracts (gdn.common.contract) are made of: rank, dtype, sizes, heads,
devices, strided layouts, the varlen arguments (with the values of host index arrays), the gates and the
state-pool indices of framework-neutral ArrayInfo views, each raising
``ValueError`` / ``TypeError("<op>: <argument>: expected …; got …")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gdn.common.spec import (
    CHUNK_O_OP,
    INDEX_DTYPES,
    INPUT_DTYPES,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    PAD_CHUNK,
    num_chunks,
    prepare_chunk_indices,
)

if TYPE_CHECKING:
    from gdn.common.contract import ArrayInfo


def fail(arg: str, expected: str, got: object, error: type[Exception] = ValueError, *, op: str) -> None:
    """Raise error("<op>: <arg>: expected <expected>; got <got>")."""
    raise error(f"{op}: {arg}: expected {expected}; got {got}")


def rank(name: str, info: ArrayInfo, expected: int, layout: str, *, op: str) -> None:
    """info has `expected` axes (layout names them in the message)."""
    if len(info.shape) != expected:
        fail(name, f"a rank-{expected} array {layout}", f"shape {info.shape}", op=op)


def dtype(name: str, info: ArrayInfo, allowed: Sequence[str], *, op: str) -> None:
    """info's dtype is one of allowed (a TypeError otherwise)."""
    if info.dtype not in allowed:
        fail(name, f"dtype in {tuple(allowed)}", info.dtype, TypeError, op=op)


def dim(name: str, axis_name: str, actual: object, expected: object, why: str, *, op: str) -> None:
    """A size (or tuple of sizes) equals what the other arguments imply; why says what implies it."""
    if actual != expected:
        fail(name, f"{axis_name} = {expected} ({why})", f"{axis_name} = {actual}", op=op)


def heads(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, *, op: str) -> None:
    """What every op asks of q, k [..., H, K] and v [..., HV, V] (heads and head size the last two axes):
    k shaped as q, K and V in the supported range, HV a multiple of H, one input dtype."""
    H, K = q.shape[-2:]
    HV, V = v.shape[-2:]
    head_axis, size_axis = len(q.shape) - 2, len(q.shape) - 1  # v has q's rank in every op
    if k.shape != q.shape:
        fail("k", f"the shape of q {q.shape}", f"shape {k.shape}", op=op)
    for name, size in ((f"K (q.shape[{size_axis}])", K), (f"V (v.shape[{size_axis}])", V)):
        if not MIN_HEAD_DIM <= size <= MAX_HEAD_DIM:
            fail(name, f"a head size in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]", size, op=op)
    if H == 0 or HV % H != 0:
        fail("v", f"HV = v.shape[{head_axis}] a positive multiple of H = q.shape[{head_axis}] = {H}",
              f"HV = {HV}", op=op)
    dtype("q", q, INPUT_DTYPES, op=op)
    for name, info in (("k", k), ("v", v)):
        if info.dtype != q.dtype:
            fail(name, f"the dtype of q ({q.dtype})", info.dtype, TypeError, op=op)


def present(arrays: Sequence[tuple[str, ArrayInfo | None]], *, op: str) -> None:
    """Every named array given (a TypeError naming the first missing one)."""
    for name, info in arrays:
        if info is None:
            fail(name, "an array", None, TypeError, op=op)


def devices(arrays: Sequence[tuple[str, ArrayInfo | None]], *, op: str) -> None:
    """Every given array on the device of the first (q)."""
    (first_name, first), *others = arrays
    for name, info in others:
        if info is not None and info.device != first.device:
            fail(name, f"the device of {first_name} ({first.device})", info.device, op=op)


def row_strides(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int] | None:
    """(token-row stride, head stride), in elements, with which the chunked kernels read a [B, T, heads, D] array
    in place, or None when they cannot and the backend copies it once: the last axis contiguous, and the batch
    and token axes one packed row axis (B = 1, batch stride = T·token stride, or T = 1). The q, k and v slices
    of one fused [B, T, D_total] projection qualify. The head stride of a single head does not matter and is
    taken as D, so such views share the compiled kernel of dense arrays."""
    B, T, heads, D = shape
    stride_b, stride_t, stride_h, stride_d = strides
    if stride_d != 1:
        return None
    if B == 1 or stride_b == T * stride_t:
        row = stride_t
    elif T == 1:
        row = stride_b
    else:
        return None
    return row, (stride_h if heads > 1 else D)


def layouts(arrays: Sequence[tuple[str, ArrayInfo | None]], strided: Sequence[str], *, op: str) -> None:
    """Strided views (ArrayInfo.strides) only where the kernels take strides (the names in strided), in a layout
    they read (row_strides)."""
    for name, info in arrays:
        if info is None or info.strides is None:
            continue
        if name not in strided:
            fail(name, "a dense row-major array (backends copy other layouts first)", f"strides {info.strides}",
                 op=op)
        if row_strides(info.shape, info.strides) is None:
            fail(name, "the last axis contiguous and (B, T) one row axis (backends copy other layouts first)",
                 f"strides {info.strides} for shape {info.shape}", op=op)


def cu_seqlens_bounds(cu_seqlens: Sequence[int] | np.ndarray, T: int, op: str = CHUNK_O_OP,
                      exact: bool = True) -> None:
    """Value checks of a host cu_seqlens: starts at 0, non-decreasing, ends at T (at most at T unless exact:
    decode_step's rows past the last sequence are padding)."""
    values = np.asarray(cu_seqlens)
    if values[0] != 0:
        fail("cu_seqlens", "cu_seqlens[0] = 0", f"cu_seqlens[0] = {int(values[0])}", op=op)
    steps = np.diff(values)
    if (steps < 0).any():
        where = int(np.argmax(steps < 0))
        fail("cu_seqlens", "non-decreasing values",
              f"cu_seqlens[{where}] = {int(values[where])} > cu_seqlens[{where + 1}] = {int(values[where + 1])}",
              op=op)
    if values[-1] > T or (exact and values[-1] != T):
        fail("cu_seqlens", f"cu_seqlens[-1] {'=' if exact else '<='} T = {T}", f"cu_seqlens[-1] = {int(values[-1])}",
             op=op)


def chunk_indices_rows(cu_seqlens: Sequence[int] | np.ndarray, chunk_indices: np.ndarray,
                       op: str = CHUNK_O_OP) -> None:
    """Value checks of host chunk_indices [R, 2] against host cu_seqlens (already checked: cu_seqlens_bounds):
    the first rows are spec.prepare_chunk_indices(cu_seqlens), one per chunk of every sequence in order, and every
    row after them is PAD_CHUNK. Anything else would make a kernel read the wrong rows of h or leave outputs
    unwritten."""
    expected = prepare_chunk_indices(cu_seqlens)
    rows = np.asarray(chunk_indices).reshape(-1, 2)
    if len(rows) < len(expected):
        fail("chunk_indices", f"at least the {len(expected)} chunks of cu_seqlens "
             "(spec.prepare_chunk_indices(cu_seqlens))", f"{len(rows)} rows", op=op)
    wrong = np.flatnonzero((rows[:len(expected)] != expected).any(axis=1))
    if len(wrong):
        row = int(wrong[0])
        fail("chunk_indices", f"row {row} = (sequence, chunk) {tuple(int(x) for x in expected[row])} "
             "(spec.prepare_chunk_indices(cu_seqlens))", tuple(int(x) for x in rows[row]), op=op)
    padding = np.flatnonzero((rows[len(expected):] != PAD_CHUNK).any(axis=1))
    if len(padding):
        row = len(expected) + int(padding[0])
        fail("chunk_indices", f"PAD_CHUNK {PAD_CHUNK} in row {row}, after the {len(expected)} real chunks",
             tuple(int(x) for x in rows[row]), op=op)


def token_arrays(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, *, op: str) -> tuple[int, ...]:
    """q, k [B, T, H, K] and v [B, T, HV, V] of a chunked op; returns (B, T, H, K, HV, V)."""
    rank("q", q, 4, "[B, T, H, K]", op=op)
    rank("k", k, 4, "[B, T, H, K]", op=op)
    rank("v", v, 4, "[B, T, HV, V]", op=op)
    B, T, H, K = q.shape
    dim("v", "v.shape[:2] (B, T)", v.shape[:2], (B, T), "q is [B, T, H, K]", op=op)
    heads(q, k, v, op=op)
    return B, T, H, K, v.shape[2], v.shape[3]


def varlen(B: int, T: int, cu_seqlens: ArrayInfo | None, chunk_indices: ArrayInfo | None,
           cu_seqlens_values: Sequence[int] | np.ndarray | None, *, op: str) -> int:
    """The varlen arguments of a [B, T, ...] call; returns the chunks per batch row (over all sequences when
    varlen: chunk_indices' rows, padding included, else counted from the host cu_seqlens values)."""
    if cu_seqlens is None:
        if chunk_indices is not None:
            fail("chunk_indices", "None when cu_seqlens is None", f"shape {chunk_indices.shape}", op=op)
        return num_chunks(T)
    rank("cu_seqlens", cu_seqlens, 1, "[N + 1]", op=op)
    dtype("cu_seqlens", cu_seqlens, INDEX_DTYPES, op=op)
    if cu_seqlens.shape[0] < 2:
        fail("cu_seqlens", "at least 2 entries [0, ..., T]", f"shape {cu_seqlens.shape}", op=op)
    if B != 1:
        fail("q", "B = 1 when cu_seqlens is given (varlen packs sequences along T)", f"B = {B}", op=op)
    if cu_seqlens_values is not None:
        cu_seqlens_bounds(cu_seqlens_values, T, op=op)
    if chunk_indices is not None:
        rank("chunk_indices", chunk_indices, 2, "[NT, 2]", op=op)
        dtype("chunk_indices", chunk_indices, INDEX_DTYPES, op=op)
        if chunk_indices.shape[1] != 2:
            fail("chunk_indices", "shape [NT, 2]", f"shape {chunk_indices.shape}", op=op)
        return chunk_indices.shape[0]
    if cu_seqlens_values is not None:
        return int(sum(num_chunks(n) for n in np.diff(np.asarray(cu_seqlens_values))))
    raise ValueError(f"{op}: chunk_indices: expected chunk_indices or host cu_seqlens values; got neither")


def gate_dtypes(q: ArrayInfo) -> tuple[str, ...]:
    """Dtypes accepted for beta and the raw gates a, b, A_log, dt_bias of a call whose inputs are q's: float32
    or q's dtype (g is float32: its exp decays the state over many tokens)."""
    return tuple(dict.fromkeys(("float32", q.dtype)))


def gates(q: ArrayInfo, rows: tuple[int, ...], layout: str, HV: int, g: ArrayInfo | None, beta: ArrayInfo | None,
          a: ArrayInfo | None, b: ArrayInfo | None, A_log: ArrayInfo | None, dt_bias: ArrayInfo | None, *,
          op: str) -> bool:
    """The gates of a call with token rows `rows` (decode (T,), forward (B, T)): g, beta of shape rows + (HV,),
    or the raw gates a, b (same shape) with A_log, dt_bias [HV] (spec: g = −exp(A_log)·softplus(a + dt_bias),
    beta = sigmoid(b)). Returns whether the gates are raw."""
    raw = a is not None or b is not None
    given, other = ((("a", a), ("b", b), ("A_log", A_log), ("dt_bias", dt_bias)), (("g", g), ("beta", beta))) \
        if raw else ((("g", g), ("beta", beta)), (("a", a), ("b", b), ("A_log", A_log), ("dt_bias", dt_bias)))
    for name, info in other:
        if info is not None:
            why = "the raw gates a, b replace g and beta" if raw else "g and beta are given"
            fail(name, f"None ({why})", f"shape {info.shape}", op=op)
    for name, info in given:
        if info is None:
            hint = "" if raw else " (or the raw gates a, b with A_log and dt_bias)"
            fail(name, f"an array{hint}", None, TypeError, op=op)
    for name, info in given:
        per_head = name in ("A_log", "dt_bias")
        shape = (HV,) if per_head else tuple(rows) + (HV,)
        rank(name, info, len(shape), "[HV]" if per_head else layout, op=op)
        dtype(name, info, ("float32",) if name == "g" else gate_dtypes(q), op=op)
        dim(name, f"{name}.shape", info.shape, shape, f"{'[HV]' if per_head else layout} from q and v", op=op)
    return raw


def state_indices(indices: ArrayInfo | None, num_accepted_tokens: ArrayInfo | None, N: int, token_slots: bool, *,
                  op: str) -> int:
    """state_indices [N] (or, when token_slots, [N, S]) and num_accepted_tokens [N] (only with [N, S]), int32
    or int64. Returns S: the index columns (1 for [N], 0 without state_indices)."""
    if indices is None:
        if num_accepted_tokens is not None:
            fail("num_accepted_tokens", "None without state_indices", f"shape {num_accepted_tokens.shape}", op=op)
        return 0
    layout = "[N] or [N, S]" if token_slots else "[N]"
    if len(indices.shape) not in ((1, 2) if token_slots else (1,)):
        fail("state_indices", f"a rank-{'1 or 2' if token_slots else '1'} array {layout}", f"shape {indices.shape}",
             op=op)
    dtype("state_indices", indices, INDEX_DTYPES, op=op)
    dim("state_indices", "state_indices.shape[0] (N)", indices.shape[0], N, "one entry per sequence", op=op)
    columns = indices.shape[1] if len(indices.shape) == 2 else 1
    if columns == 0:
        fail("state_indices", "at least one column [N, S ≥ 1]", f"shape {indices.shape}", op=op)
    if num_accepted_tokens is not None:
        if len(indices.shape) != 2:
            fail("num_accepted_tokens", "None unless state_indices is [N, S] (per-token state slots)",
                 f"shape {num_accepted_tokens.shape}", op=op)
        rank("num_accepted_tokens", num_accepted_tokens, 1, "[N]", op=op)
        dtype("num_accepted_tokens", num_accepted_tokens, INDEX_DTYPES, op=op)
        dim("num_accepted_tokens", "num_accepted_tokens.shape[0] (N)", num_accepted_tokens.shape[0], N,
            "one entry per sequence", op=op)
    return columns


def state_index_values(indices: np.ndarray, pool_rows: int, *, op: str) -> None:
    """Value checks of host state_indices: every entry < pool_rows (negative entries are padded slots), and no
    pool row named twice (two writers of one row would race)."""
    values = np.asarray(indices).reshape(-1)
    if values.size and values.max() >= pool_rows:
        where = np.unravel_index(int(np.argmax(values)), np.shape(indices))
        fail("state_indices", f"entries < P = {pool_rows} (the pool's rows; negative: a padded slot)",
             f"state_indices[{', '.join(map(str, where))}] = {int(values.max())}", op=op)
    rows = values[values >= 0]
    unique, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        fail("state_indices", "each pool row named at most once",
             f"row {int(unique[np.argmax(counts > 1)])} {int(counts.max())} times", op=op)
