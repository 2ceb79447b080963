"""Benchmark the single-model app and the static export on long decoder inputs.

    .venv/bin/python benchmarks/bench_long_app.py [--quick]

The model is bench_long_context's random LLaMA (32 layers x 32 heads, 8 key-value heads; 8 layers with
``--quick``), saved into a temporary directory with its byte-level BPE tokenizer. Inputs are whole
sentences of ``DECODER_TEXTS`` fitted to a token count (4,096 and 1,024; 512 and 256 with ``--quick``).

1. The app, ``SingleView(lm, text)`` as a notebook or a served session builds it (a 128-token view is
   drawn first in each process, so datashader's and numba's compilation is not counted): text to every
   view drawn (the constructor: extraction, then the grid's measures, the mean map and the trace
   computed, then every figure drawn; the three are also timed apart), a brush of 2 heads of the last
   layer, a switch of the grid's measure, clearing the selection (every head again), and a second input
   of half the length (``view.text = ...``), with the peak resident memory of the process.
   Baseline: the same steps at 1,024 tokens with dense records. The view takes its records from
   ``extract``, which keeps the dense ``[L, H, n, n]`` array only while it fits
   ``extract.DENSE_RECORD_BYTES``; the baseline process raises that limit, so the very same app code
   runs on the 4.29 GB dense record (the app before attention sources). At 4,096 tokens the dense record
   (L*H*n*n*4 bytes = 68.7 GB) cannot be made: its size is printed against the process's peak.
2. The static export of one model (what ``attnflows export --model M --text-file F`` runs:
   ``extract`` then ``export_dashboard``) at 4,096 tokens: time, file size, and whether its header says
   it carries only some heads (a file carries at most ``export.MAX_ENTRIES`` attention entries of at
   least tau). Baselines: the same export at 1,024 tokens, and the bytes a file carrying every entry
   of at least tau would need, estimated as the file's size plus 16 bytes per entry left out (an entry
   ships as an int32 head, an int32 key and a float32 weight, base64 in the page); the entries are
   counted by the export's own ``attention_entries`` pass (wrapped here, not run twice).

Every size runs in a fresh subprocess (this file with ``--worker``) under an address-space cap, so
peaks (``VmHWM``, reset before each step) are isolated. Ratios are baseline / attnflows: above 1,
attnflows is faster or smaller. Each step checks what the app shows (edges drawn, titles, the second
input's token count and x range, the export's header) and the run fails loudly when one does not hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import print_table  # noqa: E402
from bench_long_context import DECODER_TEXTS, GB, decoder_arguments, decoder_sizes, fmt_b, fmt_s, library_fingerprint, long_text, ratio, save_decoder, status_bytes, step  # noqa: E402

ENTRY_BYTES = 16  # an exported entry: int32 head + int32 key + float32 weight, base64 (4/3) in the HTML
WARM_TOKENS = 128  # over 96 tokens, so the warm-up view's matrix goes through datashader too
APP_FILES = ("attnflows_panel/components/attention_view.py", "attnflows_panel/components/records.py", "attnflows_panel/export.py")


def fingerprint() -> str:
    """bench_long_context's hashes of the library files, and of the app's and the export's (the tree may change during a run)."""
    root = Path(__file__).resolve().parents[1]
    return library_fingerprint() + "".join(f" {Path(rel).name}:{hashlib.sha256((root / rel).read_bytes()).hexdigest()[:8]}" for rel in APP_FILES)


def fit_text(tokenizer: Any, n: int, seed: int) -> str:
    """The longest run of whole words of ``long_text(DECODER_TEXTS, n, seed)`` that tokenizes to at most ``n`` tokens."""
    words = long_text(DECODER_TEXTS, n, seed).split(" ")  # n sentences: always more than n tokens
    count = lambda k: len(tokenizer(" ".join(words[:k]))["input_ids"])  # noqa: E731
    low, high = 1, len(words)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) <= n else (low, mid - 1)
    return " ".join(words[:low])


def check(ok: bool, what: str) -> None:
    """Fail the worker (and so the run) when ``ok`` is false."""
    if not ok:
        raise AssertionError(what)


def edges_in(title: str) -> int:
    """The edge count a flow title states (``..., 6108 edges; ...``)."""
    match = re.search(r"(\d+) edges", title)
    check(match is not None, f"no edge count in the flow title {title!r}")
    return int(match.group(1))


def timed(owner: Any, name: str, totals: dict[str, float], label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its run time to ``totals[label]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


# --------------------------------------------------------------------------------------------------
# workers: one size in one process
# --------------------------------------------------------------------------------------------------


def app_worker(spec: dict[str, Any], log: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """The app's steps at one size, with attention sources or (``spec["dense"]``) dense records."""
    with step(log, "import"):
        import attnflows_panel.extract as extract
        from attnflows_panel.components import SingleView
        from attnflows_panel.components import attention_view as view_module
        from attnflows_panel.models import load_encoder
    if spec["dense"]:
        extract.DENSE_RECORD_BYTES = 2**62  # every record dense, as before attention sources
    with step(log, "load model"):
        lm = load_encoder(spec["model"])
    L, H = lm.n_layers, lm.n_heads
    texts = {name: fit_text(lm.tokenizer, n, seed) for name, n, seed in (("warm", WARM_TOKENS, 2), ("first", spec["n"], 0), ("second", spec["n2"], 1))}
    with step(log, "warm-up view"):
        SingleView(lm, texts["warm"])
    parts: dict[str, float] = {}
    timed(view_module, "cached_records", parts, "extraction")
    timed(view_module.AttentionView, "_prime", parts, "prime")

    def flow() -> Any:
        check(len(view.flows) == 1, f"{len(view.flows)} flow diagrams")
        return next(iter(view.flows.values())).figure

    def matrix_title() -> str:
        return next(iter(view.matrices.values())).figure.title.text

    n = spec["n"]
    with step(log, "view"):
        view = SingleView(lm, texts["first"])
    info["view_parts"] = dict(parts)
    record = view.records[0]
    info.update(layers=L, heads=H, tokens=record.n_tokens, source=type(record.source).__name__, held_bytes=record.source.nbytes)
    check(record.n_tokens == len(lm.tokenizer(texts["first"])["input_ids"]) and 0.98 * n <= record.n_tokens <= n, f"{record.n_tokens} tokens, asked {n}")
    check(not view.notice and not view.busy, f"notice {view.notice!r}, busy {view.busy}")
    check((type(record.source).__name__ == "DenseAttention") == spec["dense"], f"record kept as {type(record.source).__name__}")
    title = info["title"] = flow().title.text
    info["edges"] = edges_in(title)
    check(info["edges"] > 0, f"no edge drawn: {title!r}")
    check(flow().x_range.end == record.n_tokens, f"flow x range ends at {flow().x_range.end}, not {record.n_tokens}")
    check(view.grid.figure is not None and view.sentence.figure is not None and matrix_title().startswith(view.titles[view.names[0]]), "a view is not drawn")

    heads = [(L - 1, 0), (L - 1, 5)]
    with step(log, "brush"):
        view.select_heads(heads)
    info["title_brush"] = flow().title.text
    info["edges_brush"] = edges_in(info["title_brush"])
    check(f"(2 of {L * H} heads)" in info["title_brush"] and "mean of 2 heads" in matrix_title(), f"brush not shown: {info['title_brush']!r}, {matrix_title()!r}")
    check(0 < info["edges_brush"] <= info["edges"], f"{info['edges_brush']} edges for 2 heads")

    with step(log, "measure"):
        view.measure = "attn_first"
    info["grid_title"] = view.grid.figure.title.text
    check(info["grid_title"].startswith("attention to the first token"), f"grid title {info['grid_title']!r}")

    with step(log, "clear"):
        view.select_heads([])
    check(edges_in(flow().title.text) == info["edges"] and f"mean of {L * H} heads" in matrix_title(), f"clearing did not restore every head: {flow().title.text!r}")

    parts.clear()
    with step(log, "second input"):
        view.text = texts["second"]
    info["second_parts"] = dict(parts)
    second = view.records[0]
    info["title2"] = title2 = flow().title.text
    info["edges2"] = edges_in(title2)
    nodes = next(iter(view.flows.values())).sources["nodes"].data
    check(second is not record and second.n_tokens == len(lm.tokenizer(texts["second"])["input_ids"]) and second.n_tokens < record.n_tokens, f"second input has {second.n_tokens} tokens")
    check(flow().x_range.end == second.n_tokens and max(nodes["x"]) == second.n_tokens - 1, f"flow x range {flow().x_range.end}, last node at x {max(nodes['x'])}, for {second.n_tokens} tokens")
    check(f"from {second.tokens[-1]} (layer {L})" in title2 and info["edges2"] > 0, f"second input's flow title {title2!r}")
    check(view.grid.figure.title.text.startswith("attention to the first token"), "the grid lost its measure on a new input")
    info["tokens2"] = second.n_tokens


def export_worker(spec: dict[str, Any], log: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """``attnflows export --model`` at one size: extraction, ``export_dashboard``, and what the file says it carries."""
    with step(log, "import"):
        import numpy as np

        from attnflows_panel import export
        from attnflows_panel.extract import extract
        from attnflows_panel.models import load_encoder
    with step(log, "load model"):
        lm = load_encoder(spec["model"])
    caught: dict[str, Any] = {}
    entries, shipped_heads = export.attention_entries, export.shipped_heads

    def counting_entries(attention: Any, tau: float) -> tuple[np.ndarray, ...]:
        found = entries(attention, tau)
        caught["per_head"] = np.bincount(found[0] * attention.shape[1] + found[1], minlength=attention.shape[0] * attention.shape[1])
        return found

    def keeping_shipped(counts: np.ndarray, order: np.ndarray, budget: int) -> np.ndarray:
        caught["shipped"] = shipped_heads(counts, order, budget)
        return caught["shipped"]

    export.attention_entries, export.shipped_heads = counting_entries, keeping_shipped
    text = fit_text(lm.tokenizer, spec["n"], 0)
    target = Path(spec["out"] + ".html")
    with step(log, "extract"):
        record = extract(lm, None, text)
    with step(log, "export"):
        path = export.export_dashboard((record,), target)
    page = path.read_text(encoding="utf-8")
    total, shipped = int(caught["per_head"].sum()), caught["shipped"]
    carried = int(caught["per_head"][shipped.ravel()].sum())
    said = re.search(r"its ([\d,]+) attention entries of at least tau pass this file's cap of [\d,]+, so it carries those of (\d+) of (\d+) heads", page)
    info.update(tokens=record.n_tokens, layers=record.n_layers, heads=record.n_heads, file_bytes=path.stat().st_size, entries=total, entries_carried=carried,
                heads_carried=int(shipped.sum()), header_says_partial=said is not None, full_file_bytes=path.stat().st_size + (total - carried) * ENTRY_BYTES)
    check(f"{record.n_tokens} tokens" in page and "attnflows: attention flows" in page, "the file does not show the input")
    check(carried <= export.MAX_ENTRIES or shipped.sum() == 1, f"the file carries {carried:,} entries, over the cap {export.MAX_ENTRIES:,}")
    check((said is not None) == (not shipped.all()), f"header {'says' if said else 'does not say'} it carries part, and it carries {int(shipped.sum())} of {shipped.size} heads")
    if said:
        check(int(said.group(1).replace(",", "")) == total and int(said.group(2)) == int(shipped.sum()), f"header says {said.group(0)!r}")
    check(info["file_bytes"] < spec["max_file_bytes"], f"file of {fmt_b(info['file_bytes'])}")
    path.unlink()


def worker(spec: dict[str, Any]) -> None:
    """Run one worker spec under the memory cap; write its steps and info (or its error) as JSON."""
    log: list[dict[str, Any]] = []
    info: dict[str, Any] = {"library": fingerprint()}
    resource.setrlimit(resource.RLIMIT_AS, (int(spec["cap_bytes"]), resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        if spec["kind"] == "build":
            with step(log, "save_decoder"):
                info.update(save_decoder(Path(spec["model"]), spec["layers"], spec["max_tokens"], spec["init"]))
        else:
            (export_worker if spec["kind"] == "export" else app_worker)(spec, log, info)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        info["failed_step"] = log[-1]["name"] if log else "start"
    info["peak_process"] = max((s["peak"] for s in log), default=status_bytes("VmHWM"))
    Path(spec["out"] + ".json").write_text(json.dumps({"steps": log, "info": info}))


def run_worker(spec: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    """``spec`` in a fresh interpreter: its report, its steps by name and its wall time."""
    spec = {**spec, "out": str(tmp / name)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    report_path = Path(spec["out"] + ".json")
    if not report_path.exists():
        raise RuntimeError(f"worker {name} died (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(report_path.read_text())
    report.update(wall=time.perf_counter() - t0, by_name={s["name"]: s for s in report["steps"]}, name=name)
    if "error" in report["info"] and spec["kind"] == "build":
        raise RuntimeError(f"building the decoder failed: {report['info']['error']}")
    error = f"; ERROR {report['info']['error']} (step {report['info']['failed_step']!r})" if "error" in report["info"] else ""
    print(f"  {name}: {report['wall']:.1f} s, peak {report['info']['peak_process'] / GB:.2f} GB{error}", flush=True)
    return report


# --------------------------------------------------------------------------------------------------
# the run and its table
# --------------------------------------------------------------------------------------------------


def seconds(report: dict[str, Any] | None, name: str) -> float | None:
    s = None if report is None else report["by_name"].get(name)
    return None if s is None else s["seconds"]


def get(report: dict[str, Any] | None, key: str) -> Any:
    return None if report is None else report["info"].get(key)


def main() -> None:
    args = decoder_arguments(__doc__.splitlines()[0], "8 layers, 512 and 256 tokens (a minute or two)").parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    started = time.perf_counter()
    n_long, n_cmp, layers = decoder_sizes(args)
    print(f"long-input app benchmark: decoder {layers} layers x 32 heads (8 kv heads) at {n_long} and {n_cmp} tokens (second inputs {n_long // 2} and {n_cmp // 2})")
    print(f"library files measured: {fingerprint()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="attnflows-bench-long-app-"))
    reports: list[dict[str, Any]] = []
    try:
        model = tmp / "decoder"
        common = {"model": str(model), "cap_bytes": int(args.cap_gb * GB)}
        built = run_worker({**common, "kind": "build", "layers": layers, "max_tokens": 2 * max(n_long, n_cmp), "init": args.init}, tmp, "build decoder")  # room past the input
        print(f"  decoder: {built['info']['parameters'] / 1e6:.1f} M parameters", flush=True)
        app_long = run_worker({**common, "kind": "app", "dense": False, "n": n_long, "n2": n_long // 2}, tmp, f"app-{n_long}-source")
        app_cmp = run_worker({**common, "kind": "app", "dense": False, "n": n_cmp, "n2": n_cmp // 2}, tmp, f"app-{n_cmp}-source")
        dense_bytes = layers * 32 * n_cmp * n_cmp * 4
        with open("/proc/meminfo") as f:
            available = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
        if available < 2 * dense_bytes + 4 * GB:  # forward_attention holds about twice the record at its peak
            print(f"  skipping the dense app at {n_cmp} tokens: it needs about {(2 * dense_bytes + 2 * GB) / GB:.1f} GB, {available / GB:.1f} GB are available", flush=True)
            app_dense = None
        else:
            app_dense = run_worker({**common, "kind": "app", "dense": True, "n": n_cmp, "n2": n_cmp // 2}, tmp, f"app-{n_cmp}-dense")
        max_file = 60 * 2**20  # the cap's arrays (about 24 MB as base64), Bokeh's JavaScript and the figures
        exp_long = run_worker({**common, "kind": "export", "n": n_long, "max_file_bytes": max_file}, tmp, f"export-{n_long}")
        exp_cmp = run_worker({**common, "kind": "export", "n": n_cmp, "max_file_bytes": max_file}, tmp, f"export-{n_cmp}")
        reports = [r for r in (app_long, app_cmp, app_dense, exp_long, exp_cmp) if r is not None]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows: list[tuple[str, str, str, str]] = []
    steps = (("text to all views drawn (SingleView constructor)", "view"), ("brush 2 heads of the last layer", "brush"), ("grid measure switch", "measure"),
             ("clear the selection (every head again)", "clear"))
    for report, base in ((app_long, None), (app_cmp, app_dense)):
        tag = f"app {layers}x32, {get(report, 'tokens')} tok"
        for label, name in steps:
            rows.append((f"{tag}: {label}", fmt_s(seconds(report, name)), fmt_s(seconds(base, name)), ratio(seconds(base, name), seconds(report, name))))
        label = f"second input, {get(report, 'tokens2')} tok (view.text = ...)"
        rows.append((f"{tag}: {label}", fmt_s(seconds(report, "second input")), fmt_s(seconds(base, "second input")), ratio(seconds(base, "second input"), seconds(report, "second input"))))
        held = get(base, "held_bytes") if base is not None or report is not app_long else layers * 32 * (get(report, "tokens") or n_long) ** 2 * 4
        rows.append((f"{tag}: attention held by the record{' (baseline: dense, computed)' if base is None else ''}", fmt_b(get(report, "held_bytes")), fmt_b(held), ratio(held, get(report, "held_bytes"))))
        rows.append((f"{tag}: peak RSS of the process", fmt_b(get(report, "peak_process")), fmt_b(get(base, "peak_process")), ratio(get(base, "peak_process"), get(report, "peak_process"))))
    n = get(app_long, "tokens") or n_long
    dense_long = layers * 32 * n * n * 4
    rows.append((f"app {layers}x32, {n} tok: peak RSS vs the dense record L*H*n*n*4 (not made)", fmt_b(get(app_long, "peak_process")), fmt_b(dense_long), ratio(dense_long, get(app_long, "peak_process"))))
    tag = f"export {layers}x32, {get(exp_long, 'tokens')} tok (baseline {get(exp_cmp, 'tokens')} tok)"
    for label, name in (("extraction", "extract"), ("export_dashboard", "export")):
        rows.append((f"{tag}: {label}", fmt_s(seconds(exp_long, name)), fmt_s(seconds(exp_cmp, name)), ratio(seconds(exp_cmp, name), seconds(exp_long, name))))
    rows.append((f"{tag}: file size", fmt_b(get(exp_long, "file_bytes")), fmt_b(get(exp_cmp, "file_bytes")), ratio(get(exp_cmp, "file_bytes"), get(exp_long, "file_bytes"))))
    rows.append((f"{tag}: peak RSS of the process", fmt_b(get(exp_long, "peak_process")), fmt_b(get(exp_cmp, "peak_process")), ratio(get(exp_cmp, "peak_process"), get(exp_long, "peak_process"))))
    for report in (exp_long, exp_cmp):
        rows.append((f"export {get(report, 'tokens')} tok: file size vs a file with every entry >= tau (estimate)", fmt_b(get(report, "file_bytes")),
                     fmt_b(get(report, "full_file_bytes")), ratio(get(report, "full_file_bytes"), get(report, "file_bytes"))))

    print()
    for report in (app_long, app_cmp, app_dense):
        if report and "view_parts" in report["info"]:
            i = report["info"]
            for label, name, part in (("constructor", "view", "view_parts"), ("second input", "second input", "second_parts")):
                took = seconds(report, name)
                if took is not None and i.get(part):
                    drawing = took - sum(i[part].values())
                    print(f"{report['name']}: {label} {fmt_s(took)} = " + ", ".join(f"{k} {fmt_s(v)}" for k, v in i[part].items()) + f", drawing and the rest {fmt_s(drawing)}")
            print(f"  flow titles: {i.get('title')!r}; brushed {i.get('title_brush')!r}; second input {i.get('title2')!r}")
    for report in (exp_long, exp_cmp):
        i = report["info"] if report else {}
        if "entries" in i:
            print(f"{report['name']}: {i['entries']:,} entries >= tau, the file carries {i['entries_carried']:,} of them ({i['heads_carried']} of {i['layers'] * i['heads']} heads); "
                  f"header says it carries only some heads: {'yes' if i['header_says_partial'] else 'no'}")
    print()
    print_table(rows)
    print(f"(app baseline: the same steps at {n_cmp} tokens on dense records (extract.DENSE_RECORD_BYTES raised); export baseline: the same export at {n_cmp} tokens,")
    print(f" and the file with every entry >= tau estimated as its size + {ENTRY_BYTES} bytes per entry left out. Ratio: baseline / attnflows. One run each, after a {WARM_TOKENS}-token warm-up view.)")
    print()
    for report in reports:
        by_step = "; ".join(f"{s['name']} {fmt_s(s['seconds'])} {s['peak'] / GB:.2f} GB" for s in report["steps"])
        print(f"{report['name']}: wall {report['wall']:.1f} s (by step, with its peak: {by_step})")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total wall time {time.perf_counter() - started:.0f} s")
    for report in reports:
        if report["info"].get("library") != fingerprint():
            print(f"NOTE: {report['name']} measured other library files: {report['info'].get('library')}")
    failed = [r for r in reports if "error" in r["info"]]
    for report in failed:
        print(f"FAIL {report['name']}: {report['info']['error']} (step {report['info']['failed_step']!r})")
    if failed:
        sys.exit(1)
    print("every check passed")


if __name__ == "__main__":
    main()
