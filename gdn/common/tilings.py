"""The tiling tables of gdn's kernels: block sizes, warps and stages per kernel, each row with the
measurement that chose it. Static functions of head sizes, dtype and (for the states walk) the batch: never of T,
never a runtime autotuner. Rows used by one backend only say so in their name or docstring.
"""

from __future__ import annotations

import dataclasses
import functools

from gdn.common.spec import MIN_HEAD_DIM

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
