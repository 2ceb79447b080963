"""Records past the dense budget keep queries and keys: every view and analysis reads them as it reads a dense record."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from attnflows_panel import extract as extract_module
from attnflows_panel.analysis import flows as flows_module
from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.flows import flow_trace, merge_word_pieces, rollout_trace, trace_cls_flow
from attnflows_panel.analysis.heads import head_measures
from attnflows_panel.analysis.source import DenseAttention, QueryKeyAttention, WordAttention
from attnflows_panel.analysis.words import word_level
from attnflows_panel.components import CompareView
from attnflows_panel.components import model_work
from attnflows_panel.components import records as records_module
from attnflows_panel.export import dashboard_html, sparse_attention
from attnflows_panel.extract import extract_pair
from test_views import MERGED, data

TEXT = "the unbelievably long movie was good, but the car was bad and the cast was thin"


def close(a: dict, b: dict) -> None:
    """The same columns and values, floats to float32 rounding (queries and keys give attention to about 1e-7)."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.kind in "fc" or b[key].dtype.kind in "fc":
            np.testing.assert_allclose(a[key].astype(float), b[key].astype(float), atol=1e-5, err_msg=key)
        else:
            assert list(a[key]) == list(b[key]), key


def assert_same_trace(a, b) -> None:
    for name in ("edge_layer", "edge_query", "edge_key", "edge_head", "edge_heads", "counts", "reached"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.edge_weight, b.edge_weight, atol=1e-6)
    np.testing.assert_allclose(a.influence, b.influence, atol=1e-6)


@pytest.fixture
def both(tiny_pair, monkeypatch):
    """The pair's records of TEXT kept dense, and the same records kept as queries and keys."""
    dense = extract_pair(tiny_pair, TEXT)
    monkeypatch.setattr(extract_module, "DENSE_RECORD_BYTES", 0)
    captured = extract_pair(tiny_pair, TEXT)
    assert all(isinstance(r.source, DenseAttention) for r in dense)
    assert all(isinstance(r.source, QueryKeyAttention) for r in captured)
    return dense, captured


def test_a_record_past_the_budget_holds_queries_and_keys_that_give_its_attention(both) -> None:
    for d, c in zip(*both, strict=True):
        np.testing.assert_allclose(c.attention, d.attention, atol=2e-6)
        if d.logits is not None:
            np.testing.assert_allclose(c.logits, d.logits, atol=1e-5)
        assert c.tokens == d.tokens and c.n_layers == d.n_layers and c.n_heads == d.n_heads


def test_traces_measures_differences_and_exports_agree(both, monkeypatch) -> None:
    (dense_pre, dense_fine), (pre, fine) = both
    mask = np.zeros((pre.n_layers, pre.n_heads), dtype=bool)
    mask[:, [0, 2]] = True
    for d, c in ((dense_pre, pre), (dense_fine, fine)):
        assert_same_trace(trace_cls_flow(c.source, mask, tau=0.05, top_k=2), trace_cls_flow(d.attention, mask, tau=0.05, top_k=2))
        assert_same_trace(trace_cls_flow(c.source, None, tau=0.05, every_token=True), trace_cls_flow(d.attention, None, tau=0.05, every_token=True))
        assert_same_trace(rollout_trace(c.source, mask, tau=0.01), rollout_trace(d.attention, mask, tau=0.01))
        assert_same_trace(flow_trace(c.source, mask, tau=0.1), flow_trace(d.attention, mask, tau=0.1))
        for name, values in head_measures(c.source, c.tokens, c.cls_mask, c.sep_mask).items():
            np.testing.assert_allclose(values, head_measures(d.attention, d.tokens, d.cls_mask, d.sep_mask)[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(c.source.mean_map(mask), d.attention[mask].mean(axis=0), atol=1e-6)
        sparse, expected = sparse_attention(c.source, 0.1), sparse_attention(d.attention, 0.1)
        for key in ("offsets", "head", "key"):
            np.testing.assert_array_equal(sparse[key], expected[key])
    np.testing.assert_allclose(head_js_divergence(pre.source, fine.source), head_js_divergence(dense_pre.attention, dense_fine.attention), atol=1e-6)
    monkeypatch.setattr(flows_module, "CHUNK_BYTES", 64)  # a trace walks its frontier a row at a time: same edges
    assert_same_trace(trace_cls_flow(pre.source, None, tau=0.05, top_k=3), trace_cls_flow(dense_pre.attention, None, tau=0.05, top_k=3))
    assert "Bokeh" in dashboard_html((pre, fine), top_heads=2)


def test_word_level_merges_a_source_as_it_merges_an_array(both) -> None:
    (dense_pre, _), (pre, _) = both
    words = word_level(pre)
    assert isinstance(words.source, WordAttention) and words.n_tokens < pre.n_tokens
    expected = merge_word_pieces(dense_pre.attention, dense_pre.word_ids.tolist())
    np.testing.assert_allclose(words.attention, expected, atol=1e-6)
    np.testing.assert_allclose(words.source.rows(1, [3, 1], [4, 0, 4]), expected[1][[3, 1]][:, [4, 0, 4]], atol=1e-6)
    np.testing.assert_allclose(words.attention.sum(-1), 1.0, atol=1e-5)


def test_a_view_of_captured_records_draws_what_a_view_of_dense_records_draws(tiny_pair, monkeypatch) -> None:
    # an in-process server of an earlier browser test can leave its document current in Bokeh's global list:
    # run the model inline here whatever that says (serving is not what this test is about)
    monkeypatch.setattr(model_work, "on_server", lambda: False)
    views = []
    for budget in (extract_module.DENSE_RECORD_BYTES, 0):
        monkeypatch.setattr(extract_module, "DENSE_RECORD_BYTES", budget)
        monkeypatch.setattr(records_module, "_CACHE", OrderedDict())  # the cross-session cache would hand back the other kind of record
        view = CompareView(tiny_pair, TEXT, tau=0.05)
        view.select_heads([(1, 0), (1, 2), (0, 1)])
        view.param.update(root=(2, 3), shading="attention", units="words")
        views.append(view)
    dense, captured = views
    assert isinstance(captured.records[0].source, QueryKeyAttention) and isinstance(dense.records[0].source, DenseAttention)
    for live, again in [(captured.flows[MERGED], dense.flows[MERGED]), (captured.sentence, dense.sentence), *zip(captured.matrices.values(), dense.matrices.values(), strict=True), (captured.grid, dense.grid)]:
        for layer in live.sources:
            close(data(live, layer), data(again, layer))
        assert live.figure.title.text == again.figure.title.text
