"""gdn for JAX: Pallas kernels (Triton lowering on GPU, interpreter elsewhere). Importing this never imports torch."""

from gdn.pallas.bucketing import bucket_size, pad_forward_to_bucket, pad_to_bucket
from gdn.pallas.chunk_o import chunk_fwd_o, warmup
from gdn.pallas.forward import chunk_gated_delta_rule, warmup_forward
from gdn.pallas.recurrent import decode_step
from gdn.pallas.variants import compiled_variants

__all__ = ["bucket_size", "chunk_fwd_o", "chunk_gated_delta_rule", "compiled_variants", "decode_step",
           "pad_forward_to_bucket", "pad_to_bucket", "warmup", "warmup_forward"]
