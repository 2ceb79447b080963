"""CompareView: one input through a pre-trained / fine-tuned pair, merged or side by side."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import panel as pn
import param

from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED
from attnflows_panel.components.attention_view import DIFFERENCE, MEASURE_LABELS, AttentionView
from attnflows_panel.extract import AttentionRecord
from attnflows_panel.models.pair import ModelPair
from attnflows_panel.plots import MODEL_TITLES


class CompareView(AttentionView):
    """A sentence's attention in both models of a pair: grid by model difference, flows merged or side by side."""

    mode = param.Selector(default="merged", objects=["merged", "side by side"], doc="One flow diagram with both models' edges coloured by model, or one diagram per model.")
    grid_model = param.Selector(default=FINETUNED, objects={MODEL_TITLES[m]: m for m in (FINETUNED, PRETRAINED)}, doc="Model whose measure the grid shows (not used by the model difference).")

    def __init__(self, pair: ModelPair, text: str | None = None, *, head_map: HeadEmbedding | None = None, **params: object) -> None:
        self.pair = pair
        models = {PRETRAINED: pair.pretrained, FINETUNED: pair.finetuned}
        super().__init__(models, pair, text, head_map, MODEL_TITLES, **params)
        self.param.measure.objects = {DIFFERENCE: DIFFERENCE, **{label: m for m, label in MEASURE_LABELS.items()}}  # this instance's
        if "measure" not in params:
            self.measure = DIFFERENCE

    def _flow_modes(self) -> list[str]:
        return ["mode"]

    def _grid_params(self) -> list[str]:
        return ["measure", "grid_model"]

    def _flow_layouts(self) -> list[tuple[str, ...]]:
        return [(PRETRAINED, FINETUNED)] if self.mode == "merged" else [(PRETRAINED,), (FINETUNED,)]

    def _grid_values(self, shown: tuple[AttentionRecord, ...] | None = None) -> np.ndarray:
        pre, fine = self.shown if shown is None else shown
        if self.measure == DIFFERENCE:
            return self._computed(pre, ("difference", id(fine)), None, lambda: head_js_divergence(pre.source, fine.source))
        return self._measures(fine if self.grid_model == FINETUNED else pre)[self.measure]

    def _grid_title(self) -> str:
        return DIFFERENCE if self.measure == DIFFERENCE else f"{MEASURE_LABELS[self.measure]} ({MODEL_TITLES[self.grid_model]})"

    def export(self, path: str | os.PathLike, *, top_heads: int = 4) -> Path:
        """Write this input, tau, alpha, top-k and head selection as a self-contained HTML dashboard (see ``attnflows export``)."""
        from attnflows_panel.export import export_dashboard

        return export_dashboard(self.records, path, tau=self.tau, alpha=self.alpha, top_heads=top_heads, head_mask=self.head_mask, top_k=self.top_k)

    def _widgets(self) -> dict[str, dict[str, object]]:
        widgets = super()._widgets() | {
            "mode": {"type": pn.widgets.RadioButtonGroup, "name": "Models"},
            "grid_model": {"type": pn.widgets.RadioButtonGroup, "name": "Grid model"},
        }
        if self.head_map is not None:
            widgets["map_color"] = {"type": pn.widgets.RadioButtonGroup, "name": "Head map colour"}
        return widgets

    def controls(self) -> pn.viewable.Viewable:
        """The widgets that drive this view ("Grid model" off while the grid shows the model difference) and a download."""
        column = super().controls()
        grid_model = next(w for w in column if getattr(w, "name", None) == "Grid model")
        grid_model.disabled = self.measure == DIFFERENCE
        self.param.watch(lambda event: setattr(grid_model, "disabled", event.new == DIFFERENCE), "measure")
        download = pn.widgets.FileDownload(
            callback=self._report, filename="attnflows-report.html", label="Download this input as an HTML report", color="success",
            description="A self-contained page (works offline) with this input, tau, alpha and head selection.", sizing_mode="stretch_width", disabled=self.records is None,
        )
        self.param.watch(lambda event: setattr(download, "disabled", event.new is None), "records")
        column.append(download)
        return column

    def _report(self) -> io.StringIO:
        """The static dashboard of this input and selection, for the download button."""
        from attnflows_panel.export import dashboard_html

        return io.StringIO(dashboard_html(self.records, tau=self.tau, alpha=self.alpha, head_mask=self.head_mask, top_k=self.top_k))
