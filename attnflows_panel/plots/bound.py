"""Bokeh figures rendered once from HoloViews elements, whose sources the caller then rewrites with its own columns.

``hv.render`` draws an element; each glyph of a named ``Layer`` is then pointed at the caller's columns
(in every glyph state, colour-map transforms kept) and its source holds exactly the caller's frame. A
live view rewrites ``source.data`` with frames from the same builder: public Bokeh API only, and the
columns a glyph reads are always present (HoloViews turns a style column that is constant into a value).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from bokeh.core.property.vectorization import Field
from bokeh.model import Model
from bokeh.models import ColumnDataSource, CustomJS, Glyph, GlyphRenderer, Legend, LegendItem, Plot, Title

from attnflows_panel.plots import holoviews_bokeh

if TYPE_CHECKING:
    import holoviews as hv

GLYPH_STATES = ("glyph", "selection_glyph", "nonselection_glyph", "hover_glyph", "muted_glyph")
Frame = Mapping[str, object]  # column name -> values (a DataFrame or a dict of sequences)


@dataclass(frozen=True)
class Layer:
    """One glyph of a rendered element: its Bokeh glyph type, which occurrence of it, and the columns it reads."""

    glyph: type[Glyph]
    fields: Mapping[str, str] = field(default_factory=dict)  # glyph property -> column
    nth: int = 0


def columns(frame: Frame) -> dict[str, object]:
    """A frame as Bokeh source data: an array per numeric column, a list per other column (and per empty one)."""
    items = frame.items() if not isinstance(frame, pd.DataFrame) else ((c, frame[c].to_numpy()) for c in frame.columns)
    out: dict[str, object] = {}
    for name, values in items:
        values = values if isinstance(values, list) else np.asarray(values)
        # BokehJS rejects an empty float array as colours; texts as lists, as HoloViews renders them
        out[str(name)] = values.tolist() if isinstance(values, np.ndarray) and (len(values) == 0 or values.dtype.kind in "OU") else values
    return out


def renderer(plot: Plot, layer: Layer) -> GlyphRenderer:
    """The glyph renderer of ``layer`` in ``plot`` (its ``nth`` glyph of that type, in drawing order)."""
    found = [r for r in plot.renderers if isinstance(r, GlyphRenderer) and isinstance(r.glyph, layer.glyph)]  # in drawing order
    if len(found) <= layer.nth:
        raise ValueError(f"the rendered element has {len(found)} {layer.glyph.__name__} glyphs, not {layer.nth + 1}")
    return found[layer.nth]


def _point(glyph: Glyph, prop: str, column: str) -> None:
    """Point ``prop`` at ``column``, keeping a colour mapper that HoloViews set on it."""
    current = getattr(glyph, prop)
    transform = current.transform if isinstance(current, Field) else None
    setattr(glyph, prop, Field(column, transform=transform) if isinstance(transform, Model) else column)


def bind(plot: Plot, layers: Mapping[str, Layer], frames: Mapping[str, Frame]) -> dict[str, ColumnDataSource]:
    """Point each layer's glyphs at its columns and fill its source with its frame; the sources by layer name."""
    sources = {}
    for name, layer in layers.items():
        drawn = renderer(plot, layer)
        for state in GLYPH_STATES:
            glyph = getattr(drawn, state, None)
            if isinstance(glyph, Glyph):
                for prop, column in layer.fields.items():
                    if prop in glyph.properties():
                        _point(glyph, prop, column)
        drawn.data_source.data = {}  # else Bokeh keeps HoloViews' columns where they equal the frame's (in their own types)
        drawn.data_source.data = columns(frames[name])
        drawn.data_source.name = name
        sources[name] = drawn.data_source
    return sources


def render_bound(element: hv.core.Dimensioned, layers: Mapping[str, Layer], frames: Mapping[str, Frame]) -> tuple[Plot, dict[str, ColumnDataSource]]:
    """``element`` drawn by Bokeh with each layer bound to its frame (see :func:`bind`)."""
    hv = holoviews_bokeh()
    plot = hv.render(element, backend="bokeh")
    return plot, bind(plot, layers, frames)


def field_legend(glyph: type[Glyph], column: str, title: str, nth: int = 0) -> Callable[[object, object], None]:
    """A HoloViews hook adding a legend of the ``nth`` ``glyph``: one entry per distinct value of ``column``.

    The entries are read from the source in the browser, so a rewritten source rewrites the legend; an empty
    source hides it (no empty box).
    """

    def hook(plot: object, _: object) -> None:
        figure = plot.state
        drawn = renderer(figure, Layer(glyph, nth=nth))
        source = drawn.data_source
        legend = Legend(
            items=[LegendItem(label=Field(column), renderers=[drawn])], title=title, background_fill_alpha=0.8, label_text_font_size="9pt", title_text_font_size="9pt",
            visible=len(source.data.get(column, [])) > 0,
        )
        source.js_on_change("data", CustomJS(args={"legend": legend, "source": source}, code="legend.visible = source.get_length() > 0;"))
        figure.add_layout(legend, "right")

    return hook


def two_lines(text: str, separator: str = " · ") -> str:
    """``text`` broken into two lines at the ``separator`` nearest its middle (a caption under a narrow plot)."""
    parts = text.split(separator)
    if len(parts) < 2:
        return text
    lengths = [len(separator.join(parts[:i])) for i in range(1, len(parts))]
    cut = 1 + min(range(len(lengths)), key=lambda i: abs(lengths[i] - len(text) / 2))
    return separator.join(parts[:cut]) + "\n" + separator.join(parts[cut:])


def caption(text: str) -> Callable[[object, object], None]:
    """A HoloViews hook writing ``text`` under the plot, in small grey italics (what sizes and widths encode)."""

    def hook(plot: object, _: object) -> None:
        plot.state.add_layout(Title(text=text, text_font_size="9pt", text_font_style="italic", text_color="#555555", name="caption"), "below")

    return hook
