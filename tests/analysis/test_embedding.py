"""The head map: Clark et al.'s head distances against a per-pair loop, and seeded, aligned 2-D embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import attnflows_panel.analysis.embedding as embedding
from attnflows_panel.analysis.embedding import (
    HeadDistances,
    align_orientation,
    clark_head_distances,
    embed_head_distances,
    embed_head_features,
    head_feature_matrix,
    head_labels,
    mds_coordinates,
    store_head_distances,
)
from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import AttnflowsError, InputError


def random_attention(rng: np.random.Generator, L: int, H: int, n: int) -> np.ndarray:
    logits = rng.normal(size=(L, H, n, n)) * rng.uniform(0.3, 4.0, size=(L, H, 1, 1))
    A = np.exp(logits - logits.max(-1, keepdims=True))
    return A / A.sum(-1, keepdims=True)


def clark_loop(sentences: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    """Clark et al.'s head_distances.py written per pair: smooth, JS (nats) per query, summed over queries and sentences."""
    total = None
    for arrays in sentences:
        heads = [head for A in arrays for layer in A for head in layer]
        if total is None:
            total = np.zeros((len(heads), len(heads)))
        for i, a in enumerate(heads):
            for j, b in enumerate(heads):
                n = a.shape[0]
                p = 0.001 / n + 0.999 * a
                q = 0.001 / n + 0.999 * b
                m = (p + q) / 2
                js = 0.0
                for v in range(n):
                    js += 0.5 * np.sum(p[v] * np.log(p[v] / m[v])) + 0.5 * np.sum(q[v] * np.log(q[v] / m[v]))
                total[i, j] += js
    return total


def corpus(rng: np.random.Generator, n_sentences: int, L: int, H: int, models: int = 2) -> list[tuple[np.ndarray, ...]]:
    return [tuple(random_attention(rng, L, H, int(n)) for _ in range(models)) for n in rng.integers(3, 12, size=n_sentences)]


@pytest.mark.parametrize(("seed", "block", "workers"), [(0, 2048, 1), (1, 7, 1), (2, 50, 2), (3, 16, 3)])
def test_clark_distances_match_per_pair_loop(seed: int, block: int, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding, "BLOCK", block)  # small blocks split sentences across blocks
    rng = np.random.default_rng(seed)
    sentences = corpus(rng, 4, 2, 3)
    got = clark_head_distances(iter(sentences), workers=workers)
    ref = clark_loop(sentences)
    np.testing.assert_allclose(got.total, ref, rtol=2e-5, atol=1e-6 * ref.max())
    assert got.total.shape == (12, 12) and got.n_sentences == 4
    assert got.n_tokens == sum(s[0].shape[-1] for s in sentences)
    np.testing.assert_allclose(got.per_token, got.total / got.n_tokens)
    assert np.array_equal(got.total, got.total.T)
    assert np.array_equal(np.diag(got.total), np.zeros(12)) and (got.total >= 0).all()
    assert got.heads.equals(head_labels(["pretrained", "finetuned"], 2, 3))


def test_single_model_and_three_models() -> None:
    rng = np.random.default_rng(5)
    one = corpus(rng, 2, 2, 2, models=1)
    got = clark_head_distances(one, models=["bert"])
    np.testing.assert_allclose(got.total, clark_loop(one), rtol=2e-5, atol=1e-9)
    three = corpus(rng, 2, 1, 2, models=3)
    got = clark_head_distances(three, models=["a", "b", "c"])
    np.testing.assert_allclose(got.total, clark_loop(three), rtol=2e-5, atol=1e-9)
    assert list(got.heads["model"]) == ["a", "a", "b", "b", "c", "c"]


def test_identical_models_give_zero_distance_and_coincident_points() -> None:
    rng = np.random.default_rng(3)
    sentences = [(A, A.copy()) for (A,) in corpus(rng, 5, 2, 4, models=1)]
    dist = clark_head_distances(sentences)
    K = 8
    np.testing.assert_allclose(np.diag(dist.total[:K, K:]), 0.0, atol=1e-7 * dist.total.max())
    emb = embed_head_distances(dist)
    spread = np.ptp(emb.points[["x", "y"]].to_numpy(), axis=0).max()
    assert emb.moves["distance"].max() < 1e-4 * spread
    assert len(emb.moves) == K and emb.method == "mds"


def test_mds_is_seeded_and_aligned() -> None:
    rng = np.random.default_rng(4)
    dist = clark_head_distances(corpus(rng, 3, 2, 3))
    a, b = embed_head_distances(dist, seed=7), embed_head_distances(dist, seed=7)
    pd.testing.assert_frame_equal(a.points, b.points)
    pd.testing.assert_frame_equal(a.moves, b.moves)
    assert a.stress == b.stress
    xy = a.points[["x", "y"]].to_numpy()
    np.testing.assert_allclose(xy.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(align_orientation(xy), xy, atol=1e-12)  # already in the canonical orientation
    move = a.moves.iloc[0]
    start = a.points[(a.points["model"] == "pretrained") & (a.points["layer"] == move["layer"]) & (a.points["head"] == move["head"])]
    assert move["x_from"] == start["x"].item() and move["distance"] == pytest.approx(np.hypot(move["dx"], move["dy"]))


def test_mds_recovers_a_planar_configuration() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(12, 2)) * [3.0, 1.0]
    D = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    X, stress = mds_coordinates(D, seed=0)
    np.testing.assert_allclose(np.linalg.norm(X[:, None] - X[None], axis=-1), D, atol=1e-3)
    assert stress < 1e-4


def test_alignment_removes_rotation_and_reflection() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 2)) * [2.0, 0.5]
    theta = 1.1
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = (X @ R) * [1.0, -1.0] + [5.0, -3.0]
    np.testing.assert_allclose(align_orientation(moved), align_orientation(X), atol=1e-10)


def features_and_labels(rng: np.random.Generator) -> tuple[np.ndarray, pd.DataFrame]:
    heads = head_labels(["pretrained", "finetuned"], 3, 4)
    layer = heads["layer"].to_numpy()
    X = np.c_[layer + rng.normal(0, 0.1, 24), rng.normal(size=24) * 5, np.full(24, 2.0), rng.normal(size=24)]
    return X, heads


def test_pca_matches_svd_of_standardised_features_and_is_stable() -> None:
    X, heads = features_and_labels(np.random.default_rng(2))
    emb = embed_head_features(X, heads, method="pca")
    Z = X[:, [0, 1, 3]]
    Z = (Z - Z.mean(0)) / Z.std(0)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    np.testing.assert_allclose(emb.points[["x", "y"]].to_numpy(), align_orientation(U[:, :2] * S[:2]), atol=1e-10)
    pd.testing.assert_frame_equal(emb.points, embed_head_features(X, heads, method="pca").points)
    assert list(emb.points.columns) == ["model", "layer", "head", "x", "y"]
    assert len(emb.moves) == 12 and emb.stress is None


@pytest.mark.slow
def test_tsne_is_seeded() -> None:
    X, heads = features_and_labels(np.random.default_rng(3))
    a = embed_head_features(X, heads, method="tsne", seed=3)
    b = embed_head_features(X, heads, method="tsne", seed=3)
    pd.testing.assert_frame_equal(a.points, b.points)


@pytest.mark.slow
def test_umap_is_seeded() -> None:
    pytest.importorskip("umap")
    X, heads = features_and_labels(np.random.default_rng(4))
    a = embed_head_features(X, heads, method="umap", seed=1)
    b = embed_head_features(X, heads, method="umap", seed=1)
    pd.testing.assert_frame_equal(a.points, b.points)


def test_umap_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap now raises ImportError
    X, heads = features_and_labels(np.random.default_rng(5))
    with pytest.raises(AttnflowsError, match="pip install umap-learn"):
        embed_head_features(X, heads, method="umap")


def test_head_feature_matrix_averages_tidy_stats() -> None:
    rows = [
        {"sentence_id": s, "model": m, "layer": l, "head": h, "entropy": s + l, "attn_cls": 0.1 * h}
        for s in range(3) for m in ("pretrained", "finetuned") for l in range(2) for h in range(2)
    ]
    X, heads = head_feature_matrix(pd.DataFrame(rows))
    assert heads.equals(head_labels(["pretrained", "finetuned"], 2, 2))
    np.testing.assert_allclose(X[:, 0], np.tile([1.0, 1.0, 2.0, 2.0], 2))
    np.testing.assert_allclose(X[:, 1], np.tile([0.0, 0.1], 4))
    with pytest.raises(InputError, match="unknown measures"):
        head_feature_matrix(pd.DataFrame(rows), ["nope"])


def test_bad_input() -> None:
    rng = np.random.default_rng(6)
    A = random_attention(rng, 2, 3, 5)
    with pytest.raises(InputError, match=r"\(2, 3, 5, 5\) and \(2, 3, 6, 6\)"):
        clark_head_distances([(A, random_attention(rng, 2, 3, 6))])
    with pytest.raises(InputError, match="earlier sentences"):
        clark_head_distances([(A, A), (random_attention(rng, 2, 4, 5),) * 2])
    with pytest.raises(InputError, match="2 models"):
        clark_head_distances([(A,)])
    with pytest.raises(InputError, match="no sentences"):
        clark_head_distances([])
    with pytest.raises(InputError, match="non-finite"):
        clark_head_distances([(A, np.full_like(A, np.nan))])
    with pytest.raises(InputError, match="workers"):
        clark_head_distances([(A, A)], workers=0)
    with pytest.raises(InputError, match="square"):
        mds_coordinates(np.zeros((3, 4)))
    with pytest.raises(InputError, match="symmetric"):
        mds_coordinates(np.triu(np.ones((4, 4)), 1))
    X, heads = features_and_labels(rng)
    with pytest.raises(InputError, match="method must be"):
        embed_head_features(X, heads, method="lda")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="label each of the 24"):
        embed_head_features(X, heads.iloc[:5])
    bad = X.copy()
    bad[3, 1] = np.inf
    with pytest.raises(InputError, match="head row 3, column 1"):
        embed_head_features(bad, heads)
    with pytest.raises(InputError, match="perplexity"):
        embed_head_features(X, heads, method="tsne", perplexity=100)
    assert isinstance(HeadDistances(np.zeros((2, 2)), 1, 1, heads.iloc[:2]).per_token, np.ndarray)


def test_store_head_distances_match_direct_computation(tiny_pair, tmp_path: Path) -> None:
    from attnflows_panel.store import extract_corpus

    texts = ["the movie was good", "i hate it", "a very safe car and not bad"]
    store = extract_corpus(
        {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}, Corpus(texts=texts, source="t"), tmp_path / "run", progress=False
    )
    sentences = [tuple(store.attention(i, m).astype(np.float64) for m in store.models) for i in range(3)]
    got = store_head_distances(store)
    # near-uniform random heads: float32 keeps about 1e-6 nats per query token in absolute terms
    np.testing.assert_allclose(got.total, clark_loop(sentences), rtol=2e-5, atol=1e-6 * got.n_tokens)
    assert list(got.heads["model"].unique()) == ["pretrained", "finetuned"] and len(got.heads) == 16
    only = store_head_distances(store, ["finetuned"], sentence_ids=[2])
    np.testing.assert_allclose(only.total, clark_loop(sentences[2:])[8:, 8:], rtol=2e-5, atol=1e-6 * only.n_tokens)
    emb = embed_head_distances(got)
    assert len(emb.points) == 16 and len(emb.moves) == 8
