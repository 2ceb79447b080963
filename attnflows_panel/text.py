"""Counts in words, as every message and title writes them."""


def counted(n: int, noun: str) -> str:
    """``"1 edge"``, ``"3 edges"``: ``n`` and ``noun``, plural unless ``n`` is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
