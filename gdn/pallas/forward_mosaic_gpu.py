"""chunk_gated_delta_rule's walk for JAX with Pallas Mosaic GPU (Hopper, sm_90), o computed in the walk: the
same math as gdn.pallas.forward's chunk_walk_kernel with OUTPUT_O (tilings.FUSED_WALK), chosen with
``gdn.pallas.chunk_gated_delta_rule(..., lowering="mosaic_gpu")`` and by default for dense inputs it takes on sm_90
(gdn.pallas.forward.default_forward_lowering). Prepare, the piece maps and their combine run before it, gdn.triton's
kernels through triton_call where that runs (gdn.pallas.triton_call.forward), else the Pallas kernels of
gdn.pallas.forward (interpret mode among them); this kernel replaces the walk and chunk_fwd_o, so neither the chunk
states h nor v_new reach HBM. Each sequence is cut into pieces enough to fill the GPU with its CTAs
(ForwardProblem.pieces with BV columns per walk).

Measured on an H200 (benchmarks/RESULTS.md, bf16, K = V = 128): 0.61-0.96x gdn.triton's forward time from 8192
tokens on; Nsight Compute at B1 T8192 H16: 57 µs over 128 CTAs (4 pieces of 32 chunks, about 3 200 cycles per
chunk, as jla's fused forward), beside 82 µs of prepare and 127 µs of map walk and combine.

Glossary (as in the Triton-lowered kernels): i_ indices, o_ offsets, m_ masks, b_ register tiles, _s shared
memory (SMEM) tiles; BT = CHUNK_SIZE rows of a chunk. Math and layouts: gdn.common.spec.

Structure (FlashQLA's Hopper forward, as jla's scalar_gate_fused.py writes it in Mosaic GPU). One CTA per
(sequence piece, value head, BV = tilings.MOSAIC_GPU_WALK_BLOCK_V columns of V) walks the piece's chunks in
order with three warpgroups:
  * WG0 (state) holds Sᵀ [BV, K] float32 in registers and runs only the sequential chain, its left operands in
    registers: v_newᵀ = uᵀ − Sᵀ·wᵀ, then Sᵀ ← exp(g_last)·Sᵀ + (v_new ⊙ exp(g_last − g))ᵀ·k. Per chunk it
    publishes Sᵀ (the state the chunk starts from) and v_new, in q's dtype, into double-buffered SMEM;
  * WG1 (output) forms P = q·kᵀ ⊙ exp(g_i − g_j) (j ≤ i) while WG0 works, then o = scale·(exp(g) ⊙ q·S + P·v_new)
    from the published tiles, and stores it through a double-buffered SMEM tile with TMA;
  * WG2 (memory) streams q, k, w, u and the gates of each chunk into STAGES SMEM buffers with TMA.
Barriers: `loaded` (the copies of a stage landed), `freed` (WG0 and WG1 are done with a stage), `published`
and `consumed` (a published Sᵀ / v_new buffer is ready for WG1, and read by it). Every warpgroup waits for the
others before it exits (a warpgroup exiting while another still issues wgmmas has faulted on sm_90).

Chunk slots. A TMA copy into a tiled SMEM tile needs a row offset that is a multiple of 8, so chunk c of the
flattened token axis sits at row c·BT (as in gdn.pallas.chunk_o_mosaic_gpu): dense inputs with T a multiple of
BT are read in place; otherwise every chunk's tokens are gathered into its slot (rows past the sequence zero,
their gates the sequence's last, so that exp(g_last) of a partial chunk is the true one) and o is scattered
back. A piece is chunks [p·NT/P, (p + 1)·NT/P) of its sequence's NT, as in the Pallas walk; the kernel reads
its first slot and chunk count from a small table (walk_chunks), so one compiled kernel serves every length.

Bits: the products and their float32 accumulation order are wgmma's, so o agrees with the Pallas walk's to
rounding, not bit for bit. Interpret mode: gdn.pallas.mosaic_gpu_tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from gdn.common import forward_contract, spec, tilings
from gdn.pallas.arrays import first_chunk_rows
from gdn.pallas.chunk_o_mosaic_gpu import slot_tokens
from gdn.pallas.mosaic_gpu_tiles import (
    COLS,
    DTYPES,
    HEAD_DIMS,
    LOWERING,
    ROWS,
    WGMMA,
    InterpretGPUParams,
    device_reason,
    dot,
    iota,
    load,
    load_transposed,
    smem_tile,
    store_transposed,
)

MEMORY, STATE, OUTPUT = 0, 1, 2
"""The warpgroups of the walk kernel (its "wg" thread index)."""


def unsupported_reason(problem: forward_contract.ForwardProblem, interpret: bool) -> str | None:
    """Why this walk cannot run a validated forward problem ("<argument>: expected …; got …"), or None."""
    if problem.dtype not in DTYPES:
        return f"q: expected dtype in {DTYPES} with {LOWERING} (16-bit wgmma); got {problem.dtype}"
    if problem.K not in HEAD_DIMS or problem.V not in HEAD_DIMS:
        return f"K, V: expected each in {HEAD_DIMS} with {LOWERING}; got K = {problem.K}, V = {problem.V}"
    if problem.pool_rows:
        return (f"state_indices: expected None with {LOWERING} (a state pool is updated in place by the Pallas "
                "walk); got an array")
    return device_reason(interpret)


def takes(dtype: str, K: int, V: int) -> bool:
    """Whether the walk takes q of this dtype with these K and V on JAX's default device (compiled)."""
    return dtype in DTYPES and K in HEAD_DIMS and V in HEAD_DIMS and device_reason(False) is None


def stages(K: int, dtype) -> int:
    """Input stages of the memory warpgroup's pipeline: the most (2 to 4) whose SMEM fits beside the fixed
    tiles within tilings.MOSAIC_GPU_SMEM_BYTES."""
    BT, BV, size = spec.CHUNK_SIZE, tilings.MOSAIC_GPU_WALK_BLOCK_V, jnp.dtype(dtype).itemsize
    per_stage = 3 * BT * K * size + BT * BV * size + 3 * BT * 4  # q, k, w; u; three gate rows
    fixed = 2 * BV * K * size + 4 * BT * BV * size + BV * K * 4  # Sᵀ and v_new published, o staged; the state
    for count in (4, 3, 2):
        if count * per_stage + fixed <= tilings.MOSAIC_GPU_SMEM_BYTES:
            return count
    raise ValueError(f"{LOWERING}: the walk needs {2 * per_stage + fixed} bytes of SMEM")


def chunk_fused_walk_kernel(
    q, k, w, u, g, initial_state, walk_chunks, scale, o, final_state,
    q_s, k_s, w_s, u_s, g_state_s, g_row_s, g_col_s, s_pub, vn_pub, o_s, state_s,
    loaded, freed, published, consumed, state_ready, done, *,
    H: int, HV: int, K: int, BT: int, BV: int, NUM_V: int, STAGES: int, USE_INITIAL_STATE: bool, INTERPRET: bool,
):
    # q, k [slots·BT, H, K], w [slots·BT, HV, K], u [slots·BT, HV, V], g [HV, slots·BT] float32 (cumulative);
    # initial_state, final_state [N·P, HV, V, K] float32 (Sᵀ); walk_chunks [2·N·P] int32; o [slots·BT, HV, V].
    # Compiled, each role runs on its own warpgroup. In interpret mode one thread runs the three roles in order
    # per chunk through the same barriers (the interpreter runs each thread on a host thread, and blocked waits
    # on a 2-core host starve the third).
    i_item = lax.axis_index("item")
    i_v = lax.rem(i_item, NUM_V)
    i_hv = lax.rem(lax.div(i_item, NUM_V), HV)
    i_np = lax.div(i_item, NUM_V * HV)  # sequence·piece
    i_h = lax.div(i_hv, HV // H)
    o_v = pl.ds(i_v * BV, BV)
    i_first = walk_chunks[2 * i_np]  # the piece's first chunk slot and its chunk count
    n_chunks = walk_chunks[2 * i_np + 1]
    dtype = q_s.dtype

    def slot_rows(i_c):
        return pl.ds(pl.multiple_of((i_first + i_c) * BT, BT), BT)

    # memory: chunk i_c's q, k, w, u and gates into stage i_c % STAGES, once WG0 and WG1 freed it
    def issue(i_c, i_s):
        o_t = slot_rows(i_c)
        plgpu.copy_gmem_to_smem(q.at[o_t, i_h], q_s.at[i_s], loaded.at[i_s])
        plgpu.copy_gmem_to_smem(k.at[o_t, i_h], k_s.at[i_s], loaded.at[i_s])
        plgpu.copy_gmem_to_smem(w.at[o_t, i_hv], w_s.at[i_s], loaded.at[i_s])
        plgpu.copy_gmem_to_smem(u.at[o_t, i_hv, o_v], u_s.at[i_s], loaded.at[i_s])
        for g_buffer in (g_state_s, g_row_s, g_col_s):  # one SMEM copy per register layout it is read in
            plgpu.copy_gmem_to_smem(g.at[i_hv, o_t], g_buffer.at[i_s], loaded.at[i_s])

    def memory_prologue():
        for i_c in range(STAGES):
            pl.when(i_c < n_chunks)(functools.partial(issue, i_c, i_c))

    def refill(i_c, carry=None):
        i_s = lax.rem(i_c, STAGES)
        plgpu.barrier_wait(freed.at[i_s])  # WG0 and WG1 are done with chunk i_c − STAGES
        issue(i_c, i_s)
        return carry

    def memory_epilogue():
        def observe(i_c, carry):  # the last releases, so that every completion of the barriers is waited for
            plgpu.barrier_wait(freed.at[lax.rem(i_c, STAGES)])
            return carry

        lax.fori_loop(jnp.maximum(n_chunks - STAGES, 0), n_chunks, observe, None)

    # state: Sᵀ [BV, K] float32 in registers, published per chunk with v_new
    def state_prologue():
        if USE_INITIAL_STATE:
            plgpu.copy_gmem_to_smem(initial_state.at[i_np, i_hv, o_v], state_s, state_ready)
            plgpu.barrier_wait(state_ready)
            return load(state_s, WGMMA, INTERPRET)
        b_s = jnp.zeros((BV, K), jnp.float32)
        return b_s if INTERPRET else plgpu.layout_cast(b_s, WGMMA)

    def state_chunk(i_c, b_s):
        i_s = lax.rem(i_c, STAGES)
        i_b = lax.rem(i_c, 2)  # the published buffer of this chunk
        plgpu.barrier_wait(loaded.at[i_s])

        @pl.when(i_c >= 2)
        def _():  # WG1 has read the buffers published two chunks ago
            plgpu.barrier_wait(consumed.at[i_b])

        b_s_lo = b_s.astype(dtype)
        s_pub.at[i_b][...] = b_s_lo  # Sᵀ, the state the chunk starts from
        b_g = load(g_state_s.at[i_s], COLS, INTERPRET)  # [BT]
        b_g_last = g_state_s[i_s, BT - 1]
        # v_newᵀ = uᵀ − Sᵀ·wᵀ: [BV, K] @ [K, BT] -> [BV, BT]
        b_vn = load_transposed(u_s.at[i_s], INTERPRET).astype(jnp.float32) - dot(
            b_s_lo, w_s.at[i_s], (BV, BT), INTERPRET, transpose_b=True)
        store_transposed(vn_pub.at[i_b], b_vn.astype(dtype), INTERPRET)
        plgpu.commit_smem()
        plgpu.barrier_arrive(published.at[i_b])
        # Sᵀ ← exp(g_last)·Sᵀ + (v_new ⊙ exp(g_last − g))ᵀ·k: [BV, BT] @ [BT, K] -> [BV, K]
        b_vd = (b_vn * lax.broadcast_in_dim(jnp.exp(b_g_last - b_g), (BV, BT), [1])).astype(dtype)
        b_s = dot(b_vd, k_s.at[i_s], (BV, K), INTERPRET, init=b_s * jnp.exp(b_g_last))
        plgpu.barrier_arrive(freed.at[i_s])
        return b_s

    def state_epilogue(b_s):
        def observe(i_c, carry):  # WG1's last reads of the published buffers
            plgpu.barrier_wait(consumed.at[lax.rem(i_c, 2)])
            return carry

        lax.fori_loop(jnp.maximum(n_chunks - 2, 0), n_chunks, observe, None)
        state_s[...] = b_s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(state_s, final_state.at[i_np, i_hv, o_v])
        plgpu.wait_smem_to_gmem(0)

    # output: o of the chunk from q, k, the gates and the published Sᵀ and v_new
    b_scale = scale[0]
    m_causal = iota((BT, BT), 0, INTERPRET) >= iota((BT, BT), 1, INTERPRET)  # j <= i

    def output_chunk(i_c, carry=None, wait_loaded: bool = True):
        i_s = lax.rem(i_c, STAGES)
        i_b = lax.rem(i_c, 2)
        if wait_loaded:  # (in interpret mode state_chunk's wait covers it: a thread waits each phase once)
            plgpu.barrier_wait(loaded.at[i_s])
        b_g_row = load(g_row_s.at[i_s], ROWS, INTERPRET)  # [BT] g_i
        b_g_col = load(g_col_s.at[i_s], COLS, INTERPRET)  # [BT] g_j
        # P = scale·q·kᵀ ⊙ exp(g_i − g_j), j <= i, formed inside exp so nothing overflows: [BT, K] @ [K, BT]
        b_P = dot(q_s.at[i_s], k_s.at[i_s], (BT, BT), INTERPRET, transpose_b=True)
        b_gap = lax.broadcast_in_dim(b_g_row, (BT, BT), [0]) - lax.broadcast_in_dim(b_g_col, (BT, BT), [1])
        b_P = jnp.where(m_causal, b_P * jnp.exp(jnp.where(m_causal, b_gap, -jnp.inf)), 0)
        b_P = (b_P * b_scale).astype(dtype)
        plgpu.barrier_wait(published.at[i_b])
        # o = scale·exp(g) ⊙ q·S + P·v_new: [BT, K] @ [K, BV], then [BT, BT] @ [BT, BV] -> [BT, BV]
        b_o = dot(q_s.at[i_s], s_pub.at[i_b], (BT, BV), INTERPRET, transpose_b=True)
        b_o = b_o * lax.broadcast_in_dim(jnp.exp(b_g_row), (BT, BV), [0]) * b_scale
        b_o = dot(b_P, vn_pub.at[i_b], (BT, BV), INTERPRET, init=b_o)
        plgpu.barrier_arrive(consumed.at[i_b])
        plgpu.barrier_arrive(freed.at[i_s])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the staged o of chunk i_c − 2 has left
        o_s.at[i_b][...] = b_o.astype(o_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s.at[i_b], o.at[slot_rows(i_c), i_hv, o_v])
        return carry

    if INTERPRET:
        memory_prologue()

        def chunk(i_c, b_s):
            pl.when(i_c >= STAGES)(functools.partial(refill, i_c))
            b_s = state_chunk(i_c, b_s)
            output_chunk(i_c, wait_loaded=False)
            return b_s

        state_epilogue(lax.fori_loop(0, n_chunks, chunk, state_prologue()))
        memory_epilogue()
        plgpu.wait_smem_to_gmem(0)
        return

    i_wg = lax.axis_index("wg")

    @pl.when(i_wg == MEMORY)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        memory_prologue()
        lax.fori_loop(STAGES, n_chunks, refill, None)
        memory_epilogue()

    @pl.when(i_wg == STATE)
    def _state():
        plgpu.set_max_registers(232, action="increase")
        state_epilogue(lax.fori_loop(0, n_chunks, state_chunk, state_prologue()))

    @pl.when(i_wg == OUTPUT)
    def _output():
        plgpu.set_max_registers(232, action="increase")
        lax.fori_loop(0, n_chunks, output_chunk, None)
        plgpu.wait_smem_to_gmem(0)

    plgpu.barrier_arrive(done)  # no warpgroup exits while another still issues wgmmas
    plgpu.barrier_wait(done)


def walk_chunks(problem: forward_contract.ForwardProblem, cu_seqlens, pieces: int) -> jax.Array:
    """[2·N·pieces] int32: the first chunk slot and the chunk count of piece p of sequence n at 2·(n·pieces + p):
    chunks [p·NT/P, (p + 1)·NT/P) of the sequence's NT, as the Pallas walk splits them (token rows clamped into
    [0, T], the slots into the problem's)."""
    N, T, BT = problem.N, problem.T, spec.CHUNK_SIZE
    if problem.varlen:  # device values are never trusted: bos, eos within [0, T], slots within the table
        bos = jnp.clip(cu_seqlens[:-1], 0, T)
        eos = jnp.clip(cu_seqlens[1:], bos, T)
        first = first_chunk_rows(cu_seqlens)
    else:
        bos = jnp.arange(N, dtype=jnp.int32) * T
        eos = bos + T
        first = jnp.arange(N, dtype=jnp.int32) * -(-T // BT)
    NT = (eos - bos + BT - 1) // BT
    i_p = jnp.arange(pieces, dtype=jnp.int32)
    c_first = i_p[None, :] * NT[:, None] // pieces
    c_end = (i_p[None, :] + 1) * NT[:, None] // pieces
    i_first = jnp.clip(first[:, None] + c_first, 0, problem.num_chunks_total)
    count = jnp.clip(c_end - c_first, 0, problem.num_chunks_total - i_first)
    return jnp.stack([i_first, count], axis=-1).reshape(-1).astype(jnp.int32)


def fused_walk(problem: forward_contract.ForwardProblem, q, k, w, u, g_cum, initial_state, cu_seqlens,
               chunk_indices, scale, pieces: int, *, interpret: bool):
    """(o [B, T, HV, V] like u, final_state [N, HV, K, V] float32 or None) of a validated problem this walk
    supports (unsupported_reason is None) with tokens (B·T > 0, N·HV > 0), from prepare's g_c, w, u;
    initial_state [N·pieces, HV, K, V] (each piece's start; [N, HV, K, V] for one piece) or None for zeros;
    cu_seqlens / chunk_indices int32 when varlen, else None."""
    B, T, H, HV, K, V, N = problem.B, problem.T, problem.H, problem.HV, problem.K, problem.V, problem.N
    BT, BV = spec.CHUNK_SIZE, tilings.MOSAIC_GPU_WALK_BLOCK_V
    if problem.num_chunks_total == 0:  # tokens but no chunk rows (an empty chunk_indices): no chunk is walked
        final_state = None
        if problem.output_final_state:
            final_state = (jnp.zeros((N, HV, K, V), jnp.float32) if initial_state is None
                           else initial_state.reshape(N, pieces, HV, K, V)[:, -1])
        return jnp.zeros(u.shape, u.dtype), final_state
    rows = B * T
    dtype = q.dtype
    q, k = q.reshape(rows, H, K), k.reshape(rows, H, K)
    if problem.qk_l2norm:  # q_i / |q_i| and k_i / |k_i| as the Pallas walk forms them, before the kernel
        q, k = (x.astype(jnp.float32) for x in (q, k))
        q, k = ((x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + spec.QK_L2NORM_EPS)).astype(dtype)
                for x in (q, k))
    w, u, g = w.reshape(rows, HV, K), u.reshape(rows, HV, V), g_cum.reshape(rows, HV)
    in_slots = not problem.varlen and T % BT == 0
    if not in_slots:  # each chunk's tokens at its slot; a partial chunk's rows past its sequence read as zeros,
        token, gate_token = slot_tokens(problem.chunk_o(), cu_seqlens, chunk_indices)  # their gates its last
        q, k, w, u = (x.at[token].get(mode="fill", fill_value=0) for x in (q, k, w, u))
        g = g.at[gate_token].get(mode="fill", fill_value=0)
    slots = problem.num_chunks_total * BT
    state_rows = N * pieces
    use_initial_state = initial_state is not None
    state_t = (jnp.swapaxes(initial_state.reshape(state_rows, HV, K, V), -1, -2) if use_initial_state
               else jnp.zeros((1, 1, BV, K), jnp.float32))
    num_v = V // BV
    STAGES = stages(K, dtype)
    kernel = functools.partial(chunk_fused_walk_kernel, H=H, HV=HV, K=K, BT=BT, BV=BV, NUM_V=num_v, STAGES=STAGES,
                               USE_INITIAL_STATE=use_initial_state, INTERPRET=interpret)
    gates = plgpu.SMEM((STAGES, BT), jnp.float32)
    o, final_t = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((slots, HV, V), u.dtype),
                  jax.ShapeDtypeStruct((state_rows, HV, V, K), jnp.float32)),
        scratch_types=dict(
            q_s=smem_tile((STAGES, BT, K), dtype), k_s=smem_tile((STAGES, BT, K), dtype),
            w_s=smem_tile((STAGES, BT, K), dtype), u_s=smem_tile((STAGES, BT, BV), dtype),
            g_state_s=gates, g_row_s=gates, g_col_s=gates,
            s_pub=smem_tile((2, BV, K), dtype), vn_pub=smem_tile((2, BT, BV), dtype),
            o_s=smem_tile((2, BT, BV), u.dtype), state_s=plgpu.SMEM((BV, K), jnp.float32),
            loaded=plgpu.Barrier(num_arrivals=7, num_barriers=STAGES),
            freed=plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
            published=plgpu.Barrier(num_barriers=2), consumed=plgpu.Barrier(num_barriers=2),
            state_ready=plgpu.Barrier(), done=plgpu.Barrier(num_arrivals=3)),
        grid=(state_rows * HV * num_v,),
        grid_names=("item",),
        # exp through ex2.approx: the [BT, BT] and [BV, BT] gate factors of every chunk sit on the chains
        compiler_params=plgpu.CompilerParams(approx_math=True),
        num_threads=1 if interpret else 3,
        thread_name="wg",
        # A NaN for every unspecified read in interpret mode (none is expected): a leak into o fails the tests.
        interpret=InterpretGPUParams(out_of_bounds_reads="uninitialized") if interpret else None,
        kernel_name="chunk_fused_walk_kernel",
    )(q, k, w, u, g.T, state_t, walk_chunks(problem, cu_seqlens, pieces), jnp.asarray(scale, jnp.float32).reshape(1))
    if not in_slots:  # each token's row from its slot; slot rows past a sequence are dropped
        o = jnp.zeros((rows, HV, V), o.dtype).at[token].set(o, mode="drop")
    final_state = None
    if problem.output_final_state:  # the last piece's end state of every sequence, back to [K, V]
        final_state = jnp.swapaxes(final_t.reshape(N, pieces, HV, V, K)[:, -1], -1, -2)
    return o.reshape(B, T, HV, V), final_state
