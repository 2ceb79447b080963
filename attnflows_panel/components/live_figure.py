"""One Bokeh figure on a page: drawn anew for each input, its sources rewritten in place on each brush."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import holoviews as hv
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColorMapper, ColumnDataSource, Plot

from attnflows_panel.plots.bound import Frame, Layer, columns, render_bound, renderer


class LiveFigure:
    """A ``pn.pane.Bokeh`` holding a figure rendered from a HoloViews element, with its bound sources.

    ``draw`` renders a new figure (ranges, axes and colour bars fitted to the new element); ``write``
    replaces the data of bound sources, the title and colour limits, all through public Bokeh properties.
    """

    def __init__(self, **pane_params: object) -> None:
        self.pane = pn.pane.Bokeh(None, **pane_params)
        self.figure: Plot | None = None
        self.sources: dict[str, ColumnDataSource] = {}

    def draw(self, element: hv.core.Dimensioned, layers: Mapping[str, Layer], frames: Mapping[str, Frame]) -> Plot:
        """Render ``element``, bind its ``layers`` to ``frames`` and show it."""
        self.figure, self.sources = render_bound(element, layers, frames)
        self.pane.object = self.figure
        return self.figure

    def clear(self) -> None:
        """Show nothing (no input)."""
        self.figure, self.sources = None, {}
        self.pane.object = None

    def on_select(self, layer: Layer, callback: Callable[[list[int], dict], None]) -> None:
        """Call ``callback(indices, data)`` when the user selects rows of ``layer`` (box, lasso or tap)."""
        source = renderer(self.figure, layer).data_source
        source.selected.on_change("indices", lambda _attr, _old, new: callback(list(new), source.data))

    def on_tap(self, callback: Callable[[float, float], None]) -> None:
        """Call ``callback(x, y)`` with the data coordinates of a click on the plot."""
        self.figure.on_event(Tap, lambda event: callback(event.x, event.y))

    def write(self, frames: Mapping[str, Frame], *, title: str | None = None, clim: tuple[float, float] | None = None, caption: str | None = None, same_rows: bool = False) -> None:
        """Replace the data of the bound sources in ``frames``, and the title, colour limits and caption when given.

        A selection is cleared unless ``same_rows`` says the new rows stand for the same things (the grid's heads).
        """
        if self.figure is None:
            return
        for name, frame in frames.items():
            self.sources[name].data = columns(frame)
            if not same_rows:
                self.sources[name].selected.indices = []  # a selection made on the old rows (a tap on a node) means nothing now
        if title is not None and self.figure.title is not None:
            self.figure.title.text = title
        if caption is not None:
            self.figure.select_one({"name": "caption"}).text = caption
        if clim is not None:
            for source in frames:
                for mapper in _color_mappers(self._glyph(source)):
                    mapper.update(low=clim[0], high=clim[1])
        pn.io.push_notebook(self.pane)  # a notebook display gets the change through its comm; a server session directly

    def _glyph(self, name: str) -> object:
        return next(r.glyph for r in self.figure.renderers if getattr(r, "data_source", None) is self.sources[name])


def _color_mappers(glyph: object) -> list[ColorMapper]:
    """The colour mappers of ``glyph``: an Image's own, or the transform of a colour field (a grid cell's ``fill_color``)."""
    mappers = [getattr(glyph, "color_mapper", None), getattr(getattr(glyph, "fill_color", None), "transform", None)]
    return [mapper for mapper in mappers if isinstance(mapper, ColorMapper)]
