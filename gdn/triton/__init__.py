"""gdn for PyTorch: Triton kernels. Importing this never imports jax.

- ``chunk_gated_delta_rule(q, k, v, g, beta, ...)`` — the chunked forward (prefill): o and the final state,
  differentiable (torch.autograd; custom ops under torch.compile); with ``group=`` one sequence split over the
  ranks of a torch.distributed process group (context parallel, forward only);
- ``chunk_fwd_o(q, k, v, h, g, ...)`` — the output stage of the chunked forward;
- ``decode_step(q, k, v, g, beta, state, ...)`` — the recurrence token by token per sequence (speculative steps,
  a state pool updated in place);
- ``warmup`` / ``warmup_forward`` — compile what later chunk_fwd_o / forward calls need, for any T;
- ``compiled_variants()`` — compiled kernel variants in this process;
- ``reset_plans()`` — drop the cached launch plans (tests that swap a kernel).

Importing it registers the ops' torch.library custom ops (gdn.triton.custom_ops), which torch.compile traces.
Installed by ``pip install 'gdn[torch]'``; without torch or triton, importing this raises an ImportError that says
so.
"""

try:
    import torch  # noqa: F401
    import triton  # noqa: F401
except ModuleNotFoundError as error:
    if error.name not in ("torch", "triton"):
        raise
    message = f"gdn.triton needs PyTorch and Triton ({error.name} is missing): pip install 'gdn[torch]'"
    raise ImportError(message) from error

from gdn.triton import custom_ops  # noqa: F401
from gdn.triton.autograd import chunk_gated_delta_rule
from gdn.triton.chunk_o import chunk_fwd_o, warmup
from gdn.triton.decode import decode_step
from gdn.triton.forward import warmup_forward
from gdn.triton.launcher import reset_plans
from gdn.triton.variants import compiled_variants

__all__ = ["chunk_fwd_o", "chunk_gated_delta_rule", "compiled_variants", "decode_step", "reset_plans", "warmup",
           "warmup_forward"]
