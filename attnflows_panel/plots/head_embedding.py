"""The corpus head map: every head of both models as a point, fine-tuning moves as segments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd
from bokeh.models import Scatter

from attnflows_panel.plots.bound import Layer, field_legend

from attnflows_panel.plots import FINETUNED_COLOR, PRETRAINED_COLOR, holoviews_bokeh

if TYPE_CHECKING:
    import holoviews as hv

MODEL_COLORS = {"pretrained": PRETRAINED_COLOR, "finetuned": FINETUNED_COLOR}
RASTERIZE_ABOVE = 20_000  # points; beyond this they go through datashader


def head_embedding(
    points: pd.DataFrame,
    moves: pd.DataFrame | None = None,
    *,
    color_by: Literal["layer", "model"] = "layer",
    titles: dict[str, str] | None = None,
    title: str = "",
    width: int = 460,
    height: int = 420,
    responsive: bool = False,
) -> hv.Overlay:
    """``points`` (model, layer, head, x, y) as hv.Points; ``moves`` (x_from, y_from, x_to, y_to) as segments.

    ``titles`` names the models in the hover (default: their keys); a ``responsive`` map takes its container's width
    (at least ``width``) instead of ``width``.
    """
    hv = holoviews_bokeh()
    if color_by not in ("layer", "model"):
        raise ValueError(f"color_by must be 'layer' or 'model', got {color_by!r}")
    frame = points.assign(
        layer_label=points["layer"] + 1,
        head_label=points["head"] + 1,
        model_color=points["model"].map(MODEL_COLORS).fillna("#555555"),
        model=points["model"].replace(titles or {}),
    )
    tips = [("model", "@{model}"), ("layer", "@{layer_label}"), ("head", "@{head_label}")]
    colour = dict(color="model_color") if color_by == "model" else dict(color="layer_label", cmap="viridis", colorbar=True, clabel="layer")
    dots = hv.Points(frame, ["x", "y"], ["model", "layer", "head", "layer_label", "head_label", "model_color"], label="heads")
    if len(frame) > RASTERIZE_ABOVE:
        from holoviews.operation.datashader import dynspread, rasterize

        dots = dynspread(rasterize(dots)).opts(cmap="viridis")
    else:
        dots = dots.opts(size=7, line_color="white", line_width=0.5, hover_tooltips=tips, tools=["tap", "box_select", "lasso_select"], active_tools=["box_select"], nonselection_alpha=0.2, **colour)
    layers = []
    if moves is not None and len(moves):
        layers.append(hv.Segments(moves, ["x_from", "y_from", "x_to", "y_to"], ["layer", "head", "distance"], label="moves").opts(color="#b5b5b5", line_width=1, alpha=0.7))
    layers.append(dots)
    layers.append(hv.Points(highlight_frames(points, [])["highlight"], ["x", "y"], label="highlight").opts(size=13, fill_alpha=0, line_color="#d62728", line_width=2))
    size = dict(responsive=True, min_width=width) if responsive else dict(width=width)
    return hv.Overlay(layers).opts(hv.opts.Overlay(height=height, title=title, **size, xaxis=None, yaxis=None, show_legend=False, hooks=[field_legend(Scatter, "model", "model")] if color_by == "model" else []))


HIGHLIGHT_LAYERS = {"highlight": Layer(Scatter, {"x": "x", "y": "y"}, nth=1)}


def highlight_frames(points: pd.DataFrame, heads: Sequence[tuple[int, int]]) -> dict[str, pd.DataFrame]:
    """The points of ``heads`` (0-based layer, head) in both models, ringed in red on the head map."""
    chosen = set(heads)
    keep = [(int(layer), int(head)) in chosen for layer, head in zip(points["layer"], points["head"], strict=True)]
    return {"highlight": points.loc[keep, ["x", "y"]].reset_index(drop=True)}
