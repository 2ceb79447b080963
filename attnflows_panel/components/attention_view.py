"""AttentionView: one input through one or two models, with heads brushed in the grid or the corpus head map."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import holoviews as hv
import numpy as np
import panel as pn
import param
from bokeh.models import Rect, Scatter

from attnflows_panel.analysis.ablation import AblationResult, ablate_heads
from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.analysis.flows import AttentionTrace, flow_trace, rollout_trace, trace_cls_flow
from attnflows_panel.analysis.heads import MEASURES, head_measures
from attnflows_panel.analysis.words import word_level
from attnflows_panel.components.live_figure import LiveFigure
from attnflows_panel.components.model_work import on_server, run_model_work
from attnflows_panel.components.records import cached_records
from attnflows_panel.components.submit_keys import SubmitKeys
from attnflows_panel.errors import AttnflowsError
from attnflows_panel.extract import AttentionRecord, merge_tokens
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import ModelPair
from attnflows_panel.plots import short_name
from attnflows_panel.plots.attention_matrix import MATRIX_LAYERS, attention_matrix, matrix_clim, matrix_frames
from attnflows_panel.plots.bound import Layer, renderer, two_lines
from attnflows_panel.plots.flow_diagram import COUNT_HIDDEN_UP_TO, TRACE_ENCODING, flow_diagram, flow_frames, flow_layers, hidden_text
from attnflows_panel.plots.head_embedding import HIGHLIGHT_LAYERS, head_embedding, highlight_frames
from attnflows_panel.plots.head_grid import GRID_LAYERS, grid_clim, grid_frames, grid_outline, grid_outline_frames, head_grid, heads_at
from attnflows_panel.plots.sentence_view import SENTENCE_LAYERS, sentence_frames, sentence_view
from attnflows_panel.text import counted

T = TypeVar("T")
DIFFERENCE = "model difference (JS, bits)"
DEFAULT_ROOT = (-1, -1)  # the deepest level, the model's default token
INLINE_UP_TO = 512  # tokens; a served page computes a brush or a setting of a longer input off its loop
MEASURE_LABELS = {
    "entropy": "entropy (nats)", "attn_cls": "attention to [CLS]", "attn_sep": "attention to [SEP]",
    "attn_first": "attention to the first token (sink)", "attn_punct": "attention to punctuation",
    "attn_self": "attention to itself", "attn_prev": "attention to the previous token", "attn_next": "attention to the next token",
    "distance": "attention distance (tokens)", "max_weight": "largest weight (confidence)",
}
MEASURE_NAMES = [name for name, _ in MEASURES]
METHOD_NAMES = {"trace": "CLS trace", "rollout": "rollout", "flow": "attention flow", "heads": "heads' own edges"}
METHOD_TAU = {"trace": 0.1, "rollout": 0.01, "flow": 0.2, "heads": 0.3}  # each method's scale: a readable structure on the default input
TOP_K_METHODS = ("trace", "heads")  # the methods that keep the k strongest edges of a token
METHOD_ENCODING = {  # what node size and edge width mean, written under the flow diagram (the CLS trace's by default)
    "heads": "node size: edges arriving (c + alpha × size above) · edge width: weight · node colour as the edges' · pale dot: no edge",
    "rollout": "node size: the root's rollout relevance · edge width: the relevance the edge carries · node colour as the edges' · black: root",
    "flow": "node size: the most attention flow from the root · edge width: the flow the edge can carry · node colour as the edges' · black: root",
}
RESIDUAL_TRACES = {"rollout": rollout_trace, "flow": flow_trace}  # Abnar & Zuidema's, on attention plus the residual
DEFAULT_TEXT = "The self-driving car stopped safely, and I finally felt relaxed."
FLOW_HEIGHT = 520
SENTENCE_MAX_HEIGHT = 460  # px; a longer sentence view scrolls (a 3,000-token input's words took 2,000 px)
MAX_TEXT_ROWS = 14


def text_rows(text: str, chars_per_row: int = 42) -> int:
    """Rows the sentence box needs to show ``text`` whole in the sidebar (4 to MAX_TEXT_ROWS)."""
    wrapped = sum(-(-len(line) // chars_per_row) or 1 for line in (text or "").split("\n"))
    return min(MAX_TEXT_ROWS, max(4, wrapped + 1))


def how_to_read(pair: bool) -> str:
    """The always available explanation of the views (Markdown), for a pair of models or for one."""
    head_map = (
        "every head of both models, placed by how alike they attend over a corpus; a grey segment joins a head's pre-trained and fine-tuned copies."
        if pair
        else "every head of the model, placed by how alike they attend over a corpus."
    )
    colours = (
        "**Colours**: grey edges are drawn by both models, turquoise only by the pre-trained model, purple only by the fine-tuned one (the legend counts each)."
        if pair
        else "Edges and the tokens they reach are turquoise (the legend counts the edges)."
    )
    sentence = "per model (darker = more, scaled to that model's largest word; hover a word for its value), with the fine-tuned model's prediction" if pair else "(darker = more, scaled to the largest word; hover a word for its value), with the model's prediction"
    return f"""
**Grid** (layer x head, layers and heads numbered from 1): one cell per attention head, coloured by the measure
chosen in *Grid colour* (the colours scale to this input: compare inputs by the numbers in the hover, not by colour).
Drag a box or click cells to select heads; every other view then uses only those heads.
Heads selected elsewhere (in the head map) are outlined in red. **Head map**: {head_map}

**Flow diagram** (the CLS trace of DeRose, Wang and Berger's *Attention Flows*, IEEE VIS 2020): each row is a level (*input* = the embeddings at the bottom, *layer l* = the output of
layer l); each column is a token. The trace starts at the black **root** ([CLS] of the deepest layer, a decoder's last token; click a
token to start there; drawn large to mark it, its own influence is 0) and walks down: an **edge** joins a token to a token of the level below that it attends to
with a weight of at least **tau** in a selected head (width = weight: the strongest selected head's, or the heads' mean
with *Heads: mean*); an edge between the rows *layer l-1* and *layer l* belongs to layer l's heads. {colours}
**Node size** is the token's influence `I_l(w) = c_l(w) + alpha * I_(l+1)(w)`, where `c_l(w)` counts the
edges reaching it (so the root's is 0); grey dots were not reached. Rollout and attention flow draw each edge's share of the root's
relevance or flow instead; *heads' own edges* draws every edge of the selected heads, whether or not it reaches
the root. Hover an edge (the query token above, the key it attends to below) or a token for its words, heads
and weights; token positions count from 0 (`[CLS]` is 0), as the tokenizer numbers them (with *Units: words*, as words).

**Sentence view** (always shown as whole words; the values come from the flow in the chosen units): each word shaded by its influence on the input (or by the root's attention),
{sentence}. **Matrices**: the attention of the selected head (or the mean of the
selected heads), query rows against key columns.
"""


def tau_label(method: str) -> str:
    """The tau slider's name: each flow method keeps a tau of its own, so it names the method."""
    return f"tau for {METHOD_NAMES[method]} (edge threshold)"


def level_name(level: int) -> str:
    """``"input"`` for level 0, ``"layer l"`` above it (layers numbered from 1)."""
    return "input" if level == 0 else f"layer {level}"


class AttentionView(pn.viewable.Viewer):
    """Head grid, head map, flow diagram, matrices and sentence view of one input, linked by the head mask."""

    text = param.String(default=DEFAULT_TEXT, doc="The sentence (first segment).")
    text_pair = param.String(default="", doc="Optional second segment.")
    tau = param.Number(default=0.1, bounds=(0.01, 1.0), step=0.01, doc="Edge threshold: the flow diagram draws only edges of at least this weight (each method keeps its own).")
    alpha = param.Number(default=0.5, bounds=(0.0, 1.0), step=0.05, doc="CLS trace: how much a token's influence in deeper layers adds to its node size, I_l = c_l + alpha * I_(l+1).")
    method = param.Selector(default="trace", objects={label: key for key, label in METHOD_NAMES.items()}, doc="What the flow diagram draws: the paper's CLS trace from the root (edges of at least tau), attention rollout, exact attention flow (max-flow), or the selected heads' own edges of at least tau from every token, whether or not they reach the root (BertViz's reading).")
    combine = param.Selector(default="union", objects=["union", "mean"], doc="CLS trace: an edge is kept if any selected head passes tau (union), or if the heads' mean does (mean).")
    layout = param.Selector(default="layered", objects=["layered", "radial"], doc="Flow diagram as rows (input at the bottom, deepest layer on top) or as the paper's token rings (input innermost).")
    measure = param.Selector(default=MEASURE_NAMES[0], objects={MEASURE_LABELS[m]: m for m in MEASURE_NAMES}, doc="What colours the layer x head grid.")
    shading = param.Selector(default="influence", objects=["influence", "attention"], doc="Sentence view: each word's influence in the trace, or the attention the root token pays it.")
    map_color = param.Selector(default="layer", objects=["layer", "model"], doc="Colour the head map's points by their layer or by their model.")
    head_mask = param.Array(default=None, doc="Selected heads, bool [layers, heads]; all when nothing is brushed.")
    root = param.Tuple(default=DEFAULT_ROOT, length=2, doc="(level, token) the trace starts from; level -1 is the deepest, token -1 the model's default ([CLS], or a decoder's last token).")
    units = param.Selector(default="word pieces", objects=["word pieces", "words"], doc="Draw every view over word pieces, or over whole words (pieces merged).")
    top_k = param.Integer(default=3, bounds=(0, 20), doc="CLS trace and heads' own edges: keep the k strongest edges of each token (0: every edge of at least tau).")
    records = param.Parameter(default=None, precedence=-1, doc="One record of the input per model, in model order.")
    notice = param.String(default="", precedence=-1)
    busy = param.Boolean(default=False, precedence=-1, doc="True while the models run on a new input (a spinner covers the figures).")

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
        # what a record's views computed (measures, traces, matrices, word merge): (id(record), kind) -> (record, {key: value});
        # the model thread fills it for a new input, so the page's loop only draws
        self._memo: dict[tuple[int, object], tuple[object, dict[object, object]]] = {}
        self._memo_lock = threading.Lock()
        self._brush: str | None = None  # while a head selection is being applied: the plot it came from ("" for none)
        self._method_tau = dict(METHOD_TAU)
        self._wanted: tuple[str, str | None] | None = None  # the input whose records are on their way
        self.grid, self.sentence = LiveFigure(), LiveFigure()  # the sentence view is as wide as its characters
        self.map = LiveFigure(sizing_mode="stretch_width")  # the head map takes the rest of the grid's row
        self._grid_measure: str | None = None  # the measure the grid's figure was drawn for
        self.flows: dict[tuple[str, ...], LiveFigure] = {}
        self.matrices = {name: LiveFigure() for name in self.names}
        self._flow_row = pn.Row(sizing_mode="stretch_width")
        self._matrix_box = pn.Row(*(m.pane for m in self.matrices.values()), sizing_mode="stretch_width")  # a FlexBox (ReactiveHTML) inside the template drew them squashed
        self._figure_box = pn.Column(  # one spinner over it while the models run (a figure's own would stay on the next figure)
            pn.Row(pn.Column(self.grid.pane, self._ablate_button, self.ablation, width=460), self.map.pane, sizing_mode="stretch_width"),
            pn.Column(self.sentence.pane, scroll=True, styles={"max-height": f"{SENTENCE_MAX_HEIGHT}px"}, sizing_mode="stretch_width"),  # a long input's words scroll
            self._flow_row, self._matrix_box, sizing_mode="stretch_width",
        )
        # a notebook may run a brush's callback on a comm thread while a cell calls select_heads
        self._push_lock = threading.RLock()
        if text is not None:
            self.text = text
        self.param.watch(self._update_records, ["text", "text_pair"])
        self.param.watch(self._draw_all, ["records"])
        self.param.watch(self._on_units, ["units"])
        self.param.watch(self._on_method, ["method"])  # before the redraw below: the method's own tau
        self.param.watch(self._draw_flows, ["layout", *self._flow_modes()])
        self.param.watch(self._draw_grid, self._grid_params())
        self.param.watch(self._draw_map, ["map_color"])
        self.param.watch(self._on_mask, ["head_mask"])
        self.param.watch(self._write_traced, ["tau", "alpha", "method", "combine", "root", "top_k"])
        self.param.watch(self._write_sentence, ["shading"])
        self._update_records()
        if self.records is None:
            self._draw_all()
        self._draw_map()

    def _flow_modes(self) -> list[str]:
        return []

    def _grid_params(self) -> list[str]:
        return ["measure"]

    # ------------------------------------------------------------------ state
    def _request(self) -> tuple[str, str | None]:
        """The input the views are asked to show: the text and the second segment (None when blank)."""
        return self.text, self.text_pair.strip() or None

    def _update_records(self, *_: object) -> None:
        text, pair_text = self._request()
        if not text.strip():
            self._wanted = None
            self._set_busy(False)
            self.param.update(records=None, notice="Type a sentence to see how the models attend to it.")
            return
        self._wanted = request = (text, pair_text)
        self._set_busy(True)
        run_model_work(lambda: self._prime(cached_records(self._source, text, pair_text)), partial(self._show_records, request), partial(self._records_failed, request))

    def _prime(self, records: tuple[AttentionRecord, ...], root: tuple[int, int] = DEFAULT_ROOT) -> tuple[AttentionRecord, ...]:
        """Compute what drawing ``records`` in the current state needs (off a served page's loop); the draw then reuses it."""
        shown = self._shown_of(records)
        self._grid_values(shown)
        for record in shown:
            self._mean_map(record)
        for without_top_k in (False, True) if self._counts_hidden(shown) else (False,):
            self._traces(without_top_k=without_top_k, shown=shown, root=root)
        return records

    def _state(self) -> tuple[object, ...]:
        """What the flows, the sentence and the matrices of the records are computed from."""
        return (self.units, self.head_mask.tobytes(), self.tau, self.alpha, self.method, self.combine, self.root, self.top_k)

    def _when_computed(self, write: Callable[[], None]) -> None:
        """``write()`` now; on a served page, for an input longer than :data:`INLINE_UP_TO` tokens, once what it reads is
        computed with the model's work (a long input's trace or mean map takes seconds, which would hold every session)."""
        records = self.records
        if records is None or records[0].n_tokens <= INLINE_UP_TO or not on_server():
            write()
            return
        state = self._state()
        self._set_busy(True)

        def done(_: object) -> None:
            if records is self.records and state == self._state():  # else a newer change writes
                write()
                self._set_busy(False)

        run_model_work(lambda: self._prime(records, self.root), done, partial(self._work_failed, records))

    def _show_records(self, request: tuple[str, str | None], records: tuple[AttentionRecord, ...]) -> None:
        """Show the records of ``request`` unless a newer input was asked for meanwhile."""
        if request != self._wanted:
            return
        kept = [*records, *self._shown_of(records)]
        with self._memo_lock:  # forget the previous input's computations
            self._memo = {slot: held for slot, held in self._memo.items() if any(held[0] is record for record in kept)}
        notice = ""
        if records[0].n_truncated:
            notice = f"The input was longer than the model allows: the last {records[0].n_truncated} tokens were dropped."
        self.param.update(records=records, root=DEFAULT_ROOT, notice=notice)
        self._set_busy(False)

    def _records_failed(self, request: tuple[str, str | None], exc: Exception) -> None:
        if request != self._wanted:
            return
        if not isinstance(exc, AttnflowsError):
            self._set_busy(False)
            raise exc
        self.param.update(records=None, notice=str(exc))
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        """A spinner over the figures while the models run."""
        self.param.update(busy=busy)
        self._figure_box.loading = busy

    def _on_units(self, *_: object) -> None:
        """Word pieces or words: the merge and what its views need are computed with the model's work (a long input's take
        minutes), then drawn; token positions change, so the trace starts again at the default root."""
        records = self.records
        if records is None:
            self.root = DEFAULT_ROOT
            return
        self._set_busy(True)
        run_model_work(lambda: self._prime(records), partial(self._draw_units, records), partial(self._work_failed, records))

    def _draw_units(self, records: tuple[AttentionRecord, ...], _: object) -> None:
        if records is not self.records:
            return  # a newer input is drawn by its own request
        with pn.io.hold():
            self.param.update(root=DEFAULT_ROOT)
            self._draw_all()
        self._set_busy(False)

    def _work_failed(self, records: tuple[AttentionRecord, ...], exc: Exception) -> None:
        if records is self.records:
            self._set_busy(False)
        raise exc

    def _on_method(self, event: param.parameterized.Event) -> None:
        """Each flow method keeps a tau of its own (their weights have different scales)."""
        self._method_tau[event.old] = self.tau
        self.tau = self._method_tau[event.new]

    def reset_root(self, *_: object) -> None:
        """Start the trace at the default root again ([CLS] of the deepest layer, or a decoder's last token)."""
        self.root = DEFAULT_ROOT

    def _on_grid_selection(self, index: list[int], cells: dict) -> None:
        if self._brush is None:  # not a brush this view is clearing
            self.select_heads(heads_at(cells, index) if index else [], brush="grid")

    def _on_map_selection(self, index: list[int]) -> None:
        if self._brush is None:
            rows = self.head_map.points.iloc[index]
            self.select_heads(list(zip(rows["layer"].astype(int), rows["head"].astype(int), strict=True)), brush="map")

    def select_heads(self, heads: list[tuple[int, int]], brush: str = "") -> None:
        """Set the head mask to ``heads`` (layer, head; numbered from 0), or to every head when empty.

        ``brush`` names the plot whose selection chose them (``"grid"`` or ``"map"``): the other plot's brush is cleared.
        """
        mask = np.zeros((self.n_layers, self.n_heads), dtype=bool)
        for layer, head in heads:
            mask[layer, head] = True
        with pn.io.hold():  # the panes write their sources directly: one message per brush
            self._brush = brush
            try:
                self.head_mask = mask if mask.any() else ~mask
            finally:
                self._brush = None

    def _clear_brushes(self, keep: str) -> None:
        """Clear the selection drawn by each brushed plot but ``keep`` (a stale box or lasso would dim other heads)."""
        brushed = {"grid": (self.grid, Layer(Rect)), "map": (self.map, Layer(Scatter))}
        previous = self._brush
        for name, (live, layer) in brushed.items():
            if name != keep and live.figure is not None:
                self._brush = name  # its selection callback must not select every head
                try:
                    renderer(live.figure, layer).data_source.selected.indices = []
                finally:
                    self._brush = previous

    def selected_heads(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs in the head mask, numbered from 0."""
        return [(int(layer), int(head)) for layer, head in np.argwhere(self.head_mask)]

    def _on_tap(self, x: float | None, y: float | None) -> None:
        """Re-root the trace on the token nearest a click in the flow diagram."""
        if self.records is None or x is None or y is None:
            return
        n, levels = self.shown[0].n_tokens, self.n_layers + 1
        if self.layout == "layered":
            token, level = int(round(x)), int(round(y))
        else:
            level = int(round(np.hypot(x, y) - 1.0))
            token = int(round(((np.pi / 2 - np.arctan2(y, x)) % (2 * np.pi)) / (2 * np.pi) * n)) % n
        if 0 <= token < n and 1 <= level < levels:
            with pn.io.hold():
                self.root = (level, token)

    def _root(self, shown: tuple[AttentionRecord, ...] | None = None, root: tuple[int, int] | None = None) -> tuple[int, int]:
        """(level, token) of ``root`` (the current one by default) in ``shown``, the model's defaults filled in."""
        level, token = self.root if root is None else root
        first = (self.shown if shown is None else shown)[0]
        return (self.n_layers if level < 0 else level, first.root_token if token < 0 else token)

    # ------------------------------------------------------------------ computed
    def _computed(self, record: object, kind: object, key: object, compute: Callable[[], T]) -> T:
        """``compute()`` for ``record``, kept per record and kind for two keys: the first asked (the state an input is
        drawn in, which Clear selection returns to; a long input's takes a minute) and the latest."""
        slot = (id(record), kind)
        with self._memo_lock:
            held = self._memo.get(slot)
        values = held[1] if held is not None and held[0] is record else {}
        if key in values:
            return values[key]
        value = compute()
        with self._memo_lock:
            self._memo[slot] = (record, {**dict(list(values.items())[:1]), key: value})
        return value

    @property
    def shown(self) -> tuple[AttentionRecord, ...] | None:
        """The records as drawn: the input's records, or their word-level merge."""
        return self._shown_of(self.records)

    def _shown_of(self, records: tuple[AttentionRecord, ...] | None) -> tuple[AttentionRecord, ...] | None:
        if records is None or self.units == "word pieces":
            return records
        return self._computed(records[0], "words", None, lambda: tuple(word_level(r) for r in records))

    def _measures(self, record: AttentionRecord) -> dict[str, np.ndarray]:
        """Every head measure of ``record``, computed in one pass."""
        return self._computed(record, "measures", None, lambda: head_measures(record.source, record.tokens, record.cls_mask, record.sep_mask))

    def _mean_map(self, record: AttentionRecord) -> np.ndarray:
        """The mean attention map of the selected heads."""
        mask = self.head_mask
        return self._computed(record, "mean", mask.tobytes(), lambda: record.source.mean_map(mask))

    def _traces(self, *, without_top_k: bool = False, shown: tuple[AttentionRecord, ...] | None = None, root: tuple[int, int] | None = None) -> dict[str, AttentionTrace]:
        """Each model's trace for the current state (or the CLS trace without top-k), computed once per state:
        the flow diagrams, their titles and the sentence view share it."""
        shown, root = self.shown if shown is None else shown, self.root if root is None else root
        state = (self.head_mask.tobytes(), self.tau, self.alpha, self.method, self.combine, root, self.top_k)
        at = self._root(shown, root)
        return self._computed(shown[0], ("traces", without_top_k), state, lambda: {name: self._trace(record, without_top_k, at) for name, record in zip(self.names, shown, strict=True)})

    def _trace(self, record: AttentionRecord, without_top_k: bool, root: tuple[int, int]) -> AttentionTrace:
        if self.method in RESIDUAL_TRACES:
            return RESIDUAL_TRACES[self.method](record.source, self.head_mask, tau=self.tau, root=root, causal=record.causal)
        return trace_cls_flow(
            record.source, self.head_mask, tau=self.tau, alpha=self.alpha, root=root, combine=self.combine, top_k=None if without_top_k else self.top_k or None, every_token=self.method == "heads"
        )

    def _method_name(self) -> str:
        """The method as titles name it: "CLS trace" only while it starts at an encoder's [CLS] in the deepest layer."""
        record = self.shown[0]
        if self.method == "trace" and (record.causal or self._root() != (self.n_layers, record.root_token)):
            return "trace"
        return METHOD_NAMES[self.method]

    def _flow_title(self, shown: tuple[str, ...], labels: np.ndarray) -> str:
        """Models, method, where the trace starts, the distinct edges drawn (split in the legend), and what top-k hides."""
        level, token = self._root()
        models = " vs ".join(self.titles[name] for name in shown)
        start = "of every token" if self.method == "heads" else f"from {self.shown[0].tokens[token]} ({level_name(level)})"
        title = f"{models}: {self._method_name()} {start}, {counted(labels.size, 'edge')}"
        heads = int(self.head_mask.sum())
        title += "" if heads == self.head_mask.size else f" ({heads} of {self.head_mask.size} heads)"
        traces = self._traces()
        silent = [self.titles[name] for name in shown if len(shown) > 1 and not traces[name].n_edges and labels.size]
        title += "".join(f"; {name} draws none" for name in silent)  # in the merged diagram a model may keep no edge
        if self.method not in TOP_K_METHODS:
            return title
        return title + hidden_text(self._hidden_by_top_k(shown) - labels.size if self._counts_hidden() else None, self.top_k, labels.size)

    def _counts_hidden(self, shown: tuple[AttentionRecord, ...] | None = None) -> bool:
        """Whether the title counts the edges top-k hides: for inputs up to COUNT_HIDDEN_UP_TO tokens (beyond, counting
        them traces every edge of at least tau, nearly all of a long input's attention)."""
        return self.method in TOP_K_METHODS and bool(self.top_k) and (self.shown if shown is None else shown)[0].n_tokens <= COUNT_HIDDEN_UP_TO

    def _hidden_by_top_k(self, shown: tuple[str, ...]) -> int:
        """Distinct edges of at least tau the CLS trace would draw without top-k."""
        full = self._traces(without_top_k=True)
        return int(np.unique(np.concatenate([full[name].edge_ids() for name in shown])).size)

    def _flow_message(self, traces: dict[str, AttentionTrace]) -> str:
        """Why nothing is drawn, when no trace keeps an edge."""
        if any(t.n_edges for t in traces.values()):
            return ""
        level, token = self._root()
        if self.method != "heads" and not self.head_mask[level - 1].any():
            return f"No edge: the trace starts at {self.shown[0].tokens[token]} in layer {level}, and no selected head is in layer {level}. Select a head of layer {level}, or draw the heads' own edges."
        return f"No edge of weight {self.tau:.2f} or more leaves {self.shown[0].tokens[token]}: lower tau."

    def _encoding(self) -> str:
        """What node sizes and edge widths mean, under each flow diagram (in two lines under half-width diagrams)."""
        text = METHOD_ENCODING.get(self.method, TRACE_ENCODING)
        return two_lines(text) if len(self._flow_layouts()) > 1 else text

    def _flow_frames(self, shown: tuple[str, ...]) -> tuple[dict, str]:
        traces = self._traces()
        drawn = {name: traces[name] for name in shown}
        frames = flow_frames(self.shown[0].tokens, drawn, self.layout, self._flow_message(drawn), rooted=self.method != "heads")
        return frames, self._flow_title(shown, frames["edges"]["label"].to_numpy())

    def _grid_values(self, shown: tuple[AttentionRecord, ...] | None = None) -> np.ndarray:
        return self._measures((self.shown if shown is None else shown)[-1])[self.measure]

    def _grid_title(self) -> str:
        return f"{MEASURE_LABELS[self.measure]} ({self.titles[self.names[-1]]})"

    def _grid_label(self) -> str:
        return MEASURE_LABELS[self.measure]

    def _matrix_element(self, index: int) -> object:
        record, heads = self.shown[index], np.argwhere(self.head_mask)
        label = f"mean of {len(heads)} heads" if len(heads) > 1 else f"layer {heads[0][0] + 1}, head {heads[0][1] + 1}"
        matrix = self._mean_map(record)
        size = int(np.clip(6 * record.n_tokens, 340, 560))  # long inputs get room for more token labels
        return attention_matrix(matrix, record.tokens, title=f"{self.titles[self.names[index]]}: {label}", size=size)

    def _sentence_parts(self) -> tuple[list[str], dict[str, np.ndarray], dict[str, str]]:
        words, index = merge_tokens(self.shown[0].tokens, self.shown[0].word_ids)
        traces = self._traces()
        level, token = self._root()
        heads = np.flatnonzero(self.head_mask[level - 1])  # the root's query attention is in layer level - 1
        values, captions = {}, {}
        for name, record in zip(self.names, self.shown, strict=True):
            if self.shading == "attention":
                row = record.source.rows(level - 1, heads, [token])[:, 0].mean(axis=0) if heads.size else np.zeros(record.n_tokens)
                shown = f"attention of {record.tokens[token]} (layer {level}, {heads.size} heads)"
            else:
                lowest = int(traces[name].edge_layer.min()) if traces[name].n_edges else level
                stops = f", which stops at {level_name(lowest)}" if lowest > 0 else ""  # then only alpha-weighted deeper influence
                row, shown = traces[name].influence[0], f"influence in the {self._method_name()}{stops}"
            values[name] = np.bincount(index, weights=row, minlength=len(words))
            predicts = f" (predicts {record.predicted_label}, {record.probabilities.max():.0%})" if record.predicted_label is not None else ""
            captions[name] = f"{self.titles[name]}{predicts}: {shown}"  # where the trace starts is the flow diagram's title
        return words, values, captions

    # ------------------------------------------------------------------ drawing (a new figure: ranges fit the input)
    def _draw_all(self, *_: object) -> None:
        self._ablate_button.disabled = self.records is None  # nothing to switch off without an input
        with self._push_lock:
            self._draw_grid()
            self._draw_flows()
            self._draw_sentence()
            self._draw_matrices()
            self.ablation.object = ""

    def _draw_grid(self, *_: object) -> None:
        """Draw the grid for a new measure; for a new input or grid model, write the cells into the same figure (its ranges never change)."""
        if self.records is None:
            self.grid.clear()
            self._grid_measure = None
            return
        values, heads = self._grid_values(), self._outlined()
        if self.grid.figure is not None and self._grid_measure == self.measure:
            self.grid.write(grid_frames(values, heads), title=self._grid_title(), clim=grid_clim(values), same_rows=True)
            return
        difference = self.measure == DIFFERENCE
        cells = head_grid(values, "JS (bits)" if difference else self._grid_label(), title=self._grid_title(), cmap="magma_r" if difference else "viridis", width=440, height=300)
        self.grid.draw(cells * grid_outline(heads), GRID_LAYERS, grid_frames(values, heads))
        self._grid_measure = self.measure
        self.grid.on_select(Layer(Rect), self._on_grid_selection)

    def _draw_map(self, *_: object) -> None:
        if self.head_map is None:
            return
        over = f"{self.head_map.n_sentences} corpus sentences" if self.head_map.n_sentences else "the corpus"
        overlay = head_embedding(self.head_map.points, self.head_map.moves, color_by=self.map_color, titles=self.titles, title=f"heads over {over} (drag to select)", width=460, height=330, responsive=True)
        self.map.draw(overlay, HIGHLIGHT_LAYERS, highlight_frames(self.head_map.points, self._outlined()))
        self.map.on_select(Layer(Scatter), lambda index, _: self._on_map_selection(index))  # the heads, drawn before the highlight

    def _flow_layouts(self) -> list[tuple[str, ...]]:
        return [self.names]

    def _draw_flows(self, *_: object) -> None:
        self.flows = {}
        if self.records is None:
            self._flow_row.objects = []
            return
        panes, layouts = [], self._flow_layouts()
        for shown in layouts:
            live = self.flows[shown] = LiveFigure(sizing_mode="stretch_width")
            frames, title = self._flow_frames(shown)
            height = FLOW_HEIGHT if self.layout == "layered" else 640
            # the layered diagram takes the page's width; the rings keep their aspect
            element = flow_diagram(
                self.shown[0].tokens, {n: self._traces()[n] for n in shown}, layout=self.layout, frames=frames, width=height + 220, height=height,  # rings plus the legend
                responsive=self.layout == "layered", encoding=self._encoding(),
            )
            small = {"fontsize": {"title": "9pt"}} if len(layouts) > 1 else {}  # side by side: half the width for each title
            live.draw(element.opts(hv.opts.Overlay(title=title, **small)), flow_layers(), frames)
            live.on_tap(self._on_tap)
            panes.append(live.pane)
        self._flow_row.objects = panes

    def _draw_sentence(self) -> None:
        if self.records is None:
            self.sentence.clear()
            return
        words, values, captions = self._sentence_parts()
        self.sentence.draw(sentence_view(words, values, captions, max_chars=96), SENTENCE_LAYERS, sentence_frames(words, values, captions, max_chars=96))

    def _draw_matrices(self) -> None:
        for index, (name, live) in enumerate(self.matrices.items()):
            if self.records is None:
                live.clear()
                continue
            element = self._matrix_element(index)
            live.draw(element, MATRIX_LAYERS, matrix_frames(element))

    # ------------------------------------------------------------------ writing (a brush or a setting: same figures)
    def _outlined(self) -> list[tuple[int, int]]:
        return [] if self.head_mask.all() else self.selected_heads()

    def _on_mask(self, *_: object) -> None:
        """Write every pane's data for the new head mask into the figures already on the page."""
        with self._push_lock:
            self.ablation.object = ""  # a result for other heads
            self.grid.write(grid_outline_frames(self._outlined()))
            self._clear_brushes(keep="" if self.head_mask.all() else self._brush or "")  # "Clear selection" clears both
            if self.head_map is not None:
                self.map.write(highlight_frames(self.head_map.points, self._outlined()))
        self._when_computed(self._write_selected)

    def _write_selected(self) -> None:
        if self.records is None:
            return
        with self._push_lock:
            self._write_flows()
            for index, live in enumerate(self.matrices.values()):
                element = self._matrix_element(index)
                live.write(matrix_frames(element), title=element.opts.get("plot").kwargs["title"], clim=matrix_clim(element))

    def _write_traced(self, *_: object) -> None:
        self._when_computed(self._write_flows)

    def _write_flows(self) -> None:
        if self.records is None:
            return
        with self._push_lock:
            for shown, live in self.flows.items():
                frames, title = self._flow_frames(shown)
                live.write(frames, title=title, caption=self._encoding())
            self._write_sentence()

    def _write_sentence(self, *_: object) -> None:
        if self.records is None:
            return
        words, values, captions = self._sentence_parts()
        self.sentence.write(sentence_frames(words, values, captions, max_chars=96))

    @param.depends("notice", "records", watch=True)
    def _show_notice(self) -> None:
        """Show the notice (escaped) in one persistent alert: a hint without an input, a warning with one."""
        self.notice_pane.param.update(
            object=html.escape(self.notice), alert_type="warning" if self.records is not None else "info", visible=bool(self.notice)
        )

    def _ablate(self, _: object = None) -> None:
        if self.records is None:
            return
        name = self.names[-1]
        lm = self.models[name]
        if not (lm.has_classifier or lm.is_language_model):
            self.ablation.object = f"{html.escape(self.titles[name])} has no classification or language-model head, so there is no prediction to ablate."
            return
        heads, request = self.selected_heads(), self._request()
        self._ablate_button.disabled = True
        self.ablation.object = f"Running {html.escape(self.titles[name])} with {len(heads)} head{'' if len(heads) == 1 else 's'} off…"

        def done(result: AblationResult) -> None:
            self._ablate_button.disabled = False
            if (heads, request) != (self.selected_heads(), self._request()):
                self.ablation.object = ""  # the selection or the input changed meanwhile
                return
            before = f"{html.escape(result.original_label)} ({result.original_probabilities.max():.0%})"
            after = f"{html.escape(result.predicted_label)} ({result.probabilities.max():.0%})"
            change = "**changes**" if result.prediction_changed else "stays"
            self.ablation.object = f"With {len(heads)} head{'' if len(heads) == 1 else 's'} off, the prediction of {html.escape(self.titles[name])} {change}: {before} → {after}."

        def failed(exc: Exception) -> None:
            self._ablate_button.disabled = False
            if not isinstance(exc, AttnflowsError):
                raise exc
            self.ablation.object = html.escape(str(exc))

        run_model_work(lambda: ablate_heads(lm, *request, heads), done, failed)

    def _widgets(self) -> dict[str, dict[str, object]]:
        return {
            "text": {"type": pn.widgets.TextAreaInput, "name": "Sentence", "auto_grow": True, "max_rows": MAX_TEXT_ROWS, "max_length": 100_000},
            "text_pair": {"type": pn.widgets.TextInput, "name": "Second segment (optional)"},
            "method": {"type": pn.widgets.Select, "name": "Flow method"},
            "tau": {"type": pn.widgets.FloatSlider, "name": tau_label(self.method)},
            "top_k": {"type": pn.widgets.IntSlider, "name": "strongest edges per token (0 = all)"},
            "alpha": {"type": pn.widgets.FloatSlider, "name": "alpha (deeper influence)"},
            "combine": {"type": pn.widgets.RadioButtonGroup, "name": "Heads"},
            "layout": {"type": pn.widgets.RadioButtonGroup, "name": "Layout"},
            "units": {"type": pn.widgets.RadioButtonGroup, "name": "Units"},
            "shading": {"type": pn.widgets.RadioButtonGroup, "name": "Words shaded by"},
            "measure": {"type": pn.widgets.Select, "name": "Grid colour"},
        }

    def controls(self) -> pn.Column:
        """The widgets that drive this view, each with its help, and the Analyze / Clear selection / Reset root buttons."""
        column = pn.Column(sizing_mode="stretch_width")
        widgets = {}
        for name, spec in self._widgets().items():
            options = dict(spec)
            kind, label = options.pop("type"), options.pop("name")
            widgets[name] = kind.from_param(self.param[name], name=label, sizing_mode="stretch_width", **options)
            help_icon = pn.widgets.TooltipIcon(value=self.param[name].doc, margin=(6, 0, 0, 0))
            if kind is pn.widgets.RadioButtonGroup:  # a button group draws no name of its own, so no help icon either
                column.append(pn.Row(pn.pane.HTML(f"<label>{html.escape(label)}</label>", margin=(6, 4, 0, 10)), help_icon))
                column.append(widgets[name])
            elif "description" in widgets[name].param:
                column.append(widgets[name])
            else:  # sliders take no description: the help sits beside them
                column.append(pn.Row(widgets[name], help_icon, sizing_mode="stretch_width"))
            if name == "text_pair":
                column.append(self._buttons(widgets["text"], widgets["text_pair"]))
        tau = widgets["tau"]
        self.param.watch(lambda event: setattr(tau, "name", tau_label(event.new)), "method")  # a method brings its own tau: say so
        text_box = widgets["text"]
        text_box.param.watch(lambda event: setattr(text_box, "rows", text_rows(event.new)), "value")  # the box's own growth follows only typing
        text_box.rows = text_rows(text_box.value)
        return column

    def _buttons(self, text: pn.widgets.TextAreaInput, text_pair: pn.widgets.TextInput) -> pn.Column:
        """Analyze (the text as typed, without leaving the box), Clear selection, Reset root."""
        analyze = pn.widgets.Button(label="Analyze (Ctrl+Enter)", color="primary", sizing_mode="stretch_width", description="Run both boxes' text through the model(s); Ctrl+Enter in a box and leaving the box do too.")
        def submit(_: object) -> None:
            self.param.update(text=text.value_input, text_pair=text_pair.value_input or "")

        analyze.on_click(submit)
        keys = SubmitKeys()
        keys.param.watch(submit, "presses")
        clear = pn.widgets.Button(label="Clear selection", description="Select every head again (the grid and head map brushes).")
        clear.on_click(lambda _: self.select_heads([]))
        reset = pn.widgets.Button(label="Reset root", description="Trace from the deepest layer's [CLS] (a decoder's last token) again; a click on a token re-roots the flow there.")
        reset.on_click(self.reset_root)
        return pn.Column(analyze, pn.Row(clear, reset, sizing_mode="stretch_width"), keys, sizing_mode="stretch_width")

    def models_line(self) -> str:
        """Which models the views show (escaped Markdown): name, size, and the classes of a classification head."""
        parts = []
        for name, lm in self.models.items():
            labels = f", classifies {' / '.join(lm.labels)}" if lm.has_classifier and lm.labels else ""
            parts.append(f"**{html.escape(self.titles[name])}**: {html.escape(short_name(lm.model_id))} ({lm.n_layers} layers × {lm.n_heads} heads{html.escape(labels)})")
        return " · ".join(parts)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            pn.pane.Markdown(self.models_line(), sizing_mode="stretch_width", margin=(0, 10)),
            self.notice_pane,
            pn.Card(pn.pane.Markdown(how_to_read(len(self.models) == 2), sizing_mode="stretch_width"), title="How to read these views", collapsed=False, sizing_mode="stretch_width"),
            self._figure_box,
            sizing_mode="stretch_width",
        )
