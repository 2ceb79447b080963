"""Pre-trained vs fine-tuned attention: ``panel serve apps/compare.py``."""

import panel as pn

from attnflows_panel.app import create_app

if pn.state.served:
    create_app().servable()
