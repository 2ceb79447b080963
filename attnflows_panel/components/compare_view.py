"""CompareView: one sentence through a pre-trained / fine-tuned pair, with linked head brushing."""

from __future__ import annotations

import html

import holoviews as hv
import numpy as np
import panel as pn
import param

from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, rollout_trace, trace_cls_flow
from attnflows_panel.analysis.heads import MEASURES, head_measures
from attnflows_panel.components.records import pair_records
from attnflows_panel.errors import AttnflowsError
from attnflows_panel.extract import AttentionRecord, merge_tokens
from attnflows_panel.models.pair import ModelPair
from attnflows_panel.plots.attention_matrix import attention_matrix
from attnflows_panel.plots.flow_diagram import flow_diagram
from attnflows_panel.plots.head_grid import head_grid, heads_at
from attnflows_panel.plots.sentence_view import sentence_view

DIFFERENCE = "model difference (JS, bits)"
MEASURE_NAMES = [DIFFERENCE] + [name for name, _ in MEASURES]
MODEL_TITLES = {PRETRAINED: "pre-trained", FINETUNED: "fine-tuned"}
DEFAULT_TEXT = "The self-driving car stopped safely, and I finally felt relaxed."


class CompareView(pn.viewable.Viewer):
    """A sentence's attention in both models: head grid, flow diagram, matrices, sentence view, ablation."""

    text = param.String(default=DEFAULT_TEXT, doc="The sentence (first segment).")
    text_pair = param.String(default="", doc="Optional second segment.")
    tau = param.Number(default=0.1, bounds=(0.01, 1.0), step=0.01, doc="Keep edges with at least this weight.")
    alpha = param.Number(default=0.5, bounds=(0.0, 1.0), step=0.05, doc="Weight of deeper influence.")
    method = param.Selector(default="trace", objects=["trace", "rollout"], doc="CLS trace or rollout relevance.")
    combine = param.Selector(default="union", objects=["union", "mean"], doc="How heads combine in the trace.")
    layout = param.Selector(default="layered", objects=["layered", "radial"])
    mode = param.Selector(default="merged", objects=["merged", "side by side"])
    measure = param.Selector(default=DIFFERENCE, objects=MEASURE_NAMES, doc="Colour of the head grid.")
    grid_model = param.Selector(default=FINETUNED, objects=[FINETUNED, PRETRAINED], doc="Model whose measure the grid shows.")
    head_mask = param.Array(default=None, doc="Selected heads, bool [layers, heads]; all when nothing is brushed.")
    root = param.Tuple(default=(-1, 0), length=2, doc="(level, token) the trace starts from; level -1 is the deepest.")
    records = param.Parameter(default=None, precedence=-1, doc="(pre-trained, fine-tuned) records of the input.")
    notice = param.String(default="", precedence=-1)

    def __init__(self, pair: ModelPair, text: str | None = None, **params: object) -> None:
        super().__init__(**params)
        self.pair = pair
        self.head_mask = np.ones((pair.n_layers, pair.n_heads), dtype=bool)
        self.ablation = pn.pane.Markdown("", sizing_mode="stretch_width")
        self._ablate_button = pn.widgets.Button(label="Switch selected heads off", color="primary")
        self._ablate_button.on_click(self._ablate)
        self._grid = hv.DynamicMap(self._grid_element, streams=[hv.streams.Params(self, ["records", "measure", "grid_model"])])
        self._grid_selection = hv.streams.Selection1D(source=self._grid)
        self._grid_selection.param.watch(self._on_grid_selection, "index")
        flow_streams = ["records", "head_mask", "tau", "alpha", "method", "combine", "layout", "root"]
        self._flows = {}
        for models in ((PRETRAINED, FINETUNED), (PRETRAINED,), (FINETUNED,)):
            tap = hv.streams.Tap(transient=True)
            tap.add_subscriber(self._on_tap)
            dmap = hv.DynamicMap(self._flow_callback(models), streams=[hv.streams.Params(self, flow_streams), tap])
            self._flows[models] = dmap
        if text is not None:
            self.text = text
        self.param.watch(self._update_records, ["text", "text_pair"])
        self._update_records()

    # ------------------------------------------------------------------ state
    def _update_records(self, *_: object) -> None:
        text, pair_text = self.text, self.text_pair.strip() or None
        self.ablation.object = ""
        if not text.strip():
            self.param.update(records=None, notice="Type a sentence to see how both models attend to it.")
            return
        try:
            records = pair_records(self.pair, text, pair_text)
        except AttnflowsError as exc:
            self.param.update(records=None, notice=str(exc))
            return
        notice = ""
        if records[0].n_truncated:
            notice = f"The input was longer than the model allows: the last {records[0].n_truncated} tokens were dropped."
        self.param.update(records=records, root=(-1, 0), notice=notice)

    def _on_grid_selection(self, event: param.parameterized.Event) -> None:
        self.select_heads(heads_at(self._grid.last, event.new) if event.new else [])

    def select_heads(self, heads: list[tuple[int, int]]) -> None:
        """Set the head mask to ``heads`` (layer, head), or to every head when empty."""
        mask = np.zeros((self.pair.n_layers, self.pair.n_heads), dtype=bool)
        for layer, head in heads:
            mask[layer, head] = True
        self.head_mask = mask if mask.any() else ~mask

    def _on_tap(self, x: float | None = None, y: float | None = None, **_: object) -> None:
        """Re-root the trace on the token nearest a click in the flow diagram."""
        if self.records is None or x is None or y is None:
            return
        n, levels = self.records[0].n_tokens, self.pair.n_layers + 1
        if self.layout == "layered":
            token, level = int(round(x)), int(round(y))
        else:
            level = int(round(np.hypot(x, y) - 1.0))
            token = int(round(((np.pi / 2 - np.arctan2(y, x)) % (2 * np.pi)) / (2 * np.pi) * n)) % n
        if 0 <= token < n and 1 <= level < levels:
            self.root = (level, token)

    def _root(self) -> tuple[int, int]:
        level, token = self.root
        return (self.pair.n_layers if level < 0 else level, token)

    # ------------------------------------------------------------------ elements
    def _traces(self) -> dict[str, object]:
        pre, fine = self.records
        traces = {}
        for name, record in ((PRETRAINED, pre), (FINETUNED, fine)):
            if self.method == "rollout":
                traces[name] = rollout_trace(record.attention, self.head_mask, tau=self.tau, root=self._root())
            else:
                traces[name] = trace_cls_flow(record.attention, self.head_mask, tau=self.tau, alpha=self.alpha, root=self._root(), combine=self.combine)
        return traces

    def _flow_callback(self, models: tuple[str, ...]):  # noqa: ANN202
        def callback(**_: object) -> hv.Overlay:
            return self._flow_element(models)

        return callback

    def _flow_element(self, models: tuple[str, ...]) -> hv.Overlay:
        if self.records is None:
            return hv.Overlay([hv.Text(0, 0, "")]).opts(xaxis=None, yaxis=None, width=900, height=120)
        traces = self._traces()
        shown = {name: traces[name] for name in models}
        title = " vs ".join(MODEL_TITLES[m] for m in models)
        edges = sum(t.n_edges for t in shown.values())
        width = 900 if len(models) == 2 else 560
        return flow_diagram(self.records[0].tokens, shown, layout=self.layout, width=width, height=520 if self.layout == "layered" else width).opts(title=f"{title} ({edges} edges)")

    def _grid_values(self) -> np.ndarray:
        pre, fine = self.records
        if self.measure == DIFFERENCE:
            return head_js_divergence(pre.attention, fine.attention)
        record = fine if self.grid_model == FINETUNED else pre
        return head_measures(record.attention, record.tokens, record.cls_mask, record.sep_mask)[self.measure]

    def _grid_element(self, records: object = None, measure: str = "", grid_model: str = "") -> hv.HeatMap:
        L, H = self.pair.n_layers, self.pair.n_heads
        values = np.full((L, H), np.nan) if self.records is None else self._grid_values()
        title = self.measure if self.measure == DIFFERENCE else f"{self.measure} ({MODEL_TITLES[self.grid_model]})"
        label = "JS (bits)" if self.measure == DIFFERENCE else self.measure
        return head_grid(values, label, title=title, cmap="magma_r" if self.measure == DIFFERENCE else "viridis", width=440, height=300)

    # ------------------------------------------------------------------ panes
    @param.depends("mode")
    def _flow_panel(self) -> pn.viewable.Viewable:
        if self.mode == "merged":
            return pn.pane.HoloViews(self._flows[(PRETRAINED, FINETUNED)], linked_axes=False)
        return pn.Row(pn.pane.HoloViews(self._flows[(PRETRAINED,)], linked_axes=False), pn.pane.HoloViews(self._flows[(FINETUNED,)], linked_axes=False))

    @param.depends("records", "head_mask")
    def _matrices(self) -> pn.viewable.Viewable:
        if self.records is None:
            return pn.pane.Markdown("")
        heads = np.argwhere(self.head_mask)
        panes = []
        for name, record in zip((PRETRAINED, FINETUNED), self.records, strict=True):
            mean = record.attention[heads[:, 0], heads[:, 1]].mean(axis=0)
            label = f"{len(heads)} heads" if len(heads) > 1 else f"layer {heads[0][0] + 1}, head {heads[0][1]}"
            panes.append(pn.pane.HoloViews(attention_matrix(mean, record.tokens, title=f"{MODEL_TITLES[name]}: mean of {label}", size=340), linked_axes=False))
        return pn.Row(*panes)

    @param.depends("records", "head_mask", "tau", "alpha", "method", "combine", "root")
    def _sentence(self) -> pn.viewable.Viewable:
        if self.records is None:
            return pn.pane.Markdown("")
        pre, fine = self.records
        words, index = merge_tokens(pre.tokens, pre.word_ids)
        traces = self._traces()
        values = {}
        for name in (PRETRAINED, FINETUNED):
            influence = traces[name].influence[0]
            values[name] = np.bincount(index, weights=influence, minlength=len(words))
        captions = {PRETRAINED: "pre-trained: influence on the input", FINETUNED: "fine-tuned: influence on the input"}
        if fine.predicted_label is not None:
            captions[FINETUNED] = f"fine-tuned: predicts {fine.predicted_label} ({fine.probabilities.max():.0%})"
        return pn.pane.HoloViews(sentence_view(words, values, captions, max_chars=62, width=620), linked_axes=False)

    @param.depends("notice")
    def _notice(self) -> pn.viewable.Viewable:
        if not self.notice:
            return pn.pane.Markdown("", margin=0)
        return pn.pane.Alert(html.escape(self.notice), alert_type="warning" if self.records is not None else "info")

    def _ablate(self, _: object = None) -> None:
        from attnflows_panel.analysis.ablation import ablate_heads

        if self.records is None:
            return
        lm = self.pair.finetuned
        if not lm.has_classifier:
            self.ablation.object = "The fine-tuned model has no classification head to ablate."
            return
        heads = [tuple(h) for h in np.argwhere(self.head_mask).tolist()]
        result = ablate_heads(lm, self.text, self.text_pair.strip() or None, heads)
        before = f"{html.escape(result.original_label)} ({result.original_probabilities.max():.0%})"
        after = f"{html.escape(result.predicted_label)} ({result.probabilities.max():.0%})"
        change = "**changes**" if result.prediction_changed else "stays"
        self.ablation.object = f"With {len(heads)} heads off, the fine-tuned prediction {change}: {before} → {after}."

    def controls(self) -> pn.viewable.Viewable:
        """The widgets that drive this view."""
        widgets = {
            "text": {"type": pn.widgets.TextAreaInput, "name": "Sentence", "height": 90},
            "text_pair": {"type": pn.widgets.TextInput, "name": "Second segment (optional)"},
            "method": {"type": pn.widgets.RadioButtonGroup, "name": "Flow"},
            "tau": {"type": pn.widgets.FloatSlider, "name": "tau (edge threshold)"},
            "alpha": {"type": pn.widgets.FloatSlider, "name": "alpha (deeper influence)"},
            "combine": {"type": pn.widgets.RadioButtonGroup, "name": "Heads"},
            "layout": {"type": pn.widgets.RadioButtonGroup, "name": "Layout"},
            "mode": {"type": pn.widgets.RadioButtonGroup, "name": "Models"},
            "measure": {"type": pn.widgets.Select, "name": "Grid colour"},
            "grid_model": {"type": pn.widgets.RadioButtonGroup, "name": "Grid model"},
        }
        return pn.Param(self.param, parameters=list(widgets), widgets=widgets, show_name=False, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        grid = pn.pane.HoloViews(self._grid, linked_axes=False)
        return pn.Column(
            self._notice,
            pn.Row(pn.Column(grid, self._ablate_button, self.ablation, width=460), self._sentence),
            self._flow_panel,
            self._matrices,
            sizing_mode="stretch_width",
        )
