"""Attention on arrays sharded over a ``jax.sharding.Mesh``: batch, heads and sequence.

:class:`Parallelism` names the mesh axes that split the batch, the heads and the sequence, and
:func:`sharded_attention` runs :func:`jaxattn.attention`'s problem on arrays laid out that way,
with JAX's own SPMD machinery (``jax.shard_map`` and its collectives). Each device runs the
single-device kernels on its shard; nothing gathers the activations.

* **Batch and heads** split trivially: each device attends its own rows and heads (per-head
  parameters -- sink logits, a per-head SSMax ``s``, the registers' kv heads -- are split with
  the heads).
* **Sequence, ring** (``strategy="ring"``): queries stay put and the key/value blocks go around the
  ring with ``ppermute``, ``n`` steps for ``n`` devices. Each step attends the local queries to the
  visiting block with the kernel-level op (:func:`pallas_kernels.flash_attention` on a GPU, its
  oracle :func:`pallas_kernels.flash_reference` elsewhere), which returns the output and the
  logsumexp ``l_b``; the blocks merge exactly,

  .. math::

    l = \\log \\sum_b e^{l_b}, \\qquad o = \\sum_b e^{l_b - l} \\, o_b .

  The backward is a second ring (a ``custom_vjp``): the blocks go around again with their key and
  value gradients travelling beside them, each step re-running the block's forward inside
  ``jax.vjp`` with cotangents ``do_b = w_b do`` and ``dl_b = w_b (<do, o_b - o> + dl)``,
  ``w_b = e^{l_b - l}``; memory stays ``O(N / n)`` per device. Causal masks skip the blocks no query
  sees; ``layout="zigzag"`` balances them: device ``d`` holds chunks ``d`` and ``2n - 1 - d`` of
  ``2n`` equal chunks, so every step after the first costs each device two chunk pairs (see
  :func:`zigzag`).
* **Sequence, all-to-all** (``strategy="all_to_all"``, DeepSpeed-Ulysses): one ``all_to_all``
  re-shards ``q, k, v`` from the sequence to the heads, the single-device kernels attend full
  sequences for ``N / n`` heads, and one ``all_to_all`` brings the output back. It needs the query
  and the key/value heads divisible by the axis size.

Every variant the fused kernels run (softmax with a temperature, scalable-softmax, RBF, adaptive
temperature) runs on the ring: the per-query scale ``c_i`` is formed from global quantities before
the output ring -- SSMax's visible-key count is summed over the blocks, adaptive temperature's
entropy comes from a first ring over the same merge (the block's mean logit
``E_b = c (a q . o'_b + sum p b)`` with ``o'_b`` the attention output over values ``v' = k``, so
``H = l - sum_b w_b E_b`` and its gradient flows exactly) -- and registers join the first step's
block only, so every query sees them once; sink logits enter after the merge.

Example (on one device here; the same code runs on any mesh)::

  >>> import jax, jax.numpy as jnp, jaxattn
  >>> mesh = jax.make_mesh((1,), ("seq",))
  >>> par = jaxattn.Parallelism(mesh, sequence_axis="seq", strategy="ring")
  >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 32, 2, 16))
  >>> out = jaxattn.sharded_attention(q, k, v, parallelism=par, is_causal=True)
  >>> ref = jaxattn.attention(q, k, v, is_causal=True, implementation="xla")
  >>> bool(jnp.abs(out - ref).max() < 1e-5)
  True

References:
  Liu, Zaharia, Abbeel. "Ring Attention with Blockwise Transformers for Near-Infinite Context".
  ICLR 2024. https://arxiv.org/abs/2310.01889
  Jacobs et al. "DeepSpeed Ulysses". 2023. https://arxiv.org/abs/2309.14509
  Brandon et al. "Striped Attention". 2023. https://arxiv.org/abs/2311.09431
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from jaxattn import api
from jaxattn.fused import _is_static, _split_scale, _with_sinks
from jaxattn.plan import make_plan
from jaxattn.reference import AttentionStats

__all__ = ["Parallelism", "sharded_attention", "zigzag", "unzigzag", "STRATEGIES", "LAYOUTS"]

STRATEGIES = ("ring", "all_to_all")
LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """Which mesh axes split the batch, the query/key heads and the sequence of an attention call.

    Args:
      mesh: the ``jax.sharding.Mesh``.
      batch_axis: a mesh axis name (or tuple of names) splitting ``B``, or None.
      head_axis: a mesh axis name splitting the heads ``N`` and ``K``, or None.
      sequence_axis: a mesh axis name splitting ``T`` and ``S``, or None.
      strategy: ``"ring"`` or ``"all_to_all"``: how a split sequence is attended.
      layout: ``"contiguous"`` (device ``d`` holds positions ``[d T/n, (d+1) T/n)``) or
        ``"zigzag"`` (the arrays are in :func:`zigzag` order: causal load balance on the ring).
    """

    mesh: Mesh
    batch_axis: str | tuple | None = None
    head_axis: str | None = None
    sequence_axis: str | None = None
    strategy: str = "ring"
    layout: str = "contiguous"

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        names = set(self.mesh.axis_names)
        batch = self.batch_axis if isinstance(self.batch_axis, tuple) else (self.batch_axis,)
        used = [a for a in (*batch, self.head_axis, self.sequence_axis) if a is not None]
        for a in used:
            if a not in names:
                raise ValueError(f"axis {a!r} is not an axis of the mesh {tuple(names)}")
        if len(set(used)) != len(used):
            raise ValueError(f"batch_axis, head_axis and sequence_axis must be distinct mesh axes, "
                             f"got {used}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "zigzag" and self.strategy != "ring":
            raise ValueError("layout='zigzag' is the ring's causal load balance; all_to_all "
                             "attends whole sequences and takes the contiguous layout")

    def size(self, axis) -> int:
        if axis is None:
            return 1
        axes = axis if isinstance(axis, tuple) else (axis,)
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def __call__(self, query, key, value, **kwargs):
        """:func:`sharded_attention` with this parallelism."""
        return sharded_attention(query, key, value, parallelism=self, **kwargs)


def zigzag(x, n: int, axis: int = 1):
    """Reorders a sequence axis into the ring's zigzag layout for ``n`` devices.

    The axis is cut into ``2n`` equal chunks and device ``d`` gets chunks ``d`` and
    ``2n - 1 - d``: under a causal mask every ring step after the first then costs each device
    the same work. Apply it once to the token arrays (and segment ids), run the model with
    ``Parallelism(..., layout="zigzag")``, and :func:`unzigzag` the outputs (or keep them).
    """
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(f"the sequence length {length} must be divisible by 2 n = {2 * n}")
    return _reorder(x, _zigzag_index(length, n), axis)


def unzigzag(x, n: int, axis: int = 1):
    """The inverse of :func:`zigzag`."""
    return _reorder(x, np.argsort(_zigzag_index(x.shape[axis], n)), axis)


def _reorder(x, index, axis):
    x = jnp.asarray(x)
    where = (slice(None),) * (axis % x.ndim) + (index,)
    sharding = jax.typeof(x).sharding
    if sharding.mesh.empty or all(p is None for p in sharding.spec):
        return x[where]
    return x.at[where].get(out_sharding=sharding)  # an explicitly sharded array keeps its layout


def _zigzag_index(length, n):
    c = length // (2 * n)
    chunks = [i for d in range(n) for i in (d, 2 * n - 1 - d)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in chunks])


# ---------------------------------------------------------------------------------------------
# The exact merge of attention over key blocks, and the ring that applies it (custom_vjp).


def _merge(acc, part):
    """Merges two partial results ``(y [B,T,N,F], lse [B,N,T], nonempty [B,N,T], mw)``."""
    if acc is None:
        return part
    ya, la, na, ma = acc
    yb, lb, nb, mb = part
    lse = jnp.where(na & nb, jnp.logaddexp(la, lb), jnp.where(na, la, jnp.where(nb, lb, 0.0)))
    wa, wb = (jnp.where(n, jnp.exp(x - lse), 0.0) for n, x in ((na, la), (nb, lb)))
    t = lambda w: jnp.transpose(w, (0, 2, 1))[..., None]  # [B, N, T] -> [B, T, N, 1]
    y = t(wa) * ya + t(wb) * yb
    mw = None if ma is None else jnp.maximum(wa * ma, wb * mb)
    return y, lse, na | nb, mw


def _rotate(tree, axis, n):
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


def _float0(tree):
    return jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), tree)


def _ring_forward(fn, n, axis, local, travel, aux_local, aux_travel):
    acc = None
    for s in range(n):
        acc = _merge(acc, fn(s, local, travel, aux_local, aux_travel))
        if s < n - 1:
            travel, aux_travel = _rotate((travel, aux_travel), axis, n)
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(fn, n, axis, local, travel, aux_local, aux_travel):
    """``fn(step, local, travel, aux_local, aux_travel) -> (y, lse, nonempty, mw)`` merged over the
    ``n`` ring steps; ``travel`` (differentiable) and ``aux_travel`` (int) go around the ring."""
    return _ring_forward(fn, n, axis, local, travel, aux_local, aux_travel)


def _ring_fwd(fn, n, axis, local, travel, aux_local, aux_travel):
    y, lse, nonempty, mw = _ring_forward(fn, n, axis, local, travel, aux_local, aux_travel)
    return (y, lse, nonempty, mw), (local, travel, aux_local, aux_travel, y, lse)


def _ring_bwd(fn, n, axis, res, cts):
    local, travel, aux_local, aux_travel, y, lse = res
    dy, dlse = cts[0], cts[1]
    dy = jnp.zeros_like(y) if dy is None else dy
    dlse = jnp.zeros_like(lse) if dlse is None else dlse
    dy_y = jnp.transpose(jnp.sum(dy * y, -1), (0, 2, 1))  # <do, o>, [B, N, T]
    # gradients accumulate in float32: a 16-bit block gradient summed over n steps would lose
    # log2(n) bits (and the travelling ones are sent in float32 for the same reason)
    f32 = lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
    d_local = jax.tree.map(f32, local)
    d_travel = jax.tree.map(f32, travel)
    for s in range(n):
        def block(loc, tra, s=s, aux_travel=aux_travel):
            yb, lb, nb, _ = fn(s, loc, tra, aux_local, aux_travel)
            return (yb, lb), nb

        (yb, lb), vjp, nb = jax.vjp(block, local, travel, has_aux=True)
        w = jnp.where(nb, jnp.exp(lb - lse), 0.0)
        w_t = jnp.transpose(w, (0, 2, 1))[..., None]
        dyb_yb = jnp.transpose(jnp.sum(dy * yb, -1), (0, 2, 1))
        dl, dt = vjp((w_t * dy, w * (dyb_yb - dy_y + dlse)))
        d_local = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), d_local, dl)
        d_travel = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), d_travel, dt)
        # the gradient of the visiting block travels with it and is home after n rotations
        if s < n - 1:
            travel, aux_travel, d_travel = _rotate((travel, aux_travel, d_travel), axis, n)
        else:
            d_travel = _rotate(d_travel, axis, n)
    cast = lambda g, x: g.astype(x.dtype)  # noqa: E731
    return (jax.tree.map(cast, d_local, local), jax.tree.map(cast, d_travel, travel),
            _float0(aux_local), _float0(aux_travel))


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------
# One block of keys: the kernel-level op, with the kernels on a GPU and their oracle elsewhere.


def _block_op(use_kernel, q, k, v, *, c, b, spec, a, cap, stats):
    """``(out float32 [B,T,N,Hv], lse [B,N,T], nonempty [B,N,T], entropy, max_weight)``."""
    B, T, N, _ = q.shape
    nonempty = jnp.broadcast_to((pk.count_visible(spec, B, T, k.shape[1]) > 0)[:, None, :],
                                (B, N, T))
    kwargs = dict(logit_scale=a, query_scale=c, key_bias=b, mask=spec, logits_soft_cap=cap)
    result = None
    if use_kernel:
        try:
            result = pk.flash_attention(q, k, v, return_stats=stats, **kwargs)
        except NotImplementedError:
            result = None
    if result is None:
        result = pk.flash_reference(q, k, v, return_stats=stats, **kwargs)
    out, lse, ent, mw = result if stats else (*result, None, None)
    return out.astype(jnp.float32), lse, nonempty, ent, mw


def _chunk(x, r, m, axis):
    if x is None or m == 1:
        return x
    size = x.shape[axis] // m
    return jax.lax.slice_in_dim(x, r * size, (r + 1) * size, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static description of one sequence-sharded call, inside ``shard_map``."""

    axis: str
    n: int
    m: int  # chunks per device: 1 (contiguous) or 2 (zigzag)
    is_causal: bool
    window: tuple | None
    num_registers: int
    a: float
    cap: float | None
    use_kernel: bool
    batch: int  # B of the local shard
    chunk: int  # C: positions per chunk

    def chunk_ids(self, d):
        return (d,) if self.m == 1 else (d, 2 * self.n - 1 - d)

    def sub_blocks(self, s):
        """``(r, r2, rel)`` per pair of (query chunk r, key chunk r2) at step s: ``rel`` is the
        query chunk's index minus the key chunk's (traced) and static where the layout fixes it."""
        d = jax.lax.axis_index(self.axis)
        src = (d - s) % self.n
        for r, qid in enumerate(self.chunk_ids(d)):
            for r2, kid in enumerate(self.chunk_ids(src)):
                yield r, r2, qid - kid

    def spec(self, aux_local, aux_travel, r, r2, rel_static, C, with_registers):
        """The block's mask: lengths made block-local, segment ids sliced, the causal or window
        relation as a static offset (``rel_static`` chunks)."""
        d = jax.lax.axis_index(self.axis)
        q_start = self.chunk_ids(d)[r] * C
        ql, kl = aux_local.get("q_lengths"), aux_local.get("kv_lengths")
        kv_start = aux_travel["chunk"][r2] * C
        qs, ks = aux_local.get("q_segment_ids"), aux_travel.get("kv_segment_ids")
        return pk.MaskSpec(
            q_lengths=None if ql is None else jnp.clip(ql - q_start, 0, C).astype(jnp.int32),
            kv_lengths=None if kl is None else jnp.clip(kl - kv_start, 0, C).astype(jnp.int32),
            q_segment_ids=_chunk(qs, r, self.m, 1), kv_segment_ids=_chunk(ks, r2, self.m, 1),
            is_causal=self.is_causal, local_window_size=self.window,
            num_registers=self.num_registers if with_registers else 0,
            offset=rel_static * C)

    def step(self, s, local, travel, aux_local, aux_travel, *, kind):
        """One ring step: every (query chunk, key chunk) pair, merged per query chunk."""
        T = local["q"].shape[1]
        C = T // self.m
        ys = [None] * self.m
        for r, r2, rel in self.sub_blocks(s):
            q = _chunk(local["q"], r, self.m, 1)
            c = _chunk(local.get("c"), r, self.m, 2)
            k = _chunk(travel["k"], r2, self.m, 1)
            v = _chunk(travel.get("v"), r2, self.m, 1)
            b = _chunk(travel.get("b"), r2, self.m, 2)
            regs = s == 0 and r == r2 and self.num_registers > 0
            if regs:
                k = jnp.concatenate([local["rk"], k], axis=1)
                v = None if v is None else jnp.concatenate([local["rv"], v], axis=1)
                if b is not None:
                    b = jnp.concatenate([local["rb"], b], axis=2)

            def run(rel_static, q=q, k=k, v=v, c=c, b=b, r=r, r2=r2, regs=regs):
                spec = self.spec(aux_local, aux_travel, r, r2, rel_static, C, regs)
                return kind(self, q, k, v, c, b, spec)

            if not (self.is_causal or self.window is not None) or (s == 0 and r == r2):
                part = run(0)  # no positional mask, or the diagonal block
            elif self.window is None:
                # causal, off the diagonal: every key before every query (offset 1 chunk), or
                # none visible -- a block that is skipped, not computed
                part = jax.lax.cond(rel > 0, lambda run=run: run(1),
                                    lambda run=run: _zeros_like_result(lambda: run(1)))
            else:
                # a window (contiguous layout): the key chunk is s or s - n chunks back
                part = jax.lax.cond(rel > 0, lambda run=run: run(s),
                                    lambda run=run: run(s - self.n))
            ys[r] = _merge(ys[r], part)
        if self.m == 1:
            return ys[0]
        y = jnp.concatenate([p[0] for p in ys], axis=1)
        lse = jnp.concatenate([p[1] for p in ys], axis=2)
        ne = jnp.concatenate([p[2] for p in ys], axis=2)
        mw = None if ys[0][3] is None else jnp.concatenate([p[3] for p in ys], axis=2)
        return y, lse, ne, mw

    def counts(self, aux_local, aux_travel):
        """Visible keys per local query over all blocks (registers once), int32 ``[B, T]``."""
        total = None
        for s in range(self.n):
            for r, r2, rel in self.sub_blocks(s):
                diag = s == 0 and r == r2
                parts = []
                for rel_static, pick in self._offsets(s, r, r2, rel):
                    spec = self.spec(aux_local, aux_travel, r, r2, rel_static, self.chunk,
                                     diag and self.num_registers > 0)
                    cnt = pk.count_visible(spec, self.batch, self.chunk,
                                           self.chunk + (spec.num_registers))
                    parts.append(jnp.where(pick, cnt, 0))
                cnt = functools.reduce(jnp.add, parts)
                total = _scatter_chunk(total, cnt, r, self.m, self.batch, self.chunk)
            if s < self.n - 1:
                aux_travel = _rotate(aux_travel, self.axis, self.n)
        return total

    def _offsets(self, s, r, r2, rel):
        if not (self.is_causal or self.window is not None) or (s == 0 and r == r2):
            return ((0, True),)
        if self.window is None:
            return ((1, rel > 0),)
        return ((s, rel > 0), (s - self.n, rel <= 0))


def _scatter_chunk(total, cnt, r, m, B, C):
    if total is None:
        total = jnp.zeros((B, C * m), jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(
        total, jax.lax.dynamic_slice_in_dim(total, r * C, C, 1) + cnt, r * C, 1)


def _zeros_like_result(f):
    """Zeros shaped like ``f()``'s result, without running it: a block no query sees (weight 0)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(f))


def _attend_kind(stats):
    def kind(ring, q, k, v, c, b, spec):
        out, lse, ne, ent, mw = _block_op(ring.use_kernel, q, k, v, c=c, b=b, spec=spec, a=ring.a,
                                          cap=ring.cap, stats=stats)
        if stats:
            # the block's mean logit E_b = lse_b - H_b rides along as a value column; the
            # statistics carry no gradient (the kernels' entropy has none)
            e = jax.lax.stop_gradient(jnp.where(ne, lse - ent, 0.0))
            out = jnp.concatenate([out, jnp.transpose(e, (0, 2, 1))[..., None]], axis=-1)
            mw = jax.lax.stop_gradient(mw)
        return out, lse, ne, mw
    return kind


def _mean_logit_kind(ring, q, k, v, c, b, spec):
    """The block's ``(E_b, lse_b)`` of the base logits ``z = c (a q.k + b)``: attention over
    values ``v' = [k, b]`` gives ``o' = sum p k`` and ``sum p b``, so ``E_b = c (a q.o' + sum p b)``
    is differentiable through the kernel-level op (both the logits and the values depend on k)."""
    del v
    vals = k if b is None else jnp.concatenate(
        [k, jnp.transpose(b, (0, 2, 1)).astype(k.dtype)[..., None]], axis=-1)
    out, lse, ne, _, _ = _block_op(ring.use_kernel, q, k, vals, c=c, b=b, spec=spec, a=ring.a,
                                   cap=ring.cap, stats=False)
    H = q.shape[-1]
    e = ring.a * jnp.einsum("BTNH,BTNH->BNT", q.astype(jnp.float32), out[..., :H])
    if b is not None:
        e = e + jnp.transpose(out[..., H], (0, 2, 1))
    if c is not None:
        e = c * e
    return jnp.transpose(e, (0, 2, 1))[..., None], lse, ne, None


# ---------------------------------------------------------------------------------------------
# The public entry.


def _axis_tuple(axis):
    return () if axis is None else (axis if isinstance(axis, tuple) else (axis,))


def sharded_attention(query, key, value, *, parallelism: Parallelism, variant="softmax",
                      scale=None, is_causal=False, query_seq_lengths=None,
                      key_value_seq_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                      local_window_size=None, registers=None, logits_soft_cap=None,
                      sink_logits=None, implementation=None, return_stats=False):
    """:func:`jaxattn.attention` on arrays sharded as ``parallelism`` says.

    The arguments are :func:`jaxattn.attention`'s, as global (logical) arrays: ``query
    [B, T, N, H]``, ``key`` and ``value [B, S, K, H]``, segment ids ``[B, T]``, lengths ``[B]``,
    in natural order for ``layout="contiguous"`` and in :func:`zigzag` order for
    ``layout="zigzag"`` (lengths count positions of the natural order). Dense ``mask`` and
    ``bias`` arrays are not taken (their ``T x S`` size is what sharding avoids).

    Args:
      parallelism: the :class:`Parallelism`.
      implementation: None or ``"pallas"`` (the fused kernels where they run, on a GPU in 16-bit
        -- with ``"pallas"`` required) or ``"xla"`` (the reference / the kernels' oracle) for each
        device's work.

    Returns:
      ``out [B, T, N, Hv]`` sharded like ``query``; with ``return_stats`` also
      :class:`~jaxattn.AttentionStats` ``[B, N, T]`` sharded over (batch, heads, sequence). On
      the ring the entropy and max weight carry no gradient (the logsumexp does).

    Raises:
      ValueError: shapes that the mesh does not divide, ``all_to_all`` with heads not divisible
        by the sequence axis, a normaliser other than softmax on a split sequence, a window on
        the zigzag layout or on ``S != T``.
    """
    par = parallelism
    if not isinstance(par, Parallelism):
        raise TypeError(f"parallelism must be a jaxattn.Parallelism, got {type(par).__name__}")
    if implementation not in (None, "xla", "pallas"):
        raise ValueError(f"implementation must be None, 'xla' or 'pallas' on sharded arrays, got "
                         f"{implementation!r}")
    if getattr(query, "ndim", None) != 4:
        raise ValueError(f"query must be batched [B, T, N, H] on sharded arrays, got shape "
                         f"{getattr(query, 'shape', None)}")
    (q, k, v), plan = make_plan(
        query, key, value, variant=variant, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        local_window_size=local_window_size, registers=registers,
        logits_soft_cap=logits_soft_cap, sink_logits=sink_logits)
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    nb, nh, ns = (par.size(a) for a in (par.batch_axis, par.head_axis, par.sequence_axis))
    for name, size, parts, axis in (("B", B, nb, "batch_axis"), ("N", N, nh, "head_axis"),
                                    ("K", K, nh, "head_axis")):
        if size % parts:
            raise ValueError(f"{name} = {size} must be divisible by the {axis}'s size {parts}")
    chunks = ns * (2 if par.layout == "zigzag" else 1)
    for name, size in (("T", T), ("S", S)):
        if size % chunks:
            raise ValueError(f"{name} = {size} must be divisible by {chunks} (the sequence_axis "
                             f"size {ns}" + (" times 2 for the zigzag layout)" if
                                             par.layout == "zigzag" else ")"))
    if par.sequence_axis is not None:
        if par.strategy == "all_to_all":
            for name, size in (("N", N // nh), ("K", K // nh)):
                if size % ns:
                    raise ValueError(
                        f"strategy='all_to_all' needs the {'query' if name == 'N' else 'key/value'}"
                        f" heads per device ({name} = {size}) divisible by the sequence_axis size "
                        f"{ns}; use strategy='ring' or fewer sequence devices")
        else:
            if plan.variant.normalizer != "softmax":
                raise ValueError(f"the ring merges softmax normalisers through their logsumexp; "
                                 f"{plan.variant.name} normalises by {plan.variant.normalizer} "
                                 "(use strategy='all_to_all')")
            if (plan.mask.is_causal or plan.mask.local_window_size is not None) and S != T:
                raise ValueError(f"a causal or window mask on the ring needs S == T, got S = {S}, "
                                 f"T = {T}")
            if plan.mask.local_window_size is not None and par.layout == "zigzag":
                raise ValueError("a local window on the zigzag layout is not supported (its chunk "
                                 "offsets depend on the device); use layout='contiguous'")
            if plan.logits_soft_cap is not None and plan.variant.needs_stats:
                raise ValueError("a soft cap with a statistics sweep (adaptive temperature) is not "
                                 "supported on the ring")

    bax, hax, sax = par.batch_axis, par.head_axis, par.sequence_axis
    spec = plan.mask
    # Traced leaves of the variant (a learned s) and the scale enter the shard_map as arguments;
    # python constants stay constants (a constant c folds into the kernel's scale).
    leaves, treedef = jax.tree.flatten(plan.variant)
    dyn = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    per_head = lambda x: np.ndim(x) == 1 and np.shape(x)[0] == N  # noqa: E731
    args = dict(q=q, k=k, v=v, q_lengths=spec.q_lengths, kv_lengths=spec.kv_lengths,
                q_segment_ids=spec.q_segment_ids, kv_segment_ids=spec.kv_segment_ids,
                registers=plan.registers, sinks=plan.sink_logits,
                leaves=[leaves[i] for i in dyn],
                scale=plan.scale if isinstance(plan.scale, jax.Array) else None)
    specs = dict(q=P(bax, sax, hax, None), k=P(bax, sax, hax, None), v=P(bax, sax, hax, None),
                 q_lengths=P(bax), kv_lengths=P(bax), q_segment_ids=P(bax, sax),
                 kv_segment_ids=P(bax, sax),
                 registers=(P(bax, None, hax, None), P(bax, None, hax, None)),
                 sinks=P(hax), leaves=[P(hax) if per_head(leaves[i]) else P() for i in dyn],
                 scale=P())
    specs = {name: (None if args[name] is None else s) for name, s in specs.items()}
    specs["leaves"] = specs["leaves"] if dyn else []

    def body(a):
        lv = list(leaves)
        for i, x in zip(dyn, a["leaves"], strict=True):
            lv[i] = x
        local_variant = jax.tree.unflatten(treedef, lv)
        local_scale = plan.scale if a["scale"] is None else a["scale"]
        common = dict(variant=local_variant, scale=local_scale, is_causal=spec.is_causal,
                      local_window_size=spec.local_window_size, logits_soft_cap=plan.logits_soft_cap,
                      return_stats=return_stats)
        if sax is None or ns == 1:  # a sequence axis of one device: the single-device call
            return _local(a, common, implementation)
        if par.strategy == "all_to_all":
            return _all_to_all(a, common, implementation, sax, ns, per_head)
        return _ring_attention(a, common, implementation, sax, ns, par.layout, plan)

    out_specs = P(bax, sax, hax, None)
    if return_stats:
        out_specs = (out_specs, AttentionStats(*(P(bax, hax, sax),) * 3))
    in_specs = ({name: s for name, s in specs.items()},)
    f = jax.shard_map(body, mesh=par.mesh, in_specs=in_specs, out_specs=out_specs,
                      check_vma=False)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in par.mesh.axis_types)
    if explicit:  # shard_map takes explicitly sharded arrays as they are laid out: lay them out
        args = jax.tree.map(
            lambda s, x: None if s is None else jax.sharding.reshard(x, NamedSharding(par.mesh, s)),
            in_specs[0], args, is_leaf=lambda x: x is None or isinstance(x, P))
    return f(args)


def _local(a, common, implementation):
    regs = a["registers"]
    return api.attention(a["q"], a["k"], a["v"], query_seq_lengths=a["q_lengths"],
                         key_value_seq_lengths=a["kv_lengths"], q_segment_ids=a["q_segment_ids"],
                         kv_segment_ids=a["kv_segment_ids"], registers=regs,
                         sink_logits=a["sinks"], implementation=implementation, **common)


def _all_to_all(a, common, implementation, axis, n, per_head):
    """Sequence-sharded -> head-sharded, the single-device call on full sequences, and back."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1,
                                 tiled=True)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    d = jax.lax.axis_index(axis)

    def my_heads(x, axis_of_heads):
        size = x.shape[axis_of_heads] // n
        return jax.lax.dynamic_slice_in_dim(x, d * size, size, axis_of_heads)

    b = dict(a)
    b["q"], b["k"], b["v"] = (to_heads(a[name]) for name in ("q", "k", "v"))
    for name in ("q_segment_ids", "kv_segment_ids"):
        if a[name] is not None:
            b[name] = gather(a[name])
    if a["registers"] is not None:
        b["registers"] = tuple(my_heads(x, 2) for x in a["registers"])
    if a["sinks"] is not None:
        b["sinks"] = my_heads(a["sinks"], 0)
    variant = common["variant"]
    leaves, treedef = jax.tree.flatten(variant)
    N_local = a["q"].shape[2]
    leaves = [my_heads(x, 0) if isinstance(x, jax.Array) and x.ndim == 1 and
              x.shape[0] == N_local else x for x in leaves]
    common = dict(common, variant=jax.tree.unflatten(treedef, leaves))
    result = _local(b, common, implementation)
    back = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=1, concat_axis=2,
                             tiled=True)
    if not common["return_stats"]:
        return back(result)
    out, stats = result
    # stats [B, N/n, T] -> [B, N, T/n]
    stats = AttentionStats(*(jax.lax.all_to_all(x, axis, 2, 1, tiled=True) for x in stats))
    return back(out), stats


def _ring_attention(a, common, implementation, axis, n, layout, plan):
    """The ring: per-query scale from global quantities, then the output ring, then the sinks."""
    q, k, v = a["q"], a["k"], a["v"]
    variant, return_stats = common["variant"], common["return_stats"]
    B, T, N, _ = q.shape
    on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    if implementation == "pallas" and not on_gpu:
        raise NotImplementedError("implementation='pallas' needs a GPU and bfloat16 / float16 "
                                  "inputs")
    use_kernel = on_gpu and implementation != "xla"
    local_plan = dataclasses.replace(plan, variant=variant, scale=common["scale"],
                                     sink_logits=a["sinks"])
    m = 2 if layout == "zigzag" else 1
    a_static, a_traced = _split_scale(local_plan.logit_scale)
    R = 0 if a["registers"] is None else a["registers"][0].shape[1]
    ring = _Ring(axis=axis, n=n, m=m, is_causal=plan.mask.is_causal,
                 window=plan.mask.local_window_size, num_registers=R, a=a_static,
                 cap=plan.logits_soft_cap, use_kernel=use_kernel, batch=B, chunk=T // m)
    d = jax.lax.axis_index(axis)
    aux_local = {name: a[name] for name in ("q_lengths", "kv_lengths", "q_segment_ids")
                 if a[name] is not None}
    aux_travel = {"chunk": jnp.stack(ring.chunk_ids(d)).astype(jnp.int32)}
    if a["kv_segment_ids"] is not None:
        aux_travel["kv_segment_ids"] = a["kv_segment_ids"]

    def bias_of(x):
        b = local_plan.key_bias(x)
        if b is None:
            return None
        b = jnp.transpose(b, (0, 2, 1)).astype(jnp.float32)
        return b if a_traced is None else b / a_traced

    local = {"q": q}
    travel = {"k": k, "v": v}
    b = bias_of(k)
    if b is not None:
        travel["b"] = b
    if R:
        local["rk"], local["rv"] = a["registers"]
        rb = bias_of(a["registers"][0])
        if rb is not None:
            local["rb"] = rb
    num_visible = jnp.broadcast_to(ring.counts(aux_local, aux_travel)[:, None, :], (B, N, T))
    entropy = None
    if variant.needs_stats:
        stats_local = dict(local)
        if a_traced is not None:
            stats_local["c"] = jnp.broadcast_to(a_traced, (B, N, T))
        stats_travel = {name: travel[name] for name in ("k", "b") if name in travel}
        if not variant.stats_gradient():
            stats_local, stats_travel = jax.lax.stop_gradient((stats_local, stats_travel))
        fn = lambda s, lo, tr, al, at: ring.step(s, lo, tr, al, at, kind=_mean_logit_kind)  # noqa
        e, lse0, ne0, _ = _ring(fn, n, axis, stats_local, stats_travel, aux_local, aux_travel)
        entropy = jnp.where(ne0, lse0 - jnp.transpose(e[..., 0], (0, 2, 1)), 0.0)
    with jax.ensure_compile_time_eval():
        c_variant = local_plan.query_scale(num_visible, entropy)
    c = c_variant
    if c is not None and _is_static(c):
        # one constant c (a temperature): folded into the kernel's scale and the bias
        ring = dataclasses.replace(ring, a=ring.a * float(c))
        if "b" in travel:
            travel["b"] = travel["b"] * float(c)
        if "rb" in local:
            local["rb"] = local["rb"] * float(c)
        c = None
    if a_traced is not None:
        c = a_traced if c is None else c * a_traced
    if c is not None:
        local["c"] = jnp.broadcast_to(jnp.asarray(c, jnp.float32), (B, N, T))
    kind = _attend_kind(return_stats)
    fn = lambda s, lo, tr, al, at: ring.step(s, lo, tr, al, at, kind=kind)  # noqa: E731
    y, lse, nonempty, mw = _ring(fn, n, axis, local, travel, aux_local, aux_travel)
    Hv = v.shape[-1]
    out = y[..., :Hv]
    ent = None
    if return_stats:
        ent = jnp.where(nonempty, lse - jnp.transpose(y[..., Hv], (0, 2, 1)), 0.0)
    offset = local_plan.query_offset(q)
    if offset is not None:
        offset = jnp.transpose(offset, (0, 2, 1)).astype(jnp.float32)
        if c_variant is not None:
            offset = jnp.broadcast_to(jnp.asarray(c_variant, jnp.float32), (B, N, T)) * offset
    out = out.astype(q.dtype)
    if local_plan.sink_logits is not None:
        out, lse, ent, mw = _with_sinks(local_plan, out, lse, ent, mw, offset, nonempty)
    if not return_stats:
        return out
    if offset is not None:
        lse = lse + jnp.where(nonempty, offset, 0.0)
    return out, AttentionStats(lse, ent, mw)
