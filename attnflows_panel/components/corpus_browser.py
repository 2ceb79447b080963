"""CorpusBrowser: a run's corpus table, to find the sentences worth a closer look (most different first)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from attnflows_panel.plots import MODEL_TITLES

PAGE_SIZE = 20
TEXT_COLUMNS = ("text", "text_pair")
TITLES = {"sentence_id": "#", "text_pair": "text pair", "prediction_changed": "changed", "difference": "difference", "n_tokens": "tokens"}
HEADER_TIPS = {
    "difference": "How differently the two models attend to this sentence: the mean over heads of the Jensen-Shannon divergence of their attention rows (bits, 0 = the same).",
    "prediction_changed": "The two models predict different classes.",
    "n_tokens": "Word pieces, [CLS] and [SEP] included.",
}


class CorpusBrowser(pn.viewable.Viewer):
    """The corpus table, sortable and filterable; choosing a row sets :attr:`chosen` to its text and text pair."""

    chosen = param.Tuple(default=None, length=2, allow_None=True, doc="(text, text_pair or '') of the row last chosen")

    def __init__(self, table: pd.DataFrame, **params: Any) -> None:
        super().__init__(**params)
        shown = table.assign(text_pair=table["text_pair"].fillna("").astype(str))
        self.tabulator = pn.widgets.Tabulator(
            shown,
            disabled=True,
            show_index=False,
            selectable=1,
            pagination="remote",
            page_size=PAGE_SIZE,
            sorters=[{"field": "difference", "dir": "desc"}],
            header_filters=header_filters(shown),
            formatters=formatters(shown),
            titles={c: title(c) for c in shown.columns},
            widths={"text": 300, "text_pair": 200},
            header_tooltips=header_tips(shown),
            hidden_columns=blank_columns(shown, ("text_pair", "label")),
            layout="fit_data_table",
            sizing_mode="stretch_width",
        )
        self.tabulator.param.watch(self._on_selection, "selection")
        self.tabulator.on_click(self._on_click)

    def __panel__(self) -> pn.viewable.Viewable:
        return self.tabulator

    def _on_selection(self, event: param.parameterized.Event) -> None:
        if event.new:
            self._choose(event.new[-1])

    def _on_click(self, event: Any) -> None:
        self._choose(event.row)

    def _choose(self, iloc: int) -> None:
        row = self.tabulator.value.iloc[iloc]
        self.chosen = (str(row["text"]), str(row["text_pair"]))


def title(column: str) -> str:
    """A short header: a model's name for its prediction, ``p(model)`` for that prediction's probability,
    ``model ✓`` for whether it is the label."""
    if column.startswith(("predicted_", "probability_", "correct_")):
        kind, name = column.split("_", 1)
        model = MODEL_TITLES.get(name, name)
        return {"predicted": model, "probability": f"p({model})", "correct": f"{model} ✓"}[kind]
    return TITLES.get(column, column)


def header_tips(table: pd.DataFrame) -> dict[str, str]:
    """What a column means, shown when the pointer rests on its header."""
    tips = {c: tip for c, tip in HEADER_TIPS.items() if c in table.columns}
    tips |= {c: f"Whether {title(c).removesuffix(' ✓')} predicts the gold label." for c in table.columns if c.startswith("correct_")}
    return tips


def blank_columns(table: pd.DataFrame, columns: tuple[str, ...]) -> list[str]:
    """Those of ``columns`` with no value in any row (a corpus without pairs or labels)."""
    return [c for c in columns if not (table[c].notna() & (table[c].astype(str) != "")).any()]


def label_columns(table: pd.DataFrame) -> list[str]:
    """The gold label and every model's predicted label."""
    return [c for c in table.columns if c == "label" or c.startswith("predicted_")]


def header_filters(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Text search on the texts; a list of the values present (all pages, not only the shown one) on the labels."""
    filters: dict[str, dict[str, Any]] = {c: {"type": "input", "func": "like", "placeholder": "contains"} for c in TEXT_COLUMNS}
    for column in label_columns(table):
        values = sorted(table[column].dropna().unique().tolist(), key=str)
        filters[column] = {"type": "list", "func": "=", "values": values, "clearable": True}
    for column in tick_columns(table):
        filters[column] = {"type": "tickCross", "func": "=", "tristate": True, "indeterminateValue": None}
    return filters


def tick_columns(table: pd.DataFrame) -> list[str]:
    """The yes / no columns: a changed prediction, a prediction equal to the label."""
    return [c for c in table.columns if c == "prediction_changed" or c.startswith("correct_")]


def formatters(table: pd.DataFrame) -> dict[str, Any]:
    """Texts and labels as escaped plain text (texts wrapped), ticks for yes / no, fractions to 3 decimals."""
    out: dict[str, Any] = {c: {"type": "textarea"} for c in TEXT_COLUMNS}
    out |= {c: {"type": "plaintext"} for c in label_columns(table)}
    out |= {c: {"type": "tickCross"} for c in tick_columns(table)}
    out |= {c: NumberFormatter(format="0.000") for c in table.columns if c == "difference" or c.startswith("probability_")}
    return out
