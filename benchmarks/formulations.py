"""Plain jax.numpy and torch-eager formulations of chunk_fwd_o: benchmark baselines, not library code.

What someone without a kernel would write: cut the token axis into CHUNK_SIZE chunks, batch every chunk
of every sequence along one axis N, and evaluate the formula of gdn.common.spec with einsums:

    o_c = scale·(q_c h[c]) ⊙ exp(g_c)[:, None] + tril((scale·q_c k_cᵀ) ⊙ exp(g_i − g_j)) v_c

Chunking: without varlen, pad T to a multiple of CHUNK_SIZE and reshape [B, T] → [B·NT, CHUNK_SIZE] (free
when T is a multiple). With varlen, gather the tokens of every chunk through a host-built index
``token_index`` [NT, CHUNK_SIZE] (−1 past a sequence's end, clamped to token 0 for the gather: those slots
sit after every real row of their chunk, so the causal mask keeps them out of real rows) and gather the
output back with ``token_slot`` [T] (the slot of every token in the flattened [NT·CHUNK_SIZE] chunk axis).
Both come from ``varlen_index(cu_seqlens)``, built once outside the timed region, like chunk_indices.

Precision, as a user would write it. jnp: bf16/fp16 dots with float32 results
(``preferred_element_type``); float32 dots at XLA's default precision (TF32 on recent GPUs). torch: the
dots return the input dtype (torch has no float32-output bf16 matmul in eager mode), then gating and the sum
run in float32; float32 matmuls follow torch.backends.cuda.matmul.allow_tf32 (off by default). Like the
kernels, the gated scores are cast to v's dtype before the product with v.

``check_formulations()`` compares both against gdn.common.reference on tiny float32 CPU inputs; the
benchmark calls it at startup.
"""

from __future__ import annotations

import numpy as np

from gdn.common import spec


def varlen_index(cu_seqlens) -> tuple[np.ndarray, np.ndarray]:
    """(token_index [NT, CHUNK_SIZE] int32, −1 = no token; token_slot [T] int32) from host cu_seqlens.

    Row r of token_index lists the packed-T positions of chunk r, chunks in the order of
    spec.prepare_chunk_indices (the rows of h). token_slot[t] is where token t sits in token_index.ravel().
    """
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    rows = spec.prepare_chunk_indices(bounds)  # [NT, 2] (sequence, chunk within the sequence)
    starts = bounds[rows[:, 0]] + rows[:, 1].astype(np.int64) * spec.CHUNK_SIZE
    ends = bounds[rows[:, 0] + 1]
    tokens = starts[:, None] + np.arange(spec.CHUNK_SIZE)[None, :]
    token_index = np.where(tokens < ends[:, None], tokens, -1)
    valid = token_index.ravel() >= 0
    token_slot = np.empty(int(bounds[-1]), dtype=np.int64)
    token_slot[token_index.ravel()[valid]] = np.flatnonzero(valid)
    return token_index.astype(np.int32), token_slot.astype(np.int32)


# ---------------------------------------------------------------------------------------------- jax.numpy

def chunk_fwd_o_jnp(q, k, v, h, g=None, scale=None, token_index=None, token_slot=None):
    """o [B, T, HV, V] in v's dtype. Arguments as gdn's chunk_fwd_o, with varlen given by varlen_index()."""
    import jax.numpy as jnp

    BT = spec.CHUNK_SIZE
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    scale = spec.default_scale(K) if scale is None else scale
    f32 = jnp.float32
    if token_index is None:
        NT = spec.num_chunks(T)

        def chunks(x):  # [B, T, ...] -> [B·NT, BT, ...]
            x = jnp.pad(x, [(0, 0), (0, NT * BT - T)] + [(0, 0)] * (x.ndim - 2))
            return x.reshape((B * NT, BT) + x.shape[2:])
    else:
        gather = jnp.maximum(token_index, 0)

        def chunks(x):  # [1, T, ...] -> [NT, BT, ...]
            return x[0][gather]
    N = h.shape[0] * h.shape[1]
    qc, kc = chunks(q), chunks(k)  # [N, BT, H, K]
    vc = chunks(v).reshape(N, BT, H, G, V)
    hc = h.reshape(N, H, G, K, V).astype(q.dtype)
    # [N, BT, H, K] x [N, H, G, K, V] -> [N, BT, H, G, V]: q_c h[c]
    inter = jnp.einsum("nihk,nhgkv->nihgv", qc, hc, preferred_element_type=f32)
    # [N, BT, H, K] x [N, BT, H, K] -> [N, H, BT, BT]: q_c k_cᵀ
    scores = jnp.einsum("nihk,njhk->nhij", qc, kc, preferred_element_type=f32)
    causal = jnp.tril(jnp.ones((BT, BT), dtype=bool))
    if g is None:
        gated = jnp.broadcast_to(jnp.where(causal, scores, 0)[:, :, None], (N, H, G, BT, BT))
    else:
        gc = chunks(g).reshape(N, BT, H, G)
        inter = inter * jnp.exp(gc)[..., None]
        gt = gc.transpose(0, 2, 3, 1)  # [N, H, G, BT]
        decay = jnp.exp(jnp.where(causal, gt[..., :, None] - gt[..., None, :], -jnp.inf))
        gated = scores[:, :, None] * decay  # [N, H, G, BT, BT]
    # [N, H, G, BT, BT] x [N, BT, H, G, V] -> [N, BT, H, G, V]: the intra-chunk part
    intra = jnp.einsum("nhgij,njhgv->nihgv", (gated * scale).astype(v.dtype), vc, preferred_element_type=f32)
    o = (inter * scale + intra).astype(v.dtype).reshape(N * BT, HV, V)
    if token_index is None:
        return o.reshape(B, -1, HV, V)[:, :T]
    return o[token_slot][None]


# ------------------------------------------------------------------------------------------- torch eager

def chunk_fwd_o_torch(q, k, v, h, g=None, scale=None, token_index=None, token_slot=None):
    """o [B, T, HV, V] in v's dtype. Arguments as gdn's chunk_fwd_o, with varlen given by varlen_index()
    (as int64 tensors on q's device)."""
    import torch
    import torch.nn.functional as F

    BT = spec.CHUNK_SIZE
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    scale = spec.default_scale(K) if scale is None else scale
    if token_index is None:
        NT = spec.num_chunks(T)

        def chunks(x):  # [B, T, ...] -> [B·NT, BT, ...]
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, NT * BT - T))
            return x.reshape((B * NT, BT) + tuple(x.shape[2:]))
    else:
        gather = token_index.clamp(min=0)

        def chunks(x):  # [1, T, ...] -> [NT, BT, ...]
            return x[0][gather]
    N = h.shape[0] * h.shape[1]
    qc, kc = chunks(q), chunks(k)  # [N, BT, H, K]
    vc = chunks(v).reshape(N, BT, H, G, V)
    hc = h.reshape(N, H, G, K, V).to(q.dtype)
    # [N, BT, H, K] x [N, H, G, K, V] -> [N, BT, H, G, V]: q_c h[c]
    inter = torch.einsum("nihk,nhgkv->nihgv", qc, hc).float()
    # [N, BT, H, K] x [N, BT, H, K] -> [N, H, BT, BT]: q_c k_cᵀ
    scores = torch.einsum("nihk,njhk->nhij", qc, kc).float()
    causal = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    if g is None:
        gated = torch.where(causal, scores, 0.0)[:, :, None].expand(N, H, G, BT, BT)
    else:
        gc = chunks(g).reshape(N, BT, H, G)
        inter = inter * gc.exp()[..., None]
        gt = gc.permute(0, 2, 3, 1)  # [N, H, G, BT]
        decay = torch.where(causal, gt[..., :, None] - gt[..., None, :], float("-inf")).exp()
        gated = scores[:, :, None] * decay  # [N, H, G, BT, BT]
    # [N, H, G, BT, BT] x [N, BT, H, G, V] -> [N, BT, H, G, V]: the intra-chunk part
    intra = torch.einsum("nhgij,njhgv->nihgv", (gated * scale).to(v.dtype), vc).float()
    o = (inter * scale + intra).to(v.dtype).reshape(N * BT, HV, V)
    if token_index is None:
        return o.reshape(B, -1, HV, V)[:, :T]
    return o[token_slot][None]


# ------------------------------------------------------------------------------------------------ check

def check_formulations(atol: float = 2e-4) -> list[str]:
    """Both formulations against gdn.common.reference on tiny float32 CPU inputs (odd T, grouped heads,
    non-power-of-two K, gated and not, dense and varlen with empty and 1-token sequences).

    Returns one line per case; raises AssertionError naming the case on a mismatch, ImportError only if
    neither torch nor jax is importable (a missing one is reported and skipped).
    """
    from gdn.common import example, reference

    cases = [
        ("dense B2-T100-H2-HV4-K48-V32 gated", dict(B=2, T=100, H=2, HV=4, K=48, V=32), None, True),
        (f"dense B1-T{spec.CHUNK_SIZE}-H1-HV1-K16-V16 ungated", dict(B=1, T=spec.CHUNK_SIZE, H=1, HV=1, K=16, V=16),
         None, False),
        (f"varlen [1,0,150,37,{spec.CHUNK_SIZE}]-H2-HV4-K32-V48 gated",
         dict(B=1, T=188 + spec.CHUNK_SIZE, H=2, HV=4, K=32, V=48),
         np.cumsum([0, 1, 0, 150, 37, spec.CHUNK_SIZE]), True),
    ]
    runners = {}
    try:
        import torch

        def run_torch(x, token_index, token_slot):
            t = {n: None if x[n] is None else torch.from_numpy(x[n]) for n in "qkvhg"}
            ti = None if token_index is None else torch.from_numpy(token_index).long()
            ts = None if token_slot is None else torch.from_numpy(token_slot).long()
            with torch.no_grad():
                return chunk_fwd_o_torch(t["q"], t["k"], t["v"], t["h"], t["g"], None, ti, ts).double().numpy()

        runners["torch-eager"] = run_torch
    except ImportError as error:
        runners["torch-eager"] = error
    try:
        import jax
        import jax.numpy as jnp

        def run_jnp(x, token_index, token_slot):
            with jax.default_device(jax.devices("cpu")[0]):
                a = {n: None if x[n] is None else jnp.asarray(x[n]) for n in "qkvhg"}
                ti = None if token_index is None else jnp.asarray(token_index)
                ts = None if token_slot is None else jnp.asarray(token_slot)
                out = jax.jit(chunk_fwd_o_jnp)(a["q"], a["k"], a["v"], a["h"], a["g"], None, ti, ts)
                return np.asarray(out, dtype=np.float64)

        runners["jnp"] = run_jnp
    except ImportError as error:
        runners["jnp"] = error
    if all(isinstance(r, ImportError) for r in runners.values()):
        raise ImportError("check_formulations: neither torch nor jax is importable")
    lines = []
    for label, sizes, cu, gated in cases:
        x = example.random_inputs(**sizes, dtype="float32", gated=gated, cu_seqlens=cu, seed=1)
        ref = reference.chunk_fwd_o(x["q"], x["k"], x["v"], x["h"], x["g"], cu_seqlens=cu)
        token_index, token_slot = varlen_index(cu) if cu is not None else (None, None)
        for name, run in runners.items():
            if isinstance(run, ImportError):
                lines.append(f"{name:<12} {label}: skipped ({run})")
                continue
            err = float(np.abs(run(x, token_index, token_slot) - ref).max())
            tol = atol * max(1.0, float(np.abs(ref).max()))
            if not err <= tol:
                raise AssertionError(f"check_formulations: {name} {label}: max |o - reference| = {err:.3g} "
                                     f"> {tol:.3g}")
            lines.append(f"{name:<12} {label}: max |o - reference| = {err:.2e} (≤ {tol:.1e}) ok")
    return lines
