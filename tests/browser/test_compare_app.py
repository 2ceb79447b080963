"""The comparison dashboard in a real browser: serves cleanly, brushing and tapping drive the Python state."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import panel as pn
import pytest
from panel.tests.util import serve_component, wait_until

from attnflows_panel.app import create_app
from attnflows_panel.components import CompareView

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXT = "The self-driving car stopped safely, and I finally felt relaxed."


def flow_edges(view: CompareView) -> int:
    return len(view._flows[("pretrained", "finetuned")][()].get(0).dframe())


def console_errors(msgs: list) -> list[str]:
    return [m.text for m in msgs if m.type == "error"]


def serve_view(page, pair) -> CompareView:
    """Serve a CompareView of ``TEXT`` and return the session's view once its plots are drawn."""
    views: list[CompareView] = []

    def app() -> pn.viewable.Viewable:
        views.append(CompareView(pair, TEXT))
        return views[-1]

    serve_component(page, app)
    page.wait_for_selector(".bk-events", timeout=30_000)
    time.sleep(2)
    return views[0]


def test_compare_app_renders_without_errors(page, real_pair, artifacts: Path) -> None:
    msgs, _ = serve_component(page, lambda: create_app(real_pair, TEXT))
    page.wait_for_selector("text=pre-trained vs fine-tuned", timeout=30_000)
    time.sleep(3)
    page.set_viewport_size({"width": 1500, "height": 1700})
    page.screenshot(path=str(artifacts / "compare-app.png"), full_page=True)
    content = page.content()
    assert "Traceback (most recent call last)" not in content
    assert console_errors(msgs) == []


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def test_grid_brush_sets_head_mask_and_filters_flows(page, real_pair, plot_point) -> None:
    view = serve_view(page, real_pair)
    before = flow_edges(view)
    assert view.head_mask.all()
    # a box over heads 8-9 of the two deepest layers (the grid's y axis counts layers from 1)
    drag(page, plot_point(page, "model difference", 7.6, 6.4), plot_point(page, "model difference", 9.4, 4.6))
    wait_until(lambda: 0 < view.head_mask.sum() < view.head_mask.size, page, timeout=10_000)
    assert set(view.selected_heads()) == {(4, 8), (4, 9), (5, 8), (5, 9)}
    assert flow_edges(view) < before


def test_tap_on_the_flow_diagram_reroots_the_trace(page, real_pair) -> None:
    view = serve_view(page, real_pair)
    flow = page.locator(".bk-events").nth(2)  # grid, sentence view, then the flow diagram
    box = flow.bounding_box()
    flow.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.4})
    wait_until(lambda: view.root != (-1, 0), page, timeout=10_000)
    level, token = view.root
    assert 1 <= level <= view.pair.n_layers and 0 <= token < view.records[0].n_tokens
    trace = view._traces()["finetuned"]
    assert trace.root == (level, token)
    assert not trace.reached[level + 1 :].any()


def test_apps_compare_py_serves_and_shows_progress_while_preparing(page, tmp_path: Path) -> None:
    """With no default models cached, the page shows progress (and no traceback) while they are prepared."""
    port = 5191
    env = {**os.environ, "ATTNFLOWS_HOME": str(tmp_path / "home")}
    app = Path(__file__).resolve().parents[2] / "apps" / "compare.py"
    server = subprocess.Popen([sys.executable, "-m", "panel", "serve", str(app), "--port", str(port), "--address", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = ""
        for _ in range(120):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/compare", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "attnflows" in body
        msgs: list = []
        page.on("console", lambda message: msgs.append(message))
        page.goto(f"http://127.0.0.1:{port}/compare")
        page.wait_for_selector("text=Preparing the default models", timeout=30_000)
        assert "Traceback" not in page.content()
        assert console_errors(msgs) == []
    finally:
        server.terminate()
        server.wait(timeout=30)
