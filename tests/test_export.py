"""Static export: one self-contained, escaped HTML file whose shipped data is what the CLS trace keeps."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from bokeh.models import ColorBar, GlyphRenderer, HoverTool, Legend, LinearColorMapper, Plot

from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, SHARED, compare_traces, trace_cls_flow
from attnflows_panel.cli import main
from attnflows_panel.errors import InputError
from attnflows_panel.export import EDGE_FIELDS, NODE_FIELDS, dashboard_html, dashboard_layout, export_dashboard, sparse_attention
from attnflows_panel.extract import extract_pair, merge_tokens
from attnflows_panel.plots.flow_diagram import flow_edges
from attnflows_panel.plots.head_grid import heads_at

TEXT = "the car was good and i love it"
XSS_TEXT = "<img src=x onerror=alert(1)>"
XSS_PAIR = "</script><script>alert(2)</script>"
RESOURCE_ATTRIBUTES = {"src", "href", "srcset", "data", "poster", "action", "formaction", "background"}


class PageScan(HTMLParser):
    """Tags with resource-loading attributes, style text and the Bokeh document JSON of a page (script bodies are not parsed as HTML)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str, str | None]] = []
        self.styles: list[str] = []
        self.docs_json: list[str] = []
        self._inside: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.loads += [(tag, name, value) for name, value in attrs if name in RESOURCE_ATTRIBUTES or (tag == "meta" and name == "http-equiv")]
        self._inside = "json" if tag == "script" and ("type", "application/json") in attrs else tag

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside == "style":
            self.styles.append(data)
        elif self._inside == "json":
            self.docs_json.append(data)


def scan(path: Path) -> PageScan:
    parser = PageScan()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def bokeh_models(page: PageScan) -> dict[str, dict]:
    """The page's named Bokeh models (name -> attributes), from the document JSON Bokeh embeds HTML-escaped."""
    (docs,) = (json.loads(html.unescape(text)) for text in page.docs_json)
    named: dict[str, dict] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            attributes = node.get("attributes")
            if node.get("type") == "object" and isinstance(attributes, dict) and "name" in attributes:
                named[attributes["name"]] = attributes
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs)
    return named


@pytest.fixture(scope="module")
def records(tiny_pair):
    return extract_pair(tiny_pair, TEXT)


def threshold_at_an_entry(attention: np.ndarray) -> float:
    """A tau equal to one attention value (float32 -> float is exact), so one entry sits on the threshold."""
    values = np.sort(attention.ravel())
    return float(values[int(0.8 * values.size)])


def test_export_is_one_file_that_loads_nothing(records, tmp_path: Path) -> None:
    path = export_dashboard(records, tmp_path / "report.html")
    assert path == tmp_path / "report.html" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.stat().st_size < 2.5 * 2**20
    page = scan(path)
    assert page.loads == []  # no <script src>, <link href>, <img src>, meta refresh ...
    assert not any("@import" in css or "url(" in css for css in page.styles)
    assert "googleapis" not in path.read_text(encoding="utf-8").split("<script")[0]  # no web fonts in the head
    named = bokeh_models(page)
    assert {"header", "head_grid", "flow_edges", "flow_nodes", "sentence_words", "edge_count"} <= named.keys()


def test_export_escapes_user_text(tiny_pair, tmp_path: Path) -> None:
    path = export_dashboard(extract_pair(tiny_pair, XSS_TEXT, XSS_PAIR), tmp_path / "xss.html", top_heads=0, title=XSS_TEXT)
    text = path.read_text(encoding="utf-8")
    assert "<img src=x onerror" not in text and "<script>alert(2)" not in text
    assert f"<title>{html.escape(XSS_TEXT, quote=False)}</title>" in text
    header = bokeh_models(scan(path))["header"]["text"]
    assert html.escape(XSS_TEXT) in header and html.escape(XSS_PAIR) in header
    assert "<img" not in header and "<script" not in header


def test_shipped_entries_are_exactly_those_at_or_above_tau(records) -> None:
    attention = records[1].attention
    tau = threshold_at_an_entry(attention)
    L, H, n, _ = attention.shape
    sparse = sparse_attention(attention, tau)
    assert sparse["weight"].dtype == np.float32 and sparse["offsets"].shape == (L * n + 1,)
    rows = np.repeat(np.arange(L * n), np.diff(sparse["offsets"]))
    shipped = set(zip(rows // n, sparse["head"].tolist(), rows % n, sparse["key"].tolist(), strict=True))
    expected = {tuple(int(i) for i in idx) for idx in np.argwhere(attention >= tau)}
    assert shipped == expected
    assert (sparse["weight"] == tau).any()  # the entry on the threshold is kept, as the trace keeps it
    layer, query = rows // n, rows % n
    np.testing.assert_array_equal(sparse["weight"], attention[layer, sparse["head"], query, sparse["key"]])
    above = sparse_attention(attention, float(np.nextafter(np.float32(tau), np.float32(1))))
    assert above["weight"].size == sparse["weight"].size - int((attention == np.float32(tau)).sum())
    heads = np.zeros((L, H), dtype=bool)
    heads[0, 1] = heads[L - 1, 0] = True
    some = sparse_attention(attention, tau, heads)  # only those heads' entries, grouped the same way
    some_rows = np.repeat(np.arange(L * n), np.diff(some["offsets"]))
    assert set(zip(some_rows // n, some["head"].tolist(), some_rows % n, some["key"].tolist(), strict=True)) == {e for e in expected if heads[e[0], e[1]]}


def test_shipped_heads_are_the_first_in_order_that_fit_the_cap() -> None:
    from attnflows_panel.export import shipped_heads

    counts = np.array([[5, 1], [3, 4]])
    order = np.array([3, 0, 2, 1])  # flat (layer, head) indices, first shipped first
    assert shipped_heads(counts, order, 13).all()
    np.testing.assert_array_equal(shipped_heads(counts, order, 9), [[True, False], [False, True]])  # 4 + 5; the next, 3, would pass 9
    np.testing.assert_array_equal(shipped_heads(counts, order, 2), [[False, False], [False, True]])  # the first even over the cap


def test_shipped_entries_hold_every_edge_of_the_union_trace(records) -> None:
    """For random head masks each kept edge's passing heads and weight are the shipped entries of its (layer, query, key)."""
    attention = records[0].attention
    tau = threshold_at_an_entry(attention)
    L, H, n, _ = attention.shape
    sparse = sparse_attention(attention, tau)
    rows = np.repeat(np.arange(L * n), np.diff(sparse["offsets"]))
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(6):
        mask = rng.random((L, H)) < 0.5
        trace = trace_cls_flow(attention, mask, tau=tau, combine="union")
        checked += trace.n_edges
        for layer, query, key, heads, weight in zip(trace.edge_layer, trace.edge_query, trace.edge_key, trace.edge_heads, trace.edge_weight, strict=True):
            at = (rows == layer * n + query) & (sparse["key"] == key) & mask[layer, sparse["head"]]
            assert set(sparse["head"][at].tolist()) == set(np.flatnonzero(heads).tolist())
            assert sparse["weight"][at].max() == weight
    assert checked > 0


def renderer_of(layout, name: str) -> GlyphRenderer:
    """The glyph renderer drawing the source named ``name``."""
    return next(r for r in layout.select({"type": GlyphRenderer}) if r.data_source.name == name)


def distinct_edges(traces) -> int:
    """Distinct (layer, query, key) edges over ``traces``, as the merged flow diagram draws them."""
    return int(np.unique(np.concatenate([t.edge_ids() for t in traces])).size)


@pytest.mark.parametrize("top_k", [3, 0, None])
def test_layout_starts_from_the_given_head_mask(records, top_k: int | None) -> None:
    pre, fine = records
    tau = threshold_at_an_entry(pre.attention)
    mask = np.zeros((pre.n_layers, pre.n_heads), dtype=bool)
    mask[:, :2] = True
    layout = dashboard_layout(records, tau=tau, alpha=0.3, top_heads=0, head_mask=mask, top_k=top_k)
    grid = layout.select_one({"name": "head_grid"})
    assert set(heads_at(grid.data, grid.selected.indices)) == {tuple(h) for h in np.argwhere(mask).tolist()}
    assert sorted(grid.data["head"])[0] == 1  # the grid numbers heads from 1
    traces = {name: trace_cls_flow(r.attention, mask, tau=tau, alpha=0.3, top_k=top_k or None) for name, r in ((PRETRAINED, pre), (FINETUNED, fine))}
    edges = layout.select_one({"name": "flow_edges"}).data
    expected = flow_edges(pre.tokens, traces)
    assert list(edges) == EDGE_FIELDS and list(layout.select_one({"name": "flow_nodes"}).data) == NODE_FIELDS
    for column in ("layer", "query", "key", "label", "heads_pretrained", "heads_finetuned", "legend"):
        assert list(edges[column]) == expected[column].tolist(), column
    assert expected["label"].tolist() == sorted(expected["label"], key=[SHARED, PRETRAINED, FINETUNED].index)  # grouped by label
    labels = compare_traces(traces[PRETRAINED], traces[FINETUNED]).edge_label
    split = f"{(labels == SHARED).sum()} shared, {(labels == PRETRAINED).sum()} pre-trained only, {(labels == FINETUNED).sum()} fine-tuned only"
    full = distinct_edges(trace_cls_flow(r.attention, mask, tau=tau, alpha=0.3) for r in records)
    hidden = f"; {full - labels.size} weaker hidden (top {top_k} per token)" if top_k else ""
    assert (full > labels.size) == bool(top_k)  # top 3 drops edges for these heads; top 0 and None drop none
    status = layout.select_one({"name": "edge_count"}).text
    assert len(edges["key"]) == labels.size and status == f"<b>{labels.size}</b> edges ({split}){hidden}; {int(mask.sum())} of {mask.size} heads selected"
    flow = next(p for p in layout.select({"type": Plot}) if p.title.text.startswith("pre-trained vs fine-tuned"))
    assert flow.title.text == f"pre-trained vs fine-tuned from [CLS]: {labels.size} edges ({split}){hidden}"
    assert list(layout.select_one({"name": "flow_message"}).data["text"]) == [""]
    header = layout.select_one({"name": "header"}).text
    assert ("top k = 3 (strongest edges kept per token)" if top_k else "top k = 0 (every edge of at least tau)") in header
    assert header.index("tau = ") < header.index("alpha = ") < header.index("top k = ")


def test_the_default_top_k_is_the_apps(records) -> None:
    """Without ``top_k`` the export draws what the app draws by default: the 3 strongest edges of each token."""
    traces = [trace_cls_flow(r.attention, tau=0.1, alpha=0.5, top_k=3) for r in records]
    shown = distinct_edges(traces)
    assert shown < distinct_edges(trace_cls_flow(r.attention, tau=0.1, alpha=0.5) for r in records)
    layout = dashboard_layout(records, top_heads=0)
    assert len(layout.select_one({"name": "flow_edges"}).data["key"]) == shown
    assert "weaker hidden (top 3 per token); all 8 heads" in layout.select_one({"name": "edge_count"}).text
    assert "top k = 3" in layout.select_one({"name": "header"}).text
    assert "top k = 3" in dashboard_html(records, top_heads=0)


@pytest.mark.parametrize("top_k", [-1, 21, 1.5, True, "3", np.float64(2)])
def test_a_bad_top_k_is_refused_in_one_line(records, tmp_path: Path, top_k: object) -> None:
    with pytest.raises(InputError) as info:
        export_dashboard(records, tmp_path / "report.html", top_k=top_k)
    assert str(info.value) == f"top k must be a whole number from 0 to 20 (0: every edge of at least tau), got {top_k!r}"
    with pytest.raises(InputError, match="top k must be"):
        dashboard_html(records, top_k=top_k)
    assert list(tmp_path.iterdir()) == []


def test_edge_and_node_hovers_read_columns_the_sources_hold(records) -> None:
    """Every ``@{column}`` a flow hover shows is in its source, so it shows words and numbers, never ``???``."""
    layout = dashboard_layout(records, top_heads=0)
    for name, shown in (("flow_edges", ("key_token", "query_token", "heads_pretrained", "weight_finetuned")), ("flow_nodes", ("token", "level_name"))):
        renderer = renderer_of(layout, name)
        (hover,) = (t for t in layout.select({"type": HoverTool}) if renderer in t.renderers)
        fields = {f for _, text in hover.tooltips for f in re.findall(r"@\{(\w+)\}", text)}
        assert set(shown) <= fields and fields <= set(renderer.data_source.data), name
        assert not any(re.search(r"@(?!\{)", text) for _, text in hover.tooltips), name  # braces only: "@key_token" could be read as a shorter name
    assert {"input", "layer 1", "layer 2"} == set(layout.select_one({"name": "flow_nodes"}).data["level_name"])


def test_legend_labels_carry_the_edge_counts(records) -> None:
    layout = dashboard_layout(records, tau=threshold_at_an_entry(records[0].attention), top_heads=0)
    edges = layout.select_one({"name": "flow_edges"}).data
    (legend,) = (item for legend in layout.select({"type": Legend}) for item in legend.items if item.renderers == [renderer_of(layout, "flow_edges")])
    assert legend.label.field == "legend"
    labels = np.asarray(edges["label"])
    names = {SHARED: "shared", PRETRAINED: "pre-trained only", FINETUNED: "fine-tuned only"}
    assert list(edges["legend"]) == [f"{names[label]} ({(labels == label).sum()})" for label in labels]
    assert set(labels) == set(names)


@pytest.mark.parametrize(
    ("tau", "layers", "message"),
    [
        (0.1, [0], "No edge reaches [CLS] from the selected heads: select a head of layer 2."),
        (1.0, [0, 1], "No edge of weight 1 or more: lower tau."),
    ],
)
def test_an_empty_flow_says_why(records, tau: float, layers: list[int], message: str) -> None:
    mask = np.zeros((records[0].n_layers, records[0].n_heads), dtype=bool)
    mask[layers] = True
    layout = dashboard_layout(records, tau=tau, top_heads=0, head_mask=mask)
    assert len(layout.select_one({"name": "flow_edges"}).data["key"]) == 0
    assert list(layout.select_one({"name": "flow_message"}).data["text"]) == [message]


def test_matrices_name_heads_from_one_and_keep_weights_on_their_colour_bars(records) -> None:
    pre, fine = records
    js = head_js_divergence(pre.attention, fine.attention)
    layer, head = np.unravel_index(int(np.argmax(js)), js.shape)
    layout = dashboard_layout(records, top_heads=1)
    matrices = {p.title.text.split(" (")[0]: p for p in layout.select({"type": Plot}) if ": layer " in p.title.text}
    assert matrices.keys() == {f"{m}: layer {layer + 1}, head {head + 1}" for m in ("pre-trained", "fine-tuned")}
    for model, record in zip(("pre-trained", "fine-tuned"), records, strict=True):
        plot = matrices[f"{model}: layer {layer + 1}, head {head + 1}"]
        (image,) = (r for r in plot.renderers if isinstance(r, GlyphRenderer))
        assert image.data_source.data["image"][0].dtype == np.uint8
        bar = plot.select_one({"type": ColorBar}).color_mapper
        assert isinstance(bar, LinearColorMapper) and bar.high == pytest.approx(float(record.attention[layer, head].max()))
        assert image.glyph.color_mapper.high == pytest.approx(255 * bar.high)


def test_bad_inputs_are_refused_and_leave_nothing(records, tmp_path: Path) -> None:
    existing = tmp_path / "old.html"
    existing.write_text("old")
    with pytest.raises(InputError, match="directory .*missing does not exist"):
        export_dashboard(records, tmp_path / "missing" / "report.html")
    with pytest.raises(InputError, match="is a directory"):
        export_dashboard(records, tmp_path)
    with pytest.raises(InputError, match="top heads must be a whole number from 0 to 8, got 9"):
        export_dashboard(records, existing, top_heads=9)
    with pytest.raises(InputError, match="tau must be in"):
        export_dashboard(records, existing, tau=0)
    with pytest.raises(InputError, match="nothing to export"):
        export_dashboard(None, existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.html"] and existing.read_text() == "old"


def test_cli_export(tiny_dir: Path, tiny_classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    models = ["--pretrained", str(tiny_dir), "--finetuned", str(tiny_classifier_dir)]
    assert main(["export", *models, "--text", TEXT, "--tau", "0.05", "--top-heads", "2", "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ")
    named = bokeh_models(scan(out))
    assert "tau = 0.05" in named["header"]["text"] and "top k = 3" in named["header"]["text"]
    assert "weaker hidden (top 3 per token)" in named["edge_count"]["text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", " ", "-o", "{tmp}/r.html"], "attnflows: error: --text is empty: give the sentence to export"),
        (["-o", "{tmp}/no/r.html"], "attnflows: error: cannot write the dashboard to {tmp}/no/r.html: directory {tmp}/no does not exist"),
        (["--tau", "1.5", "-o", "{tmp}/r.html"], "attnflows: error: argument --tau: tau must be in (0, 1], got 1.5 (see attnflows export --help)"),
        (["--top-heads", "-1", "-o", "{tmp}/r.html"], "attnflows: error: argument --top-heads: the number of top heads must be a whole number from 0 to 8, got -1 (see attnflows export --help)"),
        (["--top-k", "21", "-o", "{tmp}/r.html"], "attnflows: error: argument --top-k: top k must be a whole number from 0 to 20 (0: every edge of at least tau), got 21 (see attnflows export --help)"),
    ],
)
def test_cli_export_errors_are_one_line(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", *(a.format(tmp=tmp_path) for a in args)]) == 2
    assert capsys.readouterr().err.strip() == message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    assert "usage: attnflows export" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.slow
def test_a_128_token_sentence_of_the_real_pair_stays_small(real_pair, tmp_path: Path) -> None:
    words = ("the self-driving car stopped safely at the crossing and i finally felt relaxed after a long drive " * 12).split()
    tokenizer = real_pair.pretrained.tokenizer
    while len(tokenizer(" ".join(words))["input_ids"]) > 128:
        words.pop()
    records = extract_pair(real_pair, " ".join(words))
    assert records[0].n_tokens >= 126
    path = export_dashboard(records, tmp_path / "long.html")
    assert path.stat().st_size < 3 * 2**20  # BertViz: 53.5 MB for one model


def test_one_model_exports_its_own_dashboard(tiny, tmp_path: Path) -> None:
    """``attnflows export --model``: the grid shows each head's largest weight, the flow and words one model, the matrices its top heads."""
    from attnflows_panel.analysis.heads import head_measures
    from attnflows_panel.extract import extract
    from attnflows_panel.plots import short_name

    record = extract(tiny, None, "the car was good and i love it")
    layout = dashboard_layout((record,), top_heads=3)
    trace = trace_cls_flow(record.attention, tau=0.1, alpha=0.5, top_k=3)
    edges = layout.select_one({"name": "flow_edges"}).data
    assert len(edges["key"]) == trace.n_edges and set(edges["label"]) <= {PRETRAINED}
    assert all(legend.startswith("traced (") for legend in edges["legend"])
    title = layout.select_one({"name": "flow"}).title.text
    assert title.startswith(f"{short_name(record.model_id)} from [CLS]: {trace.n_edges} edges") and "fine-tuned" not in title
    grid = layout.select_one({"name": "head_grid"}).data
    largest = head_measures(record.attention, record.tokens, record.cls_mask, record.sep_mask)["max_weight"]
    np.testing.assert_allclose(sorted(grid[next(k for k in grid if k not in ("layer", "head", "layer_label", "head_label"))]), sorted(largest.ravel()), rtol=1e-6)
    matrices = [p for p in layout.select({"type": Plot}) if p.title is not None and p.title.text.startswith("layer ")]
    best = np.unravel_index(int(np.argmax(largest)), largest.shape)
    assert len(matrices) == 3 and any(m.title.text.startswith(f"layer {best[0] + 1}, head {best[1] + 1} (") for m in matrices)
    words = layout.select_one({"name": "sentence_words"}).data
    assert len(words["value"]) == len(merge_tokens(record.tokens, record.word_ids)[0])  # one row of words
    page = dashboard_html((record,), top_heads=0)
    assert "<title>attnflows: attention flows</title>" in page and "<b>Model:</b>" in layout.select_one({"name": "header"}).text
    with pytest.raises(InputError, match="or one model's record, got 3 records"):
        export_dashboard((record,) * 3, tmp_path / "three.html")
    assert list(tmp_path.iterdir()) == []
