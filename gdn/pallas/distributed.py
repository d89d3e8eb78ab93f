"""chunk_gated_delta_rule inside jax.shard_map: context parallel, one sequence split over a mesh axis.

Each device of the axis holds a contiguous slice of one dense sequence (B = 1; shard_map splits it evenly, of
any length), the slices in the axis's order; initial_state is replicated. The state crosses the devices as the
affine maps S_out = M·S_in + N of gdn.common.spec (pieces of a sequence), one piece per device. Every device:
  1. prepares its slice (g_c, w, u) and walks the map [M | N] of the whole slice (forward.piece_maps, one piece);
  2. all-gathers [M | N] over the axis: HV·K·(K + V) float32 per device, one jax.lax.all_gather;
  3. combines the gathered maps in axis order from the initial state (forward.combine over axis size + 1
     pieces): every device's start and, after the last map, the final state — the same kernel on the same bits
     on every device, so the final state is replicated (out_specs=P() holds for it);
  4. walks its slice from its own start and computes o (forward.forward_after_prepare; in pieces within the
     GPU when tilings.context_pieces says so).
As gdn.triton.distributed, whose initial state lives on rank 0 only (there rank 0 folds it into its map);
the same reasons for one all-gather rather than a ppermute chain (one collective's latency whatever the axis
size; every start and the final state on every device without another collective) and the same exactness of
chunks counted from each slice's first token. Only collectives live here; the kernels are gdn.pallas.forward's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gdn.common import forward_contract
from gdn.pallas import forward


def exchange(problem: forward_contract.ForwardProblem, map_m, map_n, initial_state, axis_name: str, *, interpret: bool):
    """Steps 2–3: every device's start and the final state, [axis size + 1, HV, K, V] float32 in axis order, from
    this device's map of its slice (map_m [1, HV, K, K], map_n [1, HV, K, V]) and the replicated initial state."""
    maps = jax.lax.all_gather(jnp.concatenate([map_m, map_n], axis=-1), axis_name, tiled=True)  # [size, HV, K, K + V]
    K = problem.K
    return forward.combine(problem, maps[..., :K], maps[..., K:], initial_state, maps.shape[0] + 1,
                           interpret=interpret)


def context_parallel_forward(q, k, v, g, beta, scale, initial_state, *, problem: forward_contract.ForwardProblem,
                             axis_name: str, pieces: int, interpret: bool):
    """(o [1, T, HV, V] of this device's slice, the whole sequence's final state [1, HV, K, V] float32 or None)
    for a problem validated on this device's slice, traced (under jitted_chunk_gated_delta_rule) inside
    jax.shard_map over axis_name. pieces: the in-GPU pieces of the local walk."""
    local = dataclasses.replace(problem, output_final_state=False)  # the final state comes from the combine
    g_cum, w, u = forward.prepare(local, k, v, g, beta, None, None, interpret=interpret)
    map_m, map_n = forward.piece_maps(local, k, w, u, g_cum, None, 1, 1, interpret=interpret)
    starts = exchange(local, map_m, map_n, initial_state, axis_name, interpret=interpret)
    axis_size = starts.shape[0] - 1
    start = jax.lax.dynamic_slice_in_dim(starts, jax.lax.axis_index(axis_name), 1)
    o, _ = forward.forward_after_prepare(local, q, k, v, g_cum, w, u, scale, start, None, None, pieces,
                                         interpret=interpret)
    return o, starts[axis_size:] if problem.output_final_state else None
