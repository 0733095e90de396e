"""Real text that ships with Python: the help topics of ``pydoc_data.topics`` as byte tokens."""

import numpy as np

__all__ = ["load_pydoc_bytes", "TextBatches"]

VOCAB_SIZE = 256


def load_pydoc_bytes() -> np.ndarray:
    """The pydoc help topics (about 0.5 MB of English and Python), as uint8 tokens, in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class TextBatches:
    """Random windows of ``seq_len + 1`` tokens from a train split (first 90%) or an eval split.

    Args:
      tokens: uint8 array.
      seq_len: tokens per example (the model sees ``seq_len``, predicts the next of each).
      batch_size: examples per batch.
      seed: numpy seed.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        split = int(0.9 * len(tokens))
        self.train, self.eval = tokens[:split], tokens[split:]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rng = np.random.default_rng(seed)

    def _sample(self, data, rng):
        starts = rng.integers(0, len(data) - self.seq_len - 1, self.batch_size)
        return np.stack([data[s: s + self.seq_len + 1] for s in starts]).astype(np.int32)

    def next_train(self) -> np.ndarray:
        return self._sample(self.train, self.rng)

    def eval_batch(self, seed: int = 1234) -> np.ndarray:
        return self._sample(self.eval, np.random.default_rng(seed))
