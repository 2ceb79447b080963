"""The real offline default: fine-tune on a few hundred bundled examples, then compare the pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.analysis.compare import head_js_divergence
from attnflows_panel.corpus import heldout_sentiment_corpus
from attnflows_panel.extract import extract_pair
from attnflows_panel.models.finetune import FinetuneConfig, finetune
from attnflows_panel.store import extract_corpus

from conftest import SMALL_FINETUNE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_finetune_runs_end_to_end(small_finetune) -> None:
    m = small_finetune.metrics
    assert (m["n_train"], m["n_heldout"], m["steps"]) == (320, 200, 20)
    assert m["labels"] == ["negative", "positive"] and m["task"] == "sentiment"
    assert m["heldout_accuracy"] > m["majority_baseline"]
    assert Path(small_finetune.path, "model.safetensors").is_file()
    again = finetune(FinetuneConfig(**SMALL_FINETUNE), progress=False)
    assert again.reused and again.path == small_finetune.path


def test_pair_extraction(real_pair) -> None:
    pre, fine = extract_pair(real_pair, "I would never trust a car that drives itself.", "Would you?")
    np.testing.assert_array_equal(pre.input_ids, fine.input_ids)
    for record in (pre, fine):
        assert record.attention.shape == (6, 12, record.n_tokens, record.n_tokens)
        np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)
    assert fine.predicted_label in {"negative", "positive"}
    assert pre.predicted_label is None
    # fine-tuning moved the attention, but the pair still shares its tokenization
    assert np.abs(pre.attention - fine.attention).max() > 1e-3


def test_corpus_run_on_the_real_pair(real_pair, tmp_path: Path) -> None:
    corpus = heldout_sentiment_corpus().subset(range(40))
    models = {"pretrained": real_pair.pretrained, "finetuned": real_pair.finetuned}
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=16, progress=False)
    stats = store.head_stats()
    assert len(stats) == 40 * 2 * 72
    assert np.isfinite(stats[["entropy", "max_weight", "attn_cls", "attn_sep"]].to_numpy()).all()
    pre, fine = extract_pair(real_pair, corpus.texts[7])
    for name, record in (("pretrained", pre), ("finetuned", fine)):
        rebuilt, strong = store.attention(7, name), record.attention >= store.tau_min
        np.testing.assert_allclose(rebuilt[strong], record.attention[strong], rtol=1e-3)  # float16 entries
        assert (rebuilt[~strong] < store.tau_min).all()
    differences = store.differences().query("sentence_id == 7").sort_values(["layer", "head"])
    np.testing.assert_allclose(differences["js"], head_js_divergence(pre.attention, fine.attention).ravel(), rtol=1e-3, atol=1e-6)
