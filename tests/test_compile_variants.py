"""One compiled variant per (dtype, K, V, flags): nothing derived from T reaches a specialization key."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from gdn.common import example, spec, tilings

T_VALUES = [1, 17, 63, 64, 65, 1000, 8192]
VARLEN_BATCHES = [(5, 0, 64, 130), (1,), (1000, 3, 4000)]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _call(T: int | None, seqlens: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float16):
    from gdn.triton import chunk_fwd_o

    H, HV, K, V = 2, 4, 64, 48
    cu = None if seqlens is None else np.cumsum((0,) + seqlens)
    T = T if seqlens is None else int(cu[-1])
    arrays = example.random_inputs(1, T, H, HV, K, V, "float16", True, cu, seed=T)
    t = {n: None if a is None else torch.from_numpy(a).to(_device()) for n, a in arrays.items()}
    to = lambda x: x.to(dtype)  # noqa: E731
    return chunk_fwd_o(to(t["q"]), to(t["k"]), to(t["v"]), to(t["h"]), t["g"], cu_seqlens=t["cu_seqlens"])


def _forward_call(T: int | None, seqlens: tuple[int, ...] | None = None) -> None:
    from gdn.triton import chunk_gated_delta_rule

    H, HV, K, V = 1, 2, 32, 32
    cu = None if seqlens is None else np.cumsum((0,) + seqlens).astype(np.int32)
    T = T if seqlens is None else int(cu[-1])
    a = example.random_recurrent_inputs(1, T, H, HV, K, V, "float16", seed=T)
    t = {n: torch.from_numpy(x).to(_device()) for n, x in a.items()}
    N = 1 if seqlens is None else len(seqlens)
    cu_seqlens = None if cu is None else torch.from_numpy(cu).to(_device())
    chunk_gated_delta_rule(t["q"].half(), t["k"].half(), t["v"].half(), t["g"], t["beta"],
                           initial_state=t["initial_state"][:1].expand(N, -1, -1, -1).contiguous(),
                           output_final_state=True, cu_seqlens=cu_seqlens)


def _assert_no_length_specialization(kernel, run_dense: Callable[[int], None],
                                     run_varlen: Callable[[tuple[int, ...]], None]) -> None:
    """Record every launch of kernel over many T and varlen batches: the constexprs are identical within each
    mode, and the only scalar argument that changes with T is T itself, which the kernel does not specialize on."""
    launches: list[tuple[tuple, dict]] = []

    def record(*args, **kwargs) -> None:
        launches.append((args, kwargs))

    kernel.add_pre_run_hook(record)
    try:
        for T in [t for t in T_VALUES if t <= 1000] if not torch.cuda.is_available() else T_VALUES:
            run_dense(T)
        dense_launches = len(launches)
        for seqlens in VARLEN_BATCHES[:2]:
            run_varlen(seqlens)
    finally:
        kernel.pre_run_hooks.remove(record)
    dense, varlen = launches[:dense_launches], launches[dense_launches:]
    assert dense and varlen
    for group in (dense, varlen):
        # one variant per mode: on a GPU longer inputs take the context-parallel path, whose map walk (MAP) is
        # the walk's second variant, compiled by warmup_forward whatever T is
        constexprs = {tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("debug",)
                                   and not isinstance(v, torch.Tensor))) for _, kwargs in group}
        assert len(constexprs) == len({dict(c).get("MAP") for c in constexprs}), constexprs
    names = kernel.arg_names
    scalars = {names[i] for args, _ in launches for i, a in enumerate(args)
               if isinstance(a, int) and not isinstance(a, bool)}
    # the walk's piece counts (pieces walked, pieces mapped) choose a path, not a variant; h's row count H_ROWS,
    # the pool's POOL_ROWS and the number of sequences N bound the indices the kernels dereference
    assert "T" in scalars and scalars <= {"T", "NUM_PIECES", "MAPPED_PIECES", "H_ROWS", "POOL_ROWS", "N"}
    do_not_specialize = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
    assert scalars <= set(do_not_specialize)


def test_kernel_never_specializes_on_sequence_length() -> None:
    from gdn.triton import chunk_o

    _assert_no_length_specialization(chunk_o.chunk_fwd_o_kernel, _call, lambda seqlens: _call(None, seqlens))


@pytest.mark.parametrize("kernel_name", ["chunk_prepare_kernel", "chunk_walk_kernel"])
def test_forward_kernels_never_specialize_on_sequence_length(kernel_name: str) -> None:
    """chunk_gated_delta_rule's kernels over the same T and varlen batches."""
    from gdn.triton import forward

    kernel = getattr(forward, kernel_name)
    _assert_no_length_specialization(kernel, _forward_call, lambda seqlens: _forward_call(None, seqlens))


@pytest.mark.gpu
def test_warmup_compiles_everything_later_calls_need() -> None:
    from gdn.triton import compiled_variants, warmup

    for varlen in (False, True):
        warmup(torch.bfloat16, 64, 48, HV=4, H=2, gated=True, varlen=varlen, device="cuda")
    before = compiled_variants()
    for T in T_VALUES:
        _call(T, dtype=torch.bfloat16)
    for seqlens in VARLEN_BATCHES:
        _call(None, seqlens, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    assert compiled_variants() == before


def test_pallas_warmup_covers_every_padded_length() -> None:
    """After gdn.pallas.warmup over the buckets, calls at any T padded with pad_to_bucket compile nothing (the
    default path for both: triton_call on a CUDA GPU, the Pallas kernels elsewhere)."""
    import jax.numpy as jnp

    import gdn.pallas

    C = spec.CHUNK_SIZE
    buckets = (C, 2 * C, 4 * C)
    gdn.pallas.warmup("float16", 48, 32, HV=4, H=2, gated=True, lengths=buckets)
    before = gdn.pallas.compiled_variants()
    for T in (1, 17, C - 1, C, C + 1, 3 * C + 5):
        a = example.random_inputs(1, T, 2, 4, 48, 32, "float16", True, None, seed=T)
        q, k, v, h, g = gdn.pallas.pad_to_bucket(a["q"], a["k"], a["v"], a["h"], a["g"])
        assert q.shape[1] in buckets
        f16 = lambda x: jnp.asarray(x, jnp.float16)  # noqa: E731
        gdn.pallas.chunk_fwd_o(f16(q), f16(k), f16(v), f16(h), jnp.asarray(g)).block_until_ready()
    assert gdn.pallas.compiled_variants() == before


def _forward_inputs(T: int, dtype: str = "float16") -> dict[str, np.ndarray]:
    a = example.random_recurrent_inputs(1, T, 1, 2, 32, 32, dtype, seed=T)
    return {n: a[n] for n in ("q", "k", "v", "g", "beta")}


@pytest.mark.gpu
@pytest.mark.slow
def test_forward_warmup_compiles_everything_later_calls_need() -> None:
    from gdn.triton import chunk_gated_delta_rule, compiled_variants, warmup_forward

    for varlen in (False, True):
        warmup_forward(torch.float16, 32, 32, HV=2, H=1, varlen=varlen, initial_state=True, device="cuda")
    before = compiled_variants()
    for T in T_VALUES:
        t = {n: torch.from_numpy(x).cuda() for n, x in _forward_inputs(T).items()}
        # one sequence, two, and batches past each walk size class (tilings.walk_tiling: 64 and 200 walks)
        for N in (1, 2, 32, 100):
            cu = None if N == 1 else torch.linspace(0, T, N + 1, device="cuda").round().to(torch.int32)
            chunk_gated_delta_rule(t["q"].half(), t["k"].half(), t["v"].half(), t["g"], t["beta"],
                                   initial_state=torch.zeros(N, 2, 32, 32, device="cuda"),
                                   output_final_state=True, cu_seqlens=cu)
    torch.cuda.synchronize()
    assert compiled_variants() == before


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("initial_state, output_final_state", [(False, False), (True, True), (False, True)])
def test_forward_warmup_covers_the_context_parallel_path(initial_state: bool, output_final_state: bool) -> None:
    """A long dense sequence with few walks runs in pieces (tilings.context_pieces: the map walk and the
    combine besides the walk); warmup_forward compiles those too."""
    from gdn.triton import chunk_gated_delta_rule, compiled_variants, warmup_forward

    T = 2 * tilings.MAX_PIECES * tilings.MIN_PIECE_CHUNKS * spec.CHUNK_SIZE
    assert tilings.context_pieces(2, 32, spec.num_chunks(T), 132) > 1
    warmup_forward(torch.float16, 32, 32, HV=2, H=1, initial_state=initial_state,
                   output_final_state=output_final_state, device="cuda")
    before = compiled_variants()
    t = {n: torch.from_numpy(x).cuda() for n, x in _forward_inputs(T).items()}
    chunk_gated_delta_rule(t["q"].half(), t["k"].half(), t["v"].half(), t["g"], t["beta"],
                           initial_state=torch.zeros(1, 2, 32, 32, device="cuda") if initial_state else None,
                           output_final_state=output_final_state)
    torch.cuda.synchronize()
    assert compiled_variants() == before


@pytest.mark.slow
def test_pallas_forward_warmup_covers_every_padded_length() -> None:
    """After gdn.pallas.warmup_forward over the buckets, forward calls at any T padded with
    pad_forward_to_bucket compile nothing, and their real rows of o and their final state are the unpadded
    call's, bit for bit (a padding token has beta = 0 and g = 0: S passes it unchanged). Warmup, padded and unpadded
    calls take the same default path: triton_call on a CUDA GPU, the Pallas kernels elsewhere."""
    import jax.numpy as jnp

    import gdn.pallas

    C = spec.CHUNK_SIZE
    buckets = (C, 2 * C, 4 * C)
    gdn.pallas.warmup_forward("float16", 32, 32, HV=2, H=1, lengths=buckets)
    before = gdn.pallas.compiled_variants()
    f16 = lambda x: jnp.asarray(x, jnp.float16)  # noqa: E731

    def forward(q, k, v, g, beta):
        return gdn.pallas.chunk_gated_delta_rule(f16(q), f16(k), f16(v), jnp.asarray(g), jnp.asarray(beta),
                                                 output_final_state=True)

    lengths = (1, C - 1, C + 1, 3 * C + 5)
    padded_outputs = []
    for T in lengths:
        padded = gdn.pallas.pad_forward_to_bucket(*_forward_inputs(T).values())
        assert padded[0].shape[1] in buckets
        padded_outputs.append(forward(*padded))
    assert gdn.pallas.compiled_variants() == before
    for T, (o, state) in zip(lengths, padded_outputs):
        o_ref, state_ref = forward(*_forward_inputs(T).values())  # unpadded: a new program per T
        assert np.array_equal(np.asarray(o[:, :T]), np.asarray(o_ref))
        assert np.array_equal(np.asarray(state), np.asarray(state_ref))
