"""The static dashboard's Bokeh figures, built from a :class:`~attnflows_panel.export.Dashboard`, and the values of
its data-dependent model properties (the slots of a page template) under the names the figures give their models.

:func:`dashboard_figures` renders the plot builders (HoloViews); :func:`page_values` computes the same values from the
same data without rendering, so a template built once per structure and filled with them is the page the figures
make (a test compares the two documents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import ColorBar, ColumnDataSource, CustomJS, CustomJSHover, Div, HoverTool, LayoutDOM, Legend, LinearColorMapper, Plot
from bokeh.palettes import Blues256, Magma256

from attnflows_panel.plots.attention_matrix import MATRIX_LAYERS, attention_matrix, label_limit, matrix_bounds
from attnflows_panel.plots.bound import columns, render_bound, renderer
from attnflows_panel.plots.flow_diagram import EDGE_COLUMNS, NAME_EVERY_TOKEN_UP_TO, flow_diagram, flow_layers, layered_axis, level_axis
from attnflows_panel.plots.head_grid import GRID_LAYERS, grid_clim, head_grid, numbered_ticks
from attnflows_panel.plots.sentence_view import SENTENCE_LAYERS, sentence_extent, sentence_view

if TYPE_CHECKING:
    from attnflows_panel.export import Dashboard, Matrix

# colour maps as palettes, not names: HoloViews finds a name among every provider's maps, importing colorcet (0.2 s of a first export)
GRID_PALETTE = list(reversed(Magma256))  # "magma_r"
MATRIX_PALETTE = list(reversed(Blues256))  # "Blues", attention_matrix's default
PAGE_STYLE = {"font-family": "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif", "font-size": "14px", "color": "#222222"}
SENTENCE_CHARS = 62  # the sentence view's width in characters
FLOW_HEIGHT = 540
EDGE_FIELDS = ["x0", "y0", "x1", "y1", *EDGE_COLUMNS, "color", "width"]
NODE_FIELDS = ["x", "y", "level", "index", "token", "influence_pretrained", "influence_finetuned", "label", "influence", "size", "color", "level_name"]

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
function edge_word(n) { return n === 1 ? "edge" : "edges"; }
function flow_title(counts, hidden, k, model) { return `${model === null ? pair_name : model} from ${root_name}: ${total(counts)} ${edge_word(total(counts))}${split(counts)}${hidden_text(hidden, k, total(counts))}`; }
function status_html(counts, selected, heads, hidden, k) {
  const which = selected === heads ? `all ${heads} heads` : `${selected} of ${heads} heads selected`;
  return `<b>${total(counts)}</b> ${edge_word(total(counts))}${split(counts)}${hidden_text(hidden, k, total(counts))}; ${which}`;
}
"""


def flow_width(n_tokens: int) -> int:
    """The flow diagram's width in pixels: 12 a token, 900 to 2600."""
    return int(np.clip(12 * n_tokens + 160, 900, 2600))


def matrix_size(n_tokens: int) -> int:
    """A matrix's side in pixels: 4 a token, 340 to 560."""
    return int(np.clip(4 * n_tokens, 340, 560))


def dashboard_figures(d: Dashboard) -> LayoutDOM:
    """The Bokeh layout of the dashboard: header, head grid and sentence view, flow diagram, top-head matrices."""
    grid_fig, grid = _grid_figure(d)
    flow_fig, flow = _flow_figure(d)
    sentence_fig, sentence = _sentence_figure(d)
    status = Div(text=d.status, name="edge_count", styles=PAGE_STYLE)
    models = dict(grid=grid, edges=flow["edges"], nodes=flow["nodes"], message=flow["message"], words=sentence["boxes"], title=flow_fig.title, status=status)
    callback = CustomJS(args={**models, **d.trace_args}, code=STATUS_JS + TRACE_JS, name="trace")
    grid.selected.js_on_change("indices", callback)
    matrices = [_matrix_figure(d, matrix, f"matrix_{i}") for i, matrix in enumerate(d.matrices)]
    rows = [row(*matrices[i : i + 2]) for i in range(0, len(matrices), 2)]  # a head's two models, or one model's two heads
    return column(
        Div(text=d.header, name="header", width=1100, styles=PAGE_STYLE),
        row(grid_fig, column(sentence_fig)),  # a row aligns its plots' frames: the grid's title and axis would squeeze the words
        status,
        flow_fig,
        *([Div(text=d.matrix_caption, styles=PAGE_STYLE), *rows] if matrices else []),
        margin=(12, 16, 24, 16),
    )


def page_values(d: Dashboard) -> dict[str, Any]:
    """Every data-dependent property of :func:`dashboard_figures`' models, by slot (``"model name/path"``)."""
    L, H, n = d.shape
    (x0, x1), rotation, label_size = layered_axis(n)
    height, (y0, y1) = sentence_extent(d.words, len(d.sentence_values), SENTENCE_CHARS)
    low, high = grid_clim(d.grid_values)
    level_ticks, (level_low, level_high) = level_axis(L + 1)
    values = {
        "header/text": d.header,
        "edge_count/text": d.status,
        "head_grid/data": columns(d.grid_cells),
        "head_grid/selected.indices": d.selected,
        "grid_cells/glyph.fill_color.transform.low": low,
        "grid_cells/glyph.fill_color.transform.high": high,
        "grid/xaxis.ticker.ticks": numbered_ticks(H),
        "grid/yaxis.ticker.ticks": numbered_ticks(L),
        **_range("grid/x_range", 0.5, H + 0.5),  # a cell per head and layer, centred on its number
        **_range("grid/y_range", 0.5, L + 0.5),
        "flow/width": flow_width(n),
        "flow/title.text": d.flow_title,
        "flow_legend/visible": len(d.flow["edges"]) > 0,  # field_legend's rule, which the browser applies on every change
        **_range("flow/x_range", x0, x1),
        "flow/xaxis.major_label_orientation": float(np.radians(rotation)),
        "flow/xaxis.major_label_text_font_size": label_size,
        "flow/yaxis.ticker.ticks": [level for level, _ in level_ticks],
        "flow/yaxis.major_label_overrides": dict(level_ticks),
        **_range("flow/y_range", level_low, level_high),
        **{f"flow_{name}/data": columns(frame) for name, frame in _flow_sources(d).items()},
        "sentence/height": height,
        **_range("sentence/y_range", y0, y1),
        "sentence_words/data": columns(d.sentence["boxes"]),
        "sentence_texts/data": columns(d.sentence["texts"]),
        **{f"trace/args.{key}": value for key, value in d.trace_args.items()},
    }
    if n > NAME_EVERY_TOKEN_UP_TO:
        values["flow/xaxis.formatter.args.names"] = list(d.tokens)
    else:
        values["flow/xaxis.ticker.ticks"] = list(range(n))
        values["flow/xaxis.major_label_overrides"] = {i: str(t) for i, t in enumerate(d.tokens)}
    if not d.shipped.all():
        values["not_shipped/data_source.data"] = not_shipped_cells(d.shipped)
    for i, matrix in enumerate(d.matrices):
        values.update(_matrix_values(d, matrix, f"matrix_{i}"))
    return values


def _range(slot: str, start: float, end: float) -> dict[str, float]:
    """A Range1d's four values as HoloViews sets them from limits."""
    return {f"{slot}.start": start, f"{slot}.end": end, f"{slot}.reset_start": start, f"{slot}.reset_end": end}


def _matrix_values(d: Dashboard, matrix: Matrix, name: str) -> dict[str, Any]:
    left, bottom, right, top = matrix_bounds(d.shape[2])
    names = [str(t) for t in d.tokens]
    return {
        f"{name}/title.text": matrix.title,
        f"{name}/width": matrix.size + 60,
        f"{name}/height": matrix.size,
        **_range(f"{name}/x_range", left, right),
        **_range(f"{name}/y_range", top, bottom),  # inverted: query 0 at the top
        **{f"{name}/{axis}.ticker.desired_num_ticks": max(1, label_limit(matrix.size)) for axis in ("xaxis", "yaxis")},
        **{f"{name}/{axis}.formatter.args.names": names for axis in ("xaxis", "yaxis")},
        f"{name}/hover.formatters.$x.args.names": names,
        f"{name}_image/data_source.data": columns(matrix.frame),
        f"{name}_image/glyph.color_mapper.high": pixel_high(matrix.clim),
        f"{name}_weights/high": matrix.clim[1],
    }


def pixel_high(clim: tuple[float, float]) -> float:
    """The top of a uint8 matrix image's colour mapper (weight * 255), for weights up to ``clim[1]``."""
    return max(clim[1] * 255, 1.0)


def not_shipped_cells(shipped: np.ndarray) -> dict[str, np.ndarray]:
    """The grid cells (heads and layers from 1) of the heads a long input's file does not carry."""
    layer, head = np.nonzero(~shipped)
    return {"x": head + 1, "y": layer + 1}


def _canvas(fig: Plot) -> Plot:
    """``fig`` drawn on a canvas: no WebGL bundle to inline, and no GPU needed to view the file."""
    fig.output_backend = "canvas"
    return fig


def _grid_figure(d: Dashboard) -> tuple[Plot, ColumnDataSource]:
    """The head grid ("grid") and its cells' source ("head_grid", the heads of a partial selection selected); heads the file does not carry hatched."""
    element = head_grid(d.grid_values, d.grid_label, title=d.grid_title, cmap=GRID_PALETTE, width=440, height=320)
    fig, sources = render_bound(element, {"cells": GRID_LAYERS["cells"]}, {"cells": d.grid_cells})
    renderer(fig, GRID_LAYERS["cells"]).name = "grid_cells"
    grid = sources["cells"]
    grid.name, grid.selected.indices = "head_grid", d.selected
    if not d.shipped.all():
        fig.rect(source=ColumnDataSource(not_shipped_cells(d.shipped)), x="x", y="y", width=1, height=1, fill_alpha=0, line_alpha=0, hatch_pattern="/", hatch_color="#777777",
                 hatch_alpha=0.8, nonselection_hatch_alpha=0.8, name="not_shipped")
    fig.name = "grid"
    return _canvas(fig), grid


def _flow_sources(d: Dashboard) -> dict[str, Any]:
    """The flow frames in the columns the browser rewrites."""
    return {"edges": d.flow["edges"][EDGE_FIELDS], "nodes": d.flow["nodes"][NODE_FIELDS], "message": d.flow["message"]}


def _flow_figure(d: Dashboard) -> tuple[Plot, dict[str, ColumnDataSource]]:
    """The merged, layered flow diagram ("flow") bound to its frames (sources "flow_edges", "flow_nodes", "flow_message")."""
    element = flow_diagram(d.tokens, d.traces, layout="layered", width=flow_width(d.shape[2]), height=FLOW_HEIGHT, frames=d.flow).opts(title=d.flow_title)
    fig, sources = render_bound(element, flow_layers(), _flow_sources(d))
    _canvas(fig).name = "flow"
    next(item for item in fig.right if isinstance(item, Legend)).name = "flow_legend"  # field_legend's (HoloViews keeps its own, empty, in the plot)
    for name, source in sources.items():
        source.name = f"flow_{name}"
    return fig, sources


def _sentence_figure(d: Dashboard) -> tuple[Plot, dict[str, ColumnDataSource]]:
    """Words shaded by each model's influence on the input ("sentence"; sources "sentence_words", "sentence_texts")."""
    element = sentence_view(d.words, d.sentence_values, d.captions, max_chars=SENTENCE_CHARS)
    fig, sources = render_bound(element, SENTENCE_LAYERS, d.sentence)
    sources["boxes"].name, sources["texts"].name = "sentence_words", "sentence_texts"
    fig.name = "sentence"
    return _canvas(fig), sources


def _matrix_figure(d: Dashboard, matrix: Matrix, name: str) -> Plot:
    """One head's matrix (``name``), shipped as uint8 (weight * 255) pixels; its colours, colour bar and hover still show weights."""
    element = attention_matrix(matrix.attention, d.tokens, title=matrix.title, size=matrix.size, cmap=MATRIX_PALETTE, rasterize=False)  # no datashader: its first call compiles for seconds
    fig, _ = render_bound(element, MATRIX_LAYERS, {"image": matrix.frame})
    image = renderer(fig, MATRIX_LAYERS["image"])
    image.name = f"{name}_image"
    mapper = image.glyph.color_mapper  # HoloViews gives the image and its colour bar one mapper
    bar = LinearColorMapper(palette=mapper.palette, low=matrix.clim[0], high=matrix.clim[1], name=f"{name}_weights")
    next(item for item in fig.right if isinstance(item, ColorBar)).color_mapper = bar
    mapper.low, mapper.high = 0.0, pixel_high(matrix.clim)
    for tool in fig.toolbar.tools:
        if isinstance(tool, HoverTool):  # keep attention_matrix's token formatters for the axes; the weight now arrives as uint8
            tool.tooltips = [(label, "@image{custom}" if label == "weight" else field) for label, field in tool.tooltips]
            tool.formatters = {**tool.formatters, "@image": CustomJSHover(code="return (value / 255).toFixed(3)")}
    fig.name = name
    return _canvas(fig)
