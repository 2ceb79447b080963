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
def _row_sums(x, x_log, base, width, which, positions, out):  # pragma: no cover  (compiled)
    """Add the row at ``x[base : base + width]``'s entropy, largest weight, weights on [CLS] / [SEP] and sum of squares to ``out``; its entropy."""
    entropy = np.float32(0.0)  # float32 sums within a row, as torch's: what lets the loop run on vector registers
    largest = np.float32(0.0)
    squares = np.float32(0.0)
    for k in range(base, base + width):
        entropy -= x[k] * x_log[k]
        largest = max(largest, x[k])
        squares += x[k] * x[k]
    to_cls = 0.0
    to_sep = 0.0
    for p in range(positions.size):
        to_cls += x[base + positions[p]] * which[p, 0]
        to_sep += x[base + positions[p]] * which[p, 1]
    out[0] += entropy
    out[1] += largest
    out[2] += to_cls
    out[3] += to_sep
    out[4] += squares
    return entropy


@numba.njit(inline="always")
def _row_entries(x, base, width, tau, keys, weights, found):  # pragma: no cover  (compiled)
    """Append the keys and weights of at least ``tau`` of the row at ``x[base : base + width]``; the new count.

    Every weight is written and only those kept advance the count: no branch to mispredict.
    """
    if found + width > weights.size:
        raise ValueError("more entries of at least tau than rows of weights summing to 1 can hold")
    for k in range(width):
        keys[found] = k
        weights[found] = x[base + k]
        found += x[base + k] >= tau
    return found


@numba.njit(cache=True, nogil=True, fastmath=True)
def _layer_rows(a, a_log, b, b_log, m_log, shape, pair, layer, lengths, positions, which, tau, sums, differences, keys, weights, counts, found):  # pragma: no cover
    B, H, W = shape
    r = 0
    for i in range(B):
        for h in range(H):
            for q in range(lengths[i]):
                base = ((i * H + h) * W + q) * W
                entropy_a = _row_sums(a, a_log, base, W, which[i], positions[i], sums[0, i, layer, h])
                before = found[0]
                found[0] = _row_entries(a, base, W, tau, keys[0], weights[0], before)
                counts[0, r] = found[0] - before
                if pair:
                    entropy_b = _row_sums(b, b_log, base, W, which[i], positions[i], sums[1, i, layer, h])
                    before = found[1]
                    found[1] = _row_entries(b, base, W, tau, keys[1], weights[1], before)
                    counts[1, r] = found[1] - before
                    mixed = np.float32(0.0)
                    dot = np.float32(0.0)
                    for k in range(base, base + W):
                        mixed -= (a[k] + b[k]) * m_log[k]
                        dot += a[k] * b[k]
                    js = (0.5 * mixed + LN2 - 0.5 * (entropy_a + entropy_b)) / LN2  # rows sum to 1: H((a + b) / 2) = H(a + b) / 2 + ln 2
                    differences[0, i, layer, h] += min(1.0, max(0.0, js))
                    differences[1, i, layer, h] += dot
                r += 1


def real_rows(lengths: np.ndarray, n_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch row, head, query) of every query row that is not padding, in the order :func:`layer_rows` reads them."""
    per_input = lengths * n_heads
    row = np.repeat(np.arange(lengths.size), per_input)
    within = np.arange(per_input.sum()) - np.repeat(np.cumsum(per_input) - per_input, per_input)
    n = lengths[row]
    return row, within // n, within % n


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
    capacity = rows[0].size * w  # a weight is written before it is kept or dropped
    keys = np.empty((models, capacity), np.int16)
    weights = np.empty((models, capacity), np.float32)
    counts = np.empty((models, rows[0].size), np.int64)
    found = np.zeros(models, np.int64)
    flat = [x.reshape(-1) for x in ((a, a_log, b, b_log, m_log) if pair else (a, a_log, a, a_log, a_log))]
    spare = np.zeros((2, 0, 0, 0)) if differences is None else differences
    _layer_rows(*flat, (B, H, w), pair, layer, lengths, positions, which, np.float32(tau), sums, spare, keys, weights, counts, found)
    return [(*(np.repeat(r, counts[m]).astype(np.int16) for r in rows), keys[m, : found[m]].copy(), weights[m, : found[m]].copy()) for m in range(models)]
