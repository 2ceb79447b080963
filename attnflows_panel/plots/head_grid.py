"""The layer x head grid: one cell per head, coloured by a measure or a model difference."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd


def head_grid_frame(values: np.ndarray, measure: str) -> pd.DataFrame:
    """Tidy ``[L, H]`` values: one row per head with 1-based layer and 0-based head, as the app labels them."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"head grid values must be [layers, heads], got shape {values.shape}")
    layer, head = np.meshgrid(np.arange(values.shape[0]), np.arange(values.shape[1]), indexing="ij")
    return pd.DataFrame({"head": head.ravel(), "layer": layer.ravel() + 1, measure: values.ravel()})


def head_grid(values: np.ndarray, measure: str, *, title: str = "", cmap: str = "viridis", symmetric: bool = False, width: int = 420, height: int = 300) -> hv.HeatMap:
    """One HeatMap cell per head (deepest layer on top), with tap and box select for brushing."""
    frame = head_grid_frame(values, measure)
    levels = frame["layer"].max()
    opts = dict(
        cmap=cmap,
        colorbar=True,
        tools=["hover", "tap", "box_select"],
        active_tools=["box_select"],
        xlabel="head",
        ylabel="layer",
        xticks=list(range(int(frame["head"].max()) + 1)),
        yticks=list(range(1, int(levels) + 1)),
        title=title,
        width=width,
        height=height,
        line_color="white",
        line_width=1,
        nonselection_alpha=0.25,
        clabel=measure,
    )
    if symmetric:
        bound = float(np.nanmax(np.abs(frame[measure]))) or 1.0
        opts["clim"] = (-bound, bound)
    return hv.HeatMap(frame, ["head", "layer"], [measure]).opts(**opts)


def heads_at(grid: hv.HeatMap, index: list[int]) -> list[tuple[int, int]]:
    """The (0-based layer, head) of the cells a Selection1D ``index`` on ``grid`` points at (Bokeh's cell order)."""
    gridded = grid.gridded
    heads, layers = gridded.dimension_values("head"), gridded.dimension_values("layer")
    return [(int(layers[i]) - 1, int(heads[i])) for i in index]
