"""AttentionView: one input through one or two models, with heads brushed in the grid or the corpus head map."""

from __future__ import annotations

import html
import threading

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.analysis.flows import flow_trace, rollout_trace, trace_cls_flow
from attnflows_panel.analysis.heads import MEASURES, head_measures
from attnflows_panel.components.live_plots import columns_read, redraw
from attnflows_panel.components.records import cached_records
from attnflows_panel.errors import AttnflowsError
from attnflows_panel.extract import merge_tokens
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import ModelPair
from attnflows_panel.plots.attention_matrix import attention_matrix
from attnflows_panel.plots.flow_diagram import flow_diagram
from attnflows_panel.plots.head_embedding import head_embedding
from attnflows_panel.plots.head_grid import head_grid, heads_at
from attnflows_panel.plots.sentence_view import sentence_view

DIFFERENCE = "model difference (JS, bits)"
MEASURE_NAMES = [name for name, _ in MEASURES]
RESIDUAL_TRACES = {"rollout": rollout_trace, "flow": flow_trace}  # Abnar & Zuidema's, on attention plus the residual
DEFAULT_TEXT = "The self-driving car stopped safely, and I finally felt relaxed."


def plot_pane(plot: hv.core.Dimensioned) -> pn.Row:
    """A fixed-size plot's pane, for a ``param.depends`` method to return.

    Panel would put a bare HoloViews pane in a Column sized "fixed" without a width or height, which Bokeh
    reports on every page load (W-1005 FIXED_SIZING_MODE); a Row around the pane sizes itself from the plot.
    """
    return pn.Row(pn.pane.HoloViews(plot, linked_axes=False))


class AttentionView(pn.viewable.Viewer):
    """Head grid, head map, flow diagram, matrices and sentence view of one input, linked by the head mask."""

    text = param.String(default=DEFAULT_TEXT, doc="The sentence (first segment).")
    text_pair = param.String(default="", doc="Optional second segment.")
    tau = param.Number(default=0.1, bounds=(0.01, 1.0), step=0.01, doc="Keep edges with at least this weight.")
    alpha = param.Number(default=0.5, bounds=(0.0, 1.0), step=0.05, doc="Weight of deeper influence.")
    method = param.Selector(default="trace", objects={"CLS trace": "trace", "rollout": "rollout", "attention flow": "flow"}, doc="CLS trace, rollout relevance or exact attention flow.")
    combine = param.Selector(default="union", objects=["union", "mean"], doc="How heads combine in the trace.")
    layout = param.Selector(default="layered", objects=["layered", "radial"])
    measure = param.Selector(default=MEASURE_NAMES[0], objects=MEASURE_NAMES, doc="Colour of the head grid.")
    shading = param.Selector(default="influence", objects=["influence", "attention"], doc="Sentence view: each word's influence in the trace, or the attention the root token pays it.")
    map_color = param.Selector(default="layer", objects=["layer", "model"], doc="Colour of the head map's points.")
    head_mask = param.Array(default=None, doc="Selected heads, bool [layers, heads]; all when nothing is brushed.")
    root = param.Tuple(default=(-1, 0), length=2, doc="(level, token) the trace starts from; level -1 is the deepest.")
    records = param.Parameter(default=None, precedence=-1, doc="One record of the input per model, in model order.")
    notice = param.String(default="", precedence=-1)

    def __init__(self, models: dict[str, LoadedModel], source: ModelPair | LoadedModel, text: str | None, head_map: HeadEmbedding | None, titles: dict[str, str], **params: object) -> None:
        super().__init__(**params)
        self.models, self.names, self.titles, self._source = models, tuple(models), titles, source
        first = models[self.names[0]]
        self.n_layers, self.n_heads = first.n_layers, first.n_heads
        self.head_mask = np.ones((self.n_layers, self.n_heads), dtype=bool)
        self.ablation = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.notice_pane = pn.pane.Alert("", visible=False, sizing_mode="stretch_width")
        self._ablate_button = pn.widgets.Button(label="Switch selected heads off", color="primary")
        self._ablate_button.on_click(self._ablate)
        self.head_map = head_map
        self._followers: dict[str, hv.streams.Params] = {}
        self._traced: tuple[object, tuple, dict[str, object]] | None = None  # records, settings, and their traces
        self._flows: dict[tuple[str, ...], hv.DynamicMap] = {}
        self._live: dict[str, tuple[object, object, dict]] = {}  # key: (plot, element callback, columns its glyphs read)
        # a notebook may run a brush's callback on a comm thread while a cell calls select_heads
        self._push_lock = threading.Lock()
        self.param.watch(self._push_mask, "head_mask")
        if text is not None:
            self.text = text
        self.param.watch(self._update_records, ["text", "text_pair"])
        self._update_records()

    def _grid_streams(self) -> list[str]:
        return ["records", "measure"]

    def _follow(self, key: str, callback: object, names: list[str], *extra: hv.streams.Stream) -> hv.DynamicMap:
        """A new DynamicMap of ``callback`` following the params ``names``; the one made before under ``key`` stops.

        Each pane gets its own DynamicMap, so showing the view again never shows a stale first frame.
        """
        self._stop(key)
        others = [n for n in names if n != "head_mask"]
        follower = hv.streams.Params(self, others)
        self._followers[key] = follower
        if len(others) == len(names):
            return hv.DynamicMap(callback, streams=[follower, *extra])

        def register(plot: object, _: object) -> None:
            known = self._live.get(key)
            columns = columns_read(plot)
            if known is not None and known[0] is plot:  # the page's copies of the glyphs read what the first render read
                columns = {sub: {**known[2].get(sub, {}), **read} for sub, read in columns.items()}
            self._live[key] = (plot, callback, columns)

        def drawn(**kwargs: object) -> hv.Element:
            return callback(**kwargs).opts(hooks=[register])

        return hv.DynamicMap(drawn, streams=[follower, *extra])

    def _push_mask(self, *_: object) -> None:
        """Write each live pane's element for the new head mask straight into its Bokeh glyphs and sources.

        A HoloViews update of five panes costs ~0.4 s per brush (ranges, plot options, a model-graph
        recompute); each layer's own glyph update with the ranges of the last full render costs a fraction of that.
        """
        with self._push_lock:
            for plot, callback, columns in list(self._live.values()):
                redraw(plot, callback(), columns)

    def _stop(self, prefix: str) -> None:
        """Stop the DynamicMaps made under keys starting with ``prefix`` from following this view."""
        for key in [k for k in self._followers if k.startswith(prefix)]:
            self._followers.pop(key).unwatch()
            self._live.pop(key, None)

    # ------------------------------------------------------------------ state
    def _update_records(self, *_: object) -> None:
        text, pair_text = self.text, self.text_pair.strip() or None
        self.ablation.object = ""
        if not text.strip():
            self.param.update(records=None, notice="Type a sentence to see how the models attend to it.")
            return
        try:
            records = cached_records(self._source, text, pair_text)
        except AttnflowsError as exc:
            self.param.update(records=None, notice=str(exc))
            return
        notice = ""
        if records[0].n_truncated:
            notice = f"The input was longer than the model allows: the last {records[0].n_truncated} tokens were dropped."
        self.param.update(records=records, root=(-1, 0), notice=notice)


    def _on_map_selection(self, event: param.parameterized.Event) -> None:
        rows = self.head_map.points.iloc[event.new]
        self.select_heads(list(zip(rows["layer"].astype(int), rows["head"].astype(int), strict=True)))

    def select_heads(self, heads: list[tuple[int, int]]) -> None:
        """Set the head mask to ``heads`` (layer, head), or to every head when empty."""
        mask = np.zeros((self.n_layers, self.n_heads), dtype=bool)
        for layer, head in heads:
            mask[layer, head] = True
        with pn.io.hold():  # the panes write their sources directly (see _push_mask): one message, no recompute
            self.head_mask = mask if mask.any() else ~mask

    def selected_heads(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs in the head mask."""
        return [(int(layer), int(head)) for layer, head in np.argwhere(self.head_mask)]

    def _on_tap(self, x: float | None = None, y: float | None = None, **_: object) -> None:
        """Re-root the trace on the token nearest a click in the flow diagram."""
        if self.records is None or x is None or y is None:
            return
        n, levels = self.records[0].n_tokens, self.n_layers + 1
        if self.layout == "layered":
            token, level = int(round(x)), int(round(y))
        else:
            level = int(round(np.hypot(x, y) - 1.0))
            token = int(round(((np.pi / 2 - np.arctan2(y, x)) % (2 * np.pi)) / (2 * np.pi) * n)) % n
        if 0 <= token < n and 1 <= level < levels:
            with pn.io.hold(freeze=True):
                self.root = (level, token)

    def _root(self) -> tuple[int, int]:
        level, token = self.root
        return (self.n_layers if level < 0 else level, token)

    # ------------------------------------------------------------------ elements
    def _traces(self) -> dict[str, object]:
        """Each model's trace for the current state; the flow diagram and the sentence view share one computation."""
        state = (self.head_mask.tobytes(), self.tau, self.alpha, self.method, self.combine, self.root)
        if self._traced is not None and self._traced[0] is self.records and self._traced[1] == state:
            return self._traced[2]
        traces = {}
        for name, record in zip(self.names, self.records, strict=True):
            if self.method in RESIDUAL_TRACES:
                traces[name] = RESIDUAL_TRACES[self.method](record.attention, self.head_mask, tau=self.tau, root=self._root())
            else:
                traces[name] = trace_cls_flow(record.attention, self.head_mask, tau=self.tau, alpha=self.alpha, root=self._root(), combine=self.combine)
        self._traced = (self.records, state, traces)
        return traces

    def _flow_map(self, shown: tuple[str, ...]) -> hv.DynamicMap:
        """The flow diagram of the models ``shown``, following the head mask and flow settings; a click re-roots it."""

        def callback(**_: object) -> hv.Overlay:
            return self._flow_element(shown)

        tap = hv.streams.Tap(transient=True)
        tap.add_subscriber(self._on_tap)
        names = ["records", "head_mask", "tau", "alpha", "method", "combine", "root"]
        self._flows[shown] = self._follow(f"flow {' '.join(shown)}", callback, names, tap)
        return self._flows[shown]

    def _flow_element(self, shown: tuple[str, ...]) -> hv.Overlay:
        width = 900 if len(shown) == len(self.names) else 560
        if self.records is None:
            return hv.Overlay([hv.Text(0, 0, "")]).opts(xaxis=None, yaxis=None, width=width, height=120)
        traces = self._traces()
        drawn = {name: traces[name] for name in shown}
        title = " vs ".join(self.titles[name] for name in shown)
        edges = sum(t.n_edges for t in drawn.values())
        diagram = flow_diagram(self.records[0].tokens, drawn, layout=self.layout, width=width, height=520 if self.layout == "layered" else width)
        return diagram.opts(title=f"{title} ({edges} edges)")

    def _grid_values(self) -> np.ndarray:
        record = self.records[-1]
        return head_measures(record.attention, record.tokens, record.cls_mask, record.sep_mask)[self.measure]

    def _grid_title(self) -> str:
        return f"{self.measure} ({self.titles[self.names[-1]]})"

    def _grid_element(self, **_: object) -> hv.HeatMap:
        values = np.full((self.n_layers, self.n_heads), np.nan) if self.records is None else self._grid_values()
        difference = self.measure == DIFFERENCE
        return head_grid(values, "JS (bits)" if difference else self.measure, title=self._grid_title(), cmap="magma_r" if difference else "viridis", width=440, height=300)

    def _grid_outline(self, **_: object) -> hv.Rectangles:
        """Outlines of the selected cells, so a brush in the head map shows in the grid too."""
        heads = [] if self.head_mask.all() else self.selected_heads()
        boxes = pd.DataFrame([(h - 0.5, layer + 0.5, h + 0.5, layer + 1.5) for layer, h in heads], columns=["x0", "y0", "x1", "y1"])
        return hv.Rectangles(boxes, ["x0", "y0", "x1", "y1"]).opts(fill_alpha=0, line_color="#d62728", line_width=2)


    def _map_highlight(self, **_: object) -> hv.Points:
        heads = set() if self.head_mask.all() else set(self.selected_heads())
        points = self.head_map.points
        chosen = points[[(int(layer), int(head)) in heads for layer, head in zip(points["layer"], points["head"], strict=True)]]
        return hv.Points(chosen, ["x", "y"]).opts(size=13, fill_alpha=0, line_color="#d62728", line_width=2)

    # ------------------------------------------------------------------ panes
    # Panes are rebuilt when the input changes (plot sizes follow it); a brush updates their data in place.
    @param.depends("layout")
    def _flow_panel(self) -> pn.viewable.Viewable:
        self._stop("flow ")
        return plot_pane(self._flow_map(self.names))

    def _grid_pane(self) -> pn.viewable.Viewable:
        grid = self._follow("grid", self._grid_element, self._grid_streams())
        selection = hv.streams.Selection1D(source=grid)
        selection.param.watch(lambda event: self.select_heads(heads_at(grid.last, event.new) if event.new else []), "index")
        outline = self._follow("grid outline", self._grid_outline, ["head_mask"])
        return pn.pane.HoloViews(grid * outline, linked_axes=False)

    @param.depends("map_color")
    def _head_map_pane(self) -> pn.viewable.Viewable:
        if self.head_map is None:
            return pn.pane.Markdown("", margin=0)
        overlay = head_embedding(self.head_map.points, self.head_map.moves, color_by=self.map_color, titles=self.titles, title="heads over the corpus (drag to select)", width=460, height=330)
        hv.streams.Selection1D(source=overlay.Points.Heads).param.watch(self._on_map_selection, "index")
        highlight = self._follow("head map", self._map_highlight, ["head_mask"])
        return plot_pane((overlay * highlight).opts(hv.opts.Overlay(**overlay.opts.get("plot").kwargs)))

    @param.depends("records")
    def _matrices(self) -> pn.viewable.Viewable:
        if self.records is None:
            self._stop("matrix")  # no input: a brush must not redraw the matrices it no longer shows
            return pn.pane.Markdown("")
        panes = [pn.pane.HoloViews(self._follow(f"matrix {name}", self._matrix_callback(index), ["head_mask"]), linked_axes=False) for index, name in enumerate(self.names)]
        return pn.FlexBox(*panes, sizing_mode="stretch_width")

    def _matrix_callback(self, index: int):  # noqa: ANN202
        def callback(**_: object) -> hv.Element:
            record, heads = self.records[index], np.argwhere(self.head_mask)
            label = f"mean of {len(heads)} heads" if len(heads) > 1 else f"layer {heads[0][0] + 1}, head {heads[0][1]}"
            matrix = record.attention[heads[:, 0], heads[:, 1]].mean(axis=0)
            return attention_matrix(matrix, record.tokens, title=f"{self.titles[self.names[index]]}: {label}", size=340)

        return callback

    @param.depends("records")
    def _sentence(self) -> pn.viewable.Viewable:
        if self.records is None:
            self._stop("sentence")
            return pn.pane.Markdown("")
        names = ["head_mask", "tau", "alpha", "method", "combine", "root", "shading"]
        return plot_pane(self._follow("sentence", self._sentence_element, names))

    def _sentence_element(self, **_: object) -> hv.Overlay:
        words, index = merge_tokens(self.records[0].tokens, self.records[0].word_ids)
        traces = self._traces()
        level, token = self._root()
        heads = np.flatnonzero(self.head_mask[level - 1])  # the root's query attention is in layer level - 1
        values, captions = {}, {}
        for name, record in zip(self.names, self.records, strict=True):
            if self.shading == "attention":
                row = record.attention[level - 1, heads, token].mean(axis=0) if heads.size else np.zeros(record.n_tokens)
                shown = f"attention of {record.tokens[token]} (layer {level}, {heads.size} heads)"
            else:
                row, shown = traces[name].influence[0], "influence on the input"
            values[name] = np.bincount(index, weights=row, minlength=len(words))
            captions[name] = f"{self.titles[name]}: {shown}"
            if record.predicted_label is not None:
                captions[name] += f" · predicts {record.predicted_label} ({record.probabilities.max():.0%})"
        return sentence_view(words, values, captions, max_chars=96, width=900)

    @param.depends("notice", "records", watch=True)
    def _show_notice(self) -> None:
        """Show the notice (escaped) in one persistent alert: a hint without an input, a warning with one."""
        self.notice_pane.param.update(
            object=html.escape(self.notice), alert_type="warning" if self.records is not None else "info", visible=bool(self.notice)
        )

    def _ablate(self, _: object = None) -> None:
        from attnflows_panel.analysis.ablation import ablate_heads

        if self.records is None:
            return
        name = self.names[-1]
        lm = self.models[name]
        if not lm.has_classifier:
            self.ablation.object = f"{html.escape(self.titles[name])} has no classification head, so there is no prediction to ablate."
            return
        heads = self.selected_heads()
        result = ablate_heads(lm, self.text, self.text_pair.strip() or None, heads)
        before = f"{html.escape(result.original_label)} ({result.original_probabilities.max():.0%})"
        after = f"{html.escape(result.predicted_label)} ({result.probabilities.max():.0%})"
        change = "**changes**" if result.prediction_changed else "stays"
        self.ablation.object = f"With {len(heads)} heads off, the prediction of {html.escape(self.titles[name])} {change}: {before} → {after}."

    def _widgets(self) -> dict[str, dict[str, object]]:
        return {
            "text": {"type": pn.widgets.TextAreaInput, "name": "Sentence", "height": 90, "max_length": 100_000},
            "text_pair": {"type": pn.widgets.TextInput, "name": "Second segment (optional)"},
            "method": {"type": pn.widgets.RadioButtonGroup, "name": "Flow method"},
            "tau": {"type": pn.widgets.FloatSlider, "name": "tau (edge threshold)"},
            "alpha": {"type": pn.widgets.FloatSlider, "name": "alpha (deeper influence)"},
            "combine": {"type": pn.widgets.RadioButtonGroup, "name": "Heads"},
            "layout": {"type": pn.widgets.RadioButtonGroup, "name": "Layout"},
            "shading": {"type": pn.widgets.RadioButtonGroup, "name": "Words shaded by"},
            "measure": {"type": pn.widgets.Select, "name": "Grid colour"},
        }

    def controls(self) -> pn.viewable.Viewable:
        """The widgets that drive this view."""
        column = pn.Column(sizing_mode="stretch_width")
        for name, spec in self._widgets().items():
            options = dict(spec)
            kind, label = options.pop("type"), options.pop("name")
            if kind is pn.widgets.RadioButtonGroup:  # a button group draws no name of its own
                column.append(pn.pane.HTML(f"<label>{html.escape(label)}</label>", margin=(6, 10, 0, 10)))
            column.append(kind.from_param(self.param[name], name=label, sizing_mode="stretch_width", **options))
        return column

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self.notice_pane,
            pn.Row(pn.Column(self._grid_pane(), self._ablate_button, self.ablation, width=460), self._head_map_pane),
            self._sentence,
            self._flow_panel,
            self._matrices,
            sizing_mode="stretch_width",
        )
