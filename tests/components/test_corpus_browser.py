"""CorpusBrowser: the corpus table's columns, default order, filters, choosing rows, escaping and offline resources."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import panel as pn
import pytest
import requests
from bokeh.document import Document
from bokeh.models.widgets.tables import NumberFormatter
from panel.models.tabulator import CellClickEvent, SelectionEvent
from panel.tests.util import serve_and_request, serve_component, wait_until

from attnflows_panel.components.corpus_browser import PAGE_SIZE, CorpusBrowser

XSS = "<img src=x onerror=alert(1)>"


def table(n: int = 45, pairs: bool = True) -> pd.DataFrame:
    """A corpus table as :func:`corpus_table` makes it, with an HTML payload in one text."""
    rng = np.random.default_rng(0)
    predicted = rng.choice(["negative", "positive"], size=(2, n))
    labels = rng.choice(["negative", "positive"], size=n)
    return pd.DataFrame(
        {
            "sentence_id": np.arange(n),
            "text": [XSS if i == 3 else f"sentence {i}" for i in range(n)],
            "text_pair": [f"pair {i}" if pairs and i % 2 else None for i in range(n)],
            "label": labels,
            "predicted_pretrained": predicted[0],
            "probability_pretrained": rng.uniform(0.5, 1, n),
            "predicted_finetuned": predicted[1],
            "probability_finetuned": rng.uniform(0.5, 1, n),
            "correct_finetuned": predicted[1] == labels,
            "prediction_changed": predicted[0] != predicted[1],
            "difference": rng.uniform(0, 0.3, n),
            "n_tokens": rng.integers(3, 40, n),
        }
    )


def columns(browser: CorpusBrowser) -> dict[str, dict]:
    """The Tabulator column definitions sent to the page, by field."""
    model = browser.__panel__().get_root(Document())
    return {c["field"]: c for c in model.configuration["columns"]}


def most_different(frame: pd.DataFrame, k: int) -> pd.Series:
    return frame.sort_values("difference", ascending=False).iloc[k]


def test_most_different_sentences_come_first_twenty_a_page() -> None:
    frame = table()
    browser = CorpusBrowser(frame)
    tab = browser.tabulator
    assert tab.sorters == [{"field": "difference", "dir": "desc"}]
    assert tab.current_view["sentence_id"].tolist() == frame.sort_values("difference", ascending=False)["sentence_id"].tolist()
    assert (tab.pagination, tab.page_size, tab.selectable, tab.disabled) == ("remote", PAGE_SIZE, 1, True)
    assert browser.chosen is None


def test_columns_filters_and_formats() -> None:
    browser = CorpusBrowser(table())
    spec = columns(browser)
    assert spec["text"]["headerFilter"] == "input" and spec["text"]["headerFilterFunc"] == "like"
    for field in ("label", "predicted_pretrained", "predicted_finetuned"):
        assert spec[field]["headerFilter"] == "list" and spec[field]["headerFilterFunc"] == "="
        assert spec[field]["headerFilterParams"]["values"] == ["negative", "positive"]  # every page's values, not the shown page's
    assert spec["prediction_changed"]["headerFilter"] == spec["correct_finetuned"]["headerFilter"] == "tickCross"
    assert spec["correct_finetuned"]["formatter"] == "tickCross" and browser.tabulator.titles["correct_finetuned"] == "fine-tuned ✓"
    assert browser.tabulator.header_tooltips["difference"].startswith("How differently the two models attend")
    numbers = browser.tabulator.formatters
    assert all(isinstance(numbers[f], NumberFormatter) and numbers[f].format == "0.000" for f in ("difference", "probability_pretrained", "probability_finetuned"))
    assert browser.tabulator.widths["text"] >= 300
    assert browser.tabulator.hidden_columns == []


def test_a_corpus_without_pairs_or_labels_hides_those_columns() -> None:
    frame = table(pairs=False).assign(label=None)
    assert CorpusBrowser(frame).tabulator.hidden_columns == ["text_pair", "label"]


def test_header_filters_filter_every_page() -> None:
    frame = table()
    tab = CorpusBrowser(frame).tabulator
    tab.filters = [{"field": "label", "type": "=", "value": "positive"}, {"field": "text", "type": "like", "value": "SENTENCE 1"}]
    expected = frame[(frame.label == "positive") & frame.text.str.startswith("sentence 1")]
    assert set(tab.current_view["sentence_id"]) == set(expected["sentence_id"])
    tab.filters = [{"field": "prediction_changed", "type": "=", "value": True}]
    assert tab.current_view["prediction_changed"].all() and len(tab.current_view) == frame.prediction_changed.sum()


def test_selecting_a_row_sets_chosen() -> None:
    frame = table()
    browser = CorpusBrowser(frame)
    browser.tabulator.selection = [3]
    assert browser.chosen == (XSS, "pair 3")
    browser.tabulator.selection = [4]
    assert browser.chosen == ("sentence 4", "")  # no pair: an empty string
    browser.tabulator.selection = []
    assert browser.chosen == ("sentence 4", "")  # unselecting keeps the last choice


def test_rows_chosen_on_the_page_map_to_the_sorted_table() -> None:
    """The page reports positions on the shown page of the sorted table, as a browser does."""
    frame = table()
    browser = CorpusBrowser(frame)
    tab = browser.tabulator
    tab._process_event(SelectionEvent(model=None, indices=[0], selected=True, flush=True))
    row = most_different(frame, 0)
    assert browser.chosen == (row.text, row.text_pair or "") and tab.selection == [row.name]
    tab.page = 2
    tab._process_event(CellClickEvent(model=None, column="text", row=1))
    row = most_different(frame, PAGE_SIZE + 1)
    assert browser.chosen == (row.text, row.text_pair or "")


def test_text_is_shown_as_escaped_plain_text() -> None:
    """Tabulator's plaintext and textarea formatters escape HTML; only its html formatter would render it."""
    spec = columns(CorpusBrowser(table()))
    assert spec["text"]["formatter"] == spec["text_pair"]["formatter"] == "textarea"
    assert all(spec[f]["formatter"] == "plaintext" for f in ("label", "predicted_pretrained", "predicted_finetuned"))
    assert not any(c.get("formatter") == "html" for c in spec.values())


def test_served_page_needs_nothing_from_a_cdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pn.config, "inline", pn.config.inline)  # restored after the test
    pn.extension("tabulator", inline=True)
    page = serve_and_request(lambda: CorpusBrowser(table()))
    port = re.match(r"http://localhost:(\d+)", page.url).group(1)
    resources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any("tabulator.min.js" in r for r in resources) and any("tabulator" in r and r.split("?")[0].endswith(".css") for r in resources)
    assert not re.findall(r"https?://(?!localhost|127\.0\.0\.1)", page.text)
    for resource in resources:
        assert requests.get(f"http://localhost:{port}/{resource.lstrip('./')}", timeout=10).ok, resource


@pytest.mark.browser
def test_in_a_browser_html_stays_text_and_a_click_chooses(page) -> None:
    frame = table()
    browsers: list[CorpusBrowser] = []

    def app() -> CorpusBrowser:
        browsers.append(CorpusBrowser(frame))
        return browsers[-1]

    external: list[str] = []
    dialogs: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("http://localhost", "ws://localhost", "blob:", "data:")) else None)
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    msgs, _ = serve_component(page, app, wait=False)
    page.wait_for_selector(".tabulator-row", timeout=60_000)
    page.locator(".tabulator-col[tabulator-field=text] input").press_sequentially("img")
    cell = page.locator(".tabulator-cell[tabulator-field=text]", has_text=XSS)
    cell.wait_for()
    assert cell.locator("img").count() == 0 and page.locator(".tabulator img").count() == 0
    cell.click()
    wait_until(lambda: browsers[0].chosen == (XSS, "pair 3"), page)
    assert dialogs == [] and external == []
    assert [m.text for m in msgs if m.type == "error"] == []
