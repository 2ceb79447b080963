"""One shard of a corpus run computed from the models' batched attention: tidy Arrow tables, nothing written.

Per sentence and model: the head statistics and the attention entries of at least ``tau_min`` (a row
holds at most ``1 / tau_min`` of them, so a shard grows linearly with its tokens). Per sentence and
head, between the first two models: the JS divergence of their rows and the cosine of their maps.
Everything is computed a layer at a time on whole padded batches (one pass of :mod:`attention_rows`), padded
query rows left out of every sum and entry; the first sentences may also sum the head map's distances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from attnflows_panel.extract import Encoding, attention_pass, encode_batch, length_batches, padded_inputs
from attnflows_panel.models.loading import LoadedModel

if TYPE_CHECKING:
    import torch

STATS = ("entropy", "max_weight", "attn_cls", "attn_sep")
DIFFERENCES = ("js", "cosine")
SHARD_BATCH_BYTES = 64 * 2**20  # all models' attention of one batch: two shards at once hold about twice this, plus logs
TAU_MIN = 0.1  # the app's default edge threshold: every view at it or above is exact
TINY = 1e-30  # weights are clamped to this before their log: 0 log 0 = 0, and no weight that is not 0 is this small


@dataclass
class ShardTables:
    """The tables of one shard: ``stats``, ``differences`` (None for one model), ``tokens`` and ``entries``."""

    shard: int
    start: int
    stop: int
    stats: pa.Table
    differences: pa.Table | None
    tokens: pa.Table
    entries: pa.Table
    distances: pa.Table | None  # Clark et al.'s head distances summed over the shard's head-map sentences
    n_truncated: int  # sentences longer than the models take, truncated

    def parts(self) -> dict[str, pa.Table]:
        """Each part's table by name (``differences`` and ``distances`` only when there are some)."""
        parts = {"stats": self.stats, "tokens": self.tokens, "entries": self.entries, "differences": self.differences, "distances": self.distances}
        return {name: table for name, table in parts.items() if table is not None}


def compute_shard(
    models: Mapping[str, LoadedModel],
    shard: int,
    start: int,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    *,
    tau_min: float = TAU_MIN,
    max_batch: int = 32,
    head_map_until: int = 0,
) -> ShardTables:
    """The tables of sentences ``start, start + 1, …`` (``texts``) through every model, in length-bucketed batches.

    Sentences before ``head_map_until`` also add up the distances between every two heads of all models (the head map's).
    """
    import torch

    names = list(models)
    first = models[names[0]]
    encodings = encode_batch(first, texts, text_pairs)  # the texts were checked before the run began
    lengths = [len(e.input_ids) for e in encodings]
    cls_id, sep_id = (-1 if t is None else t for t in (first.tokenizer.cls_token_id, first.tokenizer.sep_token_id))
    n_layers, n_heads = first.n_layers, first.n_heads
    stats = np.empty((len(STATS), len(texts), len(names), n_layers, n_heads), np.float32)
    differences = np.empty((len(DIFFERENCES), len(texts), n_layers, n_heads), np.float32) if len(names) > 1 else None
    entries: list[tuple[np.ndarray, ...]] = []  # per batch and model: sentence_id, model, layer, head, query, key, weight
    logits: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    mapped: dict[int, list[np.ndarray]] = {}  # the head map's sentences: every model's dense attention
    for batch in shard_batches(lengths, models, max_batch):
        chosen = [encodings[i] for i in batch]
        n = np.array([lengths[i] for i in batch])
        special = special_columns(_padded_ids(chosen), cls_id, sep_id)
        outputs = [batch_attention(models[name], chosen) for name in names]
        sums, pair_sums, found = batch_rows([layers for layers, _ in outputs], n, special, tau_min)
        per_query = n[:, None, None].astype(np.float64)  # [B, 1, 1]
        for m, (name, (layers, batch_logits)) in enumerate(zip(names, outputs, strict=True)):
            rows, *kept = found[m]
            entries.append((np.asarray(batch, dtype=np.int64)[rows] + start, np.full(len(rows), m, np.int8), *kept))
            for k, column in enumerate(STATS):
                stats[k, batch, m] = sums[column][m] / per_query
            for row, i in enumerate(batch):
                if start + i < head_map_until:
                    mapped.setdefault(i, []).append(torch.stack([layer[row, :, : lengths[i], : lengths[i]] for layer in layers]).numpy())
                if batch_logits is not None:
                    logits[name][i] = batch_logits[row]
        if differences is not None and pair_sums is not None:
            differences[0, batch] = pair_sums[0] / per_query
            differences[1, batch] = pair_sums[1] / np.sqrt(sums["squares"][0] * sums["squares"][1])
    return ShardTables(
        shard, start, start + len(texts),
        _stats_table(stats, names, start, n_layers, n_heads),
        None if differences is None else _differences_table(differences, start, n_layers, n_heads),
        _tokens_table(models, encodings, logits, start),
        _entries_table(entries, names),
        _distances_table(mapped, names) if mapped else None,
        sum(e.n_truncated > 0 for e in encodings),
    )


def shard_batches(lengths: Sequence[int], models: Mapping[str, LoadedModel], max_batch: int) -> list[list[int]]:
    """A shard's batches: similar lengths together, every model's float32 attention of a batch within :data:`SHARD_BATCH_BYTES`."""
    first = next(iter(models.values()))
    return length_batches(lengths, first.n_layers * first.n_heads * 4 * len(models), max_batch, SHARD_BATCH_BYTES)


def _padded_ids(encodings: Sequence[Encoding]) -> torch.Tensor:
    """``[B, w]`` token ids, -1 past each input's end (no token has that id)."""
    import torch

    ids = torch.full((len(encodings), max(len(e.input_ids) for e in encodings)), -1, dtype=torch.long)
    for row, e in enumerate(encodings):
        ids[row, : len(e.input_ids)] = torch.from_numpy(e.input_ids)
    return ids


def batch_attention(lm: LoadedModel, encodings: Sequence[Encoding]) -> tuple[list[torch.Tensor], np.ndarray | None]:
    """Each layer's ``[B, H, w, w]`` float32 attention of a padded batch (padded query rows hold junk) and each row's logits."""
    layers, logits = attention_pass(lm, padded_inputs(lm, encodings))
    return [layer.float().cpu() for layer in layers], logits


def special_columns(ids: torch.Tensor, cls_id: int, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key positions of each input's [CLS] and [SEP] tokens ``[B, P]`` (padded with 0) and which is which ``[B, P, 2]``."""
    import torch

    kinds = torch.stack([ids == cls_id, ids == sep_id], -1)  # [B, w, 2]
    found = kinds.any(-1)
    width = max(1, int(found.sum(-1).max()))
    positions = torch.zeros((len(ids), width), dtype=torch.long)
    which = torch.zeros((len(ids), width, 2))
    for row in range(len(ids)):
        at = found[row].nonzero()[:, 0]
        positions[row, : len(at)] = at
        which[row, : len(at)] = kinds[row, at].float()
    return positions, which


def batch_rows(
    models: Sequence[Sequence[torch.Tensor]], lengths: np.ndarray, special: tuple[torch.Tensor, torch.Tensor], tau: float
) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[tuple[np.ndarray, ...]]]:
    """Every model's per-head sums over the real queries ``[M, B, L, H]`` by measure (:data:`attention_rows.MEASURES`), the first
    two models' ``[2, B, L, H]`` sums of JS bits and dot products (None for one model), and each model's entries of at
    least ``tau``: (row, layer, head, query, key) int16 and float16 weights, layer by layer in row order.

    ``models``: each model's ``[B, H, w, w]`` layers of one padded batch; ``special``: :func:`special_columns` of it.
    """
    import torch

    from attnflows_panel.attention_rows import MEASURES, layer_rows, real_rows

    n_layers = len(models[0])
    b, h = models[0][0].shape[:2]
    sums = np.zeros((len(models), b, n_layers, h, len(MEASURES)))
    pair = len(models) > 1
    pair_sums = np.zeros((2, b, n_layers, h)) if pair else None
    found: list[list[tuple[np.ndarray, ...]]] = [[] for _ in models]
    positions, which = (t.numpy() for t in special)
    lengths = lengths.astype(np.int64)
    rows = real_rows(lengths, h)
    for layer in range(n_layers):
        weights = [layers[layer].contiguous() for layers in models]
        logs = [w.clamp_min(TINY).log_().numpy() for w in weights]  # torch's vectorised log; 0 log 0 = 0
        arrays = [w.numpy() for w in weights]
        shared = (layer, lengths, positions, which, tau)
        kept = []
        if pair:
            mixed = torch.add(weights[0], weights[1]).clamp_min_(TINY).log_().numpy()
            kept += layer_rows(arrays[0], logs[0], arrays[1], logs[1], mixed, *shared, sums[:2], pair_sums, rows)
        for m in range(2 if pair else 0, len(models)):
            kept += layer_rows(arrays[m], logs[m], None, None, None, *shared, sums[m : m + 1], None, rows)
        for m, (row, head, query, key, weight) in enumerate(kept):
            found[m].append((row, np.full(row.size, layer, np.int16), head, query, key, weight))
    entries = [tuple(np.concatenate(column) for column in zip(*chunks, strict=True)) for chunks in found]
    return {name: sums[..., k] for k, name in enumerate(MEASURES)}, pair_sums, [(*columns[:-1], columns[-1].astype(np.float16)) for columns in entries]


def _stats_table(stats: np.ndarray, names: list[str], start: int, n_layers: int, n_heads: int) -> pa.Table:
    """``stats`` ``[STATS, sentences, models, L, H]`` as a tidy table, a row per sentence, model and head."""
    n_sentences = stats.shape[1]
    layer, head = np.meshgrid(np.arange(n_layers, dtype=np.int16), np.arange(n_heads, dtype=np.int16), indexing="ij")
    columns: dict[str, Any] = {
        "sentence_id": np.repeat(np.arange(start, start + n_sentences, dtype=np.int64), n_layers * n_heads * len(names)),
        "model": pa.DictionaryArray.from_arrays(np.repeat(np.tile(np.arange(len(names), dtype=np.int8), n_sentences), n_layers * n_heads), names),
        "layer": np.tile(layer.ravel(), n_sentences * len(names)),
        "head": np.tile(head.ravel(), n_sentences * len(names)),
    }
    return pa.table(columns | {name: stats[k].reshape(-1) for k, name in enumerate(STATS)})


def _differences_table(differences: np.ndarray, start: int, n_layers: int, n_heads: int) -> pa.Table:
    """``differences`` ``[DIFFERENCES, sentences, L, H]`` as a tidy table, a row per sentence and head."""
    n_sentences = differences.shape[1]
    layer, head = np.meshgrid(np.arange(n_layers, dtype=np.int16), np.arange(n_heads, dtype=np.int16), indexing="ij")
    return pa.table(
        {
            "sentence_id": np.repeat(np.arange(start, start + n_sentences, dtype=np.int64), n_layers * n_heads),
            "layer": np.tile(layer.ravel(), n_sentences),
            "head": np.tile(head.ravel(), n_sentences),
        }
        | {name: differences[k].reshape(-1) for k, name in enumerate(DIFFERENCES)}
    )


def _tokens_table(models: Mapping[str, LoadedModel], encodings: list[Encoding], logits: dict[str, dict[int, np.ndarray]], start: int) -> pa.Table:
    columns: dict[str, Any] = {
        "sentence_id": np.arange(start, start + len(encodings), dtype=np.int64),
        "n_tokens": np.array([len(e.input_ids) for e in encodings], dtype=np.int64),
        "n_truncated": np.array([e.n_truncated for e in encodings], dtype=np.int64),
        "tokens": [e.tokens for e in encodings],
        "input_ids": [e.input_ids.tolist() for e in encodings],
        "word_ids": [e.word_ids.tolist() for e in encodings],
        "segment_ids": [e.segment_ids.astype(np.int64).tolist() for e in encodings],
    }
    for name, lm in models.items():
        if not logits[name]:
            continue
        scores = np.stack([logits[name][i] for i in range(len(encodings))])
        best = scores.argmax(1)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        columns[f"predicted_{name}"] = [lm.labels[k] if lm.labels else str(k) for k in best.tolist()]
        columns[f"probabilities_{name}"] = list(p.astype(np.float32))
    return pa.table(columns)


def _distances_table(mapped: dict[int, list[np.ndarray]], names: list[str]) -> pa.Table:
    """Tidy ``[K, K]`` sums of Clark et al.'s head distances over the head map's sentences, with their counts."""
    from attnflows_panel.analysis.embedding import clark_head_distances

    import torch

    distances = clark_head_distances((mapped[i] for i in sorted(mapped)), names, workers=torch.get_num_threads())
    k = len(distances.total)
    i, j = np.meshgrid(np.arange(k, dtype=np.int32), np.arange(k, dtype=np.int32), indexing="ij")
    return pa.table(
        {"i": i.ravel(), "j": j.ravel(), "total": distances.total.ravel(), "n_sentences": np.full(k * k, distances.n_sentences), "n_tokens": np.full(k * k, distances.n_tokens)}
    )


def _entries_table(entries: list[tuple[np.ndarray, ...]], names: list[str]) -> pa.Table:
    """One table of every batch's entries, a chunk a batch, in the order they were found (``RunStore`` orders a shard's by sentence and model)."""
    dictionary = pa.array(names)
    columns = list(zip(*entries, strict=True))
    return pa.table(
        {
            "sentence_id": pa.chunked_array(columns[0], pa.int64()),
            "model": pa.chunked_array([pa.DictionaryArray.from_arrays(codes, dictionary) for codes in columns[1]]),
            "layer": pa.chunked_array(columns[2], pa.int16()),
            "head": pa.chunked_array(columns[3], pa.int16()),
            "query": pa.chunked_array([c.view(np.uint16) for c in columns[4]], pa.uint16()),
            "key": pa.chunked_array([c.view(np.uint16) for c in columns[5]], pa.uint16()),
            "weight": pa.chunked_array(columns[6], pa.float16()),
        }
    )
