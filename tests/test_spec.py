"""The spec: chunk counting, chunk indices, tiling table."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from gdn.common import checks, spec, tilings


@pytest.mark.parametrize("T, expected", [(0, 0), (1, 1), (63, 1), (64, 1), (65, 2), (128, 2), (130, 3)])
def test_num_chunks(T: int, expected: int) -> None:
    assert spec.num_chunks(T) == expected


def test_prepare_chunk_indices() -> None:
    C = spec.CHUNK_SIZE
    cu = np.array([0, 1, 1, 1 + C, 1 + 3 * C + 5])  # lengths 1, 0, C, 2C + 5
    indices = spec.prepare_chunk_indices(cu)
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(indices, [[0, 0], [2, 0], [3, 0], [3, 1], [3, 2]])
    padded = spec.prepare_chunk_indices(cu, num_rows=7)
    np.testing.assert_array_equal(padded[:5], indices)
    np.testing.assert_array_equal(padded[5:], [spec.PAD_CHUNK] * 2)
    assert spec.prepare_chunk_indices(np.array([0, 0])).shape == (0, 2)
    with pytest.raises(ValueError, match="num_rows: expected at least the 5 chunks"):
        spec.prepare_chunk_indices(cu, num_rows=4)


def test_max_chunk_rows_is_the_most_chunks_of_any_batch() -> None:
    """spec.max_chunk_rows(T, N) = the most chunks of any varlen batch of at most T tokens in at most N
    sequences, by dynamic programming over the sequence lengths."""
    C = spec.CHUNK_SIZE
    most = np.zeros((4, 3 * C + 3), dtype=int)  # most[n, t]: the most chunks of t tokens in at most n sequences
    for n in range(1, 4):
        for t in range(3 * C + 3):
            most[n, t] = max(most[n - 1, t - length] + spec.num_chunks(length) for length in range(t + 1))
    for n in range(4):
        for t in range(3 * C + 3):
            assert spec.max_chunk_rows(t, n) == most[n, :t + 1].max(), (t, n)
    assert spec.max_chunk_rows(8192, 64) == (8192 + 64 * (C - 1)) // C
    with pytest.raises(ValueError, match="max_chunk_rows: expected max_tokens, max_sequences >= 0"):
        spec.max_chunk_rows(-1, 2)


@pytest.mark.parametrize("shape, strides, expected", [
    ((2, 70, 4, 32), (70 * 128, 128, 32, 1), (128, 32)),  # dense
    ((2, 70, 4, 32), (70 * 400, 400, 32, 1), (400, 32)),  # a column slice of a [2, 70, 400] projection
    ((1, 70, 4, 32), (99999, 400, 32, 1), (400, 32)),  # B = 1: the batch stride is never used
    ((2, 1, 4, 32), (1000, 128, 32, 1), (1000, 32)),  # T = 1: rows are batch rows
    ((2, 70, 1, 32), (70 * 400, 400, 5, 1), (400, 32)),  # one head: its stride normalized to D
    ((2, 70, 4, 32), (75 * 128, 128, 32, 1), None),  # the first 70 rows of a 75-row buffer, B > 1
    ((2, 70, 4, 32), (70 * 256, 256, 64, 2), None),  # the last axis strided
], ids=["dense", "fused-slice", "B1-any-batch-stride", "T1-batch-rows", "one-head", "prefix-B2", "last-axis"])
def test_row_strides_is_the_one_layout_rule(shape, strides, expected) -> None:
    """checks.row_strides: the layouts the chunked kernels read in place (token-row and head strides), None
    for those a backend copies first."""
    assert checks.row_strides(shape, strides) == expected


def test_tiling_never_depends_on_sequence_length() -> None:
    assert list(inspect.signature(tilings.chunk_o_tiling).parameters) == ["K", "V", "dtype"]
    for K in (16, 48, 64, 100, 128, 256):
        for dtype in spec.INPUT_DTYPES:
            tiling = tilings.chunk_o_tiling(K, K, dtype)
            for block in (tiling.block_k, tiling.block_v):
                assert block >= 16 and block & (block - 1) == 0
            assert tiling.block_k >= min(K, 64) and tiling.block_v >= min(K, 64)


def test_decode_tiling_never_depends_on_batch_or_length() -> None:
    assert list(inspect.signature(tilings.decode_tiling).parameters) == ["K", "V", "dtype"]
    table = {(K, V, dtype): tilings.decode_tiling(K, V, dtype)
             for K in (16, 48, 100, 128, 256) for V in (16, 100, 256) for dtype in spec.INPUT_DTYPES}
    for (K, V, dtype), tiling in table.items():
        # the whole K in one tile, padded to a power of two; V in power-of-two tiles
        assert K <= tiling.block_k < 2 * K and tiling.block_k & (tiling.block_k - 1) == 0, (K, V, dtype)
        assert tiling.block_v & (tiling.block_v - 1) == 0, (K, V, dtype)


def test_prepare_tiles_avoid_the_triton_36_miscompiles() -> None:
    """tilings.prepare_tiling's two workarounds (found on Hopper with Triton 3.6; the interpreters cannot show
    them): w and u tiles of one width, and never 16 columns."""
    for K in (16, 24, 48, 64, 100, 128, 256):
        for V in (16, 32, 40, 128, 256):
            tiling = tilings.prepare_tiling(K, V, "bfloat16")
            assert tiling.block_k == tiling.block_v, (K, V)
            assert tiling.block_k in (32, 64), (K, V)


def test_prepare_register_cap_fits_three_blocks_per_sm() -> None:
    """16-bit inputs: the cap lets 3 blocks of the prepare kernel share an SM's 65 536 registers; float32 (whose
    tf32x3 dots need more registers) is not capped."""
    for dtype in ("float16", "bfloat16"):
        tiling = tilings.prepare_tiling(128, 128, dtype)
        threads = tiling.num_warps * 32
        assert 3 * threads * tiling.max_registers <= 65536 < 4 * threads * tiling.max_registers
        assert tiling.max_registers % 8 == 0
    assert tilings.prepare_tiling(128, 128, "float32").max_registers is None
    assert all(t.max_registers is None for t in (tilings.chunk_o_tiling(128, 128, "bfloat16"),
                                                 tilings.walk_tiling(128, 128, "bfloat16", 16),
                                                 tilings.decode_tiling(128, 128, "bfloat16")))


def test_walk_tiling_size_class() -> None:
    """The walk's V tile widens with the number of walks N·HV (never with T): the widest width that
    keeps WALK_MIN_PROGRAMS programs, else the narrowest; and the warmup's sequence counts reach every width a
    batch of any size selects."""
    for K, V, HV in ((128, 128, 16), (128, 128, 1), (64, 64, 2), (16, 128, 4), (32, 32, 8), (128, 16, 4)):
        widths = []
        for walks in range(1, 4 * tilings.WALK_MIN_PROGRAMS):
            tiling = tilings.walk_tiling(K, V, "bfloat16", walks)
            programs = walks * -(-V // tiling.block_v)
            assert tiling.block_v in tilings.WALK_BLOCK_V or tiling.block_v == V
            assert programs >= tilings.WALK_MIN_PROGRAMS or tiling.block_v == min(tilings.WALK_BLOCK_V)
            assert not widths or tiling.block_v >= widths[-1]  # monotone in the batch
            widths.append(tiling.block_v)
        assert widths[-1] == min(max(tilings.WALK_BLOCK_V), V if V >= 16 else 16)
        warmed = {tilings.walk_tiling(K, V, "bfloat16", n * HV) for n in tilings.walk_warmup_sequence_counts(HV, V)}
        assert {tilings.walk_tiling(K, V, "bfloat16", n * HV) for n in range(1, 300)} <= warmed
    assert tilings.walk_tiling(128, 128, "bfloat16", 16).block_v == 16  # B1 H16: T8192 measured 132 µs
    assert tilings.walk_tiling(128, 128, "bfloat16", 256).block_v == 64  # B8 HV32: 422 -> 280 µs


def test_context_pieces_rule() -> None:
    """Pieces only on a GPU, only for K ≤ MAX_PIECE_K, a power of two ≤ MAX_PIECES with walks·P ≤ the SMs and
    MIN_PIECE_CHUNKS chunks per piece; one piece once the walks fill the GPU."""
    sms = 132
    assert tilings.context_pieces(16, 128, 10**6, None) == 1
    assert tilings.context_pieces(16, 256, 10**6, sms) == 1
    assert tilings.context_pieces(sms, 128, 10**6, sms) == 1
    assert tilings.context_pieces(32, 128, 10**6, sms) == 4
    assert tilings.context_pieces(1, 128, 10**6, sms) == tilings.MAX_PIECES
    assert tilings.context_pieces(1, 128, 2 * tilings.MIN_PIECE_CHUNKS, sms) == 2
    assert tilings.context_pieces(1, 128, 2 * tilings.MIN_PIECE_CHUNKS - 1, sms) == 1
    for walks in range(1, 300):
        pieces = tilings.context_pieces(walks, 64, 10**6, sms)
        assert pieces & (pieces - 1) == 0 and (pieces == 1 or walks * pieces <= sms)


def test_persistent_programs_size_class() -> None:
    """One program per work item off the GPU and for short inputs; PERSISTENT_PROGRAMS_PER_SM per SM from
    PERSISTENT_MIN_ITEMS_PER_PROGRAM items per program on."""
    programs = tilings.PERSISTENT_PROGRAMS_PER_SM * 132
    threshold = tilings.PERSISTENT_MIN_ITEMS_PER_PROGRAM * programs
    assert tilings.persistent_programs(10**6, None) == 10**6
    assert tilings.persistent_programs(1, 132) == 1
    assert tilings.persistent_programs(threshold - 1, 132) == threshold - 1
    assert tilings.persistent_programs(threshold, 132) == programs
    assert tilings.persistent_programs(16 * threshold, 132) == programs
