"""Attention ``[L, H, n, n]`` read in blocks: from a dense array, or computed on demand from queries and keys.

Consumers ask for the rows (queries) or columns (keys) of some heads of one layer, or walk a layer
in row chunks; :class:`QueryKeyAttention` computes only those (or, in torch, their logs: what head
measures read), so an input of n tokens holds ``O(L * H * n * d)`` numbers instead of ``L * H * n * n``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
CHUNK_BYTES = 64 * 2**20  # largest float32 block a row walk computes at once
MAP_BLOCK_BYTES = 8 * 2**20  # float32 weights a thread computes at once for QueryKeyAttention.mean_map
# An additive mask at or below this hides a key (transformers masks with the dtype's minimum): beside any key a
# query sees, its weight is exactly 0 in float32.
HIDDEN = -1e30


class AttentionSource(ABC):
    """Row-stochastic attention of one input, ``shape == (L, H, n, n)``, read one layer at a time."""

    shape: tuple[int, int, int, int]

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def n_heads(self) -> int:
        return self.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.shape[2]

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes this source holds."""

    @property
    def weight_bytes(self) -> int:
        """Bytes of all its weights as float32, held or computed."""
        return 4 * int(np.prod(self.shape))

    @abstractmethod
    def rows(self, layer: int, heads: Sequence[int] | np.ndarray | None = None, queries: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[len(heads), len(queries), n]``: what the given queries of ``heads`` (default all) of ``layer`` attend to."""

    def layer(self, layer: int, heads: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[len(heads), n, n]``: every row of ``heads`` of ``layer``."""
        return self.rows(layer, heads)

    def head(self, layer: int, head: int) -> np.ndarray:
        """``[n, n]``: one head's matrix."""
        return self.rows(layer, [head])[0]

    def mean_map(self, head_mask: np.ndarray) -> np.ndarray:
        """``[n, n]`` float32: the mean map of the heads ``head_mask[L, H]`` selects (zeros when none is)."""
        return (self._map_sum(head_mask) / max(1, int(np.count_nonzero(head_mask)))).astype(np.float32)

    def _map_sum(self, head_mask: np.ndarray) -> np.ndarray:
        """``[n, n]`` float64: the sum of the maps of the selected heads, read in row chunks."""
        n = self.n_tokens
        total = np.zeros((n, n), dtype=np.float64)
        for layer in range(self.n_layers):
            heads = np.flatnonzero(head_mask[layer])
            if heads.size:
                for queries, block in self.row_chunks(layer, heads):
                    total[queries] += block.sum(axis=0, dtype=np.float64)
        return total

    def row_chunks(self, layer: int, heads: Sequence[int] | np.ndarray | None = None, chunk_bytes: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """``(queries, block)`` pairs covering every row of ``heads`` of ``layer``, each block under ``chunk_bytes`` (default :data:`CHUNK_BYTES`)."""
        n = self.n_tokens
        h = self.n_heads if heads is None else len(heads)
        step = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, h * n * 4))
        for start in range(0, n, step):
            queries = slice(start, min(n, start + step))
            yield queries, self.rows(layer, heads, np.arange(queries.start, queries.stop))

    def columns(self, layer: int, heads: Sequence[int] | np.ndarray | None = None, keys: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[len(heads), n, len(keys)]``: the attention every query of ``layer`` pays to ``keys``."""
        keys = np.arange(self.n_tokens) if keys is None else np.asarray(keys)
        return np.concatenate([block[:, :, keys] for _, block in self.row_chunks(layer, heads)], axis=1)

    def dense(self) -> np.ndarray:
        """The whole ``[L, H, n, n]`` array (for inputs small enough to hold it)."""
        return np.stack([self.layer(layer) for layer in range(self.n_layers)])


class DenseAttention(AttentionSource):
    """A source over an array already in memory (validated by the caller)."""

    def __init__(self, attention: np.ndarray) -> None:
        self.attention = attention
        self.shape = tuple(attention.shape)  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        return int(self.attention.nbytes)

    def rows(self, layer: int, heads: Any = None, queries: Any = None) -> np.ndarray:
        heads = np.arange(self.n_heads) if heads is None else np.asarray(heads, dtype=np.int64)
        if queries is None:
            return self.attention[layer] if heads.size == self.n_heads and (heads == np.arange(self.n_heads)).all() else self.attention[layer][heads]
        return self.attention[layer][np.ix_(heads, np.asarray(queries, dtype=np.int64))]

    def columns(self, layer: int, heads: Any = None, keys: Any = None) -> np.ndarray:
        block = self.rows(layer, heads)
        return block if keys is None else block[:, :, np.asarray(keys, dtype=np.int64)]

    def dense(self) -> np.ndarray:
        return self.attention


class QueryKeyAttention(AttentionSource):
    """Attention computed when read: ``softmax(softcap(q k^T * scaling) + mask)`` per layer, as the eager code does.

    ``queries[l]`` is ``[H, n, d]``, ``keys[l]`` ``[H_kv, n, d]`` (query head h reads key head
    ``h // (H / H_kv)``), ``masks[l]`` an additive ``[n, n]`` float mask or None; layers may share a mask.
    Nothing computed is kept: a source holds ``O(L * H * n * d)`` numbers, and each read costs its block's products.
    """

    def __init__(
        self,
        queries: Sequence[np.ndarray],
        keys: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None],
        scalings: Sequence[float],
        softcaps: Sequence[float | None],
    ) -> None:
        if not queries or not len(queries) == len(keys) == len(masks) == len(scalings) == len(softcaps):
            raise ValueError("queries, keys, masks, scalings and softcaps need one entry per layer")
        H, n, _ = queries[0].shape
        if any(q.shape[:2] != (H, n) for q in queries) or any(k.shape[1] != n or H % k.shape[0] for k in keys):
            raise ValueError("every layer needs [H, n, d] queries and [H_kv, n, d] keys with H a multiple of H_kv")
        self.queries, self.keys, self.masks = list(queries), list(keys), list(masks)
        self.scalings, self.softcaps = [float(s) for s in scalings], list(softcaps)
        self.shape = (len(queries), H, n, n)

    @property
    def nbytes(self) -> int:
        """The queries, keys and masks held (a mask shared by layers once)."""
        arrays = {(a.__array_interface__["data"][0], a.nbytes): a for a in (*self.queries, *self.keys, *self.masks) if a is not None}
        return int(sum(a.nbytes for a in arrays.values()))

    def rows(self, layer: int, heads: Any = None, queries: Any = None) -> np.ndarray:
        """As :meth:`AttentionSource.rows`, computed in torch (its threads stay busy where a loaded machine stalls numpy's BLAS)."""
        import torch

        H, n = self.n_heads, self.n_tokens
        heads = np.arange(H) if heads is None else np.asarray(heads, dtype=np.int64)
        rows = slice(None) if queries is None else np.asarray(queries, dtype=np.int64)
        q = torch.from_numpy(self.queries[layer][heads][:, rows])  # [h, r, d]
        k = torch.from_numpy(self.keys[layer][heads // (H // self.keys[layer].shape[0])])  # [h, n, d]
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(self.scalings[layer])
        softcap = self.softcaps[layer]
        if softcap is not None:
            scores.div_(softcap).tanh_().mul_(softcap)
        mask = self.masks[layer]
        if mask is not None:
            scores += torch.from_numpy(mask[rows])
        return torch.softmax(scores, -1).numpy().reshape(len(heads), -1, n)  # exp_ after a max shift is ~4x slower on masked keys

    def _map_sum(self, head_mask: np.ndarray) -> np.ndarray:
        """As :meth:`AttentionSource._map_sum`; a layer with a quarter of its heads selected or more is computed in torch
        from :meth:`log_weights` (a layer per thread), the others in row chunks of their heads only."""
        import torch

        H, n = self.n_heads, self.n_tokens
        many = [layer for layer in range(self.n_layers) if 4 * np.count_nonzero(head_mask[layer]) >= H]
        few = np.array(head_mask, dtype=bool)
        few[many] = False
        total = super()._map_sum(few)
        lock = threading.Lock()

        def add(layer: int) -> None:
            heads = torch.from_numpy(np.flatnonzero(head_mask[layer]))
            step = max(1, MAP_BLOCK_BYTES // (H * n * 4))
            for start in range(0, n, step):
                keys, x = self.log_weights(layer, slice(start, min(n, start + step)))
                e = torch.exp(x[heads])
                part = (e / e.sum(-1, keepdim=True)).sum(0).numpy()
                with lock:
                    total[start : start + part.shape[0], keys] += part

        map_layers(add, many, MAP_BLOCK_BYTES, "attnflows-maps")
        return total

    def log_weights(self, layer: int, queries: slice) -> tuple[slice, torch.Tensor]:
        """``(keys, x)``: ``x[H, queries, keys]`` (float32, torch) is the log of each weight :meth:`rows` gives, less its row's largest.

        ``keys`` leaves out the keys no query of the slice sees (their weights are exactly 0); -inf in the mask
        becomes the float32 minimum (its exp is 0 all the same), so ``x * exp(x)`` is finite wherever the row is.
        """
        import torch

        keys, mask = slice(0, self.n_tokens), self.masks[layer]
        if mask is not None:
            mask = mask[queries]
            seen = mask > HIDDEN
            if seen.any(axis=1).all():
                columns = np.flatnonzero(seen.any(axis=0))
                keys = slice(int(columns[0]), int(columns[-1]) + 1)
        q = torch.from_numpy(self.queries[layer][:, queries]) * self.scalings[layer]  # [H, r, d]
        k = torch.from_numpy(self.keys[layer][:, keys])  # [H_kv, m, d]; query head h reads key head h // (H / H_kv)
        H, r, d = q.shape
        x = torch.bmm(q.reshape(k.shape[0], -1, d), k.transpose(1, 2)).view(H, r, -1)
        softcap = self.softcaps[layer]
        if softcap is not None:
            x.div_(softcap).tanh_().mul_(softcap)
        if mask is not None:
            mask = mask[:, keys]
            columns = np.flatnonzero(mask.any(axis=0))  # the mask is added only where it is not 0
            if columns.size:
                added = slice(int(columns[0]), int(columns[-1]) + 1)
                x[..., added] += torch.from_numpy(mask[:, added])
        x -= x.amax(-1, keepdim=True)
        if mask is not None and np.isneginf(mask).any():
            x.clamp_(min=torch.finfo(x.dtype).min)  # x * exp(x) is then 0 there, not NaN
        return keys, x


def one_torch_thread() -> None:
    """Hold this thread's torch ops to one OpenMP thread: threads of a pool then share the cores without waiting on one another."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.get_num_threads()  # torch sets a thread's OpenMP threads where it first runs: before the limit, which then holds
    threadpool_limits(1, "openmp")


def map_layers(work: Callable[[int], T], layers: Sequence[int], block_bytes: int, name: str, total_bytes: int | None = None) -> list[T]:
    """``[work(layer) for layer in layers]``, a layer per thread: at most one thread per layer and per torch thread,
    each held to one OpenMP thread, and few enough that their blocks (about two of ``block_bytes`` each) stay under :data:`CHUNK_BYTES`.

    Work over ``total_bytes`` of at most one block runs in this thread: starting a pool costs more (a 32-token sentence's head measures: 13 ms -> 2 ms).
    """
    if total_bytes is not None and total_bytes <= block_bytes:
        return [work(layer) for layer in layers]
    import torch

    threads = max(1, min(len(layers), torch.get_num_threads(), CHUNK_BYTES // (2 * block_bytes)))
    with ThreadPoolExecutor(threads, name, initializer=one_torch_thread) as pool:
        return list(pool.map(work, layers))


class WordAttention(AttentionSource):
    """Word-level attention over another source: summed over a word's keys, averaged over its queries (rows still sum to 1).

    ``groups[i]`` is the word (unit) of token i, ``units`` the number of words.
    """

    def __init__(self, tokens: AttentionSource, groups: np.ndarray, units: int) -> None:
        self.tokens, self.groups = tokens, np.asarray(groups, dtype=np.int64)
        L, H, n, _ = tokens.shape
        self.shape = (L, H, units, units)
        self._sizes = np.bincount(self.groups, minlength=units).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + int(self.groups.nbytes + self._sizes.nbytes)

    def rows(self, layer: int, heads: Any = None, queries: Any = None) -> np.ndarray:
        import torch

        units = np.arange(self.n_tokens) if queries is None else np.asarray(queries, dtype=np.int64)
        asked, back = np.unique(units, return_inverse=True)
        members = np.flatnonzero(np.isin(self.groups, asked))  # the tokens of the words asked for
        block = torch.from_numpy(self.tokens.rows(layer, heads, members))  # [h, tokens, n]
        words = block.new_zeros((block.shape[0], members.size, self.n_tokens)).index_add_(2, torch.from_numpy(self.groups), block)
        slots = torch.from_numpy(np.searchsorted(asked, self.groups[members]))  # each member's word among those asked
        # summed along the first axis: index_add_ along a middle one is up to 20x slower
        sums = words.new_zeros((asked.size, *words.shape[::2])).index_add_(0, slots, words.transpose(0, 1).contiguous())
        sums /= torch.from_numpy(self._sizes[asked])[:, None, None]
        return sums.numpy().transpose(1, 0, 2)[:, back]
