"""Panel components: ``pn.viewable.Viewer`` classes that hold state and wire streams."""

from attnflows_panel.components.attention_view import AttentionView
from attnflows_panel.components.compare_view import CompareView
from attnflows_panel.components.single_view import SingleView

__all__ = ["AttentionView", "CompareView", "SingleView"]
