"""The layer x head grid: one cell per head, coloured by a measure or a model difference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from bokeh.models import Quad, Rect

from attnflows_panel.plots import holoviews_bokeh
from attnflows_panel.plots.bound import Layer

if TYPE_CHECKING:
    import holoviews as hv


def head_grid_frame(values: np.ndarray, measure: str) -> pd.DataFrame:
    """Tidy ``[L, H]`` values: one row per head (the ``measure`` column), layers and heads numbered from 1 as every view labels them."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"head grid values must be [layers, heads], got shape {values.shape}")
    layer, head = np.meshgrid(np.arange(values.shape[0]), np.arange(values.shape[1]), indexing="ij")
    return pd.DataFrame({"head": head.ravel() + 1, "layer": layer.ravel() + 1, measure: values.ravel()})


GRID_LAYERS = {
    "cells": Layer(Rect, {"x": "head", "y": "layer", "width": "width", "height": "height", "fill_color": "value"}),
    "outline": Layer(Quad, {"left": "x0", "bottom": "y0", "right": "x1", "top": "y1"}),
}


def grid_frames(values: np.ndarray, heads: Sequence[tuple[int, int]]) -> dict[str, pd.DataFrame]:
    """The cells of :func:`head_grid` and the outlines of ``heads``, in the columns of ``GRID_LAYERS``."""
    cells = head_grid_frame(values, "value").assign(width=1.0, height=1.0)
    return {"cells": cells, **grid_outline_frames(heads)}


def grid_clim(values: np.ndarray) -> tuple[float, float]:
    """The colour limits :func:`head_grid` gives ``values`` (their finite range)."""
    finite = np.asarray(values, dtype=float)[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def numbered_ticks(count: int, most: int = 16) -> list[int]:
    """Ticks numbering 1 .. ``count``: every one up to ``most``, else every other one, or 1 and every 4th, 5th, 8th...
    (a 32-layer grid's labels overlapped)."""
    step = next((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 50, 100) if count / s <= most), -(-count // most))
    return list(range(1, count + 1, step)) if step <= 2 else [1, *range(step, count + 1, step)]


def head_grid(values: np.ndarray, measure: str, *, title: str = "", cmap: str | list[str] = "viridis", symmetric: bool = False, width: int = 420, height: int = 300) -> hv.HeatMap:
    """One HeatMap cell per head (deepest layer on top), with tap and box select for brushing."""
    hv = holoviews_bokeh()
    frame = head_grid_frame(values, "value")
    levels = frame["layer"].max()
    opts = dict(
        cmap=cmap,
        colorbar=True,
        tools=["hover", "tap", "box_select"],
        hover_tooltips=[("layer", "@{layer}"), ("head", "@{head}"), (measure, "@{value}{0.000}")],
        active_tools=["box_select"],
        xlabel="head",
        ylabel="layer",
        xticks=numbered_ticks(int(frame["head"].max())),
        yticks=numbered_ticks(int(levels)),
        title=title,
        width=width,
        height=height,
        line_color="white",
        line_width=1,
        nonselection_alpha=0.25,
        clabel=measure,
    )
    if symmetric:
        bound = float(np.nanmax(np.abs(frame["value"]))) or 1.0
        opts["clim"] = (-bound, bound)
    else:
        opts["clim"] = grid_clim(values)
    return hv.HeatMap(frame, ["head", "layer"], [hv.Dimension("value", label=measure)]).opts(**opts)


def grid_outline_frames(heads: Sequence[tuple[int, int]]) -> dict[str, pd.DataFrame]:
    """Boxes around the cells of ``heads`` (0-based layer, head), as :func:`grid_outline` draws them."""
    boxes = [(h + 0.5, layer + 0.5, h + 1.5, layer + 1.5) for layer, h in heads]
    return {"outline": pd.DataFrame(boxes, columns=["x0", "y0", "x1", "y1"], dtype=float)}


def grid_outline(heads: Sequence[tuple[int, int]]) -> hv.Rectangles:
    """Red outlines of the cells of ``heads``, to overlay on :func:`head_grid` (a selection made elsewhere)."""
    hv = holoviews_bokeh()
    return hv.Rectangles(grid_outline_frames(heads)["outline"], ["x0", "y0", "x1", "y1"]).opts(fill_alpha=0, line_color="#d62728", line_width=2)


def heads_at(cells: Mapping[str, Sequence[int]], index: Sequence[int]) -> list[tuple[int, int]]:
    """The (0-based layer, head) of the grid cells at ``index`` in the rendered grid's source data ``cells``."""
    return [(int(cells["layer"][i]) - 1, int(cells["head"][i]) - 1) for i in index]
