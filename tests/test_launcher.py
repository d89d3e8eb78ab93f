"""gdn.triton.launcher: a launch through the compiled kernel selects exactly the variant Triton would, and gives
the same bits; anything Triton specializes differently (alignment, int properties, dtypes) takes Triton's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gdn.common import example


def test_argument_key_separates_what_triton_specializes_on() -> None:
    from gdn.triton.launcher import _argument_key

    storage = torch.zeros(64, dtype=torch.float16)
    assert _argument_key(storage) == torch.float16  # a fresh allocation is 16-byte aligned
    assert _argument_key(storage[1:]) is False  # 2 bytes off: Triton compiles another variant; not cached
    assert _argument_key(storage.to(torch.float32)) == torch.float32
    assert _argument_key(None) is type(None)
    assert _argument_key(0.5) is float
    keys = {T: _argument_key(T) for T in (1, 16, 17, 32, 2**31 - 1)}
    assert keys[1] != keys[16] != keys[17] and keys[16] == keys[32]  # value 1, divisibility by 16
    assert _argument_key(2**31) is False and _argument_key(-(2**31) - 1) is False  # int64: Triton's path
    assert _argument_key(True) is False and _argument_key("x") is False


def test_interpreted_kernels_are_never_cached() -> None:
    """Under TRITON_INTERPRET (the CPU test run) every launch goes through Triton's interpreter."""
    import triton.runtime.jit

    from gdn.triton import chunk_o, launcher

    if isinstance(chunk_o.chunk_fwd_o_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("compiled kernels (GPU run): see the GPU tests below")
    _chunk_fwd_o(torch.float32, "cpu")
    assert not launcher._compiled


def _chunk_fwd_o(dtype: torch.dtype, device: str, misalign: bool = False) -> torch.Tensor:
    from gdn.triton import chunk_fwd_o

    a = example.random_inputs(1, 200, 2, 4, 64, 32, "float16", True, None, seed=3)
    t = {n: torch.from_numpy(a[n]).to(device) for n in ("q", "k", "v", "h", "g")}
    q, k, v, h = (t[n].to(dtype) for n in "qkvh")
    if misalign:  # the same values at an address 2 or 4 bytes past a 16-byte boundary (still contiguous)
        buffer = torch.empty(q.numel() + 1, dtype=dtype, device=device)
        buffer[1:].copy_(q.flatten())
        q = buffer[1:].view(q.shape)
        assert q.data_ptr() % 16 != 0
    return chunk_fwd_o(q, k, v, h, t["g"])


def _pinned_to_triton_launch(kernels, fn):
    """fn() with a no-op pre-run hook on each of kernels: launch_kernel then takes Triton's own path."""
    hook = lambda *args, **kwargs: None  # noqa: E731
    for kernel in kernels:
        kernel.add_pre_run_hook(hook)
    try:
        return fn()
    finally:
        for kernel in kernels:
            kernel.pre_run_hooks.remove(hook)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_direct_launch_is_bit_equal_to_triton_launch(dtype: torch.dtype) -> None:
    from gdn.triton import chunk_o, launcher

    via_triton = _pinned_to_triton_launch((chunk_o.chunk_fwd_o_kernel,), lambda: _chunk_fwd_o(dtype, "cuda"))
    first = _chunk_fwd_o(dtype, "cuda")  # compiled already (the hooked call): cached now, or launched direct
    cached = sum(key[0] is chunk_o.chunk_fwd_o_kernel for key in launcher._compiled)
    direct = _chunk_fwd_o(dtype, "cuda")
    assert cached >= 1
    assert torch.equal(direct, via_triton) and torch.equal(first, via_triton)


@pytest.mark.gpu
def test_unaligned_tensor_takes_triton_path() -> None:
    from gdn.triton import launcher

    aligned = _chunk_fwd_o(torch.float16, "cuda")
    before = dict(launcher._compiled)
    unaligned = _chunk_fwd_o(torch.float16, "cuda", misalign=True)
    unaligned_again = _chunk_fwd_o(torch.float16, "cuda", misalign=True)
    assert launcher._compiled == before  # nothing cached for the unaligned specialization
    assert torch.equal(unaligned, aligned) and torch.equal(unaligned_again, aligned)


@pytest.mark.gpu
def test_forward_and_decode_direct_launches_are_bit_equal() -> None:
    """The forward's three kernels and decode_step: a repeated call (direct launches) gives the same bits as
    the first one, and as calls with Triton's launcher."""
    from gdn.triton import chunk_gated_delta_rule, chunk_o, decode_step, forward, recurrent

    a = {n: torch.from_numpy(x).cuda() for n, x in
         example.random_recurrent_inputs(2, 130, 2, 4, 64, 32, "bfloat16", seed=5).items()}
    q, k, v = (a[n].to(torch.bfloat16) for n in "qkv")
    cu_seqlens = torch.tensor(np.array([0, 100, 260], np.int32), device="cuda")

    def forward_call():
        flat = [x.flatten(0, 1)[None] for x in (q, k, v, a["g"], a["beta"])]
        return chunk_gated_delta_rule(*flat, initial_state=a["initial_state"], output_final_state=True,
                                      cu_seqlens=cu_seqlens)

    def decode_call():
        first = [x[:, 0].contiguous() for x in (q, k, v, a["g"], a["beta"])]
        return decode_step(*first, a["initial_state"])

    for call, kernels in ((forward_call, (forward.chunk_prepare_kernel, forward.chunk_states_kernel,
                                          chunk_o.chunk_fwd_o_kernel)),
                          (decode_call, (recurrent.decode_step_kernel,))):
        via_triton = _pinned_to_triton_launch(kernels, call)
        runs = [call() for _ in range(3)]
        for run in runs:
            for x, ref in zip(run, via_triton):
                assert torch.equal(x, ref)
