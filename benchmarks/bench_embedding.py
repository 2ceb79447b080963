"""Benchmark the head map and model-difference computations against loops measured in the same run.

    .venv/bin/python benchmarks/bench_embedding.py [--quick]

Wall times depend on what else runs on the machine; the CPU time of the vectorized distances is
printed too. Inputs are synthetic, seeded attention for two 6-layer x 12-head models (144 heads), 1,000 sentences
of 8-64 tokens (``--quick``: 100). The per-pair loop is too slow to run in full: it is timed on a
sample of sentences and extrapolated by the number of attention values, and the output says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnflows_panel.analysis.compare import corpus_head_differences
from attnflows_panel.analysis.embedding import clark_head_distances, embed_head_distances

L, H = 6, 12


def attention(rng: np.random.Generator, n: int) -> np.ndarray:
    """Row-stochastic float32 ``[L, H, n, n]`` attention with heads of varied sharpness."""
    logits = rng.normal(size=(L, H, n, n)).astype(np.float32) * rng.uniform(0.5, 4.0, size=(L, H, 1, 1)).astype(np.float32)
    A = np.exp(logits - logits.max(-1, keepdims=True))
    return A / A.sum(-1, keepdims=True)


def synthetic_corpus(n_sentences: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pre-trained, fine-tuned) pairs: the second is the first with perturbed logits."""
    rng = np.random.default_rng(seed)
    out = []
    for n in rng.integers(8, 65, size=n_sentences):
        A = attention(rng, int(n))
        B = A * np.exp(rng.normal(0, 0.5, size=A.shape)).astype(np.float32)
        out.append((A, B / B.sum(-1, keepdims=True)))
    return out


def clark_pair_loop(sentences: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The straightforward reference: Clark et al.'s head_distances.py loop, one pair of heads at a time."""
    K = 2 * L * H
    total = np.zeros((K, K))
    for A, B in sentences:
        heads = np.concatenate([A, B]).reshape(K, A.shape[-1], A.shape[-1]).astype(np.float64)
        n = heads.shape[-1]
        smoothed = 0.001 / n + 0.999 * heads
        for i in range(K):
            for j in range(K):
                p, q = smoothed[i], smoothed[j]
                m = (p + q) / 2
                total[i, j] += (0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())
    return total


def js_difference_loop(sentences: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-head JS (bits) between the models, one head and one query row at a time, mean over queries and sentences."""
    total = np.zeros((L, H))
    for A, B in sentences:
        n = A.shape[-1]
        for layer in range(L):
            for head in range(H):
                js = 0.0
                for v in range(n):
                    p, q = A[layer, head, v].astype(np.float64), B[layer, head, v].astype(np.float64)
                    m = (p + q) / 2
                    js += 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
                total[layer, head] += js / n
    return total / len(sentences)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 sentences instead of 1,000")
    args = parser.parse_args()
    n_sentences = 100 if args.quick else 1000
    sample = 2 if args.quick else 4
    sentences = synthetic_corpus(n_sentences)
    values = sum(a.shape[-1] ** 2 for a, _ in sentences)
    print(f"{n_sentences} synthetic sentences of 8-64 tokens, 2 models x {L} layers x {H} heads = {2 * L * H} heads")

    t0, c0 = time.perf_counter(), time.process_time()
    dist = clark_head_distances(sentences)
    t_vec, c_vec = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    ref = clark_pair_loop(sentences[:sample])
    t_loop_sample = time.perf_counter() - t0
    sample_values = sum(a.shape[-1] ** 2 for a, _ in sentences[:sample])
    t_loop = t_loop_sample * values / sample_values
    check = clark_head_distances(sentences[:sample])
    err = np.abs(check.total - ref).max() / ref.max()
    print("\nClark et al. head distances (all 144 x 144 pairs)")
    print(f"  vectorized:      {t_vec:8.1f} s for all {n_sentences} sentences ({c_vec:.1f} s of CPU over {os.cpu_count()} cores)")
    print(f"  per-pair loop:   {t_loop:8.1f} s EXTRAPOLATED from {t_loop_sample:.1f} s on {sample} sentences (by attention values)")
    print(f"  ratio:           {t_loop / t_vec:8.0f}x   max relative difference on the sample: {err:.1e}")
    t0 = time.perf_counter()
    emb = embed_head_distances(dist)
    print(f"  MDS to 2-D:      {time.perf_counter() - t0:8.1f} s (stress {emb.stress:.3g})")

    t0 = time.perf_counter()
    diff = corpus_head_differences(sentences)
    t_diff = time.perf_counter() - t0
    loop_n = min(n_sentences, 10 if args.quick else 50)
    t0 = time.perf_counter()
    loop = js_difference_loop(sentences[:loop_n])
    t_diff_loop_sample = time.perf_counter() - t0
    t_diff_loop = t_diff_loop_sample * n_sentences / loop_n
    sub = corpus_head_differences(sentences[:loop_n])
    print("\nPer-head JS difference between the two models (with cosine similarity)")
    print(f"  vectorized:      {t_diff:8.2f} s for all {n_sentences} sentences (mean JS {diff.js.mean():.3f} bits)")
    print(f"  per-row loop:    {t_diff_loop:8.2f} s EXTRAPOLATED from {t_diff_loop_sample:.2f} s on {loop_n} sentences (by sentences)")
    print(f"  ratio:           {t_diff_loop / t_diff:8.0f}x   max abs difference on the sample: {np.abs(sub.js - loop).max():.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
