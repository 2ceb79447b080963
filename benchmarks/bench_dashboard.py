"""Benchmark a head brush in CompareView on the default pair: the server-side update against a rebuild.

    .venv/bin/python benchmarks/bench_dashboard.py [--quick] [--profile]

The view is rendered into a Bokeh Document the way ``panel serve`` renders a session (no browser, no
socket; a document without a server session applies Panel's updates synchronously, as a session does
inside a brush callback). Each pane is a ``LiveFigure`` whose bound sources a brush rewrites in place.
Each brush calls ``select_heads`` and is timed until the bound sources of the flow diagram, the
matrices, the sentence view and the grid's outline (each checked to be the one in the document) hold
the new state, the flow diagram's title counts the edges Python traces, and the PATCH-DOC messages a
Bokeh server would send are encoded. The baseline, measured in the same run for the same head masks,
is what an app without incremental updates pays: a new CompareView rendered into a fresh document and
encoded as a PULL-DOC-REPLY. Extracted records are cached across views, so neither side runs the models.

A new input (64, 128 and 512 tokens, texts not seen before, so both models run) is timed the same way:
typed into the live view (which draws a new figure in every pane, in the same document) against a
new view rendered for it.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import transformers

try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bokeh.document import Document
from bokeh.document.events import DocumentPatchedEvent
from bokeh.models import ColumnDataSource, Model, Title
from bokeh.protocol import Protocol
from bokeh.protocol.message import Message
from panel.io.state import set_curdoc

from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, trace_cls_flow
from attnflows_panel.components import CompareView
from attnflows_panel.components.live_figure import LiveFigure
from attnflows_panel.models import ModelPair, default_pair

BUDGET_MS = 100.0  # "no visible lag"
PASSAGE = (
    "The car that picked me up this morning had nobody in the driver's seat, and for the first few "
    "minutes I held the door handle and watched every junction. It waited for a cyclist, let a bus "
    "pull out, and slowed down near the school long before I would have. By the time we reached the "
    "bridge I was reading my messages, and when it parked neatly outside the office I almost forgot "
    "to thank it. My brother still says he would never trust a machine with his children, but he "
    "asked me three times how much the ride cost and whether it works in the rain at night. On the way "
    "home the same service sent a different car, older and noisier, which hesitated at a roundabout and "
    "braked hard when a dog ran across the road. Nobody was hurt, the dog included, yet I sat up straight "
    "again for the rest of the trip and kept one eye on the mirrors. I still think these cars will be "
    "ordinary in ten years, but I understand my brother a little better than I did this morning."
)
# "pre-trained vs fine-tuned: CLS trace from [CLS] (layer 6), 97 edges; 435 weaker hidden (top 3 per token)":
# the distinct (layer, query, key) edges of both traces, then what top-k hides (if any)
FLOW_TITLE = re.compile(r"pre-trained vs fine-tuned: .*, (\d+) edges(?: \(\d+ of \d+ heads\))?(?:; .*)?")
MERGED = (PRETRAINED, FINETUNED)  # the key of the merged flow diagram in ``view.flows``
PROTOCOL = Protocol()


def sentence_of(pair: ModelPair, n_tokens: int) -> str:
    """The longest prefix of ``PASSAGE`` (skipping words that overshoot) with exactly ``n_tokens`` tokens."""
    tokenizer, words = pair.pretrained.tokenizer, []
    for word in PASSAGE.split():
        if len(tokenizer(" ".join([*words, word]))["input_ids"]) <= n_tokens:
            words.append(word)
    text = " ".join(words)
    if len(tokenizer(text)["input_ids"]) != n_tokens:
        raise ValueError(f"the passage cannot make a {n_tokens}-token input")
    return text


def brushes(n_layers: int, n_heads: int, rounds: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Rounds of: the last layer, a 2 x 2 block, one head, every head. Each touches the last layer, where the
    [CLS] trace starts, so its flows are never empty, and each differs from the brush before it."""
    last, out = n_layers - 1, []
    for r in range(rounds):
        head = (5 * r + 1) % (n_heads - 1)
        out += [
            ("last layer", [(last, h) for h in range(n_heads)]),
            ("2 x 2 block", [(last - 1, head), (last - 1, head + 1), (last, head), (last, head + 1)]),
            ("one head", [(last, (head + 2) % n_heads)]),
            ("all heads", []),
        ]
    return out


def render(view: CompareView) -> tuple[Document, Model]:
    doc = Document()
    root = view.__panel__().get_root(doc, comm=None)
    doc.add_root(root)
    return doc, root


def digest(source: ColumnDataSource) -> str:
    out = hashlib.sha1()
    for key in sorted(source.data):
        out.update(key.encode() + np.ascontiguousarray(np.asarray(source.data[key], dtype=object).astype(str)).tobytes())
    return out.hexdigest()


def dependent_panes(view: CompareView) -> dict[str, list[tuple[LiveFigure, str]]]:
    """The bound sources a brush rewrites, by pane: (live figure, source name)."""
    return {
        "flow diagram": [(view.flows[MERGED], "edges")],
        "matrices": [(live, "image") for live in view.matrices.values()],
        "sentence view": [(view.sentence, "boxes")],
        "grid outline": [(view.grid, "outline")],
    }


def fingerprint(view: CompareView, doc: Document) -> dict[str, set[str]]:
    """A digest of the data behind each dependent pane, read from the live figures' bound sources, each of
    which must be the source in ``doc`` (so the figure is the one on the page)."""
    panes: dict[str, set[str]] = {}
    for pane, bound in dependent_panes(view).items():
        panes[pane] = set()
        for live, name in bound:
            source = live.sources.get(name)
            if source is not None and doc.get_model_by_id(source.id) is source:
                panes[pane].add(digest(source))
    return panes


def flow_edges_shown(root: Model) -> int:
    """The edge count in the one flow diagram title in the document under ``root``."""
    (edges,) = [int(m.group(1)) for t in root.select({"type": Title}) if (m := FLOW_TITLE.fullmatch(t.text or ""))]
    return edges


def expected_edges(view: CompareView, mask: np.ndarray | None = None) -> int:
    """The edges the flow diagram's title counts for ``mask`` (default: the view's head mask): the distinct
    (layer, query, key) edges of both models' CLS traces (with the view's tau and top-k), shared edges once."""
    mask = view.head_mask if mask is None else mask
    traces = [trace_cls_flow(r.attention, mask, tau=view.tau, top_k=view.top_k or None) for r in view.records]
    return int(np.unique(np.concatenate([t.edge_ids() for t in traces])).size)


def encoded_bytes(message: Message) -> int:
    """Encode a message as the server does before writing it: JSON content plus binary buffers."""
    return len(message.content_json) + sum(len(buffer.to_bytes()) for buffer in message.buffers)


def brush(view: CompareView, doc: Document, heads: list[tuple[int, int]]) -> tuple[float, float, int]:
    """Seconds for the callback and for encoding its patches, and the patch bytes; checks every pane followed."""
    events: list[DocumentPatchedEvent] = []
    doc.on_change(events.append)
    before = fingerprint(view, doc)
    t0 = time.perf_counter()
    with set_curdoc(doc):
        doc.hold("combine")  # a server session holds a callback's events and sends them together
        view.select_heads(heads)
        doc.unhold()
    t1 = time.perf_counter()
    size = sum(encoded_bytes(PROTOCOL.create("PATCH-DOC", [e])) for e in events if isinstance(e, DocumentPatchedEvent))
    t2 = time.perf_counter()
    doc.remove_on_change(events.append)
    after = fingerprint(view, doc)
    stale = [pane for pane in after if not after[pane] or after[pane] == before[pane]]
    if stale or flow_edges_shown(doc.roots[0]) != expected_edges(view):
        raise RuntimeError(f"brush {heads} did not update: {stale or 'flow diagram title'}")
    return t1 - t0, t2 - t1, size


def rebuild(pair: ModelPair, text: str, heads: list[tuple[int, int]]) -> tuple[float, float, int]:
    """Seconds to build and render a new view for ``heads`` and to encode the whole document, and its bytes."""
    t0 = time.perf_counter()
    view = CompareView(pair, text)
    view.select_heads(heads)
    doc, root = render(view)
    t1 = time.perf_counter()
    size = encoded_bytes(PROTOCOL.create("PULL-DOC-REPLY", "0", doc))
    t2 = time.perf_counter()
    if flow_edges_shown(root) != expected_edges(view):
        raise RuntimeError("the rebuilt view shows the wrong flows")
    return t1 - t0, t2 - t1, size


def summary(samples: list[tuple[float, float, int]]) -> tuple[float, float, float, float, float]:
    """Median and p90 of the total in ms, median callback and encoding ms, median KB."""
    total = sorted(1e3 * (a + b) for a, b, _ in samples)
    p90 = total[int(0.9 * (len(total) - 1))]
    return (statistics.median(total), p90, statistics.median(1e3 * a for a, _, _ in samples), statistics.median(1e3 * b for _, b, _ in samples), statistics.median(s / 1e3 for _, _, s in samples))


def bench_brush(pair: ModelPair, n_tokens: int, rounds: int, n_rebuilds: int) -> None:
    text = sentence_of(pair, n_tokens)
    view = CompareView(pair, text)
    if view.records[0].n_tokens != n_tokens:
        raise RuntimeError(f"expected {n_tokens} tokens, the view has {view.records[0].n_tokens}")
    t0 = time.perf_counter()
    doc, _ = render(view)
    t_first = time.perf_counter() - t0
    warm_up = [(pair.n_layers - 1, 0)]  # the first update of every plot type is not counted
    brush(view, doc, warm_up)
    rebuild(pair, text, warm_up)
    states = brushes(pair.n_layers, pair.n_heads, rounds)
    kinds: dict[str, list[float]] = {}
    updates = []
    for kind, heads in states:
        updates.append(brush(view, doc, heads))
        kinds.setdefault(kind, []).append(1e3 * sum(updates[-1][:2]))
    rebuilds = [rebuild(pair, text, heads) for _, heads in states[:n_rebuilds]]
    u_med, u_p90, u_cb, u_enc, u_kb = summary(updates)
    r_med, r_p90, r_build, r_enc, r_kb = summary(rebuilds)
    print(f"== head brush, n={n_tokens} tokens ({pair.n_layers} x {pair.n_heads} heads), first render {t_first:.2f} s; {load()} ==")
    print(
        f"incremental update over {len(updates)} brushes: median {u_med:.0f} ms (callback {u_cb:.0f} + patch encoding {u_enc:.0f}; "
        f"{u_kb:.0f} KB), p90 {u_p90:.0f} ms | {u_med / BUDGET_MS:.1f}x the {BUDGET_MS:.0f} ms budget"
    )
    print(
        f"rebuild from scratch over {len(rebuilds)} of the same masks: median {r_med:.0f} ms (view + render {r_build:.0f} "
        f"+ document encoding {r_enc:.0f}; {r_kb:.0f} KB), p90 {r_p90:.0f} ms | ratio rebuild / update {r_med / u_med:.2f}x"
    )
    print("update median by brush: " + ", ".join(f"{kind} {statistics.median(ms):.0f} ms" for kind, ms in kinds.items()) + " | every pane followed every brush: True")


# (label, file path ending, functions): a brush's _on_mask computes each pane's frames and LiveFigure.write
# puts them into the bound sources; indented rows run inside the row above them (so they overlap).
VIEW = "attnflows_panel/components/attention_view.py"
PROFILE_ROWS = [
    ("flow diagram: traces, frames and title", VIEW, ("_flow_frames",)),
    ("  inside: the traces (trace_cls_flow, top-k)", VIEW, ("_traces",)),
    ("  inside: the title's hidden count (traces without top-k)", VIEW, ("_hidden_by_top_k",)),
    ("  inside: flow_frames (pure builder)", "attnflows_panel/plots/flow_diagram.py", ("flow_frames",)),
    ("sentence view: values (the traces are the flow diagram's)", VIEW, ("_sentence_parts",)),
    ("sentence view: sentence_frames (pure builder)", "attnflows_panel/plots/sentence_view.py", ("sentence_frames",)),
    ("matrices: elements (head means, attention_matrix)", VIEW, ("_matrix_element",)),
    ("matrices: matrix_frames", "attnflows_panel/plots/attention_matrix.py", ("matrix_frames",)),
    ("grid outline frames", "attnflows_panel/plots/head_grid.py", ("grid_outline_frames",)),
    ("sources written (LiveFigure.write: source.data, title, clim)", "attnflows_panel/components/live_figure.py", ("write",)),
]


def profile_brush(pair: ModelPair, n_tokens: int) -> None:
    """Where a brush's time goes: cumulative time of the main stages under cProfile (which inflates all of them)."""
    view = CompareView(pair, sentence_of(pair, n_tokens))
    doc, _ = render(view)
    brush(view, doc, [(pair.n_layers - 1, 0)])
    states = brushes(pair.n_layers, pair.n_heads, 1)
    profiler = cProfile.Profile()
    profiler.enable()
    for _, heads in states:
        with set_curdoc(doc):
            view.select_heads(heads)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(ct for (file, _, func), (_, _, _, ct, _) in stats.items() if func == "select_heads" and "attnflows_panel" in file)
    print(f"== where a brush's time goes (n={n_tokens}, cProfile over {len(states)} brushes: {1e3 * total / len(states):.0f} ms per brush) ==")
    for label, path, names in PROFILE_ROWS:
        ct = sum(v[3] for (file, _, func), v in stats.items() if func in names and file.replace("\\", "/").endswith(path))
        print(f"  {label:<58} {1e3 * ct / len(states):6.0f} ms per brush ({ct / total:4.0%})")


OPENERS = ["Honestly,", "Yesterday", "Frankly,", "Oddly,", "Luckily,", "Sadly,", "Today", "Again,", "Later,", "Still,"]


def new_inputs(pair: ModelPair, n_tokens: int, count: int) -> list[str]:
    """``count`` different texts of ``n_tokens`` tokens (at the model's limit: longer texts, truncated to it)."""
    if n_tokens >= pair.pretrained.max_tokens:
        return [f"{opener} {PASSAGE} {PASSAGE} {PASSAGE}" for opener in OPENERS[:count]]
    base = sentence_of(pair, n_tokens - 2).split()
    return [" ".join([opener, *base]) for opener in OPENERS[:count]]


def figures(view: CompareView) -> dict[str, list[object]]:
    return {pane: [live.figure for live, _ in bound] for pane, bound in dependent_panes(view).items()}


def type_text(view: CompareView, doc: Document, text: str) -> float:
    """Seconds from a new text to every pane redrawn and its patches encoded (the models run: nothing is cached)."""
    before = figures(view)
    events: list[DocumentPatchedEvent] = []
    doc.on_change(events.append)
    t0 = time.perf_counter()
    with set_curdoc(doc):
        doc.hold("combine")
        view.text = text
        doc.unhold()
    for event in events:
        if isinstance(event, DocumentPatchedEvent):
            encoded_bytes(PROTOCOL.create("PATCH-DOC", [event]))
    elapsed = time.perf_counter() - t0
    doc.remove_on_change(events.append)
    after, shown = figures(view), fingerprint(view, doc)
    # every figure is drawn anew for a new input but the grid's, whose cells and ranges are written into it in place
    stale = [pane for pane in after if not shown[pane] or (pane != "grid outline" and any(new is old for new in after[pane] for old in before[pane]))]
    if stale or flow_edges_shown(doc.roots[0]) != expected_edges(view):
        raise RuntimeError(f"the view did not follow the new text: {stale or 'flow diagram title'}")
    return elapsed


def bench_new_input(pair: ModelPair, n_tokens: int, repeats: int) -> None:
    """A new sentence typed into a live view against a new view rendered for it, each on texts not seen before."""
    texts = new_inputs(pair, n_tokens, 2 * repeats + 1)
    view = CompareView(pair, texts[0])
    doc, _ = render(view)
    if view.records[0].n_tokens != n_tokens:
        raise RuntimeError(f"expected {n_tokens} tokens, the view has {view.records[0].n_tokens}")
    updates = [type_text(view, doc, text) for text in texts[1 : repeats + 1]]
    rebuilds = [sum(rebuild(pair, text, [])[:2]) for text in texts[repeats + 1 :]]  # like the live view: encoding included
    u, r = 1e3 * statistics.median(updates), 1e3 * statistics.median(rebuilds)
    print(f"== a new input of {n_tokens} tokens (both models run, every pane redrawn; {load()}) ==")
    print(f"typed into the live view: median {u:.0f} ms over {len(updates)} texts | new view for it: median {r:.0f} ms | ratio new view / typed {r / u:.2f}x")


def bench_record_kinds(pair: ModelPair, n_tokens: int, rounds: int) -> None:
    """At the longest input: brushes and new inputs on records of captured queries and keys (the default past
    extract.DENSE_RECORD_BYTES) against the same on dense records, and the bytes each holds per input."""
    import attnflows_panel.extract as extract_module
    from attnflows_panel.components import records as records_module

    budget, results = extract_module.DENSE_RECORD_BYTES, {}
    texts = new_inputs(pair, n_tokens, 3)
    try:
        for kind, dense_bytes in (("dense", 2**62), ("queries and keys", budget)):
            extract_module.DENSE_RECORD_BYTES = dense_bytes
            records_module._CACHE.clear()  # a record of the other kind must not be reused
            view = CompareView(pair, texts[0])
            doc, _ = render(view)
            brush(view, doc, [(pair.n_layers - 1, 0)])  # warm-up, not counted
            updates = [1e3 * sum(brush(view, doc, heads)[:2]) for _, heads in brushes(pair.n_layers, pair.n_heads, rounds)]
            typed = [1e3 * type_text(view, doc, text) for text in texts[1:]]
            results[kind] = (statistics.median(updates), statistics.median(typed), sum(r.source.nbytes for r in view.records))
    finally:
        extract_module.DENSE_RECORD_BYTES = budget
        records_module._CACHE.clear()
    print(f"== records at {n_tokens} tokens: queries and keys against dense ({load()}); name, queries and keys, dense, ratio ==")
    (b_qk, t_qk, m_qk), (b_d, t_d, m_d) = results["queries and keys"], results["dense"]
    print(f"head brush median      {b_qk:8.0f} ms  {b_d:8.0f} ms  {b_qk / b_d:.2f}x")
    print(f"new input median       {t_qk:8.0f} ms  {t_d:8.0f} ms  {t_qk / t_d:.2f}x")
    print(f"attention held (pair)  {m_qk / 2**20:8.1f} MB  {m_d / 2**20:8.1f} MB  {m_qk / m_d:.2f}x")


def load() -> str:
    """The machine's load, to read the timings by (other processes may share the cores)."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of brushes at 64 tokens only")
    parser.add_argument("--profile", action="store_true", help="also break a brush down by stage with cProfile")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    t_load, pair = timed(lambda: default_pair(progress=False))
    print(f"default pair loaded in {t_load:.1f} s")
    bench_brush(pair, 64, rounds=1 if args.quick else 3, n_rebuilds=4 if args.quick else 6)
    if not args.quick:
        bench_brush(pair, 128, rounds=2, n_rebuilds=4)
    for n_tokens in (64,) if args.quick else (64, 128, pair.pretrained.max_tokens):
        bench_new_input(pair, n_tokens, repeats=2 if args.quick else 3)
    bench_record_kinds(pair, pair.pretrained.max_tokens, rounds=1 if args.quick else 2)
    if args.profile:
        profile_brush(pair, 64)


if __name__ == "__main__":
    main()
