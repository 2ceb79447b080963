"""The view's state in the page's URL: a link reopens the same input, heads, root, method and tau.

Query values are user input: each is parsed and checked on its own, a bad one is ignored and named in
the view's notice, never an error. Layers, heads and tokens are written as the views number them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from urllib.parse import parse_qs, quote, urlencode

import param

from attnflows_panel.components.attention_view import METHOD_NAMES, AttentionView

MAX_TEXT = 2_000  # characters of text a link carries; longer inputs are left out of it
STATE = ("text", "text_pair", "head_mask", "root", "method", "tau", "top_k", "units")


def heads_text(view: AttentionView) -> str:
    """The selected heads as ``"6.3,5.10"`` (layer.head, from 1); empty for every head."""
    return "" if view.head_mask.all() else ",".join(f"{layer + 1}.{head + 1}" for layer, head in view.selected_heads())


def parse_heads(value: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``"6.3,5.10"`` as 0-based (layer, head) pairs; a ValueError for anything else."""
    heads = []
    for item in filter(None, value.split(",")):
        layer, head = (int(part) for part in item.split("."))
        if not (1 <= layer <= n_layers and 1 <= head <= n_heads):
            raise ValueError(item)
        heads.append((layer - 1, head - 1))
    return heads


def _number(kind: type, low: float, high: float) -> Callable[[str], float]:
    """A parser of a number of ``kind`` within [low, high]."""

    def parse(value: str) -> float:
        number = kind(value)
        if not low <= number <= high:
            raise ValueError(value)
        return number

    return parse


def _one_of(choices: Collection[str]) -> Callable[[str], str]:
    """A parser accepting only ``choices``."""

    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(value)
        return value

    return parse


def query_state(view: AttentionView) -> dict[str, str]:
    """The query parameters that describe ``view`` (defaults left out, long text left out)."""
    level, token = view.root
    state = {
        "text": view.text if len(view.text) <= MAX_TEXT else "",
        "pair": view.text_pair if len(view.text_pair) <= MAX_TEXT else "",
        "heads": heads_text(view),
        "root": "" if level < 0 else f"{level}.{token}",
        "method": "" if view.method == "trace" else view.method,
        "tau": f"{view.tau:g}",
        "top_k": str(view.top_k),
        "units": "" if view.units == "word pieces" else view.units,
    }
    return {key: value for key, value in state.items() if value}


def apply_query(view: AttentionView, query: Mapping[str, list[str]]) -> list[str]:
    """Set ``view`` from ``query`` (as ``parse_qs`` gives it); returns the names of the values ignored."""
    parsers: dict[str, tuple[str, Callable[[str], object]]] = {
        "method": ("method", _one_of(METHOD_NAMES)),
        "tau": ("tau", _number(float, *view.param.tau.bounds)),
        "top_k": ("top_k", _number(int, *view.param.top_k.bounds)),
        "units": ("units", _one_of(view.param.units.objects)),
    }
    updates: dict[str, object] = {}
    ignored = []
    for key, (name, parse) in parsers.items():
        if key in query:
            try:
                updates[name] = parse(query[key][-1])
            except ValueError:
                ignored.append(key)
    if "text" in query:
        view.param.update(text_pair=query.get("pair", [""])[-1][:MAX_TEXT], text=query["text"][-1][:MAX_TEXT])
    for name in ("method", "units", "top_k", "tau"):  # tau after method: a new method brings its own tau
        if name in updates:
            setattr(view, name, updates[name])
    if "heads" in query:
        try:
            view.select_heads(parse_heads(query["heads"][-1], view.n_layers, view.n_heads))
        except ValueError:
            ignored.append("heads")
    return ignored


def apply_root(view: AttentionView, query: Mapping[str, list[str]]) -> list[str]:
    """Set ``view``'s root from ``query`` once its records are shown; returns ``["root"]`` if the value was ignored."""
    if "root" not in query:
        return []
    try:
        level, token = (int(part) for part in query["root"][-1].split("."))
        if view.shown is None or not (1 <= level <= view.n_layers and 0 <= token < view.shown[0].n_tokens):
            raise ValueError(level)
    except ValueError:
        return ["root"]
    view.root = (level, token)
    return []


def share_state(view: AttentionView, location: param.Parameterized) -> None:
    """Open ``view`` at the state in ``location``'s query, then keep the query following the view."""
    query = parse_qs(location.search.lstrip("?"))
    ignored = apply_query(view, query)

    def follow(*_: object) -> None:
        location.search = "?" + urlencode(query_state(view), quote_via=quote, safe=".,")

    def settle(*_: object) -> None:
        """Once the link's input is shown (the models run off the page's loop): its root, the notice, then the URL follows."""
        if view.busy:
            return
        view.param.unwatch(waiting)
        skipped = ignored + apply_root(view, query)
        if skipped:
            view.notice = f"Ignored from the link (not valid here): {', '.join(skipped)}."
        view.param.watch(follow, list(STATE))
        follow()

    waiting = view.param.watch(settle, ["busy"])
    settle()
