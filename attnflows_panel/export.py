"""Static export: one self-contained HTML file whose head grid re-traces the [CLS] flow in the browser.

It compares a pre-trained model with its fine-tune (two records of one input), or shows one model (one record).

The file holds Bokeh models only (built from the plot builders, with Bokeh's JS and CSS inline), so
it opens offline and without Python. For the trace it ships, per model, the attention entries at or
above ``tau``: exactly what a union-combined :func:`trace_cls_flow` at that ``tau`` can keep. A long
input whose entries pass :data:`MAX_ENTRIES` ships those of the heads first in line (the selected ones,
then the most changed) up to it, and says so; the other heads cannot be selected in the file. The
browser applies the same ``top_k`` rule as the trace (the k strongest edges of each expanded token,
ties to the lower key index), so Python and the page draw the same edges and count them the same way.

An export computes data only (:func:`dashboard_data`): its page is a template rendered once per page structure
(pair or one model, layers, heads, matrices, ...) from the same builders on a synthetic input and kept in memory and
under the cache directory, its data-dependent values filled in (see :mod:`attnflows_panel.page_template`).
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import bokeh
import numpy as np
import pandas as pd
from bokeh.document import Document
from bokeh.models import LayoutDOM

from attnflows_panel import page_template
from attnflows_panel.analysis.compare import head_js_divergence, require_same_shape
from attnflows_panel.analysis.flows import FINETUNED, PRETRAINED, AttentionTrace, as_source, trace_cls_flow, validate_alpha, validate_head_mask, validate_tau
from attnflows_panel.analysis.heads import head_measures
from attnflows_panel.analysis.source import MAP_BLOCK_BYTES, AttentionSource, DenseAttention, map_layers
from attnflows_panel.errors import InputError
from attnflows_panel.export_layout import EDGE_FIELDS, NODE_FIELDS, SENTENCE_CHARS, dashboard_figures, matrix_size, page_values
from attnflows_panel.extract import AttentionRecord, merge_tokens
from attnflows_panel.paths import atomic_file, sha256_json
from attnflows_panel.plots import MODEL_TITLES, short_name
from attnflows_panel.plots.attention_matrix import matrix_bounds, weight_clim
from attnflows_panel.plots.flow_diagram import (
    COUNT_HIDDEN_UP_TO,
    LABEL_COLORS,
    LABEL_ORDER,
    LEGEND_NAMES,
    NAME_EVERY_TOKEN_UP_TO,
    ROOT_COLOR,
    UNREACHED_COLOR,
    edge_counts,
    flow_frames,
    hidden_text,
)
from attnflows_panel.plots.head_grid import grid_frames, heads_at
from attnflows_panel.plots.sentence_view import sentence_frames
from attnflows_panel.text import counted, plural

MAX_TOP_HEADS = 8  # two matrices a head: with the grid, flows and sentence this stays under ~20 figures
MAX_TOP_K = 20  # the app's top-k slider bounds
MAX_ENTRIES = 1_500_000  # attention entries of at least tau a file carries, both models together (about 18 MB of arrays)
MATRIX_PIXELS = 400  # a matrix is shipped as at most this many pixels a side (n x n up to 400 tokens), as datashader's rasterize made it
DEFAULT_TOP_K = 3  # the app's default
DEFAULT_TOP_HEADS = 4
DEFAULT_TITLE = "attnflows: pre-trained vs fine-tuned"
SINGLE_TITLE = "attnflows: attention flows"
PAIR_NAME = "pre-trained vs fine-tuned"
SINGLE_MEASURE = ("max_weight", "largest weight (confidence)")  # one model's grid colour, and which heads' matrices it shows
SHIPPED_STRUCTURES = [(pair, DEFAULT_TOP_HEADS, True, *long) for pair in (True, False) for long in ((False, False), (True, False), (True, True))]  # the default pages, any model
PAGE_SOURCES = ("export.py", "export_layout.py", "page_template.py", "plots")  # what shapes a template, besides the library versions


def _split(counts: Mapping[str, int], pair: bool = True) -> str:
    """``" (S shared, P pre-trained only, F fine-tuned only)"``, in the legend's order; ``""`` for one model."""
    return f" ({', '.join(f'{counts[label]} {LEGEND_NAMES[label]}' for label in LABEL_ORDER)})" if pair else ""


def flow_title(counts: Mapping[str, int], hidden: int | None = 0, top_k: int | None = None, root_name: str = "[CLS]", model: str | None = None) -> str:
    """The flow diagram's title from the edges per label and the ``hidden`` ones top-k drops (the browser writes the same through ``STATUS_JS``).

    ``model`` names the one model of a single-model export (None: the pair).
    """
    return f"{PAIR_NAME if model is None else model} from {root_name}: {counted(sum(counts.values()), 'edge')}{_split(counts, model is None)}{hidden_text(hidden, top_k, sum(counts.values()))}"


def status_html(counts: Mapping[str, int], selected: int, heads: int, hidden: int | None = 0, top_k: int | None = None, pair: bool = True) -> str:
    """The edge and head count line above the flow diagram, numbers only (the browser mirrors it)."""
    which = f"all {heads} heads" if selected == heads else f"{selected} of {heads} heads selected"
    n = sum(counts.values())
    return f"<b>{n}</b> {plural('edge', n)}{_split(counts, pair)}{hidden_text(hidden, top_k, n)}; {which}"


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
    layers = map_layers(partial(_layer_entries, source, tau), range(source.n_layers), MAP_BLOCK_BYTES, "attnflows-entries", source.weight_bytes)
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
    top_heads: int = DEFAULT_TOP_HEADS,
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
    top_heads: int = DEFAULT_TOP_HEADS,
    head_mask: Any = None,
    title: str | None = None,
    top_k: int | None = DEFAULT_TOP_K,
) -> str:
    """The dashboard as an HTML string with Bokeh's JS and CSS inline (see :func:`export_dashboard`): its structure's template, filled."""
    if title is None:
        title = SINGLE_TITLE if records is not None and len(records) == 1 else DEFAULT_TITLE
    data = dashboard_data(records, tau=tau, alpha=alpha, top_heads=top_heads, head_mask=head_mask, top_k=top_k)
    values = page_values(data)
    template = page_template.cached_template(template_key(data.structure), frozenset(values), lambda: template_html(data.structure))
    return template.fill(values, title)


def template_key(structure: tuple) -> str:
    """The name of a structure's template: a hash of :func:`template_version`, then one of the structure (see :func:`page_template.cached_template`)."""
    return f"{sha256_json(template_version())[:32]}-{sha256_json(structure)[:32]}"


@cache
def template_version() -> tuple[str, ...]:
    """What a template depends on besides its structure: attnflows, Bokeh and HoloViews versions and the sources that shape the page."""
    root = Path(__file__).parent
    files = [path for name in PAGE_SOURCES for path in ([root / name] if name.endswith(".py") else sorted((root / name).glob("*.py")))]
    return version("attnflows-panel"), bokeh.__version__, version("holoviews"), page_template.sources_hash(files)


def template_html(structure: tuple) -> str:
    """The page template of a ``structure`` (see :attr:`Dashboard.structure`): the figures of a synthetic input, each data-dependent value a slot."""
    data = dashboard_data(synthetic_records(structure), top_heads=structure[1])
    if not structure[2]:
        shipped = np.ones_like(data.shipped)
        shipped.flat[-1] = False
        data = dataclasses.replace(data, shipped=shipped)
    if data.structure != structure:
        raise ValueError(f"a synthetic input made a page of structure {data.structure}, not {structure}")
    document = Document()
    document.add_root(dashboard_figures(data))
    return page_template.template_page(document, page_values(data))


def synthetic_records(structure: tuple) -> tuple[AttentionRecord, ...]:
    """Records of a random input whose dashboard has ``structure`` (all its heads shipped), of a model with 2 layers of :data:`MAX_TOP_HEADS` heads."""
    pair, _, _, long, one_colour = structure
    layers, heads = 2, MAX_TOP_HEADS
    n = NAME_EVERY_TOKEN_UP_TO + 1 if long else 8
    rng = np.random.default_rng(0)
    tokens = ["[CLS]", *(f"w{i}" for i in range(1, n - 1)), "[SEP]"]
    word_ids = np.r_[-1, np.arange(n - 2), -1]
    special = word_ids < 0

    def record(model_id: str) -> AttentionRecord:
        attention = rng.random((layers, heads, n, n), dtype=np.float32)
        attention /= attention.sum(axis=-1, keepdims=True)
        if not one_colour:  # each token keeps half its attention: edges of any tau up to 0.5 (none at all in a long uniform input)
            attention = (attention + np.eye(n, dtype=np.float32)) / 2
        ids = np.arange(n)
        return AttentionRecord("synthetic", None, model_id, tokens, ids, word_ids, np.zeros(n, dtype=np.int64), special & (ids == 0), special & (ids == n - 1), DenseAttention(attention))

    return (record("synthetic/pretrained"), record("synthetic/finetuned")) if pair else (record("synthetic/model"),)


def ship_templates(directory: Path = page_template.SHIPPED) -> list[Path]:
    """Write the templates of :data:`SHIPPED_STRUCTURES` as the package ships them into ``directory``, whose other templates
    are removed (``make templates`` runs it after a change to what shapes a page)."""
    written = []
    for structure in SHIPPED_STRUCTURES:
        path = directory / page_template.shipped_path(template_key(structure)).name
        with atomic_file(path) as tmp:
            tmp.write_bytes(page_template.ship_text(template_html(structure)))
            tmp.chmod(0o644)
        written.append(path)
    for stale in set(directory.glob("*.html.gz")) - set(written):
        stale.unlink()
    return written


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


@dataclass(frozen=True)
class Matrix:
    """One head's matrix: its weights, title and side in pixels, its image columns (uint8 pixels) and colour limits."""

    attention: np.ndarray
    title: str
    size: int
    frame: dict[str, list]
    clim: tuple[float, float]


@dataclass(frozen=True)
class Dashboard:
    """Everything an export draws, computed without Bokeh: what :func:`~attnflows_panel.export_layout.dashboard_figures` builds from."""

    pair: bool
    shape: tuple[int, int, int]  # layers, heads, tokens
    tokens: list[str]
    header: str
    status: str
    grid_values: np.ndarray  # the grid's colour: the model difference, or one model's measure
    grid_label: str
    grid_title: str
    grid_cells: pd.DataFrame
    selected: list[int]  # the grid cells initially selected (none: every head)
    shipped: np.ndarray  # [L, H]: the heads whose attention the file carries
    traces: dict[str, AttentionTrace]
    flow: dict[str, pd.DataFrame]
    flow_title: str
    words: list[str]
    sentence_values: dict[str, np.ndarray]
    captions: dict[str, str]
    sentence: dict[str, pd.DataFrame]
    matrices: list[Matrix]
    matrix_caption: str
    trace_args: dict[str, Any]  # the browser trace's data

    @property
    def structure(self) -> tuple[bool, int, bool, bool, bool]:
        """What changes the page's set of Bokeh models: pair or one model, top heads, every head carried, tokens past naming each,
        and flow nodes of one colour (a long input's lone root, whose colour HoloViews then draws as a value); not the model's
        layers and heads (the grid's and the flow's axes are filled in)."""
        one_colour = self.flow["nodes"]["color"].nunique() == 1
        return self.pair, len(self.matrices) // (2 if self.pair else 1), bool(self.shipped.all()), self.shape[2] > NAME_EVERY_TOKEN_UP_TO, one_colour


def dashboard_layout(records: Sequence[AttentionRecord] | None, **settings: Any) -> LayoutDOM:
    """The Bokeh layout of the dashboard (``settings`` as :func:`dashboard_data` takes them), built from the plot builders: the page :func:`dashboard_html` writes holds the same models."""
    return dashboard_figures(dashboard_data(records, **settings))


def dashboard_data(
    records: Sequence[AttentionRecord] | None,
    *,
    tau: float = 0.1,
    alpha: float = 0.5,
    top_heads: int = DEFAULT_TOP_HEADS,
    head_mask: Any = None,
    top_k: int | None = DEFAULT_TOP_K,
) -> Dashboard:
    """What the dashboard of ``records`` shows (see :func:`export_dashboard` for the settings), checked."""
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
    cells_frame = grid_frames(values, [])["cells"]
    cells = np.array(heads_at({k: cells_frame[k].to_numpy() for k in ("layer", "head")}, range(mask.size)), dtype=np.int32)
    frames = flow_frames(pre.tokens, traces, "layered", flow_message(traces, mask, tau, name_of_root))
    counts = edge_counts(frames["edges"]["label"].to_numpy())
    hidden = hidden_by_top_k([r.source for r in checked], mask, tau, alpha, top_k, sum(counts.values()), root)
    sentence_values, captions = _sentence_values(word_index, len(words), traces, checked[-1], model)
    trace_args = dict(
        L=L, H=H, n=n, count_hidden_up_to=COUNT_HIDDEN_UP_TO, root=pre.root_token, root_name=name_of_root, alpha=alpha, top_k=top_k, cell_layer=cells[:, 0], cell_head=cells[:, 1],
        tokens=list(pre.tokens), word_index=word_index.astype(np.int32), n_words=len(words),
        models={name: pack_entries(e, pre.source.shape, shipped) for name, e in entries.items()}, shipped=shipped.ravel().astype(np.uint8),
        pair_name=PAIR_NAME, models_name=model or PAIR_NAME,
        edge_fields=EDGE_FIELDS, node_fields=NODE_FIELDS, colors=LABEL_COLORS, root_color=ROOT_COLOR, unreached_color=UNREACHED_COLOR,
        label_order=list(LABEL_ORDER), legend_names=LEGEND_NAMES if pair else dict.fromkeys(LEGEND_NAMES, "traced"), no_edge=no_edge_messages(L, tau, name_of_root),
    )  # fmt: skip
    matrices, matrix_caption = _matrices(named, values, top_heads)
    return Dashboard(
        pair=pair, shape=(L, H, n), tokens=list(pre.tokens),
        header=_header_html(checked, tau, alpha, top_k) + _shipped_html(shipped, counts_per_head, label), status=status_html(counts, int(mask.sum()), L * H, hidden, top_k, pair),
        grid_values=values, grid_label=label, grid_title=grid_title, grid_cells=cells_frame, selected=[] if mask.all() else [i for i, (layer, head) in enumerate(cells) if mask[layer, head]],
        shipped=shipped, traces=traces, flow=frames, flow_title=flow_title(counts, hidden, top_k, name_of_root, model),
        words=words, sentence_values=sentence_values, captions=captions, sentence=sentence_frames(words, sentence_values, captions, max_chars=SENTENCE_CHARS),
        matrices=matrices, matrix_caption=matrix_caption, trace_args=trace_args,
    )  # fmt: skip


def _sentence_values(word_index: np.ndarray, n_words: int, traces: dict[str, AttentionTrace], last: AttentionRecord, model: str | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Each model's influence on the words, and the captions (the prediction of the ``last`` record, the fine-tuned one or the ``model``'s, in its own)."""
    values = {name: np.bincount(word_index, weights=trace.influence[0], minlength=n_words) for name, trace in traces.items()}
    names = {PRETRAINED: "pre-trained", FINETUNED: "fine-tuned"} if model is None else {PRETRAINED: model}
    captions = {name: f"{title}: influence on the input" for name, title in names.items()}
    if last.predicted_label is not None:
        captions[list(names)[-1]] = f"{list(names.values())[-1]}: predicts {last.predicted_label} ({last.probabilities.max():.0%})"
    return values, captions


def _matrices(records: Mapping[str, AttentionRecord], values: np.ndarray, top_heads: int) -> tuple[list[Matrix], str]:
    """The matrices of the ``top_heads`` heads of largest ``values`` (both models' side by side: the heads they differ most on; or one model's), and their caption."""
    first = records[PRETRAINED]
    size = matrix_size(first.n_tokens)
    heads = [np.unravel_index(int(flat), values.shape) for flat in np.argsort(-values, axis=None, kind="stable")[:top_heads]]
    if len(records) == 1:
        measure = SINGLE_MEASURE[1].split(" (")[0]
        titles = [{PRETRAINED: f"layer {layer + 1}, head {head + 1} ({measure} {values[layer, head]:.3f})"} for layer, head in heads]
        caption = f"<b>The {top_heads} heads with the {SINGLE_MEASURE[1]}</b>"
    else:
        titles = [{name: f"{MODEL_TITLES[name]}: layer {layer + 1}, head {head + 1} (JS {values[layer, head]:.3f} bits)" for name in records} for layer, head in heads]
        caption = f"<b>The {top_heads} heads the models differ most on</b> (Jensen-Shannon divergence of their rows)"
    matrices = [_matrix(records[name].source.head(layer, head), title, size) for (layer, head), named in zip(heads, titles, strict=True) for name, title in named.items()]
    return matrices, caption


def _matrix(attention: np.ndarray, title: str, size: int) -> Matrix:
    """One head's matrix, shipped as uint8 (weight * 255) in at most :data:`MATRIX_PIXELS` a side."""
    left, bottom, right, top = matrix_bounds(attention.shape[0])
    frame = {"image": [_matrix_pixels(attention)], "x": [left], "y": [bottom], "dw": [right - left], "dh": [top - bottom]}
    return Matrix(attention, title, size, frame, weight_clim(attention))


def _shipped_html(shipped: np.ndarray, counts: np.ndarray, label: str) -> str:
    """What a long input's file leaves out: which heads it carries, and why ("" when it carries every head)."""
    if shipped.all():
        return ""
    return (
        f"<div style='color: #8a4b00'><b>A long input:</b> its {int(counts.sum()):,} attention entries of at least tau pass this file's cap of {MAX_ENTRIES:,}, "
        f"so it carries those of {int(shipped.sum())} of {shipped.size} heads (the selected ones first, then by {html.escape(label)}); "
        "the other heads are hatched in the grid and selecting them draws nothing.</div>"
    )


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
