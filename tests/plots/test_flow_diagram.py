"""The flow diagram element, inspected through its Bokeh rendering (no browser)."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pytest
from bokeh.models import HoverTool

from attnflows_panel.analysis.flows import trace_cls_flow
from attnflows_panel.plots import FINETUNED_COLOR, PRETRAINED_COLOR, SHARED_COLOR
from attnflows_panel.plots.flow_diagram import flow_diagram, flow_edges, flow_frames, flow_nodes

hv.extension("bokeh")

TOKENS = ["[CLS]", "the", "car", "<img src=x onerror=alert(1)>", "was", "safe", ".", "[SEP]"]


@pytest.fixture(scope="module")
def traces():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.full(8, 0.3), size=(4, 3, 8))
    b = rng.dirichlet(np.full(8, 0.3), size=(4, 3, 8))
    return {"pretrained": trace_cls_flow(a, tau=0.3), "finetuned": trace_cls_flow(b, tau=0.3)}


def test_edges_are_the_union_with_labels(traces) -> None:
    edges = flow_edges(TOKENS, traces)
    pre, fine = traces["pretrained"], traces["finetuned"]
    ids = lambda t: set(zip(t.edge_layer.tolist(), t.edge_query.tolist(), t.edge_key.tolist(), strict=True))  # noqa: E731
    got = {label: set(zip(g["layer"], g["query"], g["key"], strict=True)) for label, g in edges.groupby("label")}
    assert got["shared"] == ids(pre) & ids(fine)
    assert got["pretrained"] == ids(pre) - ids(fine)
    assert got["finetuned"] == ids(fine) - ids(pre)
    assert (edges["weight"] >= 0.3).all()
    assert edges.loc[edges["key"] == 3, "key_token"].eq(TOKENS[3]).all()


def test_nodes_carry_influence_of_both_models(traces) -> None:
    nodes = flow_nodes(TOKENS, traces)
    assert len(nodes) == 5 * 8
    top = nodes[(nodes.level == 4) & (nodes["index"] == 0)]
    assert top["label"].item() == "shared"
    np.testing.assert_allclose(nodes["influence_pretrained"], traces["pretrained"].influence.ravel())


@pytest.mark.parametrize("layout", ["layered", "radial"])
def test_rendered_glyphs_and_colours(traces, layout: str) -> None:
    element = flow_diagram(TOKENS, traces, layout=layout)
    figure = hv.render(element, backend="bokeh")
    glyphs = {type(r.glyph).__name__: r for r in figure.renderers}
    assert {"Segment", "Scatter"} <= set(glyphs)
    segment_source = glyphs["Segment"].data_source.data
    assert len(segment_source["x0"]) == len(flow_edges(TOKENS, traces))
    colours = dict(zip(segment_source["label"], segment_source["color"], strict=True))
    assert colours == {"shared": SHARED_COLOR, "pretrained": PRETRAINED_COLOR, "finetuned": FINETUNED_COLOR}
    assert any(isinstance(t, HoverTool) for t in figure.tools)
    # token text is drawn on the canvas (tick labels or a Text glyph), never as HTML
    if layout == "layered":
        assert figure.xaxis[0].major_label_overrides[3] == TOKENS[3]
    else:
        ring_labels = next(r.data_source.data for r in figure.renderers if "token" in r.data_source.data and type(r.glyph).__name__ == "Text")
        assert TOKENS[3] in list(ring_labels["token"])


def test_radial_layout_puts_levels_on_rings(traces) -> None:
    element = flow_diagram(TOKENS, traces, layout="radial")
    points = element.get(1).dframe()
    radius = np.hypot(points["x"], points["y"])
    np.testing.assert_allclose(radius, points["level"] + 1.0)
    figure, levels = hv.render(element), int(points["level"].max()) + 1
    names = next(r for r in figure.renderers if "text" in r.data_source.data and "layer 1" in list(r.data_source.data["text"]))
    assert list(names.data_source.data["text"]) == ["input", *(f"layer {i}" for i in range(1, levels))]  # one name per ring, on its ring
    np.testing.assert_allclose(np.hypot(names.data_source.data["x"], names.data_source.data["y"]), 1.0 + np.arange(levels))
    assert names.glyph.background_fill_color == "white"  # edges crossing a name never cover it


def test_empty_trace_draws_tokens_without_edges() -> None:
    a = np.full((2, 2, 4, 4), 0.25)
    empty = trace_cls_flow(a, head_mask=np.zeros((2, 2), bool))
    element = flow_diagram(["[CLS]", "a", "b", "[SEP]"], {"finetuned": empty})
    assert len(element.get(0).dframe()) == 0
    assert len(element.get(1).dframe()) == 3 * 4


def test_a_long_input_names_some_tokens_on_the_axis_and_every_one_zoomed_in() -> None:
    n = 300
    tokens = [f"t{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    attention = rng.random((2, 2, n, n))
    attention /= attention.sum(-1, keepdims=True)
    trace = trace_cls_flow(attention, None, tau=0.02, top_k=2)
    axis = hv.render(flow_diagram(tokens, {"pretrained": trace}), backend="bokeh").xaxis[0]
    assert axis.ticker.desired_num_ticks == 100 and axis.ticker.min_interval == 1  # about 100 names, 1 apart once zoomed in
    assert axis.formatter.args["names"] == tokens  # each tick named by its token


def test_one_model_s_tooltips_do_not_call_it_pre_trained(traces) -> None:
    figure = hv.render(flow_diagram(TOKENS, {"pretrained": traces["pretrained"]}), backend="bokeh")
    names = [name for tool in figure.tools if isinstance(tool, HoverTool) for name, _ in tool.tooltips]
    assert "weight" in names and "heads" in names and "influence" in names
    assert not any("pre-trained" in name for name in names)
    pair = hv.render(flow_diagram(TOKENS, traces), backend="bokeh")
    assert "pre-trained weight" in [name for tool in pair.tools if isinstance(tool, HoverTool) for name, _ in tool.tooltips]


def test_a_long_input_draws_only_the_nodes_its_trace_reaches() -> None:
    n = 300
    rng = np.random.default_rng(1)
    attention = rng.random((2, 2, n, n)) ** 8
    attention /= attention.sum(-1, keepdims=True)
    trace = trace_cls_flow(attention, None, tau=0.05, top_k=2)
    nodes = flow_frames([f"t{i}" for i in range(n)], {"pretrained": trace})["nodes"]
    reached = flow_nodes([f"t{i}" for i in range(n)], {"pretrained": trace})["label"] != ""
    assert 0 < len(nodes) == reached.sum() < 3 * n  # the root is reached
    assert (nodes["label"] != "").all()
