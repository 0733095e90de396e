"""An independent float64 NumPy oracle for every attention variant (tests only).

Written from ``docs/science.md`` section 1 and the API contract, not from
``jaxattn/reference.py``: it loops over (batch, query head, query) rows and builds each row's
logits from their definitions.

* softmax: ``(scale q.k + bias) / theta``;
* adaptive temperature: ``beta * (scale q.k + bias)`` with ``H = -sum p log(p + eps)`` of the base
  softmax and ``beta = max(1, polyval(coeffs, H))`` if ``H > threshold`` else 1 (``numpy.polyval``,
  highest power first);
* scalable softmax: ``s_n log(n_i) (scale q.k + bias)``, ``n_i`` = keys query ``i`` can attend
  (registers included);
* RBF: ``-gamma ||q - k||^2 + bias`` computed directly, ``gamma`` defaulting to ``scale``;
* hardmax: uniform over the maximal visible logits; top-k: softmax over the ``k`` largest visible
  logits, ties to the lower key index (registers first).

Soft cap (``logits_soft_cap``): ``cap tanh(z / cap)`` of the final logits above (and of the
adaptive temperature's base logits). Sinks (``sink_logits[n]``): ``e^{s_n}`` joins each softmax's
normaliser (base and final) as a weight of its own, counted in the entropy and max weight.

Visibility: bool mask (True = attend), causal ``j <= i``, window ``i - left <= j <= i + right``,
lengths (query rows ``>= q_len`` see nothing, keys ``>= kv_len`` hidden), segment ids. Registers are
prepended, visible to every valid query, with bias 0. A query with no visible key gives zeros and
zero statistics.
"""

import dataclasses
import math

import numpy as np

import jaxattn

__all__ = ["OracleResult", "attention_oracle", "visible_keys", "row_logits"]


@dataclasses.dataclass
class OracleResult:
    """Oracle outputs for batched inputs.

    Attributes:
      out: ``[B, T, N, Hv]``.
      weights: ``[B, N, T, R + S]`` (registers first).
      logsumexp, entropy, max_weight: ``[B, N, T]``.
      base_entropy: ``[B, N, T]``, entropy ``-sum p log(p + eps)`` of the base softmax (adaptive
        temperature only, else zeros); lets tests stay away from the kinks of ``beta``.
      beta: ``[B, N, T]``, the adaptive temperature's ``beta`` (ones for other variants).
      visible: bool ``[B, N, T, R + S]``.
    """

    out: np.ndarray
    weights: np.ndarray
    logsumexp: np.ndarray
    entropy: np.ndarray
    max_weight: np.ndarray
    base_entropy: np.ndarray
    beta: np.ndarray
    visible: np.ndarray


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _broadcast4(x, shape):
    """Left-pads ``x`` with unit dims and broadcasts it to ``shape`` (B, N, T, S)."""
    x = np.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return np.broadcast_to(x, shape)


def visible_keys(*, B, N, T, S, R, mask=None, is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                 local_window_size=None):
    """Bool ``[B, N, T, R + S]``: which keys each query may attend (registers first)."""
    i = np.arange(T)[None, None, :, None]
    j = np.arange(S)[None, None, None, :]
    seq = np.ones((B, N, T, S), bool)
    if mask is not None:
        seq &= np.asarray(mask, bool)
    if is_causal:
        seq &= j <= i
    if local_window_size is not None:
        left, right = local_window_size
        seq &= (j >= i - left) & (j <= i + right)
    if key_value_seq_lengths is not None:
        seq &= j < np.asarray(key_value_seq_lengths).reshape(B, 1, 1, 1)
    if q_segment_ids is not None:
        qs = np.asarray(q_segment_ids).reshape(B, 1, T, 1)
        seq &= qs == np.asarray(kv_segment_ids).reshape(B, 1, 1, S)
    vis = np.concatenate([np.ones((B, N, T, R), bool), seq], axis=-1)
    if query_seq_lengths is not None:
        vis &= i < np.asarray(query_seq_lengths).reshape(B, 1, 1, 1)
    return vis


def _softmax(z, keep, sink=None):
    """Softmax of ``z`` over ``keep`` (zeros elsewhere), its logsumexp and the sink's weight
    (0 without a sink); empty -> zeros, 0, 0."""
    if not keep.any():
        return np.zeros_like(z), 0.0, 0.0
    m = z[keep].max() if sink is None else max(z[keep].max(), sink)
    e = np.where(keep, np.exp(np.where(keep, z - m, 0.0)), 0.0)
    e_sink = 0.0 if sink is None else math.exp(sink - m)
    total = e.sum() + e_sink
    return e / total, m + math.log(total), e_sink / total


def _entropy(p, p_sink=0.0, eps=0.0):
    nz = np.append(p[p > 0], [p_sink] if p_sink > 0 else [])
    return float(-(nz * np.log(nz + eps)).sum())


def _param(value, n):
    """A scalar hyper-parameter or the entry for query head ``n`` of a per-head array."""
    arr = np.asarray(value, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else float(arr[n])


def row_logits(variant, q, keys, row_bias, visible, *, scale, n, fixed_beta=None, cap=None,
               sink=None):
    """The variant's logits for one query row before normalisation.

    Returns ``(z, base_entropy, beta)`` with ``z`` ``[R + S]`` as the variant defines them (then
    soft-capped by ``cap``). For adaptive temperature, ``fixed_beta`` (if given) replaces the
    computed ``beta``: the function whose derivative ``stop_gradient_beta=True`` gives; the base
    softmax has the ``sink`` too.
    """
    capped = (lambda z: z) if cap is None else (lambda z: cap * np.tanh(z / cap))
    base = scale * (keys @ q) + row_bias
    if isinstance(variant, jaxattn.Softmax):
        return capped(base / _param(variant.temperature, n)), 0.0, 1.0
    if isinstance(variant, jaxattn.AdaptiveTemperature):
        p0, _, p0_sink = _softmax(capped(base), visible, sink)
        h = _entropy(p0[visible], p0_sink, variant.entropy_eps)
        beta = max(1.0, float(np.polyval(variant.coeffs, h))) if h > variant.threshold else 1.0
        if fixed_beta is not None:
            beta = fixed_beta
        return capped(beta * base), h, beta
    if isinstance(variant, jaxattn.ScalableSoftmax):
        count = int(visible.sum())
        factor = _param(variant.s, n) * math.log(count) if count else 0.0
        return capped(factor * base), 0.0, 1.0
    if isinstance(variant, jaxattn.RBF):
        gamma = scale if variant.gamma is None else _param(variant.gamma, n)
        diff = keys - q[None, :]
        return capped(-gamma * np.sum(diff * diff, axis=-1) + row_bias), 0.0, 1.0
    if isinstance(variant, (jaxattn.Hardmax, jaxattn.TopK)):
        return capped(base), 0.0, 1.0
    raise TypeError(f"oracle: unknown variant {variant!r}")


def _support(variant, z, visible):
    """The keys that carry weight."""
    if isinstance(variant, jaxattn.Hardmax):
        if not visible.any():
            return visible
        return visible & (z == z[visible].max())
    if isinstance(variant, jaxattn.TopK):
        order = sorted(np.flatnonzero(visible), key=lambda j: (-z[j], j))
        keep = np.zeros_like(visible)
        keep[order[: variant.k]] = True
        return keep
    return visible


def attention_oracle(query, key, value, *, variant="softmax", bias=None, mask=None, scale=None,
                     is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                     q_segment_ids=None, kv_segment_ids=None, local_window_size=None,
                     registers=None, fixed_beta=None, logits_soft_cap=None, sink_logits=None):
    """Attention of batched inputs (``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``) in float64.

    Arguments follow :func:`jaxattn.attention` (``local_window_size`` a ``(left, right)`` pair,
    ``registers`` a pair of ``[R, K, H]`` / ``[R, K, Hv]`` or batched arrays). ``fixed_beta``
    (``[B, N, T]``, adaptive temperature only) freezes beta at given values; ``logits_soft_cap``
    and ``sink_logits`` (``[N]``) as in :func:`jaxattn.attention`.
    """
    variant = jaxattn.get_variant(variant)
    q, k, v = _f64(query), _f64(key), _f64(value)
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    R = 0
    if registers is not None:
        rk, rv = _f64(registers[0]), _f64(registers[1])
        if rk.ndim == 3:
            rk, rv = np.broadcast_to(rk, (B, *rk.shape)), np.broadcast_to(rv, (B, *rv.shape))
        R = rk.shape[1]
        k = np.concatenate([rk, k], axis=1)
        v = np.concatenate([rv, v], axis=1)
    full = (B, N, T, S)
    bias = np.zeros(full) if bias is None else _broadcast4(_f64(bias), full)
    mask = None if mask is None else _broadcast4(np.asarray(mask), full)
    window = local_window_size
    if isinstance(window, int):
        window = (window, window)
    group = N // K
    res = OracleResult(
        out=np.zeros((B, T, N, Hv)), weights=np.zeros((B, N, T, R + S)),
        logsumexp=np.zeros((B, N, T)), entropy=np.zeros((B, N, T)), max_weight=np.zeros((B, N, T)),
        base_entropy=np.zeros((B, N, T)), beta=np.ones((B, N, T)), visible=np.zeros((B, N, T, R + S), bool))
    res.visible[...] = visible_keys(
        B=B, N=N, T=T, S=S, R=R, mask=mask, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, local_window_size=window)
    for b in range(B):
        for n in range(N):
            kv_head = n // group
            for i in range(T):
                vis = res.visible[b, n, i]
                if not vis.any():
                    continue
                row_bias = np.concatenate([np.zeros(R), bias[b, n, i]])
                sink = None if sink_logits is None else float(np.asarray(sink_logits)[n])
                z, h0, beta = row_logits(
                    variant, q[b, i, n], k[b, :, kv_head], row_bias, vis, scale=scale, n=n,
                    fixed_beta=None if fixed_beta is None else float(fixed_beta[b, n, i]),
                    cap=logits_soft_cap, sink=sink)
                keep = _support(variant, z, vis)
                p, lse, p_sink = _softmax(z, keep, sink)
                res.weights[b, n, i] = p
                res.out[b, i, n] = p @ v[b, :, kv_head]
                res.logsumexp[b, n, i] = lse
                res.entropy[b, n, i] = _entropy(p, p_sink)
                res.max_weight[b, n, i] = max(p.max(), p_sink)
                res.base_entropy[b, n, i] = h0
                res.beta[b, n, i] = beta
    return res
