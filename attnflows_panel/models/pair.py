"""A pre-trained and a fine-tuned model that can be compared head by head."""

from __future__ import annotations

from dataclasses import dataclass

from attnflows_panel.errors import ModelError
from attnflows_panel.models.loading import LoadedModel

# Text whose tokenization both models of a pair must agree on (casing, accents, punctuation, digits).
PROBE_TEXT = "Hello World! Isn't attnflows' café review #42 great?"


@dataclass(eq=False)
class ModelPair:
    """Two models with the same tokenizer and the same number of layers and heads."""

    pretrained: LoadedModel
    finetuned: LoadedModel

    def __post_init__(self) -> None:
        validate_pair(self.pretrained, self.finetuned)

    @property
    def n_layers(self) -> int:
        return self.pretrained.n_layers

    @property
    def n_heads(self) -> int:
        return self.pretrained.n_heads


def pair_differences(a: LoadedModel, b: LoadedModel) -> list[str]:
    """What keeps two models from being compared, each as a short phrase; empty when they match."""
    diffs = []
    if a.n_layers != b.n_layers:
        diffs.append(f"layers {a.n_layers} vs {b.n_layers}")
    if a.n_heads != b.n_heads:
        diffs.append(f"heads per layer {a.n_heads} vs {b.n_heads}")
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        changed = len(set(va.items()) ^ set(vb.items()))
        diffs.append(f"tokenizer vocabularies differ ({len(va)} vs {len(vb)} entries, {changed} differing)")
    sa, sb = _special_tokens(a), _special_tokens(b)
    if sa != sb:
        names = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        diffs.append("special tokens differ: " + ", ".join(f"{k} {sa.get(k)} vs {sb.get(k)}" for k in names))
    if va == vb and a.tokenizer(PROBE_TEXT)["input_ids"] != b.tokenizer(PROBE_TEXT)["input_ids"]:
        diffs.append("tokenizers split the same text differently (casing or normalization)")
    return diffs


def validate_pair(a: LoadedModel, b: LoadedModel) -> None:
    """Raise a one-line ``ModelError`` saying what differs when two models cannot be compared."""
    diffs = pair_differences(a, b)
    if diffs:
        raise ModelError(f"{a.model_id} and {b.model_id} cannot be compared: " + "; ".join(diffs))


def _special_tokens(lm: LoadedModel) -> dict[str, tuple[str, int | None]]:
    tok = lm.tokenizer
    out = {}
    for name in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token"):
        value = getattr(tok, name, None)
        if value is not None:
            out[name] = (str(value), tok.convert_tokens_to_ids(str(value)))
    return out
