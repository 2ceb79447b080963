"""Sessions side by side: one user's forward pass never stalls another's page, and concurrent model work gives each its own result."""

from __future__ import annotations

import threading

import numpy as np
import panel as pn
from conftest import BOKEH_IDLE_JS, SETTLED_JS
from panel.tests.util import serve_component, wait_until

from attnflows_panel.analysis.ablation import ablate_heads
from attnflows_panel.components import CompareView
from attnflows_panel.components.model_work import MODEL_THREAD
from attnflows_panel.extract import extract_pair

TEXT = "The movie was a total waste of time."
REVIEW = (
    "I went in expecting a light comedy and came out an hour and a half later wondering why I had paid for it: the jokes "
    "land late or not at all, the plot forgets its own rules, and the only good scene is in the trailer."
)


def serve_sessions(page, pair, n: int) -> tuple[list[CompareView], list]:
    """Serve a CompareView and open it in ``n`` pages of one browser (one session each); returns the views and pages in order."""
    views: list[CompareView] = []

    def app() -> pn.viewable.Viewable:
        views.append(CompareView(pair, TEXT))
        return pn.Row(views[-1].controls(), views[-1])

    _, port = serve_component(page, app, wait=False)
    pages = [page] + [page.context.new_page() for _ in range(n - 1)]
    for i, p in enumerate(pages):
        if i:
            p.goto(f"http://localhost:{port}")
        p.wait_for_function(BOKEH_IDLE_JS, timeout=60_000)
        wait_until(lambda i=i: len(views) > i and views[i].records is not None and not views[i].busy, p, timeout=60_000)
        p.wait_for_function(SETTLED_JS, timeout=30_000)
    return views, pages


def type_text(page, text: str) -> None:
    box = page.locator("textarea").first
    box.fill(text)
    box.blur()


def drag_over_heads(page, plot_point, heads: tuple[int, int], layers: tuple[int, int]) -> None:
    """Brush the grid over heads and layers (ranges from 1, inclusive), as a user drags a box."""
    page.bring_to_front()
    start = plot_point(page, "model difference", heads[0] - 0.4, layers[1] + 0.4)
    end = plot_point(page, "model difference", heads[1] + 0.4, layers[0] - 0.4)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def test_a_long_forward_pass_elsewhere_leaves_this_page_live(page, real_pair, plot_point) -> None:
    """While the model thread is busy with another session's input, this session still brushes and a new page still opens."""
    (first, second), (page_one, page_two) = serve_sessions(page, real_pair, 2)
    release = threading.Event()
    MODEL_THREAD.submit(release.wait, 120)  # stands for another user's long forward pass
    try:
        type_text(page_two, REVIEW)  # queued behind it: that page shows its spinner
        wait_until(lambda: second.busy, page_two, timeout=10_000)
        drag_over_heads(page_one, plot_point, (9, 10), (5, 6))  # a brush is no model work: drawn while the thread is held
        wait_until(lambda: first.selected_heads() == [(4, 8), (4, 9), (5, 8), (5, 9)], page_one, timeout=10_000)
        wait_until(lambda: "(4 of 72 heads)" in first.flows[next(iter(first.flows))].figure.title.text, page_one, timeout=10_000)
        third = page.context.new_page()  # and a new session still opens
        third.goto(page_one.url)
        third.wait_for_function(BOKEH_IDLE_JS, timeout=30_000)
        assert second.records[0].text == TEXT and second.busy, "the queued input must still be waiting"
    finally:
        release.set()
    wait_until(lambda: second.records[0].text == REVIEW and not second.busy, page_two, timeout=60_000)
    for got, want in zip(second.records, extract_pair(real_pair, REVIEW), strict=True):
        np.testing.assert_allclose(got.attention, want.attention, atol=1e-5)


def test_two_sessions_ablating_and_extracting_at_once_each_get_their_own_result(page, real_pair, plot_point) -> None:
    (first, second), (page_one, page_two) = serve_sessions(page, real_pair, 2)
    drag_over_heads(page_one, plot_point, (1, 12), (4, 6))
    wait_until(lambda: len(first.selected_heads()) == 36, page_one, timeout=10_000)
    heads = first.selected_heads()
    page_one.locator(".bk-btn", has_text="Switch selected heads off").click()
    type_text(page_two, REVIEW)
    wait_until(lambda: first.ablation.object.startswith("With 36 heads off"), page_one, timeout=60_000)
    wait_until(lambda: second.records[0].text == REVIEW, page_two, timeout=60_000)
    want = ablate_heads(real_pair.finetuned, TEXT, None, heads)
    before, after = first.ablation.object.split("→")
    assert f"({want.original_probabilities.max():.0%})" in before and f"({want.probabilities.max():.0%})" in after
    for got, expected in zip(second.records, extract_pair(real_pair, REVIEW), strict=True):
        np.testing.assert_allclose(got.attention, expected.attention, atol=1e-5)  # none of its heads was switched off


def test_a_new_input_is_computed_on_the_model_thread_and_drawn_on_the_loop(page, real_pair, plot_point, monkeypatch) -> None:
    """The grid, the traces and the matrices of a new input are computed once, off the page's loop; drawing only reuses them.
    So are the word-level merge, and a long input's brushes."""
    import attnflows_panel.components.attention_view as attention_view
    import attnflows_panel.components.compare_view as compare_view

    (view,), (one,) = serve_sessions(page, real_pair, 1)
    calls: list[tuple[str, str]] = []

    def recorded(name, function):
        def call(*args, **kwargs):
            calls.append((name, threading.current_thread().name))
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(compare_view, "head_js_divergence", recorded("difference", compare_view.head_js_divergence))
    monkeypatch.setattr(attention_view, "trace_cls_flow", recorded("trace", attention_view.trace_cls_flow))
    type_text(one, REVIEW)
    wait_until(lambda: view.records[0].text == REVIEW and not view.busy, one, timeout=60_000)
    one.wait_for_function(SETTLED_JS, timeout=30_000)
    assert sorted(calls) == sorted([("difference", "attnflows-model_0")] + [("trace", "attnflows-model_0")] * 4)  # two models, with and without top-k

    words = len(attention_view.word_level(view.records[0]).tokens)
    calls.clear()
    monkeypatch.setattr(attention_view, "word_level", recorded("words", attention_view.word_level))
    one.get_by_role("button", name="words", exact=True).click()  # whole words: merged and traced off the loop too
    wait_until(lambda: [live.figure.x_range.end for live in view.flows.values() if live.figure] == [words] and not view.busy, one, timeout=60_000)
    assert {thread for _, thread in calls} == {"attnflows-model_0"} and sorted(name for name, _ in calls).count("words") == 2
    one.wait_for_function(SETTLED_JS, timeout=30_000)  # the page drawn in words before the drag below: a drag during the redraw can be lost

    calls.clear()
    monkeypatch.setattr(attention_view, "INLINE_UP_TO", 0)  # as if the input were long
    drag_over_heads(one, plot_point, (1, 12), (4, 6))
    flow = next(iter(view.flows.values()))
    wait_until(lambda: "(36 of 72 heads)" in flow.figure.title.text and not view.busy, one, timeout=60_000)
    assert ("trace", "attnflows-model_0") in calls and {thread for _, thread in calls} == {"attnflows-model_0"}
