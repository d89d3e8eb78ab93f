"""gdn for JAX: Pallas kernels (Triton lowering on GPU, interpreter elsewhere). Importing this never imports torch."""

from gdn.pallas.chunk_o import chunk_fwd_o

__all__ = ["chunk_fwd_o"]
