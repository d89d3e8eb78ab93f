"""chunk_gated_delta_rule with lowering="triton_call" (gdn.pallas.triton_call): gdn.triton's forward kernels
(gdn.triton_kernels.forward, chunk_o) launched from JAX through jaxlib's Triton custom call.

CPU: the lowering for sm_90 in a fresh interpreter without TRITON_INTERPRET — Triton compiles the four kernels
for sm_90 and the calls are built against a stand-in for jaxlib's bindings (they exist with JAX's CUDA plugin only),
which records what it is given: a varlen batch forced into 2 pieces lowers to prepare, the map walk, the combine,
the walk and chunk_fwd_o, each a custom call taking its inputs and returning its outputs, with gdn.triton's grids.
And the refusals, and the default path (lowering=None: default_forward_lowering), triton_call where chunk_fwd_o's
default is, the Pallas kernels for a state pool, axis_name and traced softplus scalars. GPU: o and the final state
bit-identical to gdn.triton's on the same inputs (the same kernels, compiled alike, launched by the same plans),
close to the float64 reference; in pieces, under a caller's jit with padded chunk indices, with the raw gates and
in-kernel L2 norm; the gradient is the Pallas backward's; the default call's bits are triton_call's, a state pool's
and a traced scale's the Pallas kernels'.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from gdn.common import forward_contract, spec
from tests import triton_call_stand_in
from tests.backends import BACKENDS, TritonCallBackend
from tests.cases import FORWARD_CASES, ForwardCase, forward_varlen, seed_of, with_raw_inputs
from tests.helpers import assert_close, forward_reference

OP = spec.FORWARD_OP
TRITON_CALL = TritonCallBackend()

_LOWER = '''
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gdn.common import forward_contract, spec
from gdn.pallas import chunk_gated_delta_rule
from tests import triton_call_stand_in

triton_call_stand_in.install(90)
forward_contract.ForwardProblem.pieces = lambda problem, multiprocessors, walk_block_v=None: 2
T, H, HV, K, V, seqlens = json.loads(sys.argv[1])
cu_seqlens = np.cumsum([0] + seqlens).astype(np.int32)
q = jnp.zeros((1, T, H, K), jnp.bfloat16)
v = jnp.zeros((1, T, HV, V), jnp.bfloat16)
g = jnp.zeros((1, T, HV), jnp.float32)
state = jnp.zeros((len(seqlens), HV, K, V), jnp.float32)


def call(q, k, v, g, beta, state):
    return chunk_gated_delta_rule(q, k, v, g, beta, 0.25, state, True, cu_seqlens,
                                  spec.prepare_chunk_indices(cu_seqlens), lowering="triton_call")


text = jax.jit(call).lower(q, q, v, g, g, state).as_text()
print(json.dumps({"launches": triton_call_stand_in.launches,
                  "custom_calls": triton_call_stand_in.custom_calls(text)}))
'''


def test_lowers_to_the_forward_kernels_in_pieces_for_sm90() -> None:
    """A varlen bf16 batch with an initial state and the final state, forced into 2 pieces: one custom call per
    launch of gdn.triton's forward in pieces, the kernels' pointers the present inputs, then the outputs."""
    from gdn.common import tilings

    T, H, HV, K, V, seqlens = 200, 1, 2, 64, 32, [0, 1, 130, 69]
    recorded = triton_call_stand_in.lowered(_LOWER, [T, H, HV, K, V, seqlens])
    N, chunks = len(seqlens), len(spec.prepare_chunk_indices(np.cumsum([0] + seqlens)))
    problem = forward_contract.ForwardProblem(B=1, T=T, H=H, HV=HV, K=K, V=V, N=N, chunks_per_row=chunks, varlen=True,
                                      dtype="bfloat16", use_initial_state=True, output_final_state=True)
    walk_tiles = -(-V // problem.walk.block_v)
    # (kernel, grid, array parameters = present pointers, scalars) of each launch, in order
    expected = [
        ("chunk_prepare_kernel", [chunks * HV, 1, 1], 4 + 2 + 3,  # k v g beta cu ci | g_c w u
         [spec.SOFTPLUS_BETA, spec.SOFTPLUS_THRESHOLD, T, N]),
        ("chunk_walk_kernel", [walk_tiles + -(-K // problem.walk.block_v), N * HV, 1], 4 + 1 + 2,  # map walk
         [1.0, T, 2, 1, 0, 0]),  # k w u g_c cu | map_m map_n
        ("chunk_combine_kernel", [-(-V // tilings.SCAN_TILING.block_v), N * HV, 1], 3 + 1, [2, 0]),
        ("chunk_walk_kernel", [walk_tiles, N * 2 * HV, 1], 5 + 2 + 3, [0.25, T, 2, 0, chunks, 0]),
        ("chunk_fwd_o_kernel", [chunks * HV * -(-V // problem.chunk_o().tiling.block_v), 1, 1], 7 + 1, [0.25, T, N]),
    ]
    assert len(recorded["launches"]) == len(expected), recorded["launches"]
    for launch, (name, grid, pointers, scalars) in zip(recorded["launches"], expected):
        assert launch["kernel"][0] == name and launch["kernel"][4] == 90
        # the PTX entry: the present pointers and scalars, and Triton's global and profile scratch pointers
        assert launch["ptx"] == ["sm_90a", name, pointers + len(scalars) + 2], launch
        assert launch["grid"] == grid, name
        assert launch["parameters"][:pointers] == [["array", 0, 16]] * pointers, name
        assert [p[1] for p in launch["parameters"][pointers:]] == pytest.approx(scalars), name
    # operands -> results of each custom call: prepare 6 -> 3, map walk 5 -> 2, combine 3 -> 1, walk 7 -> 3, o 7 -> 1
    signatures = [call.rsplit(" : ", 1)[1].split(") -> ") for call in recorded["custom_calls"]]
    arities = [(operands.count("tensor<"), results.count("tensor<")) for operands, results in signatures]
    assert arities == [(6, 3), (5, 2), (3, 1), (7, 3), (7, 1)], recorded["custom_calls"]


def _jax_args(case: ForwardCase = FORWARD_CASES[6]) -> dict:
    return TRITON_CALL.convert(case.inputs("float32"))


def _forward(a: dict, **options):
    from gdn.pallas import chunk_gated_delta_rule

    return chunk_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], None, a["initial_state"], True,
                                  np.asarray(a["cu_seqlens"]), **options)


@pytest.mark.parametrize("options, message", [
    ({"interpret": True}, r"interpret: expected None or False with lowering='triton_call' \(compiled kernels "
                          r"only\); got True"),
    ({"axis_name": "x"}, r"axis_name: expected None with lowering='triton_call' \(the context parallel path "
                         r"across devices runs the Pallas kernels\); got 'x'"),
    ({"state_indices": np.arange(7, dtype=np.int32)},
     r"state_indices: expected None with lowering='triton_call' \(a state pool is updated in place; a custom "
     r"call's results are new arrays\); got an array"),
], ids=["interpret", "axis_name", "state_pool"])
def test_refusals(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{OP}: {message}$"):
        _forward(_jax_args(), **{"lowering": "triton_call", **options})


def test_an_unknown_lowering_is_refused() -> None:
    from gdn.pallas.forward import LOWERINGS

    with pytest.raises(ValueError, match=f"^{OP}: lowering: expected None or one of {re.escape(str(LOWERINGS))}; "
                                         "got 'pallas'$"):
        _forward(_jax_args(), lowering="pallas")


@pytest.mark.parametrize("name", ["scale", "softplus_beta"])
def test_a_traced_scalar_is_refused(name: str) -> None:
    import jax

    from gdn.pallas import chunk_gated_delta_rule

    a = _jax_args(FORWARD_CASES[2])
    call = jax.jit(lambda q, k, v, g, beta, x: chunk_gated_delta_rule(q, k, v, g, beta, **{name: x},
                                                                      lowering="triton_call"))
    with pytest.raises(ValueError, match=rf"^{OP}: {name}: expected a Python float or a concrete scalar with "
                                         r"lowering='triton_call' \(it is baked into the compiled calls\); got a "
                                         "traced value"):
        call(a["q"], a["k"], a["v"], a["g"], a["beta"], 0.5)


def test_the_contract_comes_first() -> None:
    a = _jax_args()
    with pytest.raises(ValueError, match=rf"^{OP}: q: expected a rank-4"):
        _forward(dict(a, q=a["q"][0]), lowering="triton_call")


def test_without_a_cuda_gpu_it_says_so() -> None:
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("JAX's default device is a GPU")
    with pytest.raises(ValueError, match=rf"^{OP}: lowering='triton_call' runs compiled Triton kernels on a CUDA "
                                         f"GPU; JAX's default device is {jax.default_backend()}"):
        _forward(_jax_args(), lowering="triton_call")


# The default path (lowering=None): default_forward_lowering. chunk_o.default_lowering answers "triton" off a CUDA
# GPU; stood in for here by a GPU's answer, "triton_call", to check the forward's own fallbacks.
_PLAIN_CALL = {"interpret": None, "scale": 0.5, "softplus_beta": spec.SOFTPLUS_BETA,
               "softplus_threshold": spec.SOFTPLUS_THRESHOLD, "axis_name": None, "state_indices": None}


@pytest.fixture
def triton_call_runs(monkeypatch: pytest.MonkeyPatch) -> list:
    """chunk_o.default_lowering answering "triton_call", as on a CUDA GPU with triton; the (interpret, scale) it
    was asked with."""
    from gdn.pallas import chunk_o

    asked = []
    monkeypatch.setattr(chunk_o, "default_lowering", lambda interpret, scale: asked.append((interpret, scale)) or
                        "triton_call")
    return asked


def test_the_default_off_a_cuda_gpu_is_the_pallas_kernels() -> None:
    import jax

    from gdn.pallas.forward import default_forward_lowering

    if jax.default_backend() == "gpu":
        pytest.skip("JAX's default device is a GPU")
    assert default_forward_lowering(**_PLAIN_CALL) == "triton"


def test_the_default_is_triton_call_where_chunk_fwd_o_defaults_to_it(triton_call_runs: list) -> None:
    from gdn.pallas.forward import default_forward_lowering

    assert default_forward_lowering(**_PLAIN_CALL) == "triton_call"
    assert triton_call_runs == [(None, 0.5)]


@pytest.mark.parametrize("reason", ["axis_name", "state_indices", "softplus_beta", "softplus_threshold"])
def test_the_default_falls_back_to_the_pallas_kernels(triton_call_runs: list, reason: str) -> None:
    """A state pool, axis_name, or a traced softplus scalar (triton_call bakes them into its compiled calls): the
    Pallas kernels, whatever chunk_fwd_o's default is."""
    import jax

    from gdn.pallas.forward import default_forward_lowering

    if reason in ("axis_name", "state_indices"):
        chosen = [default_forward_lowering(**{**_PLAIN_CALL, reason: "seq" if reason == "axis_name" else
                                              np.zeros(3, np.int32)})]
    else:
        chosen = []
        jax.jit(lambda x: chosen.append(default_forward_lowering(**{**_PLAIN_CALL, reason: x})))(1.0)
    assert chosen == ["triton"]


def test_a_call_without_lowering_takes_the_default_path(monkeypatch: pytest.MonkeyPatch,
                                                        triton_call_runs: list) -> None:
    """chunk_gated_delta_rule(lowering=None) reaches the body default_forward_lowering names: triton_call's (its
    scalars baked in) for a plain call, the Pallas kernels' (no scalars) for a state pool and axis_name, and with
    lowering='triton'. The jitted bodies are recorders here: nothing is compiled."""
    from gdn.pallas import forward

    bodies = []

    def recorder(name: str):
        def body(*arrays, call_scalars, **static):
            bodies.append((name, call_scalars))
            return None, None
        return body

    monkeypatch.setattr(forward, "jitted_chunk_gated_delta_rule", recorder("plain"))
    monkeypatch.setattr(forward, "jitted_chunk_gated_delta_rule_pool", recorder("pool"))
    a = _jax_args()
    _forward(a)
    _forward(a, axis_name="seq")
    _forward(a, state_indices=np.arange(len(a["cu_seqlens"]) - 1, dtype=np.int32))
    _forward(a, lowering="triton")
    softplus = (float(spec.SOFTPLUS_BETA), float(spec.SOFTPLUS_THRESHOLD))
    assert bodies == [("plain", (None,) + softplus), ("plain", None), ("pool", None), ("plain", None)]


def test_warmup_forward_warms_the_lowering_later_calls_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """warmup_forward passes lowering on (None: the default later calls resolve to as well)."""
    import jax.numpy as jnp

    from gdn.pallas import forward

    lowerings = []

    def call(*arrays, lowering, **options):
        lowerings.append(lowering)
        return jnp.zeros(1), None

    monkeypatch.setattr(forward, "chunk_gated_delta_rule", call)
    forward.warmup_forward("float16", 32, 32, HV=2, H=1)
    forward.warmup_forward("float16", 32, 32, HV=2, H=1, lowering="triton")
    assert lowerings == [None, "triton"]


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.fixture
def jax_gpu() -> None:
    """Skip unless triton is installed and JAX's default device is a CUDA GPU (torch may see one while JAX
    does not)."""
    pytest.importorskip("triton")
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("lowering='triton_call' needs JAX on a CUDA GPU")


def _assert_triton_bits(inputs, dtype: str, use_qk_l2norm_in_kernel: bool = False,
                        reference: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(o, final state) by triton_call: the bits of gdn.triton on the same inputs, and close to the float64
    reference (forward_reference unless given)."""
    o, state = TRITON_CALL.forward(inputs, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    o_triton, state_triton = BACKENDS["triton"].forward(inputs, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    assert np.array_equal(o, o_triton), "o: triton_call vs gdn.triton: other bits"
    assert np.array_equal(state, state_triton), "final state: triton_call vs gdn.triton: other bits"
    o_ref, state_ref = reference or forward_reference(inputs)
    assert_close(o, o_ref, OP, dtype, "o")
    assert_close(state, state_ref, OP, dtype, "final_state")
    return o, state


_QUICK_CASE = FORWARD_CASES[6]  # varlen with empty and 1-token sequences, an initial state


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    pytest.param(case, marks=() if case is _QUICK_CASE else pytest.mark.slow) for case in FORWARD_CASES],
    ids=lambda c: c.id)
def test_the_bits_of_gdn_triton(jax_gpu, case: ForwardCase) -> None:
    _assert_triton_bits(case.inputs("bfloat16", seed=seed_of(case.id)), "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("case, pieces", [
    (forward_varlen((130, 0, 1, 257, 64), 1, 2, 32, 16), 3),
    pytest.param(ForwardCase(200, 1, 2, 32, 32, initial_state=False), 2, marks=pytest.mark.slow),
    pytest.param(ForwardCase(200, 1, 2, 32, 32), 8, marks=pytest.mark.slow),
], ids=lambda x: x.id if isinstance(x, ForwardCase) else f"P{x}")
def test_the_bits_of_gdn_triton_in_pieces(jax_gpu, monkeypatch, case: ForwardCase, pieces: int) -> None:
    """The context-parallel path (map walk, combine, the walk from every piece's start) forced on small inputs
    in both backends (more pieces than chunks included)."""
    import jax

    from gdn.triton import forward

    monkeypatch.setattr(forward, "context_pieces", lambda *_: pieces)
    monkeypatch.setattr(forward_contract.ForwardProblem, "pieces", lambda *_: pieces)
    jax.clear_caches()  # the JAX forward asks the problem at trace time: no program traced with other pieces
    try:
        _assert_triton_bits(case.inputs("bfloat16", seed=seed_of(case.id)), "bfloat16")
    finally:
        jax.clear_caches()  # nor one traced with these pieces for later tests


@pytest.mark.gpu
def test_under_jit_with_padded_chunk_indices(jax_gpu) -> None:
    """jax.jit over a varlen batch: traced cu_seqlens and chunk_indices padded to a static row count (PAD_CHUNK
    rows) give the eager call's bits, without the final state too."""
    import jax

    from gdn.pallas import chunk_gated_delta_rule

    case = FORWARD_CASES[6]
    inputs = case.inputs("bfloat16", seed=31)
    a = TRITON_CALL.convert(inputs)
    o_eager, state_eager = TRITON_CALL.forward(inputs)
    padded = spec.prepare_chunk_indices(case.cu_seqlens, num_rows=len(spec.prepare_chunk_indices(case.cu_seqlens)) + 3)

    def forward(q, k, v, g, beta, state, cu_seqlens, chunk_indices, output_final_state):
        return chunk_gated_delta_rule(q, k, v, g, beta, inputs.scale, state, output_final_state, cu_seqlens,
                                      chunk_indices, lowering="triton_call")

    call = jax.jit(forward, static_argnames="output_final_state")
    args = [a[n] for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens")] + [jax.numpy.asarray(padded)]
    o, state = call(*args, output_final_state=True)
    assert np.array_equal(TRITON_CALL.numpy(o), o_eager) and np.array_equal(TRITON_CALL.numpy(state), state_eager)
    o, state = call(*args, output_final_state=False)
    assert state is None and np.array_equal(TRITON_CALL.numpy(o), o_eager)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("qk_l2norm, raw_gates", [(True, False), (False, True), (True, True)],
                         ids=["qk_l2norm", "raw_gates", "qk_l2norm-raw_gates"])
def test_the_bits_of_gdn_triton_with_raw_inputs(jax_gpu, qk_l2norm: bool, raw_gates: bool) -> None:
    """use_qk_l2norm_in_kernel and the raw gates (a, b, A_log, dt_bias) computed in the kernels, on the varlen
    batch with empty and 1-token sequences."""
    from gdn.common import reference

    inputs = with_raw_inputs(FORWARD_CASES[6].inputs("bfloat16", seed=32), 33, qk_l2norm, raw_gates)
    a = inputs.arrays
    expected = reference.recurrent_gated_delta_rule(
        a["q"], a["k"], a["v"], a.get("g"), a.get("beta"), inputs.scale, a["initial_state"], True, a["cu_seqlens"],
        a=a.get("a"), b=a.get("b"), A_log=a.get("A_log"), dt_bias=a.get("dt_bias"),
        use_qk_l2norm_in_kernel=qk_l2norm)
    _assert_triton_bits(inputs, "bfloat16", use_qk_l2norm_in_kernel=qk_l2norm, reference=expected)


@pytest.mark.gpu
def test_the_default_on_a_cuda_gpu_is_triton_call(jax_gpu) -> None:
    """With no lowering named, a plain call runs triton_call: o and the final state have its bits (gdn.triton's).
    A state pool and a traced scale under a caller's jit fall back to the Pallas kernels: their bits, close to the
    float64 reference."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule
    from gdn.pallas.forward import default_forward_lowering

    assert default_forward_lowering(**{**_PLAIN_CALL, "scale": None}) == "triton_call"
    inputs = FORWARD_CASES[6].inputs("bfloat16", seed=37)
    a = TRITON_CALL.convert(inputs)
    o, state = _forward(a)
    o_call, state_call = _forward(a, lowering="triton_call")
    assert np.array_equal(np.asarray(o), np.asarray(o_call)) and np.array_equal(np.asarray(state),
                                                                                np.asarray(state_call))
    o_ref, state_ref = forward_reference(inputs)

    # a pool whose row n is sequence n's initial state (each call consumes the pool it is given: a copy)
    indices = np.arange(len(inputs.arrays["cu_seqlens"]) - 1, dtype=np.int32)
    o_pool, pool = _forward(dict(a, initial_state=jnp.array(a["initial_state"])), state_indices=indices)
    o_pallas, pool_pallas = _forward(dict(a, initial_state=jnp.array(a["initial_state"])), state_indices=indices,
                                     lowering="triton")
    assert np.array_equal(np.asarray(o_pool), np.asarray(o_pallas))
    assert np.array_equal(np.asarray(pool), np.asarray(pool_pallas))
    assert_close(TRITON_CALL.numpy(o_pool), o_ref, OP, "bfloat16", "o, state pool")
    assert_close(TRITON_CALL.numpy(pool), state_ref, OP, "bfloat16", "final state, state pool")

    def traced_scale(lowering: str | None):
        return jax.jit(lambda q, k, v, g, beta, state, scale: chunk_gated_delta_rule(
            q, k, v, g, beta, scale, state, True, inputs.arrays["cu_seqlens"], lowering=lowering))

    args = [a[n] for n in ("q", "k", "v", "g", "beta", "initial_state")] + [spec.default_scale(FORWARD_CASES[6].K)]
    o_traced, state_traced = traced_scale(None)(*args)
    o_pallas, state_pallas = traced_scale("triton")(*args)
    assert np.array_equal(np.asarray(o_traced), np.asarray(o_pallas))
    assert np.array_equal(np.asarray(state_traced), np.asarray(state_pallas))
    assert_close(TRITON_CALL.numpy(o_traced), o_ref, OP, "bfloat16", "o, traced scale")


@pytest.mark.gpu
@pytest.mark.slow
def test_gradients_are_the_pallas_backwards(jax_gpu) -> None:
    """jax.vjp through lowering='triton_call' runs the Pallas backward on the same inputs and cotangents: the
    gradients of lowering='triton', bit for bit (the backward recomputes from the inputs alone)."""
    inputs = FORWARD_CASES[6].inputs("bfloat16", seed=34)
    rng = np.random.default_rng(35)
    do = rng.standard_normal(inputs.arrays["v"].shape).astype(np.float32)
    dht = rng.standard_normal(inputs.arrays["initial_state"].shape).astype(np.float32)
    gradients = TRITON_CALL.gradients(inputs, do, dht)
    expected = BACKENDS["pallas"].gradients(inputs, do, dht)
    assert sorted(gradients) == sorted(expected)
    for name, gradient in gradients.items():
        assert np.array_equal(gradient, expected[name]), f"d{name}: other bits than the Pallas lowering's"


@pytest.mark.gpu
@pytest.mark.slow
def test_large_context_parallel_forward_has_the_bits_of_gdn_triton(jax_gpu) -> None:
    """One long sequence with few heads, which both backends cut into pieces on the GPU (tilings.context_pieces
    with the device's SM count: torch's multi_processor_count, JAX's core_count)."""
    case = ForwardCase(16384, 2, 8, 128, 128)
    inputs = case.inputs("bfloat16", seed=36)
    o, state = TRITON_CALL.forward(inputs)
    o_triton, state_triton = BACKENDS["triton"].forward(inputs)
    assert np.array_equal(o, o_triton) and np.array_equal(state, state_triton)
