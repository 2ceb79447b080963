"""The run store: tidy statistics, float16 attention, resumable and verified shards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnflows_panel.analysis.heads import basic_head_stats
from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import InputError, StoreError
from attnflows_panel.extract import extract
from attnflows_panel.store import RunStore, extract_corpus

WORDS = "the a car movie good bad awful great i love hate it was very safe and not".split()


def make_corpus(n: int = 21, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(n)]
    return Corpus(texts=texts, source=f"random-{seed}")


@pytest.fixture
def models(tiny_pair):
    return {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}


def test_a_corpus_with_a_row_that_is_not_text_is_refused_before_the_run_directory_is_made(models, tmp_path: Path) -> None:
    corpus = Corpus(texts=["the car was good", "\u200b\u200b"], source="bad.csv")
    with pytest.raises(InputError, match=r"^bad\.csv, sentence 2 "):
        extract_corpus(models, corpus, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_run_contents(models, tmp_path: Path) -> None:
    corpus = make_corpus()
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, max_batch=4, progress=False)
    assert store.complete and store.models == ["pretrained", "finetuned"]
    stats = store.head_stats()
    assert len(stats) == len(corpus) * 2 * 2 * 4
    assert list(stats.columns) == ["sentence_id", "model", "layer", "head", "entropy", "max_weight", "attn_cls", "attn_sep"]
    # tidy parquet directories are readable without attnflows
    assert len(pd.read_parquet(tmp_path / "run" / "stats")) == len(stats)
    tokens = store.tokens()
    assert tokens["sentence_id"].tolist() == list(range(len(corpus)))
    assert set(tokens["predicted_finetuned"]) <= {"negative", "positive"}
    assert store.sentences()["text"].tolist() == corpus.texts

    for sid in (0, 9, 20):
        record = extract(models["finetuned"], None, corpus.texts[sid])
        stored = store.attention(sid, "finetuned")
        assert stored.shape == record.attention.shape
        np.testing.assert_allclose(stored, record.attention, atol=2e-3)  # float16 storage
        expected = basic_head_stats(record.attention, record.cls_mask, record.sep_mask)
        row = stats[(stats.sentence_id == sid) & (stats.model == "finetuned")].sort_values(["layer", "head"])
        np.testing.assert_allclose(row["entropy"], expected["entropy"].ravel(), rtol=1e-5)
        np.testing.assert_allclose(row["attn_sep"], expected["attn_sep"].ravel(), atol=1e-6)
        assert tokens.loc[sid, "tokens"].tolist() == record.tokens

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["models"][0]["checkpoint_sha256"] == models["pretrained"].checkpoint_hash
    assert {"torch", "transformers"} <= set(manifest["versions"])


def test_killed_run_resumes_where_it_stopped(models, tmp_path: Path) -> None:
    corpus = make_corpus(30)
    done: list[int] = []

    def stop_after_two(shard: int) -> None:
        done.append(shard)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=stop_after_two)
    partial = RunStore.open(tmp_path / "run")
    assert not partial.complete and partial.describe().startswith("16 of 30 sentences")
    assert len(partial.head_stats()) == 16 * 2 * 8

    resumed: list[int] = []
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=resumed.append)
    assert resumed == [2, 3]
    assert store.complete and len(store.head_stats()) == 30 * 2 * 8


def test_corrupted_shard_is_detected_then_recomputed(models, tmp_path: Path) -> None:
    corpus = make_corpus(12)
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False)
    expected = store.attention(3, "pretrained")
    shard = tmp_path / "run" / "attention" / "part-00000.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(StoreError, match="part-00000.npz is corrupted"):
        RunStore.open(tmp_path / "run").attention(3, "pretrained")
    recomputed: list[int] = []
    with pytest.warns(UserWarning, match="shard 0 .* corrupted; recomputing"):
        store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=recomputed.append)
    assert recomputed == [0]
    np.testing.assert_array_equal(store.attention(3, "pretrained"), expected)


def test_deleted_stats_file_is_detected(models, tmp_path: Path) -> None:
    store = extract_corpus(models, make_corpus(5), tmp_path / "run", progress=False)
    (tmp_path / "run" / "stats" / "part-00000.parquet").unlink()
    with pytest.raises(StoreError, match="part-00000.parquet is missing"):
        RunStore.open(store.path).head_stats()


def test_stale_run_is_recomputed(models, tmp_path: Path) -> None:
    extract_corpus(models, make_corpus(6, seed=1), tmp_path / "run", progress=False)
    other = make_corpus(4, seed=2)
    with pytest.warns(UserWarning, match="was made from other models, corpus or settings; recomputing"):
        store = extract_corpus(models, other, tmp_path / "run", progress=False)
    assert store.sentences()["text"].tolist() == other.texts
    assert len(store.head_stats()) == 4 * 2 * 8


def test_foreign_directory_is_refused(models, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(InputError, match="not empty and is not an attnflows run"):
        extract_corpus(models, make_corpus(3), tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_corrupted_manifest(models, tmp_path: Path) -> None:
    extract_corpus(models, make_corpus(3), tmp_path / "run", progress=False)
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json is corrupted"):
        RunStore.open(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = extract_corpus(models, make_corpus(3), tmp_path / "run", progress=False)
    assert store.complete


def test_unknown_sentence_and_model(models, tmp_path: Path) -> None:
    store = extract_corpus(models, make_corpus(3), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="unknown model 'other'"):
        store.attention(0, "other")
    with pytest.raises(InputError, match="sentence 7 is not in this run"):
        store.attention(7, "pretrained")


def test_single_model_run(tiny, tmp_path: Path) -> None:
    store = extract_corpus({"model": tiny}, make_corpus(4), tmp_path / "run", progress=False)
    assert store.models == ["model"] and len(store.head_stats()) == 4 * 8


def test_mismatched_models_are_refused(tiny, tmp_path: Path) -> None:
    from conftest import save_tiny

    from attnflows_panel.errors import ModelError
    from attnflows_panel.models import load_encoder

    other = load_encoder(save_tiny(tmp_path / "other", layers=3))
    with pytest.raises(ModelError, match="layers 2 vs 3"):
        extract_corpus({"pretrained": tiny, "finetuned": other}, make_corpus(2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_copy_of_the_same_models_reuses_the_run(models, tiny_dir: Path, tmp_path: Path) -> None:
    """Models are identified by their weights: the same checkpoint loaded from another path reuses every shard."""
    import shutil

    from attnflows_panel.models import load_encoder

    corpus = make_corpus(6)
    extract_corpus(models, corpus, tmp_path / "run", shard_size=4, progress=False)
    copy = load_encoder(shutil.copytree(tiny_dir, tmp_path / "elsewhere" / "model"))
    assert copy.model_id != models["pretrained"].model_id
    recomputed: list[int] = []
    store = extract_corpus({**models, "pretrained": copy}, corpus, tmp_path / "run", shard_size=4, progress=False, on_shard=recomputed.append)
    assert recomputed == [] and store.complete
