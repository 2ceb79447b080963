"""Attention as a source: queries and keys captured through attnflows' attention implementation give the eager weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.analysis.source import DenseAttention, QueryKeyAttention
from attnflows_panel.errors import ModelError
from attnflows_panel.extract import encode, forward_attention, forward_sources
from attnflows_panel.models import load_encoder
from conftest import DECODER_TEXTS, save_tiny, save_tiny_decoder

torch = pytest.importorskip("torch")

ENCODERS = ("bert", "roberta", "electra", "distilbert", "albert")
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "gemma2")
TEXTS = [*DECODER_TEXTS, "the film that everyone waited for was a long and boring mess, and the cast was thin"]


@pytest.fixture(scope="module", params=ENCODERS + DECODERS)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"source-{request.param}")
    return save_tiny_decoder(path, request.param) if request.param in DECODERS else save_tiny(path, request.param)


def family_eager_attention(path: Path, lm, encoding) -> np.ndarray:
    """The attention of transformers' own eager implementation of the family, on the same weights and input."""
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if lm.family.causal else AutoModel
    model = loader.from_pretrained(path, attn_implementation="eager").eval()
    inputs = lm.forward_kwargs({"input_ids": torch.from_numpy(encoding.input_ids)[None], "attention_mask": torch.ones(1, len(encoding.input_ids), dtype=torch.long)})
    inputs.pop("logits_to_keep", None)
    with torch.inference_mode():
        out = model(**inputs, output_attentions=True)
    return torch.stack(out.attentions, 1)[0].numpy()


def test_eager_weights_and_captured_sources_equal_the_family_s_own_eager_attention(model_dir: Path) -> None:
    lm = load_encoder(model_dir)
    encodings = [encode(lm, text) for text in TEXTS]
    dense = forward_attention(lm, encodings, max_batch=8)  # padded batches
    sources = forward_sources(lm, encodings, max_batch=8)
    for encoding, (attention, logits), (source, source_logits) in zip(encodings, dense, sources, strict=True):
        n = len(encoding.input_ids)
        assert isinstance(source, QueryKeyAttention) and source.shape == attention.shape == (2, 4, n, n)
        np.testing.assert_allclose(source.dense(), attention, atol=2e-6)
        if logits is not None:
            np.testing.assert_allclose(source_logits, logits, atol=1e-4)
    longest = encodings[-1]
    np.testing.assert_allclose(dense[-1][0], family_eager_attention(model_dir, lm, longest), atol=2e-6)
    if lm.family.causal:
        assert not np.triu(sources[-1][0].dense(), 1).any()


def test_head_measures_of_captured_sources_equal_those_of_their_rows(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family, padded batches: the torch path over queries and keys (blocks of 4 queries) equals the numpy path over the same rows."""
    from attnflows_panel.analysis import heads as heads_module
    from attnflows_panel.analysis.heads import head_measures

    lm = load_encoder(model_dir)
    encodings = [encode(lm, text) for text in TEXTS]
    for encoding, (source, _) in zip(encodings, forward_sources(lm, encodings, max_batch=8), strict=True):
        n, tokens = len(encoding.input_ids), encoding.tokens
        cls = encoding.input_ids == (lm.tokenizer.cls_token_id if lm.tokenizer.cls_token_id is not None else -1)
        sep = encoding.input_ids == (lm.tokenizer.sep_token_id if lm.tokenizer.sep_token_id is not None else -1)
        monkeypatch.setattr(heads_module, "BLOCK_BYTES", 4 * 4 * n * 4)
        got = head_measures(source, tokens, cls, sep)
        for name, values in head_measures(DenseAttention(source.dense()), tokens, cls, sep).items():
            np.testing.assert_allclose(got[name], values, rtol=1e-5, atol=1e-7, err_msg=name)
        assert (got["attn_punct"] > 0).any() == bool(heads_module.punctuation_mask(tokens).any())


def test_mean_maps_of_captured_sources_equal_the_mean_of_their_rows(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family, padded batches: layers with many selected heads (torch, blocks of 3 queries) and with few (row chunks) together."""
    from attnflows_panel.analysis import source as source_module

    lm = load_encoder(model_dir)
    encodings = [encode(lm, text) for text in TEXTS]
    rng = np.random.default_rng(0)
    for encoding, (source, _) in zip(encodings, forward_sources(lm, encodings, max_batch=8), strict=True):
        monkeypatch.setattr(source_module, "MAP_BLOCK_BYTES", 4 * source.n_heads * source.n_tokens * 3)
        A = source.dense()
        for mask in (np.ones(A.shape[:2], bool), rng.random(A.shape[:2]) < 0.4, np.eye(*A.shape[:2], dtype=bool)):
            if mask.any():
                np.testing.assert_allclose(source.mean_map(mask), A[mask].mean(axis=0), rtol=1e-5, atol=1e-7)


def test_sliding_windows_and_soft_caps_are_honoured(tmp_path: Path) -> None:
    lm = load_encoder(save_tiny_decoder(tmp_path / "gemma2", "gemma2"))
    ((source, _),) = forward_sources(lm, [encode(lm, TEXTS[-1])])
    A = source.dense()
    n = A.shape[-1]
    assert n > 8 and source.softcaps == [5.0, 5.0]
    far = np.tril(np.ones((n, n), bool), -4)  # keys 4 or more tokens back: outside the window of a sliding layer
    sliding = [layer for layer in range(2) if not A[layer][:, far].any()]
    assert sliding and len(sliding) < 2  # Gemma2 alternates sliding-window and full layers


def test_blocks_of_a_source_agree_with_its_dense_array(tmp_path: Path) -> None:
    lm = load_encoder(save_tiny_decoder(tmp_path / "llama", "llama"))
    ((source, _),) = forward_sources(lm, [encode(lm, TEXTS[-1])])
    A = source.dense()
    dense = DenseAttention(A)
    heads, queries, keys = [3, 0], [5, 1, 7], [0, 2]
    for s in (source, dense):
        np.testing.assert_allclose(s.rows(1, heads, queries), A[1][heads][:, queries], atol=1e-7)
        np.testing.assert_allclose(s.columns(0, heads, keys), A[0][heads][:, :, keys], atol=1e-7)
        np.testing.assert_allclose(s.head(1, 2), A[1, 2], atol=1e-7)
        chunks = list(s.row_chunks(1, chunk_bytes=4 * 4 * A.shape[-1] * 3))  # three rows of four heads a chunk
        assert len(chunks) == -(-A.shape[-1] // 3)
        np.testing.assert_allclose(np.concatenate([block for _, block in chunks], axis=1), A[1], atol=1e-7)
    assert source.nbytes < dense.nbytes  # queries and keys (n * d a head), not n * n


def test_a_model_without_attnflows_attention_is_one_line(tiny) -> None:
    from transformers import AutoModel

    from attnflows_panel.models.loading import LoadedModel

    eager = LoadedModel(model=AutoModel.from_pretrained(tiny.model.name_or_path, attn_implementation="eager").eval(), tokenizer=tiny.tokenizer, model_id="eager-bert")
    with pytest.raises(ModelError, match="did not run attnflows' attention in each of its 2 layers; load it with load_encoder"):
        forward_sources(eager, [encode(eager, "a film")])


def test_traces_and_head_measures_read_a_source_as_they_read_its_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnflows_panel.analysis import heads as heads_module
    from attnflows_panel.analysis.flows import trace_cls_flow
    from attnflows_panel.analysis.heads import head_measures
    from attnflows_panel.extract import make_record

    lm = load_encoder(save_tiny_decoder(tmp_path / "qwen2", "qwen2"))
    encoding = encode(lm, TEXTS[-1])
    ((source, logits),) = forward_sources(lm, [encoding])
    record = make_record(lm, encoding, TEXTS[-1], None, source.dense(), logits)
    A = record.attention
    mask = np.array([[True, False, True, True], [True, True, False, True]])
    for options in ({"top_k": 2}, {"direction": "forward", "root": (0, 3)}, {"every_token": True, "tau": 0.2}, {"combine": "mean", "tau": 0.05}):
        options = {"root": (2, record.root_token), **options}
        lazy, dense = trace_cls_flow(source, mask, **options), trace_cls_flow(A, mask, **options)
        assert lazy.n_edges > 0 and (lazy.edge_ids() == dense.edge_ids()).all()
        np.testing.assert_allclose(lazy.influence, dense.influence)
        np.testing.assert_allclose(lazy.edge_weight, dense.edge_weight, atol=1e-6)
    monkeypatch.setattr(heads_module, "BLOCK_BYTES", 4 * 4 * record.n_tokens * 5)  # five rows of four heads a block
    lazy = head_measures(source, record.tokens, record.cls_mask, record.sep_mask)
    for name, values in head_measures(A, record.tokens, record.cls_mask, record.sep_mask).items():
        assert lazy[name].shape == (2, 4)
        np.testing.assert_allclose(lazy[name], values, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(lazy["attn_first"], A[..., 0].mean(-1), rtol=1e-5)  # the attention sink


def test_layers_keep_one_copy_of_their_shared_mask(tmp_path: Path) -> None:
    """Every layer slices its own view of one mask tensor: a source keeps one array for all of them, and counts it once."""
    lm = load_encoder(save_tiny_decoder(tmp_path / "llama", "llama"))
    for source, _ in forward_sources(lm, [encode(lm, text) for text in TEXTS], max_batch=8):  # padded batches, causal masks
        masks = [m for m in source.masks if m is not None]
        assert len(masks) == source.n_layers and len({id(m) for m in masks}) == 1
        assert source.nbytes == sum(a.nbytes for a in (*source.queries, *source.keys)) + masks[0].nbytes
