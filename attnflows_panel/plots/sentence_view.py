"""The sentence view: the words of an input, shaded by a value per word, one block per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bokeh.core.property.vectorization import value
from bokeh.models import Quad, Text

from attnflows_panel.plots import FINETUNED_COLOR, MODEL_TITLES, PRETRAINED_COLOR, holoviews_bokeh
from attnflows_panel.plots.bound import Layer

if TYPE_CHECKING:
    import holoviews as hv

ROW_COLORS = {"pretrained": PRETRAINED_COLOR, "finetuned": FINETUNED_COLOR}


CHAR_PX = 8.8  # the advance of an 11pt monospace glyph: one character unit of the layout, so words fill their boxes
CLOSING = frozenset(".,;:!?)]}%…")  # a word made only of these follows the word before it with no space
OPENING = frozenset("([{$")  # ... and the word after one of these follows it with no space
JOINERS = frozenset({"-", "–", "/", "'", "’"})  # "self-driving", "don't": no space either side


def sentence_layout(words: Sequence[str], max_chars: int = 90) -> pd.DataFrame:
    """Left-to-right positions of words in character units, wrapped at ``max_chars``: x0, x1, line."""
    x, line, rows, glue = 0.0, 0, [], False
    for word in words:
        width = max(1, len(word))
        attached = x > 0 and (glue or set(word) <= CLOSING or word in JOINERS)
        if attached:
            x -= 1  # "safely," not "safely ,"
        if x > 0 and x + width > max_chars:
            line += 1
            x = 0.0
            if attached and rows[-1][0] > 0:  # the word it sticks to goes along: no line starts with "."
                carried = rows[-1][1] - rows[-1][0]
                rows[-1] = (0.0, carried, line)
                x = carried
        rows.append((x, x + width, line))
        x += width + 1
        glue = word in JOINERS or (bool(word) and set(word) <= OPENING)
    return pd.DataFrame(rows, columns=["x0", "x1", "line"])


# Words and captions share one Labels layer and differ per row only in these styles: each mapped
# style costs about as much per update as a layer of its own, so size and colour stay scalar.
WORD_STYLE = {"align": "center", "font_style": "normal"}
CAPTION_STYLE = {"align": "left", "font_style": "bold"}
BORDER = 4  # pixels around the frame
BLOCK_GAP = 1.6  # lines between two models' blocks; the caption sits in it


def fitted(caption: str, max_chars: int) -> str:
    """``caption`` cut to the view's width with an ellipsis (a canvas text line never wraps)."""
    return caption if len(caption) <= max_chars else caption[: max_chars - 1].rstrip() + "…"


def shading(values: np.ndarray) -> np.ndarray:
    """Opacities in [0, 1]: the values scaled to their maximum (to 1 when none is positive), NaN as 0."""
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return np.clip(np.nan_to_num(values / peak), 0, 1)


def _checked(words: Sequence[str], values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    rows = [np.asarray(raw, dtype=float) for raw in values.values()]
    for model, vals in zip(values, rows, strict=True):
        if vals.shape != (len(words),):
            raise ValueError(f"{model}: {vals.shape[0] if vals.ndim else 0} values for {len(words)} words")
    return rows


SENTENCE_LAYERS = {
    # HoloViews turns a constant column into a value, which renders other glyph states: alpha is mapped here, to the fill and hatch
    "boxes": Layer(Quad, {"left": "x0", "bottom": "y0", "right": "x1", "top": "y1", "fill_color": "color", "fill_alpha": "alpha", "hatch_alpha": "alpha"}),
    "texts": Layer(Text, {"x": "x", "y": "y", "text": "text", "text_align": "align", "text_font_style": "font_style"}),
}


def sentence_frames(words: Sequence[str], values: Mapping[str, np.ndarray], captions: Mapping[str, str] | None = None, *, max_chars: int = 90) -> dict[str, pd.DataFrame]:
    """The columns the sentence view draws: one box per (model, word) and one text per word and caption."""
    rows = _checked(words, values)
    layout = sentence_layout(words, max_chars)
    x0, x1, line = (layout[c].to_numpy(dtype=float) for c in ("x0", "x1", "line"))
    lines = int(line.max()) + 1 if len(line) else 1
    models, blocks, n = list(values), len(values), len(words)
    tops = -np.arange(blocks) * (lines + BLOCK_GAP)
    y = (tops[:, None] - line[None, :]).ravel()  # block by block, word by word
    word_column = np.array([str(w) for w in words] * blocks, dtype=object)
    boxes = pd.DataFrame({
        "x0": np.tile(x0, blocks), "y0": y - 0.45, "x1": np.tile(x1, blocks), "y1": y + 0.45, "word": word_column,
        "value": np.concatenate([np.zeros(0), *rows]), "alpha": np.concatenate([np.zeros(0), *map(shading, rows)]),
        "model": np.repeat([MODEL_TITLES.get(m, m) for m in models], n).astype(object), "color": np.repeat([ROW_COLORS.get(m, "#555555") for m in models], n).astype(object),
    })
    texts = pd.DataFrame({
        "x": np.r_[np.zeros(blocks), np.tile((x0 + x1) / 2, blocks)], "y": np.r_[tops + 1.0, y],
        "text": np.r_[np.array([fitted((captions or {}).get(m, m), max_chars) for m in models], dtype=object), word_column],
        **{k: np.array([CAPTION_STYLE[k]] * blocks + [WORD_STYLE[k]] * (n * blocks), dtype=object) for k in WORD_STYLE},
    })
    return {"boxes": boxes, "texts": texts}


def sentence_extent(words: Sequence[str], blocks: int, max_chars: int = 90, title: str = "") -> tuple[int, tuple[float, float]]:
    """The sentence view's height in pixels and its y range, for ``blocks`` models' blocks of ``words``."""
    lines = len(sentence_layout(words, max_chars)["line"].unique()) or 1
    height = int(blocks * (lines + BLOCK_GAP) * 26) + (30 if title else 0) + 2 * BORDER  # a title takes a strip above the frame
    bottom = -(blocks - 1) * (lines + BLOCK_GAP) - lines
    return height, (bottom - 0.2, 1.6)


def sentence_view(
    words: Sequence[str],
    values: Mapping[str, np.ndarray],
    captions: Mapping[str, str] | None = None,
    *,
    max_chars: int = 90,
    title: str = "",
) -> hv.Overlay:
    """Each model's block of words on boxes whose opacity is the word's value (scaled to the block's max).

    ``max_chars`` monospace characters wide, so every word fills its box. Two layers, boxes and one Labels holding both the words and each block's caption (see :func:`sentence_frames`).
    """
    hv = holoviews_bokeh()
    frames = sentence_frames(words, values, captions, max_chars=max_chars)
    height, ylim = sentence_extent(words, len(values), max_chars, title)
    rects = hv.Rectangles(frames["boxes"], ["x0", "y0", "x1", "y1"], ["word", "value", "alpha", "model", "color"]).opts(
        color="color", fill_alpha="alpha", line_alpha=0, hover_tooltips=[("word", "@{word}"), ("model", "@{model}"), ("value", "@{value}{0.000}")]
    )
    labels = hv.Labels(frames["texts"], ["x", "y"], ["text", *WORD_STYLE]).opts(text_align="align", text_font_style="font_style", text_font_size="11pt", text_font=value("monospace"), text_color="#222222")
    return (rects * labels).opts(
        hv.opts.Overlay(width=round((max_chars + 1) * CHAR_PX) + 2 * BORDER, height=height, border=BORDER, xaxis=None, yaxis=None, xlim=(-0.5, max_chars + 0.5), ylim=ylim, title=title, toolbar=None, show_frame=False)
    )
