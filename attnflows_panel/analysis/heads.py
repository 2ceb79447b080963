"""Per-head measures of attention maps ``A[..., query, key]`` whose rows sum to 1.

Every measure is a mean over the queries of one sentence, so it has shape ``attention.shape[:-2]``
(``[L, H]`` for a record). At the edges: ``attn_prev`` averages over the queries that have a previous
token (all but the first) and ``attn_next`` over those with a next token (all but the last); a
one-token sentence has neither and gets NaN there.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from attnflows_panel.analysis.flows import ROW_SUM_TOLERANCE
from attnflows_panel.analysis.source import AttentionSource, QueryKeyAttention, map_layers
from attnflows_panel.errors import InputError

if TYPE_CHECKING:
    import torch

# (name, short description) of every measure of :func:`head_measures`, in display order.
MEASURES: tuple[tuple[str, str], ...] = (
    ("entropy", "entropy of each query's attention (nats): high = broad, low = focused"),
    ("attn_cls", "attention paid to [CLS]"),
    ("attn_sep", "attention paid to [SEP]"),
    ("attn_first", "attention paid to the first token (an attention sink in decoders)"),
    ("attn_punct", "attention paid to punctuation tokens"),
    ("attn_self", "attention a token pays to itself"),
    ("attn_prev", "attention paid to the previous token"),
    ("attn_next", "attention paid to the next token"),
    ("distance", "mean distance in tokens between a query and what it attends to"),
    ("max_weight", "largest weight of each query (confidence)"),
)

_PIECE_PREFIXES = ("##", "Ġ", "▁")
# Sentences buffered by corpus_head_measures before their length buckets are computed (float64 bytes).
BUFFER_BYTES = 64 * 2**20
# float32 weights a thread computes at once when measuring a QueryKeyAttention; its threads hold under CHUNK_BYTES together.
BLOCK_BYTES = 8 * 2**20
_TINY = np.nextafter(0.0, 1.0)


def head_entropy(attention: np.ndarray) -> np.ndarray:
    """Mean over queries of each row's entropy in nats; shape ``attention.shape[:-2]``."""
    a = np.asarray(attention, dtype=np.float64)
    logs = np.log(np.where(a > 0, a, 1.0))
    return -(a * logs).sum(-1).mean(-1)


def head_max_weight(attention: np.ndarray) -> np.ndarray:
    """Mean over queries of each row's largest weight ("confidence")."""
    return np.asarray(attention, dtype=np.float64).max(-1).mean(-1)


def attention_to(attention: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """Mean over queries of the attention given to the keys where ``key_mask`` is true."""
    a = np.asarray(attention, dtype=np.float64)
    mask = np.asarray(key_mask, dtype=bool)
    if mask.shape != a.shape[-1:]:
        raise ValueError(f"key mask has shape {mask.shape}, expected ({a.shape[-1]},)")
    return a[..., mask].sum(-1).mean(-1)


def basic_head_stats(attention: np.ndarray, cls_mask: np.ndarray, sep_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The measures stored for every (sentence, layer, head): entropy, max weight, to [CLS], to [SEP]."""
    return {
        "entropy": head_entropy(attention),
        "max_weight": head_max_weight(attention),
        "attn_cls": attention_to(attention, cls_mask),
        "attn_sep": attention_to(attention, sep_mask),
    }


def is_punctuation(token: str) -> bool:
    """True for a token made only of Unicode punctuation (categories P*), ignoring a leading ``##``, ``Ġ`` or ``▁``."""
    for prefix in _PIECE_PREFIXES:
        if token.startswith(prefix):
            token = token[len(prefix) :]
            break
    return bool(token) and all(unicodedata.category(c).startswith("P") for c in token)


def punctuation_mask(tokens: Sequence[str]) -> np.ndarray:
    """Boolean mask of the punctuation tokens (see :func:`is_punctuation`)."""
    return np.fromiter((is_punctuation(t) for t in tokens), dtype=bool, count=len(tokens))


def head_measures(attention: Any, tokens: Sequence[str], cls_mask: np.ndarray, sep_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Every measure of :data:`MEASURES` for one sentence, each of shape ``attention.shape[:-2]``.

    ``attention`` is an array or an :class:`AttentionSource`, read then one layer's row chunk at a time
    (a :class:`QueryKeyAttention`'s in torch from its queries and keys, a layer per thread).
    """
    if isinstance(attention, QueryKeyAttention):
        n = attention.n_tokens
        return _query_means(_query_key_totals(attention, _key_masks(tokens, cls_mask, sep_mask, n, "")), n)
    if isinstance(attention, AttentionSource):
        L, n = attention.n_layers, attention.n_tokens
        masks = _key_masks(tokens, cls_mask, sep_mask, n, "")
        layers = map_layers(partial(_source_layer_totals, attention, masks), range(L), BLOCK_BYTES, "attnflows-measures", attention.weight_bytes)
        return _query_means({name: np.stack([layer[name] for layer in layers]) for name, _ in MEASURES}, n)
    a = _check_attention(attention, "attention")
    n = a.shape[-1]
    return _query_means(_row_totals(a, np.arange(n), _key_masks(tokens, cls_mask, sep_mask, n, "")), n)


def _source_layer_totals(attention: AttentionSource, masks: tuple[np.ndarray, np.ndarray, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """Each measure's ``[H]`` sum over the queries of one layer of a source, read in blocks of :data:`BLOCK_BYTES`."""
    totals = {name: np.zeros(attention.n_heads) for name, _ in MEASURES}
    for queries, block in attention.row_chunks(layer, chunk_bytes=BLOCK_BYTES):
        for name, total in _row_totals(np.asarray(block, dtype=np.float64), np.arange(queries.start, queries.stop), masks).items():
            totals[name] += total
    return totals


def _row_totals(a: np.ndarray, queries: np.ndarray, masks: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Each measure's sum over the rows ``a[..., i, :]`` of queries ``queries[i]`` (``attn_prev``/``attn_next`` over the rows that have a neighbour)."""
    n = a.shape[-1]
    cls, sep, punct = masks
    rows = np.arange(queries.size)
    prev, nxt = queries >= 1, queries <= n - 2
    logs = np.log(np.where(a > 0, a, 1.0))
    values = {
        "entropy": -(a * logs).sum(-1).sum(-1),
        "attn_cls": a[..., cls].sum((-2, -1)),
        "attn_sep": a[..., sep].sum((-2, -1)),
        "attn_first": a[..., 0].sum(-1),
        "attn_punct": a[..., punct].sum((-2, -1)),
        "attn_self": a[..., rows, queries].sum(-1),
        "attn_prev": a[..., rows[prev], queries[prev] - 1].sum(-1),  # A[q, q - 1] for q = 1 .. n - 1
        "attn_next": a[..., rows[nxt], queries[nxt] + 1].sum(-1),  # A[q, q + 1] for q = 0 .. n - 2
        "distance": (a * np.abs(queries[:, None] - np.arange(n)[None, :])).sum((-2, -1)),
        "max_weight": a.max(-1).sum(-1),
    }
    return {name: values[name] for name, _ in MEASURES}


def _query_key_totals(source: QueryKeyAttention, masks: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Each measure's ``[L, H]`` sum over the queries, every weight computed once: a layer per thread, each thread's torch on one core."""
    import torch

    L, H, n, _ = source.shape
    cls, sep, punct = masks
    key_weights = torch.from_numpy(np.stack([cls, sep, np.arange(n) == 0, punct], axis=1).astype(np.float32))
    block_rows = max(1, BLOCK_BYTES // (H * n * 4))
    layers = np.stack(map_layers(partial(_layer_totals, source, key_weights=key_weights, block_rows=block_rows), range(L), BLOCK_BYTES, "attnflows-measures"), axis=1)
    return {name: layers[i] for i, (name, _) in enumerate(MEASURES)}


def _layer_totals(source: QueryKeyAttention, layer: int, key_weights: torch.Tensor, block_rows: int) -> np.ndarray:
    """``[len(MEASURES), H]``: each measure's sum over the queries of ``layer``, ``block_rows`` queries at a time.

    A row's weights ``e = exp(x)`` are summed before they are divided by their sum ``z``: ``max_weight`` is ``1 / z``, ``entropy`` ``log z - sum(e x) / z``.
    """
    import torch

    n = source.n_tokens
    position = torch.arange(n, dtype=torch.float32)
    totals = np.zeros((len(MEASURES), source.n_heads))
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        keys, x = source.log_weights(layer, slice(a, b))
        e = torch.exp(x)
        k = position[keys]
        # |q - k| is (q - a) + (a - k) left of the block's queries and (b - q) + (k - b) right of them: sums of e times these columns
        left, right = (k < a).float(), (k >= b).float()
        columns = torch.cat([torch.ones(k.shape[0], 1), key_weights[keys], torch.stack([left, (a - k) * left, right, (k - b) * right], 1)], 1)
        sums = torch.matmul(e, columns)  # [H, r, 9]: z, [CLS], [SEP], first, punctuation, left, left distance, right, right distance
        z = sums[..., 0]
        q = torch.arange(a, b, dtype=torch.float32)
        inner = slice(max(a, keys.start), min(b, keys.stop))
        distance = (e[..., inner.start - keys.start : inner.stop - keys.start] * (q[:, None] - position[inner]).abs()).sum(-1)
        distance += (q - a) * sums[..., 5] + sums[..., 6] + (b - q) * sums[..., 7] + sums[..., 8]
        rows, width = torch.arange(b - a), k.shape[0]
        neighbours, missing = [], []
        for offset in (0, -1, 1):  # self, previous, next
            key = rows + (a + offset - keys.start)
            neighbours.append(e[:, rows, key.clamp(0, width - 1)])
            missing.append((key < 0) | (key >= width))  # no such token, or one of weight 0
        e_x = x.mul_(e).sum(-1)  # in x's memory: x is not read again
        per_row = torch.stack([e_x, *sums[..., 1:5].unbind(-1), *neighbours, distance, torch.ones_like(z)]) / z  # [10, H, r]
        per_row[0] = z.log() - per_row[0]
        per_row[1:5].masked_fill_(~columns[:, 1:5].any(0)[:, None, None], 0.0)  # a sum over no key is 0, in a NaN row too
        per_row[5:8].masked_fill_(torch.stack(missing)[:, None], 0.0)
        totals += per_row.double().sum(-1).numpy()
    return totals


def _query_means(totals: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Totals over all n queries as means; ``attn_prev``/``attn_next`` over the n - 1 that have a neighbour (NaN for one token)."""
    edge = ("attn_prev", "attn_next")
    return {name: (total / (n - 1) if n > 1 else np.full(np.shape(total), np.nan)) if name in edge else total / n for name, total in totals.items()}


def corpus_head_measures(items: Iterable[Any]) -> dict[str, np.ndarray]:
    """Mean of :func:`head_measures` over sentences, each sentence weighing equally whatever its length.

    ``items`` yields ``(attention, tokens, cls_mask, sep_mask)`` tuples or records with those attributes.
    Sentences of equal length are computed together; ``attn_prev``/``attn_next`` average over the
    sentences that have at least two tokens.
    """
    names = [name for name, _ in MEASURES]
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    buckets: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    buffered = 0
    head_shape: tuple[int, ...] | None = None
    n_items = 0

    def flush() -> None:
        for bucket in buckets.values():
            for name, (total, count) in _bucket_sums(bucket).items():
                sums[name] = sums.get(name, 0.0) + total
                counts[name] += count
        buckets.clear()

    for k, item in enumerate(items):
        attention, tokens, cls_mask, sep_mask = _unpack(item, k)
        a = np.asarray(attention)
        if a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
            raise InputError(f"sentence {k}: attention must have shape [..., n, n] with n >= 1, got {a.shape}")
        if head_shape is None:
            head_shape = a.shape[:-2]
        elif a.shape[:-2] != head_shape:
            raise InputError(f"sentence {k}: attention has heads of shape {a.shape[:-2]}, earlier sentences {head_shape}")
        n = a.shape[-1]
        masks = np.stack(_key_masks(tokens, cls_mask, sep_mask, n, f"sentence {k}: "), axis=-1)
        buckets.setdefault(n, []).append((k, a, masks))
        buffered += a.size * 8
        n_items += 1
        if buffered > BUFFER_BYTES:
            flush()
            buffered = 0
    if not n_items:
        raise InputError("no sentences to average head measures over")
    flush()
    shape = head_shape or ()
    return {name: (sums[name] / counts[name]).reshape(shape) if counts[name] else np.full(shape, np.nan) for name in names}


def _bucket_sums(bucket: list[tuple[int, np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, int]]:
    """Per-measure sums over the sentences of one length (and how many sentences each sum covers)."""
    b, n = len(bucket), bucket[0][1].shape[-1]
    x = np.empty((b, int(np.prod(bucket[0][1].shape[:-2], dtype=np.int64)), n, n))
    for row, (_, a, _) in enumerate(bucket):
        x[row] = a.reshape(x.shape[1:])
    if not _rows_ok(x):
        for k, a, _ in bucket:
            _check_attention(a, f"sentence {k}: attention")
    flat = x.reshape(b, -1, n * n)
    masks = np.stack([m for _, _, m in bucket]).astype(np.float64)  # [B, n, 3]: cls, sep, punct
    # einsum rather than matmul: BLAS threads spinning after each small call slow the next passes
    to = np.einsum("bgk,bkm->gm", x.sum(-2), masks) / n  # mean over queries of the mass on the masked keys
    position = np.arange(n)
    distance = np.einsum("bgk,k->g", flat, np.abs(position[:, None] - position[None, :]).ravel() / n)
    x_log_x = np.maximum(flat, _TINY)  # log(max(a, tiny)) is finite, and 0 times it is exactly 0
    np.log(x_log_x, out=x_log_x)
    x_log_x *= flat
    edge = b if n > 1 else 0
    return {
        "entropy": (-x_log_x.sum(-1).sum(0) / n, b),
        "attn_cls": (to[:, 0], b),
        "attn_sep": (to[:, 1], b),
        "attn_first": (x[..., 0].sum((0, -1)) / n, b),
        "attn_punct": (to[:, 2], b),
        "attn_self": (x.diagonal(0, -2, -1).sum((0, -1)) / n, b),
        "attn_prev": (x.diagonal(-1, -2, -1).sum((0, -1)) / max(n - 1, 1), edge),
        "attn_next": (x.diagonal(1, -2, -1).sum((0, -1)) / max(n - 1, 1), edge),
        "distance": (distance, b),
        "max_weight": (x.max(-1).sum((0, -1)) / n, b),
    }


def _unpack(item: Any, k: int) -> tuple[Any, Any, Any, Any]:
    if hasattr(item, "attention"):
        return item.attention, item.tokens, item.cls_mask, item.sep_mask
    try:
        attention, tokens, cls_mask, sep_mask = item
    except (TypeError, ValueError):
        raise InputError(f"sentence {k}: expected (attention, tokens, cls_mask, sep_mask) or a record, got {type(item).__name__}") from None
    return attention, tokens, cls_mask, sep_mask


def _key_masks(tokens: Sequence[str], cls_mask: Any, sep_mask: Any, n: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(tokens, str) or len(tokens) != n:
        got = "a string" if isinstance(tokens, str) else f"{len(tokens)} tokens"
        raise InputError(f"{where}attention has {n} keys but tokens is {got}")
    masks = []
    for name, mask in (("cls_mask", cls_mask), ("sep_mask", sep_mask)):
        m = np.asarray(mask)
        if m.shape != (n,):
            raise InputError(f"{where}{name} has shape {m.shape}, attention needs ({n},)")
        masks.append(m.astype(bool))
    return masks[0], masks[1], punctuation_mask(tokens)


def _rows_ok(a: np.ndarray) -> bool:
    sums = a.sum(-1)
    return bool(np.all(np.abs(sums - 1.0) <= ROW_SUM_TOLERANCE)) and bool(a.min() >= 0)


def _check_attention(attention: Any, what: str) -> np.ndarray:
    """``attention`` as float64 after checking its shape, finiteness, signs and row sums."""
    try:
        a = np.asarray(attention, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} is not a numeric array") from None
    if a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise InputError(f"{what} must have shape [..., n, n] with n >= 1, got {a.shape}")
    if _rows_ok(a):
        return a
    if not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise InputError(f"{what} contains the non-finite value {a[idx]} at index {idx}")
    if a.min() < 0:
        idx = tuple(int(i) for i in np.argwhere(a < 0)[0])
        raise InputError(f"{what} contains the negative value {a[idx]:.6g} at index {idx}")
    sums = a.sum(-1)
    idx = tuple(int(i) for i in np.unravel_index(int(np.abs(sums - 1.0).argmax()), sums.shape))
    raise InputError(f"{what} rows must sum to 1: row {idx} sums to {sums[idx]:.6g} (tolerance {ROW_SUM_TOLERANCE:g})")
