"""attnflows: see how attention in Transformer encoders works and how fine-tuning changes it.

Heavy dependencies (torch, transformers) are imported lazily by the modules that need them.
"""

from attnflows_panel.errors import AttnflowsError

__version__ = "0.1.0"
__all__ = ["AttnflowsError", "__version__"]
