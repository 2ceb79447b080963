"""The Panel templates that ``panel serve apps/compare.py`` and ``apps/single.py`` show."""

from __future__ import annotations

import html
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import holoviews as hv
import pandas as pd
import panel as pn
import param

from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.components import AttentionView, CompareView, SingleView
from attnflows_panel.components.corpus_browser import CorpusBrowser
from attnflows_panel.components.model_work import on_server, run_model_work
from attnflows_panel.components.url_state import share_state
from attnflows_panel.examples import Example, load_examples
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.models.pair import ModelPair
from attnflows_panel.prepare import Prepared

DEFAULT_MODEL_TITLE = "all-MiniLM-L6-v2"

# One model load at a time per process: transformers' lazy imports break when two threads race through them.
_LOCK = threading.RLock()
_PREPARED: Prepared | None = None
_DEFAULT_SINGLE: LoadedModel | None = None
_STAGE = ""  # what the shared preparation is doing, shown by every waiting page
_WARMED = threading.Event()
_MODELS: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()  # loaded by sessions of /single
LOAD_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnflows-load")  # preparing and loading models, one at a time


def shared_default() -> Prepared:
    """The default pair, corpus run and head map, prepared (the first time) once per server process."""
    global _PREPARED, _STAGE
    with _LOCK:
        if _PREPARED is None:
            from attnflows_panel.prepare import prepare_default

            def report(stage: str) -> None:
                global _STAGE
                _STAGE = stage

            _PREPARED = prepare_default(progress=False, report=report)
            _STAGE = ""
        return _PREPARED


NO_EXAMPLE = "(choose an example)"


def example_groups(examples: list[Example]) -> dict[str, dict[str, str]]:
    """The examples menu: one group per task (a pair task's says the default fine-tune never learned it), entries by name."""
    groups: dict[str, dict[str, str]] = {"": {NO_EXAMPLE: NO_EXAMPLE}}
    for example in examples:
        task = example.task if example.task == "sentiment" else f"{example.task} (not a task the default fine-tune learned)"
        groups.setdefault(task, {})[example.name] = example.name
    return groups


def _examples_menu(view: AttentionView) -> pn.widgets.Select:
    examples = {e.name: e for e in load_examples()}
    menu = pn.widgets.Select(name="Examples", groups=example_groups(list(examples.values())), value=NO_EXAMPLE, sizing_mode="stretch_width")

    def pick(event: object) -> None:
        example = examples.get(menu.value)
        if example is not None:
            view.param.update(text_pair=example.text_pair or "", text=example.text)

    menu.param.watch(pick, "value")
    return menu


def _in_background(work: Callable[[], Any], done: Callable[[Any], None], failed: Callable[[Exception], None], status: pn.pane.Markdown | None = None) -> None:
    """Run ``work`` on the loading thread, then call ``done`` (or ``failed``) on the page; ``status`` shows the shared stage."""
    if status is not None:

        def show_stage() -> None:
            if _STAGE:
                status.object = html.escape(_STAGE)

        poll = pn.state.add_periodic_callback(show_stage, period=400)
        done, failed = _stopping(poll, done), _stopping(poll, failed)
    run_model_work(work, done, failed, executor=LOAD_THREAD)


def _stopping(poll: Any, callback: Callable[[Any], None]) -> Callable[[Any], None]:
    def stop_then(outcome: Any) -> None:
        poll.stop()
        callback(outcome)

    return stop_then


def _warm_rasterizer_once() -> None:
    """Compile datashader's kernels off the event loop when a server process shows its first page."""
    if _WARMED.is_set():
        return
    _WARMED.set()
    from attnflows_panel.plots.attention_matrix import warm_rasterizer

    threading.Thread(target=warm_rasterizer, daemon=True).start()


def _page(title: str) -> tuple[pn.template.BootstrapTemplate, pn.Column, pn.Column]:
    if on_server():
        _warm_rasterizer_once()
    hv.extension("bokeh", logo=False)
    pn.extension("tabulator", notifications=False, loading_indicator=True)
    template = pn.template.BootstrapTemplate(title=title, sidebar_width=330)
    sidebar, main = pn.Column(sizing_mode="stretch_width"), pn.Column(sizing_mode="stretch_width")
    template.sidebar.append(sidebar)
    template.main.append(main)
    return template, sidebar, main


def _waiting(message: str) -> tuple[pn.pane.Markdown, pn.indicators.Progress]:
    return pn.pane.Markdown(html.escape(message)), pn.indicators.Progress(active=True, width=300)


def _corpus_card(view: AttentionView, corpus: pd.DataFrame) -> pn.Card:
    """The corpus run's sentences (most changed by fine-tuning first); choosing one shows it in every view."""
    browser = CorpusBrowser(corpus)
    source = f" of {corpus.attrs['source']}" if corpus.attrs.get("source") else ""
    title = f"Corpus: {len(corpus)} held-out sentences{source}, sortable and filterable; click one to show it"
    card = pn.Card(browser, title=title, collapsed=True, sizing_mode="stretch_width")

    def show(event: param.parameterized.Event) -> None:
        view.param.update(text_pair=event.new[1], text=event.new[0])
        card.collapsed = True  # the views, below the card, come back into sight

    browser.param.watch(show, "chosen")
    return card


def create_app(pair: ModelPair | None = None, text: str | None = None, head_map: HeadEmbedding | None = None, corpus: pd.DataFrame | None = None) -> pn.template.BootstrapTemplate:
    """The comparison dashboard for ``pair`` (default: the offline default pair, its corpus head map and sentence table)."""
    template, sidebar, main = _page("attnflows — pre-trained vs fine-tuned attention")

    def build(pair: ModelPair, head_map: HeadEmbedding | None, corpus: pd.DataFrame | None = None) -> None:
        view = CompareView(pair, text, head_map=head_map)
        if on_server():
            share_state(view, pn.state.location)
        sidebar[:] = [_examples_menu(view), view.controls()]
        main[:] = [view] if corpus is None else [_corpus_card(view, corpus), view]

    if not on_server():
        if pair is None:
            prepared = shared_default()
            pair, head_map, corpus = prepared.pair, prepared.head_map, prepared.corpus
        build(pair, head_map, corpus)
        return template
    status, progress = _waiting("Preparing the default models (the first run fine-tunes them; this takes a few minutes)…")
    main[:] = [status, progress]

    def failed(exc: Exception) -> None:
        main[:] = [pn.pane.Alert(f"Could not prepare the models: {html.escape(str(exc))}", alert_type="danger")]

    if pair is not None:
        pn.state.onload(lambda: build(pair, head_map, corpus))
    else:  # built once a browser has connected: a plain GET costs a template, not a view
        pn.state.onload(lambda: _in_background(shared_default, lambda prepared: build(prepared.pair, prepared.head_map, prepared.corpus), failed, status))
    return template


def _model_key(name: str) -> str:
    """A local folder by its resolved path (so two spellings share one model), a hub name as typed."""
    try:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name
    except (OSError, ValueError):
        return name


def _load(name: str) -> LoadedModel:
    """The model ``name`` names, shared read-only by every session using it and released when none does."""
    from attnflows_panel.models import load_encoder

    key = _model_key(name)
    with _LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = _MODELS[key] = load_encoder(name)
        return loaded


def _default_single() -> tuple[LoadedModel, HeadEmbedding | None]:
    """The default pre-trained model (loaded once per process) and, if already prepared, its heads on the corpus map."""
    global _DEFAULT_SINGLE
    from attnflows_panel.models import default_pretrained_path

    with _LOCK:
        if _DEFAULT_SINGLE is None:
            _DEFAULT_SINGLE = _load(str(default_pretrained_path()))
    return _DEFAULT_SINGLE, (_PREPARED.head_map if _PREPARED is not None else _cached_head_map())


def _cached_head_map() -> HeadEmbedding | None:
    """The default run's head map if it is already on disk (never computed here: the single app does not need it)."""
    from attnflows_panel.errors import AttnflowsError
    from attnflows_panel.head_map import cached_head_map
    from attnflows_panel.prepare import default_run_dir
    from attnflows_panel.store import RunStore

    try:
        return cached_head_map(RunStore.open(default_run_dir()))
    except AttnflowsError:
        return None


def _model_heads(head_map: HeadEmbedding | None, name: str) -> HeadEmbedding | None:
    if head_map is None:
        return None
    points = head_map.points[head_map.points["model"] == name].reset_index(drop=True)
    return HeadEmbedding(points, head_map.moves.iloc[0:0], head_map.method, head_map.stress)


def create_single_app(model: LoadedModel | None = None, text: str | None = None, head_map: HeadEmbedding | None = None) -> pn.template.BootstrapTemplate:
    """One model's attention (default: the offline pre-trained BERT); any encoder can be loaded by hub name or path."""
    template, sidebar, main = _page("attnflows — attention in one model")
    chooser = pn.widgets.TextInput(label="Model (hub name or local path)", placeholder="e.g. /path/to/checkpoint or bert-base-uncased", sizing_mode="stretch_width")
    load_button = pn.widgets.Button(label="Load model", color="primary")
    message = pn.pane.Markdown("", sizing_mode="stretch_width")
    loader = pn.Column(chooser, load_button, message, sizing_mode="stretch_width")
    current: dict[str, AttentionView] = {}

    def build(loaded: LoadedModel, heads: HeadEmbedding | None, title: str | None = None) -> None:
        view = SingleView(loaded, current["view"].text if current else text, head_map=heads, title=title)
        if on_server() and not current:  # the link opens the first model's view; a model loaded later starts afresh
            share_state(view, pn.state.location)
        current["view"] = view
        sidebar[:] = [loader, _examples_menu(view), view.controls()]
        main[:] = [view]

    def load(_: object = None) -> None:
        name = chooser.value.strip()
        if not name:
            message.object = "Type a hub name or a local path first."
            return
        message.object = f"Loading {html.escape(name)}…"
        load_button.disabled = True

        def done(loaded: LoadedModel) -> None:
            load_button.disabled = False
            message.object = f"Loaded {html.escape(name)}: {loaded.n_layers} layers × {loaded.n_heads} heads."
            build(loaded, None)

        def failed(exc: Exception) -> None:
            load_button.disabled = False
            message.object = f"**Could not load it:** {html.escape(str(exc))}"

        _in_background(lambda: _load(name), done, failed)

    load_button.on_click(load)
    if not on_server():
        if model is None:
            loaded, heads = _default_single()
            build(loaded, _model_heads(heads, "pretrained"), DEFAULT_MODEL_TITLE)
        else:
            build(model, head_map)
        return template
    status, progress = _waiting("Loading the default model…")
    main[:] = [status, progress]
    sidebar[:] = [loader]

    def failed(exc: Exception) -> None:
        main[:] = [pn.pane.Alert(f"Could not load the default model: {html.escape(str(exc))}", alert_type="danger")]

    if model is not None:
        pn.state.onload(lambda: build(model, head_map))
    else:  # built once a browser has connected
        pn.state.onload(lambda: _in_background(_default_single, lambda result: build(result[0], _model_heads(result[1], "pretrained"), DEFAULT_MODEL_TITLE), failed))
    return template
