"""Flows against independent references: networkx max-flow, plain loops and hand-computed cases."""

from __future__ import annotations

import re

import numpy as np
import pytest

from attnflows_panel.analysis.flows import (
    FINETUNED,
    PRETRAINED,
    SHARED,
    _max_flows,
    attention_flow,
    attention_rollout,
    compare_traces,
    merge_word_pieces,
    residual_attention,
    trace_cls_flow,
    validate_alpha,
    validate_attention,
    validate_tau,
    word_groups,
)
from attnflows_panel.errors import InputError

nx = pytest.importorskip("networkx")


def random_attention(rng: np.random.Generator, L: int, H: int, n: int, peaked: float = 3.0) -> np.ndarray:
    """Row-stochastic attention with a mix of peaked and flat rows."""
    logits = rng.normal(size=(L, H, n, n)) * rng.uniform(0.3, peaked, size=(L, H, 1, 1))
    A = np.exp(logits - logits.max(-1, keepdims=True))
    return A / A.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# attention flow vs the authors' networkx formulation
# --------------------------------------------------------------------------------------------------


def authors_flow(A: np.ndarray, head_mask: np.ndarray | None, level: int, normalize: bool) -> np.ndarray:
    """Abnar & Zuidema's attention_graph_util: adjacency over (level, token), networkx Edmonds-Karp per pair."""
    L, H, n, _ = A.shape
    mask = np.ones((L, H), bool) if head_mask is None else head_mask
    res = np.empty((L, n, n))
    for layer in range(L):
        if mask[layer].any():
            mat = A[layer][mask[layer]].sum(axis=0) / mask[layer].sum()
            mat = mat + np.eye(n)
            res[layer] = mat / mat.sum(axis=-1)[..., None]
        else:
            res[layer] = np.eye(n)
    adj = np.zeros(((L + 1) * n, (L + 1) * n))
    for i in range(1, L + 1):
        for k_f in range(n):
            for k_t in range(n):
                adj[i * n + k_f, (i - 1) * n + k_t] = res[i - 1][k_f][k_t]
    G = nx.from_numpy_array(adj, create_using=nx.DiGraph())
    for i, j in G.edges():
        G[i][j]["capacity"] = adj[i, j]
    out = np.zeros((n, n))
    for u in range(n):
        for v in range(n):
            out[u, v] = nx.maximum_flow_value(G, level * n + u, v, flow_func=nx.algorithms.flow.edmonds_karp)
        if normalize:
            out[u] /= out[u].sum()
    return out


FLOW_CASES = [(seed, 2 + seed % 3, 2 + seed % 2, 4 + seed % 3) for seed in range(12)]


@pytest.mark.parametrize(("seed", "L", "H", "n"), FLOW_CASES)
def test_flow_matches_networkx(seed: int, L: int, H: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    A = random_attention(rng, L, H, n)
    if seed % 4 == 1:  # exact zeros: zero-capacity edges are absent from the networkx graph
        A[:, :, :, -1] = 0.0
        A[:, :, -1, -1] = 1e-9
        A /= A.sum(-1, keepdims=True)
    mask = None
    if seed % 3 == 2:
        mask = rng.random((L, H)) < 0.6
        mask[0] = False  # a layer without heads passes tokens through unchanged
    level = L if seed % 5 else L - 1
    normalize = seed % 2 == 0
    ours = attention_flow(A, mask, level=level, normalize=normalize)
    ref = authors_flow(A, mask, level, normalize)
    np.testing.assert_allclose(ours, ref, atol=1e-9, rtol=0)


def test_flow_sources_and_certificate() -> None:
    rng = np.random.default_rng(42)
    A = random_attention(rng, 4, 3, 9)
    full = attention_flow(A)
    np.testing.assert_allclose(attention_flow(A, sources=[3, 0]), full[[3, 0]], atol=1e-12)
    values, gaps = _max_flows(residual_attention(A), np.arange(9))
    np.testing.assert_allclose(values, full, atol=1e-12)
    assert gaps.max() < 1e-12  # the final cut proves optimality
    assert (full <= 1 + 1e-12).all() and (full > 0).all()


def test_flow_hand_computed() -> None:
    # one layer, one head: flow from v to w is exactly the residual attention W[v, w]
    A = np.array([[[[0.5, 0.5], [0.0, 1.0]]]])
    W = np.array([[0.75, 0.25], [0.0, 1.0]])
    np.testing.assert_allclose(attention_flow(A), W)
    # two identical layers: 0 -> 1 is capped by the last edge into token 1 from both paths
    A2 = np.concatenate([A, A])
    # paths 0->0->1 (min .75, .25) and 0->1->1 (min .25, 1): 0.25 + 0.25
    np.testing.assert_allclose(attention_flow(A2)[0], [0.75, 0.5])


def test_flow_empty_mask_is_identity() -> None:
    A = random_attention(np.random.default_rng(3), 3, 2, 5)
    flows = attention_flow(A, np.zeros((3, 2), bool))
    np.testing.assert_allclose(flows, np.eye(5), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# rollout
# --------------------------------------------------------------------------------------------------


def test_rollout_matches_loop() -> None:
    rng = np.random.default_rng(7)
    L, H, n = 4, 3, 6
    A = random_attention(rng, L, H, n)
    mask = rng.random((L, H)) < 0.7
    mask[2] = False
    R = attention_rollout(A, mask)
    joint = np.eye(n)
    assert np.allclose(R[0], joint)
    for layer in range(L):
        heads = [h for h in range(H) if mask[layer, h]]
        mat = np.eye(n)
        if heads:
            mean = np.zeros((n, n))
            for h in heads:
                mean += A[layer, h] / len(heads)
            mat = np.zeros((n, n))
            for v in range(n):
                row = 0.5 * mean[v] + 0.5 * np.eye(n)[v]
                mat[v] = row / row.sum()
        new = np.zeros((n, n))
        for v in range(n):
            for w in range(n):
                new[v, w] = sum(mat[v, u] * joint[u, w] for u in range(n))
        joint = new
        np.testing.assert_allclose(R[layer + 1], joint, atol=1e-12)
    np.testing.assert_allclose(R.sum(-1), 1.0)


# --------------------------------------------------------------------------------------------------
# CLS trace against a plain loop
# --------------------------------------------------------------------------------------------------


def reference_trace(A, mask, tau, alpha, root, combine, top_k, direction):  # noqa: ANN001, ANN201
    """The attention graph walked node by node."""
    L, H, n, _ = A.shape
    counts = np.zeros((L + 1, n), int)
    reached = np.zeros((L + 1, n), bool)
    reached[root] = True
    edges = {}
    level = root[0]
    while (level > 0) if direction == "backward" else (level < L):
        layer = level - 1 if direction == "backward" else level
        nxt = level - 1 if direction == "backward" else level + 1
        heads = [h for h in range(H) if mask[layer, h]]
        for a in range(n):
            if not reached[level, a] or not heads:
                continue
            candidates = []
            for b in range(n):
                q, k = (a, b) if direction == "backward" else (b, a)
                weights = {h: A[layer, h, q, k] for h in heads}
                if combine == "union":
                    passing = [h for h in heads if weights[h] >= tau]
                    if passing:
                        best = max(passing, key=lambda h: weights[h])
                        candidates.append((weights[best], b, q, k, best, set(passing)))
                else:
                    mean = sum(weights.values()) / len(heads)
                    if mean >= tau:
                        candidates.append((mean, b, q, k, -1, set(heads)))
            candidates.sort(key=lambda c: (-c[0], c[1]))
            if top_k is not None:
                candidates = candidates[:top_k]
            for weight, b, q, k, best, passing in candidates:
                edges[(layer, q, k)] = (best, weight, passing)
                counts[nxt, b] += 1
                reached[nxt, b] = True
        level = nxt
    influence = np.zeros((L + 1, n))
    order = range(root[0] - 1, -1, -1) if direction == "backward" else range(root[0] + 1, L + 1)
    for lv in order:
        prev = lv + 1 if direction == "backward" else lv - 1
        for w in range(n):
            influence[lv, w] = counts[lv, w] + alpha * influence[prev, w]
    return edges, counts, influence, reached


TRACE_CASES = [
    dict(tau=0.1, alpha=0.5, combine="union", top_k=None, direction="backward", root=None),
    dict(tau=0.2, alpha=0.3, combine="mean", top_k=None, direction="backward", root=None),
    dict(tau=0.05, alpha=1.0, combine="union", top_k=2, direction="backward", root=(3, 4)),
    dict(tau=0.08, alpha=0.0, combine="mean", top_k=3, direction="backward", root=(4, 2)),
    dict(tau=0.15, alpha=0.5, combine="union", top_k=None, direction="forward", root=None),
    dict(tau=0.1, alpha=0.7, combine="mean", top_k=None, direction="forward", root=(1, 5)),
    dict(tau=0.05, alpha=0.5, combine="union", top_k=1, direction="forward", root=(0, 3)),
    dict(tau=1.0, alpha=0.5, combine="union", top_k=None, direction="backward", root=None),
]


@pytest.mark.parametrize("case", range(len(TRACE_CASES)))
@pytest.mark.parametrize("masked", [False, True])
def test_trace_matches_loop(case: int, masked: bool) -> None:
    opts = dict(TRACE_CASES[case])
    rng = np.random.default_rng(100 + case)
    L, H, n = 4, 3, 7
    A = random_attention(rng, L, H, n)
    if opts["tau"] == 1.0:
        A[:, 0] = np.eye(n)[[0] * n]  # one-hot rows in head 0: weights of exactly 1 pass tau = 1
    mask = (rng.random((L, H)) < 0.6) if masked else np.ones((L, H), bool)
    root = opts.pop("root") or ((L, 0) if opts["direction"] == "backward" else (0, 0))
    trace = trace_cls_flow(A, mask, root=root, **opts)
    edges, counts, influence, reached = reference_trace(A, mask, root=root, **opts)
    got = {
        (int(l), int(q), int(k)): (int(h), float(w), set(np.flatnonzero(hs).tolist()))
        for l, q, k, h, w, hs in zip(
            trace.edge_layer, trace.edge_query, trace.edge_key, trace.edge_head, trace.edge_weight, trace.edge_heads
        )
    }
    assert got.keys() == edges.keys()
    for key, (head, weight, passing) in edges.items():
        assert got[key][0] == head and got[key][2] == passing
        assert got[key][1] == pytest.approx(weight, abs=1e-12)
    np.testing.assert_array_equal(trace.counts, counts)
    np.testing.assert_allclose(trace.influence, influence)
    np.testing.assert_array_equal(trace.reached, reached)
    assert trace.root == root


def test_trace_hand_computed() -> None:
    # 2 layers, 1 head, 3 tokens; levels 0..2, root = [CLS] (token 0) at level 2
    A = np.array(
        [
            [[[0.6, 0.4, 0.0], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]],  # layer 0: level 1 -> level 0
            [[[0.5, 0.05, 0.45], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]]],  # layer 1: level 2 -> level 1
        ]
    )
    trace = trace_cls_flow(A, tau=0.3, alpha=0.5)
    # layer 1 from token 0: keys 0 (.5) and 2 (.45); layer 0 from tokens 0 and 2: 0->0, 0->1, 2->0, 2->1, 2->2
    triples = list(zip(trace.edge_layer.tolist(), trace.edge_query.tolist(), trace.edge_key.tolist(), strict=True))
    assert triples == [(0, 0, 0), (0, 0, 1), (0, 2, 0), (0, 2, 1), (0, 2, 2), (1, 0, 0), (1, 0, 2)]
    np.testing.assert_allclose(trace.edge_weight, [0.6, 0.4, 0.3, 0.3, 0.4, 0.5, 0.45])
    np.testing.assert_array_equal(trace.counts, [[2, 2, 1], [1, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(trace.influence, [[2.5, 2.0, 1.5], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(trace.reached, [[1, 1, 1], [1, 0, 1], [1, 0, 0]])
    assert (trace.edge_head == 0).all()
    top1 = trace_cls_flow(A, tau=0.3, top_k=1)
    assert list(zip(top1.edge_layer.tolist(), top1.edge_query.tolist(), top1.edge_key.tolist(), strict=True)) == [
        (0, 0, 0),
        (1, 0, 0),
    ]
    # forward from input token 2: who attends to it with >= .4 (level 1: tokens 2; level 2: tokens 0, 1, 2)
    fwd = trace_cls_flow(A, tau=0.4, direction="forward", root=(0, 2))
    assert list(zip(fwd.edge_layer.tolist(), fwd.edge_query.tolist(), fwd.edge_key.tolist(), strict=True)) == [
        (0, 2, 2),
        (1, 0, 2),
        (1, 1, 2),
        (1, 2, 2),
    ]
    np.testing.assert_allclose(fwd.influence[2], [1.0, 1.0, 1.5])


def test_trace_head_masks() -> None:
    rng = np.random.default_rng(5)
    L, H, n = 4, 4, 8
    A = random_attention(rng, L, H, n)
    empty = trace_cls_flow(A, np.zeros((L, H), bool))
    assert empty.n_edges == 0 and empty.edge_heads.shape == (0, H)
    assert not empty.counts.any() and not empty.influence.any()
    assert empty.reached.sum() == 1 and empty.reached[L, 0]
    full = trace_cls_flow(A, tau=0.15)
    mask = rng.random((L, H)) < 0.5
    mask[:, 1] = True
    part = trace_cls_flow(A, mask, tau=0.15)
    # union over fewer heads keeps a subset of the edges, and only heads inside the mask
    assert set(part.edge_ids().tolist()) <= set(full.edge_ids().tolist())
    assert all(mask[l, h] for l, h in zip(part.edge_layer, part.edge_head, strict=True))
    assert not (part.edge_heads & ~mask[part.edge_layer]).any()
    # masking a head is the same as deleting it (same heads in every layer)
    keep = [0, 2]
    col = np.zeros((L, H), bool)
    col[:, keep] = True
    for combine in ("union", "mean"):
        a = trace_cls_flow(A, col, tau=0.12, combine=combine)
        b = trace_cls_flow(A[:, keep], tau=0.12, combine=combine)
        np.testing.assert_array_equal(a.edge_ids(), b.edge_ids())
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_allclose(a.edge_weight, b.edge_weight)
    np.testing.assert_allclose(attention_rollout(A, col), attention_rollout(A[:, keep]))
    np.testing.assert_allclose(attention_flow(A, col), attention_flow(A[:, keep]), atol=1e-12)
    # a layer without heads is skipped by rollout and flow
    skip = np.ones((L, H), bool)
    skip[1] = False
    np.testing.assert_allclose(attention_rollout(A, skip)[-1], attention_rollout(np.delete(A, 1, axis=0))[-1])
    np.testing.assert_allclose(attention_flow(A, skip), attention_flow(np.delete(A, 1, axis=0)), atol=1e-12)
    # ... and stops the trace below it
    stopped = trace_cls_flow(A, skip, tau=0.05)
    assert set(stopped.edge_layer.tolist()) == {2, 3}


def test_compare_traces() -> None:
    rng = np.random.default_rng(9)
    A, B = random_attention(rng, 3, 2, 6), random_attention(rng, 3, 2, 6)
    ta, tb = trace_cls_flow(A, tau=0.15), trace_cls_flow(B, tau=0.15)
    cmp = compare_traces(ta, tb)
    ida, idb = set(ta.edge_ids().tolist()), set(tb.edge_ids().tolist())
    for l, q, k, label in zip(cmp.edge_layer, cmp.edge_query, cmp.edge_key, cmp.edge_label, strict=True):
        eid = (int(l) * 6 + int(q)) * 6 + int(k)
        expected = SHARED if eid in ida and eid in idb else PRETRAINED if eid in ida else FINETUNED
        assert label == expected
    assert len(cmp.edge_label) == len(ida | idb)
    assert cmp.node_label[3, 0] == SHARED
    for lv in range(4):
        for t in range(6):
            a, b = ta.reached[lv, t], tb.reached[lv, t]
            assert cmp.node_label[lv, t] == (SHARED if a and b else PRETRAINED if a else FINETUNED if b else "")
    same = compare_traces(ta, ta)
    assert set(same.edge_label.tolist()) <= {SHARED}
    with pytest.raises(InputError, match=r"\(4, 6\) and \(4, 5\)"):
        compare_traces(ta, trace_cls_flow(random_attention(rng, 3, 2, 5)))
    with pytest.raises(InputError, match="'backward' and 'forward'"):
        compare_traces(ta, trace_cls_flow(A, direction="forward"))


# --------------------------------------------------------------------------------------------------
# word pieces
# --------------------------------------------------------------------------------------------------


def test_merge_word_pieces() -> None:
    word_ids = [None, 0, 0, 1, None]  # [CLS] play ##ing well [SEP]
    groups, units = word_groups(word_ids)
    assert groups.tolist() == [0, 1, 1, 2, 3] and units == 4
    a = np.arange(25, dtype=float).reshape(5, 5)
    merged = merge_word_pieces(a, word_ids)
    expected = np.array(
        [
            [0, 1 + 2, 3, 4],
            [(5 + 10) / 2, (6 + 7 + 11 + 12) / 2, (8 + 13) / 2, (9 + 14) / 2],
            [15, 16 + 17, 18, 19],
            [20, 21 + 22, 23, 24],
        ]
    )
    np.testing.assert_allclose(merged, expected)
    keys_only = merge_word_pieces(a[:1], word_ids, merge_queries=False)
    np.testing.assert_allclose(keys_only, expected[:1])
    A = random_attention(np.random.default_rng(0), 2, 3, 5)
    mA = merge_word_pieces(A, word_ids)
    assert mA.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(mA.sum(-1), 1.0)
    validate_attention(mA)
    # a non-contiguous repeat of a word id joins the same word
    assert word_groups([None, 3, 4, 3, -1])[0].tolist() == [0, 1, 2, 1, 3]
    with pytest.raises(InputError, match="cover 3 tokens but the map has 5"):
        merge_word_pieces(a, [None, 0, None])


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def _good() -> np.ndarray:
    return random_attention(np.random.default_rng(1), 2, 2, 4)


def _with(index: tuple[int, int, int, int], value: float) -> np.ndarray:
    A = _good()
    A[index] = value
    return A


@pytest.mark.parametrize(
    ("A", "pattern"),
    [
        (np.ones((2, 4, 4)) / 4, r"shape \[layers, heads, n, n\], got shape \(2, 4, 4\)"),
        (np.ones((1, 1, 3, 4)) / 4, r"got shape \(1, 1, 3, 4\)"),
        (np.zeros((0, 1, 3, 3)), r"must not be empty, got shape \(0, 1, 3, 3\)"),
        (np.array([["a"]]), "must be numeric, got dtype <U1"),
        (_with((1, 0, 2, 3), np.nan), "non-finite value nan at layer 1, head 0, row 2, column 3"),
        (_with((0, 1, 0, 0), np.inf), "non-finite value inf at layer 0, head 1, row 0, column 0"),
        (_with((0, 1, 3, 2), -0.25), "negative value -0.25 at layer 0, head 1, row 3, column 2"),
        (_with((1, 1, 2, 0), 3.0), r"layer 1, head 1, row 2 sums to [0-9.]+ \(tolerance 0.001\)"),
    ],
)
def test_bad_attention(A: np.ndarray, pattern: str) -> None:
    for fn in (validate_attention, trace_cls_flow, attention_rollout, attention_flow):
        with pytest.raises(InputError, match=pattern):
            fn(A)


def test_bad_parameters() -> None:
    A = _good()
    for tau in (0, 0.0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(InputError, match=re.escape(f"tau must be in (0, 1], got {tau!r}")):
            trace_cls_flow(A, tau=tau)
    for alpha in (-0.01, 1.01, float("inf"), None):
        with pytest.raises(InputError, match=re.escape(f"alpha must be in [0, 1], got {alpha!r}")):
            trace_cls_flow(A, alpha=alpha)
    assert validate_tau(1) == 1.0 and validate_alpha(0) == 0.0
    with pytest.raises(InputError, match=r"root token 9 is unknown: this input has tokens 0..3"):
        trace_cls_flow(A, root=(2, 9))
    with pytest.raises(InputError, match=r"root level 3 is unknown: levels run from 0 \(input\) to 2"):
        trace_cls_flow(A, root=(3, 0))
    with pytest.raises(InputError, match=r"root token -1 is unknown"):
        trace_cls_flow(A, root=(2, -1))
    with pytest.raises(InputError, match="root must be a \\(level, token\\) pair, got 5"):
        trace_cls_flow(A, root=5)
    with pytest.raises(InputError, match=r"head mask must have shape \(2, 2\), got shape \(2, 3\)"):
        trace_cls_flow(A, np.ones((2, 3), bool))
    with pytest.raises(InputError, match=r"head mask must have shape \(2, 2\), got shape \(2, 3\)"):
        attention_flow(A, np.ones((2, 3), bool))
    with pytest.raises(InputError, match="combine must be 'union' or 'mean', got 'max'"):
        trace_cls_flow(A, combine="max")
    with pytest.raises(InputError, match="direction must be 'backward' or 'forward', got 'up'"):
        trace_cls_flow(A, direction="up")
    with pytest.raises(InputError, match="top_k must be a positive integer or None, got 0"):
        trace_cls_flow(A, top_k=0)
    with pytest.raises(InputError, match=r"source token 4 is unknown: this input has tokens 0..3"):
        attention_flow(A, sources=[0, 4])
    with pytest.raises(InputError, match=r"flow level 0 is unknown: source levels run from 1 to 2"):
        attention_flow(A, level=0)


def test_rollout_trace_relevance_is_the_rollout_row() -> None:
    from attnflows_panel.analysis.flows import attention_rollout, rollout_trace

    rng = np.random.default_rng(5)
    A = rng.dirichlet(np.ones(6), size=(3, 2, 6))
    mask = np.array([[True, False], [True, True], [False, True]])
    trace = rollout_trace(A, mask, tau=0.05, root=(3, 2))
    R = attention_rollout(A, mask)
    np.testing.assert_allclose(trace.influence[0], R[3][2], atol=1e-12)
    np.testing.assert_allclose(trace.influence.sum(axis=1)[:3], 1.0)
    assert (trace.edge_weight >= 0.05).all() and trace.n_edges > 0
    # a plain loop over the kept edges of the top layer
    W = np.stack([(A[l][mask[l]].mean(0) + np.eye(6)) / 2 for l in range(3)])
    top = [(q, k) for q in range(6) for k in range(6) if (q == 2) and W[2][q, k] >= 0.05]
    assert sorted(zip(trace.edge_query[trace.edge_layer == 2].tolist(), trace.edge_key[trace.edge_layer == 2].tolist(), strict=True)) == top


def test_rollout_trace_empty_mask_is_empty() -> None:
    from attnflows_panel.analysis.flows import rollout_trace

    A = np.full((2, 2, 3, 3), 1 / 3)
    trace = rollout_trace(A, np.zeros((2, 2), bool))
    assert trace.n_edges == 0 and not trace.influence.any()


def test_flow_trace_relevance_is_the_max_flow_to_every_level() -> None:
    from attnflows_panel.analysis.flows import attention_flow, flow_trace, residual_attention

    rng = np.random.default_rng(11)
    A = rng.dirichlet(np.full(6, 0.4), size=(4, 3, 6))
    mask = rng.random((4, 3)) < 0.7
    mask[:, 0] = True
    root = (3, 4)
    trace = flow_trace(A, mask, tau=0.05, root=root)
    for level in range(3):  # the max-flow from the root down to each token of every lower level
        expected = attention_flow(A[level:], mask[level:], sources=[4], level=3 - level)[0]
        np.testing.assert_allclose(trace.influence[level], expected, atol=1e-9)
    assert not trace.influence[3:].any() and trace.reached[3, 4]
    # every kept edge, by a plain loop: min(flow into its query, its capacity) >= tau
    W = residual_attention(A, mask)
    flows = np.vstack([trace.influence[:3], np.eye(6)[4]])
    kept = sorted(
        (layer, v, w, min(flows[layer + 1, v], W[layer, v, w]))
        for layer in range(3) for v in range(6) for w in range(6) if min(flows[layer + 1, v], W[layer, v, w]) >= 0.05
    )
    got = sorted(zip(trace.edge_layer.tolist(), trace.edge_query.tolist(), trace.edge_key.tolist(), trace.edge_weight.tolist(), strict=True))
    assert [e[:3] for e in got] == [e[:3] for e in kept]
    np.testing.assert_allclose([e[3] for e in got], [e[3] for e in kept], atol=1e-12)


def test_flow_trace_empty_mask_is_empty() -> None:
    from attnflows_panel.analysis.flows import flow_trace

    trace = flow_trace(np.full((2, 2, 3, 3), 1 / 3), np.zeros((2, 2), bool))
    assert trace.n_edges == 0 and not trace.influence.any()


def test_every_token_draws_the_selected_heads_own_edges() -> None:
    rng = np.random.default_rng(3)
    A = rng.dirichlet(np.full(8, 0.3), size=(3, 2, 8))
    mask = np.zeros((3, 2), dtype=bool)
    mask[0, 1] = True  # a first-layer head: nothing reaches it from [CLS] of the deepest layer
    assert trace_cls_flow(A, mask, tau=0.2).n_edges == 0
    own = trace_cls_flow(A, mask, tau=0.2, every_token=True)
    expected = set(zip(*np.nonzero(A[0, 1] >= 0.2), strict=True))
    assert set(own.edge_layer.tolist()) == {0} and set(zip(own.edge_query.tolist(), own.edge_key.tolist(), strict=True)) == expected
    everything = trace_cls_flow(A, None, tau=0.2, every_token=True, top_k=2)
    per_query = np.bincount(everything.edge_layer * 8 + everything.edge_query, minlength=3 * 8)
    assert per_query.max() <= 2 and everything.n_edges == int(np.minimum((A.max(axis=1) >= 0.2).sum(axis=-1), 2).sum())


def causal_attention(rng: np.random.Generator, L: int, H: int, n: int) -> np.ndarray:
    """Row-stochastic attention with nothing above the diagonal, as a decoder's."""
    A = random_attention(rng, L, H, n) * np.tril(np.ones((n, n)))
    return A / A.sum(-1, keepdims=True)


def test_causal_rollout_divides_each_key_by_the_queries_that_see_it() -> None:
    from attnflows_panel.analysis.flows import rollout_trace

    rng = np.random.default_rng(8)
    L, H, n = 3, 2, 5
    A = causal_attention(rng, L, H, n)
    W = residual_attention(A, causal=True)
    for layer in range(L):  # a plain loop over the definition
        mean = A[layer].mean(0)
        for q in range(n):
            scaled = [mean[q, k] / (n - k) for k in range(n)]
            row = [s / sum(scaled) + (k == q) for k, s in enumerate(scaled)]
            np.testing.assert_allclose(W[layer, q], np.array(row) / 2, atol=1e-12)
    assert not np.triu(W, 1).any()  # still causal
    np.testing.assert_allclose(residual_attention(A), residual_attention(A, causal=False))  # encoders unchanged
    # uniform causal attention: unnormalised rollout from the last token piles relevance on the first token
    uniform = np.broadcast_to(np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None], (L, H, n, n))
    plain = attention_rollout(uniform)[L][n - 1]
    fair = attention_rollout(uniform, causal=True)[L][n - 1]
    assert plain[0] == plain.max() and fair[0] < plain[0]
    trace = rollout_trace(uniform, tau=0.01, causal=True)
    assert trace.root == (L, n - 1) and trace.n_edges > 0  # a causal trace starts at the last token
    np.testing.assert_allclose(trace.influence[0], fair, atol=1e-12)


def test_causal_flow_uses_the_same_graph() -> None:
    from attnflows_panel.analysis.flows import flow_trace

    rng = np.random.default_rng(9)
    A = causal_attention(rng, 3, 2, 5)
    trace = flow_trace(A, tau=0.05, causal=True)
    expected = attention_flow(A, sources=[4], causal=True)[0]
    assert trace.root == (3, 4)
    np.testing.assert_allclose(trace.influence[0], expected, atol=1e-9)
