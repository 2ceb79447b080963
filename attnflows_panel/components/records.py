"""A small cross-session cache of extracted records (data only; never plots or streams)."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

from attnflows_panel.errors import TruncationWarning
from attnflows_panel.extract import AttentionRecord, extract, extract_pair
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import ModelPair

_LOCK = threading.Lock()
# values keep their source alive, so an id in a key is never reused by another model while cached
_CACHE: OrderedDict[tuple[int, str, str | None], tuple[object, tuple[AttentionRecord, ...]]] = OrderedDict()
MAX_ITEMS = 32


def cached_records(source: ModelPair | LoadedModel, text: str, text_pair: str | None = None) -> tuple[AttentionRecord, ...]:
    """The records of one input (pre-trained then fine-tuned for a pair), reused across sessions.

    Truncation is kept in each record's ``n_truncated``.
    """
    key = (id(source), text, text_pair)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        records = extract_pair(source, text, text_pair) if isinstance(source, ModelPair) else (extract(source, None, text, text_pair),)
    with _LOCK:
        _CACHE[key] = (source, records)
        while len(_CACHE) > MAX_ITEMS:
            _CACHE.popitem(last=False)
    return records
