"""Model differences per head: Jensen-Shannon divergence of attention rows and cosine similarity of maps.

Both compare the same input through two models (pre-trained and fine-tuned): ``A`` and ``B`` are
``[L, H, n, n]`` attention arrays whose rows sum to 1 (see :mod:`attnflows_panel.analysis.flows`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.special import entr

from attnflows_panel.analysis.flows import as_source, validate_attention
from attnflows_panel.analysis.source import MAP_BLOCK_BYTES, AttentionSource, map_layers
from attnflows_panel.errors import InputError

if TYPE_CHECKING:
    from attnflows_panel.store import RunStore

BLOCK_ENTRIES = 1 << 16  # attention entries per block of rows in row_js_divergence (512 KB of float64)


def require_same_shape(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> None:
    """Raise a one-line :class:`InputError` naming both shapes unless they are equal."""
    if tuple(shape_a) != tuple(shape_b):
        raise InputError(
            f"the two models' attention differs in shape: {tuple(shape_a)} and {tuple(shape_b)}; "
            "compare the same input through models of the same size"
        )


def validate_pair_attention(A: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate both arrays and check that they have the same ``[L, H, n, n]`` shape."""
    a, b = validate_attention(A), validate_attention(B)
    require_same_shape(a.shape, b.shape)
    return a, b


def row_js_divergence(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (in [0, 1]) between matching rows of two stochastic arrays.

    As ``H(m) - (H(p) + H(q)) / 2`` over cache-sized blocks of rows: three logarithms per entry, not four.
    """
    p_all, q_all = np.asarray(P), np.asarray(Q)
    shape, n = p_all.shape, p_all.shape[-1]
    p_rows, q_rows = p_all.reshape(-1, n), q_all.reshape(-1, n)
    js = np.empty(len(p_rows))
    step = max(1, BLOCK_ENTRIES // n)
    for start in range(0, len(p_rows), step):
        p, q = (rows[start : start + step].astype(np.float64) for rows in (p_rows, q_rows))
        js[start : start + step] = entr(0.5 * (p + q)).sum(-1) - 0.5 * (entr(p).sum(-1) + entr(q).sum(-1))
    return np.clip(js / np.log(2.0), 0.0, 1.0).reshape(shape[:-1])


def head_js_divergence(A: Any, B: Any) -> np.ndarray:
    """Per head ``[L, H]``: the Jensen-Shannon divergence (base 2) between the two models' rows, mean over queries.

    ``A`` and ``B`` are arrays or :class:`AttentionSource` s, read then one layer's row chunk at a time.
    """
    if not isinstance(A, AttentionSource) and not isinstance(B, AttentionSource):
        return row_js_divergence(*validate_pair_attention(A, B)).mean(-1)
    a, b = as_source(A), as_source(B)
    require_same_shape(a.shape, b.shape)
    return np.stack(map_layers(partial(_layer_js_divergence, a, b), range(a.n_layers), MAP_BLOCK_BYTES, "attnflows-js", a.weight_bytes)) / a.n_tokens


def _layer_js_divergence(a: AttentionSource, b: AttentionSource, layer: int) -> np.ndarray:
    """``[H]``: the JS divergence of one layer's heads summed over the queries, read in row chunks."""
    total = np.zeros(a.n_heads)
    for queries, block in a.row_chunks(layer, chunk_bytes=MAP_BLOCK_BYTES):
        total += row_js_divergence(block, b.rows(layer, None, np.arange(queries.start, queries.stop))).sum(-1)
    return total


def head_cosine_similarity(A: Any, B: Any) -> np.ndarray:
    """Per head ``[L, H]``: cosine similarity of the two models' flattened ``n x n`` maps (Kovaleva et al. 2019)."""
    return _cosine(*validate_pair_attention(A, B))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    L, H = a.shape[:2]
    fa = a.reshape(L, H, -1).astype(np.float64, copy=False)
    fb = b.reshape(L, H, -1).astype(np.float64, copy=False)
    dot = np.einsum("lhk,lhk->lh", fa, fb)
    return dot / (np.linalg.norm(fa, axis=-1) * np.linalg.norm(fb, axis=-1))


@dataclass(frozen=True)
class HeadDifferences:
    """Per-head ``[L, H]`` model differences averaged over ``n_sentences`` sentences."""

    js: np.ndarray
    cosine: np.ndarray
    n_sentences: int
    models: tuple[str, str]


def corpus_head_differences(
    pairs: Iterable[Sequence[np.ndarray]], models: tuple[str, str] = ("pretrained", "finetuned")
) -> HeadDifferences:
    """Average :func:`head_js_divergence` and :func:`head_cosine_similarity` over (A, B) pairs, one sentence at a time."""
    js_sum: np.ndarray | None = None
    cos_sum: np.ndarray | None = None
    count = 0
    for A, B in pairs:
        a, b = validate_pair_attention(A, B)
        js, cos = row_js_divergence(a, b).mean(-1), _cosine(a, b)
        if js_sum is not None and js.shape != js_sum.shape:
            raise InputError(f"sentence {count} has {js.shape} heads but earlier sentences have {js_sum.shape}")
        js_sum = js if js_sum is None else js_sum + js
        cos_sum = cos if cos_sum is None else cos_sum + cos
        count += 1
    if js_sum is None or cos_sum is None:
        raise InputError("no sentences to compare")
    return HeadDifferences(js=js_sum / count, cosine=cos_sum / count, n_sentences=count, models=models)


def model_names(store: RunStore, models: Sequence[str] | None = None) -> tuple[str, ...]:
    """``models`` checked against the run, or the run's first two models."""
    names = tuple(store.models[:2]) if models is None else tuple(models)
    if not names:
        raise InputError("no models given")
    for name in names:
        if name not in store.models:
            raise InputError(f"unknown model {name!r}; this run has {', '.join(store.models)}")
    return names


def store_sentences(
    store: RunStore, models: Sequence[str], sentence_ids: Iterable[int] | None = None
) -> Iterator[tuple[np.ndarray, ...]]:
    """Each model's attention rebuilt from the run's entries (see ``RunStore.attention``), one sentence at a time."""
    ids = store.sentence_ids() if sentence_ids is None else sentence_ids
    for i in ids:
        yield tuple(store.attention(int(i), m) for m in models)


def stored_differences(store: RunStore, models: Sequence[str] | None = None) -> Any:
    """The run's per-(sentence, layer, head) ``js`` and ``cosine`` as a lazy ``dask.dataframe``, for two of its models."""
    names = model_names(store, models)
    if len(names) != 2:
        raise InputError(f"need two models to compare, got {names!r}")
    if store.compared is None or set(names) != set(store.compared):
        raise InputError(f"this run holds the differences of {' and '.join(store.compared or ('no two models',))} only")
    return store.dataframe("differences")


def store_head_differences(
    store: RunStore, models: tuple[str, str] | None = None, sentence_ids: Iterable[int] | None = None
) -> HeadDifferences:
    """:func:`corpus_head_differences` of a run's sentences (all by default), from its stored differences, out of core
    (on the Dask cluster of an active ``distributed.Client``, if any)."""
    names = model_names(store, models)
    if sentence_ids is None and not store.complete:
        warnings.warn(f"{store.path.name} is not finished ({store.describe()}): these are the differences of its stored sentences; run extract again to finish it", stacklevel=2)
    frame = stored_differences(store, names)
    if sentence_ids is not None:
        frame = frame[frame["sentence_id"].isin([int(i) for i in sentence_ids])]
    means = frame.groupby(["layer", "head"])[["js", "cosine"]].agg(["mean", "count"]).compute()
    if means.empty:
        raise InputError("no sentences to compare")
    full = pd.MultiIndex.from_product([range(store.n_layers), range(store.n_heads)], names=["layer", "head"])
    means = means.reindex(full)
    shape = (store.n_layers, store.n_heads)
    return HeadDifferences(
        js=means[("js", "mean")].to_numpy(np.float64).reshape(shape),
        cosine=means[("cosine", "mean")].to_numpy(np.float64).reshape(shape),
        n_sentences=int(means[("js", "count")].max()),
        models=(names[0], names[1]),
    )


def layer_summary(values: Any, name: str = "value") -> pd.DataFrame:
    """Per layer of an ``[L, H]`` array: mean, median, min and max over heads, columns prefixed with ``name``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise InputError(f"expected per-head values of shape [layers, heads], got shape {v.shape}")
    return pd.DataFrame(
        {
            "layer": np.arange(v.shape[0]),
            f"{name}_mean": v.mean(1),
            f"{name}_median": np.median(v, 1),
            f"{name}_min": v.min(1),
            f"{name}_max": v.max(1),
        }
    )


@dataclass(frozen=True)
class DepthTrend:
    """Whether the model difference grows with depth: per-layer summaries and Spearman correlations."""

    layers: pd.DataFrame
    rho_layer_mean_js: float
    p_layer_mean_js: float
    rho_head_js: float
    p_head_js: float
    rho_head_cosine: float
    p_head_cosine: float
    differences: HeadDifferences


def depth_trend(diff: HeadDifferences) -> DepthTrend:
    """Spearman correlation of layer index with mean JS per layer, and with each head's JS and cosine."""
    from scipy import stats  # here, not at the top: importing scipy.stats would cost every export 0.4 s

    L, H = diff.js.shape
    layers = layer_summary(diff.js, "js").merge(layer_summary(diff.cosine, "cosine"), on="layer")
    layer_of_head = np.repeat(np.arange(L), H)
    rho_l, p_l = stats.spearmanr(np.arange(L), layers["js_mean"])
    rho_j, p_j = stats.spearmanr(layer_of_head, diff.js.ravel())
    rho_c, p_c = stats.spearmanr(layer_of_head, diff.cosine.ravel())
    return DepthTrend(layers, float(rho_l), float(p_l), float(rho_j), float(p_j), float(rho_c), float(p_c), diff)


def layer_difference_summary(
    store: RunStore, models: tuple[str, str] | None = None, sentence_ids: Iterable[int] | None = None
) -> DepthTrend:
    """The depth finding for a run: per-layer JS and cosine between its two models and their Spearman trends."""
    return depth_trend(store_head_differences(store, models, sentence_ids))
