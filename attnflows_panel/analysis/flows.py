"""Flows of attention through the layers: the CLS trace, attention rollout and exact attention flow.

Conventions used throughout this module:

* ``A`` has shape ``[L, H, n, n]``: ``A[l, h, v, w]`` is the attention that query ``v`` pays to key
  ``w`` in head ``h`` of layer ``l``; layers are ordered input side first and every row sums to 1.
* Token positions live on *levels* ``0..L``: level 0 holds the input embeddings and level ``l + 1``
  the output of layer ``l``, so level ``L`` is the output of the deepest layer. The attention of layer
  ``l`` links a query at level ``l + 1`` to a key at level ``l``.
* A head mask is a boolean ``[L, H]`` array; ``None`` selects every head.
* Word-level results: merge the attention first with :func:`merge_word_pieces` (its output is still
  row-stochastic) and pass the merged array to any flow.
"""

from __future__ import annotations

import functools

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from attnflows_panel.analysis.source import CHUNK_BYTES, AttentionSource, DenseAttention
from attnflows_panel.errors import InputError

ROW_SUM_TOLERANCE = 1e-3
FLOW_EPS = 1e-14  # residual capacities at or below this count as saturated in the max-flow kernel

SHARED = "shared"
PRETRAINED = "pretrained"
FINETUNED = "finetuned"


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def validate_attention(A: Any) -> np.ndarray:
    """Return ``A`` as a float array after checking shape, finiteness, signs and row sums.

    Raises :class:`InputError` naming the offending value (the worst row for unnormalised rows).
    """
    try:
        arr = np.asarray(A)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"attention is not a numeric array: {exc}") from None
    if arr.dtype.kind not in "fiub":
        raise InputError(f"attention must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if arr.ndim != 4 or arr.shape[-1] != arr.shape[-2]:
        raise InputError(f"attention must have shape [layers, heads, n, n], got shape {arr.shape}")
    if 0 in arr.shape:
        raise InputError(f"attention must not be empty, got shape {arr.shape}")
    sums = arr.sum(axis=-1)  # a NaN or inf anywhere makes its row sum non-finite
    if not np.isfinite(sums).all():
        finite = np.isfinite(arr)
        idx = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InputError(f"attention contains the non-finite value {arr[idx]} at {_where(idx)}")
    low = arr.min()
    if low < 0:
        idx = tuple(int(i) for i in np.argwhere(arr == low)[0])
        raise InputError(f"attention contains the negative value {low:.6g} at {_where(idx)}")
    err = np.abs(sums.astype(np.float64) - 1.0)
    worst = np.unravel_index(int(err.argmax()), err.shape)
    if err[worst] > ROW_SUM_TOLERANCE:
        l, h, v = (int(i) for i in worst)
        raise InputError(
            f"attention rows must sum to 1: layer {l}, head {h}, row {v} sums to {sums[worst]:.6g} "
            f"(tolerance {ROW_SUM_TOLERANCE:g})"
        )
    return arr


def as_source(A: Any) -> AttentionSource:
    """``A`` itself when it is an :class:`AttentionSource`, else a source over the validated array."""
    return A if isinstance(A, AttentionSource) else DenseAttention(validate_attention(A))


def _where(idx: tuple[int, ...]) -> str:
    return f"layer {idx[0]}, head {idx[1]}, row {idx[2]}, column {idx[3]}"


def validate_tau(tau: float) -> float:
    """Check that the edge threshold ``tau`` lies in (0, 1]."""
    if not _is_real(tau) or not 0.0 < float(tau) <= 1.0:
        raise InputError(f"tau must be in (0, 1], got {tau!r}")
    return float(tau)


def validate_alpha(alpha: float) -> float:
    """Check that the influence decay ``alpha`` lies in [0, 1]."""
    if not _is_real(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def validate_root(root: Any, n_layers: int, n_tokens: int) -> tuple[int, int]:
    """Check a ``(level, token)`` root against levels ``0..L`` and tokens ``0..n-1``."""
    try:
        level, token = root
    except (TypeError, ValueError):
        raise InputError(f"root must be a (level, token) pair, got {root!r}") from None
    if not _is_int(level) or not 0 <= int(level) <= n_layers:
        raise InputError(f"root level {level!r} is unknown: levels run from 0 (input) to {n_layers} (last layer)")
    if not _is_int(token) or not 0 <= int(token) < n_tokens:
        raise InputError(f"root token {token!r} is unknown: this input has tokens 0..{n_tokens - 1}")
    return int(level), int(token)


def validate_head_mask(head_mask: Any, n_layers: int, n_heads: int) -> np.ndarray:
    """Return a boolean ``[L, H]`` head mask (all heads for ``None``)."""
    if head_mask is None:
        return np.ones((n_layers, n_heads), dtype=bool)
    mask = np.asarray(head_mask)
    if mask.shape != (n_layers, n_heads):
        raise InputError(f"head mask must have shape ({n_layers}, {n_heads}), got shape {mask.shape}")
    if mask.dtype != bool:
        if mask.dtype.kind not in "iu" or not np.isin(mask, (0, 1)).all():
            raise InputError(f"head mask must be boolean, got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) and np.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _token_indices(tokens: Any, n: int, what: str) -> np.ndarray:
    idx = np.atleast_1d(np.asarray(tokens))
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise InputError(f"{what} must be token indices, got {tokens!r}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise InputError(f"{what} token {int(bad[0])} is unknown: this input has tokens 0..{n - 1}")
    return idx.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# CLS trace (DeRose et al. 2020)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionTrace:
    """The attention graph traced from one root; edges are one row per kept (layer, query, key).

    ``counts``, ``influence`` and ``reached`` are ``[L + 1, n]`` over levels (0 = input embeddings).
    ``edge_head`` is the strongest passing head (``-1`` for ``combine="mean"``) and ``edge_weight`` its
    weight (the head mean for ``"mean"``); ``edge_heads`` ``[E, H]`` marks every head that passed
    (for ``"mean"``: the heads averaged).
    """

    edge_layer: np.ndarray
    edge_query: np.ndarray
    edge_key: np.ndarray
    edge_head: np.ndarray
    edge_weight: np.ndarray
    edge_heads: np.ndarray
    counts: np.ndarray
    influence: np.ndarray
    reached: np.ndarray
    root: tuple[int, int]
    direction: str
    combine: str
    tau: float
    alpha: float
    top_k: int | None
    head_mask: np.ndarray

    @property
    def n_edges(self) -> int:
        """Number of kept (layer, query, key) edges."""
        return int(self.edge_layer.size)

    def edge_ids(self) -> np.ndarray:
        """One int64 per edge identifying (layer, query, key), for set operations across traces."""
        n = self.counts.shape[1]
        return (self.edge_layer.astype(np.int64) * n + self.edge_query) * n + self.edge_key


def trace_cls_flow(
    A: Any,
    head_mask: Any = None,
    *,
    tau: float = 0.1,
    alpha: float = 0.5,
    root: tuple[int, int] | None = None,
    combine: Literal["union", "mean"] = "union",
    top_k: int | None = None,
    direction: Literal["backward", "forward"] = "backward",
    every_token: bool = False,
) -> AttentionTrace:
    """Trace the paper's attention graph from ``root`` (default: token 0, [CLS], at level L) through ``A``, an array or an :class:`AttentionSource`.

    Backward walks down (what the root attends to), forward walks up (what attends to the root).
    ``top_k`` keeps the k strongest edges of each expanded node (the query going backward, the key
    going forward). ``c_l(w)`` counts kept edges arriving at token w on level l and
    ``I_l(w) = c_l(w) + alpha * I_{l'}(w)``, l' being the neighbouring level nearer the root; both are
    0 on the root's level and on levels beyond it. An empty head mask gives an empty trace.
    ``every_token`` expands every token of every level from the root's on, reached or not: the selected
    heads' own attention edges (BertViz's reading), whether or not they lead to the root.
    """
    source = as_source(A)
    L, H, n, _ = source.shape
    tau = validate_tau(tau)
    alpha = validate_alpha(alpha)
    mask = validate_head_mask(head_mask, L, H)
    if combine not in ("union", "mean"):
        raise InputError(f"combine must be 'union' or 'mean', got {combine!r}")
    if direction not in ("backward", "forward"):
        raise InputError(f"direction must be 'backward' or 'forward', got {direction!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if root is None:
        root = (L, 0) if direction == "backward" else (0, 0)
    r_level, r_token = validate_root(root, L, n)

    backward = direction == "backward"
    counts = np.zeros((L + 1, n), dtype=np.int64)
    influence = np.zeros((L + 1, n), dtype=np.float64)
    reached = np.zeros((L + 1, n), dtype=bool)
    reached[r_level, r_token] = True
    parts: list[tuple[np.ndarray, ...]] = []

    everyone = np.arange(n)
    frontier = everyone if every_token else np.array([r_token])
    steps = range(r_level, 0, -1) if backward else range(r_level, L)
    for level in steps:
        layer = level - 1 if backward else level
        heads = np.flatnonzero(mask[layer])
        if every_token:
            frontier = everyone
        if frontier.size == 0 or (heads.size == 0 and not every_token):
            break
        if heads.size == 0:  # no selected head here: nothing to draw in this layer, the layers below still count
            continue
        nxt = level - 1 if backward else level + 1
        for part in np.array_split(frontier, -(-frontier.size * heads.size * n * 4 // CHUNK_BYTES)):  # blocks under CHUNK_BYTES
            edges = _trace_edges(source, layer, heads, part, backward, combine, tau, top_k)
            parts.append(edges)
            counts[nxt] += np.bincount(edges[2] if backward else edges[1], minlength=n)
        reached[nxt] = counts[nxt] > 0
        frontier = np.flatnonzero(reached[nxt])

    levels = range(r_level - 1, -1, -1) if backward else range(r_level + 1, L + 1)
    for level in levels:
        prev = level + 1 if backward else level - 1
        influence[level] = counts[level] + alpha * influence[prev]

    if parts:
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
    else:
        cols = [np.zeros(0, dtype=np.int64)] * 4 + [np.zeros(0), np.zeros((0, H), dtype=bool)]
    # sort edges by (layer, query, key) so that traces compare and display deterministically
    order = np.lexsort((cols[2], cols[1], cols[0]))
    e_layer, e_query, e_key, e_head, e_weight, e_heads = (c[order] for c in cols)
    return AttentionTrace(
        edge_layer=e_layer.astype(np.int64),
        edge_query=e_query.astype(np.int64),
        edge_key=e_key.astype(np.int64),
        edge_head=e_head.astype(np.int64),
        edge_weight=e_weight.astype(np.float64),
        edge_heads=e_heads,
        counts=counts,
        influence=influence,
        reached=reached,
        root=(r_level, r_token),
        direction=direction,
        combine=combine,
        tau=tau,
        alpha=alpha,
        top_k=top_k,
        head_mask=mask.copy(),
    )


def _trace_edges(
    source: AttentionSource, layer: int, heads: np.ndarray, frontier: np.ndarray, backward: bool, combine: str, tau: float, top_k: int | None
) -> tuple[np.ndarray, ...]:
    """(layer, query, key, head, weight, heads passed) of the edges ``heads`` of ``layer`` keep from the nodes ``frontier``."""
    H, n = source.n_heads, source.n_tokens
    # sub[h, i, j]: expanded node i (frontier) to candidate j on the next level
    sub = source.rows(layer, heads, frontier) if backward else source.columns(layer, heads, frontier).transpose(0, 2, 1)
    weight = sub.max(axis=0) if combine == "union" else sub.mean(axis=0)  # union: some head passes iff the strongest one does
    keep = weight >= tau
    if top_k is not None and top_k < n:
        ranked = np.where(keep, weight, -np.inf)
        order = np.argsort(-ranked, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n)[None, :], axis=1)
        keep &= rank < top_k
    fi, nj = np.nonzero(keep)
    src = frontier[fi]
    query, key = (src, nj) if backward else (nj, src)
    heads_passed = np.zeros((fi.size, H), dtype=bool)
    if combine == "union":
        kept = sub[:, fi, nj]  # [heads, edges]
        head = heads[kept.argmax(axis=0)]
        heads_passed[:, heads] = (kept >= tau).T
    else:
        head = np.full(fi.size, -1, dtype=np.int64)
        heads_passed[:, heads] = True
    return np.full(fi.size, layer, dtype=np.int64), query, key, head, weight[fi, nj], heads_passed


@dataclass(frozen=True)
class TraceComparison:
    """Edges and nodes of two traces labelled shared / pretrained (only a) / finetuned (only b).

    Edges are the union over (layer, query, key), sorted; ``node_label`` is ``[L + 1, n]`` with ``""``
    where neither trace reached the token.
    """

    edge_layer: np.ndarray
    edge_query: np.ndarray
    edge_key: np.ndarray
    edge_label: np.ndarray
    node_label: np.ndarray


def compare_traces(trace_a: AttentionTrace, trace_b: AttentionTrace) -> TraceComparison:
    """Label each edge and node as in both traces, only in ``trace_a`` (pretrained) or only in ``trace_b``."""
    if trace_a.counts.shape != trace_b.counts.shape:
        raise InputError(
            f"traces have different shapes: {trace_a.counts.shape} and {trace_b.counts.shape} "
            "(levels + 1, tokens); compare traces of the same input"
        )
    if trace_a.direction != trace_b.direction:
        raise InputError(f"traces walk in different directions: {trace_a.direction!r} and {trace_b.direction!r}")
    n = trace_a.counts.shape[1]
    ida, idb = trace_a.edge_ids(), trace_b.edge_ids()
    ids = np.union1d(ida, idb)
    in_a, in_b = np.isin(ids, ida), np.isin(ids, idb)
    edge_label = np.where(in_a & in_b, SHARED, np.where(in_a, PRETRAINED, FINETUNED))
    ra, rb = trace_a.reached, trace_b.reached
    node_label = np.where(ra & rb, SHARED, np.where(ra, PRETRAINED, np.where(rb, FINETUNED, "")))
    return TraceComparison(
        edge_layer=ids // (n * n),
        edge_query=(ids // n) % n,
        edge_key=ids % n,
        edge_label=edge_label,
        node_label=node_label,
    )


# --------------------------------------------------------------------------------------------------
# Attention rollout and attention flow (Abnar & Zuidema 2020)
# --------------------------------------------------------------------------------------------------


def residual_attention(A: Any, head_mask: Any = None, *, causal: bool = False) -> np.ndarray:
    """Per layer ``(mean_h A[l, h] + I)`` with rows renormalised, as in Abnar & Zuidema's code; ``[L, n, n]``.

    The mean runs over the heads selected in ``head_mask``; a layer with no selected head is ``I``.
    ``causal=True`` first divides key k's weight by its receptive field, the ``n - k`` queries that
    can see it, and renormalises rows: otherwise the first tokens gather relevance only for being
    visible to every later token. ``A`` is an array or an :class:`AttentionSource`, read a layer at a time.
    """
    source = as_source(A)
    mask = validate_head_mask(head_mask, source.n_layers, source.n_heads)
    return np.stack([residual_layer(source, mask, layer, causal=causal) for layer in range(source.n_layers)])


def residual_layer(source: AttentionSource, mask: np.ndarray, layer: int, *, causal: bool = False) -> np.ndarray:
    """``[n, n]``: layer ``layer`` of :func:`residual_attention` for a validated source and head mask."""
    n = source.n_tokens
    heads = np.flatnonzero(mask[layer])
    if heads.size == 0:
        return np.eye(n)
    mean = np.zeros((n, n))
    for queries, block in source.row_chunks(layer, heads):
        mean[queries] = block.mean(axis=0, dtype=np.float64)
    if causal:
        mean /= (n - np.arange(n))[None, :]
        sums = mean.sum(axis=-1, keepdims=True)
        np.divide(mean, sums, out=mean, where=sums > 0)
    mean[np.diag_indices(n)] += 1.0
    mean /= mean.sum(axis=-1, keepdims=True)
    return mean


def attention_rollout(A: Any, head_mask: Any = None, *, causal: bool = False) -> np.ndarray:
    """Attention rollout per level, ``[L + 1, n, n]``: ``R[0] = I`` and ``R[l + 1] = W_l @ R[l]``.

    ``W_l`` is :func:`residual_attention`; ``R[L][v]`` is how output token v mixes the input tokens.
    """
    W = residual_attention(A, head_mask, causal=causal)
    L, n, _ = W.shape
    R = np.empty((L + 1, n, n))
    R[0] = np.eye(n)
    for layer in range(L):
        np.matmul(W[layer], R[layer], out=R[layer + 1])
    return R


def rollout_trace(A: Any, head_mask: Any = None, *, tau: float = 0.05, root: tuple[int, int] | None = None, causal: bool = False) -> AttentionTrace:
    """Rollout as a trace: the root's relevance pushed down through :func:`residual_attention`.

    ``r_level(root) = 1``; a layer-l edge carries ``r_{l+1}(v) * W_l[v, w]`` and ``r_l(w)`` sums what
    arrives (so ``influence[0]`` is the root's row of :func:`attention_rollout`). Edges of at least
    ``tau`` are kept; ``counts`` counts them per token. An empty head mask gives an empty trace.
    """

    def step(W: Any, level: int, relevance: np.ndarray, _: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        carried = relevance[level][:, None] * W(level - 1)
        return carried, carried.sum(axis=0)

    return _residual_trace(A, head_mask, tau, root, step, causal)


def flow_trace(A: Any, head_mask: Any = None, *, tau: float = 0.05, root: tuple[int, int] | None = None, causal: bool = False) -> AttentionTrace:
    """Exact attention flow as a trace: ``f_l(w)`` is the max-flow from the root to token w on level l.

    The graph is :func:`attention_flow`'s (so ``influence[0]`` is the root's row of ``attention_flow``).
    A layer-l edge weighs ``min(f_{l+1}(v), W_l[v, w])``, the most of the root's flow it can carry;
    edges of at least ``tau`` are kept. An empty head mask gives an empty trace.
    """

    def step(W: Any, level: int, relevance: np.ndarray, root: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        r_level, r_token = root
        below = _max_flows(np.ascontiguousarray(np.stack([W(layer) for layer in range(level - 1, r_level)])), np.array([r_token]))[0][0]
        return np.minimum(relevance[level][:, None], W(level - 1)), below

    return _residual_trace(A, head_mask, tau, root, step, causal)


def _residual_trace(A: Any, head_mask: Any, tau: float, root: tuple[int, int] | None, step: Any, causal: bool) -> AttentionTrace:
    """A trace down :func:`residual_attention` from the root (a causal model's last token by default): ``step`` gives each layer's edge weights and the relevance below.

    ``step`` reads layers through ``W(layer)``, each computed once when first asked for.
    """
    source = as_source(A)
    L, H, n, _ = source.shape
    tau = validate_tau(tau)
    mask = validate_head_mask(head_mask, L, H)
    r_level, r_token = validate_root((L, n - 1 if causal else 0) if root is None else root, L, n)
    W = functools.cache(lambda layer: residual_layer(source, mask, layer, causal=causal))
    relevance = np.zeros((L + 1, n))
    counts = np.zeros((L + 1, n), dtype=np.int64)
    relevance[r_level, r_token] = 1.0
    parts: list[tuple[np.ndarray, ...]] = []
    for level in range(r_level, 0, -1) if mask.any() else ():
        carried, relevance[level - 1] = step(W, level, relevance, (r_level, r_token))
        query, key = np.nonzero(carried >= tau)
        counts[level - 1] = np.bincount(key, minlength=n)
        parts.append((np.full(query.size, level - 1), query, key, carried[query, key]))
    layer, query, key, weight = (np.concatenate(c) for c in zip(*parts, strict=True)) if parts else (np.zeros(0, np.int64),) * 3 + (np.zeros(0),)
    reached = counts > 0
    reached[r_level, r_token] = True
    influence = np.where(np.arange(L + 1)[:, None] < r_level, relevance, 0.0) if mask.any() else np.zeros((L + 1, n))
    return AttentionTrace(
        edge_layer=layer.astype(np.int64),
        edge_query=query.astype(np.int64),
        edge_key=key.astype(np.int64),
        edge_head=np.full(layer.size, -1, dtype=np.int64),
        edge_weight=weight.astype(np.float64),
        edge_heads=mask[layer] if layer.size else np.zeros((0, H), dtype=bool),
        counts=counts,
        influence=influence,
        reached=reached,
        root=(r_level, r_token),
        direction="backward",
        combine="mean",
        tau=tau,
        alpha=0.0,
        top_k=None,
        head_mask=mask.copy(),
    )


def attention_flow(
    A: Any,
    head_mask: Any = None,
    sources: Any = None,
    *,
    level: int | None = None,
    normalize: bool = False,
    causal: bool = False,
) -> np.ndarray:
    """Exact attention flow: max-flow value from each source token at ``level`` (default L) to each input token.

    The graph is Abnar & Zuidema's: nodes are (level, token), edge (l + 1, v) -> (l, w) has capacity
    ``residual_attention(A)[l, v, w]``. Returns ``[len(sources), n]``; ``normalize=True`` divides each
    row by its sum like the authors' ``compute_flows``; ``causal`` as in :func:`residual_attention`.
    """
    W = residual_attention(A, head_mask, causal=causal)
    L, n, _ = W.shape
    if level is None:
        level = L
    if not _is_int(level) or not 1 <= level <= L:
        raise InputError(f"flow level {level!r} is unknown: source levels run from 1 to {L}")
    src = np.arange(n) if sources is None else _token_indices(sources, n, "source")
    flows, _ = _max_flows(np.ascontiguousarray(W[:level]), src)
    if normalize:
        flows = flows / flows.sum(axis=1, keepdims=True)
    return flows


def _max_flows(C: np.ndarray, sources: np.ndarray, eps: float = FLOW_EPS) -> tuple[np.ndarray, np.ndarray]:
    """Max-flow values ``[len(sources), n]`` on the layered graph ``C`` and each answer's certified gap.

    The gap is the capacity of the final minimum cut minus the flow found, so the exact max-flow value
    lies in ``[value, value + gap]``.
    """
    m, n, _ = C.shape
    k = sources.size
    pair_s = np.repeat(sources, n).astype(np.int64)
    pair_t = np.tile(np.arange(n, dtype=np.int64), k)
    out = np.zeros(k * n)
    gaps = np.zeros(k * n)
    kernel = _flow_kernel()
    workers = max(1, min(os.cpu_count() or 1, 8, pair_s.size))
    if workers == 1:
        kernel(C, pair_s, pair_t, eps, out, gaps)
    else:
        # interleave pairs over threads; the kernel releases the GIL
        chunks = [np.arange(i, pair_s.size, workers) for i in range(workers)]
        results = [(np.zeros(c.size), np.zeros(c.size)) for c in chunks]
        with ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(kernel, C, pair_s[c], pair_t[c], eps, o, g) for c, (o, g) in zip(chunks, results, strict=True)
            ]
            for fut in futures:
                fut.result()
        for c, (o, g) in zip(chunks, results, strict=True):
            out[c], gaps[c] = o, g
    return out.reshape(k, n), gaps.reshape(k, n)


_KERNEL: Any = None
_KERNEL_LOCK = threading.Lock()


def _flow_kernel() -> Any:
    """The compiled max-flow kernel (numba, a dependency of datashader), or plain Python without numba."""
    global _KERNEL, _max_flow_layered
    with _KERNEL_LOCK:
        if _KERNEL is None:
            try:
                import numba
            except ImportError:  # correct but slow
                _KERNEL = _flow_pairs
            else:
                # _flow_pairs calls _max_flow_layered by its global name, so jit the callee first
                _max_flow_layered = numba.njit(cache=True, nogil=True)(_max_flow_layered)
                _KERNEL = numba.njit(cache=True, nogil=True)(_flow_pairs)
    return _KERNEL


def _flow_pairs(C, pair_s, pair_t, eps, out, gaps):  # noqa: ANN001, ANN202
    """Fill ``out``/``gaps`` with the max flow of each (source, sink) pair, reusing one set of work arrays."""
    m, n, _ = C.shape
    N = (m + 1) * n
    F = np.empty_like(C)
    dist = np.empty(N, np.int64)
    queue = np.empty(N, np.int64)
    ptr = np.empty(N, np.int64)
    path = np.empty(N + 1, np.int64)
    for i in range(pair_s.size):
        out[i], gaps[i] = _max_flow_layered(C, pair_s[i], pair_t[i], eps, F, dist, queue, ptr, path)


def _max_flow_layered(C, s, t, eps, F, dist, queue, ptr, path):  # noqa: ANN001, ANN202, C901, PLR0912, PLR0915
    """Dinic's algorithm in floating point from (m, s) to (0, t) on the dense layered graph ``C [m, n, n]``.

    Node (level, token) has id ``level * n + token``. Arc ``a < n`` of a node on level ``lv`` is the edge
    to (lv - 1, a) with residual ``C - F``; arc ``a >= n`` is the reverse of the edge from
    (lv + 1, a - n), with residual ``F``. Residuals at or below ``eps`` are treated as zero. Returns the
    flow value and the certified gap (final cut capacity minus flow).
    """
    m, n, _ = C.shape
    F[:] = 0.0
    src = m * n + s
    snk = t
    total = 0.0
    while True:
        # breadth-first levels over the residual graph, stopping at the sink's distance
        dist[:] = -1
        dist[src] = 0
        head = 0
        tail = 1
        queue[0] = src
        dsink = -1
        while head < tail:
            u = queue[head]
            head += 1
            du = dist[u]
            if dsink >= 0 and du >= dsink:
                break
            lv = u // n
            v = u - lv * n
            if lv >= 2:
                base = (lv - 1) * n
                for w in range(n):
                    x = base + w
                    if dist[x] < 0 and C[lv - 1, v, w] - F[lv - 1, v, w] > eps:
                        dist[x] = du + 1
                        queue[tail] = x
                        tail += 1
            elif lv == 1:
                if dist[snk] < 0 and C[0, v, t] - F[0, v, t] > eps:
                    dist[snk] = du + 1
                    queue[tail] = snk
                    tail += 1
                    dsink = du + 1
            if 1 <= lv < m:
                if lv + 1 == m:
                    if dist[src] < 0 and F[lv, s, v] > eps:
                        dist[src] = du + 1
                        queue[tail] = src
                        tail += 1
                else:
                    base = (lv + 1) * n
                    for b in range(n):
                        x = base + b
                        if dist[x] < 0 and F[lv, b, v] > eps:
                            dist[x] = du + 1
                            queue[tail] = x
                            tail += 1
        if dist[snk] < 0:
            break
        # blocking flow by depth-first search with current-arc pointers
        ptr[:] = 0
        plen = 0
        path[0] = src
        while True:
            u = path[plen]
            if u == snk:
                bott = np.inf
                for i in range(plen):
                    p = path[i]
                    a = ptr[p]
                    lv = p // n
                    v = p - lv * n
                    r = C[lv - 1, v, a] - F[lv - 1, v, a] if a < n else F[lv, a - n, v]
                    if r < bott:
                        bott = r
                first = -1
                for i in range(plen):
                    p = path[i]
                    a = ptr[p]
                    lv = p // n
                    v = p - lv * n
                    if a < n:
                        F[lv - 1, v, a] += bott
                        r = C[lv - 1, v, a] - F[lv - 1, v, a]
                    else:
                        F[lv, a - n, v] -= bott
                        r = F[lv, a - n, v]
                    if first < 0 and r <= eps:
                        first = i
                total += bott
                plen = max(first, 0)
                continue
            lv = u // n
            v = u - lv * n
            du = dist[u]
            found = -1
            while ptr[u] < 2 * n:
                a = ptr[u]
                if a < n:
                    if lv >= 2:
                        x = (lv - 1) * n + a
                        if dist[x] == du + 1 and C[lv - 1, v, a] - F[lv - 1, v, a] > eps:
                            found = x
                            break
                    elif lv == 1 and a == t:
                        if dist[snk] == du + 1 and C[0, v, t] - F[0, v, t] > eps:
                            found = snk
                            break
                elif 1 <= lv < m:
                    x = (lv + 1) * n + (a - n)
                    if dist[x] == du + 1 and F[lv, a - n, v] > eps:
                        found = x
                        break
                ptr[u] += 1
            if found >= 0:
                plen += 1
                path[plen] = found
            else:
                dist[u] = -2  # dead end for this phase
                if plen == 0:
                    break
                plen -= 1
                ptr[path[plen]] += 1
    # certificate: residual capacity across the cut S = nodes reached by the last search
    gap = 0.0
    for lv in range(1, m + 1):
        for v in range(n):
            if lv == m and v != s:
                continue
            in_s = dist[lv * n + v] >= 0
            if lv == 1:
                if in_s:
                    gap += C[0, v, t] - F[0, v, t]
            else:
                for w in range(n):
                    in_s_w = dist[(lv - 1) * n + w] >= 0
                    if in_s and not in_s_w:
                        gap += C[lv - 1, v, w] - F[lv - 1, v, w]
                    elif in_s_w and not in_s:
                        gap += F[lv - 1, v, w]
    return total, gap


# --------------------------------------------------------------------------------------------------
# Word-level aggregation
# --------------------------------------------------------------------------------------------------


def word_groups(word_ids: Sequence[int | None]) -> tuple[np.ndarray, int]:
    """Map each token to a word unit: tokens sharing a word id share a unit; ``None``/negative ids stay alone.

    Units are numbered in order of their first token. Returns (unit index per token, number of units).
    """
    unit_of: dict[int, int] = {}
    groups = np.empty(len(word_ids), dtype=np.int64)
    n_units = 0
    for i, wid in enumerate(word_ids):
        if wid is None or wid < 0:
            groups[i] = n_units
            n_units += 1
        else:
            if wid not in unit_of:
                unit_of[wid] = n_units
                n_units += 1
            groups[i] = unit_of[wid]
    return groups, n_units


def merge_word_pieces(a: Any, word_ids: Sequence[int | None], *, merge_queries: bool = True) -> np.ndarray:
    """Word-level map from a token-level ``[..., q, n]`` map: sum over the keys of a word, mean over its queries.

    Rows that summed to 1 still do, so merged attention feeds any flow. ``merge_queries=False`` merges
    keys only (for a row such as the [CLS] flow).
    """
    arr = np.asarray(a, dtype=np.float64)
    n = arr.shape[-1] if arr.ndim else 0
    if arr.ndim < 2 or (merge_queries and arr.shape[-2] != n):
        raise InputError(f"expected a [..., n, n] map to merge, got shape {arr.shape}")
    if len(word_ids) != n:
        raise InputError(f"word ids cover {len(word_ids)} tokens but the map has {n}")
    groups, units = word_groups(word_ids)
    P = np.zeros((n, units))
    P[np.arange(n), groups] = 1.0
    merged = arr @ P
    if merge_queries:
        Q = P / P.sum(axis=0, keepdims=True)
        merged = np.swapaxes(np.swapaxes(merged, -1, -2) @ Q, -1, -2)
    return merged
