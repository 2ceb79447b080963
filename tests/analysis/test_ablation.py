"""Head masking through hooks against models whose value weights are scaled instead; importance against finite differences."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
from conftest import save_tiny

torch = pytest.importorskip("torch")

from attnflows_panel.analysis.ablation import ablate_heads, head_importance, heads_masked  # noqa: E402
from attnflows_panel.errors import InputError, ModelError  # noqa: E402
from attnflows_panel.models import LoadedModel, load_encoder  # noqa: E402

TEXTS = ["the movie was good .", "i hate it , the car was bad and awful", "love"]
ARCHITECTURES = ["bert", "roberta", "electra", "distilbert", "albert"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster when the cores are busy with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """Tiny random classifiers (3 layers x 4 heads) of every supported layout, with sharpened output layers."""
    models = {}
    for model_type in ARCHITECTURES:
        lm = load_encoder(save_tiny(tmp_path_factory.mktemp(model_type), model_type, classifier=True, layers=3, seed=2))
        # random init gives logits near 0 whatever the heads do; scale the last layer so differences show
        last = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 2][-1]
        with torch.no_grad():
            last.weight *= 100.0
        models[model_type] = lm
    return models


def batch(lm: LoadedModel, texts: list[str] = TEXTS) -> dict:
    return lm.forward_kwargs(dict(lm.tokenizer(texts, padding=True, return_tensors="pt")))


def output(model, inputs: dict) -> torch.Tensor:
    """The last hidden state at the non-padding positions, followed by the logits of a classifier."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1][inputs["attention_mask"].bool()].flatten()
    return hidden if getattr(out, "logits", None) is None else torch.cat([hidden, out.logits.flatten()])


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def value_projections(model, model_type: str) -> list:
    """The value projection of every layer (for ALBERT: of every layer group)."""
    base = model.base_model
    if model_type == "distilbert":
        return [layer.attention.v_lin for layer in base.transformer.layer]
    if model_type == "albert":
        return [group.albert_layers[0].attention.value for group in base.encoder.albert_layer_groups]
    return [layer.attention.self.value for layer in base.encoder.layer]


def scaled_copy(lm: LoadedModel, mask: np.ndarray):
    """Reference: a copy whose value weights and bias rows of head (l, h) are multiplied by ``mask[l, h]``."""
    model = copy.deepcopy(lm.model)
    model_type = lm.config.model_type
    if model_type == "albert":
        model = unrolled_albert(model)
    with torch.no_grad():
        for layer, value in enumerate(value_projections(model, model_type)):
            rows = value.weight.shape[0] // lm.n_heads
            for head in range(lm.n_heads):
                value.weight[head * rows : (head + 1) * rows] *= float(mask[layer, head])
                value.bias[head * rows : (head + 1) * rows] *= float(mask[layer, head])
    return model


def unrolled_albert(model):
    """The same ALBERT with one layer group per layer, each holding a copy of the shared weights."""
    config = copy.deepcopy(model.config)
    config.num_hidden_groups = config.num_hidden_layers
    unrolled = type(model)(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if ".albert_layer_groups.0." in key:
            for group in range(config.num_hidden_groups):
                state[key.replace(".albert_layer_groups.0.", f".albert_layer_groups.{group}.")] = value.clone()
        else:
            state[key] = value
    unrolled.load_state_dict(state, strict=True)
    return unrolled


@pytest.mark.parametrize("model_type", [*ARCHITECTURES, "bare bert"])
def test_mask_equals_scaled_value_weights(tiny_models, tiny, model_type: str) -> None:
    """Hidden states (and logits) with a mask equal those of a copy whose value rows are scaled by it."""
    lm = tiny if model_type == "bare bert" else tiny_models[model_type]
    inputs = batch(lm)
    rng = np.random.default_rng(0)
    shape = (lm.n_layers, lm.n_heads)
    one_head = np.ones(shape)
    one_head[1, 2] = 0.0
    masks = {"one head off": one_head, "random floats": rng.uniform(0, 1.5, shape), "random bools": rng.random(shape) < 0.5}
    for name, mask in masks.items():
        with heads_masked(lm, mask):
            got = output(lm.model, inputs)
        want = output(scaled_copy(lm, mask), inputs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{model_type} {name}")
        assert (got - output(lm.model, inputs)).abs().max() > 1e-4  # the mask did something


def test_albert_unrolled_reference_is_the_same_model(tiny_models) -> None:
    lm = tiny_models["albert"]
    inputs = batch(lm)
    torch.testing.assert_close(output(unrolled_albert(lm.model), inputs), output(lm.model, inputs), atol=1e-6, rtol=1e-6)


def test_albert_shared_weights_zeroed_in_every_layer(tiny_models) -> None:
    """Second check for ALBERT: zeroing head 1's rows of the one shared value projection = head 1 off in all layers."""
    lm = tiny_models["albert"]
    inputs = batch(lm)
    model = copy.deepcopy(lm.model)
    value = model.albert.encoder.albert_layer_groups[0].albert_layers[0].attention.value
    rows = value.weight.shape[0] // lm.n_heads
    with torch.no_grad():
        value.weight[rows : 2 * rows] = 0.0
        value.bias[rows : 2 * rows] = 0.0
    mask = np.ones((3, 4))
    mask[:, 1] = 0.0
    with heads_masked(lm, mask):
        got = output(lm.model, inputs)
    torch.testing.assert_close(got, output(model, inputs), atol=1e-5, rtol=1e-5)


def test_all_ones_changes_nothing_and_hooks_are_removed(tiny_models) -> None:
    for model_type in ARCHITECTURES:
        lm = tiny_models[model_type]
        inputs = batch(lm)
        before = output(lm.model, inputs)
        with heads_masked(lm, np.ones((3, 4), dtype=bool)):
            assert torch.equal(output(lm.model, inputs), before)
        with pytest.raises(RuntimeError, match="boom"), heads_masked(lm, np.zeros((3, 4))):
            raise RuntimeError("boom")
        assert torch.equal(output(lm.model, inputs), before)
        assert not any(m._forward_pre_hooks for m in lm.model.modules())


def test_per_example_masks_and_nesting(tiny_models) -> None:
    lm = tiny_models["bert"]
    inputs = batch(lm)
    rng = np.random.default_rng(1)
    masks = rng.uniform(0, 1, (len(TEXTS), 3, 4))
    with heads_masked(lm, torch.from_numpy(masks)):
        together = logits(lm.model, inputs)
    for i, mask in enumerate(masks):
        with heads_masked(lm, mask):
            alone = logits(lm.model, inputs)[i]
        torch.testing.assert_close(together[i], alone, atol=1e-6, rtol=1e-6)
    with heads_masked(lm, masks[0]), heads_masked(lm, masks[1]):
        nested = output(lm.model, inputs)
    with heads_masked(lm, masks[0] * masks[1]):
        torch.testing.assert_close(nested, output(lm.model, inputs), atol=1e-6, rtol=1e-6)


def test_other_threads_are_not_masked(tiny_models) -> None:
    lm = tiny_models["bert"]
    inputs = batch(lm)
    before = output(lm.model, inputs)
    seen = {}
    with heads_masked(lm, np.zeros((3, 4))):
        worker = threading.Thread(target=lambda: seen.setdefault("out", output(lm.model, inputs)))
        worker.start()
        worker.join()
        assert not torch.equal(output(lm.model, inputs), before)
    assert torch.equal(seen["out"], before)


def test_mask_errors(tiny_models) -> None:
    lm = tiny_models["bert"]
    for bad, words in [(np.ones((4, 3)), r"shape \(4, 3\); .* needs \[3, 4\]"), (np.ones(12), "shape"), ([[1, 1]], "shape")]:
        with pytest.raises(InputError, match=words) as info, heads_masked(lm, bad):
            pass
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="non-finite"), heads_masked(lm, np.full((3, 4), np.nan)):
        pass
    with pytest.raises(InputError, match="numeric"), heads_masked(lm, "all"):
        pass
    with pytest.raises(InputError, match="for 2 examples, the batch has 3"), heads_masked(lm, torch.ones(2, 3, 4)):
        output(lm.model, batch(lm))


def test_unknown_layouts_are_refused(tiny_models) -> None:
    from transformers import AlbertModel, MPNetConfig, MPNetModel

    mpnet = LoadedModel(model=MPNetModel(MPNetConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=16, vocab_size=10)), tokenizer=None, model_id="tiny-mpnet")
    with pytest.raises(ModelError, match=r"cannot mask the heads of tiny-mpnet: cannot switch heads of model type 'mpnet' on or off; attnflows knows the layouts of BERT \(bert, "), heads_masked(mpnet, np.ones((1, 2))):
        pass
    config = copy.deepcopy(tiny_models["albert"].config)
    config.inner_group_num = 2
    albert = LoadedModel(model=AlbertModel(config), tokenizer=None, model_id="tiny-albert")
    with pytest.raises(ModelError, match="inner_group_num=2"), heads_masked(albert, np.ones((3, 4))):
        pass


# --------------------------------------------------------------------------------------------------
# ablate_heads
# --------------------------------------------------------------------------------------------------


def test_ablate_heads_before_and_after(tiny_models) -> None:
    lm = tiny_models["bert"]
    text, pair = "the car was good", "i love it"
    none = ablate_heads(lm, text, pair)
    np.testing.assert_array_equal(none.probabilities, none.original_probabilities)
    assert none.labels == ("negative", "positive") and not none.prediction_changed
    assert none.original_label == none.predicted_label in none.labels
    heads_off = [(layer, head) for layer in range(lm.n_layers) for head in range(lm.n_heads)]
    result = ablate_heads(lm, text, pair, heads_off=heads_off)
    assert result.heads_off == tuple(heads_off) and result.text_pair == pair
    for p in (result.probabilities, result.original_probabilities):
        assert p.shape == (2,) and abs(p.sum() - 1) < 1e-12 and (p > 0).all()
    np.testing.assert_allclose(result.original_probabilities, none.original_probabilities, rtol=1e-12)
    assert np.abs(result.probabilities - result.original_probabilities).max() > 1e-3
    # the new probabilities equal those of a model with those heads' value weights zeroed
    mask = np.zeros((lm.n_layers, lm.n_heads))
    inputs = lm.forward_kwargs(dict(lm.tokenizer(text, pair, return_tensors="pt")))
    want = torch.softmax(logits(scaled_copy(lm, mask), inputs)[0].double(), -1).numpy()
    np.testing.assert_allclose(result.probabilities, want, rtol=1e-5)
    one = ablate_heads(lm, text, pair, heads_off=[(2, 1)])
    assert 0 < np.abs(one.probabilities - one.original_probabilities).max() < 1


def test_ablate_heads_errors(tiny, tiny_models) -> None:
    with pytest.raises(ModelError, match="has no classification or language-model head; head ablation needs one"):
        ablate_heads(tiny, "good", heads_off=[(0, 0)])
    for bad, words in [([(3, 0)], r"head \(3, 0\) is outside .* 3 layers x 4 heads"), ([(0, -1)], "outside"), ([0], "pairs, got 0"), ([(0.0, 1)], "integer")]:
        with pytest.raises(InputError, match=words) as info:
            ablate_heads(tiny_models["bert"], "good", heads_off=bad)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="text is empty"):
        ablate_heads(tiny_models["bert"], "  ")


# --------------------------------------------------------------------------------------------------
# head_importance
# --------------------------------------------------------------------------------------------------


def finite_difference_importance(lm: LoadedModel, texts: list[str], targets: list[int], eps: float = 1e-5) -> np.ndarray:
    """Reference: mean over examples of |central difference of each example's loss in xi_(l,h)| at xi = 1."""
    inputs = batch(lm, texts)
    target = torch.tensor(targets)

    def losses(mask: np.ndarray) -> np.ndarray:
        with heads_masked(lm, mask):
            z = logits(lm.model, inputs)
        return torch.nn.functional.cross_entropy(z, target, reduction="none").numpy()

    out = np.empty((lm.n_layers, lm.n_heads))
    for layer in range(lm.n_layers):
        for head in range(lm.n_heads):
            up, down = np.ones_like(out), np.ones_like(out)
            up[layer, head] += eps
            down[layer, head] -= eps
            out[layer, head] = np.abs((losses(up) - losses(down)) / (2 * eps)).mean()
    return out


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "albert"])
def test_importance_equals_finite_differences(tiny_models, model_type: str) -> None:
    lm32 = tiny_models[model_type]
    lm = LoadedModel(model=copy.deepcopy(lm32.model).double(), tokenizer=lm32.tokenizer, model_id=lm32.model_id)
    targets = [1, 0, 1]
    got = head_importance(lm, TEXTS, targets, batch_size=2, normalize=False)
    want = finite_difference_importance(lm, TEXTS, targets)
    assert got.shape == (3, 4) and (want > 1e-4).all()
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_importance_options(tiny_models) -> None:
    lm = tiny_models["bert"]
    texts = [*TEXTS, "a great film", "awful"]
    labels = ["positive", "negative", "positive", "positive", "negative"]
    raw = head_importance(lm, texts, labels, batch_size=2, normalize=False)
    same = head_importance(lm, texts, [1, 0, 1, 1, 0], batch_size=5, normalize=False)
    np.testing.assert_allclose(raw, same, rtol=1e-4)  # batch size and padding do not matter
    normalized = head_importance(lm, texts, labels, batch_size=2)
    np.testing.assert_allclose(normalized, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=-1), 1.0)
    pairs = head_importance(lm, texts, labels, text_pairs=["i love it"] * 5, normalize=False)
    assert pairs.shape == (3, 4) and not np.allclose(pairs, raw)


def test_importance_errors(tiny, tiny_models) -> None:
    with pytest.raises(ModelError, match="head importance needs one"):
        head_importance(tiny, ["good"], [0])
    cases = [
        ((["good"], ["neutral"]), {}, "unknown label 'neutral'; .* has negative, positive"),
        ((["good"], [2]), {}, "unknown label 2"),
        ((["good", "bad"], [0]), {}, "2 texts but 1 labels"),
        (([], []), {}, "at least one text"),
        (("good", [0]), {}, "one string"),
        ((["good"], [0]), {"text_pairs": ["a", "b"]}, "1 texts but 2 second segments"),
        ((["good"], [0]), {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ]
    for args, kwargs, words in cases:
        with pytest.raises(InputError, match=words) as info:
            head_importance(tiny_models["bert"], *args, **kwargs)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# the real default model
# --------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_default_model_last_layer_ablation() -> None:
    """The real 6 x 12 encoder with a fresh seeded two-class head: the last layer's heads matter, all-ones changes nothing."""
    from attnflows_panel.models import default_pretrained_path

    torch.manual_seed(0)
    lm = load_encoder(default_pretrained_path(), labels=["negative", "positive"])
    assert (lm.n_layers, lm.n_heads) == (6, 12)
    text = "I would never trust a car that drives itself."
    kept = ablate_heads(lm, text, heads_off=[])
    np.testing.assert_array_equal(kept.probabilities, kept.original_probabilities)
    inputs = batch(lm, [text])
    before = output(lm.model, inputs)
    with heads_masked(lm, np.ones((6, 12))):
        assert torch.equal(output(lm.model, inputs), before)
    last = ablate_heads(lm, text, heads_off=[(5, h) for h in range(12)])
    assert np.abs(last.probabilities - last.original_probabilities).max() > 1e-3
    np.testing.assert_allclose(last.original_probabilities, kept.original_probabilities, rtol=1e-12)
