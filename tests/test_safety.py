"""Nothing silently wrong, nothing unsafe: garbage in a token reaches only its own and later outputs, a −∞ gate
is a reset, index arrays are checked on the host or bounded in the kernels, strided torch inputs are read in
place or copied. Each test is a case of the input rules (gdn.common.contract, gdn.common.spec), written from a
failure seen before the rules held, in every backend. The forward's NaN and −∞ cases are in test_forward.py."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import contract, spec
from tests import helpers
from tests.backends import BACKENDS
from tests.cases import Case, ForwardCase, OpInputs, forward_varlen
from tests.helpers import chunk_o_reference, dtype_params, skip_unsupported


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str, what: str = "vs reference") -> None:
    helpers.assert_close(out, ref, spec.CHUNK_O_OP, dtype, what)


def assert_non_finite_where_reference_is(out: np.ndarray, ref: np.ndarray, dtype: str, what: str = "o") -> None:
    """out non-finite exactly where ref is, and within chunk_fwd_o's tolerance for the dtype everywhere else."""
    bad_out, bad_ref = ~np.isfinite(out), ~np.isfinite(ref)
    assert np.array_equal(bad_out, bad_ref), (
        f"{what}: {np.count_nonzero(bad_out & ~bad_ref)} non-finite where the reference is finite, "
        f"{np.count_nonzero(bad_ref & ~bad_out)} finite where it is not")
    assert_close(np.where(bad_ref, 0, out), np.where(bad_ref, 0, ref), dtype, what)


# Garbage in one token: NaN or ±inf in v (or k, q, g) at token t made o NaN for the tokens before t in the same
# chunk (v[:, 50:] = nan; chunk_fwd_o(...)[:, :50] had NaN at T = 64), because the kernels multiplied later
# tokens' terms by zero (0·NaN = NaN) instead of dropping them.
_CHUNK = Case(T=64, H=2, HV=4, K=48, V=32)
_TAIL = 50


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("name, value", [("v", np.nan), ("v", np.inf), ("v", -np.inf), ("k", np.nan),
                                         ("k", np.inf), ("q", np.nan), ("g", np.nan)],
                         ids=lambda x: str(x))
def test_garbage_in_later_tokens_never_reaches_earlier_outputs(backend, name: str, value: float, dtype: str) -> None:
    """The issue's repro: tokens 50 … 63 of one input set to garbage. o[:, :50] is bit for bit the o of the same
    call with those tokens zeroed (they are not terms of earlier outputs), and o[:, 50:] is non-finite exactly
    where the float64 reference is."""
    skip_unsupported(backend, dtype)
    inputs = _CHUNK.inputs(dtype, seed=21)
    garbage, zeroed = inputs.arrays[name].copy(), inputs.arrays[name].copy()
    garbage[:, _TAIL:], zeroed[:, _TAIL:] = value, 0
    out = backend.run(inputs.replace(**{name: garbage}))
    assert np.array_equal(out[:, :_TAIL], backend.run(inputs.replace(**{name: zeroed}))[:, :_TAIL])
    assert_non_finite_where_reference_is(out, chunk_o_reference(inputs.replace(**{name: garbage})), dtype)
    assert not np.isfinite(out[:, _TAIL:]).all()


def test_garbage_in_another_sequence_stays_there(backend) -> None:
    """A varlen batch whose second sequence (a padded request: q, k, v, g and its states all NaN) shares a chunk
    of memory with the first: the first sequence's outputs are bit for bit those of a clean call."""
    case = Case(T=150, H=1, HV=2, K=16, V=32, seqlens=(50, 100))
    inputs = case.inputs("float32", seed=22)
    garbage = {n: inputs.arrays[n].copy() for n in ("q", "k", "v", "g", "h")}
    for x in garbage.values():
        x[:, 1:] = np.nan  # h: rows 1, 2 are the second sequence's chunks
    for n in ("q", "k", "v", "g"):
        garbage[n][:, :50] = inputs.arrays[n][:, :50]
    out = backend.run(inputs.replace(**garbage))
    assert np.array_equal(out[:, :50], backend.run(inputs)[:, :50])
    assert np.isnan(out[:, 50:]).all()


@pytest.mark.parametrize("dtype", dtype_params())
def test_non_finite_inputs_give_non_finite_outputs_exactly_where_the_reference_does(backend, dtype: str) -> None:
    """One NaN or inf in each of q, k, v (two), g and h, in different chunks of a five-chunk sequence: o is
    non-finite exactly where the float64 reference (gdn.common.spec's rule) is, and close to it elsewhere."""
    skip_unsupported(backend, dtype)
    inputs = Case(T=300, H=1, HV=2, K=32, V=32).inputs(dtype, seed=23)
    a = {n: inputs.arrays[n].copy() for n in ("q", "k", "v", "g", "h")}
    a["q"][0, 10, 0, 3] = np.nan  # chunk 0: row 10 of both value heads
    a["k"][0, 70, 0, 5] = np.inf  # chunk 1: rows 70 … 127
    a["v"][0, 140, 1, 3] = np.nan  # chunk 2: column 3 of value head 1 from row 140 on
    a["v"][0, 150, 0, 5] = -np.inf  # chunk 2: column 5 of value head 0 from row 150 on
    a["g"][0, 200, 1] = np.nan  # chunk 3: value head 1, row 200 (its decay to later rows too)
    a["h"][0, 4, 0, 2, 7] = np.nan  # chunk 4: column 7 of value head 0, every row
    garbage = inputs.replace(**a)
    assert_non_finite_where_reference_is(backend.run(garbage), chunk_o_reference(garbage), dtype)


# A gate of −∞ (a full reset, exp(g) = 0) made all of o NaN: g_i − g_j formed −∞ − (−∞).
@pytest.mark.parametrize("dtype", dtype_params())
def test_minus_inf_gate_is_a_reset(backend, dtype: str) -> None:
    """Cumulative gates −∞ from token 20 of chunk 0 and from token 100 (chunk 1) on: o is finite and equals the
    reference; a row i after a reset at r is scale·Σ_{r ≤ j ≤ i} (q_i·k_j)·v_j — nothing from h[c] or from the
    tokens before the reset, and no decay between tokens after it (computed here from that definition)."""
    skip_unsupported(backend, dtype)
    case = Case(T=130, H=1, HV=2, K=32, V=16)
    inputs = case.inputs(dtype, seed=24)
    g = inputs.arrays["g"].copy()
    resets = {20: 64, 100: 128}  # reset token → end of its chunk
    for start, end in resets.items():
        g[:, start:end] = -np.inf
    inputs = inputs.replace(g=g)
    out = backend.run(inputs)
    assert_close(out, chunk_o_reference(inputs), dtype)
    a = {n: inputs.arrays[n].astype(np.float64) for n in ("q", "k", "v")}
    scale = spec.default_scale(case.K)
    for start, end in resets.items():
        for hv in range(case.HV):
            q, k, v = a["q"][0, start:end, hv // 2], a["k"][0, start:end, hv // 2], a["v"][0, start:end, hv]
            expected = scale * np.tril(q @ k.T) @ v
            assert_close(out[0, start:end, hv], expected, dtype, f"rows {start} … {end - 1} after the reset")


# Indices were trusted: chunk_indices inconsistent with cu_seqlens, out of range or with too few rows corrupted
# the heap of the Triton interpreter (an illegal address on a GPU) and gave NaN rows in JAX, even with
# cu_seqlens on the host.
_INDEX_CASE = Case(T=170, H=1, HV=2, K=16, V=16, seqlens=(30, 0, 140))  # chunks (0, 0), (2, 0), (2, 1), (2, 2)


def _index_mutations() -> list[tuple[str, np.ndarray, int]]:
    """(id, chunk_indices, h rows) of calls whose chunk_indices do not match _INDEX_CASE's cu_seqlens."""
    good = spec.prepare_chunk_indices(_INDEX_CASE.cu_seqlens)
    pad = np.array([spec.PAD_CHUNK], np.int32)
    swapped = good.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    return [
        ("sequence-out-of-range", np.concatenate([good[:3], [[3, 0]]]).astype(np.int32), 4),
        ("negative-sequence", np.concatenate([good[:1], [[-2, 0]], good[2:]]).astype(np.int32), 4),
        ("chunk-out-of-range", np.concatenate([good[:3], [[2, 3]]]).astype(np.int32), 4),
        ("chunk-of-an-empty-sequence", np.concatenate([good[:1], [[1, 0]], good[2:]]).astype(np.int32), 4),
        ("rows-swapped", swapped, 4),
        ("too-few-rows", good[:3], 3),
        ("pad-between-real-rows", np.concatenate([good[:2], pad, good[2:]]), 5),
        ("real-row-after-padding", np.concatenate([good, pad, good[3:]]), 6),
        ("huge-values", np.concatenate([good[:3], [[2**31 - 1, 2**31 - 1]]]).astype(np.int32), 4),
    ]


def _with_chunk_indices(inputs: OpInputs, chunk_indices: np.ndarray, rows: int) -> OpInputs:
    """inputs with the given chunk_indices and h cut or padded (NaN rows) to their row count."""
    h = inputs.arrays["h"]
    h = np.concatenate([h, np.full((1, max(0, rows - h.shape[1])) + h.shape[2:], np.nan, h.dtype)], axis=1)[:, :rows]
    return inputs.replace(chunk_indices=chunk_indices, h=h)


@pytest.mark.parametrize("mutation", _index_mutations(), ids=lambda m: m[0])
def test_chunk_indices_inconsistent_with_host_cu_seqlens_are_refused(backend, mutation) -> None:
    """cu_seqlens and chunk_indices on the host (numpy for JAX; CPU tensors for torch, which means the Triton
    interpreter): checked against each other before the launch."""
    _, chunk_indices, rows = mutation
    inputs = _with_chunk_indices(_INDEX_CASE.inputs("float32", seed=28), chunk_indices, rows)
    if backend.name == "triton" and backend.on_gpu:
        pytest.skip("torch index arrays live on q's device (CUDA): bounded in the kernel instead")
    with pytest.raises(ValueError, match=r"^chunk_fwd_o: chunk_indices: expected"):
        if backend.name == "pallas":  # numpy index arrays: on the host whatever the device
            from gdn.pallas import chunk_fwd_o

            a = inputs.arrays
            chunk_fwd_o(a["q"], a["k"], a["v"], a["h"], a["g"], None, a["cu_seqlens"], a["chunk_indices"])
        else:
            backend.run(inputs)


def _run_unchecked(backend, inputs: OpInputs, sentinel: float) -> np.ndarray:
    """chunk_fwd_o with index values nothing checks on the host, as on a GPU: Pallas under jax.jit (traced index
    arrays); Triton with device tensors on a GPU, else (CPU tensors would be checked) the kernel launched on the
    contract's problem for an o filled with sentinel."""
    if backend.name == "pallas":
        import jax

        from gdn.pallas import chunk_fwd_o

        converted = backend.convert(inputs)
        jitted = jax.jit(lambda q, k, v, h, g, cu, ci: chunk_fwd_o(q, k, v, h, g, None, cu, ci))
        return backend.numpy(jitted(*(converted[n] for n in ("q", "k", "v", "h", "g", "cu_seqlens", "chunk_indices"))))
    if backend.on_gpu:
        return backend.run(inputs)
    from gdn.triton import chunk_o
    from gdn.triton.arrays import array_info, tensor_keys

    t = backend.convert(inputs)
    args = [t[n] for n in chunk_o.ARG_NAMES]
    problem = contract.validate_chunk_o_inputs(*(None if key is None else array_info(key)
                                                 for key in tensor_keys(chunk_o.ARG_NAMES, args)))
    o = t["v"].new_full(t["v"].shape, sentinel)
    chunk_o.launch(problem, problem.tiling, t["q"], t["k"], t["v"], t["h"], t["g"], o, spec.default_scale(problem.K),
                   t["cu_seqlens"], t["chunk_indices"])
    return backend.numpy(o)


@pytest.mark.parametrize("mutation", _index_mutations(), ids=lambda m: m[0])
def test_unchecked_bad_chunk_indices_read_and_write_nothing(backend, mutation) -> None:
    """The same chunk_indices where nothing checks them (device values): every program of a row that names no
    chunk of a sequence reads and writes nothing (the Triton interpreter dereferences every unmasked address,
    and compute-sanitizer runs these on the GPU: tests/sanitize.sh). A chunk named once, in its own row, comes
    out as the reference's; one named in another row is in bounds but reads that row's state (no check); a
    real chunk no row names keeps o's sentinel where the test can see it (the Triton launch into a filled o)."""
    _, chunk_indices, rows = mutation
    inputs = _with_chunk_indices(_INDEX_CASE.inputs("float32", seed=29), chunk_indices, rows)
    out, ref = _run_unchecked(backend, inputs, sentinel=7.0), chunk_o_reference(_INDEX_CASE.inputs("float32", seed=29))
    named = [tuple(row) for row in chunk_indices.tolist()]
    cu = _INDEX_CASE.cu_seqlens
    for row, chunk in enumerate(map(tuple, spec.prepare_chunk_indices(cu).tolist())):
        sequence, index = chunk
        t0 = cu[sequence] + index * spec.CHUNK_SIZE
        t1 = min(t0 + spec.CHUNK_SIZE, cu[sequence + 1])
        if named.count(chunk) == 1 and row < len(named) and named[row] == chunk:
            assert_close(out[:, t0:t1], ref[:, t0:t1], "float32", f"chunk {chunk}")
        elif chunk not in named and backend.name == "triton" and not backend.on_gpu:
            assert (out[:, t0:t1] == 7.0).all(), f"chunk {chunk}, named by no row, was written"


@pytest.mark.parametrize("cu_seqlens", [[0, 30, 30, 10**9], [-100, 30, 30, 170], [0, 30, 30, 150]],
                         ids=["end-past-T", "negative-start", "end-before-T"])
def test_unchecked_cu_seqlens_values_are_clamped_into_the_tokens(backend, cu_seqlens: list[int]) -> None:
    """cu_seqlens values nothing checks (device values) are clamped into [0, T]: a last entry past T or a
    negative first one reads and writes only real token rows, and gives the outputs of the true boundaries."""
    inputs = _INDEX_CASE.inputs("float32", seed=30)
    chunk_indices = spec.prepare_chunk_indices(_INDEX_CASE.cu_seqlens)
    bad = inputs.replace(cu_seqlens=np.array(cu_seqlens, np.int32), chunk_indices=chunk_indices)
    out, ref = _run_unchecked(backend, bad, sentinel=7.0), chunk_o_reference(inputs)
    if cu_seqlens[-1] >= _INDEX_CASE.T:
        assert_close(out, ref, "float32")
    else:  # the rows past cu_seqlens[-1] belong to no sequence: the last chunk stops there
        assert_close(out[:, :cu_seqlens[-1]], ref[:, :cu_seqlens[-1]], "float32")


def test_forward_chunk_indices_inconsistent_with_host_cu_seqlens_are_refused(backend) -> None:
    """The forward checks host chunk_indices against host cu_seqlens as chunk_fwd_o does (a sequence index out
    of range, with the right row count, so the unchecked kernels stay in bounds while this fails)."""
    if backend.name == "triton" and backend.on_gpu:
        pytest.skip("torch index arrays live on q's device (CUDA)")
    inputs = ForwardCase(170, 1, 2, 16, 16, seqlens=(30, 0, 140)).inputs("float32", seed=31)
    chunk_indices = spec.prepare_chunk_indices(inputs.arrays["cu_seqlens"])
    chunk_indices[-1] = (3, 0)
    inputs = inputs.replace(chunk_indices=chunk_indices)
    with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: chunk_indices: expected"):
        if backend.name == "pallas":  # numpy index arrays: on the host whatever the device
            from gdn.pallas import chunk_gated_delta_rule

            a = inputs.arrays
            chunk_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], None, a["initial_state"], True,
                                   a["cu_seqlens"], a["chunk_indices"])
        else:
            backend.forward(inputs)


# Strided torch inputs (Triton): the q, k, v slices of one fused projection were refused ("call .contiguous()").
def _fused_projection(inputs: OpInputs):
    """q, k, v of inputs as [B, T, H, K] / [B, T, HV, V] views into one [B, T, 2·H·K + HV·V] tensor (column
    slices, as a model's fused qkv projection gives them)."""
    torch = BACKENDS["triton"].torch
    t = BACKENDS["triton"].convert(inputs)
    B, T, H, K = t["q"].shape
    HV, V = t["v"].shape[2:]
    fused = torch.cat([t["q"].reshape(B, T, H * K), t["k"].reshape(B, T, H * K), t["v"].reshape(B, T, HV * V)], -1)
    return (fused[..., :H * K].view(B, T, H, K), fused[..., H * K:2 * H * K].view(B, T, H, K),
            fused[..., 2 * H * K:].view(B, T, HV, V))


@pytest.mark.parametrize("case", [Case(T=130, H=2, HV=4, K=32, V=16), Case(T=70, H=1, HV=2, K=16, V=48, B=2),
                                  Case(T=100, H=2, HV=2, K=16, V=16, seqlens=(30, 70))], ids=lambda c: c.id)
def test_fused_projection_slices_are_read_in_place(case: Case) -> None:
    """q, k, v as column slices of one projection: read at their strides (no copy) and bit for bit the output
    of dense copies."""
    from gdn.triton import chunk_fwd_o
    from gdn.triton.arrays import layout_keys

    inputs = case.inputs("float16", seed=32)
    q, k, v = _fused_projection(inputs)
    t = BACKENDS["triton"].convert(inputs)
    assert not q.is_contiguous() and not v.is_contiguous()
    arrays, keys = layout_keys(("q", "k", "v"), (q, k, v), ("q", "k", "v"))
    assert all(x is y for x, y in zip(arrays, (q, k, v)))  # no copies
    assert [key[3] for key in keys] == [q.stride(), k.stride(), v.stride()]
    out = chunk_fwd_o(q, k, v, t["h"], t["g"], cu_seqlens=t["cu_seqlens"])
    dense = chunk_fwd_o(q.contiguous(), k.contiguous(), v.contiguous(), t["h"], t["g"], cu_seqlens=t["cu_seqlens"])
    assert out.is_contiguous() and BACKENDS["triton"].torch.equal(out, dense)
    assert_close(BACKENDS["triton"].numpy(out), chunk_o_reference(inputs), "float16")


def test_head_major_views_are_read_in_place() -> None:
    """q, k, v stored head-major ([B, H, T, K], as attention kernels often keep them) and seen as [B, T, H, K]
    through a transpose, B = 1: read in place, and o comes back dense, bit for bit the dense call's."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_fwd_o

    t = BACKENDS["triton"].convert(Case(T=130, H=2, HV=4, K=32, V=16).inputs("float16", seed=35))
    views = [t[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v")]
    assert all(not x.is_contiguous() and x.stride()[-1] == 1 for x in views)
    out = chunk_fwd_o(*views, t["h"], t["g"])
    assert out.is_contiguous() and torch.equal(out, chunk_fwd_o(t["q"], t["k"], t["v"], t["h"], t["g"]))


def _layout(x, layout: str):
    """A view of x's values in a layout the kernel cannot read in place."""
    if layout == "every-other-element":  # the last axis strided
        view = x.new_empty(x.shape[:-1] + (2 * x.shape[-1],))[..., ::2]
        view.copy_(x)
    elif layout == "transposed":  # a transposed copy seen through a transpose: permuted strides
        view = x.transpose(0, -1).contiguous().transpose(0, -1)
    else:  # the first T rows of a buffer of T + 5 rows, B > 1: batch stride (T + 5)·(token stride)
        view = x.new_full((x.shape[0], x.shape[1] + 5) + x.shape[2:], float("nan"))[:, :x.shape[1]]
        view.copy_(x)
    return view


@pytest.mark.parametrize("name, layout", [(n, layout) for n in ("q", "k", "v", "h", "g")
                                          for layout in ("every-other-element", "transposed")]
                         + [(n, "prefix-of-a-longer-buffer") for n in ("q", "k", "v")], ids=lambda x: str(x))
def test_other_layouts_are_copied_once(name: str, layout: str) -> None:
    """A layout the kernel cannot read in place (such views were refused) is copied once: the bits of the dense
    call, never a read at the wrong strides."""
    from gdn.triton import chunk_fwd_o

    inputs = Case(T=70, H=2, HV=4, K=48, V=64, B=2).inputs("float32", seed=33)
    t = BACKENDS["triton"].convert(inputs)
    dense = chunk_fwd_o(t["q"], t["k"], t["v"], t["h"], t["g"])
    view = _layout(t[name], layout)
    assert not view.is_contiguous() and BACKENDS["triton"].torch.equal(view, t[name])
    t[name] = view
    out = chunk_fwd_o(t["q"], t["k"], t["v"], t["h"], t["g"])
    assert BACKENDS["triton"].torch.equal(out, dense)


@pytest.mark.slow
def test_forward_reads_fused_projection_slices() -> None:
    """chunk_gated_delta_rule on the q, k, v slices of one projection and g, beta slices of another (refused as
    non-contiguous before): the bits of dense copies, final state included, and the inputs left as they were."""
    torch = BACKENDS["triton"].torch
    from gdn.triton import chunk_gated_delta_rule

    inputs = ForwardCase(70, 1, 2, 16, 32).inputs("float32", seed=34)
    q, k, v = _fused_projection(inputs)
    t = BACKENDS["triton"].convert(inputs)
    gates = torch.stack([t["g"], t["beta"]], dim=-1)  # [B, T, HV, 2]: g and beta interleaved, as one projection
    g, beta = gates[..., 0], gates[..., 1]
    assert not (q.is_contiguous() or v.is_contiguous() or g.is_contiguous() or beta.is_contiguous())
    out, state = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    dense, dense_state = chunk_gated_delta_rule(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                                beta.contiguous(), output_final_state=True)
    assert torch.equal(out, dense) and torch.equal(state, dense_state)
    assert torch.equal(g, t["g"]) and torch.equal(v, t["v"])


def test_forward_reads_qkv_slices_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The q, k, v slices of one projection reach the kernels as they are (their strides in the problem), not
    as copies; varlen too."""
    from gdn.triton import chunk_gated_delta_rule, forward

    inputs = forward_varlen((70, 0, 1, 64), 1, 2, 16, 32).inputs("float32", seed=36)
    q, k, v = _fused_projection(inputs)
    t = BACKENDS["triton"].convert(inputs)
    seen = {}
    original = forward.forward

    def spy(problem, q_in, k_in, v_in, *args, **kwargs):
        seen.update(problem=problem, ptrs=(q_in.data_ptr(), k_in.data_ptr(), v_in.data_ptr()),
                    strides=(q_in.stride(), k_in.stride(), v_in.stride()))
        return original(problem, q_in, k_in, v_in, *args, **kwargs)

    monkeypatch.setattr(forward, "forward", spy)
    out, state = chunk_gated_delta_rule(q, k, v, t["g"], t["beta"], initial_state=t["initial_state"],
                                        output_final_state=True, cu_seqlens=t["cu_seqlens"])
    assert seen["ptrs"] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert seen["strides"] == (q.stride(), k.stride(), v.stride()) and seen["problem"].strides
    monkeypatch.setattr(forward, "forward", original)
    dense, dense_state = chunk_gated_delta_rule(q.contiguous(), k.contiguous(), v.contiguous(), t["g"], t["beta"],
                                                initial_state=t["initial_state"], output_final_state=True,
                                                cu_seqlens=t["cu_seqlens"])
    torch = BACKENDS["triton"].torch
    assert torch.equal(out, dense) and torch.equal(state, dense_state)


def test_forward_refuses_a_strided_pool() -> None:
    """A state pool is updated in place: one the kernels cannot read in place is refused, never copied (the
    update would go to the copy)."""
    from gdn.triton import chunk_gated_delta_rule

    inputs = ForwardCase(70, 1, 2, 16, 32).inputs("float32", seed=35)
    t = BACKENDS["triton"].convert(inputs)
    pool = t["initial_state"].new_zeros((3,) + t["initial_state"].shape[1:]).transpose(-1, -2).contiguous()
    rows = BACKENDS["triton"].torch.tensor([2], dtype=BACKENDS["triton"].torch.int32, device=pool.device)
    with pytest.raises(ValueError, match=r"^chunk_gated_delta_rule: initial_state: expected a contiguous tensor"):
        chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], None, pool.transpose(-1, -2), True,
                               state_indices=rows)
