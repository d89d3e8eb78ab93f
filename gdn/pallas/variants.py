"""How many programs of gdn's Pallas ops this process has compiled: what the warmups are judged by."""

from __future__ import annotations

from gdn.pallas import chunk_o, decode, forward


def compiled_variants() -> int:
    """Number of programs compiled for chunk_fwd_o (its Pallas lowerings and triton_call), chunk_gated_delta_rule
    and decode_step called outside a caller's jax.jit (entries of their jit caches: one per input shape, dtype and
    flag combination)."""
    return sum(fn._cache_size() for fn in (chunk_o.jitted_chunk_fwd_o, chunk_o.jitted_triton_call,
                                           forward.jitted_chunk_gated_delta_rule,
                                           forward.jitted_chunk_gated_delta_rule_pool, decode.jitted_decode_step,
                                           decode.jitted_decode_step_pool))
