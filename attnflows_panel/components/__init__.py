"""Panel components: ``pn.viewable.Viewer`` classes that hold state and wire streams."""

from attnflows_panel.components.compare_view import CompareView

__all__ = ["CompareView"]
