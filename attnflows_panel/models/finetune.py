"""Fine-tune a model on the CPU, seeded, cached, written atomically.

The default objective, ``classify``, puts a new sequence-classification head on an encoder or a decoder
(a decoder's reads its last real token) and trains it on labelled texts; ``lm`` trains a decoder's
language-model head on the texts alone, so a base LLM and its fine-tune on a domain compare head by head.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from attnflows_panel.corpus import Corpus, corpus_file, read_corpus, sentiment_corpus, sentiment_sha256, split_corpus
from attnflows_panel.errors import InputError
from attnflows_panel.models.families import family_of, supported_model_types
from attnflows_panel.models.loading import LoadedModel, default_pretrained_path, load_encoder
from attnflows_panel.paths import atomic_dir, home, recorded_sha256, remove_stale_temporaries, sha256_file, sha256_json

FORMAT_VERSION = 1
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"
OBJECTIVES = ("classify", "lm")  # a classification head on the labels; a decoder's language-model head on the texts
IGNORED = -100  # the label transformers leaves out of a language-model loss (padding)


@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune on what; every setting is part of the cache key (base and data by their content)."""

    base: str = ""  # hub name or local path; empty means the offline default
    data: str = ""  # CSV/JSONL with text (or text_a + text_b) and label; empty means the bundled sentiment corpus
    max_train: int = 3000
    heldout: int | None = None  # None: 1,000 or 10% of a small corpus
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1e-4
    max_length: int = 128
    seed: int = 0
    data_encoding: str = "utf-8"  # of ``data``; part of the key only when it is not the default
    objective: str = "classify"  # or "lm" (decoders only: labels are ignored); part of the key only when it is not the default

    def validate(self) -> None:
        """Raise ``InputError`` naming the first bad value."""
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        for name in ("max_train", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.heldout is not None and self.heldout < 1:
            raise InputError(f"heldout must be at least 1, got {self.heldout}")
        if not (0 < self.learning_rate < 1):
            raise InputError(f"learning_rate must be in (0, 1), got {self.learning_rate}")


@dataclass(frozen=True)
class FinetuneResult:
    """Where the checkpoint is, its metrics, and whether it came from the cache."""

    path: Path
    metrics: dict[str, Any]
    reused: bool


def _base_source(config: FinetuneConfig) -> str:
    return config.base or str(default_pretrained_path())


def _base_fingerprint(base: str) -> str:
    """Hash of a local model's weight files (by their recorded hashes), or the hub name itself."""
    path = Path(base).expanduser()
    if not path.is_dir():
        return base
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
    return sha256_json([(p.name, recorded_sha256(p)) for p in files])


def _data_fingerprint(config: FinetuneConfig) -> str:
    """The training data's hash (the ``sha256`` of the corpus ``_load_data`` reads), without reading its texts."""
    return recorded_sha256(corpus_file(config.data)) if config.data else sentiment_sha256()


def _task(config: FinetuneConfig) -> str:
    """The task's name in the checkpoint's: the data file's stem, or ``sentiment`` for the bundled corpus."""
    if not config.data:
        return "sentiment"
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(config.data).stem).strip("-").lower() or "data"


def _load_data(config: FinetuneConfig) -> tuple[Corpus, str]:
    classify = config.objective == "classify"
    corpus = read_corpus(config.data, require_labels=classify, encoding=config.data_encoding) if config.data else sentiment_corpus()
    task = _task(config)
    if classify and len(corpus.label_names) < 2:
        raise InputError(f"fine-tuning needs at least two labels; {corpus.source} has {corpus.label_names}")
    return corpus, task


def checkpoint_dir(config: FinetuneConfig, task: str, key: str) -> Path:
    """The cache directory of a fine-tuned checkpoint."""
    if not config.base:
        name = "all-minilm-l6-v2"
    else:
        path = Path(config.base).expanduser()
        name = re.sub(r"[^A-Za-z0-9]+", "-", path.name if path.exists() else config.base).strip("-")
    objective = "" if config.objective == "classify" else f"-{config.objective}"
    return home() / "models" / f"{name}-{task}{objective}-{key[:12]}"


def _valid_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    try:
        metrics = json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    weights = path / WEIGHTS_FILE
    if metrics.get("key") != key or not weights.is_file() or recorded_sha256(weights) != metrics.get("weights_sha256"):
        return None
    return metrics


def finetune(config: FinetuneConfig | None = None, force: bool = False, progress: bool = True, device: str = "cpu") -> FinetuneResult:
    """Fine-tune ``config.base`` on ``config.data``; reuse the cached checkpoint when one matches."""
    config = config or FinetuneConfig()
    config.validate()
    if config.objective == "lm":
        _refuse_an_encoder(_base_source(config))  # before the data is read and the weights hashed
    remove_stale_temporaries(home() / "models")  # checkpoints half written by a killed fine-tune
    base = _base_source(config)
    base_fingerprint, data_sha256 = _base_fingerprint(base), _data_fingerprint(config)
    # identity by content, not by path: another checkout, venv or copy of the same weights and data reuses the checkpoint
    settings = asdict(config) | {"base": None, "data": None}
    if config.data_encoding == "utf-8":
        del settings["data_encoding"]  # the keys of checkpoints made before it existed
    if config.objective == "classify":
        del settings["objective"]  # likewise
    key = sha256_json({"config": settings, "base": base_fingerprint, "data": data_sha256, "format": FORMAT_VERSION})
    target = checkpoint_dir(config, _task(config), key)
    if not force and (metrics := _valid_checkpoint(target, key)) is not None:
        return FinetuneResult(target, metrics, reused=True)

    import torch  # only now: a reused checkpoint needs neither them nor the data's texts
    import transformers
    from tqdm.auto import tqdm

    corpus, task = _load_data(config)
    train, heldout = split_corpus(corpus, config.heldout, seed=13)
    rng = np.random.default_rng(config.seed)
    if len(train) > config.max_train:
        train = train.subset(np.sort(rng.choice(len(train), config.max_train, replace=False)))
    language_modelling = config.objective == "lm"
    labels = None if language_modelling else corpus.label_names
    label_index = {name: i for i, name in enumerate(labels or [])}

    torch.manual_seed(config.seed)
    if language_modelling:
        lm = _language_model(base, device)
        before = evaluate_language_model(lm, heldout, config.max_length)  # the base model's, the baseline
    else:
        lm = load_encoder(base, device=device, labels=labels)
        if lm.family.causal:  # a decoder's head reads each row's last token that is not this id: the one batches are padded with
            from attnflows_panel.extract import pad_token_id

            lm.model.config.pad_token_id = pad_token_id(lm)
        baseline = max(heldout.labels.count(n) for n in labels) / len(heldout)
    model = lm.model
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    started = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=f"fine-tuning {target.name}", unit="step", disable=not progress)
    losses = []
    for _epoch in range(config.epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(train), config.batch_size):
            idx = order[start : start + config.batch_size]
            inputs = _batch_inputs(lm, train, idx, config.max_length)
            if language_modelling:
                target_ids = _next_token_labels(inputs)
                if not (target_ids[:, 1:] != IGNORED).any():  # only one-token texts: nothing to predict, and a mean over nothing is NaN
                    bar.update(1)
                    continue
            else:
                target_ids = torch.tensor([label_index[train.labels[i]] for i in idx], device=lm.device)
            loss = model(**inputs, labels=target_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.detach().item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    train_seconds = time.perf_counter() - started
    if not losses:
        raise InputError(f"no training text of {corpus.source} has two tokens: there is no next token to learn")
    model.eval()
    if language_modelling:
        after = evaluate_language_model(lm, heldout, config.max_length)
        scores = {
            "heldout_metric": "perplexity",  # exp of the mean next-token loss over the held-out texts' tokens; lower is better
            "heldout_perplexity": after["perplexity"],
            "baseline_perplexity": before["perplexity"],  # the base model's, before fine-tuning
            "heldout_next_token_accuracy": after["next_token_accuracy"],
            "baseline_next_token_accuracy": before["next_token_accuracy"],
            "heldout_tokens": after["tokens"],
        }
    else:
        scores = {"heldout_metric": "accuracy", "heldout_accuracy": evaluate_accuracy(lm, heldout, label_index, config.max_length), "majority_baseline": baseline}

    metrics = {
        "key": key,
        "task": task,
        "objective": config.objective,
        "data_source": corpus.source,
        "data_sha256": data_sha256,
        "labels": labels,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "steps": total,
        "config": asdict(config) | {"base": base},
        "base_fingerprint": base_fingerprint,
        "final_train_loss": float(np.mean(losses[-20:])),
        **scores,
        "train_seconds": round(train_seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "format": FORMAT_VERSION},
    }
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        metrics["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return FinetuneResult(target, metrics, reused=False)


def _batch_inputs(lm: LoadedModel, corpus: Corpus, idx: np.ndarray, max_length: int) -> dict[str, Any]:
    from attnflows_panel.extract import padded_inputs

    texts = [corpus.texts[i] for i in idx]
    pairs = None if corpus.text_pairs is None else [corpus.text_pairs[i] for i in idx]
    enc = lm.tokenizer(texts, pairs, truncation=True, max_length=min(max_length, lm.max_tokens), verbose=False)
    types = enc.get("token_type_ids")
    rows = [_Row(np.asarray(ids), None if types is None else np.asarray(types[i])) for i, ids in enumerate(enc["input_ids"])]
    inputs = padded_inputs(lm, rows)  # padded on the right as extraction pads: with another special token when there is no pad token
    inputs.pop("logits_to_keep", None)  # a language model is trained and scored on the logits of every position
    return inputs


def _next_token_labels(inputs: dict[str, Any]) -> Any:
    """A language model's labels: the input ids, padding left out (transformers shifts them by one)."""
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORED)


def _not_a_decoder(base: str, model_type: str) -> InputError:
    return InputError(f"objective lm trains a decoder's language-model head; {base} is an encoder ({model_type}): use objective classify, or a decoder of {supported_model_types(causal=True)}")


def _refuse_an_encoder(base: str) -> None:
    """Refuse an encoder for objective lm by its config alone; a config that does not load here is left to ``load_encoder`` to word."""
    from transformers import AutoConfig

    path = Path(base).expanduser()
    try:
        model_config = AutoConfig.from_pretrained(str(path) if path.is_dir() else base, local_files_only=True)
        causal = family_of(model_config).causal
    except Exception:  # noqa: BLE001 - not found locally, remote code, an unknown decoder: load_encoder says which
        return
    if not causal:
        raise _not_a_decoder(base, model_config.model_type)


def _language_model(base: str, device: str) -> LoadedModel:
    """``base`` with its language-model head; an encoder or a decoder without that head is an ``InputError``."""
    lm = load_encoder(base, device=device)
    if not lm.family.causal:
        raise _not_a_decoder(base, lm.config.model_type)
    if not lm.is_language_model:
        raise InputError(f"objective lm trains a decoder's language-model head; {base} has a {type(lm.model).__name__} head instead")
    return lm


class _Row(NamedTuple):
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None


def evaluate_accuracy(lm: LoadedModel, corpus: Corpus, label_index: dict[str, int], max_length: int = 128, batch_size: int = 64) -> float:
    """Accuracy of a classifier on a labelled corpus."""
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(corpus), batch_size):
            idx = np.arange(start, min(start + batch_size, len(corpus)))
            logits = lm.model(**_batch_inputs(lm, corpus, idx, max_length)).logits
            predicted = logits.argmax(-1).cpu().numpy()
            correct += int(sum(int(p) == label_index[corpus.labels[i]] for p, i in zip(predicted, idx, strict=True)))
    return correct / len(corpus)


def evaluate_language_model(lm: LoadedModel, corpus: Corpus, max_length: int = 128, batch_size: int = 16) -> dict[str, float]:
    """A language model's held-out perplexity and next-token accuracy over every predicted token of ``corpus`` (padding left out)."""
    import torch

    nll, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(corpus), batch_size):
            inputs = _batch_inputs(lm, corpus, np.arange(start, min(start + batch_size, len(corpus))), max_length)
            logits = lm.model(**inputs).logits[:, :-1]
            target = _next_token_labels(inputs)[:, 1:]
            keep = target != IGNORED
            logits, target = logits[keep].float(), target[keep]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += int(keep.sum())
    if count == 0:
        raise InputError(f"no held-out text of {corpus.source} has two tokens: there is no next token to score")
    return {"perplexity": math.exp(nll / count), "next_token_accuracy": correct / count, "tokens": count}


def default_finetuned(progress: bool = True) -> FinetuneResult:
    """The offline default fine-tuned model: the default encoder fine-tuned on the bundled sentiment corpus."""
    return finetune(FinetuneConfig(), progress=progress)
