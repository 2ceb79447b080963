"""``create_app()``: the Panel template that ``panel serve apps/compare.py`` shows."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable

import holoviews as hv
import panel as pn

from attnflows_panel.components.compare_view import CompareView
from attnflows_panel.examples import load_examples
from attnflows_panel.models.pair import ModelPair

_PAIR_LOCK = threading.Lock()
_PAIR: ModelPair | None = None
_PAIR_ERROR: str = ""


def shared_default_pair() -> ModelPair:
    """The default pair, loaded (and fine-tuned the first time) once per server process."""
    global _PAIR, _PAIR_ERROR
    with _PAIR_LOCK:
        if _PAIR is None:
            from attnflows_panel.models import default_pair

            try:
                _PAIR = default_pair(progress=False)
            except Exception as exc:  # shown on the page; the server keeps running
                _PAIR_ERROR = f"{type(exc).__name__}: {exc}"
                raise
        return _PAIR


def _examples_menu(view: CompareView) -> pn.widgets.Select:
    examples = {"(choose an example)": None} | {f"{e.name} — {e.task}": e for e in load_examples()}
    menu = pn.widgets.Select(label="Examples", options=list(examples), sizing_mode="stretch_width")

    def pick(event: object) -> None:
        example = examples[menu.value]
        if example is not None:
            view.param.update(text_pair=example.text_pair or "", text=example.text)

    menu.param.watch(pick, "value")
    return menu


def _when_ready(load: Callable[[], ModelPair], build: Callable[[ModelPair], None], status: pn.pane.Markdown) -> None:
    """Load the pair off the event loop, then build the page; the page shows progress meanwhile."""
    result: dict[str, ModelPair] = {}

    def work() -> None:
        try:
            result["pair"] = load()
        except Exception as exc:  # noqa: BLE001 - reported on the page
            result["error"] = exc  # type: ignore[assignment]

    thread = threading.Thread(target=work, daemon=True)
    thread.start()

    def poll() -> None:
        if thread.is_alive():
            return
        callback.stop()
        if "pair" in result:
            build(result["pair"])
        else:
            status.object = f"**Could not prepare the models:** {html.escape(str(result['error']))}"

    callback = pn.state.add_periodic_callback(poll, period=500)


def create_app(pair: ModelPair | None = None, text: str | None = None) -> pn.template.BootstrapTemplate:
    """The comparison dashboard for ``pair`` (default: the offline default pair) in a Bootstrap template."""
    hv.extension("bokeh", logo=False)
    pn.extension(notifications=False)
    template = pn.template.BootstrapTemplate(title="attnflows — pre-trained vs fine-tuned attention", sidebar_width=330)
    status = pn.pane.Markdown("Preparing the default models (the first run fine-tunes them; this takes a few minutes)…")
    progress = pn.indicators.Progress(active=True, width=300)
    sidebar, main = pn.Column(sizing_mode="stretch_width"), pn.Column(status, progress, sizing_mode="stretch_width")
    template.sidebar.append(sidebar)
    template.main.append(main)

    def build(loaded: ModelPair) -> None:
        view = CompareView(loaded, text)
        sidebar[:] = [_examples_menu(view), view.controls()]
        main[:] = [view]

    if pair is not None:
        build(pair)
    elif pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        _when_ready(shared_default_pair, build, status)
    else:
        build(shared_default_pair())
    return template
