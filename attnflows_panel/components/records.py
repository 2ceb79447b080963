"""A small cross-session cache of extracted records (data only; never plots or streams)."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

from attnflows_panel.errors import TruncationWarning
from attnflows_panel.extract import AttentionRecord, extract_pair
from attnflows_panel.models.pair import ModelPair

_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[int, str, str | None], tuple[AttentionRecord, AttentionRecord]] = OrderedDict()
MAX_ITEMS = 32


def pair_records(pair: ModelPair, text: str, text_pair: str | None = None) -> tuple[AttentionRecord, AttentionRecord]:
    """Both models' records for one input, reused across sessions (truncation is kept in ``n_truncated``)."""
    key = (id(pair), text, text_pair)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        records = extract_pair(pair, text, text_pair)
    with _LOCK:
        _CACHE[key] = records
        while len(_CACHE) > MAX_ITEMS:
            _CACHE.popitem(last=False)
    return records
