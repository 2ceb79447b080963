"""The view's state in the URL: written as the view changes, read back into a new view, bad values ignored."""

from __future__ import annotations

from urllib.parse import parse_qs

import param
import pytest

from attnflows_panel.components import CompareView
from attnflows_panel.components.url_state import apply_query, apply_root, parse_heads, query_state, share_state

TEXT = "the movie was good, but the car was bad"


class FakeLocation(param.Parameterized):
    """What the view needs of ``pn.state.location``: its query string."""

    search = param.String(default="")


def test_a_link_reopens_the_same_view(tiny_pair) -> None:
    view = CompareView(tiny_pair, TEXT)
    location = FakeLocation()
    share_state(view, location)
    view.method = "rollout"
    view.tau = 0.02
    view.select_heads([(1, 2), (0, 3)])
    view.root = (1, 4)
    view.units = "words"
    view.root = (2, 1)
    query = parse_qs(location.search.lstrip("?"))
    assert query["heads"] == ["1.4,2.3"] and query["root"] == ["2.1"] and query["method"] == ["rollout"] and query["tau"] == ["0.02"]
    again = CompareView(tiny_pair, "")
    assert apply_query(again, query) == [] and apply_root(again, query) == []
    assert (again.text, again.method, again.tau, again.units, again.root) == (TEXT, "rollout", 0.02, "words", (2, 1))
    assert again.selected_heads() == view.selected_heads()
    assert query_state(again) == query_state(view)


@pytest.mark.parametrize(
    "search, ignored",
    [
        ("heads=9.1", ["heads"]),
        ("heads=1.x", ["heads"]),
        ("tau=5", ["tau"]),
        ("tau=nan", ["tau"]),
        ("method=__import__", ["method"]),
        ("root=2.999", ["root"]),
        ("top_k=-1&units=letters", ["top_k", "units"]),
        ("text=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", []),
    ],
)
def test_bad_or_hostile_values_are_ignored_with_a_notice(tiny_pair, search: str, ignored: list[str]) -> None:
    view = CompareView(tiny_pair, TEXT)
    location = FakeLocation(search="?" + search)
    share_state(view, location)
    if ignored:
        assert view.notice == f"Ignored from the link (not valid here): {', '.join(ignored)}."
    assert view.records is not None and view.tau <= 1.0 and view.method in ("trace", "rollout", "flow")
    assert "<img" not in view.notice_pane.object


def test_heads_parse_as_the_views_number_them() -> None:
    assert parse_heads("6.3,1.12", 6, 12) == [(5, 2), (0, 11)]
    with pytest.raises(ValueError):
        parse_heads("0.1", 6, 12)
