"""The cross-session record cache: capped in bytes, and never the reason a model stays in memory."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from attnflows_panel.components import records
from attnflows_panel.models import load_encoder


def test_a_model_no_session_holds_is_released_with_its_records(tiny_dir: Path) -> None:
    lm = load_encoder(tiny_dir)
    before = records.cached_bytes()
    first = records.cached_records(lm, "a short sentence")
    assert records.cached_records(lm, "a short sentence") is first  # reused while the model lives
    assert records.cached_bytes() == before + first[0].attention.nbytes
    alive = weakref.ref(lm)
    del lm, first
    gc.collect()
    assert alive() is None
    assert records.cached_bytes() == before


def test_the_cache_keeps_within_its_byte_cap(tiny_dir: Path, monkeypatch) -> None:
    lm = load_encoder(tiny_dir)
    one = records.cached_records(lm, "one two three")[0].attention.nbytes
    monkeypatch.setattr(records, "MAX_BYTES", records.cached_bytes() + 2 * one)
    texts = [f"one two {word}" for word in ("four", "five", "six", "seven")]
    for text in texts:
        records.cached_records(lm, text)
    assert records.cached_bytes() <= records.MAX_BYTES
    assert records.cached_records(lm, texts[-1]) is records.cached_records(lm, texts[-1])
