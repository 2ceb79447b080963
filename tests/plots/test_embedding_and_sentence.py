"""Head map and sentence view elements."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import pytest

from attnflows_panel.plots import FINETUNED_COLOR, PRETRAINED_COLOR
from attnflows_panel.plots.head_embedding import head_embedding
from attnflows_panel.plots.sentence_view import CHAR_PX, sentence_layout, sentence_view


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
    glyphs = {type(r.glyph).__name__: r.data_source.data for r in figure.renderers if len(r.data_source.data.get("x", [0]))}  # not the (empty) highlight
    assert len(glyphs["Segment"]["x_from"]) == 6
    assert set(glyphs["Scatter"]["model_color"]) == {PRETRAINED_COLOR, FINETUNED_COLOR}
    assert list(glyphs["Scatter"]["layer_label"][:3]) == [1, 1, 1]


def test_head_map_without_moves_and_bad_colouring(head_map) -> None:
    points, _ = head_map
    figure = hv.render(head_embedding(points.iloc[:6]))
    assert [type(r.glyph).__name__ for r in figure.renderers] == ["Scatter", "Scatter"]  # the heads, then the ring of selected ones
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
    (text,) = [r.data_source.data for r in figure.renderers if type(r.glyph).__name__ == "Text"]
    assert words[0] in list(text["text"])  # a plain data value, drawn as text by a canvas glyph
    assert "fine-tuned: positive (91%)" in list(text["text"]) and "pretrained" in list(text["text"])  # caption or model name


def test_sentence_view_is_two_layers_with_words_and_captions_styled_per_row() -> None:
    """Boxes plus one Labels layer: words centred at their box, each block's caption bold and left-aligned above it."""
    words = ["good", "film"]
    element = sentence_view(words, {"pretrained": np.array([1.0, 0.0]), "finetuned": np.array([0.0, 1.0])}, {"pretrained": "pre", "finetuned": "fine"})
    assert [type(layer).__name__ for layer in element] == ["Rectangles", "Labels"]
    figure = hv.render(element)
    assert [type(r.glyph).__name__ for r in figure.renderers] == ["Quad", "Text"]
    (text,) = [r for r in figure.renderers if type(r.glyph).__name__ == "Text"]
    rows = pd.DataFrame({k: list(v) for k, v in text.data_source.data.items()})
    word_rows, captions = rows[rows["text"].isin(words)], rows.set_index("text").loc[["pre", "fine"]]
    for field in ("text_align", "text_font_style"):
        assert getattr(text.glyph, field).field == field  # a data column, not one value
    assert captions["text_align"].tolist() == ["left", "left"] and captions["text_font_style"].tolist() == ["bold", "bold"]
    assert set(word_rows["text_align"]) == {"center"} and set(word_rows["text_font_style"]) == {"normal"}
    quads = next(r.data_source.data for r in figure.renderers if type(r.glyph).__name__ == "Quad")
    centres = (np.asarray(quads["left"]) + np.asarray(quads["right"])) / 2
    np.testing.assert_allclose(word_rows["x"].to_numpy(), centres)  # both blocks' words, in order
    np.testing.assert_allclose(word_rows["y"].to_numpy(), (np.asarray(quads["bottom"]) + np.asarray(quads["top"])) / 2)
    assert captions.loc["pre", "y"] > word_rows["y"].iloc[0] > captions.loc["fine", "y"] > word_rows["y"].iloc[-1]  # caption above its block


def test_sentence_view_follows_new_values_with_one_message_per_source() -> None:
    """In place, as in the app: a new frame patches each of the two sources once (no per-column extras)."""
    from bokeh.document import Document
    from bokeh.document.events import ColumnDataChangedEvent

    words, counter = ["a", "good", "film"], hv.streams.Counter()
    dmap = hv.DynamicMap(lambda counter: sentence_view(words, {"pretrained": np.array([1.0, 2.0, 4.0]) ** counter}, {"pretrained": "pre"}), streams=[counter])
    doc = Document()
    plot = hv.renderer("bokeh").get_plot(dmap, doc=doc)
    doc.add_root(plot.state)
    quads = next(r.data_source for r in plot.state.renderers if type(r.glyph).__name__ == "Quad")
    np.testing.assert_allclose(quads.data["alpha"], [1.0, 1.0, 1.0])  # counter 0: all values 1
    events: list = []
    doc.on_change(events.append)
    counter.event()
    patched = [e.model for e in events if isinstance(e, ColumnDataChangedEvent)]
    assert len(patched) == len({id(m) for m in patched}) == 2
    np.testing.assert_allclose(quads.data["alpha"], [0.25, 0.5, 1.0])


def test_sentence_view_value_count_mismatch() -> None:
    with pytest.raises(ValueError, match="finetuned: 2 values for 3 words"):
        sentence_view(["a", "b", "c"], {"finetuned": np.ones(2)})


def test_punctuation_follows_its_word_and_the_frame_is_monospace_characters_wide() -> None:
    layout = sentence_layout(["the", "self", "-", "driving", "car", "(", "sadly", ")", "stopped", "."], max_chars=90)
    assert layout["x0"].tolist() == [0, 4, 8, 9, 17, 21, 22, 27, 29, 36]  # "the self-driving car (sadly) stopped."
    wrapped = sentence_layout(["critics", "loved", "the", "cooking", ".", "critics"], max_chars=25)  # "." would start line 2
    assert wrapped.values.tolist() == [[0, 7, 0], [8, 13, 0], [14, 17, 0], [0, 7, 1], [7, 8, 1], [9, 16, 1]]  # "cooking." goes along
    figure = hv.render(sentence_view(["a", "b"], {"pretrained": np.ones(2)}, max_chars=40))
    assert figure.width - figure.min_border_left - figure.min_border_right == round(41 * CHAR_PX)  # the frame: one character unit per monospace glyph advance
    (text,) = [r for r in figure.renderers if type(r.glyph).__name__ == "Text"]
    assert text.glyph.text_font.value == "monospace"  # a value, not a column of that name
