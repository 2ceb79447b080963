"""A run directory: per-head statistics and sparse attention of a corpus, written shard by shard, atomically.

Layout (tidy Parquet, readable by pandas, pyarrow and ``dask.dataframe``; every file hashed in its shard's record)::

    RUN_DIR/manifest.json                  models, corpus, settings, versions (written once)
    RUN_DIR/sentences.parquet              sentence_id, text, text_pair, label
    RUN_DIR/shards/part-NNNNN.json         a finished shard: its sentences, and each file's sha256, size and mtime
    RUN_DIR/stats/part-NNNNN.parquet       sentence_id, model, layer, head, entropy, max_weight, attn_cls, attn_sep
    RUN_DIR/differences/part-NNNNN.parquet sentence_id, layer, head, js, cosine (the first two models; runs of two or more)
    RUN_DIR/tokens/part-NNNNN.parquet      sentence_id, n_tokens, tokens, input_ids, word_ids, segment_ids, predictions
    RUN_DIR/entries/part-NNNNN.parquet     sentence_id, model, layer, head, query, key, weight (float16, at least tau_min;
                                           in the order the batches found them: ``RunStore.entries`` reads one sentence's)
    RUN_DIR/distances/part-NNNNN.parquet   i, j, total, n_sentences, n_tokens: head distances over the head map's sentences

A shard is committed by its record, written after its files: a killed run leaves no half-written shard.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import InputError, StoreError, TruncationWarning
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import validate_pair
from attnflows_panel.paths import atomic_file, remove_stale_temporaries, sha256_file, sha256_json, write_json_atomic
from attnflows_panel.shard import TAU_MIN, BatchPart, ShardTables, Window, WindowPlan, compute_batch, plan_window, window_tables, windows
from attnflows_panel.text import counted

if TYPE_CHECKING:
    import dask.dataframe as dd
    from distributed import Client

    from attnflows_panel.analysis.embedding import HeadDistances
    from attnflows_panel.extract import AttentionRecord

FORMAT = "attnflows-run"
FORMAT_VERSION = 2  # 2: sparse entries of at least tau_min, model differences, a record per shard
MANIFEST = "manifest.json"
RECORDS = "shards"
PARTS = ("stats", "differences", "tokens", "entries", "distances")
SHARD_SIZE = 128  # sentences a shard, unless asked or resumed
LOCAL_THREADS = 2  # shards computed at once in one process (each thread's torch operations on cores / 2)
HEAD_MAP_SENTENCES = 300  # the head map's sentences (the first ones): its distances are summed at extraction


def _part_name(part: str, shard: int) -> str:
    return f"{part}/part-{shard:05d}.parquet"


def _record_path(run_dir: Path, shard: int) -> Path:
    return run_dir / RECORDS / f"part-{shard:05d}.json"


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
        raise StoreError(f"{path} is not an attnflows run of format version {FORMAT_VERSION}; run `attnflows extract` again to remake it")
    return manifest


def _format_version(run_dir: Path) -> int | None:
    """The format version of an attnflows run other than this one's, or None."""
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    found = manifest.get("format_version") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    return found if found != FORMAT_VERSION else None


def _read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of the finished shards, in shard order (unreadable ones are skipped: their shard is recomputed)."""
    records = []
    for path in sorted((run_dir / RECORDS).glob("part-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


@dataclass
class RunStore:
    """Read access to a run directory; every file is checked against its recorded hash before its first use."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> RunStore:
        run_dir = Path(path).expanduser()
        if not run_dir.is_dir():
            raise StoreError(f"run directory does not exist: {run_dir}")
        manifest = _read_manifest(run_dir)
        manifest["shards"] = _read_records(run_dir)
        return cls(run_dir, manifest)

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r}: {self.describe()})"

    def __post_init__(self) -> None:
        self._verified: set[str] = set()
        self._loaded: tuple[int, dict[str, np.ndarray]] | None = None  # the last entries shard read

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
    def tau_min(self) -> float:
        """Entries below this weight are not stored (a row keeps at most ``1 / tau_min`` of them)."""
        return float(self.manifest["tau_min"])

    @property
    def compared(self) -> tuple[str, str] | None:
        """The two models whose differences the run holds, or None for a one-model run."""
        return tuple(self.models[:2]) if len(self.models) > 1 else None  # type: ignore[return-value]

    @property
    def complete(self) -> bool:
        return sum(s["stop"] - s["start"] for s in self.manifest["shards"]) == self.manifest["n_sentences"]

    def files(self, part: str) -> list[Path]:
        """The file of ``part`` of every finished shard that has one, each verified against its hash."""
        return [self._file(shard, part) for shard in self.manifest["shards"] if part in shard["files"]]

    def _file(self, shard: dict[str, Any], part: str) -> Path:
        name = _part_name(part, shard["shard"])
        path = self.path / name
        if name not in self._verified:
            if not path.is_file():
                raise StoreError(f"{path} is missing; run `attnflows extract` again to recompute it")
            if sha256_file(path) != shard["files"][part]["sha256"]:
                raise StoreError(f"{path} is corrupted (hash mismatch); run `attnflows extract` again to recompute it")
            self._verified.add(name)
        return path

    def _concat(self, part: str) -> pd.DataFrame:
        frames = [pd.read_parquet(path) for path in self.files(part)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def dataframe(self, part: str) -> dd.DataFrame:
        """A part of every finished shard as one lazy ``dask.dataframe`` (a partition a shard): out of core at any run size."""
        import dask.dataframe as dd

        if part not in PARTS:
            raise InputError(f"unknown part {part!r}; a run has {', '.join(PARTS)}")
        files = self.files(part)
        if not files:
            raise StoreError(f"{self.path} has no {part} yet" + (" (a run of one model has no differences)" if part == "differences" else ""))
        return dd.from_map(pd.read_parquet, [str(f) for f in files])

    def sentences(self) -> pd.DataFrame:
        """Every sentence of the corpus (extracted or not yet)."""
        path = self.path / "sentences.parquet"
        if sha256_file(path) != self.manifest["sentences_sha256"]:
            raise StoreError(f"{path} is corrupted (hash mismatch)")
        return pd.read_parquet(path)

    def head_stats(self) -> pd.DataFrame:
        """Tidy per-(sentence, model, layer, head) statistics of the extracted sentences, in memory (see :meth:`dataframe`)."""
        return self._concat("stats")

    def differences(self) -> pd.DataFrame:
        """Tidy per-(sentence, layer, head) JS divergence and cosine between the first two models, in memory."""
        return self._concat("differences")

    def tokens(self) -> pd.DataFrame:
        """Tokens, ids, word and segment ids and predictions of the extracted sentences."""
        return self._concat("tokens")

    def head_distances(self, models: Sequence[str] | None = None) -> HeadDistances:
        """Clark et al.'s distances between the heads of ``models`` (default all) over the head map's sentences, as summed at extraction."""
        from attnflows_panel.analysis.embedding import HeadDistances, head_labels

        names = list(self.models if models is None else models)
        for name in names:
            self._check_model(name)
        files = self.files("distances")
        if not files:
            raise StoreError(f"{self.path} holds no head distances (extracted with head_map_sentences=0)")
        k, per_model = len(self.models) * self.n_layers * self.n_heads, self.n_layers * self.n_heads
        total, n_sentences, n_tokens = np.zeros((k, k)), 0, 0
        for path in files:
            frame = pd.read_parquet(path)
            total[frame["i"].to_numpy(), frame["j"].to_numpy()] += frame["total"].to_numpy()
            n_sentences += int(frame["n_sentences"].iloc[0])
            n_tokens += int(frame["n_tokens"].iloc[0])
        keep = np.concatenate([np.arange(per_model) + self.models.index(name) * per_model for name in names])
        return HeadDistances(total[np.ix_(keep, keep)], n_sentences, n_tokens, head_labels(names, self.n_layers, self.n_heads))

    def sentence_ids(self) -> list[int]:
        """The ids of the extracted sentences, in order (from the shards' records: no file read)."""
        return [i for shard in sorted(self.manifest["shards"], key=lambda s: s["start"]) for i in range(shard["start"], shard["stop"])]

    def _shard_of(self, sentence_id: int) -> dict[str, Any]:
        if isinstance(sentence_id, bool) or not isinstance(sentence_id, int | np.integer):
            raise InputError(f"a sentence id is a whole number, got {sentence_id!r}")
        for shard in self.manifest["shards"]:
            if shard["start"] <= sentence_id < shard["stop"]:
                return shard
        raise InputError(f"sentence {sentence_id} is not in this run (extracted: {self.describe()})")

    def _entries_shard(self, shard: dict[str, Any]) -> dict[str, np.ndarray]:
        """Every column of one shard's entries, kept until another shard is read."""
        if self._loaded is None or self._loaded[0] != shard["shard"]:
            import pyarrow.parquet as pq

            table = pq.read_table(self._file(shard, "entries"))
            model = table.column("model").combine_chunks()
            codes = model.indices.to_numpy() if len(model) else np.empty(0, np.int8)
            sentence = table.column("sentence_id").to_numpy()
            order = np.lexsort((codes, sentence))  # stable: each sentence's entries keep their (layer, head, query, key) order
            columns = {name: table.column(name).to_numpy()[order] for name in ("layer", "head", "query", "key")}
            columns["weight"] = table.column("weight").to_numpy()[order].astype(np.float32)  # float16 on disk; pandas prints float16 badly
            columns["sentence_id"] = sentence[order]
            columns["model"] = np.asarray(model.dictionary.to_pylist() if len(model) else [], dtype=object)[codes[order]]
            self._loaded = (shard["shard"], columns)
        return self._loaded[1]

    def entries(self, sentence_id: int, model: str) -> pd.DataFrame:
        """The stored attention entries (layer, head, query, key, weight: float32 of the stored float16) of one sentence through one model."""
        self._check_model(model)
        columns = self._entries_shard(self._shard_of(sentence_id))
        lo, hi = np.searchsorted(columns["sentence_id"], [sentence_id, sentence_id + 1])
        keep = slice(lo, hi)
        chosen = columns["model"][keep] == model
        return pd.DataFrame({name: columns[name][keep][chosen] for name in ("layer", "head", "query", "key", "weight")})

    def n_tokens(self, sentence_id: int) -> int:
        """How many tokens the stored sentence has."""
        tokens = pd.read_parquet(self._file(self._shard_of(sentence_id), "tokens"), columns=["sentence_id", "n_tokens"])
        return int(tokens.loc[tokens["sentence_id"] == sentence_id, "n_tokens"].iloc[0])

    def attention(self, sentence_id: int, model: str) -> np.ndarray:
        """Attention ``[L, H, n, n]`` of one sentence rebuilt from its entries: each row's weight below ``tau_min``
        (1 minus its stored entries) is spread evenly over the keys not stored (those the query may see)."""
        frame = self.entries(sentence_id, model)
        return dense_from_entries(frame, self.n_layers, self.n_heads, self.n_tokens(sentence_id), causal=bool(self.manifest.get("causal")))

    def record(self, sentence_id: int, model: str) -> AttentionRecord:
        """The stored sentence as a record every view takes (attention rebuilt as in :meth:`attention`)."""
        from attnflows_panel.analysis.source import DenseAttention
        from attnflows_panel.extract import AttentionRecord

        self._check_model(model)
        shard = self._shard_of(sentence_id)
        tokens = pd.read_parquet(self._file(shard, "tokens")).set_index("sentence_id").loc[sentence_id]
        text = self.sentences().set_index("sentence_id").loc[sentence_id]
        described = self.manifest["models"][self.models.index(model)]
        ids = np.asarray(tokens["input_ids"], dtype=np.int64)
        special = self.manifest.get("special_ids", {})
        probabilities = tokens.get(f"probabilities_{model}")
        return AttentionRecord(
            text=str(text["text"]),
            text_pair=None if text["text_pair"] is None else str(text["text_pair"]),
            model_id=described["model_id"],
            tokens=list(tokens["tokens"]),
            input_ids=ids,
            word_ids=np.asarray(tokens["word_ids"], dtype=np.int32),
            segment_ids=np.asarray(tokens["segment_ids"], dtype=np.int8),
            cls_mask=ids == special.get("cls", -1),
            sep_mask=ids == special.get("sep", -1),
            source=DenseAttention(self.attention(sentence_id, model)),
            logits=None if probabilities is None else np.log(np.asarray(probabilities, dtype=np.float64)),
            labels=tuple(described["labels"]) if described.get("labels") else None,
            n_truncated=int(tokens["n_truncated"]),
            causal=bool(self.manifest.get("causal")),
        )

    def _check_model(self, model: str) -> None:
        if model not in self.models:
            raise InputError(f"unknown model {model!r}; this run has {', '.join(self.models)}")

    def describe(self) -> str:
        done = sum(s["stop"] - s["start"] for s in self.manifest["shards"])
        models = f"models {', '.join(self.models)}" if len(self.models) > 1 else f"one model ({self.manifest['models'][0].get('model_id') or self.models[0]})"
        return f"{done} of {counted(self.manifest['n_sentences'], 'sentence')}, {models}"


def dense_from_entries(entries: pd.DataFrame, n_layers: int, n_heads: int, n: int, *, causal: bool = False) -> np.ndarray:
    """``[L, H, n, n]`` float32 from sparse entries; each row's remaining weight spread evenly over its other visible keys."""
    dense = np.zeros((n_layers, n_heads, n, n), dtype=np.float32)
    index = tuple(entries[c].to_numpy(np.int64) for c in ("layer", "head", "query", "key"))
    dense[index] = entries["weight"].to_numpy(np.float32)
    visible = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    missing = visible & (dense == 0)
    free = missing.sum(-1, keepdims=True)
    rest = np.clip(1.0 - dense.sum(-1, keepdims=True), 0.0, None)
    dense += np.where(missing, rest / np.maximum(free, 1), 0.0).astype(np.float32)
    return dense


def _fingerprint(models: Mapping[str, LoadedModel], corpus: Corpus, settings: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    with ThreadPoolExecutor(len(models)) as pool:  # each model's weights hashed on its own core
        list(pool.map(lambda lm: lm.checkpoint_hash, models.values()))
    described = [
        {"name": name, "model_id": lm.model_id, "checkpoint_sha256": lm.checkpoint_hash, "max_tokens": lm.max_tokens, "labels": lm.labels}
        for name, lm in models.items()
    ]
    key = {
        # models by their weights, not their paths: a run made in another checkout or venv stays valid
        "models": [{k: v for k, v in model.items() if k != "model_id"} for model in described],
        "corpus_sha256": corpus.sha256 or sha256_json([corpus.texts, corpus.text_pairs]),
        "n_sentences": len(corpus),
        "format_version": FORMAT_VERSION,
    } | settings
    return sha256_json(key), described


def _clear(run_dir: Path) -> None:
    for part in (*PARTS, RECORDS, "attention"):  # attention: format 1's dense shards
        shutil.rmtree(run_dir / part, ignore_errors=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)


def _recorded_shard_size(run_dir: Path) -> int | None:
    """The shard size of the run in ``run_dir``, if a readable one is there (a resumed run keeps its own)."""
    try:
        return int(_read_manifest(run_dir)["shard_size"]) if (run_dir / MANIFEST).is_file() else None
    except (StoreError, KeyError, TypeError, ValueError):
        return None


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` if it can hold a run (a run, an empty directory, or one that can be made), checked before any work; else a one-line error."""
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists():
        if not run_dir.is_dir():
            raise InputError(f"output path exists and is not a directory: {run_dir}")
        if not (run_dir / MANIFEST).exists() and any(run_dir.iterdir()):
            raise InputError(f"output directory is not empty and is not an attnflows run: {run_dir}")
        return run_dir
    parent = next(path for path in run_dir.absolute().parents if path.exists())
    if not parent.is_dir():
        raise InputError(f"cannot make the run directory {run_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot make the run directory {run_dir}: {parent} is not writable")
    return run_dir


def _prepare_run_dir(run_dir: Path, fingerprint: str, wanted: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest to resume from, or None for a fresh start; a run of other models, corpus or settings (``wanted``,
    as a manifest records them) is recomputed when ``overwrite`` allows, else refused naming what differs."""
    check_run_dir(run_dir)
    if not (run_dir / MANIFEST).exists():
        return None
    try:
        manifest = _read_manifest(run_dir)
        why = "" if manifest.get("fingerprint") == fingerprint else f"a run of {_differences(manifest, wanted)}"
    except StoreError as exc:
        version = _format_version(run_dir)
        manifest, why = None, f"a run written in run format {version} (this attnflows writes format {FORMAT_VERSION})" if version is not None else str(exc)
    if not why:
        return manifest
    if not overwrite:
        raise InputError(f"{run_dir} holds {why}; pass --overwrite (overwrite=True) to recompute it, or choose another output directory")
    warnings.warn(f"{run_dir} holds {why}; recomputing it", stacklevel=3)
    _clear(run_dir)
    return None


def _differences(manifest: dict[str, Any], wanted: dict[str, Any]) -> str:
    """What a recorded run and the wanted one differ in: ``"other settings (tau_min 0.1, now 0.05)"``, ``"other models and another corpus"``."""
    recorded_models = [{k: v for k, v in m.items() if k != "model_id"} for m in manifest.get("models", [])]
    wanted_models = [{k: v for k, v in m.items() if k != "model_id"} for m in wanted["models"]]
    what = ["other models"] if recorded_models != wanted_models else []
    if manifest.get("corpus", {}).get("sha256") != wanted["corpus_sha256"] or manifest.get("n_sentences") != wanted["n_sentences"]:
        what.append("another corpus")
    changed = [f"{name} {manifest.get(name)}, now {value}" for name, value in wanted["settings"].items() if manifest.get(name) != value]
    if changed:
        what.append(f"other settings ({'; '.join(changed)})")
    return " and ".join(what) or "other models, corpus or settings"  # an in-memory corpus of other texts, say


def _unchanged(path: Path, recorded: dict[str, Any], verify: bool) -> bool:
    """Whether a shard's file is as recorded: hashed when asked or when its size or mtime changed, else trusted."""
    try:
        stat = path.stat()
    except OSError:
        return False
    if not verify and stat.st_size == recorded["bytes"] and stat.st_mtime_ns == recorded["mtime_ns"]:
        return True
    return stat.st_size == recorded["bytes"] and sha256_file(path) == recorded["sha256"]


def _valid_shards(run_dir: Path, verify: bool) -> list[dict[str, Any]]:
    """The finished shards whose files are all present and as recorded; the others' records are removed."""
    valid = []
    for record in _read_records(run_dir):
        if all(_unchanged(run_dir / _part_name(part, record["shard"]), entry, verify) for part, entry in record["files"].items()):
            valid.append(record)
        else:
            warnings.warn(f"shard {record['shard']} of {run_dir} is missing or corrupted; recomputing it", stacklevel=3)
            _record_path(run_dir, record["shard"]).unlink(missing_ok=True)
    return valid


def _write_sentences(run_dir: Path, corpus: Corpus) -> str:
    frame = pd.DataFrame(
        {
            "sentence_id": np.arange(len(corpus), dtype=np.int64),
            "text": corpus.texts,
            "text_pair": corpus.text_pairs if corpus.text_pairs is not None else [None] * len(corpus),
            "label": [label or None for label in corpus.labels] if corpus.labels is not None else [None] * len(corpus),
        }
    )
    path = run_dir / "sentences.parquet"
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return sha256_file(path)


def commit_shard(run_dir: Path, tables: ShardTables) -> dict[str, Any]:
    """Write a shard's files atomically, then its record (the commit); return the record."""
    import pyarrow.parquet as pq

    files = {}
    for part, table in tables.parts().items():
        path = run_dir / _part_name(part, tables.shard)
        with atomic_file(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", write_statistics=[c for c in ("sentence_id",) if c in table.column_names])  # min/max of other columns: 16% of the write, unused
        stat = path.stat()
        files[part] = {"sha256": sha256_file(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = {"shard": tables.shard, "start": tables.start, "stop": tables.stop, "files": files}
    write_json_atomic(_record_path(run_dir, tables.shard), record)
    return record


def _new_manifest(run_dir: Path, models: Mapping[str, LoadedModel], corpus: Corpus, fingerprint: str, described: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(models.values()))
    tok = first.tokenizer
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": described,
        "n_layers": first.n_layers,
        "n_heads": first.n_heads,
        "causal": first.family.causal,
        "special_ids": {name: token_id for name, token_id in (("cls", tok.cls_token_id), ("sep", tok.sep_token_id)) if token_id is not None},
        "corpus": {"source": corpus.source, "sha256": corpus.sha256, "has_pairs": corpus.text_pairs is not None},
        "n_sentences": len(corpus),
        "versions": _versions(),
        "sentences_sha256": _write_sentences(run_dir, corpus),
    } | settings
    write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


def local_shards(models: Mapping[str, LoadedModel], corpus: Corpus, pending: Sequence[tuple[int, int, int]], shard_size: int, options: dict[str, Any]) -> Iterator[ShardTables]:
    """Each pending ``(shard, start, stop)`` computed in this process, yielded in order (``options`` of :func:`compute_batch`
    and ``max_batch``).

    Shards are batched a window at a time (:func:`shard.windows`); with two cores or more, two batches are computed at
    once on two threads, torch's operations each on half the cores, so one batch's statistics and entries run beside
    the other's forward pass, and the next window's batches are queued before this one's tables are made.
    """
    import torch

    plans = iter(windows(pending, shard_size, len(corpus)))
    cores = os.cpu_count() or 1
    threads = min(LOCAL_THREADS, cores)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, cores // threads))  # what each new thread's operations start with
    pool = ThreadPoolExecutor(threads, thread_name_prefix="attnflows-shard")
    batch_options = {key: options[key] for key in ("tau_min", "head_map_until")}

    def submit(plan: WindowPlan) -> tuple[Window, list[Future[BatchPart]]]:
        window = plan_window(models, plan, *plan.sentences(corpus.texts, corpus.text_pairs), options["max_batch"])
        return window, [pool.submit(compute_batch, models, window, batch, **batch_options) for batch in window.batches]

    try:
        running = deque(submit(plan) for plan in itertools.islice(plans, 2))
        while running:
            window, batches = running.popleft()
            parts = [batch.result() for batch in batches]
            following = next(plans, None)
            if following is not None:
                running.append(submit(following))
            yield from window_tables(models, window, parts)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a stopped run waits for the batches being computed, then drops the rest
        torch.set_num_threads(previous)


def extract_corpus(
    models: Mapping[str, LoadedModel],
    corpus: Corpus,
    run_dir: str | Path,
    shard_size: int | None = None,
    max_batch: int = 32,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    *,
    tau_min: float = TAU_MIN,
    head_map_sentences: int = HEAD_MAP_SENTENCES,
    client: Client | None = None,
    verify: bool = False,
    overwrite: bool = True,
    on_resume: Callable[[str], None] | None = None,
) -> RunStore:
    """Extract every sentence of ``corpus`` through every model into ``run_dir``; resumes a stopped run.

    ``models`` maps a short name ("pretrained", "finetuned") to a model; all must share one tokenizer.
    With a ``distributed.Client``, shards are computed on its workers (each loads the models once) and
    committed here. Memory stays bounded by a few shards; ``verify`` re-hashes finished shards before resuming, and
    ``on_resume`` is told what a resumed run found. A run directory of other models, corpus or settings is recomputed,
    or refused when ``overwrite`` is False. ``shard_size`` defaults to the run's own when resuming, else :data:`SHARD_SIZE`.
    The first ``head_map_sentences`` sentences also sum the distances between heads the head map places them by.
    """
    from tqdm.auto import tqdm

    if not models:
        raise InputError("no models to extract with")
    run_dir = Path(run_dir).expanduser()
    if shard_size is None:
        shard_size = _recorded_shard_size(run_dir) or SHARD_SIZE
    if shard_size < 1 or max_batch < 1:
        raise InputError(f"shard_size and max_batch must be at least 1, got {shard_size} and {max_batch}")
    if not 0 < tau_min <= 1:
        raise InputError(f"tau_min must be in (0, 1], got {tau_min!r}")
    if head_map_sentences < 0:
        raise InputError(f"head_map_sentences must be at least 0, got {head_map_sentences!r}")
    if len(corpus) == 0:
        raise InputError("the corpus has no sentences")
    corpus.check_texts()  # before the run directory is made
    loaded = list(models.values())
    for other in loaded[1:]:
        validate_pair(loaded[0], other)
    settings = {"shard_size": shard_size, "tau_min": tau_min, "head_map_sentences": min(head_map_sentences, len(corpus))}
    fingerprint, described = _fingerprint(models, corpus, settings)
    remove_stale_temporaries(run_dir, rf"{re.escape(MANIFEST)}|sentences\.parquet")  # left by a killed run
    for part in PARTS:
        remove_stale_temporaries(run_dir / part, r"part-\d+\.parquet")
    remove_stale_temporaries(run_dir / RECORDS, r"part-\d+\.json")
    wanted = {"models": described, "corpus_sha256": corpus.sha256, "n_sentences": len(corpus), "settings": settings}
    manifest = _prepare_run_dir(run_dir, fingerprint, wanted, overwrite)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # what check_run_dir cannot foresee (a file system that refuses, as /proc)
        raise InputError(f"cannot make the run directory {run_dir}: {exc.strerror or exc}") from None
    if manifest is None:
        _new_manifest(run_dir, models, corpus, fingerprint, described, settings)
        finished: list[dict[str, Any]] = []
    else:
        finished = _valid_shards(run_dir, verify)
        if sha256_file(run_dir / "sentences.parquet") != manifest.get("sentences_sha256"):
            manifest["sentences_sha256"] = _write_sentences(run_dir, corpus)
            write_json_atomic(run_dir / MANIFEST, manifest)

    done = {s["shard"] for s in finished}
    n_shards = -(-len(corpus) // shard_size)
    pending = [(k, k * shard_size, min(len(corpus), (k + 1) * shard_size)) for k in range(n_shards) if k not in done]
    truncated = 0
    stored = sum(s["stop"] - s["start"] for s in finished)
    if manifest is not None and on_resume is not None:
        checked = "re-hashed" if verify else "sizes and times checked"
        on_resume(f"{run_dir.name}: {stored:,} of {len(corpus):,} sentences already stored ({len(finished)} shard{'' if len(finished) == 1 else 's'}, {checked}); {'nothing to do' if not pending else 'computing the rest'}")
    bar = tqdm(total=len(corpus), initial=stored, desc=f"extracting {run_dir.name}", unit="sentence", disable=not progress or not pending)
    options = {"tau_min": tau_min, "max_batch": max_batch, "head_map_until": settings["head_map_sentences"]}
    if client is None:
        results = local_shards(models, corpus, pending, shard_size, options)
    else:
        from attnflows_panel.cluster import cluster_shards

        results = cluster_shards(client, models, corpus, pending, shard_size, options)
    try:
        for tables in results:
            commit_shard(run_dir, tables)
            truncated += tables.n_truncated
            bar.update(tables.stop - tables.start)
            if on_shard is not None:
                on_shard(tables.shard)
    finally:
        bar.close()
        getattr(results, "close", lambda: None)()
    if truncated:
        limit = loaded[0].max_tokens
        warnings.warn(f"{truncated} sentences were longer than {limit} tokens and were truncated", TruncationWarning, stacklevel=2)
    return RunStore.open(run_dir)


def run_size(run_dir: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk per part of a run (and ``total``), to report how a store grows."""
    root = Path(run_dir)
    sizes = {part: sum(f.stat().st_size for f in (root / part).glob("*") if f.is_file()) for part in (*PARTS, RECORDS)}
    sizes["other"] = sum(f.stat().st_size for f in root.iterdir() if f.is_file())
    sizes["total"] = sum(sizes.values())
    return sizes
