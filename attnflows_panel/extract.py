"""Text in, attention out: ``AttentionRecord`` for one input, batched extraction for many."""

from __future__ import annotations

import math
import threading
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from attnflows_panel.analysis.source import AttentionSource, DenseAttention, QueryKeyAttention
from attnflows_panel.errors import InputError, ModelError, TruncationWarning
from attnflows_panel.models.loading import LoadedModel

if TYPE_CHECKING:
    import torch

    from attnflows_panel.models.pair import ModelPair

TOKENIZING = threading.Lock()  # a fast tokenizer called with truncation from two threads at once fails ("Already borrowed")
# Upper bound on the float32 attention one forward batch may hold (B * L * H * n * n * 4 bytes).
BATCH_ATTENTION_BYTES = 256 * 2**20
# A record whose dense attention would be larger keeps queries and keys instead (computed when read).
DENSE_RECORD_BYTES = 32 * 2**20
# A forward call costs about what this many more padded token positions would (measured on MiniLM, one thread: ~8 ms a call).
CALL_TOKENS = 48


@dataclass(frozen=True, eq=False)
class Encoding:
    """One tokenized input, without padding."""

    input_ids: np.ndarray  # [n] int64
    token_type_ids: np.ndarray | None  # [n] int64 when the tokenizer makes them
    word_ids: np.ndarray  # [n] int32, -1 for special tokens, unique across both segments
    segment_ids: np.ndarray  # [n] int8, 0 for the first segment (and its specials), 1 for the second
    tokens: list[str]
    n_truncated: int


@dataclass(frozen=True, eq=False)
class AttentionRecord:
    """Everything one model says about one input: tokens, attention ``[L, H, n, n]`` as a source, and its prediction."""

    text: str
    text_pair: str | None
    model_id: str
    tokens: list[str]
    input_ids: np.ndarray
    word_ids: np.ndarray
    segment_ids: np.ndarray
    cls_mask: np.ndarray
    sep_mask: np.ndarray
    source: AttentionSource  # float32 [layers, heads, query, key], read in blocks; rows sum to 1
    logits: np.ndarray | None = None
    labels: tuple[str, ...] | None = None
    n_truncated: int = 0
    causal: bool = False  # a decoder's: each token attends only to itself and the tokens before it
    next_token: str | None = None  # a language model's prediction (``logits`` are then over its vocabulary)

    @property
    def root_token(self) -> int:
        """Where a trace starts by default: ``[CLS]`` (token 0), or a decoder's last token (its next-token prediction)."""
        return self.n_tokens - 1 if self.causal else 0

    @property
    def root_name(self) -> str:
        """How titles name the default root: its token (``[CLS]``, ``<s>``), or a decoder's "last token"."""
        return "the last token" if self.causal else self.tokens[0]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def attention(self) -> np.ndarray:
        """The whole ``[L, H, n, n]`` array: computed and held on every call for a long input, so views read ``source``."""
        return self.source.dense()

    @property
    def n_layers(self) -> int:
        return self.source.shape[0]

    @property
    def n_heads(self) -> int:
        return self.source.shape[1]

    @property
    def special_mask(self) -> np.ndarray:
        return self.word_ids < 0

    @property
    def probabilities(self) -> np.ndarray | None:
        if self.logits is None:
            return None
        z = np.exp(self.logits - self.logits.max())
        return z / z.sum()

    @property
    def predicted_label(self) -> str | None:
        if self.logits is None:
            return None
        index = int(np.argmax(self.logits))
        if self.labels:
            return self.labels[index]
        return self.next_token if self.next_token is not None else str(index)


def _as_loaded(model: Any, tokenizer: Any, model_id: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if tokenizer is None:
        raise InputError("a tokenizer is needed when the model is not a LoadedModel")
    name = model_id or getattr(model, "name_or_path", "") or type(model).__name__
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=str(name))


def _invisible(char: str) -> bool:
    """Whitespace, a control character (NUL included) or a format character (zero-width space, joiners, BOM)."""
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf")


def is_blank(text: str) -> bool:
    """True for text without a visible character (empty, spaces, zero-width characters)."""
    return all(map(_invisible, text))


def check_text(value: Any, what: str, hint: str = "") -> str:
    """``value`` if it is Unicode text with a visible character, else an ``InputError`` naming ``what`` (and ``hint`` when empty)."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} has an invalid character at position {exc.start} (a lone surrogate, U+{ord(value[exc.start]):04X})") from None
    if is_blank(value):
        raise InputError(f"{what} is empty{': ' + hint if hint else ''}")
    return value


def encode(lm: LoadedModel, text: str, text_pair: str | None = None, warn: bool = True) -> Encoding:
    """Tokenize one input, truncating to the model's maximum with a warning that counts dropped tokens."""
    text = check_text(text, "text")
    if text_pair is not None:
        text_pair = check_text(text_pair, "second segment")
    (encoding,) = encode_batch(lm, [text], None if text_pair is None else [text_pair])
    if encoding.n_truncated and warn:
        warnings.warn(
            f"input has {len(encoding.input_ids) + encoding.n_truncated} tokens but {lm.model_id} takes at most {lm.max_tokens}: "
            f"dropped {encoding.n_truncated} tokens{' (longest segment first)' if text_pair is not None else ' from the end'}",
            TruncationWarning,
            stacklevel=3,
        )
    return encoding


def encode_batch(lm: LoadedModel, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> list[Encoding]:
    """Tokenize checked inputs in one call, each truncated to the model's maximum (dropped tokens counted, not warned)."""
    tok = lm.tokenizer
    limit = lm.max_tokens
    # user text is text: a typed "[CLS]" or "<mask>" is split into word pieces, never made a special token
    with TOKENIZING:
        batch = tok(list(texts), None if text_pairs is None else list(text_pairs), truncation=True, max_length=limit, verbose=False, split_special_tokens=True)
    out = []
    for i, text in enumerate(texts):
        ids = np.asarray(batch["input_ids"][i], dtype=np.int64)
        n_truncated = 0
        if len(ids) == limit:  # perhaps cut: count what the whole input has
            with TOKENIZING:
                full = tok(text, None if text_pairs is None else text_pairs[i], truncation=False, verbose=False, split_special_tokens=True)
            n_truncated = len(full["input_ids"]) - limit
        sequence_ids, raw_word_ids = batch.sequence_ids(i), batch.word_ids(i)
        segment = np.zeros(len(sequence_ids), dtype=np.int8)
        current = 0
        for k, s in enumerate(sequence_ids):
            current = current if s is None else s
            segment[k] = current
        first_words = [w for w, s in zip(raw_word_ids, sequence_ids, strict=True) if s == 0 and w is not None]
        offset = max(first_words) + 1 if first_words else 0
        word_ids = np.array(
            [-1 if w is None else w + (offset if s == 1 else 0) for w, s in zip(raw_word_ids, sequence_ids, strict=True)],
            dtype=np.int32,
        )
        types = np.asarray(batch["token_type_ids"][i], dtype=np.int64) if "token_type_ids" in batch else None
        out.append(Encoding(ids, types, word_ids, segment, tok.convert_ids_to_tokens(ids.tolist()), n_truncated))
    return out


def length_batches(lengths: Sequence[int], per_token_pair_bytes: int, max_batch: int, budget: int = BATCH_ATTENTION_BYTES) -> list[list[int]]:
    """Indices in batches of similar length (sorted), at most ``max_batch`` inputs whose attention stays under ``budget``
    bytes, cut where the token positions computed (padding included) plus :data:`CALL_TOKENS` a batch cost least."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    width = [lengths[i] for i in order]
    cost = [0.0] + [math.inf] * len(order)  # cost[j]: the cheapest batches of the j shortest
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        n = width[j - 1]  # the longest of any batch ending here
        fits = max(1, min(max_batch, budget // max(1, n * n * per_token_pair_bytes)))  # one input alone always runs
        for i in range(j - 1, max(0, j - fits) - 1, -1):
            total = cost[i] + (j - i) * n + CALL_TOKENS
            if total < cost[j]:
                cost[j], cut[j] = total, i
    batches: list[list[int]] = []
    j = len(order)
    while j:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


def pad_token_id(lm: LoadedModel) -> int:
    """The id batches are padded with: the pad token, else another special token of the vocabulary (padding is masked and cut off)."""
    tok = lm.tokenizer
    for token_id in (tok.pad_token_id, tok.sep_token_id, tok.eos_token_id, tok.unk_token_id, tok.cls_token_id):
        if token_id is not None:
            return int(token_id)
    raise ModelError(f"the tokenizer of {lm.model_id} has no pad token nor any other special token to pad a batch with")


class TokenIds(Protocol):
    """Token ids of one input (an ``Encoding``, or a training batch's row)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray | None


def padded_inputs(lm: LoadedModel, encodings: Sequence[TokenIds]) -> dict[str, Any]:
    """Right-padded input tensors for ``encodings`` on the model's device, filtered for its forward."""
    import torch

    width = max(len(e.input_ids) for e in encodings)
    pad = pad_token_id(lm)
    ids = torch.full((len(encodings), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    types = torch.zeros((len(encodings), width), dtype=torch.long)
    for row, e in enumerate(encodings):
        n = len(e.input_ids)
        ids[row, :n] = torch.from_numpy(e.input_ids)
        mask[row, :n] = 1
        if e.token_type_ids is not None:
            types[row, :n] = torch.from_numpy(e.token_type_ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if encodings[0].token_type_ids is not None:
        inputs["token_type_ids"] = types
    if lm.is_language_model:
        inputs["logits_to_keep"] = torch.unique(mask.sum(1) - 1)  # each row's last token only: never [batch, n, vocabulary]
    return {k: v.to(lm.device) for k, v in lm.forward_kwargs(inputs).items()}


def prediction_logits(inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
    """``[batch, classes]``: a classifier's logits as they are, a language model's for the token after each row's last."""
    import torch

    if "logits_to_keep" not in inputs:
        return logits
    last = inputs["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(last), device=logits.device), torch.searchsorted(inputs["logits_to_keep"], last)]


def attention_pass(lm: LoadedModel, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], np.ndarray | None]:
    """A padded batch through the model: each layer's ``[B, H, w, w]`` attention and each row's logits (None without a
    head: such a model's pass stops after its last layer's attention, nothing after it being wanted)."""
    import torch

    from attnflows_panel.models.capture import attention_only

    with torch.inference_mode():
        if lm.model.base_model is lm.model:
            layers, logits = attention_only(lm.model, inputs, lm.n_layers), None
        else:
            out = lm.model(**inputs, output_attentions=True, return_dict=True)
            layers = list(out.attentions or ())
            logits = prediction_logits(inputs, out.logits).float().cpu().numpy() if getattr(out, "logits", None) is not None else None
    if not layers:
        raise ModelError(f"{lm.model_id} returned no attentions; load it with attn_implementation='eager'")
    return layers, logits


def forward_attention(lm: LoadedModel, encodings: Sequence[Encoding], max_batch: int = 32) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Run the model on encodings in length-bucketed batches; per input: attention ``[L,H,n,n]`` and logits."""
    results: list[tuple[np.ndarray, np.ndarray | None]] = [None] * len(encodings)  # type: ignore[list-item]
    per_pair = lm.n_layers * lm.n_heads * 4
    for batch in length_batches([len(e.input_ids) for e in encodings], per_pair, max_batch):
        layers, logits = attention_pass(lm, padded_inputs(lm, [encodings[i] for i in batch]))
        # each layer's tensor is freed once copied: the peak is the record and one layer, not twice the record
        attention = np.empty((layers[0].shape[0], len(layers), *layers[0].shape[1:]), dtype=np.float32)  # [B, L, H, n, n]
        for index in range(len(layers)):
            attention[:, index] = layers[index].float().cpu().numpy()
            layers[index] = None
        for row, i in enumerate(batch):
            n = len(encodings[i].input_ids)
            results[i] = (
                np.ascontiguousarray(attention[row, :, :, :n, :n]),
                None if logits is None else logits[row].copy(),
            )
    return results


def _mask_key(mask: Any) -> tuple[Any, ...]:
    """The same key for every layer's view of one mask tensor (each layer slices its own view object)."""
    return (mask.data_ptr(), tuple(mask.shape), mask.stride())


def forward_sources(lm: LoadedModel, encodings: Sequence[Encoding], max_batch: int = 32) -> list[tuple[QueryKeyAttention, np.ndarray | None]]:
    """As :func:`forward_attention`, but each input's attention as a :class:`QueryKeyAttention`: no ``[n, n]`` weights held."""
    import torch

    from attnflows_panel.models.capture import IMPLEMENTATION, capturing

    results: list[tuple[QueryKeyAttention, np.ndarray | None]] = [None] * len(encodings)  # type: ignore[list-item]
    for batch in length_batches([len(e.input_ids) for e in encodings], 4, max_batch):  # the additive mask: 4 bytes a token pair
        inputs = padded_inputs(lm, [encodings[i] for i in batch])
        with torch.inference_mode(), capturing() as layers:
            out = lm.model(**inputs, return_dict=True)
        if len(layers) != lm.n_layers:
            raise ModelError(f"{lm.model_id} did not run attnflows' attention in each of its {lm.n_layers} layers; load it with load_encoder (attn_implementation={IMPLEMENTATION!r})")
        logits = prediction_logits(inputs, out.logits).float().cpu().numpy() if getattr(out, "logits", None) is not None else None
        for row, i in enumerate(batch):
            n = len(encodings[i].input_ids)
            masks: dict[Any, np.ndarray | None] = {}  # layers slice views of one mask tensor: keep one copy of each storage
            for layer in layers:
                if layer.mask is not None and _mask_key(layer.mask) not in masks:
                    m = layer.mask[row, 0, :n, :n].float().cpu().numpy()
                    masks[_mask_key(layer.mask)] = np.ascontiguousarray(m) if m.any() else None
            source = QueryKeyAttention(
                [layer.query[row, :, :n].float().cpu().numpy().copy() for layer in layers],
                [layer.key[row, :, :n].float().cpu().numpy().copy() for layer in layers],
                [None if layer.mask is None else masks[_mask_key(layer.mask)] for layer in layers],
                [layer.scaling for layer in layers],
                [layer.softcap for layer in layers],
            )
            results[i] = (source, None if logits is None else logits[row].copy())
    return results


def forward_record(lm: LoadedModel, encoding: Encoding) -> tuple[AttentionSource, np.ndarray | None]:
    """One input's attention and logits: dense while ``[L, H, n, n]`` fits :data:`DENSE_RECORD_BYTES` (or the model cannot be captured), else queries and keys."""
    if lm.captures and lm.n_layers * lm.n_heads * len(encoding.input_ids) ** 2 * 4 > DENSE_RECORD_BYTES:
        return forward_sources(lm, [encoding])[0]
    ((attention, logits),) = forward_attention(lm, [encoding])
    return DenseAttention(attention), logits


def make_record(lm: LoadedModel, encoding: Encoding, text: str, text_pair: str | None, attention: np.ndarray | AttentionSource, logits: np.ndarray | None) -> AttentionRecord:
    """Assemble a record from an encoding and the model's outputs for it (an array or a source)."""
    tok = lm.tokenizer
    labels = tuple(lm.labels) if lm.labels else None
    next_token = tok.convert_ids_to_tokens(int(np.argmax(logits))) if lm.is_language_model and logits is not None else None
    return AttentionRecord(
        text=text,
        text_pair=text_pair,
        model_id=lm.model_id,
        tokens=encoding.tokens,
        input_ids=encoding.input_ids,
        word_ids=encoding.word_ids,
        segment_ids=encoding.segment_ids,
        cls_mask=encoding.input_ids == (tok.cls_token_id if tok.cls_token_id is not None else -1),
        sep_mask=encoding.input_ids == (tok.sep_token_id if tok.sep_token_id is not None else -1),
        source=attention if isinstance(attention, AttentionSource) else DenseAttention(attention),
        logits=logits,
        labels=labels,
        n_truncated=encoding.n_truncated,
        causal=lm.family.causal,
        next_token=next_token,
    )


def extract(model: Any, tokenizer: Any, text: str, text_pair: str | None = None, *, model_id: str | None = None) -> AttentionRecord:
    """Attention of one input (a sentence or a sentence pair) through one model.

    ``model`` is a transformers model loaded with ``attn_implementation="eager"`` and ``tokenizer`` its
    fast tokenizer, or a ``LoadedModel`` (then ``tokenizer`` may be None).
    """
    lm = _as_loaded(model, tokenizer, model_id)
    encoding = encode(lm, text, text_pair)
    attention, logits = forward_record(lm, encoding)
    return make_record(lm, encoding, text, text_pair, attention, logits)


def extract_pair(pair: ModelPair, text: str, text_pair: str | None = None) -> tuple[AttentionRecord, AttentionRecord]:
    """Records of both models of a pair for one input, from identical input ids."""
    encoding = encode(pair.pretrained, text, text_pair)
    records = []
    for lm in (pair.pretrained, pair.finetuned):
        attention, logits = forward_record(lm, encoding)
        records.append(make_record(lm, encoding, text, text_pair, attention, logits))
    return records[0], records[1]


def merge_tokens(tokens: list[str], word_ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Words from word pieces (``##`` / ``Ġ`` / ``▁`` markers dropped) and each token's word index."""
    words: list[str] = []
    index = np.empty(len(tokens), dtype=np.int64)
    previous = None
    for i, (token, wid) in enumerate(zip(tokens, word_ids.tolist(), strict=True)):
        piece = token[2:] if token.startswith("##") else token.lstrip("Ġ▁")
        if wid >= 0 and wid == previous:
            words[-1] += piece
        else:
            words.append(piece or token)
        index[i] = len(words) - 1
        previous = wid if wid >= 0 else None
    return words, index
