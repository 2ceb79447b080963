"""The corpus table of a run: values against head_js_divergence, predictions, and its cache beside the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny

from attnflows_panel.analysis import corpus_table as module
from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.corpus_table import CACHE_FILE, corpus_table
from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import InputError
from attnflows_panel.extract import extract
from attnflows_panel.store import RunStore, extract_corpus

TEXTS = ["the movie was good", "<img src=x onerror=alert(1)>", "i hate it", "the car was not safe", "a great film", "bad"] * 2
PAIRS = [f"it was {w}" for w in ("good", "bad", "awful", "great", "safe", "very bad")] * 2
LABELS = ["positive", "negative"] * 6


def corpus(pairs: bool = True) -> Corpus:
    return Corpus(texts=TEXTS, text_pairs=PAIRS if pairs else None, labels=LABELS, source="corpus-table-test")


@pytest.fixture(scope="module")
def models(tiny_pair) -> dict:
    """A base without a head and a classifier, as in a real pre-trained / fine-tuned run."""
    return {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}


@pytest.fixture(scope="module")
def run(models, tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    return extract_corpus(models, corpus(), tmp_path_factory.mktemp("run") / "run", shard_size=5, progress=False)


def test_table_matches_head_js_divergence(run: RunStore, models: dict) -> None:
    table = corpus_table(run, cache=False)
    assert list(table.columns) == ["sentence_id", "text", "text_pair", "label", "predicted_finetuned", "probability_finetuned", "correct_finetuned", "difference", "n_tokens"]
    assert table["sentence_id"].tolist() == list(range(len(TEXTS)))
    assert table["text"].tolist() == TEXTS and table["text_pair"].tolist() == PAIRS and table["label"].tolist() == LABELS
    tokens = run.tokens().set_index("sentence_id")
    for row in table.itertuples():
        pre, fine = (extract(models[name], None, row.text, row.text_pair).attention for name in ("pretrained", "finetuned"))
        assert row.difference == pytest.approx(head_js_divergence(pre, fine).mean(), rel=1e-3, abs=1e-6)  # float32 at extraction
        assert row.n_tokens == pre.shape[-1] == len(tokens.loc[row.sentence_id, "tokens"])
        assert row.predicted_finetuned == tokens.loc[row.sentence_id, "predicted_finetuned"]
        assert row.probability_finetuned == pytest.approx(max(tokens.loc[row.sentence_id, "probabilities_finetuned"]))
        assert row.correct_finetuned == (row.predicted_finetuned == row.label)
    assert 0.0 < table["difference"].min() and table["difference"].max() < 1.0


def test_prediction_changed_needs_both_models_to_predict(tiny_pair, tmp_path: Path) -> None:
    other = load_classifier(tmp_path / "other")
    store = extract_corpus({"first": other, "second": tiny_pair.finetuned}, corpus(pairs=False), tmp_path / "run", progress=False)
    table = corpus_table(store, ("first", "second"), cache=False)
    assert {"predicted_first", "probability_first", "predicted_second", "probability_second"} <= set(table.columns)
    assert table["prediction_changed"].tolist() == (table["predicted_first"] != table["predicted_second"]).tolist()
    for name in ("first", "second"):
        assert table[f"correct_{name}"].tolist() == (table[f"predicted_{name}"] == table["label"]).tolist()
    assert table["text_pair"].isna().all()
    unnamed = Corpus(texts=TEXTS, labels=["0"] * len(TEXTS), source="labels the models do not use")
    store = extract_corpus({"first": other, "second": tiny_pair.finetuned}, unnamed, tmp_path / "unnamed", progress=False)
    assert not [c for c in corpus_table(store, ("first", "second"), cache=False).columns if c.startswith("correct_")]


def load_classifier(path: Path):
    from attnflows_panel.models import load_encoder

    return load_encoder(save_tiny(path, classifier=True, seed=2))


def test_cache_is_written_beside_the_run_and_reused(run: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    (run.path / CACHE_FILE).unlink(missing_ok=True)
    computed = corpus_table(run)
    assert (run.path / CACHE_FILE).is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached table should have been reused")

    monkeypatch.setattr(module, "sentence_differences", fail)
    pd.testing.assert_frame_equal(corpus_table(RunStore.open(run.path)), computed)


def test_cache_is_recomputed_when_the_run_or_the_models_change(models, tmp_path: Path) -> None:
    def stop_after_first(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus(), tmp_path / "run", shard_size=5, progress=False, on_shard=stop_after_first)
    assert len(corpus_table(RunStore.open(tmp_path / "run"))) == 5  # only the extracted sentences

    store = extract_corpus(models, corpus(), tmp_path / "run", shard_size=5, progress=False)  # resumed: a new manifest
    table = corpus_table(store)
    assert len(table) == len(TEXTS)
    swapped = corpus_table(store, ("finetuned", "pretrained"))
    assert "predicted_finetuned" in swapped.columns
    np.testing.assert_allclose(swapped["difference"], table["difference"], rtol=1e-12)  # JS divergence is symmetric


def test_unreadable_cache_is_recomputed(run: RunStore) -> None:
    expected = corpus_table(run, cache=False)
    (run.path / CACHE_FILE).write_bytes(b"not parquet")
    pd.testing.assert_frame_equal(corpus_table(run), expected)
    pd.testing.assert_frame_equal(pd.read_parquet(run.path / CACHE_FILE), expected)


def test_without_cache_nothing_is_written(run: RunStore) -> None:
    (run.path / CACHE_FILE).unlink(missing_ok=True)
    corpus_table(run, cache=False)
    assert not (run.path / CACHE_FILE).exists()


def test_a_cache_that_cannot_be_written_only_warns(run: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(path: Path):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(module, "atomic_file", read_only)
    with pytest.warns(UserWarning, match="could not cache the corpus table"):
        table = corpus_table(run, ("finetuned", "pretrained"))
    assert len(table) == len(TEXTS)


@pytest.mark.parametrize("names", [("pretrained",), ("pretrained", "finetuned", "pretrained"), ("pretrained", "other")])
def test_two_models_of_the_run_are_needed(run: RunStore, names: tuple[str, ...]) -> None:
    with pytest.raises(InputError):
        corpus_table(run, names, cache=False)
