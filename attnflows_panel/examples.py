"""The curated example inputs in ``attnflows_panel/data/examples.jsonl`` (sentences and sentence pairs, with sources)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_FILE = Path(__file__).resolve().parent / "data" / "examples.jsonl"  # package data: wheels carry it


@dataclass(frozen=True)
class Example:
    """One example input for the app's menu."""

    name: str
    text: str
    task: str
    source: str
    text_pair: str | None = None
    label: str | None = None


def load_examples(path: Path = EXAMPLES_FILE) -> list[Example]:
    """Every example in ``path``, in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Example(**json.loads(line)) for line in lines if line.strip()]
