"""What the benchmarks print: a table of name, attnflows, baseline and ratio, and the checks with the run's load."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

HEADER = ("name", "attnflows", "baseline", "ratio")


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """``rows`` of four strings under :data:`HEADER`, columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(4)]
    line = " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def print_checks(checks: Sequence[tuple[str, bool, str]], started: float) -> None:
    """Each (what, passed, detail) as a PASS/FAIL line, then the load average and the wall time since ``started``."""
    for what, ok, detail in checks:
        print(f"check {'PASS' if ok else 'FAIL'}: {what} ({detail})")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
