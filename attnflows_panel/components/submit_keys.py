"""Ctrl+Enter (Cmd+Enter on a Mac) in a text box of the page, counted so Python can run the typed text."""

from __future__ import annotations

import param
from panel.custom import JSComponent


class SubmitKeys(JSComponent):
    """Counts Ctrl/Cmd+Enter pressed inside any text box of the page; watch ``presses`` to submit."""

    presses = param.Integer(default=0, doc="How often Ctrl+Enter was pressed in a text box.")

    _esm = """
    export function render({ model }) {
      const onkey = (event) => {
        const target = event.composedPath()[0]
        const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT")
        if (typing && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
          event.preventDefault()
          model.presses += 1
        }
      }
      document.addEventListener("keydown", onkey)
      model.on("remove", () => document.removeEventListener("keydown", onkey))
      return document.createElement("span")
    }
    """

    def __init__(self, **params: object) -> None:
        super().__init__(**{"width": 0, "height": 0, "margin": 0, **params})
