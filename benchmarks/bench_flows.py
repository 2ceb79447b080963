"""Benchmark the flow computations against reference implementations measured in the same run.

    .venv/bin/python benchmarks/bench_flows.py [--quick]

Inputs are synthetic, seeded BERT-like attention (12 layers x 12 heads; heads that attend to [CLS],
[SEP], self, the previous token or broadly). Every speed-up is a ratio of two timings taken here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnflows_panel.analysis.flows import attention_flow, attention_rollout, trace_cls_flow

L, H = 12, 12


def bert_like_attention(n: int, seed: int = 0) -> np.ndarray:
    """Row-stochastic ``[12, 12, n, n]`` attention mixing broad heads with [CLS]/[SEP]/self/previous-token heads."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(L, H, n, n)) * rng.uniform(0.5, 4.0, size=(L, H, 1, 1))
    idx = np.arange(n)
    for layer in range(L):
        for head in range(H):
            kind, boost = rng.integers(0, 5), rng.uniform(2.0, 6.0)
            if kind == 1:
                logits[layer, head, :, 0] += boost
            elif kind == 2:
                logits[layer, head, :, -1] += boost
            elif kind == 3:
                logits[layer, head, idx, idx] += boost
            elif kind == 4:
                logits[layer, head, idx[1:], idx[:-1]] += boost
    A = np.exp(logits - logits.max(-1, keepdims=True))
    return A / A.sum(-1, keepdims=True)


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def networkx_graph(A: np.ndarray):  # noqa: ANN201
    """Abnar & Zuidema's graph: head mean + I, rows renormalised, adjacency over (level, token)."""
    import networkx as nx

    n = A.shape[-1]
    res = A.sum(axis=1) / A.shape[1]
    res = res + np.eye(n)[None]
    res = res / res.sum(axis=-1)[..., None]
    adj = np.zeros(((L + 1) * n, (L + 1) * n))
    for i in range(1, L + 1):
        adj[i * n : (i + 1) * n, (i - 1) * n : i * n] = res[i - 1]
    G = nx.from_numpy_array(adj, create_using=nx.DiGraph())
    for i, j in G.edges():
        G[i][j]["capacity"] = adj[i, j]
    return G


def networkx_flow(G, n: int, source: int, sink: int) -> float:  # noqa: ANN001
    import networkx as nx

    return nx.maximum_flow_value(G, L * n + source, sink, flow_func=nx.algorithms.flow.edmonds_karp)


def rollout_loop(A: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rollout written as loops over layers, heads and rows."""
    n = A.shape[-1]
    joint = np.eye(n)
    for layer in range(L):
        heads = [h for h in range(H) if mask[layer, h]]
        mat = np.eye(n)
        if heads:
            mean = np.zeros((n, n))
            for h in heads:
                mean += A[layer, h]
            mean /= len(heads)
            for v in range(n):
                row = mean[v] + np.eye(n)[v]
                mat[v] = row / row.sum()
        joint = np.array([[mat[v] @ joint[:, w] for w in range(n)] for v in range(n)])
    return joint


def trace_loop(A: np.ndarray, mask: np.ndarray, tau: float, alpha: float) -> tuple[int, np.ndarray]:
    """The CLS trace walked node by node: returns (edge count, influence)."""
    n = A.shape[-1]
    counts = np.zeros((L + 1, n))
    reached = np.zeros((L + 1, n), bool)
    reached[L, 0] = True
    n_edges = 0
    for level in range(L, 0, -1):
        heads = [h for h in range(H) if mask[level - 1, h]]
        for v in range(n):
            if not reached[level, v]:
                continue
            for w in range(n):
                if any(A[level - 1, h, v, w] >= tau for h in heads):
                    n_edges += 1
                    counts[level - 1, w] += 1
                    reached[level - 1, w] = True
    influence = np.zeros((L + 1, n))
    for level in range(L - 1, -1, -1):
        influence[level] = counts[level] + alpha * influence[level + 1]
    return n_edges, influence


# --------------------------------------------------------------------------------------------------


def bench_flow(quick: bool) -> None:
    print("== exact attention flow vs the authors' networkx max-flow (Edmonds-Karp) ==")
    t_first, _ = timed(lambda: attention_flow(bert_like_attention(8), sources=[0]))
    print(f"first call in this process (numba import + compile or cache load): {t_first:.2f} s")
    rng = np.random.default_rng(1)

    n = 32
    A = bert_like_attention(n, seed=2)
    t_ours, ours = timed(lambda: attention_flow(A), repeat=3)
    G = networkx_graph(A)
    k = 2 if quick else 5
    pairs = [(int(s), int(t)) for s, t in rng.integers(0, n, size=(k, 2))]
    t0 = time.perf_counter()
    ref = [networkx_flow(G, n, s, t) for s, t in pairs]
    t_pair = (time.perf_counter() - t0) / k
    diff = max(abs(ours[s, t] - r) for (s, t), r in zip(pairs, ref, strict=True))
    t_ref = t_pair * n * n
    print(
        f"full map, n={n} ({n * n} max-flows): ours {t_ours:.3f} s | networkx {t_pair:.2f} s per pair, timed on {k} "
        f"random pairs, extrapolated x{n * n} = {t_ref:.0f} s ({t_ref / 60:.1f} min) | ratio {t_ref / t_ours:,.0f}x "
        f"| max |ours - networkx| on timed pairs {diff:.1e}"
    )

    n = 128
    A = bert_like_attention(n, seed=3)
    t_ours, ours = timed(lambda: attention_flow(A, sources=[0]), repeat=3)
    if quick:
        print(f"[CLS] row, n={n} ({n} max-flows): ours {t_ours:.3f} s (target < 1 s) | networkx reference skipped in --quick")
        return
    sink = int(rng.integers(1, n))
    G = networkx_graph(A)
    t_pair, ref = timed(lambda: networkx_flow(G, n, 0, sink))
    t_ref = t_pair * n
    print(
        f"[CLS] row, n={n} ({n} max-flows): ours {t_ours:.3f} s (target < 1 s) | networkx {t_pair:.1f} s for one "
        f"timed pair (0 -> {sink}), extrapolated x{n} = {t_ref / 3600:.1f} h | ratio {t_ref / t_ours:,.0f}x "
        f"| |ours - networkx| {abs(ours[0, sink] - ref):.1e}"
    )


def bench_rollout(quick: bool) -> None:
    print("== attention rollout vs a loop over layers, heads and rows ==")
    n = 64 if quick else 128
    A = bert_like_attention(n, seed=4)
    mask = np.random.default_rng(5).random((L, H)) < 0.7
    t_ours, ours = timed(lambda: attention_rollout(A, mask), repeat=5)
    t_ref, ref = timed(lambda: rollout_loop(A, mask))
    diff = np.abs(ours[-1] - ref).max()
    print(
        f"n={n}: ours {t_ours * 1e3:.1f} ms (all {L + 1} levels) | loop {t_ref * 1e3:.0f} ms (final level) "
        f"| ratio {t_ref / t_ours:,.0f}x | max |diff| {diff:.1e}"
    )


def bench_trace(quick: bool) -> None:
    print("== CLS trace after a head-mask change (n=128, 12 x 12, tau=0.1, union) ==")
    n = 128
    A = bert_like_attention(n, seed=6).astype(np.float32)
    rng = np.random.default_rng(7)
    mask = np.ones((L, H), bool)
    times, edges = [], []
    for _ in range(20 if quick else 100):
        layer, head = rng.integers(0, L), rng.integers(0, H)
        mask[layer, head] = ~mask[layer, head]  # one click in the head grid
        t0 = time.perf_counter()
        trace = trace_cls_flow(A, mask, tau=0.1)
        times.append(time.perf_counter() - t0)
        edges.append(trace.n_edges)
    times_ms = sorted(t * 1e3 for t in times)
    median = statistics.median(times_ms)
    p95 = times_ms[int(0.95 * (len(times_ms) - 1))]
    t_ref, (ref_edges, ref_influence) = timed(lambda: trace_loop(A, mask, 0.1, 0.5))
    same = ref_edges == trace.n_edges and np.allclose(ref_influence, trace.influence)
    print(
        f"ours over {len(times)} mask changes: median {median:.1f} ms, p95 {p95:.1f} ms, max {times_ms[-1]:.1f} ms "
        f"(target < 20 ms; {min(edges)}-{max(edges)} edges) | node-by-node loop {t_ref:.2f} s "
        f"| ratio {t_ref * 1e3 / median:,.0f}x | same edges and influence: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer reference samples, no 128-token networkx pair")
    args = parser.parse_args()
    bench_trace(args.quick)
    bench_rollout(args.quick)
    bench_flow(args.quick)


if __name__ == "__main__":
    main()
