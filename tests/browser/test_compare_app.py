"""The comparison dashboard in a real browser: serves cleanly, brushing and tapping drive the Python state."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import panel as pn
import pytest
from conftest import BOKEH_IDLE_JS, PLOT_STATE_JS, PLOT_VIEWS_JS, SETTLED_JS
from panel.tests.util import wait_until

from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, trace_cls_flow
from attnflows_panel.app import create_app
from attnflows_panel.components import CompareView
from attnflows_panel.plots.flow_diagram import flow_edges as flow_edge_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXT = "The self-driving car stopped safely, and I finally felt relaxed."


MERGED = (PRETRAINED, FINETUNED)


def flow_edges(view: CompareView) -> int:
    """The number of edges the session's merged flow diagram draws (its Bokeh source, as sent to the page)."""
    return len(view.flows[MERGED].sources["edges"].data["x0"])


def plots_titled(page, title: str) -> list[dict]:
    """Title, shown x and y ranges and colour-bar titles of every plot on the page whose title starts with ``title``."""
    return page.evaluate(PLOT_STATE_JS, title)


def console_errors(msgs: list) -> list[str]:
    return [m.text for m in msgs if m.type == "error"]


def serve_view(serve_page, page, pair, text: str = TEXT, controls: bool = False, **params: object) -> tuple[CompareView, list]:
    """Serve a CompareView (beside its controls, if asked) and return the session's view once its plots are drawn, and the console messages."""
    views: list[CompareView] = []

    def app() -> pn.viewable.Viewable:
        views.append(CompareView(pair, text, **params))
        return pn.Row(views[-1].controls(), views[-1]) if controls else views[-1]

    msgs = serve_page(page, app)
    wait_until(lambda: views and views[0].records is not None and not views[0].busy, page, timeout=60_000)
    page.wait_for_function(SETTLED_JS, timeout=30_000)
    return views[0], msgs


def test_compare_app_renders_without_errors(page, serve_page, real_pair, artifacts: Path) -> None:
    """The whole app on a review longer than the default sentence (the README's screenshot)."""
    msgs = serve_page(page, lambda: create_app(real_pair, REVIEW))
    page.wait_for_selector("text=pre-trained vs fine-tuned", timeout=30_000)
    page.set_viewport_size({"width": 1600, "height": 2300})  # the template scrolls inside: a tall window shows every pane
    page.wait_for_timeout(1000)
    page.screenshot(path=str(artifacts / "compare-app.png"), full_page=True)
    box = page.locator("textarea").first
    assert box.evaluate("(t) => t.scrollHeight <= t.clientHeight + 2")  # the box grew to show the whole review, no inner scrolling
    content = page.content()
    assert "Traceback (most recent call last)" not in content
    assert console_errors(msgs) == []


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def test_grid_brush_sets_head_mask_and_filters_flows(page, serve_page, real_pair, plot_point) -> None:
    view, _ = serve_view(serve_page, page, real_pair)
    before = flow_edges(view)
    assert view.head_mask.all()
    # a box over heads 9-10 of the two deepest layers (the grid counts layers and heads from 1)
    drag(page, plot_point(page, "model difference", 8.6, 6.4), plot_point(page, "model difference", 10.4, 4.6))
    wait_until(lambda: 0 < view.head_mask.sum() < view.head_mask.size and flow_edges(view) < before, page, timeout=10_000)
    assert set(view.selected_heads()) == {(4, 8), (4, 9), (5, 8), (5, 9)}


def test_a_brush_down_to_one_edge_leaves_no_glyph_reading_a_missing_column(page, serve_page, real_pair, plot_point) -> None:
    """With one edge left, HoloViews makes its width and colour constants; the page must not lose the columns."""
    view, msgs = serve_view(serve_page, page, real_pair)
    last = view.n_layers - 1
    tokens = view.records[0].tokens

    def edges_with(head: int) -> int:
        mask = np.zeros_like(view.head_mask)
        mask[last, head] = True
        traces = {name: trace_cls_flow(r.attention, mask, tau=view.tau, alpha=view.alpha) for name, r in zip((PRETRAINED, FINETUNED), view.records, strict=True)}
        return len(flow_edge_rows(tokens, traces))

    single = [head for head in range(view.n_heads) if edges_with(head) == 1]
    assert single, f"no head of the last layer leaves one edge: {[edges_with(h) for h in range(view.n_heads)]}"
    head = single[0]
    drag(page, plot_point(page, "model difference", head + 0.6, last + 1.4), plot_point(page, "model difference", head + 1.4, last + 0.6))
    wait_until(lambda: view.selected_heads() == [(last, head)] and flow_edges(view) == 1, page, timeout=10_000)
    # the title is written after the glyphs and sources: once the page shows it, it has applied their changes
    title = view.flows[MERGED].figure.title.text
    assert title.endswith(", 1 edge (1 of 72 heads)")
    wait_until(lambda: plots_titled(page, title) != [], page, timeout=10_000)
    page.wait_for_timeout(200)  # console messages reach Python asynchronously
    assert [m.text for m in msgs if "nonexistent field" in m.text] == []
    assert console_errors(msgs) == []


def test_tap_on_the_flow_diagram_reroots_the_trace(page, serve_page, real_pair) -> None:
    view, _ = serve_view(serve_page, page, real_pair)
    flow = page.locator(".bk-events").nth(2)  # grid, sentence view, then the flow diagram
    box = flow.bounding_box()
    flow.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.4})
    wait_until(lambda: view.root != (-1, -1), page, timeout=10_000)
    level, token = view.root
    assert 1 <= level <= view.pair.n_layers and 0 <= token < view.records[0].n_tokens
    trace = view._traces()["finetuned"]
    assert trace.root == (level, token)
    assert not trace.reached[level + 1 :].any()


@pytest.fixture(scope="module")
def real_head_map(real_pair, tmp_path_factory):
    """The head map of the real pair over 24 held-out sentences (a small run, made once)."""
    from attnflows_panel.corpus import heldout_sentiment_corpus
    from attnflows_panel.head_map import run_head_map
    from attnflows_panel.store import extract_corpus

    corpus = heldout_sentiment_corpus().subset(range(24))
    store = extract_corpus({"pretrained": real_pair.pretrained, "finetuned": real_pair.finetuned}, corpus, tmp_path_factory.mktemp("run") / "run", progress=False)
    return run_head_map(store, 24)


MAP_SELECTION_JS = """() => {""" + PLOT_VIEWS_JS + """
  for (const view of plotViews())
    if (view.model.title.text.startsWith("heads over"))
      return Array.from(view.model.renderers.find((r) => r.glyph !== undefined && r.glyph.constructor.__name__ === "Scatter").data_source.selected.indices);
  return null;
}"""


def test_head_map_brush_selects_those_heads_everywhere(page, serve_page, real_pair, real_head_map, plot_point) -> None:
    """A box in the head map selects its heads in every view; "Clear selection" then clears the box too."""
    view, msgs = serve_view(serve_page, page, real_pair, head_map=real_head_map, controls=True)
    assert plots_titled(page, "heads over 24 corpus sentences (drag to select)") != []
    points = real_head_map.points
    # a box over the left part of the map, cut in the widest gap between points so pixel rounding cannot matter;
    # either model's copy of a head selects it
    xs = np.sort(points["x"].to_numpy())
    lo, hi = len(xs) // 5, len(xs) // 2
    widest = lo + int(np.argmax(np.diff(xs[lo:hi])))
    x_cut = float(xs[widest] + xs[widest + 1]) / 2
    low, high = float(points["y"].min()) - 0.01, float(points["y"].max()) + 0.01
    inside = points[points["x"] <= x_cut]
    expected = sorted({(int(layer), int(head)) for layer, head in zip(inside["layer"], inside["head"], strict=True)})
    drag(page, plot_point(page, "heads over", float(points["x"].min()) - 0.01, high), plot_point(page, "heads over", x_cut, low))
    wait_until(lambda: not view.head_mask.all(), page, timeout=10_000)
    assert view.selected_heads() == expected
    assert view._traces()["finetuned"].head_mask.sum() == len(expected)
    assert len(page.evaluate(MAP_SELECTION_JS)) == len(inside)
    page.get_by_text("Clear selection", exact=True).click()
    wait_until(lambda: view.head_mask.all(), page, timeout=10_000)
    wait_until(lambda: page.evaluate(MAP_SELECTION_JS) == [], page, timeout=10_000)  # no box left dimming the other heads
    assert console_errors(msgs) == []


def test_html_in_the_sentence_is_shown_as_text(page, serve_page, real_pair) -> None:
    attack = "<img src=x onerror=alert(1)> and <script>alert(2)</script> are fun"
    dialogs: list = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    msgs = serve_page(page, lambda: create_app(real_pair, attack))
    assert dialogs == []
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("textarea").first.input_value() == attack
    assert console_errors(msgs) == []


def test_empty_and_too_long_text_show_notices(page, serve_page, real_pair, artifacts: Path) -> None:
    msgs = serve_page(page, lambda: create_app(real_pair, TEXT))
    box = page.locator("textarea").first
    box.fill("")
    box.blur()
    page.wait_for_selector("text=Type a sentence", timeout=20_000)
    box.fill(" ".join(["wonderful"] * 600))
    box.blur()
    page.wait_for_selector("text=tokens were dropped", timeout=120_000)  # 512 tokens through both models and every view
    page.screenshot(path=str(artifacts / "compare-truncated.png"))
    assert "Traceback" not in page.content()
    assert console_errors(msgs) == []


def test_a_trace_without_edges_draws_without_browser_errors(page, serve_page, real_pair) -> None:
    view, msgs = serve_view(serve_page, page, real_pair, tau=1.0)
    assert flow_edges(view) == 0
    shown = "() => Bokeh.documents[0].get_model_by_name('message').data.text[0]"  # drawn on the canvas, across the plot
    assert page.evaluate(shown) == "No edge of weight 1.00 or more leaves [CLS]: lower tau."
    assert console_errors(msgs) == []


def type_text(page, text: str) -> None:
    box = page.locator("textarea").first
    box.fill(text)
    box.blur()


SHORT = "I loved it."
PAIR_LIKE = "The film was long, the actors were tired, and the ending made no sense at all to anyone in the room."
REVIEW = (
    "I went in expecting a light comedy and came out an hour and a half later wondering why I had paid for it: the jokes "
    "land late or not at all, the plot forgets its own rules, and the only good scene is in the trailer, which is a "
    "shame because the cast is clearly trying hard and the music is lovely, yet the whole thing is a disaster."
)


def test_every_pane_fits_each_new_input(page, serve_page, real_pair, artifacts: Path) -> None:
    """Three inputs of different lengths one after another: the page's flow and matrix ranges fit each."""
    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    page.set_viewport_size({"width": 1600, "height": 1000})
    for text in (REVIEW, SHORT, PAIR_LIKE):
        type_text(page, text)
        wait_until(lambda text=text: view.records is not None and view.records[0].text == text, page, timeout=60_000)
        n = view.records[0].n_tokens
        # the page's plots are replaced asynchronously: wait for the new ones (the old code kept [-1, 16] for good)
        wait_until(lambda n=n: [p["x"] for p in plots_titled(page, "pre-trained vs fine-tuned")] == [[-1, n]], page, timeout=30_000)
        matrices = lambda: plots_titled(page, "pre-trained: ") + plots_titled(page, "fine-tuned: ")  # noqa: E731
        wait_until(lambda n=n: [(m["x"], sorted(m["y"])) for m in matrices()] == [([-0.5, n - 0.5], [-0.5, n - 0.5])] * 2, page, timeout=30_000)
        if text == REVIEW:
            page.screenshot(path=str(artifacts / "compare-long-review.png"), full_page=True)
    assert console_errors(msgs) == []


def test_edge_hover_shows_one_tooltip_with_the_words(page, serve_page, real_pair, plot_point) -> None:
    view, msgs = serve_view(serve_page, page, real_pair)
    page.set_viewport_size({"width": 1600, "height": 1800})  # the flow diagram in view: the pointer only moves there
    page.wait_for_timeout(500)
    edges = view.flows[MERGED].sources["edges"].data
    title = view.flows[MERGED].figure.title.text
    i = int(np.argmax(np.abs(np.subtract(edges["x1"], edges["x0"]))))  # the most slanted edge: few others cross its middle
    page.mouse.move(0, 0)
    pointer = plot_point(page, title, (edges["x0"][i] + edges["x1"][i]) / 2, (edges["y0"][i] + edges["y1"][i]) / 2)
    page.mouse.move(*pointer, steps=4)
    tips = page.locator(".bk-tooltip-content")
    tips.first.wait_for(timeout=10_000)
    visible = [t for t in tips.all() if t.is_visible()]
    assert len(visible) == 1  # the nearest edge only, not a stack
    box = visible[0].bounding_box()
    assert abs(box["x"] + box["width"] / 2 - pointer[0]) < box["width"] and 0 < box["y"] - pointer[1] < 60  # below the pointer, not at the edge's far end
    shown = dict(line.split(":\t") for line in visible[0].inner_text().split("\n"))
    assert list(shown) == ["layer", "query", "attends to key", "pre-trained weight", "pre-trained heads", "fine-tuned weight", "fine-tuned heads"]
    words = {(f"{qt} (position {q})", f"{kt} (position {k})"): layer + 1 for kt, k, qt, q, layer in zip(edges["key_token"], edges["key"], edges["query_token"], edges["query"], edges["layer"], strict=True)}
    assert shown["layer"] == str(words[shown["query"], shown["attends to key"]])  # words and positions, the layer counted from 1
    assert all(shown[f"{m} weight"] == "not drawn" or float(shown[f"{m} weight"]) >= view.tau for m in ("pre-trained", "fine-tuned"))
    page.mouse.move(*plot_point(page, title, 0, 6), steps=4)  # the root, [CLS] of layer 6, where many edges meet: its tooltip alone
    page.wait_for_timeout(500)
    visible = [t for t in tips.all() if t.is_visible()]
    assert len(visible) == 1 and visible[0].inner_text().startswith("token:\t[CLS] (0)")
    page.mouse.move(*pointer, steps=4)  # off the token, edges answer again
    page.wait_for_timeout(500)
    visible = [t for t in tips.all() if t.is_visible()]
    assert len(visible) == 1 and visible[0].inner_text().startswith("layer:")
    assert console_errors(msgs) == []


def test_the_grid_colour_bar_follows_the_measure(page, serve_page, real_pair) -> None:
    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    assert plots_titled(page, "model difference")[0]["colorbars"] == ["JS (bits)"]
    page.locator("select", has=page.locator("option", has_text="attention to [CLS]")).select_option(label="attention to [CLS]")
    wait_until(lambda: view.measure == "attn_cls", page, timeout=10_000)
    wait_until(lambda: plots_titled(page, "attention to [CLS]") != [], page, timeout=10_000)
    assert plots_titled(page, "attention to [CLS]")[0]["colorbars"] == ["attention to [CLS]"]
    assert console_errors(msgs) == []


def test_apps_compare_py_serves_and_shows_progress_while_preparing(page, serve_app_file) -> None:
    """With no default models cached, the page shows progress (and no traceback) while they are prepared."""
    url = serve_app_file("compare")
    msgs: list = []
    page.on("console", lambda message: msgs.append(message))
    page.goto(url)
    page.wait_for_selector("text=Loading the default models", timeout=30_000)
    assert "Traceback" not in page.content()
    assert console_errors(msgs) == []


def test_a_link_reopens_the_view_and_follows_it(page, serve_page, real_pair, plot_point) -> None:
    """The URL carries heads, method and tau; a hostile value is ignored with a notice, and a brush updates the URL."""
    msgs = serve_page(page, lambda: create_app(real_pair, TEXT))
    base = page.url.split("?")[0]
    page.goto(f"{base}?heads=6.3&method=rollout&tau=0.02&root=bad%3Cb%3E")
    page.wait_for_function("() => window.Bokeh !== undefined && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle", timeout=60_000)
    wait_until(lambda: plots_titled(page, "pre-trained: layer 6, head 3") != [], page, timeout=30_000)
    assert plots_titled(page, "pre-trained vs fine-tuned: rollout from [CLS] (layer 6)") != []
    page.wait_for_selector("text=Ignored from the link (not valid here): root.", timeout=10_000)
    assert "heads=6.3" in page.url and "method=rollout" in page.url and "tau=0.02" in page.url
    drag(page, plot_point(page, "model difference", 0.6, 5.4), plot_point(page, "model difference", 1.4, 4.6))  # layer 5, head 1
    wait_until(lambda: "heads=5.1" in page.url, page, timeout=15_000)
    assert console_errors(msgs) == []


def test_side_by_side_fits_a_1280_pixel_window(page, serve_page, real_pair, artifacts: Path) -> None:
    """Both models' flow diagrams stay inside the window beside the sidebar, none cut off."""
    page.set_viewport_size({"width": 1280, "height": 800})
    msgs = serve_page(page, lambda: create_app(real_pair, REVIEW))
    page.wait_for_selector("text=side by side", timeout=30_000)
    page.get_by_text("side by side", exact=True).click()
    wait_until(lambda: len(plots_titled(page, "pre-trained: CLS trace") + plots_titled(page, "fine-tuned: CLS trace")) == 2, page, timeout=30_000)
    right = [p["right"] for p in plots_titled(page, "pre-trained: CLS trace") + plots_titled(page, "fine-tuned: CLS trace")]
    assert 0 < max(right) <= 1280, right
    page.set_viewport_size({"width": 1280, "height": 2000})
    page.screenshot(path=str(artifacts / "compare-side-by-side-1280.png"))
    assert console_errors(msgs) == []



def test_no_stale_result_title_or_numbering(page, serve_page, real_pair, plot_point) -> None:
    """The ablation result goes when the selection changes, empty text leaves no old titles, the grid counts heads from 1."""
    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    page.set_viewport_size({"width": 1600, "height": 1800})
    page.mouse.move(0, 0)
    page.mouse.move(*plot_point(page, "model difference", 3, 6), steps=4)  # the cell of layer 6, head 3, as the grid numbers them
    tip = page.locator(".bk-tooltip-content").first
    tip.wait_for(timeout=10_000)
    shown = dict(line.split(":\t") for line in tip.inner_text().split("\n"))
    assert (shown["layer"], shown["head"]) == ("6", "3")
    page.get_by_text("Switch selected heads off").click()
    page.wait_for_selector("text=With 72 heads off", timeout=30_000)
    drag(page, plot_point(page, "model difference", 2.6, 6.4), plot_point(page, "model difference", 3.4, 5.6))  # layer 6, head 3
    wait_until(lambda: view.selected_heads() == [(5, 2)], page, timeout=10_000)
    wait_until(lambda: page.get_by_text("With 72 heads off").count() == 0, page, timeout=10_000)
    wait_until(lambda: plots_titled(page, "pre-trained: layer 6, head 3") != [], page, timeout=10_000)
    type_text(page, "")
    page.wait_for_selector("text=Type a sentence", timeout=20_000)
    wait_until(lambda: plots_titled(page, "pre-trained vs fine-tuned") == [] and plots_titled(page, "model difference") == [], page, timeout=10_000)
    assert console_errors(msgs) == []


LEGEND_JS = """(title) => {""" + PLOT_VIEWS_JS + """
  for (const view of plotViews())
    if (view.model.title.text.startsWith(title)) {
      const item = view.model.right.find((r) => r.items !== undefined).items[0];
      return Array.from(new Set(item.renderers[0].data_source.data[item.label.field]));
    }
  return null;
}"""


def edge_count(title: str) -> int:
    return int(re.search(r"(\d+) edges", title).group(1))


def legend_counts(page, title: str) -> dict[str, int]:
    """The legend entries of the plot titled ``title``, as shown ("shared (12)"), read into {name: count}."""
    entries = page.evaluate(LEGEND_JS, title)
    return {m.group(1): int(m.group(2)) for m in (re.fullmatch(r"(.+) \((\d+)\)", entry) for entry in entries)}


def test_one_edge_count_in_title_legend_side_by_side_and_download(page, serve_page, real_pair, plot_point, tmp_path: Path) -> None:
    """The merged title counts distinct edges, the legend splits them, side by side and the downloaded report agree."""
    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    page.set_viewport_size({"width": 1600, "height": 1800})
    drag(page, plot_point(page, "model difference", 0.6, 6.4), plot_point(page, "model difference", 12.4, 4.6))  # layers 5-6, every head
    wait_until(lambda: len(view.selected_heads()) == 24, page, timeout=10_000)
    wait_until(lambda: "(24 of 72 heads)" in view.flows[MERGED].figure.title.text, page, timeout=10_000)
    merged = view.flows[MERGED].figure.title.text
    wait_until(lambda: plots_titled(page, merged) != [], page, timeout=10_000)
    total = edge_count(plots_titled(page, merged)[0]["title"])
    split = legend_counts(page, merged)
    assert set(split) <= {"shared", "pre-trained only", "fine-tuned only"} and sum(split.values()) == total
    assert split.get("pre-trained only", 0) + split.get("fine-tuned only", 0) > 0  # the models differ here: the split is not trivial

    page.get_by_text("side by side", exact=True).click()
    wait_until(lambda: len(plots_titled(page, "pre-trained: CLS trace") + plots_titled(page, "fine-tuned: CLS trace")) == 2, page, timeout=30_000)
    assert edge_count(plots_titled(page, "pre-trained: CLS trace")[0]["title"]) == split.get("shared", 0) + split.get("pre-trained only", 0)
    assert edge_count(plots_titled(page, "fine-tuned: CLS trace")[0]["title"]) == split.get("shared", 0) + split.get("fine-tuned only", 0)

    with page.expect_download() as download:
        page.get_by_text("Download this input as an HTML report").click()
    report = tmp_path / "report.html"
    download.value.save_as(report)
    page.goto(report.as_uri())
    page.wait_for_function(BOKEH_IDLE_JS, timeout=60_000)
    exported = plots_titled(page, "pre-trained vs fine-tuned")
    assert len(exported) == 1 and edge_count(exported[0]["title"]) == total
    assert legend_counts(page, "pre-trained vs fine-tuned") == split
    assert console_errors(msgs) == []


def test_grid_model_is_off_while_the_grid_shows_the_model_difference(page, serve_page, real_pair) -> None:
    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    grid_model = page.locator(".bk-btn-group").filter(has=page.get_by_text("fine-tuned", exact=True)).filter(has_not=page.get_by_text("merged", exact=True))
    assert grid_model.locator("button").first.is_disabled()
    page.locator("select", has=page.locator("option", has_text="attention to [CLS]")).select_option(label="attention to [CLS]")
    wait_until(lambda: view.measure == "attn_cls", page, timeout=10_000)
    wait_until(lambda: not grid_model.locator("button").first.is_disabled(), page, timeout=10_000)
    grid_model.get_by_text("pre-trained", exact=True).click()
    wait_until(lambda: view.grid_model == PRETRAINED, page, timeout=10_000)
    wait_until(lambda: plots_titled(page, "attention to [CLS]") != [] and "pre-trained" in plots_titled(page, "attention to [CLS]")[0]["title"], page, timeout=10_000)
    assert console_errors(msgs) == []


def test_ctrl_enter_in_the_box_analyzes_the_typed_text(page, serve_page, real_pair) -> None:
    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    box = page.locator("textarea").first
    box.fill(SHORT)
    box.press("Control+Enter")  # focus stays in the box: no blur
    wait_until(lambda: view.records[0].text == SHORT, page, timeout=20_000)
    assert box.input_value() == SHORT
    assert console_errors(msgs) == []


FRAMES_JS = """() => {""" + PLOT_VIEWS_JS + """
  const found = [];
  for (const view of plotViews()) {
    const f = view.frame.bbox;
    found.push({title: view.model.title.text, canvas: [view.canvas_view.el.clientWidth, view.canvas_view.el.clientHeight], frame: [f.left, f.top, f.right, f.bottom]});
  }
  return found;
}"""


def test_every_plot_is_drawn_whole_inside_the_template(page, serve_page, real_pair) -> None:
    """Inside the app's template each plot's frame is real and within its canvas (a FlexBox laid the matrices out 0 x 0; a stretched sentence view drew past its canvas)."""
    msgs = serve_page(page, lambda: create_app(real_pair, REVIEW))
    page.wait_for_selector("text=pre-trained vs fine-tuned", timeout=30_000)
    page.wait_for_function(SETTLED_JS, timeout=30_000)
    plots = page.evaluate(FRAMES_JS)
    assert sum(p["title"].startswith(("pre-trained: mean", "fine-tuned: mean")) for p in plots) == 2 and len(plots) == 5  # grid, sentence, flows, two matrices
    for p in plots:  # axes, title and colour bar take the rest of the canvas
        (width, height), (left, top, right, bottom) = p["canvas"], p["frame"]
        assert 0 <= left and right <= width and 0 <= top and bottom <= height, p
        assert right - left >= 0.4 * width and bottom - top >= 0.5 * height, p
    assert console_errors(msgs) == []


LEGEND_SHOWN_JS = """(title) => {""" + PLOT_VIEWS_JS + """
  for (const view of plotViews())
    if (view.model.title.text.startsWith(title)) return view.model.right.filter((r) => r.items !== undefined).map((legend) => legend.visible);
  return null;
}"""

CAPTION_FITS_JS = """(title) => {""" + PLOT_VIEWS_JS + """
  const ctx = document.createElement("canvas").getContext("2d"), out = [];
  for (const view of plotViews())
    if (view.model.title.text.startsWith(title)) {
      const caption = view.model.below.find((r) => r.name === "caption");
      ctx.font = `${caption.text_font_style} ${caption.text_font_size} ${caption.text_font}`;
      out.push({lines: caption.text.split("\\n"), widest: Math.max(...caption.text.split("\\n").map((line) => ctx.measureText(line).width)), width: view.bbox.width});
    }
  return out;
}"""


def test_what_a_first_reading_found(page, serve_page, real_pair) -> None:
    """No empty legend box, the tau slider names its method, the heads' own edges mark no root, side-by-side captions fit their plots."""
    from attnflows_panel.plots.flow_diagram import ROOT_COLOR

    view, msgs = serve_view(serve_page, page, real_pair, controls=True)
    page.set_viewport_size({"width": 1280, "height": 1800})
    assert page.evaluate(LEGEND_SHOWN_JS, "pre-trained vs fine-tuned") == [True]
    document = view.flows[MERGED].figure.document  # the session's: changed on its own loop, as a widget would
    document.add_next_tick_callback(lambda: setattr(view, "tau", 1.0))  # nothing passes: no empty legend box is left
    wait_until(lambda: page.evaluate(LEGEND_SHOWN_JS, "pre-trained vs fine-tuned") == [False], page, timeout=10_000)
    document.add_next_tick_callback(lambda: setattr(view, "tau", 0.1))
    wait_until(lambda: page.evaluate(LEGEND_SHOWN_JS, "pre-trained vs fine-tuned") == [True], page, timeout=10_000)

    colours = "() => Bokeh.documents[0].get_model_by_name('nodes').data.color"
    assert ROOT_COLOR in page.evaluate(colours)
    page.locator("select", has=page.locator("option", has_text="heads' own edges")).select_option(label="heads' own edges")
    page.get_by_text("tau for heads' own edges (edge threshold)").wait_for(timeout=10_000)
    wait_until(lambda: "heads' own edges of every token" in plots_titled(page, "pre-trained vs fine-tuned")[0]["title"], page, timeout=10_000)
    assert ROOT_COLOR not in page.evaluate(colours)

    page.get_by_text("side by side", exact=True).click()
    wait_until(lambda: len(page.evaluate(CAPTION_FITS_JS, "pre-trained: heads") + page.evaluate(CAPTION_FITS_JS, "fine-tuned: heads")) == 2, page, timeout=30_000)
    for caption in page.evaluate(CAPTION_FITS_JS, "pre-trained: heads") + page.evaluate(CAPTION_FITS_JS, "fine-tuned: heads"):
        assert len(caption["lines"]) == 2 and caption["widest"] <= caption["width"], caption
    assert console_errors(msgs) == []
