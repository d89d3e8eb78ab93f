"""Shape bucketing for the JAX backend: JAX compiles one program per input shape, so a serving loop over
T = 1..8192 would compile thousands. Pad T up to a bucket (CHUNK_SIZE·2^i), run, keep the first T rows.

    T_bucket = bucket_size(T)                                  # CHUNK_SIZE·2^i: log2(T_max/CHUNK_SIZE)+1 of them
    q_p, k_p, v_p, h_p, g_p = pad_to_bucket(q, k, v, h, g)     # host numpy in, host numpy out: no compile
    o = jax.jit(chunk_fwd_o)(q_p, k_p, v_p, h_p, g_p)[:, :T]    # one compile per bucket

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


def pad_to_bucket(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, h: np.ndarray, g: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Zero-pad q, k [B, T, H, K], v [B, T, HV, V], g [B, T, HV] along T to bucket_size(T), and h
    [B, NT, HV, K, V] along NT to that bucket's chunk count. Host (numpy) arrays in and out."""
    T = q.shape[1]
    padded_T = bucket_size(T)

    def pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - x.shape[axis])
        return np.pad(x, widths)

    return (pad(q, 1, padded_T), pad(k, 1, padded_T), pad(v, 1, padded_T),
            pad(h, 1, spec.num_chunks(padded_T)), None if g is None else pad(g, 1, padded_T))
