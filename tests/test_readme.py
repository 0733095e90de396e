"""The README's python blocks run, each on its own; its speed table matches the committed summary."""

import json
import pathlib
import re

import pytest

from benchmarks import summary

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_alone(index, capsys):
    namespace = {"__name__": f"readme_block_{index}"}  # a fresh namespace: no block leans on another
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), namespace)  # noqa: S102


def test_readme_quick_start_shapes(capsys):
    namespace = {}
    exec(compile(BLOCKS[0], str(README), "exec"), namespace)  # noqa: S102
    assert namespace["out"].shape == (2, 128, 8, 64)
    namespace = {}
    exec(compile(BLOCKS[1], str(README), "exec"), namespace)  # noqa: S102
    assert namespace["w"].shape == (2, 8, 128, 128)
    assert namespace["stats"].entropy.shape == (2, 8, 128)


def test_readme_speed_table_matches_the_summary():
    """The table between the README's markers is the render of benchmarks/summary.json."""
    text = README.read_text()
    want = summary.update_readme(text, json.loads(summary.SUMMARY.read_text()))
    assert text == want, "README speed table is stale: run `python3 -m benchmarks readme`"
