"""A run directory: attention and per-head statistics of a corpus, written shard by shard, atomically.

Layout (readable by pandas, pyarrow and dask; every shard file is hashed in the manifest)::

    RUN_DIR/manifest.json             models, corpus, versions, finished shards and their sha256
    RUN_DIR/sentences.parquet         sentence_id, text, text_pair, label
    RUN_DIR/stats/part-NNNNN.parquet  tidy: sentence_id, model, layer, head, entropy, max_weight, attn_cls, attn_sep
    RUN_DIR/tokens/part-NNNNN.parquet sentence_id, tokens, input_ids, word_ids, segment_ids, n_truncated, predictions
    RUN_DIR/attention/part-NNNNN.npz  per model a flat float16 array of every sentence's [L, H, n, n], plus offsets
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnflows_panel.analysis.heads import basic_head_stats
from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import InputError, StoreError, TruncationWarning
from attnflows_panel.extract import Encoding, encode, forward_attention
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import validate_pair
from attnflows_panel.paths import atomic_file, remove_stale_temporaries, sha256_file, sha256_json, write_json_atomic

FORMAT = "attnflows-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = ("stats", "tokens", "attention")


def _part_name(part: str, shard: int) -> str:
    return f"{part}/part-{shard:05d}.{'npz' if part == 'attention' else 'parquet'}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("attnflows-panel", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"not an attnflows run directory (no {MANIFEST}): {run_dir}") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is corrupted: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path} is not an attnflows run of format version {FORMAT_VERSION}")
    return manifest


@dataclass
class RunStore:
    """Read access to a run directory; every shard is checked against its hash before use."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> RunStore:
        run_dir = Path(path).expanduser()
        if not run_dir.is_dir():
            raise StoreError(f"run directory does not exist: {run_dir}")
        return cls(run_dir, _read_manifest(run_dir))

    def __post_init__(self) -> None:
        self._verified: set[str] = set()
        self._loaded: tuple[int, dict[str, np.ndarray]] | None = None  # the last attention shard read

    def _attention_shard(self, shard: dict[str, Any]) -> dict[str, np.ndarray]:
        """Every array of one attention shard, kept until another shard is read."""
        if self._loaded is None or self._loaded[0] != shard["shard"]:
            with np.load(self._file(shard, "attention")) as data:
                self._loaded = (shard["shard"], {key: data[key] for key in data.files})
        return self._loaded[1]

    @property
    def models(self) -> list[str]:
        return [m["name"] for m in self.manifest["models"]]

    @property
    def n_layers(self) -> int:
        return int(self.manifest["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.manifest["n_heads"])

    @property
    def complete(self) -> bool:
        return sum(s["stop"] - s["start"] for s in self.manifest["shards"]) == self.manifest["n_sentences"]

    def _file(self, shard: dict[str, Any], part: str) -> Path:
        name = _part_name(part, shard["shard"])
        path = self.path / name
        if name not in self._verified:
            if not path.is_file():
                raise StoreError(f"{path} is missing; run `attnflows extract` again to recompute it")
            if sha256_file(path) != shard["sha256"][part]:
                raise StoreError(f"{path} is corrupted (hash mismatch); run `attnflows extract` again to recompute it")
            self._verified.add(name)
        return path

    def _concat(self, part: str) -> pd.DataFrame:
        frames = [pd.read_parquet(self._file(s, part)) for s in self.manifest["shards"]]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def sentences(self) -> pd.DataFrame:
        """Every sentence of the corpus (extracted or not yet)."""
        path = self.path / "sentences.parquet"
        if sha256_file(path) != self.manifest["sentences_sha256"]:
            raise StoreError(f"{path} is corrupted (hash mismatch)")
        return pd.read_parquet(path)

    def head_stats(self) -> pd.DataFrame:
        """Tidy per-(sentence, model, layer, head) statistics of the extracted sentences."""
        return self._concat("stats")

    def tokens(self) -> pd.DataFrame:
        """Tokens, ids, word and segment ids and predictions of the extracted sentences."""
        return self._concat("tokens")

    def attention(self, sentence_id: int, model: str) -> np.ndarray:
        """Attention ``[L, H, n, n]`` (float32 from the stored float16) of one sentence through one model."""
        if model not in self.models:
            raise InputError(f"unknown model {model!r}; this run has {', '.join(self.models)}")
        for shard in self.manifest["shards"]:
            if shard["start"] <= sentence_id < shard["stop"]:
                data = self._attention_shard(shard)
                k = int(sentence_id - shard["start"])
                n = int(data["n_tokens"][k])
                flat = data[model][data["offsets"][k] : data["offsets"][k + 1]]
                return flat.astype(np.float32).reshape(self.n_layers, self.n_heads, n, n)
        raise InputError(f"sentence {sentence_id} is not in this run (extracted: {self.describe()})")

    def describe(self) -> str:
        done = sum(s["stop"] - s["start"] for s in self.manifest["shards"])
        return f"{done} of {self.manifest['n_sentences']} sentences, models {', '.join(self.models)}"


def _fingerprint(models: Mapping[str, LoadedModel], corpus: Corpus, shard_size: int) -> tuple[str, list[dict[str, Any]]]:
    described = [
        {"name": name, "model_id": lm.model_id, "checkpoint_sha256": lm.checkpoint_hash, "max_tokens": lm.max_tokens}
        for name, lm in models.items()
    ]
    key = {
        # models by their weights, not their paths: a run made in another checkout or venv stays valid
        "models": [{k: v for k, v in model.items() if k != "model_id"} for model in described],
        "corpus_sha256": corpus.sha256 or sha256_json([corpus.texts, corpus.text_pairs]),
        "n_sentences": len(corpus),
        "shard_size": shard_size,
        "format_version": FORMAT_VERSION,
    }
    return sha256_json(key), described


def _prepare_run_dir(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest to resume from, or None for a fresh start; stale or foreign content is handled here."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        raise InputError(f"output path exists and is not a directory: {run_dir}")
    if not (run_dir / MANIFEST).exists():
        if any(run_dir.iterdir()):
            raise InputError(f"output directory is not empty and is not an attnflows run: {run_dir}")
        return None
    try:
        manifest = _read_manifest(run_dir)
    except StoreError as exc:
        warnings.warn(f"{exc}; recomputing the run", stacklevel=3)
        manifest = None
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        return manifest
    if manifest is not None:
        warnings.warn(f"{run_dir} was made from other models, corpus or settings; recomputing it", stacklevel=3)
    for part in PARTS:
        shutil.rmtree(run_dir / part, ignore_errors=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)
    return None


def _valid_shards(run_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished shards whose files are all present and match their hashes."""
    valid = []
    for shard in manifest["shards"]:
        paths = {part: run_dir / _part_name(part, shard["shard"]) for part in PARTS}
        if all(p.is_file() and sha256_file(p) == shard["sha256"][part] for part, p in paths.items()):
            valid.append(shard)
        else:
            warnings.warn(f"shard {shard['shard']} of {run_dir} is missing or corrupted; recomputing it", stacklevel=3)
    return valid


def _write_sentences(run_dir: Path, corpus: Corpus) -> str:
    frame = pd.DataFrame(
        {
            "sentence_id": np.arange(len(corpus), dtype=np.int64),
            "text": corpus.texts,
            "text_pair": corpus.text_pairs if corpus.text_pairs is not None else [None] * len(corpus),
            "label": corpus.labels if corpus.labels is not None else [None] * len(corpus),
        }
    )
    path = run_dir / "sentences.parquet"
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return sha256_file(path)


def _shard_frames(
    models: Mapping[str, LoadedModel], start: int, encodings: list[Encoding], outputs: dict[str, list[tuple[np.ndarray, np.ndarray | None]]]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    first = next(iter(models.values()))
    cls_id, sep_id = first.tokenizer.cls_token_id, first.tokenizer.sep_token_id
    stats_rows: list[pd.DataFrame] = []
    token_rows: dict[str, list[Any]] = {
        "sentence_id": [], "n_tokens": [], "n_truncated": [], "tokens": [], "input_ids": [], "word_ids": [], "segment_ids": []
    }
    arrays: dict[str, np.ndarray] = {}
    offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
    for k, enc in enumerate(encodings):
        n = len(enc.input_ids)
        offsets[k + 1] = offsets[k] + first.n_layers * first.n_heads * n * n
        token_rows["sentence_id"].append(start + k)
        token_rows["n_tokens"].append(n)
        token_rows["n_truncated"].append(enc.n_truncated)
        token_rows["tokens"].append(enc.tokens)
        token_rows["input_ids"].append(enc.input_ids.tolist())
        token_rows["word_ids"].append(enc.word_ids.tolist())
        token_rows["segment_ids"].append(enc.segment_ids.astype(np.int64).tolist())
    layer, head = np.meshgrid(np.arange(first.n_layers), np.arange(first.n_heads), indexing="ij")
    for name, lm in models.items():
        flat = np.empty(offsets[-1], dtype=np.float16)
        predictions, probabilities = [], []
        for k, enc in enumerate(encodings):
            attention, logits = outputs[name][k]
            flat[offsets[k] : offsets[k + 1]] = attention.astype(np.float16).ravel()
            stats = basic_head_stats(attention, enc.input_ids == cls_id, enc.input_ids == sep_id)
            stats_rows.append(
                pd.DataFrame(
                    {"sentence_id": start + k, "model": name, "layer": layer.ravel(), "head": head.ravel()}
                    | {measure: values.ravel().astype(np.float32) for measure, values in stats.items()}
                )
            )
            if logits is not None:
                p = np.exp(logits - logits.max())
                p /= p.sum()
                predictions.append(lm.labels[int(np.argmax(logits))] if lm.labels else str(int(np.argmax(logits))))
                probabilities.append(p.astype(np.float32).tolist())
        arrays[name] = flat
        if predictions:
            token_rows[f"predicted_{name}"] = predictions
            token_rows[f"probabilities_{name}"] = probabilities
    arrays["offsets"] = offsets
    arrays["n_tokens"] = np.array(token_rows["n_tokens"], dtype=np.int64)
    return pd.concat(stats_rows, ignore_index=True), pd.DataFrame(token_rows), arrays


def extract_corpus(
    models: Mapping[str, LoadedModel],
    corpus: Corpus,
    run_dir: str | Path,
    shard_size: int = 128,
    max_batch: int = 32,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> RunStore:
    """Extract every sentence of ``corpus`` through every model into ``run_dir``; resumes a stopped run.

    ``models`` maps a short name ("pretrained", "finetuned") to a model; all must share one tokenizer.
    Memory stays bounded by one shard; each finished shard is written atomically and recorded in the manifest.
    """
    from tqdm.auto import tqdm

    if not models:
        raise InputError("no models to extract with")
    if shard_size < 1 or max_batch < 1:
        raise InputError(f"shard_size and max_batch must be at least 1, got {shard_size} and {max_batch}")
    if len(corpus) == 0:
        raise InputError("the corpus has no sentences")
    corpus.check_texts()  # before the run directory is made
    loaded = list(models.values())
    for other in loaded[1:]:
        validate_pair(loaded[0], other)
    run_dir = Path(run_dir).expanduser()
    fingerprint, described = _fingerprint(models, corpus, shard_size)
    remove_stale_temporaries(run_dir, rf"{re.escape(MANIFEST)}|sentences\.parquet")  # left by a killed run
    for part in PARTS:
        remove_stale_temporaries(run_dir / part, r"part-\d+\.(parquet|npz)")
    manifest = _prepare_run_dir(run_dir, fingerprint)
    run_dir.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "models": described,
            "n_layers": loaded[0].n_layers,
            "n_heads": loaded[0].n_heads,
            "corpus": {"source": corpus.source, "sha256": corpus.sha256, "has_pairs": corpus.text_pairs is not None},
            "n_sentences": len(corpus),
            "shard_size": shard_size,
            "versions": _versions(),
            "shards": [],
        }
        manifest["sentences_sha256"] = _write_sentences(run_dir, corpus)
        write_json_atomic(run_dir / MANIFEST, manifest)
    else:
        manifest["shards"] = _valid_shards(run_dir, manifest)
        if sha256_file(run_dir / "sentences.parquet") != manifest.get("sentences_sha256"):
            manifest["sentences_sha256"] = _write_sentences(run_dir, corpus)
        write_json_atomic(run_dir / MANIFEST, manifest)

    done = {s["shard"] for s in manifest["shards"]}
    n_shards = -(-len(corpus) // shard_size)
    truncated = 0
    bar = tqdm(total=len(corpus), desc=f"extracting {run_dir.name}", unit="sentence", disable=not progress)
    bar.update(sum(s["stop"] - s["start"] for s in manifest["shards"]))
    for shard in range(n_shards):
        if shard in done:
            continue
        start, stop = shard * shard_size, min(len(corpus), (shard + 1) * shard_size)
        pairs = corpus.text_pairs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            encodings = [encode(loaded[0], corpus.texts[i], None if pairs is None else pairs[i], warn=False) for i in range(start, stop)]
        truncated += sum(e.n_truncated > 0 for e in encodings)
        outputs = {name: forward_attention(lm, encodings, max_batch) for name, lm in models.items()}
        stats, tokens, arrays = _shard_frames(models, start, encodings, outputs)
        hashes = {}
        for part in PARTS:
            path = run_dir / _part_name(part, shard)
            with atomic_file(path) as tmp:
                if part == "attention":
                    with open(tmp, "wb") as fh:
                        np.savez(fh, **arrays)
                else:
                    (stats if part == "stats" else tokens).to_parquet(tmp, index=False)
            hashes[part] = sha256_file(path)
        manifest["shards"].append({"shard": shard, "start": start, "stop": stop, "sha256": hashes})
        manifest["shards"].sort(key=lambda s: s["shard"])
        write_json_atomic(run_dir / MANIFEST, manifest)
        bar.update(stop - start)
        if on_shard is not None:
            on_shard(shard)
    bar.close()
    if truncated:
        limit = loaded[0].max_tokens
        warnings.warn(f"{truncated} sentences were longer than {limit} tokens and were truncated", TruncationWarning, stacklevel=2)
    return RunStore.open(run_dir)
