"""decode_step's serving arguments (gdn.common.spec): state pools read and updated in place, padded slots,
per-token state slots and rollback, in-kernel q/k normalization and gating against the float64 recurrence fed
the same raw inputs, index checks on the host and bounds masking in the kernel, NaN and −inf containment, the
dtype rules and the errors — one body per property, over backends; then the torch-only layouts (strided
inputs, V-first pools) and CUDA graphs (torch.compile: tests/test_compile.py), and JAX's donated pools."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import contract, reference, spec
from tests.backends import BACKENDS, DECODE_ARGS
from tests.cases import SERVING_CASES, OpInputs, ServingCase, seed_of
from tests.helpers import assert_close, assert_refused, assert_state_close, dtype_params

OP = spec.DECODE_OP


def reference_decode(inputs: OpInputs, use_qk_l2norm_in_kernel: bool = False,
                     softplus: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """gdn.common.reference.decode_step on the same arrays and flags."""
    a = inputs.arrays
    extra = {} if softplus is None else {"softplus_beta": softplus[0], "softplus_threshold": softplus[1]}
    return reference.decode_step(*(a.get(n) for n in DECODE_ARGS[:6]), inputs.scale,
                                 **{n: a.get(n) for n in DECODE_ARGS[6:]},
                                 use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **extra)


def _rows(inputs: OpInputs, n: int) -> slice:
    """The token rows of sequence n."""
    cu = inputs.arrays.get("cu_seqlens")
    return slice(n, n + 1) if cu is None else slice(int(cu[n]), int(cu[n + 1]))


def _untouched_rows(inputs: OpInputs) -> np.ndarray:
    """Pool rows no index names."""
    named = np.asarray(inputs.arrays["state_indices"]).reshape(-1)
    return np.setdiff1d(np.arange(len(inputs.arrays["state"])), named[named >= 0])


# Pools, padded slots, per-token slots: against the float64 reference, both backends.
@pytest.mark.parametrize("dtype", dtype_params(("float32", "bfloat16")))
@pytest.mark.parametrize("case", SERVING_CASES, ids=lambda c: c.id)
def test_pool_matches_reference(backend, case: ServingCase, dtype: str) -> None:
    inputs = case.inputs(dtype, seed=seed_of(case.id), padding_rows=2 if case.lengths else 0)
    o, pool = backend.decode_step(inputs)
    ref_o, ref_pool = reference_decode(inputs)
    assert_close(o, ref_o, OP, dtype, "o")
    assert_state_close(pool, ref_pool, "pool")
    untouched = _untouched_rows(inputs)
    assert len(untouched) and np.array_equal(pool[untouched], inputs.arrays["state"][untouched]), \
        "pool rows no sequence names are bit-identical"
    for n in case.padded:
        assert not o[_rows(inputs, n)].any(), f"padded sequence {n}: o rows zero"
    if case.lengths:
        assert not o[sum(case.lengths):].any(), "rows past the last sequence: o zero"


def test_dense_state_with_a_few_tokens_per_sequence(backend) -> None:
    """Without state_indices: S before each sequence's first token in, a new state after its last out (the
    input state unchanged), an empty sequence's state passed through."""
    inputs = ServingCase(H=2, HV=4, K=16, V=32, pool_rows=4, lengths=(2, 0, 3, 1)).inputs("float16", seed=3)
    dense = inputs.replace(state=inputs.arrays["state"][:4], state_indices=None)
    state_in = dense.arrays["state"].copy()
    o, state = backend.decode_step(dense)
    ref_o, ref_state = reference_decode(dense)
    assert_close(o, ref_o, OP, "float16")
    assert_state_close(state, ref_state)
    assert np.array_equal(state[1], state_in[1]) and np.array_equal(dense.arrays["state"], state_in)


def test_rollback_continues_from_the_accepted_token(backend) -> None:
    """A speculative step keeps the state after each of its tokens in its slot; the next step, told that j of
    them were accepted, continues from slot j − 1: its output and state equal decoding the j accepted tokens and
    the next token with no speculation at all (the float64 recurrence)."""
    H, HV, K, V, S = 1, 2, 16, 32, 4
    lengths, accepted = (4, 3, 4), np.array([2, 3, 4], np.int32)
    first = ServingCase(H=H, HV=HV, K=K, V=V, pool_rows=14, lengths=lengths, slots=S).inputs("float32", seed=5)
    initial = first.arrays["state"].copy()
    slots = first.arrays["state_indices"]
    _, pool = backend.decode_step(first)
    # the next step: one token per sequence, from the accepted slot; its state goes to slot 0
    step = ServingCase(H=H, HV=HV, K=K, V=V, pool_rows=14, N=3).inputs("float32", seed=6)
    second = step.replace(state=pool.astype(np.float32), state_indices=slots, num_accepted_tokens=accepted)
    o, pool = backend.decode_step(second)
    cu = first.arrays["cu_seqlens"]
    for n, j in enumerate(accepted):
        kept = {name: np.concatenate([first.arrays[name][cu[n]:cu[n] + j], step.arrays[name][n:n + 1]])[None]
                for name in ("q", "k", "v", "g", "beta")}
        ref_o, ref_state = reference.recurrent_gated_delta_rule(
            **kept, initial_state=initial[slots[n, 0]][None], output_final_state=True)
        assert_close(o[n], ref_o[0, -1], OP, "float32", f"sequence {n}: o after {j} accepted tokens")
        assert_state_close(pool[slots[n, 0]], ref_state[0], f"sequence {n}: the state in slot 0")


@pytest.mark.parametrize("raw_qk, raw_gates", [(True, False), (False, True), (True, True)],
                         ids=["qk-l2norm", "raw-gates", "both"])
def test_in_kernel_normalization_and_gating(backend, raw_qk: bool, raw_gates: bool) -> None:
    """q, k of any norm normalized in the kernel, g and beta computed from a, b, A_log, dt_bias: equal to the
    float64 recurrence fed the same raw inputs (and far from it fed them unnormalized / ungated)."""
    case = SERVING_CASES[3]
    inputs = case.inputs("float32", seed=7, raw_qk=raw_qk, raw_gates=raw_gates)
    o, pool = backend.decode_step(inputs, use_qk_l2norm_in_kernel=raw_qk)
    ref_o, ref_pool = reference_decode(inputs, use_qk_l2norm_in_kernel=raw_qk)
    assert_close(o, ref_o, OP, "float32")
    assert_state_close(pool, ref_pool)
    if raw_qk:
        plain = reference_decode(inputs)[0]
        assert np.abs(plain - ref_o).max() > 0.1 * np.abs(ref_o).max(), "the normalization changes o"


def test_softplus_beta_and_threshold(backend) -> None:
    """Non-default softplus β and threshold, the threshold inside the range of β·(a + dt_bias): both branches."""
    inputs = SERVING_CASES[0].inputs("float32", seed=8, raw_gates=True)
    softplus = (2.0, 0.5)
    o, pool = backend.decode_step(inputs, softplus=softplus)
    ref_o, ref_pool = reference_decode(inputs, softplus=softplus)
    assert_close(o, ref_o, OP, "float32")
    assert_state_close(pool, ref_pool)


def test_beta_in_the_input_dtype(backend) -> None:
    """beta float32 or q's dtype, as in chunk_gated_delta_rule."""
    inputs = SERVING_CASES[0].inputs("float16", seed=9)
    inputs.dtypes["beta"] = "float16"
    inputs = inputs.replace(beta=inputs.arrays["beta"].astype(np.float16).astype(np.float32))
    o, pool = backend.decode_step(inputs)
    ref_o, ref_pool = reference_decode(inputs)
    assert_close(o, ref_o, OP, "float16")
    assert_state_close(pool, ref_pool)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True], ids=["decode", "spec4"])
def test_model_sized_heads_on_gpu(backend, speculative: bool) -> None:
    """Qwen3-Next heads (H16 HV32 K = V = 128, bf16, the fused path: raw q, k and gates) from a pool: one token
    for 24 sequences, or a 4-token speculative step for 16 with per-token slots, against the float64 reference;
    untouched rows bit-identical."""
    heads = {"H": 16, "HV": 32, "K": 128, "V": 128}
    case = (ServingCase(**heads, pool_rows=72, lengths=(4,) * 16, slots=4, accepted=True, padded=(3,))
            if speculative else ServingCase(**heads, pool_rows=40, N=24, padded=(5,)))
    inputs = case.inputs("bfloat16", seed=20, raw_qk=True, raw_gates=True)
    o, pool = backend.decode_step(inputs, use_qk_l2norm_in_kernel=True)
    ref_o, ref_pool = reference_decode(inputs, use_qk_l2norm_in_kernel=True)
    assert_close(o, ref_o, OP, "bfloat16")
    assert_state_close(pool, ref_pool)
    untouched = _untouched_rows(inputs)
    assert np.array_equal(pool[untouched], inputs.arrays["state"][untouched])


# Bounds masking in the kernel: what device index arrays get (no host check).
def test_out_of_range_indices_read_and_write_nothing(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows ≥ P or negative, accepted counts outside [1, S], a slot out of range: the sequence (or that token's
    state) is skipped, as the reference says, and nothing outside the arrays is touched. The host check is
    switched off to reach the kernel's masking, as on a GPU with device index arrays."""
    monkeypatch.setattr(contract, "validate_decode_index_values", lambda *args: None)
    case = ServingCase(H=1, HV=2, K=16, V=32, pool_rows=12, lengths=(2, 1, 2, 1, 2), slots=2, accepted=True)
    inputs = case.inputs("float32", seed=10)
    slots = inputs.arrays["state_indices"].copy()
    slots[0, 0], slots[3, 1] = 12, 2**31 - 1  # read row ≥ P; a token slot ≥ P
    slots[4, 1] = -(2**31)
    accepted = np.array([1, 0, 2, 3, 2], np.int32)  # sequence 1: none accepted; 3: more than S
    inputs = inputs.replace(state_indices=slots, num_accepted_tokens=accepted)
    o, pool = backend.decode_step(inputs)
    ref_o, ref_pool = reference_decode(inputs)
    assert_close(o, ref_o, OP, "float32")
    assert_state_close(pool, ref_pool)
    assert not o[_rows(inputs, 0)].any() and not o[_rows(inputs, 1)].any() and not o[_rows(inputs, 3)].any()


def test_inconsistent_cu_seqlens_stays_in_bounds(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """cu_seqlens past T or decreasing: every span is clamped into the T rows, so nothing outside q, k, v and o
    is read or written; the well-formed sequences are exact."""
    monkeypatch.setattr(contract, "validate_decode_index_values", lambda *args: None)
    inputs = ServingCase(H=1, HV=2, K=16, V=16, pool_rows=6, lengths=(2, 1, 3)).inputs("float32", seed=11)
    good_o, _ = backend.decode_step(inputs)
    bad = inputs.replace(cu_seqlens=np.array([0, 2, 3, 10**6], np.int32))
    o, _ = backend.decode_step(bad)
    assert np.isfinite(o).all() and np.array_equal(o[:3], good_o[:3])
    o, _ = backend.decode_step(inputs.replace(cu_seqlens=np.array([0, 2, 1, -5], np.int32)))
    assert np.isfinite(o).all() and np.array_equal(o[:2], good_o[:2])


# Host index checks: before anything runs.
def _host_value_errors() -> list[tuple[str, ServingCase, dict, dict, type[Exception], str]]:
    """(id, base case, array replacements, dtype replacements, error, message regex), as assert_refused takes
    them."""
    case = SERVING_CASES[3]
    a = case.inputs("float32").arrays
    slots = a["state_indices"].copy()
    duplicate = slots.copy()
    duplicate[1, 0] = duplicate[0, 0]
    return [(name, case, arrays, {}, ValueError, message) for name, arrays, message in [
        ("row-beyond-pool", {"state_indices": np.where(slots == slots.max(), 16, slots)},
         (r"state_indices: expected entries < P = 16 \(the pool's rows; negative: a padded slot\); got "
          r"state_indices\[\d, \d\] = 16")),
        ("row-twice", {"state_indices": duplicate}, r"state_indices: expected each pool row named at most once"),
        ("accepted-beyond-slots", {"num_accepted_tokens": np.array([1, 5, 1, 1], np.int32)},
         r"num_accepted_tokens: expected at most S = 4 \(state_indices' columns\); got num_accepted_tokens\[1\] = 5"),
        ("sequence-longer-than-slots", {"cu_seqlens": np.array([0, 5, 6, 6, 8], np.int32)},
         r"cu_seqlens: expected at most S = 4 tokens per sequence .*; got 5 tokens in sequence 0"),
        ("cu-beyond-T", {"cu_seqlens": np.array([0, 4, 5, 5, 9], np.int32)},
         r"cu_seqlens: expected cu_seqlens\[-1\] <= T = 8; got cu_seqlens\[-1\] = 9"),
    ]]


@pytest.mark.parametrize("mutation", _host_value_errors(), ids=lambda m: m[0])
def test_host_index_values_are_checked(backend, mutation) -> None:
    """Index values on the host are checked before anything runs: numpy arrays for JAX on any device, CPU
    tensors for torch (on a GPU torch's index arrays live on q's device, where the kernel masks them instead)."""
    if backend.name == "triton":
        if backend.on_gpu:
            pytest.skip("torch index arrays are on q's device on a GPU: masked in the kernel, not checked")
        assert_refused(backend.decode_step, mutation, OP)
    else:
        assert_refused(lambda inputs: backend.decode_step(inputs, host_indices=True), mutation, OP)


# The contract of the new arguments.
def _contract_errors() -> list[tuple[str, ServingCase, dict, dict, type[Exception], str]]:
    """(id, base case, array replacements, dtype replacements, error, message regex)."""
    case = SERVING_CASES[1]
    a = case.inputs("float32").arrays
    raw = case.inputs("float32", raw_gates=True).arrays
    return [(name, case, arrays, dtypes, error, message) for name, arrays, dtypes, error, message in [
        ("indices-rank-3", {"state_indices": a["state_indices"][..., None]}, {}, ValueError,
         r"state_indices: expected a rank-1 or 2 array \[N\] or \[N, S\]; got shape \(3, 2, 1\)"),
        ("indices-float", {}, {"state_indices": "float32"}, TypeError, r"state_indices: expected dtype in"),
        ("indices-N", {"state_indices": a["state_indices"][:2]}, {}, ValueError,
         r"state_indices: expected state_indices.shape\[0\] \(N\) = 3"),
        ("accepted-without-slots", {"state_indices": a["state_indices"][:, 0]}, {}, ValueError,
         r"num_accepted_tokens: expected None unless state_indices is \[N, S\]"),
        ("accepted-N", {"num_accepted_tokens": a["num_accepted_tokens"][:1]}, {}, ValueError,
         r"num_accepted_tokens: expected num_accepted_tokens.shape\[0\] \(N\) = 3"),
        ("pool-heads", {"state": a["state"][:, :1]}, {}, ValueError,
         r"state: expected state.shape\[1:\] = \(2, 16, 100\) \(a pool \[P, HV, K, V\] from q and v\)"),
        ("g-bf16", {}, {"g": "bfloat16"}, TypeError, r"g: expected dtype in \('float32',\); got bfloat16"),
        ("beta-other-16-bit", {}, {"beta": "float16"}, TypeError,
         r"beta: expected dtype in \('float32',\); got float16"),
        ("g-and-a", {"a": raw["a"], "b": raw["b"], "A_log": raw["A_log"], "dt_bias": raw["dt_bias"]}, {}, ValueError,
         r"g: expected None \(the raw gates a, b replace g and beta\)"),
        ("a-without-A_log", {"g": None, "beta": None, "a": raw["a"], "b": raw["b"], "dt_bias": raw["dt_bias"]}, {},
         TypeError, r"A_log: expected an array; got None"),
        ("A_log-shape", {"g": None, "beta": None, "a": raw["a"], "b": raw["b"], "A_log": raw["A_log"][:1],
                         "dt_bias": raw["dt_bias"]}, {}, ValueError, r"A_log: expected A_log.shape = \(2,\)"),
        ("cu-float", {"cu_seqlens": np.array([0, 1, 2, 3], np.float32)}, {"cu_seqlens": "float32"}, TypeError,
         r"cu_seqlens: expected dtype in \('int32', 'int64'\)"),
        ("cu-N", {"cu_seqlens": np.array([0, 1, 3], np.int32)}, {"cu_seqlens": "int32"}, ValueError,
         r"state_indices: expected state_indices.shape\[0\] \(N\) = 2"),
    ]]


@pytest.mark.parametrize("mutation", _contract_errors(), ids=lambda m: m[0])
def test_serving_contract_errors(backend, mutation) -> None:
    assert_refused(backend.decode_step, mutation, OP)


# NaN, inf and −inf.
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreters' sums over the NaN sequence
def test_nan_in_one_sequence_never_reaches_another(backend) -> None:
    """NaN in one sequence's values and inf in a padded slot's queries: every other sequence's o and pool rows
    have the bits of the clean call; the padded slot's o rows are zero."""
    case = ServingCase(H=1, HV=2, K=16, V=16, pool_rows=10, lengths=(2, 3, 1, 2), padded=(3,))
    clean = case.inputs("float16", seed=12)
    o_clean, pool_clean = backend.decode_step(clean)
    v, q = clean.arrays["v"].copy(), clean.arrays["q"].copy()
    v[2:5] = np.nan  # sequence 1
    q[6:8] = np.inf  # sequence 3, padded
    o, pool = backend.decode_step(clean.replace(v=v, q=q))
    assert np.isnan(o[2:5]).all()
    others = np.r_[0:2, 5:6]
    assert np.array_equal(o[others], o_clean[others]) and not o[6:8].any()
    row_1 = clean.arrays["state_indices"][1]
    rows = np.setdiff1d(np.arange(10), [row_1])
    assert np.array_equal(pool[rows], pool_clean[rows]) and np.isnan(pool[row_1]).any()


@pytest.mark.parametrize("raw_gates", [False, True], ids=["g", "raw-a"])
def test_minus_inf_gate_is_a_reset(backend, raw_gates: bool) -> None:
    """g = −inf (or a = +inf with raw gates) at a token: exp(g) = 0 empties S, computed finite; o and the
    states equal the reference."""
    inputs = ServingCase(H=1, HV=2, K=16, V=16, pool_rows=6, lengths=(3, 2)).inputs("float32", seed=13,
                                                                                     raw_gates=raw_gates)
    name = "a" if raw_gates else "g"
    gates = inputs.arrays[name].copy()
    gates[1, 0] = np.inf if raw_gates else -np.inf
    inputs = inputs.replace(**{name: gates})
    o, pool = backend.decode_step(inputs)
    ref_o, ref_pool = reference_decode(inputs)
    assert_close(o, ref_o, OP, "float32")
    assert_state_close(pool, ref_pool)


# No backward.
def test_gradients_are_refused(backend) -> None:
    inputs = SERVING_CASES[0].inputs("float32", seed=14)
    if backend.name == "triton":
        from gdn.triton import decode_step

        a = backend.convert(inputs)
        q = a["q"].requires_grad_()
        with pytest.raises(RuntimeError, match=r"^gdn: decode_step has no backward; q requires grad"):
            decode_step(q, a["k"], a["v"], a["g"], a["beta"], a["state"], state_indices=a["state_indices"])
        torch = backend.torch
        with torch.no_grad():  # grad mode off: no gradient expected, none refused
            decode_step(q, a["k"], a["v"], a["g"], a["beta"], a["state"], state_indices=a["state_indices"])
        return
    import jax

    from gdn.pallas import decode_step

    a = backend.convert(inputs)

    def loss(q):
        return decode_step(q, a["k"], a["v"], a["g"], a["beta"], a["state"], state_indices=a["state_indices"])[0].sum()

    with pytest.raises(TypeError, match=r"^gdn: decode_step has no backward"):
        jax.grad(loss)(a["q"])


# torch: layouts read in place, the interpreter check, CUDA graphs (torch.compile: tests/test_compile.py).
def _fused_torch_inputs(inputs: OpInputs, raw_gates: bool):
    """The Triton adapter's tensors, with q, k, v slices of one fused [T, 2·H·K + HV·V] projection, the gates
    slices of one [T, 2·HV] projection and the pool a transposed view of a [P, HV, V, K] buffer (vLLM's)."""
    torch = BACKENDS["triton"].torch
    t = BACKENDS["triton"].convert(inputs)
    T, H, K = t["q"].shape
    HV, V = t["v"].shape[1:]
    qkv = torch.cat([t["q"].reshape(T, -1), t["k"].reshape(T, -1), t["v"].reshape(T, -1)], dim=1)
    t["q"], t["k"] = qkv[:, :H * K].view(T, H, K), qkv[:, H * K:2 * H * K].view(T, H, K)
    t["v"] = qkv[:, 2 * H * K:].view(T, HV, V)
    gate, strength = ("a", "b") if raw_gates else ("g", "beta")
    gates = torch.cat([t[gate], t[strength]], dim=1)
    t[gate], t[strength] = gates[:, :HV], gates[:, HV:]
    t["state"] = t["state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _triton_decode(t: dict, **flags):
    from gdn.triton import decode_step

    return decode_step(*(t.get(n) for n in DECODE_ARGS[:6]), **{n: t.get(n) for n in DECODE_ARGS[6:]}, **flags)


@pytest.mark.parametrize("raw_gates", [False, True], ids=["g-beta", "raw-gates"])
def test_strided_torch_inputs_are_read_in_place(raw_gates: bool) -> None:
    """Slices of fused projections and a V-first pool: no copy is planned, the pool tensor itself is updated,
    and the bits equal those of contiguous inputs."""
    from gdn.triton import decode

    inputs = SERVING_CASES[3].inputs("bfloat16", seed=15, raw_gates=raw_gates)
    contiguous = BACKENDS["triton"].convert(inputs)
    fused = _fused_torch_inputs(inputs, raw_gates)
    assert not fused["q"].is_contiguous() and not fused["state"].is_contiguous()
    plan = decode.call_plan(*(fused.get(n) for n in DECODE_ARGS))
    assert not any(plan.copies) and plan.state_v_first
    o_ref, pool_ref = _triton_decode(contiguous)
    pool = fused["state"]
    o, out = _triton_decode(fused)
    assert out is pool and out.data_ptr() == pool.data_ptr()
    assert o.equal(o_ref)
    if pool.is_cuda:  # the two layouts are two compiled variants, which may contract S's float32 updates apart
        torch = BACKENDS["triton"].torch
        torch.testing.assert_close(pool, pool_ref, rtol=1e-6, atol=1e-6)
    else:
        assert pool.equal(pool_ref)


def test_other_torch_layouts_are_copied_once() -> None:
    """q whose K axis is strided and a dense state in another layout: copied into the kernel's layout, same
    bits; a pool in such a layout is refused rather than copied."""
    inputs = SERVING_CASES[2].inputs("float32", seed=16)
    t = BACKENDS["triton"].convert(inputs)
    o_ref, _ = _triton_decode(t)
    t = BACKENDS["triton"].convert(inputs)
    q = t["q"]
    t["q"] = q.new_empty(q.shape[:-1] + (2 * q.shape[-1],))[..., ::2].copy_(q)
    o, _ = _triton_decode(t)
    assert o.equal(o_ref)
    pool = t["state"]
    t["state"] = pool.new_empty(pool.shape[:-1] + (2 * pool.shape[-1],))[..., ::2].copy_(pool)
    with pytest.raises(ValueError, match=r"^decode_step: state: expected a pool whose \[HV, K, V\] axes are "
                                         r"contiguous, or whose last two axes are transposed"):
        _triton_decode(t)
    dense = {**t, "state": t["state"][:4], "state_indices": None}
    _, state = _triton_decode(dense)
    assert state.shape == (4,) + pool.shape[1:] and np.isfinite(state.cpu().numpy()).all()


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                        request: pytest.FixtureRequest) -> None:
    """On a CPU tensor with Triton compiling (TRITON_INTERPRET unset), a gdn message, not "0 active drivers"."""
    from gdn.triton import arrays, reset_plans

    torch = BACKENDS["triton"].torch
    monkeypatch.setattr(arrays, "_interpreting", lambda: False)
    reset_plans()  # the plans check the device once per call signature
    request.addfinalizer(reset_plans)
    t = BACKENDS["triton"].convert(SERVING_CASES[0].inputs("float32"))
    t = {n: x.cpu() if isinstance(x, torch.Tensor) else x for n, x in t.items()}
    with pytest.raises(ValueError, match=r"^decode_step: q: expected a CUDA tensor \(CPU tensors run only in the "
                                         r"Triton interpreter: set TRITON_INTERPRET=1 before importing triton\)"):
        _triton_decode(t)


@pytest.mark.gpu
def test_cuda_graph_replays_the_eager_bits() -> None:
    """A decode step with a pool (one token per sequence, then a speculative step with per-token slots and
    accepted counts), captured in a CUDA graph: no host sync, and each replay gives the bits of the eager call
    on the same inputs."""
    torch = BACKENDS["triton"].torch
    for case in (SERVING_CASES[0], SERVING_CASES[3]):
        inputs = case.inputs("bfloat16", seed=18, raw_gates=True, raw_qk=True)
        t = BACKENDS["triton"].convert(inputs)
        pool0 = t["state"].clone()
        flags = {"use_qk_l2norm_in_kernel": True}
        o_eager, _ = _triton_decode(t, **flags)  # also warms the kernel up before capture
        pool_eager = t["state"].clone()
        t["state"].copy_(pool0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph, _ = _triton_decode(t, **flags)
        for _ in range(2):
            t["state"].copy_(pool0)
            graph.replay()
            torch.cuda.synchronize()
            assert o_graph.equal(o_eager) and t["state"].equal(pool_eager)


# JAX: a donated pool is updated in place.
def test_jax_pool_is_donated_and_aliased() -> None:
    """Under jax.jit with the pool donated, the call consumes it (no copy kept) and returns the updated pool;
    index arrays traced inside the jit take the kernel's bounds masking instead of the host check."""
    import jax

    from gdn.pallas import decode_step

    inputs = SERVING_CASES[3].inputs("float32", seed=19)
    a = BACKENDS["pallas"].convert(inputs)
    ref_o, ref_pool = reference_decode(inputs)

    @jax.jit
    def step(q, k, v, g, beta, pool, state_indices, cu_seqlens, num_accepted_tokens):
        return decode_step(q, k, v, g, beta, pool, state_indices=state_indices, cu_seqlens=cu_seqlens,
                           num_accepted_tokens=num_accepted_tokens)

    donated = jax.jit(step.__wrapped__, donate_argnums=(5,))
    pool = a["state"]
    o, new_pool = donated(*(a[n] for n in ("q", "k", "v", "g", "beta", "state", "state_indices", "cu_seqlens",
                                          "num_accepted_tokens")))
    assert pool.is_deleted(), "the donated pool is consumed"
    assert_close(np.asarray(o, np.float64), ref_o, OP, "float32")
    assert_state_close(np.asarray(new_pool, np.float64), ref_pool)
