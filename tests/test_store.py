"""The run store: tidy statistics, sparse float16 attention, model differences, resumable and verified shards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import stop_after

from attnflows_panel import shard
from attnflows_panel.analysis.embedding import head_feature_matrix
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


@pytest.mark.parametrize("window", [512, 16, 8])  # one window of every shard; of two shards; of one (the default)
def test_run_contents(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    monkeypatch.setattr(shard, "WINDOW_SENTENCES", window)
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

    differences = store.differences()
    assert len(differences) == len(corpus) * 2 * 4 and list(differences.columns) == ["sentence_id", "layer", "head", "js", "cosine"]
    for sid in (0, 9, 20):
        record = extract(models["finetuned"], None, corpus.texts[sid])
        entries = store.entries(sid, "finetuned")
        kept = np.nonzero(record.attention >= store.tau_min)
        np.testing.assert_array_equal(entries[["layer", "head", "query", "key"]].to_numpy(), np.stack(kept, 1))
        np.testing.assert_allclose(entries["weight"].astype(float), record.attention[kept], rtol=1e-3)  # float16
        rebuilt = store.attention(sid, "finetuned")
        assert rebuilt.shape == record.attention.shape
        np.testing.assert_allclose(rebuilt.sum(-1), 1.0, atol=1e-3)
        strong = record.attention >= store.tau_min
        np.testing.assert_allclose(rebuilt[strong], record.attention[strong], rtol=1e-3)
        assert (rebuilt[~strong] < store.tau_min).all()
        expected = basic_head_stats(record.attention, record.cls_mask, record.sep_mask)
        row = stats[(stats.sentence_id == sid) & (stats.model == "finetuned")].sort_values(["layer", "head"])
        np.testing.assert_allclose(row["entropy"], expected["entropy"].ravel(), rtol=1e-5)
        np.testing.assert_allclose(row["attn_sep"], expected["attn_sep"].ravel(), atol=1e-6)
        assert tokens.loc[sid, "tokens"].tolist() == record.tokens
        shown = store.record(sid, "finetuned")
        assert shown.tokens == record.tokens and shown.predicted_label == record.predicted_label and shown.text == corpus.texts[sid]
        np.testing.assert_array_equal(shown.cls_mask, record.cls_mask)

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["models"][0]["checkpoint_sha256"] == models["pretrained"].checkpoint_hash
    assert {"torch", "transformers"} <= set(manifest["versions"])


def test_killed_run_resumes_where_it_stopped(models, tmp_path: Path) -> None:
    corpus = make_corpus(30)
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=stop_after(2, done))
    partial = RunStore.open(tmp_path / "run")
    assert not partial.complete and partial.describe().startswith("16 of 30 sentences")
    assert len(partial.head_stats()) == 16 * 2 * 8

    resumed: list[int] = []
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=resumed.append)
    assert resumed == [2, 3]
    assert store.complete and len(store.head_stats()) == 30 * 2 * 8


def test_a_run_stopped_inside_a_window_resumes_to_the_store_of_a_run_never_stopped(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard, "WINDOW_SENTENCES", 16)  # shards 0-1 and 2-3 are batched together
    corpus = make_corpus(30)
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus, tmp_path / "run", shard_size=8, max_batch=4, progress=False, on_shard=stop_after(1, []))
    resumed: list[int] = []
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, max_batch=4, progress=False, on_shard=resumed.append)
    assert resumed == [1, 2, 3]  # shard 1 batched with shard 0 again, as before, so its numbers are the same
    whole = extract_corpus(models, corpus, tmp_path / "whole", shard_size=8, max_batch=4, progress=False)
    for part in ("head_stats", "differences", "tokens"):
        pd.testing.assert_frame_equal(getattr(store, part)(), getattr(whole, part)())
    for sid in range(len(corpus)):
        pd.testing.assert_frame_equal(store.entries(sid, "finetuned"), whole.entries(sid, "finetuned"))


def test_corrupted_shard_is_detected_then_recomputed(models, tmp_path: Path) -> None:
    corpus = make_corpus(12)
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False)
    expected = store.attention(3, "pretrained")
    shard = tmp_path / "run" / "entries" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(StoreError, match="part-00000.parquet is corrupted"):
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
    with pytest.warns(UserWarning, match=r"run holds a run of another corpus and other settings \(head_map_sentences 6, now 4\); recomputing it"):
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


def test_resume_trusts_unchanged_files_and_verify_rehashes_them(models, tmp_path: Path) -> None:
    import os

    corpus = make_corpus(12)
    extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False)
    shard = tmp_path / "run" / "stats" / "part-00001.parquet"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # bit rot: same size, same time
    recomputed: list[int] = []
    extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=recomputed.append)
    assert recomputed == []  # sizes and times as recorded: nothing re-hashed
    with pytest.raises(StoreError, match="part-00001.parquet is corrupted"):
        RunStore.open(tmp_path / "run").head_stats()
    with pytest.warns(UserWarning, match="shard 1 .* corrupted; recomputing"):
        store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=recomputed.append, verify=True)
    assert recomputed == [1] and len(store.head_stats()) == 12 * 2 * 8


def test_a_shard_without_its_record_is_recomputed(models, tmp_path: Path) -> None:
    corpus = make_corpus(12)
    extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False)
    (tmp_path / "run" / "shards" / "part-00001.json").unlink()  # killed after its files, before its commit
    assert RunStore.open(tmp_path / "run").describe().startswith("8 of 12 sentences")
    recomputed: list[int] = []
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, on_shard=recomputed.append)
    assert recomputed == [1] and store.complete


def test_a_run_of_the_dense_format_is_remade(models, tmp_path: Path) -> None:
    (tmp_path / "run" / "attention").mkdir(parents=True)
    (tmp_path / "run" / "attention" / "part-00000.npz").write_bytes(b"old")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"format": "attnflows-run", "format_version": 1}))
    with pytest.raises(StoreError, match="format version 2; run `attnflows extract` again"):
        RunStore.open(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"run holds a run written in run format 1 \(this attnflows writes format 2\); recomputing it"):
        store = extract_corpus(models, make_corpus(3), tmp_path / "run", progress=False)
    assert store.complete and not (tmp_path / "run" / "attention").exists()


def test_entries_grow_linearly_a_row_keeps_at_most_one_over_tau_min(models, tmp_path: Path) -> None:
    store = extract_corpus(models, make_corpus(8), tmp_path / "run", tau_min=0.15, progress=False)
    assert len(store.dataframe("entries")) > 0
    for sid in range(8):
        entries = store.entries(sid, "pretrained")
        assert entries.groupby(["layer", "head", "query"]).size().max(skipna=True) <= 6 or entries.empty
        assert (entries["weight"] >= 0.15).all()
    with pytest.raises(InputError, match=r"tau_min must be in \(0, 1\]"):
        extract_corpus(models, make_corpus(3), tmp_path / "other", tau_min=0.0, progress=False)


def test_every_part_reads_as_one_dask_dataframe(models, tmp_path: Path) -> None:
    store = extract_corpus(models, make_corpus(20), tmp_path / "run", shard_size=8, progress=False)
    frame = store.dataframe("stats")
    assert frame.npartitions == 3
    means = frame.groupby(["model", "layer", "head"])["entropy"].mean().compute()
    expected = store.head_stats().groupby(["model", "layer", "head"], observed=True)["entropy"].mean()
    np.testing.assert_allclose(means.sort_index().to_numpy(), expected.sort_index().to_numpy(), rtol=1e-6)
    assert len(store.dataframe("entries")) == sum(len(store.entries(i, m)) for i in range(20) for m in store.models)
    features, heads = head_feature_matrix(frame)
    in_memory, same_heads = head_feature_matrix(store.head_stats())
    np.testing.assert_allclose(features, in_memory, rtol=1e-6)
    pd.testing.assert_frame_equal(heads, same_heads)
    assert heads["model"].tolist()[:1] + heads["model"].tolist()[-1:] == ["pretrained", "finetuned"]
    with pytest.raises(InputError, match="unknown part 'attention'"):
        store.dataframe("attention")


def test_a_decoder_run_spreads_the_rest_of_a_row_over_the_keys_it_sees(tmp_path: Path) -> None:
    from conftest import save_tiny_decoder

    from attnflows_panel.models import load_encoder

    decoder = load_encoder(save_tiny_decoder(tmp_path / "gpt2", "gpt2"))
    store = extract_corpus({"model": decoder}, Corpus(texts=["the car was good and the movie bad"], source="d"), tmp_path / "run", progress=False)
    rebuilt = store.attention(0, "model")
    assert store.manifest["causal"] and np.allclose(np.triu(rebuilt, 1), 0.0)
    np.testing.assert_allclose(rebuilt.sum(-1), 1.0, atol=1e-3)


def test_bad_record_arguments_are_input_errors_and_repr_is_short(models, tmp_path: Path) -> None:
    store = extract_corpus(models, make_corpus(3), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="unknown model 'bert'; this run has pretrained, finetuned"):
        store.record(1, "bert")
    with pytest.raises(InputError, match="a sentence id is a whole number, got '1'"):
        store.record("1", "finetuned")
    assert repr(store) == f"RunStore({str(tmp_path / 'run')!r}: 3 of 3 sentences, models pretrained, finetuned)"


def test_a_run_of_other_settings_is_kept_unless_overwrite_and_the_refusal_names_what_changed(models, tmp_path: Path) -> None:
    corpus = make_corpus(5)
    extract_corpus(models, corpus, tmp_path / "run", progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "shards").iterdir())
    with pytest.raises(InputError, match=r"run holds a run of other settings \(tau_min 0\.1, now 0\.05\); pass --overwrite"):
        extract_corpus(models, corpus, tmp_path / "run", progress=False, tau_min=0.05, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == before and RunStore.open(tmp_path / "run").tau_min == 0.1
    with pytest.warns(UserWarning, match="recomputing it"):
        assert extract_corpus(models, corpus, tmp_path / "run", progress=False, tau_min=0.05, overwrite=True).tau_min == 0.05


def test_a_resumed_run_says_what_it_found(models, tmp_path: Path) -> None:
    corpus = make_corpus(9)
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus, tmp_path / "run", shard_size=4, progress=False, on_shard=stop_after(1, []))
    said: list[str] = []
    extract_corpus(models, corpus, tmp_path / "run", shard_size=4, progress=False, verify=True, on_resume=said.append)
    assert said == ["run: 4 of 9 sentences already stored (1 shard, re-hashed); computing the rest"]
    extract_corpus(models, corpus, tmp_path / "run", shard_size=4, progress=False, on_resume=said.append)
    assert said[-1] == "run: 9 of 9 sentences already stored (3 shards, sizes and times checked); nothing to do"


def test_a_resumed_run_keeps_its_own_shard_size_unless_another_is_asked(models, tmp_path: Path) -> None:
    corpus = make_corpus(9)
    extract_corpus(models, corpus, tmp_path / "run", shard_size=4, progress=False)
    said: list[str] = []
    assert len(extract_corpus(models, corpus, tmp_path / "run", progress=False, on_resume=said.append).manifest["shards"]) == 3
    assert said == ["run: 9 of 9 sentences already stored (3 shards, sizes and times checked); nothing to do"]
    with pytest.raises(InputError, match=r"other settings \(shard_size 4, now 5\)"):
        extract_corpus(models, corpus, tmp_path / "run", shard_size=5, progress=False, overwrite=False)
