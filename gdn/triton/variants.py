"""How many compiled variants of gdn's Triton kernels this process holds: what the warmups are judged by."""

from __future__ import annotations

from gdn.triton import chunk_o, decode, forward

KERNELS = (chunk_o.chunk_fwd_o_kernel, forward.chunk_prepare_kernel, forward.chunk_walk_kernel,
           forward.chunk_combine_kernel,
           decode.decode_step_kernel)


def compiled_variants() -> int:
    """Number of compiled variants of every gdn Triton kernel (chunk_fwd_o, the forward's prepare, walk and combine,
    decode_step) in this process, all devices.

    Reads Triton's JIT cache (``device_caches``: per device, a tuple whose first entry maps specialization
    keys to compiled kernels, on Triton 3.6 through 3.9). Under TRITON_INTERPRET=1 nothing is compiled.
    """
    total = 0
    for kernel in KERNELS:
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            raise RuntimeError("compiled_variants: the Triton interpreter (TRITON_INTERPRET=1) compiles nothing")
        total += sum(len(entry[0]) for entry in caches.values())
    return total
