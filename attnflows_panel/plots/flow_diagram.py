"""The sentence flow diagram: tokens at every level, traced attention edges between levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from bokeh.models import CustomJS, CustomJSHover, HoverTool, Scatter, Segment, Text

from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, SHARED, AttentionTrace
from attnflows_panel.plots import FINETUNED_COLOR, MODEL_TITLES, PRETRAINED_COLOR, SHARED_COLOR, holoviews_bokeh
from attnflows_panel.plots.attention_matrix import token_axis
from attnflows_panel.plots.bound import Layer, caption, field_legend

if TYPE_CHECKING:
    import holoviews as hv

ROOT_COLOR = "#303030"
LABEL_COLORS = {SHARED: SHARED_COLOR, PRETRAINED: PRETRAINED_COLOR, FINETUNED: FINETUNED_COLOR}
UNREACHED_COLOR = "#d9d9d9"
EDGE_COLUMNS = ["layer", "query", "key", "query_token", "key_token", "label", "weight", "heads_pretrained", "weight_pretrained", "heads_finetuned", "weight_finetuned", "legend"]
TRACE_ENCODING = "node size: influence (I = c + alpha × I above; c: edges arriving) · edge width: weight · node colour as the edges' · black: root · pale dot: not reached"
NOT_DRAWN = -1.0  # a model's weight for an edge it does not draw (Bokeh shows NaN as "NaN" before any formatter runs)
LABEL_ORDER = (SHARED, PRETRAINED, FINETUNED)  # legend order; model-only edges drawn over shared ones
LEGEND_NAMES = {SHARED: "shared", PRETRAINED: "pre-trained only", FINETUNED: "fine-tuned only"}
NAME_EVERY_TOKEN_UP_TO = 120  # tokens on the layered diagram's axis (about 10 px each on a 1280 px window); past it, unreached nodes are not drawn
NAMED_TOKENS = 100  # about this many names on the axis of a longer input
COUNT_HIDDEN_UP_TO = 1024  # tokens; past it titles say top-k hides weaker edges without counting them (nearly all of the attention)


def hidden_text(hidden: int | None, top_k: int | None, shown: int) -> str:
    """``"; M weaker hidden (top k per token)"``; without a count when ``hidden`` is None; ``""`` when top-k hides nothing
    (or nothing is drawn: top-k keeps an edge of every token that has one)."""
    if hidden is None:
        return f"; weaker edges hidden (top {top_k} per token)" if top_k and shown else ""
    return f"; {hidden} weaker hidden (top {top_k} per token)" if hidden > 0 else ""


def heads_text(edge_heads: np.ndarray) -> np.ndarray:
    """``"1, 4, 8"`` (heads numbered from 1, as the views show them) for each row of a boolean ``[E, H]`` array
    (``"-"`` for none), one join per distinct row."""
    if len(edge_heads) == 0:
        return np.empty(0, dtype=object)
    packed = np.packbits(edge_heads, axis=1)  # one byte string per row, so rows sort as scalars
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, index = np.unique(keys, return_index=True, return_inverse=True)
    texts = np.array([", ".join(map(str, np.flatnonzero(row) + 1)) or "-" for row in edge_heads[first]], dtype=object)
    return texts[index]


def flow_edges(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> pd.DataFrame:
    """One row per (layer, query, key) kept by any trace, labelled shared / pretrained / finetuned.

    Rows are grouped by label (shared, pre-trained only, fine-tuned only), then by (layer, query, key);
    ``legend`` names each row's group with its edge count.
    ``traces`` maps ``"pretrained"`` and/or ``"finetuned"`` to a trace of the same input.
    """
    columns = _edge_columns(tokens, traces)
    return pd.DataFrame({c: columns[c] for c in EDGE_COLUMNS})


def _edge_columns(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> dict[str, np.ndarray]:
    for name in traces:
        if name not in (PRETRAINED, FINETUNED):
            raise ValueError(f"trace names must be {PRETRAINED!r} or {FINETUNED!r}, got {name!r}")
    n = next(iter(traces.values())).counts.shape[1]
    ids = np.unique(np.concatenate([trace.edge_ids() for trace in traces.values()]))  # sorted by (layer, query, key)
    columns: dict[str, np.ndarray] = {"layer": ids // (n * n), "query": ids // n % n, "key": ids % n}
    has = {}
    for name in (PRETRAINED, FINETUNED):
        weight, heads = np.full(len(ids), NOT_DRAWN), np.full(len(ids), "-", dtype=object)
        trace = traces.get(name)
        if trace is not None:
            at = np.searchsorted(ids, trace.edge_ids())
            weight[at], heads[at] = trace.edge_weight, heads_text(trace.edge_heads)
        columns[f"weight_{name}"], columns[f"heads_{name}"], has[name] = weight, heads, weight != NOT_DRAWN
    rank = np.where(has[PRETRAINED] & has[FINETUNED], 0, np.where(has[PRETRAINED], 1, 2))
    order = np.argsort(rank, kind="stable")
    columns = {name: values[order] for name, values in columns.items()}
    labels = np.asarray(LABEL_ORDER, dtype=object)[rank[order]]
    columns["label"] = labels
    columns["weight"] = np.fmax(columns["weight_pretrained"], columns["weight_finetuned"])
    token_array = np.asarray(tokens, dtype=object)
    columns["query_token"], columns["key_token"] = token_array[columns["query"]], token_array[columns["key"]]
    counts = edge_counts(labels)
    names = LEGEND_NAMES if len(traces) > 1 else dict.fromkeys(LEGEND_NAMES, "traced")  # one model: no "only"
    columns["legend"] = np.array([f"{names[label]} ({counts[label]})" for label in LABEL_ORDER], dtype=object)[rank[order]] if len(labels) else labels
    return columns


def edge_counts(labels: np.ndarray) -> dict[str, int]:
    """Edges per label (shared, pretrained, finetuned): the one count every view and title uses."""
    return {label: int(np.count_nonzero(labels == label)) for label in LABEL_ORDER}


def flow_nodes(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> pd.DataFrame:
    """One row per (level, token): influence per model, and which models reached it."""
    return pd.DataFrame(_node_columns(tokens, traces))


def _node_columns(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> dict[str, np.ndarray]:
    levels, n = next(iter(traces.values())).counts.shape
    level, token = np.meshgrid(np.arange(levels), np.arange(n), indexing="ij")
    columns = {"level": level.ravel(), "index": token.ravel(), "token": np.asarray(tokens, dtype=object)[token.ravel()]}
    reached = {}
    for name in (PRETRAINED, FINETUNED):
        trace = traces.get(name)
        columns[f"influence_{name}"] = trace.influence.ravel() if trace is not None else np.full(levels * n, np.nan)
        reached[name] = _touched(trace).ravel() if trace is not None else np.zeros(levels * n, dtype=bool)
    pre, fine = reached[PRETRAINED], reached[FINETUNED]
    columns["label"] = np.where(pre & fine, SHARED, np.where(pre, PRETRAINED, np.where(fine, FINETUNED, ""))).astype(object)
    columns["influence"] = np.nan_to_num(np.fmax(columns["influence_pretrained"], columns["influence_finetuned"]))
    return columns


def _touched(trace: AttentionTrace) -> np.ndarray:
    """``[L + 1, n]``: nodes the trace reached or that a kept edge touches (a flow edge may leave a node
    whose own incoming edges are each below tau)."""
    touched = trace.reached.copy()
    touched[trace.edge_layer, trace.edge_key] = True
    touched[trace.edge_layer + 1, trace.edge_query] = True
    return touched


def _colors(labels: np.ndarray) -> np.ndarray:
    """The comparison colour of each label; grey for a node no trace reached."""
    colors = np.full(len(labels), UNREACHED_COLOR, dtype=object)
    for label, color in LABEL_COLORS.items():
        colors[labels == label] = color
    return colors


def _positions(level: np.ndarray, index: np.ndarray, n_tokens: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    if layout == "layered":
        return index.astype(float), level.astype(float)
    angle = np.pi / 2 - 2 * np.pi * index / n_tokens
    radius = 1.0 + level
    return radius * np.cos(angle), radius * np.sin(angle)


def flow_layers() -> dict[str, Layer]:
    """The glyphs of a rendered flow diagram that follow the traces, and the columns each reads."""
    return {
        "edges": Layer(Segment, {"x0": "x0", "y0": "y0", "x1": "x1", "y1": "y1", "line_color": "color", "line_width": "width"}),
        "nodes": Layer(Scatter, {"x": "x", "y": "y", "fill_color": "color", "size": "size"}),
        "message": Layer(Text, {"x": "x", "y": "y", "text": "text"}),
    }


def flow_frames(tokens: Sequence[str], traces: Mapping[str, AttentionTrace], layout: str = "layered", message: str = "", *, rooted: bool = True) -> dict[str, pd.DataFrame]:
    """The columns the flow diagram draws: edges (with positions, colour, width), nodes (size, colour) and a message.

    ``message`` is written across the plot (for example why no edge is drawn); a ``rooted`` diagram marks the
    traces' root in black (not the heads' own edges, which start from every token).
    """
    if layout not in ("layered", "radial"):
        raise ValueError(f"layout must be 'layered' or 'radial', got {layout!r}")
    n = len(tokens)
    nodes, edges = _node_columns(tokens, traces), _edge_columns(tokens, traces)
    levels = int(nodes["level"].max()) + 1
    nodes["x"], nodes["y"] = _positions(nodes["level"], nodes["index"], n, layout)
    peak = max(float(nodes["influence"].max()), 1e-9)
    reached = nodes["label"] != ""
    nodes["size"] = np.where(reached, 5 + 13 * np.sqrt(nodes["influence"] / peak), 3.0)
    nodes["color"] = _colors(nodes["label"])
    nodes["level_name"] = np.array(["input", *(f"layer {i}" for i in range(1, levels))], dtype=object)[nodes["level"]]
    root_level, root_token = next(iter(traces.values())).root
    is_root = (nodes["level"] == root_level) & (nodes["index"] == root_token) & rooted
    nodes["size"][is_root], nodes["color"][is_root] = 16.0, ROOT_COLOR
    # a layer-l edge joins its key on level l to its query on level l + 1
    edges["x0"], edges["y0"] = _positions(edges["layer"], edges["key"], n, layout)
    edges["x1"], edges["y1"] = _positions(edges["layer"] + 1, edges["query"], n, layout)
    edges["color"] = _colors(edges["label"])
    edges["width"] = 0.5 + 4.5 * edges["weight"]
    middle = ((n - 1) / 2, (levels - 1) / 2) if layout == "layered" else (0.0, 0.0)
    text = pd.DataFrame({"x": [middle[0]], "y": [middle[1]], "text": np.array([message], dtype=object)})
    nodes = pd.DataFrame(nodes)
    if n > NAME_EVERY_TOKEN_UP_TO:  # a long input's unreached dots fill no gap (2,999 tokens: 98,967 rows, 4.1 MB a brush)
        nodes = nodes[reached | is_root].reset_index(drop=True)
    return {"edges": pd.DataFrame(edges), "nodes": nodes, "message": text}


# Bokeh formats hover values in the browser: layers from 1, "not drawn" where a model has no such edge
# (below tau, or not among a token's strongest edges).
# (Code, not models: a Bokeh model belongs to one document, so each diagram makes its own formatters.)
LAYER_FROM_ONE = "return String(Math.round(value) + 1);"
WEIGHT_OR_NOT_DRAWN = 'return value >= 0 ? value.toFixed(3) : "not drawn";'
INFLUENCE_OR_NONE = 'return Number.isFinite(value) ? value.toFixed(2) : "—";'


def _edge_tips(models: Sequence[str]) -> list[tuple[str, str]]:
    tips = [("layer", "@{layer}{custom}"), ("query", "@{query_token} (position @{query})"), ("attends to key", "@{key_token} (position @{key})")]  # the attention's own reading, whichever way the diagram is drawn; positions from 0 as the tokenizer counts
    for model in models:
        tips += [(f"{_named(model, models)}weight", f"@{{weight_{model}}}{{custom}}"), (f"{_named(model, models)}heads", f"@{{heads_{model}}}")]
    return tips


def _named(model: str, models: Sequence[str]) -> str:
    """``"pre-trained "``: how a tooltip names a model's values, unless the diagram draws one model (whose title names it)."""
    return "" if len(models) == 1 else f"{MODEL_TITLES[model]} "


def _hover(tips: list[tuple[str, str]], formatters: dict[str, str], **options: object) -> HoverTool:
    """A hover showing the one item nearest the pointer (overlapping edges never stack tooltips); formatters as JS code."""
    return HoverTool(tooltips=tips, formatters={field: CustomJSHover(code=code) for field, code in formatters.items()}, limit=1, **options)


# While the pointer is on a token, the edges' hover pauses (its renderers emptied, which also hides its
# tooltip; emptying its tooltips would leave a shown one in place): one tooltip at a time, the token's.
EDGES_PAUSED_ON_TOKENS = """
const on_token = cb_data.index.indices.length > 0;
if (on_token && edges.renderers.length > 0) { edges.paused_renderers = edges.renderers; edges.renderers = []; }
if (!on_token && edges.renderers.length === 0 && edges.paused_renderers !== undefined) edges.renderers = edges.paused_renderers;
"""


def _pause_edges_on_tokens(plot: object, _: object) -> None:
    """A HoloViews hook giving the tokens' hover a callback that pauses the edges' hover (the rendered tools: HoloViews copies them)."""
    hovers = {tool.tooltips[0][0]: tool for tool in plot.state.toolbar.tools if isinstance(tool, HoverTool)}
    hovers["token"].callback = CustomJS(args={"edges": hovers["layer"]}, code=EDGES_PAUSED_ON_TOKENS)
    hovers["layer"].syncable = False  # pausing it is the page's business: no message to a server per token passed


def _boxed(plot: object, element: object) -> None:
    """A HoloViews hook: the ring names on a white box, so that edges crossing them never cover them."""
    plot.handles["glyph"].update(background_fill_color="white", background_fill_alpha=0.85, padding=1)


def layered_axis(n_tokens: int) -> tuple[tuple[float, float], int, str]:
    """The layered diagram's x range for ``n_tokens`` and its token names' rotation (degrees) and font size
    (a token has about 12 px at 80 tokens on a 1280 px window)."""
    return (-1, n_tokens), 60 if n_tokens <= 40 else 90, "9pt" if n_tokens <= 40 else "8pt" if n_tokens <= 80 else "7pt"


def level_axis(levels: int) -> tuple[list[tuple[int, str]], tuple[float, float]]:
    """The layered diagram's y ticks (``input``, ``layer 1``, ...) and y range for ``levels`` levels (the input and each layer)."""
    return [(i, "input" if i == 0 else f"layer {i}") for i in range(levels)], (-0.6, levels - 0.6)


def flow_diagram(
    tokens: Sequence[str],
    traces: Mapping[str, AttentionTrace],
    *,
    layout: Literal["layered", "radial"] = "layered",
    width: int = 900,
    height: int = 520,
    message: str = "",
    frames: Mapping[str, pd.DataFrame] | None = None,
    responsive: bool = False,
    encoding: str = TRACE_ENCODING,
) -> hv.Overlay:
    """Tokens at every level (input at the bottom, or the innermost ring), edges sized by weight.

    Edge and node colour: pre-trained only turquoise, fine-tuned only purple, shared grey; a legend gives
    the count of each. ``frames`` are this input's :func:`flow_frames`, when already computed; a
    ``responsive`` diagram takes the width of its container instead of ``width``; ``encoding`` is written under
    the plot (what node sizes and edge widths mean).
    """
    hv = holoviews_bokeh()
    frames = frames if frames is not None else flow_frames(tokens, traces, layout, message)
    edges, nodes = frames["edges"], frames["nodes"]
    n = len(tokens)
    levels = int(nodes["level"].max()) + 1
    models = [m for m in (PRETRAINED, FINETUNED) if m in traces]
    segment_dims = [c for c in edges.columns if c not in ("x0", "y0", "x1", "y1")]
    # an edge's tooltip follows the pointer (snapped to the data it would sit at the segment's far end)
    edge_hover = _hover(_edge_tips(models), {f"@{{weight_{m}}}": WEIGHT_OR_NOT_DRAWN for m in models} | {"@{layer}": LAYER_FROM_ONE}, attachment="below", point_policy="follow_mouse")
    segments = hv.Segments(edges, ["x0", "y0", "x1", "y1"], segment_dims, label="edges").opts(color="color", line_width="width", alpha=0.75, tools=[edge_hover])
    node_tips = [("token", "@{token} (@{index})"), ("level", "@{level_name}")]
    node_tips += [(f"{_named(m, models)}influence", f"@{{influence_{m}}}{{custom}}") for m in models]
    node_hover = _hover(node_tips, {f"@{{influence_{m}}}": INFLUENCE_OR_NONE for m in models}, attachment="above")
    points = hv.Points(nodes, ["x", "y"], [c for c in nodes.columns if c not in ("x", "y")], label="tokens").opts(
        color="color", size="size", line_color="white", tools=[node_hover, "tap"]
    )
    message = hv.Labels(frames["message"], ["x", "y"], "text", label="message").opts(text_font_size="12pt", text_color="#555555", text_align="center")
    if layout == "layered":
        # token names as x ticks rather than a Labels layer: one element fewer to update on every brush
        levels_ticks, ylim = level_axis(levels)
        xlim, rotation, label_size = layered_axis(n)
        if n <= NAME_EVERY_TOKEN_UP_TO:
            xticks: dict[str, object] = dict(xticks=[(i, str(t)) for i, t in enumerate(tokens)])
        else:  # every 2nd, 5th, 10th... token named, every token once zoomed in
            ticker, names = token_axis(tokens, NAMED_TOKENS)
            xticks = dict(xticks=ticker, xformatter=names)
        axes = dict(**xticks, xrotation=rotation, fontsize={"xticks": label_size}, xlabel="", yticks=levels_ticks, ylabel="", ylim=ylim, xlim=xlim)
        layers = segments * points * message
    else:
        outer = nodes[nodes["level"] == levels - 1]
        angle = np.pi / 2 - 2 * np.pi * outer["index"].to_numpy() / n
        labels = hv.Labels(outer.assign(x=(levels + 0.9) * np.cos(angle), y=(levels + 0.9) * np.sin(angle)), ["x", "y"], "token").opts(text_font_size="9pt", text_color=ROOT_COLOR)
        between = np.pi / 2 - 2 * np.pi * (n // 2 + 0.5) / n  # each ring's name sits between two tokens at the bottom, away from the root's spokes
        radius = 1.0 + np.arange(levels)
        names = pd.DataFrame({"x": radius * np.cos(between), "y": radius * np.sin(between), "text": ["input", *(f"layer {i}" for i in range(1, levels))]})
        rings = hv.Labels(names, ["x", "y"], "text").opts(text_font_size="8pt", text_color="#555555", text_align="right", hooks=[_boxed])
        reach = levels + 2.2
        axes = dict(xaxis=None, yaxis=None, xlim=(-reach, reach), ylim=(-reach, reach), data_aspect=1)
        layers = segments * points * message * labels * rings
    size = dict(responsive=True, min_width=380) if responsive else dict(width=width)  # two side by side fit 1280 px
    # active tools: pan only, so that the wheel scrolls the page rather than zooming the diagram
    return layers.opts(hv.opts.Overlay(height=height, toolbar="right", active_tools=["pan"], show_legend=False, hooks=[field_legend(Segment, "legend", "edges"), caption(encoding), _pause_edges_on_tokens], **size, **axes))
