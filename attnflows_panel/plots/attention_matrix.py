"""Attention matrices on integer token positions (so repeated tokens stay distinct), rasterized when large."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from bokeh.models import BasicTicker, CustomJSHover, CustomJSTickFormatter, PrintfTickFormatter
from bokeh.models import Image as ImageGlyph

from attnflows_panel.plots import holoviews_bokeh
from attnflows_panel.plots.bound import Layer

if TYPE_CHECKING:
    import holoviews as hv

RASTERIZE_ABOVE = 96  # tokens; beyond this the matrix goes through datashader
PX_PER_LABEL = 12  # one tick label per this many pixels, so labels never overlap
MATRIX_CHROME = 140  # pixels of a matrix's side its title, rotated token names and axis label take from the frame
TICK_NAME = """
const i = Math.round(tick);
return (i === tick && i >= 0 && i < names.length) ? names[i] : "";
"""

# The token names arrive as data (``names``), never as code; Bokeh escapes what a formatter returns
# before it builds the tooltip (templating.replace_placeholders_html), so markup in a token stays text.
TOKEN_AT = """
const i = Math.round(value);
return (i >= 0 && i < names.length) ? `${names[i]} (${i})` : "";
"""


def token_axis(tokens: Sequence[str], limit: int) -> tuple[BasicTicker, CustomJSTickFormatter]:
    """Ticks on token positions (1, 2 or 5 apart, about ``limit`` in view, every token once zoomed in) named by their tokens."""
    ticker = BasicTicker(desired_num_ticks=max(1, limit), min_interval=1, mantissas=[1, 2, 5], num_minor_ticks=0)
    return ticker, CustomJSTickFormatter(args={"names": [str(t) for t in tokens]}, code=TICK_NAME)


def token_hover(tokens: Sequence[str]) -> CustomJSHover:
    """A tooltip formatter turning a hovered coordinate into ``"token (index)"`` by its rounded index."""
    return CustomJSHover(args={"names": [str(t) for t in tokens]}, code=TOKEN_AT)


def matrix_bounds(n_tokens: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of an ``n_tokens`` matrix: each token a unit square centred on its position."""
    return -0.5, -0.5, n_tokens - 0.5, n_tokens - 0.5


def weight_clim(attention: np.ndarray) -> tuple[float, float]:
    """A matrix's colour limits: 0 to its largest weight."""
    return 0.0, float(max(attention.max(), 1e-6))


def label_limit(size: int) -> int:
    """About how many tick labels an axis of a ``size``-pixel matrix shows: one per ``PX_PER_LABEL`` of its frame."""
    return max(1, (size - MATRIX_CHROME) // PX_PER_LABEL)


def attention_matrix(
    attention: np.ndarray,
    tokens: Sequence[str],
    *,
    title: str = "",
    cmap: str | list[str] = "Blues",
    size: int = 360,
    rasterize: bool | None = None,
    max_labels: int | None = None,
    by_rank: bool = True,
) -> hv.Element:
    """An ``[n, n]`` map: key ``j`` at x = j, query ``i`` at y = i, query 0 at the top; token labels on both axes.

    The hover names the key and query tokens with their indices and gives the weight. About
    ``max_labels`` tick labels per axis in view (default: one per 12 pixels of the frame); zooming in labels every token.
    A rasterized map is coloured by rank (``by_rank``), a smaller one linearly up to its largest weight.
    """
    hv = holoviews_bokeh()
    a = np.asarray(attention, dtype=np.float32)
    n = len(tokens)
    if a.shape != (n, n):
        raise ValueError(f"attention has shape {a.shape}, expected ({n}, {n}) for {n} tokens")
    # hv.Image draws array row 0 at the top of its bounds, so the flipped rows put a[i, j] at (x = j, y = i);
    # the inverted y axis then shows query 0 at the top. Explicit bounds also hold for a single token.
    image = hv.Image(a[::-1], bounds=matrix_bounds(n), kdims=["key", "query"], vdims=["weight"])
    limit = max_labels if max_labels is not None else label_limit(size)
    (xticker, xnames), (yticker, ynames) = token_axis(tokens, limit), token_axis(tokens, limit)  # a model per axis
    names = token_hover(tokens)  # one formatter model serves both axes
    plot_opts = dict(
        cmap=cmap,
        clim=weight_clim(a),
        xticks=xticker,
        yticks=yticker,
        xformatter=xnames,
        yformatter=ynames,
        invert_yaxis=True,
        xrotation=90,
        title=title,
        width=size + 60,
        height=size,
        colorbar=True,
        clabel="weight",
        hover_tooltips=[("key", "$x{custom}"), ("query", "$y{custom}"), ("weight", "@image{0.000}")],
        hover_formatters={"$x": names, "$y": names},
        xlabel="key",
        ylabel="query",
        active_tools=["pan"],  # the wheel scrolls the page, not the matrix
    )
    if rasterize if rasterize is not None else n > RASTERIZE_ABOVE:
        from holoviews.operation.datashader import rasterize as ds_rasterize

        if by_rank:  # a long input's weights are mostly near 1/n, and a few near 1 (a decoder's first row) left it blank
            plot_opts.update(cnorm="eq_hist", clabel="weight (colours by rank)", colorbar_opts={"formatter": PrintfTickFormatter(format="%.2g")})

        # dynamic=False: an Image, not a DynamicMap, so views may return it from their own DynamicMaps
        return ds_rasterize(image, aggregator="mean", dynamic=False).opts(**plot_opts)
    return image.opts(**plot_opts)


MATRIX_LAYERS = {"image": Layer(ImageGlyph, {"image": "image", "x": "x", "y": "y", "dw": "dw", "dh": "dh"})}


def matrix_frames(matrix: hv.Image) -> dict[str, dict[str, list]]:
    """The columns Bokeh draws an :func:`attention_matrix` from (rasterized or not), as ``hv.render`` fills them."""
    left, bottom, right, top = matrix.bounds.lbrt()
    image = {"image": [matrix.dimension_values(2, flat=False)], "x": [left], "y": [bottom], "dw": [right - left], "dh": [top - bottom]}
    return {"image": image}


def matrix_clim(matrix: hv.Image) -> tuple[float, float]:
    """The colour limits an :func:`attention_matrix` was given."""
    return matrix.opts.get("plot").kwargs["clim"]


def warm_rasterizer() -> None:
    """Compile datashader's raster kernels (about 1.5 s, once per process) so that no user waits for them.

    Calls datashader directly, not HoloViews, so that it may run in a thread beside a server's sessions.
    """
    import datashader as ds
    import xarray as xr

    n = RASTERIZE_ABOVE + 1
    coords = np.arange(n, dtype=float)
    matrix = xr.DataArray(np.full((n, n), 1.0 / n, dtype=np.float32), coords={"y": coords, "x": coords}, dims=("y", "x"))
    for pixels in (n // 2, 2 * n):  # downsampling and upsampling
        canvas = ds.Canvas(plot_width=pixels, plot_height=pixels, x_range=(-0.5, n - 0.5), y_range=(-0.5, n - 0.5))
        canvas.raster(matrix, upsample_method="nearest", downsample_method=ds.reductions.mean())
