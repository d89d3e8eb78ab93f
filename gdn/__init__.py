"""gdn: Gated DeltaNet kernels — the output stage of the chunked forward (chunk_fwd_o) and the recurrent decode
step (decode_step) — in Triton (gdn.triton) and Pallas (gdn.pallas).

Import the backend you use: ``gdn.triton`` imports torch and triton only, ``gdn.pallas`` jax only.
"""

from gdn.common.spec import CHUNK_SIZE

__version__ = "0.1.0"
__all__ = ["CHUNK_SIZE"]
