"""One shard of a corpus run computed from the models' batched attention: tidy Arrow tables, nothing written.

Per sentence and model: the head statistics and the attention entries of at least ``tau_min`` (a row
holds at most ``1 / tau_min`` of them, so a shard grows linearly with its tokens). Per sentence and
head, between the first two models: the JS divergence of their rows and the cosine of their maps.
Everything is computed in torch on whole padded batches; padded query rows are zeroed first.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from attnflows_panel.errors import ModelError, TruncationWarning
from attnflows_panel.extract import Encoding, length_batches, encode, padded_inputs, prediction_logits
from attnflows_panel.models.loading import LoadedModel

if TYPE_CHECKING:
    import torch

STATS = ("entropy", "max_weight", "attn_cls", "attn_sep")
DIFFERENCES = ("js", "cosine")
TAU_MIN = 0.1  # the app's default edge threshold: every view at it or above is exact
LN2 = float(np.log(2.0))


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


def encode_shard(lm: LoadedModel, texts: Sequence[str], text_pairs: Sequence[str] | None) -> list[Encoding]:
    """Every sentence of a shard tokenized, truncation counted per encoding rather than warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return [encode(lm, text, None if text_pairs is None else text_pairs[i], warn=False) for i, text in enumerate(texts)]


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
    encodings = encode_shard(first, texts, text_pairs)
    lengths = [len(e.input_ids) for e in encodings]
    cls_id, sep_id = (-1 if t is None else t for t in (first.tokenizer.cls_token_id, first.tokenizer.sep_token_id))
    stats: dict[str, list[np.ndarray]] = {}
    differences: dict[int, np.ndarray] = {}
    entries: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
    logits: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    mapped: dict[int, list[np.ndarray]] = {}  # the head map's sentences: every model's dense attention
    for batch in length_batches(lengths, first.n_layers * first.n_heads * 4, max_batch):
        chosen = [encodings[i] for i in batch]
        n = torch.tensor([lengths[i] for i in batch])
        queries = torch.arange(int(n.max()))[None, None, :] < n[:, None, None]  # [B, 1, w]: the rows that are not padding
        ids = _padded_ids(chosen)
        keys = torch.stack([ids == cls_id, ids == sep_id], -1).float()  # [B, w, 2]
        outputs = [batch_attention(models[name], chosen) for name in names]
        measured = [head_statistics(layers, queries, keys) for layers, _ in outputs]
        for m, (name, (layers, batch_logits)) in enumerate(zip(names, outputs, strict=True)):
            kept = sparse_entries(layers, queries, tau_min)
            for row, i in enumerate(batch):
                for column, values in measured[m][0].items():
                    stats.setdefault(column, [None] * len(texts) * len(names))[i * len(names) + m] = values[row]
                entries[i, m] = kept[row]
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
        _entries_table(entries, names, start, len(texts)),
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
    """``[B, H]`` sums over the real queries of ``[B, H, w]`` per-row values (float64)."""
    return (rows.double() * queries).sum(-1)


def head_statistics(layers: Sequence[torch.Tensor], queries: torch.Tensor, keys: torch.Tensor) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """``[B, L, H]`` per measure of :data:`STATS` (each a mean over a sentence's queries, as :func:`basic_head_stats`)
    and ``squares`` (each head's sum of squared weights, for the cosine of two maps); and each layer's row entropies."""
    import torch

    sums: dict[str, list[torch.Tensor]] = {name: [] for name in (*STATS, "squares")}
    entropies = []
    for weights in layers:
        to = torch.einsum("bhqk,bkc->bhqc", weights, keys)
        rows = {
            "entropy": torch.special.entr(weights).sum(-1),  # [B, H, w]
            "max_weight": weights.amax(-1),
            "attn_cls": to[..., 0],
            "attn_sep": to[..., 1],
            "squares": torch.linalg.vecdot(weights, weights),
        }
        for name, values in rows.items():
            sums[name].append(_per_head(values, queries))
        entropies.append(rows["entropy"])
    n = queries.sum(-1, dtype=torch.float64)[:, None]  # [B, 1, 1]
    return {name: (torch.stack(values, 1) / (1 if name == "squares" else n)).numpy() for name, values in sums.items()}, entropies


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
        rows = (0.5 * torch.special.entr(la + lb).sum(-1) + LN2 - 0.5 * (entropy_a + entropy_b)) / LN2
        js.append(_per_head(rows.clamp_(0.0, 1.0), queries))
        dots.append(_per_head(torch.linalg.vecdot(la, lb), queries))
    n = queries.sum(-1, dtype=torch.float64)[:, None]
    cosine = torch.stack(dots, 1).numpy() / np.sqrt(measured_a["squares"] * measured_b["squares"])
    return (torch.stack(js, 1) / n).numpy(), cosine


def sparse_entries(layers: Sequence[torch.Tensor], queries: torch.Tensor, tau_min: float) -> list[tuple[np.ndarray, ...]]:
    """Per input of a batch: its (layer, head, query, key) uint16 arrays and float16 weights of at least ``tau_min``, in that order."""
    import torch

    masks = [(weights >= tau_min) & queries[..., None] for weights in layers]  # not a padded query's row
    index = torch.stack(masks, 1).nonzero().numpy().astype(np.uint16)  # b, l, h, q, k: each input's entries together
    counts = torch.stack([mask.sum((1, 2, 3)) for mask in masks], 1).numpy()  # [B, L]
    by_layer = [np.split(weights[mask].numpy(), np.cumsum(counts[:, layer])[:-1]) for layer, (weights, mask) in enumerate(zip(layers, masks, strict=True))]
    bounds = np.concatenate([[0], np.cumsum(counts.sum(1))])
    return [
        (*index[bounds[row] : bounds[row + 1], 1:].T, np.concatenate([parts[row] for parts in by_layer]).astype(np.float16))
        for row in range(len(counts))
    ]


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


def _entries_table(entries: dict[tuple[int, int], tuple[np.ndarray, ...]], names: list[str], start: int, n_sentences: int) -> pa.Table:
    order = [(i, m) for i in range(n_sentences) for m in range(len(names))]
    counts = np.array([len(entries[key][0]) for key in order], dtype=np.int64)
    sentence = np.repeat(np.arange(start, start + n_sentences, dtype=np.int64), len(names))
    model = np.tile(np.arange(len(names), dtype=np.int8), n_sentences)
    columns = [np.concatenate([entries[key][c] for key in order]) if order else np.empty(0) for c in range(5)]
    return pa.table(
        {
            "sentence_id": np.repeat(sentence, counts),
            "model": pa.DictionaryArray.from_arrays(np.repeat(model, counts), names),
            "layer": columns[0].astype(np.int16),
            "head": columns[1].astype(np.int16),
            "query": columns[2],
            "key": columns[3],
            "weight": columns[4].astype(np.float16),
        }
    )
