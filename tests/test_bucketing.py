"""JAX shape bucketing: padded and unpadded results are bit-identical; a loop over many T compiles once
per bucket."""

from __future__ import annotations

import numpy as np
import pytest

from gdn.common import spec
from tests.cases import Case

C = spec.CHUNK_SIZE


@pytest.mark.parametrize("T, expected", [(1, C), (C, C), (C + 1, 2 * C), (2 * C, 2 * C), (2 * C + 1, 4 * C),
                                         (128 * C, 128 * C), (128 * C + 1, 256 * C)])
def test_bucket_size(T: int, expected: int) -> None:
    from gdn.pallas import bucket_size

    assert bucket_size(T) == expected


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 37, 64, 65, 130])
def test_padded_equals_unpadded(T: int) -> None:
    import jax.numpy as jnp

    from gdn.pallas import chunk_fwd_o, pad_to_bucket

    a = Case(T=T, H=2, HV=4, K=48, V=32, B=2).inputs("float16", seed=T).arrays
    as_jax = lambda x: None if x is None else jnp.asarray(x, jnp.float16)  # noqa: E731
    unpadded = chunk_fwd_o(*(as_jax(a[n]) for n in "qkvh"), jnp.asarray(a["g"]))
    q, k, v, h, g = pad_to_bucket(a["q"], a["k"], a["v"], a["h"], a["g"])
    padded = chunk_fwd_o(*(as_jax(x) for x in (q, k, v, h)), jnp.asarray(g))
    assert padded.shape[1] > T or T == spec.CHUNK_SIZE
    assert np.array_equal(np.asarray(padded[:, :T]), np.asarray(unpadded))


def test_serving_loop_compiles_once_per_bucket() -> None:
    import jax
    import jax.numpy as jnp

    from gdn.pallas import bucket_size, chunk_fwd_o, pad_to_bucket

    fn = jax.jit(chunk_fwd_o)
    compiled_before = fn._cache_size()  # jax.jit of one function shares its cache with earlier tests' jits of it
    lengths = [1, 2, 17, 63, 64, 65, 100, 127, 128, 129, 200, 255]
    for T in lengths:
        a = Case(T=T, H=1, HV=2, K=16, V=16).inputs("float32", seed=T).arrays
        padded = pad_to_bucket(a["q"], a["k"], a["v"], a["h"], a["g"])
        fn(*(jnp.asarray(x) for x in padded)).block_until_ready()
    assert fn._cache_size() - compiled_before == len({bucket_size(T) for T in lengths}) == 3
