"""The backward of chunk_gated_delta_rule, one test body for every backend: every gradient (q, k, v, g, beta,
initial_state, with the final state's gradient flowing in) against float64 autodiff of the token-by-token
recurrence on the edge list, the two backends against each other, the same bits run to run, a few training steps
of a toy GDN layer in both frameworks, torch.compile(fullgraph=True), jax.jit with traced varlen arguments, and
the backward's contract.

The Pallas interpreter spends ~20 s of XLA compilation per shape and flag set (the forward's three kernels and
the backward's six), so on a CPU-only machine the Pallas backend runs the reference check on INTERPRETED_CASES
only, and the tests below reuse those shapes; compiled on a GPU it runs every case.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from gdn.common import forward_contract, reference, spec
from gdn.common.example import round_to
from tests.backends import BACKENDS
from tests.cases import (
    BACKWARD_CASES,
    LARGE_BACKWARD_CASES,
    QUICK_BACKWARD_CASES,
    ForwardCase,
    OpInputs,
    seed_of,
    with_raw_inputs,
)
from tests.helpers import assert_close, skip_unsupported

REFERENCE_CHECKS = ([("float32", i) for i in range(len(BACKWARD_CASES))] + [("float16", i) for i in (1, 4, 7)]
                    + [("bfloat16", i) for i in range(len(BACKWARD_CASES))])
"""(dtype, BACKWARD_CASES index) checked against the float64 reference: every case in float32 and bfloat16 (a GPU
only: the Triton interpreter cannot run bf16 dots, and the Pallas interpreter checks INTERPRETED_CASES), three
in float16 (numpy's float16 makes the Triton interpreter slow)."""

INTERPRETED_CASES = {("float32", 4), ("float32", 6)}
"""The pairs that the Pallas interpreter checks: grouped heads at T = 130, and the varlen batch with empty and
1-token sequences."""


def skip_interpreted_shape(backend, dtype: str, index: int) -> None:
    if backend.name == "pallas" and backend.interpreted and (dtype, index) not in INTERPRETED_CASES:
        pytest.skip("Pallas interpreter: XLA compiles every shape for ~20 s; the GPU run checks this case")


def backward_inputs(case: ForwardCase, dtype: str, seed: int,
                    final_state_gradient: bool = True) -> tuple[OpInputs, np.ndarray, np.ndarray | None]:
    """The forward's inputs of the case, do ~ N(0, 1) rounded to dtype (o's gradient comes in o's dtype) and the
    final state's gradient ~ N(0, 1) float32 (or None)."""
    inputs = case.inputs(dtype, seed=seed)
    rng = np.random.default_rng(seed + 2)
    do = round_to(rng.standard_normal(inputs.arrays["v"].shape), dtype)
    dht = rng.standard_normal((case.N, case.HV, case.K, case.V)).astype(np.float32) if final_state_gradient else None
    return inputs, do, dht


def reference_gradients(inputs: OpInputs, do: np.ndarray, dht: np.ndarray | None,
                        use_qk_l2norm_in_kernel: bool = False) -> dict[str, np.ndarray]:
    a = inputs.arrays
    return reference.recurrent_gated_delta_rule_gradients(
        a["q"], a["k"], a["v"], a["g"], a["beta"], do, dht, inputs.scale, a["initial_state"], a["cu_seqlens"],
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, a=a.get("a"), b=a.get("b"), A_log=a.get("A_log"),
        dt_bias=a.get("dt_bias"))


def assert_gradients_close(grads: dict[str, np.ndarray], ref: dict[str, np.ndarray], dtype: str, what: str) -> None:
    assert sorted(grads) == sorted(ref), f"{what}: gradients of {sorted(grads)}, expected {sorted(ref)}"
    for name in ref:
        assert_close(grads[name], ref[name], spec.BACKWARD_OP, dtype, f"{what}: d{name}")


@functools.lru_cache(maxsize=None)
def case_gradients(backend_name: str, index: int, dtype: str) -> dict[str, np.ndarray]:
    """A backend's gradients on BACKWARD_CASES[index], computed once per pytest process for the reference and the
    parity tests."""
    case = BACKWARD_CASES[index]
    return BACKENDS[backend_name].gradients(*backward_inputs(case, dtype, seed_of(case.id)))


@functools.lru_cache(maxsize=None)
def case_reference(index: int, dtype: str) -> dict[str, np.ndarray]:
    case = BACKWARD_CASES[index]
    return reference_gradients(*backward_inputs(case, dtype, seed_of(case.id)))


@pytest.mark.parametrize("dtype, index", [
    pytest.param(d, i, id=f"{BACKWARD_CASES[i].id}-{d}",
                 marks=() if d == "bfloat16" and i in QUICK_BACKWARD_CASES else pytest.mark.slow)
    for d, i in REFERENCE_CHECKS])
def test_gradients_match_reference(backend, index: int, dtype: str) -> None:
    """Every gradient against float64 autodiff of the recurrence (on a GPU, -m 'not slow' keeps the bf16 row of
    QUICK_BACKWARD_CASES)."""
    skip_unsupported(backend, dtype, spec.BACKWARD_OP)
    skip_interpreted_shape(backend, dtype, index)
    assert_gradients_close(case_gradients(backend.name, index, dtype), case_reference(index, dtype), dtype,
                           f"{backend.name} {BACKWARD_CASES[index].id} {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("index", [4, 6], ids=[BACKWARD_CASES[i].id for i in (4, 6)])
def test_gradients_with_extreme_gates(backend, index: int) -> None:
    """Per-token log-gates uniform in [−20, 0] with exact zeros among them, and a few resets: −inf and −300, below
    spec.GATE_FLOOR (their gradient is 0, as the reference's through exp(g) = 0 nearly is). The chunk-local
    cumsum reaches −20·CHUNK_SIZE and beyond, and every decay must still be formed inside
    exp(where(…, g_i − g_j, −∞)), never exp(−g)."""
    case = BACKWARD_CASES[index]
    inputs, do, dht = backward_inputs(case, "float32", seed=11)
    rng = np.random.default_rng(12)
    g = -rng.uniform(0, 20, inputs.arrays["g"].shape)
    g[rng.random(g.shape) < 0.2] = 0.0
    g[rng.random(g.shape) < 0.03] = -np.inf
    g[rng.random(g.shape) < 0.03] = -300.0
    inputs = inputs.replace(g=g.astype(np.float32))
    assert_gradients_close(backend.gradients(inputs, do, dht), reference_gradients(inputs, do, dht), "float32",
                           f"{backend.name} {case.id} extreme gates")


@pytest.mark.slow
def test_gradients_without_final_state(backend) -> None:
    """output_final_state=False: no final-state gradient flows in (the walk starts from zero). The Pallas
    interpreter covers this path in test_pallas_jit_value_and_grad_varlen."""
    skip_interpreted_shape(backend, "float32", 5)
    case = BACKWARD_CASES[5]
    inputs, do, _ = backward_inputs(case, "float32", seed=13, final_state_gradient=False)
    assert_gradients_close(backend.gradients(inputs, do, None), reference_gradients(inputs, do, None), "float32",
                           f"{backend.name} {case.id} without final state")


@pytest.mark.slow
@pytest.mark.parametrize("pieces", [2, 3])
def test_gradients_with_the_walk_in_pieces(backend, monkeypatch, pieces: int) -> None:
    """The forward and the backward's recompute of h with each sequence cut into pieces (the context-parallel
    path of tilings.context_pieces, which a GPU takes when walks are few), forced on the varlen batch with empty
    and 1-token sequences: the reference's gradients. The Pallas interpreter would compile the batch anew."""
    skip_interpreted_shape(backend, "float32", -1)
    if backend.name == "triton":
        from gdn.triton import forward
        monkeypatch.setattr(forward, "context_pieces", lambda *_: pieces)
    else:  # the Pallas forward asks the problem at trace time: traced anew, without jit's cached programs
        import jax

        monkeypatch.setattr(forward_contract.ForwardProblem, "pieces", lambda *_: pieces)
        jax.clear_caches()
    inputs, do, dht = backward_inputs(BACKWARD_CASES[6], "float32", seed=21)
    assert_gradients_close(backend.gradients(inputs, do, dht), reference_gradients(inputs, do, dht), "float32",
                           f"{backend.name} in {pieces} pieces")


@pytest.mark.slow
@pytest.mark.parametrize("qk_l2norm, raw_gates", [(True, False), (False, True), (True, True)],
                         ids=["qk_l2norm", "raw_gates", "qk_l2norm-raw_gates"])
def test_gradients_reach_the_raw_inputs(backend, qk_l2norm: bool, raw_gates: bool) -> None:
    """use_qk_l2norm_in_kernel and the raw gates (a, b, A_log, dt_bias) with a gradient wanted, on the varlen
    batch with empty and 1-token sequences: the gradients of q, k before the norm and of the raw gates against
    float64 autodiff of the recurrence fed the raw inputs. The Pallas interpreter checks both flags at once."""
    if backend.name == "pallas" and backend.interpreted and not (qk_l2norm and raw_gates):
        pytest.skip("Pallas interpreter: XLA compiles every flag set for ~20 s; both flags at once cover it")
    inputs, do, dht = backward_inputs(BACKWARD_CASES[6], "float32", seed=22)
    inputs = with_raw_inputs(inputs, 23, qk_l2norm, raw_gates)
    assert_gradients_close(backend.gradients(inputs, do, dht, use_qk_l2norm_in_kernel=qk_l2norm),
                           reference_gradients(inputs, do, dht, qk_l2norm), "float32",
                           f"{backend.name} qk_l2norm={qk_l2norm} raw_gates={raw_gates}")


def test_serving_arguments_contract_with_a_gradient(backend) -> None:
    """With a gradient wanted, the serving arguments are checked before anything runs: g beside the raw gates is
    refused, and so is a state pool (updated in place, it has no gradient)."""
    inputs, do, dht = backward_inputs(BACKWARD_CASES[2], "float32", seed=24)
    both = with_raw_inputs(inputs, 31, False, True).replace(g=inputs.arrays["g"])
    with pytest.raises(ValueError, match=r"chunk_gated_delta_rule: g: expected None \(the raw gates a, b replace g "
                                         r"and beta\)"):
        backend.gradients(both, do, dht)
    pool = np.random.default_rng(25).standard_normal((3,) + inputs.arrays["initial_state"].shape[1:])
    inputs = OpInputs({**inputs.arrays, "initial_state": pool.astype(np.float32),
                       "state_indices": np.array([2], np.int32)}, {**inputs.dtypes, "state_indices": "int32"})
    with pytest.raises(ValueError, match=r"chunk_gated_delta_rule: state_indices: expected None when a gradient "
                                         r"is wanted .*; got"):
        backend.gradients(inputs, do, dht)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, index", [("float32", 4), ("float32", 6), ("float16", 6)], ids=str)
def test_backends_agree(index: int, dtype: str) -> None:
    """Triton and Pallas gradients on the same inputs within the dtype's tolerance of each other."""
    if not BACKENDS["triton"].supports(dtype):
        pytest.skip(f"triton does not run {dtype} on this machine")
    skip_interpreted_shape(BACKENDS["pallas"], dtype, index)
    triton, pallas = (case_gradients(name, index, dtype) for name in ("triton", "pallas"))
    assert_gradients_close(triton, pallas, dtype, f"{BACKWARD_CASES[index].id} {dtype}, triton vs pallas")


@pytest.mark.slow
def test_same_bits_run_to_run(backend) -> None:
    """Grouped heads (dq, dk summed over value heads) and varlen, twice: bit-identical gradients."""
    inputs, do, dht = backward_inputs(BACKWARD_CASES[6], "float32", seed=14)
    first, second = backend.gradients(inputs, do, dht), backend.gradients(inputs, do, dht)
    for name in first:
        assert np.array_equal(first[name], second[name]), f"d{name} differs between two runs"


def test_backward_contract(backend) -> None:
    inputs, do, dht = backward_inputs(BACKWARD_CASES[2], "float16", seed=15)
    with pytest.raises(ValueError, match=r"chunk_gated_delta_rule_backward: do: expected do\.shape"):
        backend.backward(inputs, do[:, :-1], dht)
    with pytest.raises(ValueError, match="chunk_gated_delta_rule_backward: final_state_gradient: expected"):
        backend.backward(inputs, do, dht[:, :1])
    with pytest.raises(TypeError, match=r"chunk_gated_delta_rule_backward: do: expected the dtype of o"):
        backend.backward(inputs, do, dht, do_dtype="float32")


@pytest.mark.slow
def test_pallas_jit_value_and_grad_varlen() -> None:
    """jax.jit(jax.value_and_grad) over a varlen batch with traced cu_seqlens and chunk_indices padded to a
    static length (PAD_CHUNK rows), no final state: the float64 reference's loss and gradients."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule

    case = BACKWARD_CASES[6]
    inputs, do, _ = backward_inputs(case, "float32", seed=16, final_state_gradient=False)
    a = inputs.arrays
    chunk_indices = spec.prepare_chunk_indices(case.cu_seqlens, num_rows=len(
        spec.prepare_chunk_indices(case.cu_seqlens)) + 3)
    names = ("q", "k", "v", "g", "beta", "initial_state")

    def loss(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                      chunk_indices=chunk_indices)
        return jnp.sum(o * do)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names)))))(
        *(jnp.asarray(a[n]) for n in names), jnp.asarray(case.cu_seqlens), jnp.asarray(chunk_indices))
    o_ref, _ = reference.recurrent_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], None,
                                                    a["initial_state"], False, a["cu_seqlens"])
    np.testing.assert_allclose(float(value), np.sum(o_ref * do), rtol=1e-5)
    assert_gradients_close({n: np.asarray(x, np.float64) for n, x in zip(names, grads)},
                           reference_gradients(inputs, do, None), "float32", "pallas jit varlen")


def test_triton_autograd_only_when_a_gradient_is_wanted() -> None:
    """No input requires grad, or torch.no_grad: the forward alone runs (no autograd node); otherwise the
    autograd Function."""
    import torch

    triton = BACKENDS["triton"]
    a = triton.convert(BACKWARD_CASES[2].inputs("float32", seed=17))
    from gdn.triton import chunk_gated_delta_rule

    args = {n: a[n] for n in ("q", "k", "v", "g", "beta", "initial_state")}
    assert chunk_gated_delta_rule(**args)[0].grad_fn is None
    args["v"].requires_grad_(True)
    with torch.no_grad():
        assert chunk_gated_delta_rule(**args)[0].grad_fn is None
    assert type(chunk_gated_delta_rule(**args)[0].grad_fn).__name__ == "ChunkGatedDeltaRuleBackward"


# ------------------------------------------------------------------------------- a toy GDN layer, trained

TOY = {"B": 1, "T": 70, "D": 32, "H": 2, "HV": 4, "K": 16, "V": 16}
TOY_STEPS = 4
TOY_LEARNING_RATE = 20.0


def toy_problem(seed: int = 18) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """float32 parameters of a toy GDN layer (q, k, v, gate, beta and output projections) and a regression
    batch (x, y) [B, T, D]."""
    B, T, D, H, HV, K, V = (TOY[n] for n in ("B", "T", "D", "H", "HV", "K", "V"))
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    params = {"wq": weight(D, H * K), "wk": weight(D, H * K), "wv": weight(D, HV * V), "wg": weight(D, HV),
              "bg": np.full(HV, 3.0, np.float32), "wb": weight(D, HV), "wo": weight(HV * V, D)}
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    y = rng.standard_normal((B, T, D)).astype(np.float32)
    return params, x, y


def torch_toy_loss(params: dict, x, y):
    """mean((layer(x) − y)²) of the toy layer, gdn.triton.chunk_gated_delta_rule inside."""
    import torch
    import torch.nn.functional as F

    from gdn.triton import chunk_gated_delta_rule

    B, T, H, HV, K, V = (TOY[n] for n in ("B", "T", "H", "HV", "K", "V"))
    q = F.normalize((x @ params["wq"]).view(B, T, H, K), dim=-1)
    k = F.normalize((x @ params["wk"]).view(B, T, H, K), dim=-1)
    v = (x @ params["wv"]).view(B, T, HV, V)
    g = F.logsigmoid(x @ params["wg"] + params["bg"])
    beta = torch.sigmoid(x @ params["wb"])
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    return ((o.reshape(B, T, HV * V) @ params["wo"] - y) ** 2).mean()


def jax_toy_loss(params: dict, x, y):
    """torch_toy_loss with gdn.pallas.chunk_gated_delta_rule."""
    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule

    B, T, H, HV, K, V = (TOY[n] for n in ("B", "T", "H", "HV", "K", "V"))

    def normalize(z):
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    q = normalize((x @ params["wq"]).reshape(B, T, H, K))
    k = normalize((x @ params["wk"]).reshape(B, T, H, K))
    v = (x @ params["wv"]).reshape(B, T, HV, V)
    g = jax.nn.log_sigmoid(x @ params["wg"] + params["bg"])
    beta = jax.nn.sigmoid(x @ params["wb"])
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    return jnp.mean((o.reshape(B, T, HV * V) @ params["wo"] - y) ** 2)


def train_torch(loss_fn=torch_toy_loss, steps: int = TOY_STEPS) -> tuple[list[float], dict]:
    """steps of plain SGD from toy_problem(): the loss before each step and after the last, and the first
    step's gradients."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params, x, y = toy_problem()
    params = {n: torch.from_numpy(p).to(device).requires_grad_(True) for n, p in params.items()}
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    losses, first_grads = [], None
    for _ in range(steps):
        loss = loss_fn(params, x, y)
        grads = torch.autograd.grad(loss, list(params.values()))
        first_grads = first_grads or {n: d.cpu().numpy() for n, d in zip(params, grads)}
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for p, d in zip(params.values(), grads):
                p -= TOY_LEARNING_RATE * d
    with torch.no_grad():
        losses.append(float(loss_fn(params, x, y)))
    return losses, first_grads


@pytest.mark.slow
def test_training_loss_goes_down_the_same_in_both_backends() -> None:
    """A few SGD steps of the toy layer (grouped heads, a full and a partial chunk) in PyTorch and in JAX (one
    jitted value_and_grad): the loss falls, and the two loss curves agree."""
    import jax
    import jax.numpy as jnp

    torch_losses, _ = train_torch()
    params, x, y = toy_problem()
    params = {n: jnp.asarray(p) for n, p in params.items()}
    jax_losses = []
    with jax.default_matmul_precision("float32"):  # the projections as torch runs them (no TF32 on a GPU)
        step = jax.jit(jax.value_and_grad(jax_toy_loss))
        for _ in range(TOY_STEPS):
            loss, grads = step(params, x, y)
            jax_losses.append(float(loss))
            params = {n: params[n] - TOY_LEARNING_RATE * grads[n] for n in params}
        jax_losses.append(float(jax.jit(jax_toy_loss)(params, x, y)))
    assert all(later < earlier for earlier, later in zip(torch_losses, torch_losses[1:])), torch_losses
    assert torch_losses[-1] < 0.95 * torch_losses[0], torch_losses
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4)


@pytest.mark.parametrize("compiler", [pytest.param("aot_eager", marks=pytest.mark.slow),
                                      pytest.param("inductor", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(compiler: str) -> None:
    """torch.compile(fullgraph=True) traces the toy layer through the custom ops (fake implementations,
    registered autograd): a compiled training step gives the eager losses and gradients."""
    import torch

    torch._dynamo.reset()
    compiled = torch.compile(torch_toy_loss, fullgraph=True, backend=compiler)
    eager_losses, eager_grads = train_torch(steps=1)
    compiled_losses, compiled_grads = train_torch(compiled, steps=1)
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    for name in eager_grads:
        np.testing.assert_allclose(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", LARGE_BACKWARD_CASES, ids=lambda c: c.id)
def test_large_gradients_match_reference(backend, case: ForwardCase, dtype: str) -> None:
    inputs, do, dht = backward_inputs(case, dtype, seed=19)
    grads, ref = backend.gradients(inputs, do, dht), reference_gradients(inputs, do, dht)
    print(f"{backend.name} {case.id} {dtype}: " + ", ".join(
        f"d{n} {np.abs(grads[n] - ref[n]).max() / np.abs(ref[n]).max():.2e}" for n in ref))
    assert_gradients_close(grads, ref, dtype, f"{backend.name} {case.id} {dtype}")


@pytest.mark.gpu
@pytest.mark.slow
def test_large_backends_agree_and_same_bits() -> None:
    case = LARGE_BACKWARD_CASES[1]
    inputs, do, dht = backward_inputs(case, "bfloat16", seed=20)
    runs = {name: [BACKENDS[name].gradients(inputs, do, dht) for _ in range(2)] for name in ("triton", "pallas")}
    for name, (first, second) in runs.items():
        for x in first:
            assert np.array_equal(first[x], second[x]), f"{name}: d{x} differs between two runs"
    assert_gradients_close(runs["triton"][0], runs["pallas"][0], "bfloat16", f"{case.id}, triton vs pallas")
