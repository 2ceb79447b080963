"""Fine-tuning decoders: a classification head read from the last real token, or the language-model head on the texts.

Tiny random GPT-2 and LLaMA (4 query heads, 2 key-value heads) with the BPE tokenizer of ``conftest`` and a
labelled CSV made here; a few training steps each.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.cli import main
from attnflows_panel.corpus import read_corpus, split_corpus
from attnflows_panel.errors import InputError
from attnflows_panel.extract import extract_pair
from attnflows_panel.models import ModelPair, load_encoder, validate_pair
from attnflows_panel.models import finetune as ft
from attnflows_panel.paths import sha256_file, sha256_json
from conftest import save_tiny_decoder

torch = pytest.importorskip("torch")

DECODERS = ("gpt2", "llama")
GOOD, BAD = ["good", "great", "liked"], ["bad", "boring", "thin"]


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short reviews, positive or negative by their adjectives, some longer than others (so batches pad)."""
    rows = ["text,label"]
    for i in range(40):
        good = i % 2 == 0
        words = (GOOD if good else BAD)[i % 3], (GOOD if good else BAD)[(i + 1) % 3]
        tail = " and the cast was great but the plot was thin" if i % 4 < 2 else ""
        rows.append(f"the movie was {words[0]} and {words[1]}{tail},{'positive' if good else 'negative'}")
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module", params=DECODERS)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    if request.param == "llama":  # as many LLaMA tokenizers are: fine-tuning pads on the right whatever the tokenizer says
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(path)
    return path


def config(base: Path, data: Path, **kw) -> ft.FinetuneConfig:
    return ft.FinetuneConfig(base=str(base), data=str(data), batch_size=8, heldout=8, learning_rate=1e-3, max_length=48, **kw)


@pytest.fixture(scope="module")
def classified(base: Path, labelled_csv: Path) -> ft.FinetuneResult:
    return ft.finetune(config(base, labelled_csv), progress=False)


@pytest.fixture(scope="module")
def language_modelled(base: Path, labelled_csv: Path) -> ft.FinetuneResult:
    return ft.finetune(config(base, labelled_csv, objective="lm"), progress=False)


def test_a_decoder_fine_tunes_a_classification_head(base: Path, classified: ft.FinetuneResult, labelled_csv: Path) -> None:
    assert not classified.reused
    m = json.loads((classified.path / "metrics.json").read_text())
    assert m == classified.metrics
    assert (m["objective"], m["heldout_metric"], m["labels"]) == ("classify", "accuracy", ["negative", "positive"])
    assert (m["n_train"], m["n_heldout"], m["steps"]) == (32, 8, 4)
    assert 0.0 <= m["heldout_accuracy"] <= 1.0 and m["majority_baseline"] >= 0.5 and math.isfinite(m["final_train_loss"])
    assert m["weights_sha256"] == sha256_file(classified.path / "model.safetensors")
    # the key of a classification fine-tune is what it was before there were objectives: cached checkpoints stay valid
    settings = {k: v for k, v in asdict(config(base, labelled_csv)).items() if k not in ("objective", "data_encoding")} | {"base": None, "data": None}
    assert m["key"] == sha256_json({"config": settings, "base": m["base_fingerprint"], "data": m["data_sha256"], "format": ft.FORMAT_VERSION})
    assert "-lm-" not in classified.path.name

    tuned = load_encoder(classified.path)
    assert tuned.has_classifier and not tuned.is_language_model and tuned.labels == ["negative", "positive"]
    assert tuned.config.pad_token_id == tuned.tokenizer.pad_token_id == tuned.tokenizer.eos_token_id  # no pad token of its own: EOS
    pre = load_encoder(base)
    assert pre.is_language_model
    validate_pair(pre, tuned)
    records = extract_pair(ModelPair(pre, tuned), "the movie was good and the cast was great")
    assert all(r.causal for r in records) and records[0].tokens == records[1].tokens
    assert records[0].next_token is not None and records[0].root_token == records[0].n_tokens - 1
    assert records[1].next_token is None and records[1].predicted_label in ("negative", "positive")


def test_the_classifier_reads_each_row_s_last_real_token_in_a_right_padded_batch(classified: ft.FinetuneResult, labelled_csv: Path) -> None:
    tuned = load_encoder(classified.path)
    corpus = read_corpus(labelled_csv)
    idx = np.array([0, 2, 1, 3])  # long, short, long, short
    inputs = ft._batch_inputs(tuned, corpus, idx, 48)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1 and bool((inputs["attention_mask"][:, 0] == 1).all())  # padded, on the right
    with torch.inference_mode():
        batched = tuned.model(**inputs).logits
        for row, i in enumerate(idx):
            alone = tuned.model(**ft._batch_inputs(tuned, corpus, np.array([i]), 48)).logits[0]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)
            # and that is the head on the last real token's hidden state
            hidden = tuned.model.base_model(**{k: v[row : row + 1, : lengths[row]] for k, v in inputs.items()}).last_hidden_state[0, -1]
            head = tuned.model.score
            torch.testing.assert_close(alone, head(hidden), atol=1e-5, rtol=1e-5)


def test_a_decoder_fine_tunes_its_language_model_head(base: Path, language_modelled: ft.FinetuneResult, labelled_csv: Path) -> None:
    assert not language_modelled.reused
    m = json.loads((language_modelled.path / "metrics.json").read_text())
    assert m == language_modelled.metrics
    assert (m["objective"], m["heldout_metric"], m["labels"]) == ("lm", "perplexity", None)
    assert "heldout_accuracy" not in m and "-lm-" in language_modelled.path.name
    assert m["heldout_tokens"] > m["n_heldout"]
    for name in ("perplexity", "next_token_accuracy"):
        assert math.isfinite(m[f"heldout_{name}"]) and math.isfinite(m[f"baseline_{name}"])
    assert m["heldout_perplexity"] < m["baseline_perplexity"]  # learnt something of these texts
    pre, tuned = load_encoder(base), load_encoder(language_modelled.path)
    assert tuned.is_language_model and not tuned.has_classifier
    assert tuned.checkpoint_hash != pre.checkpoint_hash  # the weights changed
    # the baseline is the base model's own held-out perplexity
    _, heldout = split_corpus(read_corpus(labelled_csv), 8, seed=13)
    assert ft.evaluate_language_model(pre, heldout, 48)["perplexity"] == pytest.approx(m["baseline_perplexity"], rel=1e-4)
    assert ft.evaluate_language_model(tuned, heldout, 48)["perplexity"] == pytest.approx(m["heldout_perplexity"], rel=1e-4)
    records = extract_pair(ModelPair(pre, tuned), "the movie was good")
    assert all(r.causal and r.next_token is not None for r in records)


def test_padding_is_left_out_of_the_language_model_loss(base: Path, labelled_csv: Path) -> None:
    lm = load_encoder(base)
    corpus = read_corpus(labelled_csv)
    inputs = ft._batch_inputs(lm, corpus, np.array([0, 2]), 48)  # a long row and a short one
    labels = ft._next_token_labels(inputs)
    assert "logits_to_keep" not in inputs and bool((labels[inputs["attention_mask"] == 0] == -100).all())
    with torch.inference_mode():
        batched = lm.model(**inputs, labels=labels).loss
        sums, counts = [], []
        for row in range(2):
            n = int(inputs["attention_mask"][row].sum())
            alone = {k: v[row : row + 1, :n] for k, v in inputs.items()}
            sums.append(float(lm.model(**alone, labels=alone["input_ids"]).loss) * (n - 1))
            counts.append(n - 1)
    assert float(batched) == pytest.approx(sum(sums) / sum(counts), rel=1e-5)


def test_fine_tunes_are_cached_by_objective(base: Path, labelled_csv: Path, classified: ft.FinetuneResult, language_modelled: ft.FinetuneResult) -> None:
    again = ft.finetune(config(base, labelled_csv, objective="lm"), progress=False)
    assert again.reused and again.path == language_modelled.path and again.metrics == language_modelled.metrics
    assert ft.finetune(config(base, labelled_csv), progress=False).path == classified.path
    assert language_modelled.metrics["key"] != classified.metrics["key"]


def test_the_lm_objective_ignores_labels(tmp_path: Path) -> None:
    base = save_tiny_decoder(tmp_path / "gpt2", "gpt2")
    texts = tmp_path / "domain.txt"  # one text a line, no labels
    texts.write_text("".join(f"the cast was great {i}\n" for i in range(20)))
    result = ft.finetune(config(base, texts, objective="lm", max_train=8), progress=False)
    assert result.metrics["n_train"] == 8 and result.metrics["labels"] is None
    with pytest.raises(InputError, match="needs a 'label' column"):
        ft.finetune(config(base, texts), progress=False)


def test_an_unknown_objective_is_refused() -> None:
    with pytest.raises(InputError, match=r"objective must be one of classify, lm; got 'mlm'"):
        ft.finetune(ft.FinetuneConfig(objective="mlm"), progress=False)


def test_the_lm_objective_on_an_encoder_is_one_line_and_writes_nothing(tiny_dir: Path, labelled_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = ft.home() / "models"
    before = set(models.iterdir()) if models.exists() else set()
    assert main(["finetune", "--base", str(tiny_dir), "--data", str(labelled_csv), "--objective", "lm", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines() == [f"attnflows: error: objective lm trains a decoder's language-model head; {tiny_dir} is an encoder (bert): use objective classify, or a decoder of GPT-2 (gpt2); LLaMA (llama, mistral, qwen2, qwen3, gemma, gemma2)"]
    assert (set(models.iterdir()) if models.exists() else set()) == before


def test_the_cli_fine_tunes_a_decoder_s_language_model(base: Path, labelled_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["finetune", "--base", str(base), "--data", str(labelled_csv), "--objective", "lm", "--batch-size", "16", "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("fine-tuned in ") and "(language modelling)" in first and "held-out perplexity" in first and "(base model " in first
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("reused cached checkpoint")
    assert main(["info"]) == 0
    assert "(language modelling), held-out perplexity" in capsys.readouterr().out
