"""Pure functions: plain data in, HoloViews element out. No Panel, no state.

HoloViews is imported by the builders when they first run (:func:`holoviews_bokeh`), not with these
modules: filling an export's page template needs only their frame functions and constants.
"""

import functools
from types import ModuleType


@functools.cache
def holoviews_bokeh() -> ModuleType:
    """HoloViews, its Bokeh backend loaded and current (the builders set Bokeh options)."""
    import holoviews as hv
    import holoviews.plotting.bokeh  # noqa: F401  (registers the Bokeh options)

    hv.Store.set_current_backend("bokeh")
    return hv

PRETRAINED_COLOR = "#36b7bd"
FINETUNED_COLOR = "#96519b"
SHARED_COLOR = "#8a8a8a"

MODEL_TITLES = {"pretrained": "pre-trained", "finetuned": "fine-tuned"}


def short_name(model_id: str) -> str:
    """The last part of a hub name or path, for titles (with its parent when the last part is a generic "model")."""
    parts = [p for p in model_id.replace("\\", "/").split("/") if p]
    if len(parts) > 1 and parts[-1].lower() in ("model", "models", "checkpoint", "final"):
        return "/".join(parts[-2:])
    return parts[-1] if parts else model_id
