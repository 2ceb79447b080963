"""Corpus files and the bundled sentiment corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnflows_panel.corpus import Corpus, LabelSummary, clean_mojibake, heldout_sentiment_corpus, read_corpus, sentiment_corpus, split_corpus
from attnflows_panel.errors import InputError


def test_plain_text_one_sentence_a_line(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("first sentence\n\n  second one  \n")
    corpus = read_corpus(path)
    assert corpus.texts == ["first sentence", "second one"] and corpus.labels is None


def test_csv_pairs_with_labels_and_latin1(tmp_path: Path) -> None:
    path = tmp_path / "nli.csv"
    path.write_bytes("text_a,text_b,label\ncaf\xe9 open,it is open,entailment\nx,,neutral\n".encode("latin-1"))
    with pytest.warns(LabelSummary, match=r"^nli.csv: 1 row, 1 label: 'entailment' 1; 1 row without text or label skipped$"):
        corpus = read_corpus(path, require_labels=True, encoding="latin-1")
    assert corpus.texts == ["caf\xe9 open"] and corpus.text_pairs == ["it is open"]  # the row with an empty segment is dropped
    assert corpus.label_names == ["entailment"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(InputError, match="d.jsonl line 2 is not valid JSON"):
        read_corpus(path)


@pytest.mark.parametrize(("content", "message"), [("", "is empty"), ("text\n\n", "has no row with text")])
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
    assert not [t for t in corpus.texts if not t.isascii() or "&amp;" in t or t != t.strip()]  # the file's debris is gone


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("I don\u00d5\u00a2_\x8a\u00ce_\x86\u00a2t want either!", "I don't want either!"),  # a curly apostrophe's debris
        ("\u00d5\u00a2_\x8a\u00ce\x81\u00d0@user: cars \u00d5\u00a2_\x8a\u00ce\u00eb\x9d scary", "@user: cars scary"),  # quotes
        ("drunk &amp; late", "drunk & late"),
        ("no_debris_here in @some_user", "no_debris_here in @some_user"),
        ("cars_\u00d1_.no", "cars .no"),
    ],
)
def test_clean_mojibake(raw: str, clean: str) -> None:
    assert clean_mojibake(raw) == clean


def test_examples_are_valid_inputs(tiny) -> None:
    from attnflows_panel.examples import load_examples
    from attnflows_panel.extract import encode

    examples = load_examples()
    assert len({e.name for e in examples}) == len(examples) >= 10
    assert any(e.text_pair for e in examples) and all(e.source for e in examples)
    for example in examples:
        assert len(encode(tiny, example.text, example.text_pair, warn=False).input_ids) > 3


def _refused(path: Path, message: str, encoding: str = "utf-8") -> None:
    """``read_corpus`` and ``attnflows extract`` refuse ``path`` with exactly ``message``, in one line, writing nothing."""
    from attnflows_panel.cli import main

    before = sorted(path.parent.iterdir())
    with pytest.raises(InputError) as info:
        read_corpus(path, encoding=encoding)
    assert str(info.value) == message and "\n" not in message
    if encoding == "utf-8":
        run = path.parent / "run"
        assert main(["extract", str(path), "-o", str(run), "--quiet"]) == 2
        assert not run.exists()
    assert sorted(path.parent.iterdir()) == before


def test_one_latin1_byte_in_utf8_is_refused_not_read_as_latin1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mixed.csv"
    path.write_bytes("text,label\nna\u00efve but fine,positive\ncaf\xe9 ok,negative\n".encode("utf-8").replace(b"caf\xc3\xa9", b"caf\xe9"))
    offset = path.read_bytes().index(b"\xe9")
    message = f"mixed.csv line 3 is not valid utf-8: byte 0xe9 at byte offset {offset}; pass the file's encoding (for example --encoding latin-1, or encoding='latin-1' in Python)"
    _refused(path, message)
    assert capsys.readouterr().err.splitlines() == [f"attnflows: error: {message}"]


def test_latin1_jsonl_needs_its_encoding(tmp_path: Path) -> None:
    path = tmp_path / "fr.jsonl"
    path.write_bytes('{"text": "caf\xe9 tr\xe8s bon", "label": "pos"}\n'.encode("latin-1"))
    _refused(path, "fr.jsonl line 1 is not valid utf-8: byte 0xe9 at byte offset 13; pass the file's encoding (for example --encoding latin-1, or encoding='latin-1' in Python)")
    with pytest.warns(LabelSummary):
        assert read_corpus(path, encoding="latin-1").texts == ["caf\xe9 tr\xe8s bon"]
    _refused(path, "unknown encoding 'klingon' for fr.jsonl", encoding="klingon")


def test_utf8_with_bom_and_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext\n\"two\nlines, one text\"\nna\xc3\xafve\n")
    assert read_corpus(path).texts == ["two\nlines, one text", "na\u00efve"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\ngood,positive\nbad, really,negative\n", "r.csv line 3 has 3 fields but the header has 2 (text, label)"),
        ("text,label\ngood,positive\n\"multi\nline\",positive\nbad\n", "r.csv line 5 has 1 fields but the header has 2 (text, label)"),
        ("text,text\na,b\n", "r.csv line 1: the header names a column twice: text, text"),
    ],
)
def test_ragged_csv_rows_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(content)
    _refused(path, message)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', "[1, 2]"], "j.jsonl line 2 is not a JSON object but a list"),
        (['{"text": "ok"}', '"just text"'], "j.jsonl line 2 is not a JSON object but a string"),
        (['{"text": "ok"}', '{"text": ["a", "b"]}'], "j.jsonl line 2: 'text' is a list, not a string"),
        (['{"text": "ok"}', '{"text": 3}'], "j.jsonl line 2: 'text' is a number, not a string"),
        (['{"text": "ok"}', "", '{"text": null}'], "j.jsonl line 3: 'text' is null, not a string"),
        (['{"text": "ok"}', '{"sentence": "no text"}'], "j.jsonl line 2 has no 'text' field; found: sentence"),
        (['{"sentence": "no text"}'], "j.jsonl line 1 has no 'text' field (or 'text_a' and 'text_b'); found: sentence"),
        (['{"text_a": "a", "text_b": "b"}', '{"text_a": "a"}'], "j.jsonl line 2 has no 'text_b' field; found: text_a"),
        (['{"text": "ok", "label": ["pos"]}'], "j.jsonl line 1: 'label' is a list, not a string or a number"),
        (['{"text": "ok"}', "{broken"], "j.jsonl line 2 is not valid JSON: Expecting property name enclosed in double quotes"),
    ],
)
def test_bad_jsonl_rows_are_refused(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _refused(path, message)


def test_jsonl_keeps_a_line_separator_inside_a_text(tmp_path: Path) -> None:
    path = tmp_path / "sep.jsonl"
    path.write_text('{"text": "one\u2028two", "label": 1}\n{"text": "three", "label": 0}\n', encoding="utf-8")
    with pytest.warns(LabelSummary, match=r"^sep.jsonl: 2 rows, 2 labels: '0' 1, '1' 1$"):
        corpus = read_corpus(path)
    assert corpus.texts == ["one\u2028two", "three"] and corpus.labels == ["1", "0"]


def test_the_labels_found_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("text,label\na,positive\nb,negative\nc,???\nd,positive\ne,\n")
    with pytest.warns(LabelSummary) as record:
        corpus = read_corpus(path)
    assert [str(w.message) for w in record] == ["l.csv: 5 rows, 3 labels: '???' 1, 'negative' 1, 'positive' 2; 1 row without a label kept"]
    assert corpus.texts[-1] == "e" and corpus.labels[-1] == ""  # extraction keeps a row without a label
    assert corpus.label_counts() == {"???": 1, "negative": 1, "positive": 2}
    with pytest.warns(LabelSummary) as record:
        labelled = read_corpus(path, require_labels=True)  # fine-tuning does not
    assert [str(w.message) for w in record] == ["l.csv: 4 rows, 3 labels: '???' 1, 'negative' 1, 'positive' 2; 1 row without text or label skipped"]
    assert labelled.texts == ["a", "b", "c", "d"]
    none = tmp_path / "n.jsonl"
    none.write_text('{"text": "a b c"}\n{"text": "d e f", "label": null}\n')
    assert read_corpus(none).texts == ["a b c", "d e f"]
    assert Corpus(texts=["x"]).label_counts() == {}


def test_finetune_data_is_read_in_its_encoding(tmp_path: Path) -> None:
    from attnflows_panel.models.finetune import FinetuneConfig, _load_data

    path = tmp_path / "fr.csv"
    path.write_bytes("text,label\ncaf\xe9 bon,pos\nmauvais,neg\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"^fr.csv line 2 is not valid utf-8: byte 0xe9 at byte offset 14; "):
        _load_data(FinetuneConfig(data=str(path)))
    with pytest.warns(LabelSummary, match="'neg' 1, 'pos' 1"):
        corpus, task = _load_data(FinetuneConfig(data=str(path), data_encoding="latin-1"))
    assert corpus.texts[0] == "caf\xe9 bon" and task == "fr"
