"""Decoders through their family adapters: tiny random GPT-2, LLaMA (grouped-query attention) and Qwen2 with a BPE tokenizer made here."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.analysis.ablation import ablate_heads, heads_masked
from attnflows_panel.analysis.flows import trace_cls_flow
from attnflows_panel.errors import ModelError
from attnflows_panel.extract import encode, extract, extract_pair, forward_attention
from attnflows_panel.models import ModelPair, load_encoder, validate_pair
from conftest import DECODER_TEXTS as TEXTS
from conftest import bpe_tokenizer, save_tiny_decoder

torch = pytest.importorskip("torch")

DECODERS = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return load_encoder(save_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param))


def test_a_decoder_loads_with_its_language_model_head_and_a_pad_token(decoder) -> None:
    assert decoder.family.causal and decoder.is_language_model and not decoder.has_classifier
    assert decoder.tokenizer.pad_token_id is not None and decoder.config.pad_token_id == decoder.tokenizer.pad_token_id


def test_attention_equals_a_direct_forward_and_is_causal(decoder) -> None:
    text = TEXTS[2]
    record = extract(decoder, None, text)
    inputs = decoder.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = decoder.model(**inputs, output_attentions=True)
    direct = torch.stack(out.attentions, 1)[0].numpy()
    assert record.tokens == decoder.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    np.testing.assert_allclose(record.attention, direct, atol=1e-6)
    assert record.attention.shape == (2, 4, record.n_tokens, record.n_tokens)  # every query head, key-value heads repeated
    assert np.all(np.triu(record.attention, k=1) == 0)  # no token attends to a later one
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)
    # the prediction is the token after the last: the LM head's argmax there
    assert record.logits.shape == (decoder.model.get_output_embeddings().out_features,)
    np.testing.assert_allclose(record.logits, out.logits[0, -1].numpy(), atol=1e-5)
    assert record.predicted_label == decoder.tokenizer.convert_ids_to_tokens(int(out.logits[0, -1].argmax()))


def test_padded_batches_give_each_input_its_own_attention_and_next_token(decoder) -> None:
    encodings = [encode(decoder, text) for text in TEXTS]
    batched = forward_attention(decoder, encodings, max_batch=4)
    for encoding, (attention, logits) in zip(encodings, batched, strict=True):
        ((alone, alone_logits),) = forward_attention(decoder, [encoding])
        np.testing.assert_allclose(attention, alone, atol=1e-5)
        np.testing.assert_allclose(logits, alone_logits, atol=1e-4)


def test_the_default_root_is_the_last_token_and_its_trace_has_edges(decoder) -> None:
    record = extract(decoder, None, TEXTS[1])
    assert record.causal and record.root_token == record.n_tokens - 1 and record.root_name == "the last token"
    trace = trace_cls_flow(record.attention, tau=0.5 / record.n_tokens, root=(record.n_layers, record.root_token))  # a random model attends almost evenly
    assert trace.n_edges > 2
    assert set(trace.edge_query[trace.edge_layer == record.n_layers - 1]) == {record.root_token}
    assert np.all(trace.edge_key <= trace.edge_query)  # backward through causal attention


def test_switching_heads_off_through_the_adapter_is_zeroing_their_output_weights(decoder) -> None:
    heads_off = [(0, 1), (1, 0), (1, 3)]
    result = ablate_heads(decoder, TEXTS[0], heads_off=heads_off)
    zeroed = copy.deepcopy(decoder.model)
    for layer, head in heads_off:
        module = decoder.family.context_sites(zeroed.base_model, 2, zeroed.config)[layer].module
        width = (module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]) // 4
        with torch.no_grad():
            if type(module).__name__ == "Conv1D":  # GPT-2: weight [in, out]
                module.weight[head * width : (head + 1) * width] = 0
            else:
                module.weight[:, head * width : (head + 1) * width] = 0
    inputs = decoder.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.inference_mode():
        expected = torch.softmax(zeroed(**inputs).logits[0, -1].double(), -1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert not np.allclose(result.probabilities, result.original_probabilities)
    assert len(result.labels) == decoder.model.get_output_embeddings().out_features and result.original_label == extract(decoder, None, TEXTS[0]).predicted_label
    everything_off = [ablate_heads(decoder, text, heads_off=[(l, h) for l in range(2) for h in range(4)]) for text in TEXTS]
    assert any(r.prediction_changed for r in everything_off)


def test_a_head_mask_leaves_another_thread_s_forward_alone(decoder) -> None:
    import threading

    inputs = decoder.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.inference_mode():
        plain = decoder.model(**inputs).logits
    seen = []
    with heads_masked(decoder, np.zeros((2, 4))):
        thread = threading.Thread(target=lambda: seen.append(decoder.model(**inputs).logits.detach()))
        thread.start()
        thread.join()
    torch.testing.assert_close(seen[0], plain)


def test_a_decoder_pair_validates_compares_and_exports_from_the_last_token(tmp_path: Path) -> None:
    from attnflows_panel.export import dashboard_html, dashboard_layout

    pre = load_encoder(save_tiny_decoder(tmp_path / "base", "llama", seed=0))
    fine = load_encoder(save_tiny_decoder(tmp_path / "tuned", "llama", seed=1))
    validate_pair(pre, fine)
    pair = ModelPair(pre, fine)
    records = extract_pair(pair, TEXTS[1])
    assert all(r.causal for r in records) and records[0].tokens == records[1].tokens
    root = (2, records[0].root_token)
    assert all(trace_cls_flow(r.attention, tau=0.05, root=root).n_edges for r in records)
    from bokeh.models import ColumnDataSource, Plot

    layout = dashboard_layout(records, tau=0.05)
    assert layout.select_one({"type": Plot, "name": "flow"}).title.text.startswith("pre-trained vs fine-tuned from the last token:")
    nodes = layout.select_one({"type": ColumnDataSource, "name": "flow_nodes"}).data
    (root,) = [i for i, size in enumerate(nodes["size"]) if size == 16]
    assert (nodes["level"][root], nodes["index"][root]) == (2, records[0].n_tokens - 1)
    assert "the last token at the last layer" in dashboard_html(records, tau=0.05)


def test_a_classification_decoder_predicts_a_class_from_its_last_token(tmp_path: Path) -> None:
    lm = load_encoder(save_tiny_decoder(tmp_path / "cls", "gpt2", classifier=True))
    assert lm.has_classifier and not lm.is_language_model and lm.config.pad_token_id is not None
    encodings = [encode(lm, text) for text in TEXTS]
    batched = forward_attention(lm, encodings, max_batch=4)
    for encoding, (_, logits) in zip(encodings, batched, strict=True):
        ((_, alone),) = forward_attention(lm, [encoding])
        np.testing.assert_allclose(logits, alone, atol=1e-5)  # padding never moves the row's last token
    assert extract(lm, None, TEXTS[0]).predicted_label in ("negative", "positive")


def test_unknown_decoders_and_encoder_decoders_are_one_line_naming_the_supported_families(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, T5Config, T5Model

    config = AutoConfig.for_model("opt", vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, max_position_embeddings=64, word_embed_proj_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    bpe_tokenizer(bos=True).save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelError, match=r"decoder model type 'opt' is not supported; attnflows knows GPT-2 \(gpt2\); LLaMA \(llama, mistral") as info:
        load_encoder(tmp_path / "opt")
    assert "\n" not in str(info.value)
    T5Model(T5Config(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(tmp_path / "t5")
    bpe_tokenizer(bos=False).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelError, match="'t5' is an encoder-decoder"):
        load_encoder(tmp_path / "t5")


def test_the_single_view_traces_a_decoder_from_its_last_token_and_ablates_its_next_token(decoder) -> None:
    from attnflows_panel.analysis.flows import PRETRAINED
    from attnflows_panel.components import SingleView

    view = SingleView(decoder, TEXTS[2], title="tiny decoder")
    view.__panel__().get_root()  # rendered as a page would
    view.tau = 0.02
    record = view.records[0]
    title = view.flows[(PRETRAINED,)].figure.title.text
    assert title.startswith(f"tiny decoder: trace from {record.tokens[-1]} (layer 2), ")  # a decoder has no [CLS] to name the trace by
    assert int(re.search(r", (\d+) edges", title).group(1)) > 0
    view.select_heads([(1, 0), (1, 2)])
    view._ablate()
    assert view.ablation.object.startswith("With 2 heads off, the prediction of tiny decoder")
