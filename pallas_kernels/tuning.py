"""Tuned tiles of the fused kernels, as data: one table per device kind.

The kernels never hold tile sizes in code: :func:`pallas_kernels.forward.default_block_sizes`,
:func:`~pallas_kernels.forward.default_stats_block_sizes` and
:func:`pallas_kernels.backward.default_backward_block_sizes` name a *case* (what the problem
carries: a per-query scale ``c``, a key bias ``b``, a mask, ...) and read its entry from the
table of the device they run on (:func:`table`, by ``jax.devices()[0].device_kind``).

Both kinds in :data:`TABLES` are sm90 (the same 227 KiB of shared memory per block, the same
65536 registers per SM); the H200 differs in memory (141 GB of HBM3e, 4.8 TB/s against 3.35).
Each entry's comment names the device its deciding measurement ran on; the one known disagreement
is the fold at D = 128 (2 % faster on the H200, 1-4 % slower on the H100), where the H200's
choice stands. So today one table (:data:`SM90`) serves both, and any other device (an unknown
GPU, the CPU that runs the interpreter) gets it too. A kind that needs other tiles gets its own
table here. The measurements behind each entry: ``docs/kernels.md``.

Entries are plain dicts of :class:`~pallas_kernels.forward.BlockSizes` /
:class:`~pallas_kernels.backward.BackwardBlockSizes` fields (fields left out keep the dataclass
default). Keys are ``(padded head dim, case)``; a case missing for a head dim falls back along
:data:`FALLBACK` (e.g. ``"cb"`` -> ``"b"`` -> ``"plain"``).
"""

import jax

__all__ = ["SM90", "TABLES", "FALLBACK", "table", "lookup"]

# Forward cases (default_block_sizes): "plain" (no c, no b); "short_causal" (plain, causal over at
# most `forward_short_causal_keys` keys); "c" (a per-query scale); "c_row_max" (c, given the exact
# row max, no mask hides keys); "b" (a key bias); "cb" (both).
# Backward cases (default_backward_block_sizes): "plain"; "c" (a per-query scale); "c_masked_dc" (c, a mask,
# and the dq kernel sums dc); "c_entropy" / "c_entropy_masked" (c = f(H0), the entropy term fused: a
# second dq accumulator; without / with a mask).
FALLBACK = {"short_causal": "plain", "c": "plain", "c_row_max": "c", "b": "plain", "cb": "b",
            "c_masked_dc": "c", "c_entropy": "c_masked_dc", "c_entropy_masked": "c_entropy",
            "plain": None}

# Regenerate with `python3 -m benchmarks tune` (the forward tiles; `python3 -m benchmarks kernels`
# times the statistics-sweep layouts and the backward configs); bf16, B = 4, H = 16, N = 4096.
SM90 = {
    "forward": {
        # D = 64: 256 x 3 + fold 442 / 367 TFLOP/s (non-causal / causal, H100) against 420 / 345
        # for 256 x 2 and 418 / 353 for 128 x 2 + fold; 64-key tiles <= 348 / 315.
        (64, "plain"): dict(block_q=64, block_kv=256, max_concurrent_steps=3, fold_scale=True),
        # Causal over <= 2048 keys the 256-key tiles leave SMs idle: 220 -> 254 TFLOP/s at
        # N = 1024, 304 -> 312 at N = 2048 (H200); at N = 4096 256 x 3 wins (367 / 353, H100).
        (64, "short_causal"): dict(block_q=64, block_kv=128, max_concurrent_steps=2,
                                   fold_scale=True),
        # With c the 256-key tiles spill (ptxas: 276 bytes at 168 registers): 128 x 2 + fold
        # 413 / 353 against 420 / 297 (H200).
        (64, "c"): dict(block_q=64, block_kv=128, max_concurrent_steps=2, fold_scale=True),
        # Given the row max (no online max, fewer live registers) and no mask: 256-key tiles
        # 0.579 ms against 0.629 (H200); masked, 128-key tiles stay (0.334 against 0.376).
        (64, "c_row_max"): dict(block_q=64, block_kv=256, max_concurrent_steps=2, fold_scale=True),
        # Key bias on the tensor cores (mma_bias): 256 x 2 415 / 334 TFLOP/s against the best
        # strip's 370 / 276 (H200).
        (64, "b"): dict(block_q=64, block_kv=256, max_concurrent_steps=2, fold_scale=True,
                        mma_bias=True),
        (64, "cb"): dict(block_q=64, block_kv=128, max_concurrent_steps=2, fold_scale=True,
                         mma_bias=True),
        # D = 128: 128 x 2 + fold 553 / 586 TFLOP/s at N = 4096 / 16384 against 540 / 573 without
        # the fold (H200; on the H100 the fold lost 1-4 %); 192-key tiles gain 2-4 % only at
        # N = 16384 without a mask, 3 stages lose.
        (128, "plain"): dict(block_q=64, block_kv=128, max_concurrent_steps=2, fold_scale=True),
        # mma_bias 538 / 484 TFLOP/s against the strip's 491 / 435 (H200).
        (128, "b"): dict(block_q=64, block_kv=128, max_concurrent_steps=2, fold_scale=True,
                         mma_bias=True),
        # D = 192 / 256: only 64-key tiles of 2 stages fit SMEM; 0.94-0.96x cuDNN at D = 256.
        (192, "plain"): dict(block_q=64, block_kv=64, max_concurrent_steps=2),
        (256, "plain"): dict(block_q=64, block_kv=64, max_concurrent_steps=2),
        # D = 256 with c: the fold 554 -> 573 TFLOP/s non-causal, 523 -> 533 causal (H200); it
        # loses without c (585 -> 568) and with b (556 -> 551).
        (256, "c"): dict(block_q=64, block_kv=64, max_concurrent_steps=2, fold_scale=True),
    },
    "forward_short_causal_keys": 2048,
    # The statistics sweep (flash_stats): the forward's entry for the same c / b, with these fields
    # over it. Without P @ V the ping-pong only serializes the softmaxes: free-running warpgroups
    # over 128-key tiles, V not streamed. ms non-causal / causal (H200): D = 64 4 free without V
    # 0.424 / 0.265 against the forward's ping-pong 0.539 / 0.325; D = 128 4 free without V
    # 0.521 / 0.307 against 3 free with V 0.644 / 0.389; D = 256 2 free 128 x 2 without V
    # 1.000 / 0.541 against the ping-pong 64 x 2 1.229 / 0.660. D = 192 is not timed: the forward's.
    "stats": {
        64: dict(compute_wgs=4, block_kv=128, max_concurrent_steps=2, pingpong=False,
                 sweep_skips_v=True),
        128: dict(compute_wgs=4, block_kv=128, max_concurrent_steps=2, pingpong=False,
                  sweep_skips_v=True),
        256: dict(compute_wgs=2, block_kv=128, max_concurrent_steps=2, pingpong=False,
                  sweep_skips_v=True),
    },
    "backward": {
        # dkv_edge_masks: causal dkv 1.398 -> 1.229 ms (D = 128, c, H100); the dq kernel keeps full
        # masks (edge masks cost it 6-13 %). mma_bias: dq 0.955 -> 0.905, dkv 1.432 -> 1.308 ms
        # (D = 64, b, H200). mma_db: dkv 1.367 -> 1.318 at D = 64, a loss at D = 128. overlap:
        # dkv 3-8 % faster, dq unchanged. dc_mma: dq 1.018 -> 0.999, causal 0.767 -> 0.712 (D = 64).
        (64, "plain"): dict(block_q_dq=64, block_kv_dq=128, block_q_dkv=64, block_kv_dkv=64,
                            compute_wgs=2, max_concurrent_steps=2, dkv_edge_masks=True,
                            mma_bias=True, mma_db=True, overlap=True, dc_mma=True),
        (128, "plain"): dict(block_q_dq=64, block_kv_dq=128, block_q_dkv=64, block_kv_dkv=64,
                             compute_wgs=2, max_concurrent_steps=2, dkv_edge_masks=True,
                             mma_bias=True, overlap=True, dc_mma=True),
        # D = 128, c, masked, dc summed: the 128-key dq tile spills (240 bytes): causal 1.538 ->
        # 1.140 ms with 64-key tiles (H100), 1.430 -> 1.160 (H200); dc_mma loses there
        # (1.110 -> 1.134). Without a mask (1.968 -> 1.698) or without dc (0.865 -> 0.734) the
        # 128-key tile wins.
        (128, "c_masked_dc"): dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                                   compute_wgs=2, max_concurrent_steps=2, dkv_edge_masks=True,
                                   mma_bias=True, overlap=True),
        # The entropy term fused (adaptive temperature's gradient through beta), D = 64, causal:
        # 64-key dq tiles without overlap or dc_mma 2.54 ms against the plain tiles' 2.98 and the
        # unfused two passes' 2.76 (B = 4, N = 4096, fwd+bwd, H100); without a mask the plain
        # tiles win (3.90 against 4.13; two passes 4.86).
        (64, "c_entropy_masked"): dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64,
                                       block_kv_dkv=64, compute_wgs=2, max_concurrent_steps=2,
                                       dkv_edge_masks=True, mma_bias=True, mma_db=True),
        # The entropy term fused, D = 128: the dk/dv kernel's two [64, 128] float32 accumulators
        # beside the tile's p, p0 (s - m) and dP spill; split into a dv and a dk kernel (one
        # accumulator each, one more Q K^T a tile): dq + dk/dv 5.54 -> 4.71 ms, causal 6.86 ->
        # 3.56 (no overlap: 5.62, 4.62), B = 4, N = 4096, H100. Causal stays unfused
        # (entropy_fused): the two passes' backward kernels take about 2.98 ms there.
        (128, "c_entropy"): dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                                 compute_wgs=2, max_concurrent_steps=2, dkv_edge_masks=True,
                                 mma_bias=True, overlap=True, dkv_split=True),
        # D = 256: the fused dkv kernel's two [64, 256] float32 accumulators take 256 registers a
        # thread (115 TFLOP/s against the dq kernel's 456, H200): dkv_split; one warpgroup.
        (256, "plain"): dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                             compute_wgs=1, max_concurrent_steps=2, dkv_split=True),
    },
}

# Where the backward fuses the entropy term (flash_backward's base_entropy) rather than running
# the entropy sweep's VJP as a second pass: (padded head dim, masked) -> bool, False where absent.
# H100, B = 4, N = 4096, fwd+bwd ms fused / two passes: D = 64 causal 2.54 / 2.76, not 3.90 /
# 4.86; D = 128 not 6.76 / 8.09, causal 5.27 / 4.22 (every tile choice tried spills: the masked
# dq kernel's two [64, 128] float32 accumulators); D = 256 untimed (two [64, 256] accumulators).
SM90["entropy_fused"] = {(64, False): True, (64, True): True, (128, False): True,
                         (128, True): False}

# Device kind substrings (``jax.devices()[0].device_kind``, e.g. "NVIDIA H100 80GB HBM3",
# "NVIDIA H200"), first match wins; anything else gets SM90.
TABLES = {"H200": SM90, "H100": SM90}


def _device_kind():
    try:
        return jax.devices()[0].device_kind
    except RuntimeError:  # no backend
        return ""


def table(device_kind=None):
    """The tuning table of ``device_kind`` (default: the first JAX device's); :data:`SM90` for
    kinds not in :data:`TABLES` (other GPUs, the CPU that runs the interpreter)."""
    kind = _device_kind() if device_kind is None else device_kind
    for name, tab in TABLES.items():
        if name in kind:
            return tab
    return SM90


def lookup(section, head_dim, case, device_kind=None):
    """The entry (a dict of fields) of ``(head_dim, case)`` in ``section`` ("forward" or
    "backward") of the device's table, following :data:`FALLBACK` for a case it lacks; KeyError
    for a head dim without a "plain" entry."""
    entries = table(device_kind)[section]
    first = case
    while (head_dim, case) not in entries:
        case = FALLBACK[case]
        if case is None:
            raise KeyError(f"no {section} tuning entry for head dim {head_dim} (case {first!r})")
    return entries[(head_dim, case)]
