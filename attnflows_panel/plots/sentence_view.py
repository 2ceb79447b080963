"""The sentence view: the words of an input, shaded by a value per word, one block per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import holoviews as hv
import numpy as np
import pandas as pd

from attnflows_panel.plots import FINETUNED_COLOR, PRETRAINED_COLOR

ROW_COLORS = {"pretrained": PRETRAINED_COLOR, "finetuned": FINETUNED_COLOR}


def sentence_layout(words: Sequence[str], max_chars: int = 90) -> pd.DataFrame:
    """Left-to-right positions of words in character units, wrapped at ``max_chars``: x0, x1, line."""
    x, line, rows = 0.0, 0, []
    for word in words:
        width = max(1, len(word))
        if x > 0 and x + width > max_chars:
            x, line = 0.0, line + 1
        rows.append((x, x + width, line))
        x += width + 1
    return pd.DataFrame(rows, columns=["x0", "x1", "line"])


def sentence_view(
    words: Sequence[str],
    values: Mapping[str, np.ndarray],
    captions: Mapping[str, str] | None = None,
    *,
    max_chars: int = 90,
    width: int = 900,
    title: str = "",
) -> hv.Overlay:
    """Each model's row of words with a background whose opacity is the word's value (scaled to the row's max)."""
    layout = sentence_layout(words, max_chars)
    lines = int(layout["line"].max()) + 1 if len(layout) else 1
    boxes, texts, captions_rows = [], [], []
    for block, (model, raw) in enumerate(values.items()):
        vals = np.asarray(raw, dtype=float)
        if vals.shape != (len(words),):
            raise ValueError(f"{model}: {vals.shape[0] if vals.ndim else 0} values for {len(words)} words")
        peak = float(np.nanmax(vals)) if np.isfinite(vals).any() and np.nanmax(vals) > 0 else 1.0
        top = -block * (lines + 1.6)
        y = top - layout["line"].to_numpy()
        frame = layout.assign(y0=y - 0.45, y1=y + 0.45, x=(layout["x0"] + layout["x1"]) / 2, y=y, word=list(words), value=vals, alpha=np.clip(np.nan_to_num(vals / peak), 0, 1), model=model, color=ROW_COLORS.get(model, "#555555"))
        boxes.append(frame)
        texts.append(frame)
        captions_rows.append({"x": 0.0, "y": top + 1.0, "caption": (captions or {}).get(model, model)})
    box_frame, text_frame = pd.concat(boxes, ignore_index=True), pd.concat(texts, ignore_index=True)
    rects = hv.Rectangles(box_frame, ["x0", "y0", "x1", "y1"], ["word", "value", "alpha", "model", "color"]).opts(
        color="color", alpha="alpha", line_alpha=0, hover_tooltips=[("word", "@word"), ("model", "@model"), ("value", "@value{0.000}")]
    )
    labels = hv.Labels(text_frame, ["x", "y"], "word").opts(text_font_size="11pt", text_color="#222222")
    caption = hv.Labels(pd.DataFrame(captions_rows), ["x", "y"], "caption").opts(text_align="left", text_font_size="10pt", text_font_style="bold", text_color="#444444")
    blocks = len(values)
    height = int(40 + blocks * (lines + 1.6) * 26)
    bottom = -(blocks - 1) * (lines + 1.6) - lines
    return (rects * labels * caption).opts(
        hv.opts.Overlay(width=width, height=height, xaxis=None, yaxis=None, xlim=(-0.5, max_chars + 0.5), ylim=(bottom - 0.2, 1.6), title=title, toolbar=None, show_frame=False)
    )
