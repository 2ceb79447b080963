"""The exported page is a template filled with data: the document it loads equals the one the plot builders make for that input."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from bokeh.core.json_encoder import serialize_json
from bokeh.core.property.singletons import Undefined
from bokeh.core.serialization import SerializationError, Serializer
from bokeh.document import Document
from bokeh.model import Model

from attnflows_panel import export, page_template
from attnflows_panel.analysis.source import DenseAttention
from attnflows_panel.extract import extract, extract_pair

WORDS = "the car was good and i love it but a movie is very bad awful film".split()


def text_of(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def page_roots(page: str) -> list:
    """The roots of the Bokeh document a page loads (its JSON, HTML-escaped as Bokeh embeds it)."""
    (docs,) = re.findall(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', page, re.DOTALL)
    (doc,) = json.loads(html.unescape(docs)).values()
    return doc["roots"]


def built_roots(records, **settings) -> list:
    """The roots of the document the plot builders make for ``records``."""
    document = Document()
    document.add_root(export.dashboard_layout(records, **settings))
    return json.loads(serialize_json(document.to_json(deferred=False)))["roots"]


def canonical(roots: list) -> list:
    """Serialized roots with ids numbered by first appearance and attributes at their class default left out."""
    ids: dict[str, str] = {}
    defaults: dict[tuple[str, str], Any] = {}

    def default(name: str, attr: str) -> Any:
        if (name, attr) not in defaults:
            cls = Model.model_class_reverse_map[name]
            try:
                defaults[name, attr] = json.loads(serialize_json(Serializer(deferred=False).encode(cls.lookup(attr).class_default(cls))))
            except SerializationError:  # an undefined default: never left out
                defaults[name, attr] = Undefined
        return defaults[name, attr]

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(value) for value in node]
        if not isinstance(node, dict):
            return node
        out = {key: walk(value) for key, value in node.items() if key not in ("id", "attributes")}
        if "id" in node:
            out["id"] = ids.setdefault(node["id"], f"m{len(ids)}")
        if "attributes" in node:
            out["attributes"] = {key: walk(value) for key, value in node["attributes"].items() if value != default(node["name"], key)}
        return out

    return walk(roots)


def differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            yield from differences(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {str(a)[:100]} != {str(b)[:100]}"


def assert_page_is_built(records, **settings) -> None:
    """The page of ``records`` (a template filled) loads the document the builders make, model for model."""
    built = canonical(built_roots(records, **settings))  # first: a page from a shipped template imports no figure class
    page = canonical(page_roots(export.dashboard_html(records, **settings)))
    found = list(differences(page, built))
    assert not found, "\n".join(found[:20])


def long_record(record, n: int, seed: int, layers: int | None = None, heads: int | None = None):
    """``record`` with ``n`` tokens of random attention (longer than a tiny model takes), of ``layers`` x ``heads`` (default: the record's)."""
    L, H = layers or record.n_layers, heads or record.n_heads
    attention = np.random.default_rng(seed).random((L, H, n, n), dtype=np.float32) ** 8  # peaked rows, as a model's
    attention /= attention.sum(axis=-1, keepdims=True)
    ids = np.arange(n)
    tokens = ["[CLS]", *(WORDS[i % len(WORDS)] for i in range(n - 2)), "[SEP]"]
    return dataclasses.replace(record, tokens=tokens, input_ids=ids, word_ids=np.r_[-1, ids[:-2], -1], segment_ids=np.zeros(n, dtype=np.int64),
                               cls_mask=ids == 0, sep_mask=ids == n - 1, source=DenseAttention(attention))


@pytest.mark.parametrize("words", [3, 15, 38])
@pytest.mark.parametrize("models", [2, 1])
def test_the_page_loads_the_builders_document(tiny_pair, words: int, models: int) -> None:
    records = extract_pair(tiny_pair, text_of(words))[:models]
    assert_page_is_built(records)
    assert_page_is_built(records, tau=0.05, alpha=0.3, top_heads=2, top_k=0)


def test_the_page_of_one_model_with_a_prediction(tiny_pair) -> None:
    assert_page_is_built((extract(tiny_pair.finetuned, None, text_of(9)),), top_heads=3)


def test_the_page_of_a_partial_selection_and_of_an_empty_flow(tiny_pair) -> None:
    records = extract_pair(tiny_pair, text_of(12))
    mask = np.zeros((records[0].n_layers, records[0].n_heads), dtype=bool)
    mask[:, 1] = True
    assert_page_is_built(records, head_mask=mask)
    mask[-1] = False
    assert_page_is_built(records, head_mask=mask)  # no head of the deepest layer: no edge, and a message
    assert_page_is_built(records, tau=1.0, top_heads=0)


@pytest.mark.parametrize("models", [2, 1])
def test_the_page_of_a_flow_of_one_edge(tiny_pair, models: int) -> None:
    """One edge, shared by the pair: constant colour and width columns (HoloViews renders a constant style column as a value)."""
    records = extract_pair(tiny_pair, text_of(5))[:models]
    mask = np.zeros((records[0].n_layers, records[0].n_heads), dtype=bool)
    mask[-1, 3] = True
    assert len(export.dashboard_data(records, head_mask=mask, top_k=1).flow["edges"]) == 1
    assert_page_is_built(records, head_mask=mask, top_k=1)


@pytest.mark.parametrize("n", [130, 150])
def test_the_page_of_a_long_input(tiny_pair, n: int) -> None:
    """Past 120 tokens the flow's axis names every few tokens and unreached tokens are not drawn; matrices grow."""
    records = tuple(long_record(r, n, seed) for seed, r in enumerate(extract_pair(tiny_pair, text_of(3))))
    assert export.dashboard_data(records).structure[4]  # no edge: the root alone, of one colour
    assert_page_is_built(records)
    assert_page_is_built(records[:1], top_heads=1)
    assert not export.dashboard_data(records, tau=0.01).structure[4]  # edges
    assert_page_is_built(records, tau=0.01)
    assert_page_is_built(records[:1], tau=0.01, top_heads=1)


def test_the_page_of_an_input_over_the_entry_cap(tiny_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    records = extract_pair(tiny_pair, text_of(6))
    monkeypatch.setattr(export, "MAX_ENTRIES", int(sum(np.count_nonzero(r.attention >= 0.1) for r in records)) // 2)
    assert not export.dashboard_data(records).shipped.all()
    assert_page_is_built(records)


def test_one_template_serves_models_of_any_shape(tiny_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid's and the flow's axes are filled in: models of 1 x 3 to 32 x 16 heads share one page per structure."""
    record = extract(tiny_pair.pretrained, None, text_of(5))
    build, builds = export.template_html, []
    monkeypatch.setattr(export, "template_html", lambda structure: builds.append(structure) or build(structure))
    monkeypatch.setattr(page_template, "_MEMORY", {})
    for seed, (layers, heads) in enumerate([(1, 3), (6, 12), (32, 16)]):
        records = tuple(long_record(record, 9, 2 * seed + model, layers, heads) for model in range(2))
        assert {r.source.shape[:2] for r in records} == {(layers, heads)}
        assert_page_is_built(records, top_heads=2)
        assert_page_is_built(records[:1], top_heads=2)
    assert len(builds) <= 2 and len(set(builds)) == len(builds)  # pair and one model, each built at most once (or read from the cache)


def test_the_package_ships_the_default_pages_templates_of_this_code() -> None:
    shipped = {page_template.shipped_path(export.template_key(structure)) for structure in export.SHIPPED_STRUCTURES}
    assert set(page_template.SHIPPED.glob("*")) == shipped, "the shipped page templates are not this code's: run `make templates`"


@pytest.mark.parametrize("models", [2, 1])
def test_a_first_export_of_a_default_page_fills_a_shipped_template(tiny_pair, tmp_path, monkeypatch: pytest.MonkeyPatch, models: int) -> None:
    """With nothing in memory or the cache directory, short and long inputs of any model load the builders' document from the package's templates."""
    monkeypatch.setenv("ATTNFLOWS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(page_template, "_MEMORY", {})
    build = export.template_html
    monkeypatch.setattr(export, "template_html", lambda structure: pytest.fail(f"built {structure}"))
    records = extract_pair(tiny_pair, text_of(7))[:models]
    assert_page_is_built(records)
    assert_page_is_built(tuple(long_record(r, 140, seed, 6, 12) for seed, r in enumerate(records)))
    assert not (tmp_path / "home" / "page-templates").exists()  # nothing built, nothing saved
    structure = export.dashboard_data(records).structure
    page = build(structure)
    assert page_template.unship_text(page_template.ship_text(page)) == page  # this Bokeh's scripts where the shipped page had them
    assert all(script in page for script in page_template.bokeh_scripts())


def test_a_template_is_kept_and_a_damaged_one_rebuilt(tiny_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    records = extract_pair(tiny_pair, text_of(4))
    page = export.dashboard_html(records, top_heads=1)
    saved = page_template.template_path(export.template_key(export.dashboard_data(records, top_heads=1).structure))
    build, builds = export.template_html, []
    monkeypatch.setattr(export, "template_html", lambda structure: builds.append(structure) or build(structure))
    monkeypatch.setattr(page_template, "_MEMORY", {})
    assert export.dashboard_html(records, top_heads=1) == page and builds == []  # read from the cache directory
    for damage in ("", saved.read_text()[:5000], saved.read_text().replace("attnflows-slot:flow/width", "900")):
        saved.write_text(damage)
        monkeypatch.setattr(page_template, "_MEMORY", {})
        assert canonical(page_roots(export.dashboard_html(records, top_heads=1))) == canonical(page_roots(page))  # a new template: new element ids
    assert len(builds) == 3 and "attnflows-slot:flow/width" in saved.read_text()  # built again, and saved


def test_saving_a_template_removes_those_of_other_versions(tiny_pair, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNFLOWS_HOME", str(tmp_path))
    monkeypatch.setattr(page_template, "_MEMORY", {})
    records = extract_pair(tiny_pair, text_of(4))
    kept = page_template.template_path(export.template_key(export.dashboard_data(records, top_heads=1).structure))
    export.dashboard_html(records, top_heads=1)
    stale = [kept.with_name(f"{'0' * 32}-{'1' * 32}.html"), kept.with_name(f"{'2' * 64}.html")]  # another version; a name from before versions
    for path in stale:
        path.write_text("old")
    monkeypatch.setattr(page_template, "_MEMORY", {})
    export.dashboard_html(records, top_heads=2)  # a structure not saved yet
    assert kept.exists() and not any(path.exists() for path in stale)
