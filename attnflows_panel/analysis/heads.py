"""Per-head measures of attention maps ``A[..., query, key]`` whose rows sum to 1."""

from __future__ import annotations

import numpy as np


def head_entropy(attention: np.ndarray) -> np.ndarray:
    """Mean over queries of each row's entropy in nats; shape ``attention.shape[:-2]``."""
    a = np.asarray(attention, dtype=np.float64)
    logs = np.log(np.where(a > 0, a, 1.0))
    return -(a * logs).sum(-1).mean(-1)


def head_max_weight(attention: np.ndarray) -> np.ndarray:
    """Mean over queries of each row's largest weight ("confidence")."""
    return np.asarray(attention, dtype=np.float64).max(-1).mean(-1)


def attention_to(attention: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """Mean over queries of the attention given to the keys where ``key_mask`` is true."""
    a = np.asarray(attention, dtype=np.float64)
    mask = np.asarray(key_mask, dtype=bool)
    if mask.shape != a.shape[-1:]:
        raise ValueError(f"key mask has shape {mask.shape}, expected ({a.shape[-1]},)")
    return a[..., mask].sum(-1).mean(-1)


def basic_head_stats(attention: np.ndarray, cls_mask: np.ndarray, sep_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The measures stored for every (sentence, layer, head): entropy, max weight, to [CLS], to [SEP]."""
    return {
        "entropy": head_entropy(attention),
        "max_weight": head_max_weight(attention),
        "attn_cls": attention_to(attention, cls_mask),
        "attn_sep": attention_to(attention, sep_mask),
    }
