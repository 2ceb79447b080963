"""Static Bokeh pages as templates: a page rendered once per structure, whose data-dependent values are slots filled per page.

A slot is named ``"model/path"``: a named model of the document, then attributes (a one-item list, as ``Plot.xaxis``,
stands for its item; a digit for a list index; a key for a dict entry). Building a template puts a placeholder
where the serialized document holds that value; filling it writes the value as Bokeh serializes it, HTML-escaped
as Bokeh escapes the whole document, so the browser loads the document it would have loaded from models holding
those values (no script of ours runs).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bokeh.core.serialization import Serializer
from bokeh.document import Document
from bokeh.embed.bundle import bundle_for_objs_and_resources
from bokeh.embed.elements import html_page_for_render_items
from bokeh.embed.util import standalone_docs_json_and_render_items
from bokeh.model import Model
from bokeh.resources import INLINE

from attnflows_panel.paths import atomic_file, home

PLACEHOLDER = "attnflows-slot:"
TITLE = "title"  # the slot of the page's <title>
SHIPPED = Path(__file__).parent / "data" / "page-templates"  # the default pages' templates, without Bokeh's scripts (see ship_text)
SCRIPT_MARKER = "attnflows-bokeh-script:"  # where a shipped template had Bokeh's inline script of that index
BOKEH_COMPONENTS = ["bokeh", "bokeh-widgets"]  # the BokehJS bundles a page of Bokeh figures and Divs loads (no tables, WebGL or MathJax)


@dataclass(frozen=True)
class PageTemplate:
    """A page cut at its slots (``"attnflows-slot:NAME"``, quotes included): ``parts[0]``, the value of ``names[0]``, ``parts[1]``, ..."""

    parts: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, page: str) -> PageTemplate:
        first, *pieces = page.split(f'"{PLACEHOLDER}')
        cut = [piece.partition('"') for piece in pieces]
        return cls((first, *(rest for _, _, rest in cut)), tuple(name for name, _, _ in cut))

    def fill(self, values: Mapping[str, Any], title: str) -> str:
        """The page with each slot's value (the title escaped as text, the others as Bokeh serializes them)."""
        serializer = Serializer(deferred=False)  # buffers inline, as base64: the encoded values are plain JSON
        filled = {name: _encoded(value, serializer) for name, value in values.items()} | {TITLE: html.escape(title)}
        out = [self.parts[0]]
        for name, part in zip(self.names, self.parts[1:], strict=True):
            out += [filled[name], part]
        return "".join(out)


_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # as bokeh.core.json_encoder.serialize_json writes a page's JSON


def _encoded(value: Any, serializer: Serializer) -> str:
    """``value`` as it stands in Bokeh's page: serialized, as JSON, HTML-escaped as ``html_page_for_render_items`` escapes it."""
    plain = isinstance(value, str) or (type(value) is list and all(isinstance(item, str) for item in value))  # tokens: no need of Bokeh's encoder
    return html.escape(_JSON(value if plain else serializer.encode(value)), quote=False)


def template_page(document: Document, slots: Iterable[str]) -> str:
    """``document`` as a self-contained page (Bokeh's JS and CSS inline) with a placeholder at each slot and in its <title>."""
    docs_json, render_items = standalone_docs_json_and_render_items([document])
    reps = {rep["id"]: rep for doc in docs_json.values() for rep in _object_reps(doc["roots"])}
    for slot in slots:
        model, path = _anchor(document, slot)
        _place(reps[model.id].setdefault("attributes", {}), path, f"{PLACEHOLDER}{slot}")
    bundle = bundle_for_objs_and_resources([document], INLINE)
    # Bokeh adds the external files every imported model class declares, used or not (Panel's ES-module
    # shim among them); these pages use Bokeh's own models only, which are all in the inline bundle.
    bundle.js_files.clear()
    bundle.css_files.clear()
    page = html_page_for_render_items(bundle, docs_json, render_items, title=f"{PLACEHOLDER}{TITLE}")
    return page.replace(f"<title>{PLACEHOLDER}{TITLE}</title>", f'<title>"{PLACEHOLDER}{TITLE}"</title>', 1)


def _object_reps(node: Any) -> Iterable[dict]:
    """Every full model representation (``{"type": "object", "id": ..., "attributes": ...}``) in serialized JSON."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "id" in node:
            yield node
        for value in node.values():
            yield from _object_reps(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _object_reps(value)


def _anchor(document: Document, slot: str) -> tuple[Model, list[str]]:
    """The last model on ``slot``'s path and the rest of the path (an attribute, then dict keys)."""
    name, _, path = slot.partition("/")
    model = document.select_one({"name": name})
    if model is None:
        raise KeyError(f"no model named {name!r} in the document (slot {slot!r})")
    parts = path.split(".")
    node, rest = model, parts
    for i, part in enumerate(parts[:-1]):  # the last part names a value
        node = node[int(part)] if part.isdigit() else node[part] if isinstance(node, dict) else getattr(node, part)
        if isinstance(node, list) and len(node) == 1:
            node = node[0]
        if isinstance(node, Model):
            model, rest = node, parts[i + 1 :]
    return model, rest


def _place(attributes: dict, path: list[str], placeholder: str) -> None:
    """Put ``placeholder`` at ``path`` (an attribute, then keys of serialized maps) in a model's serialized attributes."""
    attr, *keys = path
    if not keys:
        attributes[attr] = placeholder
        return
    entries = attributes[attr]["entries"]
    at = next(i for i, (key, _) in enumerate(entries) if key == keys[0])
    if len(keys) == 1:
        entries[at] = [keys[0], placeholder]
    else:
        _place({keys[0]: entries[at][1]}, keys, placeholder)


def cached_template(key: str, slots: frozenset[str], build: Callable[[], str]) -> PageTemplate:
    """The template of ``key`` (``VERSION-STRUCTURE``): from memory, else from the cache directory, else as shipped with the
    package, else ``build()``, then saved in place of the saved templates of other versions; a page that is unreadable or whose
    slots are not ``slots`` is not used."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = template_path(key)
    template = _read(slots, lambda: path.read_text(encoding="utf-8")) or _read(slots, lambda: unship_text(shipped_path(key).read_bytes()))
    if template is None:
        page = build()
        template = PageTemplate.parse(page)
        try:
            with atomic_file(path) as tmp:
                tmp.write_text(page, encoding="utf-8")
            version = key.partition("-")[0]
            for stale in path.parent.glob("*.html"):
                if not stale.name.startswith(f"{version}-"):
                    stale.unlink(missing_ok=True)  # another version's, or one named before keys began with the version
        except OSError:
            pass  # a read-only cache costs each process one build
    _MEMORY[key] = template
    return template


def _read(slots: frozenset[str], page: Callable[[], str]) -> PageTemplate | None:
    """The template of ``page()``, or None when it cannot be read or does not hold ``slots``."""
    try:
        template = PageTemplate.parse(page())
    except (OSError, ValueError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return template if set(template.names) == slots | {TITLE} and template.parts[-1].rstrip().endswith("</html>") else None


def bokeh_scripts() -> list[str]:
    """The inline BokehJS scripts of a page of Bokeh figures and Divs, as this Bokeh writes them."""
    return INLINE.clone(components=BOKEH_COMPONENTS).js_raw


def ship_text(page: str) -> bytes:
    """A template ``page`` as the package ships it: gzipped, each of Bokeh's inline scripts (``bokeh_scripts``) a marker."""
    for i, script in enumerate(bokeh_scripts()):
        if page.count(script) != 1:
            raise ValueError("the page does not load exactly the BokehJS scripts of figures and Divs")
        page = page.replace(script, f"{SCRIPT_MARKER}{i}")
    return gzip.compress(page.encode("utf-8"), mtime=0)


def unship_text(shipped: bytes) -> str:
    """The template page a :func:`ship_text` holds, with this Bokeh's inline scripts."""
    page = gzip.decompress(shipped).decode("utf-8")
    for i, script in reversed(list(enumerate(bokeh_scripts()))):  # marker 1 before 10
        page = page.replace(f"{SCRIPT_MARKER}{i}", script, 1)
    return page


def shipped_path(key: str) -> Path:
    """Where the package keeps the template of ``key``, when it ships one."""
    return SHIPPED / f"{key}.html.gz"


_MEMORY: dict[str, PageTemplate] = {}


def template_path(key: str) -> Path:
    """Where the template of ``key`` is kept."""
    return home() / "page-templates" / f"{key}.html"


def sources_hash(paths: Iterable[Path]) -> str:
    """Hex SHA-256 over the bytes of the files that shape a page."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.read_bytes())
    return digest.hexdigest()
