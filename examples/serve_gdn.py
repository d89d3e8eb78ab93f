"""Serving a small Qwen3-Next-style Gated DeltaNet layer with gdn's ops, in PyTorch (gdn.triton) and JAX
(gdn.pallas), every output checked against the float64 recurrence.

The layer, per token x [D]: projections qkvz = x·W_qkvz and ba = x·W_ba; a short causal depthwise convolution
(4 taps, SiLU) over the q, k, v channels; the gated delta rule on raw q, k (L2-normalized in the kernel) with
the gates from the raw a, b (g = −exp(A_log)·softplus(a + dt_bias), beta = sigmoid(b)); the output RMS-normed
per head, gated by SiLU(z) and projected back to D.

A handful of requests are served as an engine does, each request owning a row of a state pool [P, HV, K, V]
(and of a convolution-history pool):
  1. prefill: the prompts packed into one varlen call of chunk_gated_delta_rule, each request's state read from
     and written back to its pool row (state_indices; torch in place, JAX donated), raw q, k normalized and the
     gates computed in the kernels, as in decode;
  2. decode steps: one token per request through decode_step, reading and updating the pool in place (JAX: the
     pool donated under jax.jit), one request paused in the last step (a padded slot: −1, o rows zero);
  3. a speculative step: 4 tokens per request (the next token and 3 drafts), the state after each kept in its
     own pool slot (state_indices [N, 4]); the drafts are accepted in part, and the next step continues from
     each request's last accepted token (num_accepted_tokens) — a rollback at no cost.
Each request's layer outputs are compared with the layer run in float64 over the tokens it kept.

    python examples/serve_gdn.py          # CPU: the Triton interpreter and Pallas interpret mode; GPU: compiled
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, gdn not installed

CONV = 4
"""Taps of the short causal convolution; each request keeps its last CONV − 1 convolution inputs."""


@dataclasses.dataclass(frozen=True)
class Config:
    D: int = 64
    H: int = 2
    HV: int = 4
    K: int = 16
    V: int = 16
    pool_rows: int = 16
    norm_eps: float = 1e-6

    @property
    def conv_channels(self) -> int:
        return 2 * self.H * self.K + self.HV * self.V


def make_params(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of the layer (A_log = log U(1, 16) and dt_bias ~ N(0, 1) as Qwen3-Next
    initializes them)."""
    rng = np.random.default_rng(seed)
    C, HVV = cfg.conv_channels, cfg.HV * cfg.V
    return {name: x.astype(np.float32) for name, x in {
        "W_qkvz": rng.standard_normal((cfg.D, C + HVV)) / np.sqrt(cfg.D),
        "W_ba": rng.standard_normal((cfg.D, 2 * cfg.HV)) / np.sqrt(cfg.D),
        "conv": rng.standard_normal((CONV, C)) / np.sqrt(CONV),
        "A_log": np.log(rng.uniform(1.0, 16.0, cfg.HV)),
        "dt_bias": rng.standard_normal(cfg.HV),
        "norm": 1.0 + 0.1 * rng.standard_normal(cfg.V),
        "W_out": rng.standard_normal((HVV, cfg.D)) / np.sqrt(HVV),
    }.items()}


# The layer's glue around the recurrence, written once for numpy, torch and jax.numpy (the `xp` argument): only
# operations the three spell alike.
def project(xp, p: dict, cfg: Config, x) -> tuple:
    """x [n, D] -> (qkv [n, C] before the convolution, z [n, HV, V], b [n, HV], a [n, HV])."""
    qkvz, ba = x @ p["W_qkvz"], x @ p["W_ba"]
    C = cfg.conv_channels
    return qkvz[:, :C], qkvz[:, C:].reshape(-1, cfg.HV, cfg.V), ba[:, :cfg.HV], ba[:, cfg.HV:]


def silu(xp, x):
    return x / (1 + xp.exp(-x))


def causal_conv(xp, p: dict, history, qkv) -> tuple:
    """The depthwise causal convolution of qkv [n, C] after history [CONV − 1, C] (the inputs before it), SiLU:
    (y [n, C], the new history: the last CONV − 1 inputs)."""
    window = xp.concatenate([history, qkv])
    n = qkv.shape[0]
    y = sum(window[j:j + n] * p["conv"][j] for j in range(CONV))
    return silu(xp, y), window[n:]


def split_heads(cfg: Config, y) -> tuple:
    """Convolved channels [n, C] -> q, k [n, H, K], v [n, HV, V]."""
    HK = cfg.H * cfg.K
    return (y[:, :HK].reshape(-1, cfg.H, cfg.K), y[:, HK:2 * HK].reshape(-1, cfg.H, cfg.K),
            y[:, 2 * HK:].reshape(-1, cfg.HV, cfg.V))


def output(xp, p: dict, cfg: Config, o, z):
    """o, z [n, HV, V] -> [n, D]: RMS norm per head, times SiLU(z), projected back to D."""
    o = o * (1 / xp.sqrt((o * o).sum(-1)[..., None] / cfg.V + cfg.norm_eps)) * p["norm"]
    return (o * silu(xp, z)).reshape(-1, cfg.HV * cfg.V) @ p["W_out"]


def reference_layer(p: dict, cfg: Config, x: np.ndarray) -> np.ndarray:
    """The layer over one request's token stream x [n, D] from an empty state, in float64: outputs [n, D]."""
    from gdn.common import reference

    p = {name: w.astype(np.float64) for name, w in p.items()}
    qkv, z, b, a = project(np, p, cfg, x.astype(np.float64))
    y, _ = causal_conv(np, p, np.zeros((CONV - 1, cfg.conv_channels)), qkv)
    q, k, v = split_heads(cfg, y)
    o, _ = reference.recurrent_gated_delta_rule(q[None], k[None], v[None], None, None, use_qk_l2norm_in_kernel=True,
                                                a=a[None], b=b[None], A_log=p["A_log"], dt_bias=p["dt_bias"])
    return output(np, p, cfg, o[0], z)


# The schedule, the same for both frameworks.
PROMPTS = (9, 3, 1, 6)
"""Prompt lengths of the requests (one of a single token)."""
DECODE_STEPS = 2
SPECULATIVE_TOKENS = 4
ACCEPTED = (2, 4, 1, 3)
"""Tokens of the speculative step each request keeps (the next token, then drafts): the rest is rolled back."""


@dataclasses.dataclass
class Schedule:
    """The token embeddings each call gets and the pool rows of each request."""

    prompts: list[np.ndarray]
    decode: list[np.ndarray]  # [N, D] per decode step
    speculative: np.ndarray  # [N · SPECULATIVE_TOKENS, D], request-major
    final: np.ndarray  # [N, D]: the token after the accepted ones
    rows: np.ndarray  # [N]: each request's pool row
    slots: np.ndarray  # [N, SPECULATIVE_TOKENS]: the speculative step's per-token slots (column 0 = rows)

    @staticmethod
    def make(cfg: Config, seed: int = 1) -> Schedule:
        rng = np.random.default_rng(seed)
        N = len(PROMPTS)

        def tokens(n: int) -> np.ndarray:
            return rng.standard_normal((n, cfg.D)).astype(np.float32)

        free = rng.permutation(cfg.pool_rows)[:N * SPECULATIVE_TOKENS].reshape(N, SPECULATIVE_TOKENS)
        return Schedule([tokens(n) for n in PROMPTS], [tokens(N) for _ in range(DECODE_STEPS)],
                        tokens(N * SPECULATIVE_TOKENS), tokens(N), free[:, 0].astype(np.int32),
                        free.astype(np.int32))

    def paused(self, step: int) -> int | None:
        """The request paused in decode step `step` (a padded slot), if any: request 2 in the last one."""
        return 2 if step == DECODE_STEPS - 1 else None

    def streams(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each request's tokens through the speculative step (all its drafts), and the tokens it kept through
        the final step: what the float64 layer runs over."""
        N = len(PROMPTS)
        drafts = self.speculative.reshape(N, SPECULATIVE_TOKENS, -1)
        through_drafts, kept = [], []
        for n in range(N):
            decoded = [step[n:n + 1] for i, step in enumerate(self.decode) if self.paused(i) != n]
            history = np.concatenate([self.prompts[n], *decoded])
            through_drafts.append(np.concatenate([history, drafts[n]]))
            kept.append(np.concatenate([history, drafts[n, :ACCEPTED[n]], self.final[n:n + 1]]))
        return through_drafts, kept


def run_torch(cfg: Config, params: dict, schedule: Schedule) -> dict[str, list[np.ndarray]]:
    """The engine in PyTorch: per request the layer outputs of the speculative step (all its tokens) and of the
    final step, and the decode steps' outputs."""
    import torch

    from gdn.triton import chunk_gated_delta_rule, decode_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = {name: torch.from_numpy(w).to(device) for name, w in params.items()}
    pool = torch.zeros(cfg.pool_rows, cfg.HV, cfg.K, cfg.V, device=device)
    conv_pool = torch.zeros(cfg.pool_rows, CONV - 1, cfg.conv_channels, device=device)
    rows = torch.from_numpy(schedule.rows).to(device)
    N = len(PROMPTS)

    def convolve(qkv, lengths, request_rows) -> torch.Tensor:
        """The causal convolution of packed sequences from their requests' histories, histories updated."""
        out, start = [], 0
        for n, length in zip(request_rows.tolist(), lengths):
            y, conv_pool[n] = causal_conv(torch, p, conv_pool[n], qkv[start:start + length])
            out.append(y)
            start += length
        return torch.cat(out)

    # 1. prefill: the prompts packed; initial states gathered from the pool, final states scattered back
    x = torch.from_numpy(np.concatenate(schedule.prompts)).to(device)
    qkv, z, b, a = project(torch, p, cfg, x)
    q, k, v = split_heads(cfg, convolve(qkv, PROMPTS, rows))
    cu_seqlens = torch.tensor(np.cumsum((0,) + PROMPTS), dtype=torch.int32, device=device)
    o, _ = chunk_gated_delta_rule(q[None], k[None], v[None], None, None, initial_state=pool, output_final_state=True,
                                  cu_seqlens=cu_seqlens, state_indices=rows.to(torch.int32), a=a[None], b=b[None],
                                  A_log=p["A_log"], dt_bias=p["dt_bias"], use_qk_l2norm_in_kernel=True)
    outputs = {"prefill": output(torch, p, cfg, o[0], z)}

    # 2. decode steps: the pool read and updated in place; a paused request is a padded slot
    decoded = []
    for step, tokens in enumerate(schedule.decode):
        paused = schedule.paused(step)
        live = [n for n in range(N) if n != paused]
        x = torch.from_numpy(tokens).to(device)
        qkv, z, b, a = project(torch, p, cfg, x)
        y = torch.zeros_like(qkv)
        y[live] = convolve(qkv[live], [1] * len(live), rows[live])
        q, k, v = split_heads(cfg, y)
        state_indices = torch.where(torch.arange(N, device=device) == (paused if paused is not None else -1), -1,
                                    rows).to(torch.int32)
        o, _ = decode_step(q, k, v, None, None, pool, state_indices=state_indices, a=a, b=b, A_log=p["A_log"],
                           dt_bias=p["dt_bias"], use_qk_l2norm_in_kernel=True)
        if paused is not None:
            assert not o[paused].any(), "a padded slot's o rows are zero"
        decoded.append(output(torch, p, cfg, o, z))
    outputs["decode"] = [torch.cat([d[n:n + 1] for i, d in enumerate(decoded) if schedule.paused(i) != n])
                         for n in range(N)]

    # 3. a speculative step: each token's state in its own slot; then the next token from the accepted ones
    slots = torch.from_numpy(schedule.slots).to(device)
    histories = conv_pool[rows].clone()  # the convolution histories before the drafts, for the rollback
    x = torch.from_numpy(schedule.speculative).to(device)
    qkv, z, b, a = project(torch, p, cfg, x)
    q, k, v = split_heads(cfg, convolve(qkv, [SPECULATIVE_TOKENS] * N, rows))
    spec_cu = torch.arange(0, N * SPECULATIVE_TOKENS + 1, SPECULATIVE_TOKENS, dtype=torch.int32, device=device)
    o, _ = decode_step(q, k, v, None, None, pool, state_indices=slots, cu_seqlens=spec_cu,
                       num_accepted_tokens=torch.ones(N, dtype=torch.int32, device=device), a=a, b=b,
                       A_log=p["A_log"], dt_bias=p["dt_bias"], use_qk_l2norm_in_kernel=True)
    speculative = output(torch, p, cfg, o, z).reshape(N, SPECULATIVE_TOKENS, cfg.D)
    for n in range(N):  # the convolution history after the accepted tokens
        window = torch.cat([histories[n], qkv[n * SPECULATIVE_TOKENS:n * SPECULATIVE_TOKENS + ACCEPTED[n]]])
        conv_pool[rows[n]] = window[-(CONV - 1):]
    x = torch.from_numpy(schedule.final).to(device)
    qkv, z, b, a = project(torch, p, cfg, x)
    q, k, v = split_heads(cfg, convolve(qkv, [1] * N, rows))
    accepted = torch.tensor(ACCEPTED, dtype=torch.int32, device=device)
    o, _ = decode_step(q, k, v, None, None, pool, state_indices=slots, num_accepted_tokens=accepted, a=a, b=b,
                       A_log=p["A_log"], dt_bias=p["dt_bias"], use_qk_l2norm_in_kernel=True)
    outputs["speculative"], outputs["final"] = list(speculative), list(output(torch, p, cfg, o, z))
    return {name: [np.asarray(t.double().cpu()) for t in value] if isinstance(value, list)
            else np.asarray(value.double().cpu()) for name, value in outputs.items()}


def run_jax(cfg: Config, params: dict, schedule: Schedule) -> dict[str, list[np.ndarray]]:
    """The same engine in JAX: the decode calls jitted with the pool donated, so it is updated in place."""
    import jax

    # the layer's own float32 matmuls (projections, output) in float32, as numpy and torch run them: XLA on a GPU
    # multiplies float32 in TF32 by default (~1e-3 relative)
    with jax.default_matmul_precision("float32"):
        return run_jax_engine(cfg, params, schedule)


def run_jax_engine(cfg: Config, params: dict, schedule: Schedule) -> dict[str, list[np.ndarray]]:
    """run_jax's engine, under the float32 matmul precision that run_jax sets."""
    import functools

    import jax
    import jax.numpy as jnp

    from gdn.pallas import chunk_gated_delta_rule, decode_step

    p = {name: jnp.asarray(w) for name, w in params.items()}
    pool = jnp.zeros((cfg.pool_rows, cfg.HV, cfg.K, cfg.V), jnp.float32)
    conv_pool = jnp.zeros((cfg.pool_rows, CONV - 1, cfg.conv_channels), jnp.float32)
    rows = schedule.rows
    N = len(PROMPTS)

    def convolve(qkv, lengths, request_rows):
        nonlocal conv_pool
        out, start = [], 0
        for n, length in zip(request_rows, lengths):
            y, history = causal_conv(jnp, p, conv_pool[n], qkv[start:start + length])
            conv_pool = conv_pool.at[n].set(history)
            out.append(y)
            start += length
        return jnp.concatenate(out)

    @functools.partial(jax.jit, donate_argnums=(3,))
    def decode(q, k, v, pool, a, b, state_indices, cu_seqlens, num_accepted_tokens):
        return decode_step(q, k, v, None, None, pool, state_indices=state_indices, cu_seqlens=cu_seqlens,
                           num_accepted_tokens=num_accepted_tokens, a=a, b=b, A_log=p["A_log"], dt_bias=p["dt_bias"],
                           use_qk_l2norm_in_kernel=True)

    # 1. prefill
    qkv, z, b, a = project(jnp, p, cfg, jnp.asarray(np.concatenate(schedule.prompts)))
    q, k, v = split_heads(cfg, convolve(qkv, PROMPTS, rows))
    cu_seqlens = np.cumsum((0,) + PROMPTS).astype(np.int32)
    o, pool = chunk_gated_delta_rule(q[None], k[None], v[None], None, None, initial_state=pool,
                                     output_final_state=True, cu_seqlens=cu_seqlens,
                                     state_indices=rows.astype(np.int32), a=a[None], b=b[None], A_log=p["A_log"],
                                     dt_bias=p["dt_bias"], use_qk_l2norm_in_kernel=True)
    outputs = {"prefill": output(jnp, p, cfg, o[0], z)}

    # 2. decode steps
    decoded = []
    for step, tokens in enumerate(schedule.decode):
        paused = schedule.paused(step)
        live = [n for n in range(N) if n != paused]
        qkv, z, b, a = project(jnp, p, cfg, jnp.asarray(tokens))
        y = jnp.zeros_like(qkv).at[np.array(live)].set(convolve(qkv[np.array(live)], [1] * len(live), rows[live]))
        q, k, v = split_heads(cfg, y)
        state_indices = np.where(np.arange(N) == (paused if paused is not None else -1), -1, rows).astype(np.int32)
        o, pool = decode(q, k, v, pool, a, b, jnp.asarray(state_indices), None, None)
        decoded.append(output(jnp, p, cfg, o, z))
    outputs["decode"] = [jnp.concatenate([d[n:n + 1] for i, d in enumerate(decoded) if schedule.paused(i) != n])
                         for n in range(N)]

    # 3. the speculative step and the step after it
    histories = conv_pool[rows]
    qkv, z, b, a = project(jnp, p, cfg, jnp.asarray(schedule.speculative))
    q, k, v = split_heads(cfg, convolve(qkv, [SPECULATIVE_TOKENS] * N, rows))
    spec_cu = jnp.arange(0, N * SPECULATIVE_TOKENS + 1, SPECULATIVE_TOKENS, dtype=jnp.int32)
    slots = jnp.asarray(schedule.slots)
    o, pool = decode(q, k, v, pool, a, b, slots, spec_cu, jnp.ones(N, jnp.int32))
    speculative = output(jnp, p, cfg, o, z).reshape(N, SPECULATIVE_TOKENS, cfg.D)
    for n in range(N):
        window = jnp.concatenate([histories[n], qkv[n * SPECULATIVE_TOKENS:n * SPECULATIVE_TOKENS + ACCEPTED[n]]])
        conv_pool = conv_pool.at[rows[n]].set(window[-(CONV - 1):])
    qkv, z, b, a = project(jnp, p, cfg, jnp.asarray(schedule.final))
    q, k, v = split_heads(cfg, convolve(qkv, [1] * N, rows))
    o, pool = decode(q, k, v, pool, a, b, slots, None, jnp.asarray(ACCEPTED, jnp.int32))
    outputs["speculative"], outputs["final"] = list(speculative), list(output(jnp, p, cfg, o, z))
    return {name: [np.asarray(t, np.float64) for t in value] if isinstance(value, list)
            else np.asarray(value, np.float64) for name, value in outputs.items()}


def check(cfg: Config, params: dict, schedule: Schedule, outputs: dict) -> float:
    """The largest error of the engine's outputs against the float64 layer over each request's tokens,
    relative to the largest output."""
    through_drafts, kept = schedule.streams()
    errors, scale = [], 0.0
    start = 0
    for n, length in enumerate(PROMPTS):
        with_drafts = reference_layer(params, cfg, through_drafts[n])
        accepted = reference_layer(params, cfg, kept[n])
        pairs = [(outputs["prefill"][start:start + length], accepted[:length]),
                 (outputs["decode"][n], accepted[length:length + len(outputs["decode"][n])]),
                 (outputs["speculative"][n], with_drafts[-SPECULATIVE_TOKENS:]),
                 (outputs["final"][n], accepted[-1])]
        start += length
        for out, ref in pairs:
            errors.append(np.abs(out - ref).max())
            scale = max(scale, np.abs(ref).max())
    return max(errors) / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["all", "triton", "pallas"], default="all")
    parser.add_argument("--tolerance", type=float, default=5e-4,
                        help="largest relative error accepted (float32; the prefill's dots are tf32x3 on a GPU)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = Config()
    params, schedule = make_params(cfg), Schedule.make(cfg)
    print(f"gdn serving example: {len(PROMPTS)} requests, prompts {list(PROMPTS)}, D={cfg.D} H={cfg.H} HV={cfg.HV} "
          f"K={cfg.K} V={cfg.V}, pool of {cfg.pool_rows} states; {DECODE_STEPS} decode steps, a "
          f"{SPECULATIVE_TOKENS}-token speculative step keeping {list(ACCEPTED)} tokens")
    runners = {"triton": run_torch, "pallas": run_jax}
    ok = True
    for name in runners if args.backend == "all" else [args.backend]:
        error = check(cfg, params, schedule, runners[name](cfg, params, schedule))
        ok &= error <= args.tolerance
        print(f"{name:>7}: max error vs the float64 layer {error:.2e} (relative) "
              f"{'ok' if error <= args.tolerance else 'TOO LARGE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
