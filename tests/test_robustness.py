"""The edge matrix users hit: extreme gates and magnitudes, poisoned memory, bit-exact invariances,
layout mistakes, grid and index limits. One body per property, parametrized over backends."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import contract, spec
from tests import helpers
from tests.backends import BACKENDS
from tests.cases import Case, OpInputs
from tests.helpers import chunk_o_reference, dtype_params, skip_unsupported


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    helpers.assert_close(out, ref, spec.CHUNK_O_OP, dtype)


_GATE_CASE = Case(T=130, H=2, HV=4, K=48, V=64, seqlens=(70, 60))


def _with_gates(inputs: OpInputs, log_gates: np.ndarray) -> OpInputs:
    from gdn.common.example import chunk_local_cumsum

    return inputs.replace(g=chunk_local_cumsum(log_gates.astype(np.float64), _GATE_CASE.cu_seqlens)
                          .astype(np.float32))


def _gate_patterns() -> dict[str, np.ndarray]:
    shape = (1, _GATE_CASE.T, _GATE_CASE.HV)
    steep = np.full(shape, -200.0 / spec.CHUNK_SIZE)  # cumulative g reaches −200 within a chunk
    alternating = np.zeros(shape)
    alternating[:, 1::2] = -80.0  # neighbours alternate between a gate of 1 and one of e^−80
    return {"cumulative-to-minus-200": steep, "all-zero": np.zeros(shape), "alternating-0-and-80": alternating,
            "one-token-minus-1e4": np.where(np.arange(_GATE_CASE.T)[None, :, None] == 3, -1e4, -0.01) + 0 * steep}


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("pattern", sorted(_gate_patterns()))
def test_extreme_gates(backend, pattern: str, dtype: str) -> None:
    skip_unsupported(backend, dtype)
    inputs = _with_gates(_GATE_CASE.inputs(dtype, seed=5), _gate_patterns()[pattern])
    assert_close(backend.run(inputs), chunk_o_reference(inputs), dtype)


def test_large_magnitudes_fp32(backend) -> None:
    """|q|, |k|, |v| up to 1e2 (and h to 1e2) with float32 inputs: finite and within tolerance."""
    inputs = _GATE_CASE.inputs("float32", seed=6)
    rng = np.random.default_rng(6)
    big = {name: (inputs.arrays[name] * 100.0 / np.abs(inputs.arrays[name]).max()).astype(np.float32)
           for name in ("q", "k", "v", "h")}
    big["g"] = inputs.arrays["g"] * rng.uniform(0.0, 1.0)
    scaled = inputs.replace(**big)
    assert_close(backend.run(scaled), chunk_o_reference(scaled), "float32")


# Bit-exact invariances, each backend on its own.
_SEQUENCE = Case(T=100, H=2, HV=4, K=48, V=32)


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [1, 63, 64, 65, 100])
def test_prefix_invariance(backend, prefix: int) -> None:
    """o of the first t positions == o computed on that prefix alone (same states for the shared chunks)."""
    full = _SEQUENCE.inputs("float32", seed=7)
    a = full.arrays
    alone = full.replace(q=a["q"][:, :prefix], k=a["k"][:, :prefix], v=a["v"][:, :prefix],
                         g=a["g"][:, :prefix], h=a["h"][:, :spec.num_chunks(prefix)])
    assert np.array_equal(backend.run(alone), backend.run(full)[:, :prefix])


def test_batch_invariance(backend) -> None:
    """A sequence's output is the same alone, inside a B = 3 batch, and packed anywhere in a varlen batch."""
    alone = _SEQUENCE.inputs("float16", seed=8)
    others = [Case(T=_SEQUENCE.T, H=2, HV=4, K=48, V=32).inputs("float16", seed=s) for s in (9, 10)]
    reference_bits = backend.run(alone)
    stacked = {n: np.concatenate([others[0].arrays[n], alone.arrays[n], others[1].arrays[n]])
               for n in ("q", "k", "v", "g", "h")}
    assert np.array_equal(backend.run(alone.replace(**stacked))[1:2], reference_bits)
    short = Case(T=37, H=2, HV=4, K=48, V=32).inputs("float16", seed=11).arrays
    for position in range(3):
        parts = [short, short, short]
        parts[position] = alone.arrays
        lengths = [p["q"].shape[1] for p in parts]
        packed = {n: np.concatenate([p[n] for p in parts], axis=1) for n in ("q", "k", "v", "g", "h")}
        cu = np.cumsum([0] + lengths).astype(np.int32)
        out = backend.run(alone.replace(cu_seqlens=cu, **packed))
        assert np.array_equal(out[:, cu[position]:cu[position + 1]], reference_bits), f"position {position}"


def test_repeated_calls_identical(backend) -> None:
    inputs = _GATE_CASE.inputs("float32", seed=12)
    outputs = [backend.run(inputs) for _ in range(3)]
    assert all(np.array_equal(outputs[0], out) for out in outputs[1:])


# The premise of every comparison: an output element that no kernel writes reads NaN, on every machine.
def test_an_unwritten_triton_output_reads_nan(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """chunk_fwd_o with a kernel that writes nothing returns all NaN (conftest.nan_poisoned_outputs), so
    assert_close fails on it."""
    from gdn.triton import chunk_o, reset_plans

    class SilentKernel:
        def __getitem__(self, grid: tuple):
            return lambda *args, **kwargs: None

    reset_plans()  # the cached plans hold the real kernel; the finalizer drops the ones holding the silent one
    request.addfinalizer(reset_plans)
    monkeypatch.setattr(chunk_o, "chunk_fwd_o_kernel", SilentKernel())
    inputs = Case(T=70, H=1, HV=2, K=16, V=16).inputs("float32", seed=19)
    out = BACKENDS["triton"].run(inputs)
    assert np.isnan(out).all()
    with pytest.raises(AssertionError, match="non-finite outputs"):
        assert_close(out, chunk_o_reference(inputs), "float32")


def test_an_unwritten_pallas_interpreter_output_reads_nan() -> None:
    """A Pallas kernel that writes nothing returns all NaN in interpret mode (what gdn.pallas runs off a GPU)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    silent = pl.pallas_call(lambda x, o: None, out_shape=jax.ShapeDtypeStruct((64, 16), jnp.bfloat16),
                            interpret=True)
    assert np.isnan(np.asarray(silent(jnp.zeros((64, 16), jnp.bfloat16)).astype(jnp.float32))).all()


# Triton-only: torch can hand the kernel a view into a larger NaN-poisoned buffer (strided views: test_safety.py).
def _torch_inputs(inputs: OpInputs, tail: int = 0):
    """The Triton adapter's tensors; with ``tail``, q, k, v and g become views of the first T rows of buffers
    that hold ``tail`` more NaN rows (still contiguous for B = 1)."""
    triton_backend = BACKENDS["triton"]
    out = triton_backend.convert(inputs)
    for name in ("q", "k", "v", "g") if tail else ():
        x = out[name]
        buffer = x.new_full((x.shape[0], x.shape[1] + tail) + x.shape[2:], float("nan"))
        buffer[:, :x.shape[1]] = x
        out[name] = buffer[:, :x.shape[1]]
    return out


@pytest.mark.parametrize("case", [Case(T=70, H=2, HV=4, K=48, V=64), Case(T=3, H=1, HV=2, K=16, V=16)],
                         ids=lambda c: c.id)
def test_nan_poisoned_memory_beyond_T_is_never_read(case: Case) -> None:
    from gdn.triton import chunk_fwd_o

    inputs = case.inputs("float32", seed=13)
    t = _torch_inputs(inputs, tail=spec.CHUNK_SIZE)
    assert t["q"].is_contiguous()
    out = chunk_fwd_o(t["q"], t["k"], t["v"], t["h"], t["g"])
    assert_close(out.double().cpu().numpy(), chunk_o_reference(inputs), "float32")


@pytest.mark.gpu
def test_inputs_on_different_devices_are_refused() -> None:
    from gdn.triton import chunk_fwd_o

    t = _torch_inputs(Case(T=70, H=2, HV=2, K=16, V=16).inputs("float32", seed=15))
    with pytest.raises(ValueError, match=r"^chunk_fwd_o: h: expected the device of q \(cuda:0\); got cpu"):
        chunk_fwd_o(t["q"], t["k"], t["v"], t["h"].cpu(), t["g"])


def test_too_many_programs_are_refused_before_launch() -> None:
    """The 1-D grid holds 2³¹ − 1 programs: a larger problem is refused by the contract, with nothing allocated."""
    T = spec.CHUNK_SIZE * (2**31 // 128 + 1)  # chunks × 64 value heads × 2 V tiles (V = 256) > 2³¹ − 1
    info = lambda shape, dtype="bfloat16": contract.ArrayInfo(shape, dtype, "cuda:0")  # noqa: E731
    NT = spec.num_chunks(T)
    with pytest.raises(ValueError, match=r"q: expected at most 2147483647 \(chunk, value head, V tile\) programs"):
        contract.validate_chunk_o_inputs(info((1, T, 64, 128)), info((1, T, 64, 128)), info((1, T, 64, 256)),
                                     info((1, NT, 64, 128, 256)), None, None, None)


@pytest.mark.unpoisoned
def test_offsets_beyond_int32_elements() -> None:
    """v and o with more than 2³¹ elements: the kernel's token-row offsets are int64, so the last chunk of a
    1M-token sequence lands at the right address. The kernel is launched on one chunk, selected through
    chunk_indices (h holds that chunk's state alone; chunk_fwd_o itself refuses such host index arrays, which
    name one chunk of many); the untouched rest of the 4 GiB buffers is never paged in on the CPU."""
    from gdn.triton import chunk_o

    torch = BACKENDS["triton"].torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    C, H, HV, K, V = spec.CHUNK_SIZE, 1, 16, 16, 128
    T = (2**31 // (HV * V) // C + 2) * C  # T·HV·V > 2³¹
    assert T * HV * V > 2**31
    tail = Case(T=C, H=H, HV=HV, K=K, V=V).inputs("float16", seed=16)
    big = {"q": torch.zeros(1, T, H, K, dtype=torch.float16, device=device),
           "v": torch.empty(1, T, HV, V, dtype=torch.float16, device=device),
           "g": torch.zeros(1, T, HV, dtype=torch.float32, device=device)}
    big["k"] = torch.zeros_like(big["q"])
    for name in ("q", "k", "v", "g"):
        big[name][:, T - C:] = torch.from_numpy(tail.arrays[name]).to(big[name])
    h = torch.from_numpy(tail.arrays["h"]).to(device=device, dtype=torch.float16)
    cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=device)
    last_chunk = torch.tensor([[0, T // C - 1]], dtype=torch.int32, device=device)
    args = (big["q"], big["k"], big["v"], h, big["g"], cu_seqlens, last_chunk)
    problem = chunk_o.call_plan(*args)[0]
    o = torch.empty_like(big["v"])
    chunk_o.launch(problem, problem.tiling, *args[:5], o, spec.default_scale(K), cu_seqlens, last_chunk)
    assert_close(o[:, T - C:].double().cpu().numpy(), chunk_o_reference(tail), "float16")
    del o, big


def test_grid_is_one_dimensional_beyond_65535_sequence_heads(monkeypatch: pytest.MonkeyPatch,
                                                             request: pytest.FixtureRequest) -> None:
    """70 000 one-token sequences × 2 value heads = 140 000 work items: launched on the grid's x axis
    (2³¹ − 1 programs), never on y/z (65 535). The launch is recorded, not run (the interpreter would take
    minutes); test_many_sequences_run_on_gpu runs it."""
    from gdn.triton import chunk_fwd_o, chunk_o, reset_plans

    # chunk_fwd_o caches its launch plan per call signature: drop the plans that hold the recording kernel, so
    # a later call with these shapes (test_many_sequences_run_on_gpu) launches the real one
    reset_plans()
    request.addfinalizer(reset_plans)

    grids: list[tuple] = []

    class RecordingKernel:
        def __getitem__(self, grid: tuple):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(chunk_o, "chunk_fwd_o_kernel", RecordingKernel())
    inputs = _many_sequences(70_000)
    t = _torch_inputs(inputs)
    chunk_fwd_o(t["q"], t["k"], t["v"], t["h"], t["g"], cu_seqlens=t["cu_seqlens"])
    assert grids == [(70_000 * 2, 1, 1)]  # x, y, z


def _many_sequences(count: int) -> OpInputs:
    return Case(T=count, H=1, HV=2, K=16, V=16, seqlens=(1,) * count).inputs("float32", seed=17)


@pytest.mark.gpu
@pytest.mark.slow
def test_many_sequences_run_on_gpu(backend) -> None:
    inputs = _many_sequences(70_000)
    assert_close(backend.run(inputs), chunk_o_reference(inputs), "float32")
