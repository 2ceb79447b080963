"""Per-head measures against plain-Python loops and hand-computed maps; corpus means against a per-sentence loop."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from attnflows_panel.analysis import heads
from attnflows_panel.analysis.heads import (
    MEASURES,
    basic_head_stats,
    corpus_head_measures,
    head_measures,
    is_punctuation,
    punctuation_mask,
)
from attnflows_panel.analysis.source import DenseAttention, QueryKeyAttention
from attnflows_panel.errors import InputError

NAMES = [name for name, _ in MEASURES]
VOCAB = ["[CLS]", "[SEP]", "the", "##s", ".", "##,", "Ġ!", "▁?", "car", "...", "a."]
PUNCTUATION_IN_VOCAB = {".", "##,", "Ġ!", "▁?", "..."}


def random_sentence(rng: np.random.Generator, n: int, heads_shape: tuple[int, ...] = (3, 4), zeros: bool = True):
    """Row-stochastic attention with some exact zeros, random tokens and [CLS]/[SEP] masks."""
    logits = rng.normal(size=(*heads_shape, n, n)) * rng.uniform(0.3, 4.0, size=(*heads_shape, 1, 1))
    a = np.exp(logits - logits.max(-1, keepdims=True))
    if zeros and n > 1:
        a[rng.random(a.shape) < 0.2] = 0.0
        a[..., 0] += 1e-3  # keep every row non-empty
    a /= a.sum(-1, keepdims=True)
    tokens = [str(t) for t in rng.choice(VOCAB, size=n)]
    cls = np.array([t == "[CLS]" for t in tokens])
    sep = np.array([t == "[SEP]" for t in tokens])
    return a.astype(np.float32), tokens, cls, sep


def loop_measures(attention: np.ndarray, tokens: list[str], cls: np.ndarray, sep: np.ndarray) -> dict[str, np.ndarray]:
    """Reference: every head, query and key visited in Python, from the definitions in the module docstring."""
    a = np.asarray(attention, dtype=np.float64)
    n = a.shape[-1]
    punct = [t in PUNCTUATION_IN_VOCAB for t in tokens]
    out = {name: np.empty(a.shape[:-2]) for name in NAMES}
    for idx in np.ndindex(*a.shape[:-2]):
        rows = a[idx].tolist()
        acc = dict.fromkeys(NAMES, 0.0)
        for q, row in enumerate(rows):
            acc["entropy"] -= sum(w * math.log(w) for w in row if w > 0)
            acc["attn_cls"] += sum(w for w, m in zip(row, cls, strict=True) if m)
            acc["attn_sep"] += sum(w for w, m in zip(row, sep, strict=True) if m)
            acc["attn_first"] += row[0]
            acc["attn_punct"] += sum(w for w, m in zip(row, punct, strict=True) if m)
            acc["attn_self"] += row[q]
            acc["attn_prev"] += row[q - 1] if q > 0 else 0.0
            acc["attn_next"] += row[q + 1] if q < n - 1 else 0.0
            acc["distance"] += sum(w * abs(q - k) for k, w in enumerate(row))
            acc["max_weight"] += max(row)
        for name, total in acc.items():
            edge = name in ("attn_prev", "attn_next")
            out[name][idx] = (total / (n - 1) if n > 1 else math.nan) if edge else total / n
    return out


def test_measures_are_listed_in_order_with_descriptions() -> None:
    rng = np.random.default_rng(0)
    values = head_measures(*random_sentence(rng, 5))
    assert list(values) == NAMES
    assert len(set(NAMES)) == len(NAMES) and all(len(d) > 10 for _, d in MEASURES)
    assert {"entropy", "max_weight", "attn_cls", "attn_sep"} <= set(NAMES)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_head_measures_equal_python_loops(n: int) -> None:
    rng = np.random.default_rng(n)
    sentence = random_sentence(rng, n)
    got = head_measures(*sentence)
    want = loop_measures(*sentence)
    for name in NAMES:
        assert got[name].shape == (3, 4)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_hand_computed_maps() -> None:
    n = 4
    tokens = ["[CLS]", "the", ".", "[SEP]"]
    cls, sep = np.arange(n) == 0, np.arange(n) == n - 1
    identity = np.eye(n)
    previous = np.eye(n, k=-1)
    previous[0, 0] = 1.0  # the first token has no previous token and attends to itself
    uniform = np.full((n, n), 1.0 / n)
    m = head_measures(np.stack([identity, previous, uniform]), tokens, cls, sep)
    np.testing.assert_allclose(m["entropy"], [0.0, 0.0, math.log(n)])
    np.testing.assert_allclose(m["attn_self"], [1.0, 0.25, 0.25])
    np.testing.assert_allclose(m["attn_prev"], [0.0, 1.0, 0.25])  # over queries 1..3 only
    np.testing.assert_allclose(m["attn_next"], [0.0, 0.0, 0.25])
    np.testing.assert_allclose(m["distance"], [0.0, 0.75, 20 / 16])  # sum |q-k| over a 4x4 grid is 20
    np.testing.assert_allclose(m["max_weight"], [1.0, 1.0, 0.25])
    np.testing.assert_allclose(m["attn_cls"], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(m["attn_sep"], [0.25, 0.0, 0.25])
    np.testing.assert_allclose(m["attn_punct"], [0.25, 0.25, 0.25])
    np.testing.assert_allclose(m["attn_first"], [0.25, 0.5, 0.25])  # the first token here is [CLS]


def test_one_token_has_no_neighbours() -> None:
    m = head_measures(np.ones((2, 1, 1, 1)), ["[CLS]"], [True], [False])
    assert np.isnan(m["attn_prev"]).all() and np.isnan(m["attn_next"]).all()
    np.testing.assert_array_equal(m["attn_self"], 1.0)
    corpus = corpus_head_measures([(np.ones((2, 1, 1, 1)), ["[CLS]"], [True], [False])])
    assert np.isnan(corpus["attn_prev"]).all() and corpus["attn_self"].shape == (2, 1)


def test_punctuation() -> None:
    yes = [".", "##,", "Ġ!", "▁?", "...", "«", "—", "##(", "'", "¿"]
    no = ["a.", "[CLS]", "<s>", "##", "Ġ", "▁", "", "$", "+", "1", "##s", "Ġ.a"]
    assert all(is_punctuation(t) for t in yes)
    assert not any(is_punctuation(t) for t in no)
    np.testing.assert_array_equal(punctuation_mask(["the", ".", "##!"]), [False, True, True])
    assert punctuation_mask([]).shape == (0,)


def test_basic_head_stats_unchanged_and_consistent() -> None:
    rng = np.random.default_rng(3)
    a, tokens, cls, sep = random_sentence(rng, 9)
    basic = basic_head_stats(a, cls, sep)
    assert list(basic) == ["entropy", "max_weight", "attn_cls", "attn_sep"]
    full = head_measures(a, tokens, cls, sep)
    for name, values in basic.items():
        np.testing.assert_allclose(values, full[name], rtol=1e-12)


def per_sentence_mean(items: list) -> dict[str, np.ndarray]:
    """Reference corpus mean: head_measures one sentence at a time, then an equal-weight mean."""
    per = [head_measures(*item) for item in items]
    out = {}
    for name in NAMES:
        stacked = np.stack([p[name] for p in per])
        valid = ~np.isnan(stacked[:, 0, 0])
        out[name] = stacked[valid].mean(0)
    return out


@pytest.mark.parametrize("buffer_bytes", [1, 10**9])
def test_corpus_equals_per_sentence_loop(buffer_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "BUFFER_BYTES", buffer_bytes)  # 1: every sentence flushed on its own
    rng = np.random.default_rng(7)
    items = [random_sentence(rng, int(n)) for n in rng.integers(1, 12, size=60)]
    got = corpus_head_measures(iter(items))  # a generator is fine
    want = per_sentence_mean(items)
    for name in NAMES:
        assert got[name].shape == (3, 4)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_corpus_weighs_sentences_equally() -> None:
    short = (np.eye(2)[None], ["a", "b"], [False, False], [False, False])
    long = (np.full((1, 8, 8), 1 / 8), list("abcdefgh"), [False] * 8, [False] * 8)
    m = corpus_head_measures([short, long])
    np.testing.assert_allclose(m["attn_self"], [(1.0 + 1 / 8) / 2])


def test_corpus_of_records(tiny) -> None:
    from attnflows_panel.extract import extract

    records = [extract(tiny, None, t) for t in ["the movie was good .", "i love it !", "a car , a film", "bad"]]
    got = corpus_head_measures(records)
    want = per_sentence_mean([(r.attention, r.tokens, r.cls_mask, r.sep_mask) for r in records])
    for name in NAMES:
        assert got[name].shape == (tiny.n_layers, tiny.n_heads)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, err_msg=name)
    assert (got["attn_punct"] > 0).all()


def test_single_sentence_errors() -> None:
    a = np.full((2, 3, 3), 1 / 3)
    negative = a.copy()
    negative[1, 2] = [1.5, -0.5, 0.0]
    tokens, cls, sep = ["a", "b", "c"], [True, False, False], [False, False, True]
    cases = [
        (np.ones((2, 3, 4)) / 4, "shape"),
        (np.ones(3), "shape"),
        (np.where(np.arange(3) == 1, np.nan, a), "non-finite value nan"),
        (a * 1.5, "sums to 1.5"),
        (negative, r"negative value -0.5 at index \(1, 2, 1\)"),
    ]
    for bad, words in cases:
        with pytest.raises(InputError, match=words) as info:
            head_measures(bad, tokens, cls, sep)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="3 keys but tokens is 2 tokens"):
        head_measures(a, tokens[:2], cls, sep)
    with pytest.raises(InputError, match=r"sep_mask has shape \(2,\)"):
        head_measures(a, tokens, cls, sep[:2])
    with pytest.raises(InputError, match="tokens is a string"):
        head_measures(a, "abc", cls, sep)


def test_corpus_errors_name_the_sentence() -> None:
    rng = np.random.default_rng(1)
    good = [random_sentence(rng, 5) for _ in range(3)]
    bad = list(random_sentence(rng, 5))
    bad[0] = bad[0] * 2
    with pytest.raises(InputError, match="sentence 3: attention rows must sum to 1"):
        corpus_head_measures([*good, tuple(bad)])
    other_heads = random_sentence(rng, 5, heads_shape=(2, 4))
    with pytest.raises(InputError, match=r"sentence 1: attention has heads of shape \(2, 4\), earlier sentences \(3, 4\)"):
        corpus_head_measures([good[0], other_heads])
    with pytest.raises(InputError, match="no sentences"):
        corpus_head_measures([])
    with pytest.raises(InputError, match="sentence 0: expected"):
        corpus_head_measures([42])
    with pytest.raises(InputError, match=r"sentence 0: cls_mask has shape \(4,\)"):
        corpus_head_measures([(good[0][0], good[0][1], good[0][2][:4], good[0][3])])


HIDE = float(np.finfo(np.float32).min)  # what transformers' eager masks hide a key with


def query_key_mask(kind: str, n: int) -> np.ndarray | None:
    """An additive ``[n, n]`` mask of one kind, or None."""
    i, j = np.ogrid[:n, :n]
    hidden = {
        "none": None,
        "causal": j > i,
        "causal -inf": j > i,
        "sliding window": (j > i) | (j < i - 2),
        "hidden ends": (j < 2) | (j >= n - 2) if n > 4 else None,  # keys no query sees, on both sides
        "a query sees nothing": (j > i) | (i == n // 2),  # that row is uniform (hidden by the float32 minimum)
        "a query sees nothing, -inf": (j > i) | (i == n // 2),  # that row is NaN, and so is every measure of its heads
    }[kind]
    if hidden is None:
        return None
    return np.where(np.broadcast_to(hidden, (n, n)), -np.inf if "-inf" in kind else HIDE, 0.0).astype(np.float32)


def random_query_keys(rng: np.random.Generator, n: int, kind: str, heads: int = 4, kv_heads: int = 2, softcap: float | None = None) -> QueryKeyAttention:
    """Two layers of random queries and keys (grouped-query heads), sharp enough that some weights underflow to 0."""
    queries = [rng.normal(size=(heads, n, 8)).astype(np.float32) * 3 for _ in range(2)]
    keys = [rng.normal(size=(kv_heads, n, 8)).astype(np.float32) for _ in range(2)]
    mask = query_key_mask(kind, n)
    return QueryKeyAttention(queries, keys, [mask, mask], [8**-0.5, 0.5], [softcap, softcap])


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # rows() of a query that sees nothing (-inf)
@pytest.mark.parametrize("n", [1, 2, 7, 33])
@pytest.mark.parametrize("kind", ["none", "causal", "causal -inf", "sliding window", "hidden ends", "a query sees nothing", "a query sees nothing, -inf"])
def test_query_key_sources_are_measured_as_their_rows(n: int, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path (blocks of 3 queries) equals the row chunks of the same weights (the numpy path), NaN where they are NaN."""
    rng = np.random.default_rng(n)
    tokens = [str(t) for t in rng.choice(VOCAB, size=n)]
    cls, sep = np.array([t == "[CLS]" for t in tokens]), np.array([t == "[SEP]" for t in tokens])
    monkeypatch.setattr(heads, "BLOCK_BYTES", 4 * 4 * n * 3)
    for source in (random_query_keys(rng, n, kind), random_query_keys(rng, n, kind, heads=6, kv_heads=1, softcap=2.0)):
        got = head_measures(source, tokens, cls, sep)
        want = head_measures(DenseAttention(source.dense()), tokens, cls, sep)
        assert list(got) == NAMES
        for name in NAMES:
            assert got[name].shape == (2, source.n_heads)
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=f"{kind}: {name}")
        if n == 1:
            assert np.isnan(got["attn_prev"]).all() and np.isnan(got["attn_next"]).all()
        assert np.isnan(got["entropy"]).all() == (kind == "a query sees nothing, -inf")


def test_query_key_sources_are_measured_from_the_dense_definitions() -> None:
    """On a causal source: the torch path against every head, query and key visited in Python."""
    rng = np.random.default_rng(5)
    n = 40
    tokens = [str(t) for t in rng.choice(VOCAB, size=n)]
    cls, sep = np.array([t == "[CLS]" for t in tokens]), np.array([t == "[SEP]" for t in tokens])
    source = random_query_keys(rng, n, "causal")
    got, want = head_measures(source, tokens, cls, sep), loop_measures(source.dense(), tokens, cls, sep)
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert (got["max_weight"] > 0.5).any() and (got["attn_punct"] > 0).all()


def test_measuring_a_query_key_source_leaves_torch_s_threads_as_they_were() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    rng = np.random.default_rng(0)
    head_measures(random_query_keys(rng, 9, "causal"), ["a"] * 9, np.zeros(9, bool), np.zeros(9, bool))
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert torch.get_num_threads() == before and seen == [before]


@pytest.mark.parametrize("kind", ["none", "causal", "sliding window", "hidden ends"])
def test_a_query_key_mean_map_equals_the_mean_of_its_rows(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers with a quarter of their heads selected or more go through torch (blocks of 3 queries), the others through
    row chunks of their heads; together they equal the mean of the dense maps."""
    from attnflows_panel.analysis import source as source_module

    n, rng = 17, np.random.default_rng(5)
    source = random_query_keys(rng, n, kind, heads=8, kv_heads=2)
    monkeypatch.setattr(source_module, "MAP_BLOCK_BYTES", 4 * 8 * n * 3)
    A = source.dense()
    mask = np.zeros((2, 8), dtype=bool)
    mask[0, [1, 2, 6]] = True  # 3 of 8: torch
    mask[1, 5] = True  # 1 of 8: row chunks
    for selected in (mask, np.ones_like(mask), ~mask):
        np.testing.assert_allclose(source.mean_map(selected), A[selected].mean(axis=0), rtol=1e-5, atol=1e-7)
