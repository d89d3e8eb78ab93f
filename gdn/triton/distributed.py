"""chunk_gated_delta_rule over a torch.distributed process group: context parallel, one sequence split over ranks.

Each rank holds a contiguous slice of one dense sequence (B = 1, any length), the slices in the group's rank
order. The state crosses the ranks as the affine maps S_out = M·S_in + N of gdn.common.spec (pieces of a
sequence), one piece per rank. Every rank:
  1. prepares its slice (g_c, w, u) and walks the map [M | N] of the whole slice (forward.piece_maps, one piece);
  2. on rank 0 only, folds the initial state S_0 into its map: it sends N_0 + M_0·S_0 (the combine over two
     pieces), so the state never leaves rank 0 and every rank combines from zero;
  3. all-gathers [M | N]: HV·K·(K + V) float32 per rank, one collective (NCCL on GPUs, gloo on CPUs);
  4. combines the gathered maps in rank order (forward.combine over world_size + 1 pieces): every rank's start
     and, after the last map, the final state — the same kernel on the same bits on every rank, so the final
     state is identical everywhere;
  5. walks its slice from its own start and computes o (forward.forward_after_prepare; in pieces within the
     GPU when tilings.context_pieces says so).
The exchange is one all-gather rather than a chain of point-to-point sends: its latency is one collective
whatever the rank count, and every rank gets every start and the final state without another collective.
A rank's chunks start at its slice's first token and its last chunk may be partial: exact, since a map is that
of its slice's tokens however they are chunked. Only collectives live here; the kernels are gdn.triton.forward's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from gdn.common import forward_contract, spec
from gdn.triton import forward

ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch.distributed's all-gather into one tensor: all_gather_single from torch 2.13 on, which deprecates the
same collective's older name all_gather_into_tensor."""


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's x [rows, ...] stacked in the group's rank order: [world_size·rows, ...]."""
    gathered = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    ALL_GATHER(gathered, x.contiguous(), group=group)
    return gathered


def exchange(problem: forward_contract.ForwardProblem, map_m: torch.Tensor, map_n: torch.Tensor,
             initial_state: torch.Tensor | None, group: dist.ProcessGroup) -> torch.Tensor:
    """Steps 2–4: every rank's start and the final state, [world_size + 1, HV, K, V] float32 in rank order, from
    this rank's map of its slice (map_m [1, HV, K, K], map_n [1, HV, K, V]); initial_state read on rank 0 only."""
    if dist.get_rank(group) == 0 and initial_state is not None:  # [S_0, M_0·S_0 + N_0]: the state after slice 0
        map_n = forward.combine(problem, map_m, map_n, initial_state, 2)[1:]
    maps = all_gather(torch.cat([map_m, map_n], dim=-1), group)  # [world_size, HV, K, K + V]
    K = problem.K
    return forward.combine(problem, maps[..., :K].contiguous(), maps[..., K:].contiguous(), None, maps.shape[0] + 1)


def context_parallel_forward(problem: forward_contract.ForwardProblem, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
                             initial_state: torch.Tensor | None, group: dist.ProcessGroup,
                             pieces: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o [1, T, HV, V] of this rank's slice, the whole sequence's final state [1, HV, K, V] float32 or None) for
    a problem validated on this rank's slice; initial_state is read on the group's rank 0 only. pieces: the
    in-GPU pieces of the local walk."""
    forward_contract.check_context_parallel(problem, "group")
    if torch.is_grad_enabled():
        for name, x in zip(("q", "k", "v", "g", "beta", "initial_state"), (q, k, v, g, beta, initial_state)):
            if x is not None and x.requires_grad:
                raise ValueError(f"{spec.FORWARD_OP}: {name}: expected no grad with group (the context-parallel "
                                 "forward has no backward; call it under torch.no_grad()); got requires_grad=True")
    local = dataclasses.replace(problem, output_final_state=False)  # the final state comes from the combine
    g_cum, w, u = forward.prepare(local, k, v, g, beta, None, None)
    map_m, map_n = forward.piece_maps(local, k, w, u, g_cum, None, 1, 1)
    starts = exchange(local, map_m, map_n, initial_state, group)
    rank, world_size = dist.get_rank(group), starts.shape[0] - 1
    start = initial_state if rank == 0 else starts[rank:rank + 1]
    o, _ = forward.forward_after_prepare(local, q, k, v, g_cum, w, u, scale, start, None, None, pieces)
    return o, starts[world_size:] if problem.output_final_state else None
