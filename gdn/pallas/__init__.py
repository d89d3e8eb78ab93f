"""gdn for JAX: Pallas kernels (Triton lowering on GPU, interpreter elsewhere). Importing this never imports torch
or the triton package (the lowering is JAX's own); on a CUDA GPU with triton installed, chunk_fwd_o and
chunk_gated_delta_rule launch gdn.triton's own kernels by default (gdn.pallas.triton_call), importing triton then,
and on sm_90 a dense 16-bit chunk_gated_delta_rule walks in Pallas Mosaic GPU (gdn.pallas.forward_mosaic_gpu).

Every op is jitted internally (a call outside jax.jit costs what a jitted one does) and may be called under a
caller's jax.jit:

- ``chunk_gated_delta_rule(q, k, v, g, beta, ...)`` — the chunked forward (prefill): o and the final state,
  differentiable (jax.custom_vjp); with ``axis_name=`` inside jax.shard_map, one sequence split over a mesh axis
  (context parallel, forward only);
- ``chunk_fwd_o(q, k, v, h, g, ...)`` — the output stage of the chunked forward;
- ``decode_step(q, k, v, g, beta, state, ...)`` — the recurrence token by token per sequence (speculative steps,
  a state pool donated and updated in place);
- ``warmup`` / ``warmup_forward`` — compile the programs later calls at the given lengths need;
- ``compiled_variants()`` — programs compiled so far for calls outside a caller's jax.jit;
- ``bucket_size``, ``pad_to_bucket``, ``pad_forward_to_bucket`` — pad T to a few buckets to bound compiles.

Installed by ``pip install 'gdn[jax]'``; without JAX, importing this raises an ImportError that says so.
"""

try:
    import jax  # noqa: F401
except ModuleNotFoundError as error:
    if error.name not in ("jax", "jaxlib"):
        raise
    raise ImportError("gdn.pallas needs JAX: pip install 'gdn[jax]'") from error

from gdn.pallas.bucketing import bucket_size, pad_forward_to_bucket, pad_to_bucket
from gdn.pallas.chunk_o import chunk_fwd_o, warmup
from gdn.pallas.decode import decode_step
from gdn.pallas.forward import chunk_gated_delta_rule, warmup_forward
from gdn.pallas.variants import compiled_variants

__all__ = ["bucket_size", "chunk_fwd_o", "chunk_gated_delta_rule", "compiled_variants", "decode_step",
           "pad_forward_to_bucket", "pad_to_bucket", "warmup", "warmup_forward"]
