"""Float64 numpy reference of chunk_fwd_o, straight from the formula in gdn.common.spec.

Same signature, argument order, layouts and units as the kernels' entry points; used by the tests and by
``python -m gdn`` as the ground truth.
"""

from __future__ import annotations

import numpy as np

from gdn.common.spec import CHUNK_SIZE, default_scale


def chunk_fwd_o(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    h: np.ndarray,
    g: np.ndarray | None = None,
    scale: float | None = None,
    cu_seqlens: np.ndarray | None = None,
    chunk_indices: np.ndarray | None = None,
) -> np.ndarray:
    """o [B, T, HV, V] float64 from q, k [B, T, H, K], v [B, T, HV, V], h [B, NT, HV, K, V], g [B, T, HV].

    chunk_indices is accepted for signature parity and ignored: the reference walks cu_seqlens itself.
    """
    del chunk_indices
    q, k, v, h = (np.asarray(x, dtype=np.float64) for x in (q, k, v, h))
    B, T, H, K = q.shape
    HV = v.shape[2]
    group = HV // H
    scale = default_scale(K) if scale is None else float(scale)
    g = np.zeros((B, T, HV)) if g is None else np.asarray(g, dtype=np.float64)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]  # (batch row, start, end)
    else:
        bounds = np.asarray(cu_seqlens, dtype=np.int64)
        spans = [(0, int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])]
    o = np.zeros(v.shape, dtype=np.float64)
    first_chunk = 0  # h row of the current sequence's first chunk (varlen packs all sequences' chunks)
    for b, start, end in spans:
        for c, t0 in enumerate(range(start, end, CHUNK_SIZE)):
            t1 = min(t0 + CHUNK_SIZE, end)
            causal = np.tri(t1 - t0, dtype=bool)  # j <= i
            for hv in range(HV):
                qc, kc = q[b, t0:t1, hv // group], k[b, t0:t1, hv // group]  # [n, K]
                vc, gc = v[b, t0:t1, hv], g[b, t0:t1, hv]  # [n, V], [n]
                state = h[b, first_chunk + c, hv]  # [K, V]
                inter = (qc @ state) * np.exp(gc)[:, None]
                decay = np.exp(np.where(causal, gc[:, None] - gc[None, :], -np.inf))
                intra = ((qc @ kc.T) * decay) @ vc
                o[b, t0:t1, hv] = scale * (inter + intra)
        if cu_seqlens is not None:
            first_chunk += -(-(end - start) // CHUNK_SIZE)
    return o
