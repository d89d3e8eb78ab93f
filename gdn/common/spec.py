"""The one specification both gdn backends are built from.

Op: ``chunk_fwd_o`` — the output stage of chunked Gated DeltaNet.

Layouts (FLA's):
    q, k   [B, T, H, K]          queries / keys, H query-key heads
    v      [B, T, HV, V]         values, HV = m·H value heads; value head hv reads q/k head hv // m
    g      [B, T, HV] float32    chunk-local cumulative log-gate in natural-log units (g ≤ 0 for a real gate,
                                 −∞ after a reset); None means no gating. (FLA 0.6 kernels use exp2: pass
                                 them g·log2(e).)
    h      [B, NT, HV, K, V]     state at the start of each chunk; with varlen, B = 1 and NT is the total
                                 number of chunks over all sequences, in order
    o      [B, T, HV, V]         in v's dtype; accumulation in float32
    cu_seqlens [N + 1] int       varlen boundaries into the packed T axis (B must be 1)
    chunk_indices [NT, 2] int32  (sequence index, chunk index within the sequence) for each chunk

Math, per sequence, value head and chunk c of CHUNK_SIZE positions (rows i, columns j of the chunk):
    o_c = scale·(q_c h[c]) ⊙ exp(g_c)[:, None] + tril((scale·q_c k_cᵀ) ⊙ exp(g_i − g_j)) v_c
The decay matrix is formed as exp(where(i ≥ j, g_i − g_j, −∞)): for a real gate g_i − g_j ≤ 0 on the lower
triangle, so no intermediate can overflow however negative g gets, and exp(−g) is never formed alone.

Non-finite inputs (NaN, ±inf) follow one rule, the formula above evaluated in IEEE arithmetic with
  - the causal sum over the chunk's tokens j ≤ i only: a later token, a masked position (past the sequence's
    end or T) and another sequence are not terms of o_i at all (not terms multiplied by 0: 0·NaN = NaN), so a
    NaN-filled padded tail leaves every earlier output exactly as it is;
  - g clamped from below at CUMULATIVE_GATE_FLOOR, so g = −∞ is a reset computed finite: a position whose
    cumulative gate is −∞ takes nothing from h[c] and nothing from the tokens before the reset
    (exp(CUMULATIVE_GATE_FLOOR − g_j) = 0 for finite g_j), and two positions both at −∞ see each other
    undecayed (exp(0) = 1: the cumulative gate keeps no decay between them). NaN stays NaN.
o is non-finite exactly where that evaluation is (gdn.common.reference.chunk_fwd_o is it, in float64), for
inputs whose finite terms do not overflow; a non-finite v[j, c] makes o[i, c] NaN for every i ≥ j of its chunk
(IEEE might give ±inf there). The kernels select instead of multiplying by 0 (`where` on the causal mask) and
zero v's non-finite entries before the [BT, BT]·[BT, BV] dot, where the zero coefficients of later tokens meet
them; a chunk with one gets the NaN put back where the causal sum reads it (a count of non-finite v[j, c] over
j ≤ i, one more dot, only in such chunks).

Every kernel's tile height is CHUNK_SIZE. Nothing that varies with the sequence length (T, NT, cu_seqlens)
selects a tiling or a compiled Triton variant: one compiled kernel per (dtypes, H, HV, K, V, gated, varlen).
JAX specializes every program on its input shapes, so the Pallas backend compiles once per shape on top of
that; gdn.pallas.bucketing pads T to a few buckets to bound it.

Op: ``decode_step`` — the gated delta rule token by token for N sequences (decoding): one token each, or with
cu_seqlens a few each (speculative decoding), states dense or read and written in place in a pool.

Layouts:
    q, k   [T, H, K]             the tokens' queries / keys, H query-key heads: one token per sequence (T = N),
                                 or with cu_seqlens [N + 1] sequence n's tokens at rows cu_seqlens[n] ≤ t <
                                 cu_seqlens[n + 1] (rows past cu_seqlens[-1] belong to no sequence: o zero)
    v      [T, HV, V]            their values, HV = m·H value heads; value head hv reads q/k head hv // m
    g      [T, HV] float32       per-token log-gate in natural-log units (g ≤ 0; NOT cumulative)
    beta   [T, HV]               the delta rule's write strength (float32 or q's dtype)
    state  [N, HV, K, V] float32 dense: S before each sequence's first token; the step returns S after its last
                                 token as a new float32 array
           [P, HV, K, V] float32 with state_indices: a pool of P states, read and updated in place
    o      [T, HV, V]            in v's dtype; accumulation in float32

Math, per sequence and value head, S ∈ R^{K×V}, for each of its tokens (the same recurrence as
gdn.common.reference.recurrent_gated_delta_rule):
    S ← exp(g)·S
    S ← S + k ⊗ (beta·(v − Sᵀk))
    o  = scale·Sᵀq                (scale defaults to K**-0.5)
One program per (sequence·value head, V tile) holds its [K, V tile] slice of S in registers across the
sequence's tokens: the V columns of S are independent in every line above, so the tiles never exchange data.

Serving arguments of decode_step and chunk_gated_delta_rule (the same names and meanings; the per-token state
slots are decode's alone, and the forward's raw gates a, b are [B, T, HV]; gdn.common.checks.gates /
state_indices check both ops'):
    state_indices [N] int32/int64     sequence n's state is pool row state_indices[n]: read before its first
                                      token, S after its last token written back to it. A negative index is a
                                      padded slot: the sequence is skipped (o rows zero, nothing written).
                  [N, S] (decode)     per-token state slots, for speculative decoding with rollback (vLLM's
                                      convention): the state after the sequence's token j (j < S; later tokens
                                      are not run, o zero) is written to pool row state_indices[n, j] (none when
                                      negative); S is read from row state_indices[n, num_accepted_tokens[n] − 1],
                                      or state_indices[n, 0] without num_accepted_tokens
    num_accepted_tokens [N] int       with [N, S] indices: how many of the previous step's tokens were accepted,
                                      choosing the saved state the sequence continues from. Outside [1, S] the
                                      sequence is skipped.
    Every index is checked: arrays on the host before anything runs (an entry ≥ P, or > S accepted tokens, or
    a pool row named twice, is an error), device arrays inside the kernel (an out-of-range row or column reads
    and writes nothing: the sequence or token is skipped). No input makes a kernel touch memory outside its
    arrays. Pool rows no sequence names are left bit-identical.
    use_qk_l2norm_in_kernel           q ← q / sqrt(Σ q² + QK_L2NORM_EPS), k likewise, per head in float32, before
                                      the scale (FLA's l2norm); the model then passes raw q, k
    a, b [T, HV], A_log [HV],         raw gates instead of g, beta (vLLM's fused_sigmoid_gating_delta_rule_update):
    dt_bias [HV] (float32 or q's        g = −exp(A_log)·softplus(a + dt_bias),   beta = sigmoid(b),
    dtype)                              softplus(x) = log(1 + exp(β·x))/β where β·x ≤ threshold, else x
                                      (β = softplus_beta, threshold = softplus_threshold; SOFTPLUS_BETA and
                                      SOFTPLUS_THRESHOLD by default)
A gate of −inf (exp(g) = 0) resets S: computed finite. Each sequence's output depends on its own inputs and
state only: NaN or inf in one sequence's (or a padded slot's) inputs never reaches another's output or state.

Op: ``chunk_gated_delta_rule`` — the whole chunked Gated DeltaNet forward (prefill), from raw inputs.

Layouts: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] float32 per-token log-gate (≤ 0, NOT cumulative);
beta [B, T, HV] (float32 or q's dtype); initial_state [N, HV, K, V] float32 or None (N = B, or the number of
sequences when varlen); returns o [B, T, HV, V] in v's dtype and final_state [N, HV, K, V] float32 (or None).
Per sequence, value head and chunk c (rows i, columns j), every kernel with tile height CHUNK_SIZE:
  1. prepare (one program per chunk and value head; nothing crosses a chunk):
       g_c  = chunk-local cumsum of the log-gates, each first raised to GATE_FLOOR
       A    = strictly lower (beta_i·k_i·k_j·exp(g_i − g_j))_{j<i}
       T_c  = (I + A)⁻¹, by forward substitution (exact float32) on the four SUBBLOCK×SUBBLOCK diagonal blocks
              and the blocked merge (I + A)⁻¹ = (I − N)(I + N²)·D⁻¹, D = I + diag blocks of A,
              N = D⁻¹·(A below the diagonal blocks), N⁴ = 0: every entry a product of at most 3 blocks
       w    = T_c·(beta·exp(g_c)·k),   u = T_c·(beta·v)
  2. walk (one program per sequence, value head and V tile, walking the chunks in order; S float32):
       h[c] = S (stored in k's dtype for stage 3);   v_new = u − w·S
       S    = exp(g_last)·S + kᵀ·(exp(g_last − g)·v_new)     (g_last: g at the chunk's last token)
  3. chunk_fwd_o(q, k, v_new, h, g_c).
The walk is an affine map of S: per chunk S ← (exp(g_last)·I − K̃ᵀw)·S + K̃ᵀu with K̃ = k ⊙ exp(g_last − g), so a
run of chunks (a piece) maps its start state to its end state as S_out = M·S_in + N (M K×K, N K×V). The
context-parallel path cuts each sequence into P pieces, gets every piece's [M | N] by walking the augmented
state from [I | 0] with u = 0 in M's columns (the map walk), combines them in order (S_0 = the initial state,
S_{p+1} = M_p·S_p + N_p), then walks every piece from its true start in parallel. Across devices (context
parallel), each device holds a contiguous slice of one sequence, of any length, walks the map of its whole
slice, and the maps gathered from every device combine the same way into each device's start and the final
state. Exact for any cut: a map is that of its piece's tokens, and a piece's chunked walk equals its
token-by-token recurrence however it is chunked (chunks counted from the piece's first token, the last one
possibly partial, as a sequence's is).
A token with a non-finite key, value, beta or gate (NaN or +inf; a gate of −inf is a reset) is poison: prepare
zeroes it before every dot (a zero coefficient times NaN would still be NaN) and marks it NaN in g_c, so o is
NaN from that token on (and the sequence's final state), and every earlier token's o is exact.
This equals the token-by-token recurrence (gdn.common.reference.recurrent_gated_delta_rule) in exact
arithmetic: the WY form of the delta rule's S updates within a chunk.

Op: the backward of ``chunk_gated_delta_rule`` — gradients dq, dk, dv, dg (of the per-token gates), dbeta and
d initial_state (float32) from do [B, T, HV, V] and the final state's gradient (float32, or None: zero). The
forward keeps only its inputs: the backward recomputes g_c, w, u (prepare) and h, v_new (the walk, in the
pieces the forward cut it into), then runs four kernels of tile height CHUNK_SIZE. Per sequence, value head and
chunk c (rows i, columns j; Γ_ij = exp(g_i − g_j) for j ≤ i, else 0, formed as in chunk_fwd_o; S = h[c]; dS the
gradient of the state the chunk ends with):
  1. dv_local (one program per chunk, value head and V tile):  dv_loc = (scale·q kᵀ ⊙ Γ)ᵀ·do
  2. backward walk (one program per sequence, value head and V tile, chunks in reverse; dS float32, starting
     from the final state's gradient; its last value is initial_state's gradient):
       dh[c] = dS;   dv_new = dv_loc + (exp(g_last − g) ⊙ k)·dS
       dS   = exp(g_last)·dS + scale·(exp(g) ⊙ q)ᵀ·do − wᵀ·dv_new
     (affine in dS like the forward walk in S: dS ← (exp(g_last)·I − wᵀK̃)·dS + scale·(exp(g) ⊙ q)ᵀ·do − wᵀ·dv_loc)
  3. dqkwg (one program per chunk and value head):  dP = scale·(do v_newᵀ) ⊙ Γ
       dq = scale·exp(g) ⊙ (do Sᵀ) + dP·k;   dk = exp(g_last − g) ⊙ (v_new dSᵀ) + dPᵀ·q;   dw = −dv_new Sᵀ
       dg_c = Σ_K (dq_inter ⊙ q) − Σ_K (dk_inter ⊙ k) + rowsum(dP ⊙ q kᵀ) − colsum(dP ⊙ q kᵀ), and on the
              chunk's last row + exp(g_last)·Σ S ⊙ dS + Σ dk_inter ⊙ k   (dq_inter, dk_inter: the first terms)
  4. WY (one program per chunk and value head; A and T_c = (I + A)⁻¹ recomputed as in prepare; du = dv_new):
       dT = dw·(beta·exp(g)·k)ᵀ + du·(beta·v)ᵀ;   dA = −T_cᵀ·dT·T_cᵀ on the strictly lower part
       dk += (beta·exp(g)) ⊙ T_cᵀdw + (dA ⊙ beta_i Γ)·k + (dA ⊙ beta_i Γ)ᵀ·k;   dv = beta ⊙ T_cᵀdu
       dbeta = Σ_K exp(g) ⊙ k ⊙ T_cᵀdw + Σ_V v ⊙ T_cᵀdu + rowsum(dA ⊙ Γ ⊙ k kᵀ)
       dg_c += Σ_K (beta·exp(g)·k) ⊙ T_cᵀdw + rowsum(dA ⊙ A) − colsum(dA ⊙ A)
       dg = the reverse chunk-local cumsum of dg_c (the transpose of g_c = cumsum(max(g, GATE_FLOOR))), 0 for a
            gate below GATE_FLOOR
dq and dk of a q/k head are the sums over its m = HV/H value heads in head order (no atomics: the same bits
run to run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHUNK_SIZE = 64
"""BT of every gdn kernel: the chunk length of the chunked GDN algorithm and the tile height."""

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
"""Supported range of K and V (any integer in it; tiles are masked to the next power of two)."""

MAX_GRID_ROWS = 2**31 - 1
"""Programs in one launch: both backends launch a 1-D grid of (chunk, value head, V tile) programs."""


GATE_FLOOR = -128.0
"""Per-token log-gates below this are raised to it before any use: exp(GATE_FLOOR) is 0 in float32 (a full
reset, as exp(−inf) is), and a chunk-local cumulative sum of floored gates stays finite, so every decay
exp(g_i − g_j) is formed from finite numbers (never −inf − (−inf))."""

CUMULATIVE_GATE_FLOOR = -float(np.finfo(np.float32).max)
"""The lowest cumulative log-gate chunk_fwd_o computes with (−3.4e38, finite; a real cumulative gate may go far
below GATE_FLOOR): g = −∞ after a reset is read as it, so g_i − g_j never meets −∞ − (−∞) = NaN, and
exp(CUMULATIVE_GATE_FLOOR) = 0 in float32 and float64."""

INPUT_DTYPES = ("float32", "float16", "bfloat16")
STATE_DTYPES = INPUT_DTYPES
INDEX_DTYPES = ("int32", "int64")


SUBBLOCK = 16
"""Rows of the diagonal blocks that chunk_gated_delta_rule's prepare kernel inverts by forward substitution.
Its blocked merge (I + N)⁻¹ = (I − N)(I + N²) needs N⁴ = 0: exactly four blocks per chunk."""
assert CHUNK_SIZE == 4 * SUBBLOCK


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
    ones ignored; ``max_chunk_rows(max_tokens, max_sequences)`` is the row count that fits every batch. Pure
    numpy: build it where cu_seqlens is on the host and pass it as ``chunk_indices`` to avoid a device→host copy
    inside the op.
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


def max_chunk_rows(max_tokens: int, max_sequences: int) -> int:
    """The most chunks a varlen batch of at most max_tokens tokens in at most max_sequences sequences can have:
    the static ``num_rows`` to pad chunk_indices (and h) to, so that one jitted program serves every such batch.

    A sequence of n ≥ 1 tokens has ⌈n / CHUNK_SIZE⌉ ≤ (n + CHUNK_SIZE − 1) / CHUNK_SIZE chunks, so N non-empty
    sequences (N ≤ max_tokens) have at most (max_tokens + N·(CHUNK_SIZE − 1)) // CHUNK_SIZE, which N − 1
    sequences of CHUNK_SIZE·a + 1 tokens and one holding the rest reach.
    """
    if max_tokens < 0 or max_sequences < 0:
        raise ValueError(f"max_chunk_rows: expected max_tokens, max_sequences >= 0; got {max_tokens}, {max_sequences}")
    sequences = min(int(max_sequences), int(max_tokens))
    return (int(max_tokens) + sequences * (CHUNK_SIZE - 1)) // CHUNK_SIZE if sequences else 0


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


def head_partition(H: int, HV: int, world_size: int, rank: int) -> tuple[slice, slice]:
    """(q/k heads, value heads) that rank holds when the heads of a layer are split over world_size devices
    (tensor parallel, vLLM's convention): contiguous ranges of HV / world_size value heads with the q/k heads
    they read (value head hv reads q/k head hv // (HV / H)), so every rank runs the ops unchanged on its own
    heads. world_size divides H (H / world_size q/k heads per rank), or world_size is a multiple of H and
    divides HV (then each rank reads one q/k head, held by world_size / H ranks)."""
    op = "head_partition"
    if H == 0 or HV % H:
        raise ValueError(f"{op}: HV: expected a positive multiple of H = {H}; got {HV}")
    if world_size < 1 or HV % world_size or not (H % world_size == 0 or world_size % H == 0):
        raise ValueError(f"{op}: world_size: expected a divisor of H = {H}, or a multiple of H dividing HV = {HV}; "
                         f"got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{op}: rank: expected 0 <= rank < world_size = {world_size}; got {rank}")
    heads_per_rank = max(H // world_size, 1)
    values_per_rank = HV // world_size
    first_value = rank * values_per_rank
    first_head = first_value // (HV // H)
    return slice(first_head, first_head + heads_per_rank), slice(first_value, first_value + values_per_rank)


def default_scale(K: int) -> float:
    """The default query scale, K**-0.5."""
    return float(K) ** -0.5


QK_L2NORM_EPS = 1e-6
"""eps of the in-kernel q/k L2 normalization (use_qk_l2norm_in_kernel): x / sqrt(Σ x² + eps), FLA's l2norm."""

SOFTPLUS_BETA = 1.0
SOFTPLUS_THRESHOLD = 20.0
"""Defaults of the in-kernel gating's softplus (vLLM's fused_sigmoid_gating_delta_rule_update): log(1 + exp(β·x))/β
where β·x ≤ threshold, x beyond."""


CHUNK_O_OP = "chunk_fwd_o"
DECODE_OP = "decode_step"
FORWARD_OP = "chunk_gated_delta_rule"
BACKWARD_OP = "chunk_gated_delta_rule_backward"
"""The op names the contract messages start with."""
