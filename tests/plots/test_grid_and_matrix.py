"""Layer x head grid and attention matrix elements."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pytest
from bokeh.models import BoxSelectTool, CustomJSHover, HoverTool, TapTool
from conftest import BOKEH_IDLE_JS

from attnflows_panel.plots.attention_matrix import attention_matrix
from attnflows_panel.plots.head_grid import head_grid, head_grid_frame, numbered_ticks

hv.extension("bokeh")


def test_grid_has_one_cell_per_head_and_brush_tools() -> None:
    values = np.arange(6 * 12, dtype=float).reshape(6, 12)
    element = head_grid(values, "entropy")
    frame = element.dframe()
    assert len(frame) == 72
    assert frame.set_index(["layer", "head"]).loc[(6, 12), "value"] == values[5, 11]  # layers and heads from 1
    figure = hv.render(element)
    assert any(isinstance(t, TapTool) for t in figure.tools) and any(isinstance(t, BoxSelectTool) for t in figure.tools)


def test_grid_symmetric_colour_range() -> None:
    element = head_grid(np.array([[-0.2, 0.5], [0.1, 0.0]]), "change", symmetric=True, cmap="RdBu_r")
    assert element.opts.get("plot").kwargs["clim"] == (-0.5, 0.5)


def test_grid_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"must be \[layers, heads\], got shape \(3,\)"):
        head_grid_frame(np.zeros(3), "x")


def image_source(figure) -> dict:
    return next(r.data_source.data for r in figure.renderers if "image" in r.data_source.data)


def hover_of(figure) -> HoverTool:
    return next(t for t in figure.tools if isinstance(t, HoverTool))


def test_matrix_keeps_repeated_tokens_distinct() -> None:
    tokens = ["the", "cat", "the", "dog", "the"]
    figure = hv.render(attention_matrix(np.eye(5), tokens))
    for axis in (figure.xaxis[0], figure.yaxis[0]):  # a tick at position i is named names[i] (y == query index)
        assert axis.formatter.args["names"] == tokens and "names[i]" in axis.formatter.code


@pytest.mark.parametrize("rasterize", [False, True])
def test_matrix_orientation(rasterize: bool) -> None:
    """The value at (x = key j, y = query i) is attention[i, j], and query 0 is drawn at the top."""
    n = 7
    a = np.arange(n * n, dtype=float).reshape(n, n)
    element = attention_matrix(a, [f"t{i}" for i in range(n)], rasterize=rasterize)
    if not rasterize:
        assert element[2, 0] == a[0, 2] and element[0, 2] == a[2, 0]  # element[key, query]
    figure = hv.render(element)
    data = image_source(figure)
    # Bokeh puts image row k at y = y0 + k (cells of height dh / n): row i is query i, column j is key j
    assert (data["x"][0], data["y"][0], data["dw"][0], data["dh"][0]) == (-0.5, -0.5, n, n)
    np.testing.assert_allclose(np.asarray(data["image"][0]), a)
    assert figure.y_range.start > figure.y_range.end  # inverted: y = 0 (query 0) at the top


def test_matrix_of_one_token() -> None:
    data = image_source(hv.render(attention_matrix(np.ones((1, 1)), ["[CLS]"])))
    assert (data["x"][0], data["y"][0], data["dw"][0], data["dh"][0]) == (-0.5, -0.5, 1, 1)


@pytest.mark.parametrize("rasterize", [False, True])
def test_matrix_hover_names_tokens_from_data(rasterize: bool) -> None:
    tokens = ["[CLS]", "<img src=x onerror=alert(1)>", "car", "car", "[SEP]"]
    hover = hover_of(hv.render(attention_matrix(np.eye(5), tokens, rasterize=rasterize)))
    assert hover.tooltips == [("key", "$x{custom}"), ("query", "$y{custom}"), ("weight", "@image{0.000}")]
    for axis in ("$x", "$y"):
        formatter = hover.formatters[axis]
        assert isinstance(formatter, CustomJSHover) and formatter.args == {"names": tokens}
        assert "<img" not in formatter.code and "car" not in formatter.code  # names are data, never code


AXIS_LABELS_JS = """(zoom) => {
  const seen = new Set(), out = {};
  function* walk(view) { if (view == null || seen.has(view)) return; seen.add(view); yield view; if (typeof view.children === "function") for (const c of view.children()) yield* walk(c); }
  for (const root of Object.values(Bokeh.index)) for (const view of walk(root)) {
    if (zoom && view.model.x_range) view.model.x_range.setv({start: zoom[0], end: zoom[1]});
    if (view.tick_coords !== undefined && view.model.formatter && view.model.axis_label)  // the key and query axes, not the colour bar's
      out[view.model.axis_label] = view.model.formatter.doFormat(view.tick_coords.major[view.dimension], {loc: 0});
  }
  return out;
}"""


def test_matrix_tick_names_are_data_and_thin_out_with_size() -> None:
    tokens = ["<b>x</b>", *(f"t{i}" for i in range(1, 64))]
    small, big = (hv.render(attention_matrix(np.eye(64), tokens, size=size)) for size in (340, 800))
    for axis in (small.xaxis[0], small.yaxis[0]):
        assert axis.formatter.args == {"names": tokens} and "<b>" not in axis.formatter.code  # names are data, never code
        assert axis.ticker.desired_num_ticks == (340 - 140) // 12 and axis.ticker.min_interval == 1  # 12 px a name in the frame
    assert big.xaxis[0].ticker.desired_num_ticks == (800 - 140) // 12
    assert hv.render(attention_matrix(np.eye(64), tokens, max_labels=8)).xaxis[0].ticker.desired_num_ticks == 8


@pytest.mark.browser
def test_matrix_labels_thin_out_and_every_token_shows_zoomed_in(page, tmp_path) -> None:
    """80 tokens on 480 px: every 2nd token is named; zoomed in to 11 keys, each of them is."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    tokens = [f"w{i}" for i in range(80)]
    path = tmp_path / "matrix.html"
    path.write_text(file_html(hv.render(attention_matrix(np.eye(80), tokens, title="M", size=480)), INLINE, "matrix"))
    page.goto(path.as_uri())
    page.wait_for_function(BOKEH_IDLE_JS)
    shown = page.evaluate(AXIS_LABELS_JS, None)
    assert shown["key"] == shown["query"] == tokens[::2]
    page.evaluate(AXIS_LABELS_JS, [9.5, 20.5])
    page.wait_for_timeout(300)
    shown = page.evaluate(AXIS_LABELS_JS, None)
    assert shown["key"] == tokens[10:21] and shown["query"] == tokens[::2]


@pytest.mark.browser
@pytest.mark.parametrize("rasterize", [False, True])
def test_matrix_hover_in_a_browser(page, plot_point, tmp_path, rasterize: bool) -> None:
    """Hovering cell (key 1, query 3) shows both tokens and their weight; markup in a token stays text."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    n = 120 if rasterize else 8
    tokens = ["[CLS]", "<img src=x onerror=window.__xss=1>", "the", "car", *[f"t{i}" for i in range(4, n)]]
    a = np.random.default_rng(0).random((n, n))
    path = tmp_path / "matrix.html"
    path.write_text(file_html(hv.render(attention_matrix(a, tokens, title="M", rasterize=rasterize)), INLINE, "matrix"))
    page.goto(path.as_uri())
    page.wait_for_function(BOKEH_IDLE_JS)
    page.mouse.move(*plot_point(page, "M", 1, 3))
    tooltip = page.locator(".bk-tooltip-content")
    tooltip.wait_for()
    assert tooltip.inner_text().split("\n") == ["key:\t<img src=x onerror=window.__xss=1> (1)", "query:\tcar (3)", f"weight:\t{a[3, 1]:.3f}"]
    assert page.evaluate("() => window.__xss") is None


def test_large_matrix_goes_through_datashader() -> None:
    n = 1000
    attention = np.random.default_rng(0).random((n, n)).astype(np.float32)
    attention /= attention.sum(axis=1, keepdims=True)
    element = attention_matrix(attention, [f"t{i}" for i in range(n)])
    # a plain Image (views return it from their own DynamicMaps), aggregated by datashader to its canvas
    assert isinstance(element, hv.Image)
    values = element.dimension_values("weight", flat=False)
    assert values.shape == (400, 400)
    assert values.mean() == pytest.approx(attention.mean(), rel=1e-3)
    hv.render(element)


def test_matrix_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"expected \(2, 2\) for 2 tokens"):
        attention_matrix(np.eye(3), ["a", "b"])


def test_selection_indices_map_to_the_cells_bokeh_draws() -> None:
    from attnflows_panel.plots.head_grid import heads_at

    values = np.arange(6 * 12, dtype=float).reshape(6, 12)
    element = head_grid(values, "v")
    figure = hv.render(element)
    source = next(r.data_source for r in figure.renderers if "zvalues" in r.data_source.data)
    for index in (0, 5, 52, 71):
        layer, head = heads_at(source.data, [index])[0]
        assert source.data["zvalues"][index] == values[layer, head]



def test_a_grid_of_many_layers_numbers_every_other_or_every_4th_cell() -> None:
    assert numbered_ticks(12) == list(range(1, 13))  # the default model's: every one
    assert numbered_ticks(32) == list(range(1, 32, 2))  # 32 labels in 230 px overlapped
    assert numbered_ticks(80) == [1, *range(5, 81, 5)]
    figure = hv.render(head_grid(np.zeros((32, 32)), "v"))
    assert list(figure.yaxis[0].ticker.ticks) == list(range(1, 32, 2)) and list(figure.xaxis[0].ticker.ticks) == list(range(1, 32, 2))


WARM_CHECK = """
import sys
import holoviews as hv
import numpy as np
from numba.core.registry import CPUDispatcher
from attnflows_panel.plots.attention_matrix import attention_matrix, warm_rasterizer

def compiled():
    return sum(len(obj.signatures) for name, module in list(sys.modules.items()) if name.startswith("datashader")
               for obj in list(vars(module).values()) if isinstance(obj, CPUDispatcher))

warm_rasterizer()
warmed = compiled()
for n in (97, 128, 300, 600):
    hv.render(attention_matrix(np.full((n, n), 1.0 / n), [str(i) for i in range(n)], rasterize=True), backend="bokeh")
print(warmed, compiled())
"""


@pytest.mark.slow
def test_warming_the_rasterizer_compiles_what_matrices_need() -> None:
    """After ``warm_rasterizer`` (in a fresh process), rasterized matrices of any size compile no new kernel."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WARM_CHECK], capture_output=True, text=True, check=True, timeout=300)
    warmed, after = map(int, out.stdout.split())
    assert warmed > 0 and after == warmed


def test_a_long_input_s_matrix_colours_weights_by_rank() -> None:
    """A decoder's first row (all on itself) made a long map blank on a linear scale up to 1."""
    from bokeh.models import EqHistColorMapper, LinearColorMapper

    def mapper(n: int) -> object:
        a = np.tril(np.ones((n, n)))
        a /= a.sum(-1, keepdims=True)
        figure = hv.render(attention_matrix(a, [f"t{i}" for i in range(n)]))
        return next(r.glyph.color_mapper for r in figure.renderers if hasattr(r.glyph, "color_mapper"))

    assert isinstance(mapper(200), EqHistColorMapper) and type(mapper(40)) is LinearColorMapper
