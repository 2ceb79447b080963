"""A stored sentence (``RunStore.record``) is a record like any other: traces at tau_min or above and every view read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.analysis.flows import trace_cls_flow
from attnflows_panel.analysis.heads import head_measures
from attnflows_panel.components import CompareView, model_work
from attnflows_panel.corpus import Corpus
from attnflows_panel.export import dashboard_html
from attnflows_panel.extract import extract_pair
from attnflows_panel.store import extract_corpus
from test_views import MERGED, data

TEXTS = ["the movie was good", "i hate it", "a great car"]  # short: the tiny models' rows have weights of at least 0.1


@pytest.fixture
def stored(tiny_pair, tmp_path: Path):
    models = {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}
    return extract_corpus(models, Corpus(texts=TEXTS, source="stored-records"), tmp_path / "run", progress=False)


def test_a_trace_at_tau_min_or_above_is_the_live_trace(tiny_pair, stored) -> None:
    for sid, text in enumerate(TEXTS):
        live = extract_pair(tiny_pair, text)
        for record, name in zip(live, stored.models, strict=True):
            kept = stored.record(sid, name)
            assert kept.tokens == record.tokens and kept.predicted_label == record.predicted_label
            for tau in (stored.tau_min, 0.2):
                a, b = trace_cls_flow(kept.source, tau=tau, top_k=3), trace_cls_flow(record.source, tau=tau, top_k=3)
                # the same edges (which head is strongest on one may differ: the tiny heads tie within float16's 1e-3)
                for field in ("edge_layer", "edge_query", "edge_key", "reached"):
                    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
                np.testing.assert_allclose(a.edge_weight, b.edge_weight, rtol=1e-3)  # float16 entries
            measures = head_measures(kept.source, kept.tokens, kept.cls_mask, kept.sep_mask)
            assert all(np.isfinite(v).all() for v in measures.values())


def test_every_view_draws_a_stored_sentence_as_it_draws_it_live(tiny_pair, stored, monkeypatch) -> None:
    monkeypatch.setattr(model_work, "on_server", lambda: False)
    live = CompareView(tiny_pair, TEXTS[0], tau=0.1)
    shown = CompareView(tiny_pair, TEXTS[0], tau=0.1)
    shown.records = tuple(stored.record(0, name) for name in stored.models)
    for view in (live, shown):
        view.select_heads([(1, 0), (0, 2)])
    assert shown.flows[MERGED].figure.title.text == live.flows[MERGED].figure.title.text
    for layer in live.flows[MERGED].sources:
        a, b = data(shown.flows[MERGED], layer), data(live.flows[MERGED], layer)
        assert a.keys() == b.keys() and len(next(iter(a.values()), [])) == len(next(iter(b.values()), []))
    assert "<html" in dashboard_html(shown.records, tau=0.1)
