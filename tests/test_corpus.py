"""Corpus files and the bundled sentiment corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnflows_panel.corpus import heldout_sentiment_corpus, read_corpus, sentiment_corpus, split_corpus
from attnflows_panel.errors import InputError


def test_plain_text_one_sentence_a_line(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("first sentence\n\n  second one  \n")
    corpus = read_corpus(path)
    assert corpus.texts == ["first sentence", "second one"] and corpus.labels is None


def test_csv_pairs_with_labels_and_latin1(tmp_path: Path) -> None:
    path = tmp_path / "nli.csv"
    path.write_bytes("text_a,text_b,label\ncaf\xe9 open,it is open,entailment\nx,,neutral\n".encode("latin-1"))
    corpus = read_corpus(path, require_labels=True)
    assert corpus.texts == ["caf\xe9 open"] and corpus.text_pairs == ["it is open"]  # the row with an empty segment is dropped
    assert corpus.label_names == ["entailment"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(InputError, match="d.jsonl line 2 is not valid JSON"):
        read_corpus(path)


@pytest.mark.parametrize(("content", "message"), [("", "is empty"), ("text\n\n", "has no non-empty rows")])
def test_empty_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "e.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_corpus(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="corpus file does not exist"):
        read_corpus(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="corpus path is not a file"):
        read_corpus(tmp_path)


def test_split_is_fixed_and_disjoint() -> None:
    from attnflows_panel.corpus import Corpus

    corpus = Corpus(texts=[f"s{i}" for i in range(50)], labels=["a", "b"] * 25)
    train, held = split_corpus(corpus)
    assert len(held) == 5 and len(train) == 45
    assert not set(train.texts) & set(held.texts)
    assert split_corpus(corpus)[1].texts == held.texts
    with pytest.raises(InputError, match="cannot hold out 50 of 50"):
        split_corpus(corpus, heldout=50)


@pytest.mark.integration
def test_bundled_sentiment_corpus() -> None:
    corpus = sentiment_corpus()
    assert set(corpus.labels) == {"negative", "positive"}
    assert len(set(corpus.texts)) == len(corpus) > 20_000
    held = heldout_sentiment_corpus()
    assert len(held) == 1000 and held.texts == heldout_sentiment_corpus().texts


def test_examples_are_valid_inputs(tiny) -> None:
    from attnflows_panel.examples import load_examples
    from attnflows_panel.extract import encode

    examples = load_examples()
    assert len({e.name for e in examples}) == len(examples) >= 10
    assert any(e.text_pair for e in examples) and all(e.source for e in examples)
    for example in examples:
        assert len(encode(tiny, example.text, example.text_pair, warn=False).input_ids) > 3
