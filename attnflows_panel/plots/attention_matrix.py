"""Attention matrices on integer token positions (so repeated tokens stay distinct), rasterized when large."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np

RASTERIZE_ABOVE = 96  # tokens; beyond this the matrix goes through datashader


def _ticks(tokens: Sequence[str], limit: int = 64) -> list[tuple[int, str]]:
    step = max(1, int(np.ceil(len(tokens) / limit)))
    return [(i, str(t)) for i, t in enumerate(tokens)][::step]


def attention_matrix(attention: np.ndarray, tokens: Sequence[str], *, title: str = "", cmap: str = "Blues", size: int = 360, rasterize: bool | None = None) -> hv.Element:
    """An ``[n, n]`` map, query rows top to bottom and keys left to right, token labels on both axes."""
    a = np.asarray(attention, dtype=np.float32)
    n = len(tokens)
    if a.shape != (n, n):
        raise ValueError(f"attention has shape {a.shape}, expected ({n}, {n}) for {n} tokens")
    # hv.Image draws array row 0 at the top (y = n - 1), so query 0 sits at the top like a matrix
    image = hv.Image(a, bounds=(-0.5, -0.5, n - 0.5, n - 0.5), kdims=["key", "query"], vdims=["weight"])
    ticks = _ticks(tokens)
    plot_opts = dict(
        cmap=cmap,
        clim=(0.0, float(max(a.max(), 1e-6))),
        xticks=ticks,
        yticks=[(n - 1 - i, t) for i, t in ticks],
        xrotation=90,
        title=title,
        width=size + 60,
        height=size,
        colorbar=False,
        tools=["hover"],
        xlabel="key",
        ylabel="query",
    )
    if rasterize if rasterize is not None else n > RASTERIZE_ABOVE:
        from holoviews.operation.datashader import rasterize as ds_rasterize

        return ds_rasterize(image, aggregator="mean").opts(**plot_opts)
    return image.opts(**plot_opts)
