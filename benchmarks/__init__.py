"""Benchmarks of gdn: chunk_fwd_o speed against FLA and plain formulations (chunk_o), cold start (warmup).

Run from the repository root on a CUDA machine: ``python -m benchmarks.chunk_o``, ``python -m benchmarks.warmup``.
"""
