"""Fine-tuning: seeded, cached, atomic, on the user's own single-sentence or pair data."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from attnflows_panel import paths
from attnflows_panel.errors import InputError, ModelError
from attnflows_panel.models import load_encoder
from attnflows_panel.models import finetune as ft
from attnflows_panel.paths import recorded_sha256, sha256_file


def config(base: Path, data: Path, **kw) -> ft.FinetuneConfig:
    return ft.FinetuneConfig(base=str(base), data=str(data), batch_size=8, heldout=16, learning_rate=1e-3, **kw)


def test_finetune_writes_checkpoint_and_metrics(tiny_dir: Path, sentiment_csv: Path) -> None:
    result = ft.finetune(config(tiny_dir, sentiment_csv), progress=False)
    assert not result.reused
    m = json.loads((result.path / "metrics.json").read_text())
    assert m == result.metrics
    assert m["task"] == "small" and m["labels"] == ["negative", "positive"]
    assert (m["n_train"], m["n_heldout"], m["steps"]) == (64, 16, 8)
    assert m["data_sha256"] == sha256_file(sentiment_csv)
    assert 0.0 <= m["heldout_accuracy"] <= 1.0 and m["majority_baseline"] >= 0.5
    assert m["weights_sha256"] == sha256_file(result.path / "model.safetensors")
    lm = load_encoder(result.path)
    assert lm.labels == ["negative", "positive"]
    assert lm.model.config._attn_implementation == "attnflows"


def test_a_tokenizer_without_a_pad_token_fine_tunes_with_another_special_token(tiny_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    base = shutil.copytree(tiny_dir, tmp_path / "no-pad")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    assert load_encoder(base).tokenizer.pad_token_id is None
    result = ft.finetune(config(base, sentiment_csv), progress=False)
    assert result.metrics["n_train"] == 64 and 0.0 <= result.metrics["heldout_accuracy"] <= 1.0


def test_finetune_is_reused_then_reproducible(tiny_dir: Path, sentiment_csv: Path) -> None:
    first = ft.finetune(config(tiny_dir, sentiment_csv, seed=3), progress=False)
    again = ft.finetune(config(tiny_dir, sentiment_csv, seed=3), progress=False)
    assert again.reused and again.path == first.path
    forced = ft.finetune(config(tiny_dir, sentiment_csv, seed=3), force=True, progress=False)
    assert not forced.reused
    assert forced.metrics["weights_sha256"] == first.metrics["weights_sha256"]
    other_seed = ft.finetune(config(tiny_dir, sentiment_csv, seed=4), progress=False)
    assert other_seed.path != first.path
    assert other_seed.metrics["weights_sha256"] != first.metrics["weights_sha256"]


def test_corrupted_checkpoint_is_not_reused(tiny_dir: Path, sentiment_csv: Path) -> None:
    first = ft.finetune(config(tiny_dir, sentiment_csv, seed=5), progress=False)
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    again = ft.finetune(config(tiny_dir, sentiment_csv, seed=5), progress=False)
    assert not again.reused
    assert sha256_file(weights) == first.metrics["weights_sha256"]


def test_failed_finetune_leaves_nothing(tiny_dir: Path, sentiment_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tiny_dir, sentiment_csv, seed=6)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "evaluate_accuracy", crash)
    models = Path(ft.home()) / "models"
    before = set(models.iterdir()) if models.exists() else set()
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(cfg, progress=False)
    after = set(models.iterdir()) if models.exists() else set()
    assert after == before


def test_pair_task_from_jsonl(tiny_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"text_a": f"the car {i}", "text_b": "the car" if i % 2 else "a movie", "label": "same" if i % 2 else "different"}
        for i in range(40)
    ]
    data = tmp_path / "paraphrase.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = ft.finetune(ft.FinetuneConfig(base=str(tiny_dir), data=str(data), heldout=8, batch_size=8), progress=False)
    assert result.metrics["labels"] == ["different", "same"]
    assert result.metrics["task"] == "paraphrase"


def test_csv_without_needed_columns(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("sentence,sentiment\nhello,positive\n")
    with pytest.raises(InputError, match=r"bad.csv needs a 'text' column \(or 'text_a' and 'text_b'\); found: sentence, sentiment"):
        ft.finetune(config(tiny_dir, data), progress=False)


def test_csv_without_labels(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "nolabel.csv"
    data.write_text("text\nhello\nworld\n")
    with pytest.raises(InputError, match="needs a 'label' column for fine-tuning; found: text"):
        ft.finetune(config(tiny_dir, data), progress=False)


def test_single_label_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "one.csv"
    data.write_text("text,label\n" + "".join(f"good {i},positive\n" for i in range(30)))
    with pytest.raises(InputError, match="at least two labels"):
        ft.finetune(config(tiny_dir, data), progress=False)


def test_bad_base_model(tmp_path: Path, sentiment_csv: Path) -> None:
    with pytest.raises(ModelError, match="model path does not exist"):
        ft.finetune(config(tmp_path / "missing", sentiment_csv), progress=False)


@pytest.mark.parametrize(("field", "value", "message"), [("epochs", 0, "epochs must be at least 1, got 0"), ("learning_rate", 2.0, r"learning_rate must be in \(0, 1\), got 2.0")])
def test_bad_settings(tiny_dir: Path, sentiment_csv: Path, field: str, value: float, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ft.finetune(ft.FinetuneConfig(base=str(tiny_dir), data=str(sentiment_csv), **{field: value}), progress=False)


def test_the_same_weights_and_data_elsewhere_reuse_the_checkpoint(tiny_dir: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default base is found inside a venv: another venv (or checkout) must not fine-tune again."""
    import shutil

    venvs = [shutil.copytree(tiny_dir, tmp_path / venv / "model") for venv in ("venv-a", "venv-b")]
    data = [shutil.copy(sentiment_csv, (tmp_path / f"checkout-{i}").mkdir() or tmp_path / f"checkout-{i}" / sentiment_csv.name) for i in (1, 2)]
    monkeypatch.setattr(ft, "default_pretrained_path", lambda: venvs[0])
    first = ft.finetune(ft.FinetuneConfig(data=str(data[0]), batch_size=8, heldout=16, seed=5), progress=False)
    monkeypatch.setattr(ft, "default_pretrained_path", lambda: venvs[1])
    again = ft.finetune(ft.FinetuneConfig(data=str(data[1]), batch_size=8, heldout=16, seed=5), progress=False)
    assert not first.reused and again.reused and again.path == first.path


TICK = 0.05  # longer than a tick of the clock that stamps a file's change time


def refuse(*args, **kwargs):
    raise AssertionError("the check by recorded hashes did work it should skip")


def _rewrite_in_place(path: Path, mtime_ns: int) -> None:
    """Flip a bit of the first byte, then put the modification time back (as ``cp -p`` or ``touch -r`` leave it)."""
    with open(path, "r+b") as fh:
        first = fh.read(1)[0]
        fh.seek(0)
        fh.write(bytes([first ^ 1]))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _replace_by_a_copy(path: Path, mtime_ns: int) -> None:
    """Replace the file by a copy with a bit of its first byte flipped and the same modification time."""
    data = path.read_bytes()
    copy = path.with_name(path.name + ".new")
    copy.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    os.utime(copy, ns=(mtime_ns, mtime_ns))
    os.replace(copy, path)  # as rsync replaces a file


@pytest.mark.parametrize("change", [_rewrite_in_place, _replace_by_a_copy])
def test_a_recorded_hash_is_reused_until_the_file_changes(change: Callable[[Path, int], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "SETTLE_NS", 0)  # record a file changed just now (the default waits 3 s)
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)
    before = sha256_file(path)
    assert recorded_sha256(path) == before
    monkeypatch.setattr(paths, "sha256_file", refuse)
    assert recorded_sha256(path) == before  # from the record: the file is not read
    monkeypatch.undo()
    time.sleep(TICK)
    change(path, path.stat().st_mtime_ns)  # the same size and modification time, other bytes
    assert recorded_sha256(path) == sha256_file(path) != before


def test_a_file_changed_within_the_settling_time_is_hashed_at_every_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood,positive\n")
    first = recorded_sha256(path)
    path.write_text("text,label\nbad!,negative\n")  # the same size, perhaps in the same clock tick
    assert recorded_sha256(path) == sha256_file(path) != first
    hashed: list[Path] = []
    monkeypatch.setattr(paths, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    recorded_sha256(path)
    assert hashed == [path.resolve()]  # not recorded until it has not changed for SETTLE_NS


def test_a_cached_checkpoint_is_found_without_reading_the_data_or_hashing_a_file(tiny_dir: Path, sentiment_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "SETTLE_NS", 0)
    cfg = config(tiny_dir, sentiment_csv, seed=7)
    first = ft.finetune(cfg, progress=False)
    assert ft.finetune(cfg, progress=False).reused  # hashes the new checkpoint once and records it
    for module, name in ((paths, "sha256_file"), (ft, "read_corpus"), (ft, "sentiment_corpus"), (ft, "load_encoder")):
        monkeypatch.setattr(module, name, refuse)
    again = ft.finetune(cfg, progress=False)
    assert again.reused and again.path == first.path and again.metrics == first.metrics


def test_a_checkpoint_changed_in_place_is_not_reused(tiny_dir: Path, sentiment_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "SETTLE_NS", 0)
    cfg = config(tiny_dir, sentiment_csv, seed=8)
    first = ft.finetune(cfg, progress=False)
    assert ft.finetune(cfg, progress=False).reused  # its weights' hash is recorded now
    time.sleep(TICK)
    weights = first.path / ft.WEIGHTS_FILE
    _rewrite_in_place(weights, weights.stat().st_mtime_ns)
    again = ft.finetune(cfg, progress=False)
    assert not again.reused and sha256_file(weights) == first.metrics["weights_sha256"]
