"""gdn: chunked Gated DeltaNet kernels, written once from one spec in Triton for PyTorch (gdn.triton) and in
Pallas with the Triton lowering for JAX (gdn.pallas). Each backend has the same public ops:

- ``chunk_gated_delta_rule`` — the whole chunked forward (prefill): raw q, k, v, g, beta to o and the final state;
- ``chunk_fwd_o`` — the output stage of the chunked forward, from q, k, v, the per-chunk states h and the gates;
- ``decode_step`` — the recurrence token by token per sequence (decoding; from a state pool in place, speculative
  steps with rollback);
- ``warmup`` / ``warmup_forward`` — compile what later calls need; ``compiled_variants`` counts the compiles;
- JAX only: ``bucket_size``, ``pad_to_bucket``, ``pad_forward_to_bucket`` — shape buckets that bound compiles.

Import the backend you use: ``gdn.triton`` imports torch and triton only (``pip install 'gdn[torch]'``),
``gdn.pallas`` jax only (``pip install 'gdn[jax]'``). The spec (math, layouts, tilings, input contract) and the
float64 references are in gdn.common, which needs numpy and ml_dtypes only.
"""

from gdn.common.spec import CHUNK_SIZE

__version__ = "0.1.0"
__all__ = ["CHUNK_SIZE"]
