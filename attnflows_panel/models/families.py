"""Model families: what attnflows needs to know of an architecture, looked up by ``config.model_type``.

A family says whether its attention is causal (then the default root is the last token, the
next-token prediction, instead of ``[CLS]``) and where each layer concatenates its heads' contexts,
the input of the module a head intervention (ablation, importance) hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnflows_panel.errors import ModelError


@dataclass(frozen=True)
class ContextSite:
    """A module whose input is the concatenated context of all heads, and the layers it serves in call order."""

    module: Any
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """One architecture family: its model types, causality and the paths to its per-layer context modules."""

    name: str
    model_types: tuple[str, ...]
    causal: bool
    layers: str  # dotted path from the base model to its list of layers
    context: str  # dotted path from a layer to the module taking the concatenated head contexts

    def context_sites(self, base_model: Any, n_layers: int, config: Any) -> list[ContextSite]:
        """The context module of every layer of ``base_model``."""
        layers = _follow(base_model, self.layers) if self.layers else None
        if layers is None:
            raise ModelError(f"cannot switch heads of model type {config.model_type!r} on or off; attnflows knows the layouts of {supported_model_types()}")
        sites = [ContextSite(_follow(layer, self.context), (i,)) for i, layer in enumerate(layers)]
        if any(site.module is None for site in sites):
            raise ModelError(f"a {self.name} model of type {config.model_type!r} without {self.context!r} in each layer")
        return sites


@dataclass(frozen=True)
class SharedLayersFamily(Family):
    """ALBERT: groups of layers share one module, run in turn (AlbertTransformer sends layer i to group ``int(i / (L / groups))``)."""

    def context_sites(self, base_model: Any, n_layers: int, config: Any) -> list[ContextSite]:
        inner = int(getattr(config, "inner_group_num", 1))
        if inner != 1:
            raise ModelError(f"ALBERT with inner_group_num={inner} is not supported (only 1 is)")
        groups = _follow(base_model, self.layers)
        served = [tuple(i for i in range(n_layers) if int(i / (n_layers / len(groups))) == g) for g in range(len(groups))]
        return [ContextSite(_follow(group, self.context), layers) for group, layers in zip(groups, served, strict=True) if layers]


FAMILIES = (
    Family("BERT", ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie", "ibert"), False, "encoder.layer", "attention.output.dense"),
    Family("DistilBERT", ("distilbert",), False, "transformer.layer", "attention.out_lin"),
    SharedLayersFamily("ALBERT", ("albert",), False, "encoder.albert_layer_groups", "albert_layers.0.attention.dense"),
    Family("GPT-2", ("gpt2",), True, "h", "attn.c_proj"),
    Family("LLaMA", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), True, "layers", "self_attn.o_proj"),
)


def supported_model_types(causal: bool | None = None) -> str:
    """The families (all, or only the causal or non-causal ones) and their model types, for an error message."""
    return "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES if causal is None or family.causal == causal)


# Any other encoder still loads and extracts (its attention needs no adapter); only head interventions need its layout.
OTHER_ENCODER = Family("encoder", (), False, "", "")
LANGUAGE_MODEL_CLASSES = ("ForCausalLM", "LMHeadModel")  # how transformers names a model class with a language-model head


def family_of(config: Any) -> Family:
    """The family of a model with this ``config``; an unknown decoder or an encoder-decoder is a ``ModelError`` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model type {model_type!r} is an encoder-decoder; attnflows knows encoders and the decoders of {supported_model_types(causal=True)}")
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith(LANGUAGE_MODEL_CLASSES) for a in architectures):
        raise ModelError(f"decoder model type {model_type!r} is not supported; attnflows knows {supported_model_types(causal=True)}")
    return OTHER_ENCODER


def context_features(module: Any) -> int:
    """The input width of a context module: a Linear's ``in_features``, a GPT-2 Conv1D's first weight dimension."""
    features = getattr(module, "in_features", None)
    return int(features) if features is not None else int(module.weight.shape[0])


def _follow(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name, None)
        if module is None:
            return None
    return module
