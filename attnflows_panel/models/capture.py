"""attnflows' attention implementation: eager weights when asked, queries and keys captured when capturing.

Every model attnflows loads uses ``attn_implementation="attnflows"``, registered here through
transformers' public ``AttentionInterface`` and ``AttentionMaskInterface``. Outside :func:`capturing`
it is the eager attention every supported family writes (weights returned for
``output_attentions=True``). Inside, each layer's post-rotary queries and keys, its additive mask and
its scaling are recorded in call order, and the output comes from ``scaled_dot_product_attention``:
no ``[heads, n, n]`` weights are ever held, so a long input costs ``O(n)`` memory a layer. Through
:func:`attention_only`, a forward pass stops once every layer's weights are made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attnflows_panel.errors import ModelError

IMPLEMENTATION = "attnflows"
UNSUPPORTED = {"s_aux": "learned attention sinks", "sinks": "learned attention sinks", "position_bias": "a position bias added to the scores"}


@dataclass(frozen=True)
class CapturedLayer:
    """One attention call: queries ``[B, H, n, d]``, keys ``[B, H_kv, n, d]``, additive mask ``[B, 1, n, n]`` or None."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None


_captured: ContextVar[list[CapturedLayer] | None] = ContextVar("attnflows_captured", default=None)
_recorded: ContextVar[tuple[list[torch.Tensor], int] | None] = ContextVar("attnflows_recorded", default=None)


class _AllLayersRecorded(Exception):
    """Ends a forward pass of :func:`attention_only` once its last layer's weights are recorded."""


@contextmanager
def capturing() -> Iterator[list[CapturedLayer]]:
    """Within this block (this thread or task only), forward passes record every layer's queries and keys."""
    layers: list[CapturedLayer] = []
    token = _captured.set(layers)
    try:
        yield layers
    finally:
        _captured.reset(token)


def attention_only(model: nn.Module, inputs: dict[str, Any], n_layers: int) -> list[torch.Tensor]:
    """Each layer's ``[B, H, q, k]`` weights, the forward pass stopped after the last layer's (what follows it is skipped).

    A model that does not run attnflows' attention runs to its end and returns its weights the usual way.
    """
    layers: list[torch.Tensor] = []
    token = _recorded.set((layers, n_layers))
    try:
        out = model(**inputs, output_attentions=True, return_dict=True)
    except _AllLayersRecorded:
        return layers
    finally:
        _recorded.reset(token)
    return list(out.attentions or ())


def attention_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None) -> torch.Tensor:
    """Softmax attention ``[B, H, q, k]`` as the families' eager code computes it (keys shared by query-head groups)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)  # in place: two fewer passes over [B, H, q, k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores.add_(mask)
    return nn.functional.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of one layer: see the module docstring."""
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ModelError(f"{type(module).__name__} uses {what} ({name}), which attnflows does not model")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    softcap = kwargs.get("softcap")
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    captured = _captured.get()
    if captured is not None:
        captured.append(CapturedLayer(query.detach(), key.detach(), None if mask is None else mask.detach(), scaling, softcap))
        if softcap is None:
            output, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False)
            return output, None
    weights = attention_weights(query, key, mask, scaling, softcap)
    recorded = _recorded.get()
    if recorded is not None:
        recorded[0].append(weights)
        if len(recorded[0]) == recorded[1]:
            raise _AllLayersRecorded
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    groups = query.shape[1] // value.shape[1]
    if groups > 1:
        value = value.repeat_interleave(groups, dim=1)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # additive float masks, as the eager implementation gets
