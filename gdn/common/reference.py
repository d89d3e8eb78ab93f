"""Float64 numpy reference of chunk_fwd_o, straight from the formula in gdn.common.spec.

Same signature, argument order, layouts and units as the kernels' entry points; used by the tests and by
``python -m gdn`` as the ground truth.
"""

from __future__ import annotations

import numpy as np

from gdn.common.spec import CHUNK_SIZE, default_scale, num_chunks


def _sequence_spans(B: int, T: int, cu_seqlens: np.ndarray | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: the B rows, or the packed spans of cu_seqlens (B = 1)."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    return [(0, int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])]


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
    o = np.zeros(v.shape, dtype=np.float64)
    first_chunk = 0  # h row of the current sequence's first chunk (varlen packs all sequences' chunks)
    for b, start, end in _sequence_spans(B, T, cu_seqlens):
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


def recurrent_gated_delta_rule(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray,
    scale: float | None = None,
    initial_state: np.ndarray | None = None,
    output_final_state: bool = False,
    cu_seqlens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The gated delta rule run token by token: (o [B, T, HV, V], final_state [N, HV, K, V] or None), float64.

    q, k [B, T, H, K]; v [B, T, HV, V] (value head hv reads q/k head hv // (HV / H)); g [B, T, HV] per-token
    log-gate in natural-log units (g ≤ 0; NOT the chunk-local cumsum that chunk_fwd_o takes); beta [B, T, HV];
    scale defaults to K**-0.5. Sequences: the B rows, or with cu_seqlens [N + 1] (B = 1) the N packed spans of
    T. initial_state [N, HV, K, V] is each sequence's S before its first token (zeros when None); the final
    state, S after its last token, is returned when output_final_state. Per sequence and value head, for each
    token t, S ∈ R^{K×V} (decode_step in gdn.common.spec is one such step):
        S ← exp(g_t)·S
        S ← S + k_t ⊗ (beta_t·(v_t − Sᵀk_t))
        o_t = scale·Sᵀq_t
    """
    q, k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    scale = default_scale(K) if scale is None else float(scale)
    spans = _sequence_spans(B, T, cu_seqlens)
    states = (np.zeros((len(spans), HV, K, V)) if initial_state is None
              else np.array(initial_state, dtype=np.float64))  # a copy: updated in place below
    o = np.zeros(v.shape, dtype=np.float64)
    for n, (b, start, end) in enumerate(spans):
        for hv in range(HV):
            S = states[n, hv]  # [K, V], a view into states
            for t in range(start, end):
                q_t, k_t = q[b, t, hv // group], k[b, t, hv // group]  # [K]
                S *= np.exp(g[b, t, hv])
                S += np.outer(k_t, beta[b, t, hv] * (v[b, t, hv] - k_t @ S))
                o[b, t, hv] = scale * (q_t @ S)
    return o, (states if output_final_state else None)


def chunk_prepare(
    k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, cu_seqlens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 1 of chunk_gated_delta_rule in float64: (g_c [B, T, HV], w [B, T, HV, K], u [B, T, HV, V]).

    Per chunk and value head: g_c the chunk-local cumsum of the per-token log-gates g; A the strictly lower
    beta_i·k_i·k_j·exp(g_i − g_j); (I + A)⁻¹ by a dense solve (not the kernels' blocked substitution);
    w = (I + A)⁻¹·(beta·exp(g_c)·k), u = (I + A)⁻¹·(beta·v).
    """
    k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (k, v, g, beta))
    B, T, H, K = k.shape
    HV = v.shape[2]
    g_cum, w, u = np.zeros(g.shape), np.zeros(k.shape[:2] + (HV, K)), np.zeros(v.shape)
    for b, start, end in _sequence_spans(B, T, cu_seqlens):
        for t0 in range(start, end, CHUNK_SIZE):
            t1 = min(t0 + CHUNK_SIZE, end)
            for hv in range(HV):
                kc, vc, bc = k[b, t0:t1, hv // (HV // H)], v[b, t0:t1, hv], beta[b, t0:t1, hv]
                gc = np.cumsum(g[b, t0:t1, hv])
                lower = np.tri(t1 - t0, k=-1, dtype=bool)
                A = np.where(lower, bc[:, None] * (kc @ kc.T) * np.exp(np.where(lower, gc[:, None] - gc, 0)), 0)
                inverse = np.linalg.solve(np.eye(t1 - t0) + A, np.eye(t1 - t0))
                g_cum[b, t0:t1, hv] = gc
                w[b, t0:t1, hv] = inverse @ (kc * (bc * np.exp(gc))[:, None])
                u[b, t0:t1, hv] = inverse @ (vc * bc[:, None])
    return g_cum, w, u


def chunk_states(
    k: np.ndarray, w: np.ndarray, u: np.ndarray, g_cum: np.ndarray, initial_state: np.ndarray | None = None,
    cu_seqlens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 2 of chunk_gated_delta_rule in float64: (h [B, NT, HV, K, V], v_new [B, T, HV, V],
    final_state [N, HV, K, V]); with cu_seqlens, h's rows are every sequence's chunks in order.

    Per sequence and value head, S from initial_state (zeros when None), for each chunk:
    h[c] = S; v_new = u − w·S; S = exp(g_last)·S + kᵀ·(exp(g_last − g_c)·v_new).
    """
    k, w, u, g_cum = (np.asarray(x, dtype=np.float64) for x in (k, w, u, g_cum))
    B, T, H, K = k.shape
    HV, V = u.shape[2], u.shape[3]
    spans = _sequence_spans(B, T, cu_seqlens)
    rows = [num_chunks(end - start) for _, start, end in spans]
    h = np.zeros((B, sum(rows) // B if B else 0, HV, K, V))
    v_new = np.zeros(u.shape)
    states = (np.zeros((len(spans), HV, K, V)) if initial_state is None
              else np.array(initial_state, dtype=np.float64))
    row = 0
    for n, (b, start, end) in enumerate(spans):
        row = 0 if cu_seqlens is None else row  # dense: each batch row has its own NT rows of h
        for t0 in range(start, end, CHUNK_SIZE):
            t1 = min(t0 + CHUNK_SIZE, end)
            for hv in range(HV):
                S = states[n, hv]
                kc, gc = k[b, t0:t1, hv // (HV // H)], g_cum[b, t0:t1, hv]
                h[b, row, hv] = S
                vc = u[b, t0:t1, hv] - w[b, t0:t1, hv] @ S
                v_new[b, t0:t1, hv] = vc
                states[n, hv] = np.exp(gc[-1]) * S + kc.T @ (vc * np.exp(gc[-1] - gc)[:, None])
            row += 1
    return h, v_new, states
