"""Write a new element into a HoloViews plot that is already on a page, glyph by glyph, without a full update."""

from __future__ import annotations

from collections.abc import Iterator

import holoviews as hv
import numpy as np
from bokeh.core.property.vectorization import Field
from bokeh.models import Glyph

GLYPH_STATES = ("glyph", "selection_glyph", "nonselection_glyph", "hover_glyph", "muted_glyph")


def glyph_plots(plot: object) -> Iterator[object]:
    """The plots under ``plot`` that draw one glyph each (an overlay's layers, or the plot itself)."""
    subplots = getattr(plot, "subplots", None)
    yield from subplots.values() if subplots else [plot]


def columns_read(plot: object) -> dict[int, dict[str, str]]:
    """Per glyph plot (by id), the source columns its glyph states read, each with the glyph property reading it."""
    out: dict[int, dict[str, str]] = {}
    for sub in glyph_plots(plot):
        renderer = sub.handles.get("glyph_renderer")
        for state in GLYPH_STATES:
            glyph = getattr(renderer, state, None)
            if isinstance(glyph, Glyph):
                for name, value in glyph.properties_with_values(include_defaults=False).items():
                    if isinstance(value, Field):
                        out.setdefault(id(sub), {})[value.field] = name
    return out


def redraw(plot: object, element: hv.Element, columns: dict[int, dict[str, str]]) -> None:
    """Write ``element`` into ``plot``'s glyphs and sources (data, mapped styles, colour limits, title), then push.

    HoloViews turns a style column whose values are all equal into a constant and drops the column. BokehJS
    draws from copies of each glyph made when the page loaded (its decimated glyph), which keep reading that
    column; so every column in ``columns`` stays in its source, filled with the glyph's constant.
    """
    if getattr(plot, "subplots", None):
        pairs = [(sub, element.data[key]) for key, sub in plot.subplots.items() if key in element.data]
    else:
        pairs = [(plot, element)]
    for sub, layer in pairs:
        style = sub.lookup_options(layer, "style")[sub.cyclic_index]
        read = columns.get(id(sub), {})
        post = sub._postprocess_data  # noqa: SLF001 - HoloViews' last step before the data reaches the source
        sub._postprocess_data = lambda data, sub=sub, post=post, read=read: _keep_columns(post(data), sub.handles["glyph"], read)  # noqa: SLF001
        try:
            sub._update_glyphs(layer, sub.current_ranges or {}, style)  # noqa: SLF001 - HoloViews' own per-glyph update
        finally:
            del sub._postprocess_data  # noqa: SLF001
        clim = layer.opts.get().kwargs.get("clim")
        if clim is not None and "color_mapper" in sub.handles:
            sub.handles["color_mapper"].update(low=clim[0], high=clim[1])
    title = element.opts.get().kwargs.get("title")
    if title is not None and plot.handles.get("plot") is not None and plot.handles["plot"].title is not None:
        plot.handles["plot"].title.text = title
    plot.push()  # a notebook display gets the change through its comm; a server session through the document


def _keep_columns(data: dict[str, object], glyph: Glyph, read: dict[str, str]) -> dict[str, object]:
    """``data`` with each column in ``read`` that it lacks filled with the glyph's now constant property."""
    n = len(next(iter(data.values()))) if data else 0
    for column, name in read.items():
        value = getattr(glyph, name, None)
        if column not in data and value is not None and not isinstance(value, (Field, dict)):
            data[column] = np.full(n, value, dtype=object if isinstance(value, str) else None)
    return data
