"""CompareView: one input through a pre-trained / fine-tuned pair, merged or side by side."""

from __future__ import annotations

import numpy as np
import panel as pn
import param

from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED
from attnflows_panel.analysis.heads import head_measures
from attnflows_panel.components.attention_view import DIFFERENCE, MEASURE_NAMES, AttentionView
from attnflows_panel.models.pair import ModelPair

MODEL_TITLES = {PRETRAINED: "pre-trained", FINETUNED: "fine-tuned"}


class CompareView(AttentionView):
    """A sentence's attention in both models of a pair: grid by model difference, flows merged or side by side."""

    mode = param.Selector(default="merged", objects=["merged", "side by side"])
    grid_model = param.Selector(default=FINETUNED, objects=[FINETUNED, PRETRAINED], doc="Model whose measure the grid shows.")

    def __init__(self, pair: ModelPair, text: str | None = None, *, head_map: HeadEmbedding | None = None, **params: object) -> None:
        self.pair = pair
        models = {PRETRAINED: pair.pretrained, FINETUNED: pair.finetuned}
        super().__init__(models, pair, text, head_map, MODEL_TITLES, **params)
        self.param.measure.objects = [DIFFERENCE, *MEASURE_NAMES]
        if "measure" not in params:
            self.measure = DIFFERENCE

    def _grid_streams(self) -> list[str]:
        return ["records", "measure", "grid_model"]

    def _flow_groups(self) -> list[tuple[str, ...]]:
        return [(PRETRAINED, FINETUNED), (PRETRAINED,), (FINETUNED,)]

    def _grid_values(self) -> np.ndarray:
        pre, fine = self.records
        if self.measure == DIFFERENCE:
            return head_js_divergence(pre.attention, fine.attention)
        record = fine if self.grid_model == FINETUNED else pre
        return head_measures(record.attention, record.tokens, record.cls_mask, record.sep_mask)[self.measure]

    def _grid_title(self) -> str:
        return self.measure if self.measure == DIFFERENCE else f"{self.measure} ({MODEL_TITLES[self.grid_model]})"

    @param.depends("mode")
    def _flow_panel(self) -> pn.viewable.Viewable:
        if self.mode == "merged":
            return pn.pane.HoloViews(self._flows[(PRETRAINED, FINETUNED)], linked_axes=False)
        return pn.Row(pn.pane.HoloViews(self._flows[(PRETRAINED,)], linked_axes=False), pn.pane.HoloViews(self._flows[(FINETUNED,)], linked_axes=False))

    def _widgets(self) -> dict[str, dict[str, object]]:
        return super()._widgets() | {
            "mode": {"type": pn.widgets.RadioButtonGroup, "name": "Models"},
            "grid_model": {"type": pn.widgets.RadioButtonGroup, "name": "Grid model"},
        }
