"""A run's sentences as one table: labels, each model's prediction and how differently the two models attend.

The difference of a sentence is the mean over heads of :func:`head_js_divergence` (bits), from the
run's stored differences (out of core). The table is cached beside the run, in ``RUN_DIR/corpus_table.parquet``,
keyed by the run's manifest, so it is recomputed whenever the run changes (a resumed extraction, say).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from attnflows_panel.analysis.compare import model_names, stored_differences
from attnflows_panel.errors import InputError, StoreError
from attnflows_panel.paths import atomic_file, sha256_json
from attnflows_panel.store import RunStore

CACHE_FILE = "corpus_table.parquet"
CACHE_VERSION = 2
KEY_FIELD = b"attnflows_corpus_table_key"


def corpus_table(store: RunStore, models: Sequence[str] = ("pretrained", "finetuned"), *, cache: bool = True) -> pd.DataFrame:
    """One row per extracted sentence: text, label, each classifier's prediction (and whether it is the label),
    ``difference`` (bits) and ``n_tokens``.

    With ``cache``, the table is read from (or written to) ``RUN_DIR/corpus_table.parquet`` when the run is unchanged.
    """
    names = _two_models(store, models)
    path, key = store.path / CACHE_FILE, cache_key(store, names)
    if cache and (cached := _read_cache(path, key)) is not None:
        return cached
    table = _build(store, names)
    if cache:
        _write_cache(path, table, key)
    return table


def cache_key(store: RunStore, models: Sequence[str]) -> str:
    """The key a cached table must carry: the run's whole manifest (shards and their hashes), the models, the version."""
    return sha256_json({"manifest": store.manifest, "models": list(models), "version": CACHE_VERSION})


def sentence_differences(store: RunStore, models: Sequence[str], sentence_ids: Sequence[int]) -> np.ndarray:
    """Per sentence, the mean over heads of the two models' JS divergence (bits), from the run's stored differences."""
    means = stored_differences(store, models).groupby("sentence_id")["js"].mean().compute()
    return means.reindex([int(i) for i in sentence_ids]).to_numpy(np.float64)


def _two_models(store: RunStore, models: Sequence[str]) -> tuple[str, str]:
    names = model_names(store, models)
    if len(names) != 2:
        raise InputError(f"the corpus table compares two models, got {len(names)}: {', '.join(names)}")
    return names[0], names[1]


def _build(store: RunStore, models: tuple[str, str]) -> pd.DataFrame:
    tokens = store.tokens()
    if tokens.empty:
        raise StoreError(f"{store.path} has no extracted sentences to tabulate")
    sentences = store.sentences()[["sentence_id", "text", "text_pair", "label"]]
    table = sentences.merge(_predictions(tokens, models), on="sentence_id", how="inner", validate="one_to_one")
    for name in (n for n in models if f"predicted_{n}" in table.columns):
        if set(table["label"].dropna()) & set(table[f"predicted_{name}"]):  # labels named as the model names its classes
            table[f"correct_{name}"] = (table[f"predicted_{name}"] == table["label"]).where(table["label"].notna())
    table["difference"] = sentence_differences(store, models, table["sentence_id"].tolist())
    return table[[c for c in table.columns if c != "n_tokens"] + ["n_tokens"]]


def _predictions(tokens: pd.DataFrame, models: tuple[str, str]) -> pd.DataFrame:
    """Per sentence: each model's predicted label and its probability (models with a head only), and the token count."""
    out = tokens[["sentence_id", "n_tokens"]].astype(np.int64)
    predicted = [name for name in models if f"predicted_{name}" in tokens.columns]
    for name in predicted:
        out[f"predicted_{name}"] = tokens[f"predicted_{name}"]
        out[f"probability_{name}"] = tokens[f"probabilities_{name}"].map(np.max).astype(np.float64)
    if len(predicted) == 2:
        out["prediction_changed"] = out[f"predicted_{models[0]}"] != out[f"predicted_{models[1]}"]
    return out


def _read_cache(path: Path, key: str) -> pd.DataFrame | None:
    """The cached table, or None when it is missing, unreadable or made from another run state."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return pd.read_parquet(path) if metadata.get(KEY_FIELD) == key.encode() else None
    except (OSError, ValueError):
        return None


def _write_cache(path: Path, table: pd.DataFrame, key: str) -> None:
    """Write the table with its key atomically; a run directory we cannot write to only costs the cache."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), KEY_FIELD: key.encode()})
    try:
        with atomic_file(path) as tmp:
            pq.write_table(arrow, tmp)
    except OSError as exc:
        warnings.warn(f"could not cache the corpus table in {path}: {exc}", stacklevel=3)
