"""Static export: one self-contained HTML file whose head grid re-traces the [CLS] flow in the browser.

It compares a pre-trained model with its fine-tune (two records of one input), or shows one model (one record).

The file holds Bokeh models only (rendered from the plot builders, with Bokeh's JS and CSS inline), so
it opens offline and without Python. For the trace it ships, per model, the attention entries at or
above ``tau``: exactly what a union-combined :func:`trace_cls_flow` at that ``tau`` can keep. A long
input whose entries pass :data:`MAX_ENTRIES` ships those of the heads first in line (the selected ones,
then the most changed) up to it, and says so; the other heads cannot be selected in the file. The
browser applies the same ``top_k`` rule as the trace (the k strongest edges of each expanded token,
ties to the lower key index), so Python and the page draw the same edges and count them the same way.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
from bokeh.document import Document
from bokeh.embed.bundle import bundle_for_objs_and_resources
from bokeh.embed.elements import html_page_for_render_items
from bokeh.embed.util import standalone_docs_json_and_render_items
from bokeh.layouts import column, row
from bokeh.models import ColorBar, ColumnDataSource, CustomJS, CustomJSHover, Div, HoverTool, LayoutDOM, LinearColorMapper, Plot
from bokeh.palettes import Blues256, Magma256
from bokeh.resources import INLINE

from attnflows_panel.analysis.compare import head_js_divergence, require_same_shape
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, AttentionTrace, as_source, trace_cls_flow, validate_alpha, validate_head_mask, validate_tau
from attnflows_panel.analysis.heads import head_measures
from attnflows_panel.analysis.source import MAP_BLOCK_BYTES, AttentionSource, map_layers
from attnflows_panel.errors import InputError
from attnflows_panel.extract import AttentionRecord, merge_tokens
from attnflows_panel.paths import atomic_file
from attnflows_panel.plots import MODEL_TITLES, short_name
from attnflows_panel.plots.attention_matrix import MATRIX_LAYERS, attention_matrix, matrix_frames
from attnflows_panel.plots.bound import render_bound, renderer
from attnflows_panel.plots.flow_diagram import (
    COUNT_HIDDEN_UP_TO,
    EDGE_COLUMNS,
    LABEL_COLORS,
    LABEL_ORDER,
    LEGEND_NAMES,
    ROOT_COLOR,
    UNREACHED_COLOR,
    edge_counts,
    flow_diagram,
    flow_frames,
    flow_layers,
    hidden_text,
)
from attnflows_panel.plots.head_grid import GRID_LAYERS, head_grid, heads_at
from attnflows_panel.plots.sentence_view import SENTENCE_LAYERS, sentence_frames, sentence_view

MAX_TOP_HEADS = 8  # two matrices a head: with the grid, flows and sentence this stays under ~20 figures
MAX_TOP_K = 20  # the app's top-k slider bounds
MAX_ENTRIES = 1_500_000  # attention entries of at least tau a file carries, both models together (about 18 MB of arrays)
MATRIX_PIXELS = 400  # a matrix is shipped as at most this many pixels a side (n x n up to 400 tokens), as datashader's rasterize made it
DEFAULT_TOP_K = 3  # the app's default
# colour maps as palettes, not names: HoloViews finds a name among every provider's maps, importing colorcet (0.2 s of a first export)
GRID_PALETTE = list(reversed(Magma256))  # "magma_r"
MATRIX_PALETTE = list(reversed(Blues256))  # "Blues", attention_matrix's default
DEFAULT_TITLE = "attnflows: pre-trained vs fine-tuned"
SINGLE_TITLE = "attnflows: attention flows"
PAIR_NAME = "pre-trained vs fine-tuned"
SINGLE_MEASURE = ("max_weight", "largest weight (confidence)")  # one model's grid colour, and which heads' matrices it shows
EDGE_FIELDS = ["x0", "y0", "x1", "y1", *EDGE_COLUMNS, "color", "width"]
NODE_FIELDS = ["x", "y", "level", "index", "token", "influence_pretrained", "influence_finetuned", "label", "influence", "size", "color", "level_name"]
PAGE_STYLE = {"font-family": "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif", "font-size": "14px", "color": "#222222"}

# Runs in the browser on every change of the grid selection; mirrors trace_cls_flow(combine="union",
# top_k=top_k or None) from the root token (``root``: [CLS], or a decoder's last token) at the deepest level, flow_frames (edges grouped by label, heads from 1),
# the count of edges top-k hides (hidden_by_top_k) and the sentence shading.
TRACE_JS = """
const sel = new Uint8Array(L * H);
const picked = grid.selected.indices;
// only the heads whose attention the file carries (all of them unless the input is long)
if (picked.length === 0) sel.set(shipped); else for (const i of picked) sel[cell_layer[i] * H + cell_head[i]] = shipped[cell_layer[i] * H + cell_head[i]];
let n_selected = 0;
for (const s of sel) n_selected += s;

// k > 0 keeps the k strongest edges of each expanded query (ties: the lower key), k = 0 every edge
function trace(m, k) {
  const counts = [];
  const influence = [];
  for (let l = 0; l <= L; l++) { counts.push(new Float64Array(n)); influence.push(new Float64Array(n)); }
  const edges = new Map();
  let frontier = [root];
  for (let level = L; level >= 1; level--) {
    const layer = level - 1;
    if (!sel.subarray(layer * H, layer * H + H).some((s) => s) || frontier.length === 0) break;
    const c = counts[level - 1];
    for (const q of frontier) {
      const row = layer * n + q;
      // a row's entries come sorted by key, then head: one candidate per key, weighing its strongest selected head
      const candidates = [];
      for (let e = m.offsets[row]; e < m.offsets[row + 1]; e++) {
        const h = m.head[e];
        if (!sel[layer * H + h]) continue;
        const key = m.key[e];
        const last = candidates[candidates.length - 1];
        if (last !== undefined && last.key === key) {
          last.heads.push(h);
          last.weight = Math.max(last.weight, m.weight[e]);
        } else {
          candidates.push({layer, query: q, key, weight: m.weight[e], heads: [h]});
        }
      }
      if (k > 0 && candidates.length > k) {
        candidates.sort((a, b) => (b.weight - a.weight) || (a.key - b.key));
        candidates.length = k;
      }
      for (const edge of candidates) {
        edges.set(row * n + edge.key, edge);
        c[edge.key] += 1;
      }
    }
    frontier = [];
    for (let k = 0; k < n; k++) if (c[k] > 0) frontier.push(k);
  }
  for (let level = L - 1; level >= 0; level--)
    for (let w = 0; w < n; w++) influence[level][w] = counts[level][w] + alpha * influence[level + 1][w];
  const reached = (level, w) => (level === L ? w === root : counts[level][w] > 0);
  return {edges, influence, reached};
}

// one model: the fine-tuned side is an empty trace, so every edge and node is the model's own ("pretrained")
const none = {edges: new Map(), influence: Array.from({length: L + 1}, () => new Float64Array(n)), reached: () => false};
const pair = models.finetuned !== undefined;
const pre = trace(models.pretrained, top_k);
const fine = pair ? trace(models.finetuned, top_k) : none;
const ids = Array.from(new Set([...pre.edges.keys(), ...fine.edges.keys()])).sort((a, b) => a - b);
let hidden = top_k > 0 && n > count_hidden_up_to ? null : 0;  // as in Python: past that many tokens, not counted
if (hidden === 0 && top_k > 0) {
  const all = new Set([...trace(models.pretrained, 0).edges.keys(), ...(pair ? trace(models.finetuned, 0) : none).edges.keys()]);
  hidden = all.size - ids.length;
}
const label_of = (id) => (pre.edges.has(id) ? (fine.edges.has(id) ? "shared" : "pretrained") : "finetuned");
const tally = {};
for (const label of label_order) tally[label] = 0;
for (const id of ids) tally[label_of(id)] += 1;
const heads_text = (edge) => (edge !== undefined ? edge.heads.map((h) => h + 1).join(", ") : "-");
const E = {};
for (const f of edge_fields) E[f] = [];
for (const label of label_order) {
  for (const id of ids) {
    if (label_of(id) !== label) continue;
    const p = pre.edges.get(id), f = fine.edges.get(id);
    const e = p !== undefined ? p : f;
    const weight = Math.max(p !== undefined ? p.weight : -Infinity, f !== undefined ? f.weight : -Infinity);
    E.x0.push(e.key); E.y0.push(e.layer); E.x1.push(e.query); E.y1.push(e.layer + 1);
    E.layer.push(e.layer); E.query.push(e.query); E.key.push(e.key);
    E.query_token.push(tokens[e.query]); E.key_token.push(tokens[e.key]);
    E.label.push(label); E.weight.push(weight);
    E.heads_pretrained.push(heads_text(p));
    E.weight_pretrained.push(p !== undefined ? p.weight : -1);
    E.heads_finetuned.push(heads_text(f));
    E.weight_finetuned.push(f !== undefined ? f.weight : -1);
    E.legend.push(`${legend_names[label]} (${tally[label]})`);
    E.color.push(colors[label]); E.width.push(0.5 + 4.5 * weight);
  }
}
edges.data = E;

const N = {};
for (const f of node_fields) N[f] = [];
let peak = 1e-9;
for (let level = 0; level <= L; level++) {
  for (let w = 0; w < n; w++) {
    const p = pre.reached(level, w), f = fine.reached(level, w);
    const ip = pre.influence[level][w], fi = fine.influence[level][w];
    N.x.push(w); N.y.push(level); N.level.push(level); N.index.push(w); N.token.push(tokens[w]);
    N.influence_pretrained.push(ip); N.influence_finetuned.push(pair ? fi : NaN);  // one model: no fine-tuned influence, as flow_nodes says
    N.label.push(p && f ? "shared" : (p ? "pretrained" : (f ? "finetuned" : "")));
    N.influence.push(Math.max(ip, fi));
    N.level_name.push(level === 0 ? "input" : `layer ${level}`);
    peak = Math.max(peak, ip, fi);
  }
}
for (let i = 0; i < N.x.length; i++) {
  const is_root = N.level[i] === L && N.index[i] === root;
  N.size.push(is_root ? 16 : (N.label[i] !== "" ? 5 + 13 * Math.sqrt(N.influence[i] / peak) : 3));
  N.color.push(is_root ? root_color : (N.label[i] !== "" ? colors[N.label[i]] : unreached_color));
}
nodes.data = N;

const deepest = sel.subarray((L - 1) * H, L * H).some((s) => s);
message.data = Object.assign({}, message.data, {text: [ids.length > 0 ? "" : (n_selected === 0 ? no_edge.not_carried : (deepest ? no_edge.tau : no_edge.layer))]});

const W = Object.assign({}, words.data);
W.value = [];
W.alpha = [];
for (const t of pair ? [pre, fine] : [pre]) {
  const values = new Array(n_words).fill(0);
  for (let w = 0; w < n; w++) values[word_index[w]] += t.influence[0][w];
  const top = Math.max(...values);
  const scale = top > 0 ? top : 1;
  for (const v of values) { W.value.push(v); W.alpha.push(Math.min(1, Math.max(0, v / scale))); }
}
words.data = W;

title.text = flow_title(tally, hidden, top_k, pair ? null : models_name);
status.text = status_html(tally, n_selected, L * H, hidden, top_k);
"""

STATUS_JS = """
function split(counts) { return models.finetuned === undefined ? "" : ` (${label_order.map((label) => `${counts[label]} ${legend_names[label]}`).join(", ")})`; }
function total(counts) { return label_order.reduce((sum, label) => sum + counts[label], 0); }
function hidden_text(hidden, k, shown) {
  if (hidden === null) return k > 0 && shown > 0 ? `; weaker edges hidden (top ${k} per token)` : "";
  return hidden > 0 ? `; ${hidden} weaker hidden (top ${k} per token)` : "";
}
function flow_title(counts, hidden, k, model) { return `${model === null ? pair_name : model} from ${root_name}: ${total(counts)} edges${split(counts)}${hidden_text(hidden, k, total(counts))}`; }
function status_html(counts, selected, heads, hidden, k) {
  const which = selected === heads ? `all ${heads} heads` : `${selected} of ${heads} heads selected`;
  return `<b>${total(counts)}</b> edges${split(counts)}${hidden_text(hidden, k, total(counts))}; ${which}`;
}
"""


def _split(counts: Mapping[str, int], pair: bool = True) -> str:
    """``" (S shared, P pre-trained only, F fine-tuned only)"``, in the legend's order; ``""`` for one model."""
    return f" ({', '.join(f'{counts[label]} {LEGEND_NAMES[label]}' for label in LABEL_ORDER)})" if pair else ""


def flow_title(counts: Mapping[str, int], hidden: int | None = 0, top_k: int | None = None, root_name: str = "[CLS]", model: str | None = None) -> str:
    """The flow diagram's title from the edges per label and the ``hidden`` ones top-k drops (the browser writes the same through ``STATUS_JS``).

    ``model`` names the one model of a single-model export (None: the pair).
    """
    return f"{PAIR_NAME if model is None else model} from {root_name}: {sum(counts.values())} edges{_split(counts, model is None)}{hidden_text(hidden, top_k, sum(counts.values()))}"


def status_html(counts: Mapping[str, int], selected: int, heads: int, hidden: int | None = 0, top_k: int | None = None, pair: bool = True) -> str:
    """The edge and head count line above the flow diagram, numbers only (the browser mirrors it)."""
    which = f"all {heads} heads" if selected == heads else f"{selected} of {heads} heads selected"
    return f"<b>{sum(counts.values())}</b> edges{_split(counts, pair)}{hidden_text(hidden, top_k, sum(counts.values()))}; {which}"


def hidden_by_top_k(attentions: Sequence[Any], mask: np.ndarray, tau: float, alpha: float, top_k: int | None, shown: int, root: tuple[int, int] | None = None) -> int | None:
    """Distinct edges of at least ``tau`` the union traces of ``attentions`` draw without top-k, minus the ``shown`` ones
    (0 when top-k is off; None, not counted, past :data:`COUNT_HIDDEN_UP_TO` tokens)."""
    if not top_k:
        return 0
    if as_source(attentions[0]).n_tokens > COUNT_HIDDEN_UP_TO:
        return None
    full = [trace_cls_flow(attention, mask, tau=tau, alpha=alpha, combine="union", root=root).edge_ids() for attention in attentions]
    return int(np.unique(np.concatenate(full)).size) - shown


def no_edge_messages(layers: int, tau: float, root_name: str = "[CLS]") -> dict[str, str]:
    """Why no edge is drawn: no selected head in the deepest layer (``"layer"``), no weight of ``tau`` or more (``"tau"``),
    or only heads a long input's file does not carry selected (``"not_carried"``)."""
    return {
        "layer": f"No edge reaches {root_name} from the selected heads: select a head of layer {layers}.",
        "tau": f"No edge of weight {tau:g} or more: lower tau.",
        "not_carried": "This file does not carry the selected heads' attention (hatched in the grid): select heads it carries.",
    }


def flow_message(traces: Mapping[str, AttentionTrace], mask: np.ndarray, tau: float, root_name: str = "[CLS]") -> str:
    """The message across an empty flow diagram (the browser picks the same one), ``""`` when an edge is drawn."""
    if any(trace.n_edges for trace in traces.values()):
        return ""
    return no_edge_messages(mask.shape[0], tau, root_name)["tau" if mask[-1].any() else "layer"]


def sparse_attention(attention: Any, tau: float, heads: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Entries ``A[l, h, q, k] >= tau`` grouped by (layer, query), then key and head (of the ``[L, H]`` mask ``heads`` only, when given).

    ``offsets`` ``[L * n + 1]`` delimits the group of row ``l * n + q``; ``head``, ``key`` and ``weight``
    (float32, the values ``tau`` was compared with) hold one entry each.
    """
    return pack_entries(attention_entries(attention, tau), as_source(attention).shape, heads)


def attention_entries(attention: Any, tau: float) -> tuple[np.ndarray, ...]:
    """(layer, head, query, key, weight) of every entry ``A[l, h, q, k] >= tau``, read in row chunks, a layer per thread."""
    source = as_source(attention)
    tau = validate_tau(tau)
    layers = map_layers(partial(_layer_entries, source, tau), range(source.n_layers), MAP_BLOCK_BYTES, "attnflows-entries")
    found = [entries for layer in layers for entries in layer]
    return tuple(np.concatenate(column) for column in zip(*found, strict=True))


def _layer_entries(source: AttentionSource, tau: float, layer: int) -> list[tuple[np.ndarray, ...]]:
    found = []
    for queries, block in source.row_chunks(layer, chunk_bytes=MAP_BLOCK_BYTES):
        head, query, key = np.nonzero(block >= tau)  # the comparison trace_cls_flow makes on the same values
        found.append((np.full(head.size, layer), head, query + queries.start, key, block[head, query, key]))
    return found


def pack_entries(entries: tuple[np.ndarray, ...], shape: tuple[int, ...], heads: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`attention_entries` (of the ``heads`` mask only, when given) in the grouped form :func:`sparse_attention` returns."""
    L, _, n, _ = shape
    layer, head, query, key, weight = entries
    if heads is not None:
        kept = heads[layer, head]
        layer, head, query, key, weight = layer[kept], head[kept], query[kept], key[kept], weight[kept]
    order = np.lexsort((head, key, query, layer))
    layer, head, query, key, weight = layer[order], head[order], query[order], key[order], weight[order]
    offsets = np.zeros(L * n + 1, dtype=np.int32)
    np.cumsum(np.bincount(layer * n + query, minlength=L * n), out=offsets[1:])
    return {"offsets": offsets, "head": head.astype(np.int32), "key": key.astype(np.int32), "weight": weight.astype(np.float32)}


def shipped_heads(counts: np.ndarray, order: np.ndarray, budget: int) -> np.ndarray:
    """``[L, H]``: the heads a file carries: all when their entries (``counts``, per head) fit ``budget``, else
    those first in ``order`` (flat head indices) while they fit, and at least the first."""
    flat = counts.ravel()
    if flat.sum() <= budget:
        return np.ones(counts.shape, dtype=bool)
    ranked = np.asarray(order)
    fits = np.cumsum(flat[ranked]) <= budget  # counts are never negative: true for a prefix of ``order``
    fits[0] = True
    shipped = np.zeros(flat.size, dtype=bool)
    shipped[ranked[fits]] = True
    return shipped.reshape(counts.shape)


def validate_top_heads(top_heads: Any, n_heads: int | None = None) -> int:
    """Check the number of top heads whose matrices are shown: 0 to ``MAX_TOP_HEADS`` and at most ``n_heads``."""
    bound = MAX_TOP_HEADS if n_heads is None else min(MAX_TOP_HEADS, n_heads)
    if isinstance(top_heads, bool) or not isinstance(top_heads, int | np.integer) or not 0 <= top_heads <= bound:
        raise InputError(f"the number of top heads must be a whole number from 0 to {bound}, got {top_heads!r}")
    return int(top_heads)


def validate_top_k(top_k: Any) -> int:
    """Check the CLS trace's top-k: a whole number from 0 to ``MAX_TOP_K``, 0 (or None) keeping every edge of at least tau."""
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or not 0 <= top_k <= MAX_TOP_K:
        raise InputError(f"top k must be a whole number from 0 to {MAX_TOP_K} (0: every edge of at least tau), got {top_k!r}")
    return int(top_k)


def output_path(path: str | os.PathLike) -> Path:
    """``path`` checked for writing: not a directory, and in a directory that exists."""
    if "\0" in str(path):
        raise InputError(f"cannot write the dashboard to {str(path)!r}: a path cannot contain a NUL character")
    target = Path(path).expanduser()
    if target.is_dir():
        raise InputError(f"cannot write the dashboard to {target}: it is a directory; name an .html file")
    if not target.parent.is_dir():
        raise InputError(f"cannot write the dashboard to {target}: directory {target.parent} does not exist")
    return target


def export_dashboard(
    records: Sequence[AttentionRecord] | None,
    path: str | os.PathLike,
    *,
    tau: float = 0.1,
    alpha: float = 0.5,
    top_heads: int = 4,
    head_mask: Any = None,
    title: str | None = None,
    top_k: int | None = DEFAULT_TOP_K,
) -> Path:
    """Write the (pre-trained, fine-tuned) ``records`` of one input, or one model's record, as one self-contained HTML file; returns its path.

    ``title`` is the page's (default: :data:`DEFAULT_TITLE`, or :data:`SINGLE_TITLE` for one model).
    ``head_mask`` ([L, H] bool, all heads when None or all True) is the initial grid selection.
    ``top_k`` keeps the k strongest edges of each traced token, as the app does (None or 0: every edge of at least tau).
    The file is written to a temporary sibling first and renamed, so a failure leaves nothing behind.
    """
    target = output_path(path)
    page = dashboard_html(records, tau=tau, alpha=alpha, top_heads=top_heads, head_mask=head_mask, title=title, top_k=top_k)
    with atomic_file(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(0o644)  # the temporary file is private (0600); a report is for reading and sharing
    return target


def dashboard_html(
    records: Sequence[AttentionRecord] | None,
    *,
    tau: float = 0.1,
    alpha: float = 0.5,
    top_heads: int = 4,
    head_mask: Any = None,
    title: str | None = None,
    top_k: int | None = DEFAULT_TOP_K,
) -> str:
    """The dashboard as an HTML string with Bokeh's JS and CSS inline (see :func:`export_dashboard`)."""
    if title is None:
        title = SINGLE_TITLE if records is not None and len(records) == 1 else DEFAULT_TITLE
    document = Document()
    document.add_root(dashboard_layout(records, tau=tau, alpha=alpha, top_heads=top_heads, head_mask=head_mask, top_k=top_k))
    docs_json, render_items = standalone_docs_json_and_render_items([document])
    bundle = bundle_for_objs_and_resources([document], INLINE)
    # Bokeh adds the external files every imported model class declares, used or not (Panel's ES-module
    # shim among them); this page uses Bokeh's own models only, which are all in the inline bundle.
    bundle.js_files.clear()
    bundle.css_files.clear()
    return html_page_for_render_items(bundle, docs_json, render_items, title=title)  # Bokeh escapes the <title>


def _check_records(records: Sequence[AttentionRecord] | None) -> tuple[AttentionRecord, ...]:
    """The (pre-trained, fine-tuned) records of one input, or the one record of one model."""
    if records is None:
        raise InputError("nothing to export: no sentence has been run through the models")
    if len(records) not in (1, 2):
        raise InputError(f"need the (pre-trained, fine-tuned) records of one input, or one model's record, got {len(records)} records")
    if len(records) == 2:
        pre, fine = records
        require_same_shape(pre.source.shape, fine.source.shape)
        if list(pre.tokens) != list(fine.tokens):
            raise InputError("the two records tokenize the input differently; export the records of one input through one pair")
    return tuple(records)


def dashboard_layout(
    records: Sequence[AttentionRecord] | None,
    *,
    tau: float = 0.1,
    alpha: float = 0.5,
    top_heads: int = 4,
    head_mask: Any = None,
    top_k: int | None = DEFAULT_TOP_K,
) -> LayoutDOM:
    """The Bokeh layout of the dashboard: header, head grid and sentence view, flow diagram, top-head matrices."""
    checked = _check_records(records)
    named = dict(zip((PRETRAINED, FINETUNED), checked, strict=False))
    pre, pair = checked[0], len(checked) == 2
    model = None if pair else short_name(pre.model_id)
    tau, alpha = validate_tau(tau), validate_alpha(alpha)
    top_k = validate_top_k(top_k)
    L, H, n, _ = pre.source.shape
    top_heads = validate_top_heads(top_heads, L * H)
    mask = validate_head_mask(head_mask, L, H)
    if not mask.any():
        mask = ~mask  # an empty selection means every head, as in the app
    root, name_of_root = (L, pre.root_token), pre.root_name
    if pair:
        values, label, grid_title = head_js_divergence(pre.source, named[FINETUNED].source), "JS (bits)", "model difference (JS, bits): select heads"
    else:
        values, label = head_measures(pre.source, pre.tokens, pre.cls_mask, pre.sep_mask)[SINGLE_MEASURE[0]], SINGLE_MEASURE[1]
        grid_title = f"{label}: select heads"
    entries = {name: attention_entries(r.source, tau) for name, r in named.items()}
    counts_per_head = sum(np.bincount(e[0] * H + e[1], minlength=L * H) for e in entries.values()).reshape(L, H)
    order = np.lexsort((-np.nan_to_num(values.ravel(), nan=-np.inf), ~mask.ravel()))  # the selected heads first, then by the grid's colour
    shipped = shipped_heads(counts_per_head, order, MAX_ENTRIES)
    mask = mask & shipped if (mask & shipped).any() else shipped
    traces = {name: trace_cls_flow(r.source, mask, tau=tau, alpha=alpha, combine="union", top_k=top_k or None, root=root) for name, r in named.items()}
    words, word_index = merge_tokens(pre.tokens, pre.word_ids)

    grid_fig, grid, cells = _grid_figure(values, label, grid_title, mask, shipped)
    frames = flow_frames(pre.tokens, traces, "layered", flow_message(traces, mask, tau, name_of_root))
    counts = edge_counts(frames["edges"]["label"].to_numpy())
    hidden = hidden_by_top_k([r.source for r in checked], mask, tau, alpha, top_k, sum(counts.values()), root)
    flow_fig, flow = _flow_figure(pre.tokens, traces, frames, flow_title(counts, hidden, top_k, name_of_root, model))
    sentence_fig, word_source = _sentence_figure(words, word_index, traces, checked[-1], model)
    status = Div(text=status_html(counts, int(mask.sum()), L * H, hidden, top_k, pair), name="edge_count", styles=PAGE_STYLE)

    callback = CustomJS(
        args=dict(
            grid=grid, edges=flow["edges"], nodes=flow["nodes"], message=flow["message"], words=word_source, title=flow_fig.title, status=status,
            L=L, H=H, n=n, count_hidden_up_to=COUNT_HIDDEN_UP_TO, root=pre.root_token, root_name=name_of_root, alpha=alpha, top_k=top_k, cell_layer=cells[:, 0], cell_head=cells[:, 1], tokens=list(pre.tokens),
            word_index=word_index.astype(np.int32), n_words=len(words),
            models={name: pack_entries(e, pre.source.shape, shipped) for name, e in entries.items()}, shipped=shipped.ravel().astype(np.uint8),
            pair_name=PAIR_NAME, models_name=model or PAIR_NAME,
            edge_fields=EDGE_FIELDS, node_fields=NODE_FIELDS, colors=LABEL_COLORS, root_color=ROOT_COLOR, unreached_color=UNREACHED_COLOR,
            label_order=list(LABEL_ORDER), legend_names=LEGEND_NAMES if pair else dict.fromkeys(LEGEND_NAMES, "traced"), no_edge=no_edge_messages(L, tau, name_of_root),
        ),
        code=STATUS_JS + TRACE_JS,
    )
    grid.selected.js_on_change("indices", callback)
    layout = column(
        Div(text=_header_html(checked, tau, alpha, top_k) + _shipped_html(shipped, counts_per_head, label), name="header", width=1100, styles=PAGE_STYLE),
        row(grid_fig, sentence_fig),
        status,
        flow_fig,
        *_matrix_rows(named, values, top_heads),
        margin=(12, 16, 24, 16),
    )
    return layout


def _canvas(fig: Plot) -> Plot:
    """``fig`` drawn on a canvas: no WebGL bundle to inline, and no GPU needed to view the file."""
    fig.output_backend = "canvas"
    return fig


def _grid_figure(values: np.ndarray, label: str, title: str, mask: np.ndarray, shipped: np.ndarray) -> tuple[Plot, ColumnDataSource, np.ndarray]:
    """The head grid of ``values`` (the model difference, or one model's measure), its cells' source ("head_grid", the heads of a partial ``mask`` selected) and each cell's 0-based (layer, head).

    Heads whose attention the file does not carry (not ``shipped``) are hatched.
    """
    fig = _canvas(hv.render(head_grid(values, label, title=title, cmap=GRID_PALETTE, width=440, height=320), backend="bokeh"))
    grid = renderer(fig, GRID_LAYERS["cells"]).data_source
    grid.name = "head_grid"
    cells = np.array(heads_at(grid.data, range(mask.size)), dtype=np.int32)
    if not mask.all():
        grid.selected.indices = [i for i, (layer, head) in enumerate(cells) if mask[layer, head]]
    if not shipped.all():
        layer, head = np.nonzero(~shipped)
        fig.rect(x=head + 1, y=layer + 1, width=1, height=1, fill_alpha=0, line_alpha=0, hatch_pattern="/", hatch_color="#777777", hatch_alpha=0.8, nonselection_hatch_alpha=0.8, name="not_shipped")
    return fig, grid, cells


def _shipped_html(shipped: np.ndarray, counts: np.ndarray, label: str) -> str:
    """What a long input's file leaves out: which heads it carries, and why ("" when it carries every head)."""
    if shipped.all():
        return ""
    return (
        f"<div style='color: #8a4b00'><b>A long input:</b> its {int(counts.sum()):,} attention entries of at least tau pass this file's cap of {MAX_ENTRIES:,}, "
        f"so it carries those of {int(shipped.sum())} of {shipped.size} heads (the selected ones first, then by {html.escape(label)}); "
        "the other heads are hatched in the grid and selecting them draws nothing.</div>"
    )


def _flow_figure(tokens: Sequence[str], traces: dict[str, AttentionTrace], frames: dict[str, pd.DataFrame], title: str) -> tuple[Plot, dict[str, ColumnDataSource]]:
    """The merged, layered flow diagram ("flow") bound to ``frames`` in the columns the browser rewrites (sources "flow_edges", "flow_nodes", "flow_message")."""
    width = int(np.clip(12 * len(tokens) + 160, 900, 2600))
    element = flow_diagram(tokens, traces, layout="layered", width=width, height=540, frames=frames).opts(title=title)
    nodes = frames["nodes"]
    fig, sources = render_bound(element, flow_layers(), {"edges": frames["edges"][EDGE_FIELDS], "nodes": nodes[NODE_FIELDS], "message": frames["message"]})
    _canvas(fig).name = "flow"
    for name, source in sources.items():
        source.name = f"flow_{name}"
    return fig, sources


def _sentence_figure(words: list[str], word_index: np.ndarray, traces: dict[str, AttentionTrace], last: AttentionRecord, model: str | None) -> tuple[Plot, ColumnDataSource]:
    """Words shaded by each model's influence on the input, the prediction of the ``last`` record (the fine-tuned one, or the ``model``'s) in its caption; the boxes' source."""
    values = {name: np.bincount(word_index, weights=trace.influence[0], minlength=len(words)) for name, trace in traces.items()}
    names = {PRETRAINED: "pre-trained", FINETUNED: "fine-tuned"} if model is None else {PRETRAINED: model}
    captions = {name: f"{title}: influence on the input" for name, title in names.items()}
    if last.predicted_label is not None:
        captions[list(names)[-1]] = f"{list(names.values())[-1]}: predicts {last.predicted_label} ({last.probabilities.max():.0%})"
    element = sentence_view(words, values, captions, max_chars=62)
    fig, sources = render_bound(element, SENTENCE_LAYERS, sentence_frames(words, values, captions, max_chars=62))
    sources["boxes"].name = "sentence_words"
    return _canvas(fig), sources["boxes"]


def _matrix_rows(records: Mapping[str, AttentionRecord], values: np.ndarray, top_heads: int) -> list[LayoutDOM]:
    """The matrices of the ``top_heads`` heads of largest ``values``: both models' side by side (the heads they differ most on), or one model's two a row."""
    if top_heads == 0:
        return []
    first = records[PRETRAINED]
    size = int(np.clip(4 * first.n_tokens, 340, 560))
    heads = [np.unravel_index(int(flat), values.shape) for flat in np.argsort(-values, axis=None, kind="stable")[:top_heads]]
    if len(records) == 1:
        caption = f"<b>The {top_heads} heads with the {SINGLE_MEASURE[1]}</b>"
        measure = SINGLE_MEASURE[1].split(" (")[0]
        figures = [_matrix_figure(first.source.head(layer, head), first.tokens, f"layer {layer + 1}, head {head + 1} ({measure} {values[layer, head]:.3f})", size) for layer, head in heads]
        return [Div(text=caption, styles=PAGE_STYLE), *(row(*figures[i : i + 2]) for i in range(0, len(figures), 2))]
    rows: list[LayoutDOM] = [Div(text=f"<b>The {top_heads} heads the models differ most on</b> (Jensen-Shannon divergence of their rows)", styles=PAGE_STYLE)]
    for layer, head in heads:
        titles = {name: f"{MODEL_TITLES[name]}: layer {layer + 1}, head {head + 1} (JS {values[layer, head]:.3f} bits)" for name in records}
        rows.append(row(*(_matrix_figure(record.source.head(layer, head), record.tokens, titles[name], size) for name, record in records.items())))
    return rows


def _matrix_figure(attention: np.ndarray, tokens: Sequence[str], title: str, size: int) -> Plot:
    """One head's matrix, shipped as uint8 (weight * 255) in at most :data:`MATRIX_PIXELS` a side; its colours, colour bar and hover still show weights."""
    element = attention_matrix(attention, tokens, title=title, size=size, cmap=MATRIX_PALETTE, rasterize=False)  # no datashader: its first call compiles for seconds
    frames = matrix_frames(element)
    frames["image"]["image"] = [_matrix_pixels(frames["image"]["image"][0])]
    fig, _ = render_bound(element, MATRIX_LAYERS, frames)
    mapper = renderer(fig, MATRIX_LAYERS["image"]).glyph.color_mapper  # HoloViews gives the image and its colour bar one mapper
    next(item for item in fig.right if isinstance(item, ColorBar)).color_mapper = LinearColorMapper(palette=mapper.palette, low=mapper.low, high=mapper.high)
    mapper.low, mapper.high = 0.0, max(float(mapper.high) * 255, 1.0)
    for tool in fig.toolbar.tools:
        if isinstance(tool, HoverTool):  # keep attention_matrix's token formatters for the axes; the weight now arrives as uint8
            tool.tooltips = [(label, "@image{custom}" if label == "weight" else field) for label, field in tool.tooltips]
            tool.formatters = {**tool.formatters, "@image": CustomJSHover(code="return (value / 255).toFixed(3)")}
    return _canvas(fig)


def _matrix_pixels(weights: np.ndarray) -> np.ndarray:
    """``[n, n]`` weights as uint8 (weight * 255), averaged over blocks of rows and of columns down to at most :data:`MATRIX_PIXELS` a side."""
    n = weights.shape[0]
    if n > MATRIX_PIXELS:
        starts = np.arange(MATRIX_PIXELS) * n // MATRIX_PIXELS
        sizes = np.diff(np.r_[starts, n])
        weights = np.add.reduceat(np.add.reduceat(weights, starts, axis=0), starts, axis=1) / np.outer(sizes, sizes)
    return np.round(np.clip(weights, 0.0, 1.0) * 255).astype(np.uint8)


def _model_name(model_id: str) -> str:
    """A local model path shortened to its last two parts (the file may be shared); hub names as they are."""
    return "/".join(Path(model_id).parts[-2:]) if os.path.isabs(model_id) else model_id


def _header_html(records: Sequence[AttentionRecord], tau: float, alpha: float, top_k: int) -> str:
    """Title, the input, the models and the settings; every text from users and models escaped."""
    e = html.escape
    pre, last = records[0], records[-1]
    parts = [f"<h2 style='margin: 0 0 6px 0'>{DEFAULT_TITLE if len(records) == 2 else SINGLE_TITLE}</h2>", f"<div><b>Sentence:</b> {e(pre.text)}</div>"]
    if pre.text_pair is not None:
        parts.append(f"<div><b>Second segment:</b> {e(pre.text_pair)}</div>")
    if len(records) == 2:
        models = f"pre-trained <code>{e(_model_name(pre.model_id))}</code>, fine-tuned <code>{e(_model_name(last.model_id))}</code>"
        predicts = "; the fine-tuned model predicts"
    else:
        models, predicts = f"<code>{e(_model_name(pre.model_id))}</code>", "; it predicts"
    if last.predicted_label is not None:
        models += f"{predicts} <b>{e(last.predicted_label)}</b> ({last.probabilities.max():.0%})"
    parts.append(f"<div><b>{'Models' if len(records) == 2 else 'Model'}:</b> {models}</div>")
    truncated = f", the last {pre.n_truncated} dropped (model maximum)" if pre.n_truncated else ""
    kept = f"top k = {top_k} (strongest edges kept per token)" if top_k else "top k = 0 (every edge of at least tau)"
    parts.append(f"<div><b>Settings:</b> CLS trace from {e(pre.root_name)} at the last layer, tau = {tau:g}, alpha = {alpha:g}, {kept}, heads combined by union; {pre.n_tokens} tokens{truncated}</div>")
    parts.append("<div style='color: #555555'>Select heads in the grid (box select, or tap; shift adds); no selection means all heads. The flow diagram and the word shading follow.</div>")
    return "".join(parts)
