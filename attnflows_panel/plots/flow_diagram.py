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
EDGE_COLUMNS = ["layer", "query", "key", "query_token", "key_token", "label", "weight", "heads_pretrained", "weight_pretrained", "heads_finetuned", "weight_finetuned"]


def _heads_text(row: np.ndarray) -> str:
    return ", ".join(str(h) for h in np.flatnonzero(row)) or "-"


def flow_edges(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> pd.DataFrame:
    """One row per (layer, query, key) kept by any trace, labelled shared / pretrained / finetuned.

    ``traces`` maps ``"pretrained"`` and/or ``"finetuned"`` to a trace of the same input.
    """
    frames = []
    for name, trace in traces.items():
        if name not in (PRETRAINED, FINETUNED):
            raise ValueError(f"trace names must be {PRETRAINED!r} or {FINETUNED!r}, got {name!r}")
        frames.append(
            pd.DataFrame(
                {
                    "layer": trace.edge_layer,
                    "query": trace.edge_query,
                    "key": trace.edge_key,
                    f"weight_{name}": trace.edge_weight,
                    f"heads_{name}": [_heads_text(r) for r in trace.edge_heads],
                }
            )
        )
    edges = frames[0]
    for frame in frames[1:]:
        edges = edges.merge(frame, on=["layer", "query", "key"], how="outer")
    for name in (PRETRAINED, FINETUNED):
        if f"weight_{name}" not in edges:
            edges[f"weight_{name}"] = np.nan
            edges[f"heads_{name}"] = None
    has_pre, has_fine = edges["weight_pretrained"].notna(), edges["weight_finetuned"].notna()
    edges["label"] = np.where(has_pre & has_fine, SHARED, np.where(has_pre, PRETRAINED, FINETUNED))
    edges["weight"] = edges[["weight_pretrained", "weight_finetuned"]].max(axis=1)
    edges[["heads_pretrained", "heads_finetuned"]] = edges[["heads_pretrained", "heads_finetuned"]].fillna("-")
    token_array = np.asarray(tokens, dtype=object)
    edges["query_token"] = token_array[edges["query"].to_numpy(int)] if len(edges) else []
    edges["key_token"] = token_array[edges["key"].to_numpy(int)] if len(edges) else []
    return edges.sort_values(["layer", "query", "key"], ignore_index=True)[EDGE_COLUMNS]


def flow_nodes(tokens: Sequence[str], traces: Mapping[str, AttentionTrace]) -> pd.DataFrame:
    """One row per (level, token): influence per model, and which models reached it."""
    first = next(iter(traces.values()))
    levels, n = first.counts.shape
    level, token = np.meshgrid(np.arange(levels), np.arange(n), indexing="ij")
    nodes = pd.DataFrame({"level": level.ravel(), "index": token.ravel(), "token": np.asarray(tokens, dtype=object)[token.ravel()]})
    reached = {}
    for name in (PRETRAINED, FINETUNED):
        trace = traces.get(name)
        nodes[f"influence_{name}"] = trace.influence.ravel() if trace is not None else np.nan
        reached[name] = trace.reached.ravel() if trace is not None else np.zeros(levels * n, dtype=bool)
    pre, fine = reached[PRETRAINED], reached[FINETUNED]
    nodes["label"] = np.where(pre & fine, SHARED, np.where(pre, PRETRAINED, np.where(fine, FINETUNED, "")))
    nodes["influence"] = nodes[["influence_pretrained", "influence_finetuned"]].max(axis=1).fillna(0.0)
    return nodes


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
    nodes = flow_nodes(tokens, traces)
    edges = flow_edges(tokens, traces)
    levels = int(nodes["level"].max()) + 1
    nodes["x"], nodes["y"] = _positions(nodes["level"].to_numpy(), nodes["index"].to_numpy(), n, layout)
    peak = max(float(nodes["influence"].max()), 1e-9)
    nodes["size"] = np.where(nodes["label"] != "", 5 + 13 * np.sqrt(nodes["influence"] / peak), 3.0)
    nodes["color"] = [LABEL_COLORS.get(label, "#d9d9d9") for label in nodes["label"]]
    root_level, root_token = next(iter(traces.values())).root
    is_root = (nodes["level"] == root_level) & (nodes["index"] == root_token)
    nodes.loc[is_root, ["size", "color"]] = (16.0, ROOT_COLOR)
    # a layer-l edge joins its key on level l to its query on level l + 1
    x0, y0 = _positions(edges["layer"].to_numpy(), edges["key"].to_numpy(), n, layout)
    x1, y1 = _positions(edges["layer"].to_numpy() + 1, edges["query"].to_numpy(), n, layout)
    edges = edges.assign(x0=x0, y0=y0, x1=x1, y1=y1, color=[LABEL_COLORS[label] for label in edges["label"]])
    edges["width"] = 0.5 + 4.5 * edges["weight"]

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
