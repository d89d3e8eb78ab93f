"""Beyond one device: the context-parallel forward (torch.distributed over gloo in 2 and 3 processes; jax.shard_map
over 4 emulated CPU devices in a subprocess) against the single-device forward, o and final state, and the head
partition of tensor parallelism (per-shard calls concatenated against the unsharded call)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import triton

from gdn.common import spec
from tests.backends import BACKENDS
from tests.cases import ForwardCase
from tests.distributed_ranks import JAX_SPLITS, NCCL_SPLITS, PER_TOKEN, TORCH_SPLITS, SplitCase, result_path
from tests.helpers import assert_close, release

REPOSITORY = Path(__file__).resolve().parent.parent
LAUNCH_SECONDS = 300


def launch(arguments: list[list[str]], directory: Path, environment: dict[str, str]) -> None:
    """Run python -m tests.distributed_ranks once per argument list, all at once, from the repository root;
    when one fails (or time runs out) stop the others, which would wait for it, and fail with its output."""
    env = {**os.environ, **environment}
    logs = [directory / f"process{i}.log" for i in range(len(arguments))]
    processes = []
    for args, log in zip(arguments, logs):
        with log.open("w") as output:
            processes.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_ranks", *args], cwd=REPOSITORY,
                                              env=env, stdout=output, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + LAUNCH_SECONDS
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode for p in processes):
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    for args, process, log in zip(arguments, processes, logs):
        assert process.returncode == 0, f"{' '.join(args)} exited with {process.returncode}:\n{log.read_text()[-4000:]}"


def check_split(split: SplitCase, o_slices: list[np.ndarray], states: list[np.ndarray],
                expected: tuple[np.ndarray, np.ndarray]) -> None:
    """The slices' o, concatenated, and every rank's final state against the single-device forward; the final
    state the same bits on every rank."""
    o_expected, state_expected = expected
    assert [o.shape[1] for o in o_slices] == list(split.lengths)
    assert_close(np.concatenate(o_slices, axis=1).astype(np.float64), o_expected, spec.FORWARD_OP, split.dtype, "o")
    for state in states:
        assert np.array_equal(state, states[0]), "final state differs between ranks"
    assert_close(states[0].astype(np.float64), state_expected, spec.FORWARD_OP, split.dtype, "final state")


# The Triton interpreter before 3.9 keeps a program id as a 1-element array, and NumPy 2.5 refuses int() of one:
# `for i_t in range(first, end)` on values derived from it raises TypeError (seen with Triton 3.6, NumPy 2.5)
_INTERPRETER_RUNS_KERNEL_LOOPS = not (release(triton.__version__) < (3, 9) and release(np.__version__) >= (2, 5))


@pytest.mark.slow  # CPU processes even on a GPU machine: nothing for a GPU's quick run
@pytest.mark.skipif(not _INTERPRETER_RUNS_KERNEL_LOOPS, reason=f"the Triton {triton.__version__} interpreter "
                    f"cannot run the walk's loop under NumPy {np.__version__} (CI's Triton 3.9 runs this test)")
@pytest.mark.parametrize("world_size", sorted(TORCH_SPLITS))
def test_triton_context_parallel_over_gloo(world_size: int, tmp_path: Path) -> None:
    """world_size gloo processes (interpreted Triton on CPU), each split of TORCH_SPLITS[world_size]: slices of
    any length, initial state on the first rank only, a subgroup."""
    launch([["torch", "gloo", str(rank), str(world_size), str(tmp_path)] for rank in range(world_size)], tmp_path,
           {"TRITON_INTERPRET": "1"})
    triton = BACKENDS["triton"]
    for split in TORCH_SPLITS[world_size]:
        results = [np.load(result_path(tmp_path, split, rank)) for rank in range(len(split.lengths))]
        check_split(split, [r["o"] for r in results], [r["state"] for r in results], triton.forward(split.inputs()))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_triton_context_parallel_over_nccl(tmp_path: Path) -> None:
    """Two NCCL ranks on two GPUs (compiled Triton), bf16 at model-sized heads, against one GPU."""
    launch([["torch", "nccl", str(rank), "2", str(tmp_path)] for rank in range(2)], tmp_path,
           {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    for split in NCCL_SPLITS[2]:
        results = [np.load(result_path(tmp_path, split, rank)) for rank in range(2)]
        check_split(split, [r["o"] for r in results], [r["state"] for r in results],
                    BACKENDS["triton"].forward(split.inputs()))


@pytest.mark.slow  # CPU devices even on a GPU machine: nothing for a GPU's quick run
def test_pallas_context_parallel_in_shard_map(tmp_path: Path) -> None:
    """One JAX process with 4 CPU devices (the Pallas interpreter): every split of JAX_SPLITS inside
    jax.shard_map; the final state with out_specs=P() and, stacked from every device, the same bits."""
    launch([["jax", str(tmp_path)]], tmp_path,
           {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    pallas = BACKENDS["pallas"]
    for split in JAX_SPLITS:
        result = np.load(result_path(tmp_path, split))
        inputs = split.inputs()
        if inputs.arrays["initial_state"] is None:  # a zero state: the same compiled single-device program
            inputs = inputs.replace(initial_state=np.zeros((1, split.case.HV, split.case.K, split.case.V), np.float32))
        bounds = np.cumsum((0,) + split.lengths)
        check_split(split, [result["o"][:, a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                    [state[None] for state in result["states"]], pallas.forward_in_pieces(inputs, 1))
        assert np.array_equal(result["state"], result["states"][:1])


def test_context_parallel_refuses_varlen_batches_and_grad(backend) -> None:
    """A batch (B = 2), varlen arguments or serving arguments with group / axis_name: refused with the argument
    named, before any collective (no process group or mesh needed to see it); torch inputs that require grad
    too."""
    inputs = ForwardCase(70, 1, 2, 16, 16, B=2).inputs("float32")
    varlen = ForwardCase(70, 1, 2, 16, 16, seqlens=(30, 40)).inputs("float32")
    a, b = backend.convert(inputs), backend.convert(varlen)
    if backend.name == "triton":
        from gdn.triton import chunk_gated_delta_rule

        no_group = object()  # never reached: the checks come first
        distributed = {"group": no_group}
    else:
        from gdn.pallas import chunk_gated_delta_rule

        distributed = {"axis_name": "seq"}
    with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: q: expected B = 1 with"):
        chunk_gated_delta_rule(*(a[n] for n in PER_TOKEN), **distributed)
    with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: cu_seqlens: expected None with"):
        chunk_gated_delta_rule(*(b[n] for n in PER_TOKEN), cu_seqlens=b["cu_seqlens"], **distributed)
    with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: (group|axis_name): expected no serving "
                                         r"arguments \(state_indices, raw gates, use_qk_l2norm_in_kernel\) with"):
        chunk_gated_delta_rule(*(a[n][:1] for n in PER_TOKEN), use_qk_l2norm_in_kernel=True, **distributed)
    if backend.name == "triton":
        q = a["q"][:1].clone().requires_grad_()
        with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: q: expected no grad with group"):
            chunk_gated_delta_rule(q, *(a[n][:1] for n in PER_TOKEN[1:]), **distributed)


@pytest.mark.parametrize("H, HV, world_size", [(4, 8, 2), (4, 8, 4), (2, 8, 4), (2, 8, 8), (2, 2, 2), (1, 3, 3)])
def test_head_partition_gives_every_value_head_its_q_k_head(H: int, HV: int, world_size: int) -> None:
    """The value heads tile [0, HV) in rank order, and each rank's value head reads, by the kernels' rule on
    the rank's own head counts, the q/k head it reads in the whole layer."""
    covered = []
    for rank in range(world_size):
        heads, values = spec.head_partition(H, HV, world_size, rank)
        local_H, local_HV = heads.stop - heads.start, values.stop - values.start
        assert local_HV % local_H == 0
        for hv in range(values.start, values.stop):
            assert heads.start + (hv - values.start) // (local_HV // local_H) == hv // (HV // H)
        covered += range(values.start, values.stop)
    assert covered == list(range(HV))


@pytest.mark.parametrize("H, HV, world_size, rank, message", [
    (4, 8, 3, 0, r"world_size: expected a divisor of H = 4"),
    (2, 6, 4, 0, r"world_size: expected a divisor of H = 2, or a multiple of H dividing HV = 6"),
    (4, 8, 2, 2, r"rank: expected 0 <= rank < world_size = 2"),
    (4, 6, 2, 0, r"HV: expected a positive multiple of H = 4"),
])
def test_head_partition_refuses(H: int, HV: int, world_size: int, rank: int, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^head_partition: {message}"):
        spec.head_partition(H, HV, world_size, rank)


@pytest.mark.parametrize("world_size", [2, 4])
def test_head_sharded_forward_equals_unsharded(backend, world_size: int) -> None:
    """Each rank's heads (q, k by q/k head; v, g, beta, initial state by value head) through the forward,
    concatenated along the heads: the unsharded call's o and final state. Over 4 ranks each value head of
    H = 2, HV = 4 reads a q/k head held by two ranks."""
    if backend.name == "pallas" and world_size == 4:
        pytest.skip("the partition is backend-neutral; 4 shards would compile another Pallas program")
    inputs = ForwardCase(200, 2, 4, 32, 32).inputs("float32", seed=31)
    o_full, state_full = backend.forward_in_pieces(inputs, 1)
    o_parts, state_parts = [], []
    for rank in range(world_size):
        heads, values = spec.head_partition(2, 4, world_size, rank)
        a = inputs.arrays
        shard = inputs.replace(q=a["q"][:, :, heads], k=a["k"][:, :, heads], v=a["v"][:, :, values],
                               g=a["g"][:, :, values], beta=a["beta"][:, :, values],
                               initial_state=a["initial_state"][:, values])
        o, state = backend.forward_in_pieces(shard, 1)
        o_parts.append(o)
        state_parts.append(state)
    assert_close(np.concatenate(o_parts, axis=2), o_full, spec.FORWARD_OP, "float32", "o")
    assert_close(np.concatenate(state_parts, axis=1), state_full, spec.FORWARD_OP, "float32", "final state")
