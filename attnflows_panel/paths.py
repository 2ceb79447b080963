"""Where attnflows keeps its cache, atomic writes into it, and the recorded hashes of the files it identifies by content."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def home() -> Path:
    """The cache root: ``$ATTNFLOWS_HOME`` or ``~/.cache/attnflows``."""
    return Path(os.environ.get("ATTNFLOWS_HOME") or Path.home() / ".cache" / "attnflows").expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


HASHES = "hashes"  # under home(): a record of each file hashed by recorded_sha256
SETTLE_NS = 3 * 10**9  # a file changed more recently than this is not recorded: a write in the same clock tick would not show (FAT ticks are 2 s)


def _file_state(stat: os.stat_result) -> list[int]:
    """What a change of the file's bytes alters: its size, modification and change times, and its inode (a file replaced by another)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def recorded_sha256(path: str | os.PathLike) -> str:
    """``sha256_file(path)``, read from its record under ``home()`` while the file's size, times and inode are those recorded.

    A file whose state differs is hashed again, and recorded once it has not changed for ``SETTLE_NS``.
    """
    path = Path(path).resolve()
    record = home() / HASHES / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    stat = path.stat()
    state = _file_state(stat)
    try:
        saved = json.loads(record.read_text())
        if saved["path"] == str(path) and saved["state"] == state:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record yet, or an unreadable one: hash the file
    digest = sha256_file(path)
    settled = time.time_ns() - stat.st_ctime_ns >= SETTLE_NS  # every write moves the change time, even one that restores the modification time
    if settled and _file_state(path.stat()) == state:
        with contextlib.suppress(OSError):  # a read-only cache only costs the next start a hash
            write_json_atomic(record, {"path": str(path), "state": state, "sha256": digest})
    return digest


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_TEMPORARY = re.compile(r"\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[^-]+")


def _temporary_prefix(target: Path) -> str:
    """``.NAME.tmp-PID-``: the prefix of a temporary sibling of ``target``, naming the process that writes it."""
    return f".{target.name}.tmp-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (assumed so where that cannot be asked safely)."""
    if os.name == "nt" or pid <= 0:
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True


def remove_stale_temporaries(directory: Path, targets: str = ".+") -> list[Path]:
    """Remove the temporaries of atomic writes (of files named like ``targets``) whose process no longer runs; return them."""
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not re.fullmatch(targets, match["target"]) or pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling file path that replaces ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temporary_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
