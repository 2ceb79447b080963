"""Extraction: records equal a direct forward pass, padding never leaks, bad input is refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnflows_panel.errors import InputError, TruncationWarning
from attnflows_panel.extract import encode, extract, extract_pair, forward_attention


def direct_attention(lm, text: str, text_pair: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Reference: one unpadded forward pass straight through transformers."""
    inputs = lm.tokenizer(text, text_pair, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**inputs, output_attentions=True)
    return torch.cat(out.attentions).numpy(), inputs["input_ids"][0]


def test_record_matches_direct_forward(tiny) -> None:
    record = extract(tiny.model, tiny.tokenizer, "the car was good, i love it.")
    reference, ids = direct_attention(tiny, "the car was good, i love it.")
    np.testing.assert_array_equal(record.input_ids, ids.numpy())
    np.testing.assert_allclose(record.attention, reference, atol=1e-6)
    assert record.attention.dtype == np.float32
    assert record.tokens[0] == "[CLS]" and record.tokens[-1] == "[SEP]"
    assert record.cls_mask.tolist() == [True] + [False] * (record.n_tokens - 1)
    assert record.sep_mask[-1] and record.sep_mask.sum() == 1
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)
    assert record.logits is None and record.predicted_label is None


def test_word_ids_group_word_pieces(tiny) -> None:
    record = extract(tiny, None, "the zebra drove")
    # "zebra" and "drove" are not in the tiny vocabulary, so they split into letter pieces
    assert record.tokens[:3] == ["[CLS]", "the", "z"]
    words = record.word_ids.tolist()
    assert words[0] == -1 and words[-1] == -1
    assert words[1] == 0 and set(words[2:7]) == {1} and set(words[7:-1]) == {2}
    assert record.special_mask.sum() == 2


def test_sentence_pair_segments_and_unique_word_ids(tiny) -> None:
    record = extract(tiny, None, "the car", "a movie")
    assert record.tokens == ["[CLS]", "the", "car", "[SEP]", "a", "movie", "[SEP]"]
    assert record.segment_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert record.word_ids.tolist() == [-1, 0, 1, -1, 2, 3, -1]
    reference, _ = direct_attention(tiny, "the car", "a movie")
    np.testing.assert_allclose(record.attention, reference, atol=1e-6)


def test_classifier_record_has_prediction(tiny_classifier_dir) -> None:
    from attnflows_panel.models import load_encoder

    lm = load_encoder(tiny_classifier_dir)
    record = extract(lm, None, "a great movie")
    assert record.logits.shape == (2,)
    assert record.predicted_label in {"negative", "positive"}
    np.testing.assert_allclose(record.probabilities.sum(), 1.0, rtol=1e-6)


def test_batched_padding_never_leaks(tiny) -> None:
    texts = ["good", "the car was very safe and good", "i hate it", "a b c d e f g h i j k l m n o p"]
    encodings = [encode(tiny, t) for t in texts]
    batched = forward_attention(tiny, encodings, max_batch=4)
    for text, enc, (attention, _) in zip(texts, encodings, batched, strict=True):
        reference, _ = direct_attention(tiny, text)
        assert attention.shape[-1] == len(enc.input_ids)
        np.testing.assert_allclose(attention, reference, atol=1e-5)
        np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)


def test_pair_sees_identical_input_ids(tiny_pair) -> None:
    a, b = extract_pair(tiny_pair, "the movie was awful", "i love it")
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.tokens == b.tokens
    assert not np.allclose(a.attention, b.attention)
    assert b.predicted_label in {"negative", "positive"} and a.predicted_label is None


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_refused(tiny, text: str) -> None:
    with pytest.raises(InputError, match="text is empty"):
        extract(tiny, None, text)


def test_empty_second_segment_is_refused(tiny) -> None:
    with pytest.raises(InputError, match="second segment is empty"):
        extract(tiny, None, "good", "  ")


def test_non_string_text_is_refused(tiny) -> None:
    with pytest.raises(InputError, match="text must be a string, got int"):
        extract(tiny, None, 42)


def test_long_text_is_truncated_with_a_count(tiny) -> None:
    text = " ".join(["good"] * 200)
    with pytest.warns(TruncationWarning, match=r"input has 202 tokens but .* takes at most 64: dropped 138 tokens"):
        record = extract(tiny, None, text)
    assert record.n_tokens == 64 and record.n_truncated == 138
    assert record.tokens[-1] == "[SEP]"
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)


def test_long_pair_is_truncated_longest_first(tiny) -> None:
    with pytest.warns(TruncationWarning, match="longest segment first"):
        record = extract(tiny, None, "good " * 10, "bad " * 100)
    assert record.n_tokens == 64
    assert record.segment_ids.tolist().count(0) == 12  # [CLS] + 10 words + [SEP] survive


def test_model_without_eager_attention_is_explained(tiny) -> None:
    from transformers import AutoModel

    from attnflows_panel.errors import ModelError

    sdpa = AutoModel.from_pretrained(tiny.model.name_or_path, attn_implementation="sdpa")
    with pytest.raises(ModelError, match="returned no attentions; load it with attn_implementation='eager'"):
        extract(sdpa, tiny.tokenizer, "good car")


def test_headless_pass_stops_after_the_last_attention(tiny) -> None:
    from transformers import AutoModel

    from attnflows_panel.extract import attention_pass, encode_batch, padded_inputs
    from attnflows_panel.models import LoadedModel

    inputs = padded_inputs(tiny, encode_batch(tiny, ["the car was good", "i love it, the zebra drove"]))
    after = []
    hook = tiny.model.encoder.layer[-1].intermediate.register_forward_hook(lambda *_: after.append(1))
    try:
        layers, logits = attention_pass(tiny, inputs)
    finally:
        hook.remove()
    assert after == [] and logits is None and len(layers) == tiny.n_layers
    eager = LoadedModel(AutoModel.from_pretrained(tiny.model.name_or_path, attn_implementation="eager"), tiny.tokenizer, "eager")
    with torch.no_grad():
        full = eager.model(**inputs, output_attentions=True).attentions
    for ours, theirs, alone in zip(layers, full, attention_pass(eager, inputs)[0], strict=True):  # eager: runs to its end
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
        np.testing.assert_array_equal(alone.numpy(), theirs.numpy())


def test_length_batches_cover_every_input_within_limits_at_less_cost_than_a_plain_cut() -> None:
    from attnflows_panel.extract import CALL_TOKENS, length_batches

    lengths = [int(n) for n in np.random.default_rng(0).integers(5, 90, 300)]
    budget_pairs = 32 * 60 * 60  # 32 inputs of 60 tokens; fewer of longer ones
    batches = length_batches(lengths, per_token_pair_bytes=4, max_batch=32, budget=budget_pairs * 4)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    widths = [max(lengths[i] for i in b) for b in batches]
    assert all(len(b) <= 32 and len(b) * width**2 <= budget_pairs for b, width in zip(batches, widths, strict=True))
    assert widths == sorted(widths)  # similar lengths together, shortest first

    plain: list[list[int]] = [[]]  # sorted, cut every 32 or sooner at the budget
    for i in sorted(range(300), key=lambda i: (lengths[i], i)):
        if plain[-1] and (len(plain[-1]) == 32 or (len(plain[-1]) + 1) * lengths[i] ** 2 > budget_pairs):
            plain.append([])
        plain[-1].append(i)

    def cost(cut: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) + CALL_TOKENS for b in cut)

    assert cost(batches) < cost(plain)


@pytest.mark.integration
def test_default_model_matches_transformers(default_pretrained) -> None:
    text = "Driverless cars will never replace a good human driver, I think."
    record = extract(default_pretrained, None, text)
    reference, ids = direct_attention(default_pretrained, text)
    np.testing.assert_array_equal(record.input_ids, ids.numpy())
    np.testing.assert_allclose(record.attention, reference, atol=1e-6)
    assert record.attention.shape == (6, 12, record.n_tokens, record.n_tokens)
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.integration
def test_default_model_batches_without_padding_leaks(default_pretrained) -> None:
    texts = ["Great.", "I would never ride in a self-driving car, it scares me a lot.", "Autonomous cars are the future of transport!"]
    encodings = [encode(default_pretrained, t) for t in texts]
    for text, (attention, _) in zip(texts, forward_attention(default_pretrained, encodings), strict=True):
        reference, _ = direct_attention(default_pretrained, text)
        np.testing.assert_allclose(attention, reference, atol=1e-5)


@pytest.mark.integration
def test_default_model_truncates_beyond_512(default_pretrained) -> None:
    with pytest.warns(TruncationWarning, match="takes at most 512"):
        record = extract(default_pretrained, None, "word " * 2000)
    assert record.n_tokens == 512 and record.n_truncated == 2002 - 512


def test_onednn_kernel_cache_is_off_unless_the_user_set_it() -> None:
    """Importing attnflows turns off oneDNN's per-shape kernel cache (its kernels pinned a long run's heap); a value the user set holds."""
    script = "import attnflows_panel, torch; x = torch.randn(4, 7, 1536); torch.nn.functional.gelu(x); torch.nn.functional.gelu(x)"

    def kernels_created(**variables: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"} | {"ONEDNN_VERBOSE": "all"} | variables
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=120)
        return re.findall(r"create:cache_(hit|miss)", done.stdout + done.stderr)

    default = kernels_created()
    if not default:
        pytest.skip("torch's GELU does not run on oneDNN on this CPU")
    assert default == ["miss", "miss"]
    assert kernels_created(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == ["miss", "hit"]
