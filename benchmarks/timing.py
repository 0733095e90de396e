"""Steady-state GPU timing of several jitted calls, interleaved: :func:`compare`.

Why not a median of single synchronised calls: a ~1 ms kernel timed 10 times right after its
compilation runs while the GPU clocks are still ramping up from idle, and each timed call also pays
the host's dispatch latency; on the H100 that spread one configuration's time by ~20 % between two
identical runs. Here every candidate is compiled and warmed up first (``warmup_s`` of back-to-back
calls in total), then timed in ``rounds`` rounds that visit the candidates in turn, each a batch of
back-to-back calls lasting about ``batch_s`` with one synchronisation at its end. A candidate's time
is the median over rounds of its per-call batch time; candidates of one comparison see the same
clock and thermal state, so their ratios are what the benchmarks report.

Each timed batch follows an untimed settling batch of the same call (``settle_s``): the GPU's clocks
follow its power draw within milliseconds, so a batch timed right after a low-power candidate (a
slow peer) starts on boosted clocks. Without it the candidate after the slowest ones in the round
order -- our softmax, first in the sweeps -- was favoured: on the H200 softmax
forward+backward at D = 128, N = 4096 ran at 535 TFLOP/s in the 8-column sweep and at 486 in a
5-column run of the same code (the variants: 439-495 and 448-474).

The rounds also rotate the order (round ``r`` starts at the ``r``-th candidate): with a fixed order
our softmax, first, always ran after the slowest peer of the row (the cuDNN RBF workaround) and
the variants always after our own kernels.
"""

import math
import statistics
import time

import jax

__all__ = ["compare", "paired_ratio", "warm_device"]


def _batch(fn, args, n):
    """Seconds per call over ``n`` back-to-back calls, synchronised once at the end."""
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def _error(e):
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def compare(candidates, *, rounds=7, warmup_s=0.3, batch_s=0.03, settle_s=0.015, rounds_out=None,
            rotate=True):
    """Per-call seconds of each candidate, timed in interleaved rounds.

    Args:
      candidates: ``{name: (fn, args)}``; ``fn(*args)`` is a jitted call.
      rounds: timed rounds (the median is reported).
      warmup_s: total seconds of untimed back-to-back calls before the first round.
      batch_s: target length of one timed batch.
      settle_s: length of the untimed batch of the same call before each timed one (0: none).
      rotate: round ``r`` starts at the ``r``-th candidate (mod their number) and goes on in
        order: each candidate runs after each other one in some rounds (else always after the
        same neighbour, whose clocks it inherits).
      rounds_out: a dict that receives ``{name: [seconds per call in each round]}`` for the
        candidates that ran (for ratios paired within a round, :func:`paired_ratio`).

    Returns:
      ``{name: (seconds, outputs, error)}``: ``outputs`` of the first call (for cross-checks);
      a candidate that fails to compile or run has ``seconds = outputs = None`` and the error text.
    """
    results, live = {}, {}
    for name, (fn, args) in candidates.items():
        try:
            out = fn(*args)
            jax.block_until_ready(out)
            live[name] = (fn, args, out)
        except Exception as e:  # noqa: BLE001 - a failing candidate is a result, not a crash
            results[name] = (None, None, _error(e))
    sizes, settle = {}, {}
    for name, (fn, args, _) in live.items():
        t1 = _batch(fn, args, 1)
        sizes[name] = max(1, math.ceil(batch_s / max(t1, 1e-6)))
        settle[name] = math.ceil(settle_s / max(t1, 1e-6)) if settle_s > 0 else 0
    deadline = time.perf_counter() + warmup_s
    while live and time.perf_counter() < deadline:
        for name, (fn, args, _) in live.items():
            _batch(fn, args, sizes[name])
    times = {name: [] for name in live}
    order = list(live)
    for r in range(rounds):
        shift = r % len(order) if rotate and order else 0
        for name in order[shift:] + order[:shift]:
            fn, args, _ = live[name]
            if settle[name]:
                _batch(fn, args, settle[name])
            times[name].append(_batch(fn, args, sizes[name]))
    for name, (_, _, out) in live.items():
        results[name] = (statistics.median(times[name]), out, None)
    if rounds_out is not None:
        rounds_out.update(times)
    return {name: results[name] for name in candidates}


def paired_ratio(num, den):
    """Median over rounds of ``num[r] / den[r]``: a ratio of two candidates' per-round times from
    one :func:`compare` (both ran in round ``r``, back to back). Drifts of the clocks between rounds
    cancel in each pair, which a ratio of the two medians does not get."""
    if not num or not den or len(num) != len(den):
        raise ValueError(f"paired_ratio needs two equal, non-empty lists of round times, got "
                         f"{len(num or [])} and {len(den or [])}")
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def warm_device(seconds=3.0, n=4096):
    """Back-to-back bf16 matmuls for ``seconds`` before the first measurement of a process.

    In two H200 sweeps the first cell a process timed ran ~25 % slow for every
    implementation, cuDNN included, and the later cells did not: the per-cell warm-up of
    :func:`compare` is not enough for a cold device."""
    x = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.bfloat16)
    f = jax.jit(lambda x: (x @ x) * 1e-3)
    jax.block_until_ready(f(x))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        y = x
        for _ in range(20):
            y = f(y)
        jax.block_until_ready(y)
