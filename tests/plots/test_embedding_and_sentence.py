"""Head map and sentence view elements."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import pytest

from attnflows_panel.plots import FINETUNED_COLOR, PRETRAINED_COLOR
from attnflows_panel.plots.head_embedding import head_embedding
from attnflows_panel.plots.sentence_view import sentence_layout, sentence_view


@pytest.fixture
def head_map() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    layer, head = np.repeat(np.arange(2), 3), np.tile(np.arange(3), 2)
    points = pd.DataFrame({"model": ["pretrained"] * 6 + ["finetuned"] * 6, "layer": np.r_[layer, layer], "head": np.r_[head, head], "x": rng.normal(size=12), "y": rng.normal(size=12)})
    moves = pd.DataFrame({"layer": layer, "head": head, "x_from": points.x[:6].to_numpy(), "y_from": points.y[:6].to_numpy(), "x_to": points.x[6:].to_numpy(), "y_to": points.y[6:].to_numpy(), "distance": 1.0})
    return points, moves


def test_head_map_points_and_moves(head_map) -> None:
    points, moves = head_map
    figure = hv.render(head_embedding(points, moves, color_by="model"))
    glyphs = {type(r.glyph).__name__: r.data_source.data for r in figure.renderers}
    assert len(glyphs["Segment"]["x_from"]) == 6
    assert set(glyphs["Scatter"]["model_color"]) == {PRETRAINED_COLOR, FINETUNED_COLOR}
    assert list(glyphs["Scatter"]["layer_label"][:3]) == [1, 1, 1]


def test_head_map_without_moves_and_bad_colouring(head_map) -> None:
    points, _ = head_map
    figure = hv.render(head_embedding(points.iloc[:6]))
    assert [type(r.glyph).__name__ for r in figure.renderers] == ["Scatter"]
    with pytest.raises(ValueError, match="color_by must be 'layer' or 'model'"):
        head_embedding(points, color_by="size")


def test_sentence_layout_wraps() -> None:
    layout = sentence_layout(["aaaa", "bb", "cccccc"], max_chars=8)
    assert layout["line"].tolist() == [0, 0, 1]
    assert layout.loc[1, "x0"] == 5 and layout.loc[2, "x0"] == 0


def test_sentence_view_shades_by_value_and_keeps_markup_as_text() -> None:
    words = ["<img src=x onerror=alert(1)>", "is", "great"]
    element = sentence_view(words, {"pretrained": np.array([0.0, 0.5, 1.0]), "finetuned": np.array([2.0, 0.0, 1.0])}, {"finetuned": "fine-tuned: positive (91%)"})
    figure = hv.render(element)
    rect = next(r.data_source.data for r in figure.renderers if type(r.glyph).__name__ == "Quad")
    np.testing.assert_allclose(rect["alpha"], [0.0, 0.5, 1.0, 1.0, 0.0, 0.5])
    texts = [r.data_source.data for r in figure.renderers if type(r.glyph).__name__ == "Text"]
    assert words[0] in list(texts[0]["word"])
    assert "fine-tuned: positive (91%)" in list(texts[1]["caption"])


def test_sentence_view_value_count_mismatch() -> None:
    with pytest.raises(ValueError, match="finetuned: 2 values for 3 words"):
        sentence_view(["a", "b", "c"], {"finetuned": np.ones(2)})
