"""experiments.files and experiments.cli: what every experiment shares."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from experiments import cli, files


@dataclasses.dataclass(frozen=True)
class _Config:
    preset: str = "cpu"
    n: int = 3
    out_dir: str = "out"

    def digest(self):
        return hashlib.sha256(str(self.n).encode()).hexdigest()[:6]


def test_paths_and_identity(tmp_path):
    c = _Config(out_dir=str(tmp_path))
    assert files.result_path(c) == tmp_path / f"cpu-{c.digest()}.json"
    assert files.parts_dir(c) == tmp_path / f"cpu-{c.digest()}.parts"
    ident = files.identity(c, {"jax": "1"})
    assert ident == {"config": {"preset": "cpu", "n": 3}, "versions": {"jax": "1"}}


def test_parts_resume_only_under_their_identity(tmp_path):
    ident = files.identity(_Config(), {"jax": "1"})
    path = tmp_path / "unit.json"
    assert files.load_part(path, ident, "unit") == (None, None)
    files.write_part(path, ident, "unit", {"x": np.arange(3)})
    assert files.load_part(path, ident, "unit") == ({"x": [0, 1, 2]}, None)
    other = files.identity(_Config(n=4), {"jax": "1"})
    assert files.load_part(path, other, "unit") == (None, "another config (n differ)")
    newer = files.identity(_Config(), {"jax": "2"})
    assert files.load_part(path, newer, "unit") == (None, "another versions (jax differ)")
    assert files.load_part(path, ident, "result") == (None, "no result in it")
    path.write_text("{")
    value, why = files.load_part(path, ident, "unit")
    assert value is None and why.startswith("unreadable")


def test_jsonable_and_versions():
    out = files.jsonable({1: np.float32(0.5), "a": (np.int64(2), np.array([[1.0, np.nan]]))})
    back = json.loads(json.dumps(out))  # NaN survives as json's NaN
    assert back["1"] == 0.5 and back["a"][0] == 2 and back["a"][1][0][0] == 1.0
    assert np.isnan(back["a"][1][0][1]) and type(back["a"][0]) is int
    v = files.versions("scipy")
    assert {"python", "jax", "jaxlib", "numpy", "jaxattn", "scipy", "device", "backend"} <= set(v)


def test_convert_reads_each_type_and_names_the_flag():
    assert cli.convert("ns", "1,5,,10", (1, 2)) == (1, 5, 10)
    assert cli.convert("eps", "1e-3,10", (0.1,)) == (1e-3, 10.0)
    assert cli.convert("impls", "pallas,xla", ()) == ("pallas", "xla")
    assert cli.convert("steps", "20", 5) == 20
    assert cli.convert("lr", "3e-4", 1e-3) == 3e-4
    assert cli.convert("flag", "yes", False) is True and cli.convert("flag", "0", True) is False
    assert cli.convert("implementation", "xla", None) == "xla"
    assert cli.convert("implementation", "none", "pallas") is None
    with pytest.raises(SystemExit, match="--num-steps: cannot read 'ten' as int"):
        cli.convert("num_steps", "ten", 5)
    with pytest.raises(SystemExit, match="--flag: cannot read 'maybe' as bool"):
        cli.convert("flag", "maybe", False)
    with pytest.raises(SystemExit, match="--ns: cannot read '1,x' as comma-separated list"):
        cli.convert("ns", "1,x", (1,))


def test_seed_statistics_and_verdicts():
    from experiments import stats

    mean, half = stats.mean_ci([1.0, 2.0, 3.0])
    # t quantile 0.975 at 2 degrees of freedom (tables: 4.3027), sample sd 1
    assert mean == 2.0 and half == pytest.approx(4.302652729749462 / np.sqrt(3), rel=1e-12)
    assert np.isnan(stats.mean_ci([1.0])[1])
    assert stats.verdict([1.0, 1.1, 0.9], "x")["status"] == "holds"
    assert stats.verdict([1.0, -0.5, 0.2], "x")["status"] == "same direction, not significant at 95 %"
    assert stats.verdict([-1.0, -1.1], "x")["status"] == "does not hold"
    assert stats.verdict([0.3], "x")["status"] == "holds (one seed, no interval)"
    means, halves = stats.over_seeds([[1.0, 5.0], [3.0, 5.0]])
    assert means == [2.0, 5.0] and halves[1] == 0.0
