"""A run's corpus head map (Clark et al.'s distances, summed at extraction, then MDS), cached beside the run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from attnflows_panel.analysis.compare import model_names
from attnflows_panel.analysis.embedding import HeadEmbedding, embed_head_distances, store_head_distances
from attnflows_panel.errors import StoreError
from attnflows_panel.paths import sha256_json, write_json_atomic
from attnflows_panel.store import HEAD_MAP_SENTENCES, RunStore

CACHE_VERSION = 3  # 3: distances summed at extraction


def run_head_map(store: RunStore, n_sentences: int | None = None, *, models: Sequence[str] | None = None, seed: int = 0) -> HeadEmbedding:
    """The MDS head map of the run's first ``n_sentences`` extracted sentences (default: its head map's), computed once and cached.

    Exact from the distances summed at extraction when those are the sentences; else from the attention its entries rebuild.
    """
    names, ids, key, path = _cache_entry(store, n_sentences, models, seed)
    cached = _read(path, key)
    if cached is not None:
        return cached
    summed = ids == [i for i in store.sentence_ids() if i < store.manifest["head_map_sentences"]]
    distances = store.head_distances(names) if summed else store_head_distances(store, names, ids)
    embedding = dataclasses.replace(embed_head_distances(distances, seed=seed), n_sentences=len(ids))
    payload = {"key": key, "method": embedding.method, "stress": embedding.stress, "n_sentences": len(ids), "points": _table(embedding.points), "moves": _table(embedding.moves)}
    write_json_atomic(path, payload)
    return embedding


def cached_head_map(store: RunStore, n_sentences: int | None = None, *, models: Sequence[str] | None = None, seed: int = 0) -> HeadEmbedding | None:
    """The head map :func:`run_head_map` would return, if it is already cached; never computes it."""
    _, _, key, path = _cache_entry(store, n_sentences, models, seed)
    return _read(path, key)


def _cache_entry(store: RunStore, n_sentences: int | None, models: Sequence[str] | None, seed: int) -> tuple[tuple[str, ...], list[int], str, Path]:
    """The models, sentence ids, cache key and cache file of one head map of a run."""
    names = model_names(store, models)
    ids = store.sentence_ids()[: store.manifest["head_map_sentences"] or HEAD_MAP_SENTENCES if n_sentences is None else n_sentences]
    if not ids:
        raise StoreError(f"{store.path} has no extracted sentences to place heads by")
    key = sha256_json({"run": store.manifest.get("fingerprint"), "models": names, "ids": ids, "seed": seed, "version": CACHE_VERSION})
    return names, ids, key, store.path / "head_maps" / f"{key[:20]}.json"


def _table(frame: pd.DataFrame) -> dict[str, list]:
    return {"columns": list(frame.columns), "values": frame.to_dict("list")}


def _read(path: Path, key: str) -> HeadEmbedding | None:
    """A cached head map, or None when it is missing, unreadable or made from something else."""
    try:
        payload = json.loads(path.read_text())
        if payload["key"] != key:
            return None
        points, moves = (pd.DataFrame({c: payload[t]["values"][c] for c in payload[t]["columns"]}) for t in ("points", "moves"))
        return HeadEmbedding(points, moves, payload["method"], payload["stress"], payload.get("n_sentences"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
