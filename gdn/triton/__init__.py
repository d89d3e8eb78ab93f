"""gdn for PyTorch: Triton kernels. Importing this never imports jax."""

from gdn.triton.chunk_o import chunk_fwd_o, warmup
from gdn.triton.forward import chunk_gated_delta_rule, warmup_forward
from gdn.triton.recurrent import decode_step
from gdn.triton.variants import compiled_variants

__all__ = ["chunk_fwd_o", "chunk_gated_delta_rule", "compiled_variants", "decode_step", "warmup", "warmup_forward"]
