"""CompareView as a pane in a live JupyterLab page: Python updates after display, and brushes back to Python.

nbclient (tests/test_notebook.py) runs the example notebook without a frontend, so nothing there shows
that a displayed view follows ``view.select_heads(...)`` run in a later cell (``_on_mask`` writes
the panes' Bokeh sources and calls ``pn.io.push_notebook``, which sends the document diff over
the notebook comm), nor that a brush drawn on the displayed grid reaches the kernel over that comm.

A ``jupyter lab`` subprocess (temporary root, config, data and runtime dirs; a kernelspec that runs
this venv's python) serves one notebook per test; chromium opens it and runs it cell by cell with
Shift+Enter, as a user would, and the drawn state is read from the page's Bokeh documents. JupyterLab
runs with its default settings, so comm messages go to a kernel subshell (``commsOverSubshells``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from conftest import free_port
from panel.tests.util import wait_until

pytestmark = [pytest.mark.slow]

KERNEL = "attnflows-venv"
TEXT = "the car was very good"  # 7 tokens: the tiny random models keep edges at tau 0.1 (112 with all heads)

SETUP = """\
import sys

import numpy as np
import panel as pn

from attnflows_panel.analysis.flows import trace_cls_flow
from attnflows_panel.components import CompareView
from attnflows_panel.models import ModelPair, load_encoder

pn.extension()
pair = ModelPair(load_encoder({pretrained!r}), load_encoder({finetuned!r}))


def edges(view):
    \"\"\"The distinct edges of both models' traces (the flow title's count) and the segments the diagram draws.\"\"\"
    traces = [trace_cls_flow(r.attention, view.head_mask, tau=view.tau, top_k=view.top_k) for r in view.records]
    return len(np.union1d(*(t.edge_ids() for t in traces))), len(view.flows[("pretrained", "finetuned")].sources["edges"].data["x0"])


print("KERNEL", sys.executable)"""
SHOW = f"view = CompareView(pair, {TEXT!r})\nview"
FLOW_TITLE = "pre-trained vs fine-tuned: CLS trace from [CLS] (layer 2)"
REPORT = 'print("EDGES %d SEGMENTS %d" % edges(view), "SELECTED", view.selected_heads())'


def select(heads: list[tuple[int, int]]) -> str:
    return f"view.select_heads({heads!r})\n{REPORT}"


def counts(text: str) -> tuple[int, int, list[tuple[int, int]]]:
    """(title edges, drawn segments, selected heads) as the kernel printed them in a cell's output."""
    match = re.search(r"EDGES (\d+) SEGMENTS (\d+) SELECTED (\[.*\])", text)
    assert match is not None, text
    return int(match[1]), int(match[2]), [tuple(h) for h in json.loads(match[3].replace("(", "[").replace(")", "]"))]


# ---------------------------------------------------------------- the Jupyter server


class Lab:
    def __init__(self, url: str, token: str, root: Path, models: dict[str, str]) -> None:
        self.url, self.token, self.root, self.models = url, token, root, models

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def notebook(self, name: str, cells: list[str]) -> str:
        """Write a notebook of ``cells`` for the venv kernel into the root dir; return its JupyterLab URL."""
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
        nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "attnflows (venv)", "language": "python"}
        nbformat.write(nb, self.root / name)
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"  # ?reset: no tabs restored from earlier tests


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny_classifier_dir: Path) -> Iterator[Lab]:
    """``jupyter lab`` on a free local port with a token; shut down (kernels too) whatever the tests do."""
    base = tmp_path_factory.mktemp("jupyter")
    root, config, data, runtime = (base / name for name in ("root", "config", "data", "runtime"))
    spec = data / "kernels" / KERNEL
    for path in (root, config, spec, runtime):
        path.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "attnflows (venv)", "language": "python"}))
    settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no "Jupyter news?" toast over the outputs; everything else is JupyterLab's default
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(data),
        "JUPYTER_PATH": str(data),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "IPYTHONDIR": str(base / "ipython"),
        "ATTNFLOWS_HOME": str(base / "attnflows-home"),
        "HF_HUB_OFFLINE": "1",
        # no internet here: pn.extension() inlines BokehJS and Panel's JS instead of loading them from the CDN
        "PANEL_INLINE": "1",
        "TQDM_DISABLE": "1",
    }
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
        f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: to see the kernel's status and execution counts
        "--KernelSpecManager.ensure_native_kernel=False",
    ]  # fmt: skip
    log = base / "lab.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, {"pretrained": str(tiny_dir), "finetuned": str(tiny_classifier_dir)})
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {server.returncode}:\n{log.read_text()}")
            try:
                lab.api("GET", "/api/status")
                break
            except (OSError, urllib.error.HTTPError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"jupyter lab did not start within a minute:\n{log.read_text()}") from None
                time.sleep(0.5)
        assert lab.api("GET", "/api/kernelspecs")["kernelspecs"][KERNEL]["spec"]["argv"][0] == sys.executable
        yield lab
    finally:
        try:
            lab.api("POST", "/api/shutdown")  # stops the kernels, then the server
            server.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# ---------------------------------------------------------------- the page

CELLS = "window.jupyterapp.shell.currentWidget.content.widgets"
VISIBLE_CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell"

KERNEL_IDLE_JS = """() => {
  const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = widget && widget.sessionContext && widget.sessionContext.session && widget.sessionContext.session.kernel;
  return kernel != null && kernel.status === "idle" && widget.content.widgets.length > 0;
}"""

# every Bokeh plot whose title counts flow edges, with the lengths of its Segments sources
FLOW_JS = """() => {
  const out = [];
  for (const doc of (window.Bokeh ? Bokeh.documents : [])) {
    for (const model of doc.all_models) {
      const title = model.title != null && model.renderers != null ? model.title.text : null;
      if (title != null && /, \\d+ edges/.test(title)) {
        const segments = model.renderers.filter((r) => r.data_source != null && r.data_source.data.x0 != null);
        out.push({title, segments: segments.map((r) => r.data_source.data.x0.length)});
      }
    }
  }
  return out;
}"""

TITLES_JS = """() => (window.Bokeh ? Bokeh.documents : []).flatMap((doc) =>
  [...doc.all_models].filter((m) => m.title != null && m.renderers != null && m.title.text != null).map((m) => m.title.text))"""

# the first colours of every colour mapper's palette, by model id
PALETTES_JS = """() => Object.fromEntries((window.Bokeh ? Bokeh.documents : []).flatMap((doc) =>
  [...doc.all_models].filter((m) => Array.isArray(m.palette)).map((m) => [m.id, m.palette.slice(0, 3).join(" ")])))"""

# Panel's CommManager holds the browser's events back until Python acknowledges the last batch, which it
# does once their callbacks have run: unblocked with nothing buffered means the kernel is done with them.
# Only the view's document counts (the one drawing the flow): the BrowserInfo document pn.extension()
# displays sometimes never gets its first batch acknowledged, which costs nothing but its own timeout.
COMMS_JS = """() => (window.Bokeh ? Bokeh.documents : [])
  .filter((doc) => [...doc.all_models].some((m) => m.title != null && m.renderers != null && /, \\d+ edges/.test(m.title.text || "")))
  .flatMap((doc) => [...doc.all_models].filter((m) => m._event_buffer !== undefined && m._blocked !== undefined))
  .map((m) => ({blocked: m._blocked, buffered: m._event_buffer.length}))"""

OUTPUTS_JS = f"""() => [...document.querySelectorAll("{VISIBLE_CELLS}")].map((cell) =>
  [...cell.querySelectorAll(".jp-OutputArea-output")].map((o) => [o.dataset.mimeType || "", o.textContent]))"""


class Notebook:
    """A notebook open in JupyterLab, its cells run as a user would (click the cell, Shift+Enter)."""

    def __init__(self, page, url: str) -> None:
        self.page = page
        self.console: list = []
        self.errors: list[str] = []
        page.on("console", lambda message: self.console.append(message))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.set_viewport_size({"width": 1400, "height": 2400})
        page.goto(url)
        page.wait_for_function(KERNEL_IDLE_JS, timeout=60_000)

    def cell(self, index: int):
        return self.page.locator(VISIBLE_CELLS).nth(index)

    def start(self, index: int) -> int | None:
        """Run cell ``index`` without waiting; return its execution count before."""
        before = self.page.evaluate(f"(i) => {CELLS}[i].model.executionCount", index)
        self.cell(index).locator(".jp-InputPrompt").click()
        self.page.keyboard.press("Shift+Enter")
        return before

    def finish(self, index: int, before: int | None, expect: str | None = None, timeout: float = 120_000) -> str:
        """Wait for cell ``index`` to finish (and ``expect`` to be in its output); return its output text."""
        self.page.wait_for_function(
            f"([i, before]) => {{ const n = {CELLS}[i].model.executionCount; return n != null && n !== before; }}", arg=[index, before], timeout=timeout
        )
        output = self.cell(index).locator(".jp-OutputArea")
        if expect is not None:
            try:
                wait_until(lambda: expect in output.inner_text(), self.page, timeout=30_000)
            except TimeoutError:
                raise AssertionError(f"{expect!r} is not in the output of cell {index}; the cells' outputs are {self.outputs()}") from None
        text = output.inner_text()
        assert "Traceback" not in text, text
        return text

    def run(self, index: int, expect: str | None = None) -> str:
        return self.finish(index, self.start(index), expect)

    def outputs(self) -> list[list[list[str]]]:
        """Each cell's outputs as (mime type, text)."""
        return self.page.evaluate(OUTPUTS_JS)

    def titles(self) -> list[str]:
        return self.page.evaluate(TITLES_JS)

    def palettes(self) -> dict[str, str]:
        return self.page.evaluate(PALETTES_JS)

    def flow(self) -> dict:
        (flow,) = self.page.evaluate(FLOW_JS)
        return flow

    def wait_for_flow(self, title: str, segments: int, timeout: float = 30_000) -> None:
        def drawn() -> None:
            flow = self.flow()
            assert title in flow["title"] and flow["segments"] == [segments], flow

        wait_until(drawn, self.page, timeout=timeout)

    def wait_for_comms(self) -> None:
        """Wait for Python to acknowledge every batch of browser events its views sent (their callbacks have run)."""

        def idle() -> None:
            managers = self.page.evaluate(COMMS_JS)
            assert managers and not any(m["blocked"] or m["buffered"] for m in managers), managers

        wait_until(idle, self.page, timeout=30_000)

    def bokeh_problems(self) -> list[str]:
        """Uncaught page errors, console errors, and BokehJS's warnings that a glyph reads a column its source lacks."""
        console = [m.text for m in self.console if m.type == "error" or (m.type == "warning" and "nonexistent field" in m.text)]
        return self.errors + console

    def brush(self, plot_point, corner: tuple[float, float], opposite: tuple[float, float]) -> None:
        """Drag a box (the grid's active tool) between two (head, layer) points of the grid, scrolled into view."""
        self.cell(1).locator(".bk-events").first.scroll_into_view_if_needed()  # the grid is the view's first plot
        title = "model difference"
        self.page.mouse.move(*plot_point(self.page, title, *corner))
        self.page.mouse.down()
        self.page.mouse.move(*plot_point(self.page, title, *opposite), steps=8)
        self.page.mouse.up()


@pytest.fixture
def open_notebook(page, lab: Lab, request: pytest.FixtureRequest) -> Iterator:
    """``open_notebook(cells)``: the test's own notebook (a fresh kernel), with the view displayed and drawn.

    Cell 0 loads the tiny pair, cell 1 displays the CompareView, cell 2 prints what Python computes for
    it; the test's own cells follow, from index 3.
    """
    name = f"{request.node.name}.ipynb"

    def start(cells: list[str]) -> Notebook:
        notebook = Notebook(page, lab.notebook(name, [SETUP.format(**lab.models), SHOW, REPORT, *cells]))
        assert f"KERNEL {sys.executable}" in notebook.run(0, expect="KERNEL")
        notebook.run(1)
        edges, segments, heads = counts(notebook.run(2, expect="EDGES"))
        assert edges > 0 and heads == [(layer, head) for layer in range(2) for head in range(4)]
        # the output is a live Bokeh document: five plots, the flow titled with the count Python prints
        notebook.wait_for_flow(f"{FLOW_TITLE}, {edges} edges", segments)
        wait_until(lambda: page.locator(".jp-OutputArea-output .bk-events").count() == 5, page, timeout=30_000)
        notebook.wait_for_comms()
        return notebook

    yield start
    for session in lab.api("GET", "/api/sessions"):  # free the two cores for the next test's kernel
        if session["path"] == name:
            lab.api("DELETE", f"/api/sessions/{session['id']}")


# ---------------------------------------------------------------- the tests


def test_select_heads_in_a_later_cell_redraws_the_displayed_view(open_notebook, artifacts: Path) -> None:
    notebook = open_notebook([select([(1, 0)])])
    before = notebook.flow()
    edges, segments, heads = counts(notebook.run(3, expect="EDGES"))
    assert heads == [(1, 0)] and 0 < edges < int(re.search(r", (\d+) edges", before["title"])[1])
    notebook.wait_for_flow(f"{FLOW_TITLE}, {edges} edges", segments)
    # the matrices follow too
    wait_until(lambda: {"pre-trained: layer 2, head 1", "fine-tuned: layer 2, head 1"} <= set(notebook.titles()), notebook.page, timeout=10_000)
    notebook.page.wait_for_timeout(1000)
    notebook.page.screenshot(path=str(artifacts / "notebook.png"))


def test_select_heads_in_a_later_cell_keeps_what_the_panes_draw(open_notebook, artifacts: Path) -> None:
    """A pushed head mask keeps the columns the glyphs draw from (the sentence's label alignment and font
    style, the edge widths) and the matrices' colour map: no BokehJS warnings or errors, words still drawn."""
    notebook = open_notebook([select([(1, 2), (1, 3)])])
    palettes = notebook.palettes()
    assert notebook.bokeh_problems() == []
    edges, segments, _ = counts(notebook.run(3, expect="EDGES"))
    notebook.wait_for_flow(f", {edges} edges", segments)
    notebook.page.wait_for_timeout(2000)  # let BokehJS repaint every pane
    notebook.page.screenshot(path=str(artifacts / "notebook-styles.png"))
    assert notebook.bokeh_problems() == []
    assert notebook.palettes() == palettes


def test_grid_brush_in_the_browser_reaches_python(open_notebook, plot_point, artifacts: Path) -> None:
    notebook = open_notebook([REPORT])
    before = notebook.flow()
    # a box over heads 2-3 of layer 2 (the grid counts layers and heads from 1)
    notebook.brush(plot_point, (1.6, 2.4), (3.4, 1.6))
    wait_until(lambda: notebook.flow()["title"] != before["title"], notebook.page, timeout=15_000)  # Python traced the brushed heads and pushed them
    notebook.wait_for_comms()
    edges, segments, heads = counts(notebook.run(3, expect="EDGES"))
    assert heads == [(1, 1), (1, 2)]
    notebook.wait_for_flow(f"{FLOW_TITLE}, {edges} edges", segments)
    notebook.page.screenshot(path=str(artifacts / "notebook-brush.png"))
