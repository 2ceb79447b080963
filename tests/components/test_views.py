"""CompareView and SingleView on tiny random encoders: state, linking, notices and escaping, without a browser."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import pytest
from bokeh.document import Document

from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, flow_trace, rollout_trace, trace_cls_flow
from attnflows_panel.analysis.source import AttentionSource
from attnflows_panel.app import create_app, create_single_app
from attnflows_panel.components import CompareView, SingleView
from attnflows_panel.components.attention_view import DIFFERENCE
from attnflows_panel.components.records import cached_records
from attnflows_panel.components.submit_keys import SubmitKeys
from attnflows_panel.plots.flow_diagram import flow_edges
from attnflows_panel.errors import AttnflowsError

TEXT = "the movie was good, but the car was bad"


def rendered(view) -> Document:
    """Render the view into a Bokeh document, as a server session does."""
    doc = Document()
    view.__panel__().get_root(doc)
    return doc


def head_map(n_layers: int, n_heads: int) -> HeadEmbedding:
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    points = pd.concat(
        [pd.DataFrame({"model": model, "layer": layer.ravel(), "head": head.ravel(), "x": layer.ravel() + shift, "y": head.ravel() * 1.0}) for model, shift in ((PRETRAINED, 0.0), (FINETUNED, 0.1))],
        ignore_index=True,
    )
    return HeadEmbedding(points, pd.DataFrame(columns=["layer", "head", "x_from", "y_from", "x_to", "y_to", "dx", "dy", "distance"]), "test")


MERGED = (PRETRAINED, FINETUNED)


def data(live, layer: str) -> dict[str, np.ndarray]:
    """What the page draws for ``layer`` of a live figure (its bound Bokeh source)."""
    return {k: np.asarray(v) for k, v in live.sources[layer].data.items()}


def cells(view) -> dict:
    """The grid's cell source (the one layer a brush never rewrites)."""
    return next(r.data_source.data for r in view.grid.figure.renderers if r.data_source is not view.grid.sources["outline"])


def test_compare_view_grid_shows_the_model_difference(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    pre, fine = view.records
    assert view.measure == DIFFERENCE
    grid = cells(view)
    expected = head_js_divergence(pre.attention, fine.attention)
    at = [i for i in range(len(grid["head"])) if (grid["layer"][i], grid["head"][i]) == (1, 3)][0]  # layers and heads from 1
    assert float(grid["value"][at]) == pytest.approx(expected[0, 2])
    view.param.update(measure="entropy", grid_model=PRETRAINED)
    assert view.grid.figure.title.text == "entropy (nats) (pre-trained)"


def test_the_grid_colour_bar_names_the_measure_shown(tiny_pair) -> None:
    from bokeh.models import ColorBar

    view = CompareView(tiny_pair, TEXT)
    titles = lambda: [c.title for c in view.grid.figure.select({"type": ColorBar})]  # noqa: E731
    assert titles() == ["JS (bits)"]
    view.measure = "attn_cls"
    assert titles() == ["attention to [CLS]"]
    assert view.param.measure.names["attention to [CLS]"] == "attn_cls"  # readable names in the menu, not column names


def test_grid_model_is_disabled_while_the_grid_shows_the_model_difference(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    controls = view.controls()
    grid_model = next(w for w in controls if getattr(w, "name", None) == "Grid model")
    assert grid_model.disabled
    view.measure = "entropy"
    assert not grid_model.disabled


def test_selecting_heads_filters_every_flow_consistently(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    everything = {name: t.n_edges for name, t in view._traces().items()}
    view.select_heads([(1, 0), (0, 3)])
    assert view.selected_heads() == [(0, 3), (1, 0)]
    for name, record in zip(MERGED, view.records, strict=True):
        expected = trace_cls_flow(record.attention, view.head_mask, tau=0.05, alpha=view.alpha, top_k=view.top_k)
        assert view._traces()[name].n_edges == expected.n_edges <= everything[name]
    live = view.flows[MERGED]
    edges = flow_edges(view.records[0].tokens, view._traces())
    assert len(data(live, "edges")["x0"]) == len(edges)
    view.select_heads([])
    assert view.head_mask.all()


def test_one_edge_count_everywhere_with_its_split(tiny_pair) -> None:
    """The merged title counts distinct edges (shared once); the legend splits them by model."""
    view = CompareView(tiny_pair, TEXT, tau=0.05, top_k=0)
    view.select_heads([(1, 0), (1, 2)])
    edges = flow_edges(view.records[0].tokens, view._traces())
    counts = edges["label"].value_counts()
    assert view.flows[MERGED].figure.title.text.endswith(f", {len(edges)} edges (2 of 8 heads)")  # a selection says so
    names = {"shared": "shared", "pretrained": "pre-trained only", "finetuned": "fine-tuned only"}
    assert set(data(view.flows[MERGED], "edges")["legend"]) == {f"{names[k]} ({c})" for k, c in counts.items()}


def test_top_k_keeps_the_strongest_edges_and_says_how_many_are_hidden(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05, top_k=0)
    everything = len(data(view.flows[MERGED], "edges")["x0"])
    view.top_k = 1
    kept = len(data(view.flows[MERGED], "edges")["x0"])
    assert 0 < kept < everything
    assert view.flows[MERGED].figure.title.text.endswith(f", {kept} edges; {everything - kept} weaker hidden (top 1 per token)")


def test_each_method_keeps_a_tau_of_its_own(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    assert view.tau == 0.1
    view.method = "rollout"
    assert view.tau == 0.01
    view.tau = 0.02
    view.method = "trace"
    assert view.tau == 0.1
    view.method = "rollout"
    assert view.tau == 0.02


def test_word_level_merges_pieces_in_every_view(tiny_pair) -> None:
    view = CompareView(tiny_pair, "the carz was xq good", tau=0.05)
    pieces = view.records[0].tokens
    view.units = "words"
    words = view.shown[0].tokens
    assert "carz" in words and "##z" in pieces and len(words) < len(pieces)
    n = len(words)
    flow = view.flows[MERGED].figure
    assert (flow.x_range.start, flow.x_range.end) == (-1, n)
    assert data(view.matrices[FINETUNED], "image")["image"][0].shape == (n, n)
    np.testing.assert_allclose(data(view.matrices[FINETUNED], "image")["image"][0].sum(axis=1), 1.0, rtol=1e-5)  # rows still sum to 1
    view.units = "word pieces"
    assert view.flows[MERGED].figure.x_range.end == len(pieces)


def fresh(view) -> CompareView:
    """A new view in ``view``'s state: what a first render of that state draws."""
    other = CompareView(
        view.pair, view.text, tau=view.tau, alpha=view.alpha, method=view.method, combine=view.combine, layout=view.layout, mode=view.mode, shading=view.shading,
    )
    other.param.update(root=view.root, measure=view.measure, grid_model=view.grid_model)
    other.select_heads(view.selected_heads())
    return other


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        left, right = a[key], b[key]
        if left.dtype.kind in "fc" or right.dtype.kind in "fc":
            np.testing.assert_allclose(left.astype(float), right.astype(float), err_msg=key)
        else:
            assert list(left) == list(right), key


@pytest.mark.parametrize("layout", ["layered", "radial"])
def test_a_brush_writes_what_a_fresh_render_of_that_state_draws(tiny_pair, layout: str) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05, layout=layout)
    view.select_heads([(1, 0), (1, 2), (0, 1)])
    view.param.update(root=(2, 3), shading="attention")
    other = fresh(view)
    for live, again in [(view.flows[MERGED], other.flows[MERGED]), (view.sentence, other.sentence), *zip(view.matrices.values(), other.matrices.values(), strict=True), (view.grid, other.grid)]:
        for layer in live.sources:
            same(data(live, layer), data(again, layer))
        assert live.figure.title.text == again.figure.title.text


def test_a_brush_keeps_every_glyph_drawable(tiny_pair) -> None:
    """After a brush, every field a glyph draws from is a column of its source (BokehJS reads them all)."""
    from bokeh.core.property.vectorization import Field
    from bokeh.models import GlyphRenderer

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    view.select_heads([(1, 0)])  # few edges: HoloViews would have made the width a constant
    for live in [view.flows[MERGED], view.sentence, view.grid, *view.matrices.values()]:
        for renderer in live.figure.select({"type": GlyphRenderer}):
            columns = renderer.data_source.data
            for state in ("glyph", "selection_glyph", "nonselection_glyph", "hover_glyph", "muted_glyph"):
                glyph = getattr(renderer, state)
                if glyph is None or isinstance(glyph, str):
                    continue
                fields = {name: value.field for name, value in glyph.properties_with_values(include_defaults=False).items() if isinstance(value, Field)}
                assert {name: f for name, f in fields.items() if f not in columns} == {}, state
            assert len({len(column) for column in columns.values()}) <= 1


def test_every_pane_fits_each_new_input(tiny_pair) -> None:
    """Ranges follow the input: three lengths one after another in the same view."""
    view = CompareView(tiny_pair, TEXT)
    for text in ("good", "the car was bad", "the movie was good but the car was bad and i hate it and i love it"):
        view.text = text
        n = view.records[0].n_tokens
        flow = view.flows[MERGED].figure
        assert (flow.x_range.start, flow.x_range.end) == (-1, n)
        assert [flow.xaxis[0].major_label_overrides[i] for i in range(n)] == list(view.records[0].tokens)
        for live in view.matrices.values():
            assert data(live, "image")["image"][0].shape == (n, n)
            assert (live.figure.x_range.start, live.figure.x_range.end) == (-0.5, n - 0.5)
    view.layout = "radial"
    view.text = "good"
    reach = view.n_layers + 1 + 2.2  # the rings and their labels, whatever room the legend takes
    flow = view.flows[MERGED].figure
    assert flow.x_range.start <= -reach and flow.x_range.end >= reach and flow.y_range.end == pytest.approx(reach)


def test_zero_edges_say_why(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    view.select_heads([(0, 1)])  # no head of the deepest layer: nothing reaches [CLS]
    message = str(data(view.flows[MERGED], "message")["text"][0])
    assert "no selected head is in layer 2" in message
    assert "0 edges" in view.flows[MERGED].figure.title.text
    view.select_heads([])
    assert data(view.flows[MERGED], "message")["text"][0] == ""


def test_edge_hover_names_words_and_says_below_tau(tiny_pair) -> None:
    from bokeh.models import HoverTool

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    hovers = view.flows[MERGED].figure.select({"type": HoverTool})
    edge_hover = next(h for h in hovers if any(label == "layer" for label, _ in h.tooltips))
    tips = dict(edge_hover.tooltips)
    assert tips["query"] == "@{query_token} (position @{query})" and tips["attends to key"] == "@{key_token} (position @{key})"
    assert edge_hover.limit == 1  # the nearest edge only
    assert "not drawn" in edge_hover.formatters["@{weight_finetuned}"].code


def test_the_ablation_result_is_cleared_when_the_selection_changes(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    view.select_heads([(0, 0), (1, 1)])
    view._ablate()
    assert view.ablation.object
    view.select_heads([(1, 1)])
    assert view.ablation.object == ""


def test_matrices_show_the_selected_head_or_the_mean_of_the_selection(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    rendered(view)
    view.select_heads([(1, 2)])
    assert [m.figure.title.text for m in view.matrices.values()] == ["pre-trained: layer 2, head 3", "fine-tuned: layer 2, head 3"]
    shown = data(view.matrices[FINETUNED], "image")["image"][0]  # Bokeh's row i is y = i, the query index
    np.testing.assert_allclose(shown, view.records[1].attention[1, 2], rtol=1e-6)
    view.select_heads([])
    assert [m.figure.title.text for m in view.matrices.values()] == ["pre-trained: mean of 8 heads", "fine-tuned: mean of 8 heads"]


@pytest.mark.parametrize(("method", "build"), [("rollout", rollout_trace), ("flow", flow_trace)])
def test_rollout_and_exact_flow_replace_the_trace_and_follow_brushes(tiny_pair, method: str, build) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    view.method = method  # the method's own tau, then this test's
    view.param.update(tau=0.05, root=(2, 1))
    view.select_heads([(1, 0), (1, 3)])
    for name, record in zip(MERGED, view.records, strict=True):
        expected = build(record.attention, view.head_mask, tau=0.05, root=(2, 1))
        np.testing.assert_allclose(view._traces()[name].influence, expected.influence)
        assert view._traces()[name].n_edges == expected.n_edges > 0
    assert len(data(view.flows[MERGED], "edges")["x0"]) == len(flow_edges(view.records[0].tokens, view._traces()))
    assert f"from {view.records[0].tokens[1]} (layer 2)" in view.flows[MERGED].figure.title.text  # where the re-rooted trace starts


def test_words_shaded_by_influence_or_by_the_root_tokens_attention(tiny_pair) -> None:
    from attnflows_panel.extract import merge_tokens

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    words, index = merge_tokens(view.records[0].tokens, view.records[0].word_ids)

    def shown(model: str) -> np.ndarray:
        boxes = data(view.sentence, "boxes")
        return boxes["value"][boxes["model"] == model]

    influence = view._traces()[FINETUNED].influence[0]
    np.testing.assert_allclose(shown("fine-tuned"), np.bincount(index, weights=influence, minlength=len(words)))
    view.param.update(shading="attention", root=(2, 3))
    view.select_heads([(1, 0), (1, 2), (0, 1)])  # the root's layer is the second (index 1): heads 0 and 2 count
    for model, record in zip(("pre-trained", "fine-tuned"), view.records, strict=True):
        row = record.attention[1, [0, 2], 3].mean(axis=0)
        np.testing.assert_allclose(shown(model), np.bincount(index, weights=row, minlength=len(words)), rtol=1e-6)
    caption = data(view.sentence, "texts")["text"][1]
    assert caption.startswith("fine-tuned (predicts ") and caption.endswith(f"): attention of {view.records[1].tokens[3]} (layer 2, 2 heads)")


def test_showing_the_view_again_shows_the_current_state(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    view.select_heads([(1, 0)])
    rendered(view)
    total = len(flow_edges(view.records[0].tokens, view._traces()))
    assert f"{total} edges" in view.flows[MERGED].figure.title.text and view.flows[MERGED].pane.object is view.flows[MERGED].figure


def test_a_head_map_brush_selects_those_heads_in_both_models(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, head_map=head_map(2, 4))
    rendered(view)
    points = view.head_map.points
    picked = points.index[(points["layer"] == 1) & (points["head"].isin([1, 3])) & (points["model"] == FINETUNED)].tolist()
    view._on_map_selection(picked)
    assert view.selected_heads() == [(1, 1), (1, 3)]
    assert len(data(view.grid, "outline")["x0"]) == 2
    assert len(data(view.map, "highlight")["x"]) == 4  # both models' copies of the two heads


def test_clear_selection_and_the_other_plot_s_brush_clear_a_brush(tiny_pair) -> None:
    """A box left in the head map (or the grid) would keep dimming heads no longer selected."""
    from bokeh.models import Rect, Scatter

    from attnflows_panel.plots.bound import Layer, renderer

    view = CompareView(tiny_pair, TEXT, head_map=head_map(2, 4))
    rendered(view)
    grid, points = (renderer(live.figure, Layer(glyph)).data_source.selected for live, glyph in ((view.grid, Rect), (view.map, Scatter)))
    picked = view.head_map.points.index[view.head_map.points["layer"] == 1].tolist()
    points.indices = picked  # a box in the head map, as the page reports it
    assert view.selected_heads() == [(1, h) for h in range(4)] and points.indices == picked
    grid.indices = [0]  # then a tap in the grid: the map's box goes, the grid's stays
    assert len(view.selected_heads()) == 1 and points.indices == [] and grid.indices == [0]
    points.indices = picked
    assert grid.indices == [] and view.selected_heads() == [(1, h) for h in range(4)]
    view.select_heads([])  # "Clear selection"
    assert view.head_mask.all() and points.indices == [] and grid.indices == []
    grid.indices = [1]  # brushing works as before
    assert len(view.selected_heads()) == 1


def test_a_new_input_writes_the_grid_into_its_figure_as_a_fresh_render_draws_it(tiny_pair) -> None:
    """The grid's ranges never change: a new input or grid model rewrites its cells, colour limits and title; a brush survives."""
    from bokeh.models import ColorBar

    view = CompareView(tiny_pair, TEXT)
    figure = view.grid.figure
    view.grid.sources["cells"].selected.indices = [0, 5]  # a box brush in the page
    brushed = view.selected_heads()
    for change in ({"text": "the car was bad"}, {"measure": "entropy"}, {"grid_model": PRETRAINED}, {"text": "good"}):
        view.param.update(**change)
        other = fresh(view)
        same(data(view.grid, "cells"), data(other.grid, "cells"))
        mapper, again = (live.figure.select_one({"type": ColorBar}).color_mapper for live in (view.grid, other.grid))
        assert (mapper.low, mapper.high) == pytest.approx((again.low, again.high))
        assert view.grid.figure.title.text == other.grid.figure.title.text
        assert view.selected_heads() == brushed
    assert view.grid.figure is not figure  # the measure changed once: a new colour bar title needs a new figure
    kept = view.grid.figure
    view.text = "the movie was good"
    assert view.grid.figure is kept


def test_a_grid_selection_in_the_page_selects_heads(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    source = next(r.data_source for r in view.grid.figure.renderers if r.data_source is not view.grid.sources["outline"])
    at = [i for i in range(len(source.data["head"])) if (source.data["layer"][i], source.data["head"][i]) in {(2, 1), (1, 4)}]
    source.selected.indices = at  # as BokehJS reports a box or tap selection
    assert view.selected_heads() == [(0, 3), (1, 0)]


def test_the_head_map_colours_by_layer_or_model_and_names_models_by_title(tiny_pair) -> None:
    from bokeh.models import Legend

    view = CompareView(tiny_pair, TEXT, head_map=head_map(2, 4))
    assert "map_color" in view._widgets()

    def scatter():
        return next(r for r in view.map.figure.renderers if type(r.glyph).__name__ == "Scatter" and "model_color" in r.data_source.data)

    by_layer = scatter()
    assert list(by_layer.data_source.data["color"]) == list(by_layer.data_source.data["layer_label"])  # through a colour map
    view.map_color = "model"
    by_model = scatter()
    assert list(by_model.data_source.data["color"]) == list(by_model.data_source.data["model_color"])
    assert set(by_model.data_source.data["model"]) == {"pre-trained", "fine-tuned"}
    legends = [item.label.field for legend in view.map.figure.select({"type": Legend}) for item in legend.items if hasattr(item.label, "field")]
    assert legends == ["model"]  # a legend of the models, read from the data
    assert "map_color" not in CompareView(tiny_pair, TEXT)._widgets()  # no head map, no colour choice for it


def test_tap_reroots_on_the_nearest_token_in_both_layouts(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    view._on_tap(x=2.2, y=1.1)
    assert view.root == (1, 2)
    assert view._traces()[FINETUNED].root == (1, 2)
    view.layout = "radial"
    n = view.records[0].n_tokens
    angle = np.pi / 2 - 2 * np.pi * 3 / n
    view._on_tap(x=3.0 * np.cos(angle), y=3.0 * np.sin(angle))  # radius 1 + level 2, token 3
    assert view.root == (2, 3)
    view._on_tap(x=0.0, y=0.0)  # the input level cannot be a root
    assert view.root == (2, 3)


def test_empty_text_shows_a_hint_instead_of_plots(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    rendered(view)
    view.text = "   "
    assert view.records is None
    assert "Type a sentence" in view.notice
    assert view.notice_pane.visible and view.notice_pane.alert_type == "info"
    assert view.flows == {} and view.sentence.figure is None and view.grid.figure is None  # no stale titles or colour bars
    view.select_heads([(0, 1)])  # a brush without an input redraws nothing that needs one
    view.text = TEXT
    assert view.records is not None and view.notice == "" and not view.notice_pane.visible


def test_a_too_long_input_is_truncated_with_a_notice(tiny_pair) -> None:
    view = CompareView(tiny_pair, " ".join(["good"] * 80))
    assert view.records[0].n_tokens == tiny_pair.pretrained.max_tokens
    assert "the last 18 tokens were dropped" in view.notice
    assert view.notice_pane.visible and view.notice_pane.alert_type == "warning"


def test_html_in_the_input_or_a_message_reaches_the_page_escaped(tiny_pair) -> None:
    attack = "<img src=x onerror=alert(1)>"
    view = CompareView(tiny_pair, attack)
    rendered(view)
    view.notice = f"bad input {attack}"
    assert "<img" not in view.notice_pane.object and "&lt;img" in view.notice_pane.object
    view._ablate()
    assert "<img" not in view.ablation.object


def test_ablation_reports_the_fine_tuned_prediction_before_and_after(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    view.select_heads([(0, 0), (1, 1)])
    view._ablate()
    assert view.ablation.object.startswith("With 2 heads off, the prediction of fine-tuned")
    assert "→" in view.ablation.object


def test_single_view_has_no_difference_measure_and_one_model(tiny) -> None:
    view = SingleView(tiny, TEXT, title="tiny")
    rendered(view)
    assert len(view.records) == 1 and DIFFERENCE not in view.param.measure.objects
    assert list(view.flows) == [(PRETRAINED,)]
    assert view.flows[(PRETRAINED,)].figure.title.text.startswith("tiny: CLS trace from [CLS] (layer 2), ")
    view._ablate()
    assert "no classification or language-model head" in view.ablation.object
    assert "mode" not in view._widgets()


def test_records_are_cached_per_model_and_input(tiny_pair, tiny) -> None:
    first = cached_records(tiny_pair, TEXT)
    assert cached_records(tiny_pair, TEXT) is first
    single = cached_records(tiny, TEXT)
    assert len(single) == 1 and single is not first


def test_apps_build_for_a_given_pair_or_model(tiny_pair, tiny) -> None:
    def labels(template) -> set[str]:
        return {getattr(w, "label", None) or getattr(w, "name", "") for w in template.sidebar[0].select(pn.widgets.Widget)}

    compare, single = create_app(tiny_pair, TEXT), create_single_app(tiny, TEXT)
    assert {"Examples", "Grid model", "Models", "Sentence"} <= labels(compare)
    assert {"Model (hub name or local path)", "Sentence"} <= labels(single) and "Grid model" not in labels(single)


def test_served_apps_pass_bokehs_validation(tiny_pair, tiny) -> None:
    """No Bokeh validation warning (such as W-1005, a fixed-size layout without a size) in either app's document."""
    from bokeh.core.validation import check_integrity

    for app in (create_app(tiny_pair, TEXT, head_map=head_map(2, 4)), create_single_app(tiny, TEXT)):
        doc = Document()
        app.server_doc(doc)
        issues = check_integrity(list(doc.models))
        assert (issues.error, issues.warning) == ([], []), [issue.extra for issue in issues.warning]


def test_compare_view_exports_its_input_and_selection(tiny_pair, tmp_path) -> None:
    view = CompareView(tiny_pair, "<b>the car</b> was good", tau=0.05)
    view.select_heads([(1, 0), (1, 3)])
    path = view.export(tmp_path / "report.html", top_heads=2)
    page = path.read_text()
    assert "the car" in page and "<b>the car" not in page and "&lt;b&gt;the car" not in page  # escaped, then escaped again inside the JSON
    with pytest.raises(AttnflowsError):
        CompareView(tiny_pair, "  ").export(tmp_path / "empty.html")
    assert not (tmp_path / "empty.html").exists()


def test_controls_analyze_clear_selection_reset_root_and_download(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    controls = view.controls()
    buttons = {b.label: b for b in controls.select(pn.widgets.Button)}
    text = next(w for w in controls.select(pn.widgets.TextAreaInput))
    text.value_input = "the car was good"  # typed, not yet committed by leaving the box
    buttons["Analyze (Ctrl+Enter)"].clicks += 1
    assert view.records[0].text == "the car was good"
    text.value_input = "the car was bad"
    next(iter(controls.select(SubmitKeys))).presses += 1  # Ctrl+Enter in the box, as the page reports it
    assert view.records[0].text == "the car was bad"
    view.param.update(root=(1, 2))
    view.select_heads([(1, 0)])
    buttons["Clear selection"].clicks += 1
    buttons["Reset root"].clicks += 1
    assert view.head_mask.all() and view.root == (-1, -1)
    download = next(w for w in controls.select(pn.widgets.FileDownload))
    page = download.callback().getvalue()
    assert "the car was bad" in page and "<html" in page.lower()
    view.text = ""
    assert download.disabled
    helps = {w.value for w in controls.select(pn.widgets.TooltipIcon)} | {getattr(w, "description", None) for w in controls.select(pn.widgets.Widget)}
    assert [name for name in view._widgets() if view.param[name].doc not in helps] == []  # every control says what it does


def test_the_compare_app_shows_a_chosen_corpus_sentence_in_every_view(tiny_pair) -> None:
    from attnflows_panel.app import _corpus_card

    corpus = pd.DataFrame({"sentence_id": [0, 1], "text": ["the car was good", "i hate it"], "text_pair": [None, "it was bad"], "label": ["positive", "negative"], "difference": [0.2, 0.1], "n_tokens": [6, 9]})
    assert isinstance(create_app(tiny_pair, TEXT, corpus=corpus).main[0][0], pn.Card)  # the corpus card leads the page
    view = CompareView(tiny_pair, TEXT)
    assert _corpus_card(view, corpus).title.startswith("Corpus: 2 held-out sentences, sortable")
    corpus.attrs["source"] = "tweets.csv (positive vs negative)"
    card = _corpus_card(view, corpus)
    assert card.title.startswith("Corpus: 2 held-out sentences of tweets.csv (positive vs negative), sortable")  # where they come from
    table = card.select(pn.widgets.Tabulator)[0]
    table.selection = [1]  # as a click on that row reports it
    assert (view.records[0].text, view.records[0].text_pair) == ("i hate it", "it was bad")
    assert view.flows[MERGED].figure.x_range.end == view.records[0].n_tokens


def test_pair_examples_say_the_default_fine_tune_never_learned_their_task() -> None:
    """Examples grouped by task, each entry a short name (long entries were cut in the sidebar)."""
    from attnflows_panel.app import NO_EXAMPLE, example_groups
    from attnflows_panel.examples import load_examples

    examples = load_examples()
    groups = example_groups(examples)
    assert list(groups["sentiment"]) == [e.name for e in examples if e.task == "sentiment"] and len(groups["sentiment"]) == 7
    untrained = [g for g in groups if g not in ("", "sentiment")]
    assert untrained and all(g.endswith("(not a task the default fine-tune learned)") for g in untrained)
    assert sum(len(v) for v in groups.values()) == len(examples) + 1 and groups[""] == {NO_EXAMPLE: NO_EXAMPLE}
    assert max(len(name) for entries in groups.values() for name in entries) <= 30


def test_the_heads_own_edges_are_drawn_whether_or_not_they_reach_the_root(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, top_k=0)
    view.method = "heads"
    view.tau = 0.05
    view.select_heads([(0, 1)])  # a first-layer head: the CLS trace cannot reach it from the deepest layer
    edges = data(view.flows[MERGED], "edges")
    expected = {(q, k) for record in view.records for q, k in zip(*np.nonzero(record.attention[0, 1] >= 0.05), strict=True)}
    assert set(edges["layer"]) == {0} and set(zip(edges["query"], edges["key"], strict=True)) == expected
    assert "heads' own edges of every token" in view.flows[MERGED].figure.title.text
    assert data(view.flows[MERGED], "message")["text"][0] == ""


def test_the_page_names_its_models(tiny_pair) -> None:
    line = CompareView(tiny_pair, TEXT).models_line()
    assert line.startswith("**pre-trained**: tiny-bert") and "2 layers × 4 heads" in line and "classifies negative / positive" in line


def test_the_flow_diagram_says_what_sizes_and_widths_encode(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    caption = lambda: view.flows[MERGED].figure.select_one({"name": "caption"}).text  # noqa: E731
    assert caption().startswith("node size: influence (I = c + alpha") and "edge width: weight" in caption() and "pale dot: not reached" in caption()
    view.method = "rollout"
    assert caption().startswith("node size: the root's rollout relevance")


def test_the_sentence_view_says_when_no_edge_reaches_the_input(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    view.select_heads([(1, 0)])  # the deepest layer only: the trace stops at layer 1
    caption = str(data(view.sentence, "texts")["text"][0])
    assert caption.endswith("influence in the CLS trace, which stops at layer 1")
    view.select_heads([])
    assert "stops at" not in str(data(view.sentence, "texts")["text"][0])


def test_sentence_captions_fit_the_view_s_width(tiny_pair) -> None:
    """A canvas caption never wraps: the prediction comes first, and a caption longer than the view is cut with an ellipsis."""
    from attnflows_panel.plots.sentence_view import fitted

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    view.select_heads([(1, 0)])
    for caption in data(view.sentence, "texts")["text"][:2]:
        assert len(caption) <= 96
    fine = str(data(view.sentence, "texts")["text"][1])
    assert fine.startswith(f"fine-tuned (predicts {view.records[1].predicted_label}, ")
    assert fitted("x" * 100, 96) == "x" * 95 + "…" and fitted("short", 96) == "short"


def test_the_mouse_wheel_scrolls_the_page_not_the_plots(tiny_pair) -> None:
    from bokeh.models import WheelZoomTool

    view = CompareView(tiny_pair, TEXT)
    for live in [view.flows[MERGED], *view.matrices.values()]:
        assert not isinstance(live.figure.toolbar.active_scroll, WheelZoomTool)
        assert any(isinstance(tool, WheelZoomTool) for tool in live.figure.tools)  # still there, one click away


def test_the_sentence_box_grows_with_the_text_set_from_python(tiny_pair) -> None:
    """Text set by a link or an example (not typed) resizes the box too: a long review is shown whole, up to a cap."""
    from attnflows_panel.components.attention_view import MAX_TEXT_ROWS

    view = CompareView(tiny_pair, "good")
    box = next(w for w in view.controls().select(pn.widgets.TextAreaInput))
    assert box.rows == 4
    view.text = "the movie was good but the car was bad " * 6  # 234 characters: 6 rows of 42, plus one
    assert box.rows == 7
    view.text = "bad " * 1000
    assert box.rows == MAX_TEXT_ROWS


def test_how_to_read_speaks_of_the_models_shown(tiny_pair, tiny) -> None:
    """/single's explanation names one model: no fine-tuned prediction, no segments between copies, no three edge colours."""
    compare = CompareView(tiny_pair, TEXT).__panel__()[2][0].object
    single = SingleView(tiny, TEXT).__panel__()[2][0].object
    assert "both models" in compare and "purple only by the fine-tuned one" in compare and "fine-tuned model's prediction" in compare
    assert "fine-tuned" not in single and "both models" not in single and "pre-trained" not in single
    assert "Edges and the tokens they reach are turquoise" in single and "the model's prediction" in single
    for text in (compare, single):
        assert "the strongest selected head's" in text and "so the root's is 0" in text


def test_the_heads_own_edges_mark_no_root_and_say_what_sizes_mean(tiny_pair) -> None:
    from attnflows_panel.plots.flow_diagram import ROOT_COLOR

    view = CompareView(tiny_pair, TEXT)
    assert ROOT_COLOR in list(data(view.flows[MERGED], "nodes")["color"])  # the CLS trace starts at its black root
    view.method = "heads"
    assert ROOT_COLOR not in list(data(view.flows[MERGED], "nodes")["color"])  # every token is a start
    caption = view.flows[MERGED].figure.select_one({"name": "caption"}).text
    assert caption.startswith("node size: edges arriving") and "root" not in caption


def test_a_re_rooted_trace_is_no_longer_called_the_cls_trace(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    title = lambda: view.flows[MERGED].figure.title.text  # noqa: E731
    assert title().startswith("pre-trained vs fine-tuned: CLS trace from [CLS] (layer 2)")
    view.root = (1, 3)
    assert title().startswith(f"pre-trained vs fine-tuned: trace from {view.records[0].tokens[3]} (layer 1)")
    assert "influence in the trace" in str(data(view.sentence, "texts")["text"][0])
    view.reset_root()
    assert title().startswith("pre-trained vs fine-tuned: CLS trace from [CLS]")


def test_the_tau_slider_names_the_method_whose_tau_it_is(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    tau = next(w for w in view.controls().select(pn.widgets.FloatSlider) if w.name.startswith("tau"))
    assert tau.name == "tau for CLS trace (edge threshold)" and tau.value == 0.1
    view.method = "rollout"
    assert (tau.name, tau.value) == ("tau for rollout (edge threshold)", 0.01)


def test_side_by_side_diagrams_write_their_caption_in_two_lines(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, mode="side by side")
    for live in view.flows.values():
        lines = live.figure.select_one({"name": "caption"}).text.split("\n")
        assert len(lines) == 2 and max(map(len, lines)) <= 90 and " · ".join(lines).startswith("node size: influence")
    view.method = "rollout"  # a brush or setting rewrites the caption in two lines too
    assert all(len(live.figure.select_one({"name": "caption"}).text.split("\n")) == 2 for live in view.flows.values())


def test_the_head_map_title_says_how_many_sentences_placed_the_heads(tiny_pair) -> None:
    import dataclasses

    view = CompareView(tiny_pair, TEXT, head_map=dataclasses.replace(head_map(2, 4), n_sentences=300))
    assert view.map.figure.title.text == "heads over 300 corpus sentences (drag to select)"


def test_the_merged_title_says_when_one_model_draws_nothing(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, top_k=0, tau=0.01)
    assert "draws none" not in view.flows[MERGED].figure.title.text
    root_row = {name: float(record.attention[-1][:, 0, :].max()) for name, record in zip(view.names, view.records, strict=True)}  # the trace's first step
    weak, strong = sorted(root_row, key=root_row.get)
    assert root_row[weak] < root_row[strong]
    view.tau = round((root_row[weak] + root_row[strong]) / 2, 4)  # only the stronger model keeps an edge
    assert view._traces()[strong].n_edges and not view._traces()[weak].n_edges
    assert view.flows[MERGED].figure.title.text.endswith(f"; {view.titles[weak]} draws none")


def test_no_input_no_ablation_button(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    assert not view._ablate_button.disabled
    view.text = ""
    assert view._ablate_button.disabled
    view.text = TEXT
    assert not view._ablate_button.disabled


def test_a_long_input_s_title_says_top_k_hides_edges_without_counting_them(tiny_pair, monkeypatch) -> None:
    import attnflows_panel.components.attention_view as attention_view

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    assert "weaker hidden (top 3 per token)" in view.flows[MERGED].figure.title.text
    monkeypatch.setattr(attention_view, "COUNT_HIDDEN_UP_TO", view.records[0].n_tokens - 1)  # as if the input were long
    traced = []
    monkeypatch.setattr(attention_view, "trace_cls_flow", lambda *a, **k: traced.append(k["top_k"]) or trace_cls_flow(*a, **k))
    view.text = TEXT + " again"
    assert view.flows[MERGED].figure.title.text.endswith("; weaker edges hidden (top 3 per token)")
    assert traced == [3, 3]  # no trace without top-k: counting would trace nearly every weight of a long input
    view.select_heads([(0, 0)])  # no head of the root's layer: nothing drawn, so nothing said hidden
    assert view.flows[MERGED].figure.title.text.endswith(" 0 edges (1 of 8 heads)")


def test_clearing_a_selection_reuses_what_the_input_was_first_drawn_with(tiny_pair, monkeypatch) -> None:
    """A long input's all-heads traces and mean maps take a minute: brushing keeps them for Clear selection."""
    import attnflows_panel.components.attention_view as attention_view

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    first = view.flows[MERGED].figure.title.text
    computed = []
    monkeypatch.setattr(attention_view, "trace_cls_flow", lambda *a, **k: computed.append("trace") or trace_cls_flow(*a, **k))
    source_type = type(view.records[0].source)
    monkeypatch.setattr(source_type, "mean_map", lambda self, mask: computed.append("mean") or AttentionSource.mean_map(self, mask))
    view.select_heads([(1, 0), (1, 2)])
    assert sorted(set(computed)) == ["mean", "trace"]
    brushed = len(computed)
    view.select_heads([])  # Clear selection: every head, as first drawn
    assert view.flows[MERGED].figure.title.text == first
    view.select_heads([(1, 0), (1, 2)])  # and the latest brush again
    assert len(computed) == brushed
