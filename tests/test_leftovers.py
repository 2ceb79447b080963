"""Temporaries of killed runs: named by their process, removed by the next run once that process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attnflows_panel.corpus import Corpus
from attnflows_panel.paths import atomic_dir, atomic_file, pid_alive, remove_stale_temporaries

WRITE_AND_HANG = """
import sys, time
from pathlib import Path
from attnflows_panel.paths import atomic_dir, atomic_file
target = Path(sys.argv[1])
with (atomic_dir if sys.argv[2] == "dir" else atomic_file)(target) as tmp:
    if sys.argv[2] == "dir":
        (tmp / "model.safetensors").write_bytes(b"0" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def dead_pid() -> int:
    """The id of a process that has finished and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def killed_write(target: Path, kind: str) -> Path:
    """The temporary a writer leaves behind when it is killed (SIGKILL) in the middle of an atomic write."""
    process = subprocess.Popen([sys.executable, "-c", WRITE_AND_HANG, str(target), kind], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(process.stdout.readline().strip())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert tmp.exists() and f".tmp-{process.pid}-" in tmp.name and not pid_alive(process.pid)
    return tmp


def test_temporaries_name_their_process(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "part-00000.parquet") as tmp:
        assert tmp.name.startswith(f".part-00000.parquet.tmp-{os.getpid()}-")
    with atomic_dir(tmp_path / "checkpoint") as tmp:
        assert tmp.name.startswith(f".checkpoint.tmp-{os.getpid()}-")


def test_only_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead, live = dead_pid(), os.getpid()
    assert not pid_alive(dead) and pid_alive(live)
    stale_file = tmp_path / f".part-00001.parquet.tmp-{dead}-k2j4x_9a"
    stale_file.touch()
    stale_dir = tmp_path / f".bert-sentiment-0123.tmp-{dead}-q8w1e2r3"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"0" * 100)
    kept = [
        tmp_path / f".part-00002.parquet.tmp-{live}-a1b2c3d4",  # this process is writing it
        tmp_path / ".part-00003.parquet.tmp-abcd1234",  # from before temporaries named their process: unknown owner
        tmp_path / f"part-00004.parquet.tmp-{dead}-a1b2c3d4",  # not a hidden temporary
        tmp_path / "notes.txt",
    ]
    for path in kept:
        path.touch()
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale_file, stale_dir])
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_targets_limit_what_is_removed(tmp_path: Path) -> None:
    dead = dead_pid()
    ours, foreign = tmp_path / f".manifest.json.tmp-{dead}-aaaa1111", tmp_path / f".thesis.tex.tmp-{dead}-bbbb2222"
    ours.touch()
    foreign.touch()
    assert remove_stale_temporaries(tmp_path, r"manifest\.json") == [ours]
    assert list(tmp_path.iterdir()) == [foreign]


def test_a_killed_extraction_leftover_is_removed_by_the_next_run(tiny_pair, tmp_path: Path) -> None:
    from attnflows_panel.store import extract_corpus

    models = {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}
    corpus = Corpus(texts=["a good car", "i hate it", "the movie was great"])

    def stop(shard: int) -> None:
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus, run, shard_size=1, progress=False, on_shard=stop)
    leftover = killed_write(run / "stats" / "part-00001.parquet", "file")  # killed while writing shard 1
    assert leftover.stat().st_size == 0
    live = run / "entries" / f".part-00001.parquet.tmp-{os.getpid()}-zzzz0000"  # a live process's: kept
    live.touch()
    extract_corpus(models, corpus, run, shard_size=1, progress=False)
    assert not leftover.exists() and live.exists()
    assert sorted(p.name for p in (run / "stats").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]

    early = tmp_path / "early"  # killed before its manifest: the directory held only this temporary
    early.mkdir()
    before_manifest = killed_write(early / "sentences.parquet", "file")
    assert extract_corpus(models, corpus, early, progress=False).complete and not before_manifest.exists()


def test_a_killed_finetune_checkpoint_is_removed_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnflows_panel.errors import InputError
    from attnflows_panel.models import finetune as ft

    monkeypatch.setenv("ATTNFLOWS_HOME", str(tmp_path))
    models = tmp_path / "models"
    leftover = killed_write(models / "tiny-sentiment-0123456789ab", "dir")
    assert (leftover / "model.safetensors").is_file()
    live = models / f".tiny-other.tmp-{os.getpid()}-zzzz0000"
    live.mkdir()
    with pytest.raises(InputError, match="corpus file does not exist"):  # cleaned before anything else, even a run that fails
        ft.finetune(ft.FinetuneConfig(data=str(tmp_path / "missing.csv")), progress=False)
    assert sorted(models.iterdir()) == [live]
