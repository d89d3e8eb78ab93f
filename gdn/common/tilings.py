"""The tiling tables of gdn's kernels: block sizes, warps and stages per kernel, each row with the
measurement that chose it (rerunnable with the benchmarks/tune_*.py scripts). Static functions of head sizes,
dtype and (for the walk) the batch: never of T, never a runtime autotuner. Rows that one backend alone reads sit
under a header naming that backend, at the end.
"""

from __future__ import annotations

import dataclasses
import functools

from gdn.common.spec import MIN_HEAD_DIM

FLOAT32_DOT_PRECISION = "tf32x3"
"""How float32 inputs are multiplied: three TF32 tensor-core passes (split-precision, about float32 accuracy:
relative error ~1e-6). Measured on an H100 at B=1 T=8192 H=16 K=V=128: IEEE float32 dots run on the FMA units
at 0.9–11 ms whatever the tiling, far from the 134 µs memory floor. Interpreters compute float32 dots exactly."""


def dot_precision(dtype: str) -> str:
    """Triton input_precision of the kernels' dots for inputs of dtype: FLOAT32_DOT_PRECISION for float32;
    TF32 for 16-bit inputs, where it reaches only float32 operands whose products are rounded to the 16-bit
    dtype next (chunk_gated_delta_rule's (I + A)⁻¹ merge); every other dot there has 16-bit operands."""
    return FLOAT32_DOT_PRECISION if dtype == "float32" else "tf32"


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes and launch parameters of one gdn kernel, shared by the Triton and Pallas-Triton backends.

    block_k: K columns per step (chunk_fwd_o: the K loop's step; decode_step: the whole K), a power of two
        ≥ 16, masked when K is not a multiple.
    block_v: V columns per program (a power of two, masked likewise).
    num_warps, num_stages: Triton launch parameters.
    max_registers: Triton backend only: a cap on registers per thread (ptxas maxnreg), or None. The
        Pallas-Triton lowering has no such option: gdn.pallas.arrays.compiler_params ignores it.
    The tile height of chunk_fwd_o is always CHUNK_SIZE.
    """

    block_k: int
    block_v: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None

    def triton_options(self) -> dict[str, int]:
        """Triton's compile options of the tiling: num_warps, num_stages and, when set, maxnreg."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def chunk_o_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of chunk_fwd_o for head sizes K, V and input dtype name.

    T never enters: the same tiling serves a 1-token prefill and a 64k one.
    """
    # Measured on an H100, bf16 K = V = 128 (python -m benchmarks.tune_chunk_o): all 128 V columns in one
    # program (q and k read once per chunk), K in two 64-column steps that the 2-stage pipeline overlaps
    # (the second half's loads fly during the first half's dots): 79 µs at T = 8192 against 87 µs for one
    # 128-column K step, 537 µs (the copy floor) at T = 65536. 8 warps halve the rows per warp but double
    # the layout conversions: 124 µs.
    # float32 (tf32x3 dots, 4-byte tiles): 64 V columns, 328 µs against 496 µs for 128 at T = 8192.
    # bf16 with narrow V tiles (≤ 32 columns) runs on 2 warps: with 4, Triton 3.6 on an H200 miscomputes the dot
    # of the non-finite-v branch (test_safety's garbage case, K = 48, V = 16 and 32: rows before the garbage off
    # by 61-78 %), where 2 and 8 warps are exact (every K 16-128 × V 16-128 of that case on 2 warps at V ≤ 32).
    # float16 and float32 pass the same tests on 4 warps.
    block_k = min(_next_power_of_2(max(K, MIN_HEAD_DIM)), 64)
    block_v = min(_next_power_of_2(max(V, MIN_HEAD_DIM)), 64 if dtype == "float32" else 128)
    num_warps = 2 if dtype == "bfloat16" and block_v <= 32 else 4
    return Tiling(block_k=block_k, block_v=block_v, num_warps=num_warps, num_stages=2)


@functools.lru_cache(maxsize=256)
def decode_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of decode_step for head sizes K, V and input dtype name.

    Neither the tokens per sequence nor N enters, so a batch of 1 and one of 512 share a program. One row serves
    every serving flag (a pool read and written in place, per-token state slots, a few tokens per sequence,
    in-kernel q/k norm and gates, a transposed [HV, V, K] pool): each keeps the traffic S's read and write (plus
    one write per kept token state), so the row measured for the dense step below is the one to beat; the flags'
    rows are unmeasured (benchmarks/decode.py --serving measures them against their floors).
    """
    # Measured on an H100 (python -m benchmarks.decode, bf16, H = 16, HV = 32, K = V = 128): a decode step reads
    # and writes S (2·K·V·4 bytes per head) for 7 flops per element of S, so it is memory-bound and the tile's
    # job is to stream S in long rows. 64-column tiles with 4 warps reach 90-96 % of the copy-bandwidth floor at
    # N = 64 and 256 (99 and 373 µs; FLA's fused_recurrent 115 and 441 µs), where FLA's tiling (BV = 8, one
    # warp, 32-byte row segments) reaches 27-31 % (290 and 1309 µs); at N = 1 and 16 every tile ties within
    # 1 µs (launch latency). S is float32 whatever the input dtype, so dtype selects nothing. No loop: nothing
    # for num_stages to pipeline.
    del dtype
    return Tiling(block_k=_next_power_of_2(max(K, MIN_HEAD_DIM)), block_v=min(_next_power_of_2(V), 64),
                  num_warps=4, num_stages=1)


def _register_cap(blocks_per_sm: int, num_warps: int) -> int:
    """The most registers per thread that let blocks_per_sm blocks of num_warps warps share an SM's 65 536
    (Hopper and Ampere), allocated in steps of 8 per thread: 168 for 3 blocks of 4 warps."""
    return 65536 // (blocks_per_sm * num_warps * 32) // 8 * 8


@functools.lru_cache(maxsize=256)
def prepare_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's prepare kernel (A, (I + A)⁻¹, w, u for one chunk and
    value head): K and V walked in block_k / block_v column steps."""
    # 64-column steps as in chunk_fwd_o's K loop; measured on an H100 (bf16, K = V = 128, T = 8192, H = 16:
    # python -m benchmarks.tune_forward): 8 warps lose at any register cap, one 128-column step or a second
    # pipeline stage change nothing. Two Triton 3.6 miscompiles on Hopper shape
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


WALK_MIN_PROGRAMS = 128
"""The walk's V tiles are as wide as keeps at least this many programs walking (about one per SM of an H200,
132): tilings.walk_tiling's size class."""

WALK_BLOCK_V = (16, 32, 64)
"""The V-tile widths of the walk kernel, narrowest first."""


@functools.lru_cache(maxsize=256)
def walk_tiling(K: int, V: int, dtype: str, sequence_heads: int) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's walk kernel (the states h and v_new of every chunk, or the
    pieces' maps) for sequence_heads = N·HV walks: the whole K (a power of two) by block_v columns of S per
    program; the chunk loop is pipelined num_stages deep. block_v is the widest of WALK_BLOCK_V (masked down to
    V) that still gives WALK_MIN_PROGRAMS programs, else the narrowest: a coarse size class on the batch, never
    on T."""
    # Measured on an H100 (bf16, K = V = 128, µs of the walk storing h and v_new): the walk over chunks is
    # sequential, so a program's time is its chunk count times one chunk's latency. With few walks, narrow
    # tiles put more programs on the SMs: N·HV = 16 (T = 8192): BV 16 132, 32 167, 64 230; N·HV = 32:
    # 107 / 91 / 113. With enough walks, wide tiles win because every V tile re-reads the chunk's w and k:
    # N·HV = 64: 205 / 176 / 150; 256 (B8 T2048 HV32): 422 / 356 / 280; 1024: 842 / 764 / 630. 4 warps and 3
    # stages throughout (2 stages: 202 µs against 137 at N·HV = 16; 8 warps 170).
    del dtype
    widths = [min(width, _next_power_of_2(max(V, MIN_HEAD_DIM))) for width in WALK_BLOCK_V]
    block_v = next((width for width in reversed(widths) if sequence_heads * -(-V // width) >= WALK_MIN_PROGRAMS),
                   widths[0])
    return Tiling(block_k=_next_power_of_2(max(K, MIN_HEAD_DIM)), block_v=block_v, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=256)
def backward_chunk_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's per-chunk backward kernels (dv_local, dqkwg, WY): K and V
    walked in block_k / block_v column steps."""
    # Unmeasured: no GPU run has timed the backward yet. The prepare kernel's widths (one width for K and V,
    # >= 32, which steers clear of the Triton 3.6 Hopper miscompiles found there), 4 warps, one stage, and no
    # register cap until ncu says what these kernels spill.
    block = prepare_tiling(K, V, dtype).block_k
    return Tiling(block_k=block, block_v=block, num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=256)
def backward_wy_tiling(K: int, V: int, dtype: str) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's backward WY kernel (the gradients through w, u and
    (I + A)⁻¹ to k, v, β and g for one chunk and value head): backward_chunk_tiling's widths on 2 warps."""
    # Found by tests/test_backward.py's bf16 cases on an H200 with Triton 3.6, then each backward launch in bf16
    # set against the same launch on the same values in float32: with 4 warps this kernel alone goes wrong in
    # bf16 (dv and dβ off by 57-100 %, dk by 17 %, an illegal memory access at T = 300, K = V = 32), with 8 dk
    # is NaN; with 2 warps every case is within bf16 rounding (≤ 0.6 %) of float32. FLA pins its WY backward
    # to 2 warps on Hopper for the same Triton miscompile (BT = 64, 4 warps: wrong dk/dβ, illegal accesses).
    return dataclasses.replace(backward_chunk_tiling(K, V, dtype), num_warps=2)


@functools.lru_cache(maxsize=256)
def backward_walk_tiling(K: int, V: int, dtype: str, sequence_heads: int) -> Tiling:
    """The static tiling of chunk_gated_delta_rule's backward walk (the state's gradient, chunks in reverse) for
    sequence_heads = N·HV walks: the whole K by block_v columns per program, as walk_tiling."""
    # Unmeasured: the forward walk's row (walk_tiling) until a GPU run times the backward walk, which reads q, k,
    # w, do and dv_local per chunk where the forward walk reads k, w and u.
    return walk_tiling(K, V, dtype, sequence_heads)


FUSED_WALK = False
"""Whether the walk computes o itself (h and v_new never leave the SM) instead of storing h and v_new for
chunk_fwd_o. Measured on an H200 with Triton 3.6 (bf16, K = V = 128, the whole forward by CUDA-graph replay,
benchmarks/tune_forward.py --only fused): the fused walk's chunk takes 4.8–7 µs against about 1 µs for the
walk that stores h (the o dots q·S, q·kᵀ and tril(P)·v_new join the sequential chain, and their operands
built in registers pass through shared memory), so it loses everywhere even in 8 pieces: B1 T8192 H16
614 µs at best (32-column tiles), few heads 228, B8 T2048 HV32 835, T65536 2616, against 283, 202, 766
and 2136 for the staged path (tune_forward --only stages: the walk storing h takes about 1 µs per chunk).
The fused walk is kept for that measurement."""


MOSAIC_GPU_WALK_BLOCK_V = 64
"""V columns per CTA of the Mosaic GPU fused walk (gdn.pallas.forward_mosaic_gpu): Sᵀ [64, K] float32 in one
warpgroup's registers (64 per thread at K = 128), as jla's and FlashQLA's Hopper forwards hold it; V = 128 runs
two CTAs per sequence piece and value head."""

MOSAIC_GPU_SMEM_BYTES = 220 * 1024
"""SMEM a Mosaic GPU kernel of gdn's plans for (sm_90 has 227 KiB per CTA; Mosaic GPU keeps some for itself)."""


MAX_PIECES = 8
"""Pieces per sequence, at most, of the forward's context-parallel path."""

MIN_PIECE_CHUNKS = 8
"""Chunks per piece, at least (on average over the sequences), of the context-parallel path."""

MAX_PIECE_K = 128
"""The context-parallel path's combine holds a [K, K] float32 map per program: K ≤ MAX_PIECE_K."""


def context_pieces(walks: int, K: int, chunks_per_sequence: float, multiprocessors: int | None) -> int:
    """Pieces per sequence of chunk_gated_delta_rule's context-parallel path (1: one walk per sequence, value
    head and V tile). walks = N·HV·(V tiles) programs of the plain walk. The walk is sequential over chunks, so
    when walks leave most SMs idle each sequence is cut into P pieces (a power of two ≤ MAX_PIECES) walked in
    parallel from their true initial states: the largest P with walks·P ≤ multiprocessors and at least
    MIN_PIECE_CHUNKS chunks per piece. A path choice, not a compiled variant: every P runs the same kernels
    (None multiprocessors, i.e. no GPU: 1)."""
    if multiprocessors is None or K > MAX_PIECE_K:
        return 1
    pieces = 1
    while (2 * pieces <= MAX_PIECES and walks * 2 * pieces <= multiprocessors
           and chunks_per_sequence >= MIN_PIECE_CHUNKS * 2 * pieces):
        pieces *= 2
    return pieces


SCAN_TILING = Tiling(block_k=0, block_v=32, num_warps=8, num_stages=1)
"""The context-parallel combine (one program per sequence, value head and 32 V columns; block_k unused: the
whole K): S ← M·S + N per piece, a [K, K] float32 map in registers (8 warps)."""


def walk_warmup_sequence_counts(HV: int, V: int) -> tuple[int, ...]:
    """Sequence counts N whose calls select every distinct walk_tiling width for HV value heads and V: what a
    warmup runs so that no later batch size compiles another walk variant."""
    counts = {1}
    for width in WALK_BLOCK_V:
        counts.add(-(-WALK_MIN_PROGRAMS // (HV * -(-V // width))))
    return tuple(sorted(counts))


# ------------------------------------------------------------------------------- Pallas backend only

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
    # persistent; ncu ... python -m benchmarks.profile_chunk_o --pallas-grids): programs that loop over items
    # with a static trip count let Triton
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
