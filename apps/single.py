"""One model's attention (any Hugging Face encoder by name or path): ``panel serve apps/single.py``."""

import panel as pn

from attnflows_panel.app import create_single_app

if pn.state.served:
    create_single_app().servable()
