"""Load test of ``attnflows serve``: many sessions typing and brushing at once, and memory over 200 browser sessions.

    .venv/bin/python benchmarks/bench_sessions.py [--sessions 25] [--browsers 3] [--minutes 3] [--ramp 90] [--think 12] [--open-close 200] [--quick]

Starts ``attnflows serve`` on a free loopback port (the user's prepared cache), drives Debian's headless
chromium with Playwright (async: one browser, a context per session), speaks Bokeh's protocol for the sessions
without a browser (``protocol_client.py``) and reads the server's resident memory from ``/proc``. Phases, in one run:

1. warm-up: one browser session per app types and brushes once (models load, records fill the cache);
2. baseline: one session alone (a browser, then a protocol client) does a few updates of each kind: the p50s
   are the baselines of the ratios;
3. memory: ``--open-close`` browser sessions (both apps in turn, four at a time) each open, brush once and close,
   then plain HTTP GETs that never connect a browser; resident memory before and after;
4. load: ``--sessions`` sessions at once (one in five on /single), ``--browsers`` of them in chromium and the rest
   Bokeh-protocol clients (two cores cannot draw 25 pages without a GPU and serve them too: with 25 browsers the
   browsers took two thirds of the CPU), arriving over ``--ramp`` seconds; they type inputs (the bundled examples,
   each made new to the models by a numbered suffix, so every input runs them) and brush the head grid for
   ``--minutes``, reading each picture for ``--think`` seconds on average; the server's CPU use is printed.

A browser's update is timed in the page, from the key press or pointerup until the flow diagram's edges (or its
title) have changed, no spinner is left and two frames have passed (a box drag's press and moves reach chromium in
one burst: BokehJS reads a press not followed by a move within 300 ms as a press-and-hold, which selects nothing);
a protocol client's, from the change it sends (the sentence box's value, the grid's selected cells: what BokehJS
sends for a typed input or a box drag) until the server's patches have changed the flow diagram's edges and no
spinner is left. Errors are counted: console errors and page errors, server error replies, updates or pages that
never arrive (120 s), drags that selected nothing, and error lines in the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bokeh.models import Plot
from playwright.async_api import Browser, Page, async_playwright

try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnflows_panel.examples import load_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_client import ProtocolSession  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1200}
GRID = {"compare": "model difference", "single": "entropy"}  # the start of each app's head grid title
TIMEOUT_MS = 120_000
HOST = "127.0.0.1"
CLEANUP_S = 40  # Bokeh discards a closed session within 15 s unused + a 17 s check interval
SERVER_ERROR = re.compile(r"\b(ERROR|Traceback|Exception)\b")
# Tornado's words when a browser left while the server was still writing to it: the client's doing, counted apart.
CLIENT_GONE = re.compile(r"WebSocketClosedError|StreamClosedError|Failed sending message as connection was closed")
# Bokeh's `assert self._session is not None` (bokeh/server/connection.py) when a websocket closes, or its queued
# messages are handled, after the browser left and before the session was attached (bokeh/bokeh#14720): counted apart
SESSION_NOT_ATTACHED = re.compile(r"assert self\._session is not None")
# lines that continue a log entry: its traceback, the request it was handling, the exception that ends it
CONTINUED = ("Traceback", "During handling", "The above exception", "future:", "tornado.", "HTTPServerRequest(")
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception)(:|$)")

# Installed in every page. `arm()` notes the flow diagram (its view, title and edge source) before an action;
# `settled()` resolves with the milliseconds since once the diagram has changed, no spinner is left and two frames passed.
# `arm(grid)` before a drag on the grid titled `grid...` also notes its selected cells and watches the pointer: BokehJS
# (UIGestures: press_threshold 300 ms, move_threshold 5 px) reads a press whose pointer has not moved 5 px within
# 300 ms as a press-and-hold, not a drag, and the box select then selects nothing, so no update can come: if the
# drag left the grid's selection as it was, `settled()` says so at once (with the press-to-move time it measured).
PAGE_JS = """
window.loadtest = (() => {
  function* walk(view, seen) {
    if (view == null || seen.has(view)) return;
    seen.add(view);
    yield view;
    if (typeof view.children === "function") for (const child of view.children()) yield* walk(child, seen);
  }
  function* plots() {
    if (window.Bokeh == null) return;
    const seen = new Set();
    for (const root of Object.values(Bokeh.index))
      for (const view of walk(root, seen))
        if (view.frame != null && view.model.title != null && view.model.title.text != null) yield view;
  }
  const edges = (view) => view.model.renderers.find((r) => r.data_source != null && r.data_source.name === "edges");
  const flow = () => { for (const view of plots()) if (edges(view) != null) return view; return null; };
  function grid(prefix) { for (const view of plots()) if (String(view.model.title.text).startsWith(prefix)) return view; return null; }
  function point(prefix, x, y) {
    const view = grid(prefix), canvas = view.canvas_view.el.getBoundingClientRect();
    return [canvas.x + view.frame.x_scale.compute(x), canvas.y + view.frame.y_scale.compute(y)];
  }
  const idle = () => window.Bokeh != null && Bokeh.documents.length > 0 &&
    Bokeh.documents.every((d) => d.is_idle && [...d.all_models].every((m) => !(m.css_classes || []).includes("pn-loading")));
  const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
  const PRESS_MS = 300, MOVE_PX = 5;  // BokehJS's UIGestures.press_threshold and move_threshold
  let armed = null;
  window.addEventListener("pointerdown", (event) => { if (armed != null && armed.down == null) armed.down = {at: performance.now(), x: event.clientX, y: event.clientY}; }, true);
  window.addEventListener("pointermove", (event) => {
    const down = armed == null ? null : armed.down;
    if (down != null && armed.moved == null && (event.clientX - down.x) ** 2 + (event.clientY - down.y) ** 2 > MOVE_PX ** 2) armed.moved = performance.now() - down.at;
  }, true);
  window.addEventListener("pointerup", () => { if (armed != null && armed.down != null) armed.up = true; }, true);
  const cells = (view) => view.model.renderers.find((r) => r.data_source != null && r.data_source.data.head != null).data_source;
  function arm(prefix) {
    const view = flow(), source = edges(view).data_source, state = {view, title: view.model.title.text, data: source.data, changed: false, start: performance.now(), down: null, moved: null};
    if (prefix != null) { state.cells = cells(grid(prefix)); state.selected = String(state.cells.selected.indices); }
    const mark = () => { state.changed = true; };
    for (const signal of [source.properties.data.change, source.streaming, source.patching]) signal.connect(mark);
    state.stop = () => { for (const signal of [source.properties.data.change, source.streaming, source.patching]) signal.disconnect(mark); };
    armed = state;
  }
  function changed(state) {
    const view = flow();
    return state.changed || view !== state.view || view.model.title.text !== state.title || edges(view).data_source.data !== state.data;
  }
  async function settled(timeout) {
    const state = armed;
    try {
      while (state.cells != null && !state.up && performance.now() - state.start < timeout) await new Promise((resolve) => setTimeout(resolve, 20));
      if (state.cells != null && String(state.cells.selected.indices) === state.selected) {
        const moved = state.down == null ? "no press seen" : state.moved == null ? `no move past ${MOVE_PX} px` : `moved ${MOVE_PX} px ${Math.round(state.moved)} ms after the press`;
        throw new Error(`the drag selected nothing (${moved}; BokehJS takes a press without a move within ${PRESS_MS} ms for a press-and-hold)`);
      }
      while (!(changed(state) && idle())) {
        if (performance.now() - state.start > timeout) throw new Error("no update within " + timeout + " ms");
        await new Promise((resolve) => setTimeout(resolve, 50));  // each check walks the page's views: 25 pages polling faster load the browsers
      }
      await frame(); await frame();
      return performance.now() - state.start;
    } finally { state.stop(); }
  }
  const ready = () => flow() != null && idle();
  return {point, arm, settled, ready, start: () => { armed.start = performance.now(); }};
})();
"""


@dataclass
class Results:
    """Update times (ms) by kind and phase, page-open times and errors."""

    times: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)

    def add(self, phase: str, kind: str, ms: float) -> None:
        self.times[phase, kind].append(ms)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port: int, log: Path) -> subprocess.Popen:
    """``attnflows serve`` on ``port`` (this venv's interpreter, so /proc shows the server itself), once it answers."""
    command = [sys.executable, "-c", "from attnflows_panel.cli import main; main()", "serve", "--port", str(port)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"attnflows serve exited with {server.returncode}: see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/compare", timeout=30).read()
            return server
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"attnflows serve did not answer within 120 s: see {log}")


class Session:
    """One browser context on one app: opens it, types inputs and brushes the grid, timing each update."""

    def __init__(self, browser: Browser, url: str, app: str, results: Results, rng: random.Random) -> None:
        self.browser, self.url, self.app, self.results, self.rng = browser, url, app, results, rng
        self.cells = 0

    async def __aenter__(self) -> Session:
        self.context = await self.browser.new_context(viewport=VIEWPORT)
        await self.context.add_init_script(PAGE_JS)
        self.page: Page = await self.context.new_page()
        self.cdp = await self.context.new_cdp_session(self.page)  # a drag's mouse events, sent without a round trip between them
        self.page.on("console", lambda m: m.type == "error" and self.results.errors.append(f"{self.app}: console error: {m.text[:200]}"))
        self.page.on("pageerror", lambda e: self.results.errors.append(f"{self.app}: page error: {str(e)[:200]}"))
        self.page.on("requestfailed", lambda r: self.results.errors.append(f"{self.app}: request failed: {r.url[:120]} ({r.failure})"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.context.close()

    async def open(self, phase: str) -> bool:
        start = time.monotonic()
        try:
            await self.page.goto(f"{self.url}/{self.app}", timeout=TIMEOUT_MS)
            await self.page.wait_for_function("() => window.loadtest.ready()", timeout=TIMEOUT_MS, polling=200)
        except Exception as error:  # a page that never draws is the error this test looks for
            self.results.errors.append(f"{self.app}: page did not draw: {str(error).splitlines()[0][:200]}")
            return False
        self.results.add(phase, "open page", (time.monotonic() - start) * 1000)
        return True

    async def _timed(self, phase: str, kind: str, action, grid: str | None = None) -> bool:
        await self.page.evaluate("(grid) => window.loadtest.arm(grid)", grid)
        try:
            await action()
            ms = await self.page.evaluate(f"window.loadtest.settled({TIMEOUT_MS})")
        except Exception as error:
            self.results.errors.append(f"{self.app}: {kind}: {str(error).splitlines()[0][:200]}")
            return False
        self.results.add(phase, kind, ms)
        return True

    async def type_text(self, phase: str, text: str) -> None:
        box = self.page.locator("textarea").first

        async def submit() -> None:
            await box.fill(text)
            await self.page.evaluate("window.loadtest.start()")  # timed from the key press, not the typing
            await box.press("Control+Enter")

        await self._timed(phase, "new input", submit)

    async def _mouse(self, kind: str, x: float, y: float, pressed: bool = False) -> None:
        """One mouse event through chromium's input pipeline (trusted, as Playwright's ``page.mouse`` sends them)."""
        button = kind != "mouseMoved" or pressed
        event = {"type": kind, "x": x, "y": y, "button": "left" if button else "none", "buttons": 1 if kind == "mousePressed" or pressed else 0}
        await self.cdp.send("Input.dispatchMouseEvent", event | ({"clickCount": 1} if kind != "mouseMoved" else {}))

    async def brush(self, phase: str) -> None:
        """Drag a box over a random block of cells, never the same number of cells as the last brush shown (so the title changes)."""
        while True:
            heads, layers = sorted(self.rng.sample(range(1, 13), 2)), sorted(self.rng.sample(range(1, 7), 2))
            cells = (heads[1] - heads[0] + 1) * (layers[1] - layers[0] + 1)
            if cells != self.cells:
                break
        prefix = GRID[self.app]
        start = await self.page.evaluate("([p, x, y]) => window.loadtest.point(p, x, y)", [prefix, heads[0] - 0.4, layers[1] + 0.4])
        end = await self.page.evaluate("([p, x, y]) => window.loadtest.point(p, x, y)", [prefix, heads[1] + 0.4, layers[0] - 0.4])
        path = [(start[0] + (end[0] - start[0]) * k / 6, start[1] + (end[1] - start[1]) * k / 6) for k in range(1, 7)]

        async def drag() -> None:
            # BokehJS takes a press whose pointer has not moved 5 px within 300 ms for a press-and-hold, and the box
            # select then selects nothing. page.mouse.down() and page.mouse.move() are a round trip apart (Python, the
            # Playwright driver, chromium): 0.74 s on two loaded cores, so one browser brush in a few dozen never
            # reached the server. The press and the moves are sent at once (in order), as a hand moves on pressing.
            await self._mouse("mouseMoved", *start)
            await asyncio.gather(self._mouse("mousePressed", *start), *(self._mouse("mouseMoved", x, y, pressed=True) for x, y in path))
            await self.page.evaluate("window.loadtest.start()")  # timed from the pointerup
            await self._mouse("mouseReleased", *end)

        if await self._timed(phase, "head brush", drag, prefix):
            self.cells = cells  # a brush that selected nothing left the last one on the page


class ProtocolUser:
    """A user without a browser: a Bokeh-protocol session that types inputs and selects grid cells, timing each update
    from the change sent until the server's patches have changed the flow diagram's edges and no spinner is left."""

    def __init__(self, host: str, port: int, app: str, results: Results, rng: random.Random) -> None:
        self.session = ProtocolSession(host, port, app, results.errors)
        self.app, self.results, self.rng, self.cells = app, results, rng, 0

    def _edges(self):
        return self.session.source_named("edges")

    def _drawn(self) -> bool:
        return self._edges() is not None and not self.session.loading()

    async def open(self, phase: str) -> bool:
        start = time.monotonic()
        try:
            await self.session.open(TIMEOUT_MS / 1000, lambda _doc: self._drawn())
        except Exception as error:  # a session that never draws is the error this test looks for
            self.results.errors.append(f"{self.app} (protocol): page did not draw: {str(error).splitlines()[0][:200]}")
            return False
        self.results.add(phase, "open page", (time.monotonic() - start) * 1000)
        return True

    def _title(self) -> str | None:
        """The flow diagram's title: a brush that leaves the edges as they were (none before, none after) still changes it."""
        edges = self._edges()
        plot = next((p for p in self.session.document.select({"type": Plot}) if any(getattr(r, "data_source", None) is edges for r in p.renderers)), None)
        return None if plot is None or plot.title is None else plot.title.text

    async def _timed(self, phase: str, kind: str, change) -> None:
        before, title = self._edges(), self._title()
        self.session.patched.clear()
        start = time.monotonic()
        change()
        try:
            await self.session.wait_for(lambda: self._drawn() and (self._edges() is not before or id(before) in self.session.patched or self._title() != title), TIMEOUT_MS / 1000)
        except TimeoutError as error:
            self.results.errors.append(f"{self.app} (protocol): {kind}: {error}")
            return
        self.results.add(phase, kind, (time.monotonic() - start) * 1000)

    async def type_text(self, phase: str, text: str) -> None:
        box = self.session.text_box()
        await self._timed(phase, "new input", lambda: setattr(box, "value", text))

    async def brush(self, phase: str) -> None:
        """Select a random block of cells, never the same number as the last time (as a box drag on the grid would)."""
        source = self.session.cells(GRID[self.app])
        while True:
            heads, layers = sorted(self.rng.sample(range(1, 13), 2)), sorted(self.rng.sample(range(1, 7), 2))
            index = [i for i, (h, l) in enumerate(zip(source.data["head"], source.data["layer"], strict=True)) if heads[0] <= h <= heads[1] and layers[0] <= l <= layers[1]]
            if index and len(index) != self.cells:
                break
        self.cells = len(index)
        await self._timed(phase, "head brush", lambda: setattr(source.selected, "indices", index))

    async def close(self) -> None:
        await self.session.close()


async def protocol_session(host: str, port: int, app: str, phase: str, results: Results, texts: list[str], until: float, seed: int, delay: float, think: tuple[float, float]) -> None:
    """As :func:`busy_session`, for a :class:`ProtocolUser`."""
    await asyncio.sleep(delay)
    rng = random.Random(seed)
    user = ProtocolUser(host, port, app, results, rng)
    if not await user.open(phase):
        return
    step = 0
    while time.monotonic() < until:
        if step % 2 == 0:
            await user.type_text(phase, f"{texts[(seed + step // 2) % len(texts)]} ({seed}.{step})")
        else:
            await user.brush(phase)
        step += 1
        await asyncio.sleep(rng.uniform(*think))
    await user.close()


async def busy_session(browser: Browser, url: str, app: str, phase: str, results: Results, texts: list[str], until: float, seed: int, steps: int = 0, delay: float = 0.0, think: tuple[float, float] = (0.5, 2.0)) -> None:
    """After ``delay`` s, open ``app`` and alternate a new input and a brush until ``until`` (monotonic seconds), at least ``steps`` actions,
    pausing ``think`` (min, max) seconds after each."""
    await asyncio.sleep(delay)
    rng = random.Random(seed)
    async with Session(browser, url, app, results, rng) as session:
        if not await session.open(phase):
            return
        step = 0
        while step < steps or time.monotonic() < until:
            if step % 2 == 0:
                await session.type_text(phase, f"{texts[(seed + step // 2) % len(texts)]} ({seed}.{step})")  # new to the models
            else:
                await session.brush(phase)
            step += 1
            await asyncio.sleep(rng.uniform(*think))  # a user reads the picture before the next action


async def open_and_close(browser: Browser, url: str, apps: list[str], results: Results, count: int, parallel: int, pid: int) -> None:
    """``count`` sessions, ``parallel`` at a time, each opening an app (in turn), brushing once and closing."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            async with Session(browser, url, apps[i % len(apps)], results, random.Random(i)) as session:
                if await session.open("memory"):
                    await session.brush("memory")
            if (i + 1) % 25 == 0:
                print(f"  {i + 1} of {count} sessions opened and closed (server RSS {rss_mb(pid):.0f} MB)", flush=True)

    await asyncio.gather(*(worker() for _ in range(parallel)))


def log_entries(lines: list[str]) -> tuple[list[str], int, int]:
    """The server log's entries (a line with its traceback): the lines of those not about a browser that had left, the
    count of writes to one that had, and the count of Bokeh's assertion for a session not yet attached (bokeh/bokeh#14720)."""
    entries: list[list[str]] = []
    for line in lines:
        if entries and (not line or line[:1].isspace() or line.startswith(CONTINUED) or EXCEPTION_LINE.match(line)):
            entries[-1].append(line)
        else:
            entries.append([line])
    unattached = [entry for entry in entries if any(SESSION_NOT_ATTACHED.search(line) for line in entry)]
    kept = [entry for entry in entries if entry not in unattached and not any(CLIENT_GONE.search(line) for line in entry)]
    return [line for entry in kept for line in entry], len(entries) - len(kept) - len(unattached), len(unattached)


def quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def settle(server: subprocess.Popen, label: str, memory: dict[str, float]) -> None:
    """Wait until closed sessions are discarded, then note the server's resident memory."""
    await asyncio.sleep(CLEANUP_S)
    memory[label] = rss_mb(server.pid)
    print(f"  server RSS {label}: {memory[label]:.0f} MB", flush=True)


async def run(args: argparse.Namespace, server: subprocess.Popen, port: int) -> tuple[Results, dict[str, float]]:
    url = f"http://{HOST}:{port}"
    texts = [example.text for example in load_examples()]
    results, memory = Results(), {"idle": rss_mb(server.pid)}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        print("warm-up: one session per app", flush=True)
        for app in GRID:
            await busy_session(browser, url, app, "warm-up", results, texts, 0, 0, steps=2)
        print("baseline: one session alone (a browser, then a protocol client)", flush=True)
        await busy_session(browser, url, "compare", "alone", results, texts, time.monotonic() + args.alone, 1)
        await protocol_session(HOST, port, "compare", "alone (protocol)", results, texts, time.monotonic() + args.alone / 2, 2, 0.0, (0.5, 2.0))
        await settle(server, "before the sessions", memory)

        print(f"memory: {args.open_close} sessions opened and closed, {args.gets} plain GETs", flush=True)
        await open_and_close(browser, url, list(GRID), results, args.open_close, parallel=4, pid=server.pid)
        for i in range(args.gets):
            urllib.request.urlopen(f"{url}/{list(GRID)[i % 2]}", timeout=60).read()
        await settle(server, f"after {args.open_close} sessions and {args.gets} GETs", memory)

        browsers = min(args.browsers, args.sessions)
        print(f"load: {args.sessions} sessions at once for {args.minutes:g} min ({browsers} in browsers, {args.sessions - browsers} protocol clients)", flush=True)
        until = time.monotonic() + args.minutes * 60
        apps = ["single" if i % 5 == 4 else "compare" for i in range(args.sessions)]
        memory["peak under load"] = 0.0
        cpu_start, wall_start = cpu_s(server.pid), time.monotonic()

        async def sample() -> None:
            while time.monotonic() < until:
                memory["peak under load"] = max(memory["peak under load"], rss_mb(server.pid))
                await asyncio.sleep(2)

        ramp = args.ramp / max(1, args.sessions)  # users arrive one after another, not in the same second
        think = (args.think / 2, args.think * 1.5)
        in_browser = set(range(args.sessions)[:: max(1, args.sessions // max(1, browsers))][:browsers])  # spread over the ramp
        users = [
            busy_session(browser, url, app, "load", results, texts, until, 10 + i, delay=i * ramp, think=think) if i in in_browser
            else protocol_session(HOST, port, app, "load (protocol)", results, texts, until, 10 + i, i * ramp, think)
            for i, app in enumerate(apps)
        ]
        await asyncio.gather(sample(), *users)
        cpu, wall = cpu_s(server.pid) - cpu_start, time.monotonic() - wall_start
        print(f"  server CPU under load: {cpu:.0f} s in {wall:.0f} s ({cpu / wall:.2f} cores of {os.cpu_count()}; the browsers had the rest)", flush=True)
        await settle(server, "after the load", memory)
        await browser.close()
    return results, memory


def report(results: Results, memory: dict[str, float], log: Path, args: argparse.Namespace) -> int:
    lines, gone, unattached = log_entries(log.read_text(errors="replace").splitlines())
    server_errors = [line for line in lines if SERVER_ERROR.search(line)]
    errors = results.errors + [f"server: {line[:200]}" for line in server_errors]
    print("\n== update times (ms, in the page): phase, kind, n, p50, p95 ==")
    for (phase, kind), values in sorted(results.times.items()):
        p50, p95 = quantiles(values)
        print(f"  {phase:17s} {kind:11s} {len(values):5d} {p50:9.0f} {p95:9.0f}")
    print(f"\n== {args.sessions} sessions at once against one alone (name, under load, alone, ratio; p50) ==")
    for suffix in ("", " (protocol)"):
        for kind in ("new input", "head brush"):
            load, alone = results.times.get(("load" + suffix, kind)), results.times.get(("alone" + suffix, kind))
            if load and alone:
                ratio = statistics.median(load) / statistics.median(alone)
                print(f"  {kind + suffix:22s} {statistics.median(load):9.0f} ms {statistics.median(alone):9.0f} ms {ratio:6.2f}x")
    before = memory["before the sessions"]
    print("\n== server resident memory (MB; name, MB, baseline, ratio, difference) ==")
    for label, mb in memory.items():
        print(f"  {label:40s} {mb:7.0f} {before:7.0f} {mb / before:6.3f}x {mb - before:+7.0f}")
    print(f"\n(server log: {gone} writes to a browser that had left, and {unattached} of Bokeh's assertions for a browser that left before its"
          " session was attached (bokeh/bokeh#14720), not counted as errors)")
    print(f"\n== errors: {len(errors)} ==")
    for error in errors[:40]:
        print("  " + error)
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=25, help="sessions at once in the load phase")
    parser.add_argument("--browsers", type=int, default=3, help="how many of them are browsers (the rest are Bokeh-protocol clients)")
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the load phase")
    parser.add_argument("--open-close", type=int, default=200, help="sessions opened and closed in the memory phase")
    parser.add_argument("--gets", type=int, default=30, help="plain HTTP GETs (no browser) in the memory phase")
    parser.add_argument("--alone", type=float, default=40.0, help="seconds of the single-session baseline")
    parser.add_argument("--ramp", type=float, default=90.0, help="seconds over which the load phase's sessions arrive")
    parser.add_argument("--think", type=float, default=12.0, help="mean seconds a loaded session's user reads the picture between actions")
    parser.add_argument("--quick", action="store_true", help="4 sessions for 30 s, 12 opened and closed")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.browsers, args.minutes, args.open_close, args.gets, args.alone, args.ramp = 4, 1, 0.5, 12, 6, 15.0, 4.0
    if shutil.which("chromium") is None:
        raise SystemExit("Debian's chromium is needed: make browser")
    subprocess.run([sys.executable, "-c", "from attnflows_panel.cli import main; main()", "prepare"], check=True)  # cached after the first time
    port, log = free_port(), Path(os.environ.get("TMPDIR", "/tmp")) / f"attnflows-bench-sessions-{os.getpid()}.log"
    server = start_server(port, log)
    try:
        results, memory = asyncio.run(run(args, server, port))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(30)
    print(f"(server log: {log})")
    return report(results, memory, log, args)


if __name__ == "__main__":
    sys.exit(main())
