"""Benchmark the per-head measures against references measured in the same run, and time head importance.

    .venv/bin/python benchmarks/bench_heads.py [--quick]

Corpus: synthetic, seeded, BERT-like row-stochastic attention (12 layers x 12 heads, 8-64 tokens).
References: the same measures one sentence at a time (``head_measures`` in a loop) and in plain Python
loops over heads, queries and keys. Head importance runs on the real default encoder.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnflows_panel.analysis.heads import MEASURES, corpus_head_measures, head_measures

L, H = 12, 12
NAMES = [name for name, _ in MEASURES]
WORDS = ["the", "movie", "was", "good", "##ly", "car", "i", "love", "it", "not"]
PUNCTUATION = [".", ",", "!", "?"]


def synthetic_corpus(n_sentences: int, seed: int = 0) -> list[tuple[np.ndarray, list[str], np.ndarray, np.ndarray]]:
    """Sentences of 8-64 tokens; heads that attend broadly or mostly to [CLS], [SEP], self or the previous token."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 5, size=(L, H))
    boost = rng.uniform(2.0, 6.0, size=(L, H)).astype(np.float32)
    scale = rng.uniform(0.5, 4.0, size=(L, H, 1, 1)).astype(np.float32)
    items = []
    for _ in range(n_sentences):
        n = int(rng.integers(8, 65))
        logits = rng.standard_normal((L, H, n, n), dtype=np.float32) * scale
        idx = np.arange(n)
        logits[..., 0] += np.where(kind == 1, boost, 0)[..., None]
        logits[..., n - 1] += np.where(kind == 2, boost, 0)[..., None]
        logits[..., idx, idx] += np.where(kind == 3, boost, 0)[..., None]
        logits[..., idx[1:], idx[:-1]] += np.where(kind == 4, boost, 0)[..., None]
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        middle = [str(t) for t in rng.choice(WORDS + PUNCTUATION, size=n - 2, p=[0.08] * 10 + [0.05] * 4)]
        tokens = ["[CLS]", *middle, "[SEP]"]
        items.append((a, tokens, idx == 0, idx == n - 1))
    return items


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def per_sentence_loop(items: list) -> dict[str, np.ndarray]:
    """Reference 1: ``head_measures`` one sentence at a time (numpy per sentence), then the mean."""
    totals = {name: np.zeros((L, H)) for name in NAMES}
    for item in items:
        for name, values in head_measures(*item).items():
            totals[name] += values
    return {name: total / len(items) for name, total in totals.items()}


def python_loop(items: list) -> dict[str, np.ndarray]:
    """Reference 2: every sentence, head, query and key visited in plain Python."""
    totals = {name: [[0.0] * H for _ in range(L)] for name in NAMES}
    for attention, tokens, cls, sep in items:
        n = len(tokens)
        cls_keys = [k for k in range(n) if cls[k]]
        sep_keys = [k for k in range(n) if sep[k]]
        punct_keys = [k for k in range(n) if tokens[k] in PUNCTUATION]
        for layer, heads in enumerate(attention.tolist()):
            for head, rows in enumerate(heads):
                acc = dict.fromkeys(NAMES, 0.0)
                for q, row in enumerate(rows):
                    acc["entropy"] -= sum(w * math.log(w) for w in row if w > 0)
                    acc["attn_cls"] += sum(row[k] for k in cls_keys)
                    acc["attn_sep"] += sum(row[k] for k in sep_keys)
                    acc["attn_punct"] += sum(row[k] for k in punct_keys)
                    acc["attn_self"] += row[q]
                    acc["attn_prev"] += row[q - 1] if q else 0.0
                    acc["attn_next"] += row[q + 1] if q < n - 1 else 0.0
                    acc["distance"] += sum(w * abs(q - k) for k, w in enumerate(row))
                    acc["max_weight"] += max(row)
                for name, value in acc.items():
                    totals[name][layer][head] += value / (n - 1 if name in ("attn_prev", "attn_next") else n)
    return {name: np.array(t) / len(items) for name, t in totals.items()}


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[name] - b[name]).max()) for name in NAMES)


# --------------------------------------------------------------------------------------------------


def bench_measures(quick: bool) -> None:
    n_sentences, n_python = (200, 4) if quick else (1000, 12)
    print(f"== per-head measures ({len(NAMES)} measures), {n_sentences} sentences of 8-64 tokens, {L} x {H} heads ==")
    t_make, items = timed(lambda: synthetic_corpus(n_sentences))
    tokens = sum(len(t) for _, t, _, _ in items)
    gb = sum(a.nbytes for a, *_ in items) / 1e9
    print(f"corpus: {tokens} tokens, {gb:.2f} GB of float32 attention (generated in {t_make:.1f} s)")
    t_vec, vec = timed(lambda: corpus_head_measures(items))
    t_loop, loop = timed(lambda: per_sentence_loop(items))
    t_vec2, _ = timed(lambda: corpus_head_measures(items))  # again, after the loop, to see the noise
    print(f"vectorized corpus_head_measures : {t_vec:7.2f} s, again {t_vec2:.2f} s ({1e3 * min(t_vec, t_vec2) / n_sentences:.2f} ms per sentence)")
    print(f"head_measures one sentence at a time: {t_loop:7.2f} s  -> ratio {t_loop / min(t_vec, t_vec2):.2f}x   max |difference| {max_difference(vec, loop):.1e}")
    subset = items[:n_python]
    t_py, py = timed(lambda: python_loop(subset))
    t_sub, sub = timed(lambda: corpus_head_measures(subset))
    print(
        f"plain-Python loops, first {n_python} sentences: {t_py:7.2f} s vs vectorized on the same {t_sub:.3f} s  -> ratio {t_py / t_sub:.0f}x   "
        f"max |difference| {max_difference(sub, py):.1e}"
    )
    print(f"  (plain Python for all {n_sentences} sentences would take about {t_py / n_python * n_sentences / 60:.0f} min at that rate)")


def bench_importance(quick: bool) -> None:
    import torch
    import transformers

    from attnflows_panel.analysis.ablation import ablate_heads, head_importance
    from attnflows_panel.corpus import heldout_sentiment_corpus
    from attnflows_panel.models import default_pretrained_path, load_encoder

    transformers.utils.logging.set_verbosity_error()  # the fresh head's load report
    transformers.utils.logging.disable_progress_bar()
    n_sentences = 16 if quick else 64
    print(f"\n== gradient head importance on the real default encoder, {n_sentences} sentences ==")
    torch.manual_seed(0)
    t_load, lm = timed(lambda: load_encoder(default_pretrained_path(), labels=["negative", "positive"]))
    print(f"{lm.model_id}: {lm.n_layers} layers x {lm.n_heads} heads (a fresh seeded 2-class head; loaded in {t_load:.1f} s), torch threads {torch.get_num_threads()}")
    corpus = heldout_sentiment_corpus().subset(range(n_sentences))
    n_tokens = sum(len(lm.tokenizer(t)["input_ids"]) for t in corpus.texts)
    print(f"sentences: {n_sentences}, {n_tokens} tokens, mean length {n_tokens / n_sentences:.1f}")
    for batch_size in (16, 64):
        t, importance = timed(lambda b=batch_size: head_importance(lm, corpus.texts, corpus.labels, batch_size=b))
        print(f"head_importance batch_size={batch_size:>2}: {t:6.2f} s ({1e3 * t / n_sentences:.0f} ms per sentence)")
    top = np.dstack(np.unravel_index(np.argsort(importance, axis=None)[::-1][:3], importance.shape))[0]
    print(f"most important heads (layer, head): {[tuple(int(i) for i in x) for x in top]}")
    t, result = timed(lambda: ablate_heads(lm, corpus.texts[0], heads_off=[(lm.n_layers - 1, h) for h in range(lm.n_heads)]))
    print(f"ablate_heads (last layer off, one sentence): {1e3 * t:.0f} ms; p(positive) {result.original_probabilities[1]:.3f} -> {result.probabilities[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 sentences, fewer plain-Python sentences, 16 for importance")
    args = parser.parse_args()
    bench_measures(args.quick)
    bench_importance(args.quick)


if __name__ == "__main__":
    main()
