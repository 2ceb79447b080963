"""Everything the default dashboard needs: the model pair, the held-out corpus run and its head map, and the export's page templates (each cached)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.models.pair import ModelPair
from attnflows_panel.paths import home
from attnflows_panel.store import RunStore


def default_run_dir() -> Path:
    """Where the default pair's run over the held-out sentiment sentences lives."""
    return home() / "runs" / "sentiment-heldout"


@dataclass(frozen=True)
class Prepared:
    """The default pair, its corpus run, the head map of that run and its sentence table."""

    pair: ModelPair
    store: RunStore
    head_map: HeadEmbedding
    corpus: pd.DataFrame  # one row per sentence: text, label, both predictions, model difference (see corpus_table)


def prepare_default(*, progress: bool = True, report: Callable[[str], None] = lambda _: None) -> Prepared:
    """Fine-tune, extract the held-out corpus, place the heads and compare the sentences (each once); ``report`` names each stage."""
    from attnflows_panel.analysis.corpus_table import corpus_table
    from attnflows_panel.corpus import heldout_sentiment_corpus
    from attnflows_panel.head_map import run_head_map
    from attnflows_panel.models import default_pair
    from attnflows_panel.store import extract_corpus

    report("Loading the default models (the first run fine-tunes one: a few minutes)…")
    pair = default_pair(progress=progress)
    report("Extracting attention for the held-out sentences (once: about a minute)…")
    store = extract_corpus({"pretrained": pair.pretrained, "finetuned": pair.finetuned}, heldout_sentiment_corpus(), default_run_dir(), progress=progress)
    report("Placing every head by its behaviour over the corpus (once: under a minute)…")
    head_map = run_head_map(store)
    report("Comparing the two models sentence by sentence (once: under a minute)…")
    table = corpus_table(store)
    table.attrs["source"] = str(store.manifest["corpus"]["source"]).removesuffix(" [held-out]")  # the page names where its sentences come from
    return Prepared(pair, store, head_map, table)
