"""Model differences per head against scipy's jensenshannon and plain loops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr

from attnflows_panel.analysis.compare import (
    corpus_head_differences,
    depth_trend,
    head_cosine_similarity,
    head_js_divergence,
    layer_difference_summary,
    layer_summary,
    row_js_divergence,
    store_head_differences,
)
from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import InputError


def random_attention(rng: np.random.Generator, L: int, H: int, n: int, zeros: bool = False) -> np.ndarray:
    """Row-stochastic attention with peaked and flat rows; ``zeros`` puts exact zeros in some keys."""
    logits = rng.normal(size=(L, H, n, n)) * rng.uniform(0.3, 4.0, size=(L, H, 1, 1))
    A = np.exp(logits - logits.max(-1, keepdims=True))
    if zeros:
        A[..., rng.random((L, H, n, n)) < 0.3] = 0.0
        A[..., 0] += 1e-3  # keep every row non-empty
    return A / A.sum(-1, keepdims=True)


def loop_js(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Plain loops: JS in bits per row with 0 log 0 = 0, mean over queries."""
    L, H, n, _ = A.shape
    out = np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            total = 0.0
            for v in range(n):
                js = 0.0
                for w in range(n):
                    p, q = A[layer, head, v, w], B[layer, head, v, w]
                    m = (p + q) / 2
                    if p > 0:
                        js += 0.5 * p * math.log2(p / m)
                    if q > 0:
                        js += 0.5 * q * math.log2(q / m)
                total += js
            out[layer, head] = total / n
    return out


def loop_cosine(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    L, H = A.shape[:2]
    out = np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            a, b = A[layer, head].ravel().tolist(), B[layer, head].ravel().tolist()
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            out[layer, head] = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_js_matches_scipy_and_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L, H, n = 1 + seed % 3, 2 + seed % 2, 3 + seed
    A, B = random_attention(rng, L, H, n, zeros=seed % 2 == 1), random_attention(rng, L, H, n, zeros=seed % 3 == 0)
    got = head_js_divergence(A, B)
    scipy_ref = np.array(
        [[np.mean([jensenshannon(A[l, h, v], B[l, h, v], base=2) ** 2 for v in range(n)]) for h in range(H)] for l in range(L)]
    )
    np.testing.assert_allclose(got, scipy_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, loop_js(A, B), rtol=1e-10, atol=1e-12)


def test_js_bounds() -> None:
    eye = np.eye(4)[None, None]
    flipped = eye[..., ::-1, :]  # disjoint one-hot rows: the maximum, 1 bit
    np.testing.assert_allclose(head_js_divergence(eye, flipped), [[1.0]])
    A = random_attention(np.random.default_rng(0), 3, 4, 6)
    assert np.array_equal(head_js_divergence(A, A), np.zeros((3, 4)))
    np.testing.assert_allclose(head_cosine_similarity(A, A), np.ones((3, 4)))
    assert row_js_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(jensenshannon([0.5, 0.5], [1, 0], base=2) ** 2)


@pytest.mark.parametrize("seed", range(4))
def test_cosine_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    A, B = random_attention(rng, 2, 3, 5 + seed), random_attention(rng, 2, 3, 5 + seed)
    np.testing.assert_allclose(head_cosine_similarity(A, B), loop_cosine(A, B), rtol=1e-12)


def test_corpus_average_is_mean_over_sentences() -> None:
    rng = np.random.default_rng(1)
    pairs = [(random_attention(rng, 2, 3, n), random_attention(rng, 2, 3, n)) for n in (3, 8, 5)]
    diff = corpus_head_differences(iter(pairs))
    np.testing.assert_allclose(diff.js, np.mean([loop_js(a, b) for a, b in pairs], axis=0), rtol=1e-10)
    np.testing.assert_allclose(diff.cosine, np.mean([loop_cosine(a, b) for a, b in pairs], axis=0), rtol=1e-12)
    assert diff.n_sentences == 3 and diff.models == ("pretrained", "finetuned")


def test_layer_summary_and_depth_trend() -> None:
    rng = np.random.default_rng(2)
    js = np.arange(4)[:, None] * 0.1 + rng.uniform(0, 0.05, size=(4, 3))
    summary = layer_summary(js, "js")
    np.testing.assert_allclose(summary["js_mean"], js.mean(1))
    np.testing.assert_allclose(summary["js_median"], np.median(js, 1))
    np.testing.assert_allclose(summary["js_max"], js.max(1))
    np.testing.assert_allclose(summary["js_min"], js.min(1))
    from attnflows_panel.analysis.compare import HeadDifferences

    trend = depth_trend(HeadDifferences(js=js, cosine=1 - js, n_sentences=1, models=("a", "b")))
    assert trend.rho_layer_mean_js == pytest.approx(1.0)
    assert trend.rho_head_js == pytest.approx(spearmanr(np.repeat(np.arange(4), 3), js.ravel())[0])
    assert trend.rho_head_cosine == pytest.approx(-trend.rho_head_js)
    assert list(trend.layers["layer"]) == [0, 1, 2, 3]


def test_bad_input() -> None:
    rng = np.random.default_rng(0)
    A, B = random_attention(rng, 2, 3, 5), random_attention(rng, 2, 3, 6)
    with pytest.raises(InputError, match=r"\(2, 3, 5, 5\) and \(2, 3, 6, 6\)") as err:
        head_js_divergence(A, B)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="differs in shape"):
        head_cosine_similarity(A, random_attention(rng, 2, 4, 5))
    bad = A.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        head_js_divergence(bad, A)
    with pytest.raises(InputError, match="sum to 1"):
        head_cosine_similarity(A, A * 2)
    with pytest.raises(InputError, match="no sentences"):
        corpus_head_differences([])
    with pytest.raises(InputError, match="earlier sentences"):
        corpus_head_differences([(A, A), (random_attention(rng, 3, 3, 5),) * 2])
    with pytest.raises(InputError, match="layers, heads"):
        layer_summary(np.zeros(3))


def test_store_differences_are_those_of_the_models_attention(tiny_pair, tmp_path: Path) -> None:
    from attnflows_panel.extract import extract
    from attnflows_panel.store import extract_corpus

    texts = ["the movie was good", "i hate it", "a very safe car and not bad", "love"]
    store = extract_corpus(
        {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}, Corpus(texts=texts, source="t"), tmp_path / "run", shard_size=3, progress=False
    )
    pairs = [(extract(tiny_pair.pretrained, None, t).attention.astype(float), extract(tiny_pair.finetuned, None, t).attention.astype(float)) for t in texts]
    diff = store_head_differences(store)  # from the differences stored at extraction, in float32
    np.testing.assert_allclose(diff.js, np.mean([loop_js(a, b) for a, b in pairs], axis=0), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(diff.cosine, np.mean([loop_cosine(a, b) for a, b in pairs], axis=0), rtol=1e-6)
    assert diff.n_sentences == 4
    part = store_head_differences(store, ("finetuned", "pretrained"), sentence_ids=[1, 3])
    np.testing.assert_allclose(part.js, np.mean([loop_js(*pairs[i]) for i in (1, 3)], axis=0), rtol=1e-3, atol=1e-6)
    assert part.n_sentences == 2
    trend = layer_difference_summary(store)
    assert len(trend.layers) == 2 and trend.differences.n_sentences == 4
    with pytest.raises(InputError, match="holds the differences of pretrained and finetuned only"):
        store_head_differences(store, ("pretrained", "pretrained"))
    with pytest.raises(InputError, match="unknown model 'other'"):
        store_head_differences(store, ("pretrained", "other"))
    with pytest.raises(InputError, match="two models"):
        store_head_differences(store, ("pretrained",))
