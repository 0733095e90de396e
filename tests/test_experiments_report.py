"""experiments.report: assembling sections from results JSONs, and failing on missing ones."""

import json
import os
import pathlib
import sys
import types

from experiments import report
from theory import check


def _theory(tmp_path):
    rows = [check.Row("c1", "s", "verified", "1 < 2"), check.Row("c2", "s", "refuted", "J = 0.5"),
            check.Row("c3", "s", "verified", "x")]
    check.save(rows, tmp_path / report.THEORY_JSON, settings="ci", seconds=3.0)


def _fake_experiments(monkeypatch, tmp_path, names):
    """Experiments whose sections echo the JSON they were given (to see which one was read)."""
    entries = []
    for name in names:
        module = types.ModuleType(f"fake_{name}")
        module.report_section = lambda path, base_dir=None: (
            f"## {json.loads(pathlib.Path(path).read_text())['tag']} from "
            f"{os.path.relpath(path, base_dir)}\n")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        entries.append((name, module.__name__))
    monkeypatch.setattr(report, "EXPERIMENTS", tuple(entries))


def test_sections_from_the_newest_json(monkeypatch, tmp_path):
    _theory(tmp_path)
    _fake_experiments(monkeypatch, tmp_path, ["a", "b"])
    for sub, tag, mtime in [("a", "old", 1_000), ("a", "new", 2_000), ("b", "only", 1_500)]:
        path = tmp_path / sub / f"{tag}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"tag": tag}))
        os.utime(path, (mtime, mtime))
    (tmp_path / "a" / "x.parts").mkdir()
    (tmp_path / "a" / "x.parts" / "unit.json").write_text("{}")  # parts are not results
    text, missing = report.build(tmp_path, timings={"theory": 3.0})
    assert missing == []
    assert "## new from a/new.json" in text and "## only from b/only.json" in text
    assert "## old" not in text
    assert "3 claims (1 refuted, 2 verified)" in text
    assert "| c2 | s | refuted | J = 0.5 |" in text
    assert "| theory | 3 s |" in text


def test_missing_parts_fail_unless_allowed(monkeypatch, tmp_path):
    _fake_experiments(monkeypatch, tmp_path, ["a"])
    assert report.main(["--results", str(tmp_path)]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "Not run: no results JSON" in text
    assert report.main(["--results", str(tmp_path), "--allow-missing"]) == 0
    _theory(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "r.json").write_text(json.dumps({"tag": "t"}))
    assert report.main(["--results", str(tmp_path), "--timings", "x=1.5,y=2"]) == 0
    assert "| y | 2 s |" in (tmp_path / "report.md").read_text()


def test_timings_from_the_json_without_run_sh(monkeypatch, tmp_path):
    _theory(tmp_path)
    _fake_experiments(monkeypatch, tmp_path, ["a", "b"])
    for sub, timing in (("a", {"wall_s": 12.4}), ("b", None)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "r.json").write_text(json.dumps({"tag": sub, "timing": timing}))
    assert report.json_timings(tmp_path) == {"theory": 3.0, "a": 12.4}
    text, _ = report.build(tmp_path)
    assert "| theory | 3 s |" in text and "| a | 12 s |" in text and "| b |" not in text
    text, _ = report.build(tmp_path, timings={"x": 1.0})  # run.sh's own timings win
    assert "| x | 1 s |" in text and "| a | 12 s |" not in text
