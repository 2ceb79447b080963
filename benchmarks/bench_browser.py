"""Benchmark a head brush in CompareView as a user sees it: in headless chromium, against reloading the page.

    .venv/bin/python benchmarks/bench_browser.py [--quick]

The view is served by Panel and driven by Playwright with real mouse drags in the head grid (box
select). Each pane is a Bokeh figure whose bound sources the session rewrites in place. Each brush is
timed in the page, from the pointerup that ends the drag until BokehJS has applied the flow diagram's
new edge source and a title with the edge count computed in Python (the distinct edges of both models'
traces), has painted the diagram and two animation frames have passed; the session's head mask is
checked too. The time until the patch is applied, and the session's ``select_heads`` within it, are
split out. The baseline, in the same run for the same head masks, is what an app without incremental
updates makes the user wait for: loading the page afresh (the mask in the URL), from navigation start
until the flow diagram is painted. Extracted records are cached across sessions, so neither side runs the models.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import transformers

try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import panel as pn
from bokeh.util import logconfig
from panel.tests.util import serve_and_wait
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

from attnflows_panel.components import CompareView
from attnflows_panel.models import ModelPair, default_pair
from bench_dashboard import BUDGET_MS, FLOW_TITLE, brushes, expected_edges, sentence_of
from bench_dashboard import load as machine_load

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1500, "height": 1700}  # the grid, the sentence view, the flow diagram and the matrices all on screen
GRID, FLOW = "model difference (JS, bits)", "pre-trained vs fine-tuned"
Heads = list[tuple[int, int]]
MODEL_ID = re.compile(r"\b(p\d+|0x[0-9a-f]+)\b")  # Bokeh model ids and WebGL context addresses, so repeats collapse

# Installed in every page before its own scripts. A brush is seen through BokehJS's change signals of the flow
# diagram's title and its bound "edges" source, as the patch is applied; a fresh page by polling for the diagram
# (every 4 ms, the browser's clamp for chained timeouts). Either is painted when two animation frames have
# passed since and BokehJS has painted the diagram in between (its paints are throttled to 60 Hz).
PAGE_JS = """
window.bench = (() => {
  function* walk(view, seen) {
    if (view == null || seen.has(view)) return;
    seen.add(view);
    yield view;
    if (typeof view.children === "function") for (const child of view.children()) yield* walk(child, seen);
  }
  function plot(title) {
    if (window.Bokeh == null) return null;
    const seen = new Set();
    for (const root of Object.values(Bokeh.index))
      for (const view of walk(root, seen))
        if (view.frame != null && view.model.title != null && String(view.model.title.text).startsWith(title)) return view;
    return null;
  }
  function point(title, x, y) {
    const view = plot(title), canvas = view.canvas_view.el.getBoundingClientRect();
    return [canvas.x + view.frame.x_scale.compute(x), canvas.y + view.frame.y_scale.compute(y)];
  }
  function ranges(title) {
    const {x_range, y_range} = plot(title).model;
    return [x_range.start, x_range.end, y_range.start, y_range.end];
  }
  const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
  const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
  // two frames after `shown` (ms), and after the diagram's next paint: {title, shown, painted}
  async function painted(view, shown) {
    let paint = null;
    const original = view.paint;
    view.paint = function (...args) { const out = original.apply(this, args); paint = performance.now(); return out; };
    try {
      await frame();
      await frame();
      while (paint == null) await frame();
    } finally {
      view.paint = original;
    }
    return {title: view.model.title.text, shown, painted: performance.now()};
  }
  // "...: CLS trace from [CLS] (layer 6), 97 edges; 435 weaker hidden (top 3 per token)", the part after ";" optional
  const counts = (text, count) => new RegExp(`, ${count} edges( [(][0-9]+ of [0-9]+ heads[)])?(;.*)?$`).test(String(text));
  let pending = null;
  // wait for a brush to show `count` edges: from the pointerup ending the drag until painted
  function arm(count) {
    const view = plot(FLOW), title = view.model.title, suffix = `${count} edges`;
    const edges = view.model.renderers.find((r) => r.data_source != null && r.data_source.name === "edges").data_source;
    let released = null, replaced = false;
    window.addEventListener("pointerup", () => { released = performance.now(); }, {capture: true, once: true});
    pending = new Promise((resolve, reject) => {
      const stop = () => {
        clearTimeout(timer);
        title.properties.text.change.disconnect(check);
        edges.properties.data.change.disconnect(replace);
      };
      const check = () => {
        if (!replaced || !counts(title.text, count)) return;
        stop();
        painted(view, performance.now()).then((r) => resolve({...r, released, clock: Date.now() - performance.now()}), reject);
      };
      const replace = () => { replaced = true; check(); };
      const timer = setTimeout(() => { stop(); reject(new Error(`the flow diagram did not show ${suffix}`)); }, 15000);
      title.properties.text.change.connect(check);
      edges.properties.data.change.connect(replace);
    });
  }
  // wait for a fresh page to show `count` edges: from navigation start until painted
  async function loaded(count) {
    const suffix = `${count} edges`, start = performance.now();
    for (;;) {
      const view = plot(FLOW);
      if (view != null && counts(view.model.title.text, count)) return painted(view, performance.now());
      if (performance.now() - start > 60000) throw new Error(`the flow diagram did not show ${suffix}`);
      await tick();
    }
  }
  return {point, ranges, arm, brushed: () => pending, loaded};
})();
""".replace("FLOW", json.dumps(FLOW))


class TimedCompareView(CompareView):
    """A CompareView that keeps the wall-clock (start, end) of each ``select_heads``: the session's share of a brush."""

    def __init__(self, pair: ModelPair, text: str) -> None:
        super().__init__(pair, text)
        self.spans: list[tuple[float, float]] = []

    def select_heads(self, heads: Heads) -> None:
        start = time.time()
        super().select_heads(heads)
        self.spans.append((start, time.time()))


class Collected(logging.Handler):
    """Browser console errors and warnings, page errors and the server's Python warnings, by benchmark phase."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.phase = "loading"
        self.items: list[tuple[str, str, str]] = []

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.items.append((self.phase, "page error", str(error))))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.items.append((self.phase, f"console {message.type}", message.text))

    def emit(self, record: logging.LogRecord) -> None:
        self.items.append((self.phase, f"python {record.levelname.lower()} ({record.name})", record.getMessage()))

    def report(self) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for phase, kind, text in self.items:
            key = (phase, kind, MODEL_ID.sub("…", text.splitlines()[0][:150] if text else ""))
            counts[key] = counts.get(key, 0) + 1
        print(f"== browser console errors/warnings, page errors and server warnings: {len(self.items)} ==")
        for (phase, kind, text), n in counts.items():
            print(f"  {n:3d} x [{phase}] {kind}: {text}")


def edges_in(title: str) -> int | None:
    """The edge count in a flow diagram title, if it is one."""
    match = FLOW_TITLE.fullmatch(title)
    return None if match is None else int(match.group(1))


def mask_of(n_layers: int, n_heads: int, heads: Heads) -> np.ndarray:
    """The head mask ``select_heads(heads)`` sets: the heads given, or every head when none is."""
    mask = np.zeros((n_layers, n_heads), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask if mask.any() else ~mask


def drag_box(page: Page, heads: Heads) -> None:
    """Box-select ``heads`` (a block of cells; none: an empty corner of the grid) with a real mouse drag.

    The grid's x is the head and its y the layer, both counted from 1 (``heads`` are 0-based: head h sits at
    x = h + 1, layer l at y = l + 1); a box selects every cell it overlaps.
    """
    if heads:
        layers, cols = [layer for layer, _ in heads], [head for _, head in heads]
        block = {(layer, head) for layer in range(min(layers), max(layers) + 1) for head in range(min(cols), max(cols) + 1)}
        if block != set(heads):
            raise ValueError(f"{heads} is not a block of cells a box can select")
        corners = (min(cols) + 0.6, max(layers) + 1.4), (max(cols) + 1.4, min(layers) + 0.6)
    else:
        x0, _, y0, _ = page.evaluate("(title) => bench.ranges(title)", GRID)  # the cells start at 0.5 and 0.5
        if x0 >= 0.5 or y0 >= 0.5:
            raise RuntimeError(f"the grid's ranges start at ({x0}, {y0}): no empty corner to drag in")
        corners = (x0 + 0.2 * (0.5 - x0), y0 + 0.8 * (0.5 - y0)), (x0 + 0.8 * (0.5 - x0), y0 + 0.2 * (0.5 - y0))
    start, end = (page.evaluate("([t, x, y]) => bench.point(t, x, y)", [GRID, x, y]) for x, y in corners)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=5)
    page.mouse.up()


class Brush(NamedTuple):
    """One brush in ms, from the pointerup ending the drag."""

    total: float  # until painted
    applied: float  # until the page has applied the flow diagram's new title and edges
    before: float  # until select_heads starts (page and server clocks): the grid's selected indices sent, their on_change called
    server: float  # in select_heads: new data written into the bound sources and the patch sent (it may arrive before the end)


def brush(page: Page, view: TimedCompareView, heads: Heads) -> Brush:
    """Drag over ``heads`` and time it; checks the page shows the edge count Python computes and the session has the mask."""
    mask = mask_of(view.n_layers, view.n_heads, heads)
    edges, n_spans = expected_edges(view, mask), len(view.spans)
    page.evaluate("(count) => bench.arm(count)", edges)
    drag_box(page, heads)
    shown = page.evaluate("() => bench.brushed()")
    page.wait_for_timeout(300)  # let the session and the page settle before the next brush
    spans = view.spans[n_spans:]
    if shown["released"] is None or edges_in(shown["title"]) != edges:
        raise RuntimeError(f"brush {heads}: the page showed {shown['title']!r}, expected {edges} edges")
    if not np.array_equal(view.head_mask, mask) or len(spans) != 1:
        raise RuntimeError(f"brush {heads}: the session's mask is {view.selected_heads()} after {len(spans)} select_heads calls")
    start, end = spans[0]
    released = (shown["clock"] + shown["released"]) / 1e3  # the pointerup on the wall clock, as time.time()
    return Brush(shown["painted"] - shown["released"], shown["shown"] - shown["released"], 1e3 * (start - released), 1e3 * (end - start))


def load(page: Page, url: str, sessions: dict[str, TimedCompareView], key: str, n_tokens: int, heads: Heads) -> tuple[TimedCompareView, float]:
    """Load the page afresh with ``heads`` selected: the session's view and ms from navigation start until painted."""
    query = "&".join([f"key={key}", f"tokens={n_tokens}", *(f"heads={layer}.{head}" for layer, head in heads)])
    page.goto(f"{url}?{query}", wait_until="commit")
    deadline = time.time() + 60  # the session builds its view while serving the page, so it is there by now
    while key not in sessions and time.time() < deadline:
        page.wait_for_timeout(5)
    if key not in sessions:
        raise RuntimeError(f"no session was made for {query}")
    view = sessions.pop(key)
    mask = mask_of(view.n_layers, view.n_heads, heads)
    edges = expected_edges(view, mask)
    shown = page.evaluate("(count) => bench.loaded(count)", edges)
    if edges_in(shown["title"]) != edges or not np.array_equal(view.head_mask, mask):
        raise RuntimeError(f"loading with {heads}: the page showed {shown['title']!r}, expected {edges} edges")
    return view, shown["painted"]


def serve(pair: ModelPair, texts: dict[int, str], sessions: dict[str, TimedCompareView]) -> str:
    """Serve a TimedCompareView per session (``?key=..&tokens=..&heads=layer.head..``); returns the URL."""

    def app() -> TimedCompareView:
        args = {name: [v.decode() for v in values] for name, values in pn.state.session_args.items()}
        view = TimedCompareView(pair, texts[int(args["tokens"][0])])
        view.select_heads([tuple(int(i) for i in h.split(".")) for h in args.get("heads", [])])
        view.spans.clear()
        sessions[args["key"][0]] = view
        return view

    return f"http://localhost:{serve_and_wait(app)}/"


def median_p90(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), sorted(ms)[int(0.9 * (len(ms) - 1))]


def bench(page: Page, url: str, sessions: dict[str, TimedCompareView], collected: Collected, pair: ModelPair, n_tokens: int, rounds: int, n_loads: int) -> None:
    states = brushes(pair.n_layers, pair.n_heads, rounds)
    warm_up = [(pair.n_layers - 1, 0)]  # the first load and the first brush of each size are not counted
    collected.phase = f"loading, n={n_tokens}"
    load(page, url, sessions, f"warm-up-{n_tokens}", n_tokens, warm_up)
    loads = [load(page, url, sessions, f"load-{n_tokens}-{i}", n_tokens, heads)[1] for i, (_, heads) in enumerate(states[:n_loads])]
    view, first = load(page, url, sessions, f"brush-{n_tokens}", n_tokens, [])
    if view.records[0].n_tokens != n_tokens:
        raise RuntimeError(f"expected {n_tokens} tokens, the view has {view.records[0].n_tokens}")
    collected.phase = f"brushing, n={n_tokens}"
    page.wait_for_timeout(500)
    brush(page, view, warm_up)
    samples = [(kind, brush(page, view, heads)) for kind, heads in states]
    b_med, b_p90 = median_p90([b.total for _, b in samples])
    l_med, l_p90 = median_p90(loads)
    part = {name: statistics.median(getattr(b, name) for _, b in samples) for name in Brush._fields}
    print(f"== head brush in the browser, n={n_tokens} tokens ({pair.n_layers} x {pair.n_heads} heads); {machine_load()} ==")
    print(
        f"brush, pointerup to painted, over {len(samples)} brushes: median {b_med:.0f} ms, p90 {b_p90:.0f} ms | "
        f"{b_med / BUDGET_MS:.2f}x the {BUDGET_MS:.0f} ms budget (p90 {b_p90 / BUDGET_MS:.2f}x)"
    )
    print(
        f"  medians: {part['applied']:.0f} ms until the page has applied the new flows (of which {part['before']:.0f} ms until select_heads starts "
        f"and {part['server']:.0f} ms in select_heads), then {statistics.median(b.total - b.applied for _, b in samples):.0f} ms until painted"
    )
    kinds = dict.fromkeys(kind for kind, _ in samples)
    print("  median by brush: " + ", ".join(f"{kind} {statistics.median(b.total for k, b in samples if k == kind):.0f} ms" for kind in kinds))
    print(
        f"page loaded afresh, navigation start to painted, over {len(loads)} of the same masks: median {l_med:.0f} ms, "
        f"p90 {l_p90:.0f} ms (the brushed page's own load: {first:.0f} ms) | ratio load / brush {l_med / b_med:.1f}x"
    )


@contextmanager
def browser_page(collected: Collected) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.add_init_script(PAGE_JS)
            collected.watch(page)
            yield page
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of brushes at 64 tokens only")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("Debian's chromium is not installed (make browser)")
    transformers.utils.logging.disable_progress_bar()
    pair = default_pair(progress=False)
    sizes = [64] if args.quick else [64, 128]
    texts = {n: sentence_of(pair, n) for n in sizes}
    collected = Collected()
    sessions: dict[str, TimedCompareView] = {}
    logconfig.basicConfig(handlers=[collected])  # Bokeh's warnings go to the root logger, and so to the report
    logging.getLogger("panel").addHandler(collected)
    print(machine_load())
    try:
        url = serve(pair, texts, sessions)
        with browser_page(collected) as page:
            bench(page, url, sessions, collected, pair, 64, rounds=1 if args.quick else 3, n_loads=4 if args.quick else 6)
            if not args.quick:
                bench(page, url, sessions, collected, pair, 128, rounds=2, n_loads=4)
    finally:
        pn.state.reset()  # stops the server and its threads
    collected.report()


if __name__ == "__main__":
    main()
