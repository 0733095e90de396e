"""CPU checks of the benchmark helpers' bookkeeping (the timings themselves need a GPU)."""

import jax
import pytest

from benchmarks import timing
from benchmarks.profile import gpu_events

_TRACE = """
planes {{
  id: 1
  name: "/device:GPU:0"
  lines {{
    id: 1
    name: "Stream #13(Compute)"
    timestamp_ns: 1000
    {events}
  }}
  lines {{ id: 2 name: "XLA Ops" timestamp_ns: 1000
    events {{ metadata_id: 2 offset_ps: 0 duration_ps: 999000000 }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "kernel_mosaic_gpu_kernel" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "loop_fusion" }} }}
}}
planes {{ id: 2 name: "/host:CPU" lines {{ id: 1 name: "python" timestamp_ns: 0
  events {{ metadata_id: 1 offset_ps: 0 duration_ps: 7000000 }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "kernel_mosaic_gpu_kernel" }} }} }}
"""


def _profile(calls):
    """A trace of ``calls``, each ``[(metadata id, microseconds), ...]`` run back to back."""
    events, t = [], 0
    for call in calls:
        for meta, us in call:
            events.append(f"events {{ metadata_id: {meta} offset_ps: {t} duration_ps: {us * 10**6} }}")
            t += (us + 1) * 10**6
    text = _TRACE.format(events="\n    ".join(events))
    return jax.profiler.ProfileData.from_serialized_xspace(
        jax.profiler.ProfileData.text_proto_to_serialized_xspace(text))


def test_gpu_events_split_repeated_kernels_by_order():
    """Two calls of [dq 5 us, dkv 3 us, a fusion 1 us]: the two launches of one kernel name come
    apart as #1 / #2; host planes and non-stream lines are ignored."""
    data = _profile([[(1, 5), (1, 3), (2, 1)], [(1, 5), (1, 3), (2, 1)]])
    got = {name: (ns / 1e3, n) for name, (ns, n) in gpu_events(data, steps=2).items()}
    assert got == {"kernel_mosaic_gpu_kernel#1": (10.0, 2), "kernel_mosaic_gpu_kernel#2": (6.0, 2),
                   "loop_fusion": (2.0, 2)}


def test_gpu_events_keep_a_name_whole_when_counts_do_not_divide():
    data = _profile([[(1, 5), (1, 3)], [(1, 4)]])  # 3 launches over 2 calls: no per-call order
    assert {k: v[1] for k, v in gpu_events(data, steps=2).items()} == {"kernel_mosaic_gpu_kernel": 3}


@pytest.mark.parametrize("steps", [1, 4])
def test_gpu_events_of_an_empty_trace(steps, capsys):
    assert gpu_events(_profile([]), steps) == {}
    assert "no GPU stream events" in capsys.readouterr().out


@pytest.mark.parametrize("settle_s", [0.0, 0.02])
def test_compare_settles_each_timed_batch(monkeypatch, settle_s):
    """Every timed batch follows an untimed batch of the same call (``settle_s``), so a candidate
    timed after a slower one is not measured on clocks that candidate left behind."""
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    log = []

    def make(name, seconds):
        def fn():
            clock[0] += seconds
            log.append(name)
            return name
        return fn

    result = timing.compare({"a": (make("a", 0.01), ()), "b": (make("b", 0.005), ())}, rounds=3,
                            warmup_s=0.0, batch_s=0.02, settle_s=settle_s, rotate=False)
    assert result["a"][0] == pytest.approx(0.01) and result["b"][0] == pytest.approx(0.005)
    rounds = log[4:]  # after the first call and the one-call timing of each
    a_settle, b_settle = (2, 4) if settle_s else (0, 0)
    one_round = ["a"] * (a_settle + 2) + ["b"] * (b_settle + 4)
    assert rounds == one_round * 3


def test_compare_rotates_the_order_of_each_round(monkeypatch):
    """Round r starts at the r-th candidate, so no candidate always follows the same one."""
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    log = []

    def make(name):
        def fn():
            clock[0] += 0.01
            log.append(name)
            return name
        return fn

    names = "abc"
    result = timing.compare({n: (make(n), ()) for n in names}, rounds=4, warmup_s=0.0,
                            batch_s=0.01, settle_s=0.0)
    assert list(result) == list(names)  # results keep the candidates' order
    assert "".join(log[6:]) == "abc" + "bca" + "cab" + "abc"


def test_paired_ratio_cancels_drift_between_rounds():
    """Clocks that drift between rounds scale both candidates of a round alike: the paired ratio is
    exact where the ratio of medians is not."""
    drift = [1.0, 1.0, 2.0, 2.0, 2.0]  # the clocks of each round (both candidates see them)
    noise = [1.0, 1.0, 1.0, 1.2, 0.8]  # the slow candidate's own jitter
    fast = list(drift)
    slow = [2.0 * d * e for d, e in zip(drift, noise, strict=True)]
    assert timing.paired_ratio(slow, fast) == pytest.approx(2.0)
    assert sorted(slow)[2] / sorted(fast)[2] == pytest.approx(1.6)  # the ratio of medians
    with pytest.raises(ValueError, match="equal"):
        timing.paired_ratio([1.0], [1.0, 2.0])


def _row(impl, seconds, rounds=None, D=64, N=4096, causal=False, mode="fwdbwd"):
    return dict(D=D, N=N, causal=causal, mode=mode, impl=impl, time_s=seconds,
                tflops=1.0 / seconds, error=None, round_times_s=rounds)


def test_speed_ratio_pairs_rounds_when_it_can():
    from benchmarks.attention import speed_ratio
    key = (64, 4096, False, "fwdbwd")
    rows = [_row("softmax", 1.0, [1.0, 1.0, 3.0]), _row("rbf", 1.25, [1.25, 1.25, 3.75]),
            _row("cudnn", 1.1)]
    by_key = {(r["D"], r["N"], r["causal"], r["mode"], r["impl"]): r for r in rows}
    assert speed_ratio(by_key, key, "rbf", "softmax") == pytest.approx(0.8)
    assert speed_ratio(by_key, key, "softmax", "cudnn") == pytest.approx(1.1)  # no rounds: TFLOP/s
    assert speed_ratio(by_key, key, "rbf", "tokamax_rbf") is None


def test_targets_count_cells_in_scope_per_sweep():
    from benchmarks.targets import Target, check
    t = Target("rbf", "softmax", "fwdbwd", 0.9)
    sweep1 = [_row("softmax", 1.0), _row("rbf", 1.05),  # 0.952: met
              _row("softmax", 1.0, N=16384), _row("rbf", 1.2, N=16384),  # 0.833: missed
              _row("softmax", 1.0, N=1024), _row("rbf", 2.0, N=1024)]  # N < 4096: out of scope
    sweep2 = [_row("softmax", 1.0), _row("rbf", 1.2)]
    (cells, met), = check([sweep1, sweep2], targets=(t,)).values()
    assert met == [1, 0]
    assert sorted(cells) == [(64, 4096, False), (64, 16384, False)]
    assert cells[(64, 16384, False)][1] is None
    assert cells[(64, 4096, False)] == [pytest.approx(1 / 1.05), pytest.approx(1 / 1.2)]


def _raw(device="NVIDIA H100 80GB HBM3"):
    """Raw speed rows of two cells: ours and the peers at known speeds, three identical rounds."""
    rows = []
    for N in (4096, 16384):
        for mode, speeds in (("fwd", dict(softmax=500, cudnn=400, adaptive=300, rbf=450,
                                           cudnn_rbf=150)),
                             ("fwdbwd", dict(softmax=400, cudnn=400, adaptive=200, rbf=380,
                                              cudnn_rbf=100))):
            for impl, tflops in speeds.items():
                t = 1.0 / tflops
                rows.append(dict(D=64, N=N, B=16384 // N, causal=False, mode=mode, impl=impl,
                                 time_s=t, tflops=tflops * (1 + (N > 4096)), error=None,
                                 round_times_s=[t, t, t]))
    return dict(device=device, date="2026-01-02", command="python3 -m benchmarks speed",
                jax="0.11.2", heads=16, tokens=16384, rows=rows)


def test_summary_ratios_and_table():
    from benchmarks import summary
    s = summary.summarize([_raw()], "python3 -m benchmarks speed --x")
    cell = {(c["N"], c["mode"], c["impl"]): c for c in s["cells"]}
    assert cell[(4096, "fwd", "adaptive")]["vs_softmax"] == 0.6
    assert cell[(4096, "fwd", "softmax")]["vs_cudnn"] == 1.25
    assert cell[(4096, "fwd", "rbf")]["vs_peers"] == {"cudnn_rbf": 3.0}
    table = summary.render(s)
    assert "| `adaptive` |" in table and "| 0.60 |" in table  # fwd ÷ our softmax in both cells
    assert "| 300–600 |" in table  # TFLOP/s range over the two cells
    assert "forward 3.00, forward+backward 3.80" in table
    assert "NVIDIA H100 80GB HBM3 on 2026-01-02" in table and "--x" in table


def test_summary_refuses_mixed_devices():
    from benchmarks import summary
    with pytest.raises(ValueError, match="different devices"):
        summary.summarize([_raw(), _raw("NVIDIA H200")], "x")


def test_readme_update_replaces_only_the_marked_block():
    from benchmarks import summary
    s = summary.summarize([_raw()], "cmd")
    text = f"intro\n{summary.START}\nold table\n{summary.END}\noutro\n"
    new = summary.update_readme(text, s)
    assert new.startswith("intro\n") and new.endswith(f"{summary.END}\noutro\n")
    assert "old table" not in new and summary.render(s) in new
    with pytest.raises(ValueError, match="markers"):
        summary.update_readme("no markers", s)


@pytest.mark.parametrize("command", ["speed", "memory", "kernels", "check"])
def test_gpu_commands_exit_at_once_on_a_cpu(command):
    import os
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "benchmarks", command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs an NVIDIA Hopper GPU" in proc.stderr


def test_check_runs_the_three_gpu_checks_correctness_only(monkeypatch):
    import subprocess

    import benchmarks.__main__ as cli
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append(cmd[2:]) or 0)
    assert cli._check(["--cases", "0"]) == 0
    assert calls == [["checks.forward", "--cases", "0"],
                     ["checks.backward", "--only", "check", "--cases", "0"],
                     ["checks.api", "--cases", "0"]]


def test_ab_installs_each_build_and_restores_none_of_the_other(tmp_path):
    """``benchmarks.ab.installed``: inside each context the importable ``jaxattn`` and
    ``pallas_kernels`` are that build's (a marked copy of this tree as the base), a second use
    reuses the same module objects, and the other build's modules are not left installed."""
    import shutil
    import sys

    from benchmarks import ab
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ab.PACKAGES}
    for pkg in ab.PACKAGES:
        shutil.copytree(f"{ab.HERE}/{pkg}", tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "pallas_kernels" / "__init__.py", "a") as f:
        f.write("\nBUILD_MARK = 'base'\n")
    base, new = {}, {}
    try:
        with ab.installed(str(tmp_path), base) as jaxattn:
            assert jaxattn.__file__.startswith(str(tmp_path))
            assert sys.modules["pallas_kernels"].BUILD_MARK == "base"
        with ab.installed(ab.HERE, new) as jaxattn:
            assert jaxattn.__file__.startswith(ab.HERE)
            assert not hasattr(sys.modules["pallas_kernels"], "BUILD_MARK")
        with ab.installed(str(tmp_path), base) as jaxattn:
            assert jaxattn is base["jaxattn"]
            assert sys.modules["pallas_kernels"] is base["pallas_kernels"]
        assert not any(n.split(".")[0] in ab.PACKAGES for n in sys.modules)
    finally:
        sys.modules.update(saved)


def test_same_kernels_digest_sees_kernel_changes_and_ignores_source_lines():
    """The no-speed-lost check on the CPU: two lowerings of one call agree (the process's kernel
    counter and the source locations are left out), and a kernel built with other block sizes or a
    program with other glue differs."""
    import jax.numpy as jnp

    from benchmarks.same_kernels import lowering_digest
    from pallas_kernels.forward import BlockSizes, flash_forward

    x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

    def fwd(config, glue=1.0):
        return jax.jit(lambda q, k, v: glue * flash_forward(q, k, v, logit_scale=0.125,
                                                            config=config, interpret=False)[0])

    base = lowering_digest(fwd(BlockSizes(block_q=64, block_kv=64)), x, x, x)
    assert len(base[1]) == 1
    assert lowering_digest(fwd(BlockSizes(block_q=64, block_kv=64)), x, x, x) == base
    # the same call written on another source line
    again = jax.jit(lambda q, k, v: 1.0 * flash_forward(
        q, k, v, logit_scale=0.125, config=BlockSizes(block_q=64, block_kv=64), interpret=False)[0])
    assert lowering_digest(again, x, x, x) == base
    other = lowering_digest(fwd(BlockSizes(block_q=64, block_kv=128)), x, x, x)
    assert other[1] != base[1] and other[0] != base[0]
    glue = lowering_digest(fwd(BlockSizes(block_q=64, block_kv=64), glue=2.0), x, x, x)
    assert glue[1] == base[1] and glue[0] != base[0]


def test_same_kernels_canonical_form_ignores_constant_order_only():
    """Two kernels that hoist the same constants in another order print the same; another
    constant value, or another use of one, does not."""
    from benchmarks.same_kernels import _canonical

    def kernel(constants, mul, add):
        lines = ['  "stable_mosaic_gpu.func.func"() ({']
        lines += [f'    %{i} = "stable_mosaic_gpu.arith.constant"() {{value = {v} : i32}} : () -> i32'
                  for i, v in enumerate(constants)]
        lines += [f'    %2 = "stable_mosaic_gpu.arith.muli"(%arg0, {mul}) : (i32, i32) -> i32',
                  f'    %3 = "stable_mosaic_gpu.arith.addi"(%2, {add}) : (i32, i32) -> i32', "  })"]
        return "\n".join(lines)

    base = _canonical(kernel([64, 1], mul="%0", add="%1"))  # (x * 64) + 1
    assert _canonical(kernel([1, 64], mul="%1", add="%0")) == base  # the same, hoisted 1 first
    assert _canonical(kernel([1, 64], mul="%0", add="%1")) != base  # (x * 1) + 64
    assert _canonical(kernel([64, 2], mul="%0", add="%1")) != base
    assert _canonical(kernel([64, 1], mul="%0", add="%2")) != base  # (x * 64) + (x * 64)


def test_ab_cells_take_the_option_cells():
    """The A/B grid: the variants' defaults unless named; the option cells by name, hardmax
    forward only (its fused path has no backward); an unknown name is refused."""
    from benchmarks.ab import OPTION_CELLS, VARIANTS, cell_parser, parse_cells
    parser = lambda: cell_parser("ab", "")
    _, cells = parse_cells(parser(), ["--base", "x", "--dims", "64", "--lengths", "1024"])
    assert {c[5] for c in cells} == set(VARIANTS) and not set(OPTION_CELLS) & set(VARIANTS)
    _, cells = parse_cells(parser(), ["--base", "x", "--dims", "64", "--lengths", "1024",
                                      "--variants", "softcap,hardmax"])
    assert sorted((c[3], c[4], c[5]) for c in cells) == sorted(
        (causal, mode, name) for causal in (False, True) for mode, name in
        (("fwd", "softcap"), ("fwdbwd", "softcap"), ("fwd", "hardmax")))
    with pytest.raises(SystemExit):
        parse_cells(parser(), ["--base", "x", "--variants", "nope"])
