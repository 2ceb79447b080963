"""The shards of a corpus run computed from the models' batched attention: tidy Arrow tables, nothing written.

Shards are computed a window at a time (:data:`WINDOW_SENTENCES`): its sentences are sorted by length and cut into
batches together, each batch is computed on its own (:func:`compute_batch`, a task for a thread), and each shard's
tables are made from the batches' parts (:func:`window_tables`). A window's batches depend only on its sentences,
so a process, a cluster and a resumed run compute the same batches and store the same numbers.

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
SHARD_BATCH_BYTES = 64 * 2**20  # all models' attention of one batch: two batches at once hold about twice this, plus logs
TAU_MIN = 0.1  # the app's default edge threshold: every view at it or above is exact
# Sentences batched together (one shard of the default size; smaller shards are grouped). Windows of 256 and 512 pad 3%
# and 6% less, but their batches' parts, held until the window is done, made the peak grow with the run's length here
# (1,000 -> 8,000 sentences: 442 -> 529 MB and 525 -> 739 MB, against 370 -> 404 MB with 128).
WINDOW_SENTENCES = 128
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


@dataclass(frozen=True)
class WindowPlan:
    """Consecutive shards whose sentences are batched together (sorting more sentences by length pads less and
    calls the models fewer times); ``wanted``: the shards to make tables of (a resumed run recomputes the rest)."""

    shards: list[tuple[int, int, int]]  # (shard, start, stop) of every shard in the window, in order
    wanted: set[int]

    @property
    def start(self) -> int:
        return self.shards[0][1]

    def sentences(self, texts: Sequence[str], text_pairs: Sequence[str] | None) -> tuple[Sequence[str], Sequence[str] | None]:
        """The window's texts and text pairs, out of the whole corpus's."""
        start, stop = self.start, self.shards[-1][2]
        return texts[start:stop], None if text_pairs is None else text_pairs[start:stop]


@dataclass
class Window:
    """A :class:`WindowPlan` tokenized and cut into batches."""

    plan: WindowPlan
    encodings: list[Encoding]
    batches: list[list[int]]  # indices into the window's sentences


@dataclass
class BatchPart:
    """What one batch adds to its window: its rows' statistics, differences, entries, logits and head-map attention."""

    rows: list[int]  # the batch's sentences, as indices into the window
    stats: np.ndarray  # [STATS, B, M, L, H] float32
    differences: np.ndarray | None  # [DIFFERENCES, B, L, H] float32, None for one model
    entries: list[tuple[np.ndarray, ...]]  # per model: window index int64, layer, head, query, key int16, weight float16
    logits: dict[str, np.ndarray]  # [B, C] per model with a head
    mapped: dict[int, list[np.ndarray]]  # window index -> every model's dense attention (the head map's sentences)


def windows(pending: Sequence[tuple[int, int, int]], shard_size: int, n_sentences: int) -> list[WindowPlan]:
    """The windows of :data:`WINDOW_SENTENCES` that hold pending shards: all their shards, and which are pending."""
    per = max(1, WINDOW_SENTENCES // shard_size)
    wanted: dict[int, set[int]] = {}
    for shard, _, _ in pending:
        wanted.setdefault(shard // per, set()).add(shard)
    shards = -(-n_sentences // shard_size)
    return [
        WindowPlan([(k, k * shard_size, min(n_sentences, (k + 1) * shard_size)) for k in range(w * per, min(shards, (w + 1) * per))], wanted[w])
        for w in sorted(wanted)
    ]


def plan_window(models: Mapping[str, LoadedModel], plan: WindowPlan, texts: Sequence[str], text_pairs: Sequence[str] | None, max_batch: int) -> Window:
    """``plan``'s sentences (``texts``: :meth:`WindowPlan.sentences`), tokenized and cut into batches."""
    encodings = encode_batch(next(iter(models.values())), texts, text_pairs)  # the texts were checked before the run began
    return Window(plan, encodings, window_batches([len(e.input_ids) for e in encodings], models, max_batch))


def compute_batch(models: Mapping[str, LoadedModel], window: Window, batch: list[int], *, tau_min: float = TAU_MIN, head_map_until: int = 0) -> BatchPart:
    """One batch of ``window`` through every model: per-head statistics and differences, entries of at least ``tau_min``,
    logits, and the dense attention of sentences before ``head_map_until`` (the head map's)."""
    import torch

    names = list(models)
    first = models[names[0]]
    chosen = [window.encodings[i] for i in batch]
    n = np.array([len(e.input_ids) for e in chosen])
    cls_id, sep_id = (-1 if t is None else t for t in (first.tokenizer.cls_token_id, first.tokenizer.sep_token_id))
    outputs = [batch_attention(models[name], chosen) for name in names]
    sums, pair_sums, found = batch_rows([layers for layers, _ in outputs], n, special_columns(_padded_ids(chosen), cls_id, sep_id), tau_min)
    per_query = n[:, None, None].astype(np.float64)  # [B, 1, 1]
    stats = np.stack([np.stack([sums[column][m] / per_query for m in range(len(names))], 1) for column in STATS]).astype(np.float32)
    differences = None
    if pair_sums is not None:
        differences = np.stack([pair_sums[0] / per_query, pair_sums[1] / np.sqrt(sums["squares"][0] * sums["squares"][1])]).astype(np.float32)
    rows = np.asarray(batch, dtype=np.int64)
    mapped: dict[int, list[np.ndarray]] = {}
    for row, i in enumerate(batch):
        if window.plan.start + i < head_map_until:
            mapped[i] = [torch.stack([layer[row, :, : n[row], : n[row]] for layer in layers]).numpy() for layers, _ in outputs]
    return BatchPart(
        list(batch), stats, differences, [(rows[r], *kept) for r, *kept in found],
        {name: batch_logits for name, (_, batch_logits) in zip(names, outputs, strict=True) if batch_logits is not None}, mapped,
    )


def window_tables(models: Mapping[str, LoadedModel], window: Window, parts: Sequence[BatchPart]) -> list[ShardTables]:
    """The tables of each wanted shard of ``window`` from its batches' parts."""
    names = list(models)
    n = len(window.encodings)
    stats = np.empty((len(STATS), n, *parts[0].stats.shape[2:]), np.float32)
    differences = None if parts[0].differences is None else np.empty((len(DIFFERENCES), n, *parts[0].differences.shape[2:]), np.float32)
    logits = {name: np.empty((n, part_logits.shape[1]), part_logits.dtype) for name, part_logits in parts[0].logits.items()}
    mapped: dict[int, list[np.ndarray]] = {}
    for part in parts:
        stats[:, part.rows] = part.stats
        if differences is not None and part.differences is not None:
            differences[:, part.rows] = part.differences
        for name, part_logits in part.logits.items():
            logits[name][part.rows] = part_logits
        mapped |= part.mapped
    tables = []
    first = window.plan.start
    for shard, start, stop in window.plan.shards:
        if shard not in window.plan.wanted:
            continue
        lo, hi = start - first, stop - first
        entries = []
        for part in parts:
            for m, (index, *kept) in enumerate(part.entries):
                inside = slice(None) if (lo, hi) == (0, n) else (index >= lo) & (index < hi)  # a window of one shard: no copies
                index = index[inside]
                entries.append((index + first, np.full(len(index), m, np.int8), *(column[inside] for column in kept)))
        shard_mapped = {i: attention for i, attention in mapped.items() if lo <= i < hi}
        tables.append(
            ShardTables(
                shard, start, stop,
                _stats_table(stats[:, lo:hi], names, start),
                None if differences is None else _differences_table(differences[:, lo:hi], start),
                _tokens_table(models, window.encodings[lo:hi], {name: values[lo:hi] for name, values in logits.items()}, start),
                _entries_table(entries, names),
                _distances_table(shard_mapped, names) if shard_mapped else None,
                sum(e.n_truncated > 0 for e in window.encodings[lo:hi]),
            )
        )
    return tables


def compute_window(
    models: Mapping[str, LoadedModel],
    plan: WindowPlan,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    *,
    tau_min: float = TAU_MIN,
    max_batch: int = 32,
    head_map_until: int = 0,
) -> list[ShardTables]:
    """The tables of the wanted shards of a window (``texts``: :meth:`WindowPlan.sentences`), its batches one after another."""
    window = plan_window(models, plan, texts, text_pairs, max_batch)
    return window_tables(models, window, [compute_batch(models, window, batch, tau_min=tau_min, head_map_until=head_map_until) for batch in window.batches])


def window_batches(lengths: Sequence[int], models: Mapping[str, LoadedModel], max_batch: int) -> list[list[int]]:
    """A window's batches: similar lengths together, every model's float32 attention of a batch within :data:`SHARD_BATCH_BYTES`."""
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


def _stats_table(stats: np.ndarray, names: list[str], start: int) -> pa.Table:
    """``stats`` ``[STATS, sentences, models, L, H]`` as a tidy table, a row per sentence, model and head."""
    _, n_sentences, _, n_layers, n_heads = stats.shape
    layer, head = np.meshgrid(np.arange(n_layers, dtype=np.int16), np.arange(n_heads, dtype=np.int16), indexing="ij")
    columns: dict[str, Any] = {
        "sentence_id": np.repeat(np.arange(start, start + n_sentences, dtype=np.int64), n_layers * n_heads * len(names)),
        "model": pa.DictionaryArray.from_arrays(np.repeat(np.tile(np.arange(len(names), dtype=np.int8), n_sentences), n_layers * n_heads), names),
        "layer": np.tile(layer.ravel(), n_sentences * len(names)),
        "head": np.tile(head.ravel(), n_sentences * len(names)),
    }
    return pa.table(columns | {name: stats[k].reshape(-1) for k, name in enumerate(STATS)})


def _differences_table(differences: np.ndarray, start: int) -> pa.Table:
    """``differences`` ``[DIFFERENCES, sentences, L, H]`` as a tidy table, a row per sentence and head."""
    _, n_sentences, n_layers, n_heads = differences.shape
    layer, head = np.meshgrid(np.arange(n_layers, dtype=np.int16), np.arange(n_heads, dtype=np.int16), indexing="ij")
    return pa.table(
        {
            "sentence_id": np.repeat(np.arange(start, start + n_sentences, dtype=np.int64), n_layers * n_heads),
            "layer": np.tile(layer.ravel(), n_sentences),
            "head": np.tile(head.ravel(), n_sentences),
        }
        | {name: differences[k].reshape(-1) for k, name in enumerate(DIFFERENCES)}
    )


def _tokens_table(models: Mapping[str, LoadedModel], encodings: list[Encoding], logits: dict[str, np.ndarray], start: int) -> pa.Table:
    columns: dict[str, Any] = {
        "sentence_id": np.arange(start, start + len(encodings), dtype=np.int64),
        "n_tokens": np.array([len(e.input_ids) for e in encodings], dtype=np.int64),
        "n_truncated": np.array([e.n_truncated for e in encodings], dtype=np.int64),
        "tokens": [e.tokens for e in encodings],
        "input_ids": [e.input_ids.tolist() for e in encodings],
        "word_ids": [e.word_ids.tolist() for e in encodings],
        "segment_ids": [e.segment_ids.astype(np.int64).tolist() for e in encodings],
    }
    for name, scores in logits.items():
        lm = models[name]
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
