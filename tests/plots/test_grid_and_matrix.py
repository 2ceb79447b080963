"""Layer x head grid and attention matrix elements."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pytest
from bokeh.models import BoxSelectTool, TapTool

from attnflows_panel.plots.attention_matrix import attention_matrix
from attnflows_panel.plots.head_grid import head_grid, head_grid_frame

hv.extension("bokeh")


def test_grid_has_one_cell_per_head_and_brush_tools() -> None:
    values = np.arange(6 * 12, dtype=float).reshape(6, 12)
    element = head_grid(values, "entropy")
    frame = element.dframe()
    assert len(frame) == 72
    assert frame.set_index(["layer", "head"]).loc[(6, 11), "entropy"] == values[5, 11]
    figure = hv.render(element)
    assert any(isinstance(t, TapTool) for t in figure.tools) and any(isinstance(t, BoxSelectTool) for t in figure.tools)


def test_grid_symmetric_colour_range() -> None:
    element = head_grid(np.array([[-0.2, 0.5], [0.1, 0.0]]), "change", symmetric=True, cmap="RdBu_r")
    assert element.opts.get("plot").kwargs["clim"] == (-0.5, 0.5)


def test_grid_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"must be \[layers, heads\], got shape \(3,\)"):
        head_grid_frame(np.zeros(3), "x")


def test_matrix_keeps_repeated_tokens_distinct() -> None:
    a = np.eye(5)
    tokens = ["the", "cat", "the", "dog", "the"]
    figure = hv.render(attention_matrix(a, tokens))
    assert figure.xaxis[0].major_label_overrides == dict(enumerate(tokens))
    # query 0 is drawn at the top
    assert figure.yaxis[0].major_label_overrides[4] == "the" and figure.yaxis[0].major_label_overrides[3] == "cat"


def test_matrix_orientation() -> None:
    a = np.zeros((3, 3))
    a[0, 2] = 1.0  # query 0 attends to key 2
    image = attention_matrix(a, ["a", "b", "c"])
    assert image[2, 2] == 1.0  # key 2, drawn at the top row (query 0)
    assert image[2, 0] == 0.0


def test_large_matrix_goes_through_datashader() -> None:
    n = 200
    element = attention_matrix(np.full((n, n), 1 / n), [f"t{i}" for i in range(n)])
    assert isinstance(element, hv.DynamicMap)
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
        layer, head = heads_at(element, [index])[0]
        assert source.data["zvalues"][index] == values[layer, head]
