"""Loading encoders of several architectures, and validating model pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.errors import ModelError
from attnflows_panel.extract import extract
from attnflows_panel.models import ModelPair, load_encoder, pair_differences

from conftest import save_tiny


def test_load_by_path_gives_eager_eval_model(tiny_dir: Path) -> None:
    lm = load_encoder(tiny_dir)
    assert lm.model.config._attn_implementation == "attnflows"
    assert not lm.model.training
    assert (lm.n_layers, lm.n_heads) == (2, 4)
    assert lm.labels is None and not lm.has_classifier
    assert lm.tokenizer.is_fast


def test_classifier_head_is_kept_with_labels(tiny_classifier_dir: Path) -> None:
    lm = load_encoder(tiny_classifier_dir)
    assert lm.labels == ["negative", "positive"]


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "electra", "albert"])
def test_architectures_load_and_give_normalised_attention(tmp_path: Path, model_type: str) -> None:
    lm = load_encoder(save_tiny(tmp_path / model_type, model_type=model_type, layers=3, heads=2))
    assert type(lm.model).__name__.lower().startswith(model_type)
    record = extract(lm, None, "the good car was safe.")
    assert record.attention.shape == (3, 2, record.n_tokens, record.n_tokens)
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_weight_is_refused(tiny_dir: Path, dtype: str, value: float) -> None:
    import torch

    from attnflows_panel.models.loading import _check_weights

    model = load_encoder(tiny_dir).model.to(getattr(torch, dtype))
    _check_weights(model, "tiny")
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[3, 5] = value
    with pytest.raises(ModelError, match=r"^model 'tiny' has NaN or infinite weights in encoder\.layer\.1\.output\.dense\.weight; "):
        _check_weights(model, "tiny")


def test_roberta_limit_excludes_offset_positions(tmp_path: Path) -> None:
    lm = load_encoder(save_tiny(tmp_path / "r", model_type="roberta"))
    assert lm.max_tokens == 64  # 66 position embeddings, two taken by the padding offset


def test_checkpoint_hash_tells_weights_apart(tiny_dir: Path, tiny_classifier_dir: Path) -> None:
    a, b = load_encoder(tiny_dir), load_encoder(tiny_classifier_dir)
    assert a.checkpoint_hash == load_encoder(tiny_dir).checkpoint_hash
    assert a.checkpoint_hash != b.checkpoint_hash


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/model", "model path does not exist: ./no/such/model"),
        ("/definitely/missing", "model path does not exist"),
        ("   ", "model name or path is empty"),
    ],
)
def test_bad_model_paths_give_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        load_encoder(name)
    assert "\n" not in str(info.value)


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a directory"):
        load_encoder(path)


def test_unknown_hub_name_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model 'no-such-org/no-such-model'") as info:
        load_encoder("no-such-org/no-such-model")
    assert "\n" not in str(info.value)


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load model"):
        load_encoder(tmp_path)


def test_matching_pair_validates(tiny_dir: Path, tiny_classifier_dir: Path) -> None:
    pair = ModelPair(load_encoder(tiny_dir), load_encoder(tiny_classifier_dir))
    assert (pair.n_layers, pair.n_heads) == (2, 4)


def test_pair_with_other_shape_says_what_differs(tiny_dir: Path, tmp_path: Path) -> None:
    other = load_encoder(save_tiny(tmp_path / "deep", layers=3, heads=2))
    with pytest.raises(ModelError, match=r"layers 2 vs 3; heads per layer 4 vs 2") as info:
        ModelPair(load_encoder(tiny_dir), other)
    assert "\n" not in str(info.value)


def test_pair_with_other_vocabulary(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import BertTokenizer

    path = save_tiny(tmp_path / "vocab")
    vocab = BertTokenizer.from_pretrained(path).get_vocab()
    vocab = {("[unused0]" if token == "love" else token): i for token, i in vocab.items()}
    BertTokenizer(vocab=vocab, model_max_length=64).save_pretrained(path)
    diffs = pair_differences(load_encoder(tiny_dir), load_encoder(path))
    assert diffs == [f"tokenizer vocabularies differ ({len(vocab)} vs {len(vocab)} entries, 2 differing)"]


def test_pair_with_other_casing(tiny_dir: Path, tmp_path: Path) -> None:
    cased = load_encoder(save_tiny(tmp_path / "cased", lowercase=False))
    assert pair_differences(load_encoder(tiny_dir), cased) == ["tokenizers split the same text differently (casing or normalization)"]


@pytest.mark.integration
def test_default_pretrained_model_loads(default_pretrained) -> None:
    assert (default_pretrained.n_layers, default_pretrained.n_heads) == (6, 12)
    assert default_pretrained.max_tokens == 512
    assert default_pretrained.model.config._attn_implementation == "attnflows"
