"""One pass over a layer's attention rows (numba): head statistics, the difference of two models, sparse entries.

What a corpus run keeps of a batch, read in one sweep over both models' rows instead of a pass per measure.
Logarithms come from torch beforehand (vectorised); the kernel sums, compares and gathers.
"""

from __future__ import annotations

import math

import numba
import numpy as np

MEASURES = ("entropy", "max_weight", "attn_cls", "attn_sep", "squares")  # the per-row sums of :func:`layer_rows`, in order
LN2 = math.log(2.0)


@numba.njit(inline="always", fastmath=True)
def _row_sums(x, x_log, y, m_log, base, n, positions, which):  # pragma: no cover  (compiled)
    """The row at ``x[base : base + n]``'s :data:`MEASURES` (entropy, largest weight, weights on [CLS] / [SEP], sum of
    squares) and, with its pair's row ``y`` (``m_log`` the log of ``x + y``; None for none), ``-sum (x + y) log (x + y)``
    and the dot product, in one sweep (numba compiles the ``y is None`` branches away)."""
    entropy = np.float32(0.0)  # float32 sums within a row, as torch's: what lets the loop run on vector registers
    largest = np.float32(0.0)
    squares = np.float32(0.0)
    mixed = np.float32(0.0)
    dot = np.float32(0.0)
    for k in range(base, base + n):
        entropy -= x[k] * x_log[k]
        largest = max(largest, x[k])
        squares += x[k] * x[k]
        if y is not None:
            mixed -= (x[k] + y[k]) * m_log[k]
            dot += x[k] * y[k]
    to_cls = 0.0
    to_sep = 0.0
    for p in range(positions.size):
        to_cls += x[base + positions[p]] * which[p, 0]
        to_sep += x[base + positions[p]] * which[p, 1]
    return (entropy, largest, to_cls, to_sep, squares), mixed, dot


@numba.njit(inline="always")
def _row_entries(x, base, n, tau, keys, weights, found):  # pragma: no cover  (compiled)
    """Append the keys and weights of at least ``tau`` of the row at ``x[base : base + n]``; the new count.

    Every weight is written and only those kept advance the count: no branch to mispredict.
    """
    if found + n > weights.size:
        raise ValueError("more entries of at least tau than rows of weights summing to 1 can hold")
    for k in range(n):
        keys[found] = k
        weights[found] = x[base + k]
        found += x[base + k] >= tau
    return found


@numba.njit(inline="always")
def _added(total, row):  # pragma: no cover  (compiled)
    return (total[0] + row[0], total[1] + row[1], total[2] + row[2], total[3] + row[3], total[4] + row[4])


@numba.njit(cache=True, nogil=True, fastmath=True)
def _layer_rows(a, a_log, b, b_log, m_log, shape, pair, layer, lengths, positions, which, tau, sums, differences, keys, weights, counts, found):  # pragma: no cover
    B, H, W = shape
    found_a, found_b = found[0], found[-1]  # counts kept in registers: the entries written can't be taken for them
    r = 0
    for i in range(B):
        n = lengths[i]  # keys past an input's end weigh 0: only its own are read
        at, kind = positions[i], which[i]
        for h in range(H):
            head_a = head_b = (0.0, 0.0, 0.0, 0.0, 0.0)
            js = 0.0
            dot = 0.0
            for q in range(n):
                base = ((i * H + h) * W + q) * W
                row_a, _, _ = _row_sums(a, a_log, None, None, base, n, at, kind)
                head_a = _added(head_a, row_a)
                before = found_a
                found_a = _row_entries(a, base, n, tau, keys[0], weights[0], before)
                counts[0, r] = found_a - before
                if pair:
                    row_b, mixed, row_dot = _row_sums(b, b_log, a, m_log, base, n, at, kind)
                    head_b = _added(head_b, row_b)
                    before = found_b
                    found_b = _row_entries(b, base, n, tau, keys[1], weights[1], before)
                    counts[1, r] = found_b - before
                    bits = (0.5 * mixed + LN2 - 0.5 * (row_a[0] + row_b[0])) / LN2  # rows sum to 1: H((a + b) / 2) = H(a + b) / 2 + ln 2
                    js += min(1.0, max(0.0, bits))
                    dot += row_dot
                r += 1
            for k in range(len(head_a)):
                sums[0, i, layer, h, k] += head_a[k]
                if pair:
                    sums[1, i, layer, h, k] += head_b[k]
            if pair:
                differences[0, i, layer, h] += js
                differences[1, i, layer, h] += dot
    found[0] = found_a
    found[-1] = found_b if pair else found_a


def real_rows(lengths: np.ndarray, n_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch row, head, query) int16 of every query row that is not padding, in the order :func:`layer_rows` reads them."""
    per_input = lengths * n_heads
    row = np.repeat(np.arange(lengths.size), per_input)
    within = np.arange(per_input.sum()) - np.repeat(np.cumsum(per_input) - per_input, per_input)
    n = lengths[row]
    return row.astype(np.int16), (within // n).astype(np.int16), (within % n).astype(np.int16)


def layer_rows(
    a: np.ndarray, a_log: np.ndarray, b: np.ndarray | None, b_log: np.ndarray | None, m_log: np.ndarray | None,
    layer: int, lengths: np.ndarray, positions: np.ndarray, which: np.ndarray, tau: float,
    sums: np.ndarray, differences: np.ndarray | None, rows: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> list[tuple[np.ndarray, ...]]:
    """Add layer ``layer``'s per-head sums over each input's real queries (``lengths``) to ``sums`` ``[M, B, L, H, 5]``
    (:data:`MEASURES`) and, for a pair ``b``, ``differences`` ``[2, B, L, H]`` (JS bits, dot product); each model's
    entries of at least ``tau``: (batch row, head, query, key) int16 and float32 weights.

    ``a``, ``b``: ``[B, H, w, w]`` float32 weights, ``*_log`` their logs (0 clamped to a tiny weight), ``m_log`` the
    log of ``a + b``; ``positions`` ``[B, P]`` the [CLS] / [SEP] keys of each input, ``which`` ``[B, P, 2]`` which
    is which (a padding position weighs 0 in both); ``rows``: :func:`real_rows` of the batch.
    """
    pair = b is not None
    B, H, w, _ = a.shape
    models = 2 if pair else 1
    capacity = int(lengths[rows[0]].sum())  # each real row writes its keys before keeping or dropping them
    keys = np.empty((models, capacity), np.int16)
    weights = np.empty((models, capacity), np.float32)
    counts = np.empty((models, rows[0].size), np.int64)
    found = np.zeros(models, np.int64)
    flat = [x.reshape(-1) for x in ((a, a_log, b, b_log, m_log) if pair else (a, a_log, a, a_log, a_log))]
    spare = np.zeros((2, 0, 0, 0)) if differences is None else differences
    _layer_rows(*flat, (B, H, w), pair, layer, lengths, positions, which, np.float32(tau), sums, spare, keys, weights, counts, found)
    return [(*(np.repeat(r, counts[m]) for r in rows), keys[m, : found[m]].copy(), weights[m, : found[m]].copy()) for m in range(models)]
