"""Writing new elements into plots already on a page."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
from bokeh.document import Document

from attnflows_panel.components.live_plots import columns_read, redraw


def segments(widths: list[float], colors: list[str]) -> hv.Segments:
    n = len(widths)
    frame = pd.DataFrame({"x0": np.arange(n), "y0": 0.0, "x1": np.arange(n), "y1": 1.0, "width": widths, "color": colors})
    return hv.Segments(frame, ["x0", "y0", "x1", "y1"], ["width", "color"]).opts(line_width="width", color="color", title=f"{n} edges")


def test_a_style_column_that_becomes_constant_stays_in_the_source() -> None:
    """BokehJS's copies of a glyph keep reading a mapped column after HoloViews makes its style a constant."""
    renderer = hv.renderer("bokeh").instance(mode="server")
    plot = renderer.get_plot(segments([1.0, 2.0, 3.0], ["#ff0000", "#00ff00", "#0000ff"]), doc=Document())
    columns = columns_read(plot)
    assert {"line_width": "line_width", "color": "line_color"}.items() <= columns[id(plot)].items()

    redraw(plot, segments([2.5, 2.5], ["#00ff00", "#00ff00"]), columns)
    glyph, data = plot.handles["glyph"], plot.handles["source"].data
    assert glyph.line_width == 2.5 and glyph.line_color == "#00ff00"  # HoloViews made both constants
    assert list(data["line_width"]) == [2.5, 2.5] and list(data["color"]) == ["#00ff00", "#00ff00"]
    assert len(data["x0"]) == 2 and plot.handles["plot"].title.text == "2 edges"

    redraw(plot, segments([1.0, 4.0, 2.0, 3.0], ["#ff0000"] * 4), columns)  # back to a mapped width
    assert list(plot.handles["source"].data["line_width"]) == [1.0, 4.0, 2.0, 3.0]
    assert list(plot.handles["source"].data["color"]) == ["#ff0000"] * 4


def test_without_the_columns_holoviews_drops_a_constant_style_column() -> None:
    """The case ``redraw`` guards against: HoloViews' own glyph update leaves the column out of the source."""
    renderer = hv.renderer("bokeh").instance(mode="server")
    plot = renderer.get_plot(segments([1.0, 2.0, 3.0], ["#ff0000", "#00ff00", "#0000ff"]), doc=Document())
    redraw(plot, segments([2.5, 2.5], ["#00ff00", "#00ff00"]), {})
    assert "line_width" not in plot.handles["source"].data and plot.handles["glyph"].line_width == 2.5
