"""One shard of a corpus run computed from the models' batched attention: tidy Arrow tables, nothing written.

Per sentence and model: the head statistics and the attention entries of at least ``tau_min`` (a row
holds at most ``1 / tau_min`` of them, so a shard grows linearly with its tokens). Per sentence and
head, between the first two models: the JS divergence of their rows and the cosine of their maps.
Everything is computed a layer at a time on whole padded batches (torch; entries found with numpy), padded
query rows left out of every sum and entry; the first sentences may also sum the head map's distances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from attnflows_panel.errors import ModelError
from attnflows_panel.extract import Encoding, encode_batch, length_batches, padded_inputs, prediction_logits
from attnflows_panel.models.loading import LoadedModel

if TYPE_CHECKING:
    import torch

STATS = ("entropy", "max_weight", "attn_cls", "attn_sep")
DIFFERENCES = ("js", "cosine")
TAU_MIN = 0.1  # the app's default edge threshold: every view at it or above is exact
LN2 = float(np.log(2.0))
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
    stats: dict[str, list[np.ndarray]] = {}
    differences: dict[int, np.ndarray] = {}
    entries: list[tuple[np.ndarray, ...]] = []  # per batch and model: sentence_id, model, layer, head, query, key, weight
    logits: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    mapped: dict[int, list[np.ndarray]] = {}  # the head map's sentences: every model's dense attention
    for batch in length_batches(lengths, first.n_layers * first.n_heads * 4, max_batch):
        chosen = [encodings[i] for i in batch]
        n = torch.tensor([lengths[i] for i in batch])
        queries = torch.arange(int(n.max()))[None, None, :] < n[:, None, None]  # [B, 1, w]: the rows that are not padding
        special = special_columns(_padded_ids(chosen), cls_id, sep_id)
        outputs = [batch_attention(models[name], chosen) for name in names]
        measured = [head_statistics(layers, queries, special) for layers, _ in outputs]
        for m, (name, (layers, batch_logits)) in enumerate(zip(names, outputs, strict=True)):
            row, *kept = sparse_entries(layers, n.numpy(), tau_min)
            entries.append((np.asarray(batch, dtype=np.int64)[row] + start, np.full(len(row), m, np.int8), *kept))
            for row, i in enumerate(batch):
                for column, values in measured[m][0].items():
                    stats.setdefault(column, [None] * len(texts) * len(names))[i * len(names) + m] = values[row]
                if start + i < head_map_until:
                    mapped.setdefault(i, []).append(torch.stack([layer[row, :, : lengths[i], : lengths[i]] for layer in layers]).numpy())
                if batch_logits is not None:
                    logits[name][i] = batch_logits[row]
        if len(names) > 1:
            js, cosine = model_differences(outputs[0][0], outputs[1][0], queries, measured)
            for row, i in enumerate(batch):
                differences[i] = np.stack([js[row], cosine[row]])
    return ShardTables(
        shard, start, start + len(texts),
        _stats_table(stats, names, start, first.n_layers, first.n_heads),
        _differences_table(differences, start, first.n_layers, first.n_heads) if len(names) > 1 else None,
        _tokens_table(models, encodings, logits, start),
        _entries_table(entries, names),
        _distances_table(mapped, names) if mapped else None,
        sum(e.n_truncated > 0 for e in encodings),
    )


def _padded_ids(encodings: Sequence[Encoding]) -> torch.Tensor:
    """``[B, w]`` token ids, -1 past each input's end (no token has that id)."""
    import torch

    ids = torch.full((len(encodings), max(len(e.input_ids) for e in encodings)), -1, dtype=torch.long)
    for row, e in enumerate(encodings):
        ids[row, : len(e.input_ids)] = torch.from_numpy(e.input_ids)
    return ids


def batch_attention(lm: LoadedModel, encodings: Sequence[Encoding]) -> tuple[list[torch.Tensor], np.ndarray | None]:
    """Each layer's ``[B, H, w, w]`` float32 attention of a padded batch (padded query rows hold junk) and each row's logits."""
    import torch

    inputs = padded_inputs(lm, encodings)
    with torch.inference_mode():
        out = lm.model(**inputs, output_attentions=True, return_dict=True)
    if not out.attentions:
        raise ModelError(f"{lm.model_id} returned no attentions; load it with attn_implementation='eager'")
    logits = prediction_logits(inputs, out.logits).float().cpu().numpy() if getattr(out, "logits", None) is not None else None
    return [layer.float().cpu() for layer in out.attentions], logits


def _per_head(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``[..., B, H]`` sums over the real queries of ``[..., B, H, w]`` per-row values (float64)."""
    return (rows.double() * queries).sum(-1)


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """``-sum(w log w)`` over the last axis (nats), 0 log 0 taken as 0: a product with the logs, not ``entr``'s slower pass."""
    import torch

    return -torch.linalg.vecdot(weights, weights.clamp_min(TINY).log_())


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


def head_statistics(layers: Sequence[torch.Tensor], queries: torch.Tensor, special: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """``[B, L, H]`` per measure of :data:`STATS` (each a mean over a sentence's queries, as :func:`basic_head_stats`)
    and ``squares`` (each head's sum of squared weights, for the cosine of two maps); and each layer's row entropies.

    ``special``: :func:`special_columns` of the batch, so attention to [CLS] and [SEP] reads only their columns.
    """
    import torch

    positions, which = special
    names = (*STATS, "squares")
    sums, entropies = [], []
    for weights in layers:
        b, h, w, _ = weights.shape
        to = torch.einsum("bhqp,bpc->bhqc", weights.gather(-1, positions[:, None, None, :].expand(b, h, w, -1)), which)
        entropy = row_entropy(weights)  # [B, H, w]
        rows = torch.stack([entropy, weights.amax(-1), to[..., 0], to[..., 1], torch.linalg.vecdot(weights, weights)])
        sums.append(_per_head(rows, queries))  # [5, B, H]
        entropies.append(entropy)
    n = queries.sum(-1, dtype=torch.float64)[:, None]  # [B, 1, 1]
    per_head = torch.stack(sums, 2)  # [5, B, L, H]
    return {name: (per_head[k] / (1 if name == "squares" else n)).numpy() for k, name in enumerate(names)}, entropies


def model_differences(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], queries: torch.Tensor, measured: Sequence[tuple[dict[str, np.ndarray], list[torch.Tensor]]]
) -> tuple[np.ndarray, np.ndarray]:
    """``[B, L, H]`` JS divergence (bits, mean over queries, as :func:`head_js_divergence`) and map cosine of two batches.

    ``measured``: both batches' :func:`head_statistics`. Rows sum to 1, so ``H((a + b) / 2) = H(a + b) / 2 + ln 2``.
    """
    import torch

    (measured_a, entropies_a), (measured_b, entropies_b) = measured
    js, dots = [], []
    for la, lb, entropy_a, entropy_b in zip(a, b, entropies_a, entropies_b, strict=True):
        rows = (0.5 * row_entropy(la + lb) + LN2 - 0.5 * (entropy_a + entropy_b)) / LN2
        js.append(_per_head(rows.clamp_(0.0, 1.0), queries))
        dots.append(_per_head(torch.linalg.vecdot(la, lb), queries))
    n = queries.sum(-1, dtype=torch.float64)[:, None]
    cosine = torch.stack(dots, 1).numpy() / np.sqrt(measured_a["squares"] * measured_b["squares"])
    return (torch.stack(js, 1) / n).numpy(), cosine


def sparse_entries(layers: Sequence[torch.Tensor], lengths: np.ndarray, tau_min: float) -> tuple[np.ndarray, ...]:
    """The entries of at least ``tau_min`` of a batch whose inputs have ``lengths`` tokens, layer by layer: (row, layer,
    head, query, key) int16 arrays and float16 weights (each input's in (layer, head, query, key) order)."""
    import torch

    found = []
    for layer, weights in enumerate(layers):
        array = weights.numpy()
        flat = np.flatnonzero((weights >= tau_min).numpy())  # torch compares on every core
        index = np.unravel_index(flat, array.shape)
        real = index[2] < lengths[index[0]]  # not a padded query's junk
        found.append((*(i[real].astype(np.int16) for i in index), weights.view(-1)[torch.from_numpy(flat[real])].half().numpy()))
    row, head, query, key, weight = (np.concatenate(column) for column in zip(*found, strict=True))
    layer = np.repeat(np.arange(len(found), dtype=np.int16), [len(f[0]) for f in found])
    return row, layer, head, query, key, weight


def _stats_table(stats: dict[str, list[np.ndarray]], names: list[str], start: int, n_layers: int, n_heads: int) -> pa.Table:
    per_head = n_layers * n_heads
    blocks = len(next(iter(stats.values())))
    layer, head = np.meshgrid(np.arange(n_layers, dtype=np.int16), np.arange(n_heads, dtype=np.int16), indexing="ij")
    columns: dict[str, Any] = {
        "sentence_id": np.repeat(np.arange(start, start + blocks // len(names), dtype=np.int64), per_head * len(names)),
        "model": pa.DictionaryArray.from_arrays(np.repeat(np.tile(np.arange(len(names), dtype=np.int8), blocks // len(names)), per_head), names),
        "layer": np.tile(layer.ravel(), blocks),
        "head": np.tile(head.ravel(), blocks),
    }
    columns |= {name: np.concatenate([v.ravel() for v in stats[name]]).astype(np.float32) for name in STATS}
    return pa.table(columns)


def _differences_table(differences: dict[int, np.ndarray], start: int, n_layers: int, n_heads: int) -> pa.Table:
    stacked = np.stack([differences[i] for i in range(len(differences))], 1).reshape(2, -1)  # [2, sentences * L * H]
    layer, head = np.meshgrid(np.arange(n_layers, dtype=np.int16), np.arange(n_heads, dtype=np.int16), indexing="ij")
    return pa.table(
        {
            "sentence_id": np.repeat(np.arange(start, start + len(differences), dtype=np.int64), n_layers * n_heads),
            "layer": np.tile(layer.ravel(), len(differences)),
            "head": np.tile(head.ravel(), len(differences)),
        }
        | {name: stacked[k].astype(np.float32) for k, name in enumerate(DIFFERENCES)}
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
