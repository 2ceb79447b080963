"""Pure functions: plain data in, HoloViews element out. No Panel, no state."""

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the Bokeh options the builders set)

hv.Store.set_current_backend("bokeh")

PRETRAINED_COLOR = "#36b7bd"
FINETUNED_COLOR = "#96519b"
SHARED_COLOR = "#8a8a8a"

MODEL_TITLES = {"pretrained": "pre-trained", "finetuned": "fine-tuned"}
