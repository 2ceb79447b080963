"""A cross-session cache of extracted records (data only; never plots or streams), capped in bytes.

Entries never keep a model alive: once no session holds a model, its records leave the cache at the next call.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict

from attnflows_panel.errors import TruncationWarning
from attnflows_panel.extract import AttentionRecord, extract, extract_pair
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import ModelPair

Source = ModelPair | LoadedModel
MAX_BYTES = 256 * 2**20  # attention sources of all models together; the newest entry is kept even when larger

_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[int, str, str | None], tuple[weakref.ref[Source], tuple[AttentionRecord, ...], int]] = OrderedDict()


def _drop_released() -> int:
    """Forget the records of models no one holds any more; the bytes left (call with the lock held)."""
    for key in [key for key, (ref, _, _) in _CACHE.items() if ref() is None]:
        del _CACHE[key]
    return sum(size for _, _, size in _CACHE.values())


def cached_bytes() -> int:
    """The bytes of attention the cache holds now."""
    with _LOCK:
        return _drop_released()


def cached_records(source: Source, text: str, text_pair: str | None = None) -> tuple[AttentionRecord, ...]:
    """The records of one input (pre-trained then fine-tuned for a pair), reused across sessions.

    Truncation is kept in each record's ``n_truncated``.
    """
    key = (id(source), text, text_pair)
    with _LOCK:
        if key in _CACHE and _CACHE[key][0]() is source:
            _CACHE.move_to_end(key)
            return _CACHE[key][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        records = extract_pair(source, text, text_pair) if isinstance(source, ModelPair) else (extract(source, None, text, text_pair),)
    size = sum(record.source.nbytes for record in records)
    with _LOCK:
        _CACHE[key] = (weakref.ref(source), records, size)
        total = _drop_released()
        while total > MAX_BYTES and len(_CACHE) > 1:
            total -= _CACHE.popitem(last=False)[1][2]
    return records
