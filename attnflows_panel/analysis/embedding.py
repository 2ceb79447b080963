"""The corpus head map: every head of one or more models as a point in 2-D, all models in one space.

Two routes: (a) Clark et al. (2019)'s Jensen-Shannon distance between heads over a corpus, then metric
MDS; (b) per-head measure vectors, standardised, then PCA, t-SNE or UMAP. Coordinates are centred,
turned onto their principal axes and sign-fixed, so reruns and re-fits never flip the picture.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from attnflows_panel.analysis.compare import model_names, require_same_shape, store_sentences
from attnflows_panel.analysis.flows import validate_attention
from attnflows_panel.errors import AttnflowsError, InputError

if TYPE_CHECKING:
    from distributed import Client

    from attnflows_panel.store import RunStore

CLARK_SMOOTHING = 0.001  # head_distances.py: p' = 0.001 / n + 0.999 * p
BLOCK = 2048  # attention values per head processed together; sized so a block stays in cache


def head_labels(models: Sequence[str], n_layers: int, n_heads: int) -> pd.DataFrame:
    """One row per head, model-major then layer then head: columns model, layer, head."""
    model, layer, head = np.meshgrid(np.arange(len(models)), np.arange(n_layers), np.arange(n_heads), indexing="ij")
    return pd.DataFrame({"model": np.asarray(models, dtype=object)[model.ravel()], "layer": layer.ravel(), "head": head.ravel()})


# --------------------------------------------------------------------------------------------------
# (a) Clark et al.'s Jensen-Shannon distance between heads
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadDistances:
    """Clark et al.'s head distances: ``total[i, j]`` sums JS(head i's row, head j's row) in nats over every query token.

    ``heads`` labels the rows (model, layer, head); ``per_token`` is the mean per query token.
    """

    total: np.ndarray
    n_sentences: int
    n_tokens: int
    heads: pd.DataFrame

    @property
    def per_token(self) -> np.ndarray:
        """Mean Jensen-Shannon divergence (nats) per query token: ``total / n_tokens``."""
        return self.total / self.n_tokens


class _MixtureSums:
    """Accumulates ``c[i, j] = sum m log m`` with ``m = (p_i + p_j) / 2`` over smoothed attention values of K heads.

    Values of many sentences are packed side by side into ``[K, BLOCK]`` float32 blocks; each block
    costs one vectorised pass per head ``i`` over heads ``j >= i``, spread over threads.
    """

    def __init__(self, k: int, workers: int) -> None:
        self.k = k
        self.sums = np.zeros((k, k))
        self.block = np.empty((k, BLOCK), dtype=np.float32)
        self.fill = 0
        self.workers = workers
        self.scratch = [(np.empty((k, BLOCK), np.float32), np.empty((k, BLOCK), np.float32)) for _ in range(workers)]
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def add(self, values: np.ndarray) -> None:
        """Append ``[K, m]`` values (already smoothed), flushing full blocks."""
        start = 0
        while start < values.shape[1]:
            take = min(BLOCK - self.fill, values.shape[1] - start)
            self.block[:, self.fill : self.fill + take] = values[:, start : start + take]
            self.fill += take
            start += take
            if self.fill == BLOCK:
                self.flush()

    def flush(self) -> None:
        """Add the current block's contribution to ``sums``."""
        if self.fill == 0:
            return
        if self.pool is None:
            self._rows(0)
        else:
            for fut in [self.pool.submit(self._rows, t) for t in range(self.workers)]:
                fut.result()
        self.fill = 0

    def _rows(self, worker: int) -> None:
        P = self.block[:, : self.fill]
        M_all, L_all = self.scratch[worker]
        for i in range(worker, self.k, self.workers):  # interleaved rows balance the shrinking work
            M, Lg = M_all[: self.k - i, : self.fill], L_all[: self.k - i, : self.fill]
            np.add(P[i], P[i:], out=M)
            M *= 0.5
            np.log(M, out=Lg)
            self.sums[i, i:] += np.vecdot(M, Lg)

    def shutdown(self) -> None:
        """Stop the worker threads."""
        if self.pool is not None:
            self.pool.shutdown()

    def close(self) -> np.ndarray:
        """Flush, stop the threads and return the symmetric ``[K, K]`` sums."""
        self.flush()
        self.shutdown()
        upper = np.triu(self.sums)
        return upper + np.triu(upper, 1).T


def clark_head_distances(
    sentences: Iterable[Sequence[np.ndarray]],
    models: Sequence[str] = ("pretrained", "finetuned"),
    *,
    workers: int | None = None,
) -> HeadDistances:
    """Clark et al.'s distance between every pair of heads of all ``models``, over a corpus, vectorised.

    Each item of ``sentences`` holds one ``[L, H, n, n]`` array per model for the same input. As in
    their ``head_distances.py``: rows are smoothed to ``0.001 / n + 0.999 * p``, and the Jensen-Shannon
    divergence (natural log) between two heads' rows for the same query is summed over queries and
    sentences. Computed as ``JS_ij = (c_ii + c_jj) / 2 - c_ij`` with ``c_ij = sum m log m`` in float32
    blocks: absolute error about 1e-6 nats per query token, exactly 0 between a head and itself. ``workers``
    threads (default: the CPU count, at most 8).
    """
    n_workers = max(1, min(os.cpu_count() or 1, 8)) if workers is None else int(workers)
    if n_workers < 1:
        raise InputError(f"workers must be at least 1, got {workers!r}")
    acc: _MixtureSums | None = None
    shape: tuple[int, ...] = ()
    n_sentences = n_tokens = 0
    try:
        for arrays in sentences:
            if len(arrays) != len(models):
                raise InputError(f"sentence {n_sentences} has {len(arrays)} attention arrays for {len(models)} models")
            checked = [validate_attention(a) for a in arrays]
            for other in checked[1:]:
                require_same_shape(checked[0].shape, other.shape)
            A = np.stack(checked)
            if acc is None:
                shape = A.shape[:3]
                acc = _MixtureSums(int(np.prod(shape)), n_workers)
            elif A.shape[:3] != shape:
                raise InputError(f"sentence {n_sentences} has heads of shape {A.shape[1:3]} but earlier sentences have {shape[1:]}")
            n = A.shape[-1]
            acc.add((CLARK_SMOOTHING / n + (1.0 - CLARK_SMOOTHING) * A).reshape(acc.k, n * n).astype(np.float32))
            n_sentences += 1
            n_tokens += n
    except BaseException:
        if acc is not None:
            acc.shutdown()
        raise
    if acc is None:
        raise InputError("no sentences to compare heads on")
    sums = acc.close()
    diag = np.diag(sums)
    total = np.maximum(0.5 * (diag[:, None] + diag[None, :]) - sums, 0.0)
    np.fill_diagonal(total, 0.0)
    return HeadDistances(total, n_sentences, n_tokens, head_labels(models, shape[1], shape[2]))


def store_head_distances(
    store: RunStore, models: Sequence[str] | None = None, sentence_ids: Iterable[int] | None = None, *, workers: int | None = None, client: Client | None = None
) -> HeadDistances:
    """:func:`clark_head_distances` over a run's extracted sentences for its two models (or ``models``), from the
    attention its entries rebuild; a shard at a time, each on a worker of ``client`` when given (the run directory
    must then be readable where the workers run)."""
    names = model_names(store, models)
    if client is None:
        return clark_head_distances(store_sentences(store, names, sentence_ids), names, workers=workers)
    ids = np.sort(np.asarray(store.sentence_ids() if sentence_ids is None else list(sentence_ids), dtype=np.int64))
    starts = np.array([s["start"] for s in store.manifest["shards"]])
    groups = [g.tolist() for g in np.split(ids, np.searchsorted(ids, starts[1:])) if len(g)]
    futures = client.map(_shard_head_distances, [str(store.path)] * len(groups), [names] * len(groups), groups, pure=False)
    return merge_head_distances(client.gather(futures))


def _shard_head_distances(path: str, models: Sequence[str], sentence_ids: list[int]) -> HeadDistances:
    from attnflows_panel.store import RunStore

    store = RunStore.open(path)
    return clark_head_distances(store_sentences(store, models, sentence_ids), models, workers=1)


def merge_head_distances(parts: Sequence[HeadDistances]) -> HeadDistances:
    """One :class:`HeadDistances` of the sentences of all ``parts`` (their sums add up)."""
    if not parts:
        raise InputError("no sentences to compare heads on")
    return HeadDistances(sum(p.total for p in parts), sum(p.n_sentences for p in parts), sum(p.n_tokens for p in parts), parts[0].heads)


# --------------------------------------------------------------------------------------------------
# 2-D embeddings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadEmbedding:
    """Heads as 2-D points and, for each (layer, head), its move from ``models[0]`` to ``models[1]``.

    ``points``: model, layer, head, x, y. ``moves``: layer, head, x_from, y_from, x_to, y_to, dx, dy,
    distance (empty for a single model). ``stress`` is the MDS stress (None for other methods);
    ``n_sentences`` how many sentences placed the heads, when known.
    """

    points: pd.DataFrame
    moves: pd.DataFrame
    method: str
    stress: float | None = None
    n_sentences: int | None = None


def align_orientation(X: np.ndarray) -> np.ndarray:
    """Centre 2-D points, turn them onto their principal axes and flip each axis so its largest |value| is positive."""
    Y = X - X.mean(axis=0)
    _, _, vt = np.linalg.svd(Y, full_matrices=False)
    Y = Y @ vt.T
    signs = np.sign(Y[np.abs(Y).argmax(axis=0), np.arange(Y.shape[1])])
    return Y * np.where(signs == 0, 1.0, signs)


def _embedding(coords: np.ndarray, heads: pd.DataFrame, method: str, stress: float | None = None) -> HeadEmbedding:
    """Package aligned coordinates with their labels and the per-head moves between the first two models."""
    xy = align_orientation(coords)
    points = heads.reset_index(drop=True).assign(x=xy[:, 0], y=xy[:, 1])
    models = list(dict.fromkeys(points["model"]))
    columns = ["layer", "head", "x_from", "y_from", "x_to", "y_to", "dx", "dy", "distance"]
    if len(models) < 2:
        return HeadEmbedding(points, pd.DataFrame(columns=columns), method, stress)
    keys = ["layer", "head"]
    a = points[points["model"] == models[0]][[*keys, "x", "y"]].rename(columns={"x": "x_from", "y": "y_from"})
    b = points[points["model"] == models[1]][[*keys, "x", "y"]].rename(columns={"x": "x_to", "y": "y_to"})
    moves = a.merge(b, on=keys, how="inner", validate="one_to_one")
    moves["dx"] = moves["x_to"] - moves["x_from"]
    moves["dy"] = moves["y_to"] - moves["y_from"]
    moves["distance"] = np.hypot(moves["dx"], moves["dy"])
    return HeadEmbedding(points, moves[columns], method, stress)


def classical_mds(D: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Torgerson's classical scaling of a dissimilarity matrix (deterministic)."""
    n = D.shape[0]
    J = np.eye(n) - 1.0 / n
    B = -0.5 * J @ (D**2) @ J
    vals, vecs = np.linalg.eigh(B)
    top = np.argsort(vals)[::-1][:n_components]
    return vecs[:, top] * np.sqrt(np.maximum(vals[top], 0.0))


def mds_coordinates(D: Any, *, seed: int = 0, n_init: int = 4, max_iter: int = 300) -> tuple[np.ndarray, float]:
    """Metric MDS to 2-D (scikit-learn's SMACOF) from a classical-scaling start and ``n_init`` seeded random starts.

    Returns the coordinates of the lowest-stress start and that stress; the same seed gives identical output.
    """
    from sklearn.manifold import smacof

    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] < 3:
        raise InputError(f"distances must be a square matrix of at least 3 heads, got shape {D.shape}")
    if not np.isfinite(D).all() or (D < 0).any():
        raise InputError("distances must be finite and non-negative")
    if not np.allclose(D, D.T, rtol=1e-6, atol=1e-12 * max(D.max(), 1.0)):
        raise InputError("distances must be symmetric")
    D = 0.5 * (D + D.T)
    rng = np.random.default_rng(seed)
    scale = D.max() if D.max() > 0 else 1.0
    starts = [classical_mds(D)] + [rng.uniform(-scale, scale, size=(D.shape[0], 2)) for _ in range(n_init)]
    fits = [smacof(D, metric=True, n_components=2, init=s, n_init=1, max_iter=max_iter, normalized_stress=False) for s in starts]
    X, stress = min(fits, key=lambda fit: fit[1])  # the first of equal stresses
    return X, float(stress)


def embed_head_distances(distances: HeadDistances, *, seed: int = 0, n_init: int = 4, max_iter: int = 300) -> HeadEmbedding:
    """Clark et al.'s head map: metric MDS of the per-token head distances (all models in one space)."""
    coords, stress = mds_coordinates(distances.per_token, seed=seed, n_init=n_init, max_iter=max_iter)
    return _embedding(coords, distances.heads, "mds", stress)


def standardise(features: Any) -> np.ndarray:
    """Columns scaled to zero mean and unit variance; constant columns become 0."""
    X = np.asarray(features, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 3 or X.shape[1] < 1:
        raise InputError(f"features must be a [heads, measures] matrix with at least 3 heads, got shape {X.shape}")
    if not np.isfinite(X).all():
        row, col = (int(i) for i in np.argwhere(~np.isfinite(X))[0])
        raise InputError(f"features contain the non-finite value {X[row, col]} at head row {row}, column {col}")
    std = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)


def embed_head_features(
    features: Any,
    heads: pd.DataFrame,
    *,
    method: Literal["pca", "tsne", "umap"] = "pca",
    seed: int = 0,
    perplexity: float | None = None,
) -> HeadEmbedding:
    """Heads from a ``[n_heads_total, n_features]`` measure matrix (rows labelled by ``heads``) to 2-D.

    Features are standardised first. t-SNE's perplexity defaults to ``min(30, (n - 1) / 3)``; UMAP
    needs the optional ``umap-learn`` package.
    """
    X = standardise(features)
    if len(heads) != X.shape[0] or not {"model", "layer", "head"} <= set(heads.columns):
        raise InputError(f"heads must label each of the {X.shape[0]} feature rows with model, layer and head; got {len(heads)} rows")
    if method == "pca":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=2, svd_solver="full").fit_transform(X) if X.shape[1] >= 2 else np.c_[X, np.zeros(len(X))]
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perp = min(30.0, (X.shape[0] - 1) / 3) if perplexity is None else float(perplexity)
        if not 0 < perp < X.shape[0]:
            raise InputError(f"perplexity must be in (0, {X.shape[0]}), got {perplexity!r}")
        coords = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(X)
    elif method == "umap":
        try:
            import umap
        except ImportError:
            raise AttnflowsError("the UMAP head map needs the optional umap-learn package: pip install umap-learn") from None
        coords = umap.UMAP(n_components=2, n_neighbors=min(15, X.shape[0] - 1), random_state=seed, n_jobs=1).fit_transform(X)
    else:
        raise InputError(f"method must be 'pca', 'tsne' or 'umap', got {method!r}")
    return _embedding(np.asarray(coords, dtype=np.float64), heads, method)


def head_feature_matrix(stats: Any, measures: Sequence[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-head measure vectors averaged over sentences from tidy stats and their labels.

    ``stats``: a pandas frame (``RunStore.head_stats()``) or, out of core, a ``dask.dataframe`` (``RunStore.dataframe("stats")``).
    """
    keys = ["model", "layer", "head"]
    missing = [c for c in ["sentence_id", *keys] if c not in stats.columns]
    if missing:
        raise InputError(f"head stats lack the columns {', '.join(missing)}")
    cols = [c for c in stats.columns if c not in ("sentence_id", *keys)] if measures is None else list(measures)
    unknown = [c for c in cols if c not in stats.columns]
    if unknown or not cols:
        raise InputError(f"unknown measures {unknown!r}; the stats have {', '.join(c for c in stats.columns if c not in keys)}")
    means = stats.groupby(keys, sort=False, observed=True)[cols].mean()
    means = (means.compute() if hasattr(means, "compute") else means).reset_index()
    kind = stats["model"].dtype
    order = list(kind.categories) if isinstance(kind, pd.CategoricalDtype) else list(dict.fromkeys(stats["model"]))  # models in run order
    means["model"] = means["model"].astype(str)
    means["_model"] = means["model"].map(order.index)
    means = means.sort_values(["_model", "layer", "head"]).reset_index(drop=True)
    return means[cols].to_numpy(np.float64), means[keys]
