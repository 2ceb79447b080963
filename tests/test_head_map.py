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
