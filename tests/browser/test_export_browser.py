"""An exported dashboard in a real browser with the network cut: it renders, and head selection re-traces in JS."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import BOKEH_IDLE_JS
from panel.tests.util import wait_until

from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, compare_traces, trace_cls_flow
from attnflows_panel.analysis.source import DenseAttention
from attnflows_panel.export import export_dashboard, flow_message, flow_title, status_html
from attnflows_panel.extract import extract_pair, merge_tokens
from attnflows_panel.plots.flow_diagram import edge_counts, flow_edges, flow_nodes
from attnflows_panel.plots import short_name
from attnflows_panel.plots.head_grid import heads_at
from attnflows_panel.plots.sentence_view import BORDER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXT = "The self-driving car stopped safely, and I finally felt relaxed."
TINY_TEXT = "the car was good and i love it"
LOCAL_SCHEMES = ("file:", "data:", "blob:")

SOURCE_DATA = """name => {
  const data = Bokeh.documents[0].get_model_by_name(name).data;
  return Object.fromEntries(Object.entries(data).map(([k, v]) => [k, Array.from(v)]));
}"""
SELECT = "indices => { Bokeh.documents[0].get_model_by_name('head_grid').selected.indices = indices; }"
TEXT_OF = "name => Bokeh.documents[0].get_model_by_name(name).text"
FLOW_TITLE = "() => Bokeh.documents[0].get_model_by_name('flow').title.text"
TOOLTIP = ".bk-tooltip-content"


@dataclass
class Visit:
    """What a page did while open: console errors, uncaught exceptions, requests leaving the machine, dialogs."""

    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


def open_offline(page, path: Path) -> Visit:
    """Open ``path`` with every non-local request aborted and recorded; return once Bokeh has drawn the document."""
    visit = Visit()
    page.on("console", lambda m: visit.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: visit.errors.append(str(exc)))
    page.on("request", lambda r: None if r.url.startswith(LOCAL_SCHEMES) else visit.outside.append(r.url))
    page.on("dialog", lambda d: (visit.dialogs.append(d.message), d.dismiss()))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(LOCAL_SCHEMES) else route.abort())
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(path.as_uri())
    page.wait_for_function(BOKEH_IDLE_JS, timeout=30_000)
    return visit


def source(page, name: str) -> dict[str, list]:
    return page.evaluate(SOURCE_DATA, name)


def grid_heads(page) -> list[tuple[int, int]]:
    """The 0-based (layer, head) of each grid cell, in Bokeh's order (the grid shows both from 1)."""
    grid = source(page, "head_grid")
    return heads_at(grid, range(len(grid["head"])))


def cell_indices(page, mask: np.ndarray) -> list[int]:
    """The grid cells of the heads in ``mask``."""
    return [i for i, head in enumerate(grid_heads(page)) if mask[head]]


def mask_of(page, indices: list[int], shape: tuple[int, int]) -> np.ndarray:
    cells = grid_heads(page)
    mask = np.zeros(shape, dtype=bool)
    for i in indices:
        mask[cells[i]] = True
    return mask if mask.any() else ~mask


def python_traces(records, mask: np.ndarray, tau: float, alpha: float, top_k: int) -> dict:
    """Each model's trace (the pair's two, or one model's, named pre-trained as the export names it)."""
    return {name: trace_cls_flow(r.attention, mask, tau=tau, alpha=alpha, combine="union", top_k=top_k or None) for name, r in zip((PRETRAINED, FINETUNED), records, strict=False)}


def hidden_by_top_k(records, mask: np.ndarray, tau: float, alpha: float, top_k: int, shown: int) -> int:
    """As the app counts it: distinct edges of at least tau without top-k, minus those drawn (0 with top-k off)."""
    if not top_k:
        return 0
    full = python_traces(records, mask, tau, alpha, 0)
    return int(np.unique(np.concatenate([t.edge_ids() for t in full.values()])).size) - shown


def assert_matches_python(page, records, mask: np.ndarray, tau: float, alpha: float, top_k: int, counted: bool = True) -> int | None:
    """The browser's edges (same rows, same order), nodes, word shading, message and counts equal the app's functions on Python's traces for ``mask``.

    Returns how many edges top-k hides (None when not ``counted``, as past COUNT_HIDDEN_UP_TO tokens).
    """
    pre = records[0]
    traces = python_traces(records, mask, tau, alpha, top_k)
    edges, expected = source(page, "flow_edges"), flow_edges(pre.tokens, traces)
    for column in ("layer", "query", "key", "query_token", "key_token", "label", "heads_pretrained", "heads_finetuned", "legend"):
        assert edges[column] == expected[column].tolist(), column
    for column in ("weight", "weight_pretrained", "weight_finetuned"):
        np.testing.assert_array_equal(np.asarray(edges[column], dtype=float), expected[column].to_numpy(float), err_msg=column)
    nodes, expected_nodes = source(page, "flow_nodes"), flow_nodes(pre.tokens, traces)
    assert nodes["label"] == expected_nodes["label"].tolist()
    for column in ("influence_pretrained", "influence_finetuned"):
        np.testing.assert_array_equal(nodes[column], expected_nodes[column].to_numpy(), err_msg=column)
    words, index = merge_tokens(pre.tokens, pre.word_ids)
    shaded = source(page, "sentence_words")["value"]
    expected_words = np.concatenate([np.bincount(index, weights=trace.influence[0], minlength=len(words)) for trace in traces.values()])
    np.testing.assert_array_equal(shaded, expected_words)
    assert source(page, "flow_message")["text"] == [flow_message(traces, mask, tau)]
    counts = edge_counts(expected["label"].to_numpy())
    pair = len(records) == 2
    shown = compare_traces(traces[PRETRAINED], traces[FINETUNED]).edge_label.size if pair else traces[PRETRAINED].n_edges
    assert sum(counts.values()) == len(edges["key"]) == shown
    hidden = hidden_by_top_k(records, mask, tau, alpha, top_k, shown) if counted else None  # a long input's is not counted
    assert hidden is None or hidden >= 0
    status, title = page.evaluate(TEXT_OF, "edge_count"), page.evaluate(FLOW_TITLE)
    model = None if pair else short_name(pre.model_id)
    assert status == status_html(counts, int(mask.sum()), mask.size, hidden, top_k, pair)
    assert title == flow_title(counts, hidden, top_k, model=model)
    if not pair:
        assert title.startswith(f"{model} from [CLS]: {shown} edges") and "pre-trained" not in title + status
    elif hidden:
        assert title.startswith(f"pre-trained vs fine-tuned from [CLS]: {shown} edges (") and title.endswith(f"); {hidden} weaker hidden (top {top_k} per token)")
        assert f"; {hidden} weaker hidden (top {top_k} per token); " in status
    elif hidden is None:
        assert title.endswith(f"; weaker edges hidden (top {top_k} per token)") and "weaker hidden" not in title + status
    else:
        assert "weaker" not in title + status
    return hidden


@pytest.fixture(scope="module")
def tiny_records(tiny_pair):
    return extract_pair(tiny_pair, TINY_TEXT)


@pytest.mark.parametrize(("top_k", "models"), [(3, 2), (0, 2), (3, 1)])
def test_browser_trace_equals_trace_cls_flow_for_any_head_selection(page, tiny_records, tmp_path: Path, top_k: int, models: int) -> None:
    """Both models of a pair, or one model alone (``attnflows export --model``)."""
    tiny_records = tiny_records[:models]
    attention = tiny_records[0].attention
    tau = float(np.sort(attention.ravel())[int(0.8 * attention.size)])  # one entry sits exactly on the threshold
    alpha = 0.3
    path = export_dashboard(tiny_records, tmp_path / "tiny.html", tau=tau, alpha=alpha, top_heads=2, top_k=top_k)
    visit = open_offline(page, path)
    shape = attention.shape[:2]
    initial = {name: source(page, name) for name in ("flow_edges", "flow_nodes", "sentence_words")}
    initial_status = page.evaluate(TEXT_OF, "edge_count")
    hidden = [assert_matches_python(page, tiny_records, np.ones(shape, dtype=bool), tau, alpha, top_k)]
    rng = np.random.default_rng(1)
    masks = [rng.random(shape) < 0.5 for _ in range(6)] + [np.eye(*shape, dtype=bool), np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)]
    masks[-2][-1, :] = True  # the deepest layer only
    masks[-1][0, :] = True  # no head of the deepest layer: no edge, and a message saying so
    for mask in masks:
        page.evaluate(SELECT, cell_indices(page, mask))
        hidden.append(assert_matches_python(page, tiny_records, mask, tau, alpha, top_k))
    assert source(page, "flow_message")["text"] == [f"No edge reaches [CLS] from the selected heads: select a head of layer {shape[0]}."]
    if top_k:
        assert hidden[0] > 0 and sum(h > 0 for h in hidden) >= 5  # top 3 drops edges for all heads and for most selections
    else:
        assert hidden == [0] * len(hidden)
    page.evaluate(SELECT, [])  # an empty selection means every head: back to the state Python rendered
    assert page.evaluate(TEXT_OF, "edge_count") == initial_status
    for name, data in initial.items():
        now = source(page, name)
        assert now.keys() == data.keys()
        for column, values in data.items():
            if values and isinstance(values[0], str):
                assert now[column] == values, (name, column)
            else:
                np.testing.assert_array_equal(now[column], values, err_msg=f"{name}.{column}")
    assert visit.errors == [] and visit.outside == []


def tied_attention(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Rows of multiples of 0.05 (float32): many equal weights, within a head and across heads."""
    rng = np.random.default_rng(seed)
    units = rng.multinomial(20, np.full(shape[-1], 1 / shape[-1]), size=shape[:-1])
    return (units / 20).astype(np.float32)


def ties_at_the_cut(records, mask: np.ndarray, tau: float, top_k: int) -> int:
    """Expanded tokens whose k-th and (k+1)-th strongest union weights of at least ``tau`` are equal: where the tie rule decides."""
    ties = 0
    for record, trace in zip(records, python_traces(records, mask, tau, 0.5, top_k).values(), strict=True):
        L = mask.shape[0]
        for level in range(L, 0, -1):
            layer = level - 1
            if not mask[layer].any():
                break
            for query in np.flatnonzero(trace.reached[level]):
                weight = record.attention[layer][mask[layer], query].max(axis=0)
                strong = np.sort(weight[weight >= tau])[::-1]
                ties += int(strong.size > top_k and strong[top_k - 1] == strong[top_k])
    return ties


@pytest.mark.parametrize("top_k", [1, 3])
def test_browser_breaks_top_k_ties_as_trace_cls_flow(page, tiny_records, tmp_path: Path, top_k: int) -> None:
    """On attention full of equal weights the browser keeps the same k edges as Python (ties to the lower key, union over heads)."""
    shape = tiny_records[0].attention.shape
    records = tuple(dataclasses.replace(r, source=DenseAttention(tied_attention(shape, seed))) for seed, r in enumerate(tiny_records))
    tau, alpha = 0.1, 0.5
    path = export_dashboard(records, tmp_path / "ties.html", tau=tau, alpha=alpha, top_heads=0, top_k=top_k)
    visit = open_offline(page, path)
    full = np.ones(shape[:2], dtype=bool)
    rng = np.random.default_rng(2)
    masks = [full, *(rng.random(shape[:2]) < 0.5 for _ in range(4)), np.eye(*shape[:2], dtype=bool)]
    masks = [m for m in masks if m[-1].any()]
    ties = 0
    for mask in masks:
        if mask is not full:
            page.evaluate(SELECT, cell_indices(page, mask))
        assert assert_matches_python(page, records, mask, tau, alpha, top_k) > 0
        ties += ties_at_the_cut(records, mask, tau, top_k)
    assert ties >= 3  # the rule for equal weights was exercised
    assert visit.errors == [] and visit.outside == []


def test_box_select_in_the_grid_retraces_offline(page, real_pair, plot_point, tmp_path: Path, artifacts: Path) -> None:
    records = extract_pair(real_pair, TEXT)
    path = export_dashboard(records, tmp_path / "report.html")
    visit = open_offline(page, path)
    assert page.locator("canvas").count() >= 5
    before = len(source(page, "flow_edges")["key"])
    # drag over heads 9-10 of the grid's two top rows (layers 5 and 6, the deepest), numbered from 1 as the grid shows them
    page.mouse.move(*plot_point(page, "model difference", 8.6, 6.4))
    page.mouse.down()
    page.mouse.move(*plot_point(page, "model difference", 10.4, 4.6), steps=8)
    page.mouse.up()
    wait_until(lambda: len(source(page, "flow_edges")["key"]) != before, page, timeout=10_000)
    indices = page.evaluate("() => Array.from(Bokeh.documents[0].get_model_by_name('head_grid').selected.indices)")
    mask = mask_of(page, indices, records[0].attention.shape[:2])
    assert {tuple(h) for h in np.argwhere(mask).tolist()} == {(4, 8), (4, 9), (5, 8), (5, 9)}
    traces = python_traces(records, mask, 0.1, 0.5, 3)  # the export's default top-k, the app's
    total = compare_traces(traces[PRETRAINED], traces[FINETUNED]).edge_label.size
    assert len(source(page, "flow_edges")["key"]) == total
    assert page.evaluate(TEXT_OF, "edge_count").startswith(f"<b>{total}</b> edges")
    assert page.get_by_text(f"{total} edges (").first.is_visible()
    # the sentence view's words get its whole height (a row would align its frame with the grid's: title and axis squeezed it)
    height, frame = page.evaluate("() => { const m = Bokeh.documents[0].get_model_by_name('sentence'); return [m.height, Bokeh.index.find_one(m).frame.bbox.height]; }")
    assert frame == height - 2 * BORDER
    page.screenshot(path=str(artifacts / "export.png"), full_page=True)
    assert visit.errors == [] and visit.outside == []


def hover_edge_middle(page, plot_point) -> dict[str, str]:
    """Point at the middle of the most slanted edge; the tooltip's rows (label -> text)."""
    edges = source(page, "flow_edges")
    i = int(np.argmax(np.abs(np.subtract(edges["x1"], edges["x0"]))))
    page.mouse.move(0, 0)
    page.mouse.move(*plot_point(page, "pre-trained vs fine-tuned", (edges["x0"][i] + edges["x1"][i]) / 2, (edges["y0"][i] + edges["y1"][i]) / 2))
    tip = page.locator(TOOLTIP)
    tip.wait_for(timeout=10_000)
    return dict(line.split(":\t") for line in tip.inner_text().split("\n"))


def test_edge_hover_shows_the_words_of_its_edge(page, tiny_records, plot_point, tmp_path: Path) -> None:
    """The edge hover names the tokens, layer (from 1), heads and weights, before and after the browser re-traces."""
    path = export_dashboard(tiny_records, tmp_path / "hover.html", top_heads=0)
    visit = open_offline(page, path)
    deepest = np.zeros(tiny_records[0].attention.shape[:2], dtype=bool)
    deepest[-1] = True
    for mask in (None, deepest):
        if mask is not None:
            page.evaluate(SELECT, cell_indices(page, mask))
        edges = source(page, "flow_edges")
        layers = {(f"{qt} (position {q})", f"{kt} (position {k})"): layer + 1 for kt, k, qt, q, layer in zip(edges["key_token"], edges["key"], edges["query_token"], edges["query"], edges["layer"], strict=True)}
        shown = hover_edge_middle(page, plot_point)
        assert list(shown) == ["layer", "query", "attends to key", "pre-trained weight", "pre-trained heads", "fine-tuned weight", "fine-tuned heads"]
        assert shown["layer"] == str(layers[shown["query"], shown["attends to key"]])  # an edge crossing this one's middle may be the nearest
        assert all(re.fullmatch(r"-|\d+(, \d+)*", shown[f"{m} heads"]) for m in ("pre-trained", "fine-tuned"))
        assert all(re.fullmatch(r"not drawn|\d\.\d{3}", shown[f"{m} weight"]) for m in ("pre-trained", "fine-tuned"))
    assert visit.errors == [] and visit.outside == []


@pytest.mark.parametrize(("text", "text_pair"), [("<img src=x onerror=alert(1)>", None), ("a <script>alert(2)</script> b", "</script><script>alert(3)</script>")])
def test_user_text_is_shown_never_run(page, tiny_pair, tmp_path: Path, text: str, text_pair: str | None) -> None:
    path = export_dashboard(extract_pair(tiny_pair, text, text_pair), tmp_path / "xss.html", top_heads=0, title=text)
    visit = open_offline(page, path)
    page.wait_for_timeout(500)
    for shown in (text, text_pair):
        if shown is not None:
            assert page.get_by_text(shown, exact=False).first.is_visible()
    assert page.title() == text
    assert visit.dialogs == [] and visit.errors == [] and visit.outside == []


NOT_SHIPPED = "() => { const d = Bokeh.documents[0].get_model_by_name('not_shipped').data_source.data; return [Array.from(d.y), Array.from(d.x)]; }"


def test_a_long_input_ships_the_most_changed_heads_and_retraces_them(page, tiny_records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the entry cap the file carries the heads the models differ most on while they fit, hatches the others,
    and the browser traces the selected heads it carries exactly as Python does."""
    import attnflows_panel.export as export
    from attnflows_panel.analysis.compare import head_js_divergence

    tau, alpha, top_k = 0.1, 0.5, 3
    per_head = sum(np.count_nonzero(r.attention >= tau, axis=(2, 3)) for r in tiny_records)
    monkeypatch.setattr(export, "MAX_ENTRIES", int(per_head.sum() // 2))
    monkeypatch.setattr(export, "COUNT_HIDDEN_UP_TO", tiny_records[0].n_tokens - 1)  # and too long to count what top-k hides
    path = export_dashboard(tiny_records, tmp_path / "long.html", tau=tau, alpha=alpha, top_heads=1, top_k=top_k)
    visit = open_offline(page, path)
    assert "A long input" in page.evaluate(TEXT_OF, "header")
    layer, head = page.evaluate(NOT_SHIPPED)
    shipped = np.ones(per_head.shape, dtype=bool)
    shipped[np.asarray(layer, dtype=int) - 1, np.asarray(head, dtype=int) - 1] = False
    assert 0 < shipped.sum() < shipped.size
    difference = head_js_divergence(tiny_records[0].attention, tiny_records[1].attention)
    assert difference[shipped].min() >= difference[~shipped].max()  # the most changed heads
    assert per_head[shipped].sum() <= export.MAX_ENTRIES < per_head[shipped].sum() + per_head[~shipped][np.argmax(difference[~shipped])]
    assert_matches_python(page, tiny_records, shipped, tau, alpha, top_k, counted=False)
    rng = np.random.default_rng(3)
    for mask in [m for m in (rng.random(shipped.shape) < 0.5 for _ in range(6)) if (m & shipped).any()]:
        page.evaluate(SELECT, cell_indices(page, mask))
        assert_matches_python(page, tiny_records, mask & shipped, tau, alpha, top_k, counted=False)  # the carried heads of the selection
    page.evaluate(SELECT, cell_indices(page, ~shipped))  # only heads the file does not carry: nothing drawn, and why
    assert source(page, "flow_edges")["key"] == [] and source(page, "flow_message")["text"] == [export.no_edge_messages(2, tau)["not_carried"]]
    assert visit.errors == [] and visit.outside == []
