"""Shape bucketing for the JAX backend: JAX compiles one program per input shape, so a serving loop over
T = 1..8192 would compile thousands. Pad T up to a bucket (CHUNK_SIZE·2^i), run, keep the first T rows.

    T_bucket = bucket_size(T)                                  # CHUNK_SIZE·2^i: log2(T_max/CHUNK_SIZE)+1 of them
    q_p, k_p, v_p, h_p, g_p = pad_to_bucket(q, k, v, h, g)     # host numpy in, host numpy out: no compile
    o = jax.jit(chunk_fwd_o)(q_p, k_p, v_p, h_p, g_p)[:, :T]    # one compile per bucket
    q_p, k_p, v_p, g_p, b_p = pad_forward_to_bucket(q, k, v, g, beta)   # chunk_gated_delta_rule's inputs

Padding is exact, not approximate: the padded rows come after every real row, and o is causal within a chunk
(row i reads rows j ≤ i only) with zero q, k, v, gates and states in the padding, so the real rows' outputs
are bit-identical to the unpadded call (tests/test_bucketing.py). Pad on the host (numpy) where the inputs are
built: jnp.pad on device arrays is itself a small XLA program compiled per T. For varlen batches the same idea
holds with static bounds: pad T to a bucket with an extra trailing sequence in cu_seqlens, and chunk_indices to
a static row count with spec.prepare_chunk_indices(cu_seqlens, num_rows=...).
"""

from __future__ import annotations

import numpy as np

from gdn.common import spec


def bucket_size(T: int) -> int:
    """The smallest CHUNK_SIZE·2^i ≥ T (CHUNK_SIZE for T ≤ CHUNK_SIZE)."""
    if T < 0:
        raise ValueError(f"bucket_size: T: expected T >= 0; got {T}")
    return spec.CHUNK_SIZE * (1 << max(0, spec.num_chunks(T) - 1).bit_length())


def _pad_tokens(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """x zero-padded along axis to size."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def pad_to_bucket(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, h: np.ndarray, g: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Zero-pad q, k [B, T, H, K], v [B, T, HV, V], g [B, T, HV] along T to bucket_size(T), and h
    [B, NT, HV, K, V] along NT to that bucket's chunk count. Host (numpy) arrays in and out."""
    padded_T = bucket_size(q.shape[1])
    return (_pad_tokens(q, 1, padded_T), _pad_tokens(k, 1, padded_T), _pad_tokens(v, 1, padded_T),
            _pad_tokens(h, 1, spec.num_chunks(padded_T)), None if g is None else _pad_tokens(g, 1, padded_T))


def pad_forward_to_bucket(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """chunk_gated_delta_rule's q, k [B, T, H, K], v [B, T, HV, V], g, beta [B, T, HV] zero-padded along T to
    bucket_size(T). A padding token has beta = 0 (writes nothing into S) and g = 0 (no decay), so S passes it
    unchanged: the real rows of o and the final state are those of the unpadded call. Host arrays in and out."""
    padded_T = bucket_size(q.shape[1])
    return tuple(_pad_tokens(x, 1, padded_T) for x in (q, k, v, g, beta))
