"""FLA's and vLLM's Gated DeltaNet entry points on gdn's kernels: an engine calling them switches by changing an
import (``from gdn.triton.fla_compat import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
fused_sigmoid_gating_delta_rule_update``).

Conventions kept (FLA: fla/ops/gated_delta_rule; vLLM: vllm/model_executor/layers/fla/ops):
- q, k [B, T, H, K], v [B, T, HV, V], g (natural-log, per token) and beta [B, T, HV]; with cu_seqlens [N + 1],
  B = 1 and the sequences are packed along T; o [B, T, HV, V]. q, k, v may be views of one fused projection
  (any token stride): gdn reads them in place.
- States [N, HV, K, V] float32 (FLA's, and vLLM's before its pools were transposed). vLLM's pools are now
  [P, HV, V, K] (MambaStateShapeCalculator.gated_delta_net_state_shape: (num_v_heads, head_v_dim,
  head_k_dim)): pass state_v_first=True (FLA's name for that layout) and such a pool is read and updated in
  place as it is.
- fused_recurrent_gated_delta_rule / fused_sigmoid_gating_delta_rule_update (decode): initial_state is the pool;
  ssm_state_indices [N] (one row per sequence) or [N, S] (a slot per token, with num_accepted_tokens choosing the
  row a sequence continues from); PAD_SLOT_ID (−1) skips a sequence (its o rows zero). inplace_final_state=True
  updates the pool in place (gdn.triton.decode_step, no copy) and returns it; without ssm_state_indices the
  initial states [N, ...] are that pool, row n for sequence n. inplace_final_state=False returns the state
  after every token, [B·T, HV, K, V], in a new tensor (vLLM's kernels' behaviour), each sequence starting from
  initial_state[n], or the row its indices name: this copies the N initial states once.
- fused_sigmoid_gating_delta_rule_update computes g = −exp(A_log)·softplus(a + dt_bias) (softplus β = beta,
  threshold) and beta = sigmoid(b) in the kernel; a, b [T, HV] or [B, T, HV].
- chunk_gated_delta_rule (prefill) is gdn.triton.chunk_gated_delta_rule: initial_state [N, ...], returns
  (o, final_state or None), use_qk_l2norm_in_kernel normalizing q and k in its kernels (FLA's eps); with
  state_v_first the states are transposed copies.
Not supported (an error, never a silent difference): head_first, a headwise beta [B, T, HV, V], KDA's gates.
"""

from __future__ import annotations

import torch

from gdn.common import spec
from gdn.triton.decode import decode_step
from gdn.triton.forward import chunk_gated_delta_rule as _chunk_gated_delta_rule

_OP = "fla_compat"


def _check(cu_seqlens: torch.Tensor | None, q: torch.Tensor, scale: float | None, head_first: bool = False) -> None:
    if head_first:
        raise ValueError(f"{_OP}: head_first: expected False (layouts [B, T, H, K]); got True")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"{_OP}: q: expected B = 1 when cu_seqlens is given (varlen packs the sequences along T); "
                         f"got B = {q.shape[0]}")
    if scale is not None and scale <= 0:
        raise ValueError(f"{_OP}: scale: expected a positive scale; got {scale}")


def _gate_dtype(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x as gdn takes beta and the raw gates: float32 or q's dtype (any other dtype converted to float32)."""
    return x if x.dtype in (torch.float32, q.dtype) else x.float()


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_indices: torch.Tensor | None = None,
    head_first: bool = False,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FLA's / vLLM's chunk_gated_delta_rule (prefill): (o [B, T, HV, V], final_state [N, HV, K, V] or None; with
    state_v_first both states are [N, HV, V, K]). chunk_indices: FLA's (sequence, chunk) rows, gdn's too."""
    _check(cu_seqlens, q, scale, head_first)
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    o, final_state = _chunk_gated_delta_rule(
        q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(), _gate_dtype(beta, q).contiguous(),
        scale, None if initial_state is None else initial_state.float().contiguous(), output_final_state,
        cu_seqlens, chunk_indices, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    if final_state is not None and state_v_first:
        final_state = final_state.transpose(-1, -2).contiguous()
    return o, final_state


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    inplace_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    *,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_recurrent_gated_delta_rule (decode, speculative decode): (o [B, T, HV, V], the pool updated
    in place, or with inplace_final_state=False the state after every token [B·T, HV, K, V]). beta None: ones."""
    if beta is not None and beta.dim() == v.dim():
        raise ValueError(f"{_OP}: beta: expected [B, T, HV] (a headwise beta [B, T, HV, V] is not supported); got "
                         f"shape {tuple(beta.shape)}")
    HV = v.shape[2]
    beta = (torch.ones(q.shape[:2] + (HV,), dtype=torch.float32, device=q.device) if beta is None
            else _gate_dtype(beta, q))
    return _decode(q, k, v, scale, initial_state, inplace_final_state, cu_seqlens, ssm_state_indices,
                   num_accepted_tokens, use_qk_l2norm_in_kernel, state_v_first,
                   gates={"g": g.float().reshape(-1, HV), "beta": beta.reshape(-1, HV)})


def fused_sigmoid_gating_delta_rule_update(
    A_log: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    dt_bias: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: float = spec.SOFTPLUS_BETA,
    threshold: float = spec.SOFTPLUS_THRESHOLD,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    inplace_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    is_kda: bool = False,
    *,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_sigmoid_gating_delta_rule_update: the decode step with the gates computed in the kernel from
    the raw a, b (g = −exp(A_log)·softplus(a + dt_bias), softplus β = beta up to threshold; beta = sigmoid(b)).
    Returns as fused_recurrent_gated_delta_rule."""
    if is_kda:
        raise ValueError(f"{_OP}: is_kda: expected False (KDA's per-key gates are not a Gated DeltaNet gate); got True")
    HV = v.shape[2]
    return _decode(q, k, v, scale, initial_state, inplace_final_state, cu_seqlens, ssm_state_indices,
                   num_accepted_tokens, use_qk_l2norm_in_kernel, state_v_first,
                   gates={"g": None, "beta": None, "a": _gate_dtype(a, q).reshape(-1, HV),
                          "b": _gate_dtype(b, q).reshape(-1, HV),
                          "A_log": _gate_dtype(A_log, q), "dt_bias": _gate_dtype(dt_bias, q),
                          "softplus_beta": beta, "softplus_threshold": threshold})


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            initial_state: torch.Tensor | None, inplace_final_state: bool, cu_seqlens: torch.Tensor | None,
            ssm_state_indices: torch.Tensor | None, num_accepted_tokens: torch.Tensor | None,
            use_qk_l2norm_in_kernel: bool, state_v_first: bool, gates: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """gdn.triton.decode_step on FLA's layouts, its gate arguments (g, beta or a, b, A_log, dt_bias, softplus)
    in gates: what both decode entries run."""
    _check(cu_seqlens, q, scale)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if cu_seqlens is None and T > 1:  # B sequences of T tokens
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    if initial_state is None:
        initial_state = q.new_zeros((N, HV, V, K) if state_v_first else (N, HV, K, V), dtype=torch.float32)
    pool = initial_state.transpose(-1, -2) if state_v_first else initial_state
    tokens = {"q": q.flatten(0, 1), "k": k.flatten(0, 1), "v": v.flatten(0, 1), "cu_seqlens": cu_seqlens,
              "use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, **gates}
    if inplace_final_state:
        indices = (torch.arange(N, dtype=torch.int32, device=q.device) if ssm_state_indices is None
                   else ssm_state_indices)
        o, _ = decode_step(state=pool, scale=scale, state_indices=indices, num_accepted_tokens=num_accepted_tokens,
                           **tokens)
        return o.view(B, T, HV, V), initial_state
    # the state after every token: a pool of B·T rows (and a spare one), token t's state in row t; each sequence
    # starts from its initial state copied into the row of its first token, which its first token then replaces
    read = _initial_rows(N, ssm_state_indices, num_accepted_tokens, q.device)
    if cu_seqlens is None:
        starts, lengths = torch.arange(N, device=q.device), torch.ones(N, dtype=torch.int64, device=q.device)
    else:
        starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    live = (lengths > 0) & (read >= 0)
    shape = (B * T + 1, HV, V, K) if state_v_first else (B * T + 1, HV, K, V)
    states = q.new_empty(shape, dtype=torch.float32)
    token_pool = states.transpose(-1, -2) if state_v_first else states
    token_pool[torch.where(live, starts, B * T)] = pool[read.clamp(0, pool.shape[0] - 1)]
    column = torch.arange(T, device=q.device)
    slots = torch.where(live[:, None] & (column < lengths[:, None]), starts[:, None] + column, -1).to(torch.int32)
    o, _ = decode_step(state=token_pool, scale=scale, state_indices=slots, **tokens)
    return o.view(B, T, HV, V), states[:B * T]


def _initial_rows(N: int, ssm_state_indices: torch.Tensor | None, num_accepted_tokens: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor:
    """The pool row each sequence starts from (int64 [N]; negative: a padded slot): n, state_indices[n], or
    state_indices[n, num_accepted_tokens[n] − 1] (column 0 without num_accepted_tokens)."""
    if ssm_state_indices is None:
        return torch.arange(N, device=device)
    if ssm_state_indices.dim() == 1:
        return ssm_state_indices.long()
    column = (torch.zeros(N, dtype=torch.int64, device=device) if num_accepted_tokens is None
              else num_accepted_tokens.long() - 1)
    valid = (column >= 0) & (column < ssm_state_indices.shape[1])
    read = ssm_state_indices.long().gather(1, column.clamp(0, ssm_state_indices.shape[1] - 1)[:, None])[:, 0]
    return torch.where(valid, read, -1)
