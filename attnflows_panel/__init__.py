"""attnflows: see how attention in Transformer encoders works and how fine-tuning changes it.

Heavy dependencies (torch, transformers) are imported lazily by the modules that need them.
"""

import os

from attnflows_panel.errors import AttnflowsError

# oneDNN, under torch's CPU kernels (GELU among them), keeps a JIT-compiled kernel per input shape, up to 1,024: inputs of
# every length filled it, its kernels pinned the C heap, and a corpus run's peak grew with its length (README, "Python").
# oneDNN reads this at its first kernel, so it holds when attnflows is imported first; a value already set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")

__version__ = "0.1.0"
__all__ = ["AttnflowsError", "__version__"]
