"""gdn's benchmarks, run from the repository root on a CUDA machine; each writes its results to
benchmarks/results/ and ``python -m benchmarks.report`` assembles benchmarks/RESULTS.md from them.

    python -m benchmarks.chunk_o        chunk_fwd_o against FLA, plain jnp / torch and the memory floor
    python -m benchmarks.forward        chunk_gated_delta_rule against FLA, FlashInfer and jla, and cold starts
    python -m benchmarks.decode         decode_step against FLA and the memory floor, and its tiling sweep
    python -m benchmarks.warmup         compile and warm-up cost of chunk_fwd_o's compile policy
    python -m benchmarks.tune_chunk_o   the tiling sweep behind tilings.chunk_o_tiling
    python -m benchmarks.tune_forward   the forward's stage times and tiling sweeps
    python -m benchmarks.profile_chunk_o   launches for Nsight Compute, host-time breakdown, cold compiles

Shapes and inputs: benchmarks.shapes; timing, tables and result files: benchmarks.harness.
"""
