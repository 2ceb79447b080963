"""Switch attention heads off (or scale them) with forward hooks, and gradient-based head importance.

transformers 5 dropped ``head_mask``, so a forward pre-hook on the module that consumes the
concatenated per-head context (the one the model's family names in ``models/families.py``: BERT's
``attention.output.dense``, GPT-2's ``attn.c_proj``, LLaMA's ``self_attn.o_proj``, …) scales each head's slice of its input.
Scaling head h's context by s is the same as scaling head h's value projection by s.
Torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from attnflows_panel.errors import InputError, ModelError
from attnflows_panel.models.families import ContextSite, context_features
from attnflows_panel.models.loading import LoadedModel

if TYPE_CHECKING:
    import torch

# Michel et al.'s code adds this to the per-layer norm before dividing.
NORM_EPS = 1e-20


@dataclass(frozen=True)
class AblationResult:
    """One input's prediction with every head and with ``heads_off`` switched off."""

    text: str
    text_pair: str | None
    heads_off: tuple[tuple[int, int], ...]
    labels: tuple[str, ...]
    original_probabilities: np.ndarray
    probabilities: np.ndarray

    @property
    def original_label(self) -> str:
        return self.labels[int(np.argmax(self.original_probabilities))]

    @property
    def predicted_label(self) -> str:
        return self.labels[int(np.argmax(self.probabilities))]

    @property
    def prediction_changed(self) -> bool:
        return self.original_label != self.predicted_label


def _hook_sites(lm: LoadedModel) -> list[ContextSite]:
    """The per-layer context consumers of ``lm``, from its family's layout, checked against its config."""
    try:
        sites = lm.family.context_sites(lm.model.base_model, lm.n_layers, lm.config)
    except ModelError as exc:
        raise ModelError(f"cannot mask the heads of {lm.model_id}: {exc}") from None
    if sum(len(s.layers) for s in sites) != lm.n_layers:
        raise ModelError(f"cannot mask the heads of {lm.model_id}: found {sum(len(s.layers) for s in sites)} attention layers, config says {lm.n_layers}")
    for site in sites:
        if context_features(site.module) % lm.n_heads:
            raise ModelError(f"cannot mask the heads of {lm.model_id}: {context_features(site.module)} context features do not split into {lm.n_heads} heads")
    return sites


def _mask_tensor(lm: LoadedModel, mask: Any) -> torch.Tensor:
    """``mask`` as a tensor on the model's device: ``[L, H]``, or ``[B, L, H]`` (one mask per example) if a tensor."""
    import torch

    expected = (lm.n_layers, lm.n_heads)
    if isinstance(mask, torch.Tensor):
        ok = tuple(mask.shape) == expected or (mask.ndim == 3 and tuple(mask.shape[1:]) == expected)
        tensor = mask
    else:
        try:
            array = np.asarray(mask, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"head mask must be a numeric [layers, heads] array, got {type(mask).__name__}") from None
        ok = array.shape == expected
        tensor = torch.from_numpy(array)
    if not ok:
        raise InputError(f"head mask has shape {tuple(mask.shape) if hasattr(mask, 'shape') else np.shape(mask)}; {lm.model_id} needs {list(expected)} (layers, heads)")
    if not bool(torch.isfinite(tensor.detach()).all()):
        raise InputError("head mask contains a non-finite value")
    return tensor.to(lm.device)


@contextmanager
def heads_masked(lm: LoadedModel, mask: Any) -> Iterator[None]:
    """Within the block, scale head ``h`` of layer ``l`` by ``mask[l, h]`` (1 keeps, 0 removes it).

    ``mask`` is a bool/float ``[L, H]`` array, or a torch tensor ``[L, H]`` or ``[batch, L, H]`` (one
    mask per example; gradients flow into it). Only forward passes of the calling thread are
    affected, so other threads can share the model; nested blocks multiply their masks.
    """
    scale = _mask_tensor(lm, mask)
    sites = _hook_sites(lm)
    n_heads = lm.n_heads
    owner = threading.get_ident()
    calls = [0] * len(sites)

    def reset(_module: Any, _args: Any) -> None:
        calls[:] = [0] * len(sites)

    def make_hook(index: int, site: ContextSite) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if threading.get_ident() != owner:
                return None
            if len(site.layers) == 1:
                layer = site.layers[0]
            elif calls[index] < len(site.layers):
                layer = site.layers[calls[index]]
                calls[index] += 1
            else:
                raise ModelError(f"{lm.model_id}: a shared attention module ran more than its {len(site.layers)} layers in one forward pass")
            x = args[0]
            s = scale[..., layer, :]  # [H] or [B, H]
            if s.ndim == 2:
                if s.shape[0] != x.shape[0]:
                    raise InputError(f"head mask is for {s.shape[0]} examples, the batch has {x.shape[0]}")
                s = s.reshape(s.shape[0], *([1] * (x.ndim - 2)), n_heads)
            heads = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
            return ((heads * s.to(x.dtype).unsqueeze(-1)).reshape(x.shape), *args[1:])

        return hook

    handles = [lm.model.base_model.register_forward_pre_hook(reset)]
    try:
        handles += [site.module.register_forward_pre_hook(make_hook(i, site)) for i, site in enumerate(sites)]
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_names(lm: LoadedModel, what: str) -> tuple[str, ...]:
    """What the model predicts: a classifier's classes, a language model's vocabulary (the next token)."""
    if lm.has_classifier:
        return tuple(lm.labels or ())
    if lm.is_language_model:
        tokens = lm.tokenizer.convert_ids_to_tokens(list(range(lm.model.get_output_embeddings().out_features)))
        return tuple(f"[id {i}]" if token is None else token for i, token in enumerate(tokens))  # embedding rows past the vocabulary
    raise ModelError(f"{lm.model_id} has no classification or language-model head; {what} needs one (load a fine-tuned model)")


def _head_list(lm: LoadedModel, heads_off: Any) -> tuple[tuple[int, int], ...]:
    heads = []
    for item in heads_off:
        try:
            layer, head = item
        except (TypeError, ValueError):
            raise InputError(f"heads_off must hold (layer, head) pairs, got {item!r}") from None
        if not (isinstance(layer, (int, np.integer)) and isinstance(head, (int, np.integer))):
            raise InputError(f"heads_off must hold integer (layer, head) pairs, got {item!r}")
        if not (0 <= layer < lm.n_layers and 0 <= head < lm.n_heads):
            raise InputError(f"head ({layer}, {head}) is outside {lm.model_id}'s {lm.n_layers} layers x {lm.n_heads} heads")
        heads.append((int(layer), int(head)))
    return tuple(heads)


def ablate_heads(lm: LoadedModel, text: str, text_pair: str | None = None, heads_off: Sequence[tuple[int, int]] = ()) -> AblationResult:
    """The classifier's probabilities for one input with all heads and with ``heads_off`` removed."""
    import torch

    from attnflows_panel.extract import encode, padded_inputs, prediction_logits

    labels = _output_names(lm, "head ablation")
    heads = _head_list(lm, heads_off)
    mask = np.ones((lm.n_layers, lm.n_heads))
    for layer, head in heads:
        mask[layer, head] = 0.0
    inputs = padded_inputs(lm, [encode(lm, text, text_pair)])
    with torch.inference_mode():
        original = prediction_logits(inputs, lm.model(**inputs).logits)[0]
        with heads_masked(lm, mask):
            ablated = prediction_logits(inputs, lm.model(**inputs).logits)[0]
    return AblationResult(
        text=text,
        text_pair=text_pair,
        heads_off=heads,
        labels=labels,
        original_probabilities=torch.softmax(original.double(), -1).cpu().numpy(),
        probabilities=torch.softmax(ablated.double(), -1).cpu().numpy(),
    )


def head_importance(
    lm: LoadedModel,
    texts: Sequence[str],
    labels: Sequence[str | int],
    text_pairs: Sequence[str] | None = None,
    batch_size: int = 16,
    normalize: bool = True,
) -> np.ndarray:
    """Gradient head importance ``[L, H]`` (Michel et al. 2019): the mean over examples of ``|dL/dxi_h|``.

    L is the classifier's cross-entropy for each example's label and xi the head mask at 1. Every
    example gets its own mask, so each gradient is per example and the result does not depend on
    ``batch_size`` (the authors' code takes |gradient| of each batch's loss; it agrees at batch size 1).
    ``normalize`` divides each layer by its L2 norm (plus 1e-20), as their code does.
    """
    import torch

    from attnflows_panel.extract import encode, padded_inputs, prediction_logits

    names = _output_names(lm, "head importance")
    texts, targets, pairs = _importance_inputs(lm, names, texts, labels, text_pairs)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    encodings = [encode(lm, t, p) for t, p in zip(texts, pairs, strict=True)]
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].input_ids))  # less padding
    dtype = next(lm.model.parameters()).dtype
    total = torch.zeros((lm.n_layers, lm.n_heads), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = padded_inputs(lm, [encodings[i] for i in batch])
        xi = torch.ones((len(batch), lm.n_layers, lm.n_heads), dtype=dtype, device=lm.device, requires_grad=True)
        with torch.enable_grad(), heads_masked(lm, xi):
            logits = prediction_logits(inputs, lm.model(**inputs).logits)
        target = torch.tensor([targets[i] for i in batch], device=lm.device)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xi)
        total += grad.abs().sum(0).double().cpu()
    importance = (total / len(encodings)).numpy()
    if normalize:
        importance = importance / (np.linalg.norm(importance, axis=-1, keepdims=True) + NORM_EPS)
    return importance


def _importance_inputs(
    lm: LoadedModel, names: tuple[str, ...], texts: Sequence[str], labels: Sequence[str | int], text_pairs: Sequence[str] | None
) -> tuple[list[str], list[int], list[str | None]]:
    """Check the inputs of :func:`head_importance` and map labels (names or indices) to class indices."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, got one string")
    texts = list(texts)
    if not texts:
        raise InputError("head importance needs at least one text")
    labels = list(labels)
    if len(labels) != len(texts):
        raise InputError(f"got {len(texts)} texts but {len(labels)} labels")
    pairs = [None] * len(texts) if text_pairs is None else list(text_pairs)
    if len(pairs) != len(texts):
        raise InputError(f"got {len(texts)} texts but {len(pairs)} second segments")
    index = {name: i for i, name in enumerate(names)}
    targets = []
    for label in labels:
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(names):
            targets.append(int(label))
        elif isinstance(label, str) and label in index:
            targets.append(index[label])
        else:
            raise InputError(f"unknown label {label!r}; {lm.model_id} has {', '.join(names)} (or indices 0..{len(names) - 1})")
    return texts, targets, pairs
