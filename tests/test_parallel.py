"""Sharded attention on the 8-device CPU mesh against the single-device reference.

``jaxattn.sharded_attention`` (batch, heads and sequence split; ring and all-to-all) must give the
output, the statistics and every gradient of ``jaxattn.attention(..., implementation="xla")`` on
the gathered arrays, for every variant the fused kernels run, causal and not, uneven lengths,
segment ids, GQA, registers and sink logits. On the CPU each device runs the kernels' jnp oracle
(``pallas_kernels.flash_reference``), so this tests the sharding, the ring's merge and its
backward, not the kernels.

Error model (float32 inputs, float32 arithmetic on both sides): logits are sums of ``H = 8``
products, ``|dz| <= H 2^-24 |q||k|``; the ring forms the same softmax as a logsumexp-weighted
sum of ``n`` block softmaxes, which reorders sums of at most ``S = 32`` terms: a few ulp of the
row's scale each. Outputs and gradients are compared relative to the largest reference entry:
``2e-5`` is ~300 float32 ulp, far above that model and far below any indexing or weighting
error (which is O(1 / S) = 3 % of the scale or more).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import parallel

TOL = 2e-5
B, T, N, K, H = 2, 32, 8, 4, 8


def _mesh(shape, names):
    if len(jax.devices()) < int(np.prod(shape)):
        pytest.skip(f"needs {int(np.prod(shape))} devices (tests/conftest.py sets 8 CPU devices)")
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


def _inputs(seed, *, registers=False, sinks=False, lengths=False, segments=False):
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32)
    extra = {}
    if registers:
        extra["registers"] = (0.5 * jax.random.normal(ks[3], (2, K, H), jnp.float32),
                              jax.random.normal(ks[4], (2, K, H), jnp.float32))
    if sinks:
        extra["sink_logits"] = jax.random.normal(ks[5], (N,), jnp.float32)
    if lengths:  # uneven, not multiples of a device's chunk
        extra["query_seq_lengths"] = jnp.array([T, 19], jnp.int32)
        extra["key_value_seq_lengths"] = jnp.array([23, 13], jnp.int32)
    if segments:
        seg = jnp.stack([jnp.repeat(jnp.arange(4), 8), (jnp.arange(T) >= 11).astype(int)
                         + (jnp.arange(T) >= 27)]).astype(jnp.int32)
        extra["q_segment_ids"] = extra["kv_segment_ids"] = seg
    return q, k, v, extra


def _rel(x, r):
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    return float(np.abs(x - r).max() / max(np.abs(r).max(), 1e-30))


def _check(par, variant, *, is_causal, seed=0, return_stats=True, local_window_size=None,
           **flags):
    """Forward, statistics and gradients (q, k, v, the variant's traced leaves, registers, sinks)
    of the sharded call against the reference on the same global arrays."""
    q, k, v, extra = _inputs(seed, **flags)
    leaves, treedef = jax.tree.flatten(variant)
    ct = jax.random.normal(jax.random.key(seed + 100), (B, T, N, H), jnp.float32)
    ct_lse = jax.random.normal(jax.random.key(seed + 101), (B, N, T), jnp.float32)
    lay = (functools.partial(parallel.zigzag, n=par.size(par.sequence_axis))
           if par.layout == "zigzag" else (lambda x: x))
    unlay = (functools.partial(parallel.unzigzag, n=par.size(par.sequence_axis))
             if par.layout == "zigzag" else (lambda x: x))

    def loss(fn, q, k, v, leaves, extra):
        var = jax.tree.unflatten(treedef, leaves)
        out, stats = fn(q, k, v, var, extra)
        return jnp.sum(out * ct) + jnp.sum(stats.logsumexp * ct_lse), (out, stats)

    def ref(q, k, v, var, extra):
        return jaxattn.attention(q, k, v, variant=var, is_causal=is_causal,
                                 local_window_size=local_window_size, implementation="xla",
                                 return_stats=True, **extra)

    def sharded(q, k, v, var, extra):
        extra = dict(extra)
        for name in ("q_segment_ids", "kv_segment_ids"):
            if name in extra:
                extra[name] = lay(extra[name])
        out, stats = jaxattn.sharded_attention(
            lay(q), lay(k), lay(v), parallelism=par, variant=var, is_causal=is_causal,
            local_window_size=local_window_size, return_stats=True, **extra)
        stats = jaxattn.AttentionStats(*(unlay(x.swapaxes(1, 2)).swapaxes(1, 2) for x in stats))
        return unlay(out), stats

    grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True, allow_int=True)
    g_ref, (o_ref, s_ref) = grad(ref, q, k, v, leaves, extra)
    g_sh, (o_sh, s_sh) = jax.jit(functools.partial(grad, sharded))(q, k, v, leaves, extra)
    errs = {"out": _rel(o_sh, o_ref)}
    if return_stats:
        errs.update({f: _rel(getattr(s_sh, f), getattr(s_ref, f)) for f in s_ref._fields})
    names = ["dq", "dk", "dv", "dvariant", "dextra"]
    for name, a, r in zip(names, g_sh, g_ref, strict=True):
        for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(r), strict=True)):
            if jnp.issubdtype(y.dtype, jnp.floating):
                errs[f"{name}{i}"] = _rel(x, y)
    bad = {key: e for key, e in errs.items() if not e < TOL}
    assert not bad, f"errors above {TOL}: {bad} (all: {errs})"


RING = dict(mesh=((2, 4), ("data", "seq")), batch_axis="data", sequence_axis="seq")
VARIANTS = {
    "softmax": jaxattn.Softmax(),
    "temperature": jaxattn.Softmax(temperature=0.7),
    "ssmax_learned": jaxattn.ScalableSoftmax(s=jnp.linspace(0.2, 0.6, N)),
    "rbf": jaxattn.RBF(),
    "adaptive": jaxattn.AdaptiveTemperature(threshold=0.0),
    "adaptive_stop_beta": jaxattn.AdaptiveTemperature(threshold=0.0, stop_gradient_beta=True),
}


def _par(strategy="ring", layout="contiguous", mesh=RING["mesh"], **axes):
    axes = axes or {k: v for k, v in RING.items() if k != "mesh"}
    return jaxattn.Parallelism(_mesh(*mesh), strategy=strategy, layout=layout, **axes)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout,is_causal", [("contiguous", False), ("contiguous", True),
                                              ("zigzag", True)])
def test_ring_every_variant(variant, layout, is_causal):
    # without a mask the zigzag layout only permutes positions: causal is where it differs
    _check(_par("ring", layout), VARIANTS[variant], is_causal=is_causal)


@pytest.mark.parametrize("variant,is_causal", [("softmax", False), ("temperature", True),
                                               ("ssmax_learned", True), ("rbf", False),
                                               ("adaptive", True), ("adaptive_stop_beta", False)])
def test_all_to_all_every_variant(variant, is_causal):
    # all_to_all runs the single-device call on whole sequences: one mask per variant suffices
    # (the per-head slicing of SSMax's s and the re-sharding are what it adds)
    _check(_par("all_to_all"), VARIANTS[variant], is_causal=is_causal)


# The zigzag layout permutes positions before the masks see them; one variant (adaptive: both
# sweeps over the ring) checks that, as test_ring_every_variant checks zigzag for every variant.
@pytest.mark.parametrize("strategy,layout,variant", [
    *[(s, "contiguous", v) for s in ("ring", "all_to_all")
      for v in ("ssmax_learned", "rbf", "adaptive")],
    ("ring", "zigzag", "adaptive")])
def test_masks_registers_sinks(strategy, layout, variant):
    """Uneven lengths, segment ids, registers and sink logits together, causal."""
    _check(_par(strategy, layout), VARIANTS[variant], is_causal=True, registers=True,
           sinks=variant != "adaptive", lengths=True, segments=True, seed=3)


@pytest.mark.parametrize("window", [(5, 0), (3, 9), (12, 12)])
def test_ring_local_window(window):
    # chunks of 8 positions: windows inside one chunk, across two, and across three
    _check(_par("ring"), VARIANTS["rbf"], is_causal=False, local_window_size=window,
           registers=True)
    _check(_par("ring"), VARIANTS["softmax"], is_causal=True, local_window_size=window,
           lengths=True)


def test_batch_and_heads_split():
    par = _par("ring", mesh=((2, 4), ("data", "model")), batch_axis="data", head_axis="model")
    _check(par, VARIANTS["ssmax_learned"], is_causal=True, registers=True, sinks=True,
           lengths=True)


def test_heads_and_sequence_split():
    par = _par("ring", mesh=((2, 4), ("model", "seq")), head_axis="model", sequence_axis="seq")
    _check(par, VARIANTS["adaptive"], is_causal=True, segments=True)
    par = _par("all_to_all", mesh=((2, 2, 2), ("data", "model", "seq")), batch_axis="data",
               head_axis="model", sequence_axis="seq")
    _check(par, VARIANTS["rbf"], is_causal=True, registers=True, sinks=True)


def test_ring_without_stats():
    q, k, v, _ = _inputs(5)
    par = _par("ring", "zigzag")
    n = par.size(par.sequence_axis)
    out = jax.jit(lambda q, k, v: jaxattn.sharded_attention(
        parallel.zigzag(q, n), parallel.zigzag(k, n), parallel.zigzag(v, n), parallelism=par,
        is_causal=True))(q, k, v)
    ref = jaxattn.attention(q, k, v, is_causal=True, implementation="xla")
    assert _rel(parallel.unzigzag(out, n), ref) < TOL


def test_zigzag_roundtrip():
    x = jnp.arange(2 * 48).reshape(2, 48)
    z = parallel.zigzag(x, 3)
    assert z[0, :8].tolist() == list(range(8)) and z[0, 8:16].tolist() == list(range(40, 48))
    assert (parallel.unzigzag(z, 3) == x).all()


def test_errors():
    q, k, v, _ = _inputs(0)
    with pytest.raises(ValueError, match="all_to_all.*divisible by the sequence_axis size"):
        par = _par("all_to_all", mesh=((1, 8), ("data", "seq")))
        jaxattn.sharded_attention(q, k[:, :, :2], v[:, :, :2], parallelism=par)
    with pytest.raises(ValueError, match="logsumexp.*hardmax"):
        jaxattn.sharded_attention(q, k, v, parallelism=_par(), variant="hardmax")
    with pytest.raises(ValueError, match="window on the zigzag"):
        jaxattn.sharded_attention(q, k, v, parallelism=_par("ring", "zigzag"),
                                  local_window_size=3)
    with pytest.raises(ValueError, match="T = 30 must be divisible by 4"):
        jaxattn.sharded_attention(q[:, :30], k[:, :30], v[:, :30], parallelism=_par())
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        jaxattn.Parallelism(_mesh(*RING["mesh"]), sequence_axis="sequence")
    with pytest.raises(ValueError, match="strategy must be one of"):
        jaxattn.Parallelism(_mesh(*RING["mesh"]), strategy="tree")
