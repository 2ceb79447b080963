"""The sentence flow diagram: tokens at every level, traced attention edges between levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import holoviews as hv
import numpy as np
import pandas as pd

from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, SHARED, AttentionTrace
from attnflows_panel.plots import FINETUNED_COLOR, PRETRAINED_COLOR, SHARED_COLOR

ROOT_COLOR = "#303030"
LABEL_COLORS = {SHARED: SHARED_COLOR, PRETRAINED: PRETRAINED_COLOR, FINETUNED: FINETUNED_COLOR}
UNREACHED_COLOR = "#d9d9d9"
EDGE_COLUMNS = ["layer", "query", "key", "query_token", "key_token", "label", "weight", "heads_pretrained", "weight_pretrained", "heads_finetuned", "weight_finetuned"]


def heads_text(edge_heads: np.ndarray) -> np.ndarray:
    """``"0, 3, 7"`` for each row of a boolean ``[E, H]`` array (``"-"`` for none), one join per distinct row."""
    if len(edge_heads) == 0:
        return np.empty(0, dtype=object)
    packed = np.packbits(edge_heads, axis=1)  # one byte string per row, so rows sort as scalars
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, index = np.unique(keys, return_index=True, return_inverse=True)
    texts = np.array([", ".join(map(str, np.flatnonzero(row))) or "-" for row in edge_heads[first]], dtype=object)
    return texts[index]


def flow_edges(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> pd.DataFrame:
    """One row per (layer, query, key) kept by any trace, labelled shared / pretrained / finetuned.

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
        weight, heads = np.full(len(ids), np.nan), np.full(len(ids), "-", dtype=object)
        trace = traces.get(name)
        if trace is not None:
            at = np.searchsorted(ids, trace.edge_ids())
            weight[at], heads[at] = trace.edge_weight, heads_text(trace.edge_heads)
        columns[f"weight_{name}"], columns[f"heads_{name}"], has[name] = weight, heads, ~np.isnan(weight)
    columns["label"] = np.where(has[PRETRAINED] & has[FINETUNED], SHARED, np.where(has[PRETRAINED], PRETRAINED, FINETUNED)).astype(object)
    columns["weight"] = np.fmax(columns["weight_pretrained"], columns["weight_finetuned"])
    token_array = np.asarray(tokens, dtype=object)
    columns["query_token"], columns["key_token"] = token_array[columns["query"]], token_array[columns["key"]]
    return columns


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
        reached[name] = trace.reached.ravel() if trace is not None else np.zeros(levels * n, dtype=bool)
    pre, fine = reached[PRETRAINED], reached[FINETUNED]
    columns["label"] = np.where(pre & fine, SHARED, np.where(pre, PRETRAINED, np.where(fine, FINETUNED, ""))).astype(object)
    columns["influence"] = np.nan_to_num(np.fmax(columns["influence_pretrained"], columns["influence_finetuned"]))
    return columns


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


def flow_diagram(
    tokens: Sequence[str],
    traces: Mapping[str, AttentionTrace],
    *,
    layout: Literal["layered", "radial"] = "layered",
    width: int = 900,
    height: int = 520,
) -> hv.Overlay:
    """Tokens at every level (input at the bottom, or the innermost ring), edges sized by weight.

    Edge and node colour: pre-trained only turquoise, fine-tuned only purple, shared grey.
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
    root_level, root_token = next(iter(traces.values())).root
    is_root = (nodes["level"] == root_level) & (nodes["index"] == root_token)
    nodes["size"][is_root], nodes["color"][is_root] = 16.0, ROOT_COLOR
    # a layer-l edge joins its key on level l to its query on level l + 1
    edges["x0"], edges["y0"] = _positions(edges["layer"], edges["key"], n, layout)
    edges["x1"], edges["y1"] = _positions(edges["layer"] + 1, edges["query"], n, layout)
    edges["color"] = _colors(edges["label"])
    edges["width"] = 0.5 + 4.5 * edges["weight"]
    edges, nodes = pd.DataFrame(edges), pd.DataFrame(nodes)

    edge_tips = [("layer", "@layer"), ("query", "@query_token (@query)"), ("key", "@key_token (@key)"), ("pre-trained heads", "@heads_pretrained"), ("pre-trained weight", "@weight_pretrained{0.000}"), ("fine-tuned heads", "@heads_finetuned"), ("fine-tuned weight", "@weight_finetuned{0.000}")]
    segments = hv.Segments(edges, ["x0", "y0", "x1", "y1"], [c for c in edges.columns if c not in ("x0", "y0", "x1", "y1")], label="edges").opts(
        color="color", line_width="width", alpha=0.75, hover_tooltips=edge_tips
    )
    node_tips = [("token", "@token (@index)"), ("level", "@level"), ("influence, pre-trained", "@influence_pretrained{0.00}"), ("influence, fine-tuned", "@influence_finetuned{0.00}")]
    points = hv.Points(nodes, ["x", "y"], [c for c in nodes.columns if c not in ("x", "y")], label="tokens").opts(
        color="color", size="size", line_color="white", hover_tooltips=node_tips, tools=["tap"]
    )
    if layout == "layered":
        # token names as x ticks rather than a Labels layer: one element fewer to update on every brush
        levels_ticks = [(i, "input" if i == 0 else f"layer {i}") for i in range(levels)]
        axes = dict(xticks=[(i, str(t)) for i, t in enumerate(tokens)], xrotation=60, xlabel="", yticks=levels_ticks, ylabel="", ylim=(-0.6, levels - 0.6), xlim=(-1, n))
        layers = segments * points
    else:
        outer = nodes[nodes["level"] == levels - 1]
        angle = np.pi / 2 - 2 * np.pi * outer["index"].to_numpy() / n
        labels = hv.Labels(outer.assign(x=(levels + 0.9) * np.cos(angle), y=(levels + 0.9) * np.sin(angle)), ["x", "y"], "token").opts(text_font_size="9pt", text_color=ROOT_COLOR)
        reach = levels + 2.2
        axes = dict(xaxis=None, yaxis=None, xlim=(-reach, reach), ylim=(-reach, reach), data_aspect=1)
        layers = segments * points * labels
    return layers.opts(hv.opts.Overlay(width=width, height=height, toolbar="right", show_legend=False, **axes))
