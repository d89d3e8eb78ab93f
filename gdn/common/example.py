"""Random inputs of gdn's ops shared by ``python -m gdn``, the tests and the benchmarks.

Arrays are numpy float32 rounded to the requested dtype's precision, so every backend and the float64
reference see exactly the same values whatever framework they are converted into.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from gdn.common import spec

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to dtype's precision, returned as float32 (exact for all three input dtypes)."""
    return np.asarray(x, dtype=np.float32).astype(_NUMPY_DTYPES[dtype]).astype(np.float32)


def chunk_local_cumsum(log_gates: np.ndarray, cu_seqlens: np.ndarray | None) -> np.ndarray:
    """Cumulative sum of per-token log-gates [B, T, HV], restarting at every chunk of every sequence."""
    B, T, HV = log_gates.shape
    bounds = np.array([0, T]) if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int64)
    chunk_starts = np.concatenate([np.arange(s, e, spec.CHUNK_SIZE) for s, e in zip(bounds[:-1], bounds[1:])]
                                  + [np.zeros(0, np.int64)])
    resets = np.zeros(T, dtype=bool)
    resets[chunk_starts] = True
    # cumsum over T, minus the running total at the start of each chunk
    total = np.cumsum(log_gates, axis=1)
    before = np.concatenate([np.zeros((B, 1, HV)), total[:, :-1]], axis=1)
    start_index = np.maximum.accumulate(np.where(resets, np.arange(T), 0))
    return (total - before[:, start_index]).astype(log_gates.dtype)


def log_sigmoid_gates(rng: np.random.Generator, shape: tuple[int, ...], gate_scale: float = 1.0) -> np.ndarray:
    """Per-token log-gates as models make them, log σ(x) with x ~ N(2.5, 1): ≈ −0.08·gate_scale per token."""
    return -gate_scale * np.log1p(np.exp(-rng.normal(2.5, 1.0, shape)))


def random_inputs(
    B: int, T: int, H: int, HV: int, K: int, V: int, dtype: str, gated: bool = True,
    cu_seqlens: np.ndarray | None = None, seed: int = 0, gate_scale: float = 1.0,
) -> dict[str, np.ndarray | None]:
    """q, v ~ N(0, 1); k ~ N(0, 1/K) (unit-norm-like rows, as in real models); h ~ N(0, 1) with
    [B, NT, HV, K, V] rows for every chunk; g the chunk-local cumsum of log-sigmoid gates (≈ −0.08·gate_scale
    per token) or None; cu_seqlens as given (varlen needs B = 1)."""
    rng = np.random.default_rng(seed)
    state_rows = spec.num_chunks(T) if cu_seqlens is None else len(spec.prepare_chunk_indices(cu_seqlens))
    g = None
    if gated:
        log_gates = log_sigmoid_gates(rng, (B, T, HV), gate_scale)
        g = chunk_local_cumsum(log_gates, cu_seqlens).astype(np.float32)
    return {
        "q": round_to(rng.standard_normal((B, T, H, K), dtype=np.float32), dtype),
        "k": round_to(rng.standard_normal((B, T, H, K), dtype=np.float32) / np.float32(np.sqrt(K)), dtype),
        "v": round_to(rng.standard_normal((B, T, HV, V), dtype=np.float32), dtype),
        "h": round_to(rng.standard_normal((B, state_rows, HV, K, V), dtype=np.float32), dtype),
        "g": g,
        "cu_seqlens": None if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int32),
    }


def random_recurrent_inputs(
    B: int, T: int, H: int, HV: int, K: int, V: int, dtype: str, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Inputs of the recurrent gated delta rule (gdn.common.reference.recurrent_gated_delta_rule) for B
    sequences of T tokens: q, k [B, T, H, K] with unit-norm rows (models L2-normalize both before the rule),
    v [B, T, HV, V] ~ N(0, 1), g [B, T, HV] per-token log-sigmoid gates (NOT cumulative), beta [B, T, HV]
    sigmoids of N(0, 1), initial_state [B, HV, K, V] ~ N(0, 1) float32. q, k, v rounded to dtype."""
    rng = np.random.default_rng(seed)

    def unit_rows(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return {
        "q": round_to(unit_rows((B, T, H, K)), dtype),
        "k": round_to(unit_rows((B, T, H, K)), dtype),
        "v": round_to(rng.standard_normal((B, T, HV, V)), dtype),
        "g": log_sigmoid_gates(rng, (B, T, HV)).astype(np.float32),
        "beta": (1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, HV))))).astype(np.float32),
        "initial_state": rng.standard_normal((B, HV, K, V)).astype(np.float32),
    }


def random_decode_inputs(
    T: int, H: int, HV: int, K: int, V: int, dtype: str, seed: int = 0, raw_qk: bool = False,
    raw_gates: bool = False,
) -> dict[str, np.ndarray]:
    """Inputs of decode_step over T token rows (gdn.common.spec: q, k [T, H, K], v [T, HV, V]): q, k with
    unit-norm rows, or with raw_qk N(0, 1) rows of any norm (for use_qk_l2norm_in_kernel); v ~ N(0, 1); g, beta
    [T, HV] log-sigmoid gates and sigmoid betas, or with raw_gates a, b [T, HV] ~ N(0, 1) (rounded to dtype)
    with A_log [HV] = log U(1, 16) and dt_bias [HV] ~ N(0, 1) float32, as Qwen3-Next-style layers hold them.
    q, k, v rounded to dtype."""
    rng = np.random.default_rng(seed)
    qk = rng.standard_normal((2, T, H, K))
    if not raw_qk:
        qk /= np.linalg.norm(qk, axis=-1, keepdims=True)
    arrays = {"q": round_to(qk[0], dtype), "k": round_to(qk[1], dtype),
              "v": round_to(rng.standard_normal((T, HV, V)), dtype)}
    if raw_gates:
        arrays.update(a=round_to(rng.standard_normal((T, HV)), dtype), b=round_to(rng.standard_normal((T, HV)), dtype),
                      A_log=np.log(rng.uniform(1.0, 16.0, HV)).astype(np.float32),
                      dt_bias=rng.standard_normal(HV).astype(np.float32))
    else:
        arrays.update(g=log_sigmoid_gates(rng, (T, HV)).astype(np.float32),
                      beta=(1.0 / (1.0 + np.exp(-rng.standard_normal((T, HV))))).astype(np.float32))
    return arrays
