"""The chunked hardmax / top-k sweep (``implementation="xla_chunked"``) against the shared base.

The keys are scanned in blocks of 3 here (the default is 512), so every drawn shape spans several
blocks and a block's tail is padding: the argmax set and the running top-k cross block edges. Its
memory is checked by compiling it at T = S = 8192: the temporaries stay a small fraction of the
``T x S`` logits the reference forms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import chunked
from tests.conformance import AttentionConformance


class TestChunkedConformance(AttentionConformance):
    IMPLEMENTATION = "xla_chunked"
    SUPPORTED_VARIANTS = ("hardmax", "topk")
    DTYPES = ("float64", "float32")
    SUPPORTS_STATS_VJP = False  # forward-only variants: only the value gradient exists

    @pytest.fixture(autouse=True)
    def _small_blocks(self, monkeypatch):
        monkeypatch.setattr(chunked, "DEFAULT_BLOCK_KV", 3)


def test_softmax_variants_are_not_chunked():
    q = k = v = jnp.ones((1, 4, 1, 8))
    with pytest.raises(NotImplementedError, match="hardmax and top-k only"):
        jaxattn.attention(q, k, v, implementation="xla_chunked")
    # the default dispatch falls back to the reference
    np.testing.assert_allclose(jaxattn.attention(q, k, v), 1.0)


@pytest.mark.parametrize("variant", [jaxattn.Hardmax(), jaxattn.TopK(8)])
def test_memory_does_not_grow_with_the_keys(variant):
    """Compiled (not run) at T = 2048 queries over S = 8192 and 32768 keys (B = N = 1, H = 64):
    the reference's temporaries hold the float32 T x S logits (64 and 256 MiB) at least once; the
    chunked sweep's are a few T x 512 blocks (4 MiB each) and the same at both S (within 25 %:
    the padded key and value copies grow by 12 MiB)."""
    T = 2048

    def temp_bytes(impl, S):
        q = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, S, 1, 64), jnp.float32)
        f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, variant=variant,
                                                      implementation=impl))
        return f.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    for S in (8192, 32768):
        assert temp_bytes("xla", S) >= T * S * 4
    small, large = temp_bytes("xla_chunked", 8192), temp_bytes("xla_chunked", 32768)
    assert large < 1.25 * small + 2 * 32768 * 64 * 4, (small, large)
    assert large < T * 32768 * 4 / 8, (small, large)
