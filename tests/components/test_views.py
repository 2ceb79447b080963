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
from attnflows_panel.app import create_app, create_single_app
from attnflows_panel.components import CompareView, SingleView
from attnflows_panel.components.attention_view import DIFFERENCE
from attnflows_panel.components.records import cached_records
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


def test_compare_view_grid_shows_the_model_difference(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    pre, fine = view.records
    assert view.measure == DIFFERENCE
    grid = view._grid_element()
    values = grid.dframe().set_index(["layer", "head"])[grid.vdims[0].name]
    expected = head_js_divergence(pre.attention, fine.attention)
    assert values.loc[(1, 2)] == pytest.approx(expected[0, 2])
    view.param.update(measure="entropy", grid_model=PRETRAINED)
    assert "pre-trained" in view._grid_element().opts.get().kwargs["title"]


def test_selecting_heads_filters_every_flow_consistently(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    everything = {name: t.n_edges for name, t in view._traces().items()}
    view.select_heads([(1, 0), (0, 3)])
    assert view.selected_heads() == [(0, 3), (1, 0)]
    for name, record in zip((PRETRAINED, FINETUNED), view.records, strict=True):
        expected = trace_cls_flow(record.attention, view.head_mask, tau=0.05, alpha=view.alpha)
        assert view._traces()[name].n_edges == expected.n_edges <= everything[name]
    shown = view._live["flow pretrained finetuned"][0]  # what the page draws, written straight into its sources
    assert f"({sum(t.n_edges for t in view._traces().values())} edges)" in shown.handles["plot"].title.text
    edges = next(sub for key, sub in shown.subplots.items() if key[0] == "Segments").handles["source"].data
    assert len(edges["x0"]) == len(flow_edges(view.records[0].tokens, view._traces()))
    view.select_heads([])
    assert view.head_mask.all()


def test_a_brush_keeps_every_glyph_drawable(tiny_pair) -> None:
    """After a brush, every field a glyph draws from is a column of its source, and colour maps keep their palette."""
    from bokeh.core.property.vectorization import Field

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    plots = {key: plot for key, (plot, *_) in view._live.items()}
    palettes = {key: list(plot.handles["color_mapper"].palette) for key, plot in plots.items() if "color_mapper" in plot.handles}
    assert set(palettes) == {"matrix pretrained", "matrix finetuned"}
    view.select_heads([(1, 0), (1, 2)])
    for key, plot in plots.items():
        for sub in (plot.subplots.values() if getattr(plot, "subplots", None) else [plot]):
            renderer, data = sub.handles["glyph_renderer"], sub.handles["source"].data
            for state in ("glyph", "selection_glyph", "nonselection_glyph", "hover_glyph", "muted_glyph"):
                glyph = getattr(renderer, state)
                if glyph is None or isinstance(glyph, str):
                    continue
                fields = {name: value.field for name, value in glyph.properties_with_values(include_defaults=False).items() if isinstance(value, Field)}
                assert {name: f for name, f in fields.items() if f not in data} == {}, (key, state)
            assert len({len(column) for column in data.values()}) <= 1, key
    assert {key: list(plots[key].handles["color_mapper"].palette) for key in palettes} == palettes


def test_matrices_show_the_selected_head_or_the_mean_of_the_selection(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    rendered(view)
    plots = [view._live[f"matrix {name}"][0] for name in (PRETRAINED, FINETUNED)]
    view.select_heads([(1, 2)])
    assert [p.handles["plot"].title.text for p in plots] == ["pre-trained: layer 2, head 2", "fine-tuned: layer 2, head 2"]
    shown = plots[1].handles["source"].data["image"][0]  # Bokeh's row i is y = i, the query index
    np.testing.assert_allclose(shown, view.records[1].attention[1, 2], rtol=1e-6)
    view.select_heads([])
    assert [p.handles["plot"].title.text for p in plots] == ["pre-trained: mean of 8 heads", "fine-tuned: mean of 8 heads"]


@pytest.mark.parametrize(("method", "build"), [("rollout", rollout_trace), ("flow", flow_trace)])
def test_rollout_and_exact_flow_replace_the_trace_and_follow_brushes(tiny_pair, method: str, build) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    view.param.update(method=method, root=(2, 1))
    view.select_heads([(1, 0), (1, 3)])
    for name, record in zip((PRETRAINED, FINETUNED), view.records, strict=True):
        expected = build(record.attention, view.head_mask, tau=0.05, root=(2, 1))
        np.testing.assert_allclose(view._traces()[name].influence, expected.influence)
        assert view._traces()[name].n_edges == expected.n_edges > 0
    shown = view._live["flow pretrained finetuned"][0]
    edges = next(sub for key, sub in shown.subplots.items() if key[0] == "Segments").handles["source"].data
    assert len(edges["x0"]) == len(flow_edges(view.records[0].tokens, view._traces()))


def test_words_shaded_by_influence_or_by_the_root_tokens_attention(tiny_pair) -> None:
    from attnflows_panel.extract import merge_tokens

    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    words, index = merge_tokens(view.records[0].tokens, view.records[0].word_ids)

    def shown(model: str) -> np.ndarray:
        boxes = view._live["sentence"][0].subplots[("Rectangles", "I")].handles["source"].data  # what the page draws
        return np.asarray(boxes["value"])[np.asarray(boxes["model"]) == model]

    influence = view._traces()[FINETUNED].influence[0]
    np.testing.assert_allclose(shown(FINETUNED), np.bincount(index, weights=influence, minlength=len(words)))
    view.param.update(shading="attention", root=(2, 3))
    view.select_heads([(1, 0), (1, 2), (0, 1)])  # the root's layer is the second (index 1): heads 0 and 2 count
    for model, record in zip((PRETRAINED, FINETUNED), view.records, strict=True):
        row = record.attention[1, [0, 2], 3].mean(axis=0)
        np.testing.assert_allclose(shown(model), np.bincount(index, weights=row, minlength=len(words)), rtol=1e-6)
    caption = view._sentence_element().get(1).dframe()["text"].iloc[1]
    assert caption.startswith(f"fine-tuned: attention of {view.records[1].tokens[3]} (layer 2, 2 heads) · predicts ")


def test_showing_the_view_again_shows_the_current_state(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, tau=0.05)
    rendered(view)
    view.select_heads([(1, 0)])
    rendered(view)
    title = view._flows[(PRETRAINED, FINETUNED)].last.opts.get().kwargs["title"]
    assert f"({sum(t.n_edges for t in view._traces().values())} edges)" in title


def test_a_head_map_brush_selects_those_heads_in_both_models(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, head_map=head_map(2, 4))
    rendered(view)
    points = view.head_map.points
    picked = points.index[(points["layer"] == 1) & (points["head"].isin([1, 3])) & (points["model"] == FINETUNED)].tolist()
    view._on_map_selection(type("Event", (), {"new": picked})())
    assert view.selected_heads() == [(1, 1), (1, 3)]
    outlined = view._grid_outline().dframe()
    assert len(outlined) == 2
    assert len(view._map_highlight().dframe()) == 4  # both models' copies of the two heads


def test_the_head_map_colours_by_layer_or_model_and_names_models_by_title(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT, head_map=head_map(2, 4))
    assert "map_color" in view._widgets()

    def scatter(pane: pn.Row):
        figure = hv.render(pane[0].object, backend="bokeh")
        return next(r for r in figure.renderers if type(r.glyph).__name__ == "Scatter" and "model_color" in r.data_source.data)

    by_layer = scatter(view._head_map_pane())
    assert list(by_layer.data_source.data["color"]) == list(by_layer.data_source.data["layer_label"])  # through a colour map
    view.map_color = "model"
    by_model = scatter(view._head_map_pane())
    assert list(by_model.data_source.data["color"]) == list(by_model.data_source.data["model_color"])
    assert set(by_model.data_source.data["model"]) == {"pre-trained", "fine-tuned"}
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
    assert list(view._flows) == [(PRETRAINED,)]
    assert "tiny (" in view._flows[(PRETRAINED,)][()].opts.get().kwargs["title"]
    view._ablate()
    assert "no classification head" in view.ablation.object
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
