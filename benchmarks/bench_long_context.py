"""Benchmark long contexts: attention as queries and keys (``forward_sources``) against the dense ``[L, H, n, n]`` record.

    .venv/bin/python benchmarks/bench_long_context.py [--quick]

1. A random LLaMA-style decoder (32 layers x 32 heads, 8 key-value heads, hidden 512, head_dim 16;
   seeded, saved with a byte-level BPE tokenizer made here, loaded through ``load_encoder``) at 4,096
   tokens: extraction (``forward_sources``), the trace from the last token, the grid of a head measure
   over every head, one head's matrix (and its datashader raster), each with its time and the peak
   resident memory of the process. The dense record would not fit: its size is printed, not made.
   The grid (torch over the queries and keys, a layer per thread) has a baseline: the generic row-chunk
   path any other source takes (``AttentionSource.row_chunks`` read into numpy measures; the path every
   source took before, 279 s for the whole grid here when its rows were numpy too), run on the first
   ``--grid-layers`` layers (every layer has the same shape and cost), scaled to all of them, and checked
   equal to the grid there.
2. The same model at 1,024 tokens, where the dense record fits: the same computations on the source
   and on the dense array from ``forward_attention``, with their results checked equal.
3. The offline default BERT (all-MiniLM-L6-v2) at 512 tokens: bytes held per input and the time of each
   view computation, source against dense, and the per-head JS difference between two inputs.

Views computed from a source are also timed with numpy's BLAS held to one thread (rows ``…, 1 BLAS
thread``): the many small batched matrix products are slow with OpenBLAS's default threads when the
cores are busy. Every size runs in a fresh subprocess (this file with ``--worker``), so peaks are
isolated; within one, each step's peak is the kernel's ``VmHWM`` after resetting it
(``/proc/self/clear_refs``). Ratios are baseline / attnflows: above 1, attnflows is faster or holds less.
The equality checks compare two forward passes (the capture runs scaled_dot_product_attention, the
dense record the eager code), so the drift by layer and the source against the eager formula on the
same captured queries and keys are printed beside them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import print_table  # noqa: E402
try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(ROOT))

GB = 1e9
MB = 1e6
# Sentences the BPE tokenizer is trained on and long decoder inputs are made of (as tests/conftest.py's DECODER_TEXTS).
DECODER_TEXTS = ["the movie was good", "a long and boring film that nobody liked at all", "the cast was great but the plot was thin", "it was bad"]
BERT_TEXTS = (
    [
        "The film opens on a quiet harbour town where nothing seems to happen.",
        "Its lead actor carries every scene with a warmth that is hard to fake.",
        "By the second hour, though, the plot loses its way among too many side stories.",
        "The music is lovely, and the camera lingers on faces rather than on explosions.",
        "I would watch it again, if only for the last ten minutes.",
    ],
    [
        "The service was slow and the soup arrived cold.",
        "Our waiter apologised twice, which was kind, but the kitchen never caught up.",
        "The dessert, a lemon tart, was the best thing we ate all week.",
        "Prices are fair for the neighbourhood, and the wine list is short but careful.",
        "We will probably go back on a quieter evening.",
    ],
)
LIBRARY_FILES = (
    "attnflows_panel/analysis/source.py",
    "attnflows_panel/analysis/flows.py",
    "attnflows_panel/analysis/heads.py",
    "attnflows_panel/analysis/compare.py",
    "attnflows_panel/extract.py",
    "attnflows_panel/models/capture.py",
)


# --------------------------------------------------------------------------------------------------
# memory of this process
# --------------------------------------------------------------------------------------------------


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``, ``VmSize``) in bytes."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux 4.0+); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def step(log: list[dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    """Time ``name`` and record the peak resident memory of the process while it ran."""
    gc.collect()
    record: dict[str, Any] = {"name": name, "rss_before": status_bytes("VmRSS"), "isolated": reset_peak()}
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - t0
        record["peak"] = status_bytes("VmHWM") if record["isolated"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        log.append(record)


# --------------------------------------------------------------------------------------------------
# the random decoder (tokenizer and model made here, as tests/conftest.py makes its tiny ones)
# --------------------------------------------------------------------------------------------------


def bpe_tokenizer(max_length: int) -> Any:
    """A byte-level BPE tokenizer trained on ``DECODER_TEXTS``; every input starts with ``<s>`` (LLaMA style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(DECODER_TEXTS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length)


def save_decoder(path: Path, layers: int, max_tokens: int, init: float, seed: int = 0) -> dict[str, Any]:
    """A seeded random LLaMA (``layers`` x 32 heads, 8 key-value heads, hidden 512, head_dim 16) with its LM head and tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer(max_tokens)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 16,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=16,
        max_position_embeddings=max_tokens,
        initializer_range=init,  # wide enough that heads attend sharply (weights of tau and more exist at thousands of tokens)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(tokenizer)}


def long_text(sentences: list[str], n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(sentences) for _ in range(n_sentences))


# --------------------------------------------------------------------------------------------------
# one size in one process
# --------------------------------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> None:
    """Run one model at one size, as source or dense; write step timings/peaks (JSON) and results (npz)."""
    log: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    if spec.get("cap_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (int(spec["cap_bytes"]), resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        _work(spec, log, info, arrays)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prints it
        info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        info["failed_step"] = log[-1]["name"] if log else "start"
    Path(spec["out"] + ".json").write_text(json.dumps({"steps": log, "info": info}))
    np.savez(spec["out"] + ".npz", **arrays)


def _work(spec: dict[str, Any], log: list[dict[str, Any]], info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    with step(log, "import"):
        import torch

        from attnflows_panel.analysis.compare import head_js_divergence
        from attnflows_panel.analysis.flows import trace_cls_flow
        from attnflows_panel.analysis.heads import MEASURES, head_measures
        from attnflows_panel.analysis.source import AttentionSource, QueryKeyAttention
        from attnflows_panel.errors import InputError
        from attnflows_panel.extract import encode, forward_attention, forward_sources
        from attnflows_panel.models import load_encoder
    info["torch_threads"] = torch.get_num_threads()
    info["library"] = library_fingerprint()
    dense_mode = spec["mode"] == "dense"
    n = int(spec["n"])
    with step(log, "load model"):
        lm = load_encoder(spec["model"])
    lm.tokenizer.model_max_length = n  # encode truncates to the model's limit: this size
    encodings = []
    with step(log, "encode"):
        for text in spec["texts"]:
            encodings.append(encode(lm, text, warn=False))
    for e in encodings:
        if len(e.input_ids) != n:
            raise RuntimeError(f"text gives {len(e.input_ids)} tokens, not {n}: make it longer")
    enc = encodings[0]
    tok = lm.tokenizer
    cls = enc.input_ids == (tok.cls_token_id if tok.cls_token_id is not None else -1)
    sep = enc.input_ids == (tok.sep_token_id if tok.sep_token_id is not None else -1)
    L, H = lm.n_layers, lm.n_heads
    info.update(layers=L, heads=H, tokens=n, causal=lm.family.causal, dense_bytes=L * H * n * n * 4)

    with step(log, "extract"):
        ((attention, logits),) = (forward_attention if dense_mode else forward_sources)(lm, [enc])
    info["held_bytes"] = int(attention.nbytes)
    if not dense_mode:
        queries = sum(q.nbytes for q in attention.queries)
        keys = sum(k.nbytes for k in attention.keys)
        masks = {id(m): m.nbytes for m in attention.masks if m is not None}
        buffers = {(a.__array_interface__["data"][0], a.nbytes) for a in (*attention.queries, *attention.keys, *attention.masks) if a is not None}
        info.update(query_bytes=int(queries), key_bytes=int(keys), mask_bytes=int(sum(masks.values())), distinct_masks=len(masks),
                    mask_buffers=len({(m.__array_interface__["data"][0], m.nbytes) for m in attention.masks if m is not None}),
                    layers_with_mask=sum(m is not None for m in attention.masks), buffer_bytes=int(sum(size for _, size in buffers)))
    if logits is not None:
        arrays["logits"] = np.asarray(logits)

    from threadpoolctl import threadpool_limits

    repeat = int(spec.get("repeat", 1))
    one_thread = bool(spec.get("one_thread")) and not dense_mode

    def timed_runs(name: str, fn: Any, sources: tuple[Any, ...], runs: int) -> Any:
        """``fn(*sources)`` as step ``name`` (peak included), then ``runs - 1`` more times; the median is kept (a source keeps nothing computed)."""
        with step(log, name) as record:
            out = fn(*sources)
        times = [record["seconds"]]
        for _ in range(runs - 1):
            t0 = time.perf_counter()
            fn(*sources)
            times.append(time.perf_counter() - t0)
        record.update(times=times, median=float(np.median(times)))
        return out

    def view(name: str, fn: Any, *sources: Any, runs: int | None = None) -> Any:
        """:func:`timed_runs`; with ``one_thread``, once more as ``name + ", 1 BLAS thread"`` with numpy's BLAS held to one thread."""
        runs = repeat if runs is None else runs
        out = timed_runs(name, fn, sources, runs)
        if one_thread:
            with threadpool_limits(1, "blas"):
                timed_runs(f"{name}, 1 BLAS thread", fn, sources, runs)
        return out

    root = (L, n - 1) if lm.family.causal else (L, 0)
    trace = view("trace", lambda a: trace_cls_flow(a, None, tau=spec["tau"], root=root, top_k=spec["top_k"]), attention)
    info["trace_edges"] = trace.n_edges
    info["trace_reached"] = int(trace.reached.sum())
    arrays.update(edge_ids=trace.edge_ids(), edge_head=trace.edge_head, edge_weight=trace.edge_weight)

    if spec.get("chunk_bench") and not dense_mode:
        # one row chunk as head_measures reads it (source.CHUNK_BYTES of float32), default BLAS threads against one
        step_rows = max(1, (64 * 2**20) // (H * n * 4))
        chunk = np.arange(min(n, step_rows))
        for label, limit in (("default", None), ("one", 1)):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                with threadpool_limits(limit, "blas"):
                    attention.rows(L // 2, None, chunk)
                times.append(time.perf_counter() - t0)
            info[f"chunk_{label}"] = float(np.median(times))
        info["chunk_shape"] = [H, int(chunk.size), n]

    names = [name for name, _ in MEASURES]

    def grid(a: Any) -> dict[str, np.ndarray]:
        if dense_mode:  # one layer at a time: one call on the whole record needs several times its size in float64 (below)
            per_layer = [head_measures(a[layer], enc.tokens, cls, sep) for layer in range(a.shape[0])]
            return {name: np.stack([m[name] for m in per_layer]) for name in names}
        return head_measures(a, enc.tokens, cls, sep)

    grid_runs = repeat if spec.get("repeat_grid") else 1
    measures = view("measure grid", grid, attention, runs=grid_runs)
    part = spec.get("grid_row_chunk_layers")
    if part and not dense_mode:

        class RowsOnly(AttentionSource):
            """A source read through ``rows`` alone: ``head_measures`` walks it in numpy row chunks."""

            def __init__(self, source: AttentionSource) -> None:
                self.source, self.shape = source, source.shape

            @property
            def nbytes(self) -> int:
                return self.source.nbytes

            def rows(self, layer: int, heads: Any = None, queries: Any = None) -> np.ndarray:
                return self.source.rows(layer, heads, queries)

        # the baseline: the row-chunk path on the first ``part`` layers (a layer costs the same at every depth), checked equal to the grid there
        part = min(int(part), L)
        first = QueryKeyAttention(attention.queries[:part], attention.keys[:part], attention.masks[:part], attention.scalings[:part], attention.softcaps[:part])
        with threadpool_limits(1, "blas"), step(log, f"measure grid by row chunks, layers 1-{part}"):
            chunked = head_measures(RowsOnly(first), enc.tokens, cls, sep)
        rtol, atol = 1e-5, 1e-7
        info["grid_row_chunk_layers"] = part
        info["row_chunks_equal"] = all(np.allclose(measures[name][:part], chunked[name], rtol=rtol, atol=atol, equal_nan=True) for name in names)
        info["row_chunks_excess"] = max(float(np.nanmax(np.abs(measures[name][:part] - chunked[name]) / (atol + rtol * np.abs(chunked[name])), initial=0)) for name in names)
    arrays.update({f"measure_{name}": np.asarray(measures[name]) for name in names})

    layer, head = spec["head"]

    def head_matrix(a: Any) -> np.ndarray:
        return np.asarray(a[layer, head] if dense_mode else a.head(layer, head))

    matrix = view("head matrix", head_matrix, attention)
    arrays["head_matrix"] = np.array(matrix)
    if spec.get("probes"):
        # head 0 of a few layers from input to output side: how far the two forward passes drift apart with depth
        probes = sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})
        info["probe_layers"] = probes
        for p_layer in probes:
            arrays[f"probe_{p_layer}"] = np.array(attention[p_layer, 0] if dense_mode else attention.head(p_layer, 0))
        if not dense_mode:  # the same layers by the eager formula (torch) on the captured queries and keys
            from attnflows_panel.models.capture import attention_weights

            drift = {}
            for p_layer in probes:
                q = torch.from_numpy(attention.queries[p_layer][None, :1])
                k = torch.from_numpy(attention.keys[p_layer][None, :1])
                m = attention.masks[p_layer]
                eager = attention_weights(q, k, None if m is None else torch.from_numpy(m)[None, None], attention.scalings[p_layer], attention.softcaps[p_layer])
                drift[str(p_layer)] = float(np.abs(eager[0, 0].numpy() - arrays[f"probe_{p_layer}"]).max())
            info["eager_formula_max_diff"] = drift

    if spec.get("raster"):
        with step(log, "raster: import + warm datashader"):
            from attnflows_panel.plots.attention_matrix import attention_matrix, matrix_frames, warm_rasterizer

            warm_rasterizer()
        with step(log, "raster"):
            frames = matrix_frames(attention_matrix(matrix, enc.tokens, title="head"))
        info["raster_shape"] = list(np.shape(frames["image"]["image"][0]))

    if len(encodings) > 1:
        with step(log, "extract second input"):
            ((other, _),) = (forward_attention if dense_mode else forward_sources)(lm, [encodings[1]])
        try:
            js = view("JS difference", head_js_divergence, attention, other)
            info["js_takes_sources"] = True
        except InputError as exc:
            info["js_takes_sources"] = False
            info["js_error"] = str(exc).splitlines()[0]
            js = view("JS difference via source.dense()", lambda a, b: head_js_divergence(a.dense(), b.dense()), attention, other)
        arrays["js"] = np.asarray(js)
        del other

    if dense_mode and spec.get("whole_record"):
        # what head_measures(record.attention) costs: measured on 2 layers, then tried on the whole record under a cap
        with step(log, "measure grid, one call on 2 layers") as rec:
            head_measures(attention[:2], enc.tokens, cls, sep)
        info["whole_call_2_layers_extra"] = rec_peak_extra = log[-1]["peak"] - log[-1]["rss_before"]
        info["whole_call_2_layers_input"] = int(attention[:2].nbytes)
        info["whole_call_bytes_per_input_byte"] = rec_peak_extra / attention[:2].nbytes
        headroom = int(spec["whole_record_headroom"])
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (status_bytes("VmSize") + headroom, hard))
        info["whole_record_headroom"] = headroom
        try:
            with step(log, "measure grid, one call on the whole record"):
                whole = head_measures(attention, enc.tokens, cls, sep)
            info["whole_record"] = "ok"
            info["whole_record_equal"] = all(np.allclose(whole[name], measures[name], rtol=1e-5, atol=1e-7, equal_nan=True) for name in names)
        except MemoryError as exc:
            info["whole_record"] = f"MemoryError: {exc}"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    info["peak_process"] = max(s["peak"] for s in log)


def run_worker(spec: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its JSON report with its arrays (``arrays``) and wall time."""
    spec = {**spec, "out": str(tmp / name)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    report_path = Path(spec["out"] + ".json")
    if not report_path.exists():
        raise RuntimeError(f"worker {name} died (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(report_path.read_text())
    with np.load(spec["out"] + ".npz") as data:
        report["arrays"] = {k: data[k] for k in data.files}
    report["wall"] = wall
    report["steps_by_name"] = {s["name"]: s for s in report["steps"]}
    after = {s["name"]: i for i, s in enumerate(report["steps"])}.get("extract")
    if after is not None and after + 1 < len(report["steps"]):  # what the process holds more once the input is extracted
        report["info"]["rss_after_extract"] = report["steps"][after + 1]["rss_before"] - report["steps"][after]["rss_before"]
    if "error" in report["info"]:
        print(f"  worker {name}: {report['info']['error']} (in step {report['info']['failed_step']!r})", flush=True)
    print(f"  {name}: {wall:.1f} s, peak {report['info'].get('peak_process', 0) / GB:.2f} GB", flush=True)
    return report


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_b(nbytes: float | None) -> str:
    if nbytes is None:
        return "—"
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.5 * GB else f"{nbytes / MB:.1f} MB"


def ratio(baseline: float | None, ours: float | None) -> str:
    if not baseline or not ours:
        return "—"
    r = baseline / ours
    return f"{r:,.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def seconds_of(report: dict[str, Any] | None, name: str) -> float | None:
    """A step's time: the median of its repeats when it was repeated, else its one run."""
    s = None if report is None else report["steps_by_name"].get(name)
    return None if s is None else s.get("median", s["seconds"])


def peak_of(report: dict[str, Any] | None, name: str) -> float | None:
    s = None if report is None else report["steps_by_name"].get(name)
    return None if s is None else s["peak"]


def check_equal(src: dict[str, Any], dense: dict[str, Any], what: str) -> tuple[list[tuple[str, bool, str]], list[str]]:
    """Source against dense: trace edges equal, every measure grid allclose, head matrix within 1e-5 (and the JS grid); notes on logits and drift."""
    a, b = src["arrays"], dense["arrays"]
    checks: list[tuple[str, bool, str]] = []
    notes: list[str] = []
    if "edge_ids" in a and "edge_ids" in b:
        same = np.array_equal(a["edge_ids"], b["edge_ids"])
        detail = f"{a['edge_ids'].size} and {b['edge_ids'].size} edges"
        if same:
            heads = np.array_equal(a["edge_head"], b["edge_head"])
            detail += f", strongest heads {'equal' if heads else 'differ'}, weights max abs diff {np.abs(a['edge_weight'] - b['edge_weight']).max(initial=0):.1e}"
        checks.append((f"{what}: trace edges equal", same, detail))
    measures = sorted(k for k in a if k.startswith("measure_"))
    if measures and all(k in b for k in measures):
        # rtol 1e-4: the two records come from two forward passes (captured scaled_dot_product_attention against eager
        # code) whose float32 sums drift apart with depth; on one source the fast grid equals the row-chunk path at 1e-5 (above)
        rtol, atol = 1e-4, 1e-7

        def excess(k: str) -> float:  # how far past the allclose bound the worst entry is (<= 1 passes)
            return float(np.nanmax(np.abs(a[k] - b[k]) / (atol + rtol * np.abs(b[k])), initial=0))

        worst = max(measures, key=excess)
        i = np.nanargmax(np.abs(a[worst] - b[worst]) / (atol + rtol * np.abs(b[worst])))
        ok = all(np.allclose(a[k], b[k], rtol=rtol, atol=atol, equal_nan=True) for k in measures)
        checks.append((f"{what}: {len(measures)} measure grids allclose (rtol {rtol:g}, atol {atol:g})", ok,
                       f"worst entry: {worst[8:]} {a[worst].flat[i]:.7g} vs {b[worst].flat[i]:.7g}"))
    if "head_matrix" in a and "head_matrix" in b:
        diff = float(np.abs(a["head_matrix"] - b["head_matrix"]).max())
        # atol 1e-4: the captured forward runs scaled_dot_product_attention, the dense one eager code, and their float32 sums drift apart with depth (printed above)
        checks.append((f"{what}: head matrix allclose (atol 1e-4)", bool(np.allclose(a["head_matrix"], b["head_matrix"], rtol=0, atol=1e-4)), f"max abs diff {diff:.1e}"))
    if "js" in a and "js" in b:
        diff = float(np.abs(a["js"] - b["js"]).max())
        checks.append((f"{what}: JS grid allclose (atol 1e-6)", bool(np.allclose(a["js"], b["js"], rtol=0, atol=1e-6)), f"max abs diff {diff:.1e}"))
    if "logits" in a and "logits" in b:
        notes.append(f"{what}: logits of the two forward passes differ by at most {np.abs(a['logits'] - b['logits']).max():.1e} (largest |logit| {np.abs(b['logits']).max():.2f})")
    probes = sorted(int(k[6:]) for k in a if k.startswith("probe_") and k in b)
    if probes:
        drift = ", ".join(f"layer {p + 1}: {np.abs(a[f'probe_{p}'] - b[f'probe_{p}']).max():.1e}" for p in probes)
        notes.append(f"{what}: head 1, source against dense record, max abs diff by layer: {drift}")
        eager = src["info"].get("eager_formula_max_diff")
        if eager:
            notes.append(f"{what}: head 1, source against the eager formula (torch) on the same captured queries and keys: "
                         + ", ".join(f"layer {int(p) + 1}: {d:.1e}" for p, d in eager.items()))
    return checks, notes


def library_fingerprint(root: Path | None = None) -> str:
    """Short hashes of the library files measured (the tree may change while a run goes on)."""
    if root is None:
        import attnflows_panel

        root = Path(attnflows_panel.__file__).resolve().parents[1]
    parts = [str(root)]
    for rel in LIBRARY_FILES:
        path = root / rel
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8] if path.exists() else "missing"
        parts.append(f"{Path(rel).name}:{digest}")
    return " ".join(parts)


def decoder_arguments(description: str, quick: str) -> argparse.ArgumentParser:
    """The options of both long-input benchmarks: the sizes, the random decoder and each worker's memory cap."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--tokens", type=int, help="long input (default 4096; 512 with --quick)")
    parser.add_argument("--dense-tokens", type=int, help="size compared with the dense record (default 1024; 256 with --quick)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 32; 8 with --quick)")
    parser.add_argument("--init", type=float, default=0.1, help="initializer_range of the random decoder")
    parser.add_argument("--cap-gb", type=float, default=16.0, help="address-space cap of each worker (guards the shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def decoder_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(long tokens, tokens compared with the dense record, decoder layers) the options ask for."""
    return args.tokens or (512 if args.quick else 4096), args.dense_tokens or (256 if args.quick else 1024), args.layers or (8 if args.quick else 32)


def main() -> None:
    parser = decoder_arguments(__doc__.splitlines()[0], "512 and 256 tokens, 8 layers, BERT at 128 tokens (about a minute)")
    parser.add_argument("--bert-tokens", type=int, help="default BERT input (default 512; 128 with --quick)")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--target-gb", type=float, default=4.0, help="peak the long source run should stay under")
    parser.add_argument("--grid-layers", type=int, default=2, help="at the long size, the baseline grid (numpy row chunks) on this many layers, scaled to all (0: none)")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    started = time.perf_counter()
    n_long, n_cmp, layers = decoder_sizes(args)
    n_bert = args.bert_tokens or (128 if args.quick else 512)
    cap = int(args.cap_gb * GB)
    print(f"long-context benchmark: decoder {layers} layers x 32 heads (8 kv heads, hidden 512, head_dim 16) at {n_long} and {n_cmp} tokens; default BERT at {n_bert}")
    fingerprint = library_fingerprint()
    print(f"library files measured: {fingerprint}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="attnflows-bench-long-"))
    try:
        model_dir = tmp / "decoder"
        t0 = time.perf_counter()
        build = subprocess.run(
            [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); from bench_long_context import save_decoder; from pathlib import Path; "
             "print(json.dumps(save_decoder(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))))",
             str(Path(__file__).parent), str(model_dir), str(layers), str(max(n_long, n_cmp)), str(args.init)],
            capture_output=True, text=True, check=True,
        )
        built = json.loads(build.stdout.strip().splitlines()[-1])
        print(f"  decoder built and saved: {built['parameters'] / 1e6:.1f} M parameters, vocabulary {built['vocabulary']}, {time.perf_counter() - t0:.1f} s", flush=True)

        common = {"model": str(model_dir), "tau": args.tau, "top_k": args.top_k, "cap_bytes": cap}
        decoder_text = long_text(DECODER_TEXTS, max(n_long, n_cmp), seed=0)  # every sentence is several tokens: always long enough
        middle = (layers // 2, 0)
        long_src = run_worker({**common, "n": n_long, "mode": "source", "texts": [decoder_text], "head": middle, "raster": True, "repeat": 3, "one_thread": True,
                               "chunk_bench": True, "grid_row_chunk_layers": args.grid_layers}, tmp, f"decoder-{n_long}-source")
        cmp_src = run_worker({**common, "n": n_cmp, "mode": "source", "texts": [decoder_text], "head": middle, "raster": not args.quick, "repeat": 3, "one_thread": True,
                              "chunk_bench": True, "probes": True}, tmp, f"decoder-{n_cmp}-source")
        dense_bytes = layers * 32 * n_cmp * n_cmp * 4
        with open("/proc/meminfo") as f:
            available = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
        need = 2 * dense_bytes + 1.5 * GB  # forward_attention stacks the layers' tensors: twice the record at its peak
        if available < need + 2 * GB:
            print(f"  skipping the dense run at {n_cmp} tokens: it needs about {need / GB:.1f} GB and {available / GB:.1f} GB are available", flush=True)
            cmp_dense = None
        else:
            cmp_dense = run_worker({**common, "n": n_cmp, "mode": "dense", "texts": [decoder_text], "head": middle, "raster": not args.quick, "repeat": 3, "probes": True,
                                    "whole_record": True, "whole_record_headroom": int(4 * GB)}, tmp, f"decoder-{n_cmp}-dense")

        from attnflows_panel.models import default_pretrained_path

        bert = {"model": str(default_pretrained_path()), "tau": args.tau, "top_k": args.top_k, "cap_bytes": cap, "head": (5, 0), "n": n_bert,
                "repeat": 3 if args.quick else 7, "repeat_grid": True, "texts": [long_text(BERT_TEXTS[0], 200, seed=1), long_text(BERT_TEXTS[1], 200, seed=2)]}
        bert_src = run_worker({**bert, "mode": "source", "one_thread": True}, tmp, f"bert-{n_bert}-source")
        bert_dense = run_worker({**bert, "mode": "dense"}, tmp, f"bert-{n_bert}-dense")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- table
    rows: list[tuple[str, str, str, str]] = []
    one = ", 1 BLAS thread"
    info = long_src["info"]
    tag = f"decoder {layers}x32, {n_long} tok"
    dense_long = layers * 32 * n_long * n_long * 4
    rows.append((f"{tag}: attention held, source.nbytes (dense not made)", fmt_b(info.get("held_bytes")), fmt_b(dense_long) + " (computed)", ratio(dense_long, info.get("held_bytes"))))
    rows.append((f"{tag}: attention held, distinct buffers", fmt_b(info.get("buffer_bytes")), fmt_b(dense_long) + " (computed)", ratio(dense_long, info.get("buffer_bytes"))))
    part = info.get("grid_row_chunk_layers")
    rows.append((f"{tag}: extraction, forward_sources", fmt_s(seconds_of(long_src, "extract")), "—", "—"))
    for label, name in (("trace from the last token", "trace"), ("one head's matrix", "head matrix")):
        rows.append((f"{tag}: {label}", fmt_s(seconds_of(long_src, name)), "—", "—"))
        rows.append((f"{tag}: {label}{one}", fmt_s(seconds_of(long_src, name + one)), "—", "—"))
    by_chunks = seconds_of(long_src, f"measure grid by row chunks, layers 1-{part}") if part else None
    baseline = by_chunks and by_chunks * layers / part
    for suffix in ("", one):
        ours = seconds_of(long_src, "measure grid" + suffix)
        rows.append((f"{tag}: measure grid, all {layers}x32 heads{suffix}{f' (baseline: row chunks, by {layers}/{part})' if part else ''}", fmt_s(ours), fmt_s(baseline), ratio(baseline, ours)))
    if part:
        rows.append((f"{tag}: measure grid by row chunks (numpy{one}), {part} of {layers} layers", fmt_s(by_chunks), "—", "—"))
    rows.append((f"{tag}: its datashader raster", fmt_s(seconds_of(long_src, "raster")), "—", "—"))
    rows.append((f"{tag}: peak RSS of the process (target < {args.target_gb:g} GB)", fmt_b(info.get("peak_process")), "—", "—"))

    tag = f"decoder {layers}x32, {n_cmp} tok"
    dn = cmp_dense["info"] if cmp_dense else {}
    rows.append((f"{tag}: attention held", fmt_b(cmp_src["info"].get("held_bytes")), fmt_b(dn.get("held_bytes")), ratio(dn.get("held_bytes"), cmp_src["info"].get("held_bytes"))))
    rows.append((f"{tag}: extraction (forward_sources | forward_attention)", fmt_s(seconds_of(cmp_src, "extract")), fmt_s(seconds_of(cmp_dense, "extract")),
                 ratio(seconds_of(cmp_dense, "extract"), seconds_of(cmp_src, "extract"))))
    for label, name in (("trace from the last token", "trace"), ("measure grid (all heads)", "measure grid"), ("one head's matrix", "head matrix")):
        for suffix in ("", one):
            ours, base = seconds_of(cmp_src, name + suffix), seconds_of(cmp_dense, name)
            rows.append((f"{tag}: {label}{suffix}", fmt_s(ours), fmt_s(base), ratio(base, ours)))
    if not args.quick:
        rows.append((f"{tag}: its datashader raster", fmt_s(seconds_of(cmp_src, "raster")), fmt_s(seconds_of(cmp_dense, "raster")), ratio(seconds_of(cmp_dense, "raster"), seconds_of(cmp_src, "raster"))))
    for label, name in (("peak RSS, extraction", "extract"), ("peak RSS, trace", "trace"), ("peak RSS, measure grid", "measure grid")):
        ours, base = peak_of(cmp_src, name), peak_of(cmp_dense, name)
        rows.append((f"{tag}: {label}", fmt_b(ours), fmt_b(base), ratio(base, ours)))
    rows.append((f"{tag}: peak RSS of the process", fmt_b(cmp_src["info"].get("peak_process")), fmt_b(dn.get("peak_process")), ratio(dn.get("peak_process"), cmp_src["info"].get("peak_process"))))

    tag = f"default BERT 6x12, {n_bert} tok"
    bs, bd = bert_src["info"], bert_dense["info"]
    rows.append((f"{tag}: bytes held per input (target ratio >= 4)", fmt_b(bs.get("held_bytes")), fmt_b(bd.get("held_bytes")), ratio(bd.get("held_bytes"), bs.get("held_bytes"))))
    rows.append((f"{tag}: extraction", fmt_s(seconds_of(bert_src, "extract")), fmt_s(seconds_of(bert_dense, "extract")), ratio(seconds_of(bert_dense, "extract"), seconds_of(bert_src, "extract"))))
    js_name = "JS difference" if bs.get("js_takes_sources", True) else "JS difference via source.dense()"
    for label, name, base_name in (("trace from [CLS]", "trace", "trace"), ("measure grid (all heads)", "measure grid", "measure grid"),
                                   ("one head's matrix", "head matrix", "head matrix"), ("JS difference of two inputs" + ("" if js_name == "JS difference" else " (source via .dense())"), js_name, "JS difference")):
        for suffix in ("", one):
            ours, base = seconds_of(bert_src, name + suffix), seconds_of(bert_dense, base_name)
            rows.append((f"{tag}: {label}{suffix}", fmt_s(ours), fmt_s(base), ratio(base, ours)))
    rows.append((f"{tag}: peak RSS of the process", fmt_b(bs.get("peak_process")), fmt_b(bd.get("peak_process")), ratio(bd.get("peak_process"), bs.get("peak_process"))))

    checks, notes = check_equal(cmp_src, cmp_dense, f"decoder {n_cmp} tok") if cmp_dense else ([], [])
    more_checks, more_notes = check_equal(bert_src, bert_dense, f"BERT {n_bert} tok")
    checks, notes = checks + more_checks, notes + more_notes
    if "row_chunks_equal" in info:
        checks.append((f"decoder {n_long} tok: measure grid equals the row-chunk path on layers 1-{part} (rtol 1e-5, atol 1e-7)", info["row_chunks_equal"],
                       f"worst entry at {info['row_chunks_excess']:.2f} of the bound"))

    print()
    print(f"dense record at {n_long} tokens would be {layers} x 32 x {n_long} x {n_long} x 4 bytes = {dense_long / GB:.1f} GB")
    for what, i in ((f"decoder {n_long}", info), (f"decoder {n_cmp}", cmp_src["info"]), (f"BERT {n_bert}", bs)):
        print(f"source, {what} tokens: nbytes {fmt_b(i.get('held_bytes'))} = queries {fmt_b(i.get('query_bytes'))} + keys {fmt_b(i.get('key_bytes'))} "
              f"+ masks {fmt_b(i.get('mask_bytes'))} ({i.get('distinct_masks')} mask arrays for {i.get('layers_with_mask')} layers, over {i.get('mask_buffers')} distinct buffers)"
              f"; "
              f"distinct buffers {fmt_b(i.get('buffer_bytes'))}; process RSS grew {fmt_b(i.get('rss_after_extract'))} over extraction; "
              f"trace {i.get('trace_edges')} edges, {i.get('trace_reached')} nodes reached")
    for what, i in ((f"decoder {n_long}", info), (f"decoder {n_cmp}", cmp_src["info"])):
        if "chunk_default" in i:
            print(f"one row chunk {i['chunk_shape']} of a source, {what} tokens: {fmt_s(i['chunk_default'])} with numpy's default BLAS threads, "
                  f"{fmt_s(i['chunk_one'])} with 1 BLAS thread (median of 5)")
    if "js_error" in bs:
        print(f"head_js_divergence on two sources: InputError: {bs['js_error']}")
    elif bs.get("js_takes_sources"):
        print("head_js_divergence takes the two sources directly")
    if cmp_dense:
        print(f"head_measures(record.attention) in one call at {n_cmp} tokens: {dn.get('whole_record')} "
              f"(on 2 layers it took {fmt_b(dn.get('whole_call_2_layers_extra'))} above its {fmt_b(dn.get('whole_call_2_layers_input'))} float32 input, "
              f"{dn.get('whole_call_bytes_per_input_byte', 0):.1f} bytes per input byte); the dense grid row above is one layer at a time")
    if cmp_dense:
        print(f"dense, decoder {n_cmp} tokens: record {fmt_b(dn.get('held_bytes'))}; process RSS grew {fmt_b(dn.get('rss_after_extract'))} over extraction")
    for report in (long_src, cmp_src, cmp_dense, bert_src, bert_dense):
        if report and report["info"].get("library", fingerprint) != fingerprint:
            print(f"NOTE: a worker measured other library files: {report['info']['library']}")
    for report in (long_src, cmp_src, cmp_dense, bert_src, bert_dense):
        if report and "error" in report["info"]:
            print(f"ERROR in a worker: {report['info']['error']} (step {report['info']['failed_step']!r})")
    print()
    print_table(rows)
    print("(baseline: the dense [L, H, n, n] record from forward_attention; ratio: baseline / attnflows. Times: one run for extraction and the decoder grids,")
    print(" else the median of 3 (decoder) or 7 (BERT) runs; a source keeps nothing computed, so every run computes what it reads)")
    print()
    for name, report in ((f"decoder {n_long} source", long_src), (f"decoder {n_cmp} source", cmp_src), (f"decoder {n_cmp} dense", cmp_dense),
                         (f"BERT {n_bert} source", bert_src), (f"BERT {n_bert} dense", bert_dense)):
        if report is None:
            continue
        by_step = "; ".join(f"{s['name']} {fmt_s(s['seconds'])} {s['peak'] / GB:.2f} GB" for s in report["steps"])
        print(f"peak RSS {name}: {report['info'].get('peak_process', 0) / GB:.2f} GB, wall {report['wall']:.1f} s (by step, first run, peak: {by_step})")
    print()
    for note in notes:
        print(note)
    for what, ok, detail in checks:
        print(f"check {'PASS' if ok else 'FAIL'}: {what} ({detail})")
    target_ok = info.get("peak_process", float("inf")) < args.target_gb * GB
    print(f"check {'PASS' if target_ok else 'FAIL'}: peak RSS at {n_long} tokens under {args.target_gb:g} GB ({fmt_b(info.get('peak_process'))})")
    quarter = bs.get("held_bytes", float("inf")) * 4 <= bd.get("held_bytes", 0)
    print(f"check {'PASS' if quarter else 'FAIL'}: BERT source at most a quarter of dense ({fmt_b(bs.get('held_bytes'))} vs {fmt_b(bd.get('held_bytes'))})")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
