"""chunk_fwd_o for JAX: one Pallas kernel (Triton lowering on GPU), the same algorithm as gdn.triton.chunk_o.

Glossary (FLA's naming, as in the Triton kernel): i_ program ids, o_ offsets, m_ masks, b_ register tiles;
BT = CHUNK_SIZE rows of a chunk, BK/BV the K/V tile widths, NV the number of V tiles. Math and layouts:
gdn.common.spec.

The refs are whole arrays (no BlockSpec tiling: varlen chunks start at arbitrary rows), viewed with the
token axis flattened: q, k [B·T, H, K]; v, o [B·T, HV, V]; h [B·NT, HV, K, V]; g [B·T, HV]. A tile is read
by indexing a ref with integer offset arrays under a mask, ``plgpu.load(q.at[rows, head, cols], mask=,
other=)``: the Pallas spelling of Triton's ``tl.load(q + offsets, mask=, other=)``. The Triton lowering turns
it into the same pointer arithmetic, with int64 offsets only where an array exceeds 4 GiB; the row indices
themselves are int32, so B·T must stay below 2**31 − CHUNK_SIZE (checked in the wrapper).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gdn.common import checks, contract, spec, tilings
from gdn.pallas.arrays import (
    array_info,
    as_index,
    check_token_rows,
    compiler_params,
    host_cu_seqlens,
    index_or_placeholder,
    input_dot_precision,
    is_tracer,
    multiprocessor_count,
    no_backward,
    resolve_interpret,
)

LOWERINGS = ("triton", "mosaic_gpu", "triton_call")
"""chunk_fwd_o's JAX paths: Pallas's Triton lowering (this module); Pallas Mosaic GPU (gdn.pallas.chunk_o_mosaic_gpu);
and gdn.triton's own Triton kernel launched through jaxlib's Triton custom call (gdn.pallas.triton_call). Without
one asked for, default_lowering chooses."""


def default_lowering(interpret: bool | None, scale: float | jax.Array | None) -> str:
    """chunk_fwd_o's JAX path when the caller names none: "triton_call" wherever it runs (compiled on a CUDA GPU,
    triton installed, jaxlib's Triton custom call present, scale not traced), else "triton" (the Pallas-Triton
    lowering; the interpreter on CPU). Measured on an H200 (benchmarks/RESULTS.md), triton_call is faster than
    the Triton lowering at every benchmark shape but one and gives gdn.triton's bits. Mosaic GPU is faster still
    on the dense 16-bit shapes it reads in place, but slower where it must gather (varlen, T not a multiple of
    CHUNK_SIZE): one default for every shape keeps a padded call's bits equal to the unpadded call's
    (pad_to_bucket), so it stays opt-in."""
    if resolve_interpret(interpret) or is_tracer(scale) or importlib.util.find_spec("triton") is None:
        return "triton"
    from jax._src.lib import gpu_triton  # jaxlib's bindings of the custom call (with JAX's CUDA plugin only)

    capability = getattr(jax.devices()[0], "compute_capability", None)
    cuda = capability is not None and str(capability).replace(".", "").isdigit()
    return "triton_call" if cuda and hasattr(gpu_triton, "TritonKernelCall") else "triton"


def chunk_span(i_tg, cu_seqlens, chunk_indices, *, T: int, BT: int, IS_VARLEN: bool):
    """(first token row, end row) of global chunk i_tg (a row of h) in the packed T axis, with
    0 <= end <= B·T. Varlen: from chunk_indices and cu_seqlens [N + 1] (N static here: the ref's length − 1;
    the Triton kernel takes it as an argument). A row that names no chunk of a sequence (PAD_CHUNK, a sequence
    outside [0, N), a chunk outside [0, the sequence's chunk count)) gets an empty span, so every load and
    store of its program is masked off, and cu_seqlens values are clamped into [0, T]: no index array makes a
    program address memory outside its arrays. Dense: batch row i_tg // NT, chunk i_tg % NT."""
    if IS_VARLEN:
        N = cu_seqlens.shape[0] - 1
        i_n = chunk_indices[i_tg, 0]
        i_t = chunk_indices[i_tg, 1]
        m_n = (i_n >= 0) & (i_n < N)
        i_n = jnp.where(m_n, i_n, 0)
        bos = jnp.minimum(jnp.maximum(cu_seqlens[i_n], 0), T)
        eos = jnp.minimum(jnp.maximum(cu_seqlens[i_n + 1], bos), T)
        m_chunk = m_n & (i_t >= 0) & (i_t < pl.cdiv(eos - bos, BT))
        t0 = jnp.where(m_chunk, bos + i_t * BT, bos)
        eos = jnp.where(m_chunk, eos, bos)
    else:
        NT = pl.cdiv(T, BT)
        bos = (i_tg // NT) * T
        eos = bos + T
        t0 = bos + (i_tg % NT) * BT
    return t0, eos


def chunk_o_item(
    i_flat, live, q, k, v, h, g, cu_seqlens, chunk_indices, scale, o, *,
    T: int, H: int, HV: int, K: int, V: int, BT: int, BK: int, BV: int, NV: int,
    USE_G: bool, IS_VARLEN: bool, DOT_PRECISION: jax.lax.Precision | None, G_FLOOR: float, QK_L2NORM: bool,
    QK_L2NORM_EPS: float,
):
    """o of one work item i_flat = one (chunk, value head, V tile); live is False for a persistent program's
    steps past the last item (every load and store masked off), None when every item is live."""
    # Items are ordered V tile fastest, then value head: the programs that read the same q/k chunk run side by
    # side and share it through L2.
    i_v = i_flat % NV
    i_hv = (i_flat // NV) % HV
    i_tg = i_flat // (NV * HV)  # global chunk number = row of h
    i_h = i_hv // (HV // H)  # the q/k head this value head reads
    t0, eos = chunk_span(i_tg, cu_seqlens, chunk_indices, T=T, BT=BT, IS_VARLEN=IS_VARLEN)
    o_t = t0 + jnp.arange(BT, dtype=jnp.int32)  # [BT] token rows of the packed T axis
    m_t = o_t < eos if live is None else (o_t < eos) & live
    o_v = i_v * BV + jnp.arange(BV, dtype=jnp.int32)
    m_v = o_v < V

    # v and g first: every load of the program is in flight before the first dot waits on q, k and h
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = plgpu.load(v.at[o_t[:, None], i_hv, o_v[None, :]], mask=m_tv, other=0)  # [BT, BV]
    if USE_G:
        # −∞ (a reset) read as the finite G_FLOOR (spec.CUMULATIVE_GATE_FLOOR), so g_i − g_j never forms
        # −∞ − (−∞); NaN stays NaN
        b_g = plgpu.load(g.at[o_t, i_hv], mask=m_t, other=0)  # [BT]
        b_g = jnp.where(b_g < G_FLOOR, G_FLOOR, b_g)

    b_o = jnp.zeros([BT, BV], dtype=jnp.float32)
    b_A = jnp.zeros([BT, BT], dtype=jnp.float32)
    b_q_sq = jnp.zeros([BT], dtype=jnp.float32)  # Σ_k q², Σ_k k² per row (QK_L2NORM)
    b_k_sq = jnp.zeros([BT], dtype=jnp.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + jnp.arange(BK, dtype=jnp.int32)
        m_k = o_k < K
        m_qk = m_t[:, None] & m_k[None, :]
        b_q = plgpu.load(q.at[o_t[:, None], i_h, o_k[None, :]], mask=m_qk, other=0)  # [BT, BK]
        b_k = plgpu.load(k.at[o_t[:, None], i_h, o_k[None, :]], mask=m_qk, other=0)  # [BT, BK]
        b_h = plgpu.load(h.at[i_tg, i_hv, o_k[:, None], o_v[None, :]], mask=m_k[:, None] & m_v[None, :],
                         other=0)  # [BK, BV]
        # [BT, BK] @ [BK, BV] -> [BT, BV]: the inter-chunk part q_c h[c]
        b_o += jnp.dot(b_q, b_h.astype(b_q.dtype), precision=DOT_PRECISION, preferred_element_type=jnp.float32)
        # [BT, BK] @ [BK, BT] -> [BT, BT]: the intra-chunk scores q_c k_cᵀ
        b_A += jnp.dot(b_q, b_k.T, precision=DOT_PRECISION, preferred_element_type=jnp.float32)
        if QK_L2NORM:
            b_q_sq += jnp.sum(b_q.astype(jnp.float32) * b_q.astype(jnp.float32), axis=1)
            b_k_sq += jnp.sum(b_k.astype(jnp.float32) * b_k.astype(jnp.float32), axis=1)
    if QK_L2NORM:  # q_i/|q_i| and k_j/|k_j|: o_inter_i and A[i, j] scaled after the dots
        b_q_scale = 1 / jnp.sqrt(b_q_sq + QK_L2NORM_EPS)
        b_o = b_o * b_q_scale[:, None]
        b_A = b_A * b_q_scale[:, None] * (1 / jnp.sqrt(b_k_sq + QK_L2NORM_EPS))[None, :]

    o_i = jnp.arange(BT, dtype=jnp.int32)
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]  # causal, on the chunk's real rows
    if USE_G:
        # o_inter_i *= exp(g_i); A[i, j] *= exp(g_i − g_j) for j <= i, formed inside exp so nothing overflows
        b_o = b_o * jnp.exp(b_g)[:, None]
        b_A = b_A * jnp.exp(jnp.where(m_A, b_g[:, None] - b_g[None, :], -jnp.inf))
    # A[i, j] of a later token j > i selected away, not multiplied by 0: its k_j or g_j may be NaN
    b_A = jnp.where(m_A, b_A, 0)

    # v's non-finite entries leave the dot below, where the zeros of later tokens would turn them into NaN for
    # earlier rows, and come back after it where the causal sum reads them
    m_v_finite = (b_v - b_v) == 0  # [BT, BV]: false for NaN and ±inf
    # [BT, BT] @ [BT, BV] -> [BT, BV]: the intra-chunk part, scale folded in before the cast to v's dtype
    b_o = b_o * scale + jnp.dot((b_A * scale).astype(b_v.dtype), jnp.where(m_v_finite, b_v, 0),
                                precision=DOT_PRECISION, preferred_element_type=jnp.float32)

    def put_back_non_finite_v(b_o):
        # [BT, BT] @ [BT, BV] -> [BT, BV]: how many non-finite v[j, c] with j <= i each o[i, c] sums over
        b_reach = jnp.dot(jnp.where(m_A, 1.0, 0.0).astype(b_v.dtype), jnp.where(m_v_finite, 0.0, 1.0).astype(b_v.dtype),
                          precision=DOT_PRECISION, preferred_element_type=jnp.float32)
        return jnp.where(b_reach > 0, jnp.nan, b_o)

    # this tile of v holds NaN or ±inf: rare, hence the branch
    b_o = jax.lax.cond(jnp.min(m_v_finite.astype(jnp.int32)) == 0, put_back_non_finite_v, lambda b_o: b_o, b_o)
    plgpu.store(o.at[o_t[:, None], i_hv, o_v[None, :]], b_o.astype(o.dtype), mask=m_tv)


def chunk_fwd_o_kernel(q, k, v, h, g, cu_seqlens, chunk_indices, scale, o, *, ITEMS: int, PROGRAMS: int,
                       **item_constants):
    # The Triton kernel's arguments, o last (Pallas passes outputs after inputs); scale is a [1] ref, a runtime
    # value like Triton's scalar argument, so a new scale compiles nothing.
    refs = (q, k, v, h, g, cu_seqlens, chunk_indices, scale[0], o)
    if PROGRAMS == ITEMS:  # one program per work item
        chunk_o_item(pl.program_id(0), None, *refs, **item_constants)
        return

    # Persistent grid (tilings.persistent_programs): program p takes items p, p + PROGRAMS, ... in a loop with a
    # static trip count, which Triton software-pipelines: the next item's loads fly during this item's dots.
    i_program = pl.program_id(0)  # read outside the loop body, as the interpreter requires

    def step(i_step, carry):
        i_item = i_program + i_step * PROGRAMS
        chunk_o_item(jnp.minimum(i_item, ITEMS - 1), i_item < ITEMS, *refs, **item_constants)
        return carry

    jax.lax.fori_loop(0, -(-ITEMS // PROGRAMS), step, 0)


def _launch(q, k, v, h, g, scale, cu_seqlens, chunk_indices, problem: contract.ChunkOProblem, interpret: bool,
            programs: int | None = None):
    """o for a validated problem (cu_seqlens / chunk_indices int32 when varlen, else None). programs: the grid
    size, by default tilings.persistent_programs's choice for the default device (one program per work item, or
    a persistent grid for long inputs on a GPU); any count from 1 to problem.num_programs gives the same bits."""
    q, k, v, h, g, scale = no_backward(spec.CHUNK_O_OP, (q, k, v, h, g, scale))
    items = problem.num_programs
    if items == 0:
        return jnp.zeros(v.shape, v.dtype)
    if programs is None:
        programs = tilings.persistent_programs(items, None if interpret else multiprocessor_count())
    if not 1 <= programs <= items:
        raise ValueError(f"{spec.CHUNK_O_OP}: programs: expected 1 to {items} (the work items); got {programs}")
    B, T, H, HV, K, V = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V
    tiling = problem.tiling
    # Row-major views with the token axis flattened (free in XLA); absent optional inputs become 1-element
    # placeholders that the kernel's static flags never read.
    flat = (q.reshape(B * T, H, K), k.reshape(B * T, H, K), v.reshape(B * T, HV, V),
            h.reshape(B * h.shape[1], HV, K, V))
    g = g.reshape(B * T, HV) if problem.gated else jnp.zeros((1, 1), jnp.float32)
    cu_seqlens = index_or_placeholder(cu_seqlens, (2,))
    chunk_indices = index_or_placeholder(chunk_indices, (1, 2))
    scale = jnp.asarray(scale, jnp.float32).reshape(1)
    kernel = functools.partial(
        chunk_fwd_o_kernel, ITEMS=items, PROGRAMS=programs, T=T, H=H, HV=HV, K=K, V=V,
        BT=spec.CHUNK_SIZE, BK=tiling.block_k, BV=tiling.block_v, NV=problem.num_v_tiles,
        USE_G=problem.gated, IS_VARLEN=problem.varlen,
        DOT_PRECISION=input_dot_precision(problem.dtype, interpret), G_FLOOR=spec.CUMULATIVE_GATE_FLOOR,
        QK_L2NORM=problem.qk_l2norm, QK_L2NORM_EPS=spec.QK_L2NORM_EPS,
    )
    # Every o element of a real token is stored by exactly one work item (chunks tile [0, T) of every batch
    # row, or [0, cu_seqlens[-1] = T) when varlen; V tiles and heads cover V and HV), so o needs no
    # initialization, like torch.empty_like in the Triton backend. (A traced cu_seqlens is not value-checked:
    # one that ends before T leaves the rows after it unwritten, as in the Triton backend.)
    o = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B * T, HV, V), v.dtype),
        grid=(programs,),
        interpret=interpret,
        name="chunk_fwd_o_kernel",
        compiler_params=compiler_params(tiling),
    )(*flat, g, cu_seqlens, chunk_indices, scale)
    return o.reshape(B, T, HV, V)


launch = jax.jit(_launch, static_argnames=("problem", "interpret", "programs"))
"""_launch jitted (and inlined into a caller's jit: jitted_chunk_fwd_o, gdn.pallas.forward's stage 3), with a
derivative that raises (arrays.no_backward; inside the jit, so an eager call pays its tracing once per shape,
not per call)."""


def chunk_fwd_o(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    h: jax.Array,
    g: jax.Array | None = None,
    scale: float | jax.Array | None = None,
    cu_seqlens: jax.Array | np.ndarray | None = None,
    chunk_indices: jax.Array | np.ndarray | None = None,
    *,
    interpret: bool | None = None,
    lowering: str | None = None,
) -> jax.Array:
    """Output of chunked Gated DeltaNet: o [B, T, HV, V] in v's dtype.

    q, k [B, T, H, K]; v [B, T, HV, V]; h [B, NT, HV, K, V]; g [B, T, HV] float32 chunk-local cumulative
    log-gate (the cumsum of the per-token log-gates within each chunk; −∞ is a reset) or None; scale (a Python
    float or a traced scalar) defaults to K**-0.5. Varlen: B = 1, cu_seqlens [N + 1] int32/int64, chunk_indices
    [NT, 2] from gdn.common.spec.prepare_chunk_indices. Without chunk_indices, a concrete cu_seqlens is read on
    the host (a device→host copy for a device array) to build them and check its values (a numpy cu_seqlens is
    always checked, and a numpy chunk_indices against it); other index values are bounded in the kernel
    (gdn.common.contract). Under jax.jit (a traced cu_seqlens) chunk_indices must be passed, padded to a static
    row count (spec.max_chunk_rows). Every array argument may be traced; static under jax.jit: interpret,
    lowering, and the shapes (chunk_indices' row count with them). No derivative: jax.grad / jax.jvp raise.
    interpret=None runs the Pallas interpreter unless the default backend is a GPU. lowering: "triton_call"
    (gdn.pallas.triton_call: gdn.triton's kernel and bits on a CUDA GPU, compiled only, needs triton; scale a
    Python float or a concrete scalar, baked into the compiled call), "triton" (Pallas's Triton lowering, this
    module's kernel; the interpreter on CPU) or "mosaic_gpu" (gdn.pallas.chunk_o_mosaic_gpu: Hopper only, 16-bit
    inputs, K and V in (64, 128)); None: default_lowering (triton_call where it runs, else triton). Non-finite
    inputs: gdn.common.spec.

    Jitted internally (jitted_chunk_fwd_o): a call outside jax.jit costs one jit dispatch, and compiles once
    per shape, dtype and flag combination.
    """
    if lowering is None:
        lowering = default_lowering(interpret, scale)
    elif lowering not in LOWERINGS:
        raise ValueError(f"{spec.CHUNK_O_OP}: lowering: expected None or one of {LOWERINGS}; got {lowering!r}")
    cu_values = host_cu_seqlens(cu_seqlens, chunk_indices, op=spec.CHUNK_O_OP)
    if cu_values is not None:  # varlen values on the host: check them, build chunk_indices when missing
        checked_problem(q, k, v, h, g, cu_seqlens, chunk_indices, cu_values)
        if chunk_indices is None:
            chunk_indices = spec.prepare_chunk_indices(cu_values)
        elif isinstance(chunk_indices, np.ndarray):
            checks.chunk_indices_rows(cu_values, chunk_indices)
    if lowering == "triton_call":
        if interpret:
            raise ValueError(f"{spec.CHUNK_O_OP}: interpret: expected None or False with lowering='triton_call' "
                             "(compiled kernels only); got True")
        return jitted_triton_call(q, k, v, h, g, cu_seqlens, chunk_indices, scale=static_scale(scale))
    return jitted_chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens, chunk_indices, interpret=interpret,
                              lowering=lowering)


def static_scale(scale: float | jax.Array | None) -> float | None:
    """scale as a Python float (None stays None) for lowering='triton_call', which bakes it into the call."""
    if scale is None:
        return None
    if is_tracer(scale):
        raise ValueError(f"{spec.CHUNK_O_OP}: scale: expected a Python float or a concrete scalar with "
                         "lowering='triton_call' (it is baked into the compiled call); got a traced value")
    return float(scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def jitted_triton_call(q, k, v, h, g, cu_seqlens, chunk_indices, *, scale: float | None):
    """chunk_fwd_o with lowering='triton_call': the contract check at trace time, then gdn.triton's kernel
    launched through jaxlib's Triton custom call."""
    checked = checked_problem(q, k, v, h, g, cu_seqlens, chunk_indices)
    from gdn.pallas import triton_call  # triton is imported only by a call that asks for it

    q, k, v, h, g = no_backward(spec.CHUNK_O_OP, (q, k, v, h, g))
    return triton_call.chunk_fwd_o(q, k, v, h, g, as_index(cu_seqlens), as_index(chunk_indices), problem=checked,
                                   scale=spec.default_scale(checked.K) if scale is None else scale,
                                   capability=triton_call.device_capability(spec.CHUNK_O_OP))


@functools.partial(jax.jit, static_argnames=("interpret", "lowering"))
def jitted_chunk_fwd_o(q, k, v, h, g, scale, cu_seqlens, chunk_indices, *, interpret: bool | None,
                       lowering: str = "triton"):
    """chunk_fwd_o's body: the contract check at trace time (on shapes and dtypes), then the kernel of the
    lowering."""
    checked = checked_problem(q, k, v, h, g, cu_seqlens, chunk_indices)
    if scale is None:
        scale = spec.default_scale(checked.K)
    interpret = resolve_interpret(interpret)
    if lowering == "mosaic_gpu":
        from gdn.pallas import chunk_o_mosaic_gpu  # Mosaic GPU is imported only by a call that asks for it

        reason = chunk_o_mosaic_gpu.unsupported_reason(checked, np.dtype(h.dtype).name, interpret)
        if reason is not None:
            raise ValueError(f"{spec.CHUNK_O_OP}: {reason}")
        q, k, v, h, g, scale = no_backward(spec.CHUNK_O_OP, (q, k, v, h, g, scale))
        return chunk_o_mosaic_gpu.launch(q, k, v, h, g, scale, as_index(cu_seqlens), as_index(chunk_indices),
                                         problem=checked, interpret=interpret)
    return launch(q, k, v, h, g, scale, as_index(cu_seqlens), as_index(chunk_indices), problem=checked,
                  interpret=interpret)


def checked_problem(q, k, v, h, g, cu_seqlens, chunk_indices, cu_seqlens_values: np.ndarray | None = None,
                    ) -> contract.ChunkOProblem:
    """chunk_fwd_o's contract check (values of cu_seqlens too when given): the validated problem."""
    infos = (array_info(name, x) for name, x in (("q", q), ("k", k), ("v", v), ("h", h), ("g", g),
                                                  ("cu_seqlens", cu_seqlens), ("chunk_indices", chunk_indices)))
    checked = contract.validate_chunk_o_inputs(*infos, cu_seqlens_values=cu_seqlens_values)
    check_token_rows(checked.B, checked.T, op=spec.CHUNK_O_OP)
    return checked


def warmup(
    dtype: str | jnp.dtype,
    K: int,
    V: int,
    *,
    HV: int,
    H: int,
    gated: bool = True,
    varlen: bool = False,
    state_dtype: str | jnp.dtype | None = None,
    lengths: tuple[int, ...] = (spec.CHUNK_SIZE,),
    interpret: bool | None = None,
) -> None:
    """Compile the programs that later chunk_fwd_o calls with these dtypes, sizes and flags need.

    JAX compiles one program per input shape, so this compiles one per T in ``lengths`` (B = 1; varlen: one
    sequence of T tokens); pad real inputs to those lengths with gdn.pallas.pad_to_bucket so every call hits
    a warm program (e.g. lengths = the buckets CHUNK_SIZE·2^i up to the longest prefill). The tiling comes
    from the static table in gdn.common.spec, never from timing these shapes. Warms calls made outside a
    caller's own jax.jit; a caller's jitted function compiles once per shape on its first call.
    """
    for T in lengths:
        call = spec.warmup_arguments(T, H, HV, K, V, gated, varlen)
        q = jnp.zeros(call["q"], dtype)
        v = jnp.zeros(call["v"], dtype)
        h = jnp.zeros(call["h"], state_dtype or dtype)
        g = jnp.zeros(call["g"], jnp.float32) if gated else None
        chunk_fwd_o(q, q, v, h, g, None, call["cu_seqlens"], call["chunk_indices"],
                    interpret=interpret).block_until_ready()
