"""Benchmark corpus runs: extraction against a bare batched forward loop, the store's size, 1 vs 2 Dask workers.

    .venv/bin/python benchmarks/bench_corpus.py [--quick]

The offline default pair (all-MiniLM-L6-v2 and its fine-tune, made by ``attnflows prepare``) over the
held-out sentiment sentences. Each measurement runs in a fresh subprocess (this file with ``--worker``),
models loaded before the clock starts, so times and peaks (the kernel's ``VmHWM``) are its own.

1. Throughput: ``extract_corpus`` (tokenizing, both models, statistics, model differences, sparse entries,
   Parquet written and hashed; the head map's distances, a fixed cost for the first 300 sentences, left
   out here and timed on their own below) against the loop a user would write: the same sentences, the whole corpus sorted by length and cut every 32 (sooner
   where a batch's attention would pass 64 MB; extraction can only sort within a shard), tokenized by the fast tokenizer
   a batch at a time, ``model(**batch, output_attentions=True)`` through both models, the
   attentions copied to numpy and dropped; each run three times, alternated, the medians compared. Its peak memory
   at N, 2N and 8N sentences (the held-out set over again past its 1,000): flat if within 10% + 32 MB of N's. Both
   import attnflows first, so oneDNN keeps no kernel per input shape in either (see ``attnflows_panel/__init__``).
2. Store size per sentence at about 33 tokens (the corpus as it is) and at 128 tokens (sentences joined
   to 128 tokens), against the format this store replaced: every sentence's dense ``[L, H, n, n]``
   float16 per model, written as ``.npz`` here for the same sentences.
3. Two batches at once (the default: two threads, torch's operations each on half the cores) against one at a
   time (torch on every core), and both extraction and the bare loop while another process spins on one core.
4. The run (without the head map's distances) on a Dask ``LocalCluster`` of 1 and of 2 worker processes
   (loopback; the cluster's start-up, its workers loading the models, not counted) against one process,
   and the cluster's store checked equal to the one-process store.

Each line: name, attnflows, baseline, ratio (baseline / attnflows for times: above 1 is faster), check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(ROOT))

from bench_long_context import reset_peak, status_bytes  # noqa: E402

KB = 1024
TARGET_THROUGHPUT = 0.9  # at least 0.9x the bare loop's sentences per second
TARGET_SIZE = 10.0  # at most 1/10 of the dense store per sentence


def default_models() -> dict[str, Any]:
    from attnflows_panel.models import default_pair

    pair = default_pair(progress=False)
    return {"pretrained": pair.pretrained, "finetuned": pair.finetuned}


def sentences(n: int, tokens: int | None) -> Any:
    """The first ``n`` held-out sentences (past its 1,000, the held-out set again), or (``tokens``) held-out sentences
    joined into inputs of about that many tokens."""
    from attnflows_panel.corpus import Corpus, heldout_sentiment_corpus

    corpus = heldout_sentiment_corpus()
    if tokens is None:
        return corpus.subset([i % len(corpus) for i in range(n)])
    from attnflows_panel.models import default_pretrained_path, load_encoder

    tok = load_encoder(default_pretrained_path()).tokenizer
    joined, current, length = [], [], 2
    for text in corpus.texts * 20:
        current.append(text)
        length += len(tok(text, add_special_tokens=False)["input_ids"])
        if length >= tokens:  # cut back to about ``tokens`` (the ends of joined texts re-tokenize as they were)
            ids = tok(" ".join(current), add_special_tokens=False)["input_ids"][: tokens - 2]
            joined.append(tok.decode(ids))
            current, length = [], 2
            if len(joined) == n:
                break
    return Corpus(texts=joined, source=f"held-out joined to {tokens} tokens")


def bare_loop(models: dict[str, Any], texts: list[str]) -> None:
    """The loop a user would write: batches of similar length, both models, attentions to numpy."""
    import torch

    from attnflows_panel.shard import SHARD_BATCH_BYTES

    first = next(iter(models.values()))
    tok = first.tokenizer
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=first.max_tokens)["input_ids"]]
    per_pair = first.n_layers * first.n_heads * 4 * len(models)
    for batch in sorted_batches(lengths, 32, SHARD_BATCH_BYTES // per_pair):
        inputs = tok([texts[i] for i in batch], padding=True, truncation=True, max_length=first.max_tokens, return_tensors="pt")
        for lm in models.values():
            with torch.inference_mode():
                out = lm.model(**lm.forward_kwargs(dict(inputs)), output_attentions=True)
            [a.numpy() for a in out.attentions]


def sorted_batches(lengths: list[int], max_batch: int, budget_pairs: int) -> list[list[int]]:
    """The corpus sorted by length, cut every ``max_batch`` inputs or before a batch's ``B * n * n`` passes ``budget_pairs``."""
    batches: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches[-1] and (len(batches[-1]) == max_batch or (len(batches[-1]) + 1) * lengths[i] ** 2 > budget_pairs):
            batches.append([])
        batches[-1].append(i)
    return batches


def worker(task: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this fresh process."""
    from attnflows_panel.store import HEAD_MAP_SENTENCES, extract_corpus, run_size

    corpus = sentences(task["n"], task.get("tokens"))
    models = default_models()
    if "threads" in task:
        import attnflows_panel.store

        attnflows_panel.store.LOCAL_THREADS = task["threads"]
    out: dict[str, Any] = {"n": len(corpus)}
    reset_peak()
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    if task["kind"] == "bare":
        bare_loop(models, corpus.texts)
    elif task["kind"] == "extract":
        extract_corpus(models, corpus, task["run"], progress=False, head_map_sentences=task.get("head_map", HEAD_MAP_SENTENCES))
        out["size"] = run_size(task["run"])
    elif task["kind"] == "cluster":
        from attnflows_panel.cluster import cluster_client

        with cluster_client(workers=task["workers"]) as client:
            client.wait_for_workers(task["workers"])
            warm = corpus.subset(range(2 * task["workers"]))  # each worker loads the models: a cluster's start-up, not the run's
            extract_corpus(models, warm, Path(task["run"]).with_name("warm-up"), shard_size=1, progress=False, client=client, head_map_sentences=0)
            start = time.perf_counter()
            extract_corpus(models, corpus, task["run"], progress=False, client=client, head_map_sentences=0)
    elif task["kind"] == "dense":
        dense_size(models, corpus, Path(task["run"]))
        out["size"] = {"total": sum(f.stat().st_size for f in Path(task["run"]).glob("*.npz"))}
    out["seconds"] = time.perf_counter() - start
    out["peak_above_start"] = status_bytes("VmHWM") - before
    out["tokens"] = float(np.mean([len(models["pretrained"].tokenizer(t, truncation=True, max_length=512)["input_ids"]) for t in corpus.texts]))
    return out


def dense_size(models: dict[str, Any], corpus: Any, directory: Path) -> None:
    """The replaced format: each model's dense float16 attention of every sentence, 128 sentences a file."""
    from attnflows_panel.extract import encode, forward_attention

    directory.mkdir(parents=True, exist_ok=True)
    first = next(iter(models.values()))
    for shard, start in enumerate(range(0, len(corpus), 128)):
        encodings = [encode(first, t, warn=False) for t in corpus.texts[start : start + 128]]
        arrays = {name: np.concatenate([a.astype(np.float16).ravel() for a, _ in forward_attention(lm, encodings)]) for name, lm in models.items()}
        np.savez(directory / f"part-{shard:05d}.npz", **arrays)


def run(task: dict[str, Any]) -> dict[str, Any]:
    """``task`` measured in a subprocess."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed: {task}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Another process spinning on one core meanwhile (what a shared machine often has)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def line(name: str, ours: float, baseline: float, ratio: float, check: str = "") -> None:
    print(f"{name}, {ours:.4g}, {baseline:.4g}, {ratio:.2f}x{', ' + check if check else ''}", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sentences (a smoke run; the README's numbers are from a full run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    n = 256 if args.quick else 1000
    repeats = 1 if args.quick else 3  # this machine's speed drifts by several percent from minute to minute
    root = Path(tempfile.mkdtemp(prefix="attnflows-bench-corpus-"))
    failures = 0
    try:
        print("name, attnflows, baseline, ratio, check")
        paired = [(run({"kind": "extract", "n": n, "head_map": 0, "run": str(root / ("run" if k == 0 else f"again{k}"))}), run({"kind": "bare", "n": n})) for k in range(repeats)]
        ours, bare = (sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] for runs in zip(*paired, strict=True))
        times = [", ".join(f"{r['seconds']:.2f}" for r in runs) for runs in zip(*paired, strict=True)]
        print(f"  (median of {repeats} runs each, alternated: attnflows {times[0]} s; bare loop {times[1]} s)")
        ok = bare["seconds"] / ours["seconds"] >= TARGET_THROUGHPUT
        failures += not ok
        line(f"extraction, sentences/s ({n} sentences, mean {ours['tokens']:.1f} tokens)", ours["n"] / ours["seconds"], bare["n"] / bare["seconds"], bare["seconds"] / ours["seconds"], f"{verdict(ok)} (at least {TARGET_THROUGHPUT}x)")
        line("extraction peak memory above start, MB", ours["peak_above_start"] / 2**20, bare["peak_above_start"] / 2**20, bare["peak_above_start"] / max(ours["peak_above_start"], 1))
        mapped = run({"kind": "extract", "n": n, "run": str(root / "mapped")})
        line(f"a default run, s (with the head map's distances of its first {min(n, 300)} sentences; baseline: without)", mapped["seconds"], ours["seconds"], ours["seconds"] / mapped["seconds"])
        for times in (2, 8) if not args.quick else (2,):  # 8N: the held-out set eight times over
            longer = run({"kind": "extract", "n": times * n, "head_map": 0, "run": str(root / f"run{times}")})
            ok = longer["peak_above_start"] <= 1.1 * ours["peak_above_start"] + 32 * 2**20
            failures += not ok
            line(f"extraction peak memory, MB: {times * n} sentences vs {n}", longer["peak_above_start"] / 2**20, ours["peak_above_start"] / 2**20, ours["peak_above_start"] / max(longer["peak_above_start"], 1), f"{verdict(ok)} (flat: within 10% + 32 MB)")
        for tokens, count in ((None, n), (128, max(64, n // 8))):
            name = "corpus" if tokens is None else f"{tokens}"
            store = mapped if tokens is None else run({"kind": "extract", "n": count, "tokens": tokens, "run": str(root / f"run{tokens}")})
            dense = run({"kind": "dense", "n": count, "tokens": tokens, "run": str(root / f"dense{name}")})
            per, per_dense = store["size"]["total"] / store["n"], dense["size"]["total"] / dense["n"]
            ok = per_dense / per >= TARGET_SIZE
            failures += not ok
            line(f"store KB per sentence at {store['tokens']:.1f} tokens ({store['n']} sentences)", per / KB, per_dense / KB, per_dense / per, f"{verdict(ok)} (at least {TARGET_SIZE:.0f}x smaller)")
            parts = ", ".join(f"{part} {size / store['n'] / KB:.1f}" for part, size in store["size"].items() if part not in ("total",) and size)
            print(f"  parts, KB per sentence: {parts}")
        alone = run({"kind": "extract", "n": n, "head_map": 0, "threads": 1, "run": str(root / "alone")})
        line("extraction, sentences/s: two batches at once (baseline: one at a time, torch on both cores)", ours["n"] / ours["seconds"], alone["n"] / alone["seconds"], alone["seconds"] / ours["seconds"])
        with busy_core():
            loaded, loaded_bare = run({"kind": "extract", "n": n // 4, "head_map": 0, "run": str(root / "loaded")}), run({"kind": "bare", "n": n // 4})
        line(f"extraction, sentences/s, another process busy on one core ({n // 4} sentences)", loaded["n"] / loaded["seconds"], loaded_bare["n"] / loaded_bare["seconds"], loaded_bare["seconds"] / loaded["seconds"])
        for workers in (1, 2):
            clustered = run({"kind": "cluster", "n": n, "workers": workers, "run": str(root / f"cluster{workers}")})
            line(f"extraction on {workers} Dask worker{'s' * (workers > 1)}, sentences/s (baseline: one process)", clustered["n"] / clustered["seconds"], ours["n"] / ours["seconds"], ours["seconds"] / clustered["seconds"])
        same = stores_equal(root / "run", root / "cluster2")
        failures += not same
        print(f"store of 2 Dask workers equal to one process's: {verdict(same)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'all checks passed' if not failures else f'{failures} checks FAILED'}")
    sys.exit(1 if failures else 0)


def stores_equal(a: Path, b: Path) -> bool:
    """Every table of two runs equal (statistics, differences, tokens, entries, head distances)."""
    import pandas as pd

    from attnflows_panel.store import RunStore

    x, y = RunStore.open(a), RunStore.open(b)
    try:
        for part in ("stats", "differences", "tokens", "entries", "distances"):
            a, b = x.files(part), y.files(part)
            if a or b:
                pd.testing.assert_frame_equal(pd.concat(map(pd.read_parquet, a)), pd.concat(map(pd.read_parquet, b)))
    except AssertionError:
        return False
    return True


if __name__ == "__main__":
    main()
