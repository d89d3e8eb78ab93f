"""gdn's Triton kernels that need triton only (no torch, no jax): gdn.triton launches them from torch, and
gdn.pallas.triton_call from JAX through jaxlib's Triton custom call."""
