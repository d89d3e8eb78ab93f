"""What each process of tests/test_distributed.py runs: the context-parallel forward on its slices, results saved
as .npz for the test to compare with the single-device forward.

    python -m tests.distributed_ranks torch BACKEND RANK WORLD_SIZE DIR   # one torch.distributed rank
    python -m tests.distributed_ranks jax DIR                             # every device of one JAX process

The launcher sets the environment before this module imports triton or jax: TRITON_INTERPRET=1 for gloo on CPU,
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=4 for JAX on 4 CPU devices.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from tests.cases import ForwardCase, OpInputs, seed_of

PER_TOKEN = ("q", "k", "v", "g", "beta")


@dataclasses.dataclass(frozen=True)
class SplitCase:
    """One context-parallel call: a ForwardCase's single sequence cut into slices of these lengths, one per
    rank (or device) in order. group_ranks: the global ranks of a torch subgroup (None: the whole world);
    others_state: the ranks after the first pass an initial state of their own (to be ignored)."""

    case: ForwardCase
    lengths: tuple[int, ...]
    dtype: str = "float32"
    group_ranks: tuple[int, ...] | None = None
    others_state: bool = True

    @property
    def id(self) -> str:
        group = "" if self.group_ranks is None else f"-group{list(self.group_ranks)}".replace(" ", "")
        return f"{self.case.id}-{self.dtype}-split{list(self.lengths)}{group}".replace(" ", "")

    def inputs(self) -> OpInputs:
        return self.case.inputs(self.dtype, seed=seed_of(self.id))

    def slice_inputs(self, index: int) -> OpInputs:
        """The inputs of slice index: its tokens; the initial state on the first slice only, unless
        others_state (then a different random state of the same shape, to be ignored)."""
        full = self.inputs()
        bounds = np.cumsum((0,) + self.lengths)
        tokens = {n: full.arrays[n][:, bounds[index]:bounds[index + 1]] for n in PER_TOKEN}
        state = full.arrays["initial_state"] if index == 0 else None
        if index > 0 and self.others_state:
            state = (100 * np.random.default_rng(index).standard_normal(full.arrays["q"].shape[:1] + (
                self.case.HV, self.case.K, self.case.V))).astype(np.float32)
        return full.replace(**tokens, initial_state=state)


# T = 2·64 + 37 over 2 ranks and unevenly over 3, a 1-token and an empty slice included; a subgroup of the
# second and third of 3 ranks (group ranks differ from global ranks); with and without an initial state
# (without: the other ranks' states are ignored all the same).
TORCH_SPLITS: dict[int, list[SplitCase]] = {
    2: [
        SplitCase(ForwardCase(165, 1, 2, 32, 32), (100, 65)),
        SplitCase(ForwardCase(165, 1, 2, 32, 32, initial_state=False), (37, 128), "float16", others_state=False),
    ],
    3: [
        SplitCase(ForwardCase(165, 1, 2, 32, 32), (70, 1, 94)),
        SplitCase(ForwardCase(165, 1, 2, 32, 32, initial_state=False), (100, 0, 65)),
        SplitCase(ForwardCase(165, 1, 2, 32, 32), (101, 64), group_ranks=(1, 2)),
    ],
}

# Model-sized heads over NCCL (GPU test): a slice that is no multiple of CHUNK_SIZE, bf16.
NCCL_SPLITS: dict[int, list[SplitCase]] = {
    2: [SplitCase(ForwardCase(8192 + 37, 2, 8, 128, 128), (4096 + 100, 4096 - 63), "bfloat16")],
}

# JAX: the sequence axis sharded evenly over the first len(lengths) devices of one 1-D mesh axis; the shapes
# of tests/test_forward.py's context-parallel cases, so the single-device forward compiles once per pytest process.
JAX_SPLITS: list[SplitCase] = [
    SplitCase(ForwardCase(200, 1, 2, 32, 32), (50, 50, 50, 50)),
    SplitCase(ForwardCase(200, 1, 2, 32, 32, initial_state=False), (100, 100)),
]


def result_path(directory: Path, split: SplitCase, rank: int | None = None) -> Path:
    return Path(directory) / (split.id + ("" if rank is None else f"-rank{rank}") + ".npz")


def torch_rank(backend: str, rank: int, world_size: int, directory: Path) -> None:
    """One torch.distributed rank (gloo on CPU, NCCL on GPU rank): every split of its world size."""
    import torch
    import torch.distributed as dist

    from gdn.triton import chunk_gated_delta_rule

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{Path(directory).resolve()}/rendezvous", rank=rank,
                            world_size=world_size)
    splits = (NCCL_SPLITS if backend == "nccl" else TORCH_SPLITS)[world_size]
    for split in splits:
        members = split.group_ranks or tuple(range(world_size))
        group = dist.new_group(list(members)) if split.group_ranks else dist.group.WORLD  # every rank calls new_group
        if rank not in members:
            continue
        inputs = split.slice_inputs(dist.get_rank(group))
        a = {n: None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(
            device=device, dtype=getattr(torch, inputs.dtypes[n])) for n, x in inputs.arrays.items()}
        o, state = chunk_gated_delta_rule(*(a[n] for n in PER_TOKEN), initial_state=a["initial_state"],
                                          output_final_state=True, group=group)
        np.savez(result_path(directory, split, dist.get_rank(group)), o=o.float().cpu().numpy(),
                 state=state.cpu().numpy())
    dist.destroy_process_group()


def jax_devices(directory: Path) -> None:
    """One JAX process: every JAX split inside jax.shard_map over a 1-D mesh of its first devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gdn.pallas import chunk_gated_delta_rule

    for split in JAX_SPLITS:
        mesh = jax.make_mesh((len(split.lengths),), ("seq",), devices=jax.devices()[:len(split.lengths)])

        def local(q, k, v, g, beta, initial_state):
            o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                                              axis_name="seq")
            return o, state, state  # the state once replicated (P()), once stacked from every device

        sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 5 + (P(),),
                                        out_specs=(P(None, "seq"), P(), P("seq")), check_vma=False))
        inputs = split.inputs()
        a = {n: None if x is None else jax.device_put(jnp.asarray(x, inputs.dtypes[n]), NamedSharding(
            mesh, P(None, "seq") if n in PER_TOKEN else P())) for n, x in inputs.arrays.items()}
        o, state, states = sharded(*(a[n] for n in PER_TOKEN), a["initial_state"])
        np.savez(result_path(directory, split), o=np.asarray(o.astype(jnp.float32)), state=np.asarray(state),
                 states=np.asarray(states))


if __name__ == "__main__":
    if sys.argv[1] == "torch":
        torch_rank(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        jax_devices(Path(sys.argv[2]))
