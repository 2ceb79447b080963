"""The run's cached head map: computed once, read back the same, with the number of sentences that placed it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnflows_panel.corpus import Corpus
from attnflows_panel.head_map import cached_head_map, run_head_map
from attnflows_panel.store import extract_corpus

TEXTS = ["the movie was good", "the car was bad", "I liked the food", "a long and boring film", "what a day"]


def test_the_head_map_is_cached_with_its_sentence_count(tiny_pair, tmp_path: Path) -> None:
    store = extract_corpus({"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}, Corpus(texts=TEXTS, source="head-map-test"), tmp_path / "run", progress=False)
    assert cached_head_map(store, 3) is None
    made = run_head_map(store, 3)
    read = cached_head_map(store, 3)
    assert made.n_sentences == read.n_sentences == 3
    assert np.allclose(made.points[["x", "y"]].to_numpy(), read.points[["x", "y"]].to_numpy())
    assert run_head_map(store, 10).n_sentences == len(TEXTS)  # no more than the run holds


def test_the_default_head_map_is_placed_by_distances_summed_at_extraction(tiny_pair, tmp_path: Path) -> None:
    from attnflows_panel.analysis.embedding import clark_head_distances
    from attnflows_panel.extract import extract

    models = {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}
    store = extract_corpus(models, Corpus(texts=TEXTS, source="head-map-test"), tmp_path / "run", shard_size=2, head_map_sentences=3, progress=False)
    assert store.manifest["head_map_sentences"] == 3
    exact = clark_head_distances([tuple(extract(lm, None, t).attention for lm in models.values()) for t in TEXTS[:3]], list(models))
    stored = store.head_distances()
    assert stored.n_sentences == 3 and stored.n_tokens == exact.n_tokens
    np.testing.assert_allclose(stored.total, exact.total, rtol=1e-4, atol=1e-5)
    one = store.head_distances(["finetuned"])
    np.testing.assert_allclose(one.total, exact.total[8:, 8:], rtol=1e-4, atol=1e-5)
    assert run_head_map(store).n_sentences == 3
