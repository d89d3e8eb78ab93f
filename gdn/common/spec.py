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

Op: ``decode_step`` — one token of the gated delta rule recurrence for each of N sequences (decoding).

Layouts:
    q, k   [N, H, K]             the token's query / key, H query-key heads (k L2-normalized by the model)
    v      [N, HV, V]            its values, HV = m·H value heads; value head hv reads q/k head hv // m
    g      [N, HV] float32       per-token log-gate in natural-log units (g ≤ 0; NOT cumulative)
    beta   [N, HV] float32       the delta rule's write strength (in [0, 1] for a sigmoid beta)
    state  [N, HV, K, V] float32 S before the token; the step returns S after it as a new float32 array
    o      [N, HV, V]            in v's dtype; accumulation in float32

Math, per sequence and value head, S ∈ R^{K×V} (the same recurrence as gdn.common.reference
.recurrent_gated_delta_rule over T tokens):
    S ← exp(g)·S
    S ← S + k ⊗ (beta·(v − Sᵀk))
    o  = scale·Sᵀq                (scale defaults to K**-0.5)
One program per (sequence·value head, V tile) holds its [K, V tile] slice of S in registers: the V columns
of S are independent in every line above, so the tiles never exchange data.

Op: ``chunk_gated_delta_rule`` — the whole chunked Gated DeltaNet forward (prefill), from raw inputs.

Layouts: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] float32 per-token log-gate (≤ 0, NOT cumulative);
beta [B, T, HV] (float32 or q's dtype); initial_state [N, HV, K, V] float32 or None (N = B, or the number of
sequences when varlen); returns o [B, T, HV, V] in v's dtype and final_state [N, HV, K, V] float32 (or None).
Three kernels, each with tile height CHUNK_SIZE, per sequence, value head and chunk c (rows i, columns j):
  1. prepare (one program per chunk and value head; nothing crosses a chunk):
       g_c  = chunk-local cumsum of the log-gates
       A    = strictly lower (beta_i·k_i·k_j·exp(g_i − g_j))_{j<i}
       T_c  = (I + A)⁻¹, by forward substitution (exact float32) on the four SUBBLOCK×SUBBLOCK diagonal blocks
              and the blocked merge (I + A)⁻¹ = (I − N)(I + N²)·D⁻¹, D = I + diag blocks of A,
              N = D⁻¹·(A below the diagonal blocks), N⁴ = 0: every entry a product of at most 3 blocks
       w    = T_c·(beta·exp(g_c)·k),   u = T_c·(beta·v)
  2. states (one program per sequence, value head and V tile, walking the chunks in order; S float32):
       h[c] = S (stored in k's dtype for stage 3);   v_new = u − w·S
       S    = exp(g_last)·S + kᵀ·(exp(g_last − g)·v_new)     (g_last: g at the chunk's last token)
  3. chunk_fwd_o(q, k, v_new, h, g_c).
This equals the token-by-token recurrence (gdn.common.reference.recurrent_gated_delta_rule) in exact
arithmetic: the WY form of the delta rule's S updates within a chunk.
"""

from __future__ import annotations

import dataclasses
import functools
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



def dot_precision(dtype: str) -> str:
    """Triton input_precision of the kernels' dots for inputs of dtype: FLOAT32_DOT_PRECISION for float32;
    TF32 for 16-bit inputs, where it reaches only float32 operands whose products are rounded to the 16-bit
    dtype next (chunk_gated_delta_rule's (I + A)⁻¹ merge); every other dot there has 16-bit operands."""
    return FLOAT32_DOT_PRECISION if dtype == "float32" else "tf32"


INPUT_DTYPES = ("float32", "float16", "bfloat16")
STATE_DTYPES = INPUT_DTYPES
INDEX_DTYPES = ("int32", "int64")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes and launch parameters of one gdn kernel, shared by the Triton and Pallas-Triton backends.

    block_k: K columns per step (chunk_fwd_o: the K loop's step; decode_step: the whole K), a power of two
        ≥ 16, masked when K is not a multiple.
    block_v: V columns per program (a power of two, masked likewise).
    num_warps, num_stages: Triton launch parameters.
    max_registers: a cap on registers per thread (ptxas maxnreg) for the Triton backend, or None; the
        Pallas-Triton lowering has no such option, so the Pallas backend compiles without it.
    The tile height of chunk_fwd_o is always CHUNK_SIZE.
    """

    block_k: int
    block_v: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def tiling_for(K: int, V: int, dtype: str) -> Tiling:
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
    return Tiling(block_k=block_k, block_v=block_v, num_warps=4, num_stages=2)


PERSISTENT_PROGRAMS_PER_SM = 1
"""Programs per SM of the Pallas chunk_fwd_o's persistent grid: one is resident per SM anyway, since its
2-stage pipeline of the q, k, h and v tiles takes 172 KB of shared memory."""

PERSISTENT_MIN_ITEMS_PER_PROGRAM = 12
"""The Pallas chunk_fwd_o loops over work items in persistent programs once each program would take at least
this many; below, one program per item."""


def persistent_programs(num_items: int, multiprocessors: int | None) -> int:
    """Grid size of the Pallas chunk_fwd_o for num_items (chunk, value head, V tile) work items on a GPU with
    that many SMs (None: not a GPU, one program per item).

    A coarse size class on the item count, which grows with T; the Pallas backend compiles per shape anyway,
    and every grid size gives the same bits.
    """
    # Measured on an H100 (bf16, K = V = 128, Nsight Compute kernel time, µs, one program per item →
    # persistent; benchmarks/RESULTS.md): programs that loop over items with a static trip count let Triton
    # pipeline the next item's loads under this item's dots, which one program per item (2 resident per SM,
    # register-bound) cannot. From 15.5 items per program on, it wins: T = 8192 H = 16 (2048 items) 75-76 → 74;
    # T = 16384 148 → 140; T = 65536 580 → 540 (the copy floor); B = 8 T = 2048 HV = 32 266 → 245; varlen
    # 65536 tokens 608 → 567; H = 2 HV = 8 T = 16384 64-65 → 63-64. At 7.8 items per program it loses:
    # T = 4096 H = 16 39 → 40-41, few heads (H = 2 HV = 8 T = 8192) 32.6 → 35, where the pipeline's prologue and
    # the tail cost more than it hides. The Triton backend keeps one program per item: its kernel streams at
    # the copy bandwidth at T = 65536 without it.
    if multiprocessors is None:
        return num_items
    programs = PERSISTENT_PROGRAMS_PER_SM * multiprocessors
    return programs if num_items >= PERSISTENT_MIN_ITEMS_PER_PROGRAM * programs else num_items


@functools.lru_cache(maxsize=256)
def decode_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of decode_step for head sizes K, V and input dtype name.

    T never enters (one token per call); neither does N, so a batch of 1 and one of 512 share a program.
    """
    # Measured on an H100 (benchmarks/decode.py, bf16, H = 16, HV = 32, K = V = 128; RESULTS.md): a decode step
    # reads and writes S (2·K·V·4 bytes per head) for 7 flops per element of S, so it is memory-bound and the
    # tile's job is to stream S in long rows. 64-column tiles with 4 warps reach 90-96 % of the copy-bandwidth
    # floor at N = 64 and 256 (99 and 373 µs; FLA's fused_recurrent 115 and 441 µs), where gdn's first tiling
    # (BV = 8, one warp, 32-byte row segments) reached 27-31 % (290 and 1309 µs); at N = 1 and 16 every tile
    # ties within 1 µs (launch latency). S is float32 whatever the input dtype, so dtype selects nothing. No
    # loop: nothing for num_stages to pipeline.
    del dtype
    return Tiling(block_k=_next_power_of_2(max(K, MIN_HEAD_DIM)), block_v=min(_next_power_of_2(V), 64),
                  num_warps=4, num_stages=1)


SUBBLOCK = 16
"""Rows of the diagonal blocks that chunk_gated_delta_rule's prepare kernel inverts by forward substitution.
Its blocked merge (I + N)⁻¹ = (I − N)(I + N²) needs N⁴ = 0: exactly four blocks per chunk."""
assert CHUNK_SIZE == 4 * SUBBLOCK


def _register_cap(blocks_per_sm: int, num_warps: int) -> int:
    """The most registers per thread that let blocks_per_sm blocks of num_warps warps share an SM's 65 536
    (Hopper and Ampere), allocated in steps of 8 per thread: 168 for 3 blocks of 4 warps."""
    return 65536 // (blocks_per_sm * num_warps * 32) // 8 * 8


@functools.lru_cache(maxsize=256)
def prepare_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's prepare kernel (A, (I + A)⁻¹, w, u for one chunk and
    value head): K and V walked in block_k / block_v column steps."""
    # 64-column steps as in chunk_fwd_o's K loop; measured on an H100 (bf16, K = V = 128, T = 8192, H = 16:
    # benchmarks/RESULTS.md): 8 warps lose (390 against 214 µs before the [NB, BS, BS] substitution), one
    # 128-column step or a second pipeline stage change nothing. Two Triton 3.6 miscompiles on Hopper shape
    # this row, so wider tiles are masked down to K and V instead: a 16-bit dot with a 16-column operand built
    # in registers is wrong (w and u garbage at K or V = 16), and so is u when its tiles are narrower than w's
    # (block_k 64 with block_v 32: u off by 25-110 % at K ≥ 48, V ≤ 32 in fp16 and bf16, while 64/64 and
    # 32/32 are exact; found by the GPU run of tests/test_properties.py). Hence one width for both, ≥ 32.
    # The kernel is latency-bound (ncu at T = 8192: 25 % of SM throughput, 37 % of DRAM bandwidth, stalled on
    # loads), and its 188 registers per thread fit 2 blocks of 128 threads per SM. Capped at 168 for 16-bit
    # inputs (3 blocks; 8 spilled) it runs 102 → 84 µs at T = 8192, 367 → 291 µs at B = 8, T = 2048, HV = 32,
    # 54 → 48 µs with few heads, bit-identical; 128 registers spill 42 and lose; float32 was not measured.
    block = min(max(_next_power_of_2(max(K, V)), 32), 64)
    return Tiling(block_k=block, block_v=block, num_warps=4, num_stages=1,
                  max_registers=_register_cap(3, num_warps=4) if dtype in ("float16", "bfloat16") else None)


STATE_MIN_PROGRAMS = 128
"""The states kernel's V tiles are as wide as keeps at least this many programs walking (about one per SM of
an H100, 132): spec.state_tiling's size class."""

STATE_BLOCK_V = (16, 32, 64)
"""The V-tile widths of the states kernel, narrowest first."""


@functools.lru_cache(maxsize=256)
def state_tiling(K: int, V: int, dtype: str, sequence_heads: int) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's states kernel for sequence_heads = N·HV walks (sequences
    times value heads): the whole K (a power of two) by block_v columns of S per program; the chunk loop is
    pipelined num_stages deep. block_v is the widest of STATE_BLOCK_V (masked down to V) that still gives
    STATE_MIN_PROGRAMS programs, else the narrowest: a coarse size class on the batch, never on T."""
    # Measured on an H100 (bf16, K = V = 128, µs of the states kernel; benchmarks/RESULTS.md): the walk over
    # chunks is sequential, so a program's time is its chunk count times one chunk's latency. With few walks,
    # narrow tiles put more programs on the SMs: N·HV = 16 (T = 8192): BV 16 132, 32 167, 64 230; N·HV = 32:
    # 107 / 91 / 113. With enough walks, wide tiles win because every V tile re-reads the chunk's w and k:
    # N·HV = 64: 205 / 176 / 150; 256 (B8 T2048 HV32): 422 / 356 / 280; 1024: 842 / 764 / 630. 4 warps and 3
    # stages throughout (2 stages: 202 µs against 137 at N·HV = 16; 8 warps 170).
    del dtype
    widths = [min(width, _next_power_of_2(max(V, MIN_HEAD_DIM))) for width in STATE_BLOCK_V]
    block_v = next((width for width in reversed(widths) if sequence_heads * -(-V // width) >= STATE_MIN_PROGRAMS),
                   widths[0])
    return Tiling(block_k=_next_power_of_2(max(K, MIN_HEAD_DIM)), block_v=block_v, num_warps=4, num_stages=3)


PIPELINE_MIN_SEGMENT_CHUNKS = 64
"""Chunks per segment, at least, when the Triton forward pipelines one long sequence (spec.pipeline_segment_chunks)."""

PIPELINE_MIN_SEGMENTS = 4
PIPELINE_MAX_SEGMENTS = 8
"""Segments of a pipelined Triton forward: at least 4 of PIPELINE_MIN_SEGMENT_CHUNKS for the pipeline to pay
for its host time, at most 8 (each costs three more launches)."""


def pipeline_segment_chunks(B: int, N: int, HV: int, chunks_per_row: int, varlen: bool) -> int | None:
    """Chunks per segment when the Triton forward runs one dense sequence (B = 1) as a pipeline over CUDA
    streams, or None for the three stages once over the whole input: a coarse size class on the chunk count.

    The pipeline runs prepare, the states walk and chunk_fwd_o segment by segment, the walk of segment s on a
    high-priority stream while prepare(s + 1) and chunk_fwd_o(s − 1) fill the SMs the walk leaves idle. It
    applies when the walk is latency-bound (fewer than STATE_MIN_PROGRAMS walks, N·HV) and the sequence has
    PIPELINE_MIN_SEGMENTS segments of PIPELINE_MIN_SEGMENT_CHUNKS chunks or more; segments are that long, or
    longer so there are at most PIPELINE_MAX_SEGMENTS. The bits are those of one pass: the state crosses a
    segment boundary through float32 memory exactly as it would stay in registers.
    """
    # Measured on an H100 (bf16, K = V = 128, do_bench µs, one pass → pipelined; benchmarks/RESULTS.md):
    # H = 16 T = 65536 2177 → 1903-1923 (8 segments of 128 chunks); H = 2 HV = 8 T = 16384 420 → 393 (4 of 64).
    # Shorter inputs lose on host time: each segment costs about 130 µs of CPU (three launches, stream
    # switches, events), so at T = 8192 the pipeline took 242 against 221 µs (H = 2 HV = 8) and 322 against
    # 308 (H = 16), although in a CUDA graph, where host time does not enter, it ran 191 against 213 and 281
    # against 292.
    if (varlen or B != 1 or N * HV >= STATE_MIN_PROGRAMS
            or chunks_per_row < PIPELINE_MIN_SEGMENTS * PIPELINE_MIN_SEGMENT_CHUNKS):
        return None
    return max(PIPELINE_MIN_SEGMENT_CHUNKS, -(-chunks_per_row // PIPELINE_MAX_SEGMENTS))


def state_warmup_sequence_counts(HV: int, V: int) -> tuple[int, ...]:
    """Sequence counts N whose calls select every distinct spec.state_tiling width for HV value heads and V:
    what a warmup runs so that no later batch size compiles another states variant."""
    counts = {1}
    for width in STATE_BLOCK_V:
        counts.add(-(-STATE_MIN_PROGRAMS // (HV * -(-V // width))))
    return tuple(sorted(counts))


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


def warmup_arguments(T: int, H: int, HV: int, K: int, V: int, gated: bool, varlen: bool,
                     num_sequences: int = 1) -> dict:
    """A call of num_sequences sequences of T tokens each for the backends' warmups (dense: B = num_sequences;
    varlen: packed in B = 1): the shapes of q (also k), v, h, g (None when not gated), beta (the forward's) and
    state (its initial state), and host cu_seqlens / chunk_indices (None when not varlen)."""
    N = num_sequences
    B, rows = (1, N * T) if varlen else (N, T)
    cu_seqlens = np.arange(N + 1, dtype=np.int32) * T
    return {
        "q": (B, rows, H, K), "v": (B, rows, HV, V), "h": (B, N * num_chunks(T) if varlen else num_chunks(T), HV, K, V),
        "g": (B, rows, HV) if gated else None, "beta": (B, rows, HV), "state": (N, HV, K, V),
        "cu_seqlens": cu_seqlens if varlen else None,
        "chunk_indices": prepare_chunk_indices(cu_seqlens) if varlen else None,
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
    tiling: Tiling

    @property
    def num_v_tiles(self) -> int:
        return -(-self.V // self.tiling.block_v)

    @property
    def num_programs(self) -> int:
        """Programs of the 1-D grid: one per (chunk, value head, V tile)."""
        return self.num_chunks_total * self.HV * self.num_v_tiles


CHUNK_O_OP = "chunk_fwd_o"
DECODE_OP = "decode_step"
FORWARD_OP = "chunk_gated_delta_rule"
"""The op names the contract messages start with."""


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
        """Rows of h over the batch: one per chunk of every sequence (with varlen, chunk_indices' rows)."""
        return self.B * self.chunks_per_row

    @property
    def prepare(self) -> Tiling:
        return prepare_tiling(self.K, self.V, self.dtype)

    @property
    def state(self) -> Tiling:
        return state_tiling(self.K, self.V, self.dtype, self.N * self.HV)

    def state_grid(self, tiling: Tiling) -> tuple[int, int]:
        """The 2-D grid of the states kernel with this tiling: (V tile, sequence·value head)."""
        return -(-self.V // tiling.block_v), self.N * self.HV

    @property
    def segment_chunks(self) -> int | None:
        """Chunks per segment of a pipelined Triton forward (pipeline_segment_chunks), or None."""
        return pipeline_segment_chunks(self.B, self.N, self.HV, self.chunks_per_row, self.varlen)

    @functools.lru_cache(maxsize=256)
    def segments(self, segment_chunks: int) -> tuple[tuple[int, int, ForwardProblem], ...]:
        """(first token, end token, problem) of each segment of segment_chunks chunks of a dense B = 1 problem:
        every segment but the first starts from the state the one before it ends with, and every one returns
        its final state (the last one, only if this problem does)."""
        assert self.B == 1 and not self.varlen, "segments of one dense sequence"
        bounds = [(t0, min(self.T, t0 + segment_chunks * CHUNK_SIZE))
                  for t0 in range(0, self.T, segment_chunks * CHUNK_SIZE)]
        return tuple((t0, t1, dataclasses.replace(
            self, T=t1 - t0, chunks_per_row=num_chunks(t1 - t0), use_initial_state=self.use_initial_state or i > 0,
            output_final_state=self.output_final_state or i < len(bounds) - 1)) for i, (t0, t1) in enumerate(bounds))

    def chunk_o(self) -> ChunkOProblem:
        """Stage 3, chunk_fwd_o on (q, k, v_new, h, g_c): its problem, without a second contract check."""
        return ChunkOProblem(B=self.B, T=self.T, H=self.H, HV=self.HV, K=self.K, V=self.V,
                             num_chunks_total=self.num_chunks_total, gated=True, varlen=self.varlen,
                             dtype=self.dtype, tiling=tiling_for(self.K, self.V, self.dtype))


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
    if problem.chunk_o().num_programs > MAX_GRID_ROWS:
        _fail("q", f"at most {MAX_GRID_ROWS} (chunk, value head, V tile) programs",
              f"{problem.chunk_o().num_programs}", op=op)
    return problem
