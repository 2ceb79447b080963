"""Counts in words, as every message and title writes them."""


def plural(noun: str, n: int) -> str:
    """``noun`` for one, ``noun + "s"`` for any other count."""
    return noun if n == 1 else f"{noun}s"


def counted(n: int, noun: str) -> str:
    """``"1 edge"``, ``"3 edges"``: ``n`` and ``noun``, plural unless ``n`` is 1."""
    return f"{n} {plural(noun, n)}"
