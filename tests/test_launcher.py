"""gdn.triton.launcher: the fast path only on the Triton releases it was verified on; a launch through the compiled
kernel selects exactly the variant Triton would and gives the same bits; anything Triton specializes differently
(alignment, int properties, dtypes) takes Triton's path; the launch plans are cached until reset_plans()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

from gdn.common import example, tilings
from gdn.triton import launcher


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


def test_variant_matches_only_what_its_first_launch_was_specialized_for() -> None:
    """A recorded variant is reused only for the same tensor dtypes at 16-byte aligned addresses, the same None
    arguments and ints, and a float where a float was: anything else goes back through Triton."""
    from gdn.triton.launcher import _Variant

    x = torch.zeros(64, dtype=torch.float16)
    y = torch.zeros(64, dtype=torch.float32)
    variant = _Variant.record(_FakeCompiled(_FakeLauncher()), (), (x, y, None, 0.5, 512))
    assert variant.matches((x.clone(), y.clone(), None, 0.25, 512))  # other tensors, another float value
    assert not variant.matches((x[1:], y, None, 0.5, 512))  # unaligned
    assert not variant.matches((y, y, None, 0.5, 512))  # another dtype
    assert not variant.matches((x, y, y, 0.5, 512))  # a tensor where None was
    assert not variant.matches((x, None, None, 0.5, 512))  # None where a tensor was
    assert not variant.matches((x, y, None, 1, 512))  # an int where a float was
    assert not variant.matches((x, y, None, 0.5, 513)) and not variant.matches((x, y, None, 0.5, 512.0))
    assert _Variant.record(None, (), (x[1:], y, None, 0.5, 512)) is None  # nothing recorded for unaligned
    assert _Variant.record(None, (), (x, y, None, 0.5, 2**31)) is None  # nor for an int64


class _FakeLauncher:
    """Stands for Triton 3.6's CudaLauncher: its C launch function (counting its calls) and the scratch sizes it
    allocates."""

    launch_cooperative_grid = launch_pdl = False

    def __init__(self, global_scratch_size: int = 0, profile_scratch_size: int = 0) -> None:
        self.global_scratch_size, self.profile_scratch_size = global_scratch_size, profile_scratch_size
        self.launches = 0

    def launch(self, *args) -> None:
        self.launches += 1

    def __call__(self, *args) -> None:
        pass


class _FakeCompiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self, launcher: _FakeLauncher) -> None:
        self.run = launcher


def test_c_launch_function_only_without_scratch() -> None:
    """A recorded variant launches through CudaLauncher's C function (skipping its Python scratch allocation)
    only when the variant needs no scratch memory; otherwise through CompiledKernel.run."""
    plain, scratch = _FakeCompiled(_FakeLauncher()), _FakeCompiled(_FakeLauncher(global_scratch_size=8))
    function, head = launcher._launch_call(plain)
    assert function == plain.run.launch
    assert head == ("function", False, False, None, None, "metadata", None, None, None)
    assert launcher._launch_call(scratch) == (scratch.run, ("function", "metadata", None, None, None))


@pytest.mark.parametrize("version, verified", [("3.6.0", True), ("3.6.1+git1234", True), ("3.5.1", False),
                                               ("3.7.0", False), ("3.9.0", False), ("4.0.0", False),
                                               ("main", False)])
def test_fast_path_only_on_verified_triton_releases(monkeypatch: pytest.MonkeyPatch, version: str,
                                                    verified: bool) -> None:
    """On a release in VERIFIED_TRITON a KernelLaunch goes through Triton once, then through the recorded
    variant's C launcher; on any other release every launch goes through Triton's kernel[grid](...)."""
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(launcher, "driver", _FakeDriver())
    assert launcher.fast_launch_supported(version) is verified
    c_launcher = _FakeLauncher()
    kernel = _RecordingKernel(_FakeCompiled(c_launcher))
    run = launcher.KernelLaunch(kernel, (4,), tilings.Tiling(16, 16, 4, 1), fixed_signature=True, BLOCK=16)
    x = torch.zeros(64)
    for _ in range(3):
        run(x, 7)
    assert kernel.triton_launches == (1 if verified else 3)
    assert c_launcher.launches == (2 if verified else 0)


class _FakeDriver:
    """Stands for triton.runtime.driver.driver on a machine without a GPU: device 0, stream 0."""

    class active:
        @staticmethod
        def get_current_device() -> int:
            return 0

        @staticmethod
        def get_current_stream(device: int) -> int:
            return 0


class _RecordingKernel(JITFunction):
    """A JITFunction (x, n, BLOCK: constexpr) whose Triton launch returns a fake compiled variant and counts."""

    def __init__(self, compiled: _FakeCompiled) -> None:  # no source to parse: only what KernelLaunch reads
        self.compiled, self.triton_launches = compiled, 0
        self.pre_run_hooks, self.arg_names = [], ["x", "n", "BLOCK"]

    def __getitem__(self, grid: tuple):
        def launch(*args, **kwargs):
            self.triton_launches += 1
            return self.compiled
        return launch


def test_reset_plans_drops_the_cached_plans() -> None:
    """A repeated call signature finds its plan (the same KernelLaunch); after gdn.triton.reset_plans() it gets a
    new one."""
    from gdn.triton import chunk_o, reset_plans

    inputs = _inputs(torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    first = chunk_o.call_plan(*inputs)[1]
    assert chunk_o.call_plan(*inputs)[1] is first
    reset_plans()
    assert chunk_o.call_plan(*inputs)[1] is not first


def _inputs(dtype: torch.dtype, device: str, misalign: bool = False,
            h_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """chunk_fwd_o's (q, k, v, h, g) at T = 200, H = 2, HV = 4, K = 64, V = 32."""
    a = example.random_inputs(1, 200, 2, 4, 64, 32, "float16", True, None, seed=3)
    t = {n: torch.from_numpy(a[n]).to(device) for n in ("q", "k", "v", "h", "g")}
    q, k, v = (t[n].to(dtype) for n in "qkv")
    h = t["h"].to(h_dtype or dtype)
    if misalign:  # the same values at an address 2 or 4 bytes past a 16-byte boundary (still contiguous)
        buffer = torch.empty(q.numel() + 1, dtype=dtype, device=device)
        buffer[1:].copy_(q.flatten())
        q = buffer[1:].view(q.shape)
        assert q.data_ptr() % 16 != 0
    return q, k, v, h, t["g"]


def _chunk_fwd_o_launch(q, k, v, h, g):
    """The KernelLaunch that chunk_fwd_o(q, k, v, h, g) uses: the cached plan of its call signature."""
    from gdn.triton import chunk_o

    return chunk_o.call_plan(q, k, v, h, g)[1]


def test_interpreted_kernels_are_never_recorded() -> None:
    """Under TRITON_INTERPRET (the CPU test run) every launch goes through Triton's interpreter."""
    import triton.runtime.jit

    from gdn.triton import chunk_fwd_o, chunk_o

    if isinstance(chunk_o.chunk_fwd_o_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("compiled kernels (GPU run): see the GPU tests below")
    inputs = _inputs(torch.float32, "cpu")
    chunk_fwd_o(*inputs)
    assert not _chunk_fwd_o_launch(*inputs)._variants


def _pinned_to_triton_launch(kernels, fn):
    """fn() with a no-op pre-run hook on each of kernels: a KernelLaunch then takes Triton's own path."""
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
    from gdn.triton import chunk_fwd_o, chunk_o

    inputs = _inputs(dtype, "cuda")
    via_triton = _pinned_to_triton_launch((chunk_o.chunk_fwd_o_kernel,), lambda: chunk_fwd_o(*inputs))
    first = chunk_fwd_o(*inputs)  # records the variant (the hooked call went through Triton alone)
    assert _chunk_fwd_o_launch(*inputs)._variants
    direct = chunk_fwd_o(*inputs)
    assert torch.equal(direct, via_triton) and torch.equal(first, via_triton)


@pytest.mark.gpu
def test_unaligned_tensor_takes_triton_path() -> None:
    """chunk_fwd_o's call signature with an unaligned q: its plan's launch (fixed signature) goes through
    Triton, gives Triton's bits and keeps the variant the aligned call recorded."""
    from gdn.triton import chunk_fwd_o, chunk_o

    aligned = _inputs(torch.float16, "cuda")
    chunk_fwd_o(*aligned)
    run = _chunk_fwd_o_launch(*aligned)
    recorded = dict(run._variants)
    unaligned = _inputs(torch.float16, "cuda", misalign=True)
    assert recorded and _chunk_fwd_o_launch(*unaligned) is run
    via_triton = _pinned_to_triton_launch((chunk_o.chunk_fwd_o_kernel,), lambda: chunk_fwd_o(*unaligned))
    assert torch.equal(chunk_fwd_o(*unaligned), via_triton) and torch.equal(chunk_fwd_o(*unaligned), via_triton)
    assert run._variants == recorded


@pytest.mark.gpu
def test_shared_launch_matches_each_call_in_full() -> None:
    """chunk_o.launch's KernelLaunch is shared by every call with one problem and tiling, and the problem does
    not fix h's dtype: a launch with h in float32 after one with h in float16 goes through Triton and gives
    Triton's bits."""
    from gdn.triton import chunk_o

    outputs = []
    for h_dtype in (torch.float16, torch.float32, torch.float32):
        q, k, v, h, g = _inputs(torch.float16, "cuda", h_dtype=h_dtype)
        problem = chunk_o.call_plan(q, k, v, h, g)[0]
        o = torch.empty_like(v)
        chunk_o.launch(problem, problem.tiling, q, k, v, h, g, o, 0.125, None, None)
        outputs.append(o)
    run = chunk_o.shared_launch(problem, problem.tiling)
    assert [variant.tensors[3] for variant in run._variants.values()] == [(3, torch.float16)]  # h at the first
    expected = _pinned_to_triton_launch((chunk_o.chunk_fwd_o_kernel,),
                                        lambda: chunk_o.chunk_fwd_o(q, k, v, h, g, scale=0.125))
    assert torch.equal(outputs[1], expected) and torch.equal(outputs[2], expected)


@pytest.mark.gpu
def test_forward_and_decode_direct_launches_are_bit_equal() -> None:
    """The forward's three kernels and decode_step: a repeated call (direct launches) gives the same bits as
    the first one, and as calls with Triton's launcher."""
    from gdn.triton import chunk_gated_delta_rule, chunk_o, decode, decode_step, forward

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

    for call, kernels in ((forward_call, (forward.chunk_prepare_kernel, forward.chunk_walk_kernel,
                                          forward.chunk_combine_kernel, chunk_o.chunk_fwd_o_kernel)),
                          (decode_call, (decode.decode_step_kernel,))):
        via_triton = _pinned_to_triton_launch(kernels, call)
        runs = [call() for _ in range(3)]
        for run in runs:
            for x, ref in zip(run, via_triton):
                assert torch.equal(x, ref)
