"""gdn.triton.fla_compat called the way vLLM's Qwen3-Next GDN layer calls FLA's ops (vllm/model_executor/layers/
mamba/gdn/qwen_gdn_linear_attn.py, _forward_core): q, k, v views of one [T, qkv] projection, a and b views of
one [T, 2·HV] projection, one state pool ([P, HV, V, K] as vLLM holds it, or FLA's [P, HV, K, V]) — a prefill
with states gathered from the pool and scattered back, a decode step through
fused_sigmoid_gating_delta_rule_update with the pool updated in place, a speculative step with per-token slots
and num_accepted_tokens — each against the float64 recurrence of the same raw inputs; then FLA's dense
fused_recurrent conventions and the refused arguments."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import reference, spec
from gdn.common.example import random_decode_inputs
from tests.backends import BACKENDS
from tests.helpers import assert_close, assert_state_close

H, HV, K, V = 1, 2, 16, 32
PAD_SLOT_ID = -1


def _device() -> str:
    return "cuda" if BACKENDS["triton"].on_gpu else "cpu"


def _tensor(x: np.ndarray):
    """A torch tensor on the tests' device (a copy)."""
    return BACKENDS["triton"].torch.from_numpy(np.ascontiguousarray(x)).to(_device(), copy=True)


def _numpy(x) -> np.ndarray:
    return x.double().cpu().numpy()


def _layer_inputs(T: int, seed: int):
    """torch views as vLLM's layer makes them: q, k, v [1, T, heads, dim] of one mixed_qkv [T, 2·H·K + HV·V]
    projection, b, a [T, HV] of one [T, 2·HV] projection, the layer's A_log and dt_bias (the same every call);
    and the numpy raw inputs behind them."""
    torch = BACKENDS["triton"].torch
    raw = random_decode_inputs(T, H, HV, K, V, "float32", seed=seed, raw_qk=True, raw_gates=True)
    layer = random_decode_inputs(1, H, HV, K, V, "float32", seed=0, raw_gates=True)
    raw.update(A_log=layer["A_log"], dt_bias=layer["dt_bias"])
    mixed_qkv = _tensor(np.concatenate([raw[n].reshape(T, -1) for n in ("q", "k", "v")], axis=1))
    query, key, value = torch.split(mixed_qkv, [H * K, H * K, HV * V], dim=-1)
    ba = _tensor(np.concatenate([raw["b"], raw["a"]], axis=1))
    b, a = ba.chunk(2, dim=-1)
    views = {"q": query.view(1, T, H, K), "k": key.view(1, T, H, K), "v": value.view(1, T, HV, V), "a": a, "b": b,
             "A_log": _tensor(raw["A_log"]), "dt_bias": _tensor(raw["dt_bias"])}
    return views, raw


def _reference_tokens(raw: dict, rows: slice, initial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(o [n, HV, V], state after) of one sequence's raw tokens from an initial state [HV, K, V], float64."""
    tokens = {n: raw[n][rows][None] for n in ("q", "k", "v", "a", "b")}
    o, state = reference.recurrent_gated_delta_rule(
        tokens["q"], tokens["k"], tokens["v"], None, None, initial_state=initial[None], output_final_state=True,
        use_qk_l2norm_in_kernel=True, a=tokens["a"], b=tokens["b"], A_log=raw["A_log"], dt_bias=raw["dt_bias"])
    return o[0], state[0]


@pytest.mark.parametrize("state_v_first", [True, False], ids=["vllm-pool-HV-V-K", "fla-pool-HV-K-V"])
def test_prefill_decode_and_speculative_decode_as_vllm_calls_them(state_v_first: bool) -> None:
    from gdn.triton.fla_compat import chunk_gated_delta_rule, fused_sigmoid_gating_delta_rule_update

    torch = BACKENDS["triton"].torch
    rng = np.random.default_rng(0)
    P = 12
    pool_kv = rng.standard_normal((P, HV, K, V)).astype(np.float32)  # the states, as gdn lays them out
    pool = _tensor(pool_kv.transpose(0, 1, 3, 2) if state_v_first else pool_kv)

    def state_of(row: int) -> np.ndarray:
        """Pool row `row` as [HV, K, V], a copy."""
        x = _numpy(pool[row])
        return x.transpose(0, 2, 1) if state_v_first else x

    # prefill two sequences (the second continues a cached state): gather, chunk_gated_delta_rule, scatter back
    device = _device()
    lengths, rows = (5, 3), torch.tensor([4, 9], device=device)
    has_initial = torch.tensor([False, True], device=device)
    views, raw = _layer_inputs(sum(lengths), seed=1)
    g = -views["A_log"].exp() * torch.nn.functional.softplus(views["a"] + views["dt_bias"])  # fused_post_conv_prep
    beta = views["b"].sigmoid()
    initial_state = pool[rows]
    initial_state[~has_initial] = 0
    expected_initial = [np.zeros((HV, K, V)), state_of(9)]
    cu = torch.tensor([0, 5, 8], dtype=torch.int32, device=device)
    o, last_state = chunk_gated_delta_rule(
        q=views["q"], k=views["k"], v=views["v"], g=g[None], beta=beta[None], initial_state=initial_state,
        output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True, state_v_first=state_v_first)
    pool[rows] = last_state
    for n, (start, end) in enumerate([(0, 5), (5, 8)]):
        ref_o, ref_state = _reference_tokens(raw, slice(start, end), expected_initial[n])
        # the chunked forward's float32 tolerance (tf32x3 dots on a GPU)
        assert_close(_numpy(o[0, start:end]), ref_o, spec.FORWARD_OP, "float32", f"prefill o of sequence {n}")
        assert_close(state_of(int(rows[n])), ref_state, spec.FORWARD_OP, "float32", f"prefill state of sequence {n}")

    # decode: one token for each, plus a padded slot; the pool updated in place
    before = {row: state_of(row) for row in range(P)}
    views, raw = _layer_inputs(3, seed=2)
    indices = torch.tensor([4, PAD_SLOT_ID, 9], dtype=torch.int32, device=device)
    o, out = fused_sigmoid_gating_delta_rule_update(
        A_log=views["A_log"], a=views["a"], b=views["b"], dt_bias=views["dt_bias"], q=views["q"], k=views["k"],
        v=views["v"], initial_state=pool, inplace_final_state=True,
        cu_seqlens=torch.arange(4, dtype=torch.int32, device=device),
        ssm_state_indices=indices, use_qk_l2norm_in_kernel=True, state_v_first=state_v_first)
    assert out is pool and o.shape == (1, 3, HV, V) and not o[0, 1].any()
    for n, row in ((0, 4), (2, 9)):
        ref_o, ref_state = _reference_tokens(raw, slice(n, n + 1), before[row])
        assert_close(_numpy(o[0, n]), ref_o[0], spec.DECODE_OP, "float32", f"decode o of sequence {n}")
        assert_state_close(state_of(row), ref_state, f"decode state of row {row}")
    assert all(np.array_equal(state_of(row), before[row]) for row in range(P) if row not in (4, 9))

    # a speculative step of 3 tokens for sequence 0 (slots 4, 0, 1), 2 for sequence 1 (slots 9, 2, −1), then the
    # next step continuing from the accepted ones: 2 of sequence 0's, 1 of sequence 1's
    before = {row: state_of(row) for row in range(P)}
    spec_indices = torch.tensor([[4, 0, 1], [9, 2, PAD_SLOT_ID]], dtype=torch.int32, device=device)
    views, raw = _layer_inputs(5, seed=3)
    accepted = torch.tensor([1, 1], dtype=torch.int32, device=device)  # the last step's single tokens: column 0
    o, _ = fused_sigmoid_gating_delta_rule_update(
        A_log=views["A_log"], a=views["a"], b=views["b"], dt_bias=views["dt_bias"], q=views["q"], k=views["k"],
        v=views["v"], initial_state=pool, inplace_final_state=True,
        cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32, device=device), ssm_state_indices=spec_indices,
        num_accepted_tokens=accepted, use_qk_l2norm_in_kernel=True,
        state_v_first=state_v_first)
    spec_raw = raw
    for n, (start, end, read) in enumerate([(0, 3, 4), (3, 5, 9)]):
        ref_o, _ = _reference_tokens(raw, slice(start, end), before[read])
        assert_close(_numpy(o[0, start:end]), ref_o, spec.DECODE_OP, "float32", f"speculative o of sequence {n}")
    views, raw = _layer_inputs(2, seed=4)
    accepted = torch.tensor([2, 1], dtype=torch.int32, device=device)
    o, _ = fused_sigmoid_gating_delta_rule_update(
        A_log=views["A_log"], a=views["a"], b=views["b"], dt_bias=views["dt_bias"], q=views["q"], k=views["k"],
        v=views["v"], initial_state=pool, inplace_final_state=True,
        cu_seqlens=torch.arange(3, dtype=torch.int32, device=device),
        ssm_state_indices=spec_indices, num_accepted_tokens=accepted, use_qk_l2norm_in_kernel=True,
        state_v_first=state_v_first)
    for n, (start, j, read) in enumerate([(0, 2, 4), (3, 1, 9)]):
        kept = {name: np.concatenate([spec_raw[name][start:start + j], raw[name][n:n + 1]])
                for name in ("q", "k", "v", "a", "b")}
        ref_o, ref_state = _reference_tokens({**kept, "A_log": raw["A_log"], "dt_bias": raw["dt_bias"]},
                                             slice(None), before[read])
        assert_close(_numpy(o[0, n]), ref_o[-1], spec.DECODE_OP, "float32", f"sequence {n} after {j} accepted tokens")
        assert_state_close(state_of(int(spec_indices[n, 0])), ref_state, f"sequence {n}: slot 0 after the step")


def test_fused_recurrent_dense_fla_conventions() -> None:
    """FLA's dense layout [B, T, ...]: the initial states [B, ...] updated in place (inplace_final_state), or the
    state after every token returned in a new [B·T, HV, K, V] tensor (initial states untouched)."""
    from gdn.triton.fla_compat import fused_recurrent_gated_delta_rule

    B, T = 2, 3
    raw = random_decode_inputs(B * T, H, HV, K, V, "float32", seed=5)
    initial = np.random.default_rng(6).standard_normal((B, HV, K, V)).astype(np.float32)
    t = {n: _tensor(raw[n].reshape((B, T) + raw[n].shape[1:])) for n in ("q", "k", "v", "g", "beta")}
    ref_o, ref_state = reference.recurrent_gated_delta_rule(
        *(raw[n].reshape((B, T) + raw[n].shape[1:]) for n in ("q", "k", "v", "g", "beta")), initial_state=initial,
        output_final_state=True)
    states = _tensor(initial)
    o, per_token = fused_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=states,
                                                    inplace_final_state=False)
    assert_close(_numpy(o), ref_o, spec.DECODE_OP, "float32")
    assert per_token.shape == (B * T, HV, K, V) and np.array_equal(_numpy(states), initial)
    assert_state_close(_numpy(per_token)[[T - 1, 2 * T - 1]], ref_state, "the state after each sequence's last token")
    o, out = fused_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=states)
    assert out is states
    assert_close(_numpy(o), ref_o, spec.DECODE_OP, "float32")
    assert_state_close(_numpy(states), ref_state)


def test_unsupported_fla_arguments_are_refused() -> None:
    torch = BACKENDS["triton"].torch
    from gdn.triton.fla_compat import (
        chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule,
        fused_sigmoid_gating_delta_rule_update,
    )

    q, v = torch.zeros(2, 1, H, K, device=_device()), torch.zeros(2, 1, HV, V, device=_device())
    g = torch.zeros(2, 1, HV, device=_device())
    with pytest.raises(ValueError, match=r"^fla_compat: head_first: expected False"):
        chunk_gated_delta_rule(q, q, v, g, g, head_first=True)
    with pytest.raises(ValueError, match=r"^fla_compat: beta: expected \[B, T, HV\] \(a headwise beta"):
        fused_recurrent_gated_delta_rule(q, q, v, g, torch.zeros(2, 1, HV, V))
    with pytest.raises(ValueError, match=r"^fla_compat: q: expected B = 1 when cu_seqlens is given"):
        fused_recurrent_gated_delta_rule(q, q, v, g, g, cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32,
                                                                                 device=_device()))
    with pytest.raises(ValueError, match=r"^fla_compat: is_kda: expected False"):
        fused_sigmoid_gating_delta_rule_update(g[0, 0], g[0], g[0], g[0, 0], q, q, v, is_kda=True)
