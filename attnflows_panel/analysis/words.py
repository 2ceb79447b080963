"""Word-level records: the word pieces of each word merged into one unit, attention merged to match."""

from __future__ import annotations

import dataclasses

import numpy as np

from attnflows_panel.analysis.flows import word_groups
from attnflows_panel.analysis.source import WordAttention
from attnflows_panel.extract import AttentionRecord


def word_level(record: AttentionRecord) -> AttentionRecord:
    """``record`` with one unit per word: pieces joined (``un ##bel ##ie ##va ##bly`` is ``unbelievably``), attention
    summed over a word's keys and averaged over its queries (rows still sum to 1), special tokens kept alone."""
    groups, units = word_groups(record.word_ids.tolist())
    first = np.full(units, len(groups))
    np.minimum.at(first, groups, np.arange(len(groups)))
    words = [""] * units
    for token, unit in zip(record.tokens, groups.tolist(), strict=True):
        piece = token[2:] if token.startswith("##") else token.lstrip("Ġ▁")
        words[unit] += piece if words[unit] else (piece or token)
    special = record.word_ids[first] < 0
    return dataclasses.replace(
        record,
        tokens=words,
        input_ids=record.input_ids[first],
        word_ids=np.where(special, -1, np.arange(units)),
        segment_ids=record.segment_ids[first],
        cls_mask=np.bincount(groups, weights=record.cls_mask, minlength=units) > 0,
        sep_mask=np.bincount(groups, weights=record.sep_mask, minlength=units) > 0,
        source=WordAttention(record.source, groups, units),
    )
