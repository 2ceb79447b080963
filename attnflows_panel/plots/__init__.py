"""Pure functions: plain data in, HoloViews element out. No Panel, no state."""

PRETRAINED_COLOR = "#36b7bd"
FINETUNED_COLOR = "#96519b"
SHARED_COLOR = "#8a8a8a"
