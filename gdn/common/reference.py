"""Float64 numpy references of gdn's ops, straight from the formulas in gdn.common.spec.

Same signature, argument order, layouts and units as the kernels' entry points; used by the tests and by
``python -m gdn`` as the ground truth.
"""

from __future__ import annotations

import numpy as np

from gdn.common.spec import (
    CHUNK_SIZE,
    CUMULATIVE_GATE_FLOOR,
    QK_L2NORM_EPS,
    SOFTPLUS_BETA,
    SOFTPLUS_THRESHOLD,
    default_scale,
    num_chunks,
)


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
    Non-finite inputs as gdn.common.spec states: IEEE arithmetic over the causal terms j ≤ i only (later
    tokens are no terms, not terms times 0), g clamped from below at CUMULATIVE_GATE_FLOOR (−∞ is a reset).
    """
    del chunk_indices
    q, k, v, h = (np.asarray(x, dtype=np.float64) for x in (q, k, v, h))
    B, T, H, K = q.shape
    HV = v.shape[2]
    group = HV // H
    scale = default_scale(K) if scale is None else float(scale)
    g = np.zeros((B, T, HV)) if g is None else np.asarray(g, dtype=np.float64)
    g = np.where(g < CUMULATIVE_GATE_FLOOR, CUMULATIVE_GATE_FLOOR, g)  # −∞ → the finite floor; NaN stays NaN
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
                with np.errstate(invalid="ignore", over="ignore"):  # non-finite terms of later tokens, dropped
                    scores = np.where(causal, (qc @ kc.T) * np.exp(gc[:, None] - gc[None, :]), 0)
                if np.isfinite(vc).all():  # then scores @ vc adds 0·v_j for j > i exactly
                    intra = scores @ vc
                else:  # Σ_{j ≤ i} scores[i, j]·v[j]: no 0·NaN from later tokens
                    intra = np.where(causal[:, :, None], scores[:, :, None] * vc[None], 0).sum(axis=1)
                o[b, t0:t1, hv] = scale * (inter + intra)
        if cu_seqlens is not None:
            first_chunk += -(-(end - start) // CHUNK_SIZE)
    return o


def l2_normalize(x: np.ndarray, eps: float = QK_L2NORM_EPS) -> np.ndarray:
    """x / sqrt(Σ x² + eps) over the last axis, in float64 (use_qk_l2norm_in_kernel; FLA's l2norm)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def raw_gates(a: np.ndarray, b: np.ndarray, A_log: np.ndarray, dt_bias: np.ndarray,
              softplus_beta: float = SOFTPLUS_BETA,
              softplus_threshold: float = SOFTPLUS_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(g, beta) in float64 from the raw gates a, b [..., HV] with A_log, dt_bias [HV]: g = −exp(A_log)·
    softplus(a + dt_bias), softplus(x) = log(1 + exp(β·x))/β where β·x ≤ threshold, else x; beta = sigmoid(b)."""
    x = np.asarray(a, dtype=np.float64) + np.asarray(dt_bias, dtype=np.float64)
    scaled = softplus_beta * x
    with np.errstate(over="ignore", invalid="ignore"):  # the branch np.where drops may overflow
        softplus = np.where(scaled <= softplus_threshold, np.logaddexp(0.0, scaled) / softplus_beta, x)
        g = -np.exp(np.asarray(A_log, dtype=np.float64)) * softplus
    return g, 1.0 / (1.0 + np.exp(-np.asarray(b, dtype=np.float64)))


def _walk(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, S: np.ndarray,
          scale: float, keep_states: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """The recurrence over one sequence's tokens for one value head, S [K, V] updated in place: (o [n, V],
    S after each token when keep_states, else []). q, k [n, K]; v [n, V]; g, beta [n]."""
    o, states = np.zeros(v.shape), []
    for t in range(len(v)):
        S *= np.exp(g[t])
        S += np.outer(k[t], beta[t] * (v[t] - k[t] @ S))
        o[t] = scale * (q[t] @ S)
        if keep_states:
            states.append(S.copy())
    return o, states


def _serving_inputs(q, k, g, beta, use_qk_l2norm_in_kernel, a, b, A_log, dt_bias, softplus_beta,
                    softplus_threshold) -> tuple[np.ndarray, ...]:
    """(q, k, g, beta) in float64 as the recurrence takes them: q, k L2-normalized when asked, g and beta from
    the raw gates when a is given."""
    q, k = (l2_normalize(x) if use_qk_l2norm_in_kernel else np.asarray(x, dtype=np.float64) for x in (q, k))
    if a is not None:
        g, beta = raw_gates(a, b, A_log, dt_bias, softplus_beta, softplus_threshold)
    return q, k, np.asarray(g, dtype=np.float64), np.asarray(beta, dtype=np.float64)


def recurrent_gated_delta_rule(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray | None,
    beta: np.ndarray | None,
    scale: float | None = None,
    initial_state: np.ndarray | None = None,
    output_final_state: bool = False,
    cu_seqlens: np.ndarray | None = None,
    *,
    state_indices: np.ndarray | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    a: np.ndarray | None = None,
    b: np.ndarray | None = None,
    A_log: np.ndarray | None = None,
    dt_bias: np.ndarray | None = None,
    softplus_beta: float = SOFTPLUS_BETA,
    softplus_threshold: float = SOFTPLUS_THRESHOLD,
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
    Serving arguments (gdn.common.spec): with state_indices [N], initial_state is a pool [P, HV, K, V]: sequence
    n starts from row state_indices[n] and its final state is written back there (a negative index skips the
    sequence, as one out of range does: o rows zero, nothing written); the final state returned is the whole
    updated pool.
    use_qk_l2norm_in_kernel L2-normalizes q and k first; a, b, A_log, dt_bias replace g and beta (raw_gates).
    """
    q, k, g, beta = _serving_inputs(q, k, g, beta, use_qk_l2norm_in_kernel, a, b, A_log, dt_bias, softplus_beta,
                                    softplus_threshold)
    v = np.asarray(v, dtype=np.float64)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    scale = default_scale(K) if scale is None else float(scale)
    spans = _sequence_spans(B, T, cu_seqlens)
    states = (np.zeros((len(spans), HV, K, V)) if initial_state is None
              else np.array(initial_state, dtype=np.float64))  # a copy: updated in place below
    rows = range(len(spans)) if state_indices is None else np.asarray(state_indices)
    o = np.zeros(v.shape, dtype=np.float64)
    for (b_row, start, end), row in zip(spans, rows):
        if not 0 <= row < len(states):
            continue
        for hv in range(HV):
            h = hv // group
            tokens = slice(start, end)
            o[b_row, tokens, hv] = _walk(q[b_row, tokens, h], k[b_row, tokens, h], v[b_row, tokens, hv],
                                         g[b_row, tokens, hv], beta[b_row, tokens, hv], states[row, hv], scale)[0]
    return o, (states if output_final_state else None)


def decode_step(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray | None,
    beta: np.ndarray | None,
    state: np.ndarray,
    scale: float | None = None,
    *,
    state_indices: np.ndarray | None = None,
    cu_seqlens: np.ndarray | None = None,
    num_accepted_tokens: np.ndarray | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    a: np.ndarray | None = None,
    b: np.ndarray | None = None,
    A_log: np.ndarray | None = None,
    dt_bias: np.ndarray | None = None,
    softplus_beta: float = SOFTPLUS_BETA,
    softplus_threshold: float = SOFTPLUS_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """decode_step in float64, with its exact signature: (o [T, HV, V], the states after).

    q, k [T, H, K], v [T, HV, V], g, beta [T, HV]: one token per sequence, or with cu_seqlens [N + 1] sequence
    n's tokens at rows cu_seqlens[n] ≤ t < cu_seqlens[n + 1]. Without state_indices, state [N, HV, K, V] holds
    each sequence's S before its first token and the second result is S after its last token. With
    state_indices, state is a pool [P, HV, K, V] and the second result is the updated pool (a copy), as
    gdn.common.spec says: [N] reads and writes back row state_indices[n]; [N, S] reads row
    state_indices[n, num_accepted_tokens[n] − 1] (column 0 without num_accepted_tokens) and writes the state
    after token j to row state_indices[n, j] (none when negative or ≥ P; tokens j ≥ S are not run). A sequence
    whose read row is negative or ≥ P, or whose accepted count is outside [1, S], is skipped: o rows zero,
    nothing written (the kernels' bounds masking; host arrays with such values are refused before launch).
    """
    q, k, g, beta = _serving_inputs(q, k, g, beta, use_qk_l2norm_in_kernel, a, b, A_log, dt_bias, softplus_beta,
                                    softplus_threshold)
    v = np.asarray(v, dtype=np.float64)
    T, H, K = q.shape
    HV = v.shape[1]
    group = HV // H
    scale = default_scale(K) if scale is None else float(scale)
    bounds = np.arange(T + 1) if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int64)
    states = np.array(state, dtype=np.float64)  # a copy, updated in place below
    o = np.zeros(v.shape)
    slots = None if state_indices is None else np.asarray(state_indices).reshape(len(bounds) - 1, -1)
    per_token = state_indices is not None and np.ndim(state_indices) == 2
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if per_token:
            end = min(end, start + slots.shape[1])
        column = 0 if num_accepted_tokens is None else int(num_accepted_tokens[n]) - 1
        if slots is None:
            row = n
        elif 0 <= column < slots.shape[1] and 0 <= slots[n, column] < len(states):
            row = slots[n, column]
        else:
            continue
        for hv in range(HV):
            h, tokens = hv // group, slice(start, end)
            S = states[row, hv].copy()
            o[tokens, hv], after = _walk(q[tokens, h], k[tokens, h], v[tokens, hv], g[tokens, hv],
                                         beta[tokens, hv], S, scale, keep_states=per_token)
            if not per_token:
                states[row, hv] = S
                continue
            for j, S_j in enumerate(after):
                if 0 <= slots[n, j] < len(states):
                    states[slots[n, j], hv] = S_j
    return o, states


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


def recurrent_gated_delta_rule_gradients(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray | None,
    beta: np.ndarray | None,
    do: np.ndarray,
    final_state_gradient: np.ndarray | None = None,
    scale: float | None = None,
    initial_state: np.ndarray | None = None,
    cu_seqlens: np.ndarray | None = None,
    *,
    use_qk_l2norm_in_kernel: bool = False,
    a: np.ndarray | None = None,
    b: np.ndarray | None = None,
    A_log: np.ndarray | None = None,
    dt_bias: np.ndarray | None = None,
    softplus_beta: float = SOFTPLUS_BETA,
    softplus_threshold: float = SOFTPLUS_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Gradients of the token-by-token gated delta rule, float64, by torch autograd through the recurrence of
    recurrent_gated_delta_rule (no chunking, no WY form): of L = Σ o ⊙ do + Σ final_state ⊙ final_state_gradient
    (the backward's arguments as gdn's backward takes them; final_state_gradient None: zero). Returns dq, dk, dv,
    dg (per-token gates), dbeta and, when initial_state is given, initial_state, as float64 numpy arrays. With
    the serving arguments as recurrent_gated_delta_rule takes them (use_qk_l2norm_in_kernel, the raw gates a, b,
    A_log, dt_bias instead of g and beta), the gradients reach the raw inputs: dq, dk of q, k before the norm,
    and da, db, dA_log, ddt_bias instead of dg, dbeta. torch is imported here, so gdn.common imports neither
    framework."""
    import torch
    import torch.nn.functional as F

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)

    gates = ("a", "b", "A_log", "dt_bias") if a is not None else ("g", "beta")
    given = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "a": a, "b": b, "A_log": A_log, "dt_bias": dt_bias}
    inputs = {n: tensor(given[n]) for n in ("q", "k", "v") + gates}
    if initial_state is not None:
        inputs["initial_state"] = tensor(initial_state)
    q_, k_, v_ = (inputs[n] for n in ("q", "k", "v"))
    if use_qk_l2norm_in_kernel:  # as l2_normalize
        q_, k_ = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + QK_L2NORM_EPS) for x in (q_, k_))
    if a is not None:  # as raw_gates
        rate = F.softplus(inputs["a"] + inputs["dt_bias"], beta=softplus_beta, threshold=softplus_threshold)
        g_, beta_ = -torch.exp(inputs["A_log"]) * rate, torch.sigmoid(inputs["b"])
    else:
        g_, beta_ = inputs["g"], inputs["beta"]
    B, T, H, K = q_.shape
    HV = v_.shape[2]
    group = HV // H
    scale = default_scale(K) if scale is None else float(scale)
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(_sequence_spans(B, T, cu_seqlens)):
        S = (inputs["initial_state"][n] if initial_state is not None
             else torch.zeros(HV, K, v_.shape[3], dtype=torch.float64))  # [HV, K, V]
        rows = []
        for t in range(start, end):
            q_t = q_[b, t].repeat_interleave(group, 0)  # [HV, K]
            k_t = k_[b, t].repeat_interleave(group, 0)
            S = S * torch.exp(g_[b, t])[:, None, None]
            delta = beta_[b, t][:, None] * (v_[b, t] - torch.einsum("hk,hkv->hv", k_t, S))  # [HV, V]
            S = S + k_t[:, :, None] * delta[:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", q_t, S))
        outputs.append((b, start, end, rows))
        finals.append(S)
    loss = torch.zeros((), dtype=torch.float64)
    do_ = torch.as_tensor(np.asarray(do, dtype=np.float64))
    for b, start, end, rows in outputs:
        if rows:
            loss = loss + (torch.stack(rows) * do_[b, start:end]).sum()
    if final_state_gradient is not None:
        loss = loss + (torch.stack(finals) * torch.as_tensor(np.asarray(final_state_gradient, np.float64))).sum()
    names = list(inputs)
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: np.zeros(inputs[n].shape) if d is None else d.numpy() for n, d in zip(names, grads)}
